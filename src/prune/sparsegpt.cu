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

// Threads of sparsegpt_block_mask: sparsegpt.rs's `MASK_THREADS` says the same.
#ifndef MASK_THREADS
#define MASK_THREADS 1024
#endif
#define MASK_WARPS (MASK_THREADS / 32)

// Rust's f32::total_cmp order of the score w² / dd (dd = U_jj², the host's `block_mask` expression), as an
// unsigned key. The scores are not NaN: U_jj > 0 (a factor of a damped H).
__device__ unsigned score_key(float w, float dd) {
    return (unsigned)total_key(w * w / dd) ^ 0x80000000u;
}

// The `k` lowest scores of the whole block (0 < k ≤ rows · count), marked in `mask` (rows × count, row-major,
// 1 = prune), ties to the lower position in column-major order: the host's `mask::mask_per_matrix`.
//
// One thread block. Each thread takes a column (every MASK_THREADS-th one where the block is wider) and a
// stretch of its rows, so a warp reads consecutive columns of a row and (column, stretch) orders as column-major
// positions do. A radix select on the keys, 8 bits a pass (a histogram per warp, summed per bin), finds the k-th
// lowest key; one pass marks the keys below it. Only where that key is tied with keys that stay does a count of
// the ties per (column, stretch), summed over the positions before, settle which go. No order of the threads'
// work changes the result.
extern "C" __global__ void __launch_bounds__(MASK_THREADS)
    sparsegpt_block_mask(const float* wb, const float* u, int rows, int count, unsigned k, unsigned char* mask) {
    __shared__ unsigned hist[MASK_WARPS][256];
    __shared__ unsigned ties[MAX_COLS];
    // The k-th lowest key's bits found so far, its rank among the keys that share them, and whether every key
    // equal to it is among the k.
    __shared__ unsigned prefix, want, all_equal;
    const unsigned t = threadIdx.x, cols = count, step = min(cols, (unsigned)MASK_THREADS);
    const unsigned groups = MASK_THREADS / step, g = t / cols, first = t % cols;
    const unsigned per = (rows + groups - 1) / groups, r0 = min((unsigned)rows, g * per);
    const unsigned r1 = g < groups ? min((unsigned)rows, r0 + per) : r0;
    unsigned* mine = hist[t / 32];
    if (t == 0) {
        prefix = 0;
        want = k;
    }
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (unsigned b = t; b < MASK_WARPS * 256; b += MASK_THREADS) hist[b / 256][b % 256] = 0;
        __syncthreads();
        const unsigned high = shift == 24 ? 0u : 0xFFFFFFFFu << (shift + 8), known = prefix & high;
        for (unsigned c = first; c < cols; c += step) {
            const float d = u[(unsigned long long)c * cols + c], dd = d * d;
            for (unsigned r = r0; r < r1; r++) {
                const unsigned key = score_key(wb[(unsigned long long)r * cols + c], dd);
                if ((key & high) == known) atomicAdd(&mine[(key >> shift) & 255u], 1u);
            }
        }
        __syncthreads();
        for (unsigned b = t; b < 256; b += MASK_THREADS) {
            unsigned sum = 0;
            for (int w = 0; w < MASK_WARPS; w++) sum += hist[w][b];
            hist[0][b] = sum;
        }
        __syncthreads();
        if (t == 0) {
            unsigned below = 0, b = 0;
            while (b < 255 && below + hist[0][b] < want) below += hist[0][b++];
            want -= below;
            prefix |= b << shift;
            all_equal = want == hist[0][b];
        }
        __syncthreads();
    }
    const unsigned kth = prefix, quota = want;
    if (all_equal) {
        for (unsigned c = first; c < cols; c += step) {
            const float d = u[(unsigned long long)c * cols + c], dd = d * d;
            for (unsigned r = r0; r < r1; r++) {
                const unsigned long long e = (unsigned long long)r * cols + c;
                mask[e] = score_key(wb[e], dd) <= kth;
            }
        }
        return;
    }
    // Ties to settle: the keys equal to the k-th in each (column, stretch), in column-major order (slot c ·
    // groups + g), the counts before each slot, then the first `quota` of them by position.
    for (unsigned c = first; c < cols; c += step) {
        const float d = u[(unsigned long long)c * cols + c], dd = d * d;
        unsigned equal = 0;
        for (unsigned r = r0; r < r1; r++) equal += score_key(wb[(unsigned long long)r * cols + c], dd) == kth;
        if (g < groups) ties[c * groups + g] = equal;
    }
    __syncthreads();
    if (t == 0)
        for (unsigned i = 0, before = 0; i < cols * groups; i++) {
            const unsigned here = ties[i];
            ties[i] = before;
            before += here;
        }
    __syncthreads();
    for (unsigned c = first; c < cols; c += step) {
        if (g >= groups) break;
        const float d = u[(unsigned long long)c * cols + c], dd = d * d;
        unsigned rank = ties[c * groups + g];
        for (unsigned r = r0; r < r1; r++) {
            const unsigned long long e = (unsigned long long)r * cols + c;
            const unsigned key = score_key(wb[e], dd);
            mask[e] = key < kth || (key == kth && rank++ < quota);
        }
    }
}
