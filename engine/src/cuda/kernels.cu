// moeval's CUDA kernels, compiled at run time with NVRTC (no CUDA headers: bf16 is carried as its raw
// 16 bits). Weights and GEMM inputs are bf16, the residual stream and every accumulation f32.
//
// Conventions: row-major matrices; `n` tokens per forward call; a sequence's KV cache is one bf16
// buffer laid out [position][layer][k|v][kv_heads * head_dim], so growing it is a prefix copy.

typedef unsigned short bf16;
typedef unsigned long long u64;

#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float bf2f(bf16 x) { return __uint_as_float(((unsigned)x) << 16); }

// Round to nearest even, NaN kept quiet, as every framework's f32 -> bf16 conversion does.
__device__ __forceinline__ bf16 f2bf(float f) {
    unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16)(u >> 16);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
__device__ float block_sum(float v) {
    __shared__ float part[32];
    __shared__ float total;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    if (lane == 0) part[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float s = lane < (int)(blockDim.x >> 5) ? part[lane] : 0.0f;
        s = warp_sum(s);
        if (lane == 0) total = s;
    }
    __syncthreads();
    float r = total;
    __syncthreads();
    return r;
}

// Maximum over the block and the first index holding it (ties go to the lower index, as argmax does).
__device__ void block_argmax(float v, int i, float* best_v, int* best_i) {
    __shared__ float pv[32];
    __shared__ int pi[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, v, o);
        int oi = __shfl_xor_sync(0xffffffffu, i, o);
        if (ov > v || (ov == v && oi < i)) { v = ov; i = oi; }
    }
    if (lane == 0) { pv[warp] = v; pi[warp] = i; }
    __syncthreads();
    if (warp == 0) {
        int nw = blockDim.x >> 5;
        v = lane < nw ? pv[lane] : NEG_INF;
        i = lane < nw ? pi[lane] : 0x7fffffff;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            float ov = __shfl_xor_sync(0xffffffffu, v, o);
            int oi = __shfl_xor_sync(0xffffffffu, i, o);
            if (ov > v || (ov == v && oi < i)) { v = ov; i = oi; }
        }
        if (lane == 0) { pv[0] = v; pi[0] = i; }
    }
    __syncthreads();
    *best_v = pv[0];
    *best_i = pi[0];
    __syncthreads();
}

// x[t] = embedding row ids[t] (f32). Grid: n blocks.
extern "C" __global__ void embed(const bf16* table, const unsigned* ids, float* x, int h) {
    int t = blockIdx.x;
    const bf16* row = table + (size_t)ids[t] * h;
    for (int j = threadIdx.x; j < h; j += blockDim.x) x[(size_t)t * h + j] = bf2f(row[j]);
}

// y = bf16(x). Grid: n blocks.
extern "C" __global__ void to_bf16(const float* x, bf16* y, int h) {
    size_t r = (size_t)blockIdx.x * h;
    for (int j = threadIdx.x; j < h; j += blockDim.x) y[r + j] = f2bf(x[r + j]);
}

// RMSNorm of each row of x: w * x / sqrt(mean(x^2) + eps), to bf16 (`yb`) and/or f32 (`yf`).
// Grid: n blocks.
extern "C" __global__ void rmsnorm(const float* x, const bf16* w, bf16* yb, float* yf, int h, float eps) {
    size_t r = (size_t)blockIdx.x * h;
    float ss = 0.0f;
    for (int j = threadIdx.x; j < h; j += blockDim.x) ss += x[r + j] * x[r + j];
    float inv = rsqrtf(block_sum(ss) / h + eps);
    for (int j = threadIdx.x; j < h; j += blockDim.x) {
        float y = x[r + j] * inv * bf2f(w[j]);
        if (yb) yb[r + j] = f2bf(y);
        if (yf) yf[r + j] = y;
    }
}

// Post-norm residual (OLMo2, FlexOlmo): x += RMSNorm(a) * w, and the new x in bf16 to `xb` (the next
// matmul's input) unless null. Grid: n blocks.
extern "C" __global__ void rmsnorm_add(float* x, const float* a, const bf16* w, bf16* xb, int h, float eps) {
    size_t r = (size_t)blockIdx.x * h;
    float ss = 0.0f;
    for (int j = threadIdx.x; j < h; j += blockDim.x) ss += a[r + j] * a[r + j];
    float inv = rsqrtf(block_sum(ss) / h + eps);
    for (int j = threadIdx.x; j < h; j += blockDim.x) {
        float y = x[r + j] + a[r + j] * inv * bf2f(w[j]);
        x[r + j] = y;
        if (xb) xb[r + j] = f2bf(y);
    }
}

