//! Tiny random LLaMA models written to disk in both formats (a Hugging Face
//! directory with safetensors, and a GGUF file laid out as llama.cpp writes it),
//! with a byte-level tokenizer and a ChatML template. Tests across the workspace
//! use them to exercise every loading and serving path in seconds.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::{gguf_file::Value, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};

use crate::llama::LlamaConfig;
use crate::tokenizer::TextTokenizer;

pub const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Special tokens of the tiny vocabulary, after the 256 byte tokens.
pub const SPECIAL: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// A tiny model's shape.
#[derive(Debug, Clone, Copy)]
pub struct TinySpec {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub intermediate: usize,
    pub tied: bool,
    pub seed: u64,
}

impl Default for TinySpec {
    fn default() -> Self {
        Self {
            hidden: 64,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            intermediate: 128,
            tied: true,
            seed: 1,
        }
    }
}

/// The tiny model's weights in Hugging Face names and layout, and its config.
pub struct TinyModel {
    pub config: LlamaConfig,
    pub tensors: Vec<(String, Tensor)>,
    tokens: Vec<String>,
    merges: Vec<String>,
}

fn byte_alphabet() -> Vec<String> {
    // GPT-2's byte-to-unicode map, in byte order.
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut chars: Vec<u32> = printable.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(256 + n);
            n += 1;
        }
    }
    let mut pairs: Vec<(u32, u32)> = printable.into_iter().zip(chars).collect();
    pairs.sort();
    pairs
        .into_iter()
        .map(|(_, c)| char::from_u32(c).expect("valid char").to_string())
        .collect()
}

