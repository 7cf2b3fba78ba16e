//! The differentiable forward of the LLaMA module, for training LoRA adapters
//! (and reward models) on frozen dense weights: full right-padded sequences,
//! no KV cache, only operations candle can differentiate, and frozen linears
//! whose backward computes the input gradient alone.

use candle_core::{DType, Result, Tensor, D};

use super::{Attention, Block, Llama};
use crate::kernels::autograd::CausalSoftmaxOp;
use crate::layers::Rotary;
use crate::lora::{LoraAdapter, LoraTarget};

/// A prompt and a response, as token ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptResponse {
    pub prompt: Vec<u32>,
    pub response: Vec<u32>,
}

/// Token rows ready for [`Llama::response_logprobs`]: right-padded to one
/// length, with which positions are scored.
#[derive(Debug, Clone)]
pub struct ResponseBatch {
    /// `rows[i]`: prompt then response tokens (after truncation).
    rows: Vec<Vec<u32>>,
    /// Where each row's response starts.
    response_start: Vec<usize>,
    /// For each input of [`ResponseBatch::new`], its row, or `None` when it was
    /// dropped (an empty response).
    pub kept: Vec<Option<usize>>,
}

impl ResponseBatch {
    /// Fits each pair into `block_size` tokens: the response is kept whole
    /// where possible (cut from the right only when it alone fills the block,
    /// keeping one prompt token to predict its first token) and the prompt is
    /// cut from the left. Pairs with an empty response are dropped.
    pub fn new(pairs: &[PromptResponse], block_size: usize) -> Self {
        let mut rows = Vec::new();
        let mut response_start = Vec::new();
        let mut kept = Vec::with_capacity(pairs.len());
        for p in pairs {
            if p.response.is_empty() || p.prompt.is_empty() || block_size < 2 {
                kept.push(None);
                continue;
            }
            let response = &p.response[..p.response.len().min(block_size - 1)];
            let prompt_room = block_size - response.len();
            let prompt = &p.prompt[p.prompt.len().saturating_sub(prompt_room)..];
            kept.push(Some(rows.len()));
            response_start.push(prompt.len());
            rows.push([prompt, response].concat());
        }
        Self {
            rows,
            response_start,
            kept,
        }
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Response tokens scored in each row.
    pub fn response_lens(&self) -> Vec<usize> {
        self.rows
            .iter()
            .zip(&self.response_start)
            .map(|(r, &s)| r.len() - s)
            .collect()
    }

    /// The longest row.
    pub fn width(&self) -> usize {
        self.rows.iter().map(Vec::len).max().unwrap_or(0)
    }
}

/// What every layer of one training forward shares.
struct TrainStep<'a> {
    cos: Tensor,
    sin: Tensor,
    /// `(positions, positions)`: 0 on and below the diagonal, −∞ above.
    mask: Tensor,
    lora: Option<&'a LoraAdapter>,
    /// Adapter dropout on.
    train: bool,
    /// Frozen linears compute only the input gradient (see `FrozenMatmul`).
    input_grad_only: bool,
}

impl TrainStep<'_> {
    /// `y` plus the adapter's update of `target` in `layer`, if it has one.
    fn adapt(&self, layer: usize, target: LoraTarget, x: &Tensor, y: Tensor) -> Result<Tensor> {
        match self.lora {
            Some(l) => match l.delta(layer, target, x, self.train)? {
                Some(d) => y + d,
                None => Ok(y),
            },
            None => Ok(y),
        }
    }
}

