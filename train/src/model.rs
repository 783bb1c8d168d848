//! The OLMo2 / FlexOlmo forward pass in candle, differentiable, with the checkpoint names the engine
//! loads, so trained weights mean the same thing to the engine (`tests/parity.rs` checks the logits).
//!
//! ```text
//! h = embed(ids)
//! per layer: q = q_norm(Wq h), k = k_norm(Wk h), v = Wv h; RoPE(q, k) (rotate-half)
//!            h = h + post_attention_layernorm(Wo softmax(q k^T / sqrt(d) + causal) v)
//!            h = h + post_feedforward_layernorm(ffn(h))
//! ffn = SwiGLU (olmo2) | sum_{e in top-k} softmax(h G^T)_e SwiGLU_e(h) (flex_olmo)
//! logits = lm_head(norm(h))
//! ```
//! RMSNorm is `w * (x / sqrt(mean(x^2) + eps))` over the whole q / k projection (OLMo2), in f32.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var, D};
use engine::config::{Architecture, Config};
use engine::init::{tensor_specs, RandomInit};

use crate::{Error, Result};

enum Param {
    /// Not trained: a constant of the graph.
    Frozen(Tensor),
    Trained(Var),
    /// A router whose first rows are fixed and whose last row is trained (an owner's router row
    /// next to the frozen public row).
    RouterRow {
        fixed: Tensor,
        trained: Var,
    },
}

/// A model being trained (or loaded to compare with the engine).
pub struct TrainModel {
    config: Config,
    params: BTreeMap<String, Param>,
}

fn expert_name(name: &str, expert: usize) -> Option<String> {
    let (prefix, proj) = name.split_once(".mlp.")?;
    Some(format!("{prefix}.mlp.experts.{expert}.{proj}"))
}

impl TrainModel {
    /// A dense OLMo2 model of `config` with seeded random weights (norms one, the rest N(0, 0.02)),
    /// every tensor trained.
    pub fn init_public(config: Config, seed: u64) -> Result<Self> {
        if config.architecture != Architecture::Olmo2 {
            return Err(Error::Input("a public model is a dense olmo2 model".into()));
        }
        let init = RandomInit { seed };
        let mut params = BTreeMap::new();
        for (name, shape) in tensor_specs(&config) {
            let values = init.generate(&name, shape.iter().product());
            let t = Tensor::from_vec(values, shape, &Device::Cpu)?;
            params.insert(name, Param::Trained(Var::from_tensor(&t)?));
        }
        Ok(Self { config, params })
    }

    /// A 2-expert FlexOlmo built from a public OLMo2 checkpoint's tensors, as a data owner trains it:
    /// expert 0 is the public FFN and expert 1 starts as a copy of it; router rows are `router_rows`
    /// (`[public row, owner row]`, each `hidden_size` wide). Only expert 1 and the owner's router row
    /// are trained; attention, embeddings, norms, the LM head and the public expert stay frozen.
    pub fn expert_from_public(
        public: &Config,
        tensors: &HashMap<String, Tensor>,
        router_rows: [&[f32]; 2],
    ) -> Result<Self> {
        if public.architecture != Architecture::Olmo2 {
            return Err(Error::Input(
                "experts are trained from a dense olmo2 public model".into(),
            ));
        }
        let h = public.hidden_size;
        if router_rows.iter().any(|r| r.len() != h) {
            return Err(Error::Input(format!(
                "router rows must have hidden_size = {h} values"
            )));
        }
        let mut config = public.clone();
        config.architecture = Architecture::FlexOlmo;
        config.num_experts = 2;
        config.num_experts_per_tok = 2;
        config.norm_topk_prob = false;
        let get = |name: &str| -> Result<Tensor> {
            let t = tensors
                .get(name)
                .ok_or_else(|| Error::Input(format!("the public model has no tensor `{name}`")))?;
            Ok(t.to_dtype(DType::F32)?)
        };
        let mut params = BTreeMap::new();
        for (name, _) in tensor_specs(public) {
            let t = get(&name)?;
            if name.contains(".mlp.") {
                let (public_expert, owner_expert) = (
                    expert_name(&name, 0).expect("an MLP tensor"),
                    expert_name(&name, 1).expect("an MLP tensor"),
                );
                params.insert(owner_expert, Param::Trained(Var::from_tensor(&t.copy()?)?));
                params.insert(public_expert, Param::Frozen(t));
            } else {
                params.insert(name, Param::Frozen(t));
            }
        }
        for l in 0..config.num_hidden_layers {
            let fixed = Tensor::from_slice(router_rows[0], (1, h), &Device::Cpu)?;
            let trained = Var::from_slice(router_rows[1], (1, h), &Device::Cpu)?;
            params.insert(
                format!("model.layers.{l}.mlp.gate.weight"),
                Param::RouterRow { fixed, trained },
            );
        }
        Ok(Self { config, params })
    }

