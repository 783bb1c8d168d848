//! Building blocks shared by the architectures: RMSNorm, projections, the dense SwiGLU MLP, the sparse MoE
//! and the attention layer.

use candle_core::{Device, Tensor};
use rayon::prelude::*;
use routers::{ExpertMask, Routing};

use crate::attention::{self, Heads, KvCache, Rope, SeqSpan};
use crate::config::Config;
use crate::matmul::{with_f32, Linear, Weight};
use crate::{Error, Result};

/// Where a model's tensors come from: a checkpoint on disk, or a seeded random initialisation.
pub trait TensorSource {
    /// The values of tensor `name` as f32 (row-major), checked against `shape`.
    fn values(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>>;

    /// The tensor `name` as f32, checked against `shape`.
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        Ok(Tensor::from_vec(
            self.values(name, shape)?,
            shape,
            &Device::Cpu,
        )?)
    }
    /// True when the source holds `name` (used for optional tensors such as an untied `lm_head`).
    fn contains(&self, name: &str) -> bool;

    /// Tensor `name` in the dtype it is stored in (a checkpoint's bf16 / f16 values as their
    /// bits), checked against `shape`.
    fn stored(&self, name: &str, shape: &[usize]) -> Result<Weight> {
        Ok(Weight::F32(self.values(name, shape)?))
    }

    /// A projection's weight as the model holds it: as stored, unless a [`Holding`] says otherwise.
    fn weight(&self, name: &str, shape: &[usize]) -> Result<Weight> {
        self.stored(name, shape)
    }

    /// The rows of the 2-D tensor `name` that `keep` selects, the others zero. A checkpoint reads
    /// only the kept rows' bytes (an opted-out expert's router row is never read).
    fn rows(
        &self,
        name: &str,
        shape: [usize; 2],
        keep: &dyn Fn(usize) -> bool,
    ) -> Result<Vec<f32>> {
        let mut v = self.values(name, &shape)?;
        for (r, row) in v.chunks_exact_mut(shape[1]).enumerate() {
            if !keep(r) {
                row.fill(0.0);
            }
        }
        Ok(v)
    }
}

impl TensorSource for crate::weights::Weights {
    fn values(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        self.get_values(name, shape)
    }
    fn contains(&self, name: &str) -> bool {
        crate::weights::Weights::contains(self, name)
    }
    fn stored(&self, name: &str, shape: &[usize]) -> Result<Weight> {
        self.get_stored(name, shape)
    }
    fn rows(
        &self,
        name: &str,
        shape: [usize; 2],
        keep: &dyn Fn(usize) -> bool,
    ) -> Result<Vec<f32>> {
        self.get_rows(name, shape, keep)
    }
}

/// How a model holds its projection weights on the CPU (`--dtype`). Activations, norms, the
/// embedding table and the router stay f32, and every product accumulates in f32.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WeightDtype {
    /// As the checkpoint stores them (bf16 stays bf16): the same numbers as upcasting, half the
    /// memory for a bf16 checkpoint.
    #[default]
    Checkpoint,
    /// Upcast to f32 at load.
    F32,
    /// Rounded to bf16 (to nearest even) when stored wider: changes an f32 checkpoint's numbers.
    Bf16,
}

impl WeightDtype {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "checkpoint" => Ok(WeightDtype::Checkpoint),
            "f32" => Ok(WeightDtype::F32),
            "bf16" => Ok(WeightDtype::Bf16),
            other => Err(Error::Input(format!(
                "--dtype `{other}`: choose checkpoint (weights as stored), f32 or bf16"
            ))),
        }
    }
}

/// A tensor source whose projection weights are held as `dtype` says; records the dtypes held.
pub(crate) struct Holding<'a> {
    pub src: &'a dyn TensorSource,
    pub dtype: WeightDtype,
    pub held: std::sync::Mutex<std::collections::BTreeSet<&'static str>>,
    /// Set when a wider weight was rounded to bf16 (the model's numbers then differ from f32's).
    pub rounded: std::sync::atomic::AtomicBool,
}

impl<'a> Holding<'a> {
    pub fn new(src: &'a dyn TensorSource, dtype: WeightDtype) -> Self {
        Holding {
            src,
            dtype,
            held: Default::default(),
            rounded: Default::default(),
        }
    }

    /// The dtypes the projections were held in, `+`-joined (`f32`, `bf16`, `bf16+f32`).
    pub fn held(&self) -> String {
        let held = self.held.lock().map(|h| h.clone()).unwrap_or_default();
        let v: Vec<&str> = held.into_iter().collect();
        if v.is_empty() {
            "f32".into()
        } else {
            v.join("+")
        }
    }
}

