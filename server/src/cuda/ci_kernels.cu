// Fused kernels for the batched CI pass (see mod.rs). The matmuls stay in cuBLAS; these fuse what
// comes between them and what comes after the last one, so that only active entries reach the host.
#include <stdint.h>

// Exact (erf) GELU, as the CI networks' hidden layers use it.
__device__ __forceinline__ float gelu_erf(float v) {
    return 0.5f * v * (1.0f + erff(v * 0.70710678118654752440f));
}

// out[r, j] = act(x[r, j] + bias[(r / group_rows) * h + j]) for r < rows, j < h (all row-major),
// act = exact GELU if `gelu`, else identity (the target projections' bias). group_rows = rows for
// one bias row (shared_mlp, projections); = N for a bias per component ([C, 1, h]) over [C, N, h]
// (vector_mlp, mlp). Grid: x over blocks of columns, y strides over rows, so no thread divides per
// element (a 64-bit `/` and `%` per element had cost more than the memory traffic).
extern "C" __global__ void bias_act_f32(const float* __restrict__ x, const float* __restrict__ bias,
                                        float* __restrict__ out, uint32_t rows, uint32_t h,
                                        uint32_t group_rows, int gelu) {
    const uint32_t j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= h) return;
    for (uint32_t r = blockIdx.y; r < rows; r += gridDim.y) {
        const uint64_t i = (uint64_t)r * h + j;
        const float v = x[i] + bias[(uint64_t)(r / group_rows) * h + j];
        out[i] = gelu ? gelu_erf(v) : v;
    }
}

// As bias_act_f32 over float4s: h4 = h / 4 columns of four; x, bias and out 16-byte aligned (the
// caller checks h % 4 == 0 and the offsets). Four times fewer, wider memory transactions.
extern "C" __global__ void bias_act_f32x4(const float4* __restrict__ x,
                                          const float4* __restrict__ bias, float4* __restrict__ out,
                                          uint32_t rows, uint32_t h4, uint32_t group_rows,
                                          int gelu) {
    const uint32_t j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= h4) return;
    for (uint32_t r = blockIdx.y; r < rows; r += gridDim.y) {
        const uint64_t i = (uint64_t)r * h4 + j;
        const float4 v = x[i], b = bias[(uint64_t)(r / group_rows) * h4 + j];
        float4 o = make_float4(v.x + b.x, v.y + b.y, v.z + b.z, v.w + b.w);
        if (gelu) o = make_float4(gelu_erf(o.x), gelu_erf(o.y), gelu_erf(o.z), gelu_erf(o.w));
        out[i] = o;
    }
}

#define SIG_CLAMP 0
#define SIG_LOGISTIC 1
#define SIG_SWISH_HARD 2
#define SIG_UPPER_LEAKY_HARD 3

__device__ __forceinline__ float logistic(float x) { return 1.0f / (1.0f + expf(-x)); }

// The lower-leaky CI from the pre-sigmoid value (ci.rs: lower_ci).
__device__ __forceinline__ float lower_ci(float z, int kind) {
    switch (kind) {
        case SIG_LOGISTIC:
            return logistic(z);
        case SIG_SWISH_HARD: {
            const float x = z - 0.5f;
            const float l = (x - 0.5f) * logistic(-10.0f * (x - 0.5f)) - x * logistic(10.0f * x);
            const float r = (x + 0.5f) * logistic(10.0f * (x + 0.5f)) - x * logistic(-10.0f * x);
            return l + r + 0.5f;
        }
        case SIG_UPPER_LEAKY_HARD:
            return z > 1.0f ? 1.0f + 0.01f * (z - 1.0f) : fminf(fmaxf(z, 0.0f), 1.0f);
        default:
            return fminf(fmaxf(z, 0.0f), 1.0f);
    }
}

#define FINAL_THREADS 256
#define FINAL_ROWS 64

