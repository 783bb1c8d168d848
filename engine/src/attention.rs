//! Causal self-attention over a per-sequence KV cache, on raw f32 rows.
//!
//! Sequences in a batch are never padded: their tokens are concatenated row-wise for the projections, and
//! attention runs per sequence against that sequence's own cache. A sequence's result therefore cannot
//! depend on what else is in the batch.

use std::sync::Arc;

use gemm::{gemm, Parallelism};
use rayon::prelude::*;

/// Keys and values of one sequence, for every layer, as rows of `kv_heads * head_dim` floats.
///
/// A cache can extend a frozen parent ([`KvCache::fork`]): many continuations of one context share the
/// context's keys and values without copying them.
#[derive(Debug)]
pub struct KvCache {
    parent: Option<Arc<KvCache>>,
    parent_len: usize,
    width: usize,
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    /// The cache of a sequence run on the GPU (the fields above then stay empty).
    gpu: Option<crate::cuda::SeqCache>,
}

impl KvCache {
    /// An empty cache for a model with `layers` layers and `kv_width = kv_heads * head_dim`.
    pub fn new(layers: usize, kv_width: usize) -> Self {
        Self {
            parent: None,
            parent_len: 0,
            width: kv_width,
            keys: vec![Vec::new(); layers],
            values: vec![Vec::new(); layers],
            gpu: None,
        }
    }

    /// An empty cache on the GPU, `row` bf16 values per position.
    pub(crate) fn on_gpu(row: usize) -> Self {
        Self {
            parent: None,
            parent_len: 0,
            width: 0,
            keys: Vec::new(),
            values: Vec::new(),
            gpu: Some(crate::cuda::SeqCache::new(row)),
        }
    }

    pub(crate) fn gpu_cache(&self) -> Option<&crate::cuda::SeqCache> {
        self.gpu.as_ref()
    }

    pub(crate) fn gpu_cache_mut(&mut self) -> Option<&mut crate::cuda::SeqCache> {
        self.gpu.as_mut()
    }

    /// A new cache that continues after everything in `parent`.
    pub fn fork(parent: &Arc<KvCache>) -> Self {
        if let Some(g) = &parent.gpu {
            return Self {
                gpu: Some(crate::cuda::SeqCache::fork(parent, g.row())),
                ..Self::on_gpu(0)
            };
        }
        Self {
            parent: Some(parent.clone()),
            parent_len: parent.len(),
            width: parent.width,
            keys: vec![Vec::new(); parent.keys.len()],
            values: vec![Vec::new(); parent.keys.len()],
            gpu: None,
        }
    }

    /// Number of positions cached (including the parent's).
    pub fn len(&self) -> usize {
        if let Some(g) = &self.gpu {
            return g.len();
        }
        self.parent_len + self.keys.first().map_or(0, |k| k.len() / self.width.max(1))
    }

    /// Positions cached for `layer` (differs from [`len`](Self::len) only in the middle of a forward pass).
    fn layer_len(&self, layer: usize) -> usize {
        self.parent_len + self.keys[layer].len() / self.width.max(1)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The (keys, values) segments of `layer`, oldest first.
    fn segments(&self, layer: usize) -> Vec<(&[f32], &[f32])> {
        let mut out = match &self.parent {
            Some(p) => p.segments(layer),
            None => Vec::new(),
        };
        if !self.keys[layer].is_empty() {
            out.push((&self.keys[layer], &self.values[layer]));
        }
        out
    }
}

/// Head layout of an attention layer.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Heads {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// Rotary position embedding (the `rotate_half` convention), with frequencies computed in f32 as the
/// reference does.
#[derive(Clone, Debug)]
pub(crate) struct Rope {
    inv_freq: Vec<f32>,
}

impl Rope {
    pub fn new(head_dim: usize, theta: f64) -> Self {
        let base = theta as f32;
        let inv_freq = (0..head_dim / 2)
            .map(|i| 1.0f32 / base.powf((2 * i) as f32 / head_dim as f32))
            .collect();
        Self { inv_freq }
    }