impl Attention {
    /// `xs`: `(batch, positions, hidden)`; causal attention within each row.
    fn forward_train(&self, layer: usize, xs: &Tensor, st: &TrainStep) -> Result<Tensor> {
        let (b, t, _) = xs.dims3()?;
        let (h, kvh, hd) = (self.heads, self.kv_heads, self.head_dim);
        let parts = self.qkv.forward_train(xs, st.input_grad_only)?;
        let adapt = |target, x: &Tensor, y: Tensor| st.adapt(layer, target, x, y);
        let [q, k, v] = <[Tensor; 3]>::try_from(parts).map_err(|_| {
            candle_core::Error::msg("q/k/v projection group must give three outputs")
        })?;
        let q = adapt(LoraTarget::Q, xs, q)?;
        let k = adapt(LoraTarget::K, xs, k)?;
        let v = adapt(LoraTarget::V, xs, v)?;
        let heads_first = |x: Tensor, n: usize| -> Result<Tensor> {
            x.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()
        };
        let q = Rotary::apply_train(&heads_first(q, h)?, &st.cos, &st.sin)?;
        let k = Rotary::apply_train(&heads_first(k, kvh)?, &st.cos, &st.sin)?;
        let v = heads_first(v, kvh)?;
        let (k, v) = if h == kvh {
            (k, v)
        } else {
            let rep = h / kvh;
            let repeat = |x: Tensor| -> Result<Tensor> {
                x.unsqueeze(2)?
                    .broadcast_as((b, kvh, rep, t, hd))?
                    .reshape((b, h, t, hd))
            };
            (repeat(k)?, repeat(v)?)
        };
        let scale = 1.0 / (hd as f64).sqrt();
        let scores = q.matmul(&k.t()?.contiguous()?)?;
        let att = if scores.device().is_cpu() && scores.dtype() == DType::F32 {
            scores.apply_op1(CausalSoftmaxOp {
                scale: scale as f32,
            })?
        } else {
            candle_nn::ops::softmax(&(scores * scale)?.broadcast_add(&st.mask)?, D::Minus1)?
        };
        let out = att.matmul(&v)?.transpose(1, 2)?.reshape((b, t, h * hd))?;
        let y = self.o.forward_train(&out, st.input_grad_only)?;
        adapt(LoraTarget::O, &out, y)
    }
}

impl Block {
    fn forward_train(&self, layer: usize, xs: &Tensor, st: &TrainStep) -> Result<Tensor> {
        let h = self.attn_norm.forward_train(xs)?;
        let xs = (xs + self.attn.forward_train(layer, &h, st)?)?;
        let h = self.ffn_norm.forward_train(&xs)?;
        let adapt = |target, x: &Tensor, y: Tensor| st.adapt(layer, target, x, y);
        let gu = self.mlp.gate_up.forward_train(&h, st.input_grad_only)?;
        let gate = adapt(LoraTarget::Gate, &h, gu[0].clone())?;
        let up = adapt(LoraTarget::Up, &h, gu[1].clone())?;
        let act = (candle_nn::ops::silu(&gate)? * up)?;
        let down = adapt(
            LoraTarget::Down,
            &act,
            self.mlp.down.forward_train(&act, st.input_grad_only)?,
        )?;
        xs + down
    }
}

impl Llama {
    /// The frozen dense tensors of the model (embedding, norms, and the linear
    /// weights of a dense load), for checks that training leaves them alone.
    pub fn frozen_tensors(&self) -> Vec<Tensor> {
        let mut out = vec![self.embed.clone(), self.norm.weight().clone()];
        let mut linear = |l: &crate::layers::FrozenLinear| out.extend(l.dense_weight().cloned());
        linear(&self.lm_head);
        for b in &self.blocks {
            for l in b
                .attn
                .qkv
                .linears()
                .iter()
                .chain([&b.attn.o])
                .chain(b.mlp.gate_up.linears())
                .chain([&b.mlp.down])
            {
                linear(l);
            }
        }
        for b in &self.blocks {
            out.push(b.attn_norm.weight().clone());
            out.push(b.ffn_norm.weight().clone());
        }
        out
    }

