// SparseGPT's in-block sweep (sparsegpt.rs's `sweep_rows`) on a GPU. On the host it is the `m n B` part of the
// method, about 2.6e10 multiply-adds per LLaMA-2-7B layer at B = 128 on one core's loop per row chunk, while the
// GPU waits for each block's errors before its lazy update; here the block never leaves the GPU.
//
// Rows are independent within a block (a row's updates read only that row and U), so one thread block sweeps
// one row: the row in shared memory, column by column, each column's error spread over the later columns by
// the block's threads. Compiled without FMA contraction, each value comes from the host's f32 expressions in
// the host's order, so the two give the same bits. Tests run this file on the host (src/cuda_emu.h, one OS
// thread per CUDA thread) against the host's sweep.
//
// Layout, all row-major: wb is the block (rows × count), u the block of U (count × count), mask the block's
// unstructured mask (rows × count, 1 = prune; unused for N:M, where nm_m > 0 and each group of nm_m columns
// gets its nm_n lowest scores w² / U_jj² as the sweep reaches it). Outputs: q, the swept block, and err, the
// scaled errors (w − q) / U_ii, both rows × count. Blocks wider than MAX_COLS are the host's.
//
// An unstructured block's mask spans all its rows, so it is chosen before the sweep, by sparsegpt_block_mask
// (the host's `block_mask`, to the bit): on the GPU, so that no block waits for a round trip to the host.

#ifndef THREADS
#define THREADS 128
#endif
#define MAX_COLS 1024

// Rust's f32::total_cmp as a signed key: the bits, with a negative number's magnitude bits flipped.
__device__ int total_key(float x) {
    int b = __float_as_int(x);
    return b ^ (int)(((unsigned)(b >> 31)) >> 1);
}

// Mark the `keep_low` lowest scores of columns [i, i + width) of the row (ties: the lower column), as the
// host's `mask::mask_nm` with `lowest_k` does. Thread 0 only; width ≤ nm_m ≤ MAX_COLS.
__device__ void choose_group(const float* w, unsigned char* pruned, const float* u, int count, int i, int width,
                             int keep_low) {
    for (int c = 0; c < width; c++) {
        float dc = u[(unsigned long long)(i + c) * count + i + c];
        int kc = total_key(w[i + c] * w[i + c] / (dc * dc));
        int rank = 0;
        for (int o = 0; o < width; o++) {
            float dd = u[(unsigned long long)(i + o) * count + i + o];
            int ko = total_key(w[i + o] * w[i + o] / (dd * dd));
            rank += ko < kc || (ko == kc && o < c);
        }
        if (rank < keep_low) pruned[i + c] = 1;
    }
}

extern "C" __global__ void sparsegpt_sweep(const float* wb, const float* u, const unsigned char* mask, int rows,
                                           int count, int nm_n, int nm_m, float* q, float* err) {
    __shared__ float w[MAX_COLS];
    __shared__ unsigned char pruned[MAX_COLS];
    __shared__ float e;
    const unsigned long long row = (unsigned long long)blockIdx.x * count;
    for (int c = threadIdx.x; c < count; c += THREADS) {
        w[c] = wb[row + c];
        pruned[c] = nm_m > 0 ? 0 : mask[row + c];
    }
    __syncthreads();
    for (int i = 0; i < count; i++) {
        if (threadIdx.x == 0) {
            if (nm_m > 0 && i % nm_m == 0) {
                int width = min(nm_m, count - i);
                choose_group(w, pruned, u, count, i, width, min(nm_n, width));
            }
            float wv = w[i];
            float qv = pruned[i] ? 0.0f : wv;
            e = (wv - qv) / u[(unsigned long long)i * count + i];
            err[row + i] = e;
            w[i] = qv;
        }
        __syncthreads();
        const float ei = e;
        const float* ui = u + (unsigned long long)i * count;
        if (ei != 0.0f)
            for (int c = i + 1 + threadIdx.x; c < count; c += THREADS) w[c] -= ei * ui[c];
        __syncthreads();
    }
    for (int c = threadIdx.x; c < count; c += THREADS) q[row + c] = w[c];
}

