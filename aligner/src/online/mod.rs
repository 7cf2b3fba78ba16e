//! The aligner thread of `attune serve`: it turns new preference records into
//! adapter generations while the server serves.
//!
//! A **round** gathers the training-side records after the durable watermark
//! (plus a replay sample of older ones), rescores them with the reward model
//! when one is configured, trains a private copy of the active generation's
//! LoRA for a bounded number of CLHA steps, compares candidate and current on
//! the held-out records and on fixed probe prompts, and publishes the
//! candidate only when it passes the gate. A round that reaches a decision
//! (published or rejected) advances the watermark; a round that fails
//! (non-finite loss, reward model error, panic, a failed publish) changes
//! nothing, is counted and is retried with backoff. Serving never waits on
//! the aligner: it reads the registry's active generation per request.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use attune_config::AlignerConfig;
use attune_models::{
    LoadedModel, LoraAdapter, LoraConfig, LoraInit, PromptResponse, Registry, RewardModel,
};
use candle_core::DType;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use parking_lot::Mutex;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;

use crate::data::{Example, Template};
use crate::eval::evaluate;
use crate::loss::ClhaParams;
use crate::reward::{rescore, score};
use crate::store::{split_of, PreferenceRecord, Split};
use crate::train::{batch_loss, Objective, Schedule, Scored, TrainConfig, Trainer};
use crate::Store;

mod gate;
mod metrics;

pub use gate::{gate, probe_kl};
pub use metrics::{failure_reason, AlignerMetrics, FAILURE_REASONS};

/// How often the thread looks for new records and control messages.
const POLL: Duration = Duration::from_millis(500);
/// Held-out records the gate scores (the newest).
const MAX_HELD_OUT: usize = 128;
/// New records one round reads at most; the rest wait for the next round.
const MAX_NEW: usize = 4096;
/// Examples per forward when the gate computes the held-out loss.
const LOSS_CHUNK: usize = 4;
/// Control messages waiting for the thread (run, pause, resume).
const CONTROL_QUEUE: usize = 64;
/// Reward-cache entries kept before it is cleared.
const MAX_CACHED_REWARDS: usize = 200_000;

/// Faults a test can inject through `ATTUNE_TEST_FAULT` (never set in
/// production): `nan` poisons the private adapter copy so the loss is NaN,
/// `panic` panics inside the round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Nan,
    Panic,
}

fn injected_fault() -> Option<Fault> {
    match std::env::var("ATTUNE_TEST_FAULT").ok()?.as_str() {
        "nan" => Some(Fault::Nan),
        "panic" => Some(Fault::Panic),
        _ => None,
    }
}

/// How a round ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Published,
    /// The candidate failed the gate; nothing was published.
    Rejected,
    /// No new training records.
    Skipped,
    /// An error aborted the round; nothing was published.
    Failed,
}

/// A generation's score on the held-out records.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct HeldOutScore {
    /// Fraction of pairs whose better response has the higher mean log-prob.
    pub accuracy: f64,
    pub pairs: usize,
    /// Mean objective loss (`None` when no example had two candidates).
    pub loss: Option<f64>,
}

/// What one round did; also the `metrics` of a published generation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RoundReport {
    pub round: u64,
    pub outcome: Outcome,
    /// The generation published, or (otherwise) the one the round started from.
    pub generation: Option<u64>,
    pub parent: Option<u64>,
    pub reason: Option<String>,
    pub new_records: usize,
    pub replayed: usize,
    pub held_out_records: usize,
    pub rescored: bool,
    pub steps: usize,
    /// Mean training loss of the round's last step.
    pub train_loss: Option<f64>,
    pub current: Option<HeldOutScore>,
    pub candidate: Option<HeldOutScore>,
    /// Mean KL(current ‖ candidate) over the probe prompts' positions.
    pub probe_kl: Option<f64>,
    pub watermark: i64,
    pub seconds: f64,
}

