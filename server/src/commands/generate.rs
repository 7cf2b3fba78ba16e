//! `attune generate`: one completion, printed as it is produced, then token
//! counts and prefill/decode speed.

use std::io::{Read, Write};

use anyhow::{bail, Context, Result};
use attune_config::Config;
use attune_models::{ChatMessage, SamplingParams, StopConditions};

use crate::cli::GenerateArgs;

fn read_messages(path: &std::path::Path) -> Result<Vec<ChatMessage>> {
    let text = if path.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s)?;
        s
    } else {
        std::fs::read_to_string(path).with_context(|| format!("--messages {}", path.display()))?
    };
    let messages: Vec<ChatMessage> = serde_json::from_str(&text).with_context(|| {
        format!(
            "--messages {}: expected [{{\"role\": ..., \"content\": ...}}]",
            path.display()
        )
    })?;
    if messages.is_empty() {
        bail!("--messages {}: no messages", path.display());
    }
    Ok(messages)
}

pub fn run(cfg: &Config, args: GenerateArgs) -> Result<()> {
    if args.max_tokens == 0 {
        bail!("--max-tokens must be at least 1");
    }
    let params = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        min_p: args.min_p,
        repetition_penalty: args.repetition_penalty,
        presence_penalty: args.presence_penalty,
        frequency_penalty: args.frequency_penalty,
        seed: args.seed,
        logprobs: args.logprobs,
    };
    // Field names become the flags that set them: `top_p` → `--top-p`.
    params.validate().map_err(|e| {
        let flag = if e.field == "top_logprobs" {
            "logprobs".into()
        } else {
            e.field.replace('_', "-")
        };
        anyhow::anyhow!("--{flag} {}", e.message)
    })?;
    let loaded = super::load_model(cfg)?;
    let text = match (&args.messages, &args.prompt) {
        (Some(path), _) => loaded.template.render(&read_messages(path)?, true)?,
        (None, Some(p)) if args.raw => p.clone(),
        (None, Some(p)) => {
            let mut messages = Vec::new();
            if let Some(s) = &args.system {
                messages.push(ChatMessage::new("system", s.clone()));
            }
            messages.push(ChatMessage::new("user", p.clone()));
            loaded.template.render(&messages, true)?
        }
        (None, None) => bail!("give --prompt TEXT or --messages FILE"),
    };
    let prompt = loaded.tokenizer.encode(&text)?;
    let context = loaded.model.max_context();
    if prompt.len() >= context {
        bail!(
            "the prompt has {} tokens; the model's context is {context}",
            prompt.len()
        );
    }
    let stops = StopConditions {
        max_tokens: args.max_tokens,
        stop: args.stop.clone(),
        eos_ids: loaded.tokenizer.eos_ids.clone(),
        context,
    };
    let pool = super::thread_pool(cfg)?;
    let stream = !args.json;
    let out = pool.install(|| {
        attune_models::generate(
            &loaded.model,
            &loaded.tokenizer,
            prompt,
            params,
            stops,
            |_, step| {
                if stream {
                    print!("{}", step.text);
                    let _ = std::io::stdout().flush();
                }
            },
        )
    })?;
    if args.json {
        let logprobs: Vec<_> = out
            .logprobs
            .iter()
            .map(|lp| {
                serde_json::json!({
                    "token": loaded.tokenizer.decode(&[lp.token], false).unwrap_or_default(),
                    "id": lp.token,
                    "logprob": lp.logprob,
                    "top": lp.top.iter().map(|(id, l)| serde_json::json!({
                        "token": loaded.tokenizer.decode(&[*id], false).unwrap_or_default(), "id": id, "logprob": l
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "text": out.text,
                "finish_reason": out.finish.as_str(),
                "prompt_tokens": out.prompt_tokens,
                "completion_tokens": out.tokens.len(),
                "prefill_tok_per_s": out.prefill_tok_per_sec(),
                "decode_tok_per_s": out.decode_tok_per_sec(),
                "logprobs": if args.logprobs.is_some() { Some(logprobs) } else { None },
            }))?
        );
        return Ok(());
    }
    println!();
    if args.logprobs.is_some() {
        eprintln!("--- logprobs ---");
        for lp in &out.logprobs {
            let alts: Vec<String> = lp
                .top
                .iter()
                .map(|(id, l)| {
                    format!(
                        "{:?} {l:.3}",
                        loaded.tokenizer.decode(&[*id], false).unwrap_or_default()
                    )
                })
                .collect();
            eprintln!(
                "{:?} {:.4}  [{}]",
                loaded
                    .tokenizer
                    .decode(&[lp.token], false)
                    .unwrap_or_default(),
                lp.logprob,
                alts.join(", ")
            );
        }
    }
    eprintln!(
        "--- {} prompt tokens, {} completion tokens (finish: {}); prefill {:.1} tok/s, decode {:.1} tok/s",
        out.prompt_tokens,
        out.tokens.len(),
        out.finish.as_str(),
        out.prefill_tok_per_sec(),
        out.decode_tok_per_sec()
    );
    Ok(())
}
