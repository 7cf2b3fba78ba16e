//! A model ready to generate: weights, tokenizer and chat template loaded from one
//! path (GGUF file or Hugging Face directory) and checked against each other.

use std::path::{Path, PathBuf};

use candle_core::Device;

use crate::chat_template::ChatTemplate;
use crate::checkpoint::{Checkpoint, WeightFormat};
use crate::error::LoadError;
use crate::llama::Llama;
use crate::tokenizer::TextTokenizer;

/// ChatML, used only when a checkpoint carries no template of its own.
const FALLBACK_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// What to load and how.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub path: PathBuf,
    pub format: WeightFormat,
    pub device: Device,
}

impl LoadOptions {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            format: WeightFormat::Quantized,
            device: Device::Cpu,
        }
    }

    pub fn with_format(mut self, format: WeightFormat) -> Self {
        self.format = format;
        self
    }
}

/// The model with everything needed to turn chat messages into tokens and back.
#[derive(Debug)]
pub struct LoadedModel {
    pub model: Llama,
    pub tokenizer: TextTokenizer,
    pub template: ChatTemplate,
    pub path: PathBuf,
    /// A short name for the model (file stem or directory name).
    pub name: String,
}

fn read_json_opt(path: &Path) -> Result<Option<serde_json::Value>, LoadError> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| LoadError::Config {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
}

/// `"<s>"` or `{"content": "<s>", ...}` as tokenizer_config.json writes tokens.
fn token_string(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

fn ids_of(v: Option<&serde_json::Value>) -> Vec<u32> {
    match v {
        Some(serde_json::Value::Number(n)) => n.as_u64().map(|x| x as u32).into_iter().collect(),
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64())
            .map(|x| x as u32)
            .collect(),
        _ => vec![],
    }
}

impl LoadedModel {
    pub fn load(opts: &LoadOptions) -> Result<Self, LoadError> {
        let start = std::time::Instant::now();
        let mut ckpt = Checkpoint::open(&opts.path, &opts.device)?;
        let model = Llama::load(&mut ckpt, opts.format)?;
        let (tokenizer, template) = if let Some(md) = ckpt.gguf_metadata() {
            Self::gguf_text(md, &opts.path)?
        } else {
            Self::hf_text(&opts.path, &model)?
        };
        tokenizer.check_vocab(model.vocab_size(), &opts.path)?;
        let name = opts
            .path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into());
        tracing::info!(
            path = %opts.path.display(),
            format = ?opts.format,
            layers = model.config().num_hidden_layers,
            secs = start.elapsed().as_secs_f32(),
            "model loaded"
        );
        Ok(Self {
            model,
            tokenizer,
            template,
            path: opts.path.clone(),
            name,
        })
    }

    fn gguf_text(
        md: &std::collections::HashMap<String, candle_core::quantized::gguf_file::Value>,
        path: &Path,
    ) -> Result<(TextTokenizer, ChatTemplate), LoadError> {
        let tokenizer = TextTokenizer::from_gguf(md, path)?;
        let token_str = |id: Option<u32>| {
            id.and_then(|i| tokenizer.id_to_token(i))
                .unwrap_or_default()
        };
        let bos = token_str(tokenizer.bos_id);
        let eos = token_str(tokenizer.eos_ids.first().copied());
        let source = md
            .get("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok().cloned());
        let template = Self::template_or_fallback(source, &bos, &eos, path)?;
        Ok((tokenizer, template))
    }

    fn hf_text(dir: &Path, model: &Llama) -> Result<(TextTokenizer, ChatTemplate), LoadError> {
        let mut tokenizer = TextTokenizer::from_file(&dir.join("tokenizer.json"))?;
        let tc_path = dir.join("tokenizer_config.json");
        let tc = read_json_opt(&tc_path)?.unwrap_or_default();
        let gen = read_json_opt(&dir.join("generation_config.json"))?.unwrap_or_default();
        let bos = token_string(tc.get("bos_token"));
        let eos = token_string(tc.get("eos_token"));
        let mut eos_ids: Vec<u32> = model
            .config()
            .eos_token_id
            .as_ref()
            .map(|e| e.to_vec())
            .unwrap_or_default();
        eos_ids.extend(ids_of(gen.get("eos_token_id")));
        if let Some(id) = eos.as_deref().and_then(|t| tokenizer.token_to_id(t)) {
            eos_ids.push(id);
        }
        eos_ids.sort_unstable();
        eos_ids.dedup();
        tokenizer.eos_ids = eos_ids;
        tokenizer.bos_id = model
            .config()
            .bos_token_id
            .or_else(|| bos.as_deref().and_then(|t| tokenizer.token_to_id(t)));
        let source = match tc.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .or(list.first())
                .and_then(|t| t.get("template"))
                .and_then(|t| t.as_str())
                .map(str::to_string),
            _ => std::fs::read_to_string(dir.join("chat_template.jinja")).ok(),
        };
        let template = Self::template_or_fallback(
            source,
            bos.as_deref().unwrap_or(""),
            eos.as_deref().unwrap_or(""),
            &tc_path,
        )?;
        Ok((tokenizer, template))
    }

    fn template_or_fallback(
        source: Option<String>,
        bos: &str,
        eos: &str,
        path: &Path,
    ) -> Result<ChatTemplate, LoadError> {
        match source {
            Some(t) => ChatTemplate::new(&t, bos, eos, path),
            None => {
                tracing::warn!(path = %path.display(), "no chat template in the model; using ChatML");
                ChatTemplate::new(FALLBACK_TEMPLATE, bos, eos, path)
            }
        }
    }
}

