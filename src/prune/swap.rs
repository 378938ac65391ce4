//! Mask refinement by swaps (issue 16): after FISTAPruner's re-fit, trade a kept weight for a pruned one in
//! the same row (unstructured: the row keeps its count of zeros) or the same N:M group, wherever that lowers
//! the row's error.
//!
//! The rows of an operator are independent least-squares problems (`e_i = w_i G* w_iᵀ − 2 c_i w_iᵀ + k_i`). With
//! `r = w G* − c` (half the gradient), dropping kept `j` and giving pruned `k` its best value `t`, the rest of
//! the row fixed, changes the error by exactly
//! `Δ = w_j² G*_jj − 2 w_j r_j − a² / G*_kk`, `a = r_k − w_j G*_jk`, `t = −a / G*_kk`,
//! and moves `r` by `−w_j G*_j + t G*_k` (two rows of `G*`). Each round, every row takes the best such swap
//! (over its cheapest drops, each against every pruned weight in reach) while one lowers its error, the error
//! known exactly all along; then all rows are re-fitted on their new supports (masked CG), which can only
//! lower it further. A row keeps the round only where its error went down: never worse than its start.
//!
//! The search reads about eleven rows of `G*` per swap (some `4 m n²` flops a round, memory-bound): on a GPU
//! it runs there, in swap.cu, one thread block per row, making the host's decisions to the bit.

use faer::Mat;
use rayon::prelude::*;
use serde::Serialize;

use super::mask::{Mask, Pattern};
use super::side::{Searched, Side};

/// One round: swaps made, the search's floating-point operations (the re-fit's GEMMs apart), rows whose error
/// went down (kept), and the relative error after it.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct SwapRound {
    pub proposed: usize,
    pub search_flops: f64,
    pub rows_kept: usize,
    pub error: f64,
}

/// Each row's `w_i (w_i G*)ᵀ − 2 c_i w_iᵀ`: its error less the constant `k_i`, in f64.
pub(super) fn row_errors(w: &Mat<f32>, wg: &Mat<f32>, c: &Mat<f32>) -> Vec<f64> {
    let mut e = vec![0f64; w.nrows()];
    for j in 0..w.ncols() {
        let (wc, gc, cc) = (w.col_as_slice(j), wg.col_as_slice(j), c.col_as_slice(j));
        for (i, ei) in e.iter_mut().enumerate() {
            *ei += (wc[i] * (gc[i] - 2.0 * cc[i])) as f64;
        }
    }
    e
}

/// Drops tried per swap in an unstructured row: the cheapest ones alone, each against every pruned weight.
const DROPS: usize = 8;

/// One row's working state: weights, `r = w G* − c`, and which weights are pruned (`free`: 1 where pruned,
/// 0 where kept, so the unstructured search over every pruned weight runs without branches).
struct Row<'a> {
    g: &'a Mat<f32>,
    gd: &'a [f32],
    inv_gd: &'a [f32],
    w: Vec<f32>,
    r: Vec<f32>,
    free: Vec<f32>,
    /// Floating-point operations spent so far.
    flops: f64,
}

