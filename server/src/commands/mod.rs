//! The `attune` subcommands and what they share: configuration layering and
//! model loading.

mod align;
mod bench;
mod bench_train;
mod feedback;
mod generate;
mod progress;
mod reward;
mod serve;

use anyhow::{bail, Context, Result};
use attune_config::{Config, ConfigBuilder};
use attune_models::{LoadOptions, LoadedModel, WeightFormat};
use candle_core::Device;

use crate::cli::{Cli, Command, ModelArgs, StoreArgs};

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Generate(args) => {
            let cfg = load_config(cli.config.as_deref(), &args.model)?;
            generate::run(&cfg, args)
        }
        Command::Serve(args) => {
            // Serve's own flags, applied after the model flags, as `--set`s.
            let mut overrides: Vec<(String, String, String)> = Vec::new();
            if let Some(h) = &args.host {
                overrides.push(("server.host".into(), h.clone(), "flag --host".into()));
            }
            if let Some(p) = args.port {
                overrides.push(("server.port".into(), p.to_string(), "flag --port".into()));
            }
            if args.no_aligner {
                overrides.push((
                    "aligner.enabled".into(),
                    "false".into(),
                    "flag --no-aligner".into(),
                ));
            }
            for kv in &args.set {
                let (key, value) = kv
                    .split_once('=')
                    .with_context(|| format!("--set {kv}: expected KEY=VALUE"))?;
                overrides.push((key.trim().into(), value.into(), format!("flag --set {kv}")));
            }
            let mut cfg = load_config_with(cli.config.as_deref(), &args.model, &overrides)?;
            apply_store_flag(&mut cfg, &args.store);
            if cfg.runtime.threads == 0 {
                cfg.runtime.threads = cfg.serving_threads();
                size_candle_pool(&cfg);
            }
            tracing::info!(
                serving_threads = cfg.runtime.threads,
                aligner_threads = cfg.aligner.enabled.then_some(cfg.aligner.threads),
                "threads"
            );
            serve::run(cfg)
        }
        Command::Bench(args) => {
            let cfg = load_config(cli.config.as_deref(), &args.model)?;
            bench::run(&cfg, args)
        }
        Command::BenchTrain(args) => {
            let cfg = load_config(cli.config.as_deref(), &args.model)?;
            bench_train::run(cfg, args)
        }
        Command::Align(args) => {
            let cfg = load_config(cli.config.as_deref(), &args.model)?;
            align::align(cfg, *args)
        }
        Command::Eval(args) => {
            let cfg = load_config(cli.config.as_deref(), &args.model)?;
            align::eval(cfg, args)
        }
        Command::Merge(args) => {
            let cfg = load_config(cli.config.as_deref(), &args.model)?;
            align::merge(cfg, args)
        }
        Command::TrainRm(args) => {
            let cfg = load_config(cli.config.as_deref(), &args.model)?;
            reward::train_rm(cfg, *args)
        }
        Command::Score(args) => {
            let cfg = load_config(cli.config.as_deref(), &args.model)?;
            reward::score(cfg, args)
        }
        Command::Feedback(cmd) => {
            let cfg = load_config(cli.config.as_deref(), &ModelArgs::default())?;
            feedback::run(cfg, cmd)
        }
    }
}

/// `--store` wins over file and environment.
fn apply_store_flag(cfg: &mut Config, flags: &StoreArgs) {
    if let Some(p) = &flags.store {
        cfg.store.path = p.clone();
    }
}

/// Defaults → file → environment → these flags, validated.
pub fn load_config(file: Option<&std::path::Path>, flags: &ModelArgs) -> Result<Config> {
    load_config_with(file, flags, &[])
}

/// [`load_config`], then `overrides` (key, value, where it came from) in order.
pub fn load_config_with(
    file: Option<&std::path::Path>,
    flags: &ModelArgs,
    overrides: &[(String, String, String)],
) -> Result<Config> {
    let mut b = ConfigBuilder::new();
    if let Some(f) = file {
        b = b.file(f)?;
    }
    let mut b = b.env(std::env::vars())?;
    if let Some(m) = &flags.model {
        b.set("model.path", &m.to_string_lossy(), "flag --model")?;
    }
    if let Some(w) = &flags.weights {
        b.set("model.weights", w, "flag --weights")?;
    }
    if let Some(t) = flags.threads {
        b.set("runtime.threads", &t.to_string(), "flag --threads")?;
    }
    for (key, value, origin) in overrides {
        b.set(key, value, origin)?;
    }
    let cfg = b.build()?;
    size_candle_pool(&cfg);
    Ok(cfg)
}

/// candle runs its quantized and element-wise CPU kernels (and attune's, which
/// share it) on one process-wide worker pool, created at first use and sized
/// from `CANDLE_NUM_THREADS`; make `runtime.threads` size it too. Runs before
/// any tensor work and before any other thread exists.
fn size_candle_pool(cfg: &Config) {
    if cfg.runtime.threads > 0 && std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", cfg.runtime.threads.to_string());
    }
}

pub fn device(cfg: &Config) -> Result<Device> {
    let d = cfg.model.device.as_str();
    if d == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal: usize = d
        .trim_start_matches("cuda")
        .trim_start_matches(':')
        .parse()
        .unwrap_or(0);
    Device::new_cuda(ordinal)
        .with_context(|| format!("`model.device` = `{d}`: cannot open the GPU"))
}

/// Loads the configured model, with a hint when the default one was never fetched.
pub fn load_model(cfg: &Config) -> Result<LoadedModel> {
    let path = cfg.model.resolved_path();
    if cfg.model.path.is_none() && !path.exists() {
        bail!(
            "the default model is not at {}: fetch it with `make model` (or scripts/fetch-model.sh), \
             or pass --model PATH / set ATTUNE_MODEL",
            path.display()
        );
    }
    let format: WeightFormat = cfg.model.weights.parse().map_err(anyhow::Error::msg)?;
    let opts = LoadOptions {
        path,
        format,
        device: device(cfg)?,
    };
    Ok(LoadedModel::load(&opts)?)
}

/// The rayon pool tensor work runs in, sized by `runtime.threads`.
pub fn thread_pool(cfg: &Config) -> Result<rayon::ThreadPool> {
    Ok(rayon::ThreadPoolBuilder::new()
        .num_threads(cfg.runtime.effective_threads())
        .thread_name(|i| format!("attune-tensor-{i}"))
        .build()?)
}
