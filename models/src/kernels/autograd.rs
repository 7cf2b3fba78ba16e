//! Fused operations for the training forward, with hand-written backward
//! passes: RMSNorm with a frozen scale, rotary embedding, and the causal
//! softmax of attention scores. Composed from elementary candle ops they
//! differentiate too, but keep every intermediate alive for the backward pass
//! (seven `(tokens, hidden)` tensors per norm, six per rope, four
//! `(heads, positions, positions)` tensors per softmax); fused, each keeps only
//! its input or its output.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

/// The contiguous f32 data of a custom op's input.
fn input<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [f32]> {
    let data = storage.as_slice::<f32>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{op}: the input must be contiguous"),
    }
}

/// `x / rms(x) * w` over the last dimension, `w` frozen.
pub struct RmsNormOp {
    pub weight: Tensor,
    pub eps: f32,
}

impl CustomOp1 for RmsNormOp {
    fn name(&self) -> &'static str {
        "rms-norm-train"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = input(storage, layout, self.name())?;
        let w = self.weight.to_vec1::<f32>()?;
        let n = w.len();
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(n).zip(x.par_chunks(n)).for_each(|(y, x)| {
            // Accumulated in f64: a long f32 sum drifts enough to show in
            // sums of hundreds of log-probs.
            let ms = x.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / n as f64;
            let r = (1.0 / (ms + self.eps as f64).sqrt()) as f32;
            for ((y, x), w) in y.iter_mut().zip(x).zip(&w) {
                *y = x * r * w;
            }
        });
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    /// With `r = 1/sqrt(mean(x²) + eps)` and `u = g·w`:
    /// `dx = r·u − x·r³·mean(u·x)`.
    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let n = x.dim(D::Minus1)? as f64;
        let r = ((x.sqr()?.sum_keepdim(D::Minus1)? / n)? + self.eps as f64)?
            .sqrt()?
            .recip()?;
        let u = g.broadcast_mul(&self.weight)?;
        let ux = ((&u * x)?.sum_keepdim(D::Minus1)? / n)?;
        let dx = (u.broadcast_mul(&r)? - x.broadcast_mul(&(r.powf(3.0)? * ux)?)?)?;
        Ok(Some(dx))
    }
}

/// Rotary embedding of `(batch, heads, positions, head_dim)` in the Hugging
/// Face layout (first half rotated against the second), with `cos`/`sin` of
/// shape `(positions, head_dim / 2)`.
pub struct RopeOp {
    pub cos: Tensor,
    pub sin: Tensor,
}

impl RopeOp {
    fn apply(&self, x: &[f32], shape: &Shape, sin_sign: f32) -> Result<Vec<f32>> {
        let (_, _, t, d) = shape.dims4()?;
        let half = d / 2;
        let cos = self.cos.flatten_all()?.to_vec1::<f32>()?;
        let sin = self.sin.flatten_all()?.to_vec1::<f32>()?;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(t * d)
            .zip(x.par_chunks(t * d))
            .for_each(|(y, x)| {
                for p in 0..t {
                    let (c, s) = (
                        &cos[p * half..(p + 1) * half],
                        &sin[p * half..(p + 1) * half],
                    );
                    let (x, y) = (&x[p * d..(p + 1) * d], &mut y[p * d..(p + 1) * d]);
                    for i in 0..half {
                        let (a, b) = (x[i], x[i + half]);
                        let s = s[i] * sin_sign;
                        y[i] = a * c[i] - b * s;
                        y[i + half] = b * c[i] + a * s;
                    }
                }
            });
        Ok(y)
    }
}

impl CustomOp1 for RopeOp {
    fn name(&self) -> &'static str {
        "rope-train"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = input(storage, layout, self.name())?;
        let y = self.apply(x, layout.shape(), 1.0)?;
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    /// A rotation's adjoint is the rotation by the opposite angle.
    fn bwd(&self, _x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let g = g.contiguous()?;
        let data = g.flatten_all()?.to_vec1::<f32>()?;
        let dx = self.apply(&data, g.shape(), -1.0)?;
        Ok(Some(Tensor::from_vec(dx, g.shape(), g.device())?))
    }
}

