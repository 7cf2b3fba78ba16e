//! The aligner's Prometheus metrics (prefix `attune_aligner_`): rounds by
//! outcome and failure reason, steps, the last round's loss components,
//! pairs seen and filtered out by the reward threshold, reward-model scoring
//! time, the evaluation of candidate and current generation. The server
//! registers them on its `/metrics`.

use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

use super::{Outcome, RoundReport};

/// Buckets from 10 ms to an hour: a round on a CPU takes minutes, a reward
/// scoring pass on a GPU milliseconds.
const SECONDS_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
];

/// Failure reasons, a closed set (the label values of
/// `attune_aligner_round_failures_total`).
pub const FAILURE_REASONS: &[&str] = &[
    "non_finite",
    "training",
    "reward_model",
    "evaluation",
    "publish",
    "store",
    "panic",
    "other",
];

/// Puts a round's error message into one of [`FAILURE_REASONS`].
pub fn failure_reason(message: &str) -> &'static str {
    let m = message.to_ascii_lowercase();
    if m.starts_with("panic") {
        "panic"
    } else if m.contains("nan") || m.contains("non-finite") || m.contains("not finite") {
        "non_finite"
    } else if m.starts_with("reward model") || m.starts_with("aligner.reward_model") {
        "reward_model"
    } else if m.starts_with("training") || m.starts_with("optimizer") || m.starts_with("copying") {
        "training"
    } else if m.starts_with("held-out") || m.starts_with("probe") {
        "evaluation"
    } else if m.starts_with("publishing") {
        "publish"
    } else if m.starts_with("saving the watermark") || m.starts_with("reading the store") {
        "store"
    } else {
        "other"
    }
}

#[derive(Clone)]
pub struct AlignerMetrics {
    pub rounds: IntCounterVec,
    pub failures: IntCounterVec,
    pub steps: IntCounter,
    /// Loss components of the last step of the last round that trained.
    pub loss: GaugeVec,
    pub pairs_seen: IntCounter,
    pub pairs_filtered: IntCounter,
    pub reward_seconds: Histogram,
    pub round_seconds: Histogram,
    /// Held-out accuracy and loss of `candidate` and `current`, last round.
    pub accuracy: GaugeVec,
    pub held_out_loss: GaugeVec,
    pub probe_kl: Gauge,
    pub watermark: IntGauge,
    pub new_records: IntCounter,
}

fn seconds(name: &str, help: &str) -> Histogram {
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(SECONDS_BUCKETS.to_vec()))
        .expect("valid metric")
}

impl Default for AlignerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl AlignerMetrics {
    pub fn new() -> Self {
        let vec = |name: &str, help: &str, label: &str| {
            IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric")
        };
        let gauges = |name: &str, help: &str, label: &str| {
            GaugeVec::new(Opts::new(name, help), &[label]).expect("valid metric")
        };
        let m = Self {
            rounds: vec(
                "attune_aligner_rounds_total",
                "Aligner rounds by outcome",
                "outcome",
            ),
            failures: vec(
                "attune_aligner_round_failures_total",
                "Failed aligner rounds by reason",
                "reason",
            ),
            steps: IntCounter::new("attune_aligner_steps_total", "CLHA training steps taken")
                .expect("valid metric"),
            loss: gauges(
                "attune_aligner_loss",
                "Loss of the last training step of the last round (total, ranking, sft)",
                "component",
            ),
            pairs_seen: IntCounter::new(
                "attune_aligner_pairs_seen_total",
                "Candidate pairs in training batches",
            )
            .expect("valid metric"),
            pairs_filtered: IntCounter::new(
                "attune_aligner_pairs_filtered_total",
                "Candidate pairs left out of the ranking loss by the reward threshold",
            )
            .expect("valid metric"),
            reward_seconds: seconds(
                "attune_aligner_reward_scoring_seconds",
                "Time the reward model took to rescore one round's candidates",
            ),
            round_seconds: seconds(
                "attune_aligner_round_seconds",
                "Duration of one aligner round",
            ),
            accuracy: gauges(
                "attune_aligner_heldout_accuracy",
                "Held-out preference accuracy of the last round's candidate and current generation",
                "model",
            ),
            held_out_loss: gauges(
                "attune_aligner_heldout_loss",
                "Held-out mean loss of the last round's candidate and current generation",
                "model",
            ),
            probe_kl: Gauge::new(
                "attune_aligner_probe_kl",
                "Mean KL(current || candidate) on the probe prompts, last round",
            )
            .expect("valid metric"),
            watermark: IntGauge::new(
                "attune_aligner_watermark",
                "The last preference record id the aligner has decided on",
            )
            .expect("valid metric"),
            new_records: IntCounter::new(
                "attune_aligner_records_total",
                "New preference records gathered by rounds",
            )
            .expect("valid metric"),
        };
        // Every label value exists from the start, so dashboards see zeros.
        for o in ["published", "rejected", "skipped", "failed"] {
            m.rounds.with_label_values(&[o]);
        }
        for r in FAILURE_REASONS {
            m.failures.with_label_values(&[r]);
        }
        for c in ["total", "ranking", "sft"] {
            m.loss.with_label_values(&[c]);
        }
        for model in ["candidate", "current"] {
            m.accuracy.with_label_values(&[model]);
            m.held_out_loss.with_label_values(&[model]);
        }
        m
    }