impl RoundReport {
    fn new(round: u64, watermark: i64) -> Self {
        Self {
            round,
            outcome: Outcome::Skipped,
            generation: None,
            parent: None,
            reason: None,
            new_records: 0,
            replayed: 0,
            held_out_records: 0,
            rescored: false,
            steps: 0,
            train_loss: None,
            current: None,
            candidate: None,
            probe_kl: None,
            watermark,
            seconds: 0.0,
        }
    }
}

/// Counters and state the admin API and `/metrics` read.
#[derive(Debug, Default)]
pub struct AlignerStatus {
    pub paused: AtomicBool,
    /// A round is running now.
    pub busy: AtomicBool,
    pub rounds: AtomicU64,
    pub published: AtomicU64,
    pub rejected: AtomicU64,
    pub skipped: AtomicU64,
    pub failed: AtomicU64,
    /// Training steps taken, over all rounds.
    pub steps: AtomicU64,
    pub last: Mutex<Option<RoundReport>>,
}

type Reply = oneshot::Sender<RoundReport>;

enum Control {
    /// Run a round now (even while paused); the report goes to the reply.
    Run(Option<Reply>),
    Pause,
    Resume,
}

/// Why a request to the aligner thread was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    #[error("the aligner has {CONTROL_QUEUE} requests waiting already")]
    Busy,
    #[error("the aligner thread has stopped")]
    Stopped,
}

/// A cloneable handle to the aligner thread; the thread stops when every
/// handle is gone.
#[derive(Clone)]
pub struct AlignerHandle {
    control: Sender<Control>,
    status: Arc<AlignerStatus>,
    metrics: AlignerMetrics,
}

impl AlignerHandle {
    /// Asks for a round now; the receiver gets its report (or an error when
    /// the thread stops first).
    pub fn run_now(&self) -> Result<oneshot::Receiver<RoundReport>, ControlError> {
        let (tx, rx) = oneshot::channel();
        self.control
            .try_send(Control::Run(Some(tx)))
            .map_err(|e| match e {
                crossbeam_channel::TrySendError::Full(_) => ControlError::Busy,
                crossbeam_channel::TrySendError::Disconnected(_) => ControlError::Stopped,
            })?;
        Ok(rx)
    }

    pub fn pause(&self) {
        self.status.paused.store(true, Ordering::SeqCst);
        let _ = self.control.try_send(Control::Pause);
    }

    pub fn resume(&self) {
        self.status.paused.store(false, Ordering::SeqCst);
        let _ = self.control.try_send(Control::Resume);
    }

    pub fn status(&self) -> &AlignerStatus {
        &self.status
    }

    pub fn metrics(&self) -> &AlignerMetrics {
        &self.metrics
    }
}

/// What the aligner thread works with. `model` must have dense (f32) weights:
/// training reads them; it may be the serving model itself.
pub struct AlignerParts {
    pub store: Store,
    pub registry: Arc<Registry>,
    pub model: Arc<LoadedModel>,
    pub cfg: AlignerConfig,
}

/// Starts the aligner thread with its own pool of `cfg.threads` threads.
pub fn spawn(parts: AlignerParts) -> std::io::Result<AlignerHandle> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(parts.cfg.threads)
        .thread_name(|i| format!("aligner-{i}"))
        .build()
        .map_err(std::io::Error::other)?;
    // Control messages are rare (admin calls); a full queue means the thread
    // already has plenty to do, and the caller is told so.
    let (tx, rx) = crossbeam_channel::bounded(CONTROL_QUEUE);
    let status = Arc::new(AlignerStatus::default());
    let metrics = AlignerMetrics::new();
    let mut aligner = Aligner {
        metrics: metrics.clone(),
        watermark: parts.store.watermark().map_err(std::io::Error::other)?,
        parts,
        status: status.clone(),
        reward_model: None,
        reward_cache: HashMap::new(),
        fault: injected_fault(),
    };
    tracing::info!(
        watermark = aligner.watermark,
        threads = aligner.parts.cfg.threads,
        interval_secs = aligner.parts.cfg.interval_secs,
        "aligner started"
    );
    std::thread::Builder::new()
        .name("aligner".into())
        .spawn(move || aligner.run(rx, &pool))?;
    Ok(AlignerHandle {
        control: tx,
        status,
        metrics,
    })
}

