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
