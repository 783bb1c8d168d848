//! A FlexOlmo, OLMoE or OLMo2 forward pass on one GPU: bf16 weights and GEMM inputs, an f32 residual
//! stream, f32 accumulation everywhere.
//!
//! Per layer: q/k/v in one matmul (a GEMV kernel for few rows, cuBLAS otherwise); q/k norm + RoPE + cache
//! append in one kernel; attention over each sequence's own cache (tiled for prefill, split-key for
//! decoding); for MoE layers router softmax + top-k under each token's expert mask, a stable sort of
//! (token, slot) entries by expert, the experts' SwiGLU as grouped matmuls over those sorted rows (one
//! weight slab per expert: CUDA cores for decoding's few rows, tensor cores for prefill), and a weighted
//! un-permute. Sequences are never padded. Decoding steps are replayed as CUDA graphs.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaGraph, CudaSlice, LaunchConfig, PinnedHostSlice, PushKernelArg};
use routers::ExpertMask;

use super::{bf16_bits, cfg1, device_err, Gpu};
use crate::attention::KvCache;
use crate::config::{Architecture, Config};
use crate::layers::TensorSource;
use crate::model::SeqInput;
use crate::{Error, Result};

/// Rows per expert (on average) above which expert matmuls run on the tensor-core kernel in tiles of
/// MMA_ROWS rows (which needs the rows per expert on the host: one synchronisation per layer) instead of
/// the CUDA-core kernel built for decoding's few rows per expert.
const GROUPED_MAX_ROWS: usize = 12;

/// Threads per attention block (the kernel's ATT_WARPS warps).
pub(crate) const ATT_THREADS: u32 = 256;

/// Dense matmuls of up to this many rows run on the grouped kernel as one-expert GEMVs: at decoding
/// batch sizes a cuBLAS call costs more host time than the GPU spends on it.
const DENSE_GEMV_MAX_ROWS: usize = 16;

/// Rows per tile of the tensor-core grouped kernel (its MMA_BM).
const MMA_ROWS: usize = 64;

/// New tokens of one sequence from which attention runs tiled (`attention_prefill`), PREFILL_TILE
/// queries a block; that kernel holds a tile's keys in shared memory, up to this head size.
const PREFILL_MIN_TOKENS: usize = 16;
const PREFILL_TILE: usize = 32;
const PREFILL_MAX_HEAD_DIM: usize = 128;

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
    /// A one-entry device table holding `ptr`, so the grouped kernel can run it as a dense GEMV.
    table: u64,
}

enum Ffn {
    Dense {
        gate_up: Lin,
        down: Lin,
    },
    Moe {
        gate: Lin,
        bias: Option<CudaSlice<f32>>,
        /// Per expert: the fused `[2I, H]` gate/up slab's address (0 when opted out).
        gate_up: Vec<u64>,
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
    routed: CudaSlice<u64>,
    /// Every weight buffer and pointer table (the structs above hold their addresses).
    _weights: (Vec<CudaSlice<u16>>, Vec<CudaSlice<u64>>),
    /// Scratch for forward passes and logits; its lock runs one pass at a time.
    arena: Mutex<Arena>,
    /// Experts loaded (for choosing the expert matmul kernel).
    loaded_count: usize,
}

/// Uploads weights as bf16, keeping every buffer.
struct Uploader<'a> {
    gpu: &'a Gpu,
    src: &'a dyn TensorSource,
    owned: Vec<CudaSlice<u16>>,
    tables: Vec<CudaSlice<u64>>,
}

/// A pass's hidden states, router logits (when asked) and routed-token counts `[layer][expert]`.
pub type GpuForward = (Vec<f32>, Option<RouterLogits>, Vec<Vec<u64>>);

