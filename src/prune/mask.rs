//! Sparsity patterns and mask selection.
//!
//! A pattern is either unstructured (a fraction of zeros, counted per matrix, per row, or per block by the
//! method) or N:M (at least N zeros in every group of M consecutive inputs of a row: 2:4, 4:8). Selection
//! always takes the lowest scores, ties broken by position, so that a mask is a pure function of its scores.

use std::fmt;
use std::str::FromStr;

use anyhow::{Result, anyhow, bail, ensure};
use faer::Mat;

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pattern {
    /// This fraction of the weights is zero.
    Unstructured(f64),
    /// `n` zeros in every group of `m` consecutive inputs.
    NM { n: usize, m: usize },
}

impl Pattern {
    /// The fraction of zeros the pattern asks for.
    pub fn sparsity(&self) -> f64 {
        match *self {
            Pattern::Unstructured(s) => s,
            Pattern::NM { n, m } => n as f64 / m as f64,
        }
    }

    /// Check that the pattern can apply to a matrix with `cols` inputs.
    pub fn check_cols(&self, cols: usize, what: &str) -> Result<()> {
        if let Pattern::NM { n, m } = *self {
            ensure!(cols.is_multiple_of(m), "--pattern {n}:{m}: {what} has {cols} inputs, not a multiple of {m}");
        }
        Ok(())
    }

    /// Parse a `--sparsity` value.
    pub fn unstructured(s: f64) -> Result<Self> {
        ensure!(s > 0.0 && s < 1.0 && s.is_finite(), "--sparsity {s} is outside (0, 1)");
        Ok(Pattern::Unstructured(s))
    }
}

/// What to prune to: `--sparsity s` or `--pattern N:M`, exactly one of them.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
#[cfg_attr(feature = "cli", group(required = true, multiple = false))]
pub struct Target {
    /// Unstructured: this fraction of each operator's weights becomes zero.
    #[cfg_attr(feature = "cli", arg(long, value_parser = parse_sparsity))]
    pub sparsity: Option<f64>,
    /// Semi-structured N:M (N zeros in every M consecutive inputs), e.g. 2:4.
    #[cfg_attr(feature = "cli", arg(long, value_parser = parse_nm))]
    pub pattern: Option<Pattern>,
}

impl Target {
    pub fn pattern(&self) -> Result<Pattern> {
        match (self.sparsity, self.pattern) {
            (Some(s), None) => Pattern::unstructured(s),
            (None, Some(p)) => Ok(p),
            _ => bail!("give exactly one of --sparsity and --pattern"),
        }
    }
}

impl From<Pattern> for Target {
    fn from(p: Pattern) -> Self {
        match p {
            Pattern::Unstructured(s) => Self { sparsity: Some(s), pattern: None },
            Pattern::NM { .. } => Self { sparsity: None, pattern: Some(p) },
        }
    }
}

#[cfg(feature = "cli")]
fn parse_sparsity(s: &str) -> Result<f64> {
    let v: f64 = s.trim().parse().map_err(|_| anyhow!("{s:?} is not a number"))?;
    Pattern::unstructured(v).map(|_| v)
}

#[cfg(feature = "cli")]
fn parse_nm(s: &str) -> Result<Pattern> {
    s.parse()
}

impl FromStr for Pattern {
    type Err = anyhow::Error;
    /// `N:M` (e.g. `2:4`).
    fn from_str(s: &str) -> Result<Self> {
        let (n, m) = s.split_once(':').ok_or_else(|| anyhow!("--pattern {s:?}: expected N:M, e.g. 2:4"))?;
        let n: usize = n.trim().parse().map_err(|_| anyhow!("--pattern {s:?}: N is not a whole number"))?;
        let m: usize = m.trim().parse().map_err(|_| anyhow!("--pattern {s:?}: M is not a whole number"))?;
        if n == 0 || n >= m {
            bail!("--pattern {s}: N must be in 1..M (N zeros out of every M)");
        }
        Ok(Pattern::NM { n, m })
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pattern::Unstructured(s) => write!(f, "{:.0}%", s * 100.0),
            Pattern::NM { n, m } => write!(f, "{n}:{m}"),
        }
    }
}

/// How many of `total` weights an unstructured fraction `s` zeroes: round to nearest.
pub fn count_for(total: usize, s: f64) -> usize {
    ((total as f64 * s).round() as usize).min(total)
}

/// Indices of the `k` lowest of `scores` (ties: lower index first).
pub fn lowest_k(scores: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    if k == 0 {
        return Vec::new();
    }
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, |&a, &b| scores[a].total_cmp(&scores[b]).then(a.cmp(&b)));
        idx.truncate(k);
    }
    idx.sort_unstable();
    idx
}