// Reserves room for `count` entries of this thread in a buffer shared by all blocks: an exclusive
// scan of the counts over the block (within warps, then over warp totals), then one atomicAdd on
// `counter` for the block's total. Returns this thread's first slot. Every thread of the block must
// call it (blockDim.x a multiple of 32, at most 1024).
__device__ __forceinline__ uint64_t block_reserve(uint32_t count,
                                                  unsigned long long* __restrict__ counter) {
    __shared__ uint32_t warp_tot[32];
    __shared__ unsigned long long base;
    const uint32_t lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    uint32_t incl = count;
    for (int d = 1; d < 32; d <<= 1) {
        const uint32_t v = __shfl_up_sync(0xffffffffu, incl, d);
        if (lane >= d) incl += v;
    }
    if (lane == 31) warp_tot[warp] = incl;
    __syncthreads();
    if (threadIdx.x == 0) {
        uint32_t run = 0;
        for (uint32_t w = 0; w < blockDim.x / 32; ++w) {
            const uint32_t t = warp_tot[w];
            warp_tot[w] = run;
            run += t;
        }
        base = run ? atomicAdd(counter, (unsigned long long)run) : 0ull;
    }
    __syncthreads();
    return base + warp_tot[warp] + (incl - count);
}

// Final layer of one module's CI network, fused: ci = lower_ci(z + bias) for rows n < n_rows (token
// n = prompt * seq_len + position) and components c < n_comp, where z[n, c] sits at
// z[n * row_stride + c * col_stride] and bias[c]. Rows past their prompt's length
// (position >= lens[prompt]: right padding) count for nothing below. Grid: x over blocks of
// FINAL_ROWS tokens, y over blocks of FINAL_THREADS components. Per block:
// - optionally writes ci densely ([n_rows, n_comp], row-major) to ci_out;
// - adds the block's CI sum and count of ci > fire_thr per component to sums / fires (atomics, one
//   per block and component);
// - compacts entries with ci >= active_thr into `entries` (4 words each: prompt, position,
//   col0 + c, ci bits): one atomic on `counter` per block reserves its range, an in-block scan places
//   each thread's entries. Entries past `cap` are counted but not written (the caller retries).
// Each thread remembers its active rows in a 64-bit mask (FINAL_ROWS = 64), so the second pass
// reloads z only where it writes an entry; 64 rows per block (not 128) gives the loads enough blocks
// in flight (one column per thread reads its rows one after another).
extern "C" __global__ void ci_final_f32(const float* __restrict__ z, const float* __restrict__ bias,
                                        uint32_t n_rows, uint32_t n_comp, uint32_t row_stride,
                                        uint32_t col_stride, uint32_t seq_len,
                                        const uint32_t* __restrict__ lens, int kind,
                                        float active_thr, float fire_thr, uint32_t col0,
                                        float* __restrict__ ci_out, int write_ci,
                                        float* __restrict__ sums, uint32_t* __restrict__ fires,
                                        uint32_t* __restrict__ entries, uint64_t cap,
                                        unsigned long long* __restrict__ counter) {
    const uint32_t c = blockIdx.y * FINAL_THREADS + threadIdx.x;
    const uint32_t r0 = blockIdx.x * FINAL_ROWS;
    const uint32_t r1 = min(r0 + FINAL_ROWS, n_rows);
    const bool col_ok = c < n_comp;
    const float b = col_ok ? bias[c] : 0.0f;

    float sum = 0.0f;
    uint32_t fire = 0;
    unsigned long long mask = 0;  // bit k: row r0 + k is an entry
    if (col_ok) {
        // (prompt, position) of row r, stepped along with r: no division per element.
        uint32_t prompt = r0 / seq_len, pos = r0 % seq_len, len = lens[prompt];
#pragma unroll 8
        for (uint32_t k = 0; k < r1 - r0; ++k) {
            const uint32_t r = r0 + k;
            const float ci =
                lower_ci(z[(uint64_t)r * row_stride + (uint64_t)c * col_stride] + b, kind);
            if (write_ci) ci_out[(uint64_t)r * n_comp + c] = ci;
            if (pos < len) {
                sum += ci;
                fire += ci > fire_thr;
                if (ci >= active_thr) mask |= 1ull << k;
            }
            if (++pos == seq_len && r + 1 < r1) {
                pos = 0;
                len = lens[++prompt];
            }
        }
        if (r1 > r0) {
            atomicAdd(&sums[c], sum);
            if (fire) atomicAdd(&fires[c], fire);
        }
    }

    uint64_t at = block_reserve((uint32_t)__popcll(mask), counter);
    for (; mask && at < cap; mask &= mask - 1, ++at) {
        const uint32_t r = r0 + (uint32_t)(__ffsll((long long)mask) - 1);
        const float ci = lower_ci(z[(uint64_t)r * row_stride + (uint64_t)c * col_stride] + b, kind);
        uint32_t* e = entries + 4 * at;
        e[0] = r / seq_len;
        e[1] = r % seq_len;
        e[2] = col0 + c;
        e[3] = __float_as_uint(ci);
    }
}

#define LN_THREADS 256

