//! A FlexOlmo, OLMoE or OLMo2 forward pass on one GPU: bf16 weights and GEMM inputs, an f32 residual
//! stream, f32 accumulation everywhere.
//!
//! Per layer: q/k/v in one cuBLAS GEMM; q/k norm + RoPE + cache append in one kernel; attention over each
//! sequence's own cache; for MoE layers router softmax + top-k under each token's expert mask, a stable
//! sort of (token, slot) entries by expert, the experts' SwiGLU as grouped GEMMs over those sorted rows
//! (one weight slab per expert), and a weighted un-permute. Sequences are never padded.

use std::fmt;
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use routers::ExpertMask;

use super::{bf16_bits, cfg1, device_err, Gpu};
use crate::attention::KvCache;
use crate::config::{Architecture, Config};
use crate::layers::TensorSource;
use crate::model::SeqInput;
use crate::{Error, Result};

/// Rows per expert (on average) above which expert matmuls go to cuBLAS, one GEMM per expert, instead
/// of the grouped kernel built for decoding's few rows per expert.
const GROUPED_MAX_ROWS: usize = 24;

/// Router logits of each MoE layer, `[tokens, experts]` row-major.
pub(crate) type RouterLogits = Vec<Vec<f32>>;

/// A sequence's keys and values on the GPU: `[position][layer][k | v][kv_heads * head_dim]` bf16.
pub(crate) struct SeqCache {
    row: usize,
    len: usize,
    cap: usize,
    buf: Option<CudaSlice<u16>>,
    /// A fork's context, copied on the fork's first forward pass.
    parent: Option<Arc<KvCache>>,
}

impl fmt::Debug for SeqCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SeqCache")
            .field("len", &self.len)
            .field("cap", &self.cap)
            .finish()
    }
}

impl SeqCache {
    /// An empty cache with `row` values per position.
    pub fn new(row: usize) -> Self {
        Self {
            row,
            len: 0,
            cap: 0,
            buf: None,
            parent: None,
        }
    }

    /// A cache continuing `parent` (a GPU cache); the copy happens on the first forward pass.
    pub fn fork(parent: &Arc<KvCache>, row: usize) -> Self {
        Self {
            row,
            len: parent.len(),
            cap: 0,
            buf: None,
            parent: Some(parent.clone()),
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn row(&self) -> usize {
        self.row
    }

    /// Makes room for `extra` more positions and returns the buffer's address.
    fn reserve(&mut self, gpu: &Gpu, extra: usize) -> Result<u64> {
        let need = self.len + extra;
        if self.buf.is_none() || self.cap < need {
            let cap = if self.buf.is_some() {
                need.max(self.cap + self.cap / 2 + 16)
            } else {
                need
            };
            let mut buf = gpu.alloc::<u16>(cap * self.row)?;
            let copy = self.len * self.row;
            if copy > 0 {
                let src = match (&self.buf, &self.parent) {
                    (Some(b), _) => b,
                    (None, Some(p)) => {
                        p.gpu_cache().and_then(|c| c.buf.as_ref()).ok_or_else(|| {
                            Error::Input("a forked cache's parent is not on the GPU".into())
                        })?
                    }
                    (None, None) => unreachable!("a cache with positions has a buffer or a parent"),
                };
                gpu.stream
                    .memcpy_dtod(&src.slice(..copy), &mut buf.slice_mut(..copy))
                    .map_err(|e| device_err("KV cache copy", e))?;
            }
            self.buf = Some(buf);
            self.cap = cap;
            self.parent = None;
        }
        Ok(gpu.ptr(self.buf.as_ref().expect("allocated above")))
    }
}

/// A bf16 matrix with `n` rows on the GPU.
#[derive(Clone, Copy)]
struct Lin {
    ptr: u64,
    n: usize,
}

enum Ffn {
    Dense {
        gate_up: Lin,
        down: Lin,
    },
    Moe {
        gate: Lin,
        bias: Option<CudaSlice<f32>>,
        /// Per expert: the fused `[2I, H]` gate/up slab and the `[H, I]` down slab (0 when opted out).
        gate_up: Vec<u64>,
        down: Vec<u64>,
        gate_up_table: CudaSlice<u64>,
        down_table: CudaSlice<u64>,
    },
}

struct Layer {
    /// OLMoE's pre-attention norm; OLMo2 and FlexOlmo normalise after attention and the FFN instead.
    input_norm: Option<u64>,
    qkv: Lin,
    q_norm: u64,
    k_norm: u64,
    o: Lin,
    /// OLMo2/FlexOlmo: norm of the attention output; OLMoE: norm of the FFN input.
    post_attention_norm: u64,
    /// OLMo2/FlexOlmo: norm of the FFN output.
    post_ffn_norm: Option<u64>,
    ffn: Ffn,
}

pub(crate) struct CudaModel {
    gpu: Arc<Gpu>,
    h: usize,
    v: usize,
    inter: usize,
    heads: usize,
    kv_heads: usize,
    hd: usize,
    eps: f32,
    clip: f32,
    experts: usize,
    top_k: usize,
    norm_topk: bool,
    embed: u64,
    final_norm: u64,
    lm_head: Lin,
    layers: Vec<Layer>,
    inv_freq: CudaSlice<f32>,
    loaded: Option<ExpertMask>,
    /// `[layer][expert]` routed-token counts, accumulated by the permute kernel.
    routed: Mutex<CudaSlice<u64>>,
    /// Every weight buffer (the structs above hold their addresses).
    _weights: Vec<CudaSlice<u16>>,
    /// One forward pass at a time: they share the stream.
    lock: Mutex<()>,
}

/// Uploads weights as bf16, keeping every buffer.
struct Uploader<'a> {
    gpu: &'a Gpu,
    src: &'a dyn TensorSource,
    owned: Vec<CudaSlice<u16>>,
}

impl Uploader<'_> {
    fn put(&mut self, values: &[f32]) -> Result<u64> {
        let buf = self.gpu.upload(&bf16_bits(values))?;
        let p = self.gpu.ptr(&buf);
        self.owned.push(buf);
        Ok(p)
    }

