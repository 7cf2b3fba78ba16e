//! The `attune-loadtest` command: parse flags, run, print the report.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use attune_loadtest::{compare, is_loopback, prompts, run, LoadConfig, Mode, Report};
use clap::Parser;

/// Load generator for OpenAI-compatible chat servers (attune, llama-server,
/// vLLM, …): closed loop (--concurrency) or open loop (--rate, Poisson
/// arrivals), bounded by --requests and/or --duration.
#[derive(Debug, Parser)]
#[command(name = "attune-loadtest", version)]
struct Args {
    /// The server's base URL (with or without a trailing /v1).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// The `model` to send; default: the first of the server's /v1/models.
    #[arg(long)]
    model: Option<String>,
    /// Clients in a closed loop.
    #[arg(long, conflicts_with = "rate")]
    concurrency: Option<usize>,
    /// Requests per second, Poisson arrivals (open loop).
    #[arg(long)]
    rate: Option<f64>,
    /// Open loop: most requests in flight; arrivals beyond it are counted as
    /// `client_saturated` and not sent.
    #[arg(long, default_value_t = 256)]
    max_in_flight: usize,
    /// Stop after this many requests.
    #[arg(long)]
    requests: Option<usize>,
    /// Stop issuing requests after this many seconds (default 30 when
    /// --requests is not given either).
    #[arg(long)]
    duration: Option<f64>,
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    #[arg(long, default_value_t = 0.7)]
    temperature: f64,
    /// Stream the responses (SSE): needed for TTFT and inter-token latency.
    #[arg(long)]
    stream: bool,
    /// Share of requests sent with n = 2 and followed by a ranking of the two
    /// choices on /v1/feedback (attune only).
    #[arg(long, default_value_t = 0.0)]
    feedback_share: f64,
    /// Prompts from an HH-RLHF file (the first human turn of each line;
    /// plain or gzip); default: a built-in set.
    #[arg(long)]
    prompts: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Seconds one request may take.
    #[arg(long, default_value_t = 300.0)]
    timeout: f64,
    /// Allow a target that is not on loopback.
    #[arg(long)]
    allow_remote: bool,
    /// A JSON object merged into every request body, e.g.
    /// '{"cache_prompt": false}' for llama-server.
    #[arg(long, default_value = "{}")]
    extra: String,
    /// Write the report as JSON here too.
    #[arg(long)]
    json: Option<PathBuf>,
    /// No progress line.
    #[arg(long)]
    quiet: bool,
    /// Print reports written with --json side by side instead of running,
    /// as LABEL=FILE (the first is the base of the ratios).
    #[arg(long, value_name = "LABEL=FILE", num_args = 1..)]
    compare: Vec<String>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if !args.compare.is_empty() {
        let mut reports = Vec::new();
        for item in &args.compare {
            let (label, file) = item
                .split_once('=')
                .with_context(|| format!("--compare {item}: expected LABEL=FILE"))?;
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("--compare: reading {file}"))?;
            let report: Report = serde_json::from_str(&text)
                .with_context(|| format!("--compare: {file} is not a report of --json"))?;
            reports.push((label.to_string(), report));
        }
        print!("{}", compare(&reports));
        return Ok(());
    }
    let cfg = config(&args)?;
    let report = run(&cfg);
    print!("{}", report.table());
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)? + "\n")
            .with_context(|| format!("--json: writing {}", path.display()))?;
    }
    if report.requests_ok == 0 {
        bail!("no request succeeded");
    }
    Ok(())
}

fn config(args: &Args) -> Result<LoadConfig> {
    let base = args
        .url
        .trim_end_matches('/')
        .trim_end_matches("/v1")
        .to_string();
    match is_loopback(&base) {
        None => bail!("--url {}: no host in the URL", args.url),
        Some(false) if !args.allow_remote => bail!(
            "--url {}: not a loopback address; pass --allow-remote to load another machine",
            args.url
        ),
        _ => {}
    }
    let mode = match (args.concurrency, args.rate) {
        (_, Some(r)) if !(r > 0.0 && r.is_finite()) => {
            bail!("--rate must be a positive number, got {r}")
        }
        (_, Some(rate)) => Mode::Open {
            rate,
            max_in_flight: args.max_in_flight.max(1),
        },
        (Some(0), _) => bail!("--concurrency must be at least 1"),
        (c, None) => Mode::Closed {
            concurrency: c.unwrap_or(1),
        },
    };
    if !(0.0..=1.0).contains(&args.feedback_share) {
        bail!(
            "--feedback-share must be in [0, 1], got {}",
            args.feedback_share
        );
    }
    if args.max_tokens == 0 {
        bail!("--max-tokens must be at least 1");
    }
    let duration = match (args.duration, args.requests) {
        (Some(d), _) if !(d > 0.0 && d.is_finite()) => {
            bail!("--duration must be a positive number of seconds, got {d}")
        }
        (Some(d), _) => Some(Duration::from_secs_f64(d)),
        (None, None) => Some(Duration::from_secs(30)),
        (None, Some(_)) => None,
    };
    if args.requests == Some(0) {
        bail!("--requests must be at least 1");
    }
    let prompts = match &args.prompts {
        Some(p) => prompts::from_hh_rlhf(p)?,
        None => prompts::built_in(),
    };
    let extra = match serde_json::from_str::<serde_json::Value>(&args.extra) {
        Ok(serde_json::Value::Object(m)) => m,
        _ => bail!("--extra must be a JSON object, got {}", args.extra),
    };
    let timeout = Duration::from_secs_f64(args.timeout.max(0.001));
    let model = match &args.model {
        Some(m) => m.clone(),
        None => first_model(&base, timeout)?,
    };
    Ok(LoadConfig {
        base,
        model,
        prompts,
        mode,
        requests: args.requests,
        duration,
        max_tokens: args.max_tokens,
        temperature: args.temperature,
        stream: args.stream,
        feedback_share: args.feedback_share,
        seed: args.seed,
        extra,
        timeout,
        progress: !args.quiet,
    })
}

fn first_model(base: &str, timeout: Duration) -> Result<String> {
    let agent = attune_loadtest::client::agent(timeout, 1);
    let mut r = agent
        .get(&format!("{base}/v1/models"))
        .call()
        .with_context(|| format!("asking {base}/v1/models for a model name (or pass --model)"))?;
    let v: serde_json::Value = serde_json::from_str(&r.body_mut().read_to_string()?)?;
    v["data"][0]["id"]
        .as_str()
        .map(str::to_string)
        .with_context(|| format!("{base}/v1/models lists no model; pass --model"))
}
