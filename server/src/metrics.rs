//! Prometheus metrics (`GET /metrics`, prefix `attune_`). Every component
//! keeps its own metric objects: the serving ones live here and are recorded
//! by the handlers and the engine (an observation is a few atomic adds: no
//! lock, no allocation per token); the store, the aligner and the registry
//! keep theirs, and everything is registered into one
//! [`prometheus::Registry`]. Gauges that mirror other components' atomics are
//! refreshed when `/metrics` is scraped.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use attune_aligner::online::AlignerMetrics;
use attune_aligner::Store;
use attune_models::Registry as Generations;
use parking_lot::Mutex;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

use crate::engine::EngineStatus;

/// Latency buckets from 1 ms to 2 min: fine enough for a GPU's tens of
/// milliseconds per token, wide enough for a CPU's seconds-long prefills.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0,
    10.0, 20.0, 30.0, 60.0, 120.0,
];

fn histogram(name: &str, help: &str) -> Histogram {
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()))
        .expect("valid metric")
}

fn counter(name: &str, help: &str) -> IntCounter {
    IntCounter::new(name, help).expect("valid metric")
}

fn gauge(name: &str, help: &str) -> IntGauge {
    IntGauge::new(name, help).expect("valid metric")
}

/// What the serving path records.
#[derive(Clone)]
pub struct ServingMetrics {
    /// Request arrival to its first token.
    pub ttft: Histogram,
    /// Between consecutive tokens of one choice.
    pub itl: Histogram,
    /// Request arrival to its last token.
    pub e2e: Histogram,
    /// Submission to admission into the running batch.
    pub queue: Histogram,
    /// One engine step (a batched forward and sampling).
    pub step: Histogram,
    /// Rows of one engine step.
    pub batch_rows: Histogram,
    pub prompt_tokens: IntCounter,
    pub generated_tokens: IntCounter,
    pub rejected: IntCounter,
    /// HTTP requests by route pattern and status.
    pub http: IntCounterVec,
    pub http_seconds: HistogramVec,
    /// Completions served, by adapter generation (`0`: the base model).
    pub by_generation: IntCounterVec,
    /// Feedback records received, by the generation of the completion they
    /// rate.
    pub feedback_by_generation: IntCounterVec,
    /// Feedback records by kind (`ranking`, `pair`).
    pub feedback: IntCounterVec,
    /// Publish (activation) to the first token served by that generation.
    pub swap_to_first_token: Histogram,
    /// Whether recording is on (`server.metrics`).
    pub enabled: bool,
}

impl ServingMetrics {
    pub fn new(enabled: bool) -> Self {
        let by_generation = IntCounterVec::new(
            Opts::new(
                "attune_generation_requests_total",
                "Chat completions served, by adapter generation (0: the base model)",
            ),
            &["generation"],
        )
        .expect("valid metric");
        let feedback = IntCounterVec::new(
            Opts::new(
                "attune_feedback_records_total",
                "Feedback records stored, by kind",
            ),
            &["kind"],
        )
        .expect("valid metric");
        for kind in ["ranking", "pair"] {
            feedback.with_label_values(&[kind]);
        }
        by_generation.with_label_values(&["0"]);
        Self {
            ttft: histogram(
                "attune_time_to_first_token_seconds",
                "Request arrival to its first token",
            ),
            itl: histogram(
                "attune_inter_token_latency_seconds",
                "Time between consecutive tokens of a choice",
            ),
            e2e: histogram(
                "attune_request_duration_seconds",
                "Chat completion request arrival to its last token",
            ),
            queue: histogram(
                "attune_queue_time_seconds",
                "Time a request waited before the engine admitted it",
            ),
            step: histogram(
                "attune_engine_step_seconds",
                "One engine step: batched forward and sampling",
            ),
            batch_rows: Histogram::with_opts(
                HistogramOpts::new(
                    "attune_engine_batch_sequences",
                    "Sequences in one engine step",
                )
                .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0]),
            )
            .expect("valid metric"),
            prompt_tokens: counter(
                "attune_prompt_tokens_total",
                "Prompt tokens of admitted requests",
            ),
            generated_tokens: counter("attune_generated_tokens_total", "Tokens generated"),
            rejected: counter(
                "attune_rejected_requests_total",
                "Requests refused with 429 (queue full)",
            ),
            http: IntCounterVec::new(
                Opts::new(
                    "attune_http_requests_total",
                    "HTTP requests by endpoint and status",
                ),
                &["endpoint", "status"],
            )
            .expect("valid metric"),
            http_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "attune_http_request_duration_seconds",
                    "Time to the response head, by endpoint",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                &["endpoint"],
            )
            .expect("valid metric"),
            by_generation,
            feedback_by_generation: IntCounterVec::new(
                Opts::new(
                    "attune_generation_feedback_total",
                    "Feedback records on completions of each adapter generation",
                ),
                &["generation"],
            )
            .expect("valid metric"),
            feedback,
            swap_to_first_token: histogram(
                "attune_swap_to_first_token_seconds",
                "From a generation's activation to the first token it served",
            ),
            enabled,
        }
    }
}

