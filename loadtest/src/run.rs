//! A load run: closed loop (a fixed number of clients, each sending its next
//! request when the last one ends) or open loop (Poisson arrivals at a rate,
//! whatever the server's speed), bounded by a request count and/or a
//! duration, with a live progress line; and its report.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::client::{self, Failure, RequestSpec, Timing};
use crate::stats::{rate, Summary};

/// How requests are issued.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    /// `concurrency` clients in a loop.
    Closed { concurrency: usize },
    /// Poisson arrivals at `rate` requests per second; at most
    /// `max_in_flight` at once (arrivals beyond it are counted, not sent).
    Open { rate: f64, max_in_flight: usize },
}

#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// The server's base URL, without `/v1` (e.g. `http://127.0.0.1:8080`).
    pub base: String,
    pub model: String,
    pub prompts: Vec<String>,
    pub mode: Mode,
    /// Stop after this many requests (`None`: only the duration bounds it).
    pub requests: Option<usize>,
    /// Stop issuing after this long (`None`: only the count bounds it).
    pub duration: Option<Duration>,
    pub max_tokens: usize,
    pub temperature: f64,
    pub stream: bool,
    /// Share of requests sent with `n = 2` and followed by feedback ranking
    /// their two choices (attune's `/v1/feedback`).
    pub feedback_share: f64,
    pub seed: u64,
    /// Fields merged into every chat request body.
    pub extra: serde_json::Map<String, serde_json::Value>,
    /// Per-request limit.
    pub timeout: Duration,
    pub progress: bool,
}

/// Feedback traffic of a run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FeedbackReport {
    pub sent: usize,
    pub ok: usize,
    pub errors: BTreeMap<String, usize>,
    pub latency: Option<Summary>,
}

/// What a run measured. Latencies in seconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub target: String,
    pub model: String,
    pub mode: String,
    pub stream: bool,
    pub max_tokens: usize,
    pub seconds: f64,
    pub requests_ok: usize,
    pub requests_failed: usize,
    /// Failed requests by HTTP status (or `transport`, `protocol`,
    /// `client_saturated`).
    pub errors: BTreeMap<String, usize>,
    pub requests_per_s: f64,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub generated_tok_per_s: f64,
    pub ttft: Option<Summary>,
    pub itl: Option<Summary>,
    pub e2e: Option<Summary>,
    pub feedback: FeedbackReport,
}

#[derive(Default)]
struct Collected {
    ok: Vec<Timing>,
    errors: BTreeMap<String, usize>,
    first_errors: Vec<String>,
    feedback: FeedbackReport,
    feedback_latency: Vec<f64>,
}

/// Shared by every client of a run.
struct Shared<'a> {
    cfg: &'a LoadConfig,
    agent: ureq::Agent,
    url: String,
    start: Instant,
    issued: AtomicUsize,
    in_flight: AtomicUsize,
    done_tokens: AtomicUsize,
    done: AtomicUsize,
    failed: AtomicUsize,
    collected: Mutex<Collected>,
}

impl Shared<'_> {
    /// The next request's index, or `None` once the run's bound is reached.
    fn ticket(&self) -> Option<usize> {
        if self.cfg.duration.is_some_and(|d| self.start.elapsed() >= d) {
            return None;
        }
        let i = self.issued.fetch_add(1, Ordering::SeqCst);
        if self.cfg.requests.is_some_and(|n| i >= n) {
            return None;
        }
        Some(i)
    }

    fn one(&self, i: usize) {
        let cfg = self.cfg;
        let mut rng =
            rand::rngs::StdRng::seed_from_u64(cfg.seed ^ (i as u64).wrapping_mul(0x9e37_79b9));
        let with_feedback = cfg.feedback_share > 0.0 && rng.random::<f64>() < cfg.feedback_share;
        let spec = RequestSpec {
            url: self.url.clone(),
            model: cfg.model.clone(),
            prompt: cfg.prompts[i % cfg.prompts.len()].clone(),
            max_tokens: cfg.max_tokens,
            temperature: cfg.temperature,
            stream: cfg.stream,
            n: if with_feedback { 2 } else { 1 },
            seed: Some(cfg.seed.wrapping_add(i as u64)),
            extra: cfg.extra.clone(),
        };
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let result = client::chat(&self.agent, &spec);
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        let mut feedback = None;
        if let (Ok(t), true) = (&result, with_feedback) {
            let ranking = if rng.random::<bool>() { [0, 1] } else { [1, 0] };
            feedback = Some(client::feedback(&self.agent, &cfg.base, &t.id, &ranking));
        }
        let mut c = self.collected.lock().expect("no panics while held");
        match result {
            Ok(t) => {
                self.done_tokens
                    .fetch_add(t.completion_tokens, Ordering::Relaxed);
                self.done.fetch_add(1, Ordering::Relaxed);
                c.ok.push(t);
            }
            Err(f) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                self.fail(&mut c, &f);
            }
        }
        if let Some(fb) = feedback {
            c.feedback.sent += 1;
            match fb {
                Ok(s) => {
                    c.feedback.ok += 1;
                    c.feedback_latency.push(s);
                }
                Err(f) => *c.feedback.errors.entry(f.key()).or_default() += 1,
            }
        }
    }

    fn fail(&self, c: &mut Collected, f: &Failure) {
        *c.errors.entry(f.key()).or_default() += 1;
        if c.first_errors.len() < 5 {
            c.first_errors.push(format!("{f:?}"));
        }
    }
}

