//! Reads, on the pool's read-only connections: records for the aligner (after
//! a watermark), single records and completions, counts, and checks.

use rusqlite::{Connection, OptionalExtension, Row};
use sha2::{Digest, Sha256};

use super::records::blob_to_tokens;
use super::{
    sql, Candidate, ChoiceRecord, ChoiceRef, CompletionRecord, FeedbackKind, GenerationCount,
    KindCount, PreferenceRecord, Store, StoreError, StoreStats,
};

const RECORD_COLUMNS: &str = "id, kind, created_ms, messages, source";

fn corrupt(what: String) -> StoreError {
    StoreError::Corrupt(what)
}

fn record_head(row: &Row) -> rusqlite::Result<(i64, String, i64, String, Option<String>)> {
    Ok((
        row.get(0)?,
        row.get(1)?,
        row.get(2)?,
        row.get(3)?,
        row.get(4)?,
    ))
}

/// Completes a record row with its candidates.
fn record(
    conn: &Connection,
    (id, kind, created_ms, messages, source): (i64, String, i64, String, Option<String>),
) -> Result<PreferenceRecord, StoreError> {
    let kind = FeedbackKind::parse(&kind)
        .ok_or_else(|| corrupt(format!("record {id} has unknown kind `{kind}`")))?;
    let messages = serde_json::from_str(&messages)
        .map_err(|e| corrupt(format!("record {id} has unreadable messages: {e}")))?;
    let mut st = conn
        .prepare_cached(
            "SELECT text, completion_id, choice, generation FROM feedback_candidates
             WHERE feedback_id = ?1 ORDER BY rank",
        )
        .map_err(sql("reading candidates"))?;
    let candidates = st
        .query_map([id], |row| {
            let completion_id: Option<String> = row.get(1)?;
            let choice: Option<i64> = row.get(2)?;
            let generation: Option<i64> = row.get(3)?;
            Ok(Candidate {
                text: row.get(0)?,
                served: completion_id
                    .zip(choice)
                    .map(|(completion_id, c)| ChoiceRef {
                        completion_id,
                        choice: c as usize,
                    }),
                generation: generation.map(|g| g as u64),
            })
        })
        .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
        .map_err(sql("reading candidates"))?;
    Ok(PreferenceRecord {
        id,
        kind,
        created_ms,
        messages,
        candidates,
        source,
    })
}

impl Store {
    /// One preference record by id.
    pub fn feedback(&self, id: i64) -> Result<Option<PreferenceRecord>, StoreError> {
        self.with_reader(|conn| {
            let head = conn
                .query_row(
                    &format!("SELECT {RECORD_COLUMNS} FROM feedback WHERE id = ?1"),
                    [id],
                    record_head,
                )
                .optional()
                .map_err(sql("reading a record"))?;
            head.map(|h| record(conn, h)).transpose()
        })
    }

    /// Records with id above `watermark`, oldest first, at most `limit`. The
    /// aligner passes the last id it has seen; ids only grow.
    pub fn preferences_after(
        &self,
        watermark: i64,
        limit: usize,
    ) -> Result<Vec<PreferenceRecord>, StoreError> {
        let mut out = Vec::new();
        self.for_each_record(watermark, limit, |r| {
            out.push(r);
            Ok(())
        })?;
        Ok(out)
    }

    /// Streams records with id above `watermark` in id order to `f`, without
    /// holding them all.
    pub fn for_each_record(
        &self,
        watermark: i64,
        limit: usize,
        mut f: impl FnMut(PreferenceRecord) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        self.with_reader(|conn| {
            let mut st = conn
                .prepare(&format!(
                    "SELECT {RECORD_COLUMNS} FROM feedback WHERE id > ?1 ORDER BY id LIMIT ?2"
                ))
                .map_err(sql("listing records"))?;
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            let mut rows = st
                .query(rusqlite::params![watermark, limit])
                .map_err(sql("listing records"))?;
            while let Some(row) = rows.next().map_err(sql("listing records"))? {
                let head = record_head(row).map_err(sql("listing records"))?;
                f(record(conn, head)?)?;
            }
            Ok(())
        })
    }

    /// A logged completion by id.
    pub fn completion(&self, id: &str) -> Result<Option<CompletionRecord>, StoreError> {
        self.with_reader(|conn| {
            let head = conn
                .query_row(
                    "SELECT created_ms, model, generation, messages, prompt, params FROM completions WHERE id = ?1",
                    [id],
                    |row| {
                        Ok((
                            row.get::<_, i64>(0)?,
                            row.get::<_, String>(1)?,
                            row.get::<_, i64>(2)?,
                            row.get::<_, String>(3)?,
                            row.get::<_, String>(4)?,
                            row.get::<_, String>(5)?,
                        ))
                    },
                )
                .optional()
                .map_err(sql("reading a completion"))?;
            let Some((created_ms, model, generation, messages, prompt, params)) = head else {
                return Ok(None);
            };
            let bad = |e: serde_json::Error| corrupt(format!("completion {id}: {e}"));
            let mut st = conn
                .prepare_cached(
                    "SELECT text, tokens, finish_reason FROM choices WHERE completion_id = ?1 ORDER BY idx",
                )
                .map_err(sql("reading choices"))?;
            let choices = st
                .query_map([id], |row| {
                    Ok(ChoiceRecord {
                        text: row.get(0)?,
                        tokens: blob_to_tokens(&row.get::<_, Vec<u8>>(1)?),
                        finish_reason: row.get(2)?,
                    })
                })
                .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
                .map_err(sql("reading choices"))?;
            Ok(Some(CompletionRecord {
                id: id.to_string(),
                created_ms,
                model,
                generation: generation as u64,
                messages: serde_json::from_str(&messages).map_err(bad)?,
                prompt,
                params: serde_json::from_str(&params).map_err(bad)?,
                choices,
            }))
        })
    }

