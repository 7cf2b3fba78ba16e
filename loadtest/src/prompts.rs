//! Prompts to send: a built-in set, or the first human turn of each dialogue
//! in an HH-RLHF file (JSON lines, plain or gzip).

use std::io::{BufRead, BufReader, Read};
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    #[error("cannot read prompts from {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} line {line}: {message}")]
    Line {
        path: String,
        line: usize,
        message: String,
    },
    #[error("{path} holds no prompts")]
    Empty { path: String },
}

/// A built-in mix of short questions and tasks.
pub const BUILT_IN: &[&str] = &[
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "How do I boil an egg?",
    "Explain what a prime number is.",
    "Give me three tips for sleeping better.",
    "Translate 'good morning' into Spanish.",
    "What causes the seasons on Earth?",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "How can I make my tea less bitter?",
    "What is the difference between a virus and a bacterium?",
    "Write a haiku about autumn leaves.",
    "Why is the sky blue?",
    "List five fruits that are high in vitamin C.",
    "How do I politely decline an invitation?",
    "What is photosynthesis?",
    "Suggest a name for a friendly robot.",
    "How many legs does a spider have?",
    "Explain recursion to a ten-year-old.",
    "What should I pack for a weekend camping trip?",
    "Write a limerick about a cat.",
    "What are the benefits of drinking water?",
    "How does a bicycle stay upright?",
    "Describe a sunset in one sentence.",
    "What is a good way to start learning to cook?",
];

/// The built-in prompts as owned strings.
pub fn built_in() -> Vec<String> {
    BUILT_IN.iter().map(|s| s.to_string()).collect()
}

/// The first human turn of `"\n\nHuman: …\n\nAssistant: …"`, trimmed.
pub fn first_human_turn(dialogue: &str) -> Option<String> {
    let start = dialogue.find("Human:")? + "Human:".len();
    let rest = &dialogue[start..];
    let end = rest.find("\n\nAssistant:").unwrap_or(rest.len());
    let turn = rest[..end].trim();
    (!turn.is_empty()).then(|| turn.to_string())
}

/// One prompt a line of an HH-RLHF file (`{"chosen": …, "rejected": …}`),
/// read as a stream; gzip is recognised by its magic bytes.
pub fn from_hh_rlhf(path: &Path) -> Result<Vec<String>, PromptError> {
    let shown = path.display().to_string();
    let read_err = |source| PromptError::Read {
        path: shown.clone(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(read_err)?;
    let mut magic = [0u8; 2];
    let gz = file.read(&mut magic).map_err(read_err)? == 2 && magic == [0x1f, 0x8b];
    let file = std::fs::File::open(path).map_err(read_err)?;
    let reader: Box<dyn Read> = if gz {
        Box::new(flate2::read::MultiGzDecoder::new(file))
    } else {
        Box::new(file)
    };
    let mut prompts = Vec::new();
    for (i, line) in BufReader::new(reader).lines().enumerate() {
        let line = line.map_err(read_err)?;
        if line.trim().is_empty() {
            continue;
        }
        let bad = |message: String| PromptError::Line {
            path: shown.clone(),
            line: i + 1,
            message,
        };
        let v: serde_json::Value =
            serde_json::from_str(&line).map_err(|e| bad(format!("not JSON: {e}")))?;
        let dialogue = v["chosen"]
            .as_str()
            .ok_or_else(|| bad("no `chosen` string".into()))?;
        let turn =
            first_human_turn(dialogue).ok_or_else(|| bad("no `Human:` turn in `chosen`".into()))?;
        prompts.push(turn);
    }
    if prompts.is_empty() {
        return Err(PromptError::Empty { path: shown });
    }
    Ok(prompts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_human_turn_is_what_precedes_the_first_assistant_turn() {
        let d = "\n\nHuman: What is tea?\n\nAssistant: A drink.\n\nHuman: More?\n\nAssistant: Hot.";
        assert_eq!(first_human_turn(d).as_deref(), Some("What is tea?"));
        assert_eq!(
            first_human_turn("\n\nHuman: only a question").as_deref(),
            Some("only a question")
        );
        assert_eq!(first_human_turn("no turns at all"), None);
        assert_eq!(first_human_turn("\n\nHuman: \n\nAssistant: x"), None);
    }

    #[test]
    fn hh_rlhf_files_are_read_plain_and_gzipped_with_line_numbers_in_errors() {
        use std::io::Write;
        let dir = std::env::temp_dir().join(format!("attune-loadtest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let line = r#"{"chosen": "\n\nHuman: Hi there\n\nAssistant: Hello", "rejected": "x"}"#;
        let plain = dir.join("p.jsonl");
        std::fs::write(&plain, format!("{line}\n\n{line}\n")).unwrap();
        assert_eq!(from_hh_rlhf(&plain).unwrap(), vec!["Hi there", "Hi there"]);

        let gz = dir.join("p.jsonl.gz");
        let mut enc = flate2::write::GzEncoder::new(
            std::fs::File::create(&gz).unwrap(),
            flate2::Compression::fast(),
        );
        writeln!(enc, "{line}").unwrap();
        enc.finish().unwrap();
        assert_eq!(from_hh_rlhf(&gz).unwrap(), vec!["Hi there"]);

        let bad = dir.join("bad.jsonl");
        std::fs::write(&bad, format!("{line}\n{{\"rejected\": 1}}\n")).unwrap();
        let e = from_hh_rlhf(&bad).unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("chosen"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_shared_hh_rlhf_data_gives_one_prompt_per_line() {
        let path = attune_models::testing::shared_dir().join("data/hh-rlhf-harmless-base.jsonl.gz");
        let prompts = from_hh_rlhf(&path).unwrap();
        assert_eq!(prompts.len(), 2000);
        assert!(prompts
            .iter()
            .all(|p| !p.is_empty() && !p.contains("Assistant:")));
    }
}