/// Runs the load and reports; bounded by `requests` and/or `duration`
/// (at least one must be set).
pub fn run(cfg: &LoadConfig) -> Report {
    assert!(
        cfg.requests.is_some() || cfg.duration.is_some(),
        "a run needs a bound"
    );
    assert!(!cfg.prompts.is_empty(), "a run needs prompts");
    let pool = match cfg.mode {
        Mode::Closed { concurrency } => concurrency,
        Mode::Open { max_in_flight, .. } => max_in_flight.min(64),
    };
    let shared = Shared {
        cfg,
        agent: client::agent(cfg.timeout, pool),
        url: format!("{}/v1/chat/completions", cfg.base),
        start: Instant::now(),
        issued: AtomicUsize::new(0),
        in_flight: AtomicUsize::new(0),
        done_tokens: AtomicUsize::new(0),
        done: AtomicUsize::new(0),
        failed: AtomicUsize::new(0),
        collected: Mutex::new(Collected::default()),
    };
    let finished = AtomicBool::new(false);
    std::thread::scope(|scope| {
        if cfg.progress {
            scope.spawn(|| progress(&shared, &finished));
        }
        match cfg.mode {
            Mode::Closed { concurrency } => {
                let clients: Vec<_> = (0..concurrency.max(1))
                    .map(|_| {
                        scope.spawn(|| {
                            while let Some(i) = shared.ticket() {
                                shared.one(i);
                            }
                        })
                    })
                    .collect();
                for c in clients {
                    c.join().expect("a client panicked");
                }
            }
            Mode::Open {
                rate,
                max_in_flight,
            } => {
                open_loop(scope, &shared, rate, max_in_flight);
            }
        }
        finished.store(true, Ordering::SeqCst);
    });
    let seconds = shared.start.elapsed().as_secs_f64();
    let c = shared.collected.into_inner().expect("no panics while held");
    if cfg.progress && !c.first_errors.is_empty() {
        eprintln!("first errors: {}", c.first_errors.join("; "));
    }
    report(cfg, c, seconds)
}