/// Flags of the `k` lowest of `scores`: the set [`lowest_k`] gives, without its sort, and over a large slice
/// on all threads (the masks of whole matrices and of SparseGPT's blocks were serial sections of every
/// pruner, and on the GPU path the host's main serial work).
pub fn lowest_k_flags(scores: &[f32], k: usize) -> Vec<bool> {
    let n = scores.len();
    if k >= n || k == 0 {
        return vec![k >= n; n];
    }
    if n < PARALLEL_SELECT {
        let mut idx: Vec<usize> = (0..n).collect();
        idx.select_nth_unstable_by(k - 1, |&a, &b| scores[a].total_cmp(&scores[b]).then(a.cmp(&b)));
        let mut flags = vec![false; n];
        idx[..k].iter().for_each(|&i| flags[i] = true);
        return flags;
    }
    radix_lowest_k(scores, k)
}

/// Slices from this length select in parallel.
const PARALLEL_SELECT: usize = 1 << 16;

/// `x`'s place in `f32::total_cmp`'s order, as an unsigned key (negatives inverted, the rest above them).
fn order_key(x: f32) -> u32 {
    let b = x.to_bits();
    if b >> 31 == 1 { !b } else { b | 0x8000_0000 }
}

/// [`lowest_k_flags`] by a two-pass radix select on [`order_key`] (16 bits a pass, histograms per chunk on all
/// threads): the `k`-th lowest key `t`, every key below it, and of the keys equal to it the first ones in
/// slice order, as many as `k` still takes.
fn radix_lowest_k(scores: &[f32], k: usize) -> Vec<bool> {
    use rayon::prelude::*;
    let chunk = scores.len().div_ceil(4 * rayon::current_num_threads()).max(PARALLEL_SELECT / 4);
    let histogram = |bin: &(dyn Fn(u32) -> Option<usize> + Sync)| -> Vec<usize> {
        let per_chunk = scores.par_chunks(chunk).map(|c| {
            let mut h = vec![0usize; 1 << 16];
            c.iter().filter_map(|&x| bin(order_key(x))).for_each(|b| h[b] += 1);
            h
        });
        per_chunk.reduce(|| vec![0; 1 << 16], |a, b| a.into_iter().zip(b).map(|(a, b)| a + b).collect())
    };
    // The bin holding the `rank`-th lowest (0-based), and how many lie below it.
    let find = |h: &[usize], rank: usize| {
        let mut below = 0;
        for (bin, &count) in h.iter().enumerate() {
            if below + count > rank {
                return (bin as u32, below);
            }
            below += count;
        }
        unreachable!("rank {rank} within the histogram's {below}")
    };
    let (hi, below_hi) = find(&histogram(&|key| Some((key >> 16) as usize)), k - 1);
    let (lo, below_lo) =
        find(&histogram(&|key| (key >> 16 == hi).then_some((key & 0xffff) as usize)), k - 1 - below_hi);
    let t = hi << 16 | lo;
    // Of the keys equal to t, the first `ties` in slice order: each chunk's share from the counts before it.
    let ties = k - below_hi - below_lo;
    let equal: Vec<usize> =
        scores.par_chunks(chunk).map(|c| c.iter().filter(|&&x| order_key(x) == t).count()).collect();
    let mut flags = vec![false; scores.len()];
    flags.par_chunks_mut(chunk).zip(scores.par_chunks(chunk)).enumerate().for_each(|(ci, (f, c))| {
        let mut quota = ties.saturating_sub(equal[..ci].iter().sum());
        for (f, &x) in f.iter_mut().zip(c) {
            let key = order_key(x);
            *f = key < t || (key == t && quota > 0);
            quota -= usize::from(key == t && quota > 0);
        }
    });
    flags
}

/// A mask (true = prune) of the same shape as the scores `(rows, cols)`.
pub type Mask = Mat<bool>;

/// A mask from each row's flags, the rows on all threads: `row(i, scores of row i)` gives row `i`'s.
fn by_rows(scores: &Mat<f32>, row: impl Fn(usize, &[f32]) -> Vec<bool> + Sync) -> Mask {
    use rayon::prelude::*;
    let (r, c) = scores.shape();
    if c == 0 {
        return Mat::from_fn(r, c, |_, _| false);
    }
    let rows = crate::linalg::row_major(scores.as_ref(), |x| x);
    let flags: Vec<Vec<bool>> = rows.par_chunks(c).enumerate().map(|(i, s)| row(i, s)).collect();
    crate::linalg::mat_from_fn(r, c, |i, j| flags[i][j])
}

