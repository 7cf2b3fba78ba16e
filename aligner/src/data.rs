//! Preference data for the offline jobs: reading HH-RLHF or ranked JSON lines
//! (the same parsers as the store's import) and turning each example into
//! token ids, either as raw text (the paper's and the reference's way) or
//! through the model's chat template (the way serving sees prompts).

use std::io::BufRead;
use std::path::Path;

use attune_models::{ChatMessage, LoadedModel, ModelError, PromptResponse};
use serde_json::Value;

use crate::store::{parse_hh_rlhf, parse_ranked, ImportRecord};

/// How a prompt and a response become tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Template {
    /// HH-RLHF text as is: prompt = the dialogue up to and including the
    /// final `"\n\nAssistant:"`, response = the rest; `enc(prompt) +
    /// enc(response)`. Ranked lines are written in the same style.
    Raw,
    /// The prompt's messages rendered by the chat template (with the
    /// generation prompt); the response followed by the end-of-turn token.
    Chat,
}

impl std::str::FromStr for Template {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "raw" => Ok(Template::Raw),
            "chat" => Ok(Template::Chat),
            _ => Err(format!("unknown template `{s}`: expected `raw` or `chat`")),
        }
    }
}

/// One example: a prompt and two or more responses, best first (the human
/// order).
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// 1-based line in its file.
    pub line: u64,
    pub messages: Vec<ChatMessage>,
    pub responses: Vec<String>,
    /// For HH-RLHF lines: the raw prompt text and raw responses.
    pub raw: Option<(String, Vec<String>)>,
}

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Examples read, and the lines that were not examples with their reasons.
pub type Examples = (Vec<Example>, Vec<(u64, String)>);

/// The examples of `path` (plain or gzip JSON lines) from line `skip + 1`, at
/// most `limit`; lines that are not preference examples are returned with
/// their reasons.
pub fn read_examples(path: &Path, skip: usize, limit: usize) -> Result<Examples, DataError> {
    let err = |source| DataError::Read {
        path: path.display().to_string(),
        source,
    };
    let reader = crate::store::open_maybe_gzip(path).map_err(err)?;
    let mut examples = Vec::new();
    let mut rejected = Vec::new();
    for (i, line) in reader.lines().enumerate().skip(skip) {
        if examples.len() + rejected.len() >= limit {
            break;
        }
        let line = line.map_err(err)?;
        let number = i as u64 + 1;
        if line.trim().is_empty() {
            continue;
        }
        match parse_example(&line, number) {
            Ok(e) => examples.push(e),
            Err(reason) => rejected.push((number, reason)),
        }
    }
    Ok((examples, rejected))
}

const ASSISTANT: &str = "\n\nAssistant:";

fn parse_example(line: &str, number: u64) -> Result<Example, String> {
    let v: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    if v.get("chosen").is_some() {
        let ImportRecord {
            messages,
            responses,
        } = parse_hh_rlhf(&v)?;
        let raw_split = |key: &str| -> Option<(String, String)> {
            let text = v[key].as_str()?;
            let at = text.rfind(ASSISTANT)? + ASSISTANT.len();
            Some((text[..at].to_string(), text[at..].to_string()))
        };
        let raw = match (raw_split("chosen"), raw_split("rejected")) {
            (Some((p, c)), Some((q, r))) if p == q => Some((p, vec![c, r])),
            _ => None,
        };
        Ok(Example {
            line: number,
            messages,
            responses,
            raw,
        })
    } else {
        let ImportRecord {
            messages,
            responses,
        } = parse_ranked(&v)?;
        Ok(Example {
            line: number,
            messages,
            responses,
            raw: None,
        })
    }
}

/// Raw dialogue text for messages (the HH-RLHF style), for ranked lines
/// scored with [`Template::Raw`].
fn raw_prompt(messages: &[ChatMessage]) -> String {
    let mut s = String::new();
    for m in messages {
        let who = if m.role == "assistant" {
            "Assistant"
        } else {
            "Human"
        };
        s.push_str(&format!("\n\n{who}: {}", m.content));
    }
    s.push_str(ASSISTANT);
    s
}

impl Example {
    /// Each response with its prompt, as token ids.
    pub fn tokenize(
        &self,
        model: &LoadedModel,
        template: Template,
    ) -> Result<Vec<PromptResponse>, ModelError> {
        let tok = &model.tokenizer;
        match template {
            Template::Raw => {
                let (prompt, responses) = match &self.raw {
                    Some((p, r)) => (p.clone(), r.clone()),
                    None => (
                        raw_prompt(&self.messages),
                        self.responses.iter().map(|r| format!(" {r}")).collect(),
                    ),
                };
                let prompt = tok.encode(&prompt)?;
                responses
                    .iter()
                    .map(|r| {
                        Ok(PromptResponse {
                            prompt: prompt.clone(),
                            response: tok.encode(r)?,
                        })
                    })
                    .collect()
            }
            Template::Chat => {
                let text = model.template.render(&self.messages, true)?;
                let prompt = tok.encode(&text)?;
                let eot = tok.eos_ids.first().copied();
                self.responses
                    .iter()
                    .map(|r| {
                        let mut response = tok.encode(r)?;
                        response.extend(eot);
                        Ok(PromptResponse {
                            prompt: prompt.clone(),
                            response,
                        })
                    })
                    .collect()
            }
        }
    }
}
