//! `attune train-rm` (a reward model from preference data, Bradley–Terry),
//! `attune score` (its rewards for each response of each line), and the
//! rescoring step of `attune align --reward-model`.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use attune_aligner::loss::ClhaParams;
use attune_aligner::reward::{rescore, score as score_all, RewardTrainer};
use attune_aligner::train::{Objective, Scored};
use attune_config::Config;
use attune_models::{PromptResponse, RewardModel};

use super::align::{
    bar, held_out, load_data, load_f32, log_step, lora_config, peak_rss_mib, train_config, Sampler,
};
use crate::cli::{DataArgs, ScoreArgs, TrainRmArgs};

/// Sequences per reward-model forward when scoring.
const SCORE_BATCH: usize = 8;

pub(super) fn load_rm(cfg: &Config, dir: &Path) -> Result<RewardModel> {
    let device = super::device(cfg)?;
    let start = Instant::now();
    let rm = RewardModel::load(dir, &device)
        .with_context(|| format!("--reward-model {}", dir.display()))?;
    tracing::info!(dir = %dir.display(), seconds = start.elapsed().as_secs_f64(), "reward model loaded");
    Ok(rm)
}

/// Rewards with a progress bar.
fn rewards(
    rm: &RewardModel,
    data: &[Vec<PromptResponse>],
    block_size: usize,
) -> Result<Vec<Vec<f64>>> {
    let pb = bar(data.len(), "score");
    let r = score_all(rm, data, block_size, SCORE_BATCH, |done| {
        pb.set_position(done as u64)
    })?;
    pb.finish_and_clear();
    Ok(r)
}

/// Fraction of examples whose first (human-preferred) candidate gets the
/// highest reward.
fn accuracy(rewards: &[Vec<f64>]) -> f64 {
    let right = rewards
        .iter()
        .filter(|r| r.iter().skip(1).all(|&x| r[0] > x))
        .count();
    right as f64 / rewards.len().max(1) as f64
}

/// `align --reward-model`: scores every candidate and re-orders each example
/// by reward, best first.
pub fn rescore_all(
    cfg: &Config,
    dir: &Path,
    data: Vec<Vec<PromptResponse>>,
    args: &DataArgs,
) -> Result<Vec<Scored>> {
    let rm = load_rm(cfg, dir)?;
    let r = rewards(&rm, &data, args.block_size)?;
    tracing::info!(
        examples = data.len(),
        agreement = accuracy(&r),
        "rescored: fraction of examples where the reward model agrees with the human order"
    );
    Ok(data
        .into_iter()
        .zip(&r)
        .map(|(c, r)| rescore(c, r))
        .collect())
}

pub fn train_rm(cfg: Config, args: TrainRmArgs) -> Result<()> {
    let lcfg = lora_config(&args.lora)?;
    let base = load_f32(cfg)?;
    let data = load_data(&base, &args.data, "train")?;
    let eval_data = held_out(&base, &args.data, &args.held_out)?;
    let o = &args.optim;
    let steps = o
        .steps
        .unwrap_or(data.len().div_ceil(o.batch * o.accumulation));
    // The objective is not used by the reward trainer; the optimizer settings are.
    let tcfg = train_config(
        Objective::Clha(ClhaParams::default()),
        o,
        args.data.block_size,
        steps,
    )?;
    let rm = RewardModel::for_training(base, lcfg, o.seed)?;
    let mut trainer = RewardTrainer::new(rm, tcfg)?;
    std::fs::create_dir_all(&args.out).with_context(|| format!("--out {}", args.out.display()))?;
    let mut log = std::io::BufWriter::new(std::fs::File::create(args.out.join("train_log.jsonl"))?);
    let h = &args.held_out;
    let mut sampler = Sampler::new(data.len(), o.seed);
    let pb = bar(steps, "train-rm");
    let start = Instant::now();
    for step in 0..steps {
        let micro: Vec<Vec<Vec<PromptResponse>>> = sampler
            .draw(o.accumulation, o.batch)
            .into_iter()
            .map(|ids| ids.into_iter().map(|i| data[i].clone()).collect())
            .collect();
        let refs: Vec<&[Vec<PromptResponse>]> = micro.iter().map(Vec::as_slice).collect();
        let report = trainer.step(&refs)?;
        pb.set_message(format!("loss {:.4} lr {:.2e}", report.loss, report.lr));
        pb.inc(1);
        log_step(&mut log, &report)?;
        if let Some(ed) = &eval_data {
            if (step + 1) % h.eval_every.max(1) == 0 || step + 1 == steps {
                let r = rewards(trainer.model(), ed, h.eval_block_size)?;
                pb.suspend(|| {
                    println!(
                        "step {}: held-out reward accuracy {:.4} ({} examples)",
                        step + 1,
                        accuracy(&r),
                        r.len()
                    )
                });
            }
        }
    }
    pb.finish();
    log.flush()?;
    trainer.model().save_hf(&args.out)?;
    println!(
        "{steps} steps in {:.1}s, peak RSS {:.0} MiB; reward model in {}",
        start.elapsed().as_secs_f64(),
        peak_rss_mib().unwrap_or(f64::NAN),
        args.out.display()
    );
    Ok(())
}

pub fn score(cfg: Config, args: ScoreArgs) -> Result<()> {
    if args.batch == 0 {
        bail!("--batch must be at least 1");
    }
    let rm = load_rm(&cfg, &args.reward_model)?;
    let data = load_data(&rm.base, &args.data, "score")?;
    let pb = bar(data.len(), "score");
    let r = score_all(&rm, &data, args.data.block_size, args.batch, |done| {
        pb.set_position(done as u64)
    })?;
    pb.finish_and_clear();
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    for (i, rewards) in r.iter().enumerate() {
        writeln!(
            out,
            "{}",
            serde_json::json!({"example": i, "rewards": rewards})
        )?;
    }
    out.flush()?;
    let mean = |k: usize| r.iter().filter_map(|x| x.get(k)).sum::<f64>() / r.len().max(1) as f64;
    eprintln!(
        "{} examples: the first (preferred) response has the highest reward in {:.4}; mean reward first {:+.4}, second {:+.4}",
        r.len(),
        accuracy(&r),
        mean(0),
        mean(1)
    );
    Ok(())
}
