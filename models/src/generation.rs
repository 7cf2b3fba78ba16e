//! The per-sequence generation state shared by every caller that decodes (the
//! CLI, the serving engine, benchmarks): sampling, incremental detokenization,
//! stop strings, end-of-sequence ids and the token budget. The caller owns the
//! model step; `SequenceState::accept` is fed one row of logits at a time.

use crate::error::ModelError;
use crate::sampling::{Sampler, SamplingParams, TokenLogprob};
use crate::tokenizer::TextTokenizer;

/// Why a sequence ended, in OpenAI's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// End-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` reached, or the context is full.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// What one accepted token produced.
#[derive(Debug, Clone, PartialEq)]
pub struct StepOutput {
    pub token: u32,
    /// Text that is now final (never includes any part of a stop string).
    pub text: String,
    pub logprob: Option<TokenLogprob>,
    pub finished: Option<FinishReason>,
}

/// Limits and stop conditions of one request.
#[derive(Debug, Clone, PartialEq)]
pub struct StopConditions {
    pub max_tokens: usize,
    pub stop: Vec<String>,
    pub eos_ids: Vec<u32>,
    /// The model's context: generation ends with `Length` when prompt plus output
    /// reach it.
    pub context: usize,
}

/// Generation state of one sequence.
#[derive(Debug, Clone)]
pub struct SequenceState {
    sampler: Sampler,
    stops: StopConditions,
    prompt_len: usize,
    output: Vec<u32>,
    /// Incremental detokenization (TGI's scheme): the text of
    /// `output[prefix..read]` is already accounted for in `text`.
    prefix: usize,
    read: usize,
    /// All decoded text so far; `released` bytes of it have been handed out.
    text: String,
    released: usize,
    finished: Option<FinishReason>,
}

impl SequenceState {
    pub fn new(params: SamplingParams, stops: StopConditions, prompt: &[u32]) -> Self {
        Self {
            sampler: Sampler::new(params, prompt),
            stops,
            prompt_len: prompt.len(),
            output: Vec::new(),
            prefix: 0,
            read: 0,
            text: String::new(),
            released: 0,
            finished: None,
        }
    }

    pub fn output_tokens(&self) -> &[u32] {
        &self.output
    }

    pub fn finished(&self) -> Option<FinishReason> {
        self.finished
    }

    /// The whole released text so far.
    pub fn text(&self) -> &str {
        &self.text[..self.released]
    }

    /// Samples from `logits` (one row, `vocab` long), appends the token and
    /// reports what became final.
    pub fn accept(
        &mut self,
        logits: &[f32],
        tok: &TextTokenizer,
    ) -> Result<StepOutput, ModelError> {
        let (token, logprob) = self.sampler.sample(logits);
        self.output.push(token);
        let mut finished = None;
        if self.stops.eos_ids.contains(&token) {
            finished = Some(FinishReason::Stop);
        } else {
            self.decode_new(tok)?;
            if let Some(cut) = self.find_stop() {
                self.text.truncate(cut);
                finished = Some(FinishReason::Stop);
            }
        }
        if finished.is_none()
            && (self.output.len() >= self.stops.max_tokens
                || self.prompt_len + self.output.len() >= self.stops.context)
        {
            finished = Some(FinishReason::Length);
        }
        let end = if finished.is_some() {
            self.text.len()
        } else {
            self.safe_release_end()
        };
        let text = self.text[self.released..end].to_string();
        self.released = end;
        self.finished = finished;
        Ok(StepOutput {
            token,
            text,
            logprob,
            finished,
        })
    }

    /// Appends the text of newly completed characters; a token that ends inside a
    /// multi-byte character waits for the next one.
    fn decode_new(&mut self, tok: &TextTokenizer) -> Result<(), ModelError> {
        let before = tok.decode(&self.output[self.prefix..self.read], true)?;
        let after = tok.decode(&self.output[self.prefix..], true)?;
        if after.len() > before.len() && !after.ends_with('\u{FFFD}') {
            let new = after.get(before.len()..).unwrap_or_default();
            self.text.push_str(new);
            self.prefix = self.read;
            self.read = self.output.len();
        }
        Ok(())
    }

    /// Byte offset where the earliest stop string starts, if any appeared.
    fn find_stop(&self) -> Option<usize> {
        let longest = self.stops.stop.iter().map(|s| s.len()).max()?;
        // Only text that could contain a new match: unreleased plus a stop's length.
        let mut from = self.released.saturating_sub(longest);
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        self.stops
            .stop
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| self.text[from..].find(s.as_str()).map(|i| from + i))
            .min()
    }

    /// End of the text that can be released: hold back a suffix that could be the
    /// start of a stop string.
    fn safe_release_end(&self) -> usize {
        let mut end = self.text.len();
        for stop in &self.stops.stop {
            for (i, _) in stop.char_indices().skip(1) {
                if self.text.ends_with(&stop[..i]) {
                    end = end.min(self.text.len() - i);
                }
            }
        }
        end.max(self.released)
    }
}

