//! Importing preference data from JSON lines, streamed (plain or gzip):
//! HH-RLHF pairs (`{"chosen", "rejected"}` full dialogues) and the ranked
//! format (`{"prompt": [messages], "responses": [...], "ranking": [...]}`),
//! which is also what `export` writes.

use std::io::{BufRead, BufReader};
use std::path::Path;

use attune_models::ChatMessage;
use serde_json::Value;

use super::{ImportOutcome, ImportRecord, Store, StoreError};

/// Records sent to the writer per transaction.
const BATCH: usize = 500;
/// Rejected lines whose reasons are kept in the report (all are counted).
const KEPT_REASONS: usize = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImportFormat {
    /// Decided per line by its keys.
    Auto,
    HhRlhf,
    Ranked,
}

impl std::str::FromStr for ImportFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(ImportFormat::Auto),
            "hh-rlhf" => Ok(ImportFormat::HhRlhf),
            "ranked" => Ok(ImportFormat::Ranked),
            _ => Err(format!(
                "unknown import format `{s}`: expected `auto`, `hh-rlhf` or `ranked`"
            )),
        }
    }
}

/// A line that was not imported, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineError {
    /// 1-based.
    pub line: u64,
    pub reason: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImportReport {
    /// Non-blank lines read.
    pub lines: u64,
    pub stored: u64,
    /// Lines whose content was already in the store (an earlier import, or an
    /// earlier line of this file).
    pub already_stored: u64,
    pub rejected: u64,
    /// The first rejected lines with their reasons.
    pub reasons: Vec<LineError>,
}

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Imports `path` into `store`, calling `progress` after each committed batch.
pub fn import_file(
    store: &Store,
    path: &Path,
    format: ImportFormat,
    mut progress: impl FnMut(&ImportReport),
) -> Result<ImportReport, ImportError> {
    let read_err = |source| ImportError::Read {
        path: path.display().to_string(),
        source,
    };
    let mut reader = open_maybe_gzip(path).map_err(read_err)?;
    let source = path.file_name().map(|n| n.to_string_lossy().into_owned());
    let mut report = ImportReport::default();
    let mut batch = Vec::with_capacity(BATCH);
    let mut line = Vec::new();
    let mut number = 0u64;
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line).map_err(read_err)? == 0 {
            break;
        }
        number += 1;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        report.lines += 1;
        match parse_line(&line, format) {
            Ok(r) => batch.push(r),
            Err(reason) => reject(&mut report, number, reason),
        }
        if batch.len() == BATCH {
            commit(store, &mut batch, &source, &mut report)?;
            progress(&report);
        }
    }
    if !batch.is_empty() {
        commit(store, &mut batch, &source, &mut report)?;
        progress(&report);
    }
    Ok(report)
}

fn reject(report: &mut ImportReport, line: u64, reason: String) {
    report.rejected += 1;
    if report.reasons.len() < KEPT_REASONS {
        report.reasons.push(LineError { line, reason });
    }
}

fn commit(
    store: &Store,
    batch: &mut Vec<ImportRecord>,
    source: &Option<String>,
    report: &mut ImportReport,
) -> Result<(), StoreError> {
    for outcome in store.import_blocking(std::mem::take(batch), source.clone())? {
        match outcome {
            ImportOutcome::Stored(_) => report.stored += 1,
            ImportOutcome::AlreadyStored(_) => report.already_stored += 1,
        }
    }
    Ok(())
}

pub(crate) fn open_maybe_gzip(path: &Path) -> std::io::Result<Box<dyn BufRead>> {
    let mut file = BufReader::new(std::fs::File::open(path)?);
    let gzip = file.fill_buf()?.starts_with(&[0x1f, 0x8b]);
    Ok(if gzip {
        Box::new(BufReader::new(flate2::bufread::MultiGzDecoder::new(file)))
    } else {
        Box::new(file) as Box<dyn BufRead>
    })
}

