//! Building blocks shared by every model in this crate: frozen linear layers
//! (quantized or dense), RMSNorm, rotary embeddings and the gated MLP. Each has
//! a `forward` for serving (fused kernels, no gradients) and a `forward_train`
//! made only of operations candle can differentiate (candle 0.11's fused
//! `rms_norm`, `rope` and `QMatMul` silently give no gradient).

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{CpuStorage, CustomOp1, Layout, Module, Result, Shape, Tensor, D};

use crate::checkpoint::{concat_qtensor_rows, LinearWeight};
use crate::kernels::q8_0::Q8Matrix;

/// Whether candle's repacked Q8_0 kernels (AVX-512 VNNI or AVX-VNNI) are
/// available here; they need the inner dimension to be a multiple of 256.
fn vnni_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512vnni")
            || std::arch::is_x86_feature_detected!("avxvnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// How a frozen weight is held and multiplied.
#[derive(Debug, Clone)]
enum Weight {
    /// candle's own matmul (dense tensors, quantized types other than Q8_0, GPU).
    Candle(QMatMul),
    /// Q8_0 on the CPU: attune's kernel (per-32 activation quantization).
    Q8(Arc<Q8Matrix>),
}

/// Width candle's repacked quantized kernels work in.
const REPACK_K: usize = 256;

/// A linear layer without bias whose weight never changes after load (quantized
/// or dense). Shared read-only by every user of the model.
#[derive(Debug, Clone)]
pub struct FrozenLinear {
    weight: Weight,
    in_features: usize,
    /// With `WeightFormat::QuantizedVnni`, Q8_0 weights whose width is not a
    /// multiple of 256 are zero-padded so candle's VNNI kernels apply (about 2.5×
    /// the throughput of its generic Q8_0 dot product per byte); inputs are padded
    /// to match. Those kernels quantize activations per 256 values instead of
    /// per 32, which costs accuracy (see the reference tests).
    padded_in: usize,
}

impl FrozenLinear {
    /// `pad_for_vnni`: see `padded_in`.
    pub fn new(weight: LinearWeight, pad_for_vnni: bool) -> Result<Self> {
        match weight {
            LinearWeight::Dense(t) => {
                let in_features = t.dim(1)?;
                Ok(Self {
                    weight: Weight::Candle(QMatMul::Tensor(t)),
                    in_features,
                    padded_in: in_features,
                })
            }
            LinearWeight::Quantized(q) => {
                let (out, in_features) = q.shape().dims2()?;
                if q.dtype() == GgmlDType::Q8_0 && q.device().is_cpu() && !pad_for_vnni {
                    let m = Q8Matrix::from_gguf_bytes(&q.data()?, out, in_features)
                        .map_err(candle_core::Error::msg)?;
                    return Ok(Self {
                        weight: Weight::Q8(Arc::new(m)),
                        in_features,
                        padded_in: in_features,
                    });
                }
                let padded_in = in_features.next_multiple_of(REPACK_K);
                let q = if q.dtype() == GgmlDType::Q8_0
                    && padded_in != in_features
                    && out % 16 == 0
                    && q.device().is_cpu()
                    && pad_for_vnni
                    && vnni_available()
                {
                    let dense = q.dequantize(&q.device())?;
                    let dense = dense.pad_with_zeros(1, 0, padded_in - in_features)?;
                    QTensor::quantize(&dense, GgmlDType::Q8_0)?
                } else {
                    q
                };
                let padded_in = q.shape().dims2()?.1;
                Ok(Self {
                    weight: Weight::Candle(QMatMul::from_arc(Arc::new(q))?),
                    in_features,
                    padded_in,
                })
            }
        }
    }

    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// `xs @ W^T` over the last dimension, any leading shape.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match &self.weight {
            Weight::Q8(m) => {
                let (n, k) = m.shape();
                let mut dims = xs.dims().to_vec();
                let rows = xs.elem_count() / k;
                let x = xs
                    .flatten_all()?
                    .to_dtype(candle_core::DType::F32)?
                    .to_vec1::<f32>()?;
                let mut out = vec![0f32; rows * n];
                m.matmul(&x, rows, &mut out);
                *dims.last_mut().expect("at least one dimension") = n;
                Tensor::from_vec(out, dims, xs.device())
            }
            Weight::Candle(w) if self.padded_in > self.in_features => {
                let xs = xs.pad_with_zeros(D::Minus1, 0, self.padded_in - self.in_features)?;
                w.forward(&xs)
            }
            Weight::Candle(w) => w.forward(xs),
        }
    }

    /// The dense weight `(out, in)`, when the layer holds one (models loaded
    /// with `WeightFormat::F32`, which training uses).
    fn dense(&self) -> Result<&Tensor> {
        match &self.weight {
            Weight::Candle(QMatMul::Tensor(w)) => Ok(w),
            _ => candle_core::bail!(
                "training needs dense weights: load the model with `WeightFormat::F32` (quantized weights are dequantized then)"
            ),
        }
    }

    /// The dense weight, if the layer holds one.
    pub fn dense_weight(&self) -> Option<&Tensor> {
        self.dense().ok()
    }

    /// `xs @ W^T`, differentiable; with `input_grad_only` the backward computes
    /// the input's gradient alone (see [`FrozenMatmul`]).
    pub fn forward_train(&self, xs: &Tensor, input_grad_only: bool) -> Result<Tensor> {
        let w = self.dense()?;
        if xs.device().is_cpu() && input_grad_only {
            xs.contiguous()?.apply_op1(FrozenMatmul { w: w.clone() })
        } else {
            // No custom kernel off the CPU yet: plain matmul, whose backward also
            // computes (and then drops) a gradient for the frozen weight.
            xs.broadcast_matmul(&w.t()?)
        }
    }
}

