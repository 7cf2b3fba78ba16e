//! Offline evaluation of a policy on held-out preference pairs: the
//! preference accuracy (fraction of pairs with `s_better > s_worse`, `s` the
//! mean response-token log-prob) and the mean margin `s_better − s_worse`.

use attune_models::{Llama, LoraAdapter, PromptResponse, ResponseBatch};
use serde::Serialize;

/// One candidate's scores.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CandidateScore {
    pub sum: f64,
    pub mean: f64,
    pub tokens: usize,
}

/// The two sides of one (better, worse) pair of an example.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PairScore {
    pub chosen: CandidateScore,
    pub rejected: CandidateScore,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct EvalReport {
    pub pairs: usize,
    pub correct: usize,
    /// Examples left with fewer than two candidates after truncation.
    pub skipped: usize,
    pub sum_margin: f64,
    /// Per example (in input order), its pairs; empty for a skipped example.
    pub per_example: Vec<Vec<PairScore>>,
}

impl EvalReport {
    pub fn accuracy(&self) -> f64 {
        self.correct as f64 / self.pairs.max(1) as f64
    }

    pub fn mean_margin(&self) -> f64 {
        self.sum_margin / self.pairs.max(1) as f64
    }
}

/// Scores every example (candidates best first) in batches of about
/// `batch_tokens` tokens; calls `progress(done, total)` after each batch.
pub fn evaluate(
    model: &Llama,
    lora: Option<&LoraAdapter>,
    examples: &[Vec<PromptResponse>],
    block_size: usize,
    batch_tokens: usize,
    mut progress: impl FnMut(usize, usize),
) -> candle_core::Result<EvalReport> {
    let frozen = lora.map(LoraAdapter::frozen);
    let lora = frozen.as_ref();
    let mut report = EvalReport::default();
    let mut i = 0;
    while i < examples.len() {
        // Take examples until the batch holds about `batch_tokens` tokens.
        let mut j = i;
        let mut tokens = 0;
        while j < examples.len() && (j == i || tokens < batch_tokens) {
            tokens += examples[j]
                .iter()
                .map(|c| (c.prompt.len() + c.response.len()).min(block_size))
                .sum::<usize>();
            j += 1;
        }
        let all: Vec<PromptResponse> = examples[i..j].iter().flatten().cloned().collect();
        let batch = ResponseBatch::new(&all, block_size);
        let sums = if batch.is_empty() {
            Vec::new()
        } else {
            model
                .response_logprobs(&batch, lora, false)?
                .to_vec1::<f32>()?
        };
        let lens = batch.response_lens();
        let mut next = 0;
        for ex in &examples[i..j] {
            let scores: Vec<CandidateScore> = (0..ex.len())
                .filter_map(|k| batch.kept[next + k])
                .map(|row| CandidateScore {
                    sum: sums[row] as f64,
                    mean: sums[row] as f64 / lens[row] as f64,
                    tokens: lens[row],
                })
                .collect();
            next += ex.len();
            let mut pairs = Vec::new();
            if scores.len() < 2 {
                report.skipped += 1;
            }
            for a in 0..scores.len() {
                for b in a + 1..scores.len() {
                    let (c, r) = (scores[a], scores[b]);
                    report.pairs += 1;
                    report.correct += usize::from(c.mean > r.mean);
                    report.sum_margin += c.mean - r.mean;
                    pairs.push(PairScore {
                        chosen: c,
                        rejected: r,
                    });
                }
            }
            report.per_example.push(pairs);
        }
        i = j;
        progress(i, examples.len());
    }
    Ok(report)
}

/// What greedy generations on held-out prompts are worth.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationReport {
    pub prompts: usize,
    /// Mean reward-model score of prompt + generation.
    pub mean_reward: f64,
    /// Corpus BLEU-4 (0–100) of the generations against the preferred response.
    pub bleu: f64,
    /// Each generation's text, in input order.
    pub texts: Vec<String>,
}

/// How the generations of [`generation_metrics`] are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GenerationSettings {
    pub max_new_tokens: usize,
    /// Prompts generated together.
    pub batch: usize,
}