    /// Every weight under its Hugging Face name, dense, with `lora` merged
    /// into the projections it adapts (`W + scale·B·A`). For writing a
    /// standalone checkpoint; tied models omit `lm_head.weight`.
    pub fn hf_tensors(&self, lora: Option<&LoraAdapter>) -> Result<Vec<(String, Tensor)>> {
        let mut out = vec![
            ("model.embed_tokens.weight".to_string(), self.embed.clone()),
            ("model.norm.weight".to_string(), self.norm.weight().clone()),
        ];
        if !self.cfg.tie_word_embeddings {
            if let Some(w) = self.lm_head.dense_weight() {
                out.push(("lm_head.weight".to_string(), w.clone()));
            }
        }
        let merged = |layer: usize, target: LoraTarget, w: Tensor| -> Result<Tensor> {
            match lora.and_then(|l| l.layer(layer, target).map(|p| (l, p))) {
                Some((l, p)) => {
                    let delta = (p.b.as_tensor().matmul(p.a.as_tensor())? * l.config().scale())?;
                    w + delta
                }
                None => Ok(w),
            }
        };
        let dense = |l: &crate::layers::FrozenLinear| -> Result<Tensor> {
            l.dense_weight().cloned().ok_or_else(|| {
                candle_core::Error::msg("writing weights needs a dense (f32) load of the model")
            })
        };
        let split = |group: &crate::layers::LinearGroup| -> Result<Vec<Tensor>> {
            if group.linears().len() == group.outs().len() {
                return group.linears().iter().map(dense).collect();
            }
            let w = dense(&group.linears()[0])?;
            let mut start = 0;
            let mut parts = Vec::new();
            for &n in group.outs() {
                parts.push(w.narrow(0, start, n)?);
                start += n;
            }
            Ok(parts)
        };
        for (i, b) in self.blocks.iter().enumerate() {
            let p = format!("model.layers.{i}");
            let qkv = split(&b.attn.qkv)?;
            let gate_up = split(&b.mlp.gate_up)?;
            let linears = [
                (LoraTarget::Q, qkv[0].clone()),
                (LoraTarget::K, qkv[1].clone()),
                (LoraTarget::V, qkv[2].clone()),
                (LoraTarget::O, dense(&b.attn.o)?),
                (LoraTarget::Gate, gate_up[0].clone()),
                (LoraTarget::Up, gate_up[1].clone()),
                (LoraTarget::Down, dense(&b.mlp.down)?),
            ];
            for (t, w) in linears {
                out.push((
                    format!("{p}.{}.weight", t.path()),
                    merged(i, t, w)?.contiguous()?,
                ));
            }
            out.push((
                format!("{p}.input_layernorm.weight"),
                b.attn_norm.weight().clone(),
            ));
            out.push((
                format!("{p}.post_attention_layernorm.weight"),
                b.ffn_norm.weight().clone(),
            ));
        }
        Ok(out)
    }

    /// Makes frozen linears use candle's plain matmul backward, which also
    /// computes a gradient for each frozen weight; for measuring what the
    /// input-only backward saves.
    pub fn set_full_frozen_backward(&mut self, on: bool) {
        self.full_frozen_backward = on;
    }

    /// Final hidden states `(batch, positions, hidden)` (after the last norm)
    /// of right-padded rows `tokens` `(batch, positions)`, differentiable with
    /// respect to the adapter's variables. `train` turns on adapter dropout.
    pub fn hidden_train(
        &self,
        tokens: &Tensor,
        lora: Option<&LoraAdapter>,
        train: bool,
    ) -> Result<Tensor> {
        let (b, t) = tokens.dims2()?;
        let hidden = self.cfg.hidden_size;
        let mut xs = self
            .embed
            .index_select(&tokens.flatten_all()?, 0)?
            .reshape((b, t, hidden))?
            .to_dtype(DType::F32)?;
        let positions: Vec<u32> = (0..t as u32).collect();
        let (cos, sin) = self.rotary.cos_sin(&positions)?;
        let mask: Vec<f32> = (0..t)
            .flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        let st = TrainStep {
            cos,
            sin,
            mask: Tensor::from_vec(mask, (t, t), &self.device)?,
            lora,
            train,
            input_grad_only: !self.full_frozen_backward,
        };
        for (i, block) in self.blocks.iter().enumerate() {
            xs = block.forward_train(i, &xs, &st)?;
        }
        self.norm.forward_train(&xs)
    }

