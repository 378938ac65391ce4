//! Mask refinement by swaps (issue 16): after FISTAPruner's re-fit, trade a kept weight for a pruned one in
//! the same row (unstructured: the row keeps its count of zeros) or the same N:M group, wherever that lowers
//! the re-fitted error of the row.
//!
//! The rows of an operator are independent least-squares problems (`e_i = w_i G* w_iᵀ − 2 c_i w_iᵀ + k_i`), so
//! each round proposes swaps for every row from first-order estimates, re-fits all rows on the proposed
//! supports, and keeps the new row only where its error is lower: the result is never worse than its start.
//! - Adding pruned weight `k` alone to a re-fitted row lowers its error by `r_k² / G*_kk`, with `r = w G* − c`
//!   the gradient (zero on the support at the least-squares optimum): a lower bound on the gain once re-fitted.
//! - Removing kept weight `j` alone raises it by `w_j² G*_jj` (the gradient there is zero): an upper bound on
//!   the cost once re-fitted.
//!
//! A swap is proposed where the gain bound beats the cost bound: a conservative test, verified by the re-fit.

use faer::Mat;
use serde::Serialize;

use super::fista::{Problem, matmul, refit};
use super::mask::{Mask, Pattern};

/// One round: swaps proposed, rows whose error went down (kept), and the relative error after it.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct SwapRound {
    pub proposed: usize,
    pub rows_kept: usize,
    pub error: f64,
}

/// Each row's `w_i (w_i G*)ᵀ − 2 c_i w_iᵀ`: its error less the constant `k_i`, in f64.
fn row_errors(w: &Mat<f32>, wg: &Mat<f32>, c: &Mat<f32>) -> Vec<f64> {
    let mut e = vec![0f64; w.nrows()];
    for j in 0..w.ncols() {
        let (wc, gc, cc) = (w.col_as_slice(j), wg.col_as_slice(j), c.col_as_slice(j));
        for (i, ei) in e.iter_mut().enumerate() {
            *ei += (wc[i] * (gc[i] - 2.0 * cc[i])) as f64;
        }
    }
    e
}