struct Aligner {
    parts: AlignerParts,
    metrics: AlignerMetrics,
    status: Arc<AlignerStatus>,
    watermark: i64,
    reward_model: Option<RewardModel>,
    reward_cache: HashMap<[u8; 32], f64>,
    fault: Option<Fault>,
}

/// A round's error: the message that is logged and reported.
type RoundError = String;

fn err(context: &str) -> impl Fn(String) -> RoundError + '_ {
    move |e| format!("{context}: {e}")
}

impl Aligner {
    fn run(&mut self, control: Receiver<Control>, pool: &rayon::ThreadPool) {
        let interval = Duration::from_secs(self.parts.cfg.interval_secs.max(1));
        let mut next_due = Instant::now() + interval;
        let mut failures = 0u32;
        let mut retry_at: Option<Instant> = None;
        loop {
            let mut reply = None;
            let mut forced = false;
            match control.recv_timeout(POLL) {
                Ok(Control::Run(r)) => {
                    reply = r;
                    forced = true;
                }
                Ok(Control::Pause) => {
                    tracing::info!("aligner paused");
                    continue;
                }
                Ok(Control::Resume) => {
                    tracing::info!("aligner resumed");
                    continue;
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            if !forced {
                if self.status.paused.load(Ordering::SeqCst) {
                    continue;
                }
                let now = Instant::now();
                if retry_at.is_some_and(|t| now < t) {
                    continue;
                }
                let waiting = match self.parts.store.last_record_id() {
                    Ok(last) => last - self.watermark,
                    Err(e) => {
                        tracing::warn!(error = %e, "aligner cannot read the store");
                        continue;
                    }
                };
                let due = (now >= next_due && waiting > 0)
                    || waiting >= self.parts.cfg.min_new_records as i64
                    || retry_at.is_some();
                if !due {
                    if now >= next_due {
                        next_due = now + interval;
                    }
                    continue;
                }
            }
            let report = pool.install(|| self.round_contained());
            next_due = Instant::now() + interval;
            if report.outcome == Outcome::Failed {
                failures += 1;
                let backoff = Duration::from_secs(
                    (self.parts.cfg.retry_secs << (failures - 1).min(16)).min(interval.as_secs()),
                );
                retry_at = Some(Instant::now() + backoff);
                tracing::warn!(
                    failures,
                    retry_in_secs = backoff.as_secs(),
                    "aligner round will be retried"
                );
            } else {
                failures = 0;
                retry_at = None;
            }
            if let Some(r) = reply {
                let _ = r.send(report);
            }
        }
        tracing::info!("aligner stopped");
    }

    /// One round with every failure (errors and panics) turned into a
    /// `Failed` report.
    fn round_contained(&mut self) -> RoundReport {
        let number = self.status.rounds.fetch_add(1, Ordering::SeqCst) + 1;
        self.status.busy.store(true, Ordering::SeqCst);
        let start = Instant::now();
        let mut report = RoundReport::new(number, self.watermark);
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| self.round(&mut report)));
        report.seconds = start.elapsed().as_secs_f64();
        let failure = match result {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e),
            Err(panic) => Some(format!(
                "panic: {}",
                panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("(no message)")
            )),
        };
        if let Some(reason) = failure {
            report.outcome = Outcome::Failed;
            report.reason = Some(reason);
        }
        let counter = match report.outcome {
            Outcome::Published => &self.status.published,
            Outcome::Rejected => &self.status.rejected,
            Outcome::Skipped => &self.status.skipped,
            Outcome::Failed => &self.status.failed,
        };
        counter.fetch_add(1, Ordering::SeqCst);
        self.status
            .steps
            .fetch_add(report.steps as u64, Ordering::SeqCst);
        match report.outcome {
            Outcome::Failed => tracing::error!(
                round = number,
                reason = report.reason.as_deref().unwrap_or(""),
                "aligner round failed; serving continues on the current generation"
            ),
            outcome => tracing::info!(
                round = number,
                ?outcome,
                generation = report.generation,
                new_records = report.new_records,
                steps = report.steps,
                seconds = report.seconds,
                reason = report.reason.as_deref().unwrap_or(""),
                "aligner round done"
            ),
        }
        self.metrics.round(&report);
        *self.status.last.lock() = Some(report.clone());
        self.status.busy.store(false, Ordering::SeqCst);
        report
    }

    fn round(&mut self, report: &mut RoundReport) -> Result<(), RoundError> {
        let cfg = self.parts.cfg.clone();
        let gathered = self.gather(report)?;
        let Some(gathered) = gathered else {
            report.outcome = Outcome::Skipped;
            report.reason = Some("no new training records".into());
            return self.advance(report, report.watermark);
        };
        let model = self.parts.model.clone();
        let tokenized =
            |records: &[PreferenceRecord]| -> Result<Vec<Vec<PromptResponse>>, RoundError> {
                records
                    .iter()
                    .map(|r| {
                        Example {
                            line: r.id as u64,
                            messages: r.messages.clone(),
                            responses: r.candidates.iter().map(|c| c.text.clone()).collect(),
                            raw: None,
                        }
                        .tokenize(&model, Template::Chat)
                        .map_err(|e| format!("tokenizing record {}: {e}", r.id))
                    })
                    .collect()
            };
        let train = tokenized(&gathered.train)?;
        let held_out = tokenized(&gathered.held_out)?;
        let tcfg = TrainConfig {
            objective: Objective::Clha(ClhaParams::default()),
            lr: cfg.lr,
            warmup_steps: (cfg.steps_per_round / 10).min(5),
            schedule: Schedule::Cosine,
            total_steps: cfg.steps_per_round,
            block_size: cfg.block_size,
            ..TrainConfig::default()
        };
        let scored = self.rescore(train, &tcfg, report)?;

        // Train a private copy of the active generation's adapter.
        let current = self.parts.registry.active();
        report.parent = current.as_ref().map(|g| g.number);
        report.generation = report.parent;
        let lora = match &current {
            Some(g) => g.adapter.snapshot(),
            None => LoraAdapter::new(
                LoraConfig::default(),
                model.model.config(),
                LoraInit::Peft,
                report.round,
                model.model.device(),
            ),
        }
        .map_err(|e| format!("copying the adapter: {e}"))?;
        if self.fault == Some(Fault::Panic) {
            panic!("injected by ATTUNE_TEST_FAULT=panic");
        }
        if self.fault == Some(Fault::Nan) {
            let (_, v) = lora
                .named_vars()
                .into_iter()
                .next()
                .ok_or("an empty adapter")?;
            let nan = (v.as_tensor().ones_like().map_err(|e| e.to_string())? * f64::NAN)
                .map_err(|e| e.to_string())?;
            v.set(&nan).map_err(|e| e.to_string())?;
        }
        let mut trainer = Trainer::new(&model.model, lora, tcfg.clone())
            .map_err(|e| format!("optimizer: {e}"))?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(report.round);
        let mut order: Vec<usize> = Vec::new();
        for _ in 0..cfg.steps_per_round {
            let batch: Vec<Scored> = (0..cfg.batch)
                .map(|_| {
                    if order.is_empty() {
                        order = (0..scored.len()).collect();
                        order.shuffle(&mut rng);
                    }
                    scored[order.pop().expect("refilled")].clone()
                })
                .collect();
            let step = trainer
                .step(&[batch.as_slice()])
                .map_err(|e| format!("training: {e}"))?;
            report.steps += 1;
            report.train_loss = Some(step.loss);
            let m = &self.metrics;
            m.steps.inc();
            for (component, v) in [
                ("total", step.loss),
                ("ranking", step.ranking),
                ("sft", step.sft),
            ] {
                m.loss.with_label_values(&[component]).set(v);
            }
            let seen: usize = batch
                .iter()
                .map(|s| s.candidates.len() * s.candidates.len().saturating_sub(1) / 2)
                .sum();
            m.pairs_seen.inc_by(seen as u64);
            m.pairs_filtered
                .inc_by(seen.saturating_sub(step.pairs) as u64);
        }

        // The gate.
        let held_scored: Vec<Scored> = held_out
            .iter()
            .map(|c| Scored {
                rewards: tcfg.objective.rank_rewards(c.len()),
                candidates: c.clone(),
            })
            .collect();
        let cur_adapter = current.as_ref().map(|g| &g.adapter);
        report.current = self.held_out_score(cur_adapter, &held_out, &held_scored, &tcfg)?;
        report.candidate =
            self.held_out_score(Some(trainer.lora()), &held_out, &held_scored, &tcfg)?;
        let kl = probe_kl(&model, cur_adapter, trainer.lora()).map_err(err("probe KL"))?;
        report.probe_kl = Some(kl);
        let verdict = gate(&cfg, report.current, report.candidate, kl);
        if let Err(reason) = verdict {
            report.outcome = Outcome::Rejected;
            report.reason = Some(reason);
            return self.advance(report, gathered.max_id);
        }

        // Publish: the generation is on disk before anyone is served with it.
        let mut metrics = report.clone();
        metrics.outcome = Outcome::Published;
        metrics.watermark = gathered.max_id;
        let g = self
            .parts
            .registry
            .publish(
                trainer.lora(),
                report.parent,
                serde_json::to_value(&metrics).expect("plain data"),
                true,
            )
            .map_err(|e| format!("publishing: {e}"))?;
        report.outcome = Outcome::Published;
        report.generation = Some(g.number);
        self.advance(report, gathered.max_id)
    }

    /// Saves the watermark durably once a round has reached its decision.
    fn advance(&mut self, report: &mut RoundReport, to: i64) -> Result<(), RoundError> {
        if to > self.watermark {
            self.parts
                .store
                .set_watermark(to)
                .and_then(|p| p.wait_blocking())
                .and_then(|r| r)
                .map_err(|e| format!("saving the watermark: {e}"))?;
            self.watermark = to;
        }
        report.watermark = self.watermark;
        Ok(())
    }

    /// New training records after the watermark, a replay sample of older
    /// ones, and the newest held-out records. `None` when nothing new is on
    /// the training side.
    fn gather(&self, report: &mut RoundReport) -> Result<Option<Gathered>, RoundError> {
        let cfg = &self.parts.cfg;
        let fraction = cfg.held_out_percent / 100.0;
        let mut rng = rand::rngs::StdRng::seed_from_u64(report.round ^ 0x5eed);
        let mut new = Vec::new();
        let mut replay: Vec<PreferenceRecord> = Vec::new();
        let mut older_seen = 0usize;
        let mut held_out = std::collections::VecDeque::new();
        let mut max_id = self.watermark;
        self.parts
            .store
            .for_each_record(0, usize::MAX, |r| {
                let after = r.id > self.watermark;
                match split_of(r.id, fraction) {
                    Split::HeldOut => {
                        if held_out.len() == MAX_HELD_OUT {
                            held_out.pop_front();
                        }
                        held_out.push_back(r.clone());
                        if after && new.len() < MAX_NEW {
                            max_id = max_id.max(r.id);
                        }
                    }
                    Split::Train if after => {
                        if new.len() < MAX_NEW {
                            max_id = max_id.max(r.id);
                            new.push(r);
                        }
                    }
                    Split::Train => {
                        // Reservoir sampling of the older records.
                        older_seen += 1;
                        if replay.len() < cfg.replay {
                            replay.push(r);
                        } else {
                            let k = rng.random_range(0..older_seen);
                            if k < cfg.replay {
                                replay[k] = r;
                            }
                        }
                    }
                }
                Ok(())
            })
            .map_err(|e| format!("reading the store: {e}"))?;
        report.new_records = new.len();
        report.held_out_records = held_out.len();
        report.watermark = max_id;
        if new.is_empty() {
            return Ok(None);
        }
        report.replayed = replay.len();
        new.extend(replay);
        Ok(Some(Gathered {
            train: new,
            held_out: held_out.into(),
            max_id,
        }))
    }

    /// Candidates re-ordered by the reward model (best first), or in the
    /// human order with rank rewards when none is configured.
    fn rescore(
        &mut self,
        examples: Vec<Vec<PromptResponse>>,
        tcfg: &TrainConfig,
        report: &mut RoundReport,
    ) -> Result<Vec<Scored>, RoundError> {
        if self.parts.cfg.reward_model.is_empty() {
            return Ok(examples
                .into_iter()
                .map(|candidates| Scored {
                    rewards: tcfg.objective.rank_rewards(candidates.len()),
                    candidates,
                })
                .collect());
        }
        if self.reward_model.is_none() {
            let dir = PathBuf::from(&self.parts.cfg.reward_model);
            let rm = RewardModel::load(&dir, self.parts.model.model.device())
                .map_err(|e| format!("aligner.reward_model {}: {e}", dir.display()))?;
            self.reward_model = Some(rm);
        }
        let rm = self.reward_model.as_ref().expect("loaded above");
        let key = |c: &PromptResponse| -> [u8; 32] {
            let mut h = Sha256::new();
            for t in c.prompt.iter().chain([&u32::MAX]).chain(&c.response) {
                h.update(t.to_le_bytes());
            }
            h.finalize().into()
        };
        // Score only what the cache lacks.
        let missing: Vec<Vec<PromptResponse>> = examples
            .iter()
            .flatten()
            .filter(|c| !self.reward_cache.contains_key(&key(c)))
            .map(|c| vec![c.clone()])
            .collect();
        if !missing.is_empty() {
            let started = Instant::now();
            let rewards = score(rm, &missing, self.parts.cfg.block_size, 8, |_| {})
                .map_err(|e| format!("reward model: {e}"))?;
            self.metrics
                .reward_seconds
                .observe(started.elapsed().as_secs_f64());
            if self.reward_cache.len() + missing.len() > MAX_CACHED_REWARDS {
                self.reward_cache.clear();
            }
            for (c, r) in missing.iter().zip(rewards) {
                if !r[0].is_finite() {
                    return Err(format!("reward model: a non-finite reward ({})", r[0]));
                }
                self.reward_cache.insert(key(&c[0]), r[0]);
            }
        }
        report.rescored = true;
        Ok(examples
            .into_iter()
            .map(|candidates| {
                let rewards: Vec<f64> = candidates
                    .iter()
                    .map(|c| self.reward_cache[&key(c)])
                    .collect();
                rescore(candidates, &rewards)
            })
            .collect())
    }

    fn held_out_score(
        &self,
        lora: Option<&LoraAdapter>,
        held_out: &[Vec<PromptResponse>],
        scored: &[Scored],
        tcfg: &TrainConfig,
    ) -> Result<Option<HeldOutScore>, RoundError> {
        if held_out.is_empty() {
            return Ok(None);
        }
        let model = &self.parts.model.model;
        let frozen = lora.map(LoraAdapter::frozen);
        let lora = frozen.as_ref();
        let e = evaluate(model, lora, held_out, tcfg.block_size, 4096, |_, _| {})
            .map_err(|e| format!("held-out evaluation: {e}"))?;
        let (mut sum, mut chunks) = (0.0, 0usize);
        for chunk in scored.chunks(LOSS_CHUNK) {
            let (loss, _) = batch_loss(model, lora, chunk, tcfg, false)
                .map_err(|e| format!("held-out loss: {e}"))?;
            if let Some(l) = loss {
                let v = l
                    .total
                    .to_dtype(DType::F64)
                    .and_then(|t| t.to_scalar::<f64>())
                    .map_err(|e| format!("held-out loss: {e}"))?;
                sum += v;
                chunks += 1;
            }
        }
        Ok(Some(HeldOutScore {
            accuracy: e.accuracy(),
            pairs: e.pairs,
            loss: (chunks > 0).then(|| sum / chunks as f64),
        }))
    }
}

struct Gathered {
    train: Vec<PreferenceRecord>,
    held_out: Vec<PreferenceRecord>,
    /// The newest record id the round has seen (its watermark once decided).
    max_id: i64,
}
