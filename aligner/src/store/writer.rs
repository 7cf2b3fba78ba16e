//! The writer thread: the only connection that writes. It takes whatever
//! commands are queued, applies each inside its own savepoint of one
//! transaction, commits once (fsync), and only then answers each command.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use prometheus::Histogram;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;

use super::records::{tokens_to_blob, ChoiceRef};
use super::{
    now_ms, sql, CompletionRecord, FeedbackError, FeedbackReceipt, ImportOutcome, ImportRecord,
    NewFeedback, StoreError,
};

/// Most commands committed together; bounds the time one commit holds replies.
const MAX_BATCH: usize = 256;
/// How often old completions are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

pub(crate) enum Command {
    LogCompletion {
        record: CompletionRecord,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    Feedback {
        feedback: NewFeedback,
        reply: oneshot::Sender<Result<FeedbackReceipt, FeedbackError>>,
    },
    Import {
        records: Vec<ImportRecord>,
        source: Option<String>,
        reply: oneshot::Sender<Result<Vec<ImportOutcome>, StoreError>>,
    },
    Prune {
        reply: oneshot::Sender<Result<u64, StoreError>>,
    },
    SetState {
        key: &'static str,
        value: i64,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
}

/// How long completions nobody gave feedback on are kept.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Retention {
    /// 0: no age limit.
    pub max_age_ms: i64,
    /// 0: no count limit.
    pub max_completions: u64,
}

/// A command's result, held until its transaction has committed.
enum Outcome {
    Log(
        oneshot::Sender<Result<(), StoreError>>,
        Result<(), StoreError>,
    ),
    Feedback(
        oneshot::Sender<Result<FeedbackReceipt, FeedbackError>>,
        Result<FeedbackReceipt, FeedbackError>,
    ),
    Import(
        oneshot::Sender<Result<Vec<ImportOutcome>, StoreError>>,
        Result<Vec<ImportOutcome>, StoreError>,
    ),
    Prune(
        oneshot::Sender<Result<u64, StoreError>>,
        Result<u64, StoreError>,
    ),
}

impl Outcome {
    /// Sends the result; when the commit failed, every success becomes that
    /// failure (nothing of the transaction was stored). A receiver that has
    /// gone away (client disconnected) is not an error: the data is stored.
    fn answer(self, commit_failure: Option<&str>) {
        let failed = |msg: &str| StoreError::Commit(msg.to_string());
        match (self, commit_failure) {
            (Outcome::Log(tx, r), None) => drop(tx.send(r)),
            (Outcome::Log(tx, r), Some(m)) => drop(tx.send(r.and(Err(failed(m))))),
            (Outcome::Feedback(tx, r), None) => drop(tx.send(r)),
            (Outcome::Feedback(tx, r), Some(m)) => {
                drop(tx.send(r.and_then(|_| Err(failed(m).into()))))
            }
            (Outcome::Import(tx, r), None) => drop(tx.send(r)),
            (Outcome::Import(tx, r), Some(m)) => drop(tx.send(r.and(Err(failed(m))))),
            (Outcome::Prune(tx, r), None) => drop(tx.send(r)),
            (Outcome::Prune(tx, r), Some(m)) => drop(tx.send(r.and(Err(failed(m))))),
        }
    }
}

pub(crate) fn run(
    mut conn: Connection,
    commands: Receiver<Command>,
    retention: Retention,
    commit_seconds: Histogram,
) {
    prune_logged(&mut conn, retention);
    let mut next_prune = Instant::now() + PRUNE_EVERY;
    loop {
        let first =
            match commands.recv_timeout(next_prune.saturating_duration_since(Instant::now())) {
                Ok(c) => c,
                Err(RecvTimeoutError::Timeout) => {
                    prune_logged(&mut conn, retention);
                    next_prune = Instant::now() + PRUNE_EVERY;
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => break,
            };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match commands.try_recv() {
                Ok(c) => batch.push(c),
                Err(_) => break,
            }
        }
        apply_batch(&mut conn, batch, retention, &commit_seconds);
    }
    tracing::debug!("store writer stopped");
}

fn prune_logged(conn: &mut Connection, retention: Retention) {
    match in_transaction(conn, |tx| prune(tx, retention, now_ms())) {
        Ok(0) => {}
        Ok(n) => tracing::info!(deleted = n, "pruned old completions"),
        Err(e) => tracing::warn!(error = %e, "pruning old completions failed"),
    }
}

fn in_transaction<T>(
    conn: &mut Connection,
    f: impl FnOnce(&Connection) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(sql("beginning a transaction"))?;
    let out = f(&tx)?;
    tx.commit().map_err(|e| StoreError::Commit(e.to_string()))?;
    Ok(out)
}

fn apply_batch(
    conn: &mut Connection,
    batch: Vec<Command>,
    retention: Retention,
    commit_seconds: &Histogram,
) {
    let mut outcomes = Vec::with_capacity(batch.len());
    let mut tx = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
        Ok(tx) => tx,
        Err(e) => {
            let msg = format!("cannot begin a transaction: {e}");
            tracing::error!(error = %e, "store: cannot begin a transaction");
            for cmd in batch {
                outcome_of_unapplied(cmd).answer(Some(&msg));
            }
            return;
        }
    };
    let now = now_ms();
    for cmd in batch {
        let sp = match tx.savepoint() {
            Ok(sp) => sp,
            Err(e) => {
                outcomes.push((outcome_of_unapplied(cmd), Some(e.to_string())));
                continue;
            }
        };
        let outcome = apply(&sp, cmd, now, retention);
        // A good command is released into the transaction; a failed one is
        // rolled back to its savepoint when `sp` drops, leaving no trace.
        let own_failure = if outcome.is_ok() {
            sp.commit().err().map(|e| e.to_string())
        } else {
            None
        };
        outcomes.push((outcome, own_failure));
    }
    let started = Instant::now();
    let commit = tx.commit().err().map(|e| e.to_string());
    commit_seconds.observe(started.elapsed().as_secs_f64());
    if let Some(e) = &commit {
        tracing::error!(error = %e, "store: commit failed");
    }
    for (outcome, own_failure) in outcomes {
        outcome.answer(own_failure.as_deref().or(commit.as_deref()));
    }
}

