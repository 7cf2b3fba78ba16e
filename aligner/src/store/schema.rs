//! The store's schema and its migrations (tracked in SQLite's `user_version`),
//! and the pragmas every connection runs with.

use rusqlite::Connection;
use rusqlite_migration::{Migrations, M};

/// Migrations in order; never edit a released one, add the next.
fn migrations() -> Migrations<'static> {
    Migrations::new(vec![
        M::up(
            "
        -- Every completion served: the prompt as rendered and each choice.
        CREATE TABLE completions (
            id          TEXT PRIMARY KEY,
            created_ms  INTEGER NOT NULL,
            model       TEXT NOT NULL,
            generation  INTEGER NOT NULL,
            messages    TEXT NOT NULL,   -- JSON [{role, content}]
            prompt      TEXT NOT NULL,   -- rendered by the chat template
            prompt_hash BLOB NOT NULL,   -- sha256(prompt): what `same prompt` means
            params      TEXT NOT NULL    -- JSON sampling parameters
        ) STRICT;
        CREATE INDEX completions_by_age ON completions(created_ms);

        CREATE TABLE choices (
            completion_id TEXT NOT NULL REFERENCES completions(id) ON DELETE CASCADE,
            idx           INTEGER NOT NULL,
            text          TEXT NOT NULL,
            tokens        BLOB NOT NULL,  -- u32 little-endian token ids
            finish_reason TEXT NOT NULL,
            PRIMARY KEY (completion_id, idx)
        ) STRICT, WITHOUT ROWID;

        -- One preference record: a prompt and two or more responses, best first.
        -- The id is the aligner's watermark, so it only grows (AUTOINCREMENT).
        CREATE TABLE feedback (
            id              INTEGER PRIMARY KEY AUTOINCREMENT,
            kind            TEXT NOT NULL CHECK (kind IN ('ranking', 'pair', 'import')),
            created_ms      INTEGER NOT NULL,
            idempotency_key TEXT UNIQUE,
            request_hash    BLOB NOT NULL,  -- sha256 of the request, to spot key reuse
            messages        TEXT NOT NULL,  -- JSON [{role, content}]: the prompt
            candidates      INTEGER NOT NULL CHECK (candidates >= 2),
            source          TEXT            -- the file an imported record came from
        ) STRICT;

        CREATE TABLE feedback_candidates (
            feedback_id   INTEGER NOT NULL REFERENCES feedback(id),
            rank          INTEGER NOT NULL,  -- 0 is the best
            text          TEXT NOT NULL,
            completion_id TEXT REFERENCES completions(id),  -- NULL when imported
            choice        INTEGER,
            generation    INTEGER,                          -- NULL when imported
            PRIMARY KEY (feedback_id, rank)
        ) STRICT, WITHOUT ROWID;
        CREATE INDEX candidates_by_completion ON feedback_candidates(completion_id)
            WHERE completion_id IS NOT NULL;
        ",
        ),
        M::up(
            "
        -- Durable progress of the aligner thread (its watermark).
        CREATE TABLE aligner_state (
            key   TEXT PRIMARY KEY,
            value INTEGER NOT NULL
        ) STRICT;
        ",
        ),
    ])
}

/// Pragmas for every connection: WAL so readers never block the writer, full
/// fsync at commit (an acknowledged write survives power loss), enforced
/// foreign keys, and a wait instead of an error when another process (an
/// `attune feedback import` beside a running server) holds the write lock.
pub fn configure(conn: &Connection) -> rusqlite::Result<()> {
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    Ok(())
}

/// Brings the database to the latest schema.
pub fn migrate(conn: &mut Connection) -> Result<(), rusqlite_migration::Error> {
    migrations().to_latest(conn)
}

#[cfg(test)]
mod tests {
    #[test]
    fn migrations_are_valid() {
        super::migrations().validate().unwrap();
    }
}
