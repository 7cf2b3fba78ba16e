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