impl TensorSource for Holding<'_> {
    fn values(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        self.src.values(name, shape)
    }
    fn contains(&self, name: &str) -> bool {
        self.src.contains(name)
    }
    fn rows(
        &self,
        name: &str,
        shape: [usize; 2],
        keep: &dyn Fn(usize) -> bool,
    ) -> Result<Vec<f32>> {
        self.src.rows(name, shape, keep)
    }
    fn stored(&self, name: &str, shape: &[usize]) -> Result<Weight> {
        self.src.stored(name, shape)
    }
    fn weight(&self, name: &str, shape: &[usize]) -> Result<Weight> {
        let w = match (self.dtype, self.src.stored(name, shape)?) {
            (WeightDtype::F32, w @ Weight::F32(_)) | (WeightDtype::Checkpoint, w) => w,
            (WeightDtype::F32, w) => Weight::F32(w.to_f32()),
            (WeightDtype::Bf16, w @ Weight::Bf16(_)) => w,
            (WeightDtype::Bf16, w) => {
                self.rounded
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                Weight::Bf16(
                    w.to_f32()
                        .iter()
                        .map(|&x| half::bf16::from_f32(x).to_bits())
                        .collect(),
                )
            }
        };
        if let Ok(mut h) = self.held.lock() {
            h.insert(w.dtype());
        }
        Ok(w)
    }
}

