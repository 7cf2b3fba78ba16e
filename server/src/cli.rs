//! Command-line arguments. Flags that mirror configuration keys are applied on
//! top of file and environment (see `attune-config`).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "attune",
    version,
    about = "An LLM server that learns from its users while it serves"
)]
pub struct Cli {
    /// TOML configuration file.
    #[arg(long, global = true, env = "ATTUNE_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the model over an OpenAI-compatible HTTP API.
    Serve(ServeArgs),
    /// Generate a completion for one prompt and print it with token counts and speed.
    Generate(GenerateArgs),
    /// Measure prefill and decode throughput (tok/s) at several batch sizes.
    Bench(BenchArgs),
    /// Import, export or count preference records in the store.
    #[command(subcommand)]
    Feedback(FeedbackCommand),
}

/// The preference store's location (overrides `store.path`).
#[derive(Debug, Args, Clone, Default)]
pub struct StoreArgs {
    /// The SQLite store (config `store.path`, env ATTUNE_STORE);
    /// default: ~/.local/share/attune/store.sqlite3.
    #[arg(long)]
    pub store: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum FeedbackCommand {
    /// Import preference records from JSON lines (plain or .gz): HH-RLHF
    /// `{"chosen", "rejected"}` dialogues or ranked
    /// `{"prompt": [messages], "responses": [...], "ranking": [...]}`.
    Import {
        file: PathBuf,
        /// `auto` (by each line's keys), `hh-rlhf` or `ranked`.
        #[arg(long, default_value = "auto")]
        format: String,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Write every record as ranked JSON lines (responses best first), which
    /// `import` reads back.
    Export {
        /// Output file; default: standard output.
        #[arg(long, short)]
        output: Option<PathBuf>,
        /// Only records with an id above this one.
        #[arg(long, default_value_t = 0)]
        after: i64,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Print counts of completions, records and pairs by kind and generation.
    Stats {
        #[command(flatten)]
        store: StoreArgs,
    },
}

/// Model selection flags shared by commands (override `model.*` and `runtime.*`).
#[derive(Debug, Args, Clone, Default)]
pub struct ModelArgs {
    /// GGUF file or Hugging Face model directory (config `model.path`, env ATTUNE_MODEL);
    /// default: the fetched SmolLM2-135M-Instruct.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// `quantized` (serving) or `f32` (config `model.weights`).
    #[arg(long)]
    pub weights: Option<String>,
    /// Threads for tensor work, 0 = all cores (config `runtime.threads`).
    #[arg(long)]
    pub threads: Option<usize>,
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The user message (rendered with the model's chat template).
    #[arg(long, conflicts_with = "messages")]
    pub prompt: Option<String>,
    /// A system message placed before the prompt.
    #[arg(long, requires = "prompt")]
    pub system: Option<String>,
    /// A JSON file with chat messages, `[{"role": "user", "content": "..."}]`; `-` reads stdin.
    #[arg(long)]
    pub messages: Option<PathBuf>,
    /// Use the prompt as raw text, without the chat template.
    #[arg(long)]
    pub raw: bool,
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.7)]
    pub temperature: f32,
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    pub presence_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    pub frequency_penalty: f32,
    #[arg(long)]
    pub seed: Option<u64>,
    /// A stop string (repeatable); it is not printed.
    #[arg(long)]
    pub stop: Vec<String>,
    /// Print each token's log-probability with this many alternatives.
    #[arg(long)]
    pub logprobs: Option<usize>,
    /// Print the result as one JSON object instead of streaming text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt length for the prefill measurement.
    #[arg(long, default_value_t = 512)]
    pub prompt_tokens: usize,
    /// Tokens decoded per sequence.
    #[arg(long, default_value_t = 64)]
    pub decode_tokens: usize,
    /// Batch sizes to measure (comma separated).
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    pub batch: Vec<usize>,
    /// Also run candle-transformers' stock `quantized_llama` on the same weights
    /// (Q8_0) as a same-run reference.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub baseline: bool,
    /// Repetitions; the best is reported.
    #[arg(long, default_value_t = 2)]
    pub repeat: usize,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to listen on (config `server.host`, env ATTUNE_HOST).
    #[arg(long)]
    pub host: Option<String>,
    /// Port to listen on (config `server.port`, env ATTUNE_PORT).
    #[arg(long)]
    pub port: Option<u16>,
    #[command(flatten)]
    pub store: StoreArgs,
}