impl Outcome {
    fn is_ok(&self) -> bool {
        match self {
            Outcome::Log(_, r) => r.is_ok(),
            Outcome::Feedback(_, r) => r.is_ok(),
            Outcome::Import(_, r) => r.is_ok(),
            Outcome::Prune(_, r) => r.is_ok(),
        }
    }
}

fn outcome_of_unapplied(cmd: Command) -> Outcome {
    let never = || StoreError::Commit("the command was not applied".into());
    match cmd {
        Command::LogCompletion { reply, .. } => Outcome::Log(reply, Err(never())),
        Command::Feedback { reply, .. } => Outcome::Feedback(reply, Err(never().into())),
        Command::Import { reply, .. } => Outcome::Import(reply, Err(never())),
        Command::Prune { reply } => Outcome::Prune(reply, Err(never())),
        Command::SetState { reply, .. } => Outcome::Log(reply, Err(never())),
    }
}

fn apply(conn: &Connection, cmd: Command, now: i64, retention: Retention) -> Outcome {
    match cmd {
        Command::LogCompletion { record, reply } => {
            Outcome::Log(reply, log_completion(conn, &record))
        }
        Command::Feedback { feedback, reply } => {
            Outcome::Feedback(reply, store_feedback(conn, &feedback, now))
        }
        Command::Import {
            records,
            source,
            reply,
        } => Outcome::Import(reply, import(conn, &records, source.as_deref(), now)),
        Command::Prune { reply } => Outcome::Prune(reply, prune(conn, retention, now)),
        Command::SetState { key, value, reply } => Outcome::Log(
            reply,
            conn.execute(
                "INSERT INTO aligner_state (key, value) VALUES (?1, ?2)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                params![key, value],
            )
            .map(|_| ())
            .map_err(sql("saving aligner state")),
        ),
    }
}