    /// Rotates every head of `rows` (each `n_heads * head_dim` wide) at positions `pos0, pos0 + 1, ...`.
    fn apply(&self, rows: &mut [f32], n_heads: usize, pos0: usize) {
        let half = self.inv_freq.len();
        let hd = 2 * half;
        let mut cos = vec![0f32; half];
        let mut sin = vec![0f32; half];
        for (t, row) in rows.chunks_exact_mut(n_heads * hd).enumerate() {
            let pos = (pos0 + t) as f32;
            for i in 0..half {
                let f = pos * self.inv_freq[i];
                cos[i] = f.cos();
                sin[i] = f.sin();
            }
            for head in row.chunks_exact_mut(hd) {
                let (a, b) = head.split_at_mut(half);
                for i in 0..half {
                    let (x1, x2) = (a[i], b[i]);
                    a[i] = x1 * cos[i] - x2 * sin[i];
                    b[i] = x2 * cos[i] + x1 * sin[i];
                }
            }
        }
    }
}

/// Up to this many new tokens per sequence, attention uses direct dot products instead of GEMM calls.
const DIRECT_MAX_ROWS: usize = 4;

/// Dot product with 8 independent accumulators, so the compiler can vectorise it.
fn dot(a: &[f32], b: &[f32]) -> f32 {
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

/// One sequence's part of a batched attention call.
pub(crate) struct SeqSpan<'a> {
    /// First row of the sequence in the batch.
    pub start: usize,
    /// Number of new tokens.
    pub len: usize,
    pub cache: &'a mut KvCache,
}

/// Output rows as a raw pointer, so heads of different sequences can be written in parallel.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: every (sequence, head) work item writes a disjoint set of elements (its own rows and columns).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// Applies RoPE to `q` and `k`, appends `k`, `v` to each sequence's cache at `layer`, and returns the
/// attention output rows (`heads * head_dim` wide) for all new tokens.
pub(crate) fn attend(
    h: Heads,
    rope: &Rope,
    layer: usize,
    q: &mut [f32],
    k: &mut [f32],
    v: &[f32],
    spans: &mut [SeqSpan<'_>],
) -> Vec<f32> {
    let qw = h.heads * h.head_dim;
    let kvw = h.kv_heads * h.head_dim;
    let mut positions = Vec::with_capacity(spans.len());
    for s in spans.iter_mut() {
        let pos0 = s.cache.layer_len(layer);
        positions.push(pos0);
        let rows = s.start..s.start + s.len;
        rope.apply(&mut q[rows.start * qw..rows.end * qw], h.heads, pos0);
        rope.apply(&mut k[rows.start * kvw..rows.end * kvw], h.kv_heads, pos0);
        s.cache.keys[layer].extend_from_slice(&k[rows.start * kvw..rows.end * kvw]);
        s.cache.values[layer].extend_from_slice(&v[rows.start * kvw..rows.end * kvw]);
    }
    let total_rows = spans.iter().map(|s| s.start + s.len).max().unwrap_or(0);
    let mut out = vec![0f32; total_rows * qw];
    let out_ptr = OutPtr(out.as_mut_ptr());
    let work: Vec<(usize, usize)> = (0..spans.len())
        .flat_map(|s| (0..h.heads).map(move |head| (s, head)))
        .collect();
    let spans = &*spans;
    let q = &*q;
    let run = |&(s, head): &(usize, usize)| {
        let span = &spans[s];
        let segments = span.cache.segments(layer);
        let ptr = out_ptr;
        // SAFETY: `out` outlives the loop; this item writes only rows of sequence `s`, columns of `head`.
        unsafe {
            attend_head(
                h,
                head,
                q,
                span.start,
                span.len,
                positions[s],
                &segments,
                ptr.0,
            )
        }
    };
    work.par_iter().for_each(run);
    out
}

/// Attention of one head of one sequence: softmax(q k^T / sqrt(d) + causal mask) v.
///
/// # Safety
/// `out` must point to a buffer of at least `(start + t) * heads * head_dim` floats.
#[allow(clippy::too_many_arguments)]
unsafe fn attend_head(
    h: Heads,
    head: usize,
    q: &[f32],
    start: usize,
    t: usize,
    pos0: usize,
    segments: &[(&[f32], &[f32])],
    out: *mut f32,
) {
    let hd = h.head_dim;
    let kvw = h.kv_heads * hd;
    let kv_head = head / (h.heads / h.kv_heads);
    let total: usize = segments.iter().map(|s| s.0.len() / kvw).sum();
    let scale = 1.0 / (hd as f32).sqrt();
    SCORES.with(|buf| {
        let mut buf = buf.borrow_mut();
        if buf.len() < t * total {
            buf.resize(t * total, 0.0);
        }
        attend_head_with(
            h,
            head,
            q,
            start,
            t,
            pos0,
            segments,
            out,
            &mut buf[..t * total],
            total,
            scale,
            kv_head,
        )
    })
}

thread_local! {
    /// Per-thread score buffer: every element a call uses is written before it is read, so reusing it
    /// saves clearing and faulting in fresh memory for every (sequence, head).
    static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// [`attend_head`] with its score buffer.
///
/// # Safety
/// As for [`attend_head`].
#[allow(clippy::too_many_arguments)]
unsafe fn attend_head_with(
    h: Heads,
    head: usize,
    q: &[f32],
    start: usize,
    t: usize,
    pos0: usize,
    segments: &[(&[f32], &[f32])],
    out: *mut f32,
    scores: &mut [f32],
    total: usize,
    scale: f32,
    kv_head: usize,
) {
    let hd = h.head_dim;
    let qw = h.heads * hd;
    let kvw = h.kv_heads * hd;
    if t <= DIRECT_MAX_ROWS {
        // Decoding: a handful of queries; plain dot products beat a GEMM call's set-up cost.
        for i in 0..t {
            let qi = &q[(start + i) * qw + head * hd..][..hd];
            let row = &mut scores[i * total..(i + 1) * total];
            let mut j = 0;
            for (keys, _) in segments {
                for key in keys.chunks_exact(kvw) {
                    row[j] = dot(qi, &key[kv_head * hd..][..hd]) * scale;
                    j += 1;
                }
            }
        }
    } else {
        let q_ptr = q.as_ptr().add(start * qw + head * hd);
        let mut col = 0;
        for (keys, _) in segments {
            let n = keys.len() / kvw;
            // scores[:, col..col+n] = q_head (t x hd) . keys_head^T (hd x n) * scale
            gemm(
                t,
                n,
                hd,
                scores.as_mut_ptr().add(col),
                1,
                total as isize,
                false,
                q_ptr,
                1,
                qw as isize,
                keys.as_ptr().add(kv_head * hd),
                kvw as isize,
                1,
                0.0,
                scale,
                false,
                false,
                false,
                Parallelism::None,
            );
            col += n;
        }
    }
    for (i, row) in scores.chunks_exact_mut(total).enumerate() {
        // Query i sits at position pos0 + i and sees keys 0..=pos0 + i.
        let visible = pos0 + i + 1;
        let (seen, hidden) = row.split_at_mut(visible);
        crate::vecmath::softmax(seen);
        hidden.fill(0.0);
    }
    let out_head = out.add(start * qw + head * hd);
    if t <= DIRECT_MAX_ROWS {
        for i in 0..t {
            let probs = &scores[i * total..(i + 1) * total];
            let mut acc = vec![0f32; hd];
            let mut j = 0;
            for (_, values) in segments {
                for value in values.chunks_exact(kvw) {
                    let p = probs[j];
                    if p != 0.0 {
                        for (a, &v) in acc.iter_mut().zip(&value[kv_head * hd..][..hd]) {
                            *a += p * v;
                        }
                    }
                    j += 1;
                }
            }
            std::ptr::copy_nonoverlapping(acc.as_ptr(), out_head.add(i * qw), hd);
        }
        return;
    }
    let mut col = 0;
    for (seg, (_, values)) in segments.iter().enumerate() {
        let n = values.len() / kvw;
        // out_head (t x hd) (+)= probs[:, col..col+n] (t x n) . values_head (n x hd)
        gemm(
            t,
            hd,
            n,
            out_head,
            1,
            qw as isize,
            seg > 0,
            scores.as_ptr().add(col),
            1,
            total as isize,
            values.as_ptr().add(kv_head * hd),
            1,
            kvw as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            Parallelism::None,
        );
        col += n;
    }
}