impl<'a> Row<'a> {
    /// Row `i` of `w` (with `wg = w G*`), its mask taken from `pruned`.
    #[allow(clippy::too_many_arguments)]
    fn of(
        (g, c): (&'a Mat<f32>, &Mat<f32>),
        gd: &'a [f32],
        inv_gd: &'a [f32],
        w: &Mat<f32>,
        wg: &Mat<f32>,
        pruned: &Mask,
        i: usize,
    ) -> Self {
        let n = w.ncols();
        Row {
            g,
            gd,
            inv_gd,
            w: (0..n).map(|j| w[(i, j)]).collect(),
            r: (0..n).map(|j| wg[(i, j)] - c[(i, j)]).collect(),
            free: (0..n).map(|j| if pruned[(i, j)] { 1.0 } else { 0.0 }).collect(),
            flops: 0.0,
        }
    }

    fn pruned(&self, j: usize) -> bool {
        self.free[j] != 0.0
    }

    /// The error's rise from dropping kept `j`, the rest fixed.
    fn drop_cost(&self, j: usize) -> f32 {
        let wj = self.w[j];
        wj * wj * self.gd[j] - 2.0 * wj * self.r[j]
    }

    /// The exact change of the error, and `k`'s new value, for dropping kept `j` and adding pruned `k`.
    /// `drop` is `j`'s [`Row::drop_cost`], the same for every `k`.
    fn change(&self, drop: f32, j: usize, k: usize) -> (f32, f32) {
        let a = self.r[k] - self.w[j] * self.g[(k, j)];
        (significant(drop, a * a * self.inv_gd[k]), -a * self.inv_gd[k])
    }

    /// The largest gain `a_k² / G*_kk` over every pruned `k` once kept `j` is dropped (`G*` is symmetric:
    /// column `j` is row `j`, contiguous).
    fn best_add(&mut self, j: usize) -> f32 {
        self.flops += 6.0 * self.r.len() as f64;
        let wj = self.w[j];
        let gj = self.g.col_as_slice(j);
        let mut best = 0f32;
        for (((&r, &g), &f), &ig) in self.r.iter().zip(gj).zip(&self.free).zip(self.inv_gd) {
            let a = r - wj * g;
            best = best.max(f * a * a * ig);
        }
        best
    }

    /// The best swap among drops `js` and the pruned weights in `ks`, if it lowers the error.
    fn best(&mut self, js: &[usize], ks: std::ops::Range<usize>) -> Option<(usize, usize, f32)> {
        let mut best: Option<(f32, usize, usize, f32)> = None;
        for &j in js {
            let drop = self.drop_cost(j);
            for k in ks.clone() {
                if !self.pruned(k) {
                    continue;
                }
                self.flops += 10.0;
                let (d, t) = self.change(drop, j, k);
                if d < best.map_or(0.0, |b| b.0) {
                    best = Some((d, j, k, t));
                }
            }
        }
        best.map(|(_, j, k, t)| (j, k, t))
    }

    fn swap(&mut self, j: usize, k: usize, t: f32) {
        self.flops += 4.0 * self.r.len() as f64;
        let wj = self.w[j];
        for ((r, &gj), &gk) in self.r.iter_mut().zip(self.g.col_as_slice(j)).zip(self.g.col_as_slice(k)) {
            *r += t * gk - wj * gj;
        }
        (self.w[j], self.w[k]) = (0.0, t);
        (self.free[j], self.free[k]) = (1.0, 0.0);
    }

    /// Swaps while one lowers the error (at most `cap`); returns how many were made.
    fn improve(&mut self, pattern: Pattern, cap: usize) -> usize {
        let n = self.w.len();
        let mut made = 0;
        match pattern {
            Pattern::NM { m: group, .. } => {
                // Sweeps over the groups until one changes nothing.
                for _ in 0..cap {
                    let before = made;
                    for g in (0..n).step_by(group) {
                        let cols = g..(g + group).min(n);
                        let js: Vec<usize> = cols.clone().filter(|&j| !self.pruned(j)).collect();
                        if let Some((j, k, t)) = self.best(&js, cols) {
                            self.swap(j, k, t);
                            made += 1;
                        }
                    }
                    if made == before {
                        break;
                    }
                }
            }
            Pattern::Unstructured(_) => {
                let mut drops: Vec<(f32, usize)> = Vec::with_capacity(n);
                while made < cap {
                    drops.clear();
                    drops.extend((0..n).filter(|&j| !self.pruned(j)).map(|j| (self.drop_cost(j), j)));
                    self.flops += 4.0 * drops.len() as f64;
                    let few = DROPS.min(drops.len());
                    if few == 0 {
                        break;
                    }
                    drops.select_nth_unstable_by(few - 1, |a, b| a.0.total_cmp(&b.0));
                    // Of the cheapest drops, the one whose best add lowers the error most; then find that add.
                    let (j, d) = drops[..few]
                        .iter()
                        .map(|&(cost, j)| (j, significant(cost, self.best_add(j))))
                        .min_by(|a, b| a.1.total_cmp(&b.1))
                        .expect("a drop");
                    if d >= 0.0 {
                        break;
                    }
                    let Some((j, k, t)) = self.best(&[j], 0..n) else { break };
                    self.swap(j, k, t);
                    made += 1;
                }
            }
        }
        made
    }
}

/// `drop − add` where it lowers the error beyond the rounding of its own terms, else 0 (no change).
fn significant(drop: f32, add: f32) -> f32 {
    let delta = drop - add;
    if delta < -1e-5 * drop.abs().max(add) { delta } else { 0.0 }
}

/// `G*`'s diagonal (kept off zero for inputs that never fire) and its inverse.
fn diagonal(g: &Mat<f32>) -> (Vec<f32>, Vec<f32>) {
    let n = g.nrows();
    let top = (0..n).map(|j| g[(j, j)]).fold(0f32, f32::max).max(f32::MIN_POSITIVE);
    let gd: Vec<f32> = (0..n).map(|j| g[(j, j)].max(1e-12 * top)).collect();
    let inv = gd.iter().map(|d| 1.0 / d).collect();
    (gd, inv)
}

/// One row's search: the swaps it made, its floating-point operations, and (where it made any) its weights
/// and mask (1 where pruned).
struct Found {
    made: usize,
    flops: f64,
    row: Option<(Vec<f32>, Vec<f32>)>,
}

/// What a round's search starts from: the operator, `G*`'s diagonal (kept off zero) and its inverse, the
/// weights with `w G*` and their mask, the pattern, and the most swaps a row may make.
struct Round<'a> {
    g: &'a Mat<f32>,
    c: &'a Mat<f32>,
    gd: &'a [f32],
    inv_gd: &'a [f32],
    w: &'a Mat<f32>,
    wg: &'a Mat<f32>,
    pruned: &'a Mask,
    pattern: Pattern,
    cap: usize,
}