/// Poisson arrivals: exponential gaps with mean `1 / rate`, each arrival a
/// thread of its own (scoped, so the run waits for every one).
fn open_loop<'s, 'e>(
    scope: &'s std::thread::Scope<'s, 'e>,
    shared: &'s Shared<'e>,
    rate: f64,
    max_in_flight: usize,
) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(shared.cfg.seed);
    let mut next = Instant::now();
    let in_flight = std::sync::Arc::new(AtomicUsize::new(0));
    while let Some(i) = shared.ticket() {
        let gap = -(1.0 - rng.random::<f64>()).ln() / rate;
        next += Duration::from_secs_f64(gap);
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        if in_flight.load(Ordering::SeqCst) >= max_in_flight {
            let mut c = shared.collected.lock().expect("no panics while held");
            shared.failed.fetch_add(1, Ordering::Relaxed);
            *c.errors.entry("client_saturated".into()).or_default() += 1;
            continue;
        }
        in_flight.fetch_add(1, Ordering::SeqCst);
        let in_flight = in_flight.clone();
        scope.spawn(move || {
            shared.one(i);
            in_flight.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

/// A status line every second on a terminal (every 5 s otherwise).
fn progress(shared: &Shared, finished: &AtomicBool) {
    let tty = std::io::stderr().is_terminal();
    let every = if tty {
        Duration::from_secs(1)
    } else {
        Duration::from_secs(5)
    };
    let mut last = Instant::now();
    while !finished.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(100));
        if last.elapsed() < every {
            continue;
        }
        last = Instant::now();
        let t = shared.start.elapsed().as_secs_f64();
        let line = format!(
            "[{t:6.1}s] {} ok, {} failed, {} in flight, {:.1} tok/s",
            shared.done.load(Ordering::Relaxed),
            shared.failed.load(Ordering::Relaxed),
            shared.in_flight.load(Ordering::Relaxed),
            rate(shared.done_tokens.load(Ordering::Relaxed) as f64, t),
        );
        if tty {
            eprint!("\r{line}   ");
        } else {
            eprintln!("{line}");
        }
        let _ = std::io::stderr().flush();
    }
    if tty {
        eprintln!();
    }
}

fn report(cfg: &LoadConfig, c: Collected, seconds: f64) -> Report {
    let ttft: Vec<f64> = c.ok.iter().filter_map(|t| t.ttft).collect();
    let itl: Vec<f64> = c.ok.iter().flat_map(|t| t.itl.iter().copied()).collect();
    let e2e: Vec<f64> = c.ok.iter().map(|t| t.e2e).collect();
    let generated: usize = c.ok.iter().map(|t| t.completion_tokens).sum();
    let mut feedback = c.feedback;
    feedback.latency = Summary::of(&c.feedback_latency);
    Report {
        target: cfg.base.clone(),
        model: cfg.model.clone(),
        mode: match cfg.mode {
            Mode::Closed { concurrency } => format!("closed loop, concurrency {concurrency}"),
            Mode::Open { rate, .. } => format!("open loop, {rate} req/s (Poisson)"),
        },
        stream: cfg.stream,
        max_tokens: cfg.max_tokens,
        seconds,
        requests_ok: c.ok.len(),
        requests_failed: c.errors.values().sum(),
        errors: c.errors,
        requests_per_s: rate(c.ok.len() as f64, seconds),
        prompt_tokens: c.ok.iter().map(|t| t.prompt_tokens).sum(),
        generated_tokens: generated,
        generated_tok_per_s: rate(generated as f64, seconds),
        ttft: Summary::of(&ttft),
        itl: Summary::of(&itl),
        e2e: Summary::of(&e2e),
        feedback,
    }
}

fn ms(s: Option<Summary>) -> [String; 4] {
    match s {
        Some(s) => [s.mean, s.p50, s.p90, s.p99].map(|v| format!("{:.1}", v * 1e3)),
        None => std::array::from_fn(|_| "-".to_string()),
    }
}

impl Report {
    /// A human-readable table of the report.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let w = &mut out;
        use std::fmt::Write as _;
        let _ = writeln!(w, "target      {} ({})", self.target, self.model);
        let _ = writeln!(
            w,
            "load        {}, {}, max_tokens {}, {:.1} s",
            self.mode,
            if self.stream {
                "streaming"
            } else {
                "not streaming"
            },
            self.max_tokens,
            self.seconds
        );
        let _ = writeln!(
            w,
            "requests    {} ok, {} failed{}",
            self.requests_ok,
            self.requests_failed,
            if self.errors.is_empty() {
                String::new()
            } else {
                format!(
                    " ({})",
                    self.errors
                        .iter()
                        .map(|(k, v)| format!("{k}: {v}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        );
        let _ = writeln!(
            w,
            "throughput  {:.2} req/s, {:.1} generated tok/s ({} tokens)",
            self.requests_per_s, self.generated_tok_per_s, self.generated_tokens
        );
        let _ = writeln!(
            w,
            "{:<12}{:>10}{:>10}{:>10}{:>10}",
            "latency ms", "mean", "p50", "p90", "p99"
        );
        for (name, s) in [("ttft", self.ttft), ("itl", self.itl), ("e2e", self.e2e)] {
            let [a, b, c, d] = ms(s);
            let _ = writeln!(w, "{name:<12}{a:>10}{b:>10}{c:>10}{d:>10}");
        }
        if self.feedback.sent > 0 {
            let [a, b, c, d] = ms(self.feedback.latency);
            let _ = writeln!(
                w,
                "feedback    {} sent, {} ok; latency ms mean {a} p50 {b} p90 {c} p99 {d}",
                self.feedback.sent, self.feedback.ok
            );
        }
        out
    }
}

/// One table of several labelled reports side by side, with each report's
/// ratio to the first.
pub fn compare(reports: &[(String, Report)]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let Some((base_label, base)) = reports.first() else {
        return out;
    };
    let rows: [(&str, fn(&Report) -> Option<f64>); 9] = [
        ("generated tok/s", |r: &Report| Some(r.generated_tok_per_s)),
        ("requests/s", |r: &Report| Some(r.requests_per_s)),
        ("ttft p50 ms", |r: &Report| r.ttft.map(|s| s.p50 * 1e3)),
        ("ttft p99 ms", |r: &Report| r.ttft.map(|s| s.p99 * 1e3)),
        ("itl p50 ms", |r: &Report| r.itl.map(|s| s.p50 * 1e3)),
        ("itl p99 ms", |r: &Report| r.itl.map(|s| s.p99 * 1e3)),
        ("e2e p50 ms", |r: &Report| r.e2e.map(|s| s.p50 * 1e3)),
        ("e2e p99 ms", |r: &Report| r.e2e.map(|s| s.p99 * 1e3)),
        ("failed", |r: &Report| Some(r.requests_failed as f64)),
    ];
    let width = reports
        .iter()
        .map(|(l, _)| l.len() + 2)
        .max()
        .unwrap_or(0)
        .max(12);
    let ratio_width = reports[1..]
        .iter()
        .map(|(l, _)| base_label.len() + l.len() + 3)
        .max()
        .unwrap_or(0)
        .max(10);
    let _ = write!(out, "{:<18}", "");
    for (label, _) in reports {
        let _ = write!(out, "{label:>width$}");
    }
    for (label, _) in &reports[1..] {
        let _ = write!(out, "{:>ratio_width$}", format!("{base_label}/{label}"));
    }
    let _ = writeln!(out);
    for (name, get) in rows {
        let _ = write!(out, "{name:<18}");
        for (_, r) in reports {
            let v = get(r).map_or("-".into(), |v| format!("{v:.1}"));
            let _ = write!(out, "{v:>width$}");
        }
        for (_, r) in &reports[1..] {
            let ratio = match (get(base), get(r)) {
                (Some(a), Some(b)) if b != 0.0 => format!("{:.2}x", a / b),
                _ => "-".into(),
            };
            let _ = write!(out, "{ratio:>ratio_width$}");
        }
        let _ = writeln!(out);
    }
    let _ = writeln!(out, "(ratios: {base_label} divided by the other; for tok/s and req/s higher is better, for latencies lower)");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(tok_per_s: f64, ttft_p50: f64) -> Report {
        let s = Summary::of(&[ttft_p50]).unwrap();
        Report {
            target: "t".into(),
            model: "m".into(),
            mode: "closed loop, concurrency 1".into(),
            stream: true,
            max_tokens: 8,
            seconds: 10.0,
            requests_ok: 10,
            requests_failed: 0,
            errors: BTreeMap::new(),
            requests_per_s: 1.0,
            prompt_tokens: 100,
            generated_tokens: (tok_per_s * 10.0) as usize,
            generated_tok_per_s: tok_per_s,
            ttft: Some(s),
            itl: None,
            e2e: Some(s),
            feedback: FeedbackReport::default(),
        }
    }

    #[test]
    fn compare_prints_each_report_and_its_ratio_to_the_first() {
        let table = compare(&[
            ("attune".into(), report(200.0, 0.1)),
            ("other".into(), report(100.0, 0.2)),
        ]);
        let line = |name: &str| {
            table
                .lines()
                .find(|l| l.starts_with(name))
                .unwrap()
                .to_string()
        };
        assert!(line("generated tok/s").ends_with("2.00x"), "{table}");
        assert!(line("ttft p50 ms").contains("100.0") && line("ttft p50 ms").ends_with("0.50x"));
        assert!(
            line("itl p50 ms").ends_with('-'),
            "no ITL without samples: {table}"
        );
        assert!(table.lines().next().unwrap().contains("attune/other"));
        // A report round-trips through its JSON (what --compare reads).
        let r = report(1.0, 0.5);
        let back: Report = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
    }
}