    /// Tensors `names` (`rows[i]` x `k` each) stacked into one matrix.
    fn lin(&mut self, names: &[&str], rows: &[usize], k: usize) -> Result<Lin> {
        let mut values = Vec::new();
        for (name, &r) in names.iter().zip(rows) {
            values.extend(self.src.values(name, &[r, k])?);
        }
        Ok(Lin {
            ptr: self.put(&values)?,
            n: rows.iter().sum(),
        })
    }

    /// A norm weight (bf16 on the GPU: exact for bf16 checkpoints; kernels read it as f32).
    fn vector(&mut self, name: &str, n: usize) -> Result<u64> {
        let values = self.src.values(name, &[n])?;
        self.put(&values)
    }
}

/// Bytes of `count` elements of `T` from a device address.
fn at<T>(ptr: u64, count: usize) -> u64 {
    ptr + (count * std::mem::size_of::<T>()) as u64
}

impl CudaModel {
    /// Uploads the model to GPU `ordinal`. Experts outside `loaded` are never read or uploaded.
    pub fn load(
        gpu: Arc<Gpu>,
        cfg: &Config,
        src: &dyn TensorSource,
        loaded: Option<&ExpertMask>,
        router_bias: &[f32],
    ) -> Result<Self> {
        let (h, v, inter) = (cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size);
        let qw = cfg.num_attention_heads * cfg.head_dim;
        let kvw = cfg.num_key_value_heads * cfg.head_dim;
        if cfg.head_dim > 256 || !cfg.head_dim.is_multiple_of(2) {
            return Err(Error::Input(format!(
                "--device cuda supports even head sizes up to 256 (this model's is {})",
                cfg.head_dim
            )));
        }
        if cfg.num_experts > 256 || cfg.num_experts_per_tok > 16 {
            return Err(Error::Input(format!(
                "--device cuda supports up to 256 experts and top-16 routing (this model: {} experts, top-{})",
                cfg.num_experts, cfg.num_experts_per_tok
            )));
        }
        let mut w = Uploader {
            gpu: &gpu,
            src,
            owned: Vec::new(),
        };
        let embed = w.lin(&["model.embed_tokens.weight"], &[v], h)?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let a = format!("{p}.self_attn");
            let qkv = w.lin(
                &[
                    &format!("{a}.q_proj.weight"),
                    &format!("{a}.k_proj.weight"),
                    &format!("{a}.v_proj.weight"),
                ],
                &[qw, kvw, kvw],
                h,
            )?;
            let o = w.lin(&[&format!("{a}.o_proj.weight")], &[h], qw)?;
            let q_norm = w.vector(&format!("{a}.q_norm.weight"), qw)?;
            let k_norm = w.vector(&format!("{a}.k_norm.weight"), kvw)?;
            let moe = cfg.is_moe();
            let ffn = if moe {
                let mask = loaded
                    .ok_or_else(|| Error::Input("MoE model without an expert mask".into()))?;
                let gate = w.lin(&[&format!("{p}.mlp.gate.weight")], &[cfg.num_experts], h)?;
                let (mut gu, mut dn) = (vec![0u64; cfg.num_experts], vec![0u64; cfg.num_experts]);
                for e in mask.allowed() {
                    let x = format!("{p}.mlp.experts.{e}");
                    gu[e] = w
                        .lin(
                            &[
                                &format!("{x}.gate_proj.weight"),
                                &format!("{x}.up_proj.weight"),
                            ],
                            &[inter, inter],
                            h,
                        )?
                        .ptr;
                    dn[e] = w.lin(&[&format!("{x}.down_proj.weight")], &[h], inter)?.ptr;
                }
                let bias = if router_bias.iter().any(|&b| b != 0.0) {
                    Some(gpu.upload(router_bias)?)
                } else {
                    None
                };
                Ffn::Moe {
                    gate,
                    bias,
                    gate_up_table: gpu.upload(&gu)?,
                    down_table: gpu.upload(&dn)?,
                    gate_up: gu,
                    down: dn,
                }
            } else {
                let m = format!("{p}.mlp");
                Ffn::Dense {
                    gate_up: w.lin(
                        &[
                            &format!("{m}.gate_proj.weight"),
                            &format!("{m}.up_proj.weight"),
                        ],
                        &[inter, inter],
                        h,
                    )?,
                    down: w.lin(&[&format!("{m}.down_proj.weight")], &[h], inter)?,
                }
            };
            let olmoe = cfg.architecture == Architecture::Olmoe;
            let input_norm = if olmoe {
                Some(w.vector(&format!("{p}.input_layernorm.weight"), h)?)
            } else {
                None
            };
            let post_attention_norm =
                w.vector(&format!("{p}.post_attention_layernorm.weight"), h)?;
            let post_ffn_norm = if olmoe {
                None
            } else {
                Some(w.vector(&format!("{p}.post_feedforward_layernorm.weight"), h)?)
            };
            layers.push(Layer {
                input_norm,
                qkv,
                q_norm,
                k_norm,
                o,
                post_attention_norm,
                post_ffn_norm,
                ffn,
            });
        }
        let final_norm = w.vector("model.norm.weight", h)?;
        let lm_head = if cfg.tie_word_embeddings && !src.contains("lm_head.weight") {
            embed
        } else {
            w.lin(&["lm_head.weight"], &[v], h)?
        };
        let owned = w.owned;
        let base = cfg.rope_theta as f32;
        let inv_freq: Vec<f32> = (0..cfg.head_dim / 2)
            .map(|i| 1.0f32 / base.powf((2 * i) as f32 / cfg.head_dim as f32))
            .collect();
        Ok(Self {
            inv_freq: gpu.upload(&inv_freq)?,
            routed: Mutex::new(gpu.alloc::<u64>(cfg.num_hidden_layers * cfg.num_experts.max(1))?),
            gpu,
            h,
            v,
            inter,
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
            hd: cfg.head_dim,
            eps: cfg.rms_norm_eps as f32,
            clip: cfg.clip_qkv.map_or(0.0, |c| c as f32),
            experts: cfg.num_experts,
            top_k: cfg.num_experts_per_tok,
            norm_topk: cfg.norm_topk_prob,
            embed: embed.ptr,
            final_norm,
            lm_head,
            layers,
            loaded: loaded.cloned(),
            _weights: owned,
            lock: Mutex::new(()),
        })
    }

    pub fn device_name(&self) -> &str {
        &self.gpu.name
    }

    /// Elements per cached position.
    pub fn cache_row(&self) -> usize {
        self.layers.len() * 2 * self.kv_heads * self.hd
    }

    /// Tokens routed to each expert per layer since the last call (which resets them).
    pub fn take_routed(&self) -> Result<Vec<Vec<u64>>> {
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut routed = self.routed.lock().unwrap_or_else(|p| p.into_inner());
        let counts = self.gpu.download(&routed)?;
        self.gpu
            .stream
            .memset_zeros(&mut *routed)
            .map_err(|e| device_err("reset routing counts", e))?;
        let e = self.experts.max(1);
        Ok(counts.chunks(e).map(|c| c.to_vec()).collect())
    }

    /// Runs the new tokens of `seqs` (already validated by `Model::forward`) and returns the final
    /// hidden states `[tokens, hidden]` (f32, after the final norm) and, when asked, the router logits
    /// of each MoE layer.
    pub fn forward(
        &self,
        seqs: &mut [SeqInput<'_>],
        record_router_logits: bool,
    ) -> Result<(Vec<f32>, Option<RouterLogits>)> {
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let gpu = &*self.gpu;
        let n: usize = seqs.iter().map(|s| s.tokens.len()).sum();
        let (h, e_n, k) = (self.h, self.experts, self.top_k);
        let qw = self.heads * self.hd;
        let kvw = self.kv_heads * self.hd;
        let mut ids = Vec::with_capacity(n);
        let mut pos = Vec::with_capacity(n);
        let mut seq = Vec::with_capacity(n);
        let mut bases = Vec::with_capacity(seqs.len());
        let mut mask = Vec::new();
        for (i, s) in seqs.iter_mut().enumerate() {
            let cache = s
                .cache
                .gpu_cache_mut()
                .ok_or_else(|| Error::Input("a CPU KV cache was passed to a GPU model".into()))?;
            let p0 = cache.len();
            bases.push(cache.reserve(gpu, s.tokens.len())?);
            ids.extend_from_slice(s.tokens);
            pos.extend((p0..p0 + s.tokens.len()).map(|p| p as i32));
            seq.extend(std::iter::repeat_n(i as i32, s.tokens.len()));
            if let Some(loaded) = &self.loaded {
                let m = s.mask.unwrap_or(loaded);
                let row: Vec<u8> = (0..e_n).map(|e| m.is_allowed(e) as u8).collect();
                for _ in 0..s.tokens.len() {
                    mask.extend_from_slice(&row);
                }
            }
        }
        let d_ids = gpu.upload(&ids)?;
        let d_pos = gpu.upload(&pos)?;
        let d_seq = gpu.upload(&seq)?;
        let d_base = gpu.upload(&bases)?;
        let d_mask = gpu.upload(if mask.is_empty() { &[0u8][..] } else { &mask })?;
        let (p_ids, p_pos, p_seq, p_base, p_mask) = (
            gpu.ptr(&d_ids),
            gpu.ptr(&d_pos),
            gpu.ptr(&d_seq),
            gpu.ptr(&d_base),
            gpu.ptr(&d_mask),
        );

        // Scratch for the whole pass, reused by every layer.
        let x = gpu.alloc::<f32>(n * h)?;
        let xb = gpu.alloc::<u16>(n * h)?;
        let qkv = gpu.alloc::<f32>(n * (qw + 2 * kvw))?;
        let q = gpu.alloc::<f32>(n * qw)?;
        let ab = gpu.alloc::<u16>(n * qw)?;
        let a = gpu.alloc::<f32>(n * h)?;
        let rows = if e_n > 0 { n * k } else { n };
        let gu = gpu.alloc::<f32>(rows * 2 * self.inter)?;
        let hb = gpu.alloc::<u16>(rows * self.inter)?;
        let eo = gpu.alloc::<f32>(rows * h)?;
        let (p_x, p_xb, p_qkv, p_q, p_ab, p_a) = (
            gpu.ptr(&x),
            gpu.ptr(&xb),
            gpu.ptr(&qkv),
            gpu.ptr(&q),
            gpu.ptr(&ab),
            gpu.ptr(&a),
        );
        let (p_gu, p_hb, p_eo) = (gpu.ptr(&gu), gpu.ptr(&hb), gpu.ptr(&eo));
        let moe_bufs = if e_n > 0 {
            Some((
                gpu.alloc::<f32>(n * e_n)?,
                gpu.alloc::<i32>(n * k)?,
                gpu.alloc::<f32>(n * k)?,
                gpu.alloc::<i32>(e_n + 1)?,
                gpu.alloc::<i32>(n * k)?,
                gpu.alloc::<i32>(n * k)?,
                gpu.alloc::<u16>(n * k * h)?,
            ))
        } else {
            None
        };

        let (hi, ni, ei) = (h as i32, n as i32, self.eps);
        let block = 256u32;
        launch!(gpu, "embed", cfg1(n, block); self.embed, p_ids, p_x, hi)?;
        let mut router_logits = record_router_logits.then(Vec::new);
        let (layers_i, heads_i, kvh_i, hd_i) = (
            self.layers.len() as i32,
            self.heads as i32,
            self.kv_heads as i32,
            self.hd as i32,
        );
        let (clip, p_inv) = (self.clip, gpu.ptr(&self.inv_freq));
        let scale = 1.0f32 / (self.hd as f32).sqrt();
        let null = 0u64;
        let routed = self.routed.lock().unwrap_or_else(|p| p.into_inner());
        let p_routed = gpu.ptr(&*routed);
        for (li, layer) in self.layers.iter().enumerate() {
            let l_i = li as i32;
            // Attention input: OLMoE normalises first; OLMo2/FlexOlmo attend to the residual itself.
            match layer.input_norm {
                Some(w) => launch!(gpu, "rmsnorm", cfg1(n, block); p_x, w, p_xb, null, hi, ei)?,
                // The embedding or the previous layer's rmsnorm_add left x in bf16 in xb.
                None if li > 0 => {}
                None => launch!(gpu, "to_bf16", cfg1(n, block); p_x, p_xb, hi)?,
            }
            gpu.gemm(p_xb, layer.qkv.ptr, p_qkv, n, layer.qkv.n, h, 0.0)?;
            launch!(gpu, "qk_norm_rope", cfg1(n, block);
                p_qkv, p_q, layer.q_norm, layer.k_norm, p_inv, p_pos, p_seq, p_base,
                l_i, layers_i, heads_i, kvh_i, hd_i, ei, clip)?;
            let warps = (block / 32) as usize;
            launch!(gpu, "attention", cfg1((n * self.heads).div_ceil(warps), block);
                p_q, p_ab, p_pos, p_seq, p_base, ni, l_i, layers_i, heads_i, kvh_i, hd_i, scale)?;
            // The FFN's input (bf16 in xb) and where its output goes.
            match layer.post_ffn_norm {
                Some(_) => {
                    gpu.gemm(p_ab, layer.o.ptr, p_a, n, h, qw, 0.0)?;
                    launch!(gpu, "rmsnorm_add", cfg1(n, block);
                        p_x, p_a, layer.post_attention_norm, p_xb, hi, ei)?;
                }
                None => {
                    gpu.gemm(p_ab, layer.o.ptr, p_x, n, h, qw, 1.0)?;
                    launch!(gpu, "rmsnorm", cfg1(n, block);
                        p_x, layer.post_attention_norm, p_xb, null, hi, ei)?;
                }
            }
            // OLMoE adds the FFN output to the residual directly; the post-norm models normalise it first.
            let (ffn_out, accumulate) = match layer.post_ffn_norm {
                Some(_) => (p_a, 0i32),
                None => (p_x, 1i32),
            };
            match &layer.ffn {
                Ffn::Dense { gate_up, down } => {
                    let inter_i = self.inter as i32;
                    gpu.gemm(p_xb, gate_up.ptr, p_gu, n, gate_up.n, h, 0.0)?;
                    launch!(gpu, "swiglu", cfg1(n, block); p_gu, p_hb, inter_i)?;
                    gpu.gemm(p_hb, down.ptr, ffn_out, n, h, self.inter, accumulate as f32)?;
                }
                Ffn::Moe {
                    gate,
                    bias,
                    gate_up,
                    down,
                    gate_up_table,
                    down_table,
                } => {
                    let (rl, idx, w, offsets, sorted, entry, xs) =
                        moe_bufs.as_ref().expect("allocated for MoE models");
                    let (p_rl, p_idx, p_w, p_off, p_sorted, p_entry, p_xs) = (
                        gpu.ptr(rl),
                        gpu.ptr(idx),
                        gpu.ptr(w),
                        gpu.ptr(offsets),
                        gpu.ptr(sorted),
                        gpu.ptr(entry),
                        gpu.ptr(xs),
                    );
                    gpu.gemm(p_xb, gate.ptr, p_rl, n, e_n, h, 0.0)?;
                    if let Some(all) = router_logits.as_mut() {
                        all.push(gpu.download(rl)?[..n * e_n].to_vec());
                    }
                    let p_bias = bias.as_ref().map_or(0, |b| gpu.ptr(b));
                    let (e_i, k_i, norm_i, nk_i) =
                        (e_n as i32, k as i32, self.norm_topk as i32, (n * k) as i32);
                    launch!(gpu, "router_topk", cfg1(n.div_ceil(128), 128);
                        p_rl, p_bias, p_mask, p_idx, p_w, ni, e_i, k_i, norm_i)?;
                    let p_routed_l = at::<u64>(p_routed, li * e_n);
                    launch!(gpu, "moe_permute", cfg1(1, 1024);
                        p_idx, nk_i, k_i, e_i, p_off, p_sorted, p_entry, p_routed_l)?;
                    let inter = self.inter;
                    let loaded_experts = gate_up.iter().filter(|&&p| p != 0).count().max(1);
                    let grouped = (n * k).div_ceil(loaded_experts) <= GROUPED_MAX_ROWS
                        && h.is_multiple_of(8)
                        && inter.is_multiple_of(8);
                    if grouped {
                        let (gt, dt) = (gpu.ptr(gate_up_table), gpu.ptr(down_table));
                        let warps = (block / 32) as usize;
                        let (n2, hi2, ii) = ((2 * inter) as i32, h as i32, inter as i32);
                        let grid = |cols: usize| LaunchConfig {
                            grid_dim: (cols.div_ceil(warps) as u32, e_n as u32, 1),
                            block_dim: (block, 1, 1),
                            shared_mem_bytes: 0,
                        };
                        launch!(gpu, "grouped_matmul", grid(2 * inter);
                            p_xb, p_sorted, gt, p_off, p_gu, n2, hi2)?;
                        launch!(gpu, "swiglu", cfg1(n * k, block); p_gu, p_hb, ii)?;
                        launch!(gpu, "grouped_matmul", grid(h);
                            p_hb, null, dt, p_off, p_eo, hi2, ii)?;
                    } else {
                        // Many rows per expert: one cuBLAS GEMM per expert over its sorted rows.
                        launch!(gpu, "gather_rows", cfg1(n * k, block); p_xb, p_sorted, p_xs, hi)?;
                        let off = gpu.download(offsets)?;
                        let ii = inter as i32;
                        for ex in 0..e_n {
                            let (r0, r1) = (off[ex] as usize, off[ex + 1] as usize);
                            if r1 > r0 {
                                if gate_up[ex] == 0 {
                                    return Err(Error::Input(format!(
                                        "expert {ex} was opted out when the model was loaded"
                                    )));
                                }
                                gpu.gemm(
                                    at::<u16>(p_xs, r0 * h),
                                    gate_up[ex],
                                    at::<f32>(p_gu, r0 * 2 * inter),
                                    r1 - r0,
                                    2 * inter,
                                    h,
                                    0.0,
                                )?;
                            }
                        }
                        launch!(gpu, "swiglu", cfg1(n * k, block); p_gu, p_hb, ii)?;
                        for ex in 0..e_n {
                            let (r0, r1) = (off[ex] as usize, off[ex + 1] as usize);
                            if r1 > r0 {
                                gpu.gemm(
                                    at::<u16>(p_hb, r0 * inter),
                                    down[ex],
                                    at::<f32>(p_eo, r0 * h),
                                    r1 - r0,
                                    h,
                                    inter,
                                    0.0,
                                )?;
                            }
                        }
                    }
                    launch!(gpu, "moe_combine", cfg1(n, block);
                        ffn_out, p_eo, p_idx, p_w, p_entry, k_i, hi, accumulate)?;
                }
            }
            if let Some(w) = layer.post_ffn_norm {
                // The next layer's attention reads the residual itself, in bf16.
                launch!(gpu, "rmsnorm_add", cfg1(n, block); p_x, p_a, w, p_xb, hi, ei)?;
            }
        }
        drop(routed);
        launch!(gpu, "rmsnorm", cfg1(n, block); p_x, self.final_norm, null, p_a, hi, ei)?;
        let hidden = gpu.download(&a)?[..n * h].to_vec();
        for s in seqs.iter_mut() {
            if let Some(c) = s.cache.gpu_cache_mut() {
                c.len += s.tokens.len();
            }
        }
        Ok((hidden, router_logits))
    }

    /// Uploads rows of final hidden states and computes their logits on the GPU (`[rows, vocab]` f32).
    fn logits_on_device(&self, hidden: &[f32]) -> Result<(CudaSlice<f32>, usize)> {
        let gpu = &*self.gpu;
        let rows = hidden.len() / self.h;
        let d_h = gpu.upload(hidden)?;
        let hb = gpu.alloc::<u16>(rows * self.h)?;
        let logits = gpu.alloc::<f32>(rows * self.v)?;
        let (p_h, p_hb, hi) = (gpu.ptr(&d_h), gpu.ptr(&hb), self.h as i32);
        launch!(gpu, "to_bf16", cfg1(rows, 256); p_h, p_hb, hi)?;
        gpu.gemm(
            p_hb,
            self.lm_head.ptr,
            gpu.ptr(&logits),
            rows,
            self.v,
            self.h,
            0.0,
        )?;
        Ok((logits, rows))
    }

    /// Logits `[rows, vocab]` of rows of final hidden states.
    pub fn logits(&self, hidden: &[f32]) -> Result<Vec<f32>> {
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let (logits, rows) = self.logits_on_device(hidden)?;
        Ok(self.gpu.download(&logits)?[..rows * self.v].to_vec())
    }

    /// The argmax token of each row's logits, computed without leaving the GPU.
    pub fn argmax(&self, hidden: &[f32]) -> Result<Vec<u32>> {
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let gpu = &*self.gpu;
        let (logits, rows) = self.logits_on_device(hidden)?;
        let out = gpu.alloc::<i32>(rows)?;
        let (p_l, p_o, vi) = (gpu.ptr(&logits), gpu.ptr(&out), self.v as i32);
        launch!(gpu, "argmax_rows", cfg1(rows, 1024); p_l, p_o, vi)?;
        Ok(gpu.download(&out)?[..rows]
            .iter()
            .map(|&t| t as u32)
            .collect())
    }

    /// For each (row, token): the token's log-probability under the row's logits and whether it is the
    /// first argmax. `hidden` holds one row per pair.
    pub fn logprobs(&self, hidden: &[f32], tokens: &[u32]) -> Result<Vec<(f32, bool)>> {
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let gpu = &*self.gpu;
        let (logits, rows) = self.logits_on_device(hidden)?;
        let targets: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
        let d_t = gpu.upload(&targets)?;
        let lp = gpu.alloc::<f32>(rows)?;
        let greedy = gpu.alloc::<i32>(rows)?;
        let (p_l, p_t, p_lp, p_g, vi) = (
            gpu.ptr(&logits),
            gpu.ptr(&d_t),
            gpu.ptr(&lp),
            gpu.ptr(&greedy),
            self.v as i32,
        );
        launch!(gpu, "logprob_gather", cfg1(rows, 1024); p_l, p_t, p_lp, p_g, vi)?;
        let lp = gpu.download(&lp)?;
        let greedy = gpu.download(&greedy)?;
        Ok((0..rows).map(|r| (lp[r], greedy[r] != 0)).collect())
    }
}
