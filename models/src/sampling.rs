//! Choosing the next token from logits: penalties (repetition, presence,
//! frequency), greedy or temperature sampling with top-k, top-p and min-p, seeded
//! randomness, and log-probabilities with top alternatives.

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Sampling settings of one sequence. The defaults sample at temperature 1 with
/// no truncation and no penalties (OpenAI's defaults).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep only the `k` most likely tokens; 0 disables.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p`; 1 disables.
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one; 0 disables.
    pub min_p: f32,
    /// HF-style: logits of tokens already in prompt or output are divided (if
    /// positive) or multiplied (if negative) by this; 1 disables.
    pub repetition_penalty: f32,
    /// OpenAI-style: subtracted once from tokens already generated.
    pub presence_penalty: f32,
    /// OpenAI-style: subtracted per occurrence in the generated tokens.
    pub frequency_penalty: f32,
    /// Same seed, same output; `None` draws a seed from the OS.
    pub seed: Option<u64>,
    /// How many top alternatives to report with each token's log-probability
    /// (`None`: no log-probabilities).
    pub logprobs: Option<usize>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            logprobs: None,
        }
    }
}

/// A sampling setting out of range: `field` is the OpenAI/config field name
/// (`top_p`), `message` says what is allowed and what was given.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("`{field}` {message}")]
pub struct InvalidParam {
    pub field: &'static str,
    pub message: String,
}

impl SamplingParams {
    /// Checks every setting's range; the error names the field.
    pub fn validate(&self) -> Result<(), InvalidParam> {
        let bad = |field, message: String| Err(InvalidParam { field, message });
        let t = self.temperature;
        if !t.is_finite() || !(0.0..=100.0).contains(&t) {
            return bad("temperature", format!("must be in [0, 100], got {t}"));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", format!("must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p", format!("must be in [0, 1], got {}", self.min_p));
        }
        let rp = self.repetition_penalty;
        if !rp.is_finite() || rp <= 0.0 {
            return bad("repetition_penalty", format!("must be > 0, got {rp}"));
        }
        for (field, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return bad(field, format!("must be in [-2, 2], got {v}"));
            }
        }
        if let Some(n) = self.logprobs {
            if n > 20 {
                return bad("top_logprobs", format!("must be in [0, 20], got {n}"));
            }
        }
        Ok(())
    }

    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }
}

/// The log-probability of a chosen token under the model (before penalties and
/// temperature), with the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    /// `(token, logprob)`, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// Per-sequence sampling state: the RNG and the token counts penalties need.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Tokens seen in prompt or output (repetition penalty).
    seen: HashMap<u32, ()>,
    /// Occurrences in the output only (presence/frequency penalties).
    generated: HashMap<u32, u32>,
    /// Scratch space reused across steps.
    scratch: Vec<(u32, f32)>,
}

/// `log_softmax` of one row, computed in f64 for the normaliser.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    let lse = max + sum.ln() as f32;
    logits.iter().map(|&l| l - lse).collect()
}

fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best as u32
}

/// The `k` largest `(index, value)` pairs, largest first (ties: lower index first).
pub fn top_k_of(xs: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut idx: Vec<(u32, f32)> = xs.iter().enumerate().map(|(i, &x)| (i as u32, x)).collect();
    let k = k.min(idx.len());
    if k == 0 {
        return vec![];
    }
    let cmp = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, cmp);
        idx.truncate(k);
    }
    idx.sort_unstable_by(cmp);
    idx
}