impl TinyModel {
    pub fn new(spec: TinySpec) -> Self {
        let mut tokens = byte_alphabet();
        // A few merges so BPE has work to do: "Ġt", "he", "Ġthe".
        let merges = vec!["Ġ t".to_string(), "h e".to_string(), "Ġt he".to_string()];
        tokens.extend(["Ġt", "he", "Ġthe"].map(String::from));
        tokens.extend(SPECIAL.map(String::from));
        let vocab = tokens.len() + 3; // padded, as real checkpoints often are
        let head_dim = spec.hidden / spec.heads;
        let config: LlamaConfig = serde_json::from_value(serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": vocab,
            "hidden_size": spec.hidden,
            "intermediate_size": spec.intermediate,
            "num_hidden_layers": spec.layers,
            "num_attention_heads": spec.heads,
            "num_key_value_heads": spec.kv_heads,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "max_position_embeddings": 256,
            "tie_word_embeddings": spec.tied,
            "bos_token_id": 256 + 3,
            "eos_token_id": (tokens.len() - 1) as u32,
        }))
        .expect("valid tiny config");
        let mut rng = rand::rngs::StdRng::seed_from_u64(spec.seed);
        let mut rand_t = |shape: &[usize], scale: f32| {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n).map(|_| rng.random_range(-scale..scale)).collect();
            Tensor::from_vec(v, shape, &Device::Cpu).expect("tensor")
        };
        let (h, i, kv) = (spec.hidden, spec.intermediate, spec.kv_heads * head_dim);
        let mut tensors = vec![(
            "model.embed_tokens.weight".to_string(),
            rand_t(&[vocab, h], 1.0),
        )];
        for l in 0..spec.layers {
            let p = format!("model.layers.{l}");
            let w = 1.0 / (h as f32).sqrt();
            tensors.push((format!("{p}.self_attn.q_proj.weight"), rand_t(&[h, h], w)));
            tensors.push((format!("{p}.self_attn.k_proj.weight"), rand_t(&[kv, h], w)));
            tensors.push((format!("{p}.self_attn.v_proj.weight"), rand_t(&[kv, h], w)));
            tensors.push((format!("{p}.self_attn.o_proj.weight"), rand_t(&[h, h], w)));
            tensors.push((format!("{p}.mlp.gate_proj.weight"), rand_t(&[i, h], w)));
            tensors.push((format!("{p}.mlp.up_proj.weight"), rand_t(&[i, h], w)));
            tensors.push((
                format!("{p}.mlp.down_proj.weight"),
                rand_t(&[h, i], 1.0 / (i as f32).sqrt()),
            ));
            let norm = (rand_t(&[h], 0.2) + 1.0).expect("norm");
            tensors.push((format!("{p}.input_layernorm.weight"), norm.clone()));
            tensors.push((format!("{p}.post_attention_layernorm.weight"), norm));
        }
        tensors.push((
            "model.norm.weight".into(),
            (rand_t(&[h], 0.2) + 1.0).expect("norm"),
        ));
        if !spec.tied {
            tensors.push((
                "lm_head.weight".into(),
                rand_t(&[vocab, h], 1.0 / (h as f32).sqrt()),
            ));
        }
        Self {
            config,
            tensors,
            tokens,
            merges,
        }
    }

    fn gguf_metadata(&self) -> Vec<(String, Value)> {
        let c = &self.config;
        let strings =
            |v: &[String]| Value::Array(v.iter().map(|s| Value::String(s.clone())).collect());
        let types: Vec<Value> = self
            .tokens
            .iter()
            .map(|t| Value::I32(if SPECIAL.contains(&t.as_str()) { 3 } else { 1 }))
            .collect();
        vec![
            ("general.architecture".into(), Value::String("llama".into())),
            (
                "llama.block_count".into(),
                Value::U32(c.num_hidden_layers as u32),
            ),
            (
                "llama.context_length".into(),
                Value::U32(c.max_position_embeddings as u32),
            ),
            (
                "llama.embedding_length".into(),
                Value::U32(c.hidden_size as u32),
            ),
            (
                "llama.feed_forward_length".into(),
                Value::U32(c.intermediate_size as u32),
            ),
            (
                "llama.attention.head_count".into(),
                Value::U32(c.num_attention_heads as u32),
            ),
            (
                "llama.attention.head_count_kv".into(),
                Value::U32(c.num_kv_heads() as u32),
            ),
            (
                "llama.rope.freq_base".into(),
                Value::F32(c.rope_theta as f32),
            ),
            (
                "llama.attention.layer_norm_rms_epsilon".into(),
                Value::F32(c.rms_norm_eps as f32),
            ),
            ("llama.vocab_size".into(), Value::U32(c.vocab_size as u32)),
            ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
            ("tokenizer.ggml.pre".into(), Value::String("smollm".into())),
            ("tokenizer.ggml.tokens".into(), strings(&self.tokens)),
            ("tokenizer.ggml.merges".into(), strings(&self.merges)),
            ("tokenizer.ggml.token_type".into(), Value::Array(types)),
            (
                "tokenizer.ggml.bos_token_id".into(),
                Value::U32(self.tokens.len() as u32 - 3),
            ),
            (
                "tokenizer.ggml.eos_token_id".into(),
                Value::U32(self.tokens.len() as u32 - 1),
            ),
            (
                "tokenizer.chat_template".into(),
                Value::String(CHATML.into()),
            ),
        ]
    }

    /// The tokenizer both formats carry.
    pub fn tokenizer(&self) -> TextTokenizer {
        let md: HashMap<String, Value> = self.gguf_metadata().into_iter().collect();
        TextTokenizer::from_gguf(&md, Path::new("tiny.gguf")).expect("tiny tokenizer builds")
    }

    /// Writes `config.json`, `model.safetensors`, `tokenizer.json` and
    /// `tokenizer_config.json` into `dir`.
    pub fn write_hf(&self, dir: &Path) -> anyhow_free::Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(
            dir.join("config.json"),
            serde_json::to_vec_pretty(&self.config)?,
        )?;
        let map: HashMap<String, Tensor> = self.tensors.iter().cloned().collect();
        candle_core::safetensors::save(&map, dir.join("model.safetensors"))?;
        self.tokenizer()
            .inner()
            .save(dir.join("tokenizer.json"), false)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let tc = serde_json::json!({
            "bos_token": SPECIAL[1], "eos_token": SPECIAL[2], "chat_template": CHATML,
        });
        std::fs::write(
            dir.join("tokenizer_config.json"),
            serde_json::to_vec_pretty(&tc)?,
        )?;
        Ok(())
    }

    /// Writes a GGUF file: llama.cpp names, `q_proj`/`k_proj` rows permuted as
    /// llama.cpp's converter does, linear weights stored as `dtype`.
    pub fn write_gguf(&self, path: &Path, dtype: GgmlDType) -> anyhow_free::Result<()> {
        let c = &self.config;
        let hd = c.head_dim();
        let mut qtensors = Vec::new();
        for (name, t) in &self.tensors {
            let heads = if name.ends_with("q_proj.weight") {
                Some(c.num_attention_heads)
            } else if name.ends_with("k_proj.weight") {
                Some(c.num_kv_heads())
            } else {
                None
            };
            let t = match heads {
                Some(n) => {
                    // gguf row h*hd + 2i + j holds hf row h*hd + j*hd/2 + i.
                    let idx: Vec<u32> = (0..n * hd)
                        .map(|r| {
                            let (h, rest) = (r / hd, r % hd);
                            (h * hd + (rest % 2) * (hd / 2) + rest / 2) as u32
                        })
                        .collect();
                    t.index_select(&Tensor::new(idx, &Device::Cpu)?, 0)?
                }
                None => t.clone(),
            };
            let is_linear = t.rank() == 2 && !name.contains("embed_tokens");
            let q = QTensor::quantize(&t, if is_linear { dtype } else { GgmlDType::F32 })?;
            qtensors.push((crate::checkpoint::gguf_name(name), q));
        }
        let md = self.gguf_metadata();
        let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let t_refs: Vec<(&str, &QTensor)> = qtensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
        candle_core::quantized::gguf_file::write(&mut f, &md_refs, &t_refs)?;
        Ok(())
    }
}

/// A minimal boxed error so this module needs no `anyhow`.
pub mod anyhow_free {
    pub type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;
}

/// The default model: `ATTUNE_MODEL`, else the fetch script's cache location.
/// Tests that need it fail loudly when it is absent: `make test` fetches it.
pub fn default_model() -> PathBuf {
    if let Ok(p) = std::env::var("ATTUNE_MODEL") {
        return PathBuf::from(p);
    }
    let cache = std::env::var("ATTUNE_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/attune")
        });
    let p = cache.join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.exists(),
        "default model not found at {}: run scripts/fetch-model.sh (make test does)",
        p.display()
    );
    p
}

/// The project's shared folder (design, reference values, data): `ATTUNE_SHARED_DIR`,
/// else `../shared` beside the checkout, else `/work/shared`.
pub fn shared_dir() -> PathBuf {
    if let Ok(p) = std::env::var("ATTUNE_SHARED_DIR") {
        return PathBuf::from(p);
    }
    let beside = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared");
    if beside.exists() {
        return beside;
    }
    let fixed = PathBuf::from("/work/shared");
    assert!(
        fixed.exists(),
        "the shared folder (reference values) is neither at {} nor at {}: set ATTUNE_SHARED_DIR",
        beside.display(),
        fixed.display()
    );
    fixed
}

pub fn reference() -> serde_json::Value {
    let p = shared_dir().join("reference/smollm2.json");
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap()
}
