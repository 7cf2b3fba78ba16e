//! LoRA adapters: low-rank updates `ΔW = (alpha / rank) · B·A` on chosen
//! projections of every layer, held as candle `Var`s for training. Names and
//! shapes follow PEFT (`lora_A.weight` is `(rank, in)`, `lora_B.weight` is
//! `(out, rank)`), so adapters move between attune and Python's `peft`.

use candle_core::{DType, Device, Result, Tensor, Var};

use crate::llama::LlamaConfig;

/// A projection a LoRA adapter can target, named as in the checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LoraTarget {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl LoraTarget {
    pub const ALL: [LoraTarget; 7] = [
        LoraTarget::Q,
        LoraTarget::K,
        LoraTarget::V,
        LoraTarget::O,
        LoraTarget::Gate,
        LoraTarget::Up,
        LoraTarget::Down,
    ];

    /// PEFT's `target_modules` name.
    pub fn module_name(self) -> &'static str {
        match self {
            LoraTarget::Q => "q_proj",
            LoraTarget::K => "k_proj",
            LoraTarget::V => "v_proj",
            LoraTarget::O => "o_proj",
            LoraTarget::Gate => "gate_proj",
            LoraTarget::Up => "up_proj",
            LoraTarget::Down => "down_proj",
        }
    }

    /// The module path inside a decoder layer.
    pub fn path(self) -> &'static str {
        match self {
            LoraTarget::Q => "self_attn.q_proj",
            LoraTarget::K => "self_attn.k_proj",
            LoraTarget::V => "self_attn.v_proj",
            LoraTarget::O => "self_attn.o_proj",
            LoraTarget::Gate => "mlp.gate_proj",
            LoraTarget::Up => "mlp.up_proj",
            LoraTarget::Down => "mlp.down_proj",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| {
            t.module_name() == name
                || t.path() == name
                || t.module_name().trim_end_matches("_proj") == name
        })
    }

    fn index(self) -> usize {
        self as usize
    }

    /// `(out, in)` of this projection.
    fn shape(self, cfg: &LlamaConfig) -> (usize, usize) {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim());
        match self {
            LoraTarget::Q => (cfg.num_attention_heads * hd, h),
            LoraTarget::K | LoraTarget::V => (cfg.num_kv_heads() * hd, h),
            LoraTarget::O => (h, cfg.num_attention_heads * hd),
            LoraTarget::Gate | LoraTarget::Up => (cfg.intermediate_size, h),
            LoraTarget::Down => (h, cfg.intermediate_size),
        }
    }
}

/// The shape of an adapter.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    /// Dropout on the adapter's input while training.
    pub dropout: f32,
    pub targets: Vec<LoraTarget>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            rank: 8,
            alpha: 16.0,
            dropout: 0.0,
            targets: vec![LoraTarget::Q, LoraTarget::K, LoraTarget::V, LoraTarget::O],
        }
    }
}

impl LoraConfig {
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }
}

/// How a fresh adapter starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraInit {
    /// PEFT's default: `A` Kaiming-uniform, `B` zero (the adapter starts as a no-op).
    Peft,
    /// Both random: a non-trivial adapter, for tests of gradients and files.
    Random,
}

/// One adapted projection.
#[derive(Debug, Clone)]
pub struct LoraLinear {
    /// `(rank, in)`.
    pub a: Var,
    /// `(out, rank)`.
    pub b: Var,
}

/// A LoRA adapter over every layer of one model.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    cfg: LoraConfig,
    /// `layers[layer][target.index()]`.
    layers: Vec<[Option<LoraLinear>; 7]>,
}

impl LoraAdapter {
    /// A fresh adapter for a model of shape `model`, deterministic in `seed`.
    pub fn new(
        cfg: LoraConfig,
        model: &LlamaConfig,
        init: LoraInit,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut uniform = |n: usize, bound: f32| -> Vec<f32> {
            (0..n).map(|_| rng.random_range(-bound..bound)).collect()
        };
        let mut layers = Vec::with_capacity(model.num_hidden_layers);
        for _ in 0..model.num_hidden_layers {
            let mut slots: [Option<LoraLinear>; 7] = Default::default();
            for &t in &cfg.targets {
                let (out, inp) = t.shape(model);
                let r = cfg.rank;
                // Kaiming-uniform with a = sqrt(5), as torch.nn.Linear and PEFT: bound = 1/sqrt(in).
                let a = Tensor::from_vec(
                    uniform(r * inp, 1.0 / (inp as f32).sqrt()),
                    (r, inp),
                    device,
                )?;
                let b = match init {
                    LoraInit::Peft => Tensor::zeros((out, r), DType::F32, device)?,
                    LoraInit::Random => Tensor::from_vec(
                        uniform(out * r, 1.0 / (r as f32).sqrt()),
                        (out, r),
                        device,
                    )?,
                };
                slots[t.index()] = Some(LoraLinear {
                    a: Var::from_tensor(&a)?,
                    b: Var::from_tensor(&b)?,
                });
            }
            layers.push(slots);
        }
        Ok(Self { cfg, layers })
    }

    pub fn config(&self) -> &LoraConfig {
        &self.cfg
    }

    pub fn layer(&self, layer: usize, target: LoraTarget) -> Option<&LoraLinear> {
        self.layers.get(layer)?[target.index()].as_ref()
    }

    /// Every variable with its PEFT name, in a stable order.
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        for (i, slots) in self.layers.iter().enumerate() {
            for t in LoraTarget::ALL {
                if let Some(l) = &slots[t.index()] {
                    let p = format!("base_model.model.model.layers.{i}.{}", t.path());
                    out.push((format!("{p}.lora_A.weight"), l.a.clone()));
                    out.push((format!("{p}.lora_B.weight"), l.b.clone()));
                }
            }
        }
        out
    }

    pub fn vars(&self) -> Vec<Var> {
        self.named_vars().into_iter().map(|(_, v)| v).collect()
    }

    /// The adapter's contribution `scale · (x·Aᵀ)·Bᵀ` for one projection, or
    /// `None` when it does not adapt it. `train` applies dropout.
    pub fn delta(
        &self,
        layer: usize,
        target: LoraTarget,
        xs: &Tensor,
        train: bool,
    ) -> Result<Option<Tensor>> {
        let Some(l) = self.layer(layer, target) else {
            return Ok(None);
        };
        let xs = if train && self.cfg.dropout > 0.0 {
            candle_nn::ops::dropout(xs, self.cfg.dropout)?
        } else {
            xs.clone()
        };
        let h = xs.broadcast_matmul(&l.a.as_tensor().t()?)?;
        let y = h.broadcast_matmul(&l.b.as_tensor().t()?)?;
        Ok(Some((y * self.cfg.scale())?))
    }
}