    pub fn register(&self, registry: &Registry) -> prometheus::Result<()> {
        registry.register(Box::new(self.rounds.clone()))?;
        registry.register(Box::new(self.failures.clone()))?;
        registry.register(Box::new(self.steps.clone()))?;
        registry.register(Box::new(self.loss.clone()))?;
        registry.register(Box::new(self.pairs_seen.clone()))?;
        registry.register(Box::new(self.pairs_filtered.clone()))?;
        registry.register(Box::new(self.reward_seconds.clone()))?;
        registry.register(Box::new(self.round_seconds.clone()))?;
        registry.register(Box::new(self.accuracy.clone()))?;
        registry.register(Box::new(self.held_out_loss.clone()))?;
        registry.register(Box::new(self.probe_kl.clone()))?;
        registry.register(Box::new(self.watermark.clone()))?;
        registry.register(Box::new(self.new_records.clone()))?;
        Ok(())
    }

    /// Records a finished round.
    pub fn round(&self, r: &RoundReport) {
        let outcome = match r.outcome {
            Outcome::Published => "published",
            Outcome::Rejected => "rejected",
            Outcome::Skipped => "skipped",
            Outcome::Failed => "failed",
        };
        self.rounds.with_label_values(&[outcome]).inc();
        if r.outcome == Outcome::Failed {
            let reason = failure_reason(r.reason.as_deref().unwrap_or(""));
            self.failures.with_label_values(&[reason]).inc();
        }
        self.round_seconds.observe(r.seconds);
        self.new_records.inc_by(r.new_records as u64);
        self.watermark.set(r.watermark);
        for (model, score) in [("candidate", r.candidate), ("current", r.current)] {
            if let Some(s) = score {
                self.accuracy.with_label_values(&[model]).set(s.accuracy);
                if let Some(l) = s.loss {
                    self.held_out_loss.with_label_values(&[model]).set(l);
                }
            }
        }
        if let Some(kl) = r.probe_kl {
            self.probe_kl.set(kl);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_errors_are_put_into_a_closed_set_of_reasons() {
        let cases = [
            ("panic: injected", "panic"),
            ("training: the loss is NaN", "non_finite"),
            ("training: shape mismatch", "training"),
            ("reward model: cannot score", "reward_model"),
            (
                "aligner.reward_model /x: missing config.json",
                "reward_model",
            ),
            (
                "publishing: registry /a: No space left on device",
                "publish",
            ),
            ("saving the watermark: closed", "store"),
            ("held-out evaluation: oops", "evaluation"),
            ("something else", "other"),
        ];
        for (message, want) in cases {
            assert_eq!(failure_reason(message), want, "{message}");
            assert!(FAILURE_REASONS.contains(&want));
        }
    }
}