/// `x @ Wᵀ` for a frozen `W`, whose backward computes only `∂L/∂x = g @ W`.
/// candle's matmul backward always computes the weight's gradient too, even
/// for a constant; for a frozen model that is a weight-sized buffer per linear
/// layer per step (about 740 MiB for the 135M model at batch 4 × 128) and a
/// second matmul, both thrown away.
struct FrozenMatmul {
    /// `(out, in)`.
    w: Tensor,
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = layout.shape().dims();
        let k = *dims.last().unwrap_or(&0);
        let (out, inp) = self.w.dims2()?;
        if k != inp {
            candle_core::bail!("frozen-matmul: input width {k}, weight is ({out}, {inp})");
        }
        let data = storage.as_slice::<f32>()?;
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("frozen-matmul: the input must be contiguous");
        };
        let rows = layout.shape().elem_count() / k.max(1);
        let x = Tensor::from_slice(&data[start..end], (rows, k), self.w.device())?;
        let y = x.matmul(&self.w.t()?)?.flatten_all()?.to_vec1::<f32>()?;
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("at least one dimension") = out;
        Ok((CpuStorage::F32(y), Shape::from(out_dims)))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let g = grad_res.broadcast_matmul(&self.w)?;
        Ok(Some(g.reshape(arg.shape())?))
    }
}

/// Projections that read the same input (q/k/v, gate/up), fused into one
/// matmul when their weights allow it; `forward` returns one output per
/// projection either way.
#[derive(Debug, Clone)]
pub struct LinearGroup {
    linears: Vec<FrozenLinear>,
    /// Output width of each projection.
    outs: Vec<usize>,
}