/// Per row: the `k = round(cols·s)` lowest scores of each row (Wanda; magnitude per row).
pub fn mask_per_row(scores: &Mat<f32>, s: f64) -> Mask {
    let k = count_for(scores.ncols(), s);
    by_rows(scores, |_, row| lowest_k_flags(row, k))
}

/// Per row, a count of its own: the `budgets[i]` lowest scores of row `i` (FISTAPruner keeping the row
/// budgets of its warm start, such as SparseGPT's, which spreads an unstructured target unevenly over rows).
pub fn mask_row_budgets(scores: &Mat<f32>, budgets: &[usize]) -> Mask {
    assert_eq!(budgets.len(), scores.nrows(), "one budget per row");
    by_rows(scores, |i, row| lowest_k_flags(row, budgets[i].min(row.len())))
}

/// Over the whole matrix: the `round(rows·cols·s)` lowest scores (magnitude, SparseGPT's blocks); ties go to
/// the lower position in column-major order.
pub fn mask_per_matrix(scores: &Mat<f32>, s: f64) -> Mask {
    let (r, c) = scores.shape();
    // Column-major flattening: index = j·r + i.
    let flat = crate::linalg::col_major(scores.as_ref());
    let flags = lowest_k_flags(&flat, count_for(r * c, s));
    crate::linalg::mat_from_fn(r, c, |i, j| flags[j * r + i])
}

/// N:M: in each row, the `n` lowest of every `m` consecutive scores.
pub fn mask_nm(scores: &Mat<f32>, n: usize, m: usize) -> Mask {
    by_rows(scores, |_, row| row.chunks(m).flat_map(|g| lowest_k_flags(g, n.min(g.len()))).collect())
}

/// The mask a pattern gives from scores, for methods that select it in one go.
pub fn select(scores: &Mat<f32>, pattern: Pattern, per_row: bool) -> Mask {
    match pattern {
        Pattern::Unstructured(s) if per_row => mask_per_row(scores, s),
        Pattern::Unstructured(s) => mask_per_matrix(scores, s),
        Pattern::NM { n, m } => mask_nm(scores, n, m),
    }
}

/// `w` with the masked weights zero, made in one pass on all threads.
pub fn zeroed(w: &Mat<f32>, mask: &Mask) -> Mat<f32> {
    crate::linalg::mat_from_fn(w.nrows(), w.ncols(), |i, j| if mask[(i, j)] { 0.0 } else { w[(i, j)] })
}

/// `|w|`, the magnitude score, on all threads.
pub fn magnitudes(w: &Mat<f32>) -> Mat<f32> {
    crate::linalg::mat_from_fn(w.nrows(), w.ncols(), |i, j| w[(i, j)].abs())
}

/// Number of exact zeros.
pub fn zeros(w: &Mat<f32>) -> usize {
    (0..w.ncols()).map(|j| (0..w.nrows()).filter(|&i| w[(i, j)] == 0.0).count()).sum()
}

/// Check that `w` meets `pattern` exactly; returns its measured sparsity.
///
/// Unstructured: at least `round(numel·s)` zeros over the matrix (methods that count per row or per block
/// round per unit, so the total may differ by less than one per unit: the check allows that).
/// N:M: at least `n` zeros in every group.
pub fn verify(w: &Mat<f32>, pattern: Pattern, units: usize) -> Result<f64> {
    let (r, c) = w.shape();
    let z = zeros(w);
    match pattern {
        Pattern::Unstructured(s) => check_zeros(z, r * c, s, units)?,
        Pattern::NM { n, m } => {
            for i in 0..r {
                for g in (0..c).step_by(m) {
                    let zg = (g..(g + m).min(c)).filter(|&j| w[(i, j)] == 0.0).count();
                    ensure!(zg >= n, group_short(i, g, zg, n, m));
                }
            }
        }
    }
    Ok(z as f64 / (r * c) as f64)
}

/// [`verify`]'s unstructured check: `z` zeros of `total` against the target `s`, less `units` of rounding.
pub fn check_zeros(z: usize, total: usize, s: f64, units: usize) -> Result<()> {
    let want = count_for(total, s);
    ensure!(
        z + units >= want,
        "{z} zeros of {total} ({:.4}), below the {want} the {:.1}% target asks",
        z as f64 / total as f64,
        s * 100.0
    );
    Ok(())
}