    /// A checkpoint (olmo2, or flex_olmo with any number of experts; one file or sharded) with every
    /// tensor frozen.
    pub fn load(dir: &Path) -> Result<Self> {
        let config = Config::from_file(&dir.join("config.json"))?;
        let tensors = read_tensors(dir)?;
        let mut params = BTreeMap::new();
        for (name, _) in tensor_specs(&config) {
            let t = tensors
                .get(&name)
                .ok_or_else(|| Error::Input(format!("{}: no tensor `{name}`", dir.display())))?;
            params.insert(name, Param::Frozen(t.to_dtype(DType::F32)?));
        }
        Ok(Self { config, params })
    }

    /// Makes every layer's router (all rows) trainable, leaving the rest frozen: router tuning of a
    /// merged model.
    pub fn with_trained_routers(mut self) -> Result<Self> {
        if self.config.architecture != Architecture::FlexOlmo {
            return Err(Error::Input("router tuning needs a flex_olmo model".into()));
        }
        for (name, p) in self.params.iter_mut() {
            if let (true, Param::Frozen(t)) = (name.ends_with(".mlp.gate.weight"), &*p) {
                *p = Param::Trained(Var::from_tensor(t)?);
            }
        }
        Ok(self)
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The variables the optimiser updates.
    pub fn trainable(&self) -> Vec<Var> {
        self.params
            .values()
            .filter_map(|p| match p {
                Param::Frozen(_) => None,
                Param::Trained(v) | Param::RouterRow { trained: v, .. } => Some(v.clone()),
            })
            .collect()
    }

    fn get(&self, name: &str) -> Result<Tensor> {
        match self.params.get(name) {
            Some(Param::Frozen(t)) => Ok(t.clone()),
            Some(Param::Trained(v)) => Ok(v.as_tensor().clone()),
            Some(Param::RouterRow { fixed, trained }) => {
                Ok(Tensor::cat(&[fixed, trained.as_tensor()], 0)?)
            }
            None => Err(Error::Input(format!("no tensor `{name}`"))),
        }
    }

    /// Every tensor by its checkpoint name (router rows joined).
    pub fn tensors(&self) -> Result<BTreeMap<String, Tensor>> {
        self.params
            .keys()
            .map(|n| Ok((n.clone(), self.get(n)?)))
            .collect()
    }

    fn rms_norm(&self, x: &Tensor, name: &str) -> Result<Tensor> {
        let w = self.get(&format!("{name}.weight"))?;
        let eps = self.config.rms_norm_eps;
        let inv = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
        Ok(x.broadcast_mul(&inv)?.broadcast_mul(&w)?)
    }

    fn linear(&self, x: &Tensor, name: &str) -> Result<Tensor> {
        let w = self.get(&format!("{name}.weight"))?;
        Ok(x.matmul(&w.t()?)?)
    }

    fn swiglu(&self, x: &Tensor, prefix: &str) -> Result<Tensor> {
        let g = self.linear(x, &format!("{prefix}.gate_proj"))?.silu()?;
        let u = self.linear(x, &format!("{prefix}.up_proj"))?;
        self.linear(&(g * u)?, &format!("{prefix}.down_proj"))
    }

    /// Final hidden states (after the final norm) `[batch * seq, hidden]` of equal-length sequences.
    pub fn hidden(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(self.forward(ids)?.0)
    }

    /// Final hidden states and, for MoE models, what each layer's router and experts did.
    pub fn forward(&self, ids: &Tensor) -> Result<(Tensor, Vec<MoeTrace>)> {
        self.forward_without(ids, &[])
    }

    /// [`Self::forward`] with the experts `opted_out` removed, as the engine's opt-out does.
    pub fn forward_without(
        &self,
        ids: &Tensor,
        opted_out: &[usize],
    ) -> Result<(Tensor, Vec<MoeTrace>)> {
        let (b, s) = ids.dims2()?;
        let cfg = &self.config;
        let (heads, kv, hd) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let (cos, sin) = rope_tables(hd, cfg.rope_theta, s)?;
        let mask = causal_mask(s)?;
        let embed = self.get("model.embed_tokens.weight")?;
        let mut x = embed.embedding(&ids.flatten_all()?)?;
        let mut traces = Vec::new();
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let q = self.rms_norm(
                &self.linear(&x, &format!("{p}.self_attn.q_proj"))?,
                &format!("{p}.self_attn.q_norm"),
            )?;
            let k = self.rms_norm(
                &self.linear(&x, &format!("{p}.self_attn.k_proj"))?,
                &format!("{p}.self_attn.k_norm"),
            )?;
            let v = self.linear(&x, &format!("{p}.self_attn.v_proj"))?;
            let split = |t: Tensor, n: usize| -> Result<Tensor> {
                Ok(t.reshape((b, s, n, hd))?.transpose(1, 2)?.contiguous()?)
            };
            let q = rope(&split(q, heads)?, &cos, &sin)?;
            let k = repeat_kv(rope(&split(k, kv)?, &cos, &sin)?, heads / kv)?;
            let v = repeat_kv(split(v, kv)?, heads / kv)?;
            let scores = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?.broadcast_add(&mask)?;
            let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
            let a = probs
                .matmul(&v)?
                .transpose(1, 2)?
                .reshape((b * s, heads * hd))?;
            let a = self.linear(&a, &format!("{p}.self_attn.o_proj"))?;
            x = (x + self.rms_norm(&a, &format!("{p}.post_attention_layernorm"))?)?;
            let m = match cfg.architecture {
                Architecture::Olmo2 => self.swiglu(&x, &format!("{p}.mlp"))?,
                _ => {
                    let (m, trace) = self.moe(&x, &format!("{p}.mlp"), opted_out)?;
                    traces.push(trace);
                    m
                }
            };
            x = (x + self.rms_norm(&m, &format!("{p}.post_feedforward_layernorm"))?)?;
        }
        Ok((self.rms_norm(&x, "model.norm")?, traces))
    }

