// The swap search of swap.rs (`Row::improve`) on a GPU. On the host the search costs about 4 m n² flops per
// round, memory-bound on the rows of G* it reads (seconds per 7B operator on 16 cores), while the GEMMs around
// it run on the GPU in a fraction of that; here it runs where G* already is.
//
// One thread block per row, every loop over the row's n weights spread over the block's threads and every
// reduction exact (maxima and minima, ties to the lowest index), so that, compiled without FMA contraction,
// each decision comes from the same f32 expressions as the host's and the two give the same bits. Tests run
// this file on the host (src/prune/cuda_emu.h, one OS thread per CUDA thread) against the host's search.
//
// Layout: g is n × n with row j = column j of G* (as the host reads it), w, r = w G* − c and fr (1 where
// pruned, 0 where kept) are m × n row-major and updated in place; made[i] and flops[i] are row i's swaps and
// floating-point operations, counted as the host counts them.

#ifndef THREADS
#define THREADS 256
#endif
#define DROPS 8

// `drop − add` where it lowers the error beyond the rounding of its own terms, else 0 (swap.rs's `significant`).
__device__ float significant(float drop, float add) {
    float delta = drop - add;
    return delta < -1e-5f * fmaxf(fabsf(drop), add) ? delta : 0.0f;
}

// (cost, j) before (cost', j'): by cost, then by index.
__device__ bool before(float c, int j, float c2, int j2) { return c < c2 || (c == c2 && j < j2); }

// Merge the sorted lists b (nb entries) into a (na entries), keeping the DROPS first; returns the new count.
__device__ int merge(float* ac, int* aj, int na, const float* bc, const int* bj, int nb) {
    float c[DROPS];
    int j[DROPS];
    int x = 0, y = 0, t = 0;
    while (t < DROPS && (x < na || y < nb)) {
        if (y >= nb || (x < na && before(ac[x], aj[x], bc[y], bj[y]))) {
            c[t] = ac[x];
            j[t++] = aj[x++];
        } else {
            c[t] = bc[y];
            j[t++] = bj[y++];
        }
    }
    for (int q = 0; q < t; q++) {
        ac[q] = c[q];
        aj[q] = j[q];
    }
    return t;
}

// r += t G*_k − w_j G*_j over the row, then w_j = 0, w_k = t and the mask follows (swap.rs's `Row::swap`).
__device__ void swap_in(const float* g, float* w, float* r, float* fr, int n, int j, int k, float t, float wj) {
    const float* gj = g + (unsigned long long)j * n;
    const float* gk = g + (unsigned long long)k * n;
    for (int q = threadIdx.x; q < n; q += THREADS) r[q] += t * gk[q] - wj * gj[q];
    __syncthreads();
    if (threadIdx.x == 0) {
        w[j] = 0.0f;
        w[k] = t;
        fr[j] = 1.0f;
        fr[k] = 0.0f;
    }
    __syncthreads();
}

