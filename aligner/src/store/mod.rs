//! The preference store: an SQLite database (WAL, `synchronous=FULL`) holding
//! every completion served and the feedback on them.
//!
//! Ownership: one writer thread owns the only write connection; every write is
//! a command sent over a bounded channel with its own reply channel, and the
//! reply comes only after the transaction holding it has committed (fsync).
//! The writer commits whatever commands are waiting together (group commit),
//! each inside its own savepoint so a rejected command changes nothing and does
//! not disturb its neighbours. Reads run on a small pool of read-only
//! connections, which WAL lets proceed while the writer commits.

mod export;
mod import;
mod read;
mod records;
mod schema;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use attune_config::StoreConfig;
use crossbeam_channel::{Sender, TrySendError};
use parking_lot::Mutex;
use rusqlite::Connection;
use tokio::sync::oneshot;

pub use export::export_ranked;
pub(crate) use import::open_maybe_gzip;
pub use import::{
    import_file, parse_hh_rlhf, parse_ranked, ImportError, ImportFormat, ImportReport, LineError,
};
pub use records::{
    split_of, Candidate, ChoiceRecord, ChoiceRef, CompletionRecord, FeedbackKind, FeedbackReceipt,
    FeedbackRequest, GenerationCount, ImportOutcome, ImportRecord, KindCount, NewFeedback,
    PreferenceRecord, Split, StoreStats,
};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create the store's folder {path}: {source}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the store {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("cannot migrate the store {path} to the current schema: {source}")]
    Migrate {
        path: PathBuf,
        #[source]
        source: rusqlite_migration::Error,
    },
    #[error("store: {doing}: {source}")]
    Sql {
        doing: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    #[error("store: the commit failed, nothing in it was stored: {0}")]
    Commit(String),
    #[error("store: a stored record is malformed: {0}")]
    Corrupt(String),
    #[error("cannot write the export: {0}")]
    Export(String),
    #[error("the store's write queue is full")]
    Busy,
    #[error("the store's writer has stopped")]
    Closed,
}

/// Why feedback was not stored. Nothing of a rejected request is written.
#[derive(Debug, thiserror::Error)]
pub enum FeedbackError {
    #[error("no completion with id `{id}` is stored")]
    UnknownCompletion { id: String },
    #[error("completion `{completion_id}` has {n} choices; there is no choice {choice}")]
    ChoiceOutOfRange {
        completion_id: String,
        choice: usize,
        n: usize,
    },
    #[error("choice {choice} of `{completion_id}` appears more than once")]
    DuplicateCandidate {
        completion_id: String,
        choice: usize,
    },
    #[error("feedback needs at least two candidates, got {got}")]
    TooFewCandidates { got: usize },
    #[error("the candidates answer different prompts (`{first}` and `{other}`)")]
    DifferentPrompts { first: String, other: String },
    #[error("idempotency key `{key}` was used before with a different request")]
    IdempotencyConflict { key: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A write in flight: its result arrives once its transaction has committed.
#[must_use = "the write is acknowledged only when this resolves"]
pub struct Pending<T>(oneshot::Receiver<T>);

impl<T> Pending<T> {
    /// Waits for the commit from async code.
    pub async fn wait(self) -> Result<T, StoreError> {
        self.0.await.map_err(|_| StoreError::Closed)
    }

    /// Waits for the commit from a plain thread (never from async code).
    pub fn wait_blocking(self) -> Result<T, StoreError> {
        self.0.blocking_recv().map_err(|_| StoreError::Closed)
    }
}

/// A handle on the store; clones share the writer thread and the read pool.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    commands: Sender<writer::Command>,
    /// Idle read connections. The lock is held only to take or return one, never
    /// while a query runs; SQLite connections cannot be shared by threads at once.
    readers: Mutex<Vec<Connection>>,
    /// Joined on drop, after the channel closes, so the last commit finishes.
    writer: Mutex<Option<JoinHandle<()>>>,
    /// Seconds each group commit took (the fsync included).
    commit_seconds: prometheus::Histogram,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Close the channel first: the writer drains what is queued and exits.
        let (closed, _) = crossbeam_channel::bounded(0);
        self.commands = closed;
        if let Some(h) = self.writer.lock().take() {
            let _ = h.join();
        }
    }
}

