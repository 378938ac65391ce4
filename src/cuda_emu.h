// The subset of CUDA C that the project's kernels use, on the host, so that their tests run where there is no
// GPU: each block's threads are OS threads meeting at a barrier for __syncthreads(), blocks run one after
// another (so a function-level static is the block's shared memory), and arithmetic is the host's IEEE f32,
// built like the GPU's code without FMA contraction (-ffp-contract=off here, fmad=false there).
// Kernels may use threadIdx.x, blockIdx.x, __syncthreads(), __shared__ arrays and scalars, min, fmaxf, fabsf,
// __float_as_int, __int_as_float, INFINITY, atomicAdd on unsigned, __launch_bounds__ (ignored).
#pragma once
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <thread>
#include <vector>

struct EmuDim {
    unsigned x = 0, y = 0, z = 0;
};
inline thread_local EmuDim threadIdx;
inline EmuDim blockIdx;
inline std::barrier<>* emu_barrier = nullptr;
using std::min;

#define __global__
#define __launch_bounds__(threads)
#define __device__
#define __shared__ static
#define __syncthreads() emu_barrier->arrive_and_wait()

inline int __float_as_int(float x) {
    int i;
    std::memcpy(&i, &x, sizeof i);
    return i;
}

inline float __int_as_float(int i) {
    float x;
    std::memcpy(&x, &i, sizeof x);
    return x;
}

inline unsigned atomicAdd(unsigned* at, unsigned v) {
    return std::atomic_ref<unsigned>(*at).fetch_add(v);
}

// Run `kernel(args...)` on a grid of `grid` blocks of `block` threads.
template <class... A, class... B>
void emu_launch(unsigned grid, unsigned block, void (*kernel)(A...), B... args) {
    for (unsigned b = 0; b < grid; b++) {
        blockIdx.x = b;
        std::barrier<> bar(block);
        emu_barrier = &bar;
        std::vector<std::thread> threads;
        for (unsigned t = 0; t < block; t++)
            threads.emplace_back([=] {
                threadIdx.x = t;
                kernel(args...);
            });
        for (auto& t : threads) t.join();
    }
}

// The tests' harnesses: `len` values of T from `f` (little-endian, as the tests write them), and back.
template <class T>
std::vector<T> emu_read(FILE* f, size_t len) {
    std::vector<T> v(len);
    if (fread(v.data(), sizeof(T), len, f) != len) throw "short input";
    return v;
}

template <class T>
void emu_write(FILE* f, const std::vector<T>& v) {
    fwrite(v.data(), sizeof(T), v.size(), f);
}
