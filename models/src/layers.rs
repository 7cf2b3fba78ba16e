//! Building blocks shared by every model in this crate: frozen linear layers
//! (quantized or dense), RMSNorm, rotary embeddings and the gated MLP.

use candle_core::quantized::QMatMul;
use candle_core::{Module, Result, Tensor};

/// A linear layer without bias whose weight never changes after load (quantized
/// or dense). Shared read-only by every user of the model.
#[derive(Debug, Clone)]
pub struct FrozenLinear {
    weight: QMatMul,
}

impl FrozenLinear {
    pub fn new(weight: QMatMul) -> Self {
        Self { weight }
    }

    pub fn weight(&self) -> &QMatMul {
        &self.weight
    }

    /// `xs @ W^T` over the last dimension, any leading shape.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.weight.forward(xs)
    }
}

/// Root-mean-square layer norm with a learned scale.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    pub fn new(weight: Tensor, eps: f64) -> Self {
        Self {
            weight,
            eps: eps as f32,
        }
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        candle_nn::ops::rms_norm(xs, &self.weight, self.eps)
    }
}

/// Rotary position embedding in the Hugging Face layout (each head's first half
/// rotated against its second half).
#[derive(Debug, Clone)]
pub struct Rotary {
    /// `(1, head_dim / 2)` inverse frequencies.
    inv_freq: Tensor,
}

impl Rotary {
    pub fn new(inv_freq: &[f32], device: &candle_core::Device) -> Result<Self> {
        let inv_freq = Tensor::from_slice(inv_freq, (1, inv_freq.len()), device)?;
        Ok(Self { inv_freq })
    }

    /// `(cos, sin)`, each `(positions.len(), head_dim / 2)`, one row per position.
    pub fn cos_sin(&self, positions: &[u32]) -> Result<(Tensor, Tensor)> {
        let pos: Vec<f32> = positions.iter().map(|&p| p as f32).collect();
        let pos = Tensor::from_vec(pos, (positions.len(), 1), self.inv_freq.device())?;
        let freqs = pos.broadcast_mul(&self.inv_freq)?;
        Ok((freqs.cos()?, freqs.sin()?))
    }

    /// Rotates `xs` of shape `(heads, rows, head_dim)`; row `r` uses row `r` of
    /// `cos`/`sin`.
    pub fn apply(xs: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        candle_nn::rotary_emb::rope(&xs.unsqueeze(0)?.contiguous()?, cos, sin)?.squeeze(0)
    }
}

/// The SwiGLU feed-forward block: `down(silu(gate(x)) * up(x))`.
#[derive(Debug, Clone)]
pub struct Mlp {
    pub gate: FrozenLinear,
    pub up: FrozenLinear,
    pub down: FrozenLinear,
}

impl Mlp {
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let gate = candle_nn::ops::silu(&self.gate.forward(xs)?)?;
        self.down.forward(&(gate * self.up.forward(xs)?)?)
    }
}