impl Uploader<'_> {
    fn put(&mut self, values: &[f32]) -> Result<u64> {
        let buf = self.gpu.upload(&bf16_bits(values))?;
        let p = self.gpu.ptr(&buf);
        self.owned.push(buf);
        Ok(p)
    }

    /// Tensors `names` (`rows[i]` x `k` each) stacked into one matrix; returns its address.
    fn slab(&mut self, names: &[&str], rows: &[usize], k: usize) -> Result<u64> {
        let mut values = Vec::new();
        for (name, &r) in names.iter().zip(rows) {
            values.extend(self.src.values(name, &[r, k])?);
        }
        self.put(&values)
    }

    /// A dense matrix stacked from `names`, with its one-entry pointer table.
    fn lin(&mut self, names: &[&str], rows: &[usize], k: usize) -> Result<Lin> {
        let ptr = self.slab(names, rows, k)?;
        self.lin_at(ptr, rows.iter().sum())
    }

    /// A router: the rows of experts `loaded` allows are read, the others (never routed to) are zero.
    fn router(&mut self, name: &str, n: usize, k: usize, loaded: &ExpertMask) -> Result<Lin> {
        let values = self.src.rows(name, [n, k], &|e| loaded.is_allowed(e))?;
        let ptr = self.put(&values)?;
        self.lin_at(ptr, n)
    }

    fn lin_at(&mut self, ptr: u64, n: usize) -> Result<Lin> {
        let table = self.gpu.upload(&[ptr])?;
        let table_ptr = self.gpu.ptr(&table);
        self.tables.push(table);
        Ok(Lin {
            ptr,
            n,
            table: table_ptr,
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
        if !h.is_multiple_of(8) || !inter.is_multiple_of(8) || !qw.is_multiple_of(8) {
            return Err(Error::Input(format!(
                "--device cuda needs hidden, intermediate and attention sizes that are multiples of 8 \
                 (this model: {h}, {inter}, {qw})"
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
            tables: Vec::new(),
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
                let gate = w.router(&format!("{p}.mlp.gate.weight"), cfg.num_experts, h, mask)?;
                let (mut gu, mut dn) = (vec![0u64; cfg.num_experts], vec![0u64; cfg.num_experts]);
                for e in mask.allowed() {
                    let x = format!("{p}.mlp.experts.{e}");
                    gu[e] = w.slab(
                        &[
                            &format!("{x}.gate_proj.weight"),
                            &format!("{x}.up_proj.weight"),
                        ],
                        &[inter, inter],
                        h,
                    )?;
                    dn[e] = w.slab(&[&format!("{x}.down_proj.weight")], &[h], inter)?;
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
        let (owned, tables) = (w.owned, w.tables);
        let base = cfg.rope_theta as f32;
        let inv_freq: Vec<f32> = (0..cfg.head_dim / 2)
            .map(|i| 1.0f32 / base.powf((2 * i) as f32 / cfg.head_dim as f32))
            .collect();
        Ok(Self {
            inv_freq: gpu.upload(&inv_freq)?,
            routed: gpu.alloc::<u64>(cfg.num_hidden_layers * cfg.num_experts.max(1))?,
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
            _weights: (owned, tables),
            arena: Mutex::new(Arena::default()),
            loaded_count: loaded.map_or(0, |m| m.count()),
        })
    }

    pub fn device_name(&self) -> &str {
        &self.gpu.name
    }

    /// Elements per cached position.
    pub fn cache_row(&self) -> usize {
        self.layers.len() * 2 * self.kv_heads * self.hd
    }

    /// Reads the routed-token counts the kernels accumulated and resets them (the caller holds the
    /// arena, so no other pass adds to them meanwhile).
    fn read_routed(&self) -> Result<Vec<Vec<u64>>> {
        if self.loaded.is_none() {
            return Ok(Vec::new());
        }
        let counts = self.gpu.download(&self.routed)?;
        let zeros = vec![0u64; counts.len()];
        self.gpu.put(self.gpu.ptr(&self.routed), &zeros)?;
        let e = self.experts.max(1);
        Ok(counts.chunks(e).map(|c| c.to_vec()).collect())
    }

    /// Runs the new tokens of `seqs` (already validated by `Model::forward`) and returns the final
    /// hidden states `[tokens, hidden]` (f32, after the final norm; only each sequence's last row when
    /// `last_only`), when asked, the router logits of each MoE layer, and the tokens the pass routed
    /// to each expert (`[layer][expert]`; empty for dense models).
    pub fn forward(
        &self,
        seqs: &mut [SeqInput<'_>],
        record_router_logits: bool,
        last_only: bool,
    ) -> Result<GpuForward> {
        let mut arena = self.arena.lock().unwrap_or_else(|p| p.into_inner());
        let gpu = &*self.gpu;
        let n: usize = seqs.iter().map(|s| s.tokens.len()).sum();
        let (h, e_n, k, inter) = (self.h, self.experts, self.top_k, self.inter);
        let qw = self.heads * self.hd;
        let kvw = self.kv_heads * self.hd;

        // Token metadata, uploaded in one copy: ids, positions, sequences, cache addresses, masks.
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
        // Attention work: runs of at least PREFILL_MIN_TOKENS new tokens go to the tiled kernel in
        // tiles of PREFILL_TILE; other tokens (decoding) to the per-token kernel.
        let mut tiles: Vec<i32> = Vec::new();
        let mut singles: Vec<i32> = Vec::new();
        let mut first = 0usize;
        for s in seqs.iter() {
            let len = s.tokens.len();
            if len >= PREFILL_MIN_TOKENS && self.hd <= PREFILL_MAX_HEAD_DIM {
                for start in (0..len).step_by(PREFILL_TILE) {
                    tiles.push((first + start) as i32);
                    tiles.push(PREFILL_TILE.min(len - start) as i32);
                }
            } else {
                singles.extend((first..first + len).map(|t| t as i32));
            }
            first += len;
        }
        let mut meta = Packer::default();
        let o_ids = meta.push(&ids);
        let o_pos = meta.push(&pos);
        let o_seq = meta.push(&seq);
        let o_base = meta.push(&bases);
        let o_mask = meta.push(&mask);
        let o_tiles = meta.push(&tiles);
        let o_singles = meta.push(&singles);
        let last_rows: Vec<i32> = {
            let mut end = 0i32;
            seqs.iter()
                .map(|s| {
                    end += s.tokens.len() as i32;
                    end - 1
                })
                .collect()
        };
        let o_last = meta.push(&last_rows);
        // A dense matrix as the grouped kernel's one expert: offsets [0, n], active [1, expert 0].
        let o_dense = meta.push(&[0i32, n as i32, 1, 0]);

        // Scratch for the whole pass, reused by every layer (and by the next pass).
        let rows = if e_n > 0 { n * k } else { n };
        let nk = n * k;
        let sizes = [
            meta.bytes.len(),              // 0 metadata
            n * h * 4,                     // 1 x: residual stream (f32)
            n * h * 2,                     // 2 xb: matmul input (bf16)
            n * (qw + 2 * kvw) * 4,        // 3 qkv
            n * qw * 4,                    // 4 q after norm + RoPE
            n * qw * 2,                    // 5 attention output (bf16)
            n * h * 4,                     // 6 a: o_proj / FFN output
            rows * 2 * inter * 4,          // 7 gate|up
            rows * inter * 2,              // 8 SwiGLU output (bf16)
            rows * h * 4,                  // 9 expert outputs
            n * e_n * 4,                   // 10 router logits
            nk * 4,                        // 11 top-k experts
            nk * 4,                        // 12 top-k weights
            (e_n + 1) * 4,                 // 13 offsets
            (e_n + 1) * 4,                 // 14 active experts
            nk * 4,                        // 15 sorted tokens
            nk * 4,                        // 16 entry rows
            (nk / MMA_ROWS + e_n + 1) * 8, // 17 tensor-core tiles (expert, first row)
        ];
        let p = arena.carve(gpu, &sizes)?;
        gpu.timed("upload", || gpu.put(p[0], &meta.bytes))?;
        let (p_ids, p_pos, p_seq, p_base, p_mask) = (
            p[0] + o_ids,
            p[0] + o_pos,
            p[0] + o_seq,
            p[0] + o_base,
            p[0] + o_mask,
        );
        let (p_tiles, p_singles, p_last) = (p[0] + o_tiles, p[0] + o_singles, p[0] + o_last);
        let dense = (p[0] + o_dense, p[0] + o_dense + 8);
        let p_mma_tiles = p[17];
        let (p_x, p_xb, p_qkv, p_q, p_ab, p_a) = (p[1], p[2], p[3], p[4], p[5], p[6]);
        let (p_gu, p_hb, p_eo) = (p[7], p[8], p[9]);
        let (p_rl, p_idx, p_w, p_off, p_active, p_sorted, p_entry) =
            (p[10], p[11], p[12], p[13], p[14], p[15], p[16]);

        let (hi, ni, ei) = (h as i32, n as i32, self.eps);
        let block = 256u32;
        let null = 0u64;
        // The final norm, of every row or of each sequence's last row only.
        let (rows_out, row_list) = if last_only {
            (seqs.len(), p_last)
        } else {
            (n, null)
        };
        let mut router_logits = record_router_logits.then(Vec::new);
        // Every launch from the embedding to the final norm, with no host synchronisation on the
        // decoding path, so a decoding step can be captured once as a CUDA graph and replayed.
        let enqueue = |router_logits: &mut Option<RouterLogits>| -> Result<()> {
            launch!(gpu, "embed", cfg1(n, block); self.embed, p_ids, p_x, hi)?;
            let (layers_i, heads_i, kvh_i, hd_i) = (
                self.layers.len() as i32,
                self.heads as i32,
                self.kv_heads as i32,
                self.hd as i32,
            );
            let (clip, p_inv) = (self.clip, gpu.ptr(&self.inv_freq));
            let scale = 1.0f32 / (self.hd as f32).sqrt();
            let p_routed = gpu.ptr(&self.routed);
            for (li, layer) in self.layers.iter().enumerate() {
                let l_i = li as i32;
                // Attention input: OLMoE normalises first; OLMo2/FlexOlmo attend to the residual itself.
                match layer.input_norm {
                    Some(w) => {
                        launch!(gpu, "rmsnorm", cfg1(n, block); p_x, null, w, p_xb, null, hi, ei)?
                    } // The previous layer's rmsnorm_add left x in bf16 in xb.
                    None if li > 0 => {}
                    None => launch!(gpu, "to_bf16", cfg1(n, block); p_x, p_xb, hi)?,
                }
                self.matmul("gemm qkv", p_xb, &layer.qkv, p_qkv, n, h, false, dense)?;
                launch!(gpu, "qk_norm_rope", cfg1(n, block);
                    p_qkv, p_q, layer.q_norm, layer.k_norm, p_inv, p_pos, p_seq, p_base,
                    l_i, layers_i, heads_i, kvh_i, hd_i, ei, clip)?;
                if !tiles.is_empty() {
                    let cfg = LaunchConfig {
                        grid_dim: ((tiles.len() / 2) as u32, self.heads as u32, 1),
                        block_dim: (128, 1, 1),
                        shared_mem_bytes: 0,
                    };
                    launch!(gpu, "attention_prefill", cfg;
                        p_q, p_ab, p_pos, p_seq, p_base, p_tiles, l_i, layers_i, heads_i, kvh_i, hd_i, scale)?;
                }
                if !singles.is_empty() {
                    launch!(gpu, "attention", cfg1(singles.len() * self.heads, ATT_THREADS);
                        p_q, p_ab, p_pos, p_seq, p_base, p_singles, l_i, layers_i, heads_i, kvh_i, hd_i, scale)?;
                }
                // The FFN's input (bf16 in xb) and where its output goes.
                match layer.post_ffn_norm {
                    Some(_) => {
                        self.matmul("gemm o", p_ab, &layer.o, p_a, n, qw, false, dense)?;
                        launch!(gpu, "rmsnorm_add", cfg1(n, block);
                            p_x, p_a, layer.post_attention_norm, p_xb, hi, ei)?;
                    }
                    None => {
                        self.matmul("gemm o", p_ab, &layer.o, p_x, n, qw, true, dense)?;
                        launch!(gpu, "rmsnorm", cfg1(n, block);
                            p_x, null, layer.post_attention_norm, p_xb, null, hi, ei)?;
                    }
                }
                // OLMoE adds the FFN output to the residual directly; the post-norm models normalise it first.
                let (ffn_out, accumulate) = match layer.post_ffn_norm {
                    Some(_) => (p_a, 0i32),
                    None => (p_x, 1i32),
                };
                let inter_i = inter as i32;
                match &layer.ffn {
                    Ffn::Dense { gate_up, down } => {
                        self.matmul("gemm mlp", p_xb, gate_up, p_gu, n, h, false, dense)?;
                        launch!(gpu, "swiglu", cfg1(n, block); p_gu, p_hb, inter_i)?;
                        self.matmul(
                            "gemm mlp",
                            p_hb,
                            down,
                            ffn_out,
                            n,
                            inter,
                            accumulate != 0,
                            dense,
                        )?;
                    }
                    Ffn::Moe {
                        gate,
                        bias,
                        gate_up,
                        gate_up_table,
                        down_table,
                    } => {
                        self.matmul("gemm router", p_xb, gate, p_rl, n, h, false, dense)?;
                        if let Some(all) = router_logits.as_mut() {
                            let mut l = vec![0f32; n * e_n];
                            gpu.get(p_rl, &mut l)?;
                            all.push(l);
                        }
                        let p_bias = bias.as_ref().map_or(0, |b| gpu.ptr(b));
                        let (e_i, k_i, norm_i, nk_i) =
                            (e_n as i32, k as i32, self.norm_topk as i32, nk as i32);
                        launch!(gpu, "router_topk", cfg1(n.div_ceil(4), 128);
                            p_rl, p_bias, p_mask, p_idx, p_w, ni, e_i, k_i, norm_i)?;
                        let p_routed_l = at::<u64>(p_routed, li * e_n);
                        launch!(gpu, "moe_permute", cfg1(1, 1024);
                            p_idx, nk_i, k_i, e_i, p_off, p_active, p_sorted, p_entry, p_routed_l)?;
                        let loaded_experts = gate_up.iter().filter(|&&p| p != 0).count().max(1);
                        let grouped = nk.div_ceil(loaded_experts) <= GROUPED_MAX_ROWS;
                        if grouped {
                            let (gt, dt) = (gpu.ptr(gate_up_table), gpu.ptr(down_table));
                            let warps = (block / 32) as usize;
                            let (n2, hi2) = ((2 * inter) as i32, h as i32);
                            // Block rows beyond the experts that got tokens return at once.
                            let grid = |cols: usize| LaunchConfig {
                                grid_dim: (cols.div_ceil(warps) as u32, e_n.min(nk) as u32, 1),
                                block_dim: (block, 1, 1),
                                shared_mem_bytes: 0,
                            };
                            let write = 0i32;
                            launch!(gpu, "grouped_matmul", grid(2 * inter);
                                p_xb, p_sorted, gt, p_off, p_active, p_gu, n2, hi2, write)?;
                            launch!(gpu, "swiglu", cfg1(nk, block); p_gu, p_hb, inter_i)?;
                            launch!(gpu, "grouped_matmul", grid(h);
                                p_hb, null, dt, p_off, p_active, p_eo, hi2, inter_i, write)?;
                        } else {
                            // Many rows per expert: tensor-core tiles of MMA_ROWS rows of one expert.
                            let mut off = vec![0i32; e_n + 1];
                            gpu.timed("offsets", || gpu.get(p_off, &mut off))?;
                            if let Some(ex) =
                                (0..e_n).find(|&ex| off[ex + 1] > off[ex] && gate_up[ex] == 0)
                            {
                                return Err(Error::Input(format!(
                                    "expert {ex} was opted out when the model was loaded"
                                )));
                            }
                            let mut mma_tiles: Vec<i32> = Vec::new();
                            for ex in 0..e_n {
                                for r in (off[ex]..off[ex + 1]).step_by(MMA_ROWS) {
                                    mma_tiles.extend([ex as i32, r]);
                                }
                            }
                            gpu.put(p_mma_tiles, &mma_tiles)?;
                            let (gt, dt) = (gpu.ptr(gate_up_table), gpu.ptr(down_table));
                            let (n2, hi2) = ((2 * inter) as i32, h as i32);
                            let grid = |cols: usize| LaunchConfig {
                                grid_dim: (
                                    cols.div_ceil(128) as u32,
                                    (mma_tiles.len() / 2) as u32,
                                    1,
                                ),
                                block_dim: (256, 1, 1),
                                shared_mem_bytes: 0,
                            };
                            launch!(gpu, "grouped_mma", grid(2 * inter);
                                p_xb, p_sorted, gt, p_off, p_mma_tiles, p_gu, n2, hi2)?;
                            launch!(gpu, "swiglu", cfg1(nk, block); p_gu, p_hb, inter_i)?;
                            launch!(gpu, "grouped_mma", grid(h);
                                p_hb, null, dt, p_off, p_mma_tiles, p_eo, hi2, inter_i)?;
                        }
                        let cfg = LaunchConfig {
                            grid_dim: (n as u32, h.div_ceil(block as usize) as u32, 1),
                            block_dim: (block, 1, 1),
                            shared_mem_bytes: 0,
                        };
                        launch!(gpu, "moe_combine", cfg;
                            ffn_out, p_eo, p_idx, p_w, p_entry, k_i, hi, accumulate)?;
                    }
                }
                if let Some(w) = layer.post_ffn_norm {
                    // The next layer's attention reads the residual itself, in bf16.
                    launch!(gpu, "rmsnorm_add", cfg1(n, block); p_x, p_a, w, p_xb, hi, ei)?;
                }
            }
            launch!(gpu, "rmsnorm", cfg1(rows_out, block); p_x, row_list, self.final_norm, null, p_a, hi, ei)?;
            Ok(())
        };
        let graph_key = (n, last_only);
        // Decoding steps (one token per sequence, no host synchronisation inside) replay as graphs.
        let use_graph = gpu.graphs
            && !record_router_logits
            && !gpu.profiling
            && seqs.iter().all(|s| s.tokens.len() == 1)
            && (e_n == 0 || nk.div_ceil(self.loaded_count.max(1)) <= GROUPED_MAX_ROWS)
            && !arena.uncapturable.contains(&graph_key);
        if use_graph && !arena.graphs.contains_key(&graph_key) {
            match capture(gpu, || enqueue(&mut router_logits)) {
                Ok(graph) => {
                    arena.graphs.insert(graph_key, graph);
                    super::GRAPHS_CAPTURED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                Err(e) => {
                    // Such steps run kernel by kernel instead, with the same results.
                    eprintln!(
                        "moeval: CUDA graph capture failed for {n}-sequence decoding steps ({e}); they \
                         run kernel by kernel"
                    );
                    arena.uncapturable.insert(graph_key);
                }
            }
        }
        match arena.graphs.get(&graph_key).filter(|_| use_graph) {
            Some(graph) => graph
                .0
                .launch()
                .map_err(|e| device_err("CUDA graph launch", e))?,
            None => enqueue(&mut router_logits)?,
        }
        let mut hidden = vec![0f32; rows_out * h];
        gpu.timed("download", || arena.download(gpu, p_a, &mut hidden))?;
        for s in seqs.iter_mut() {
            if let Some(c) = s.cache.gpu_cache_mut() {
                c.len += s.tokens.len();
            }
        }
        let routed = self.read_routed()?;
        Ok((hidden, router_logits, routed))
    }

    /// `out[m, lin.n] (f32) (+)= x[m, k] (bf16) · linᵀ`: a GEMV on the grouped kernel for few rows,
    /// cuBLAS otherwise. `dense` is the one-expert (offsets, active) pair for `m` rows.
    #[allow(clippy::too_many_arguments)]
    fn matmul(
        &self,
        what: &'static str,
        x: u64,
        lin: &Lin,
        out: u64,
        m: usize,
        k: usize,
        accumulate: bool,
        dense: (u64, u64),
    ) -> Result<()> {
        let gpu = &*self.gpu;
        if m <= DENSE_GEMV_MAX_ROWS && k.is_multiple_of(8) {
            let cfg = LaunchConfig {
                grid_dim: (lin.n.div_ceil(8) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            let (null, ni, ki, acc) = (0u64, lin.n as i32, k as i32, accumulate as i32);
            let (offsets, active) = dense;
            launch!(gpu, "grouped_matmul", cfg; x, null, lin.table, offsets, active, out, ni, ki, acc)
        } else {
            let beta = if accumulate { 1.0 } else { 0.0 };
            gpu.timed(what, || gpu.gemm(x, lin.ptr, out, m, lin.n, k, beta))
        }
    }

    /// Computes the logits of rows of final hidden states on the GPU, in the arena; returns the
    /// arena's pointers (logits `[rows, vocab]` f32, then room for `extra` more bytes).
    fn logits_on_device(
        &self,
        arena: &mut Arena,
        hidden: &[f32],
        extra: usize,
    ) -> Result<(u64, u64)> {
        let gpu = &*self.gpu;
        let rows = hidden.len() / self.h;
        let p = arena.carve(
            gpu,
            &[
                rows * self.h * 4,
                rows * self.h * 2,
                rows * self.v * 4,
                extra,
            ],
        )?;
        gpu.put(p[0], hidden)?;
        let hi = self.h as i32;
        launch!(gpu, "to_bf16", cfg1(rows, 256); p[0], p[1], hi)?;
        gpu.timed("gemm lm_head", || {
            gpu.gemm(p[1], self.lm_head.ptr, p[2], rows, self.v, self.h, 0.0)
        })?;
        Ok((p[2], p[3]))
    }

    /// Logits `[rows, vocab]` of rows of final hidden states.
    pub fn logits(&self, hidden: &[f32]) -> Result<Vec<f32>> {
        let mut arena = self.arena.lock().unwrap_or_else(|p| p.into_inner());
        let (logits, _) = self.logits_on_device(&mut arena, hidden, 0)?;
        let mut out = vec![0f32; hidden.len() / self.h * self.v];
        self.gpu.get(logits, &mut out)?;
        Ok(out)
    }

    /// The argmax token of each row's logits, computed without leaving the GPU.
    pub fn argmax(&self, hidden: &[f32]) -> Result<Vec<u32>> {
        let mut arena = self.arena.lock().unwrap_or_else(|p| p.into_inner());
        let gpu = &*self.gpu;
        let rows = hidden.len() / self.h;
        let (p_l, p_o) = self.logits_on_device(&mut arena, hidden, rows * 4)?;
        let vi = self.v as i32;
        launch!(gpu, "argmax_rows", cfg1(rows, 1024); p_l, p_o, vi)?;
        let mut out = vec![0i32; rows];
        gpu.get(p_o, &mut out)?;
        Ok(out.into_iter().map(|t| t as u32).collect())
    }

    /// For each (row, token): the token's log-probability under the row's logits and whether it is the
    /// first argmax. `hidden` holds one row per pair.
    pub fn logprobs(&self, hidden: &[f32], tokens: &[u32]) -> Result<Vec<(f32, bool)>> {
        let mut arena = self.arena.lock().unwrap_or_else(|p| p.into_inner());
        let gpu = &*self.gpu;
        let rows = hidden.len() / self.h;
        // Extra room: targets, log-probabilities, greedy flags (4 bytes each), 256-byte aligned.
        let slot = (rows * 4).div_ceil(256) * 256;
        let (p_l, p_x) = self.logits_on_device(&mut arena, hidden, 3 * slot)?;
        let (p_t, p_lp, p_g) = (p_x, p_x + slot as u64, p_x + 2 * slot as u64);
        let targets: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
        gpu.put(p_t, &targets)?;
        let vi = self.v as i32;
        launch!(gpu, "logprob_gather", cfg1(rows, 1024); p_l, p_t, p_lp, p_g, vi)?;
        let (mut lp, mut greedy) = (vec![0f32; rows], vec![0i32; rows]);
        gpu.get(p_lp, &mut lp)?;
        gpu.get(p_g, &mut greedy)?;
        Ok(lp
            .into_iter()
            .zip(greedy)
            .map(|(l, g)| (l, g != 0))
            .collect())
    }
}

/// A captured CUDA graph. Graphs must not be used from two threads at once; every use is under the
/// arena's lock.
pub(crate) struct Graph(CudaGraph);

// SAFETY: only touched while the arena mutex is held (see above).
unsafe impl Send for Graph {}

/// Records the launches `enqueue` makes on the GPU's stream as a CUDA graph (nothing runs yet).
fn capture(gpu: &Gpu, enqueue: impl FnOnce() -> Result<()>) -> Result<Graph> {
    use cudarc::driver::sys;
    gpu.stream
        .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .map_err(|e| device_err("CUDA graph capture", e))?;
    let recorded = enqueue();
    // Capture must end whatever happened, or the stream stays unusable.
    let graph = gpu
        .stream
        .end_capture(sys::CUgraphInstantiate_flags(0))
        .map_err(|e| device_err("CUDA graph capture", e));
    recorded?;
    graph?
        .map(Graph)
        .ok_or_else(|| Error::Device("CUDA graph capture recorded nothing".into()))
}

/// Host bytes packed for one upload, each part 8-byte aligned.
#[derive(Default)]
struct Packer {
    bytes: Vec<u8>,
}

impl Packer {
    /// Appends `values` and returns their byte offset.
    fn push<T: Copy>(&mut self, values: &[T]) -> u64 {
        let at = self.bytes.len().next_multiple_of(8);
        self.bytes.resize(at, 0);
        // SAFETY: T is a plain number type (u8, i32, u32, u64); its bytes are its value.
        let raw = unsafe {
            std::slice::from_raw_parts(values.as_ptr() as *const u8, std::mem::size_of_val(values))
        };
        self.bytes.extend_from_slice(raw);
        at as u64
    }
}

/// One device buffer carved into each pass's scratch, so passes allocate nothing once it is large
/// enough. Holding its lock also serialises passes, which share the stream.
#[derive(Default)]
pub(crate) struct Arena {
    buf: Option<CudaSlice<u8>>,
    /// Captured decoding steps by (tokens, last rows only); they address this buffer, so they are
    /// dropped whenever it is reallocated.
    graphs: HashMap<(usize, bool), Graph>,
    /// Shapes whose capture failed; they run kernel by kernel.
    uncapturable: std::collections::HashSet<(usize, bool)>,
    /// Page-locked staging for downloads: copies from pageable memory run several times slower.
    staging: Option<PinnedHostSlice<f32>>,
}

impl Arena {
    /// Addresses of regions of `sizes` bytes (each 256-byte aligned), growing the buffer when needed.
    fn carve(&mut self, gpu: &Gpu, sizes: &[usize]) -> Result<Vec<u64>> {
        let mut offsets = Vec::with_capacity(sizes.len());
        let mut total = 0usize;
        for &s in sizes {
            offsets.push(total);
            total += s.div_ceil(256).max(1) * 256;
        }
        if self.buf.as_ref().is_none_or(|b| b.len() < total) {
            self.graphs.clear();
            self.buf = None;
            self.buf = Some(gpu.alloc::<u8>(total + total / 4)?);
        }
        let base = gpu.ptr(self.buf.as_ref().expect("allocated above"));
        Ok(offsets.into_iter().map(|o| base + o as u64).collect())
    }

    /// Copies `dst.len()` floats from device address `src` through the pinned staging buffer.
    fn download(&mut self, gpu: &Gpu, src: u64, dst: &mut [f32]) -> Result<()> {
        if self.staging.as_ref().is_none_or(|s| s.len() < dst.len()) {
            self.staging = None;
            // SAFETY: the buffer is written by the copy below before it is read. Flags 0: cached
            // memory (write-combined memory is slow for the CPU to read).
            let pinned = unsafe {
                gpu.stream
                    .context()
                    .alloc_pinned_with_flags::<f32>(dst.len(), 0)
            }
            .map_err(|e| device_err("page-locked host memory", e))?;
            self.staging = Some(pinned);
        }
        let staging = self.staging.as_mut().expect("allocated above");
        let host = staging
            .as_mut_slice()
            .map_err(|e| device_err("page-locked host memory", e))?;
        gpu.get(src, &mut host[..dst.len()])?;
        dst.copy_from_slice(&host[..dst.len()]);
        Ok(())
    }
}
