//! SparseGPT (Frantar and Alistarh 2023), as the authors' `sparsegpt.py` does it.
//!
//! `H = G + λI` with `λ = percdamp · mean(diag G)` (dead inputs, `G_jj = 0`, get `H_jj = 1` and a zero weight
//! column); `U` = upper Cholesky factor of `H⁻¹`. Columns are swept in blocks of `blocksize`: the mask of a
//! block is chosen by `w² / U_jj²` (unstructured: the lowest over the whole block, all rows; N:M: per row, per
//! group, when the sweep reaches the group), then each column's pruned weights are zeroed and their error
//! `(w − q) / U_jj` is spread over the block's remaining columns with row `j` of `U` (the optimal brain surgeon
//! update); the rest of the matrix gets the block's errors in one GEMM (the lazy batch update).
//!
//! One deliberate difference: the authors' unstructured threshold `tmp <= sorted[int(numel·s)]` prunes one
//! weight more than `numel·s` per block; we prune exactly `round(numel·s)` per block.

use anyhow::{Context, Result, anyhow};
use faer::linalg::solvers::DenseSolveCore;
use faer::{Accum, Mat, Side};

use serde::{Deserialize, Serialize};

use super::mask::{self, Pattern};
use super::{Method, MethodOptions, Observes, OpStats, Pruned, Registered, needs_stats};
use crate::linalg::par;

pub const METHOD: Registered = Registered { name: "sparsegpt", build };

fn build(o: &MethodOptions) -> Result<Box<dyn Method>> {
    anyhow::ensure!(
        o.sparsegpt.percdamp >= 0.0 && o.sparsegpt.percdamp.is_finite(),
        "--percdamp {} must be ≥ 0",
        o.sparsegpt.percdamp
    );
    Ok(Box::new(SparseGpt(o.sparsegpt.clone())))
}

/// SparseGPT's knobs, as the authors' script names them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct Options {
    /// SparseGPT: diagonal damping, as a fraction of the mean diagonal of the Hessian.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = Options::default().percdamp))]
    pub percdamp: f64,
    /// SparseGPT: columns per lazy-update block.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = Options::default().blocksize))]
    pub blocksize: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self { percdamp: 0.01, blocksize: 128 }
    }
}

#[derive(Default)]
pub struct SparseGpt(pub Options);

/// `H = G + damping` with dead inputs handled; returns H (f64) and zeroes the dead columns of `w`.
pub fn damped_hessian(g: &Mat<f32>, w: &mut Mat<f32>, percdamp: f64) -> Mat<f64> {
    let n = g.nrows();
    let mut h = crate::linalg::mat_from_fn(n, n, |i, j| g[(i, j)] as f64);
    for j in 0..n {
        if h[(j, j)] == 0.0 {
            h[(j, j)] = 1.0;
            for i in 0..w.nrows() {
                w[(i, j)] = 0.0;
            }
        }
    }
    let damp = percdamp * (0..n).map(|j| h[(j, j)]).sum::<f64>() / n as f64;
    for j in 0..n {
        h[(j, j)] += damp;
    }
    h
}

/// Upper Cholesky factor `U` of `H⁻¹` (`H⁻¹ = Uᵀ U`), in f32.
pub fn inverse_cholesky_upper(h: &Mat<f64>) -> Result<Mat<f32>> {
    let hinv = h
        .llt(Side::Lower)
        .map_err(|e| anyhow!("the damped Hessian is not positive definite ({e:?}); raise --percdamp"))?
        .inverse();
    let l = hinv.llt(Side::Lower).map_err(|e| anyhow!("H⁻¹ is not positive definite ({e:?})"))?;
    let l = l.L();
    Ok(crate::linalg::mat_from_fn(h.nrows(), h.ncols(), |i, j| if j >= i { l[(j, i)] as f32 } else { 0.0 }))
}