__device__ __forceinline__ float warp_sum(float v) {
    for (int d = 16; d > 0; d >>= 1) v += __shfl_xor_sync(0xffffffffu, v, d);
    return v;
}

// LayerNorm of each row of x ([rows, d], row-major): (x - mean) / sqrt(var + eps) * w + b with the
// biased variance, in the order gpt2_simple.rs's LayerNorm computes it. One warp per row,
// LN_THREADS / 32 rows per block.
extern "C" __global__ void layer_norm_f32(const float* __restrict__ x, const float* __restrict__ w,
                                          const float* __restrict__ b, float* __restrict__ out,
                                          uint32_t rows, uint32_t d, float eps) {
    const uint32_t lane = threadIdx.x & 31;
    const uint64_t row = (uint64_t)blockIdx.x * (LN_THREADS / 32) + (threadIdx.x >> 5);
    // Whole warps past the end compute on row 0 and write nothing (every lane shuffles).
    const bool ok = row < rows;
    const float* xr = x + (ok ? row : 0) * d;
    float s = 0.0f;
    for (uint32_t j = lane; j < d; j += 32) s += xr[j];
    const float mean = warp_sum(s) / (float)d;
    float q = 0.0f;
    for (uint32_t j = lane; j < d; j += 32) {
        const float c = xr[j] - mean;
        q += c * c;
    }
    const float den = sqrtf(warp_sum(q) / (float)d + eps);
    if (!ok) return;
    float* o = out + row * d;
    for (uint32_t j = lane; j < d; j += 32) o[j] = (xr[j] - mean) / den * w[j] + b[j];
}

#define PROB_THREADS 256

// Sum (op 0) or max (op 1) of `v` over the block; every thread gets the result. `scratch` holds
// PROB_THREADS / 32 floats.
__device__ __forceinline__ float block_reduce(float v, int op, float* scratch) {
    for (int d = 16; d > 0; d >>= 1) {
        const float o = __shfl_down_sync(0xffffffffu, v, d);
        v = op ? fmaxf(v, o) : v + o;
    }
    const uint32_t lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    if (threadIdx.x == 0) {
        float r = scratch[0];
        for (int w = 1; w < PROB_THREADS / 32; ++w) r = op ? fmaxf(r, scratch[w]) : r + scratch[w];
        scratch[0] = r;
    }
    __syncthreads();
    return scratch[0];
}

// Output probabilities, fused: one block per token row r < n_rows of logits ([n_rows, vocab],
// row-major); p = softmax(row), and entries with p >= thr are compacted into `entries` (4 words each:
// prompt, position, token, p bits) as in ci_final_f32 (one atomic on `counter` per row; past `cap`
// counted, not written). Rows r with r % seq_len >= lens[r / seq_len] (padding) are skipped.
extern "C" __global__ void probs_final_f32(const float* __restrict__ logits, uint32_t n_rows,
                                           uint32_t vocab, uint32_t seq_len,
                                           const uint32_t* __restrict__ lens, float thr,
                                           uint32_t* __restrict__ entries, uint64_t cap,
                                           unsigned long long* __restrict__ counter) {
    __shared__ float scratch[PROB_THREADS / 32];
    const uint32_t r = blockIdx.x;
    if (r >= n_rows || r % seq_len >= lens[r / seq_len]) return;
    const float* x = logits + (uint64_t)r * vocab;

    float m = __int_as_float(0xff800000);  // -inf
    for (uint32_t j = threadIdx.x; j < vocab; j += PROB_THREADS) m = fmaxf(m, x[j]);
    m = block_reduce(m, 1, scratch);
    float s = 0.0f;
    for (uint32_t j = threadIdx.x; j < vocab; j += PROB_THREADS) s += expf(x[j] - m);
    s = block_reduce(s, 0, scratch);
    const float inv = 1.0f / s;

    uint32_t active = 0;
    for (uint32_t j = threadIdx.x; j < vocab; j += PROB_THREADS) active += expf(x[j] - m) * inv >= thr;
    uint64_t at = block_reserve(active, counter);
    if (!active) return;
    for (uint32_t j = threadIdx.x; j < vocab && at < cap; j += PROB_THREADS) {
        const float p = expf(x[j] - m) * inv;
        if (p >= thr) {
            uint32_t* e = entries + 4 * at;
            e[0] = r / seq_len;
            e[1] = r % seq_len;
            e[2] = j;
            e[3] = __float_as_uint(p);
            ++at;
        }
    }
}
