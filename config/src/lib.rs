//! attune-config: the one typed configuration tree. Values come from the
//! defaults, then a TOML file, then `ATTUNE_*` environment variables, then
//! command-line flags; the result is validated once, and every error names the
//! key (and where the bad value came from).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The file name of the default model inside the cache's `models/` folder.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// Environment variables with a short name, and the key each one sets. Any key
/// can also be set as `ATTUNE_<SECTION>__<KEY>` (upper case, double underscore).
pub const ENV_ALIASES: &[(&str, &str)] = &[
    ("ATTUNE_MODEL", "model.path"),
    ("ATTUNE_CACHE_DIR", "model.cache_dir"),
    ("ATTUNE_WEIGHTS", "model.weights"),
    ("ATTUNE_DEVICE", "model.device"),
    ("ATTUNE_THREADS", "runtime.threads"),
    ("ATTUNE_HOST", "server.host"),
    ("ATTUNE_PORT", "server.port"),
    ("ATTUNE_STORE", "store.path"),
    ("ATTUNE_ADAPTERS", "adapters.dir"),
    ("ATTUNE_ADMIN_TOKEN", "server.admin_token"),
];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{origin}: unknown key `{key}`")]
    UnknownKey { origin: String, key: String },
    #[error("{origin}: `{key}` expects {expected}, got `{value}`")]
    BadValue {
        origin: String,
        key: String,
        expected: &'static str,
        value: String,
    },
    #[error("invalid configuration: `{key}` {problem}")]
    Invalid { key: String, problem: String },
}

/// Where the model comes from and how it is held.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// A GGUF file or a Hugging Face model directory; empty means the default
    /// model in the cache.
    pub path: Option<PathBuf>,
    /// Where fetched models live (`<cache_dir>/models/`).
    pub cache_dir: PathBuf,
    /// `quantized` (GGUF quantizations kept; Q4_1/Q5 requantized to Q8_0),
    /// `quantized-vnni` (the same, padded for candle's faster VNNI kernels, a
    /// little less exact) or `f32`.
    pub weights: String,
    /// `cpu` or `cuda:N`.
    pub device: String,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            path: None,
            cache_dir: default_cache_dir(),
            weights: "quantized".into(),
            device: "cpu".into(),
        }
    }
}

impl ModelConfig {
    /// The model to load: `path` if set, else the default model in the cache.
    pub fn resolved_path(&self) -> PathBuf {
        self.path
            .clone()
            .unwrap_or_else(|| self.cache_dir.join("models").join(DEFAULT_MODEL_FILE))
    }
}

/// Process-wide execution settings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Threads for tensor work; 0 means one per CPU core.
    pub threads: usize,
}

impl RuntimeConfig {
    pub fn effective_threads(&self) -> usize {
        if self.threads > 0 {
            self.threads
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }
}

impl Config {
    /// Threads `serve` gives tensor work: `runtime.threads` when set; else
    /// every core, less the aligner's `aligner.threads` when the aligner runs
    /// (at least one). Serving threads that share a core with the aligner
    /// stall every parallel region they join: measured on 2 cores, decode at
    /// concurrency 4 fell from 95 to 31 tok/s while the aligner trained with
    /// 2 serving threads, and stayed at 68–75 tok/s with 1.
    pub fn serving_threads(&self) -> usize {
        if self.runtime.threads > 0 || !self.aligner.enabled {
            return self.runtime.effective_threads();
        }
        self.runtime
            .effective_threads()
            .saturating_sub(self.aligner.threads)
            .max(1)
    }
}

/// The HTTP server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    pub host: String,
    pub port: u16,
    /// Largest request body accepted, in bytes (413 above it).
    pub max_body_bytes: usize,
    /// Largest `n` (choices per request).
    pub max_n: usize,
    /// Seconds in-flight requests get to finish after SIGTERM/Ctrl-C.
    pub shutdown_grace_secs: u64,
    /// The model name clients use; empty means the model file's name.
    pub model_name: String,
    /// Bearer token of the admin API (`/v1/admin/...`); empty: the admin API
    /// is off.
    pub admin_token: String,
    /// Record serving metrics (`/metrics` answers either way).
    pub metrics: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8080,
            max_body_bytes: 1 << 20,
            max_n: 8,
            shutdown_grace_secs: 30,
            model_name: String::new(),
            admin_token: String::new(),
            metrics: true,
        }
    }
}

/// The continuous-batching engine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    /// Sequences decoded together (each choice of a request is one sequence).
    pub max_running: usize,
    /// KV-cache positions reserved across running sequences (prompt + max tokens each).
    pub max_kv_tokens: usize,
    /// Requests waiting for admission; beyond it the server answers 429.
    pub max_queue: usize,
    /// Default `max_tokens` when a request gives none.
    pub default_max_tokens: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_running: 16,
            max_kv_tokens: 65_536,
            max_queue: 64,
            default_max_tokens: 256,
        }
    }
}

