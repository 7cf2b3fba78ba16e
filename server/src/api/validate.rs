//! Raw chat-completion JSON → `ValidChatRequest`, once, at the edge. Each
//! check names the field and the allowed range. Unknown fields are ignored.

use attune_models::{ChatMessage, SamplingParams};
use serde_json::{Map, Value};

use super::error::ApiError;

/// Limits the validator needs from configuration and the model.
#[derive(Debug, Clone)]
pub struct Limits {
    pub model_name: String,
    pub max_n: usize,
    pub default_max_tokens: usize,
    pub context: usize,
}

/// A chat completion request whose every field is known to be in range.
#[derive(Debug, Clone)]
pub struct ValidChatRequest {
    pub messages: Vec<ChatMessage>,
    pub params: SamplingParams,
    /// `None`: as many as the context allows, capped by the default.
    pub max_tokens: Option<usize>,
    pub stop: Vec<String>,
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
    pub logprobs: bool,
    pub user: Option<String>,
}

fn number(obj: &Map<String, Value>, key: &str) -> Result<Option<f64>, ApiError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => Ok(n.as_f64()),
        Some(other) => Err(ApiError::invalid(
            key,
            format!("`{key}` must be a number, got {other}"),
        )),
    }
}

fn integer(obj: &Map<String, Value>, key: &str) -> Result<Option<i64>, ApiError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) if n.is_i64() => Ok(n.as_i64()),
        Some(Value::Number(n)) if n.is_u64() => Ok(Some(i64::MAX)),
        Some(other) => Err(ApiError::invalid(
            key,
            format!("`{key}` must be an integer, got {other}"),
        )),
    }
}

fn boolean(obj: &Map<String, Value>, key: &str) -> Result<Option<bool>, ApiError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(ApiError::invalid(
            key,
            format!("`{key}` must be a boolean, got {other}"),
        )),
    }
}

fn in_range(key: &str, v: f64, lo: f64, hi: f64, lo_open: bool) -> Result<f32, ApiError> {
    let ok = if lo_open { v > lo } else { v >= lo } && v <= hi;
    if !ok {
        let open = if lo_open { "(" } else { "[" };
        return Err(ApiError::invalid(
            key,
            format!("`{key}` must be in {open}{lo}, {hi}], got {v}"),
        ));
    }
    Ok(v as f32)
}

fn content_text(v: &Value, i: usize) -> Result<String, ApiError> {
    let param = format!("messages[{i}].content");
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => {
            let mut text = String::new();
            for p in parts {
                match (
                    p.get("type").and_then(Value::as_str),
                    p.get("text").and_then(Value::as_str),
                ) {
                    (Some("text"), Some(t)) => text.push_str(t),
                    _ => {
                        return Err(ApiError::invalid(
                            &param,
                            format!(
                                "`{param}` parts must be {{\"type\": \"text\", \"text\": ...}}"
                            ),
                        ))
                    }
                }
            }
            Ok(text)
        }
        _ => Err(ApiError::invalid(
            &param,
            format!("`{param}` must be a string"),
        )),
    }
}

fn messages(obj: &Map<String, Value>) -> Result<Vec<ChatMessage>, ApiError> {
    let list = match obj.get("messages") {
        Some(Value::Array(a)) if !a.is_empty() => a,
        Some(Value::Array(_)) => {
            return Err(ApiError::invalid(
                "messages",
                "`messages` must not be empty",
            ))
        }
        None => return Err(ApiError::invalid("messages", "`messages` is required")),
        Some(_) => return Err(ApiError::invalid("messages", "`messages` must be an array")),
    };
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let role = m.get("role").and_then(Value::as_str).ok_or_else(|| {
                ApiError::invalid(
                    &format!("messages[{i}].role"),
                    format!("`messages[{i}].role` must be a string"),
                )
            })?;
            if !matches!(role, "system" | "user" | "assistant" | "developer") {
                return Err(ApiError::invalid(
                    &format!("messages[{i}].role"),
                    format!("`messages[{i}].role` must be system, user or assistant, got `{role}`"),
                ));
            }
            let role = if role == "developer" { "system" } else { role };
            let content = content_text(m.get("content").unwrap_or(&Value::Null), i)?;
            Ok(ChatMessage::new(role, content))
        })
        .collect()
}