// Full-width q/k RMSNorm, optional clipping, rotary embedding (rotate_half), then q to `q_out` (f32)
// and k, v into the token's sequence cache at its position. Grid: n blocks.
extern "C" __global__ void qk_norm_rope(const float* qkv, float* q_out, const bf16* qn, const bf16* kn,
                                        const float* inv_freq, const int* pos, const int* seq,
                                        const u64* base, int layer, int layers, int heads, int kv_heads,
                                        int hd, float eps, float clip) {
    int t = blockIdx.x;
    int qw = heads * hd, kvw = kv_heads * hd, half = hd / 2;
    const float* row = qkv + (size_t)t * (qw + 2 * kvw);
    const float* k = row + qw;
    const float* v = row + qw + kvw;
    float sq = 0.0f, sk = 0.0f;
    for (int j = threadIdx.x; j < qw; j += blockDim.x) sq += row[j] * row[j];
    for (int j = threadIdx.x; j < kvw; j += blockDim.x) sk += k[j] * k[j];
    float iq = rsqrtf(block_sum(sq) / qw + eps);
    float ik = rsqrtf(block_sum(sk) / kvw + eps);
    int p = pos[t];
    bf16* cache = (bf16*)base[seq[t]] + ((size_t)p * layers + layer) * 2 * kvw;
    for (int j = threadIdx.x; j < (qw + kvw) / 2; j += blockDim.x) {
        bool is_q = j < qw / 2;
        int jj = is_q ? j : j - qw / 2;
        int head = jj / half, i = jj % half;
        int a = head * hd + i, b = a + half;
        const float* src = is_q ? row : k;
        const bf16* w = is_q ? qn : kn;
        float inv = is_q ? iq : ik;
        float x1 = src[a] * inv * bf2f(w[a]);
        float x2 = src[b] * inv * bf2f(w[b]);
        if (clip > 0.0f) {
            x1 = fminf(fmaxf(x1, -clip), clip);
            x2 = fminf(fmaxf(x2, -clip), clip);
        }
        float c, s;
        sincosf((float)p * inv_freq[i], &s, &c);
        float y1 = x1 * c - x2 * s, y2 = x2 * c + x1 * s;
        if (is_q) {
            q_out[(size_t)t * qw + a] = y1;
            q_out[(size_t)t * qw + b] = y2;
        } else {
            cache[a] = f2bf(y1);
            cache[b] = f2bf(y2);
        }
    }
    for (int j = threadIdx.x; j < kvw; j += blockDim.x) {
        float x = v[j];
        if (clip > 0.0f) x = fminf(fmaxf(x, -clip), clip);
        cache[kvw + j] = f2bf(x);
    }
}

#define MAX_DPL 8  // head dims per lane: head_dim <= 256