extern "C" __global__ void swap_search(const float* g, const float* gd, const float* inv_gd, float* w_all,
                                       float* r_all, float* fr_all, int m, int n, int group, int cap, int* made_out,
                                       double* flops_out) {
    __shared__ float s_c[THREADS * DROPS];
    __shared__ int s_j[THREADS * DROPS];
    __shared__ int s_n[THREADS];
    __shared__ float s_v[THREADS * DROPS];
    __shared__ int s_k[THREADS];
    __shared__ float s_t[THREADS];
    __shared__ int s_go, s_bj, s_bk;
    __shared__ float s_bt, s_wj;

    const int i = blockIdx.x, tid = threadIdx.x;
    if (i >= m) return;
    float* w = w_all + (unsigned long long)i * n;
    float* r = r_all + (unsigned long long)i * n;
    float* fr = fr_all + (unsigned long long)i * n;
    int made = 0;
    double flops = 0.0;

    if (group > 0) {
        // N:M: sweeps over the groups until one changes nothing. A group's state (its weights, residuals, mask,
        // G*'s diagonal and its group × group block) is loaded by many threads at once into shared memory; its
        // choice, a few pairs, is thread 0's; all threads apply it. A group whose block does not fit in s_v
        // (M above 45) is refused with made = -1: the host searches those.
        if (group * group > THREADS * DROPS) {
            if (tid == 0) made_out[i] = -1;
            return;
        }
        float* s_gw = s_c;
        float* s_gr = s_c + group;
        float* s_gf = s_c + 2 * group;
        float* s_gd = s_c + 3 * group;
        float* s_gi = s_c + 4 * group;
        float* s_gg = s_v;
        for (int sweep = 0; sweep < cap; sweep++) {
            int made_before = made;
            for (int g0 = 0; g0 < n; g0 += group) {
                const int len = min(group, n - g0);
                for (int q = tid; q < len; q += THREADS) {
                    s_gw[q] = w[g0 + q];
                    s_gr[q] = r[g0 + q];
                    s_gf[q] = fr[g0 + q];
                    s_gd[q] = gd[g0 + q];
                    s_gi[q] = inv_gd[g0 + q];
                }
                for (int q = tid; q < len * len; q += THREADS)
                    s_gg[q] = g[(unsigned long long)(g0 + q / len) * n + g0 + q % len];
                __syncthreads();
                if (tid == 0) {
                    int bj = -1, bk = -1;
                    float bd = 0.0f, bt = 0.0f;
                    for (int j = 0; j < len; j++) {
                        if (s_gf[j] != 0.0f) continue;
                        float wj = s_gw[j];
                        float drop = wj * wj * s_gd[j] - 2.0f * wj * s_gr[j];
                        for (int k = 0; k < len; k++) {
                            if (s_gf[k] == 0.0f) continue;
                            flops += 10.0;
                            float a = s_gr[k] - wj * s_gg[j * len + k];
                            float d = significant(drop, a * a * s_gi[k]);
                            if (d < bd) {
                                bd = d;
                                bj = j;
                                bk = k;
                                bt = -a * s_gi[k];
                            }
                        }
                    }
                    s_go = bj >= 0;
                    s_bj = g0 + bj;
                    s_bk = g0 + bk;
                    s_bt = bt;
                    if (bj >= 0) {
                        s_wj = s_gw[bj];
                        flops += 4.0 * n;
                    }
                }
                // Nothing is written to the group's shared state or the decision again before the next
                // group's loads are done, a barrier later: every thread has read them by then.
                __syncthreads();
                if (s_go) {
                    swap_in(g, w, r, fr, n, s_bj, s_bk, s_bt, s_wj);
                    made++;
                }
            }
            if (made == made_before) break;
        }
    } else {
        // Unstructured: the DROPS cheapest drops, each against every pruned weight; the best swap while one
        // lowers the error, at most `cap`.
        int kept = 0;
        for (int q = tid; q < n; q += THREADS) kept += fr[q] == 0.0f;
        s_n[tid] = kept;
        __syncthreads();
        for (int s = THREADS / 2; s > 0; s >>= 1) {
            if (tid < s) s_n[tid] += s_n[tid + s];
            __syncthreads();
        }
        kept = s_n[0];
        __syncthreads();
        while (made < cap) {
            // The cheapest drops: each thread's own, then merged pairwise.
            float c[DROPS];
            int jj[DROPS];
            int cnt = 0;
            for (int q = tid; q < n; q += THREADS) {
                if (fr[q] != 0.0f) continue;
                float wq = w[q];
                float cost = wq * wq * gd[q] - 2.0f * wq * r[q];
                if (cnt == DROPS && !before(cost, q, c[DROPS - 1], jj[DROPS - 1])) continue;
                int p = cnt < DROPS ? cnt++ : DROPS - 1;
                while (p > 0 && before(cost, q, c[p - 1], jj[p - 1])) {
                    c[p] = c[p - 1];
                    jj[p] = jj[p - 1];
                    p--;
                }
                c[p] = cost;
                jj[p] = q;
            }
            for (int q = 0; q < cnt; q++) {
                s_c[tid * DROPS + q] = c[q];
                s_j[tid * DROPS + q] = jj[q];
            }
            s_n[tid] = cnt;
            __syncthreads();
            for (int s = THREADS / 2; s > 0; s >>= 1) {
                if (tid < s)
                    s_n[tid] = merge(s_c + tid * DROPS, s_j + tid * DROPS, s_n[tid], s_c + (tid + s) * DROPS,
                                     s_j + (tid + s) * DROPS, s_n[tid + s]);
                __syncthreads();
            }
            const int few = s_n[0];
            if (tid == 0) flops += 4.0 * kept;
            if (few == 0) break;

            // Each drop's best add, max over the pruned k of (r_k − w_j G*_jk)² / G*_kk, in one pass.
            float wd[DROPS], mx[DROPS];
            const float* gr[DROPS];
            for (int q = 0; q < few; q++) {
                wd[q] = w[s_j[q]];
                gr[q] = g + (unsigned long long)s_j[q] * n;
                mx[q] = 0.0f;
            }
            for (int k = tid; k < n; k += THREADS) {
                float f = fr[k], rk = r[k], ig = inv_gd[k];
                for (int q = 0; q < few; q++) {
                    float a = rk - wd[q] * gr[q][k];
                    mx[q] = fmaxf(mx[q], f * a * a * ig);
                }
            }
            for (int q = 0; q < few; q++) s_v[q * THREADS + tid] = mx[q];
            __syncthreads();
            for (int s = THREADS / 2; s > 0; s >>= 1) {
                if (tid < s)
                    for (int q = 0; q < few; q++)
                        s_v[q * THREADS + tid] = fmaxf(s_v[q * THREADS + tid], s_v[q * THREADS + tid + s]);
                __syncthreads();
            }
            if (tid == 0) {
                flops += 6.0 * n * few;
                int bq = 0;
                float bd = significant(s_c[0], s_v[0]);
                for (int q = 1; q < few; q++) {
                    float d = significant(s_c[q], s_v[q * THREADS]);
                    if (d < bd) {
                        bd = d;
                        bq = q;
                    }
                }
                s_go = bd < 0.0f;
                s_bj = s_j[bq];
                s_bt = s_c[bq];
                if (bd < 0.0f) flops += 10.0 * (n - kept);
            }
            __syncthreads();
            if (!s_go) break;

            // That drop's best add: the lowest k with the lowest change.
            const int j = s_bj;
            const float drop = s_bt, wj = w[j];
            const float* gj = g + (unsigned long long)j * n;
            float ld = 0.0f, lt = 0.0f;
            int lk = -1;
            for (int k = tid; k < n; k += THREADS) {
                if (fr[k] == 0.0f) continue;
                float a = r[k] - wj * gj[k];
                float d = significant(drop, a * a * inv_gd[k]);
                if (d < ld) {
                    ld = d;
                    lk = k;
                    lt = -a * inv_gd[k];
                }
            }
            s_v[tid] = ld;
            s_k[tid] = lk;
            s_t[tid] = lt;
            __syncthreads();
            for (int s = THREADS / 2; s > 0; s >>= 1) {
                if (tid < s) {
                    float d2 = s_v[tid + s];
                    int k2 = s_k[tid + s];
                    if (k2 >= 0 && (d2 < s_v[tid] || (d2 == s_v[tid] && (s_k[tid] < 0 || k2 < s_k[tid])))) {
                        s_v[tid] = d2;
                        s_k[tid] = k2;
                        s_t[tid] = s_t[tid + s];
                    }
                }
                __syncthreads();
            }
            const int k = s_k[0];
            const float t = s_t[0];
            __syncthreads();
            if (k < 0) break;
            if (tid == 0) flops += 4.0 * n;
            swap_in(g, w, r, fr, n, j, k, t, wj);
            made++;
        }
    }
    if (tid == 0) {
        made_out[i] = made;
        flops_out[i] = flops;
    }
}