fn log_completion(conn: &Connection, r: &CompletionRecord) -> Result<(), StoreError> {
    let messages = serde_json::to_string(&r.messages).expect("messages serialize");
    let prompt_hash = Sha256::digest(r.prompt.as_bytes()).to_vec();
    conn.prepare_cached(
        "INSERT INTO completions (id, created_ms, model, generation, messages, prompt, prompt_hash, params)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )
    .and_then(|mut st| {
        st.execute(params![
            r.id,
            r.created_ms,
            r.model,
            r.generation as i64,
            messages,
            r.prompt,
            prompt_hash,
            r.params.to_string()
        ])
    })
    .map_err(sql("logging a completion"))?;
    let mut st = conn
        .prepare_cached(
            "INSERT INTO choices (completion_id, idx, text, tokens, finish_reason) VALUES (?1, ?2, ?3, ?4, ?5)",
        )
        .map_err(sql("logging a completion's choices"))?;
    for (i, c) in r.choices.iter().enumerate() {
        st.execute(params![
            r.id,
            i as i64,
            c.text,
            tokens_to_blob(&c.tokens),
            c.finish_reason
        ])
        .map_err(sql("logging a completion's choices"))?;
    }
    Ok(())
}

/// What feedback needs to know about a stored completion.
struct Served {
    prompt_hash: Vec<u8>,
    generation: i64,
    messages: String,
    choices: usize,
}

fn served(conn: &Connection, id: &str) -> Result<Option<Served>, StoreError> {
    conn.prepare_cached(
        "SELECT prompt_hash, generation, messages,
                (SELECT COUNT(*) FROM choices WHERE completion_id = ?1)
         FROM completions WHERE id = ?1",
    )
    .and_then(|mut st| {
        st.query_row([id], |row| {
            Ok(Served {
                prompt_hash: row.get(0)?,
                generation: row.get(1)?,
                messages: row.get(2)?,
                choices: row.get::<_, i64>(3)? as usize,
            })
        })
        .optional()
    })
    .map_err(sql("looking up a completion"))
}

fn existing_by_key(
    conn: &Connection,
    key: &str,
) -> Result<Option<(FeedbackReceipt, Vec<u8>)>, StoreError> {
    conn.prepare_cached(
        "SELECT id, created_ms, candidates, request_hash FROM feedback WHERE idempotency_key = ?1",
    )
    .and_then(|mut st| {
        st.query_row([key], |row| {
            Ok((
                FeedbackReceipt {
                    id: row.get(0)?,
                    created_ms: row.get(1)?,
                    candidates: row.get::<_, i64>(2)? as usize,
                    replayed: true,
                    generations: Vec::new(),
                },
                row.get(3)?,
            ))
        })
        .optional()
    })
    .map_err(sql("looking up an idempotency key"))
}

fn store_feedback(
    conn: &Connection,
    fb: &NewFeedback,
    now: i64,
) -> Result<FeedbackReceipt, FeedbackError> {
    let hash = fb.request.hash();
    if let Some(key) = &fb.idempotency_key {
        if let Some((receipt, stored_hash)) = existing_by_key(conn, key)? {
            if stored_hash == hash {
                return Ok(receipt);
            }
            return Err(FeedbackError::IdempotencyConflict { key: key.clone() });
        }
    }
    let candidates = fb.request.candidates();
    if candidates.len() < 2 {
        return Err(FeedbackError::TooFewCandidates {
            got: candidates.len(),
        });
    }
    for (i, c) in candidates.iter().enumerate() {
        if candidates[..i].contains(c) {
            return Err(FeedbackError::DuplicateCandidate {
                completion_id: c.completion_id.clone(),
                choice: c.choice,
            });
        }
    }
    let mut completions: HashMap<&str, Served> = HashMap::new();
    for c in &candidates {
        let id = c.completion_id.as_str();
        if !completions.contains_key(id) {
            let s = served(conn, id)?
                .ok_or_else(|| FeedbackError::UnknownCompletion { id: id.to_string() })?;
            completions.insert(id, s);
        }
        let s = &completions[id];
        if c.choice >= s.choices {
            return Err(FeedbackError::ChoiceOutOfRange {
                completion_id: id.to_string(),
                choice: c.choice,
                n: s.choices,
            });
        }
    }
    let first = &candidates[0].completion_id;
    for c in &candidates[1..] {
        if completions[c.completion_id.as_str()].prompt_hash
            != completions[first.as_str()].prompt_hash
        {
            return Err(FeedbackError::DifferentPrompts {
                first: first.clone(),
                other: c.completion_id.clone(),
            });
        }
    }
    let id = insert_feedback(
        conn,
        &NewRow {
            kind: fb.request.kind().as_str(),
            created_ms: now,
            key: fb.idempotency_key.as_deref(),
            hash: &hash,
            messages: &completions[first.as_str()].messages,
            candidates: candidates.len(),
            source: None,
        },
    )?;
    let mut st = conn
        .prepare_cached(
            "INSERT INTO feedback_candidates (feedback_id, rank, text, completion_id, choice, generation)
             SELECT ?1, ?2, text, completion_id, idx, ?5 FROM choices WHERE completion_id = ?3 AND idx = ?4",
        )
        .map_err(sql("storing feedback candidates"))?;
    for (
        rank,
        ChoiceRef {
            completion_id,
            choice,
        },
    ) in candidates.iter().enumerate()
    {
        let generation = completions[completion_id.as_str()].generation;
        st.execute(params![
            id,
            rank as i64,
            completion_id,
            *choice as i64,
            generation
        ])
        .map_err(sql("storing feedback candidates"))?;
    }
    let mut generations: Vec<u64> = completions.values().map(|s| s.generation as u64).collect();
    generations.sort_unstable();
    generations.dedup();
    Ok(FeedbackReceipt {
        id,
        created_ms: now,
        candidates: candidates.len(),
        replayed: false,
        generations,
    })
}

struct NewRow<'a> {
    kind: &'static str,
    created_ms: i64,
    key: Option<&'a str>,
    hash: &'a [u8],
    messages: &'a str,
    candidates: usize,
    source: Option<&'a str>,
}