    /// Counts by kind and by generation.
    pub fn stats(&self) -> Result<StoreStats, StoreError> {
        self.with_reader(|conn| {
            let doing = sql("counting records");
            let completions: i64 = conn
                .query_row("SELECT COUNT(*) FROM completions", [], |r| r.get(0))
                .map_err(sql("counting completions"))?;
            let mut st = conn
                .prepare(
                    "SELECT kind, COUNT(*), SUM(candidates * (candidates - 1) / 2)
                     FROM feedback GROUP BY kind ORDER BY kind",
                )
                .map_err(sql("counting records"))?;
            let by_kind = st
                .query_map([], |row| {
                    Ok((
                        row.get::<_, String>(0)?,
                        row.get::<_, i64>(1)?,
                        row.get::<_, i64>(2)?,
                    ))
                })
                .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
                .map_err(doing)?
                .into_iter()
                .map(|(kind, records, pairs)| {
                    Ok(KindCount {
                        kind: FeedbackKind::parse(&kind)
                            .ok_or_else(|| corrupt(format!("unknown record kind `{kind}`")))?,
                        records: records as u64,
                        pairs: pairs as u64,
                    })
                })
                .collect::<Result<Vec<_>, StoreError>>()?;
            let mut st = conn
                .prepare(
                    "SELECT generation, COUNT(DISTINCT feedback_id) FROM feedback_candidates
                     GROUP BY generation ORDER BY generation",
                )
                .map_err(sql("counting records by generation"))?;
            let by_generation = st
                .query_map([], |row| {
                    Ok(GenerationCount {
                        generation: row.get::<_, Option<i64>>(0)?.map(|g| g as u64),
                        records: row.get::<_, i64>(1)? as u64,
                    })
                })
                .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
                .map_err(sql("counting records by generation"))?;
            Ok(StoreStats {
                completions: completions as u64,
                records: by_kind.iter().map(|k| k.records).sum(),
                pairs: by_kind.iter().map(|k| k.pairs).sum(),
                by_kind,
                by_generation,
            })
        })
    }

    /// A digest of every row of every table, for checking that something left
    /// the stored content unchanged.
    pub fn content_digest(&self) -> Result<String, StoreError> {
        self.with_reader(|conn| {
            let doing = sql("digesting the store");
            let tables: Vec<String> = conn
                .prepare("SELECT name FROM sqlite_schema WHERE type = 'table' ORDER BY name")
                .and_then(|mut st| st.query_map([], |r| r.get(0))?.collect())
                .map_err(doing)?;
            let mut h = Sha256::new();
            for t in tables {
                let mut st = conn
                    .prepare(&format!("SELECT * FROM \"{t}\""))
                    .map_err(sql("digesting the store"))?;
                let columns = st.column_count();
                let mut rows: Vec<String> = st
                    .query_map([], |row| {
                        (0..columns)
                            .map(|i| row.get_ref(i).map(|v| format!("{v:?}")))
                            .collect::<Result<Vec<_>, _>>()
                            .map(|v| v.join("\u{1f}"))
                    })
                    .and_then(|rows| rows.collect())
                    .map_err(sql("digesting the store"))?;
                rows.sort();
                h.update(t.as_bytes());
                for r in rows {
                    h.update(r.as_bytes());
                    h.update(b"\x1e");
                }
            }
            Ok(format!("{:x}", h.finalize()))
        })
    }

    /// The aligner's saved watermark (0 before its first round).
    pub fn watermark(&self) -> Result<i64, StoreError> {
        self.with_reader(|conn| {
            conn.query_row(
                "SELECT value FROM aligner_state WHERE key = 'watermark'",
                [],
                |r| r.get(0),
            )
            .optional()
            .map(|v| v.unwrap_or(0))
            .map_err(sql("reading the watermark"))
        })
    }

    /// The newest record id (0 when there is none).
    pub fn last_record_id(&self) -> Result<i64, StoreError> {
        self.with_reader(|conn| {
            conn.query_row("SELECT COALESCE(MAX(id), 0) FROM feedback", [], |r| {
                r.get(0)
            })
            .map_err(sql("reading the newest record id"))
        })
    }

    /// SQLite's own consistency check; `Ok(())` when it answers `ok`.
    pub fn integrity_check(&self) -> Result<(), StoreError> {
        self.with_reader(|conn| {
            let answer: String = conn
                .query_row("PRAGMA integrity_check", [], |r| r.get(0))
                .map_err(sql("checking integrity"))?;
            if answer == "ok" {
                Ok(())
            } else {
                Err(corrupt(format!("integrity check: {answer}")))
            }
        })
    }
}
