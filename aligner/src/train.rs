//! The LoRA training loop: the loss of a batch of scored examples (CLHA or
//! DPO), AdamW with warm-up and decay, gradient accumulation and clipping.
//! A non-finite loss or gradient aborts the step before the adapter changes.

use std::time::Instant;

use attune_models::{Llama, LoraAdapter, PromptResponse, ResponseBatch};
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};

use crate::loss::{clha_loss, dpo_loss, rank_rewards, ClhaParams, Group, Loss, Scores};

/// What the adapter is trained to minimise.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Objective {
    Clha(ClhaParams),
    /// DPO against the base model (the adapter switched off).
    Dpo {
        beta: f64,
    },
}

impl Objective {
    /// The rewards that make a human order count in full for this objective.
    pub fn rank_rewards(&self, n: usize) -> Vec<f64> {
        match self {
            Objective::Clha(p) => rank_rewards(n, p.tau),
            Objective::Dpo { .. } => rank_rewards(n, 0.0),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    Constant,
    Linear,
    Cosine,
}

impl std::str::FromStr for Schedule {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "constant" => Ok(Schedule::Constant),
            "linear" => Ok(Schedule::Linear),
            "cosine" => Ok(Schedule::Cosine),
            _ => Err(format!(
                "unknown schedule `{s}`: expected `cosine`, `linear` or `constant`"
            )),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    pub objective: Objective,
    /// Peak learning rate (LoRA).
    pub lr: f64,
    pub weight_decay: f64,
    pub warmup_steps: usize,
    pub schedule: Schedule,
    /// Steps the schedule decays over.
    pub total_steps: usize,
    /// Global gradient norm above which gradients are scaled down; 0: off.
    pub max_grad_norm: f64,
    /// Tokens per prompt + response (the prompt is cut from the left).
    pub block_size: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            objective: Objective::Clha(ClhaParams::default()),
            lr: 2e-4,
            weight_decay: 0.0,
            warmup_steps: 10,
            schedule: Schedule::Cosine,
            total_steps: 100,
            max_grad_norm: 1.0,
            block_size: 512,
        }
    }
}

impl TrainConfig {
    /// Learning rate at optimizer step `step` (0-based): linear warm-up, then
    /// the schedule's decay to 0 at `total_steps`.
    pub fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let t = ((step - self.warmup_steps) as f64 / span).min(1.0);
        match self.schedule {
            Schedule::Constant => self.lr,
            Schedule::Linear => self.lr * (1.0 - t),
            Schedule::Cosine => self.lr * 0.5 * (1.0 + (std::f64::consts::PI * t).cos()),
        }
    }
}

/// One training example: candidates best first (by reward after rescoring,
/// else the human order) and their rewards.
#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    pub candidates: Vec<PromptResponse>,
    pub rewards: Vec<f64>,
}

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("step {step}: the loss is {loss}; the adapter was left unchanged")]
    NonFiniteLoss { step: usize, loss: f64 },
    #[error("step {step}: the gradient norm is {norm}; the adapter was left unchanged")]
    NonFiniteGradient { step: usize, norm: f64 },
    #[error("step {step}: no example in the batch has two candidates left after truncation")]
    EmptyBatch { step: usize },
    #[error("tensor operation failed: {0}")]
    Tensor(#[from] candle_core::Error),
}

/// What one optimizer step did.
#[derive(Debug, Clone, PartialEq)]
pub struct StepReport {
    pub step: usize,
    pub loss: f64,
    pub ranking: f64,
    pub sft: f64,
    /// Pairs the loss counted.
    pub pairs: usize,
    pub examples: usize,
    /// Examples left with fewer than two candidates after truncation.
    pub skipped: usize,
    pub lr: f64,
    pub grad_norm: f64,
    pub seconds: f64,
}

/// The loss of `examples` under `lora` (`None`: the base model; no loss when
/// no example is usable), and how many examples were skipped (fewer than two
/// candidates left after truncation). `train` turns on adapter dropout.
pub fn batch_loss(
    model: &Llama,
    lora: Option<&LoraAdapter>,
    examples: &[Scored],
    cfg: &TrainConfig,
    train: bool,
) -> candle_core::Result<(Option<Loss>, usize)> {
    let all: Vec<PromptResponse> = examples
        .iter()
        .flat_map(|e| e.candidates.iter().cloned())
        .collect();
    let batch = ResponseBatch::new(&all, cfg.block_size);
    let mut groups = Vec::new();
    let mut skipped = 0;
    let mut next = 0;
    for e in examples {
        let kept: Vec<(usize, f64)> = (0..e.candidates.len())
            .filter_map(|i| batch.kept[next + i].map(|row| (row, e.rewards[i])))
            .collect();
        next += e.candidates.len();
        if kept.len() < 2 {
            skipped += 1;
            continue;
        }
        groups.push(Group {
            start: kept[0].0,
            rewards: kept.iter().map(|&(_, r)| r).collect(),
        });
    }
    if groups.is_empty() {
        return Ok((None, skipped));
    }
    let sums = model.response_logprobs(&batch, lora, train)?;
    let loss = match cfg.objective {
        Objective::Clha(p) => {
            let scores = Scores {
                sums,
                lens: batch.response_lens(),
            };
            clha_loss(&scores, &groups, &p)?
        }
        Objective::Dpo { beta } => {
            let reference = model.response_logprobs(&batch, None, false)?.detach();
            dpo_loss(&sums, &reference, &groups, beta)?
        }
    };
    Ok((Some(loss), skipped))
}

/// Optimizer steps over a fixed set of variables: gradients accumulated over
/// micro-batches, checked, clipped, then AdamW at the scheduled rate. Shared
/// by the policy trainer and the reward-model trainer.
pub struct Stepper {
    opt: AdamW,
    vars: Vec<Var>,
    cfg: TrainConfig,
    step: usize,
}