impl SparseGpt {
    /// Prune `w` given the Gram matrix of its inputs.
    pub fn prune_gram(&self, w: &Mat<f32>, g: &Mat<f32>, pattern: Pattern) -> Result<Mat<f32>> {
        let mut w = w.clone();
        let h = damped_hessian(g, &mut w, self.0.percdamp);
        let u = inverse_cholesky_upper(&h).context("sparsegpt")?;
        sweep(&mut w, &u, pattern, self.0.blocksize.max(1));
        Ok(w)
    }
}

impl Method for SparseGpt {
    fn observes(&self) -> Observes {
        Observes::Gram
    }

    fn prune(&self, w: &Mat<f32>, stats: Option<&OpStats>, pattern: Pattern) -> Result<Pruned> {
        let g = &needs_stats(stats, "sparsegpt")?.gram;
        let (rows, cols) = w.shape();
        let (m, n, b) = (rows as f64, cols as f64, self.0.blocksize as f64);
        Ok(Pruned {
            w: self.prune_gram(w, g, pattern)?,
            // The zero count is rounded per block of columns.
            rounding_units: cols.div_ceil(self.0.blocksize.max(1)),
            // Two Cholesky factorisations and an inverse (4/3 n³), the lazy block updates (m n²) and the
            // in-block rank-1 updates (m n B).
            flops: 4.0 / 3.0 * n * n * n + m * n * n + m * n * b,
            details: None,
        })
    }
}

/// The blocked OBS sweep over the columns of `w` with the upper Cholesky factor `u` of `H⁻¹`.
///
/// Within a block the rows are independent (a row's updates read only that row and `U`), so chunks of rows
/// sweep the block on their own threads; each element sees the same updates in the same order as in one
/// serial sweep, so the result does not depend on the thread count. The lazy update of the columns after
/// the block is one GEMM.
fn sweep(w: &mut Mat<f32>, u: &Mat<f32>, pattern: Pattern, blocksize: usize) {
    use rayon::prelude::*;
    let (rows, cols) = w.shape();
    let chunk = rows.div_ceil(4 * rayon::current_num_threads()).max(32);
    let mut i1 = 0;
    while i1 < cols {
        let i2 = (i1 + blocksize).min(cols);
        let count = i2 - i1;
        let d: Vec<f32> = (i1..i2).map(|j| u[(j, j)]).collect();
        // Unstructured: the mask of the whole block, all rows, chosen before any of it is updated.
        let block_mask = match pattern {
            Pattern::Unstructured(s) => {
                let w1 = w.subcols(i1, count);
                let scores = Mat::from_fn(rows, count, |i, j| w1[(i, j)] * w1[(i, j)] / (d[j] * d[j]));
                Some(mask::mask_per_matrix(&scores, s))
            }
            Pattern::NM { .. } => None,
        };
        let mut err1 = Mat::<f32>::zeros(rows, count);
        let ublock = u.submatrix(i1, i1, count, count);
        let row_chunks =
            w.subcols_mut(i1, count).par_row_chunks_mut(chunk).zip(err1.as_mut().par_row_chunks_mut(chunk));
        row_chunks.enumerate().for_each(|(k, (wc, ec))| {
            let mask = block_mask.as_ref().map(|m| m.subrows(k * chunk, wc.nrows()));
            sweep_rows(wc, ec, mask, ublock, &d, pattern);
        });
        if i2 < cols {
            // W[:, i2:] -= Err1 · U[i1:i2, i2:]
            faer::linalg::matmul::matmul(
                w.subcols_mut(i2, cols - i2),
                Accum::Add,
                err1.as_ref(),
                u.submatrix(i1, i2, count, cols - i2),
                -1.0f32,
                par(),
            );
        }
        i1 = i2;
    }
}