/// Every row's search on the host, in row order, each row on its own task.
fn search(r: &Round) -> Vec<Found> {
    (0..r.w.nrows())
        .into_par_iter()
        .map(|i| {
            let mut row = Row::of((r.g, r.c), r.gd, r.inv_gd, r.w, r.wg, r.pruned, i);
            let made = row.improve(r.pattern, r.cap);
            Found { made, flops: row.flops, row: (made > 0).then_some((row.w, row.free)) }
        })
        .collect()
}

/// [`Side::search`] on the host: every row's search, the rows that made swaps put in place.
pub(super) fn search_host(
    g: &Mat<f32>,
    c: &Mat<f32>,
    w: &Mat<f32>,
    wg: &Mat<f32>,
    pruned: &Mask,
    pattern: Pattern,
    cap: usize,
) -> Searched<Mat<f32>, Mask> {
    let (gd, inv_gd) = diagonal(g);
    let found = search(&Round { g, c, gd: &gd, inv_gd: &inv_gd, w, wg, pruned, pattern, cap });
    let (mut sw, mut sm) = (w.clone(), pruned.clone());
    for (i, f) in found.iter().enumerate() {
        if let Some((row_w, row_free)) = &f.row {
            for j in 0..w.ncols() {
                sw[(i, j)] = row_w[j];
                sm[(i, j)] = row_free[j] != 0.0;
            }
        }
    }
    Searched {
        w: sw,
        pruned: sm,
        made: found.iter().map(|f| f.made).collect(),
        flops: found.iter().map(|f| f.flops).collect(),
    }
}

/// swap.cu's arguments but `G*` ([`kernel_g`]) made on the host from a search round: `w`, `r = w G* − c` and
/// the mask row-major, for the tests that run swap.cu on the host (on a GPU they come from tensors there:
/// `search_on_gpu`).
#[cfg(test)]
struct Kernel {
    m: usize,
    n: usize,
    gd: Vec<f32>,
    inv_gd: Vec<f32>,
    w: Vec<f32>,
    r: Vec<f32>,
    free: Vec<f32>,
    /// N:M's group size, 0 for unstructured.
    group: i32,
    cap: i32,
}

/// swap.cu's `g`: `G*` with row `j` its column `j`, as the host reads it (for the tests that run swap.cu on the
/// host; the GPU makes it with [`kernel_g_of`]).
#[cfg(test)]
fn kernel_g(g: &Mat<f32>) -> Vec<f32> {
    (0..g.ncols()).flat_map(|j| g.col_as_slice(j)).copied().collect()
}

/// [`kernel_g`] made from `G*` on the device (its resident copy), transposed there: no host copy of `n²` values
/// and no upload per swap round. A symmetric `G*` (as the Gram matrices here are: the host's rule mirrors the
/// lower triangle; compared by value, so ±0 alike, which the kernel's products do not tell apart) is its own
/// transpose, and goes as it is: one comparison's bytes (`n²`), not a copy of its values (`4 n²`, 3.3 GB for a
/// 70B down_proj).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn kernel_g_of(g: &candle_core::Tensor) -> anyhow::Result<candle_core::Tensor> {
    let g = g.contiguous()?;
    let differ = g.ne(&g.t()?)?.max_keepdim(1)?.flatten_all()?.to_vec1::<u8>()?;
    if differ.iter().all(|&d| d == 0) {
        return Ok(g);
    }
    Ok(g.t()?.contiguous()?)
}

#[cfg(test)]
impl Kernel {
    fn new(&Round { c, gd, inv_gd, w, wg, pruned, pattern, cap, .. }: &Round) -> Self {
        use crate::linalg::row_major;
        let mut r = row_major(wg.as_ref(), |x| x);
        r.par_iter_mut().zip(row_major(c.as_ref(), |x| x)).for_each(|(r, c)| *r -= c);
        Kernel {
            m: w.nrows(),
            n: w.ncols(),
            gd: gd.to_vec(),
            inv_gd: inv_gd.to_vec(),
            w: row_major(w.as_ref(), |x| x),
            r,
            free: row_major(pruned.as_ref(), |b| if b { 1.0 } else { 0.0 }),
            group: match pattern {
                Pattern::NM { m, .. } => m as i32,
                Pattern::Unstructured(_) => 0,
            },
            cap: cap as i32,
        }
    }