fn stop_list(obj: &Map<String, Value>) -> Result<Vec<String>, ApiError> {
    let stop = match obj.get("stop") {
        None | Some(Value::Null) => vec![],
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|s| {
                s.as_str().map(str::to_string).ok_or_else(|| {
                    ApiError::invalid("stop", "`stop` must be a string or a list of strings")
                })
            })
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(ApiError::invalid(
                "stop",
                "`stop` must be a string or a list of strings",
            ))
        }
    };
    if stop.len() > 16 || stop.iter().any(|s| s.is_empty()) {
        return Err(ApiError::invalid(
            "stop",
            "`stop` takes at most 16 non-empty strings",
        ));
    }
    Ok(stop)
}

/// Validates a parsed body against the limits.
pub fn chat_request(body: &Value, limits: &Limits) -> Result<ValidChatRequest, ApiError> {
    let obj = body
        .as_object()
        .ok_or_else(|| ApiError::bad_request("The request body must be a JSON object"))?;
    match obj.get("model") {
        Some(Value::String(m)) if m == &limits.model_name => {}
        Some(Value::String(m)) => return Err(ApiError::model_not_found(m)),
        None => return Err(ApiError::invalid("model", "`model` is required")),
        Some(_) => return Err(ApiError::invalid("model", "`model` must be a string")),
    }
    let messages = messages(obj)?;
    let max_tokens = match (
        integer(obj, "max_completion_tokens")?,
        integer(obj, "max_tokens")?,
    ) {
        (Some(v), _) => Some(("max_completion_tokens", v)),
        (None, Some(v)) => Some(("max_tokens", v)),
        (None, None) => None,
    };
    let max_tokens = match max_tokens {
        Some((key, v)) if v < 1 => {
            return Err(ApiError::invalid(
                key,
                format!("`{key}` must be at least 1, got {v}"),
            ))
        }
        Some((key, v)) if v as u64 > limits.context as u64 => {
            return Err(ApiError::invalid(
                key,
                format!(
                    "`{key}` is {v}, more than the model's context of {} tokens",
                    limits.context
                ),
            ))
        }
        Some((_, v)) => Some(v as usize),
        None => None,
    };
    let n = integer(obj, "n")?.unwrap_or(1);
    if n < 1 || n as u64 > limits.max_n as u64 {
        return Err(ApiError::invalid(
            "n",
            format!("`n` must be in [1, {}], got {n}", limits.max_n),
        ));
    }
    let temperature = number(obj, "temperature")?
        .map(|v| in_range("temperature", v, 0.0, 2.0, false))
        .transpose()?;
    let top_p = number(obj, "top_p")?
        .map(|v| in_range("top_p", v, 0.0, 1.0, true))
        .transpose()?;
    let min_p = number(obj, "min_p")?
        .map(|v| in_range("min_p", v, 0.0, 1.0, false))
        .transpose()?;
    let presence = number(obj, "presence_penalty")?
        .map(|v| in_range("presence_penalty", v, -2.0, 2.0, false))
        .transpose()?;
    let frequency = number(obj, "frequency_penalty")?
        .map(|v| in_range("frequency_penalty", v, -2.0, 2.0, false))
        .transpose()?;
    let repetition = number(obj, "repetition_penalty")?
        .map(|v| in_range("repetition_penalty", v, 0.0, 10.0, true))
        .transpose()?;
    let top_k = match integer(obj, "top_k")? {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k > 0 => k as usize,
        Some(k) => {
            return Err(ApiError::invalid(
                "top_k",
                format!("`top_k` must be -1, 0 or positive, got {k}"),
            ))
        }
    };
    let seed = integer(obj, "seed")?.map(|s| s as u64);
    let logprobs = boolean(obj, "logprobs")?.unwrap_or(false);
    let top_logprobs = match integer(obj, "top_logprobs")? {
        Some(k) if !(0..=20).contains(&k) => {
            return Err(ApiError::invalid(
                "top_logprobs",
                format!("`top_logprobs` must be in [0, 20], got {k}"),
            ))
        }
        Some(_) if !logprobs => {
            return Err(ApiError::invalid(
                "top_logprobs",
                "`top_logprobs` needs `logprobs: true`",
            ))
        }
        Some(k) => k as usize,
        None => 0,
    };
    let stream = boolean(obj, "stream")?.unwrap_or(false);
    let include_usage = match obj.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(o)) => boolean(o, "include_usage")
            .map_err(|_| {
                ApiError::invalid(
                    "stream_options.include_usage",
                    "`stream_options.include_usage` must be a boolean",
                )
            })?
            .unwrap_or(false),
        Some(_) => {
            return Err(ApiError::invalid(
                "stream_options",
                "`stream_options` must be an object",
            ))
        }
    };
    let user = match obj.get("user") {
        None | Some(Value::Null) => None,
        Some(Value::String(u)) => Some(u.clone()),
        Some(_) => return Err(ApiError::invalid("user", "`user` must be a string")),
    };
    let params = SamplingParams {
        temperature: temperature.unwrap_or(1.0),
        top_k,
        top_p: top_p.unwrap_or(1.0),
        min_p: min_p.unwrap_or(0.0),
        repetition_penalty: repetition.unwrap_or(1.0),
        presence_penalty: presence.unwrap_or(0.0),
        frequency_penalty: frequency.unwrap_or(0.0),
        seed,
        logprobs: logprobs.then_some(top_logprobs),
    };
    params
        .validate()
        .map_err(|e| ApiError::invalid(e.field, e.to_string()))?;
    Ok(ValidChatRequest {
        messages,
        params,
        max_tokens,
        stop: stop_list(obj)?,
        n: n as usize,
        stream,
        include_usage,
        logprobs,
        user,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn limits() -> Limits {
        Limits {
            model_name: "m".into(),
            max_n: 4,
            default_max_tokens: 16,
            context: 100,
        }
    }

    fn base() -> Value {
        json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    }

    fn err(patch: Value) -> ApiError {
        let mut b = base();
        for (k, v) in patch.as_object().unwrap() {
            b[k] = v.clone();
        }
        chat_request(&b, &limits()).unwrap_err()
    }

    #[test]
    fn accepts_a_minimal_request_with_openai_defaults() {
        let r = chat_request(&base(), &limits()).unwrap();
        assert_eq!(r.n, 1);
        assert_eq!(r.params.temperature, 1.0);
        assert!(!r.stream);
    }

    #[test]
    fn wrong_types_and_ranges_name_the_field() {
        let e = err(json!({"top_p": 1.5}));
        assert_eq!(e.param.as_deref(), Some("top_p"));
        assert!(e.message.contains("1.5"), "{}", e.message);
        assert_eq!(
            err(json!({"temperature": "hot"})).param.as_deref(),
            Some("temperature")
        );
        assert_eq!(err(json!({"n": 9})).param.as_deref(), Some("n"));
        assert_eq!(
            err(json!({"max_tokens": 0})).param.as_deref(),
            Some("max_tokens")
        );
        assert_eq!(err(json!({"stop": [1]})).param.as_deref(), Some("stop"));
        assert_eq!(
            err(json!({"messages": []})).param.as_deref(),
            Some("messages")
        );
        assert_eq!(
            err(json!({"top_logprobs": 3})).param.as_deref(),
            Some("top_logprobs")
        );
        assert_eq!(err(json!({"model": "other"})).status.as_u16(), 404);
    }

    #[test]
    fn unknown_fields_are_ignored_and_content_parts_are_joined() {
        let mut b = base();
        b["frobnicate"] = json!(true);
        b["messages"] = json!([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]);
        let r = chat_request(&b, &limits()).unwrap();
        assert_eq!(r.messages[0].content, "ab");
    }
}