/// One block of columns of some rows: prune column by column, spreading each column's error over the
/// block's later columns with row `i` of the block of `U` (a rank-1 update, one contiguous column at a
/// time). `mask` is the block's mask for these rows (unstructured); N:M groups are chosen as the sweep
/// reaches them. Writes the scaled errors `(w − q) / U_ii` into `err`.
fn sweep_rows(
    mut w: faer::MatMut<f32>,
    mut err: faer::MatMut<f32>,
    mask: Option<faer::MatRef<bool>>,
    u: faer::MatRef<f32>,
    d: &[f32],
    pattern: Pattern,
) {
    let (rows, count) = w.shape();
    let mut pruned: Mat<bool> = match mask {
        Some(m) => Mat::from_fn(rows, count, |r, c| m[(r, c)]),
        None => Mat::from_fn(rows, count, |_, _| false),
    };
    for i in 0..count {
        if let Pattern::NM { n, m } = pattern
            && i % m == 0
        {
            let width = m.min(count - i);
            let scores = Mat::from_fn(rows, width, |r, c| w[(r, i + c)] * w[(r, i + c)] / (d[i + c] * d[i + c]));
            let gm = mask::mask_nm(&scores, n, m);
            for r in 0..rows {
                for c in 0..width {
                    if gm[(r, c)] {
                        pruned[(r, i + c)] = true;
                    }
                }
            }
        }
        for r in 0..rows {
            let wv = w[(r, i)];
            let q = if pruned[(r, i)] { 0.0 } else { wv };
            err[(r, i)] = (wv - q) / d[i];
            w[(r, i)] = q;
        }
        let e = err.as_ref().col(i).try_as_col_major().expect("contiguous column").as_slice();
        for c in i + 1..count {
            let uc = u[(i, c)];
            let wc = w.as_mut().col_mut(c).try_as_col_major_mut().expect("contiguous column").as_slice_mut();
            for (w, &e) in wc.iter_mut().zip(e) {
                if e != 0.0 {
                    *w -= e * uc;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use faer::linalg::solvers::DenseSolveCore;

    fn problem(rows: usize, cols: usize, seed: u64) -> (Mat<f32>, Mat<f32>) {
        let mut s = seed;
        let mut next = move || {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 33) as f64 / (1u64 << 31) as f64 - 0.5) as f32
        };
        let w = Mat::from_fn(rows, cols, |_, _| next());
        // Correlated inputs, like activations.
        let tokens = 3 * cols;
        let base: Vec<f32> = (0..tokens).map(|_| next()).collect();
        let x = Mat::from_fn(tokens, cols, |t, j| next() + 0.7 * base[t] * (j % 3) as f32);
        let mut g = Mat::<f32>::zeros(cols, cols);
        faer::linalg::matmul::matmul(g.as_mut(), Accum::Replace, x.transpose(), x.as_ref(), 1.0f32, faer::Par::Seq);
        (w, g)
    }

    /// Unblocked optimal brain surgeon with explicit inverses, independent of the Cholesky trick: column by
    /// column, `d_i² = [(H_F)⁻¹]₀₀` over the remaining columns F = {i..}, and pruning w_i moves the rest by
    /// `−(w_i / [(H_F)⁻¹]₀₀) · (H_F)⁻¹[:, 0]`. The mask is chosen at the same points with the same rule.
    fn obs_reference(w: &Mat<f32>, g: &Mat<f32>, pattern: Pattern, blocksize: usize, percdamp: f64) -> Mat<f32> {
        let mut w32 = w.clone();
        let h = damped_hessian(g, &mut w32, percdamp);
        let (rows, cols) = w.shape();
        let mut w = Mat::<f64>::from_fn(rows, cols, |i, j| w32[(i, j)] as f64);
        let inv_tail: Vec<Mat<f64>> = (0..cols)
            .map(|i| h.submatrix(i, i, cols - i, cols - i).to_owned().llt(Side::Lower).unwrap().inverse())
            .collect();
        let d: Vec<f64> = (0..cols).map(|i| inv_tail[i][(0, 0)].sqrt()).collect();
        let mut mask = Mat::from_fn(rows, cols, |_, _| false);
        for i in 0..cols {
            match pattern {
                Pattern::Unstructured(s) if i % blocksize == 0 => {
                    let c = blocksize.min(cols - i);
                    let sc =
                        Mat::from_fn(rows, c, |r, k| (w[(r, i + k)] * w[(r, i + k)] / (d[i + k] * d[i + k])) as f32);
                    let m = mask::mask_per_matrix(&sc, s);
                    for r in 0..rows {
                        for k in 0..c {
                            mask[(r, i + k)] = m[(r, k)];
                        }
                    }
                }
                Pattern::NM { n, m } if i % m == 0 => {
                    let sc =
                        Mat::from_fn(rows, m, |r, k| (w[(r, i + k)] * w[(r, i + k)] / (d[i + k] * d[i + k])) as f32);
                    let mm = mask::mask_nm(&sc, n, m);
                    for r in 0..rows {
                        for k in 0..m {
                            mask[(r, i + k)] = mm[(r, k)];
                        }
                    }
                }
                _ => {}
            }
            let hi = &inv_tail[i];
            for r in 0..rows {
                if mask[(r, i)] {
                    let f = w[(r, i)] / hi[(0, 0)];
                    for k in 0..cols - i {
                        w[(r, i + k)] -= f * hi[(k, 0)];
                    }
                    w[(r, i)] = 0.0;
                }
            }
        }
        Mat::from_fn(rows, cols, |i, j| w[(i, j)] as f32)
    }

    fn max_rel(a: &Mat<f32>, b: &Mat<f32>) -> f64 {
        let mut d = 0f64;
        let mut m = 0f64;
        for j in 0..a.ncols() {
            for i in 0..a.nrows() {
                d = d.max((a[(i, j)] - b[(i, j)]).abs() as f64);
                m = m.max(b[(i, j)].abs() as f64);
            }
        }
        d / m
    }

    #[test]
    fn blocked_sweep_equals_unblocked_obs_reference() {
        for (pattern, blocksize) in [
            (Pattern::Unstructured(0.5), 8),
            (Pattern::Unstructured(0.7), 16),
            (Pattern::Unstructured(0.6), 40),
            (Pattern::NM { n: 2, m: 4 }, 8),
            (Pattern::NM { n: 4, m: 8 }, 16),
        ] {
            let (w, g) = problem(6, 40, 3);
            let got = SparseGpt(Options { percdamp: 0.01, blocksize }).prune_gram(&w, &g, pattern).unwrap();
            let want = obs_reference(&w, &g, pattern, blocksize, 0.01);
            let e = max_rel(&got, &want);
            assert!(e < 1e-4, "{pattern:?} block {blocksize}: max rel diff {e}");
            // Same zeros, and the pattern holds.
            for j in 0..40 {
                for i in 0..6 {
                    assert_eq!(got[(i, j)] == 0.0, want[(i, j)] == 0.0, "{pattern:?} ({i},{j})");
                }
            }
            mask::verify(&got, pattern, 40 / blocksize + 1).unwrap();
        }
    }

    #[test]
    fn update_beats_plain_masking() {
        // The OBS update must lower the output error against the same mask without update.
        let (w, g) = problem(8, 48, 11);
        let pruned = SparseGpt::default().prune_gram(&w, &g, Pattern::Unstructured(0.5)).unwrap();
        let masked = Mat::from_fn(8, 48, |i, j| if pruned[(i, j)] == 0.0 { 0.0 } else { w[(i, j)] });
        let err = |p: &Mat<f32>| super::super::stats::quad_error((p - &w).as_ref(), g.as_ref());
        assert!(err(&pruned) < 0.8 * err(&masked), "{} vs {}", err(&pruned), err(&masked));
    }

    #[test]
    fn dead_inputs_get_zero_weights() {
        let (w, mut g) = problem(4, 16, 5);
        for k in 0..16 {
            g[(3, k)] = 0.0;
            g[(k, 3)] = 0.0;
        }
        let out = SparseGpt::default().prune_gram(&w, &g, Pattern::Unstructured(0.25)).unwrap();
        assert!((0..4).all(|i| out[(i, 3)] == 0.0));
    }
}
