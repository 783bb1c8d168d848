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

// The block's maximum of a row of V values and its first index.
__device__ void row_argmax(const float* row, int V, float* best_v, int* best_i) {
    float mv = NEG_INF;
    int mi = 0x7fffffff;
    for (int j = threadIdx.x; j < V; j += blockDim.x)
        if (row[j] > mv) { mv = row[j]; mi = j; }
    block_argmax(mv, mi, best_v, best_i);
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

// RMSNorm of rows of x: w * x / sqrt(mean(x^2) + eps), to bf16 (`yb`) and/or f32 (`yf`). Output row
// b normalises input row `rows[b]` (or b when `rows` is null). Grid: one block per output row.
extern "C" __global__ void rmsnorm(const float* x, const int* rows, const bf16* w, bf16* yb, float* yf,
                                   int h, float eps) {
    size_t o = (size_t)blockIdx.x * h;
    size_t r = (size_t)(rows ? rows[blockIdx.x] : blockIdx.x) * h;
    float ss = 0.0f;
    for (int j = threadIdx.x; j < h; j += blockDim.x) ss += x[r + j] * x[r + j];
    float inv = rsqrtf(block_sum(ss) / h + eps);
    for (int j = threadIdx.x; j < h; j += blockDim.x) {
        float y = x[r + j] * inv * bf2f(w[j]);
        if (yb) yb[o + j] = f2bf(y);
        if (yf) yf[o + j] = y;
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

#define MAX_DPL 8     // head dims per lane: head_dim <= 256
#define ATT_WARPS 8   // warps per (token, head)
#define ATT_CHUNK 8   // keys a warp scores before one softmax update

// Causal attention, one block of ATT_WARPS warps per (token, head). The lanes split the head's
// dimensions; the warps take turns over chunks of ATT_CHUNK cached keys (0..=pos), each warp keeping an
// online softmax, and the warps' partial results are merged at the end. Scoring a chunk's keys before
// updating keeps many loads in flight, which decoding (few tokens, long caches) needs.
// Output bf16 [n, heads * hd] (the o_proj input). `tokens` lists the tokens this launch serves.
// Grid: len(tokens) * heads blocks of 32 * ATT_WARPS threads.
extern "C" __global__ void attention(const float* q, bf16* out, const int* pos, const int* seq,
                                     const u64* base, const int* tokens, int layer, int layers,
                                     int heads, int kv_heads, int hd, float scale) {
    __shared__ float part_m[ATT_WARPS], part_l[ATT_WARPS];
    __shared__ float part_acc[ATT_WARPS][32 * MAX_DPL];
    int pair = blockIdx.x;
    int t = tokens[pair / heads], head = pair % heads;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
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
    int chunks = (last + ATT_CHUNK) / ATT_CHUNK;
    for (int c = warp; c < chunks; c += ATT_WARPS) {
        int j0 = c * ATT_CHUNK;
        float s[ATT_CHUNK];
#pragma unroll
        for (int u = 0; u < ATT_CHUNK; u++) {
            float d_s = 0.0f;
            if (j0 + u <= last) {
                const bf16* kr = kp + (size_t)(j0 + u) * stride;
#pragma unroll
                for (int i = 0; i < MAX_DPL; i++) {
                    int d = lane + 32 * i;
                    if (i < dpl && d < hd) d_s += qd[i] * bf2f(kr[d]);
                }
            }
            s[u] = d_s;
        }
#pragma unroll
        for (int u = 0; u < ATT_CHUNK; u++) s[u] = warp_sum(s[u]);
        float mc = m;
#pragma unroll
        for (int u = 0; u < ATT_CHUNK; u++)
            if (j0 + u <= last) mc = fmaxf(mc, s[u]);
        float corr = expf(m - mc);
        l *= corr;
#pragma unroll
        for (int i = 0; i < MAX_DPL; i++) acc[i] *= corr;
#pragma unroll
        for (int u = 0; u < ATT_CHUNK; u++) {
            if (j0 + u <= last) {
                float p = expf(s[u] - mc);
                l += p;
                const bf16* vr = kp + (size_t)(j0 + u) * stride + kvw;
#pragma unroll
                for (int i = 0; i < MAX_DPL; i++) {
                    int d = lane + 32 * i;
                    if (i < dpl && d < hd) acc[i] += p * bf2f(vr[d]);
                }
            }
        }
        m = mc;
    }
    if (lane == 0) {
        part_m[warp] = m;
        part_l[warp] = l;
    }
#pragma unroll
    for (int i = 0; i < MAX_DPL; i++)
        if (i < dpl) part_acc[warp][lane + 32 * i] = acc[i];
    __syncthreads();
    if (warp == 0) {
        float mx = NEG_INF;
        for (int w = 0; w < ATT_WARPS; w++) mx = fmaxf(mx, part_m[w]);
        float f[ATT_WARPS], z = 0.0f;
        for (int w = 0; w < ATT_WARPS; w++) {
            // A warp that saw no key has m = -inf: weight 0.
            f[w] = part_m[w] == NEG_INF ? 0.0f : expf(part_m[w] - mx);
            z += part_l[w] * f[w];
        }
#pragma unroll
        for (int i = 0; i < MAX_DPL; i++) {
            int d = lane + 32 * i;
            if (i < dpl && d < hd) {
                float v = 0.0f;
                for (int w = 0; w < ATT_WARPS; w++) v += part_acc[w][d] * f[w];
                out[(size_t)t * heads * hd + head * hd + d] = f2bf(v / z);
            }
        }
    }
}

#define PF_TILE 32     // queries and keys per tile
#define PF_MAX_HD 128

// Tiled causal attention for runs of new tokens of one sequence (prefill). A block serves up to
// PF_TILE consecutive new tokens of one sequence for one head (`tiles`: first token, count); its 4
// warps own 8 queries each. Keys and values stream through shared memory PF_TILE positions at a time;
// lane j scores key j, and each query keeps an online softmax. head_dim <= PF_MAX_HD, even.
// Output as `attention`. Grid: (number of tiles, heads) blocks of 128 threads.
extern "C" __global__ void __launch_bounds__(128) attention_prefill(
    const float* q, bf16* out, const int* pos, const int* seq, const u64* base, const int* tiles,
    int layer, int layers, int heads, int kv_heads, int hd, float scale) {
    __shared__ float qs[PF_TILE][PF_MAX_HD];
    __shared__ unsigned ks[PF_TILE][PF_MAX_HD / 2 + 1];  // bf16 pairs; the pad spreads rows over banks
    __shared__ bf16 vs[PF_TILE][PF_MAX_HD];
    int head = blockIdx.y;
    int t0 = tiles[2 * blockIdx.x], cnt = tiles[2 * blockIdx.x + 1];
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int kvh = head / (heads / kv_heads);
    int kvw = kv_heads * hd, hp = hd / 2, dpl = (hd + 31) / 32;
    const bf16* cache = (const bf16*)base[seq[t0]];
    size_t stride = (size_t)layers * 2 * kvw;
    const bf16* kp = cache + (size_t)layer * 2 * kvw + kvh * hd;
    int p0 = pos[t0];
    for (int i = threadIdx.x; i < PF_TILE * hd; i += blockDim.x) {
        int qi = i / hd, d = i % hd;
        qs[qi][d] = qi < cnt ? q[(size_t)(t0 + qi) * heads * hd + head * hd + d] * scale : 0.0f;
    }
    float m[8], l[8], acc[8][4];
#pragma unroll
    for (int u = 0; u < 8; u++) {
        m[u] = NEG_INF;
        l[u] = 0.0f;
#pragma unroll
        for (int i = 0; i < 4; i++) acc[u][i] = 0.0f;
    }
    int q_first = warp * 8;                          // this warp's first query in the tile
    int q_last = min(q_first + 7, cnt - 1);          // and its last (may be < q_first: idle warp)
    int key_tiles = (p0 + cnt - 1) / PF_TILE + 1;
    for (int kt = 0; kt < key_tiles; kt++) {
        int k0 = kt * PF_TILE;
        __syncthreads();
        for (int i = threadIdx.x; i < PF_TILE * hp; i += blockDim.x) {
            int j = i / hp, dp = i % hp;
            int kpos = k0 + j;
            unsigned kv2 = 0, vv2 = 0;
            if (kpos <= p0 + cnt - 1) {
                const bf16* kr = kp + (size_t)kpos * stride;
                kv2 = *(const unsigned*)(kr + 2 * dp);
                vv2 = *(const unsigned*)(kr + kvw + 2 * dp);
            }
            ks[j][dp] = kv2;
            vs[j][2 * dp] = (bf16)(vv2 & 0xffffu);
            vs[j][2 * dp + 1] = (bf16)(vv2 >> 16);
        }
        __syncthreads();
        if (q_last < q_first || k0 > p0 + q_last) continue;  // every key here is after this warp's queries
        // Scores: lane = key j of the tile, for each of the warp's 8 queries.
        float s[8];
#pragma unroll
        for (int u = 0; u < 8; u++) s[u] = 0.0f;
        for (int dp = 0; dp < hp; dp++) {
            unsigned kk = ks[lane][dp];
            float k_lo = __uint_as_float(kk << 16), k_hi = __uint_as_float(kk & 0xffff0000u);
#pragma unroll
            for (int u = 0; u < 8; u++) s[u] += qs[q_first + u][2 * dp] * k_lo + qs[q_first + u][2 * dp + 1] * k_hi;
        }
        float pr[8];
#pragma unroll
        for (int u = 0; u < 8; u++) {
            int qpos = p0 + q_first + u;
            bool ok = q_first + u <= q_last && k0 + lane <= qpos;
            float sc = ok ? s[u] : NEG_INF;
            float mx = sc;
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
            float mn = fmaxf(m[u], mx);
            // mn is -inf only for a padding query (no valid key): keep it inert.
            float corr = mn == NEG_INF ? 1.0f : expf(m[u] - mn);
            pr[u] = ok ? expf(sc - mn) : 0.0f;
            l[u] = l[u] * corr + warp_sum(pr[u]);
#pragma unroll
            for (int i = 0; i < 4; i++) acc[u][i] *= corr;
            m[u] = mn;
        }
        for (int j = 0; j < PF_TILE; j++) {
            float vv[4];
#pragma unroll
            for (int i = 0; i < 4; i++) {
                int d = lane + 32 * i;
                vv[i] = (i < dpl && d < hd) ? bf2f(vs[j][d]) : 0.0f;
            }
#pragma unroll
            for (int u = 0; u < 8; u++) {
                float pj = __shfl_sync(0xffffffffu, pr[u], j);
#pragma unroll
                for (int i = 0; i < 4; i++) acc[u][i] += pj * vv[i];
            }
        }
    }
#pragma unroll
    for (int u = 0; u < 8; u++) {
        int qi = q_first + u;
        if (qi > q_last) break;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            int d = lane + 32 * i;
            if (i < dpl && d < hd) out[(size_t)(t0 + qi) * heads * hd + head * hd + d] = f2bf(acc[u][i] / l[u]);
        }
    }
}

#define MAX_EXPERTS 256

// Router: softmax over the token's allowed experts of (logit + bias), top-k (ties to the lower index),
// optionally renormalised. Slots past the number of allowed experts get expert -1. One warp per token,
// each lane holding every 32nd expert. Grid: ceil(n / 4) blocks of 128 threads.
extern "C" __global__ void router_topk(const float* logits, const float* bias, const unsigned char* mask,
                                       int* topk_idx, float* topk_w, int n, int E, int k, int norm) {
    int t = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if (t >= n) return;
    const int PER = MAX_EXPERTS / 32;
    float p[PER];
    const float* lg = logits + (size_t)t * E;
    const unsigned char* mk = mask + (size_t)t * E;
    float mx = NEG_INF;
#pragma unroll
    for (int i = 0; i < PER; i++) {
        int e = lane + 32 * i;
        bool ok = e < E && mk[e];
        p[i] = ok ? lg[e] + (bias ? bias[e] : 0.0f) : NEG_INF;
        mx = fmaxf(mx, p[i]);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    float sum = 0.0f;
#pragma unroll
    for (int i = 0; i < PER; i++) {
        // -1 marks experts that are masked out or already chosen.
        p[i] = p[i] == NEG_INF ? -1.0f : expf(p[i] - mx);
        if (p[i] >= 0.0f) sum += p[i];
    }
    sum = warp_sum(sum);
    float top = 0.0f;
    for (int j = 0; j < k; j++) {
        float bv = -1.0f;
        int be = 0x7fffffff;
#pragma unroll
        for (int i = 0; i < PER; i++) {
            float v = p[i] >= 0.0f ? p[i] / sum : -1.0f;
            if (v > bv) { bv = v; be = lane + 32 * i; }
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            float ov = __shfl_xor_sync(0xffffffffu, bv, o);
            int oe = __shfl_xor_sync(0xffffffffu, be, o);
            if (ov > bv || (ov == bv && oe < be)) { bv = ov; be = oe; }
        }
        bool found = bv >= 0.0f;
        if (lane == 0) {
            topk_idx[t * k + j] = found ? be : -1;
            topk_w[t * k + j] = found ? bv : 0.0f;
        }
        if (found) {
            top += bv;
            if ((be & 31) == lane) {
#pragma unroll
                for (int i = 0; i < PER; i++)
                    if (lane + 32 * i == be) p[i] = -1.0f;
            }
        }
    }
    if (norm && lane == 0)
        for (int j = 0; j < k; j++) topk_w[t * k + j] /= top;
}

// Sorts the (token, slot) entries by expert, stably: `offsets[e]..offsets[e + 1]` are expert e's rows,
// `sorted_token[r]` is row r's token and `entry_row[t * k + j]` the row of token t's slot j (-1 for an
// empty slot); `active` is the number of experts with rows, then those experts. Also adds
// the per-expert row counts to `routed` (this layer's running totals). One block of 1024 threads: a
// counting pass, then chunks of 1024 entries where each entry's rank among equal experts comes from
// its warp (__match_any_sync) plus the counts of the warps and chunks before it.
extern "C" __global__ void moe_permute(const int* topk_idx, int nk, int k, int E, int* offsets,
                                       int* active, int* sorted_token, int* entry_row,
                                       unsigned long long* routed) {
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
        // `active` lists the experts with rows (count first), so grouped matmuls launch only for them.
        int acc = 0, used = 0;
        for (int e = 0; e < E; e++) {
            offsets[e] = acc;
            cursor[e] = acc;
            routed[e] += counts[e];
            acc += counts[e];
            if (counts[e] > 0) active[1 + used++] = e;
        }
        offsets[E] = acc;
        active[0] = used;
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

#define GROUP_ROWS 8

__device__ __forceinline__ float dot8(uint4 w, uint4 x) {
    float s = __uint_as_float(w.x << 16) * __uint_as_float(x.x << 16);
    s += __uint_as_float(w.x & 0xffff0000u) * __uint_as_float(x.x & 0xffff0000u);
    s += __uint_as_float(w.y << 16) * __uint_as_float(x.y << 16);
    s += __uint_as_float(w.y & 0xffff0000u) * __uint_as_float(x.y & 0xffff0000u);
    s += __uint_as_float(w.z << 16) * __uint_as_float(x.z << 16);
    s += __uint_as_float(w.z & 0xffff0000u) * __uint_as_float(x.z & 0xffff0000u);
    s += __uint_as_float(w.w << 16) * __uint_as_float(x.w << 16);
    s += __uint_as_float(w.w & 0xffff0000u) * __uint_as_float(x.w & 0xffff0000u);
    return s;
}

// One warp's partial dot products of a weight row with R input rows, U weight loads in flight per
// lane. R and U are compile-time so the accumulators and loads stay in registers.
template <int R, int U>
__device__ __forceinline__ void row_dots(const uint4* w, const uint4* const* xr, int kv, int lane,
                                         float* acc) {
    for (int c0 = lane; c0 < kv; c0 += 32 * U) {
        uint4 wv[U];
#pragma unroll
        for (int u = 0; u < U; u++) {
            int c = c0 + 32 * u;
            if (c < kv) wv[u] = w[c];
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            int c = c0 + 32 * u;
            if (c < kv) {
#pragma unroll
                for (int i = 0; i < R; i++) acc[i] += dot8(wv[u], xr[i][c]);
            }
        }
    }
}

// Grouped expert matmul for few rows per expert: out[r] = W_e x[row(r)] for each row r of expert e,
// with W_e [N, K] bf16 at `weights[e]`. A warp computes one output column for up to GROUP_ROWS rows
// at a time, so the column's weights stream once per GROUP_ROWS rows. `row_map` (or identity) picks
// the input row; `accumulate` adds to `out` instead of writing it. A dense matrix is the one-expert
// case. K must be a multiple of 8. Grid: (ceil(N / warps per block), up to E): block row y serves the
// y-th expert of `active` (see moe_permute).
extern "C" __global__ void __launch_bounds__(256) grouped_matmul(const bf16* x, const int* row_map,
                                                                 const u64* weights, const int* offsets,
                                                                 const int* active, float* out, int N,
                                                                 int K, int accumulate) {
    if ((int)blockIdx.y >= active[0]) return;
    int e = active[1 + blockIdx.y];
    int r0 = offsets[e], r1 = offsets[e + 1];
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
            // Past the last row, repeat it: computed, never stored.
            int r = rb + (i < rows ? i : rows - 1);
            int src = row_map ? row_map[r] : r;
            xr[i] = (const uint4*)(x + (size_t)src * K);
            acc[i] = 0.0f;
        }
        if (rows == 1) row_dots<1, 8>(w, xr, kv, lane, acc);
        else if (rows == 2) row_dots<2, 8>(w, xr, kv, lane, acc);
        else if (rows <= 4) row_dots<4, 4>(w, xr, kv, lane, acc);
        else row_dots<8, 2>(w, xr, kv, lane, acc);
#pragma unroll
        for (int i = 0; i < GROUP_ROWS; i++) {
            float s = warp_sum(acc[i]);
            if (lane == 0 && i < rows) {
                float* o = out + (size_t)(rb + i) * N + col;
                *o = accumulate ? *o + s : s;
            }
        }
    }
}

#define MMA_BM 64   // rows per block
#define MMA_BN 128  // output columns per block
#define MMA_BK 32   // K per shared-memory stage (two stages, filled by cp.async while the other computes)
#define MMA_LD 40   // padded shared row (bf16): fragment reads hit 32 distinct banks

__device__ __forceinline__ void mma_bf16(float* d, const unsigned* a, const unsigned* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// 16 bytes global -> shared without passing through registers; `valid` false writes zeros.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
    unsigned dst;
    asm volatile("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(dst) : "l"(smem));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(valid ? 16 : 0));
}

// Grouped expert matmul on tensor cores, for many rows per expert (prefill): out[r] = W_e x[row(r)]
// over the rows of each tile (`tiles`: expert, first row; up to MMA_BM rows of that expert). Each
// block computes MMA_BM x MMA_BN outputs; its 8 warps hold 32 x 32 each as m16n8k16 bf16 MMAs with
// f32 accumulators, while the next K stage streams into shared memory. K must be a multiple of 8.
// Grid: (ceil(N / MMA_BN), tiles) blocks of 256 threads.
extern "C" __global__ void __launch_bounds__(256) grouped_mma(const bf16* x, const int* row_map,
                                                              const u64* weights, const int* offsets,
                                                              const int* tiles, float* out, int N, int K) {
    __shared__ __align__(16) bf16 as[2][MMA_BM][MMA_LD];
    __shared__ __align__(16) bf16 bs[2][MMA_BN][MMA_LD];
    int e = tiles[2 * blockIdx.y], r0 = tiles[2 * blockIdx.y + 1];
    int r_end = offsets[e + 1];
    int n0 = blockIdx.x * MMA_BN;
    const bf16* W = (const bf16*)weights[e];
    int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    int wm = warp >> 2, wn = warp & 3;
    int g = lane >> 2, c = lane & 3;
    // Each thread copies one A and two B vectors of 8 bf16 per stage.
    int lr = tid >> 2, lc = (tid & 3) * 8;
    int ar = r0 + lr;
    const bf16* a_src = ar < r_end ? x + (size_t)(row_map ? row_map[ar] : ar) * K : x;
    bool a_ok = ar < r_end;
    const bf16* b_src[2];
    bool b_ok[2];
#pragma unroll
    for (int h2 = 0; h2 < 2; h2++) {
        int n = n0 + lr + 64 * h2;
        b_ok[h2] = n < N;
        b_src[h2] = W + (size_t)(b_ok[h2] ? n : 0) * K;
    }
    float acc[2][4][4];
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int v = 0; v < 4; v++) acc[i][j][v] = 0.0f;
    int stages = (K + MMA_BK - 1) / MMA_BK;
    // Stage 0, then each iteration fetches stage kt + 1 while computing stage kt.
    {
        bool in_k = lc < K;
        cp_async16(&as[0][lr][lc], a_src + (in_k ? lc : 0), a_ok && in_k);
#pragma unroll
        for (int h2 = 0; h2 < 2; h2++) cp_async16(&bs[0][lr + 64 * h2][lc], b_src[h2] + (in_k ? lc : 0), b_ok[h2] && in_k);
        asm volatile("cp.async.commit_group;\n" ::);
    }
    for (int kt = 0; kt < stages; kt++) {
        int cur = kt & 1;
        if (kt + 1 < stages) {
            int k = (kt + 1) * MMA_BK + lc;
            bool in_k = k < K;
            int kk = in_k ? k : 0;
            cp_async16(&as[cur ^ 1][lr][lc], a_src + kk, a_ok && in_k);
#pragma unroll
            for (int h2 = 0; h2 < 2; h2++) cp_async16(&bs[cur ^ 1][lr + 64 * h2][lc], b_src[h2] + kk, b_ok[h2] && in_k);
        }
        asm volatile("cp.async.commit_group;\n" ::);
        asm volatile("cp.async.wait_group 1;\n" ::);
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < MMA_BK; kk += 16) {
            unsigned af[2][4], bfr[4][2];
#pragma unroll
            for (int i = 0; i < 2; i++) {
                int row = wm * 32 + i * 16 + g;
                af[i][0] = *(const unsigned*)&as[cur][row][kk + 2 * c];
                af[i][1] = *(const unsigned*)&as[cur][row + 8][kk + 2 * c];
                af[i][2] = *(const unsigned*)&as[cur][row][kk + 2 * c + 8];
                af[i][3] = *(const unsigned*)&as[cur][row + 8][kk + 2 * c + 8];
            }
#pragma unroll
            for (int j = 0; j < 4; j++) {
                int col = wn * 32 + j * 8 + g;
                bfr[j][0] = *(const unsigned*)&bs[cur][col][kk + 2 * c];
                bfr[j][1] = *(const unsigned*)&bs[cur][col][kk + 2 * c + 8];
            }
#pragma unroll
            for (int i = 0; i < 2; i++)
#pragma unroll
                for (int j = 0; j < 4; j++) mma_bf16(acc[i][j], af[i], bfr[j]);
        }
        // The next iteration refills this stage.
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 2; i++) {
#pragma unroll
        for (int j = 0; j < 4; j++) {
            int row = r0 + wm * 32 + i * 16 + g;
            int col = n0 + wn * 32 + j * 8 + 2 * c;
#pragma unroll
            for (int half = 0; half < 2; half++) {
                int r = row + 8 * half;
                if (r < r_end) {
                    if (col < N) out[(size_t)r * N + col] = acc[i][j][2 * half];
                    if (col + 1 < N) out[(size_t)r * N + col + 1] = acc[i][j][2 * half + 1];
                }
            }
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
// added to `out` when `accumulate`, else written. Grid: (n, ceil(h / blockDim.x)) blocks.
extern "C" __global__ void moe_combine(float* out, const float* eo, const int* topk_idx, const float* topk_w,
                                       const int* entry_row, int k, int h, int accumulate) {
    int t = blockIdx.x;
    int d = blockIdx.y * blockDim.x + threadIdx.x;
    if (d >= h) return;
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
    float s = 0.0f;
    for (int a = 0; a < m; a++) {
        int j = order[a];
        s += topk_w[t * k + j] * eo[(size_t)entry_row[t * k + j] * h + d];
    }
    size_t o = (size_t)t * h + d;
    out[o] = accumulate ? out[o] + s : s;
}

// Scoring: for each row of logits, log-softmax at `targets[r]` and whether the target is the argmax
// (first maximum). Grid: rows blocks.
extern "C" __global__ void logprob_gather(const float* logits, const int* targets, float* lp, int* greedy,
                                          int V) {
    const float* row = logits + (size_t)blockIdx.x * V;
    float bv;
    int bi;
    row_argmax(row, V, &bv, &bi);
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
    float bv;
    int bi;
    row_argmax(logits + (size_t)blockIdx.x * V, V, &bv, &bi);
    if (threadIdx.x == 0) out[blockIdx.x] = bi;
}