impl Stepper {
    pub fn new(vars: Vec<Var>, cfg: TrainConfig) -> candle_core::Result<Self> {
        let opt = AdamW::new(
            vars.clone(),
            ParamsAdamW {
                lr: cfg.lr_at(0),
                weight_decay: cfg.weight_decay,
                ..ParamsAdamW::default()
            },
        )?;
        Ok(Self {
            opt,
            vars,
            cfg,
            step: 0,
        })
    }

    pub fn config(&self) -> &TrainConfig {
        &self.cfg
    }

    pub fn steps_done(&self) -> usize {
        self.step
    }

    /// One optimizer step; `loss_of(i)` gives micro-batch `i`'s loss (`None`:
    /// nothing usable in it) and how many of its examples were skipped.
    pub fn step(
        &mut self,
        micro_batches: usize,
        examples: usize,
        mut loss_of: impl FnMut(usize) -> candle_core::Result<(Option<Loss>, usize)>,
    ) -> Result<StepReport, TrainError> {
        let start = Instant::now();
        let step = self.step;
        let mut acc: Option<GradStore> = None;
        let (mut loss, mut ranking, mut sft) = (0.0, 0.0, 0.0);
        let (mut pairs, mut skipped, mut used) = (0, 0, 0usize);
        for i in 0..micro_batches {
            let (l, s) = loss_of(i)?;
            skipped += s;
            let Some(l) = l else {
                continue;
            };
            let value = l
                .total
                .to_dtype(candle_core::DType::F64)?
                .to_scalar::<f64>()?;
            if !value.is_finite() {
                return Err(TrainError::NonFiniteLoss { step, loss: value });
            }
            used += 1;
            loss += value;
            ranking += l.ranking;
            sft += l.sft;
            pairs += l.pairs;
            let grads = l.total.backward()?;
            acc = Some(match acc {
                None => grads,
                Some(mut a) => {
                    for v in &self.vars {
                        if let Some(g) = grads.get(v.as_tensor()) {
                            let sum = match a.get(v.as_tensor()) {
                                Some(prev) => (prev + g)?,
                                None => g.clone(),
                            };
                            a.insert(v.as_tensor(), sum);
                        }
                    }
                    a
                }
            });
        }
        let Some(mut grads) = acc else {
            return Err(TrainError::EmptyBatch { step });
        };
        let mut norm_sq = 0.0;
        for v in &self.vars {
            if let Some(g) = grads.get(v.as_tensor()) {
                let g = (g / used as f64)?;
                norm_sq += g
                    .sqr()?
                    .sum_all()?
                    .to_dtype(candle_core::DType::F64)?
                    .to_scalar::<f64>()?;
                grads.insert(v.as_tensor(), g);
            }
        }
        let norm = norm_sq.sqrt();
        if !norm.is_finite() {
            return Err(TrainError::NonFiniteGradient { step, norm });
        }
        if self.cfg.max_grad_norm > 0.0 && norm > self.cfg.max_grad_norm {
            let clip = self.cfg.max_grad_norm / norm;
            for v in &self.vars {
                if let Some(g) = grads.get(v.as_tensor()) {
                    let g: Tensor = (g * clip)?;
                    grads.insert(v.as_tensor(), g);
                }
            }
        }
        let lr = self.cfg.lr_at(step);
        self.opt.set_learning_rate(lr);
        self.opt.step(&grads)?;
        self.step += 1;
        let per = used as f64;
        Ok(StepReport {
            step,
            loss: loss / per,
            ranking: ranking / per,
            sft: sft / per,
            pairs,
            examples,
            skipped,
            lr,
            grad_norm: norm,
            seconds: start.elapsed().as_secs_f64(),
        })
    }
}

/// Trains one LoRA adapter of the policy; owns its variables and the
/// optimizer state.
pub struct Trainer<'m> {
    model: &'m Llama,
    lora: LoraAdapter,
    stepper: Stepper,
}

impl<'m> Trainer<'m> {
    pub fn new(model: &'m Llama, lora: LoraAdapter, cfg: TrainConfig) -> candle_core::Result<Self> {
        let stepper = Stepper::new(lora.vars(), cfg)?;
        Ok(Self {
            model,
            lora,
            stepper,
        })
    }

    pub fn lora(&self) -> &LoraAdapter {
        &self.lora
    }

    pub fn config(&self) -> &TrainConfig {
        self.stepper.config()
    }

    pub fn steps_done(&self) -> usize {
        self.stepper.steps_done()
    }

    /// One optimizer step over `micro_batches` (gradients accumulated, each
    /// micro-batch weighted equally).
    pub fn step(&mut self, micro_batches: &[&[Scored]]) -> Result<StepReport, TrainError> {
        let examples = micro_batches.iter().map(|m| m.len()).sum();
        let (model, lora) = (self.model, &self.lora);
        let cfg = self.stepper.config().clone();
        self.stepper.step(micro_batches.len(), examples, |i| {
            batch_loss(model, Some(lora), micro_batches[i], &cfg, true)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learning_rate_warms_up_then_decays_to_zero() {
        let cfg = TrainConfig {
            lr: 1.0,
            warmup_steps: 4,
            total_steps: 14,
            ..TrainConfig::default()
        };
        assert_eq!(cfg.lr_at(0), 0.25);
        assert_eq!(cfg.lr_at(3), 1.0);
        assert!((cfg.lr_at(9) - 0.5).abs() < 1e-12);
        assert!(cfg.lr_at(14).abs() < 1e-12);
        let lin = TrainConfig {
            schedule: Schedule::Linear,
            ..cfg.clone()
        };
        assert!((lin.lr_at(9) - 0.5).abs() < 1e-12);
    }
}