#ifndef MASK_THREADS
#define MASK_THREADS 1024
#endif

// The `k` lowest scores w² / U_jj² of the whole block (0 < k ≤ rows · count), marked in `mask` (rows × count,
// row-major, 1 = prune), ties to the lower position in column-major order: the host's `mask::mask_per_matrix`.
// One thread block: a radix select on the scores' `total_cmp` keys, 8 bits a pass (four passes over the block,
// which stays in L2 between them), then one pass that marks; only where the k-th lowest score is tied with
// scores that stay does a count of the ties, per thread over a stretch of column-major positions, settle which
// go. No order of the threads' work changes the result.
extern "C" __global__ void sparsegpt_block_mask(const float* wb, const float* u, int rows, int count, unsigned k,
                                                unsigned char* mask) {
    __shared__ float dd[MAX_COLS];
    __shared__ unsigned hist[256];
    __shared__ unsigned ties[MASK_THREADS];
    // The k-th lowest key's bits found so far, its rank among the keys that share them, and whether every key
    // equal to it is among the k.
    __shared__ unsigned prefix, want, all_equal;
    const unsigned n = (unsigned)rows * (unsigned)count, t = threadIdx.x;
    for (int c = t; c < count; c += MASK_THREADS) {
        const float d = u[(unsigned long long)c * count + c];
        dd[c] = d * d;
    }
    if (t == 0) {
        prefix = 0;
        want = k;
    }
    __syncthreads();
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int b = t; b < 256; b += MASK_THREADS) hist[b] = 0;
        __syncthreads();
        const unsigned high = shift == 24 ? 0u : 0xFFFFFFFFu << (shift + 8), known = prefix & high;
        for (unsigned e = t; e < n; e += MASK_THREADS) {
            const float w = wb[e];
            const unsigned key = (unsigned)total_key(w * w / dd[e % count]) ^ 0x80000000u;
            if ((key & high) == known) atomicAdd(&hist[(key >> shift) & 255u], 1u);
        }
        __syncthreads();
        if (t == 0) {
            unsigned below = 0, b = 0;
            while (b < 255 && below + hist[b] < want) below += hist[b++];
            want -= below;
            prefix |= b << shift;
            all_equal = want == hist[b];
        }
        __syncthreads();
    }
    const unsigned kth = prefix, quota = want;
    if (all_equal) {
        for (unsigned e = t; e < n; e += MASK_THREADS) {
            const float w = wb[e];
            mask[e] = ((unsigned)total_key(w * w / dd[e % count]) ^ 0x80000000u) <= kth;
        }
        return;
    }
    // Ties to settle: each thread's stretch of column-major positions p = c · rows + r, its count of keys equal
    // to the k-th, the counts before it, then the first `quota` of them by position.
    const unsigned chunk = (n + MASK_THREADS - 1) / MASK_THREADS, p0 = min(n, t * chunk), p1 = min(n, p0 + chunk);
    unsigned equal = 0;
    for (unsigned p = p0; p < p1; p++) {
        const unsigned e = (p % rows) * count + p / rows;
        const float w = wb[e];
        equal += ((unsigned)total_key(w * w / dd[p / rows]) ^ 0x80000000u) == kth;
    }
    ties[t] = equal;
    __syncthreads();
    if (t == 0)
        for (unsigned i = 0, before = 0; i < MASK_THREADS; i++) {
            const unsigned here = ties[i];
            ties[i] = before;
            before += here;
        }
    __syncthreads();
    unsigned rank = ties[t];
    for (unsigned p = p0; p < p1; p++) {
        const unsigned e = (p % rows) * count + p / rows;
        const float w = wb[e];
        const unsigned key = (unsigned)total_key(w * w / dd[p / rows]) ^ 0x80000000u;
        mask[e] = key < kth || (key == kth && rank++ < quota);
    }
}