    /// Logits `(batch, positions, vocab)`; see [`Llama::hidden_train`].
    pub fn forward_train(
        &self,
        tokens: &Tensor,
        lora: Option<&LoraAdapter>,
        train: bool,
    ) -> Result<Tensor> {
        let h = self.hidden_train(tokens, lora, train)?;
        self.lm_head.forward_train(&h, !self.full_frozen_backward)
    }

    /// The sum of the response tokens' log-probabilities for each row of
    /// `batch`, `(rows,)`, differentiable. Only positions that predict a
    /// response token go through the output projection.
    pub fn response_logprobs(
        &self,
        batch: &ResponseBatch,
        lora: Option<&LoraAdapter>,
        train: bool,
    ) -> Result<Tensor> {
        let (n, t) = (batch.len(), batch.width());
        if n == 0 {
            candle_core::bail!("response_logprobs: empty batch");
        }
        let mut ids = Vec::with_capacity(n * t);
        let mut rows = Vec::new();
        let mut targets = Vec::new();
        let mut owner = Vec::new();
        for (i, (row, &start)) in batch.rows.iter().zip(&batch.response_start).enumerate() {
            ids.extend_from_slice(row);
            ids.extend(std::iter::repeat_n(0u32, t - row.len()));
            for (p, &token) in row.iter().enumerate().skip(start) {
                rows.push((i * t + p - 1) as u32);
                targets.push(token);
                owner.push(i);
            }
        }
        let tokens = Tensor::from_vec(ids, (n, t), &self.device)?;
        let hidden = self.hidden_train(&tokens, lora, train)?;
        let r = rows.len();
        let rows = Tensor::from_vec(rows, r, &self.device)?;
        let picked = hidden
            .reshape((n * t, self.cfg.hidden_size))?
            .index_select(&rows, 0)?;
        let logits = self
            .lm_head
            .forward_train(&picked, !self.full_frozen_backward)?;
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let targets = Tensor::from_vec(targets, (r, 1), &self.device)?;
        let token_logp = logp.gather(&targets, 1)?; // (r, 1)
                                                    // Sum per row: a (rows × scored positions) 0/1 matrix times the column.
        let mut onehot = vec![0f32; n * r];
        for (j, &i) in owner.iter().enumerate() {
            onehot[i * r + j] = 1.0;
        }
        let onehot = Tensor::from_vec(onehot, (n, r), &self.device)?;
        onehot.matmul(&token_logp)?.squeeze(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pr(p: usize, r: usize) -> PromptResponse {
        PromptResponse {
            prompt: (0..p as u32).collect(),
            response: (100..100 + r as u32).collect(),
        }
    }

    #[test]
    fn truncation_cuts_the_prompt_from_the_left_and_keeps_the_response() {
        let b = ResponseBatch::new(&[pr(10, 3), pr(3, 2), pr(4, 0), pr(2, 20)], 8);
        assert_eq!(b.kept, [Some(0), Some(1), None, Some(2)]);
        assert_eq!(b.rows[0], [5, 6, 7, 8, 9, 100, 101, 102]);
        assert_eq!(b.rows[1], [0, 1, 2, 100, 101]);
        // A response longer than the block keeps one prompt token before it.
        assert_eq!(b.rows[2], [1, 100, 101, 102, 103, 104, 105, 106]);
        assert_eq!(b.response_lens(), [3, 2, 7]);
        assert_eq!(b.width(), 8);
    }
}
