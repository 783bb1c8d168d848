//! Building blocks shared by the architectures: RMSNorm, projections, the dense SwiGLU MLP, the sparse MoE
//! and the attention layer.

use candle_core::{Device, Module, Tensor};
use candle_nn::Linear;
use routers::{ExpertMask, Routing};

use crate::attention::{self, Heads, KvCache, Rope, SeqSpan};
use crate::config::Config;
use crate::{Error, Result};

/// Where a model's tensors come from: a checkpoint on disk, or a seeded random initialisation.
pub trait TensorSource {
    /// The tensor `name` as f32, checked against `shape`.
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor>;
    /// True when the source holds `name` (used for optional tensors such as an untied `lm_head`).
    fn contains(&self, name: &str) -> bool;
}

impl TensorSource for crate::weights::Weights {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.get(name, shape)
    }
    fn contains(&self, name: &str) -> bool {
        crate::weights::Weights::contains(self, name)
    }
}

pub(crate) fn linear(src: &dyn TensorSource, name: &str, out: usize, inp: usize) -> Result<Linear> {
    Ok(Linear::new(src.tensor(&format!("{name}.weight"), &[out, inp])?, None))
}

/// RMSNorm computed in f32: `w * (x / sqrt(mean(x^2) + eps))`. In f32 the OLMo2 and Llama variants
/// (which differ only in where they cast) coincide.
#[derive(Clone, Debug)]
pub(crate) struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    pub fn load(src: &dyn TensorSource, name: &str, size: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: src.tensor(&format!("{name}.weight"), &[size])?,
            eps: eps as f32,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps)?)
    }
}

/// SwiGLU feed-forward `down(silu(gate(x)) * up(x))`, with gate and up fused into one matmul.
#[derive(Clone, Debug)]
pub(crate) struct Mlp {
    gate_up: Linear,
    down: Linear,
    intermediate: usize,
}

impl Mlp {
    /// Loads `{prefix}.{gate,up,down}_proj.weight`.
    pub fn load(src: &dyn TensorSource, prefix: &str, hidden: usize, intermediate: usize) -> Result<Self> {
        let gate = src.tensor(&format!("{prefix}.gate_proj.weight"), &[intermediate, hidden])?;
        let up = src.tensor(&format!("{prefix}.up_proj.weight"), &[intermediate, hidden])?;
        let gate_up = Tensor::cat(&[gate, up], 0)?;
        Ok(Self {
            gate_up: Linear::new(gate_up, None),
            down: linear(src, &format!("{prefix}.down_proj"), hidden, intermediate)?,
            intermediate,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gu = self.gate_up.forward(x)?;
        let gate = gu.narrow(1, 0, self.intermediate)?;
        let up = gu.narrow(1, self.intermediate, self.intermediate)?;
        let h = (candle_nn::ops::silu(&gate)? * up)?;
        Ok(self.down.forward(&h)?)
    }

    /// Number of parameters.
    pub fn num_params(&self) -> usize {
        self.gate_up.weight().elem_count() + self.down.weight().elem_count()
    }
}

/// Per-batch state every layer sees: the sequences' spans and caches, and each token's expert mask.
pub(crate) struct Batch<'a> {
    pub spans: Vec<SeqSpan<'a>>,
    /// Expert mask of each row (token) of the batch; empty for dense models.
    pub token_masks: Vec<&'a ExpertMask>,
    /// Router logits of each MoE layer, collected when asked for.
    pub router_logits: Option<Vec<Tensor>>,
}

/// Sparse Mixture-of-Experts feed-forward: softmax over all allowed experts, top-k, and each expert run
/// once on exactly the tokens routed to it.
#[derive(Clone, Debug)]
pub(crate) struct SparseMoe {
    gate: Linear,
    /// `None` for experts that were opted out at load time (their weights were never read).
    experts: Vec<Option<Mlp>>,
    routing: Routing,
    hidden: usize,
}

impl SparseMoe {
    /// Loads `{prefix}.gate` and `{prefix}.experts.{e}` for the experts `loaded` allows.
    pub fn load(src: &dyn TensorSource, prefix: &str, cfg: &Config, loaded: &ExpertMask) -> Result<Self> {
        let h = cfg.hidden_size;
        let experts = (0..cfg.num_experts)
            .map(|e| {
                loaded
                    .is_allowed(e)
                    .then(|| Mlp::load(src, &format!("{prefix}.experts.{e}"), h, cfg.intermediate_size))
                    .transpose()
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            gate: linear(src, &format!("{prefix}.gate"), cfg.num_experts, h)?,
            experts,
            routing: Routing {
                top_k: cfg.num_experts_per_tok,
                norm_topk_prob: cfg.norm_topk_prob,
            },
            hidden: h,
        })
    }

