//! `attune align` (offline LoRA training on preference data) and `attune eval`
//! (preference accuracy of the model, with or without an adapter). Both load
//! the model's weights as f32 (quantized GGUF weights are dequantized).

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use attune_aligner::data::{read_examples, Template};
use attune_aligner::eval::{evaluate, EvalReport};
use attune_aligner::loss::ClhaParams;
use attune_aligner::train::{Objective, Schedule, Scored, TrainConfig, Trainer};
use attune_config::Config;
use attune_models::{LoadedModel, LoraAdapter, LoraConfig, LoraInit, LoraTarget, PromptResponse};
use indicatif::{ProgressBar, ProgressStyle};
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::cli::{AlignArgs, DataArgs, EvalArgs};

fn bar(len: usize, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len as u64);
    pb.set_style(
        ProgressStyle::with_template(
            "{prefix:>8} [{bar:30}] {pos}/{len} {elapsed_precise} (eta {eta}) {msg}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    pb.set_prefix(what.to_string());
    pb.enable_steady_tick(Duration::from_millis(500));
    pb
}

/// The model with dense f32 weights, as training and scoring need.
fn load_f32(mut cfg: Config) -> Result<LoadedModel> {
    cfg.model.weights = "f32".into();
    let start = Instant::now();
    let model = super::load_model(&cfg)?;
    tracing::info!(model = %model.name, seconds = start.elapsed().as_secs_f64(), "model loaded (f32)");
    Ok(model)
}

/// Reads and tokenizes the examples `args` selects.
fn load_data(model: &LoadedModel, args: &DataArgs, what: &str) -> Result<Vec<Vec<PromptResponse>>> {
    let template: Template = args
        .template
        .parse()
        .map_err(|e: String| anyhow::anyhow!("--template: {e}"))?;
    let (examples, rejected) =
        read_examples(&args.data, args.skip, args.limit.unwrap_or(usize::MAX))
            .with_context(|| format!("--data {}", args.data.display()))?;
    for (line, reason) in &rejected {
        tracing::warn!(line, reason = %reason, "{what}: line skipped");
    }
    let mut out = Vec::with_capacity(examples.len());
    for e in &examples {
        out.push(e.tokenize(model, template)?);
    }
    tracing::info!(
        file = %args.data.display(),
        examples = out.len(),
        skipped_lines = rejected.len(),
        template = %args.template,
        "{what} data"
    );
    if out.is_empty() {
        bail!(
            "--data {}: no preference examples in the selected lines",
            args.data.display()
        );
    }
    Ok(out)
}

fn run_eval(
    model: &LoadedModel,
    lora: Option<&LoraAdapter>,
    data: &[Vec<PromptResponse>],
    block_size: usize,
    batch_tokens: usize,
) -> Result<EvalReport> {
    let pb = bar(data.len(), "eval");
    let report = evaluate(
        &model.model,
        lora,
        data,
        block_size,
        batch_tokens,
        |done, _| pb.set_position(done as u64),
    )?;
    pb.finish_and_clear();
    Ok(report)
}

fn print_report(report: &EvalReport, what: &str) {
    println!(
        "{what}: preference accuracy {:.4} ({}/{} pairs), mean margin {:+.4}{}",
        report.accuracy(),
        report.correct,
        report.pairs,
        report.mean_margin(),
        if report.skipped > 0 {
            format!(
                ", {} examples skipped (empty response after truncation)",
                report.skipped
            )
        } else {
            String::new()
        }
    );
}

pub fn eval(cfg: Config, args: EvalArgs) -> Result<()> {
    let model = load_f32(cfg)?;
    let data = load_data(&model, &args.data, "eval")?;
    let lora = match &args.adapter {
        Some(dir) => Some(
            LoraAdapter::load_peft(dir, model.model.config(), model.model.device())
                .with_context(|| format!("--adapter {}", dir.display()))?,
        ),
        None => None,
    };
    let start = Instant::now();
    let report = run_eval(
        &model,
        lora.as_ref(),
        &data,
        args.data.block_size,
        args.batch_tokens,
    )?;
    print_report(
        &report,
        if lora.is_some() {
            "with adapter"
        } else {
            "base model"
        },
    );
    println!(
        "scored {} examples in {:.1}s",
        data.len(),
        start.elapsed().as_secs_f64()
    );
    if let Some(path) = &args.per_pair {
        let mut out = std::io::BufWriter::new(
            std::fs::File::create(path)
                .with_context(|| format!("--per-pair {}", path.display()))?,
        );
        for pairs in &report.per_example {
            for p in pairs {
                serde_json::to_writer(&mut out, p)?;
                out.write_all(b"\n")?;
            }
        }
        out.flush()?;
    }
    Ok(())
}

fn train_config(args: &AlignArgs, total_steps: usize) -> Result<TrainConfig> {
    let objective = match args.objective.as_str() {
        "clha" => Objective::Clha(ClhaParams {
            tau: args.tau,
            mu: args.mu,
            sft_weight: args.sft_weight,
        }),
        "dpo" => Objective::Dpo { beta: args.beta },
        other => bail!("--objective: unknown objective `{other}`: expected `clha` or `dpo`"),
    };
    let schedule: Schedule = args
        .schedule
        .parse()
        .map_err(|e: String| anyhow::anyhow!("--schedule: {e}"))?;
    if !(args.lr > 0.0 && args.lr.is_finite()) {
        bail!("--lr must be a positive number, got {}", args.lr);
    }
    if args.batch == 0 || args.accumulation == 0 {
        bail!("--batch and --accumulation must be at least 1");
    }
    Ok(TrainConfig {
        objective,
        lr: args.lr,
        weight_decay: args.weight_decay,
        warmup_steps: args.warmup,
        schedule,
        total_steps,
        max_grad_norm: args.max_grad_norm,
        block_size: args.data.block_size,
    })
}

fn lora_config(args: &AlignArgs) -> Result<LoraConfig> {
    let targets = args
        .targets
        .iter()
        .map(|t| {
            LoraTarget::parse(t.trim()).ok_or_else(|| {
                anyhow::anyhow!("--targets: unknown projection `{t}` (q, k, v, o, gate, up, down)")
            })
        })
        .collect::<Result<Vec<_>>>()?;
    if args.rank == 0 {
        bail!("--rank must be at least 1");
    }
    Ok(LoraConfig {
        rank: args.rank,
        alpha: args.alpha,
        dropout: args.dropout,
        targets,
    })
}

/// Peak resident memory of this process, from `/proc/self/status`.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

pub fn align(cfg: Config, args: AlignArgs) -> Result<()> {
    let model = load_f32(cfg)?;
    let data = load_data(&model, &args.data, "train")?;
    let eval_data = match &args.eval_data {
        Some(path) => {
            let eval_args = DataArgs {
                data: path.clone(),
                skip: args.eval_skip,
                limit: args.eval_limit,
                block_size: args.eval_block_size,
                ..args.data.clone()
            };
            Some(load_data(&model, &eval_args, "eval")?)
        }
        None => None,
    };
    let per_step = args.batch * args.accumulation;
    let steps = args.steps.unwrap_or(data.len().div_ceil(per_step));
    let tcfg = train_config(&args, steps)?;
    let lcfg = lora_config(&args)?;
    // No reward model yet: the human order counts, every pair in full.
    let scored: Vec<Scored> = data
        .into_iter()
        .map(|candidates| Scored {
            rewards: tcfg.objective.rank_rewards(candidates.len()),
            candidates,
        })
        .collect();
    let lora = LoraAdapter::new(
        lcfg,
        model.model.config(),
        LoraInit::Peft,
        args.seed,
        model.model.device(),
    )?;
    let mut trainer = Trainer::new(&model.model, lora, tcfg.clone())?;
    std::fs::create_dir_all(&args.out).with_context(|| format!("--out {}", args.out.display()))?;
    let mut log = std::io::BufWriter::new(std::fs::File::create(args.out.join("train_log.jsonl"))?);
    let mut best: Option<f64> = None;
    if let Some(ed) = &eval_data {
        let r = run_eval(&model, None, ed, args.eval_block_size, 4096)?;
        print_report(&r, "before training");
        best = Some(r.accuracy());
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed);
    let mut order: Vec<usize> = Vec::new();
    let pb = bar(steps, "align");
    let start = Instant::now();
    for step in 0..steps {
        let mut micro: Vec<Vec<Scored>> = Vec::with_capacity(args.accumulation);
        for _ in 0..args.accumulation {
            let mut mb = Vec::with_capacity(args.batch);
            for _ in 0..args.batch {
                if order.is_empty() {
                    order = (0..scored.len()).collect();
                    order.shuffle(&mut rng);
                }
                mb.push(scored[order.pop().expect("refilled")].clone());
            }
            micro.push(mb);
        }
        let refs: Vec<&[Scored]> = micro.iter().map(Vec::as_slice).collect();
        let report = trainer.step(&refs)?;
        pb.set_message(format!(
            "loss {:.3} (rank {:.3} sft {:.3}) lr {:.2e}",
            report.loss, report.ranking, report.sft, report.lr
        ));
        pb.inc(1);
        writeln!(
            log,
            "{}",
            serde_json::json!({
                "step": report.step, "loss": report.loss, "ranking": report.ranking, "sft": report.sft,
                "pairs": report.pairs, "skipped": report.skipped, "lr": report.lr,
                "grad_norm": report.grad_norm, "seconds": report.seconds,
            })
        )?;
        tracing::debug!(?report, "step");
        let last = step + 1 == steps;
        if let Some(ed) = &eval_data {
            if (step + 1) % args.eval_every.max(1) == 0 || last {
                let r = run_eval(&model, Some(trainer.lora()), ed, args.eval_block_size, 4096)?;
                pb.suspend(|| print_report(&r, &format!("step {}", step + 1)));
                if best.is_none_or(|b| r.accuracy() > b) {
                    best = Some(r.accuracy());
                    trainer
                        .lora()
                        .save_peft(&args.out.join("best"), &model.name)?;
                }
            }
        }
    }
    pb.finish();
    log.flush()?;
    trainer
        .lora()
        .save_peft(&args.out.join("final"), &model.name)?;
    println!(
        "{} steps in {:.1}s ({:.2}s/step), peak RSS {:.0} MiB; adapter in {}",
        steps,
        start.elapsed().as_secs_f64(),
        start.elapsed().as_secs_f64() / steps.max(1) as f64,
        peak_rss_mib().unwrap_or(f64::NAN),
        Path::new(&args.out).join("final").display()
    );
    if let Some(b) = best {
        println!("best held-out preference accuracy {b:.4} (OUT/best holds it when training improved on the base model)");
    }
    Ok(())
}
