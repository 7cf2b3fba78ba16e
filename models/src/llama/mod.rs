//! The one LLaMA 1/2/3 module: GQA, tied or untied embeddings, rope theta and
//! LLaMA-3 rope scaling, RMSNorm eps from the checkpoint. `forward` runs a batch
//! of sequences of different lengths in one step: linear layers over all rows at
//! once, attention per sequence against that sequence's own `KvCache`.

pub mod config;
mod train;

use candle_core::{DType, Device, Tensor, D};

pub use config::LlamaConfig;
pub use train::{PromptResponse, ResponseBatch};

use crate::checkpoint::{Checkpoint, LinearWeight, WeightFormat};
use crate::error::{LoadError, ModelError};
use crate::kernels;
use crate::kv_cache::KvCache;
use crate::layers::{FrozenLinear, LinearGroup, Mlp, RmsNorm, Rotary};
use crate::lora::{LoraAdapter, LoraTarget};

/// Which positions `forward` returns logits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsFor {
    /// The last input position of each sequence: `(sequences, vocab)`.
    Last,
    /// Every input position, sequences concatenated: `(total_tokens, vocab)`.
    All,
}

#[derive(Debug, Clone)]
struct Attention {
    /// `[q, k, v]`.
    qkv: LinearGroup,
    o: FrozenLinear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

#[derive(Debug, Clone)]
struct Block {
    attn_norm: RmsNorm,
    attn: Attention,
    ffn_norm: RmsNorm,
    mlp: Mlp,
}

/// Where one sequence's rows sit in the concatenated batch.
#[derive(Debug, Clone, Copy)]
struct Span {
    offset: usize,
    len: usize,
}

/// What every layer of one batched step shares: the rotary tables for the rows'
/// positions, where each sequence's rows are, and which adapters apply.
struct StepRows<'a> {
    cos: Tensor,
    sin: Tensor,
    spans: &'a [Span],
    /// Use the CPU attention kernel (f32 tensors on the CPU).
    cpu_kernel: bool,
    lora: Option<RowAdapters<'a>>,
}

/// The LoRA adapters of one step, unmerged, each with the rows it applies to
/// (`None`: every row), so sequences of different generations share a batch.
struct RowAdapters<'a> {
    /// Each adapter with its rows, as indices and as a tensor (`None`: every row).
    groups: Vec<(&'a LoraAdapter, Option<(Vec<u32>, Tensor)>)>,
}