/// A finished generation with its timings.
#[derive(Debug, Clone)]
pub struct Generated {
    pub text: String,
    pub tokens: Vec<u32>,
    pub logprobs: Vec<TokenLogprob>,
    pub finish: FinishReason,
    pub prompt_tokens: usize,
    pub prefill_secs: f64,
    pub decode_secs: f64,
}

impl Generated {
    pub fn prefill_tok_per_sec(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_secs.max(1e-9)
    }

    /// Decode rate over the tokens after the first (the first comes from prefill).
    pub fn decode_tok_per_sec(&self) -> f64 {
        self.tokens.len().saturating_sub(1) as f64 / self.decode_secs.max(1e-9)
    }
}

/// Runs several sequences to completion together: one batched prefill, then
/// batched decode steps until each has finished. `on_step` sees every step's
/// output of sequence `i` (for streaming).
pub fn generate_batch(
    model: &crate::llama::Llama,
    tok: &TextTokenizer,
    requests: Vec<(Vec<u32>, SamplingParams, StopConditions)>,
    on_step: impl FnMut(usize, &StepOutput),
) -> Result<Vec<Generated>, ModelError> {
    generate_batch_adapted(model, tok, None, requests, on_step)
}

/// [`generate_batch`] with a LoRA adapter applied (unmerged) to every sequence.
pub fn generate_batch_adapted(
    model: &crate::llama::Llama,
    tok: &TextTokenizer,
    adapter: Option<&crate::lora::LoraAdapter>,
    requests: Vec<(Vec<u32>, SamplingParams, StopConditions)>,
    mut on_step: impl FnMut(usize, &StepOutput),
) -> Result<Vec<Generated>, ModelError> {
    use crate::llama::LogitsFor;
    use std::time::Instant;

    let mut caches: Vec<_> = requests.iter().map(|_| model.new_cache()).collect();
    let mut states: Vec<SequenceState> = requests
        .iter()
        .map(|(p, s, c)| SequenceState::new(s.clone(), c.clone(), p))
        .collect();
    let mut logprobs = vec![Vec::new(); requests.len()];
    let t0 = Instant::now();
    let prompts: Vec<&[u32]> = requests.iter().map(|r| r.0.as_slice()).collect();
    let mut refs: Vec<&mut crate::kv_cache::KvCache> = caches.iter_mut().collect();
    let adapters = vec![adapter; requests.len()];
    let logits = model.forward_adapted(&prompts, &mut refs, &adapters, LogitsFor::Last)?;
    let mut rows: Vec<Vec<f32>> = logits.to_vec2()?;
    let prefill_secs = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    loop {
        let mut next: Vec<(usize, u32)> = Vec::new();
        for (i, state) in states.iter_mut().enumerate() {
            if state.finished().is_some() {
                continue;
            }
            let out = state.accept(&rows[i], tok)?;
            on_step(i, &out);
            if let Some(lp) = out.logprob.clone() {
                logprobs[i].push(lp);
            }
            if out.finished.is_none() {
                next.push((i, out.token));
            }
        }
        if next.is_empty() {
            break;
        }
        let toks: Vec<[u32; 1]> = next.iter().map(|&(_, t)| [t]).collect();
        let tok_refs: Vec<&[u32]> = toks.iter().map(|t| t.as_slice()).collect();
        let mut active: Vec<&mut crate::kv_cache::KvCache> = caches
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| next.iter().any(|(j, _)| j == i))
            .map(|(_, c)| c)
            .collect();
        let logits = model.forward_adapted(
            &tok_refs,
            &mut active,
            &adapters[..next.len()],
            LogitsFor::Last,
        )?;
        let new_rows: Vec<Vec<f32>> = logits.to_vec2()?;
        for ((i, _), row) in next.iter().zip(new_rows) {
            rows[*i] = row;
        }
    }
    let decode_secs = t1.elapsed().as_secs_f64();
    Ok(states
        .into_iter()
        .zip(logprobs)
        .zip(requests)
        .map(|((s, lp), r)| Generated {
            text: s.text().to_string(),
            tokens: s.output_tokens().to_vec(),
            logprobs: lp,
            finish: s.finished().unwrap_or(FinishReason::Length),
            prompt_tokens: r.0.len(),
            prefill_secs,
            decode_secs,
        })
        .collect())
}

/// One sequence, start to end.
pub fn generate(
    model: &crate::llama::Llama,
    tok: &TextTokenizer,
    prompt: Vec<u32>,
    params: SamplingParams,
    stops: StopConditions,
    on_step: impl FnMut(usize, &StepOutput),
) -> Result<Generated, ModelError> {
    Ok(
        generate_batch(model, tok, vec![(prompt, params, stops)], on_step)?
            .pop()
            .expect("one request in, one result out"),
    )
}