// Causal attention, one warp per (token, head): the lanes split the head's dimensions and walk the
// token's cached keys 0..=pos with an online softmax. Output bf16 [n, heads * hd] (the o_proj input).
// Grid: ceil(n * heads / warps per block) blocks.
extern "C" __global__ void attention(const float* q, bf16* out, const int* pos, const int* seq,
                                     const u64* base, int n, int layer, int layers, int heads,
                                     int kv_heads, int hd, float scale) {
    int gw = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if (gw >= n * heads) return;
    int t = gw / heads, head = gw % heads;
    int kvh = head / (heads / kv_heads);
    int kvw = kv_heads * hd;
    int dpl = (hd + 31) / 32;
    float qd[MAX_DPL], acc[MAX_DPL];
#pragma unroll
    for (int i = 0; i < MAX_DPL; i++) {
        int d = lane + 32 * i;
        qd[i] = (i < dpl && d < hd) ? q[(size_t)t * heads * hd + head * hd + d] * scale : 0.0f;
        acc[i] = 0.0f;
    }
    const bf16* cache = (const bf16*)base[seq[t]];
    size_t stride = (size_t)layers * 2 * kvw;
    const bf16* kp = cache + (size_t)layer * 2 * kvw + kvh * hd;
    float m = NEG_INF, l = 0.0f;
    int last = pos[t];
    for (int j = 0; j <= last; j++) {
        const bf16* kr = kp + (size_t)j * stride;
        float s = 0.0f;
#pragma unroll
        for (int i = 0; i < MAX_DPL; i++) {
            int d = lane + 32 * i;
            if (i < dpl && d < hd) s += qd[i] * bf2f(kr[d]);
        }
        s = warp_sum(s);
        float mn = fmaxf(m, s);
        float corr = expf(m - mn), pj = expf(s - mn);
        l = l * corr + pj;
        const bf16* vr = kr + kvw;
#pragma unroll
        for (int i = 0; i < MAX_DPL; i++) {
            int d = lane + 32 * i;
            if (i < dpl && d < hd) acc[i] = acc[i] * corr + pj * bf2f(vr[d]);
        }
        m = mn;
    }
    float inv = 1.0f / l;
#pragma unroll
    for (int i = 0; i < MAX_DPL; i++) {
        int d = lane + 32 * i;
        if (i < dpl && d < hd) out[(size_t)t * heads * hd + head * hd + d] = f2bf(acc[i] * inv);
    }
}

#define MAX_EXPERTS 256

// Router: softmax over the token's allowed experts of (logit + bias), top-k (ties to the lower index),
// optionally renormalised. Slots past the number of allowed experts get expert -1. One thread per token.
extern "C" __global__ void router_topk(const float* logits, const float* bias, const unsigned char* mask,
                                       int* topk_idx, float* topk_w, int n, int E, int k, int norm) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= n) return;
    float p[MAX_EXPERTS];
    const float* lg = logits + (size_t)t * E;
    const unsigned char* mk = mask + (size_t)t * E;
    float mx = NEG_INF;
    for (int e = 0; e < E; e++) {
        p[e] = lg[e] + (bias ? bias[e] : 0.0f);
        if (mk[e]) mx = fmaxf(mx, p[e]);
    }
    float sum = 0.0f;
    for (int e = 0; e < E; e++) {
        p[e] = mk[e] ? expf(p[e] - mx) : -1.0f;
        if (mk[e]) sum += p[e];
    }
    float top = 0.0f;
    for (int j = 0; j < k; j++) {
        int best = -1;
        float bv = -1.0f;
        for (int e = 0; e < E; e++)
            if (p[e] >= 0.0f && (best < 0 || p[e] / sum > bv)) { best = e; bv = p[e] / sum; }
        topk_idx[t * k + j] = best;
        topk_w[t * k + j] = best >= 0 ? bv : 0.0f;
        if (best >= 0) { top += bv; p[best] = -1.0f; }
    }
    if (norm)
        for (int j = 0; j < k; j++) topk_w[t * k + j] /= top;
}

// Sorts the (token, slot) entries by expert, stably: `offsets[e]..offsets[e + 1]` are expert e's rows,
// `sorted_token[r]` is row r's token and `entry_row[t * k + j]` the row of token t's slot j. Also adds
// the per-expert row counts to `routed` (this layer's running totals). One block of 1024 threads: a
// counting pass, then chunks of 1024 entries where each entry's rank among equal experts comes from
// its warp (__match_any_sync) plus the counts of the warps and chunks before it.
extern "C" __global__ void moe_permute(const int* topk_idx, int nk, int k, int E, int* offsets,
                                       int* sorted_token, int* entry_row, unsigned long long* routed) {
    __shared__ int counts[MAX_EXPERTS];
    __shared__ int cursor[MAX_EXPERTS];
    __shared__ int warp_counts[32][MAX_EXPERTS];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    for (int e = threadIdx.x; e < E; e += blockDim.x) counts[e] = 0;
    __syncthreads();
    for (int i = threadIdx.x; i < nk; i += blockDim.x) {
        int e = topk_idx[i];
        if (e >= 0) atomicAdd(&counts[e], 1);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        int acc = 0;
        for (int e = 0; e < E; e++) {
            offsets[e] = acc;
            cursor[e] = acc;
            routed[e] += counts[e];
            acc += counts[e];
        }
        offsets[E] = acc;
    }
    for (int i = threadIdx.x; i < 32 * MAX_EXPERTS; i += blockDim.x) warp_counts[i / MAX_EXPERTS][i % MAX_EXPERTS] = 0;
    __syncthreads();
    for (int base = 0; base < nk; base += blockDim.x) {
        int i = base + threadIdx.x;
        int e = i < nk ? topk_idx[i] : -1;
        // Lanes holding the same expert (entries past the end or without an expert hold -1).
        unsigned same = __match_any_sync(0xffffffffu, e);
        int rank = __popc(same & ((1u << lane) - 1u));
        if (e >= 0 && rank == 0) warp_counts[warp][e] = __popc(same);
        __syncthreads();
        // Per expert: exclusive prefix over the warps, starting at the expert's cursor.
        for (int x = threadIdx.x; x < E; x += blockDim.x) {
            int acc = cursor[x];
            for (int w = 0; w < nw; w++) {
                int c = warp_counts[w][x];
                warp_counts[w][x] = acc;
                acc += c;
            }
            cursor[x] = acc;
        }
        __syncthreads();
        if (i < nk) {
            if (e >= 0) {
                int r = warp_counts[warp][e] + rank;
                sorted_token[r] = i / k;
                entry_row[i] = r;
            } else {
                entry_row[i] = -1;
            }
        }
        __syncthreads();
        for (int x = threadIdx.x; x < 32 * MAX_EXPERTS; x += blockDim.x) warp_counts[x / MAX_EXPERTS][x % MAX_EXPERTS] = 0;
        __syncthreads();
    }
}

