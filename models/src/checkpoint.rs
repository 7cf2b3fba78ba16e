//! Weight loading: one `Checkpoint` over either a GGUF file or a Hugging Face
//! directory (`config.json` plus `*.safetensors`, sharded or not). Callers ask for
//! tensors by their Hugging Face names; GGUF names are mapped here, and the
//! llama.cpp row permutation of `q_proj`/`k_proj` is undone so that both formats
//! give the same weights (and PEFT adapters apply to either).

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::quantized::{gguf_file, GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};

use crate::error::LoadError;
use crate::llama::config::{LlamaConfig, RopeScaling, TokenIds};

/// How linear-layer weights are held in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightFormat {
    /// Keep GGUF quantizations (serving). Types whose CPU dot product in candle is a
    /// scalar loop (Q4_1, Q5_0, Q5_1) are requantized to Q8_0 at load.
    #[default]
    Quantized,
    /// As `Quantized`, and Q8_0 weights are zero-padded to a width that is a
    /// multiple of 256 so candle's AVX-512/AVX VNNI kernels apply: faster on CPUs
    /// with VNNI, slightly less exact (activations quantized per 256 values).
    QuantizedVnni,
    /// Dequantize everything to f32 (reference checks, training).
    F32,
}

impl std::str::FromStr for WeightFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "quantized" => Ok(Self::Quantized),
            "quantized-vnni" => Ok(Self::QuantizedVnni),
            "f32" => Ok(Self::F32),
            other => Err(format!(
                "unknown weight format `{other}` (quantized, quantized-vnni, f32)"
            )),
        }
    }
}

enum Source {
    Gguf {
        content: gguf_file::Content,
        reader: BufReader<File>,
    },
    Safetensors {
        tensors: candle_core::safetensors::MmapedSafetensors,
        config: LlamaConfig,
    },
}

/// A linear layer's weight as loaded, `(out, in)`: still quantized, or dense.
#[derive(Debug)]
pub enum LinearWeight {
    Quantized(QTensor),
    Dense(Tensor),
}

/// An opened model checkpoint.
pub struct Checkpoint {
    path: PathBuf,
    source: Source,
    device: Device,
}

/// Maps a Hugging Face LLaMA tensor name to its GGUF name.
pub fn gguf_name(hf: &str) -> String {
    let hf = hf.strip_prefix("model.").unwrap_or(hf);
    if let Some(rest) = hf.strip_prefix("layers.") {
        let (idx, tail) = rest.split_once('.').unwrap_or((rest, ""));
        let tail = match tail {
            "self_attn.q_proj.weight" => "attn_q.weight",
            "self_attn.k_proj.weight" => "attn_k.weight",
            "self_attn.v_proj.weight" => "attn_v.weight",
            "self_attn.o_proj.weight" => "attn_output.weight",
            "mlp.gate_proj.weight" => "ffn_gate.weight",
            "mlp.up_proj.weight" => "ffn_up.weight",
            "mlp.down_proj.weight" => "ffn_down.weight",
            "input_layernorm.weight" => "attn_norm.weight",
            "post_attention_layernorm.weight" => "ffn_norm.weight",
            other => other,
        };
        return format!("blk.{idx}.{tail}");
    }
    match hf {
        "embed_tokens.weight" => "token_embd.weight".into(),
        "norm.weight" => "output_norm.weight".into(),
        "lm_head.weight" => "output.weight".into(),
        other => other.into(),
    }
}

/// Row order llama.cpp's converter gives `q_proj`/`k_proj` (pairs interleaved per
/// head); `perm[hf_row] = gguf_row`.
fn unpermute_rows(n_rows: usize, n_heads: usize) -> Vec<usize> {
    let head_dim = n_rows / n_heads;
    let half = head_dim / 2;
    let mut perm = vec![0; n_rows];
    for h in 0..n_heads {
        for j in 0..2 {
            for i in 0..half {
                perm[h * head_dim + j * half + i] = h * head_dim + 2 * i + j;
            }
        }
    }
    perm
}