impl Store {
    /// Opens (creating it and its folder when missing) and migrates the store,
    /// and starts its writer thread.
    pub fn open(cfg: &StoreConfig) -> Result<Store, StoreError> {
        let path = cfg.path.clone();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::CreateDir {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let mut conn = open_connection(&path)?;
        schema::migrate(&mut conn).map_err(|source| StoreError::Migrate {
            path: path.clone(),
            source,
        })?;
        let (commands, rx) = crossbeam_channel::bounded(cfg.queue.max(1));
        let retention = writer::Retention {
            max_age_ms: (cfg.retention_days as i64).saturating_mul(86_400_000),
            max_completions: cfg.retention_max_completions,
        };
        let commit_seconds = prometheus::Histogram::with_opts(
            prometheus::HistogramOpts::new(
                "attune_store_commit_seconds",
                "Time one group commit of the preference store took (fsync included)",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.5,
            ]),
        )
        .expect("valid metric");
        let histogram = commit_seconds.clone();
        let handle = std::thread::Builder::new()
            .name("attune-store".into())
            .spawn(move || writer::run(conn, rx, retention, histogram))
            .map_err(|e| StoreError::Commit(format!("cannot start the writer thread: {e}")))?;
        tracing::info!(path = %path.display(), "preference store open");
        Ok(Store {
            inner: Arc::new(Inner {
                path,
                commands,
                readers: Mutex::new(Vec::new()),
                writer: Mutex::new(Some(handle)),
                commit_seconds,
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The commit latency histogram (`attune_store_commit_seconds`), for the
    /// server to register.
    pub fn commit_seconds(&self) -> &prometheus::Histogram {
        &self.inner.commit_seconds
    }

    fn send<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> writer::Command,
    ) -> Result<Pending<T>, StoreError> {
        let (tx, rx) = oneshot::channel();
        match self.inner.commands.try_send(make(tx)) {
            Ok(()) => Ok(Pending(rx)),
            Err(TrySendError::Full(_)) => Err(StoreError::Busy),
            Err(TrySendError::Disconnected(_)) => Err(StoreError::Closed),
        }
    }

    /// Logs a served completion. Fails at once with [`StoreError::Busy`] when
    /// the write queue is full.
    pub fn log_completion(
        &self,
        record: CompletionRecord,
    ) -> Result<Pending<Result<(), StoreError>>, StoreError> {
        self.send(|reply| writer::Command::LogCompletion { record, reply })
    }

    /// Stores feedback; the receipt arrives after the commit.
    pub fn submit_feedback(
        &self,
        feedback: NewFeedback,
    ) -> Result<Pending<Result<FeedbackReceipt, FeedbackError>>, StoreError> {
        self.send(|reply| writer::Command::Feedback { feedback, reply })
    }

    /// Stores imported records in one transaction; content already stored is
    /// reported, not stored again.
    pub fn import(
        &self,
        records: Vec<ImportRecord>,
        source: Option<String>,
    ) -> Result<Pending<Result<Vec<ImportOutcome>, StoreError>>, StoreError> {
        self.send(|reply| writer::Command::Import {
            records,
            source,
            reply,
        })
    }

    /// Deletes completions past the retention limits now (the writer also does
    /// it every minute); answers how many went.
    pub fn prune(&self) -> Result<Pending<Result<u64, StoreError>>, StoreError> {
        self.send(|reply| writer::Command::Prune { reply })
    }

    /// Saves the aligner's watermark (the last record id it has trained on).
    pub fn set_watermark(&self, value: i64) -> Result<Pending<Result<(), StoreError>>, StoreError> {
        self.send(|reply| writer::Command::SetState {
            key: "watermark",
            value,
            reply,
        })
    }

    /// [`Store::import`] for batch jobs on a plain thread: waits for room in
    /// the queue instead of failing, then for the commit.
    pub fn import_blocking(
        &self,
        records: Vec<ImportRecord>,
        source: Option<String>,
    ) -> Result<Vec<ImportOutcome>, StoreError> {
        let (reply, rx) = oneshot::channel();
        let cmd = writer::Command::Import {
            records,
            source,
            reply,
        };
        self.inner
            .commands
            .send(cmd)
            .map_err(|_| StoreError::Closed)?;
        Pending(rx).wait_blocking()?
    }

    /// Runs `f` on a read connection from the pool.
    pub(crate) fn with_reader<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let conn = match self.inner.readers.lock().pop() {
            Some(c) => c,
            None => {
                let c = open_connection(&self.inner.path)?;
                c.pragma_update(None, "query_only", "ON")
                    .map_err(|source| StoreError::Sql {
                        doing: "making a read connection",
                        source,
                    })?;
                c
            }
        };
        let out = f(&conn);
        self.inner.readers.lock().push(conn);
        out
    }
}

fn open_connection(path: &Path) -> Result<Connection, StoreError> {
    let open = |source| StoreError::Open {
        path: path.to_path_buf(),
        source,
    };
    let conn = Connection::open(path).map_err(open)?;
    schema::configure(&conn).map_err(open)?;
    Ok(conn)
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

pub(crate) fn sql(doing: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
    move |source| StoreError::Sql { doing, source }
}
