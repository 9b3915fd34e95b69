// Fused kernels for the batched CI pass (see mod.rs). The matmuls stay in cuBLAS; these fuse what
// comes between them and what comes after the last one, so that only active entries reach the host.
#include <stdint.h>

// Exact (erf) GELU, as the CI networks' hidden layers use it.
__device__ __forceinline__ float gelu_erf(float v) {
    return 0.5f * v * (1.0f + erff(v * 0.70710678118654752440f));
}

// out[r, j] = gelu_erf(x[r, j] + bias[(r / group_rows) * h + j]) for r < rows, j < h (all row-major).
// group_rows = rows for one bias row (shared_mlp); = N for a bias per component ([C, 1, h]) over
// [C, N, h] (vector_mlp, mlp).
extern "C" __global__ void bias_gelu_f32(const float* __restrict__ x, const float* __restrict__ bias,
                                         float* __restrict__ out, uint32_t rows, uint32_t h,
                                         uint32_t group_rows) {
    const uint64_t n = (uint64_t)rows * h;
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (uint64_t)gridDim.x * blockDim.x) {
        const uint32_t r = (uint32_t)(i / h), j = (uint32_t)(i % h);
        out[i] = gelu_erf(x[i] + bias[(uint64_t)(r / group_rows) * h + j]);
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
#define FINAL_ROWS 128

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
    uint32_t fire = 0, active = 0;
    if (col_ok) {
        for (uint32_t r = r0; r < r1; ++r) {
            const float ci =
                lower_ci(z[(uint64_t)r * row_stride + (uint64_t)c * col_stride] + b, kind);
            if (write_ci) ci_out[(uint64_t)r * n_comp + c] = ci;
            if (r % seq_len >= lens[r / seq_len]) continue;
            sum += ci;
            fire += ci > fire_thr;
            active += ci >= active_thr;
        }
        if (r1 > r0) {
            atomicAdd(&sums[c], sum);
            if (fire) atomicAdd(&fires[c], fire);
        }
    }

    uint64_t at = block_reserve(active, counter);
    if (!active) return;
    for (uint32_t r = r0; r < r1 && at < cap; ++r) {
        if (r % seq_len >= lens[r / seq_len]) continue;
        const float ci = lower_ci(z[(uint64_t)r * row_stride + (uint64_t)c * col_stride] + b, kind);
        if (ci >= active_thr) {
            uint32_t* e = entries + 4 * at;
            e[0] = r / seq_len;
            e[1] = r % seq_len;
            e[2] = col0 + c;
            e[3] = __float_as_uint(ci);
            ++at;
        }
    }
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
