//! `attune bench`: prefill and decode throughput of the serving path at several
//! batch sizes, next to candle-transformers' stock `quantized_llama` on the same
//! weights (requantized to Q8_0 the same way) measured in the same run.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use attune_config::Config;
use attune_models::{KvCache, Llama, LoadedModel, LogitsFor};
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor, D};
use candle_transformers::models::quantized_llama::ModelWeights;

use crate::cli::BenchArgs;

/// Throughput of one configuration.
#[derive(Debug, Clone, Copy, Default)]
struct Rates {
    prefill_tok_s: f64,
    decode_tok_s: f64,
    decode_step_ms: f64,
}

impl Rates {
    /// From the seconds a batched prefill and `steps` decode steps took.
    fn measured(batch: usize, prompt: usize, steps: usize, prefill: f64, decode: f64) -> Self {
        Self {
            prefill_tok_s: (batch * prompt) as f64 / prefill,
            decode_tok_s: (batch * steps) as f64 / decode,
            decode_step_ms: decode * 1e3 / steps as f64,
        }
    }
}

/// A deterministic prompt of exactly `n` tokens.
fn prompt_tokens(loaded: &LoadedModel, n: usize) -> Result<Vec<u32>> {
    let text =
        "The history of the printing press begins in the fifteenth century, when movable type \
                changed how books were made, sold and read across Europe. ";
    let unit = loaded.tokenizer.encode(text)?;
    Ok(unit.iter().copied().cycle().take(n).collect())
}

fn argmax_rows(logits: &Tensor) -> Result<Vec<u32>> {
    Ok(logits.argmax(D::Minus1)?.to_vec1::<u32>()?)
}

fn bench_attune(model: &Llama, prompt: &[u32], batch: usize, steps: usize) -> Result<Rates> {
    let mut caches: Vec<KvCache> = (0..batch).map(|_| model.new_cache()).collect();
    let prompts: Vec<&[u32]> = (0..batch).map(|_| prompt).collect();
    let t = Instant::now();
    let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
    let logits = model.forward(&prompts, &mut refs, LogitsFor::Last)?;
    let mut next = argmax_rows(&logits)?;
    let prefill = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for _ in 0..steps {
        let toks: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
        let tok_refs: Vec<&[u32]> = toks.iter().map(|t| t.as_slice()).collect();
        let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
        let logits = model.forward(&tok_refs, &mut refs, LogitsFor::Last)?;
        next = argmax_rows(&logits)?;
    }
    let decode = t.elapsed().as_secs_f64();
    Ok(Rates::measured(batch, prompt.len(), steps, prefill, decode))
}

/// Writes the GGUF with Q4_1/Q5_x tensors requantized to Q8_0, as attune's loader
/// does, so the stock model runs the same weight types.
fn requantized_copy(src: &std::path::Path, dst: &std::path::Path) -> Result<()> {
    let mut reader = std::fs::File::open(src)?;
    let content = gguf_file::Content::read(&mut reader)?;
    let mut tensors = Vec::new();
    for name in content.tensor_infos.keys() {
        let t = content.tensor(&mut reader, name, &Device::Cpu)?;
        let t = match t.dtype() {
            GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1 => {
                QTensor::quantize(&t.dequantize(&Device::Cpu)?, GgmlDType::Q8_0)?
            }
            _ => t,
        };
        tensors.push((name.clone(), t));
    }
    let metadata: Vec<(&str, &gguf_file::Value)> = content
        .metadata
        .iter()
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut out = std::io::BufWriter::new(std::fs::File::create(dst)?);
    gguf_file::write(&mut out, &metadata, &tensor_refs)?;
    Ok(())
}

fn bench_stock(
    path: &std::path::Path,
    prompt: &[u32],
    batch: usize,
    steps: usize,
) -> Result<Rates> {
    let mut reader = std::fs::File::open(path)?;
    let content = gguf_file::Content::read(&mut reader)?;
    let mut model = ModelWeights::from_gguf(content, &mut reader, &Device::Cpu)?;
    let ids: Vec<u32> = (0..batch).flat_map(|_| prompt.iter().copied()).collect();
    let input = Tensor::from_vec(ids, (batch, prompt.len()), &Device::Cpu)?;
    let t = Instant::now();
    let mut next = match model.forward(&input, 0) {
        Ok(logits) => argmax_rows(&logits)?,
        // candle 0.11.1's quantized_llama fails at batch > 1 when it picks the last
        // position (a non-contiguous input to the output matmul) — after every
        // layer has run and filled its KV cache. The cost is measured all the
        // same; decoding continues from the filled cache.
        Err(e) if batch > 1 && e.to_string().contains("not contiguous") => {
            vec![prompt[prompt.len() - 1]; batch]
        }
        Err(e) => return Err(e.into()),
    };
    let prefill = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for step in 0..steps {
        let input = Tensor::from_vec(next.clone(), (batch, 1), &Device::Cpu)?;
        let logits = model.forward(&input, prompt.len() + step)?;
        next = argmax_rows(&logits)?;
    }
    let decode = t.elapsed().as_secs_f64();
    Ok(Rates::measured(batch, prompt.len(), steps, prefill, decode))
}

