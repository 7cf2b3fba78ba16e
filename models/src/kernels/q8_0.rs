//! Q8_0 matrix × f32 activations on the CPU, for weights of any width that is a
//! multiple of 32. candle's generic Q8_0 path reaches about 2 MACs per cycle
//! here and its fast (VNNI) path needs widths that are multiples of 256 and
//! quantizes activations per 256 values, which costs accuracy. This kernel
//! quantizes activations per 32 values, as ggml does, keeps the weight scales
//! as f32 next to the int8 quants, and shares each weight load across up to
//! four activation rows.

use half::f16;

use crate::kernels::SharedOut;

/// Values per Q8_0 block.
pub const BLOCK: usize = 32;
/// Bytes of one GGUF Q8_0 block: an f16 scale then 32 int8 quants.
const BLOCK_BYTES: usize = 34;
/// Output rows per parallel work item.
const ROWS_PER_TASK: usize = 32;

/// An `(n, k)` Q8_0 matrix, scales and quants stored apart.
#[derive(Debug, Clone)]
pub struct Q8Matrix {
    n: usize,
    k: usize,
    /// `n * k / 32` scales.
    scales: Vec<f32>,
    /// `n * k` quants, row-major.
    quants: Vec<i8>,
}

/// One weight row: its quants and per-block scales.
#[derive(Clone, Copy)]
struct WeightRow<'a> {
    quants: &'a [i8],
    scales: &'a [f32],
}

/// Up to four consecutive activation rows, `first..first + rows`, each `k` wide.
#[derive(Clone, Copy)]
struct ActRows<'a> {
    act: &'a Q8Rows,
    first: usize,
    rows: usize,
    k: usize,
}

/// Activations quantized per 32 values.
struct Q8Rows {
    scales: Vec<f32>,
    quants: Vec<i8>,
}

fn quantize_rows(x: &[f32], m: usize, k: usize) -> Q8Rows {
    let kb = k / BLOCK;
    let mut scales = vec![0f32; m * kb];
    let mut quants = vec![0i8; m * k];
    for (b, (chunk, q)) in x
        .chunks_exact(BLOCK)
        .zip(quants.chunks_exact_mut(BLOCK))
        .enumerate()
    {
        let amax = chunk.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        for (qi, &v) in q.iter_mut().zip(chunk) {
            *qi = (v * id).round() as i8;
        }
        // Rounded through f16 like the weight scales, as ggml stores them.
        scales[b] = f16::from_f32(d).to_f32();
    }
    Q8Rows { scales, quants }
}

impl Q8Matrix {
    /// From the bytes of a GGUF Q8_0 tensor of shape `(n, k)`.
    pub fn from_gguf_bytes(bytes: &[u8], n: usize, k: usize) -> Result<Self, String> {
        if !k.is_multiple_of(BLOCK) || bytes.len() != n * k / BLOCK * BLOCK_BYTES {
            return Err(format!(
                "Q8_0 data of {} bytes does not fit shape ({n}, {k})",
                bytes.len()
            ));
        }
        let blocks = n * k / BLOCK;
        let mut scales = Vec::with_capacity(blocks);
        let mut quants = Vec::with_capacity(n * k);
        for b in bytes.chunks_exact(BLOCK_BYTES) {
            scales.push(f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32());
            quants.extend(b[2..].iter().map(|&q| q as i8));
        }
        Ok(Self {
            n,
            k,
            scales,
            quants,
        })
    }

    pub fn shape(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// `out[i, j] = Σ_l x[i, l] · W[j, l]` for `m` rows of `x` (`m * k` values);
    /// `out` is `m * n`.
    pub fn matmul(&self, x: &[f32], m: usize, out: &mut [f32]) {
        let (n, k) = (self.n, self.k);
        assert_eq!(x.len(), m * k, "activations must be m × k");
        assert_eq!(out.len(), m * n, "output must be m × n");
        let kb = k / BLOCK;
        let act = quantize_rows(x, m, k);
        // Work items own disjoint row ranges of the transposed output (n × m);
        // it is transposed back at the end. candle's own barrier pool runs them,
        // as it runs candle's kernels: one set of spinning workers, no wake-ups.
        let mut out_t = vec![0f32; n * m];
        let dst = SharedOut(out_t.as_mut_ptr());
        let tasks = n.div_ceil(ROWS_PER_TASK);
        candle_core::utils::barrier_pool().execute_chunked(tasks, |range| {
            let rows = range.start * ROWS_PER_TASK..(range.end * ROWS_PER_TASK).min(n);
            for row in rows {
                // SAFETY: each row of `out_t` belongs to exactly one task, and
                // `out_t` outlives this parallel region.
                let out_row = unsafe { std::slice::from_raw_parts_mut(dst.at(row * m), m) };
                let w = WeightRow {
                    quants: &self.quants[row * k..(row + 1) * k],
                    scales: &self.scales[row * kb..(row + 1) * kb],
                };
                let mut i = 0;
                while i < m {
                    let rows = (m - i).min(4);
                    let mut acc = [0f32; 4];
                    let a = ActRows {
                        act: &act,
                        first: i,
                        rows,
                        k,
                    };
                    dot_rows(w, a, &mut acc);
                    out_row[i..i + rows].copy_from_slice(&acc[..rows]);
                    i += rows;
                }
            }
        });
        for (j, col) in out_t.chunks_exact(m).enumerate() {
            for (i, &v) in col.iter().enumerate() {
                out[i * n + j] = v;
            }
        }
    }
}

/// Dot products of one weight row with up to four activation rows.
fn dot_rows(w: WeightRow, a: ActRows, acc: &mut [f32; 4]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports AVX2 and FMA (checked above).
            unsafe { avx2::dot_rows(w, a, acc) };
            return;
        }
    }
    dot_rows_scalar(w, a, acc)
}