pub(crate) fn linear(src: &dyn TensorSource, name: &str, out: usize, inp: usize) -> Result<Linear> {
    Ok(Linear::from_weight(
        src.weight(&format!("{name}.weight"), &[out, inp])?,
        out,
        inp,
    ))
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
        Ok(candle_nn::ops::rms_norm(
            &x.contiguous()?,
            &self.weight,
            self.eps,
        )?)
    }

    /// Normalises each `weight.len()`-wide row of `rows` in place.
    pub fn apply_rows(&self, rows: &mut [f32]) -> Result<()> {
        with_f32(&self.weight, |w| {
            let norm = |row: &mut [f32]| {
                let ms = row.iter().map(|x| x * x).sum::<f32>() / w.len() as f32;
                let inv = 1.0 / (ms + self.eps).sqrt();
                for (x, g) in row.iter_mut().zip(w) {
                    *x = g * (*x * inv);
                }
            };
            // A decoding step's few rows are not worth waking other threads for.
            if rows.len() > PARALLEL_MIN_ROWS * w.len() {
                rows.par_chunks_exact_mut(w.len()).for_each(norm);
            } else {
                rows.chunks_exact_mut(w.len()).for_each(norm);
            }
        })
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
    pub fn load(
        src: &dyn TensorSource,
        prefix: &str,
        hidden: usize,
        intermediate: usize,
    ) -> Result<Self> {
        let gate = src.weight(
            &format!("{prefix}.gate_proj.weight"),
            &[intermediate, hidden],
        )?;
        let up = src.weight(&format!("{prefix}.up_proj.weight"), &[intermediate, hidden])?;
        Ok(Self {
            gate_up: Linear::from_weight(gate.concat(up), 2 * intermediate, hidden),
            down: linear(src, &format!("{prefix}.down_proj"), hidden, intermediate)?,
            intermediate,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (m, h) = x.dims2()?;
        let out = with_f32(&x.contiguous()?, |xs| self.forward_rows(xs, m))??;
        Ok(Tensor::from_vec(out, (m, h), &Device::Cpu)?)
    }

    /// The MLP on `m` rows of `x`, [`MLP_ROWS`] rows at a time: the gate and up activations then stay
    /// small in a long prefill, and a row's result does not depend on the rows sharing its matmul.
    pub fn forward_rows(&self, x: &[f32], m: usize) -> Result<Vec<f32>> {
        if m == 0 {
            return Ok(Vec::new());
        }
        let (i, h) = (self.intermediate, x.len() / m);
        let mut out = Vec::with_capacity(m * h);
        for rows in x.chunks(MLP_ROWS * h) {
            let r = rows.len() / h;
            let mut gu = self.gate_up.forward_rows(rows, r)?;
            // silu(gate) * up overwrites the gate half of each row, which the down projection reads in
            // place.
            gu.par_chunks_mut(2 * i).for_each(|row| {
                let (g, u) = row.split_at_mut(i);
                crate::vecmath::silu_mul_in_place(g, u);
            });
            out.extend(self.down.forward_strided(&gu, r, 2 * i)?);
        }
        Ok(out)
    }
}

/// Rows per pass through an MLP's projections (a multiple of the matmul's row block).
const MLP_ROWS: usize = 240;

/// Per-batch state every layer sees: the sequences' spans and caches, and each token's expert mask.
pub(crate) struct Batch<'a> {
    pub spans: Vec<SeqSpan<'a>>,
    /// Expert mask of each row (token) of the batch; empty for dense models.
    pub token_masks: Vec<&'a ExpertMask>,
    /// Router logits of each MoE layer, collected when asked for.
    pub router_logits: Option<Vec<Tensor>>,
    /// The layer being computed.
    pub layer: usize,
    /// Tokens routed to each expert, per layer (MoE models), for routing statistics.
    pub routed_tokens: Vec<Vec<u64>>,
}

/// Batches of up to this many tokens (decoding steps) run their experts concurrently, and do their
/// row-wise work (norms) on one thread; larger ones parallelise within it.
const PARALLEL_MIN_ROWS: usize = 64;

/// Sparse Mixture-of-Experts feed-forward: softmax over all allowed experts, top-k, and each expert run
/// once on exactly the tokens routed to it.
#[derive(Clone, Debug)]
pub(crate) struct SparseMoe {
    gate: Linear,
    /// `None` for experts that were opted out at load time (their weights were never read).
    experts: Vec<Option<Mlp>>,
    routing: Routing,
    /// Added to the router logits before the softmax (FlexOlmo's negative bias); empty when unused.
    router_bias: Vec<f32>,
    hidden: usize,
}

impl SparseMoe {
    /// Loads `{prefix}.gate` and `{prefix}.experts.{e}` for the experts `loaded` allows. `router_bias`
    /// (one value per expert, or empty) is added to the router logits before the softmax.
    pub fn load(
        src: &dyn TensorSource,
        prefix: &str,
        cfg: &Config,
        loaded: &ExpertMask,
        router_bias: &[f32],
    ) -> Result<Self> {
        let h = cfg.hidden_size;
        let experts = (0..cfg.num_experts)
            .map(|e| {
                loaded
                    .is_allowed(e)
                    .then(|| {
                        Mlp::load(
                            src,
                            &format!("{prefix}.experts.{e}"),
                            h,
                            cfg.intermediate_size,
                        )
                    })
                    .transpose()
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            gate: Linear::new(
                src.rows(
                    &format!("{prefix}.gate.weight"),
                    [cfg.num_experts, h],
                    &|e| loaded.is_allowed(e),
                )?,
                cfg.num_experts,
                h,
            ),
            experts,
            routing: Routing {
                top_k: cfg.num_experts_per_tok,
                norm_topk_prob: cfg.norm_topk_prob,
            },
            router_bias: if router_bias.iter().any(|&b| b != 0.0) {
                router_bias.to_vec()
            } else {
                Vec::new()
            },
            hidden: h,
        })
    }

    pub fn forward(&self, x: &Tensor, batch: &mut Batch<'_>) -> Result<Tensor> {
        let (n, h) = x.dims2()?;
        let out = with_f32(&x.contiguous()?, |xs| self.forward_rows(xs, n, batch))??;
        Ok(Tensor::from_vec(out, (n, h), &Device::Cpu)?)
    }

    fn forward_rows(&self, x: &[f32], n: usize, batch: &mut Batch<'_>) -> Result<Vec<f32>> {
        let (h, num_experts) = (self.hidden, self.experts.len());
        let logits = self.gate.forward_rows(x, n)?;
        let mut biased = logits.clone();
        if !self.router_bias.is_empty() {
            for row in biased.chunks_exact_mut(num_experts) {
                for (l, b) in row.iter_mut().zip(&self.router_bias) {
                    *l += b;
                }
            }
        }
        let mut routed: Vec<(Vec<usize>, Vec<f32>)> = vec![(Vec::new(), Vec::new()); num_experts];
        for (row, mask) in batch.token_masks.iter().enumerate() {
            for (e, w) in self
                .routing
                .route(&biased[row * num_experts..(row + 1) * num_experts], mask)
            {
                routed[e].0.push(row);
                routed[e].1.push(w);
            }
        }
        if let Some(counts) = batch.routed_tokens.get_mut(batch.layer) {
            for (c, (rows, _)) in counts.iter_mut().zip(&routed) {
                *c += rows.len() as u64;
            }
        }
        if let Some(all) = batch.router_logits.as_mut() {
            // An expert not loaded has no router row: its logit is reported as removed.
            let mut logits = logits;
            for row in logits.chunks_exact_mut(num_experts) {
                for (e, l) in row.iter_mut().enumerate() {
                    if self.experts[e].is_none() {
                        *l = f32::NEG_INFINITY;
                    }
                }
            }
            all.push(Tensor::from_vec(logits, (n, num_experts), &Device::Cpu)?);
        }
        let mut out = vec![0f32; n * h];
        // Each row adds its experts' weighted outputs in expert-index order, as the reference
        // accumulates. When decoding (few tokens) the experts run concurrently, which keeps more weight
        // streams in flight; with many tokens each expert's matmul is parallel enough, and each output
        // is added as soon as it exists, so only one expert's activations are held at a time.
        let run = |(e, (rows, _)): (usize, &(Vec<usize>, Vec<f32>))| -> Result<Vec<f32>> {
            if rows.is_empty() {
                return Ok(Vec::new());
            }
            let expert = self.experts[e].as_ref().ok_or_else(|| {
                Error::Input(format!(
                    "expert {e} was opted out when the model was loaded"
                ))
            })?;
            let mut xs = Vec::with_capacity(rows.len() * h);
            for &row in rows {
                xs.extend_from_slice(&x[row * h..(row + 1) * h]);
            }
            expert.forward_rows(&xs, rows.len())
        };
        let add = |out: &mut [f32], (rows, weights): &(Vec<usize>, Vec<f32>), y: &[f32]| {
            for ((&row, &w), y) in rows.iter().zip(weights).zip(y.chunks_exact(h)) {
                for (d, &v) in out[row * h..(row + 1) * h].iter_mut().zip(y) {
                    *d += w * v;
                }
            }
        };
        if n <= PARALLEL_MIN_ROWS {
            let outputs = routed
                .par_iter()
                .enumerate()
                .map(run)
                .collect::<Result<Vec<_>>>()?;
            for (r, y) in routed.iter().zip(&outputs) {
                add(&mut out, r, y);
            }
        } else {
            for (e, r) in routed.iter().enumerate() {
                let y = run((e, r))?;
                add(&mut out, r, &y);
            }
        }
        Ok(out)
    }
}

/// Self-attention with full-width q/k RMSNorm (OLMo2, FlexOlmo, OLMoE) and optional q/k/v clipping (OLMoE).
#[derive(Clone, Debug)]
pub(crate) struct Attention {
    /// q, k and v projections stacked into one `[q + 2 kv, hidden]` matmul.
    qkv_proj: Linear,
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
        let qkv = src
            .weight(&format!("{prefix}.q_proj.weight"), &[qw, h])?
            .concat(src.weight(&format!("{prefix}.k_proj.weight"), &[kvw, h])?)
            .concat(src.weight(&format!("{prefix}.v_proj.weight"), &[kvw, h])?);
        Ok(Self {
            qkv_proj: Linear::from_weight(qkv, qw + 2 * kvw, h),
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
        let (n, h) = x.dims2()?;
        let qw = self.heads.heads * self.heads.head_dim;
        let kvw = self.heads.kv_heads * self.heads.head_dim;
        let qkv = with_f32(&x.contiguous()?, |xs| self.qkv_proj.forward_rows(xs, n))??;
        let (mut q, mut k, mut v) = (
            Vec::with_capacity(n * qw),
            Vec::with_capacity(n * kvw),
            Vec::with_capacity(n * kvw),
        );
        for row in qkv.chunks_exact(qw + 2 * kvw) {
            q.extend_from_slice(&row[..qw]);
            k.extend_from_slice(&row[qw..qw + kvw]);
            v.extend_from_slice(&row[qw + kvw..]);
        }
        drop(qkv);
        self.q_norm.apply_rows(&mut q)?;
        self.k_norm.apply_rows(&mut k)?;
        if let Some(c) = self.clip_qkv {
            let c = c as f32;
            for x in q.iter_mut().chain(k.iter_mut()).chain(v.iter_mut()) {
                *x = x.clamp(-c, c);
            }
        }
        let out = attention::attend(
            self.heads,
            &self.rope,
            layer,
            &mut q,
            &mut k,
            &v,
            &mut batch.spans,
        );
        // Freed before the output projection: a long prefill's peak memory is made of such buffers.
        drop((q, k, v));
        let out = self.o_proj.forward_rows(&out, n)?;
        Ok(Tensor::from_vec(out, (n, h), &Device::Cpu)?)
    }
}

/// An empty cache shaped for `cfg`.
pub(crate) fn new_cache(cfg: &Config) -> KvCache {
    KvCache::new(
        cfg.num_hidden_layers,
        cfg.num_key_value_heads * cfg.head_dim,
    )
}
