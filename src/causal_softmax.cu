// Attention's softmax on a GPU, with the causal mask and the sliding window (linalg.rs's `causal_softmax`),
// in one pass over the scores in the products' type. Between the two products, candle's operators moved 24
// bytes per score in bf16 (a LLaMA-2-7B layer has 32 · 2048² per sequence): the mask added (read and write),
// a widening copy, the f32 softmax (read and write), a narrowing copy. Here a score is read in its type and
// its probability written in it: 4 bytes.
//
// One block per row of a (rows × t) matrix of scores; row r is query position p = r mod t, which sees keys
// lo..=p (lo = p + 1 − window with a sliding window, else 0); the rest of the row is written 0. The row's
// maximum and sum run in f32 over a fixed tree, so a run gives the same bits every time, and each value is the
// host's expression (`exp_neg`, the product by the sum's inverse, compiled without FMA contraction), so only
// the order of the sum differs from linalg.rs's `softmax_row`. bf16 and f16 are widened and rounded (to
// nearest, ties to even) by integer operations, as the `half` crate does, so the host runs this very code in
// its tests (src/cuda_emu.h).

#ifndef THREADS
#define THREADS 256
#endif

// The host's `linalg::exp_neg` (its constants, as written there): exp(x) for x ≤ 0, Cephes' polynomial on a
// range-reduced argument.
__device__ float exp_neg(float x) {
    x = x < -87.0f ? -87.0f : x;
    const float n = (x * 1.44269504088896340736f + 12582912.0f) - 12582912.0f;
    const float r = x - n * 0.6933594f - n * -2.1219444e-4f;
    const float z = r * r;
    const float p =
        ((((1.9875691e-4f * r + 1.3981999e-3f) * r + 8.333452e-3f) * r + 4.1665796e-2f) * r + 1.6666665e-1f) * r +
        5e-1f;
    const float y = p * z + r + 1.0f;
    return __int_as_float(((int)n + 127) << 23) * y;
}

struct F32 {
    typedef float bits;
    __device__ static float load(float x) { return x; }
    __device__ static float store(float x) { return x; }
};

struct BF16 {
    typedef unsigned short bits;
    __device__ static float load(unsigned short h) { return __int_as_float((int)((unsigned)h << 16)); }
    __device__ static unsigned short store(float x) {
        unsigned b = (unsigned)__float_as_int(x);
        if ((b & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((b >> 16) | 0x40u);  // NaN stays NaN
        // Half an ulp of bf16 less one, plus the kept part's lowest bit: ties go to even.
        return (unsigned short)((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
    }
};

struct F16 {
    typedef unsigned short bits;
    __device__ static float load(unsigned short h) {
        const unsigned sign = (unsigned)(h & 0x8000u) << 16;
        unsigned exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
        if (exp == 0x1fu) return __int_as_float((int)(sign | (man ? 0x7fc00000u : 0x7f800000u) | (man << 13)));
        if (exp == 0) {
            if (man == 0) return __int_as_float((int)sign);
            // Subnormal: shift the mantissa up to its leading one.
            exp = 1;
            while (!(man & 0x400u)) {
                man <<= 1;
                exp--;
            }
            man &= 0x3ffu;
            return __int_as_float((int)(sign | ((exp + 112u) << 23) | (man << 13)));
        }
        return __int_as_float((int)(sign | ((exp + 112u) << 23) | (man << 13)));
    }
    __device__ static unsigned short store(float x) {
        const unsigned b = (unsigned)__float_as_int(x);
        const unsigned sign = (b >> 16) & 0x8000u, exp = (b >> 23) & 0xffu, man = b & 0x7fffffu;
        if (exp == 0xffu) return (unsigned short)(sign | 0x7c00u | (man ? 0x200u | (man >> 13) : 0u));
        const int e = (int)exp - 127 + 15;  // f16's biased exponent
        if (e >= 0x1f) return (unsigned short)(sign | 0x7c00u);
        // The kept bits, the first dropped one (round) and whether any below it is set (sticky); a normal f16
        // drops 13 bits of the f32 mantissa, a subnormal more, from the mantissa with its leading one.
        unsigned kept, full, drop;
        if (e <= 0) {
            if (e < -10) return (unsigned short)sign;  // below half the least subnormal
            full = man | 0x800000u;
            drop = (unsigned)(14 - e);
            kept = full >> drop;
        } else {
            full = man;
            drop = 13;
            kept = ((unsigned)e << 10) | (man >> 13);
        }
        const unsigned round = 1u << (drop - 1);
        if ((full & round) && ((full & (round - 1)) || (kept & 1u))) kept++;  // a carry may reach inf: right
        return (unsigned short)(sign | kept);
    }
};

// The block's threads' `v` combined, max or sum, over a fixed tree: every thread gets the result.
template <bool MAX>
__device__ float block_reduce(float v, float* red) {
    red[threadIdx.x] = v;
    __syncthreads();
    for (unsigned s = THREADS / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) red[threadIdx.x] = MAX ? fmaxf(red[threadIdx.x], red[threadIdx.x + s])
                                                    : red[threadIdx.x] + red[threadIdx.x + s];
        __syncthreads();
    }
    const float r = red[0];
    __syncthreads();
    return r;
}

// Row blockIdx.x of `s` (rows × t, the scores, in T) times `scale`, softmax over the keys it sees, into `out`.
template <class T>
__device__ void causal_softmax(const typename T::bits* s, typename T::bits* out, int t, int window, float scale) {
    __shared__ float red[THREADS];
    const unsigned long long base = (unsigned long long)blockIdx.x * t;
    const int p = (int)(blockIdx.x % (unsigned)t);
    const int lo = window > 0 && p + 1 > window ? p + 1 - window : 0;
    const typename T::bits* x = s + base;
    float m = -INFINITY;
    for (int j = lo + (int)threadIdx.x; j <= p; j += THREADS) m = fmaxf(m, T::load(x[j]) * scale);
    m = block_reduce<true>(m, red);
    float sum = 0.0f;
    for (int j = lo + (int)threadIdx.x; j <= p; j += THREADS) sum += exp_neg(T::load(x[j]) * scale - m);
    const float inv = 1.0f / block_reduce<false>(sum, red);
    for (int j = threadIdx.x; j < t; j += THREADS)
        out[base + j] = T::store(j >= lo && j <= p ? exp_neg(T::load(x[j]) * scale - m) * inv : 0.0f);
}

extern "C" __global__ void causal_softmax_f32(const float* s, float* out, int t, int window, float scale) {
    causal_softmax<F32>(s, out, t, window, scale);
}

extern "C" __global__ void causal_softmax_bf16(const unsigned short* s, unsigned short* out, int t, int window,
                                               float scale) {
    causal_softmax<BF16>(s, out, t, window, scale);
}

extern "C" __global__ void causal_softmax_f16(const unsigned short* s, unsigned short* out, int t, int window,
                                              float scale) {
    causal_softmax<F16>(s, out, t, window, scale);
}

// The conversions alone, one thread, for the tests: `n` f16 bits widened and `n` f32 values rounded to bf16
// and to f16.
extern "C" __global__ void convert(const unsigned short* h, const float* f, int n, float* h_wide,
                                   unsigned short* to_bf16, unsigned short* to_f16) {
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    for (int i = 0; i < n; i++) {
        h_wide[i] = F16::load(h[i]);
        to_bf16[i] = BF16::store(f[i]);
        to_f16[i] = F16::store(f[i]);
    }
}
