//! The reward model: a LLaMA backbone with a linear `score` head read at the
//! last token of each sequence, as Hugging Face's
//! `LlamaForSequenceClassification` with `num_labels = 1` (the scalar, no
//! sigmoid). Training adds a LoRA adapter on the backbone; saving merges it and
//! writes a directory that loads back here and in `transformers`.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Result, Tensor, Var};

use crate::checkpoint::{Checkpoint, WeightFormat};
use crate::error::LoadError;
use crate::loaded::{LoadOptions, LoadedModel};
use crate::lora::{AdapterFileError, LoraAdapter, LoraConfig, LoraInit};

pub struct RewardModel {
    /// The backbone with dense f32 weights, its tokenizer and chat template.
    pub base: LoadedModel,
    /// `(1, hidden)`.
    head: Var,
    /// Trained on the backbone by `attune train-rm`; merged when saved.
    lora: Option<LoraAdapter>,
}

impl RewardModel {
    /// Loads a `LlamaForSequenceClassification` directory (`score.weight`
    /// of shape `(1, hidden)`).
    pub fn load(dir: &Path, device: &Device) -> std::result::Result<Self, LoadError> {
        let opts = LoadOptions {
            path: dir.to_path_buf(),
            format: WeightFormat::F32,
            device: device.clone(),
        };
        let base = LoadedModel::load(&opts)?;
        let hidden = base.model.config().hidden_size;
        let mut ckpt = Checkpoint::open(dir, device)?;
        let head = ckpt.dense("score.weight", &[1, hidden])?;
        let head =
            Var::from_tensor(
                &head
                    .to_dtype(DType::F32)
                    .map_err(|source| LoadError::Tensor {
                        path: dir.to_path_buf(),
                        source,
                    })?,
            )
            .map_err(|source| LoadError::Tensor {
                path: dir.to_path_buf(),
                source,
            })?;
        Ok(Self {
            base,
            head,
            lora: None,
        })
    }

    /// A reward model to train from a language model: a fresh LoRA adapter on
    /// the backbone and a small random head, deterministic in `seed`.
    pub fn for_training(base: LoadedModel, lora: LoraConfig, seed: u64) -> Result<Self> {
        use rand::{Rng, SeedableRng};
        let cfg = base.model.config().clone();
        let device = base.model.device().clone();
        let adapter = LoraAdapter::new(lora, &cfg, LoraInit::Peft, seed, &device)?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed);
        let bound = 1.0 / (cfg.hidden_size as f32).sqrt();
        let w: Vec<f32> = (0..cfg.hidden_size)
            .map(|_| rng.random_range(-bound..bound))
            .collect();
        let head = Var::from_tensor(&Tensor::from_vec(w, (1, cfg.hidden_size), &device)?)?;
        Ok(Self {
            base,
            head,
            lora: Some(adapter),
        })
    }

    /// The variables training updates: the adapter's and the head.
    pub fn vars(&self) -> Vec<Var> {
        let mut v = self
            .lora
            .as_ref()
            .map(LoraAdapter::vars)
            .unwrap_or_default();
        v.push(self.head.clone());
        v
    }

    /// One reward per token sequence, `(n,)`, differentiable in [`Self::vars`].
    /// Sequences longer than `block_size` keep their last tokens.
    pub fn rewards(&self, seqs: &[Vec<u32>], block_size: usize, train: bool) -> Result<Tensor> {
        let rows: Vec<&[u32]> = seqs
            .iter()
            .map(|s| &s[s.len().saturating_sub(block_size)..])
            .collect();
        if rows.iter().any(|r| r.is_empty()) || rows.is_empty() {
            candle_core::bail!("reward model: empty sequence");
        }
        let t = rows.iter().map(|r| r.len()).max().unwrap_or(0);
        let n = rows.len();
        let mut ids = Vec::with_capacity(n * t);
        let mut last = Vec::with_capacity(n);
        for (i, r) in rows.iter().enumerate() {
            ids.extend_from_slice(r);
            ids.extend(std::iter::repeat_n(0u32, t - r.len()));
            last.push((i * t + r.len() - 1) as u32);
        }
        let device = self.base.model.device();
        let tokens = Tensor::from_vec(ids, (n, t), device)?;
        let hidden = self
            .base
            .model
            .hidden_train(&tokens, self.lora.as_ref(), train)?;
        let h = hidden.dim(2)?;
        let picked = hidden
            .reshape((n * t, h))?
            .index_select(&Tensor::from_vec(last, n, device)?, 0)?;
        picked.matmul(&self.head.as_tensor().t()?)?.squeeze(1)
    }

    /// Writes a `LlamaForSequenceClassification` directory (config, merged
    /// f32 weights with `score.weight`, tokenizer, chat template).
    pub fn save_hf(&self, dir: &Path) -> std::result::Result<(), AdapterFileError> {
        let weights = dir.join("model.safetensors");
        let mut tensors: HashMap<String, Tensor> = self
            .base
            .model
            .hf_tensors(self.lora.as_ref())
            .map_err(|source| AdapterFileError::Tensor {
                path: weights.clone(),
                source,
            })?
            .into_iter()
            .collect();
        tensors.insert("score.weight".into(), self.head.as_tensor().clone());
        let pad = self.base.tokenizer.eos_ids.first().copied();
        self.base.write_hf(
            dir,
            &tensors,
            &[
                (
                    "architectures",
                    serde_json::json!(["LlamaForSequenceClassification"]),
                ),
                ("num_labels", serde_json::json!(1)),
                ("pad_token_id", serde_json::json!(pad)),
            ],
        )
    }
}
