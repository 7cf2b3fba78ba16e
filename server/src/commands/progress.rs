//! Progress of long jobs (training, scoring, evaluation): a bar on a
//! terminal; elsewhere (a log file, CI, a service manager) a `tracing` line
//! at most every [`LOG_EVERY`] and at the end, since a hidden bar shows
//! nothing.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use parking_lot::Mutex;

/// Least time between two progress log lines.
const LOG_EVERY: Duration = Duration::from_secs(15);

pub(crate) struct Progress {
    bar: ProgressBar,
    what: String,
    /// Set when stderr is not a terminal: (start, last log line, message).
    log: Option<Mutex<LogState>>,
}

struct LogState {
    start: Instant,
    last: Instant,
    message: String,
}

impl Progress {
    pub(crate) fn new(len: usize, what: &str) -> Self {
        let terminal = std::io::stderr().is_terminal();
        let bar = if terminal {
            ProgressBar::new(len as u64)
        } else {
            ProgressBar::hidden()
        };
        bar.set_length(len as u64);
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix:>8} [{bar:30}] {pos}/{len} {elapsed_precise} (eta {eta}) {msg}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_prefix(what.to_string());
        if terminal {
            bar.enable_steady_tick(Duration::from_millis(500));
        }
        let now = Instant::now();
        Progress {
            bar,
            what: what.to_string(),
            log: (!terminal).then(|| {
                Mutex::new(LogState {
                    start: now,
                    last: now,
                    message: String::new(),
                })
            }),
        }
    }

    pub(crate) fn set_position(&self, pos: u64) {
        self.bar.set_position(pos);
        self.maybe_log(false);
    }

    pub(crate) fn inc(&self, delta: u64) {
        self.bar.inc(delta);
        self.maybe_log(false);
    }

    pub(crate) fn set_message(&self, message: String) {
        if let Some(log) = &self.log {
            log.lock().message.clone_from(&message);
        }
        self.bar.set_message(message);
    }

    /// Runs `f` (which prints) without the bar drawn over it.
    pub(crate) fn suspend<R>(&self, f: impl FnOnce() -> R) -> R {
        self.bar.suspend(f)
    }

    pub(crate) fn finish(&self) {
        self.bar.finish();
        self.maybe_log(true);
    }

    pub(crate) fn finish_and_clear(&self) {
        self.bar.finish_and_clear();
        self.maybe_log(true);
    }

    fn maybe_log(&self, last: bool) {
        let Some(log) = &self.log else { return };
        let mut state = log.lock();
        let now = Instant::now();
        if !last && now.duration_since(state.last) < LOG_EVERY {
            return;
        }
        state.last = now;
        let (done, total) = (self.bar.position(), self.bar.length().unwrap_or(0));
        let elapsed = now.duration_since(state.start).as_secs_f64();
        let eta = (done > 0 && done < total)
            .then(|| elapsed / done as f64 * (total - done) as f64)
            .map(|s| format!("{s:.0}s"))
            .unwrap_or_default();
        tracing::info!(
            job = %self.what,
            done,
            total,
            elapsed_secs = elapsed.round(),
            eta = %eta,
            "{}",
            if state.message.is_empty() {
                "progress"
            } else {
                &state.message
            }
        );
    }
}