fn insert_feedback(conn: &Connection, row: &NewRow) -> Result<i64, StoreError> {
    conn.prepare_cached(
        "INSERT INTO feedback (kind, created_ms, idempotency_key, request_hash, messages, candidates, source)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )
    .and_then(|mut st| {
        st.execute(params![
            row.kind,
            row.created_ms,
            row.key,
            row.hash,
            row.messages,
            row.candidates as i64,
            row.source
        ])
    })
    .map_err(sql("storing feedback"))?;
    Ok(conn.last_insert_rowid())
}

fn import(
    conn: &Connection,
    records: &[ImportRecord],
    source: Option<&str>,
    now: i64,
) -> Result<Vec<ImportOutcome>, StoreError> {
    let mut out = Vec::with_capacity(records.len());
    for r in records {
        let key = r.content_key();
        if let Some((receipt, _)) = existing_by_key(conn, &key)? {
            out.push(ImportOutcome::AlreadyStored(receipt.id));
            continue;
        }
        let messages = serde_json::to_string(&r.messages).expect("messages serialize");
        let hash = Sha256::digest(key.as_bytes()).to_vec();
        let id = insert_feedback(
            conn,
            &NewRow {
                kind: "import",
                created_ms: now,
                key: Some(&key),
                hash: &hash,
                messages: &messages,
                candidates: r.responses.len(),
                source,
            },
        )?;
        let mut st = conn
            .prepare_cached(
                "INSERT INTO feedback_candidates (feedback_id, rank, text) VALUES (?1, ?2, ?3)",
            )
            .map_err(sql("storing imported responses"))?;
        for (rank, text) in r.responses.iter().enumerate() {
            st.execute(params![id, rank as i64, text])
                .map_err(sql("storing imported responses"))?;
        }
        out.push(ImportOutcome::Stored(id));
    }
    Ok(out)
}

/// Deletes completions no feedback refers to: those older than the age limit,
/// then the oldest beyond the count limit. Their choices go with them.
fn prune(conn: &Connection, retention: Retention, now: i64) -> Result<u64, StoreError> {
    const UNREFERENCED: &str =
        "NOT EXISTS (SELECT 1 FROM feedback_candidates f WHERE f.completion_id = completions.id)";
    let mut deleted = 0;
    if retention.max_age_ms > 0 {
        deleted += conn
            .execute(
                &format!("DELETE FROM completions WHERE created_ms < ?1 AND {UNREFERENCED}"),
                [now - retention.max_age_ms],
            )
            .map_err(sql("pruning completions by age"))?;
    }
    if retention.max_completions > 0 {
        let total: i64 = conn
            .query_row("SELECT COUNT(*) FROM completions", [], |r| r.get(0))
            .map_err(sql("counting completions"))?;
        let excess = total - retention.max_completions as i64;
        if excess > 0 {
            deleted += conn
                .execute(
                    &format!(
                        "DELETE FROM completions WHERE id IN (SELECT id FROM completions WHERE {UNREFERENCED}
                         ORDER BY created_ms, id LIMIT ?1)"
                    ),
                    [excess],
                )
                .map_err(sql("pruning completions by count"))?;
        }
    }
    Ok(deleted as u64)
}