// xs[r] = x[sorted_token[r]] (bf16 rows). Grid: rows blocks.
extern "C" __global__ void gather_rows(const bf16* x, const int* sorted_token, bf16* xs, int h) {
    size_t r = blockIdx.x;
    const bf16* src = x + (size_t)sorted_token[r] * h;
    for (int j = threadIdx.x; j < h; j += blockDim.x) xs[r * h + j] = src[j];
}

#define GROUP_ROWS 8

// Grouped expert matmul for few rows per expert: out[r] = W_e x[row(r)] for each row r of expert e,
// with W_e [N, K] bf16 at `weights[e]`. A warp computes one output column for up to GROUP_ROWS rows
// at a time, so the column's weights stream once per GROUP_ROWS rows. `row_map` (or identity) picks
// the input row. K must be a multiple of 8. Grid: (ceil(N / warps per block), E).
extern "C" __global__ void grouped_matmul(const bf16* x, const int* row_map, const u64* weights,
                                          const int* offsets, float* out, int N, int K) {
    int e = blockIdx.y;
    int r0 = offsets[e], r1 = offsets[e + 1];
    if (r0 == r1) return;
    int col = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (col >= N) return;
    int lane = threadIdx.x & 31;
    const uint4* w = (const uint4*)((const bf16*)weights[e] + (size_t)col * K);
    int kv = K / 8;
    for (int rb = r0; rb < r1; rb += GROUP_ROWS) {
        int rows = min(GROUP_ROWS, r1 - rb);
        const uint4* xr[GROUP_ROWS];
        float acc[GROUP_ROWS];
#pragma unroll
        for (int i = 0; i < GROUP_ROWS; i++) {
            int r = rb + (i < rows ? i : 0);
            int src = row_map ? row_map[r] : r;
            xr[i] = (const uint4*)(x + (size_t)src * K);
            acc[i] = 0.0f;
        }
        for (int c = lane; c < kv; c += 32) {
            uint4 wv = w[c];
            float wf[8];
            wf[0] = __uint_as_float(wv.x << 16); wf[1] = __uint_as_float(wv.x & 0xffff0000u);
            wf[2] = __uint_as_float(wv.y << 16); wf[3] = __uint_as_float(wv.y & 0xffff0000u);
            wf[4] = __uint_as_float(wv.z << 16); wf[5] = __uint_as_float(wv.z & 0xffff0000u);
            wf[6] = __uint_as_float(wv.w << 16); wf[7] = __uint_as_float(wv.w & 0xffff0000u);
#pragma unroll
            for (int i = 0; i < GROUP_ROWS; i++) {
                if (i < rows) {
                    uint4 xv = xr[i][c];
                    float s = acc[i];
                    s += wf[0] * __uint_as_float(xv.x << 16) + wf[1] * __uint_as_float(xv.x & 0xffff0000u);
                    s += wf[2] * __uint_as_float(xv.y << 16) + wf[3] * __uint_as_float(xv.y & 0xffff0000u);
                    s += wf[4] * __uint_as_float(xv.z << 16) + wf[5] * __uint_as_float(xv.z & 0xffff0000u);
                    s += wf[6] * __uint_as_float(xv.w << 16) + wf[7] * __uint_as_float(xv.w & 0xffff0000u);
                    acc[i] = s;
                }
            }
        }
#pragma unroll
        for (int i = 0; i < GROUP_ROWS; i++) {
            float s = warp_sum(acc[i]);
            if (lane == 0 && i < rows) out[(size_t)(rb + i) * N + col] = s;
        }
    }
}