impl Sampler {
    pub fn new(params: SamplingParams, prompt: &[u32]) -> Self {
        let rng = match params.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_os_rng(),
        };
        Self {
            seen: prompt.iter().map(|&t| (t, ())).collect(),
            generated: HashMap::new(),
            params,
            rng,
            scratch: Vec::new(),
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token from one row of logits and records it.
    pub fn sample(&mut self, logits: &[f32]) -> (u32, Option<TokenLogprob>) {
        let logprob_info = self.params.logprobs.map(|_| log_softmax(logits));
        let mut adjusted = logits.to_vec();
        self.apply_penalties(&mut adjusted);
        let token = if self.params.temperature <= 0.0 {
            argmax(&adjusted)
        } else {
            self.sample_from(&adjusted)
        };
        *self.generated.entry(token).or_insert(0) += 1;
        self.seen.insert(token, ());
        let lp = logprob_info.map(|lp| TokenLogprob {
            token,
            logprob: lp[token as usize],
            top: top_k_of(&lp, self.params.logprobs.unwrap_or(0)),
        });
        (token, lp)
    }

    fn apply_penalties(&self, logits: &mut [f32]) {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            for &t in self.seen.keys() {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 {
                        *l / p.repetition_penalty
                    } else {
                        *l * p.repetition_penalty
                    };
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&t, &n) in &self.generated {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= p.presence_penalty + p.frequency_penalty * n as f32;
                }
            }
        }
    }

    fn sample_from(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        let inv_t = 1.0 / p.temperature;
        let cand = &mut self.scratch;
        cand.clear();
        cand.extend(
            logits
                .iter()
                .enumerate()
                .map(|(i, &l)| (i as u32, l * inv_t)),
        );
        // Truncate to top-k first: it bounds the sort below.
        let cmp = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if p.top_k > 0 && p.top_k < cand.len() {
            cand.select_nth_unstable_by(p.top_k - 1, cmp);
            cand.truncate(p.top_k);
        }
        cand.sort_unstable_by(cmp);
        let max = cand[0].1;
        let mut total = 0f64;
        for c in cand.iter_mut() {
            c.1 = (c.1 - max).exp();
            total += c.1 as f64;
        }
        // Now `c.1` are unnormalised probabilities, sorted descending.
        let mut keep = cand.len();
        if p.top_p < 1.0 {
            let mut acc = 0f64;
            for (i, c) in cand.iter().enumerate() {
                acc += c.1 as f64 / total;
                if acc >= p.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
        }
        if p.min_p > 0.0 {
            let floor = p.min_p * cand[0].1;
            keep = keep.min(cand.iter().take_while(|c| c.1 >= floor).count().max(1));
        }
        cand.truncate(keep);
        let total: f64 = cand.iter().map(|c| c.1 as f64).sum();
        let mut r = self.rng.random::<f64>() * total;
        for c in cand.iter() {
            r -= c.1 as f64;
            if r <= 0.0 {
                return c.0;
            }
        }
        cand[cand.len() - 1].0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> SamplingParams {
        SamplingParams {
            seed: Some(7),
            ..SamplingParams::default()
        }
    }

    #[test]
    fn validation_names_the_field_and_range() {
        let e = SamplingParams {
            top_p: 1.5,
            ..params()
        }
        .validate()
        .unwrap_err();
        assert_eq!(e.to_string(), "`top_p` must be in (0, 1], got 1.5");
        let e = SamplingParams {
            temperature: f32::NAN,
            ..params()
        }
        .validate()
        .unwrap_err();
        assert_eq!(e.field, "temperature");
        assert!(params().validate().is_ok());
    }

    #[test]
    fn greedy_takes_the_argmax() {
        let mut s = Sampler::new(SamplingParams::greedy(), &[]);
        assert_eq!(s.sample(&[0.1, 3.0, 2.0]).0, 1);
    }

    #[test]
    fn same_seed_gives_same_tokens() {
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let run = || {
            let mut s = Sampler::new(params(), &[]);
            (0..20).map(|_| s.sample(&logits).0).collect::<Vec<_>>()
        };
        assert_eq!(run(), run());
        let mut other = Sampler::new(
            SamplingParams {
                seed: Some(8),
                ..params()
            },
            &[],
        );
        let b: Vec<u32> = (0..20).map(|_| other.sample(&logits).0).collect();
        assert_ne!(run(), b);
    }

    #[test]
    fn top_k_one_is_greedy() {
        let mut s = Sampler::new(
            SamplingParams {
                top_k: 1,
                ..params()
            },
            &[],
        );
        for _ in 0..20 {
            assert_eq!(s.sample(&[1.0, 1.5, 0.2, 1.4]).0, 1);
        }
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // probabilities ~ [0.64, 0.23, 0.09, 0.03]: top_p 0.6 keeps only token 0.
        let logits = [3.0, 2.0, 1.0, 0.0];
        let mut s = Sampler::new(
            SamplingParams {
                top_p: 0.6,
                ..params()
            },
            &[],
        );
        for _ in 0..50 {
            assert_eq!(s.sample(&logits).0, 0);
        }
        let mut s = Sampler::new(
            SamplingParams {
                top_p: 0.9,
                ..params()
            },
            &[],
        );
        let seen: std::collections::HashSet<u32> = (0..200).map(|_| s.sample(&logits).0).collect();
        assert!(seen.contains(&1) && !seen.contains(&3));
    }

    #[test]
    fn min_p_drops_unlikely_tokens() {
        let logits = [3.0, 2.9, 0.0, -1.0];
        let mut s = Sampler::new(
            SamplingParams {
                min_p: 0.5,
                ..params()
            },
            &[],
        );
        for _ in 0..100 {
            assert!(s.sample(&logits).0 < 2);
        }
    }

    #[test]
    fn presence_and_frequency_penalties_discourage_repeats() {
        let mut s = Sampler::new(
            SamplingParams {
                temperature: 0.0,
                frequency_penalty: 1.0,
                ..params()
            },
            &[],
        );
        // token 0 leads by 1.5: chosen once, then penalised below token 1.
        assert_eq!(s.sample(&[2.5, 1.0]).0, 0);
        assert_eq!(s.sample(&[2.5, 1.0]).0, 0);
        assert_eq!(s.sample(&[2.5, 1.0]).0, 1);
        let mut s = Sampler::new(
            SamplingParams {
                temperature: 0.0,
                presence_penalty: 2.0,
                ..params()
            },
            &[],
        );
        assert_eq!(s.sample(&[2.5, 1.0]).0, 0);
        assert_eq!(s.sample(&[2.5, 1.0]).0, 1);
    }

    #[test]
    fn repetition_penalty_covers_the_prompt() {
        let mut s = Sampler::new(
            SamplingParams {
                temperature: 0.0,
                repetition_penalty: 2.0,
                ..params()
            },
            &[0],
        );
        assert_eq!(s.sample(&[3.0, 2.0]).0, 1);
    }

    #[test]
    fn logprobs_are_from_the_unpenalised_model_with_sorted_alternatives() {
        let mut s = Sampler::new(
            SamplingParams {
                temperature: 0.0,
                logprobs: Some(2),
                ..params()
            },
            &[],
        );
        let (tok, lp) = s.sample(&[0.0, 1.0, 2.0]);
        let lp = lp.unwrap();
        assert_eq!(tok, 2);
        let expected = 2.0 - (0f32.exp() + 1f32.exp() + 2f32.exp()).ln();
        assert!((lp.logprob - expected).abs() < 1e-5);
        assert_eq!(lp.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![2, 1]);
        let sum: f32 = log_softmax(&[0.0, 1.0, 2.0]).iter().map(|l| l.exp()).sum();
        assert!((sum - 1.0).abs() < 1e-6);
    }
}
