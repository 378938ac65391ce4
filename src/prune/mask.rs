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

/// A mask (true = prune) of the same shape as the scores `(rows, cols)`.
pub type Mask = Mat<bool>;

/// Per row: the `k = round(cols·s)` lowest scores of each row (Wanda; magnitude per row).
pub fn mask_per_row(scores: &Mat<f32>, s: f64) -> Mask {
    let (r, c) = scores.shape();
    let k = count_for(c, s);
    let mut mask = Mat::from_fn(r, c, |_, _| false);
    for i in 0..r {
        let row: Vec<f32> = (0..c).map(|j| scores[(i, j)]).collect();
        for j in lowest_k(&row, k) {
            mask[(i, j)] = true;
        }
    }
    mask
}

/// Per row, a count of its own: the `budgets[i]` lowest scores of row `i` (FISTAPruner keeping the row
/// budgets of its warm start, such as SparseGPT's, which spreads an unstructured target unevenly over rows).
pub fn mask_row_budgets(scores: &Mat<f32>, budgets: &[usize]) -> Mask {
    let (r, c) = scores.shape();
    assert_eq!(budgets.len(), r, "one budget per row");
    let mut mask = Mat::from_fn(r, c, |_, _| false);
    for (i, &k) in budgets.iter().enumerate() {
        let row: Vec<f32> = (0..c).map(|j| scores[(i, j)]).collect();
        for j in lowest_k(&row, k.min(c)) {
            mask[(i, j)] = true;
        }
    }
    mask
}

/// Over the whole matrix: the `round(rows·cols·s)` lowest scores (magnitude, SparseGPT's blocks).
pub fn mask_per_matrix(scores: &Mat<f32>, s: f64) -> Mask {
    let (r, c) = scores.shape();
    let k = count_for(r * c, s);
    // Column-major flattening: index = j·r + i.
    let flat: Vec<f32> = (0..c).flat_map(|j| (0..r).map(move |i| (i, j))).map(|(i, j)| scores[(i, j)]).collect();
    let mut mask = Mat::from_fn(r, c, |_, _| false);
    for f in lowest_k(&flat, k) {
        mask[(f % r, f / r)] = true;
    }
    mask
}

/// N:M: in each row, the `n` lowest of every `m` consecutive scores.
pub fn mask_nm(scores: &Mat<f32>, n: usize, m: usize) -> Mask {
    let (r, c) = scores.shape();
    let mut mask = Mat::from_fn(r, c, |_, _| false);
    for i in 0..r {
        for g in (0..c).step_by(m) {
            let w = m.min(c - g);
            let grp: Vec<f32> = (g..g + w).map(|j| scores[(i, j)]).collect();
            for j in lowest_k(&grp, n.min(w)) {
                mask[(i, g + j)] = true;
            }
        }
    }
    mask
}

/// The mask a pattern gives from scores, for methods that select it in one go.
pub fn select(scores: &Mat<f32>, pattern: Pattern, per_row: bool) -> Mask {
    match pattern {
        Pattern::Unstructured(s) if per_row => mask_per_row(scores, s),
        Pattern::Unstructured(s) => mask_per_matrix(scores, s),
        Pattern::NM { n, m } => mask_nm(scores, n, m),
    }
}

/// Zero the masked weights.
pub fn apply(w: &mut Mat<f32>, mask: &Mask) {
    for j in 0..w.ncols() {
        for i in 0..w.nrows() {
            if mask[(i, j)] {
                w[(i, j)] = 0.0;
            }
        }
    }
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
        Pattern::Unstructured(s) => {
            let want = count_for(r * c, s);
            ensure!(
                z + units >= want,
                "{z} zeros of {} ({:.4}), below the {} the {:.1}% target asks",
                r * c,
                z as f64 / (r * c) as f64,
                want,
                s * 100.0
            );
        }
        Pattern::NM { n, m } => {
            for i in 0..r {
                for g in (0..c).step_by(m) {
                    let zg = (g..(g + m).min(c)).filter(|&j| w[(i, j)] == 0.0).count();
                    ensure!(zg >= n, "row {i}, inputs {g}..{}: {zg} zeros, the {n}:{m} pattern needs {n}", g + m);
                }
            }
        }
    }
    Ok(z as f64 / (r * c) as f64)
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
        let mut w = Mat::from_fn(2, 8, |i, j| (i + j + 1) as f32);
        let m = mask_nm(&w.clone(), 2, 4);
        apply(&mut w, &m);
        assert!((verify(&w, Pattern::NM { n: 2, m: 4 }, 0).unwrap() - 0.5).abs() < 1e-12);
        w[(1, 5)] = 7.0;
        w[(1, 4)] = 7.0;
        w[(1, 6)] = 7.0;
        assert!(verify(&w, Pattern::NM { n: 2, m: 4 }, 0).is_err());
        assert!(verify(&w, Pattern::Unstructured(0.5), 0).is_err());
    }
}