/// [`verify`]'s N:M failure: row `i`'s group from input `g` has only `zg` zeros.
pub fn group_short(i: usize, g: usize, zg: usize, n: usize, m: usize) -> String {
    format!("row {i}, inputs {g}..{}: {zg} zeros, the {n}:{m} pattern needs {n}", g + m)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scores() -> Mat<f32> {
        Mat::from_fn(4, 8, |i, j| ((i * 37 + j * 11) % 17) as f32)
    }

    #[test]
    fn parse_patterns() {
        assert_eq!("2:4".parse::<Pattern>().unwrap(), Pattern::NM { n: 2, m: 4 });
        assert!("4:4".parse::<Pattern>().is_err());
        assert!("0:4".parse::<Pattern>().is_err());
        assert!("2-4".parse::<Pattern>().is_err());
        assert!(Pattern::unstructured(1.0).is_err());
        assert!(Pattern::unstructured(0.0).is_err());
        assert!(Pattern::unstructured(f64::NAN).is_err());
        assert!(Pattern::NM { n: 2, m: 4 }.check_cols(6, "x").is_err());
    }

    #[test]
    fn lowest_k_breaks_ties_by_position() {
        assert_eq!(lowest_k(&[3.0, 1.0, 1.0, 0.0, 1.0], 3), vec![1, 2, 3]);
        assert_eq!(lowest_k(&[1.0, 1.0], 0), Vec::<usize>::new());
        assert_eq!(lowest_k(&[1.0, 1.0], 5), vec![0, 1]);
    }

    /// The flags are [`lowest_k`]'s set, small slices and large ones (the parallel radix select), with ties
    /// in quantised scores, negative values, both zeros, infinities and NaN, at every kind of `k`.
    #[test]
    fn lowest_k_flags_are_lowest_ks_set() {
        let mut state = 7u64;
        let mut next = move || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 33) as u32
        };
        for n in [1, 5, 300, 70_001, 200_003] {
            // Few distinct values, so that the k-th lowest is tied many times over.
            let specials = [0.0, -0.0, f32::INFINITY, f32::NEG_INFINITY, f32::NAN, -f32::NAN, 1e-30, -1e-30];
            let scores: Vec<f32> = (0..n)
                .map(|_| match next() % 10 {
                    0 => specials[next() as usize % specials.len()],
                    _ => (next() % 50) as f32 * 0.25 - 4.0,
                })
                .collect();
            for k in [0, 1, n / 3, n / 2, n - 1, n, n + 3] {
                let mut want = vec![false; n];
                lowest_k(&scores, k).into_iter().for_each(|i| want[i] = true);
                assert!(lowest_k_flags(&scores, k) == want, "n {n}, k {k}");
            }
        }
    }

    #[test]
    fn masks_meet_their_patterns_exactly() {
        let s = scores();
        let m = mask_per_row(&s, 0.5);
        for i in 0..4 {
            assert_eq!((0..8).filter(|&j| m[(i, j)]).count(), 4);
        }
        let m = mask_per_matrix(&s, 0.3);
        assert_eq!((0..4).flat_map(|i| (0..8).map(move |j| (i, j))).filter(|&(i, j)| m[(i, j)]).count(), 10);
        let m = mask_nm(&s, 2, 4);
        for i in 0..4 {
            for g in [0, 4] {
                assert_eq!((g..g + 4).filter(|&j| m[(i, j)]).count(), 2);
            }
        }
        // The masked entries are the lowest: every masked score ≤ every kept score in its unit.
        let m = mask_per_matrix(&s, 0.5);
        let masked =
            (0..4).flat_map(|i| (0..8).map(move |j| (i, j))).filter(|&(i, j)| m[(i, j)]).map(|(i, j)| s[(i, j)]);
        let kept =
            (0..4).flat_map(|i| (0..8).map(move |j| (i, j))).filter(|&(i, j)| !m[(i, j)]).map(|(i, j)| s[(i, j)]);
        assert!(masked.fold(f32::MIN, f32::max) <= kept.fold(f32::MAX, f32::min));
    }

    #[test]
    fn verify_catches_a_pattern_violation() {
        let w = Mat::from_fn(2, 8, |i, j| (i + j + 1) as f32);
        let mut w = zeroed(&w, &mask_nm(&w, 2, 4));
        assert!((verify(&w, Pattern::NM { n: 2, m: 4 }, 0).unwrap() - 0.5).abs() < 1e-12);
        w[(1, 5)] = 7.0;
        w[(1, 4)] = 7.0;
        w[(1, 6)] = 7.0;
        assert!(verify(&w, Pattern::NM { n: 2, m: 4 }, 0).is_err());
        assert!(verify(&w, Pattern::Unstructured(0.5), 0).is_err());
    }
}