fn best(runs: impl Iterator<Item = Result<Rates>>) -> Result<Rates> {
    let mut best = Rates::default();
    for r in runs {
        let r = r?;
        best.prefill_tok_s = best.prefill_tok_s.max(r.prefill_tok_s);
        if r.decode_tok_s > best.decode_tok_s {
            best.decode_tok_s = r.decode_tok_s;
            best.decode_step_ms = r.decode_step_ms;
        }
    }
    Ok(best)
}

fn cells(r: Option<Rates>) -> [String; 3] {
    match r {
        Some(r) => [
            format!("{:.1}", r.prefill_tok_s),
            format!("{:.1}", r.decode_tok_s),
            format!("{:.1}", r.decode_step_ms),
        ],
        None => [String::from("-"), String::from("-"), String::from("-")],
    }
}

pub fn run(cfg: &Config, args: BenchArgs) -> Result<()> {
    if args.batch.is_empty()
        || args.batch.contains(&0)
        || args.prompt_tokens == 0
        || args.decode_tokens == 0
    {
        bail!("--batch sizes, --prompt-tokens and --decode-tokens must be positive");
    }
    let pool = super::thread_pool(cfg)?;
    let loaded = super::load_model(cfg)?;
    let prompt = prompt_tokens(&loaded, args.prompt_tokens)?;
    let path = cfg.model.resolved_path();
    // The same checkpoint in the other quantized layout, when that is meaningful.
    let other = match cfg.model.weights.as_str() {
        "quantized" | "quantized-vnni" if loaded.path.is_file() => {
            let mut c = cfg.clone();
            c.model.weights = if c.model.weights == "quantized" {
                "quantized-vnni"
            } else {
                "quantized"
            }
            .into();
            Some((c.model.weights.clone(), super::load_model(&c)?))
        }
        _ => None,
    };
    let stock = if args.baseline && loaded.path.is_file() {
        let dir = tempfile::tempdir()?;
        let copy = dir.path().join("q8_0.gguf");
        requantized_copy(&path, &copy).context("preparing the stock quantized_llama baseline")?;
        Some((dir, copy))
    } else {
        None
    };
    println!(
        "model {}, {} threads, prompt {} tokens, {} decode steps, best of {}",
        path.display(),
        cfg.runtime.effective_threads(),
        args.prompt_tokens,
        args.decode_tokens,
        args.repeat
    );
    println!(
        "{:<26} {:>5} | {:>13} {:>12} {:>8} | {:>9} {:>9}",
        "engine", "batch", "prefill tok/s", "decode tok/s", "ms/step", "prefill×", "decode×"
    );
    for &b in &args.batch {
        let measure = |m: &Llama| {
            pool.install(|| {
                best((0..args.repeat).map(|_| bench_attune(m, &prompt, b, args.decode_tokens)))
            })
        };
        let mut rows: Vec<(String, Rates)> = vec![(
            format!("attune {}", cfg.model.weights),
            measure(&loaded.model)?,
        )];
        if let Some((name, m)) = &other {
            rows.push((format!("attune {name}"), measure(&m.model)?));
        }
        let theirs = match &stock {
            Some((_, p)) => Some(pool.install(|| {
                best((0..args.repeat).map(|_| bench_stock(p, &prompt, b, args.decode_tokens)))
            })?),
            None => None,
        };
        for (name, r) in &rows {
            let [p, d, ms] = cells(Some(*r));
            let (rp, rd) = match theirs {
                Some(t) => (
                    format!("{:.2}", r.prefill_tok_s / t.prefill_tok_s),
                    format!("{:.2}", r.decode_tok_s / t.decode_tok_s),
                ),
                None => ("-".into(), "-".into()),
            };
            println!("{name:<26} {b:>5} | {p:>13} {d:>12} {ms:>8} | {rp:>9} {rd:>9}");
        }
        if theirs.is_some() {
            let [p, d, ms] = cells(theirs);
            println!(
                "{:<26} {b:>5} | {p:>13} {d:>12} {ms:>8} | {:>9} {:>9}",
                "candle quantized_llama", "1.00", "1.00"
            );
        }
    }
    Ok(())
}
