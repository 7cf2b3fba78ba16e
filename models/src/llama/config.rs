//! The LLaMA-family configuration: read from a Hugging Face `config.json` or from
//! GGUF metadata (`llama.*` keys), validated once.

use serde::{Deserialize, Serialize};

/// `rope_scaling` as Hugging Face writes it. Only the LLaMA-3 style (`rope_type =
/// "llama3"`) and plain linear scaling change the frequencies.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeScaling {
    #[serde(alias = "type")]
    pub rope_type: String,
    #[serde(default = "one")]
    pub factor: f64,
    #[serde(default = "one")]
    pub low_freq_factor: f64,
    #[serde(default = "four")]
    pub high_freq_factor: f64,
    #[serde(default)]
    pub original_max_position_embeddings: Option<usize>,
}

fn one() -> f64 {
    1.0
}
fn four() -> f64 {
    4.0
}
fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_eps() -> f64 {
    1e-6
}
fn default_max_pos() -> usize {
    2048
}

/// One or several end-of-sequence ids (LLaMA-3 lists several).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

/// The hyper-parameters of a LLaMA 1/2/3 model, field names as in `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    #[serde(default)]
    pub architectures: Vec<String>,
    #[serde(default)]
    pub model_type: Option<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
}

impl LlamaConfig {
    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Checks the invariants the forward pass relies on; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(arch) = self.architectures.first() {
            if !matches!(
                arch.as_str(),
                "LlamaForCausalLM" | "LlamaForSequenceClassification" | "LlamaModel"
            ) {
                return Err(format!("architecture `{arch}` is not a LLaMA model"));
            }
        }
        if let Some(mt) = &self.model_type {
            if mt != "llama" {
                return Err(format!("model_type `{mt}` is not `llama`"));
            }
        }
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_kv_heads()),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(format!("`{name}` must be positive"));
            }
        }
        if !self.num_attention_heads.is_multiple_of(self.num_kv_heads()) {
            return Err(format!(
                "`num_attention_heads` ({}) must be a multiple of `num_key_value_heads` ({})",
                self.num_attention_heads,
                self.num_kv_heads()
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(format!("head dimension {} must be even", self.head_dim()));
        }
        if self.rms_norm_eps.is_nan()
            || self.rms_norm_eps <= 0.0
            || self.rope_theta.is_nan()
            || self.rope_theta <= 0.0
        {
            return Err("`rms_norm_eps` and `rope_theta` must be positive".into());
        }
        if let Some(rs) = &self.rope_scaling {
            if !matches!(rs.rope_type.as_str(), "llama3" | "linear" | "default") {
                return Err(format!(
                    "`rope_scaling.rope_type` `{}` is not supported (llama3, linear)",
                    rs.rope_type
                ));
            }
            if rs.factor.is_nan() || rs.factor <= 0.0 {
                return Err("`rope_scaling.factor` must be positive".into());
            }
        }
        Ok(())
    }

    /// The rotary inverse frequencies, one per pair of head dimensions, with
    /// LLaMA-3 or linear scaling applied.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let dim = self.head_dim();
        let base: Vec<f64> = (0..dim / 2)
            .map(|i| 1.0 / self.rope_theta.powf(2.0 * i as f64 / dim as f64))
            .collect();
        let scaled: Vec<f64> = match &self.rope_scaling {
            Some(rs) if rs.rope_type == "llama3" => {
                let original = rs
                    .original_max_position_embeddings
                    .unwrap_or(self.max_position_embeddings) as f64;
                let low_wavelen = original / rs.low_freq_factor;
                let high_wavelen = original / rs.high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / rs.factor
                        } else {
                            let smooth = (original / wavelen - rs.low_freq_factor)
                                / (rs.high_freq_factor - rs.low_freq_factor);
                            (1.0 - smooth) * f / rs.factor + smooth * f
                        }
                    })
                    .collect()
            }
            Some(rs) if rs.rope_type == "linear" => base.iter().map(|f| f / rs.factor).collect(),
            _ => base,
        };
        scaled.into_iter().map(|f| f as f32).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> LlamaConfig {
        serde_json::from_str(
            r#"{"vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
                "num_hidden_layers": 1, "num_attention_heads": 2}"#,
        )
        .unwrap()
    }

    #[test]
    fn defaults_fill_missing_fields_like_transformers() {
        let c = tiny();
        assert_eq!(c.num_kv_heads(), 2);
        assert_eq!(c.head_dim(), 4);
        assert_eq!(c.rope_theta, 10_000.0);
        assert!(!c.tie_word_embeddings);
        c.validate().unwrap();
    }

    #[test]
    fn validation_names_the_offending_field() {
        let mut c = tiny();
        c.num_key_value_heads = Some(3);
        assert!(c.validate().unwrap_err().contains("num_key_value_heads"));
        let mut c = tiny();
        c.model_type = Some("mistral".into());
        assert!(c.validate().unwrap_err().contains("mistral"));
    }

    #[test]
    fn llama3_scaling_keeps_high_frequencies_and_divides_low_ones() {
        let mut c = tiny();
        c.hidden_size = 256;
        c.num_attention_heads = 2;
        c.rope_theta = 500_000.0;
        c.rope_scaling = Some(RopeScaling {
            rope_type: "llama3".into(),
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: Some(8192),
        });
        let plain = LlamaConfig {
            rope_scaling: None,
            ..c.clone()
        }
        .rope_inv_freq();
        let scaled = c.rope_inv_freq();
        assert_eq!(scaled[0], plain[0]);
        let last = plain.len() - 1;
        assert!((scaled[last] - plain[last] / 8.0).abs() < 1e-12);
    }
}