    pub fn forward(&self, x: &Tensor, batch: &mut Batch<'_>) -> Result<Tensor> {
        let n = x.dim(0)?;
        let num_experts = self.experts.len();
        let logits = self.gate.forward(x)?;
        let lv = logits.flatten_all()?.to_vec1::<f32>()?;
        if let Some(all) = batch.router_logits.as_mut() {
            all.push(logits);
        }
        let mut routed: Vec<(Vec<u32>, Vec<f32>)> = vec![(Vec::new(), Vec::new()); num_experts];
        for (row, mask) in batch.token_masks.iter().enumerate() {
            for (e, w) in self.routing.route(&lv[row * num_experts..(row + 1) * num_experts], mask) {
                routed[e].0.push(row as u32);
                routed[e].1.push(w);
            }
        }
        let mut out = vec![0f32; n * self.hidden];
        // Experts in index order, each over its tokens: the reference accumulates in the same order.
        for (e, (rows, weights)) in routed.into_iter().enumerate() {
            if rows.is_empty() {
                continue;
            }
            let expert = self.experts[e].as_ref().ok_or_else(|| {
                Error::Input(format!("expert {e} was opted out when the model was loaded"))
            })?;
            let idx = Tensor::from_vec(rows.clone(), rows.len(), x.device())?;
            let ys = expert.forward(&x.index_select(&idx, 0)?)?;
            let ys = ys.flatten_all()?.to_vec1::<f32>()?;
            for ((&row, &w), y) in rows.iter().zip(&weights).zip(ys.chunks_exact(self.hidden)) {
                let dst = &mut out[row as usize * self.hidden..(row as usize + 1) * self.hidden];
                for (d, &v) in dst.iter_mut().zip(y) {
                    *d += w * v;
                }
            }
        }
        Ok(Tensor::from_vec(out, (n, self.hidden), x.device())?)
    }

    /// Parameters of one expert (0 when none is loaded).
    pub fn expert_params(&self) -> usize {
        self.experts.iter().flatten().map(Mlp::num_params).next().unwrap_or(0)
    }
}

/// Self-attention with full-width q/k RMSNorm (OLMo2, FlexOlmo, OLMoE) and optional q/k/v clipping (OLMoE).
#[derive(Clone, Debug)]
pub(crate) struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
    clip_qkv: Option<f64>,
    heads: Heads,
    rope: Rope,
}

impl Attention {
    pub fn load(src: &dyn TensorSource, prefix: &str, cfg: &Config) -> Result<Self> {
        let h = cfg.hidden_size;
        let qw = cfg.num_attention_heads * cfg.head_dim;
        let kvw = cfg.num_key_value_heads * cfg.head_dim;
        Ok(Self {
            q_proj: linear(src, &format!("{prefix}.q_proj"), qw, h)?,
            k_proj: linear(src, &format!("{prefix}.k_proj"), kvw, h)?,
            v_proj: linear(src, &format!("{prefix}.v_proj"), kvw, h)?,
            o_proj: linear(src, &format!("{prefix}.o_proj"), h, qw)?,
            q_norm: RmsNorm::load(src, &format!("{prefix}.q_norm"), qw, cfg.rms_norm_eps)?,
            k_norm: RmsNorm::load(src, &format!("{prefix}.k_norm"), kvw, cfg.rms_norm_eps)?,
            clip_qkv: cfg.clip_qkv,
            heads: Heads {
                heads: cfg.num_attention_heads,
                kv_heads: cfg.num_key_value_heads,
                head_dim: cfg.head_dim,
            },
            rope: Rope::new(cfg.head_dim, cfg.rope_theta),
        })
    }

    pub fn forward(&self, x: &Tensor, layer: usize, batch: &mut Batch<'_>) -> Result<Tensor> {
        let n = x.dim(0)?;
        let mut q = self.q_norm.forward(&self.q_proj.forward(x)?)?;
        let mut k = self.k_norm.forward(&self.k_proj.forward(x)?)?;
        let mut v = self.v_proj.forward(x)?;
        if let Some(c) = self.clip_qkv {
            q = q.clamp(-c, c)?;
            k = k.clamp(-c, c)?;
            v = v.clamp(-c, c)?;
        }
        let mut q = q.flatten_all()?.to_vec1::<f32>()?;
        let mut k = k.flatten_all()?.to_vec1::<f32>()?;
        let v = v.flatten_all()?.to_vec1::<f32>()?;
        let out = attention::attend(self.heads, &self.rope, layer, &mut q, &mut k, &v, &mut batch.spans);
        let out = Tensor::from_vec(out, (n, self.heads.heads * self.heads.head_dim), &Device::Cpu)?;
        Ok(self.o_proj.forward(&out)?)
    }
}

/// An empty cache shaped for `cfg`.
pub(crate) fn new_cache(cfg: &Config) -> KvCache {
    KvCache::new(cfg.num_hidden_layers, cfg.num_key_value_heads * cfg.head_dim)
}