/// Greedy generations (up to `max_new_tokens`, cut at the next
/// `"Human:"`/`"Assistant:"` turn marker) for the prompt of each example,
/// scored by `rm` and compared with the example's best candidate by BLEU.
pub fn generation_metrics(
    model: &attune_models::LoadedModel,
    lora: Option<&LoraAdapter>,
    rm: &attune_models::RewardModel,
    examples: &[Vec<PromptResponse>],
    settings: GenerationSettings,
    mut progress: impl FnMut(usize),
) -> Result<GenerationReport, attune_models::ModelError> {
    let (max_new_tokens, batch) = (settings.max_new_tokens, settings.batch);
    use attune_models::{generate_batch_adapted, SamplingParams, StopConditions};
    let tok = &model.tokenizer;
    let stops = StopConditions {
        max_tokens: max_new_tokens,
        stop: vec![
            "\n\nHuman:".into(),
            "\n\nAssistant:".into(),
            "Human:".into(),
        ],
        eos_ids: tok.eos_ids.clone(),
        context: model.model.max_context(),
    };
    let mut texts = Vec::with_capacity(examples.len());
    let mut rewards = Vec::with_capacity(examples.len());
    let mut references = Vec::with_capacity(examples.len());
    for (done, chunk) in examples.chunks(batch.max(1)).enumerate() {
        let requests = chunk
            .iter()
            .map(|ex| {
                (
                    ex[0].prompt.clone(),
                    SamplingParams::greedy(),
                    stops.clone(),
                )
            })
            .collect();
        let outs = generate_batch_adapted(&model.model, tok, lora, requests, |_, _| {})?;
        let mut seqs = Vec::with_capacity(chunk.len());
        for (ex, out) in chunk.iter().zip(outs) {
            let prompt = tok.decode(&ex[0].prompt, false)?;
            let text = out.text.trim().to_string();
            seqs.push(rm.base.tokenizer.encode(&format!("{prompt} {text}"))?);
            references.push(tok.decode(&ex[0].response, true)?.trim().to_string());
            texts.push(text);
        }
        rewards.extend(rm.rewards(&seqs, 1024, false)?.to_vec1::<f32>()?);
        progress((done + 1) * batch.max(1));
    }
    let n = texts.len();
    Ok(GenerationReport {
        prompts: n,
        mean_reward: rewards.iter().map(|&r| r as f64).sum::<f64>() / n.max(1) as f64,
        bleu: corpus_bleu(&texts, &references),
        texts,
    })
}

/// Corpus BLEU-4 (Papineni et al.) on whitespace tokens, one reference per
/// hypothesis, with the brevity penalty; 0–100. Zero when some n-gram order
/// has no match in the whole corpus.
pub fn corpus_bleu(hypotheses: &[String], references: &[String]) -> f64 {
    use std::collections::HashMap;
    let mut matched = [0usize; 4];
    let mut total = [0usize; 4];
    let (mut hyp_len, mut ref_len) = (0usize, 0usize);
    for (h, r) in hypotheses.iter().zip(references) {
        let h: Vec<&str> = h.split_whitespace().collect();
        let r: Vec<&str> = r.split_whitespace().collect();
        hyp_len += h.len();
        ref_len += r.len();
        for n in 1..=4 {
            if h.len() < n {
                continue;
            }
            let mut counts: HashMap<&[&str], usize> = HashMap::new();
            for g in r.windows(n) {
                *counts.entry(g).or_default() += 1;
            }
            for g in h.windows(n) {
                total[n - 1] += 1;
                if let Some(c) = counts.get_mut(g).filter(|c| **c > 0) {
                    *c -= 1;
                    matched[n - 1] += 1;
                }
            }
        }
    }
    if hyp_len == 0 || matched.contains(&0) {
        return 0.0;
    }
    let log_precision: f64 = (0..4)
        .map(|i| (matched[i] as f64 / total[i] as f64).ln())
        .sum::<f64>()
        / 4.0;
    let bp = if hyp_len >= ref_len {
        1.0
    } else {
        (1.0 - ref_len as f64 / hyp_len as f64).exp()
    };
    100.0 * bp * log_precision.exp()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bleu_is_100_for_identical_text_and_penalises_short_or_wrong_output() {
        let r = vec!["the cat sat on the mat today".to_string()];
        assert!((corpus_bleu(&r, &r) - 100.0).abs() < 1e-9);
        let short = vec!["the cat sat on the".to_string()];
        let b = corpus_bleu(&short, &r);
        assert!(b > 0.0 && b < 100.0, "{b}");
        assert_eq!(
            corpus_bleu(&["dogs run fast everywhere".to_string()], &r),
            0.0
        );
        // Clipped counts: repeating a matching word does not help.
        let rep = vec!["the the the the the the the".to_string()];
        assert_eq!(corpus_bleu(&rep, &r), 0.0);
    }
}