/// Gauges and counters mirrored from other components at scrape time.
struct Mirrored {
    running: IntGauge,
    waiting: IntGauge,
    kv_reserved: IntGauge,
    kv_used: IntGauge,
    kv_capacity: IntGauge,
    cancelled: IntCounter,
    active_generation: IntGauge,
    kept_generations: IntGauge,
    aligner_paused: IntGauge,
    aligner_busy: IntGauge,
}

/// Every metric of the process, and how to render them.
pub struct Metrics {
    registry: Registry,
    pub serving: ServingMetrics,
    mirrored: Mirrored,
    /// Generation labels currently exported (only kept generations are).
    labelled: Mutex<HashSet<String>>,
    swap: Arc<SwapWatch>,
}

/// The latest activation, until the first token of its generation is served.
struct SwapWatch {
    /// The generation waited for; `NONE` when nothing is.
    pending: AtomicU64,
    at: Mutex<Instant>,
}

const NONE: u64 = u64::MAX;

impl Metrics {
    /// Registers the serving metrics, the store's, the aligner's (when it
    /// runs) and the registry's.
    pub fn new(
        enabled: bool,
        kv_capacity: usize,
        store: &Store,
        aligner: Option<&AlignerMetrics>,
        generations: &Generations,
    ) -> prometheus::Result<Self> {
        let registry = Registry::new();
        let serving = ServingMetrics::new(enabled);
        let mirrored = Mirrored {
            running: gauge("attune_running_sequences", "Sequences in the running batch"),
            waiting: gauge("attune_waiting_requests", "Requests waiting for admission"),
            kv_reserved: gauge(
                "attune_kv_reserved_tokens",
                "KV positions reserved by running sequences",
            ),
            kv_used: gauge(
                "attune_kv_used_tokens",
                "KV positions filled in running sequences' caches",
            ),
            kv_capacity: gauge(
                "attune_kv_capacity_tokens",
                "KV positions the engine may reserve (engine.max_kv_tokens)",
            ),
            cancelled: counter(
                "attune_cancelled_requests_total",
                "Sequences dropped because their client left",
            ),
            active_generation: gauge(
                "attune_active_generation",
                "The adapter generation new requests get (0: the base model)",
            ),
            kept_generations: gauge(
                "attune_kept_generations",
                "Adapter generations kept on disk",
            ),
            aligner_paused: gauge("attune_aligner_paused", "1 while the aligner is paused"),
            aligner_busy: gauge("attune_aligner_busy", "1 while an aligner round runs"),
        };
        mirrored.kv_capacity.set(kv_capacity as i64);
        let s = &serving;
        let boxed: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(s.ttft.clone()),
            Box::new(s.itl.clone()),
            Box::new(s.e2e.clone()),
            Box::new(s.queue.clone()),
            Box::new(s.step.clone()),
            Box::new(s.batch_rows.clone()),
            Box::new(s.prompt_tokens.clone()),
            Box::new(s.generated_tokens.clone()),
            Box::new(s.rejected.clone()),
            Box::new(s.http.clone()),
            Box::new(s.http_seconds.clone()),
            Box::new(s.by_generation.clone()),
            Box::new(s.feedback_by_generation.clone()),
            Box::new(s.feedback.clone()),
            Box::new(s.swap_to_first_token.clone()),
            Box::new(mirrored.running.clone()),
            Box::new(mirrored.waiting.clone()),
            Box::new(mirrored.kv_reserved.clone()),
            Box::new(mirrored.kv_used.clone()),
            Box::new(mirrored.kv_capacity.clone()),
            Box::new(mirrored.cancelled.clone()),
            Box::new(mirrored.active_generation.clone()),
            Box::new(mirrored.kept_generations.clone()),
            Box::new(mirrored.aligner_paused.clone()),
            Box::new(mirrored.aligner_busy.clone()),
            Box::new(store.commit_seconds().clone()),
        ];
        for c in boxed {
            registry.register(c)?;
        }
        if let Some(a) = aligner {
            a.register(&registry)?;
        }
        let swap = Arc::new(SwapWatch {
            pending: AtomicU64::new(NONE),
            at: Mutex::new(Instant::now()),
        });
        register_swaps(&registry, generations, swap.clone())?;
        Ok(Self {
            registry,
            serving,
            mirrored,
            labelled: Mutex::new(HashSet::from(["0".to_string()])),
            swap,
        })
    }

    /// The text exposition of every metric, after refreshing the mirrored
    /// ones.
    pub fn render(
        &self,
        engine: &EngineStatus,
        generations: &Generations,
        aligner: Option<&attune_aligner::online::AlignerStatus>,
    ) -> String {
        let m = &self.mirrored;
        m.running.set(engine.running.load(Ordering::Relaxed) as i64);
        m.waiting.set(engine.waiting.load(Ordering::Relaxed) as i64);
        m.kv_reserved
            .set(engine.kv_reserved.load(Ordering::Relaxed) as i64);
        m.kv_used.set(engine.kv_used.load(Ordering::Relaxed) as i64);
        let cancelled = engine.cancelled.load(Ordering::Relaxed) as u64;
        m.cancelled
            .inc_by(cancelled.saturating_sub(m.cancelled.get()));
        let kept = generations.list();
        m.kept_generations.set(kept.len() as i64);
        m.active_generation
            .set(generations.active().map_or(0, |g| g.number) as i64);
        if let Some(a) = aligner {
            m.aligner_paused.set(a.paused.load(Ordering::SeqCst) as i64);
            m.aligner_busy.set(a.busy.load(Ordering::SeqCst) as i64);
        }
        self.bound_generation_labels(kept.iter().map(|g| g.number));
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding does not fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }

    /// Drops the per-generation series of generations no longer kept, so the
    /// label set stays bounded by `adapters.keep`.
    fn bound_generation_labels(&self, kept: impl Iterator<Item = u64>) {
        let keep: HashSet<String> = std::iter::once("0".to_string())
            .chain(kept.map(|n| n.to_string()))
            .collect();
        let mut labelled = self.labelled.lock();
        for gone in labelled.difference(&keep) {
            let _ = self.serving.by_generation.remove_label_values(&[gone]);
            let _ = self
                .serving
                .feedback_by_generation
                .remove_label_values(&[gone]);
        }
        *labelled = keep;
    }

    /// Counts one HTTP request.
    pub fn http_request(
        &self,
        endpoint: &str,
        status: actix_web::http::StatusCode,
        took: std::time::Duration,
    ) {
        if self.serving.enabled {
            self.serving
                .http
                .with_label_values(&[endpoint, status.as_str()])
                .inc();
            self.serving
                .http_seconds
                .with_label_values(&[endpoint])
                .observe(took.as_secs_f64());
        }
    }

    /// Counts a served completion against its generation, if it is a kept
    /// one (its series exists).
    pub fn served_by(&self, generation: u64) {
        if self.serving.enabled {
            let label = generation.to_string();
            self.labelled.lock().insert(label.clone());
            self.serving
                .by_generation
                .with_label_values(&[&label])
                .inc();
        }
    }

    /// A request served by `generation` produced its first token: the
    /// first one since that generation's activation closes the swap.
    pub fn first_token(&self, generation: u64) {
        let w = &self.swap;
        if w.pending.load(Ordering::Relaxed) == generation
            && w.pending
                .compare_exchange(generation, NONE, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            let seconds = w.at.lock().elapsed().as_secs_f64();
            self.serving.swap_to_first_token.observe(seconds);
        }
    }

    pub fn feedback_on(&self, generation: u64) {
        if self.serving.enabled {
            let label = generation.to_string();
            self.labelled.lock().insert(label.clone());
            self.serving
                .feedback_by_generation
                .with_label_values(&[&label])
                .inc();
        }
    }
}

/// Swaps of the active generation: a count, rollbacks, and how long each
/// took (the durable `ACTIVE` write and the pointer swap).
fn register_swaps(
    registry: &Registry,
    generations: &Generations,
    watch: Arc<SwapWatch>,
) -> prometheus::Result<()> {
    let swaps = counter(
        "attune_generation_swaps_total",
        "Activations of an adapter generation",
    );
    let rollbacks = counter(
        "attune_generation_rollbacks_total",
        "Activations of a generation older than the one active before",
    );
    let seconds = histogram("attune_generation_swap_seconds", "Time one activation took");
    registry.register(Box::new(swaps.clone()))?;
    registry.register(Box::new(rollbacks.clone()))?;
    registry.register(Box::new(seconds.clone()))?;
    generations.on_activate(Arc::new(move |a: attune_models::registry::Activation| {
        swaps.inc();
        if a.to < a.from {
            rollbacks.inc();
        }
        seconds.observe(a.seconds);
        *watch.at.lock() = Instant::now() - std::time::Duration::from_secs_f64(a.seconds);
        watch.pending.store(a.to, Ordering::Release);
    }));
    Ok(())
}
