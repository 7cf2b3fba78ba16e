//! `attune bench-train`: wall time and peak memory of one CLHA training step
//! (forward, backward, AdamW) on the model with a rank-8 LoRA on q/k/v/o, next
//! to the same step with candle's plain matmul backward for frozen weights,
//! measured in the same run.

use std::time::Instant;

use anyhow::{bail, Result};
use attune_aligner::train::{Scored, TrainConfig, Trainer};
use attune_config::Config;
use attune_models::{LoadedModel, LoraAdapter, LoraConfig, LoraInit, PromptResponse};

use crate::cli::BenchTrainArgs;

/// Resets the kernel's peak-RSS mark of this process (Linux).
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn rss_mib(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

struct Measured {
    median_s: f64,
    peak_mib: f64,
    loss: f64,
}

fn measure(model: &LoadedModel, examples: &[Scored], steps: usize) -> Result<Measured> {
    let lora = LoraAdapter::new(
        LoraConfig::default(),
        model.model.config(),
        LoraInit::Peft,
        0,
        model.model.device(),
    )?;
    let cfg = TrainConfig {
        block_size: usize::MAX,
        total_steps: steps + 1,
        warmup_steps: 0,
        ..TrainConfig::default()
    };
    let mut trainer = Trainer::new(&model.model, lora, cfg)?;
    reset_peak_rss();
    let mut times = Vec::new();
    let mut loss = 0.0;
    for i in 0..=steps {
        let t = Instant::now();
        let r = trainer.step(&[examples])?;
        if i > 0 {
            times.push(t.elapsed().as_secs_f64());
        }
        loss = r.loss;
    }
    times.sort_by(f64::total_cmp);
    Ok(Measured {
        median_s: times[times.len() / 2],
        peak_mib: rss_mib("VmHWM:"),
        loss,
    })
}

/// Runs one variant in a fresh child process; answers (seconds, MiB, loss).
fn in_child(args: &BenchTrainArgs, variant: &str) -> Result<(f64, f64, f64)> {
    let exe = std::env::current_exe()?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(std::env::args_os().skip(1))
        .args(["--variant", variant]);
    let out = cmd.stderr(std::process::Stdio::inherit()).output()?;
    if !out.status.success() {
        bail!("the `{variant}` measurement failed ({})", out.status);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .ok_or_else(|| anyhow::anyhow!("the `{variant}` measurement printed no result"))?;
    let v: Vec<f64> = line
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    let _ = args;
    match v.as_slice() {
        [s, m, l] => Ok((*s, *m, *l)),
        _ => bail!("unreadable result `{line}`"),
    }
}

fn examples(model: &LoadedModel, args: &BenchTrainArgs) -> Result<Vec<Scored>> {
    let text =
        "The history of the printing press begins in the fifteenth century, when movable type \
                changed how books were made, sold and read across Europe. ";
    let unit = model.tokenizer.encode(text)?;
    let take = |skip: usize, n: usize| {
        unit.iter()
            .copied()
            .cycle()
            .skip(skip)
            .take(n)
            .collect::<Vec<u32>>()
    };
    let half = args.tokens / 2;
    Ok((0..args.batch / 2)
        .map(|i| Scored {
            candidates: (0..2)
                .map(|k| PromptResponse {
                    prompt: take(i * 7, half),
                    response: take(i * 7 + 3 + k * 11, args.tokens - half),
                })
                .collect(),
            rewards: vec![4.0, 0.0],
        })
        .collect())
}

pub fn run(mut cfg: Config, args: BenchTrainArgs) -> Result<()> {
    if args.batch < 2 || !args.batch.is_multiple_of(2) || args.tokens < 4 {
        bail!("--batch must be an even number of sequences (pairs of candidates) and --tokens at least 4");
    }
    if let Some(variant) = &args.variant {
        cfg.model.weights = "f32".into();
        let mut model = super::load_model(&cfg)?;
        model.model.set_full_frozen_backward(variant == "plain");
        let m = measure(&model, &examples(&model, &args)?, args.steps)?;
        println!("RESULT {} {} {}", m.median_s, m.peak_mib, m.loss);
        return Ok(());
    }
    println!(
        "CLHA step: {} sequences × {} tokens, LoRA rank 8 on q/k/v/o, AdamW, {} threads; \
         peak RSS is the whole process (model included), each variant in a fresh process",
        args.batch,
        args.tokens,
        cfg.runtime.effective_threads()
    );
    let (s, m, l) = in_child(&args, "input-only")?;
    println!("attune (input-only backward for frozen weights): {s:>6.2} s/step   peak RSS {m:>6.0} MiB   loss {l:.4}");
    if args.baseline {
        let (ps, pm, pl) = in_child(&args, "plain")?;
        println!("candle plain matmul backward:                    {ps:>6.2} s/step   peak RSS {pm:>6.0} MiB   loss {pl:.4}");
        println!(
            "ratio: {:.2}x the speed, {:.2}x less peak memory",
            ps / s,
            pm / m
        );
    }
    Ok(())
}
