//! The publish gate of a round: held-out accuracy against the current
//! generation, and the mean KL between them on fixed probe prompts (to catch
//! an adapter that collapses).

use attune_config::AlignerConfig;
use attune_models::{ChatMessage, LoadedModel, LoraAdapter};
use candle_core::{DType, Tensor, D};

use super::HeldOutScore;

/// Prompts on which candidate and current generation must stay close (mean
/// KL of their next-token distributions), to catch a collapsing adapter.
const PROBES: &[&str] = &[
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "How do I boil an egg?",
    "Explain what a prime number is.",
    "Give me three tips for sleeping better.",
    "Translate 'good morning' into Spanish.",
];

/// The publish gate: the candidate's loss is finite, its held-out accuracy is
/// not worse than the current generation's by more than the tolerance, and it
/// stays within `max_kl` of the current generation on the probes.
pub fn gate(
    cfg: &AlignerConfig,
    current: Option<HeldOutScore>,
    candidate: Option<HeldOutScore>,
    probe_kl: f64,
) -> Result<(), String> {
    if !probe_kl.is_finite() || probe_kl > cfg.max_kl {
        return Err(format!(
            "probe KL {probe_kl:.4} is above aligner.max_kl {}",
            cfg.max_kl
        ));
    }
    if let (Some(cur), Some(cand)) = (current, candidate) {
        if cand.loss.is_some_and(|l| !l.is_finite()) {
            return Err("the held-out loss is not finite".into());
        }
        if cand.pairs > 0 && cand.accuracy + cfg.gate_tolerance < cur.accuracy {
            return Err(format!(
                "held-out accuracy {:.4} is below the current {:.4} by more than aligner.gate_tolerance {}",
                cand.accuracy, cur.accuracy, cfg.gate_tolerance
            ));
        }
    }
    Ok(())
}

/// Mean KL(current ‖ candidate) of the next-token distributions over every
/// position of the probe prompts (rendered with the chat template).
pub fn probe_kl(
    model: &LoadedModel,
    current: Option<&LoraAdapter>,
    candidate: &LoraAdapter,
) -> Result<f64, String> {
    let device = model.model.device();
    let (current, candidate) = (current.map(LoraAdapter::frozen), candidate.frozen());
    let (current, candidate) = (current.as_ref(), &candidate);
    let (mut total, mut positions) = (0.0, 0usize);
    for p in PROBES {
        let text = model
            .template
            .render(&[ChatMessage::new("user", *p)], true)
            .map_err(|e| e.to_string())?;
        let ids = model.tokenizer.encode(&text).map_err(|e| e.to_string())?;
        let n = ids.len();
        let tokens = Tensor::from_vec(ids, (1, n), device).map_err(|e| e.to_string())?;
        let logp = |lora: Option<&LoraAdapter>| -> candle_core::Result<Tensor> {
            let logits = model
                .model
                .forward_train(&tokens, lora, false)?
                .squeeze(0)?;
            candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)
        };
        let kl = (|| -> candle_core::Result<f64> {
            let cur = logp(current)?;
            let cand = logp(Some(candidate))?;
            let per = (cur.exp()? * (&cur - &cand)?)?.sum(D::Minus1)?;
            per.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()
        })()
        .map_err(|e| e.to_string())?;
        total += kl;
        positions += n;
    }
    Ok(total / positions.max(1) as f64)
}