impl LinearGroup {
    pub fn new(weights: Vec<LinearWeight>, pad_for_vnni: bool) -> Result<Self> {
        let mut outs = Vec::with_capacity(weights.len());
        for w in &weights {
            outs.push(match w {
                LinearWeight::Dense(t) => t.dim(0)?,
                LinearWeight::Quantized(q) => q.shape().dims2()?.0,
            });
        }
        let fused = match weights.as_slice() {
            [] | [_] => None,
            ws if ws.iter().all(|w| matches!(w, LinearWeight::Dense(_))) => {
                let ts: Vec<&Tensor> = ws
                    .iter()
                    .map(|w| match w {
                        LinearWeight::Dense(t) => t,
                        LinearWeight::Quantized(_) => unreachable!("all dense"),
                    })
                    .collect();
                Some(LinearWeight::Dense(Tensor::cat(&ts, 0)?))
            }
            ws if ws.iter().all(|w| matches!(w, LinearWeight::Quantized(_))) => {
                let qs: Vec<&QTensor> = ws
                    .iter()
                    .map(|w| match w {
                        LinearWeight::Quantized(q) => q,
                        LinearWeight::Dense(_) => unreachable!("all quantized"),
                    })
                    .collect();
                concat_qtensor_rows(&qs)?.map(LinearWeight::Quantized)
            }
            _ => None,
        };
        let linears = match fused {
            Some(w) => vec![FrozenLinear::new(w, pad_for_vnni)?],
            None => weights
                .into_iter()
                .map(|w| FrozenLinear::new(w, pad_for_vnni))
                .collect::<Result<_>>()?,
        };
        Ok(Self { linears, outs })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Vec<Tensor>> {
        self.run(|l| l.forward(xs))
    }

    /// One output per projection: each layer's, or the fused layer's split.
    fn run(&self, forward: impl Fn(&FrozenLinear) -> Result<Tensor>) -> Result<Vec<Tensor>> {
        if self.linears.len() == self.outs.len() {
            return self.linears.iter().map(forward).collect();
        }
        let y = forward(&self.linears[0])?;
        let mut start = 0;
        let mut parts = Vec::with_capacity(self.outs.len());
        for &n in &self.outs {
            parts.push(y.narrow(D::Minus1, start, n)?);
            start += n;
        }
        Ok(parts)
    }

    /// Output width of each projection.
    pub fn outs(&self) -> &[usize] {
        &self.outs
    }

    /// The layers it holds (one when fused).
    pub fn linears(&self) -> &[FrozenLinear] {
        &self.linears
    }

    /// [`LinearGroup::forward`], differentiable (see [`FrozenLinear::forward_train`]).
    pub fn forward_train(&self, xs: &Tensor, input_grad_only: bool) -> Result<Vec<Tensor>> {
        self.run(|l| l.forward_train(xs, input_grad_only))
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

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// Differentiable: a fused CPU op with its own backward, elementary ops
    /// elsewhere.
    pub fn forward_train(&self, xs: &Tensor) -> Result<Tensor> {
        if xs.device().is_cpu() && xs.dtype() == candle_core::DType::F32 {
            xs.contiguous()?
                .apply_op1(crate::kernels::autograd::RmsNormOp {
                    weight: self.weight.to_dtype(candle_core::DType::F32)?,
                    eps: self.eps,
                })
        } else {
            candle_nn::ops::rms_norm_slow(xs, &self.weight, self.eps)
        }
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

    /// Differentiable: rotates `xs` of shape `(batch, heads, positions, head_dim)`.
    pub fn apply_train(xs: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        if xs.device().is_cpu() && xs.dtype() == candle_core::DType::F32 {
            xs.contiguous()?
                .apply_op1(crate::kernels::autograd::RopeOp {
                    cos: cos.clone(),
                    sin: sin.clone(),
                })
        } else {
            candle_nn::rotary_emb::rope_slow(xs, cos, sin)
        }
    }
}

/// The SwiGLU feed-forward block: `down(silu(gate(x)) * up(x))`.
#[derive(Debug, Clone)]
pub struct Mlp {
    /// `[gate, up]`.
    pub gate_up: LinearGroup,
    pub down: FrozenLinear,
}

impl Mlp {
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.forward_adapted(xs, |_, _, y| Ok(y))
    }

    /// `forward` with `adapt(target, input, output)` applied to each
    /// projection's output (LoRA updates).
    pub fn forward_adapted(
        &self,
        xs: &Tensor,
        adapt: impl Fn(crate::lora::LoraTarget, &Tensor, Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        use crate::lora::LoraTarget;
        let gu = self.gate_up.forward(xs)?;
        let gate = adapt(LoraTarget::Gate, xs, gu[0].clone())?;
        let up = adapt(LoraTarget::Up, xs, gu[1].clone())?;
        let act = (candle_nn::ops::silu(&gate)? * up)?;
        adapt(LoraTarget::Down, &act, self.down.forward(&act)?)
    }
}
