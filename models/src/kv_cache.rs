//! The key/value cache of one sequence: per layer, keys and values of every
//! position seen so far. Each sequence owns its cache, so sequences of different
//! lengths can share a decode step (see `Llama::forward`).

use candle_core::{DType, Device, Result, Tensor};

/// Capacity grows in steps of this many positions, so appends copy rarely.
const GROWTH: usize = 256;

#[derive(Debug, Clone)]
struct LayerKv {
    /// `(kv_heads, capacity, head_dim)`; positions `..len` are valid.
    k: Tensor,
    v: Tensor,
}

/// Per-sequence KV cache, created empty and filled by the model's forward.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<Option<LayerKv>>,
    len: usize,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
            len: 0,
        }
    }

    /// Positions stored (identical across layers after a full forward).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions that fit before the next reallocation.
    pub fn capacity(&self) -> usize {
        // Layers grow in lockstep, so the first one speaks for all.
        match self.layers.first() {
            Some(Some(l)) => l.k.dims()[1],
            _ => 0,
        }
    }

    /// Drops everything, keeping no memory.
    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|l| *l = None);
        self.len = 0;
    }

    /// Appends `k`, `v` (`(kv_heads, new, head_dim)`) to layer `layer` and returns
    /// the valid keys and values, `(kv_heads, len + new, head_dim)`.
    /// The last layer to append advances the length.
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (heads, new, dim) = k.dims3()?;
        let start = self.len;
        let end = start + new;
        let slot = &mut self.layers[layer];
        let need_grow = match slot {
            None => true,
            Some(l) => l.k.dim(1)? < end,
        };
        if need_grow {
            let cap = end.div_ceil(GROWTH) * GROWTH;
            let fresh = |old: Option<&Tensor>, dev: &Device, dt: DType| -> Result<Tensor> {
                let t = Tensor::zeros((heads, cap, dim), dt, dev)?;
                if let Some(old) = old {
                    t.slice_set(&old.narrow(1, 0, start)?.contiguous()?, 1, 0)?;
                }
                Ok(t)
            };
            let (dev, dt) = (k.device().clone(), k.dtype());
            let nk = fresh(slot.as_ref().map(|l| &l.k), &dev, dt)?;
            let nv = fresh(slot.as_ref().map(|l| &l.v), &dev, dt)?;
            *slot = Some(LayerKv { k: nk, v: nv });
        }
        let l = slot.as_ref().expect("layer cache allocated above");
        l.k.slice_set(&k.contiguous()?, 1, start)?;
        l.v.slice_set(&v.contiguous()?, 1, start)?;
        let out = (l.k.narrow(1, 0, end)?, l.v.narrow(1, 0, end)?);
        if layer + 1 == self.layers.len() {
            self.len = end;
        }
        Ok(out)
    }

    /// Bytes held by this cache's tensors.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .map(|l| (l.k.elem_count() + l.v.elem_count()) * l.k.dtype().size_in_bytes())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn append_keeps_earlier_positions_across_growth() {
        let dev = Device::Cpu;
        let mut cache = KvCache::new(1);
        let a = Tensor::arange(0f32, 2.0 * 300.0 * 4.0, &dev)
            .unwrap()
            .reshape((2, 300, 4))
            .unwrap();
        let (k, _) = cache
            .append(
                0,
                &a.narrow(1, 0, 200).unwrap(),
                &a.narrow(1, 0, 200).unwrap(),
            )
            .unwrap();
        assert_eq!(k.dims(), &[2, 200, 4]);
        let (k, v) = cache
            .append(
                0,
                &a.narrow(1, 200, 100).unwrap(),
                &a.narrow(1, 200, 100).unwrap(),
            )
            .unwrap();
        assert_eq!(cache.len(), 300);
        assert!(cache.capacity() >= 300);
        let diff = (k - &a)
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(diff, 0.0);
        assert_eq!(v.dims(), &[2, 300, 4]);
    }
}
