//! Reward models in the loop: training one with the Bradley–Terry loss
//! (`attune train-rm`), scoring candidates, and rescoring training examples
//! (candidates re-ordered by reward, best first, as `design/clha.md` asks).

use attune_models::{PromptResponse, RewardModel};
use candle_core::Tensor;

use crate::loss::{bradley_terry_loss, order_by_reward, Group};
use crate::train::{Scored, StepReport, Stepper, TrainConfig, TrainError};

/// Prompt + response tokens of each candidate (the reward model reads both).
fn sequences(candidates: &[PromptResponse]) -> Vec<Vec<u32>> {
    candidates
        .iter()
        .map(|c| [c.prompt.as_slice(), c.response.as_slice()].concat())
        .collect()
}

/// Rewards of every candidate of `examples`, in batches of about `batch`
/// sequences; `progress(done)` after each batch.
pub fn score(
    rm: &RewardModel,
    examples: &[Vec<PromptResponse>],
    block_size: usize,
    batch: usize,
    mut progress: impl FnMut(usize),
) -> candle_core::Result<Vec<Vec<f64>>> {
    let mut out = Vec::with_capacity(examples.len());
    let mut i = 0;
    while i < examples.len() {
        let mut j = i;
        let mut seqs = Vec::new();
        while j < examples.len() && (j == i || seqs.len() + examples[j].len() <= batch.max(1)) {
            seqs.extend(sequences(&examples[j]));
            j += 1;
        }
        let r = rm.rewards(&seqs, block_size, false)?.to_vec1::<f32>()?;
        let mut at = 0;
        for ex in &examples[i..j] {
            out.push(r[at..at + ex.len()].iter().map(|&x| x as f64).collect());
            at += ex.len();
        }
        i = j;
        progress(i);
    }
    Ok(out)
}

/// Candidates re-ordered by `rewards`, best first, with their rewards.
pub fn rescore(candidates: Vec<PromptResponse>, rewards: &[f64]) -> Scored {
    let order = order_by_reward(rewards);
    let mut slots: Vec<Option<PromptResponse>> = candidates.into_iter().map(Some).collect();
    Scored {
        candidates: order
            .iter()
            .map(|&k| slots[k].take().expect("a permutation"))
            .collect(),
        rewards: order.iter().map(|&k| rewards[k]).collect(),
    }
}

/// Trains a reward model's adapter and head on ranked examples.
pub struct RewardTrainer {
    rm: RewardModel,
    stepper: Stepper,
}

impl RewardTrainer {
    pub fn new(rm: RewardModel, cfg: TrainConfig) -> candle_core::Result<Self> {
        let stepper = Stepper::new(rm.vars(), cfg)?;
        Ok(Self { rm, stepper })
    }

    pub fn model(&self) -> &RewardModel {
        &self.rm
    }

    /// One optimizer step; each example's candidates are best first.
    pub fn step(
        &mut self,
        micro_batches: &[&[Vec<PromptResponse>]],
    ) -> Result<StepReport, TrainError> {
        let examples = micro_batches.iter().map(|m| m.len()).sum();
        let rm = &self.rm;
        let block = self.stepper.config().block_size;
        self.stepper.step(micro_batches.len(), examples, |i| {
            let mut seqs = Vec::new();
            let mut groups = Vec::new();
            let mut skipped = 0;
            for ex in micro_batches[i] {
                if ex.len() < 2 {
                    skipped += 1;
                    continue;
                }
                groups.push(Group {
                    start: seqs.len(),
                    rewards: (0..ex.len()).rev().map(|k| k as f64).collect(),
                });
                seqs.extend(sequences(ex));
            }
            if groups.is_empty() {
                return Ok((None, skipped));
            }
            let r: Tensor = rm.rewards(&seqs, block, true)?;
            Ok((Some(bradley_terry_loss(&r, &groups)?), skipped))
        })
    }
}
