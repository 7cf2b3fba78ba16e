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
    /// Measure one CLHA training step (time and peak memory) on the model.
    BenchTrain(BenchTrainArgs),
    /// Train a LoRA adapter offline on preference data (CLHA or DPO).
    Align(Box<AlignArgs>),
    /// Score preference pairs with the model (and an adapter): preference
    /// accuracy and mean margin.
    Eval(EvalArgs),
    /// Merge a LoRA adapter into the model's weights and write a Hugging Face
    /// model directory (f32) that `serve --model` loads.
    Merge(MergeArgs),
    /// Train a reward model (LoRA on the backbone plus a score head,
    /// Bradley–Terry loss) on preference data.
    TrainRm(Box<TrainRmArgs>),
    /// Print a reward model's rewards for each response of each line, and its
    /// preference accuracy.
    Score(ScoreArgs),
}

/// Which preference lines to read, and how to turn them into tokens.
#[derive(Debug, Args, Clone)]
pub struct DataArgs {
    /// JSON lines, plain or .gz: HH-RLHF `{"chosen", "rejected"}` or ranked
    /// `{"prompt", "responses", "ranking"}`.
    #[arg(long)]
    pub data: PathBuf,
    /// Skip this many lines first.
    #[arg(long, default_value_t = 0)]
    pub skip: usize,
    /// Read at most this many lines.
    #[arg(long)]
    pub limit: Option<usize>,
    /// `raw`: HH-RLHF text as is (prompt up to and including the final
    /// "\n\nAssistant:"); `chat`: messages through the model's chat template.
    #[arg(long, default_value = "raw")]
    pub template: String,
    /// Tokens per prompt + response; longer prompts are cut from the left.
    #[arg(long, default_value_t = 512)]
    pub block_size: usize,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub data: DataArgs,
    /// A PEFT LoRA adapter directory to apply.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Write one JSON line per pair, in input order:
    /// `{"chosen": {"sum", "mean", "tokens"}, "rejected": {...}}`.
    #[arg(long)]
    pub per_pair: Option<PathBuf>,
    /// Tokens per forward batch.
    #[arg(long, default_value_t = 4096)]
    pub batch_tokens: usize,
    /// Also generate greedily for each prompt and report the mean reward of
    /// the generations under this reward model, and their BLEU against the
    /// preferred response.
    #[arg(long)]
    pub reward_model: Option<PathBuf>,
    /// New tokens per generation (cut earlier at the next turn marker).
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// Prompts generated together.
    #[arg(long, default_value_t = 8)]
    pub gen_batch: usize,
}

/// Optimizer settings shared by `align` and `train-rm`.
#[derive(Debug, Args, Clone)]
pub struct OptimArgs {
    /// Optimizer steps; default: one pass over the data.
    #[arg(long)]
    pub steps: Option<usize>,
    /// Examples per micro-batch.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    pub accumulation: usize,
    /// Peak learning rate (AdamW).
    #[arg(long, default_value_t = 2e-4)]
    pub lr: f64,
    #[arg(long, default_value_t = 10)]
    pub warmup: usize,
    /// `cosine`, `linear` or `constant`.
    #[arg(long, default_value = "cosine")]
    pub schedule: String,
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Clip the global gradient norm to this; 0 turns clipping off.
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// Seeds the adapter's initialisation and the data order.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// The LoRA adapter's shape.
#[derive(Debug, Args, Clone)]
pub struct LoraArgs {
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    #[arg(long, default_value_t = 16.0)]
    pub alpha: f64,
    #[arg(long, default_value_t = 0.0)]
    pub dropout: f32,
    /// Projections to adapt (comma separated): q, k, v, o, gate, up, down.
    #[arg(long, value_delimiter = ',', default_value = "q,k,v,o")]
    pub targets: Vec<String>,
}

/// Held-out data evaluated during training.
#[derive(Debug, Args, Clone)]
pub struct HeldOutArgs {
    /// Held-out pairs evaluated every --eval-every steps (and at the end);
    /// the best adapter is kept in OUT/best.
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    pub eval_skip: usize,
    #[arg(long)]
    pub eval_limit: Option<usize>,
    #[arg(long, default_value_t = 50)]
    pub eval_every: usize,
    /// Block size for the held-out evaluation (training may use a smaller one
    /// to save time).
    #[arg(long, default_value_t = 512)]
    pub eval_block_size: usize,
}

#[derive(Debug, Args)]
pub struct AlignArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub data: DataArgs,
    /// Where the adapter goes: `OUT/final`, and `OUT/best` with --eval-data.
    #[arg(long)]
    pub out: PathBuf,
    /// `clha` or `dpo`.
    #[arg(long, default_value = "clha")]
    pub objective: String,
    /// Rescore with this reward model (a `LlamaForSequenceClassification`
    /// directory): candidates re-ordered by reward, pairs filtered by τ.
    /// Without it the human order is used and every pair counts.
    #[arg(long)]
    pub reward_model: Option<PathBuf>,
    #[command(flatten)]
    pub optim: OptimArgs,
    #[command(flatten)]
    pub lora: LoraArgs,
    /// CLHA: reward-difference threshold τ.
    #[arg(long, default_value_t = 3.0)]
    pub tau: f64,
    /// CLHA: margin per rank distance μ.
    #[arg(long, default_value_t = 3.0)]
    pub mu: f64,
    /// CLHA: SFT weight w.
    #[arg(long, default_value_t = 0.05)]
    pub sft_weight: f64,
    /// DPO: β.
    #[arg(long, default_value_t = 0.1)]
    pub beta: f64,
    #[command(flatten)]
    pub held_out: HeldOutArgs,
}

#[derive(Debug, Args)]
pub struct TrainRmArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub data: DataArgs,
    /// The reward model directory to write (`LlamaForSequenceClassification`).
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub optim: OptimArgs,
    #[command(flatten)]
    pub lora: LoraArgs,
    #[command(flatten)]
    pub held_out: HeldOutArgs,
}

#[derive(Debug, Args)]
pub struct MergeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The PEFT LoRA adapter directory.
    #[arg(long)]
    pub adapter: PathBuf,
    /// The model directory to write.
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct ScoreArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub data: DataArgs,
    /// The reward model (`LlamaForSequenceClassification` directory).
    #[arg(long)]
    pub reward_model: PathBuf,
    /// Sequences per forward batch.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
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
    /// Serve without the aligner thread (config `aligner.enabled = false`,
    /// env ATTUNE_ALIGNER__ENABLED=false).
    #[arg(long)]
    pub no_aligner: bool,
    /// Any configuration key, e.g. `--set aligner.steps_per_round=10`
    /// (repeatable; wins over file and environment).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
}

#[derive(Debug, Args)]
pub struct BenchTrainArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Sequences per step (candidates: batch 4 is two preference pairs).
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Tokens per sequence (half prompt, half response).
    #[arg(long, default_value_t = 128)]
    pub tokens: usize,
    /// Measured steps (after one warm-up step); the median is reported.
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    /// Also measure the same step with candle's plain matmul backward for the
    /// frozen weights, as a same-run reference.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub baseline: bool,
    /// Internal: measure one variant in this process and print it (the
    /// parent runs each variant in a fresh process so their peaks are apart).
    #[arg(long, hide = true)]
    pub variant: Option<String>,
}