// SwiGLU on fused [gate | up] rows: y = silu(gate) * up, to bf16. Grid: rows blocks.
extern "C" __global__ void swiglu(const float* gu, bf16* y, int inter) {
    size_t r = blockIdx.x;
    const float* g = gu + r * 2 * inter;
    for (int j = threadIdx.x; j < inter; j += blockDim.x) {
        float a = g[j];
        y[r * inter + j] = f2bf(a / (1.0f + expf(-a)) * g[inter + j]);
    }
}

// Each token's output: its experts' rows weighted by the routing weights, summed in expert order;
// added to `out` when `accumulate`, else written. Grid: n blocks.
extern "C" __global__ void moe_combine(float* out, const float* eo, const int* topk_idx, const float* topk_w,
                                       const int* entry_row, int k, int h, int accumulate) {
    int t = blockIdx.x;
    int order[16];
    int m = 0;
    for (int j = 0; j < k && j < 16; j++)
        if (topk_idx[t * k + j] >= 0) order[m++] = j;
    // Insertion sort by expert index: outputs are summed in the order the CPU engine sums them.
    for (int a = 1; a < m; a++) {
        int v = order[a], b = a - 1;
        while (b >= 0 && topk_idx[t * k + order[b]] > topk_idx[t * k + v]) { order[b + 1] = order[b]; b--; }
        order[b + 1] = v;
    }
    for (int d = threadIdx.x; d < h; d += blockDim.x) {
        float s = 0.0f;
        for (int a = 0; a < m; a++) {
            int j = order[a];
            s += topk_w[t * k + j] * eo[(size_t)entry_row[t * k + j] * h + d];
        }
        size_t o = (size_t)t * h + d;
        out[o] = accumulate ? out[o] + s : s;
    }
}

// Copies one KV cache's first `len` positions into another (forks and growth). Grid: ceil(len*w/256).
extern "C" __global__ void copy_bf16(const bf16* src, bf16* dst, size_t count) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < count) dst[i] = src[i];
}

// Scoring: for each row of logits, log-softmax at `targets[r]` and whether the target is the argmax
// (first maximum). Grid: rows blocks.
extern "C" __global__ void logprob_gather(const float* logits, const int* targets, float* lp, int* greedy,
                                          int V) {
    const float* row = logits + (size_t)blockIdx.x * V;
    float mv = NEG_INF;
    int mi = 0x7fffffff;
    for (int j = threadIdx.x; j < V; j += blockDim.x)
        if (row[j] > mv) { mv = row[j]; mi = j; }
    float bv;
    int bi;
    block_argmax(mv, mi, &bv, &bi);
    float s = 0.0f;
    for (int j = threadIdx.x; j < V; j += blockDim.x) s += expf(row[j] - bv);
    float z = block_sum(s);
    if (threadIdx.x == 0) {
        int tg = targets[blockIdx.x];
        lp[blockIdx.x] = row[tg] - bv - logf(z);
        greedy[blockIdx.x] = tg == bi;
    }
}

// Greedy decoding: argmax (first maximum) of each row. Grid: rows blocks.
extern "C" __global__ void argmax_rows(const float* logits, int* out, int V) {
    const float* row = logits + (size_t)blockIdx.x * V;
    float mv = NEG_INF;
    int mi = 0x7fffffff;
    for (int j = threadIdx.x; j < V; j += blockDim.x)
        if (row[j] > mv) { mv = row[j]; mi = j; }
    float bv;
    int bi;
    block_argmax(mv, mi, &bv, &bi);
    if (threadIdx.x == 0) out[blockIdx.x] = bi;
}
