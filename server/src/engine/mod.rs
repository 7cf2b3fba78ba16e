//! The continuous-batching engine. One thread owns the model's serving state
//! (every running sequence and its KV cache); handlers reach it through a
//! bounded channel and each gets its own event channel back. Between steps,
//! waiting requests are admitted (their prompts are prefilled in the same
//! batched forward that decodes the running sequences) and finished or
//! cancelled sequences leave at once. A dropped event receiver is a
//! cancellation. The engine knows nothing of HTTP or OpenAI types.

mod admission;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use attune_config::EngineConfig;
use attune_models::{
    FinishReason, Generation, KvCache, LoadedModel, LogitsFor, SamplingParams, SequenceState,
    StopConditions, TokenLogprob,
};
use tokio::sync::mpsc;

use crate::metrics::ServingMetrics;

pub use admission::{admit_count, Budget};

/// A validated generation request, in tokens.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    /// Independent choices sampled for this prompt.
    pub n: usize,
    /// The adapter generation this request is served with to its last token
    /// (`None`: the base model), pinned when it was accepted.
    pub generation: Option<Arc<Generation>>,
}

/// What the engine reports about one request.
#[derive(Debug, Clone, PartialEq)]
pub enum EngineEvent {
    Token {
        choice: usize,
        token: u32,
        /// Text that became final with this token (may be empty).
        text: String,
        logprob: Option<TokenLogprob>,
    },
    Finished {
        choice: usize,
        reason: FinishReason,
        completion_tokens: usize,
    },
    /// The request failed inside the engine; no more events follow.
    Failed { message: String },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubmitError {
    #[error("the engine's queue is full")]
    QueueFull,
    #[error("the engine has stopped")]
    Stopped,
}

struct Job {
    request: GenerateRequest,
    events: mpsc::Sender<EngineEvent>,
    submitted: Instant,
}

/// Gauges the engine publishes for readiness and monitoring.
#[derive(Debug, Default)]
pub struct EngineStatus {
    pub running: AtomicUsize,
    pub waiting: AtomicUsize,
    pub kv_reserved: AtomicUsize,
    /// KV positions filled in the running sequences' caches.
    pub kv_used: AtomicUsize,
    /// Sequences dropped because their client left.
    pub cancelled: AtomicUsize,
    pub alive: AtomicBool,
}

/// A cloneable handle to the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    jobs: crossbeam_channel::Sender<Job>,
    status: Arc<EngineStatus>,
}

impl EngineHandle {
    /// Queues a request; `QueueFull` when `max_queue` requests already wait.
    pub fn submit(
        &self,
        request: GenerateRequest,
    ) -> Result<mpsc::Receiver<EngineEvent>, SubmitError> {
        // Every choice sends at most `max_tokens` tokens and one finish: the
        // engine never blocks on a slow client.
        let capacity = request.n * (request.max_tokens + 1) + 1;
        let (tx, rx) = mpsc::channel(capacity);
        self.jobs
            .try_send(Job {
                request,
                events: tx,
                submitted: Instant::now(),
            })
            .map_err(|e| match e {
                crossbeam_channel::TrySendError::Full(_) => SubmitError::QueueFull,
                crossbeam_channel::TrySendError::Disconnected(_) => SubmitError::Stopped,
            })?;
        self.status.waiting.fetch_add(1, Ordering::Relaxed);
        Ok(rx)
    }

    pub fn status(&self) -> &EngineStatus {
        &self.status
    }
}

/// One running sequence (one choice of one request).
struct Sequence {
    choice: usize,
    state: SequenceState,
    cache: KvCache,
    /// Tokens to feed at the next step: the prompt, then each sampled token.
    input: Vec<u32>,
    /// KV positions reserved for it (prompt + max tokens).
    reserved: usize,
    generation: Option<Arc<Generation>>,
    events: mpsc::Sender<EngineEvent>,
}