    /// The engine's routing: softmax over the experts not opted out, the top-k probabilities (ties to
    /// the lower index), renormalised when `norm_topk_prob`. The choice of experts is not differentiable;
    /// their weights are. Every chosen expert runs on every token (these models are small).
    fn moe(&self, x: &Tensor, prefix: &str, opted_out: &[usize]) -> Result<(Tensor, MoeTrace)> {
        let e = self.config.num_experts;
        let logits = self.linear(x, &format!("{prefix}.gate"))?;
        let routed = if opted_out.is_empty() {
            logits.clone()
        } else {
            // A large negative logit rather than -inf: the softmax gives exactly zero either way, and
            // its gradient stays finite.
            let bias: Vec<f32> = (0..e)
                .map(|i| if opted_out.contains(&i) { -1e9 } else { 0.0 })
                .collect();
            logits.broadcast_add(&Tensor::from_vec(bias, (1, e), x.device())?)?
        };
        let probs = candle_nn::ops::softmax(&routed, 1)?;
        let allowed = e - opted_out.iter().filter(|&&i| i < e).count();
        let k = self.config.num_experts_per_tok.min(allowed);
        let mut weights = probs.clone();
        if k < e {
            let routing = routers::Routing {
                top_k: k,
                norm_topk_prob: false,
            };
            let mask = routers::ExpertMask::all(e)
                .without(opted_out)
                .map_err(|err| {
                    Error::Input(format!("cannot opt out experts {opted_out:?}: {err}"))
                })?;
            let mut keep = vec![0f32; probs.elem_count()];
            for (row, l) in routed.to_vec2::<f32>()?.iter().enumerate() {
                for (i, _) in routing.route(l, &mask) {
                    keep[row * e + i] = 1.0;
                }
            }
            weights = (weights * Tensor::from_vec(keep, probs.shape(), x.device())?)?;
        }
        if self.config.norm_topk_prob {
            weights = weights.broadcast_div(&weights.sum_keepdim(1)?)?;
        }
        let mut out: Option<Tensor> = None;
        let mut raw = Vec::with_capacity(e);
        for i in 0..e {
            if opted_out.contains(&i) {
                continue;
            }
            let y = self.swiglu(x, &format!("{prefix}.experts.{i}"))?;
            let weighted = y.broadcast_mul(&weights.narrow(1, i, 1)?)?;
            raw.push(y);
            out = Some(match out {
                None => weighted,
                Some(o) => (o + weighted)?,
            });
        }
        let out = out.ok_or_else(|| Error::Input("a MoE layer needs experts".into()))?;
        let drift = match raw.as_slice() {
            [public, owner] => {
                let scale = (public.sqr()?.mean_all()? + 1e-6)?;
                Some(((owner - public)?.sqr()?.mean_all()? / scale)?)
            }
            _ => None,
        };
        Ok((out, MoeTrace { logits, drift }))
    }