fn dot_rows_scalar(w: WeightRow, a: ActRows, acc: &mut [f32; 4]) {
    let (k, kb) = (a.k, a.k / BLOCK);
    for (r, out) in acc.iter_mut().enumerate().take(a.rows) {
        let row = a.first + r;
        let aq = &a.act.quants[row * k..(row + 1) * k];
        let asc = &a.act.scales[row * kb..(row + 1) * kb];
        let mut sum = 0f32;
        for b in 0..kb {
            let s: i32 = (0..BLOCK)
                .map(|l| w.quants[b * BLOCK + l] as i32 * aq[b * BLOCK + l] as i32)
                .sum();
            sum += s as f32 * w.scales[b] * asc[b];
        }
        *out = sum;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{ActRows, WeightRow, BLOCK};
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let hi = _mm256_extractf128_ps(v, 1);
        let lo = _mm256_castps256_ps128(v);
        let s = _mm_add_ps(hi, lo);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// 32 int8 × int8 products summed into 8 i32 lanes, as f32: the sign of
    /// `w` moves onto `a` so `maddubs` (unsigned × signed) applies. Quants are in
    /// [-127, 127], so the i16 pair sums cannot saturate.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot32(w: __m256i, a: __m256i, ones: __m256i) -> __m256 {
        let aw = _mm256_sign_epi8(w, w);
        let sa = _mm256_sign_epi8(a, w);
        let p16 = _mm256_maddubs_epi16(aw, sa);
        _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, ones))
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_rows(w: WeightRow, a: ActRows, acc: &mut [f32; 4]) {
        let (k, kb) = (a.k, a.k / BLOCK);
        let ones = _mm256_set1_epi16(1);
        let mut s = [_mm256_setzero_ps(); 4];
        let aq = a.act.quants.as_ptr().add(a.first * k);
        let asc = a.act.scales.as_ptr().add(a.first * kb);
        for b in 0..kb {
            let wv = _mm256_loadu_si256(w.quants.as_ptr().add(b * BLOCK) as *const __m256i);
            let wd = *w.scales.get_unchecked(b);
            for (r, sr) in s.iter_mut().enumerate().take(a.rows) {
                let av = _mm256_loadu_si256(aq.add(r * k + b * BLOCK) as *const __m256i);
                let d = _mm256_set1_ps(wd * *asc.add(r * kb + b));
                *sr = _mm256_fmadd_ps(d, dot32(wv, av, ones), *sr);
            }
        }
        for r in 0..a.rows {
            acc[r] = hsum(s[r]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q8_bytes(w: &[f32], n: usize, k: usize) -> Vec<u8> {
        let q = quantize_rows(w, n, k);
        let mut out = Vec::new();
        for b in 0..n * k / BLOCK {
            out.extend_from_slice(&f16::from_f32(q.scales[b]).to_bits().to_le_bytes());
            out.extend(
                q.quants[b * BLOCK..(b + 1) * BLOCK]
                    .iter()
                    .map(|&x| x as u8),
            );
        }
        out
    }

    #[test]
    fn matmul_matches_a_plain_f32_product_for_every_row_count() {
        let (n, k) = (37, 96);
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0)
            .collect();
        let m8 = Q8Matrix::from_gguf_bytes(&q8_bytes(&w, n, k), n, k).unwrap();
        for m in [1, 3, 4, 5, 9] {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 104729 % 997) as f32 / 400.0) - 1.2)
                .collect();
            let mut out = vec![0f32; m * n];
            m8.matmul(&x, m, &mut out);
            let act = quantize_rows(&x, m, k);
            for i in 0..m {
                for j in 0..n {
                    let exact: f32 = (0..k).map(|l| x[i * k + l] * w[j * k + l]).sum();
                    let magnitude: f32 = (0..k).map(|l| (x[i * k + l] * w[j * k + l]).abs()).sum();
                    let got = out[i * n + j];
                    // Two 8-bit roundings per product: relative error under 1/127.
                    assert!(
                        (got - exact).abs() <= magnitude / 127.0,
                        "m={m} ({i},{j}): {got} vs {exact}"
                    );
                    let mut scalar = [0f32; 4];
                    let w = WeightRow {
                        quants: &m8.quants[j * k..(j + 1) * k],
                        scales: &m8.scales[j * k / BLOCK..(j + 1) * k / BLOCK],
                    };
                    let a = ActRows {
                        act: &act,
                        first: i,
                        rows: 1,
                        k,
                    };
                    dot_rows_scalar(w, a, &mut scalar);
                    assert!(
                        (scalar[0] - got).abs() <= 1e-4 * magnitude,
                        "SIMD and scalar kernels agree"
                    );
                }
            }
        }
    }
}