/// The engine thread's state.
pub struct Engine {
    model: Arc<LoadedModel>,
    cfg: EngineConfig,
    jobs: crossbeam_channel::Receiver<Job>,
    waiting: VecDeque<Job>,
    running: Vec<Sequence>,
    status: Arc<EngineStatus>,
    pool: rayon::ThreadPool,
    metrics: ServingMetrics,
}

impl Engine {
    /// Starts the engine thread; tensor work runs in a rayon pool of `threads`.
    pub fn spawn(
        model: Arc<LoadedModel>,
        cfg: EngineConfig,
        threads: usize,
        metrics: ServingMetrics,
    ) -> std::io::Result<(EngineHandle, JoinHandle<()>)> {
        let (tx, rx) = crossbeam_channel::bounded(cfg.max_queue);
        let status = Arc::new(EngineStatus::default());
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .thread_name(|i| format!("attune-engine-{i}"))
            .build()
            .map_err(std::io::Error::other)?;
        let engine = Engine {
            model,
            cfg,
            jobs: rx,
            waiting: VecDeque::new(),
            running: Vec::new(),
            status: status.clone(),
            pool,
            metrics,
        };
        status.alive.store(true, Ordering::Release);
        let join = std::thread::Builder::new()
            .name("attune-engine".into())
            .spawn(move || engine.run())?;
        Ok((EngineHandle { jobs: tx, status }, join))
    }

    fn run(mut self) {
        tracing::info!("engine started");
        let mut open = true;
        loop {
            if open && self.running.is_empty() && self.waiting.is_empty() {
                match self.jobs.recv() {
                    Ok(job) => self.waiting.push_back(job),
                    Err(_) => open = false,
                }
            }
            while open {
                match self.jobs.try_recv() {
                    Ok(job) => self.waiting.push_back(job),
                    Err(crossbeam_channel::TryRecvError::Empty) => break,
                    Err(crossbeam_channel::TryRecvError::Disconnected) => open = false,
                }
            }
            self.admit();
            if self.running.is_empty() {
                if !open && self.waiting.is_empty() {
                    break;
                }
                continue;
            }
            self.step();
            self.publish();
        }
        self.status.alive.store(false, Ordering::Release);
        tracing::info!("engine stopped");
    }

    fn publish(&self) {
        self.status
            .running
            .store(self.running.len(), Ordering::Relaxed);
        self.status
            .waiting
            .store(self.waiting.len(), Ordering::Relaxed);
        let kv: usize = self.running.iter().map(|s| s.reserved).sum();
        self.status.kv_reserved.store(kv, Ordering::Relaxed);
        let used: usize = self.running.iter().map(|s| s.cache.len()).sum();
        self.status.kv_used.store(used, Ordering::Relaxed);
    }

    /// Moves waiting requests into the running batch while the budget allows.
    fn admit(&mut self) {
        // Requests whose client already left are dropped without work.
        self.waiting.retain(|j| !j.events.is_closed());
        let costs: Vec<(usize, usize)> = self
            .waiting
            .iter()
            .map(|j| {
                (
                    j.request.n,
                    j.request.n * (j.request.prompt.len() + j.request.max_tokens),
                )
            })
            .collect();
        let budget = Budget {
            max_running: self.cfg.max_running,
            max_kv_tokens: self.cfg.max_kv_tokens,
            running: self.running.len(),
            kv_reserved: self.running.iter().map(|s| s.reserved).sum(),
        };
        let admit = admit_count(&costs, budget);
        for job in self.waiting.drain(..admit) {
            if self.metrics.enabled {
                self.metrics
                    .queue
                    .observe(job.submitted.elapsed().as_secs_f64());
                self.metrics
                    .prompt_tokens
                    .inc_by((job.request.prompt.len() * job.request.n) as u64);
            }
            let r = job.request;
            let stops = StopConditions {
                max_tokens: r.max_tokens,
                stop: r.stop.clone(),
                eos_ids: self.model.tokenizer.eos_ids.clone(),
                context: self.model.model.max_context(),
            };
            for choice in 0..r.n {
                let mut params = r.params.clone();
                // Choices of one seeded request differ from each other, reproducibly.
                params.seed = params.seed.map(|s| s.wrapping_add(choice as u64));
                self.running.push(Sequence {
                    choice,
                    state: SequenceState::new(params, stops.clone(), &r.prompt),
                    cache: self.model.model.new_cache(),
                    input: r.prompt.clone(),
                    reserved: r.prompt.len() + r.max_tokens,
                    generation: r.generation.clone(),
                    events: job.events.clone(),
                });
            }
        }
        // A request that cannot fit even into an empty engine would wait forever.
        if self.running.is_empty() {
            if let Some(job) = self.waiting.pop_front() {
                let _ = job.events.try_send(EngineEvent::Failed {
                    message: format!(
                        "the request needs more KV positions or sequences than the engine allows \
                         (max_kv_tokens {}, max_running {})",
                        self.cfg.max_kv_tokens, self.cfg.max_running
                    ),
                });
            }
        }
        self.publish();
    }