    /// Logits `[rows, vocab]` of final hidden states.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        self.linear(hidden, "lm_head")
    }

    /// Mean next-token cross-entropy of `ids` `[batch, seq + 1]`.
    pub fn loss(&self, ids: &Tensor) -> Result<Tensor> {
        self.loss_without(ids, &[])
    }

    /// The next-token cross-entropy of `ids` `[batch, seq + 1]` and, when `routing` gives whether these
    /// are the owner's tokens, the routing loss of a 2-expert model on the same forward pass: the binary
    /// cross-entropy of that label against the router's preference for expert 1 (logit 1 - logit 0),
    /// averaged over tokens and layers.
    pub fn losses(&self, ids: &Tensor, routing: Option<bool>) -> Result<(Tensor, Option<Tensor>)> {
        let (lm, traces) = self.next_token_loss(ids, &[])?;
        let route = routing
            .map(|owner| routing_bce(&traces, owner))
            .transpose()?;
        Ok((lm, route))
    }

    /// Mean next-token cross-entropy of `ids` `[batch, seq + 1]` with the experts `opted_out` removed.
    pub fn loss_without(&self, ids: &Tensor, opted_out: &[usize]) -> Result<Tensor> {
        Ok(self.next_token_loss(ids, opted_out)?.0)
    }

    /// Next-token cross-entropy of `ids` `[batch, seq + 1]` and the MoE traces of that forward pass.
    fn next_token_loss(
        &self,
        ids: &Tensor,
        opted_out: &[usize],
    ) -> Result<(Tensor, Vec<MoeTrace>)> {
        let t = ids.dim(1)? - 1;
        let (hidden, traces) = self.forward_without(&ids.narrow(1, 0, t)?, opted_out)?;
        let targets = ids.narrow(1, 1, t)?.flatten_all()?;
        let lm = candle_nn::loss::cross_entropy(&self.logits(&hidden)?, &targets)?;
        Ok((lm, traces))
    }

    /// The loss on windows of text that is not the owner's (public text, random tokens) for a 2-expert
    /// model: the routing loss towards the public expert, plus the owner expert's drift from the public
    /// expert (mean squared difference of their outputs relative to the public output's), so that a
    /// router that sends such text to the owner's expert anyway, after merging, does little harm.
    pub fn negative_loss(&self, ids: &Tensor) -> Result<Tensor> {
        let (_, traces) = self.forward(ids)?;
        let mut drift = Vec::with_capacity(traces.len());
        for t in &traces {
            drift.push(t.drift.clone().ok_or_else(|| {
                Error::Input("the negative loss is for 2-expert (public + owner) models".into())
            })?);
        }
        let drift = Tensor::stack(&drift, 0)?.mean_all()?;
        Ok((routing_bce(&traces, false)? + drift)?)
    }

    /// Writes `config.json`, `generation_config.json` and `model.safetensors` (tensors as `dtype`).
    pub fn save(&self, dir: &Path, dtype: DType) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let tensors = self
            .tensors()?
            .into_iter()
            .map(|(n, t)| Ok((n, t.to_dtype(dtype)?)))
            .collect::<Result<HashMap<_, _>>>()?;
        let path = dir.join("model.safetensors");
        candle_core::safetensors::save(&tensors, &path)?;
        let mut config = self.config.to_json();
        config["dtype"] = match dtype {
            DType::BF16 => "bfloat16",
            DType::F16 => "float16",
            _ => "float32",
        }
        .into();
        let text = serde_json::to_string_pretty(&config).expect("JSON values serialise");
        let path = dir.join("config.json");
        std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
        let generation = serde_json::json!({
            "eos_token_id": self.config.eos_token_ids.first(),
            "pad_token_id": self.config.pad_token_id,
        });
        let path = dir.join("generation_config.json");
        std::fs::write(&path, generation.to_string()).map_err(|e| Error::io(&path, e))
    }
}