/// Reorders the rows (outer dimension) of a 2-D quantized tensor without touching
/// its blocks: GGUF blocks never span rows.
fn permute_qtensor_rows(t: &QTensor, perm: &[usize]) -> candle_core::Result<QTensor> {
    let (rows, cols) = t.shape().dims2()?;
    let dtype = t.dtype();
    let row_bytes = cols / dtype.block_size() * dtype.type_size();
    let data = t.data()?;
    let mut out = Vec::with_capacity(rows * row_bytes);
    for &src in perm {
        out.extend_from_slice(&data[src * row_bytes..(src + 1) * row_bytes]);
    }
    let storage = QStorage::from_data(Cow::Owned(out), &t.device(), dtype)?;
    QTensor::new(storage, (rows, cols))
}

/// Stacks 2-D quantized tensors of one type and width by rows (fusing
/// projections that read the same input). `None` if types or widths differ.
pub fn concat_qtensor_rows(parts: &[&QTensor]) -> candle_core::Result<Option<QTensor>> {
    let Some(first) = parts.first() else {
        return Ok(None);
    };
    let (dtype, cols) = (first.dtype(), first.shape().dims2()?.1);
    let mut rows = 0;
    let mut bytes = Vec::new();
    for p in parts {
        let (r, c) = p.shape().dims2()?;
        if p.dtype() != dtype || c != cols {
            return Ok(None);
        }
        rows += r;
        bytes.extend_from_slice(&p.data()?);
    }
    let storage = QStorage::from_data(Cow::Owned(bytes), &first.device(), dtype)?;
    Ok(Some(QTensor::new(storage, (rows, cols))?))
}