/// The preference store: completions served, and the feedback on them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// The SQLite database file (created with its folder when missing).
    pub path: PathBuf,
    /// Completions older than this many days are deleted unless feedback
    /// refers to them; 0 keeps them forever.
    pub retention_days: u64,
    /// At most this many completions are kept (the oldest unreferenced ones go
    /// first); 0 means no limit.
    pub retention_max_completions: u64,
    /// Writes waiting for the writer thread; beyond it writes are refused
    /// (the API answers 503) rather than queued without bound.
    pub queue: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            path: default_data_dir().join("store.sqlite3"),
            retention_days: 30,
            retention_max_completions: 1_000_000,
            queue: 1024,
        }
    }
}

/// Where adapter generations live.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdaptersConfig {
    /// The registry folder: `generations/<n>/` and the `ACTIVE` pointer.
    pub dir: PathBuf,
    /// Generations kept on disk (the active one always is).
    pub keep: usize,
}

impl Default for AdaptersConfig {
    fn default() -> Self {
        Self {
            dir: default_data_dir().join("adapters"),
            keep: 5,
        }
    }
}

/// The aligner thread of `attune serve`: rounds of CLHA training on new
/// feedback, gated, published as adapter generations.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AlignerConfig {
    pub enabled: bool,
    /// Seconds between rounds (a round also starts early once
    /// `min_new_records` have arrived, or on demand).
    pub interval_secs: u64,
    /// New preference records that start a round before the interval ends.
    pub min_new_records: u64,
    /// CLHA optimizer steps per round.
    pub steps_per_round: usize,
    /// Examples per step.
    pub batch: usize,
    /// Threads of the aligner's own pool (serving keeps the rest).
    pub threads: usize,
    /// A reward model directory for rescoring; empty: the human order.
    pub reward_model: String,
    /// The gate: publish when held-out preference accuracy is at most this
    /// much below the current generation's.
    pub gate_tolerance: f64,
    /// The gate: largest mean KL(current ‖ candidate) on the probe prompts.
    pub max_kl: f64,
    /// Percent of records held out for the gate (by a hash of the record id).
    pub held_out_percent: f64,
    /// Older records replayed into each round besides the new ones.
    pub replay: usize,
    pub lr: f64,
    /// Tokens per prompt + response in training.
    pub block_size: usize,
    /// Seconds before a failed round is retried; doubles with each failure
    /// in a row, up to `interval_secs`.
    pub retry_secs: u64,
}

impl Default for AlignerConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            interval_secs: 600,
            min_new_records: 32,
            steps_per_round: 20,
            batch: 4,
            threads: 1,
            reward_model: String::new(),
            gate_tolerance: 0.02,
            max_kl: 0.5,
            held_out_percent: 10.0,
            replay: 16,
            lr: 1e-4,
            block_size: 256,
            retry_secs: 10,
        }
    }
}

/// The whole configuration tree.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub model: ModelConfig,
    pub runtime: RuntimeConfig,
    pub server: ServerConfig,
    pub engine: EngineConfig,
    pub store: StoreConfig,
    pub adapters: AdaptersConfig,
    pub aligner: AlignerConfig,
}

/// `~/.cache/attune`, or `$XDG_CACHE_HOME/attune`.
pub fn default_cache_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|x| !x.is_empty()) {
        return PathBuf::from(x).join("attune");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("attune")
}

/// `~/.local/share/attune`, or `$XDG_DATA_HOME/attune`.
pub fn default_data_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|x| !x.is_empty()) {
        return PathBuf::from(x).join("attune");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".local").join("share").join("attune")
}

/// Builds a [`Config`] layer by layer.
#[derive(Debug)]
pub struct ConfigBuilder {
    tree: toml::Table,
}

impl Default for ConfigBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl ConfigBuilder {
    /// Starts from the defaults.
    pub fn new() -> Self {
        let tree = toml::Table::try_from(Config::default()).expect("defaults serialize");
        Self { tree }
    }