impl<'a> RowAdapters<'a> {
    /// Groups the sequences by adapter; `None` when no sequence has one.
    fn new(
        spans: &[Span],
        adapters: &[Option<&'a LoraAdapter>],
        device: &Device,
    ) -> candle_core::Result<Option<Self>> {
        if adapters.iter().all(Option::is_none) {
            return Ok(None);
        }
        let mut groups: Vec<(&'a LoraAdapter, Vec<u32>)> = Vec::new();
        for (span, adapter) in spans.iter().zip(adapters) {
            let Some(a) = adapter else { continue };
            let rows = (span.offset..span.offset + span.len).map(|r| r as u32);
            match groups.iter_mut().find(|(g, _)| std::ptr::eq(*g, *a)) {
                Some((_, r)) => r.extend(rows),
                None => groups.push((a, rows.collect())),
            }
        }
        let total: usize = spans.iter().map(|s| s.len).sum();
        let groups = groups
            .into_iter()
            .map(|(a, rows)| {
                if rows.len() == total {
                    Ok((a, None))
                } else {
                    let n = rows.len();
                    let t = Tensor::from_vec(rows.clone(), n, device)?;
                    Ok((a, Some((rows, t))))
                }
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(Some(Self { groups }))
    }

    /// `y` plus each adapter's update of `target` on its rows.
    fn apply(
        &self,
        layer: usize,
        target: LoraTarget,
        x: &Tensor,
        mut y: Tensor,
    ) -> candle_core::Result<Tensor> {
        for (a, rows) in &self.groups {
            let Some(lora) = a.layer(layer, target) else {
                continue;
            };
            let n = rows.as_ref().map_or(x.dim(0)?, |(r, _)| r.len());
            let (wa, wb) = (lora.a.as_tensor(), lora.b.as_tensor());
            let kernel = x.device().is_cpu()
                && n <= kernels::lora::MAX_ROWS
                && [x.dtype(), y.dtype(), wa.dtype(), wb.dtype()] == [DType::F32; 4];
            y = match rows {
                _ if kernel => {
                    let idx = rows.as_ref().map(|(r, _)| r.as_slice());
                    let scale = a.config().scale() as f32;
                    kernels::lora::lora_add(x, &y, wa, wb, scale, idx)?
                }
                None => match a.delta_inference(layer, target, x)? {
                    Some(d) => (y + d)?,
                    None => y,
                },
                Some((_, rows)) => {
                    let xs = x.index_select(rows, 0)?;
                    match a.delta_inference(layer, target, &xs)? {
                        Some(d) => y.index_add(rows, &d, 0)?,
                        None => y,
                    }
                }
            };
        }
        Ok(y)
    }
}

impl StepRows<'_> {
    fn adapt(
        &self,
        layer: usize,
        target: LoraTarget,
        x: &Tensor,
        y: Tensor,
    ) -> candle_core::Result<Tensor> {
        match &self.lora {
            Some(l) => l.apply(layer, target, x, y),
            None => Ok(y),
        }
    }
}

/// A LLaMA-family causal language model. Weights are read-only after load, so one
/// `Llama` can be shared (`Arc`) between the serving engine and other readers.
#[derive(Debug, Clone)]
pub struct Llama {
    cfg: LlamaConfig,
    embed: Tensor,
    blocks: Vec<Block>,
    norm: RmsNorm,
    lm_head: FrozenLinear,
    rotary: Rotary,
    device: Device,
    /// Attention through tensor ops even on the CPU (the path GPUs take); for
    /// checking the CPU kernel against it.
    tensor_attention: bool,
    /// Training: frozen linears through plain matmul (see `set_full_frozen_backward`).
    full_frozen_backward: bool,
}

impl Attention {
    /// `xs`: `(total, hidden)`, rows of all sequences. Returns `(total, hidden)`.
    fn forward(
        &self,
        layer: usize,
        xs: &Tensor,
        rows: &StepRows,
        caches: &mut [&mut KvCache],
    ) -> candle_core::Result<Tensor> {
        let (cos, sin, spans) = (&rows.cos, &rows.sin, rows.spans);
        let total = xs.dim(0)?;
        let (h, kvh, hd) = (self.heads, self.kv_heads, self.head_dim);
        let heads_first = |t: Tensor, n: usize| -> candle_core::Result<Tensor> {
            t.reshape((total, n, hd))?.transpose(0, 1)
        };
        let mut qkv = self.qkv.forward(xs)?.into_iter();
        let (q, k, v) = match (qkv.next(), qkv.next(), qkv.next()) {
            (Some(q), Some(k), Some(v)) => (q, k, v),
            _ => candle_core::bail!("q/k/v projection group must give three outputs"),
        };
        let q = rows.adapt(layer, LoraTarget::Q, xs, q)?;
        let k = rows.adapt(layer, LoraTarget::K, xs, k)?;
        let v = rows.adapt(layer, LoraTarget::V, xs, v)?;
        let q = Rotary::apply(&heads_first(q, h)?, cos, sin)?;
        let k = Rotary::apply(&heads_first(k, kvh)?, cos, sin)?;
        let v = heads_first(v, kvh)?;
        // Append every sequence's new keys and values to its own cache first.
        let mut kv = Vec::with_capacity(spans.len());
        for (span, cache) in spans.iter().zip(caches.iter_mut()) {
            let past = cache.len();
            let (k, v) = cache.append(
                layer,
                &k.narrow(1, span.offset, span.len)?,
                &v.narrow(1, span.offset, span.len)?,
            )?;
            kv.push((past, k, v));
        }
        if rows.cpu_kernel && xs.device().is_cpu() && xs.dtype() == DType::F32 {
            let out = self.attend_cpu(&q, spans, &kv, total)?;
            return rows.adapt(layer, LoraTarget::O, &out, self.o.forward(&out)?);
        }
        let rep = h / kvh;
        let scale = 1.0 / (hd as f64).sqrt();
        let mut outs = Vec::with_capacity(spans.len());
        for (span, (past, k, v)) in spans.iter().zip(kv) {
            let q = q.narrow(1, span.offset, span.len)?;
            let keys = past + span.len;
            // Group query heads by the KV head they share: (kv_heads, rep * len, hd),
            // so K and V are used as they are, never repeated.
            let q = q.contiguous()?.reshape((kvh, rep * span.len, hd))?;
            let mut att = (q.matmul(&k.t()?)? * scale)?;
            if span.len > 1 {
                let mask = causal_mask(span.len, past, xs.device())?;
                att = att
                    .reshape((kvh, rep, span.len, keys))?
                    .broadcast_add(&mask)?
                    .reshape((kvh, rep * span.len, keys))?;
            }
            let att = candle_nn::ops::softmax_last_dim(&att)?;
            let out = att.matmul(&v)?; // (kvh, rep * len, hd)
            outs.push(
                out.reshape((h, span.len, hd))?
                    .transpose(0, 1)?
                    .reshape((span.len, h * hd))?,
            );
        }
        let out = if outs.len() == 1 {
            outs.pop().expect("one output")
        } else {
            Tensor::cat(&outs, 0)?
        };
        rows.adapt(layer, LoraTarget::O, &out, self.o.forward(&out)?)
    }
}

impl Attention {
    /// The CPU path: attention for every sequence and head in one parallel
    /// region, reading the caches' memory in place. `q`: `(heads, total, hd)`;
    /// `kv[i]`: (positions before this step, keys, values) of sequence `i`.
    fn attend_cpu(
        &self,
        q: &Tensor,
        spans: &[Span],
        kv: &[(usize, Tensor, Tensor)],
        total: usize,
    ) -> candle_core::Result<Tensor> {
        use crate::kernels::attention::{causal_attention, AttentionShape, SeqAttention};

        let q = q.contiguous()?;
        let guards: Vec<_> = kv
            .iter()
            .map(|(_, k, v)| (k.storage_and_layout(), v.storage_and_layout()))
            .collect();
        let (q_storage, q_layout) = q.storage_and_layout();
        let mut seqs = Vec::with_capacity(spans.len());
        for ((span, (past, _, _)), ((ks, kl), (vs, vl))) in spans.iter().zip(kv).zip(&guards) {
            seqs.push(SeqAttention {
                first_row: span.offset,
                len: span.len,
                past: *past,
                k: heads_view(ks, kl)?,
                v: heads_view(vs, vl)?,
            });
        }
        let shape = AttentionShape {
            heads: self.heads,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            scale: 1.0 / (self.head_dim as f32).sqrt(),
        };
        let width = self.heads * self.head_dim;
        let mut out = vec![0f32; total * width];
        causal_attention(heads_view(&q_storage, q_layout)?, &seqs, shape, &mut out);
        drop(guards);
        Tensor::from_vec(out, (total, width), q.device())
    }
}

/// A view of a CPU f32 tensor laid out `(heads, positions, head_dim)`.
fn heads_view<'a>(
    storage: &'a candle_core::Storage,
    layout: &candle_core::Layout,
) -> candle_core::Result<crate::kernels::attention::HeadsView<'a>> {
    let candle_core::Storage::Cpu(cpu) = storage else {
        candle_core::bail!("CPU attention on a non-CPU tensor")
    };
    let stride = layout.stride();
    Ok(crate::kernels::attention::HeadsView {
        data: cpu.as_slice::<f32>()?,
        offset: layout.start_offset(),
        head_stride: stride[0],
        pos_stride: stride[1],
    })
}

/// `(len, past + len)`: 0 where query `i` may see key `j` (`j <= past + i`), -inf
/// elsewhere.
fn causal_mask(len: usize, past: usize, device: &Device) -> candle_core::Result<Tensor> {
    let keys = past + len;
    let mask: Vec<f32> = (0..len)
        .flat_map(|i| {
            (0..keys).map(move |j| {
                if j <= past + i {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Tensor::from_vec(mask, (len, keys), device)
}

impl Llama {
    /// Loads the model from an opened checkpoint.
    pub fn load(ckpt: &mut Checkpoint, format: WeightFormat) -> Result<Self, LoadError> {
        let cfg = ckpt.config()?;
        let device = ckpt.device().clone();
        let (hidden, inter) = (cfg.hidden_size, cfg.intermediate_size);
        let (heads, kv_heads, hd) = (cfg.num_attention_heads, cfg.num_kv_heads(), cfg.head_dim());
        let gguf = ckpt.is_gguf();
        let pad = format == WeightFormat::QuantizedVnni;
        let path = ckpt.path().to_path_buf();
        let tensor_err = move |source| LoadError::Tensor {
            path: path.clone(),
            source,
        };
        let weight =
            |ckpt: &mut Checkpoint, name: String, out: usize, inp: usize, rope: Option<usize>| {
                // GGUF q/k rows are un-permuted back to the Hugging Face order.
                ckpt.linear(&name, (out, inp), format, if gguf { rope } else { None })
            };
        let lin = |ckpt: &mut Checkpoint, name: String, out: usize, inp: usize| {
            FrozenLinear::new(weight(ckpt, name, out, inp, None)?, pad).map_err(&tensor_err)
        };
        let group =
            |ckpt: &mut Checkpoint, names: &[(&str, usize, Option<usize>)], p: &str, inp: usize| {
                let mut ws = Vec::with_capacity(names.len());
                for &(n, out, rope) in names {
                    ws.push(weight(ckpt, format!("{p}.{n}"), out, inp, rope)?);
                }
                LinearGroup::new(ws, pad).map_err(&tensor_err)
            };
        let mut blocks = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let qkv = [
                ("self_attn.q_proj.weight", heads * hd, Some(heads)),
                ("self_attn.k_proj.weight", kv_heads * hd, Some(kv_heads)),
                ("self_attn.v_proj.weight", kv_heads * hd, None),
            ];
            let attn = Attention {
                qkv: group(ckpt, &qkv, &p, hidden)?,
                o: lin(
                    ckpt,
                    format!("{p}.self_attn.o_proj.weight"),
                    hidden,
                    heads * hd,
                )?,
                heads,
                kv_heads,
                head_dim: hd,
            };
            let gate_up = [
                ("mlp.gate_proj.weight", inter, None),
                ("mlp.up_proj.weight", inter, None),
            ];
            let mlp = Mlp {
                gate_up: group(ckpt, &gate_up, &p, hidden)?,
                down: lin(ckpt, format!("{p}.mlp.down_proj.weight"), hidden, inter)?,
            };
            let norm = |ckpt: &mut Checkpoint, n: &str| -> Result<RmsNorm, LoadError> {
                Ok(RmsNorm::new(
                    ckpt.dense(&format!("{p}.{n}"), &[hidden])?,
                    cfg.rms_norm_eps,
                ))
            };
            blocks.push(Block {
                attn_norm: norm(ckpt, "input_layernorm.weight")?,
                attn,
                ffn_norm: norm(ckpt, "post_attention_layernorm.weight")?,
                mlp,
            });
        }
        let embed = ckpt.dense("model.embed_tokens.weight", &[cfg.vocab_size, hidden])?;
        let lm_head = if !cfg.tie_word_embeddings && ckpt.contains("lm_head.weight") {
            lin(ckpt, "lm_head.weight".into(), cfg.vocab_size, hidden)?
        } else if gguf {
            // Tied: the output projection reads the (quantized) embedding table.
            lin(
                ckpt,
                "model.embed_tokens.weight".into(),
                cfg.vocab_size,
                hidden,
            )?
        } else {
            FrozenLinear::new(LinearWeight::Dense(embed.clone()), pad).map_err(&tensor_err)?
        };
        let norm = RmsNorm::new(
            ckpt.dense("model.norm.weight", &[hidden])?,
            cfg.rms_norm_eps,
        );
        let mut inv_freq = cfg.rope_inv_freq();
        if let Some(factors) = ckpt.rope_freq_factors()? {
            for (f, factor) in inv_freq.iter_mut().zip(factors) {
                *f /= factor;
            }
        }
        let rotary = Rotary::new(&inv_freq, &device).map_err(|source| LoadError::Tensor {
            path: ckpt.path().to_path_buf(),
            source,
        })?;
        Ok(Self {
            cfg,
            embed,
            blocks,
            norm,
            lm_head,
            rotary,
            device,
            tensor_attention: false,
            full_frozen_backward: false,
        })
    }

    /// Computes attention with tensor ops on every device (the GPU path) instead
    /// of the CPU kernel. Slower on the CPU; for cross-checking.
    pub fn set_tensor_attention(&mut self, on: bool) {
        self.tensor_attention = on;
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }

    /// The context length: the largest number of positions a sequence may hold.
    pub fn max_context(&self) -> usize {
        self.cfg.max_position_embeddings
    }

    /// A fresh, empty KV cache for one sequence.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.cfg.num_hidden_layers)
    }

    /// One step for a batch of sequences. `tokens[i]` are the new tokens of
    /// sequence `i` (a prompt chunk or one decoded token), which continue
    /// `caches[i]`; the caches are extended. Returns f32 logits as `which` says.
    pub fn forward(
        &self,
        tokens: &[&[u32]],
        caches: &mut [&mut KvCache],
        which: LogitsFor,
    ) -> Result<Tensor, ModelError> {
        self.forward_adapted(tokens, caches, &[], which)
    }

    /// [`Llama::forward`] with a LoRA adapter per sequence (`adapters[i]`,
    /// `None` or missing: the base model), applied unmerged so that sequences
    /// of different adapter generations run in one batch.
    pub fn forward_adapted(
        &self,
        tokens: &[&[u32]],
        caches: &mut [&mut KvCache],
        adapters: &[Option<&LoraAdapter>],
        which: LogitsFor,
    ) -> Result<Tensor, ModelError> {
        if tokens.len() != caches.len() || adapters.len() > tokens.len() {
            return Err(ModelError::BatchMismatch {
                tokens: tokens.len(),
                caches: caches.len(),
            });
        }
        let mut spans = Vec::with_capacity(tokens.len());
        let mut positions = Vec::new();
        let mut ids = Vec::new();
        for (index, (toks, cache)) in tokens.iter().zip(caches.iter()).enumerate() {
            if toks.is_empty() {
                return Err(ModelError::EmptyInput { index });
            }
            let past = cache.len();
            if past + toks.len() > self.max_context() {
                return Err(ModelError::ContextOverflow {
                    tokens: past + toks.len(),
                    context: self.max_context(),
                });
            }
            if let Some(&id) = toks.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
                return Err(ModelError::TokenOutOfRange {
                    id,
                    vocab: self.cfg.vocab_size,
                });
            }
            spans.push(Span {
                offset: ids.len(),
                len: toks.len(),
            });
            positions.extend((past..past + toks.len()).map(|p| p as u32));
            ids.extend_from_slice(toks);
        }
        let total = ids.len();
        let ids = Tensor::from_vec(ids, total, &self.device)?;
        let (cos, sin) = self.rotary.cos_sin(&positions)?;
        let rows = StepRows {
            cos,
            sin,
            spans: &spans,
            cpu_kernel: !self.tensor_attention,
            lora: RowAdapters::new(&spans, adapters, &self.device)?,
        };
        let mut xs = self.embed.index_select(&ids, 0)?;
        for (layer, block) in self.blocks.iter().enumerate() {
            let residual = &xs;
            let h = block
                .attn
                .forward(layer, &block.attn_norm.forward(&xs)?, &rows, caches)?;
            let xs1 = (h + residual)?;
            let h = block
                .mlp
                .forward_adapted(&block.ffn_norm.forward(&xs1)?, |t, x, y| {
                    rows.adapt(layer, t, x, y)
                })?;
            xs = (h + xs1)?;
        }
        let xs = match which {
            LogitsFor::All => xs,
            LogitsFor::Last if spans.len() == 1 => xs.narrow(0, total - 1, 1)?,
            LogitsFor::Last => {
                let last: Vec<u32> = spans
                    .iter()
                    .map(|s| (s.offset + s.len - 1) as u32)
                    .collect();
                let n = last.len();
                xs.index_select(&Tensor::from_vec(last, n, &self.device)?, 0)?
            }
        };
        let logits = self.lm_head.forward(&self.norm.forward(&xs)?)?;
        Ok(logits.to_dtype(DType::F32)?)
    }

    /// Convenience: runs one sequence's new tokens and returns the logits of its
    /// last position, `(vocab,)`.
    pub fn forward_one(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Tensor, ModelError> {
        Ok(self
            .forward(&[tokens], &mut [cache], LogitsFor::Last)?
            .squeeze(0)?)
    }

    /// Log-probabilities of `continuation` after `context` (teacher forcing), one
    /// per continuation token. Uses a scratch cache.
    pub fn continuation_logprobs(
        &self,
        context: &[u32],
        continuation: &[u32],
    ) -> Result<Vec<f32>, ModelError> {
        let mut all = context.to_vec();
        all.extend_from_slice(continuation);
        let mut cache = self.new_cache();
        let logits = self.forward(&[&all], &mut [&mut cache], LogitsFor::All)?;
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let mut out = Vec::with_capacity(continuation.len());
        for (i, &tok) in continuation.iter().enumerate() {
            let row = context.len() + i - 1;
            out.push(logp.get(row)?.get(tok as usize)?.to_scalar::<f32>()?);
        }
        Ok(out)
    }
}