/// What one MoE layer did in a forward pass.
pub struct MoeTrace {
    /// Router logits `[tokens, experts]`.
    pub logits: Tensor,
    /// 2-expert models: the owner expert's mean squared difference from the public expert, relative to
    /// the public expert's mean square.
    pub drift: Option<Tensor>,
}

fn routing_bce(traces: &[MoeTrace], owner: bool) -> Result<Tensor> {
    let mut total: Option<Tensor> = None;
    for t in traces {
        let l = &t.logits;
        if l.dim(1)? != 2 {
            return Err(Error::Input(
                "the routing loss is for 2-expert (public + owner) models".into(),
            ));
        }
        let d = (l.narrow(1, 1, 1)? - l.narrow(1, 0, 1)?)?;
        // softplus(-d) for the owner's tokens, softplus(d) for public ones; clamped against overflow.
        let z = if owner { d.neg()? } else { d };
        let loss = (z.clamp(-30f32, 30f32)?.exp()? + 1.0)?.log()?.mean_all()?;
        total = Some(match total {
            None => loss,
            Some(t) => (t + loss)?,
        });
    }
    let total = total
        .ok_or_else(|| Error::Input("a routing loss needs a model with router layers".into()))?;
    Ok((total / traces.len() as f64)?)
}

/// The tensors of a checkpoint (`model.safetensors`, or the shards its
/// `model.safetensors.index.json` lists, as the engine reads them), in their stored dtype.
pub fn read_tensors(dir: &Path) -> Result<HashMap<String, Tensor>> {
    let weights = engine::Weights::open(dir)?;
    weights
        .names()
        .map(|name| {
            let (stored, shape, bytes) = weights.raw(name)?;
            let dtype = match stored {
                safetensors::Dtype::BF16 => DType::BF16,
                safetensors::Dtype::F16 => DType::F16,
                safetensors::Dtype::F32 => DType::F32,
                other => {
                    return Err(Error::Input(format!(
                        "{}: tensor `{name}` is {other:?}; supported: F32, BF16, F16",
                        dir.display()
                    )))
                }
            };
            let t = Tensor::from_raw_buffer(bytes, dtype, &shape, &Device::Cpu)?;
            Ok((name.to_string(), t))
        })
        .collect()
}

/// RoPE tables `[seq, head_dim]` (each half repeated), computed in f32 exactly as the engine does.
fn rope_tables(head_dim: usize, theta: f64, seq: usize) -> Result<(Tensor, Tensor)> {
    let base = theta as f32;
    let half = head_dim / 2;
    let inv: Vec<f32> = (0..half)
        .map(|i| 1.0f32 / base.powf((2 * i) as f32 / head_dim as f32))
        .collect();
    let (mut cos, mut sin) = (
        Vec::with_capacity(seq * head_dim),
        Vec::with_capacity(seq * head_dim),
    );
    for pos in 0..seq {
        for _ in 0..2 {
            for f in &inv {
                let a = pos as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
    }
    Ok((
        Tensor::from_vec(cos, (seq, head_dim), &Device::Cpu)?,
        Tensor::from_vec(sin, (seq, head_dim), &Device::Cpu)?,
    ))
}

/// `x * cos + rotate_half(x) * sin` for `x` `[batch, heads, seq, head_dim]`.
fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let (x1, x2) = (
        x.narrow(D::Minus1, 0, half)?,
        x.narrow(D::Minus1, half, half)?,
    );
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    Ok((x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?)?)
}

/// Grouped-query attention: each kv head serves `n` consecutive query heads.
fn repeat_kv(x: Tensor, n: usize) -> Result<Tensor> {
    if n == 1 {
        return Ok(x);
    }
    let (b, kv, t, hd) = x.dims4()?;
    Ok(x.unsqueeze(2)?
        .expand((b, kv, n, t, hd))?
        .reshape((b, kv * n, t, hd))?)
}

fn causal_mask(t: usize) -> Result<Tensor> {
    let m: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(m, (t, t), &Device::Cpu)?)
}