    /// One batched forward over every running sequence (prompt chunks of newly
    /// admitted ones, one token for the rest), then sampling.
    fn step(&mut self) {
        let started = Instant::now();
        let rows_in_step = self.running.len();
        self.step_inner();
        if self.metrics.enabled {
            self.metrics.step.observe(started.elapsed().as_secs_f64());
            self.metrics.batch_rows.observe(rows_in_step as f64);
        }
    }

    fn step_inner(&mut self) {
        let model = &self.model;
        let inputs: Vec<Vec<u32>> = self
            .running
            .iter_mut()
            .map(|s| std::mem::take(&mut s.input))
            .collect();
        // Each row gets its own sequence's generation: a batch may hold
        // sequences admitted before and after a swap.
        let generations: Vec<Option<Arc<Generation>>> =
            self.running.iter().map(|s| s.generation.clone()).collect();
        let result = {
            let refs: Vec<&[u32]> = inputs.iter().map(|v| v.as_slice()).collect();
            let adapters: Vec<_> = generations
                .iter()
                .map(|g| g.as_ref().map(|g| &g.adapter))
                .collect();
            let mut caches: Vec<&mut KvCache> =
                self.running.iter_mut().map(|s| &mut s.cache).collect();
            self.pool.install(|| {
                model
                    .model
                    .forward_adapted(&refs, &mut caches, &adapters, LogitsFor::Last)
                    .and_then(|l| Ok(l.to_vec2::<f32>()?))
            })
        };
        let rows = match result {
            Ok(rows) => rows,
            Err(e) => {
                tracing::error!(error = %e, "engine step failed; failing its sequences");
                for s in self.running.drain(..) {
                    let _ = s.events.try_send(EngineEvent::Failed {
                        message: e.to_string(),
                    });
                }
                return;
            }
        };
        let tokenizer = &model.tokenizer;
        let mut keep = Vec::with_capacity(self.running.len());
        let mut generated = 0u64;
        for (mut seq, row) in self.running.drain(..).zip(rows) {
            let out = match seq.state.accept(&row, tokenizer) {
                Ok(out) => out,
                Err(e) => {
                    let _ = seq.events.try_send(EngineEvent::Failed {
                        message: e.to_string(),
                    });
                    continue;
                }
            };
            let delivered = seq
                .events
                .try_send(EngineEvent::Token {
                    choice: seq.choice,
                    token: out.token,
                    text: out.text,
                    logprob: out.logprob,
                })
                .is_ok();
            if !delivered {
                // The client left: the sequence and its cache go now.
                self.status.cancelled.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            generated += 1;
            if let Some(reason) = out.finished {
                let _ = seq.events.try_send(EngineEvent::Finished {
                    choice: seq.choice,
                    reason,
                    completion_tokens: seq.state.output_tokens().len(),
                });
                continue;
            }
            seq.input = vec![out.token];
            keep.push(seq);
        }
        if self.metrics.enabled {
            self.metrics.generated_tokens.inc_by(generated);
        }
        self.running = keep;
    }
}
