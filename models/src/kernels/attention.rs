//! Causal attention on the CPU straight from the KV cache's memory: one
//! parallel region for every (sequence, head) of a batched step, instead of a
//! dozen small tensor ops per sequence and layer. Query row `i` of a sequence
//! whose cache held `past` positions sees keys `0..=past + i`.

use crate::kernels::SharedOut;

/// A read-only `(heads, positions, head_dim)` view into f32 memory with
/// arbitrary head and position strides (the unit stride is along `head_dim`).
#[derive(Debug, Clone, Copy)]
pub struct HeadsView<'a> {
    pub data: &'a [f32],
    pub offset: usize,
    pub head_stride: usize,
    pub pos_stride: usize,
}

impl HeadsView<'_> {
    #[inline]
    fn row(&self, head: usize, pos: usize, dim: usize) -> &[f32] {
        let start = self.offset + head * self.head_stride + pos * self.pos_stride;
        &self.data[start..start + dim]
    }
}

/// One sequence of the batch: its query rows and its cache.
#[derive(Debug, Clone, Copy)]
pub struct SeqAttention<'a> {
    /// First row of this sequence in the batch's query/output rows.
    pub first_row: usize,
    /// Query rows (new tokens) of this sequence.
    pub len: usize,
    /// Positions cached before this step.
    pub past: usize,
    pub k: HeadsView<'a>,
    pub v: HeadsView<'a>,
}

/// Shapes shared by every sequence of the step.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
}

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent lanes so the compiler vectorises the reduction.
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

/// `q`: `(heads, rows, head_dim)`; `out`: `rows × (heads · head_dim)`, row-major.
pub fn causal_attention(
    q: HeadsView,
    seqs: &[SeqAttention],
    shape: AttentionShape,
    out: &mut [f32],
) {
    let AttentionShape {
        heads,
        kv_heads,
        head_dim,
        scale,
    } = shape;
    let rep = heads / kv_heads;
    let width = heads * head_dim;
    let dst = SharedOut(out.as_mut_ptr());
    let items = seqs.len() * heads;
    candle_core::utils::barrier_pool().execute_chunked(items, |range| {
        let mut scores = Vec::new();
        for item in range {
            let (s, h) = (&seqs[item / heads], item % heads);
            let g = h / rep;
            for i in 0..s.len {
                let row = s.first_row + i;
                let keys = s.past + i + 1;
                let qrow = q.row(h, row, head_dim);
                scores.clear();
                let mut max = f32::NEG_INFINITY;
                for t in 0..keys {
                    let sc = dot(qrow, s.k.row(g, t, head_dim)) * scale;
                    max = max.max(sc);
                    scores.push(sc);
                }
                let mut total = 0f32;
                for sc in scores.iter_mut() {
                    *sc = (*sc - max).exp();
                    total += *sc;
                }
                // SAFETY: (row, head) slots are written by exactly one item, and
                // `out` outlives the parallel region.
                let o = unsafe {
                    std::slice::from_raw_parts_mut(dst.at(row * width + h * head_dim), head_dim)
                };
                o.fill(0.0);
                for (t, &p) in scores.iter().enumerate() {
                    let w = p / total;
                    for (od, &vd) in o.iter_mut().zip(s.v.row(g, t, head_dim)) {
                        *od += w * vd;
                    }
                }
            }
        }
    });
}