fn parse_line(line: &[u8], format: ImportFormat) -> Result<ImportRecord, String> {
    let text = std::str::from_utf8(line).map_err(|e| format!("not UTF-8: {e}"))?;
    let v: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let has = |k: &str| v.get(k).is_some();
    match format {
        ImportFormat::HhRlhf => parse_hh_rlhf(&v),
        ImportFormat::Ranked => parse_ranked(&v),
        ImportFormat::Auto if has("chosen") && has("rejected") => parse_hh_rlhf(&v),
        ImportFormat::Auto if has("prompt") && has("responses") => parse_ranked(&v),
        ImportFormat::Auto => Err(
            "neither format: expected `chosen` and `rejected` (HH-RLHF) or `prompt`, `responses` and `ranking`"
                .into(),
        ),
    }
}

fn string_field<'a>(v: &'a Value, key: &str) -> Result<&'a str, String> {
    match v.get(key) {
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(format!("`{key}` must be a string, got {}", kind_of(other))),
        None => Err(format!("`{key}` is missing")),
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Splits an HH-RLHF dialogue (`"\n\nHuman: …\n\nAssistant: …"`) into turns.
fn dialogue(text: &str, key: &str) -> Result<Vec<ChatMessage>, String> {
    const MARKERS: [(&str, &str); 2] = [("\n\nHuman:", "user"), ("\n\nAssistant:", "assistant")];
    let next_marker = |from: usize| {
        MARKERS
            .iter()
            .filter_map(|&(m, role)| text[from..].find(m).map(|i| (from + i, m.len(), role)))
            .min_by_key(|&(i, _, _)| i)
    };
    let Some((start, _, _)) = next_marker(0) else {
        return Err(format!("`{key}` has no `Human:` or `Assistant:` turn"));
    };
    if !text[..start].trim().is_empty() {
        return Err(format!("`{key}` has text before its first turn"));
    }
    let mut turns = Vec::new();
    let mut at = next_marker(0);
    while let Some((i, len, role)) = at {
        let body = i + len;
        at = next_marker(body);
        let end = at.map_or(text.len(), |(j, _, _)| j);
        turns.push(ChatMessage::new(role, text[body..end].trim()));
    }
    Ok(turns)
}

/// An HH-RLHF line: the two dialogues share every turn before the final
/// assistant turn, which is the chosen or the rejected response.
pub fn parse_hh_rlhf(v: &Value) -> Result<ImportRecord, String> {
    let chosen = dialogue(string_field(v, "chosen")?, "chosen")?;
    let rejected = dialogue(string_field(v, "rejected")?, "rejected")?;
    let split = |mut turns: Vec<ChatMessage>, key: &str| match turns.pop() {
        Some(last) if last.role == "assistant" => Ok((turns, last.content)),
        _ => Err(format!("`{key}` does not end with an assistant turn")),
    };
    let (prompt, chosen) = split(chosen, "chosen")?;
    let (other_prompt, rejected) = split(rejected, "rejected")?;
    if prompt != other_prompt {
        return Err("`chosen` and `rejected` differ before their final assistant turn".into());
    }
    if prompt.is_empty() {
        return Err("there is no prompt before the final assistant turn".into());
    }
    if chosen == rejected {
        return Err("the chosen and rejected responses are identical".into());
    }
    Ok(ImportRecord {
        messages: prompt,
        responses: vec![chosen, rejected],
    })
}

/// A ranked line: `ranking` lists indices into `responses`, best first; two or
/// more, all distinct and in range (responses not ranked are left out).
pub fn parse_ranked(v: &Value) -> Result<ImportRecord, String> {
    let prompt = match v.get("prompt") {
        Some(Value::Array(a)) if !a.is_empty() => a,
        Some(Value::Array(_)) => return Err("`prompt` is empty".into()),
        Some(other) => {
            return Err(format!(
                "`prompt` must be an array of messages, got {}",
                kind_of(other)
            ))
        }
        None => return Err("`prompt` is missing".into()),
    };
    let messages = prompt
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let role = string_field(m, "role").map_err(|e| format!("prompt[{i}]: {e}"))?;
            let content = string_field(m, "content").map_err(|e| format!("prompt[{i}]: {e}"))?;
            Ok(ChatMessage::new(role, content))
        })
        .collect::<Result<Vec<_>, String>>()?;
    let responses = match v.get("responses") {
        Some(Value::Array(a)) => a
            .iter()
            .enumerate()
            .map(|(i, r)| {
                r.as_str()
                    .ok_or_else(|| format!("responses[{i}] must be a string, got {}", kind_of(r)))
            })
            .collect::<Result<Vec<_>, String>>()?,
        Some(other) => {
            return Err(format!(
                "`responses` must be an array of strings, got {}",
                kind_of(other)
            ))
        }
        None => return Err("`responses` is missing".into()),
    };
    let ranking = match v.get("ranking") {
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_u64()
                    .map(|i| i as usize)
                    .ok_or_else(|| format!("`ranking` must hold response indices, got {x}"))
            })
            .collect::<Result<Vec<_>, String>>()?,
        Some(other) => {
            return Err(format!(
                "`ranking` must be an array of indices, got {}",
                kind_of(other)
            ))
        }
        None => return Err("`ranking` is missing".into()),
    };
    if ranking.len() < 2 {
        return Err(format!(
            "`ranking` needs at least two responses, got {}",
            ranking.len()
        ));
    }
    let mut ranked: Vec<String> = Vec::with_capacity(ranking.len());
    for (pos, &i) in ranking.iter().enumerate() {
        if i >= responses.len() {
            return Err(format!(
                "`ranking` names response {i}, but there are {} responses",
                responses.len()
            ));
        }
        if ranking[..pos].contains(&i) {
            return Err(format!("`ranking` names response {i} twice"));
        }
        if ranked.iter().any(|r| r == responses[i]) {
            return Err(format!(
                "response {i} is identical to a response ranked above it"
            ));
        }
        ranked.push(responses[i].to_string());
    }
    Ok(ImportRecord {
        messages,
        responses: ranked,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn hh_rlhf_pair_splits_at_the_final_assistant_turn() {
        let v = json!({
            "chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell me a joke\n\nAssistant: Why did the chicken...",
            "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell me a joke\n\nAssistant: No.",
        });
        let r = parse_hh_rlhf(&v).unwrap();
        assert_eq!(
            r.messages,
            vec![
                ChatMessage::new("user", "Hi"),
                ChatMessage::new("assistant", "Hello!"),
                ChatMessage::new("user", "Tell me a joke"),
            ]
        );
        assert_eq!(r.responses, ["Why did the chicken...", "No."]);
    }

    #[test]
    fn hh_rlhf_lines_that_disagree_before_the_last_turn_are_rejected() {
        let v = json!({
            "chosen": "\n\nHuman: A\n\nAssistant: x",
            "rejected": "\n\nHuman: B\n\nAssistant: y",
        });
        assert!(parse_hh_rlhf(&v).unwrap_err().contains("differ before"));
        let v = json!({"chosen": "\n\nHuman: A", "rejected": "\n\nHuman: A\n\nAssistant: y"});
        assert!(parse_hh_rlhf(&v).unwrap_err().contains("assistant turn"));
        let v = json!({"chosen": 3, "rejected": "x"});
        assert!(parse_hh_rlhf(&v)
            .unwrap_err()
            .contains("`chosen` must be a string"));
    }

    #[test]
    fn ranked_line_orders_responses_best_first() {
        let v = json!({
            "prompt": [{"role": "user", "content": "q"}],
            "responses": ["a", "b", "c"],
            "ranking": [2, 0],
        });
        let r = parse_ranked(&v).unwrap();
        assert_eq!(r.responses, ["c", "a"]);
        for (ranking, needle) in [
            (json!([0]), "at least two"),
            (json!([0, 0]), "twice"),
            (json!([0, 5]), "there are 3"),
            (json!([0, -1]), "indices"),
        ] {
            let mut bad = v.clone();
            bad["ranking"] = ranking;
            let e = parse_ranked(&bad).unwrap_err();
            assert!(e.contains(needle), "{e}");
        }
    }
}
