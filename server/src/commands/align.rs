//! `attune align` (offline LoRA training on preference data) and `attune eval`
//! (preference accuracy of the model, with or without an adapter). Both load
//! the model's weights as f32 (quantized GGUF weights are dequantized).

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use attune_aligner::data::{read_examples, Template};
use attune_aligner::eval::{evaluate, generation_metrics, EvalReport, GenerationSettings};
use attune_aligner::loss::ClhaParams;
use attune_aligner::train::{Objective, Schedule, Scored, StepReport, TrainConfig, Trainer};
use attune_config::Config;
use attune_models::{LoadedModel, LoraAdapter, LoraConfig, LoraInit, LoraTarget, PromptResponse};
use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::progress::Progress;
use crate::cli::{AlignArgs, DataArgs, EvalArgs, HeldOutArgs, LoraArgs, MergeArgs, OptimArgs};

pub(super) fn bar(len: usize, what: &str) -> Progress {
    Progress::new(len, what)
}

/// The model with dense f32 weights, as training and scoring need.
pub(super) fn load_f32(mut cfg: Config) -> Result<LoadedModel> {
    cfg.model.weights = "f32".into();
    let start = Instant::now();
    let model = super::load_model(&cfg)?;
    tracing::info!(model = %model.name, seconds = start.elapsed().as_secs_f64(), "model loaded (f32)");
    Ok(model)
}

/// Reads and tokenizes the examples `args` selects.
pub(super) fn load_data(
    model: &LoadedModel,
    args: &DataArgs,
    what: &str,
) -> Result<Vec<Vec<PromptResponse>>> {
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
    let model_cfg = cfg.clone();
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
    let what = if lora.is_some() {
        "with adapter"
    } else {
        "base model"
    };
    print_report(&report, what);
    println!(
        "scored {} examples in {:.1}s",
        data.len(),
        start.elapsed().as_secs_f64()
    );
    if let Some(dir) = &args.reward_model {
        let rm = super::reward::load_rm(&model_cfg, dir)?;
        let start = Instant::now();
        let pb = bar(data.len(), "generate");
        let g = generation_metrics(
            &model,
            lora.as_ref(),
            &rm,
            &data,
            GenerationSettings {
                max_new_tokens: args.max_new_tokens,
                batch: args.gen_batch,
            },
            |done| pb.set_position(done.min(data.len()) as u64),
        )?;
        pb.finish_and_clear();
        println!(
            "{what}: greedy generations on {} prompts: mean reward {:+.4}, BLEU {:.2} against the preferred response ({:.1}s)",
            g.prompts,
            g.mean_reward,
            g.bleu,
            start.elapsed().as_secs_f64()
        );
    }
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

/// Optimizer settings from the flags.
pub(super) fn train_config(
    objective: Objective,
    args: &OptimArgs,
    block_size: usize,
    total_steps: usize,
) -> Result<TrainConfig> {
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
        block_size,
    })
}