fn read_json(path: &Path) -> Result<serde_json::Value, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| LoadError::Config {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

impl Checkpoint {
    /// Opens a GGUF file or a Hugging Face model directory.
    pub fn open(path: &Path, device: &Device) -> Result<Self, LoadError> {
        if !path.exists() {
            return Err(LoadError::Missing {
                path: path.to_path_buf(),
            });
        }
        let source = if path.is_dir() {
            Self::open_hf_dir(path)?
        } else {
            Self::open_gguf(path)?
        };
        Ok(Self {
            path: path.to_path_buf(),
            source,
            device: device.clone(),
        })
    }

    fn open_gguf(path: &Path) -> Result<Source, LoadError> {
        let file = File::open(path).map_err(|source| LoadError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let mut reader = BufReader::new(file);
        let content = gguf_file::Content::read(&mut reader).map_err(|e| {
            let reason = e.to_string();
            if reason.contains("unknown dtype") {
                LoadError::UnsupportedQuant {
                    path: path.to_path_buf(),
                    name: "(see reason)".into(),
                    dtype: reason,
                }
            } else if reason.contains("failed to fill whole buffer") || reason.contains("remaining")
            {
                LoadError::Truncated {
                    path: path.to_path_buf(),
                    reason: format!("header ends early ({len} bytes in file): {reason}"),
                }
            } else {
                LoadError::InvalidGguf {
                    path: path.to_path_buf(),
                    reason,
                }
            }
        })?;
        // Check every tensor fits in the file now, rather than failing half-way.
        let needed = content
            .tensor_infos
            .values()
            .map(|ti| {
                let bytes =
                    ti.shape.elem_count() / ti.ggml_dtype.block_size() * ti.ggml_dtype.type_size();
                content.tensor_data_offset + ti.offset + bytes as u64
            })
            .max()
            .unwrap_or(0);
        if needed > len {
            return Err(LoadError::Truncated {
                path: path.to_path_buf(),
                reason: format!("tensor data needs {needed} bytes, the file has {len}"),
            });
        }
        Ok(Source::Gguf { content, reader })
    }

    fn open_hf_dir(dir: &Path) -> Result<Source, LoadError> {
        let config_path = dir.join("config.json");
        if !config_path.exists() {
            return Err(LoadError::Missing { path: config_path });
        }
        let config: LlamaConfig =
            serde_json::from_value(read_json(&config_path)?).map_err(|e| LoadError::Config {
                path: config_path.clone(),
                reason: e.to_string(),
            })?;
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index.exists() {
            let json = read_json(&index)?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| LoadError::Config {
                    path: index.clone(),
                    reason: "no `weight_map` object".into(),
                })?;
            let mut names: Vec<&str> = map.values().filter_map(|v| v.as_str()).collect();
            names.sort_unstable();
            names.dedup();
            names.into_iter().map(|n| dir.join(n)).collect()
        } else {
            let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
                .map_err(|source| LoadError::Io {
                    path: dir.to_path_buf(),
                    source,
                })?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
                .collect();
            files.sort();
            files
        };
        if files.is_empty() {
            return Err(LoadError::Missing {
                path: dir.join("model.safetensors"),
            });
        }
        for f in &files {
            if !f.exists() {
                return Err(LoadError::Missing { path: f.clone() });
            }
        }
        // SAFETY: the files are memory-mapped read-only; attune never writes model
        // files while serving them.
        let tensors = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&files) }
            .map_err(|e| LoadError::InvalidSafetensors {
                path: files[0].clone(),
                reason: e.to_string(),
            })?;
        Ok(Source::Safetensors { tensors, config })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn is_gguf(&self) -> bool {
        matches!(self.source, Source::Gguf { .. })
    }

    /// GGUF metadata, for the tokenizer and chat template.
    pub fn gguf_metadata(&self) -> Option<&HashMap<String, gguf_file::Value>> {
        match &self.source {
            Source::Gguf { content, .. } => Some(&content.metadata),
            Source::Safetensors { .. } => None,
        }
    }

    fn meta_err(&self, key: &str, problem: impl Into<String>) -> LoadError {
        LoadError::Metadata {
            path: self.path.clone(),
            key: key.into(),
            problem: problem.into(),
        }
    }

    fn tensor_err(&self, source: candle_core::Error) -> LoadError {
        LoadError::Tensor {
            path: self.path.clone(),
            source,
        }
    }

    /// The model configuration: `config.json`, or the GGUF `llama.*` metadata.
    pub fn config(&self) -> Result<LlamaConfig, LoadError> {
        let config = match &self.source {
            Source::Safetensors { config, .. } => config.clone(),
            Source::Gguf { content, .. } => self.gguf_config(content)?,
        };
        config.validate().map_err(|reason| LoadError::Config {
            path: if self.is_gguf() {
                self.path.clone()
            } else {
                self.path.join("config.json")
            },
            reason,
        })?;
        Ok(config)
    }

    fn gguf_config(&self, content: &gguf_file::Content) -> Result<LlamaConfig, LoadError> {
        let md = &content.metadata;
        let arch = match md.get("general.architecture") {
            Some(v) => v
                .to_string()
                .map_err(|_| self.meta_err("general.architecture", "is not a string"))?
                .clone(),
            None => return Err(self.meta_err("general.architecture", "is missing")),
        };
        if arch != "llama" {
            return Err(LoadError::UnsupportedArchitecture {
                path: self.path.clone(),
                arch,
            });
        }
        let get_u = |key: &str| -> Result<Option<usize>, LoadError> {
            match md.get(key) {
                None => Ok(None),
                Some(v) => v
                    .to_u64()
                    .or_else(|_| v.to_u32().map(u64::from))
                    .or_else(|_| v.to_i32().map(|x| x.max(0) as u64))
                    .map(|x| Some(x as usize))
                    .map_err(|_| self.meta_err(key, "is not an integer")),
            }
        };
        let get_f = |key: &str| -> Result<Option<f64>, LoadError> {
            match md.get(key) {
                None => Ok(None),
                Some(v) => v
                    .to_f32()
                    .map(f64::from)
                    .or_else(|_| v.to_f64())
                    .map(Some)
                    .map_err(|_| self.meta_err(key, "is not a number")),
            }
        };
        let need = |key: &str| -> Result<usize, LoadError> {
            get_u(key)?.ok_or_else(|| self.meta_err(key, "is missing"))
        };
        let embd = content
            .tensor_infos
            .get("token_embd.weight")
            .ok_or_else(|| LoadError::MissingTensor {
                path: self.path.clone(),
                name: "token_embd.weight".into(),
            })?;
        let vocab_from_tensor = embd.shape.dims()[0];
        let vocab_size = match get_u("llama.vocab_size")? {
            Some(v) => v,
            None => vocab_from_tensor,
        };
        let n_heads = need("llama.attention.head_count")?;
        let hidden = need("llama.embedding_length")?;
        let head_dim = get_u("llama.attention.key_length")?
            .or(get_u("llama.rope.dimension_count")?)
            .filter(|&d| d != hidden / n_heads.max(1));
        let rope_scaling = match md.get("llama.rope.scaling.type") {
            Some(v) if v.to_string().map(|s| s == "linear").unwrap_or(false) => Some(RopeScaling {
                rope_type: "linear".into(),
                factor: get_f("llama.rope.scaling.factor")?.unwrap_or(1.0),
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: None,
            }),
            _ => None,
        };
        let eos = get_u("tokenizer.ggml.eos_token_id")?.map(|x| TokenIds::One(x as u32));
        Ok(LlamaConfig {
            architectures: vec![],
            model_type: Some("llama".into()),
            vocab_size,
            hidden_size: hidden,
            intermediate_size: need("llama.feed_forward_length")?,
            num_hidden_layers: need("llama.block_count")?,
            num_attention_heads: n_heads,
            num_key_value_heads: get_u("llama.attention.head_count_kv")?,
            head_dim,
            rms_norm_eps: get_f("llama.attention.layer_norm_rms_epsilon")?.unwrap_or(1e-5),
            rope_theta: get_f("llama.rope.freq_base")?.unwrap_or(10_000.0),
            rope_scaling,
            max_position_embeddings: get_u("llama.context_length")?.unwrap_or(2048),
            tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
            bos_token_id: get_u("tokenizer.ggml.bos_token_id")?.map(|x| x as u32),
            eos_token_id: eos,
        })
    }

    /// Whether the checkpoint holds a tensor (by Hugging Face name).
    pub fn contains(&self, hf: &str) -> bool {
        match &self.source {
            Source::Gguf { content, .. } => content.tensor_infos.contains_key(&gguf_name(hf)),
            Source::Safetensors { tensors, .. } => tensors.get(hf).is_ok(),
        }
    }

    /// llama.cpp stores per-dimension rope frequency factors (LLaMA-3.1 style
    /// scaling) as a tensor rather than in metadata.
    pub fn rope_freq_factors(&mut self) -> Result<Option<Vec<f32>>, LoadError> {
        if !matches!(&self.source, Source::Gguf { content, .. } if content.tensor_infos.contains_key("rope_freqs.weight"))
        {
            return Ok(None);
        }
        let t = self.read_qtensor("rope_freqs.weight")?;
        let v = t
            .dequantize(&Device::Cpu)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| self.tensor_err(e))?;
        Ok(Some(v))
    }

    fn read_qtensor(&mut self, gguf: &str) -> Result<QTensor, LoadError> {
        let path = self.path.clone();
        let Source::Gguf { content, reader } = &mut self.source else {
            unreachable!("read_qtensor on a safetensors checkpoint")
        };
        if !content.tensor_infos.contains_key(gguf) {
            return Err(LoadError::MissingTensor {
                path,
                name: gguf.into(),
            });
        }
        content
            .tensor(reader, gguf, &self.device)
            .map_err(|source| LoadError::Tensor { path, source })
    }

    fn check_shape(&self, name: &str, got: &[usize], expected: &[usize]) -> Result<(), LoadError> {
        if got != expected {
            return Err(LoadError::TensorShape {
                path: self.path.clone(),
                name: name.into(),
                got: got.to_vec(),
                expected: expected.to_vec(),
            });
        }
        Ok(())
    }

    fn load_safetensor(&self, hf: &str) -> Result<Tensor, LoadError> {
        let Source::Safetensors { tensors, .. } = &self.source else {
            unreachable!("load_safetensor on a GGUF checkpoint")
        };
        if tensors.get(hf).is_err() {
            return Err(LoadError::MissingTensor {
                path: self.path.clone(),
                name: hf.into(),
            });
        }
        tensors
            .load(hf, &self.device)
            .and_then(|t| t.to_dtype(DType::F32))
            .map_err(|e| self.tensor_err(e))
    }

    /// A dense f32 tensor (norm weights, embeddings), checked against `shape`.
    pub fn dense(&mut self, hf: &str, shape: &[usize]) -> Result<Tensor, LoadError> {
        let t = if self.is_gguf() {
            let name = gguf_name(hf);
            let q = self.read_qtensor(&name)?;
            self.check_shape(&name, q.shape().dims(), shape)?;
            q.dequantize(&self.device).map_err(|e| self.tensor_err(e))?
        } else {
            self.load_safetensor(hf)?
        };
        self.check_shape(hf, t.dims(), shape)?;
        Ok(t)
    }

    /// The weight of a linear layer, `(out, in)`, held as `format` says.
    /// `rope_heads` marks `q_proj`/`k_proj` of a GGUF file, whose rows are
    /// un-permuted back to the Hugging Face order.
    pub fn linear(
        &mut self,
        hf: &str,
        out_in: (usize, usize),
        format: WeightFormat,
        rope_heads: Option<usize>,
    ) -> Result<LinearWeight, LoadError> {
        let expected = [out_in.0, out_in.1];
        if !self.is_gguf() {
            let t = self.load_safetensor(hf)?;
            self.check_shape(hf, t.dims(), &expected)?;
            return Ok(LinearWeight::Dense(t));
        }
        let name = gguf_name(hf);
        let mut q = self.read_qtensor(&name)?;
        self.check_shape(&name, q.shape().dims(), &expected)?;
        if let Some(heads) = rope_heads {
            q = permute_qtensor_rows(&q, &unpermute_rows(out_in.0, heads))
                .map_err(|e| self.tensor_err(e))?;
        }
        let dtype = q.dtype();
        let q = match format {
            WeightFormat::F32 => {
                let t = q.dequantize(&self.device).map_err(|e| self.tensor_err(e))?;
                return Ok(LinearWeight::Dense(t));
            }
            WeightFormat::Quantized | WeightFormat::QuantizedVnni => match dtype {
                GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1 => {
                    let t = q.dequantize(&self.device).map_err(|e| self.tensor_err(e))?;
                    QTensor::quantize(&t, GgmlDType::Q8_0).map_err(|e| self.tensor_err(e))?
                }
                GgmlDType::Q8_1 => {
                    return Err(LoadError::UnsupportedQuant {
                        path: self.path.clone(),
                        name,
                        dtype: format!("{dtype:?}"),
                    })
                }
                // Float tensors stored in GGUF are used dense.
                GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => {
                    let t = q.dequantize(&self.device).map_err(|e| self.tensor_err(e))?;
                    return Ok(LinearWeight::Dense(t));
                }
                _ => q,
            },
        };
        Ok(LinearWeight::Quantized(q))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gguf_names_follow_llama_cpp() {
        assert_eq!(gguf_name("model.embed_tokens.weight"), "token_embd.weight");
        assert_eq!(
            gguf_name("model.layers.12.self_attn.o_proj.weight"),
            "blk.12.attn_output.weight"
        );
        assert_eq!(
            gguf_name("model.layers.0.post_attention_layernorm.weight"),
            "blk.0.ffn_norm.weight"
        );
        assert_eq!(gguf_name("lm_head.weight"), "output.weight");
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permutation() {
        // llama.cpp: reshape(heads, 2, hd/2, ..).swapaxes(1, 2): gguf row h*hd + 2i + j
        // holds hf row h*hd + j*hd/2 + i.
        let perm = unpermute_rows(8, 2);
        assert_eq!(perm, vec![0, 2, 1, 3, 4, 6, 5, 7]);
    }
}