/// Refine `w` (re-fitted on the support `pruned` leaves, on `pattern`) by up to `rounds` rounds of swaps, each
/// re-fitted with `refit_iters` conjugate-gradient steps. Returns the weights, their mask and each round.
pub fn refine(
    p: &Problem,
    mut w: Mat<f32>,
    mut pruned: Mask,
    pattern: Pattern,
    rounds: usize,
    refit_iters: usize,
) -> (Mat<f32>, Mask, Vec<SwapRound>) {
    let (m, n) = w.shape();
    let top = (0..n).map(|j| p.g[(j, j)]).fold(0f32, f32::max).max(f32::MIN_POSITIVE);
    let gd: Vec<f32> = (0..n).map(|j| p.g[(j, j)].max(1e-12 * top)).collect();
    let base = p.k.max(f64::MIN_POSITIVE);
    let mut wg = matmul(w.as_ref(), p.g.as_ref());
    let mut err = row_errors(&w, &wg, p.c);
    let mut report = Vec::new();
    for _ in 0..rounds {
        let (mut cand, mut cmask) = (w.clone(), pruned.clone());
        let mut proposed = 0;
        for i in 0..m {
            // (gain bound, position) of each pruned weight; (cost bound, position) of each kept one.
            let gain = |k: usize| {
                let r = wg[(i, k)] - p.c[(i, k)];
                r * r / gd[k]
            };
            let cost = |j: usize| w[(i, j)] * w[(i, j)] * gd[j];
            let mut swap = |add: usize, drop: usize| {
                cand[(i, add)] = -(wg[(i, add)] - p.c[(i, add)]) / gd[add];
                cmask[(i, add)] = false;
                cand[(i, drop)] = 0.0;
                cmask[(i, drop)] = true;
                proposed += 1;
            };
            match pattern {
                Pattern::NM { m: group, .. } => {
                    for g in (0..n).step_by(group) {
                        let cols = g..(g + group).min(n);
                        let add = cols
                            .clone()
                            .filter(|&k| pruned[(i, k)])
                            .map(|k| (gain(k), k))
                            .max_by(|a, b| a.0.total_cmp(&b.0));
                        let drop =
                            cols.filter(|&j| !pruned[(i, j)]).map(|j| (cost(j), j)).min_by(|a, b| a.0.total_cmp(&b.0));
                        if let (Some((a, k)), Some((b, j))) = (add, drop)
                            && a > b
                        {
                            swap(k, j);
                        }
                    }
                }
                Pattern::Unstructured(_) => {
                    let mut adds: Vec<(f32, usize)> =
                        (0..n).filter(|&k| pruned[(i, k)]).map(|k| (gain(k), k)).collect();
                    let mut drops: Vec<(f32, usize)> =
                        (0..n).filter(|&j| !pruned[(i, j)]).map(|j| (cost(j), j)).collect();
                    adds.sort_by(|a, b| b.0.total_cmp(&a.0));
                    drops.sort_by(|a, b| a.0.total_cmp(&b.0));
                    // A few swaps per row and round: the estimates hold for one swap, not for many at once.
                    let cap = n.div_ceil(64);
                    for (&(a, k), &(b, j)) in adds.iter().zip(&drops).take(cap) {
                        if a <= b {
                            break;
                        }
                        swap(k, j);
                    }
                }
            }
        }
        if proposed == 0 {
            break;
        }
        let cand = refit(p, &cand, &cmask, refit_iters);
        let cg = matmul(cand.as_ref(), p.g.as_ref());
        let cerr = row_errors(&cand, &cg, p.c);
        let better: Vec<usize> = (0..m).filter(|&i| cerr[i] < err[i]).collect();
        for j in 0..n {
            for &i in &better {
                w[(i, j)] = cand[(i, j)];
                pruned[(i, j)] = cmask[(i, j)];
                wg[(i, j)] = cg[(i, j)];
            }
        }
        for &i in &better {
            err[i] = cerr[i];
        }
        report.push(SwapRound {
            proposed,
            rows_kept: better.len(),
            error: (err.iter().sum::<f64>() + p.k).max(0.0) / base,
        });
        if better.is_empty() {
            break;
        }
    }
    (w, pruned, report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prune::mask;
    use faer::Accum;

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

    /// The two estimates the proposals rest on are exact for one weight alone at a re-fitted row: adding
    /// pruned `k` at `−r_k / G_kk` lowers the error by `r_k² / G_kk`; removing kept `j` raises it by `w_j² G_jj`.
    #[test]
    fn single_swap_estimates_are_exact() {
        let (w, g, c, k) = problem(1, 12, 7);
        let p = Problem { w: &w, g: &g, c: &c, k };
        let pruned = mask::select(&w, Pattern::Unstructured(0.5), true);
        let mut start = w.clone();
        mask::apply(&mut start, &pruned);
        let fit = refit(&p, &start, &pruned, 200);
        let e0 = errors(&p, &fit)[0];
        let r = {
            let wg = matmul(fit.as_ref(), g.as_ref());
            Mat::from_fn(1, 12, |_, j| wg[(0, j)] - c[(0, j)])
        };
        let (add, drop) = ((0..12).find(|&j| pruned[(0, j)]).unwrap(), (0..12).find(|&j| !pruned[(0, j)]).unwrap());
        let mut added = fit.clone();
        added[(0, add)] = -r[(0, add)] / g[(add, add)];
        let gain = (r[(0, add)] * r[(0, add)] / g[(add, add)]) as f64;
        let mut dropped = fit.clone();
        dropped[(0, drop)] = 0.0;
        let cost = (fit[(0, drop)] * fit[(0, drop)] * g[(drop, drop)]) as f64;
        let scale = e0.abs().max(k);
        assert!((e0 - errors(&p, &added)[0] - gain).abs() < 1e-4 * scale, "gain {gain}");
        assert!((errors(&p, &dropped)[0] - e0 - cost).abs() < 1e-4 * scale, "cost {cost}");
    }

    /// From magnitude's mask re-fitted, the swaps lower the error (every row no worse, the total clearly
    /// lower) and keep the pattern: the same zeros per row (unstructured) or per group (2:4).
    #[test]
    fn swaps_lower_the_refitted_error_and_keep_the_pattern() {
        for pattern in [Pattern::Unstructured(0.5), Pattern::NM { n: 2, m: 4 }] {
            let (w, g, c, k) = problem(6, 40, 3);
            let p = Problem { w: &w, g: &g, c: &c, k };
            let pruned = mask::select(&w, pattern, true);
            let mut start = w.clone();
            mask::apply(&mut start, &pruned);
            let start = refit(&p, &start, &pruned, 60);
            let (out, out_mask, rounds) = refine(&p, start.clone(), pruned.clone(), pattern, 5, 60);
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
}