/// The adapter's shape from the flags.
pub(super) fn lora_config(args: &LoraArgs) -> Result<LoraConfig> {
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

/// The held-out examples, tokenized like the training data.
pub(super) fn held_out(
    model: &LoadedModel,
    data: &DataArgs,
    args: &HeldOutArgs,
) -> Result<Option<Vec<Vec<PromptResponse>>>> {
    let Some(path) = &args.eval_data else {
        return Ok(None);
    };
    let eval_args = DataArgs {
        data: path.clone(),
        skip: args.eval_skip,
        limit: args.eval_limit,
        block_size: args.eval_block_size,
        ..data.clone()
    };
    Ok(Some(load_data(model, &eval_args, "eval")?))
}

/// Draws micro-batches from a data set in shuffled passes (seeded).
pub(super) struct Sampler {
    rng: rand::rngs::StdRng,
    order: Vec<usize>,
    len: usize,
}

impl Sampler {
    pub(super) fn new(len: usize, seed: u64) -> Self {
        Self {
            rng: rand::rngs::StdRng::seed_from_u64(seed),
            order: Vec::new(),
            len,
        }
    }

    /// `accumulation` micro-batches of `batch` indices each.
    pub(super) fn draw(&mut self, accumulation: usize, batch: usize) -> Vec<Vec<usize>> {
        (0..accumulation)
            .map(|_| {
                (0..batch)
                    .map(|_| {
                        if self.order.is_empty() {
                            self.order = (0..self.len).collect();
                            self.order.shuffle(&mut self.rng);
                        }
                        self.order.pop().expect("refilled")
                    })
                    .collect()
            })
            .collect()
    }
}

/// Appends one step's report to the training log, flushed so that a long
/// run can be followed (`tail -f`).
pub(super) fn log_step(log: &mut impl Write, report: &StepReport) -> Result<()> {
    writeln!(
        log,
        "{}",
        serde_json::json!({
            "step": report.step, "loss": report.loss, "ranking": report.ranking, "sft": report.sft,
            "pairs": report.pairs, "skipped": report.skipped, "lr": report.lr,
            "grad_norm": report.grad_norm, "seconds": report.seconds,
        })
    )?;
    log.flush()?;
    Ok(())
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
    let objective = match args.objective.as_str() {
        "clha" => Objective::Clha(ClhaParams {
            tau: args.tau,
            mu: args.mu,
            sft_weight: args.sft_weight,
        }),
        "dpo" => Objective::Dpo { beta: args.beta },
        other => bail!("--objective: unknown objective `{other}`: expected `clha` or `dpo`"),
    };
    let lcfg = lora_config(&args.lora)?;
    let model = load_f32(cfg.clone())?;
    let data = load_data(&model, &args.data, "train")?;
    let eval_data = held_out(&model, &args.data, &args.held_out)?;
    let o = &args.optim;
    let steps = o
        .steps
        .unwrap_or(data.len().div_ceil(o.batch * o.accumulation));
    let tcfg = train_config(objective, o, args.data.block_size, steps)?;
    let scored: Vec<Scored> = match &args.reward_model {
        Some(dir) => super::reward::rescore_all(&cfg, dir, data, &args.data)?,
        None => {
            tracing::info!("rescoring off: the human order is used and every pair counts");
            data.into_iter()
                .map(|candidates| Scored {
                    rewards: tcfg.objective.rank_rewards(candidates.len()),
                    candidates,
                })
                .collect()
        }
    };
    let lora = LoraAdapter::new(
        lcfg,
        model.model.config(),
        LoraInit::Peft,
        o.seed,
        model.model.device(),
    )?;
    let mut trainer = Trainer::new(&model.model, lora, tcfg)?;
    std::fs::create_dir_all(&args.out).with_context(|| format!("--out {}", args.out.display()))?;
    let mut log = std::io::BufWriter::new(std::fs::File::create(args.out.join("train_log.jsonl"))?);
    let h = &args.held_out;
    let mut best: Option<f64> = None;
    if let Some(ed) = &eval_data {
        let r = run_eval(&model, None, ed, h.eval_block_size, 4096)?;
        print_report(&r, "before training");
        best = Some(r.accuracy());
    }
    let mut sampler = Sampler::new(scored.len(), o.seed);
    let pb = bar(steps, "align");
    let start = Instant::now();
    for step in 0..steps {
        let micro: Vec<Vec<Scored>> = sampler
            .draw(o.accumulation, o.batch)
            .into_iter()
            .map(|ids| ids.into_iter().map(|i| scored[i].clone()).collect())
            .collect();
        let refs: Vec<&[Scored]> = micro.iter().map(Vec::as_slice).collect();
        let report = trainer.step(&refs)?;
        pb.set_message(format!(
            "loss {:.3} (rank {:.3} sft {:.3}) lr {:.2e}",
            report.loss, report.ranking, report.sft, report.lr
        ));
        pb.inc(1);
        log_step(&mut log, &report)?;
        let last = step + 1 == steps;
        if let Some(ed) = &eval_data {
            if (step + 1) % h.eval_every.max(1) == 0 || last {
                let r = run_eval(&model, Some(trainer.lora()), ed, h.eval_block_size, 4096)?;
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
        println!("best held-out preference accuracy {b:.4} (in OUT/best when training improved on the base model)");
    }
    Ok(())
}

pub fn merge(cfg: Config, args: MergeArgs) -> Result<()> {
    let model = load_f32(cfg)?;
    let lora = LoraAdapter::load_peft(&args.adapter, model.model.config(), model.model.device())
        .with_context(|| format!("--adapter {}", args.adapter.display()))?;
    let tensors = model.model.hf_tensors(Some(&lora))?.into_iter().collect();
    model.write_hf(&args.out, &tensors, &[])?;
    println!(
        "merged {} into {}",
        args.adapter.display(),
        args.out.display()
    );
    Ok(())
}