/// `softmax(scale · s)` over the last dimension of attention scores
/// `(…, positions, positions)` with a causal mask: row `i` sees columns `0..=i`.
pub struct CausalSoftmaxOp {
    pub scale: f32,
}

impl CustomOp1 for CausalSoftmaxOp {
    fn name(&self) -> &'static str {
        "causal-softmax-train"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = input(storage, layout, self.name())?;
        let dims = layout.shape().dims();
        let t = *dims.last().unwrap_or(&0);
        if dims.len() < 2 || dims[dims.len() - 2] != t {
            candle_core::bail!(
                "{}: expects square score matrices, got {:?}",
                self.name(),
                dims
            );
        }
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(t * t)
            .zip(x.par_chunks(t * t))
            .for_each(|(y, x)| {
                for i in 0..t {
                    let (x, y) = (&x[i * t..i * t + i + 1], &mut y[i * t..i * t + i + 1]);
                    let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) * self.scale;
                    let mut sum = 0.0;
                    for (y, &x) in y.iter_mut().zip(x) {
                        *y = (x * self.scale - max).exp();
                        sum += *y;
                    }
                    let inv = 1.0 / sum;
                    y.iter_mut().for_each(|v| *v *= inv);
                }
            });
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    /// `dx = scale · y · (g − Σ g·y)`; masked entries have `y = 0`.
    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let dot = (g * y)?.sum_keepdim(D::Minus1)?;
        let dx = (y * g.broadcast_sub(&dot)?)?;
        Ok(Some((dx * self.scale as f64)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn close(a: &Tensor, b: &Tensor, tol: f32) {
        let d: f32 = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(d < tol, "max difference {d}");
    }

    fn random(shape: &[usize], seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-2.0..2.0)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// Forward and gradient of `fused` equal those of the composed `reference`
    /// for a random upstream gradient.
    fn check(x: Tensor, fused: impl Fn(&Tensor) -> Tensor, reference: impl Fn(&Tensor) -> Tensor) {
        let upstream = random(x.dims(), 99);
        let v = Var::from_tensor(&x).unwrap();
        let (yf, yr) = (fused(v.as_tensor()), reference(v.as_tensor()));
        close(&yf, &yr, 1e-5);
        let gf = (yf * &upstream)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gr = (yr * &upstream)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        close(
            gf.get(v.as_tensor()).unwrap(),
            gr.get(v.as_tensor()).unwrap(),
            1e-4,
        );
    }

    #[test]
    fn rms_norm_matches_the_composed_op_and_its_gradient() {
        let w = random(&[8], 1);
        check(
            random(&[3, 5, 8], 2),
            |x| {
                x.apply_op1(RmsNormOp {
                    weight: w.clone(),
                    eps: 1e-5,
                })
                .unwrap()
            },
            |x| candle_nn::ops::rms_norm_slow(x, &w, 1e-5).unwrap(),
        );
    }

    #[test]
    fn rope_matches_the_composed_op_and_its_gradient() {
        let (cos, sin) = (
            random(&[6, 4], 3).cos().unwrap(),
            random(&[6, 4], 3).sin().unwrap(),
        );
        check(
            random(&[2, 3, 6, 8], 4),
            |x| {
                x.apply_op1(RopeOp {
                    cos: cos.clone(),
                    sin: sin.clone(),
                })
                .unwrap()
            },
            |x| candle_nn::rotary_emb::rope_slow(x, &cos, &sin).unwrap(),
        );
    }

    #[test]
    fn causal_softmax_matches_the_composed_op_and_its_gradient() {
        let t = 5;
        let mask: Vec<f32> = (0..t)
            .flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        let mask = Tensor::from_vec(mask, (t, t), &Device::Cpu).unwrap();
        check(
            random(&[2, 3, t, t], 5),
            |x| x.apply_op1(CausalSoftmaxOp { scale: 0.125 }).unwrap(),
            |x| {
                candle_nn::ops::softmax(
                    &(x * 0.125).unwrap().broadcast_add(&mask).unwrap(),
                    D::Minus1,
                )
                .unwrap()
            },
        );
    }
}