impl LoadedModel {
    /// Writes a Hugging Face model directory: `config.json` (this model's
    /// configuration with `config` entries set over it), `tensors` as
    /// `model.safetensors`, `tokenizer.json` and `tokenizer_config.json` (with
    /// the chat template). Loads back with [`LoadedModel::load`].
    pub fn write_hf(
        &self,
        dir: &Path,
        tensors: &std::collections::HashMap<String, candle_core::Tensor>,
        config: &[(&str, serde_json::Value)],
    ) -> Result<(), crate::lora::AdapterFileError> {
        use crate::lora::AdapterFileError;
        let write = |path: &Path| {
            let path = path.to_path_buf();
            move |source| AdapterFileError::Write { path, source }
        };
        std::fs::create_dir_all(dir).map_err(write(dir))?;
        let weights = dir.join("model.safetensors");
        candle_core::safetensors::save(tensors, &weights).map_err(|source| {
            AdapterFileError::Tensor {
                path: weights.clone(),
                source,
            }
        })?;
        let mut cfg = serde_json::to_value(self.model.config()).expect("config serializes");
        cfg["architectures"] = serde_json::json!(["LlamaForCausalLM"]);
        cfg["model_type"] = serde_json::json!("llama");
        cfg["torch_dtype"] = serde_json::json!("float32");
        for (k, v) in config {
            cfg[*k] = v.clone();
        }
        let path = dir.join("config.json");
        std::fs::write(&path, serde_json::to_vec_pretty(&cfg).expect("json"))
            .map_err(write(&path))?;
        let path = dir.join("tokenizer.json");
        self.tokenizer
            .inner()
            .save(&path, false)
            .map_err(|e| AdapterFileError::Write {
                path: path.clone(),
                source: std::io::Error::other(e.to_string()),
            })?;
        let tc = serde_json::json!({
            "bos_token": self.template.bos_token(),
            "eos_token": self.template.eos_token(),
            "chat_template": self.template.text(),
        });
        let path = dir.join("tokenizer_config.json");
        std::fs::write(&path, serde_json::to_vec_pretty(&tc).expect("json")).map_err(write(&path))
    }
}