    /// The rows' results from the kernel's outputs: weights and mask (row-major), swaps and flops per row;
    /// `None` where it refused the pattern (N:M groups wider than its shared memory holds).
    fn found(&self, w: Vec<f32>, free: Vec<f32>, made: Vec<i32>, flops: Vec<f64>) -> Option<Vec<Found>> {
        if made.iter().any(|&x| x < 0) {
            return None;
        }
        let n = self.n;
        let found = (0..self.m)
            .map(|i| Found {
                made: made[i] as usize,
                flops: flops[i],
                row: (made[i] > 0).then(|| (w[i * n..(i + 1) * n].to_vec(), free[i * n..(i + 1) * n].to_vec())),
            })
            .collect();
        Some(found)
    }
}

/// [`Side::search`] on the run's GPU (swap.cu, PTX from build.rs, loaded once; one block of 256 threads per
/// row), from tensors there: `G*`, `C`, `w G*`, the weights and their mask (u8). The rows and their masks
/// stay on the GPU; only each row's swaps and flops come back. `None` off a GPU, or where the kernel refuses the
/// pattern (N:M groups wider than its shared memory holds).
#[cfg(feature = "cuda")]
#[allow(clippy::type_complexity, clippy::too_many_arguments)]
pub(super) fn search_on_gpu(
    g_host: &Mat<f32>,
    g: &candle_core::Tensor,
    c: &candle_core::Tensor,
    wg: &candle_core::Tensor,
    w: &candle_core::Tensor,
    pruned: &candle_core::Tensor,
    pattern: Pattern,
    cap: usize,
) -> anyhow::Result<Option<Searched<candle_core::Tensor, candle_core::Tensor>>> {
    use candle_core::cuda::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::{CudaStorage, DType, Storage, Tensor, op::BackpropOp};
    let candle_core::Device::Cuda(dev) = w.device() else { return Ok(None) };
    let (m, n) = w.dims2()?;
    let func = crate::device::project_kernel!(dev, "swap", "swap_search")?;
    let stream = dev.cuda_stream();
    // A copy of a tensor's f32 values that the kernel may write.
    let own = |t: &Tensor| -> anyhow::Result<_> {
        let t = t.to_dtype(DType::F32)?.contiguous()?;
        let (st, l) = t.storage_and_layout();
        let Storage::Cuda(st) = &*st else { anyhow::bail!("the swap search's input is not on the GPU") };
        let view = st.as_cuda_slice::<f32>()?.slice(l.start_offset()..l.start_offset() + t.elem_count());
        Ok(stream.clone_dtod(&view)?)
    };
    let gt = kernel_g_of(g)?;
    let (gs, gl) = gt.storage_and_layout();
    let Storage::Cuda(gs) = &*gs else { anyhow::bail!("G* is not on the GPU") };
    let g_all = gs.as_cuda_slice::<f32>()?.slice(gl.start_offset()..gl.start_offset() + n * n);
    let (gd, inv_gd) = diagonal(g_host);
    let (gd, inv_gd) = (dev.clone_htod(&gd)?, dev.clone_htod(&inv_gd)?);
    let (mut wv, mut rv, mut free) = (own(w)?, own(&(wg - c)?)?, own(pruned)?);
    let (mut made, mut flops) = (dev.alloc_zeros::<i32>(m)?, dev.alloc_zeros::<f64>(m)?);
    let group = match pattern {
        Pattern::NM { m, .. } => m as i32,
        Pattern::Unstructured(_) => 0,
    };
    let (mi, ni, cap) = (m as i32, n as i32, cap as i32);
    let mut launch = stream.launch_builder(&func);
    launch.arg(&g_all).arg(&gd).arg(&inv_gd).arg(&mut wv).arg(&mut rv).arg(&mut free);
    launch.arg(&mi).arg(&ni).arg(&group).arg(&cap).arg(&mut made).arg(&mut flops);
    let cfg = LaunchConfig { grid_dim: (m as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: the arguments are swap.cu's, in its order and types; every buffer holds what it indexes (G* n × n,
    // its diagonal n, the rows m × n, the counts m).
    unsafe { launch.launch(cfg) }.map_err(|e| anyhow::anyhow!("the swap search's kernel: {e:?}"))?;
    let made = dev.clone_dtoh(&made)?;
    if made.iter().any(|&x| x < 0) {
        return Ok(None);
    }
    let wrap = |s| {
        let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(s, dev.clone()));
        Tensor::from_storage(storage, (m, n), BackpropOp::none(), false)
    };
    Ok(Some(Searched {
        w: wrap(wv),
        pruned: wrap(free).ne(0f32)?,
        made: made.into_iter().map(|x| x as usize).collect(),
        flops: dev.clone_dtoh(&flops)?,
    }))
}

/// Refine `w` (re-fitted on the support `pruned` leaves, on `pattern`; `wg = w G*`) by up to `rounds` rounds
/// of swaps, each re-fitted with `refit_iters` conjugate-gradient steps, on `side`. Returns the weights, their
/// mask and each round.
#[allow(clippy::too_many_arguments)]
pub fn refine<S: Side>(
    side: &S,
    mut w: S::W,
    mut wg: S::W,
    mut pruned: S::M,
    pattern: Pattern,
    rounds: usize,
    refit_iters: usize,
) -> anyhow::Result<(S::W, S::M, Vec<SwapRound>)> {
    let ((m, n), k) = (side.facts().shape, side.facts().k);
    let base = k.max(f64::MIN_POSITIVE);
    // Swaps per row and round: unstructured, a share of the row (the re-fit between rounds moves the rest);
    // N:M, sweeps over the groups.
    let cap = match pattern {
        Pattern::NM { .. } => 4,
        Pattern::Unstructured(_) => n.div_ceil(16),
    };
    let mut err = side.row_errors(&w, &wg)?;
    let total = |err: &[f64]| (err.iter().sum::<f64>() + k).max(0.0) / base;
    let mut report = Vec::new();
    for _ in 0..rounds {
        let found = side.search(&w, &wg, &pruned, pattern, cap)?;
        let (proposed, search_flops) = (found.made.iter().sum(), found.flops.iter().sum());
        if proposed == 0 {
            // A search that found nothing: no re-fit, the last round.
            report.push(SwapRound { proposed, search_flops, rows_kept: 0, error: total(&err) });
            break;
        }
        let moved: Vec<bool> = found.made.iter().map(|&k| k > 0).collect();
        let (start, cmask) = (side.rows(&moved, &found.w, &w)?, side.mask_rows(&moved, &found.pruned, &pruned)?);
        // What the search proposed is in `start` now, and `start` in the re-fit's result after it: neither is
        // held on (each an operator's weight; a shadowed binding would live to the end of the round).
        drop(found);
        let (cand, cg) = side.refit(&start, None, &cmask, refit_iters)?;
        drop(start);
        let cerr = side.row_errors(&cand, &cg)?;
        let better: Vec<bool> = (0..m).map(|i| cerr[i] < err[i]).collect();
        w = side.rows(&better, &cand, &w)?;
        pruned = side.mask_rows(&better, &cmask, &pruned)?;
        wg = side.rows(&better, &cg, &wg)?;
        for (e, (&c, &b)) in err.iter_mut().zip(cerr.iter().zip(&better)) {
            if b {
                *e = c;
            }
        }
        let rows_kept = better.iter().filter(|&&b| b).count();
        report.push(SwapRound { proposed, search_flops, rows_kept, error: total(&err) });
        if rows_kept == 0 {
            break;
        }
    }
    Ok((w, pruned, report))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prune::fista::{Problem, matmul, refit};
    use crate::prune::mask;
    use crate::prune::side::{Host, OnDevice};
    use faer::Accum;

    /// The GPU's `G*` for the kernel, made by transposing its copy on the device, is the host's
    /// [`kernel_g`] exactly (an asymmetric `G*`, so that a missing transpose shows); a symmetric one goes as it
    /// is, the same tensor.
    #[test]
    fn the_kernels_g_made_on_the_device_is_the_hosts() {
        let g = Mat::from_fn(5, 5, |i, j| (i * 5 + j) as f32 + if i < j { 0.25 } else { 0.0 });
        let on = kernel_g_of(&crate::linalg::mat_to_tensor(&g).unwrap()).unwrap();
        assert_eq!(on.flatten_all().unwrap().to_vec1::<f32>().unwrap(), kernel_g(&g));
        let g = Mat::from_fn(5, 5, |i, j| (i * j) as f32 + (i + j) as f32 * 0.5);
        let t = crate::linalg::mat_to_tensor(&g).unwrap();
        let on = kernel_g_of(&t).unwrap();
        assert_eq!(on.id(), t.id(), "a symmetric G* was copied");
        assert_eq!(on.flatten_all().unwrap().to_vec1::<f32>().unwrap(), kernel_g(&g));
    }

    /// A random operator with correlated inputs: (W, G*, C = W XᵀX*, K), X* a perturbed X.
    fn problem(m: usize, n: usize, seed: u64) -> (Mat<f32>, Mat<f32>, Mat<f32>, f64) {
        let mut s = seed;
        let mut next = move || {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 33) as f64 / (1u64 << 31) as f64 - 0.5) as f32
        };
        let tokens = 4 * n;
        let w = Mat::from_fn(m, n, |_, _| next());
        let shared: Vec<f32> = (0..tokens).map(|_| next()).collect();
        let x = Mat::from_fn(tokens, n, |t, j| next() + 0.8 * shared[t] * ((j % 5) as f32 - 2.0));
        let xs = Mat::from_fn(tokens, n, |t, j| x[(t, j)] + 0.1 * next());
        let mut g = Mat::<f32>::zeros(n, n);
        faer::linalg::matmul::matmul(g.as_mut(), Accum::Replace, xs.transpose(), xs.as_ref(), 1.0f32, faer::Par::Seq);
        let c = matmul(w.as_ref(), matmul(x.transpose(), xs.as_ref()).as_ref());
        let y = matmul(x.as_ref(), w.transpose());
        let k = (0..y.ncols()).map(|j| (0..y.nrows()).map(|i| (y[(i, j)] as f64).powi(2)).sum::<f64>()).sum();
        (w, g, c, k)
    }

    fn errors(p: &Problem, w: &Mat<f32>) -> Vec<f64> {
        row_errors(w, &matmul(w.as_ref(), p.g.as_ref()), p.c)
    }

    /// A swap's change is the error's exact change, from any point (not only a re-fitted one), and `swap`
    /// leaves `r = w G* − c` exact.
    #[test]
    fn swap_change_is_exact() {
        let n = 12;
        let (w, g, c, k) = problem(1, n, 7);
        let p = Problem { w: &w, g: &g, c: &c, k };
        let pruned = mask::select(&w, Pattern::Unstructured(0.5), true);
        let start = mask::zeroed(&w, &pruned);
        let (gd, inv_gd) = diagonal(&g);
        let residual = |v: &Mat<f32>| {
            let vg = matmul(v.as_ref(), g.as_ref());
            (0..n).map(|j| vg[(0, j)] - c[(0, j)]).collect::<Vec<f32>>()
        };
        let mut row = Row::of((&g, &c), &gd, &inv_gd, &start, &matmul(start.as_ref(), g.as_ref()), &pruned, 0);
        let e0 = errors(&p, &start)[0];
        let scale = e0.abs().max(k);
        let (mut tried, mut lower) = (0, 0);
        for j in (0..n).filter(|&j| !row.pruned(j)) {
            for kk in (0..n).filter(|&kk| row.pruned(kk)) {
                let (d, t) = row.change(row.drop_cost(j), j, kk);
                let mut v = start.clone();
                (v[(0, j)], v[(0, kk)]) = (0.0, t);
                let exact = errors(&p, &v)[0] - e0;
                if d < 0.0 {
                    assert!((d as f64 - exact).abs() < 1e-4 * scale, "({j}, {kk}): {d} against {exact}");
                    lower += 1;
                } else {
                    assert!(exact > -1e-4 * scale, "({j}, {kk}): a lower error ({exact}) reported as none");
                }
                tried += 1;
            }
        }
        assert!(lower > 0 && lower < tried, "{lower} of {tried} swaps lower the error");
        // The branch-free search finds each drop's best add.
        let js: Vec<usize> = (0..n).filter(|&j| !row.pruned(j)).collect();
        for &j in &js {
            let exhaustive = (0..n)
                .filter(|&kk| row.pruned(kk))
                .map(|kk| row.change(row.drop_cost(j), j, kk).0)
                .fold(0f32, f32::min);
            let fast = significant(row.drop_cost(j), row.best_add(j));
            assert!(
                (fast - exhaustive).abs() <= 1e-5 * exhaustive.abs().max(1e-3 * scale as f32),
                "{j}: {fast} {exhaustive}"
            );
        }
        let (j, kk, t) = row.best(&js, 0..n).expect("a swap that lowers the error");
        row.swap(j, kk, t);
        let v = Mat::from_fn(1, n, |_, l| row.w[l]);
        for (l, (a, b)) in row.r.iter().zip(residual(&v)).enumerate() {
            assert!((a - b).abs() < 1e-4 * b.abs().max(1.0), "r[{l}]: {a} against {b}");
        }
    }

    /// A row's search ends where no single swap in reach lowers its error (checked by trying every one, with
    /// the error computed from scratch). Unstructured, the search tries the `DROPS` cheapest drops: with no
    /// more kept weights than that it is exhaustive.
    #[test]
    fn search_ends_at_a_local_optimum() {
        for pattern in [Pattern::NM { n: 2, m: 4 }, Pattern::Unstructured(0.5)] {
            let n = 2 * DROPS;
            let (w, g, c, k) = problem(1, n, 11);
            let p = Problem { w: &w, g: &g, c: &c, k };
            let pruned = mask::select(&w, pattern, true);
            let start = mask::zeroed(&w, &pruned);
            let (gd, inv_gd) = diagonal(&g);
            let mut row = Row::of((&g, &c), &gd, &inv_gd, &start, &matmul(start.as_ref(), g.as_ref()), &pruned, 0);
            let made = row.improve(pattern, 1000);
            let end = Mat::from_fn(1, n, |_, j| row.w[j]);
            let e = errors(&p, &end)[0];
            let scale = e.abs().max(k);
            assert!(made > 0 && e < errors(&p, &start)[0], "{pattern:?}: {made} swaps");
            let reach = |j: usize| match pattern {
                Pattern::NM { m, .. } => (j / m * m)..(j / m * m + m),
                Pattern::Unstructured(_) => 0..n,
            };
            for j in (0..n).filter(|&j| !row.pruned(j)) {
                for kk in reach(j).filter(|&kk| row.pruned(kk)) {
                    // The best value for kk with j dropped, by a one-dimensional least squares from scratch.
                    let mut v = end.clone();
                    v[(0, j)] = 0.0;
                    let vg = matmul(v.as_ref(), g.as_ref());
                    v[(0, kk)] = -(vg[(0, kk)] - c[(0, kk)]) / g[(kk, kk)];
                    let after = errors(&p, &v)[0];
                    assert!(after > e - 1e-4 * scale, "{pattern:?}: swap ({j}, {kk}) lowers {e} to {after}");
                }
            }
        }
    }

    /// swap.cu, run on the host (src/cuda_emu.h: an OS thread per CUDA thread, blocks of 32 here), makes the
    /// host search's swaps to the bit and counts its flops, rows wider and narrower than a block, every pattern.
    #[test]
    fn the_gpu_kernel_makes_the_host_searchs_swaps() {
        use crate::device::emu::{Harness, bytes, f32s};
        let Some(harness) = Harness::build("prune/swap_test") else { return };
        let cases = [
            (Pattern::Unstructured(0.5), 45),
            (Pattern::Unstructured(0.7), 20),
            (Pattern::NM { n: 2, m: 4 }, 44),
            (Pattern::NM { n: 4, m: 8 }, 48),
            // The widest group a block of 32 takes (its 16 × 16 block of G* fills the 32 × 8 floats of s_v).
            (Pattern::NM { n: 8, m: 16 }, 48),
            // Too wide: refused, and left to the host.
            (Pattern::NM { n: 16, m: 32 }, 64),
        ];
        for (pattern, n) in cases {
            let m = 7;
            let (w, g, c, k) = problem(m, n, 5 + n as u64);
            // G* made asymmetric (5 % on one side; rounding can leave it slightly so): the kernel must read the
            // host's side of it everywhere, and this much makes a wrong side change the decisions.
            let g = Mat::from_fn(n, n, |i, j| if i < j { g[(i, j)] * 1.05 } else { g[(i, j)] });
            let p = Problem { w: &w, g: &g, c: &c, k };
            let pruned = mask::select(&w, pattern, true);
            let start = mask::zeroed(&w, &pruned);
            let (start, start_g) = refit(&p, &start, None, &pruned, 30).unwrap();
            let (gd, inv_gd) = diagonal(&g);
            let cap = match pattern {
                Pattern::NM { .. } => 4,
                Pattern::Unstructured(_) => n.div_ceil(16),
            };
            let round = Round {
                g: &g,
                c: &c,
                gd: &gd,
                inv_gd: &inv_gd,
                w: &start,
                wg: &start_g,
                pruned: &pruned,
                pattern,
                cap,
            };
            let host = search(&round);
            let kern = Kernel::new(&round);
            let mut input = bytes(&[m as i32, n as i32, kern.group, kern.cap], i32::to_le_bytes);
            for v in [&kernel_g(&g), &kern.gd, &kern.inv_gd, &kern.w, &kern.r, &kern.free] {
                input.extend(bytes(v, f32::to_le_bytes));
            }
            let out = harness.run(&input);
            let (wv, fv) = (f32s(&out, 0, m * n), f32s(&out, 4 * m * n, m * n));
            let made: Vec<i32> = out[8 * m * n..8 * m * n + 4 * m]
                .chunks(4)
                .map(|b| i32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            let flops: Vec<f64> =
                out[8 * m * n + 4 * m..].chunks(8).map(|b| f64::from_le_bytes(b.try_into().unwrap())).collect();
            let Some(gpu) = kern.found(wv, fv, made, flops) else {
                assert!(matches!(pattern, Pattern::NM { m: 32, .. }), "{pattern:?}: refused");
                continue;
            };
            assert!(!matches!(pattern, Pattern::NM { m: 32, .. }), "a 32-wide group taken by blocks of 32");
            let mut swaps = 0;
            for (i, (h, d)) in host.iter().zip(&gpu).enumerate() {
                assert_eq!((h.made, h.flops), (d.made, d.flops), "{pattern:?} row {i}: swaps and flops");
                assert_eq!(h.row, d.row, "{pattern:?} row {i}: weights and mask");
                swaps += h.made;
            }
            assert!(swaps >= m, "{pattern:?}: only {swaps} swaps over {m} rows");
        }
    }

    /// A random 6 × 40 operator and the swaps' start on it: magnitude's mask on `pattern`, re-fitted (with that
    /// start's product with `G*`).
    #[allow(clippy::type_complexity)]
    fn swap_start(pattern: Pattern, seed: u64) -> ((Mat<f32>, Mat<f32>, Mat<f32>, f64), Mask, Mat<f32>, Mat<f32>) {
        let (w, g, c, k) = problem(6, 40, seed);
        let pruned = mask::select(&w, pattern, true);
        let p = Problem { w: &w, g: &g, c: &c, k };
        let (start, start_g) = refit(&p, &mask::zeroed(&w, &pruned), None, &pruned, 60).unwrap();
        ((w, g, c, k), pruned, start, start_g)
    }

    /// From magnitude's mask re-fitted, the swaps lower the error (every row no worse, the total clearly
    /// lower) and keep the pattern: the same zeros per row (unstructured) or per group (2:4).
    #[test]
    fn swaps_lower_the_refitted_error_and_keep_the_pattern() {
        for pattern in [Pattern::Unstructured(0.5), Pattern::NM { n: 2, m: 4 }] {
            let ((w, g, c, k), pruned, start, start_g) = swap_start(pattern, 3);
            let p = Problem { w: &w, g: &g, c: &c, k };
            let side = Host::new(&p);
            let (out, out_mask, rounds) =
                refine(&side, start.clone(), start_g, pruned.clone(), pattern, 5, 60).unwrap();
            let (before, after) = (errors(&p, &start), errors(&p, &out));
            for i in 0..6 {
                assert!(after[i] <= before[i], "{pattern:?} row {i}: {} > {}", after[i], before[i]);
                let zeros = |m: &Mask| (0..40).filter(|&j| m[(i, j)]).count();
                assert_eq!(zeros(&out_mask), zeros(&pruned), "{pattern:?} row {i}");
                assert!((0..40).all(|j| !out_mask[(i, j)] || out[(i, j)] == 0.0), "{pattern:?} row {i}: mask");
            }
            mask::verify(&out, pattern, 6).unwrap();
            let total = |e: &[f64]| e.iter().sum::<f64>() + k;
            assert!(
                total(&after) < 0.9 * total(&before),
                "{pattern:?}: {} → {} in {rounds:?}",
                total(&before),
                total(&after)
            );
            let last = rounds.last().unwrap().error * k;
            assert!((last - total(&after)).abs() < 1e-6 * k, "{pattern:?}: reported {last}");
        }
    }

    /// The swaps on the device (candle's operators; here on the CPU, with the host's search) refine as the host
    /// does: the same first round, the errors to f32 summation order every round, and the same rows but where
    /// the re-fit's rounding tips a row's keep-or-not (its error all but unchanged) the other way.
    #[test]
    fn device_swaps_follow_the_host() {
        for pattern in [Pattern::Unstructured(0.5), Pattern::NM { n: 2, m: 4 }] {
            let ((w, g, c, k), pruned, start, start_g) = swap_start(pattern, 7);
            let p = Problem { w: &w, g: &g, c: &c, k };
            let (hw, hm, hr) =
                refine(&Host::new(&p), start.clone(), start_g.clone(), pruned.clone(), pattern, 3, 20).unwrap();
            let up = |m: &Mat<f32>| crate::linalg::mat_to_tensor(m).unwrap();
            let mask = crate::prune::device_mask::from_host(&pruned, &candle_core::Device::Cpu).unwrap();
            let dev = OnDevice::new(&p).unwrap();
            let (dw, dm, dr) = refine(&dev, up(&start), up(&start_g), mask, pattern, 3, 20).unwrap();
            let (dw, dm) =
                (crate::linalg::tensor_to_mat(&dw).unwrap(), crate::prune::device_mask::to_host(&dm).unwrap());
            assert!(hr[0].proposed > 0, "{pattern:?}: no swaps to compare");
            assert_eq!((hr[0].proposed, hr[0].rows_kept), (dr[0].proposed, dr[0].rows_kept), "{pattern:?}");
            for (h, d) in hr.iter().zip(&dr) {
                assert!((h.error - d.error).abs() <= 1e-4 * h.error, "{pattern:?}: {} vs {}", h.error, d.error);
            }
            let same = |i: usize| (0..40).all(|j| hm[(i, j)] == dm[(i, j)]);
            assert!((0..6).filter(|&i| !same(i)).count() <= 1, "{pattern:?}: {hr:?} against {dr:?}");
            let hw_ref = &hw;
            let scale = (0..6).flat_map(|i| (0..40).map(move |j| hw_ref[(i, j)].abs())).fold(0.0, f32::max);
            for i in (0..6).filter(|&i| same(i)) {
                assert!((0..40).all(|j| (hw[(i, j)] - dw[(i, j)]).abs() <= 1e-3 * scale), "{pattern:?}: row {i}");
            }
            mask::verify(&dw, pattern, 6).unwrap();
        }
    }
}