    /// Merges a TOML file; unknown keys are errors.
    pub fn file(mut self, path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError::Parse {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        let origin = format!("config file {}", path.display());
        for (section, value) in table {
            match value {
                toml::Value::Table(inner) => {
                    for (key, v) in inner {
                        self.set_value(&format!("{section}.{key}"), v, &origin)?;
                    }
                }
                v => self.set_value(&section, v, &origin)?,
            }
        }
        Ok(self)
    }

    /// Applies `ATTUNE_*` variables from `vars` (normally `std::env::vars()`).
    pub fn env(
        mut self,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        for (name, value) in vars {
            let key = if let Some((_, key)) = ENV_ALIASES.iter().find(|(n, _)| *n == name) {
                key.to_string()
            } else if let Some(rest) = name.strip_prefix("ATTUNE_") {
                match rest.split_once("__") {
                    Some((s, k)) => format!("{}.{}", s.to_lowercase(), k.to_lowercase()),
                    None => continue, // other ATTUNE_* variables belong to tools, not config
                }
            } else {
                continue;
            };
            self.set(&key, &value, &format!("environment {name}"))?;
        }
        Ok(self)
    }

    /// Sets one dotted key from a string (a flag or environment value), parsed as
    /// the type the key holds.
    pub fn set(&mut self, key: &str, value: &str, origin: &str) -> Result<&mut Self, ConfigError> {
        let current = self.lookup(key, origin)?;
        let bad = |expected| ConfigError::BadValue {
            origin: origin.to_string(),
            key: key.to_string(),
            expected,
            value: value.to_string(),
        };
        let parsed = match current {
            toml::Value::Integer(_) => {
                toml::Value::Integer(value.trim().parse().map_err(|_| bad("an integer"))?)
            }
            toml::Value::Float(_) => {
                toml::Value::Float(value.trim().parse().map_err(|_| bad("a number"))?)
            }
            toml::Value::Boolean(_) => toml::Value::Boolean(match value.trim() {
                "1" | "true" | "yes" | "on" => true,
                "0" | "false" | "no" | "off" => false,
                _ => return Err(bad("a boolean")),
            }),
            _ => toml::Value::String(value.to_string()),
        };
        self.set_value(key, parsed, origin)?;
        Ok(self)
    }

    fn lookup(&self, key: &str, origin: &str) -> Result<&toml::Value, ConfigError> {
        let unknown = || ConfigError::UnknownKey {
            origin: origin.to_string(),
            key: key.to_string(),
        };
        let (section, name) = key.split_once('.').ok_or_else(unknown)?;
        let table = self
            .tree
            .get(section)
            .and_then(|s| s.as_table())
            .ok_or_else(unknown)?;
        // Optional keys (`None` by default) are absent from the tree; they take strings.
        Ok(table.get(name).unwrap_or(&EMPTY_STRING))
    }

    fn set_value(
        &mut self,
        key: &str,
        value: toml::Value,
        origin: &str,
    ) -> Result<(), ConfigError> {
        let unknown = || ConfigError::UnknownKey {
            origin: origin.to_string(),
            key: key.to_string(),
        };
        let (section, name) = key.split_once('.').ok_or_else(unknown)?;
        if !Self::is_known(section, name) {
            return Err(unknown());
        }
        let table = self
            .tree
            .get_mut(section)
            .and_then(|s| s.as_table_mut())
            .ok_or_else(unknown)?;
        table.insert(name.to_string(), value);
        Ok(())
    }

    fn is_known(section: &str, name: &str) -> bool {
        // Keys that are `None` by default do not appear in the serialized defaults.
        const OPTIONAL: &[(&str, &str)] = &[("model", "path")];
        let defaults = toml::Table::try_from(Config::default()).expect("defaults serialize");
        OPTIONAL.contains(&(section, name))
            || defaults
                .get(section)
                .and_then(|s| s.as_table())
                .is_some_and(|t| t.contains_key(name))
    }

    /// Deserializes and validates.
    pub fn build(self) -> Result<Config, ConfigError> {
        let cfg: Config =
            toml::Value::Table(self.tree)
                .try_into()
                .map_err(|e: toml::de::Error| ConfigError::Invalid {
                    key: "(tree)".into(),
                    problem: e.message().to_string(),
                })?;
        cfg.validate()?;
        Ok(cfg)
    }
}

static EMPTY_STRING: toml::Value = toml::Value::String(String::new());

impl Config {
    /// Defaults, then `file`, then the process environment.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        let mut b = ConfigBuilder::new();
        if let Some(f) = file {
            b = b.file(f)?;
        }
        b.env(std::env::vars())?.build()
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, problem: String| ConfigError::Invalid {
            key: key.into(),
            problem,
        };
        if !matches!(
            self.model.weights.as_str(),
            "quantized" | "quantized-vnni" | "f32"
        ) {
            return Err(invalid(
                "model.weights",
                format!(
                    "must be `quantized`, `quantized-vnni` or `f32`, got `{}`",
                    self.model.weights
                ),
            ));
        }
        let dev = self.model.device.as_str();
        if dev != "cpu"
            && !(dev.starts_with("cuda")
                && dev
                    .trim_start_matches("cuda")
                    .trim_start_matches(':')
                    .chars()
                    .all(|c| c.is_ascii_digit()))
        {
            return Err(invalid(
                "model.device",
                format!("must be `cpu` or `cuda:N`, got `{dev}`"),
            ));
        }
        let positive = [
            ("server.max_body_bytes", self.server.max_body_bytes),
            ("server.max_n", self.server.max_n),
            ("engine.max_running", self.engine.max_running),
            ("engine.max_kv_tokens", self.engine.max_kv_tokens),
            ("engine.max_queue", self.engine.max_queue),
            ("engine.default_max_tokens", self.engine.default_max_tokens),
            ("store.queue", self.store.queue),
            ("adapters.keep", self.adapters.keep),
            ("aligner.steps_per_round", self.aligner.steps_per_round),
            ("aligner.batch", self.aligner.batch),
            ("aligner.threads", self.aligner.threads),
            ("aligner.block_size", self.aligner.block_size),
        ];
        for (key, v) in positive {
            if v == 0 {
                return Err(invalid(key, "must be at least 1".into()));
            }
        }
        if !(0.0..=50.0).contains(&self.aligner.held_out_percent) {
            return Err(invalid(
                "aligner.held_out_percent",
                format!("must be in [0, 50], got {}", self.aligner.held_out_percent),
            ));
        }
        if !(self.aligner.lr > 0.0 && self.aligner.lr.is_finite()) {
            return Err(invalid(
                "aligner.lr",
                format!("must be a positive number, got {}", self.aligner.lr),
            ));
        }
        let token = &self.server.admin_token;
        if !token.is_empty() && (token.trim().is_empty() || token.len() < 16) {
            return Err(invalid(
                "server.admin_token",
                "must be at least 16 characters and not blank (ATTUNE_ADMIN_TOKEN); leave it empty to turn the admin API off".into(),
            ));
        }
        if self.store.path.as_os_str().is_empty() {
            return Err(invalid("store.path", "must name a file".into()));
        }
        if self.runtime.threads > 4096 {
            return Err(invalid(
                "runtime.threads",
                format!("must be at most 4096, got {}", self.runtime.threads),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn layers_apply_in_order_file_then_env_then_flags() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("attune.toml");
        std::fs::write(&f, "[model]\nweights = \"f32\"\n[runtime]\nthreads = 3\n").unwrap();
        let mut b = ConfigBuilder::new()
            .file(&f)
            .unwrap()
            .env(env(&[("ATTUNE_THREADS", "5"), ("ATTUNE_MODEL", "/m.gguf")]))
            .unwrap();
        assert_eq!(
            b.lookup("runtime.threads", "").unwrap().as_integer(),
            Some(5)
        );
        b.set("runtime.threads", "7", "flag --threads").unwrap();
        let c = b.build().unwrap();
        assert_eq!(c.runtime.threads, 7);
        assert_eq!(c.model.weights, "f32");
        assert_eq!(c.model.resolved_path(), PathBuf::from("/m.gguf"));
    }

    #[test]
    fn serving_leaves_the_aligner_its_threads_unless_told_otherwise() {
        let cores = RuntimeConfig::default().effective_threads();
        let mut cfg = Config::default();
        assert_eq!(cfg.serving_threads(), cores.saturating_sub(1).max(1));
        cfg.aligner.enabled = false;
        assert_eq!(cfg.serving_threads(), cores);
        cfg.aligner.enabled = true;
        cfg.aligner.threads = cores + 4;
        assert_eq!(cfg.serving_threads(), 1, "never fewer than one");
        cfg.runtime.threads = 3;
        assert_eq!(cfg.serving_threads(), 3, "an explicit value wins");
    }

    #[test]
    fn default_model_path_is_in_the_cache() {
        let c = ConfigBuilder::new()
            .env(env(&[("ATTUNE_CACHE_DIR", "/c")]))
            .unwrap()
            .build()
            .unwrap();
        assert_eq!(
            c.model.resolved_path(),
            PathBuf::from("/c/models").join(DEFAULT_MODEL_FILE)
        );
    }

    #[test]
    fn errors_name_the_key_and_origin() {
        let e = ConfigBuilder::new()
            .env(env(&[("ATTUNE_THREADS", "many")]))
            .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("runtime.threads")
                && msg.contains("ATTUNE_THREADS")
                && msg.contains("many"),
            "{msg}"
        );
        let e = ConfigBuilder::new()
            .env(env(&[("ATTUNE_MODEL__COLOUR", "x")]))
            .unwrap_err();
        assert!(e.to_string().contains("model.colour"));
        let e = ConfigBuilder::new()
            .env(env(&[("ATTUNE_WEIGHTS", "int3")]))
            .unwrap()
            .build()
            .unwrap_err();
        assert!(e.to_string().contains("model.weights"));
    }

    #[test]
    fn unknown_key_in_file_is_rejected_with_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("attune.toml");
        std::fs::write(&f, "[model]\nwieghts = \"f32\"\n").unwrap();
        let e = ConfigBuilder::new().file(&f).unwrap_err();
        assert!(e.to_string().contains("model.wieghts"), "{e}");
    }
}
