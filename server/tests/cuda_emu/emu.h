// Just enough of CUDA to run server/src/cuda/ci_kernels.cu on the CPU, unchanged, for testing the
// kernels' logic (indexing, in-block scans and reductions, atomics, compaction, buffer overflow)
// where no GPU is at hand. Every CUDA thread of a block is an OS thread; a block's threads meet at
// a std::barrier for __syncthreads; blocks run one after another; atomics take one global lock.
// Warp shuffles are emulated through a block-wide buffer, which is exact where every thread of the
// block calls them together (as these kernels do).
#pragma once

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

struct emu_dim3 {
    uint32_t x = 1, y = 1, z = 1;
};
inline thread_local emu_dim3 threadIdx, blockIdx;
inline emu_dim3 blockDim, gridDim;
inline std::barrier<>* emu_block_barrier = nullptr;
inline std::mutex emu_atomic_lock;

#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
// One copy for the whole launch: blocks run one at a time, so it is the block's shared memory.
#define __shared__ static

inline void __syncthreads() { emu_block_barrier->arrive_and_wait(); }

template <class T>
T atomicAdd(T* p, T v) {
    std::lock_guard<std::mutex> g(emu_atomic_lock);
    T old = *p;
    *p = old + v;
    return old;
}

inline uint32_t __float_as_uint(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}

inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}

using std::max;
using std::min;

inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }
inline int __ffsll(long long v) { return __builtin_ffsll(v); }

struct float4 {
    float x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

template <class T>
T emu_shfl(T v, int offset) {
    static T buf[1024];
    const uint32_t t = threadIdx.x, lane = t & 31;
    __syncthreads();
    buf[t] = v;
    __syncthreads();
    const int src = (int)lane + offset;
    return src >= 0 && src < 32 ? buf[t + offset] : v;
}

template <class T>
T __shfl_up_sync(unsigned, T v, int d) {
    return emu_shfl(v, -d);
}

template <class T>
T __shfl_down_sync(unsigned, T v, int d) {
    return emu_shfl(v, d);
}

// Lane `lane ^ mask` of the caller's warp.
template <class T>
T __shfl_xor_sync(unsigned, T v, int mask) {
    static T buf[1024];
    const uint32_t t = threadIdx.x;
    __syncthreads();
    buf[t] = v;
    __syncthreads();
    return buf[(t & ~31u) | ((t & 31u) ^ (uint32_t)mask)];
}

// Runs `kernel()` as a grid of (gx, gy) blocks of `threads` threads.
template <class F>
void emu_launch(uint32_t gx, uint32_t gy, uint32_t threads, F kernel) {
    gridDim = {gx, gy, 1};
    blockDim = {threads, 1, 1};
    for (uint32_t by = 0; by < gy; ++by) {
        for (uint32_t bx = 0; bx < gx; ++bx) {
            std::barrier<> bar((std::ptrdiff_t)threads);
            emu_block_barrier = &bar;
            std::vector<std::thread> pool;
            for (uint32_t t = 0; t < threads; ++t) {
                pool.emplace_back([&, t] {
                    threadIdx = {t, 0, 0};
                    blockIdx = {bx, by, 0};
                    kernel();
                    // An exited thread no longer holds the others at __syncthreads.
                    bar.arrive_and_drop();
                });
            }
            for (auto& th : pool) th.join();
        }
    }
}
