//! [`mask::select`](super::mask::select) and [`mask::verify`](super::mask::verify) on the run's device, by
//! candle's operators, for the methods whose whole work is a mask (magnitude, Wanda), and for FISTAPruner's
//! hard thresholds where its iterates are on the device.
//!
//! On the host their weights made a round trip per operator (a LLaMA-2-7B layer's 0.8 GB down and up again,
//! and a selection over its 202M scores between): by estimate 0.2–0.4 s a layer, against the 0.9 s a layer
//! the authors' whole Wanda takes. Here the `k`-th lowest score of each row (or of the matrix) is found by
//! bisection on its bit pattern (the scores are non-negative, and such floats order as their bits do), 31
//! counting passes, and the ties at it by bisection on the column, about 13 more; only per-row counts cross
//! the bus. The mask is the host's to the bit: the lowest scores, ties to the lower position (per matrix, in
//! column-major order). On the CPU the same code runs under `FISTAPRUNE_GENERIC=1`; the tests compare it with
//! the host's selection there.

use anyhow::{Result, ensure};
use candle_core::{D, DType, Tensor};

use super::mask::{self, Pattern, count_for};

/// The mask (u8, 1 = prune) `pattern` gives the non-negative, finite `scores` `(rows, cols)`: `k` of each
/// row's lowest (`per_row`), of the whole matrix's, or `n` of every `m` consecutive.
pub fn select(scores: &Tensor, pattern: Pattern, per_row: bool) -> Result<Tensor> {
    let (rows, cols) = scores.dims2()?;
    match pattern {
        Pattern::Unstructured(s) if per_row => lowest(scores, Count::Rows(vec![count_for(cols, s) as u64; rows])),
        Pattern::Unstructured(s) => {
            // In column-major order, as the host flattens a matrix: the transpose's rows.
            let mask = lowest(&scores.t()?.contiguous()?, Count::Whole(count_for(rows * cols, s) as u64))?;
            Ok(mask.t()?.contiguous()?)
        }
        Pattern::NM { n, m } => lowest_in_groups(scores, n, m),
    }
}

/// [`mask::mask_row_budgets`](super::mask::mask_row_budgets) on the device: the `budgets[i]` lowest of row `i`.
pub fn select_budgets(scores: &Tensor, budgets: &[usize]) -> Result<Tensor> {
    ensure!(budgets.len() == scores.dims2()?.0, "one budget per row");
    lowest(scores, Count::Rows(budgets.iter().map(|&b| b as u64).collect()))
}

/// How many of the lowest scores [`lowest`] marks: each row's own count, or a count over the whole matrix in
/// row-major order.
enum Count {
    Rows(Vec<u64>),
    Whole(u64),
}

/// The lowest scores of each row or of the whole matrix, as many as `count` says; every count by
/// [`row_counts`].
fn lowest(scores: &Tensor, count: Count) -> Result<Tensor> {
    let (rows, cols) = scores.dims2()?;
    let dev = scores.device();
    let whole = matches!(count, Count::Whole(_));
    let want = match count {
        Count::Rows(k) => k.into_iter().map(|k| k.min(cols as u64)).collect(),
        Count::Whole(k) => vec![k.min((rows * cols) as u64)],
    };
    let top = if whole { (rows * cols) as u64 } else { cols as u64 };
    // Nothing or everything (or no rows): no counting.
    for (all, flag) in [(0, 0u8), (top, 1)] {
        if want.iter().all(|&k| k == all) {
            return Ok(Tensor::full(flag, (rows, cols), dev)?);
        }
    }
    let per_row = |t: Tensor| row_counts(&t);
    let per_segment = |t: Tensor| -> Result<Vec<u64>> {
        let c = per_row(t)?;
        Ok(if whole { vec![c.iter().sum()] } else { c })
    };
    // The k-th lowest score of each segment: the lowest bit pattern t with at least k scores ≤ t.
    let bits = |b: &[u32]| Tensor::from_vec(b.iter().map(|&b| f32::from_bits(b)).collect(), (b.len(), 1), dev);
    let t = bisect(f32::INFINITY.to_bits(), &want, |mid| per_segment(scores.broadcast_le(&bits(mid)?)?))?;
    let t = bits(&t)?;
    let less = scores.broadcast_lt(&t)?;
    let equal = scores.broadcast_eq(&t)?;
    // Of the scores equal to t, the first k − (scores below t) by position: each row's quota of them (in row
    // order over a whole matrix), then in each row the lowest column p with its quota before it.
    let below = per_row(less.clone())?;
    let quotas: Vec<u64> = if whole {
        let mut left = want[0] - below.iter().sum::<u64>();
        per_row(equal.clone())?
            .into_iter()
            .map(|e| {
                let q = e.min(left);
                left -= q;
                q
            })
            .collect()
    } else {
        below.iter().zip(&want).map(|(&b, &k)| k - b).collect()
    };
    let column = Tensor::arange(0u32, cols as u32, dev)?.reshape((1, cols))?;
    let before = |p: &[u32]| -> Result<Tensor> {
        let p = Tensor::from_vec(p.to_vec(), (rows, 1), dev)?;
        Ok((&equal * column.broadcast_lt(&p)?)?)
    };
    let p = bisect(cols as u32, &quotas, |mid| per_row(before(mid)?))?;
    Ok((less + before(&p)?)?)
}

/// Each row's count of the non-zero entries of `t` `(rows, cols)`: summed per row on the device (candle's CUDA
/// sum to a single value is one thread block's work), so that a whole matrix's count is added up on the host.
pub(super) fn row_counts(t: &Tensor) -> Result<Vec<u64>> {
    let counts = t.to_dtype(DType::U32)?.sum_keepdim(1)?.flatten_all()?.to_vec1::<u32>()?;
    Ok(counts.into_iter().map(u64::from).collect())
}

/// For each of `want`'s entries, the lowest `x` in `0..=top` with `count(x) ≥ want`, `count` being monotone
/// and evaluated for all entries at once.
fn bisect(top: u32, want: &[u64], count: impl Fn(&[u32]) -> Result<Vec<u64>>) -> Result<Vec<u32>> {
    let (mut lo, mut hi) = (vec![0u32; want.len()], vec![top; want.len()]);
    while lo.iter().zip(&hi).any(|(l, h)| l < h) {
        let mid: Vec<u32> = lo.iter().zip(&hi).map(|(&l, &h)| l + (h - l) / 2).collect();
        for (r, c) in count(&mid)?.into_iter().enumerate() {
            if lo[r] < hi[r] {
                if c >= want[r] { hi[r] = mid[r] } else { lo[r] = mid[r] + 1 }
            }
        }
    }
    Ok(lo)
}

/// The widest N:M group chosen on the device: its ranks are counted in u8, and its work grows as `m²`.
pub const MAX_GROUP: usize = 32;

/// In each row, the `n` lowest of every `m` consecutive: a score's rank in its group is the number of
/// others below it, or equal to it and before it.
fn lowest_in_groups(scores: &Tensor, n: usize, m: usize) -> Result<Tensor> {
    let (rows, cols) = scores.dims2()?;
    ensure!(cols.is_multiple_of(m), "{n}:{m}: {cols} inputs, not a multiple of {m}");
    ensure!(m <= MAX_GROUP, "{n}:{m}: groups wider than {MAX_GROUP} are chosen on the host");
    let g = scores.reshape((rows, cols / m, m))?;
    let at = |j: usize| g.narrow(2, j, 1);
    let mut pruned = Vec::with_capacity(m);
    for j in 0..m {
        let sj = at(j)?;
        let mut rank = sj.zeros_like()?.to_dtype(DType::U8)?;
        for i in (0..m).filter(|&i| i != j) {
            let before = if i < j { at(i)?.le(&sj)? } else { at(i)?.lt(&sj)? };
            rank = (rank + before)?;
        }
        pruned.push(rank.lt(n as u8)?);
    }
    Ok(Tensor::cat(&pruned, 2)?.reshape((rows, cols))?)
}

/// A device mask (u8, 1 = prune) as the host's [`mask::Mask`].
pub fn to_host(mask: &Tensor) -> Result<mask::Mask> {
    let (rows, cols) = mask.dims2()?;
    let flags = mask.flatten_all()?.to_vec1::<u8>()?;
    Ok(crate::linalg::mat_from_fn(rows, cols, |i, j| flags[i * cols + j] != 0))
}

/// The host's [`mask::Mask`] as a mask on `device` (u8, 1 = prune).
pub fn from_host(mask: &mask::Mask, device: &candle_core::Device) -> Result<Tensor> {
    Ok(Tensor::from_vec(crate::linalg::row_major(mask.as_ref(), u8::from), mask.shape(), device)?)
}

/// Whether [`select`] takes `pattern` on the device: N:M groups up to [`MAX_GROUP`] wide.
pub fn takes(pattern: Pattern) -> bool {
    !matches!(pattern, Pattern::NM { m, .. } if m > MAX_GROUP)
}

/// `w` with the weights `mask` marks exactly zero (positive zero, as the host writes them).
pub fn zeroed(w: &Tensor, mask: &Tensor) -> Result<Tensor> {
    Ok(mask.where_cond(&Tensor::zeros((), w.dtype(), w.device())?.broadcast_as(w.shape())?, w)?)
}

/// [`mask::verify`](super::mask::verify) of a device weight: its measured sparsity, or the host's error.
pub fn verify(w: &Tensor, pattern: Pattern, units: usize) -> Result<f64> {
    let (rows, cols) = w.dims2()?;
    let zero = w.eq(0f32)?;
    let total = |t: &Tensor| -> Result<u64> { Ok(row_counts(t)?.iter().sum()) };
    let z = total(&zero)? as usize;
    match pattern {
        Pattern::Unstructured(s) => mask::check_zeros(z, rows * cols, s, units)?,
        Pattern::NM { n, m } => {
            let per_group = zero.reshape((rows, cols / m, m))?.to_dtype(DType::U32)?.sum(D::Minus1)?;
            if total(&per_group.lt(n as u32)?)? > 0 {
                let counts = per_group.to_vec2::<u32>()?;
                let (i, g, zg) = counts
                    .iter()
                    .enumerate()
                    .flat_map(|(i, r)| r.iter().enumerate().map(move |(g, &zg)| (i, g * m, zg as usize)))
                    .find(|&(_, _, zg)| zg < n)
                    .expect("a group below n");
                anyhow::bail!(mask::group_short(i, g, zg, n, m));
            }
        }
    }
    Ok(z as f64 / (rows * cols) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prune::mask;
    use candle_core::Device;

    /// Scores with many exact ties (a few levels, as 4-bit weights give) and zeros, some rows all equal.
    fn scores(rows: usize, cols: usize, levels: u64, seed: u64) -> faer::Mat<f32> {
        let mut s = seed;
        faer::Mat::from_fn(rows, cols, |i, _| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            if i == 3 { 0.25 } else { ((s >> 33) % levels) as f32 * 0.37 }
        })
    }

    fn on_cpu(m: &faer::Mat<f32>) -> Tensor {
        crate::linalg::mat_to_tensor(m).unwrap()
    }

    fn host_mask(m: &mask::Mask) -> Vec<Vec<u8>> {
        (0..m.nrows()).map(|i| (0..m.ncols()).map(|j| u8::from(m[(i, j)])).collect()).collect()
    }

    /// The device selection's masks are the host's, bit for bit, on every pattern and count, ties included.
    #[test]
    fn device_selection_gives_the_hosts_masks() {
        for (rows, cols, levels, seed) in [(7, 24, 5, 1), (9, 40, 3, 2), (5, 16, 1000, 3), (6, 8, 2, 4)] {
            let s = scores(rows, cols, levels, seed);
            let t = on_cpu(&s);
            for pattern in [0.0, 0.1, 0.5, 0.7, 1.0].map(Pattern::Unstructured).into_iter().chain([
                Pattern::NM { n: 2, m: 4 },
                Pattern::NM { n: 4, m: 8 },
                Pattern::NM { n: 1, m: 4 },
            ]) {
                for per_row in [true, false] {
                    let want = host_mask(&mask::select(&s, pattern, per_row));
                    let got = select(&t, pattern, per_row).unwrap().to_vec2::<u8>().unwrap();
                    assert_eq!(got, want, "{rows}×{cols}, {levels} levels, {pattern:?}, per row {per_row}");
                }
            }
        }
    }

    /// Row budgets (FISTAPruner's warm rows) too, with rows that keep all or nothing.
    #[test]
    fn device_row_budgets_give_the_hosts_masks() {
        for (rows, cols, levels, seed) in [(7, 24, 5, 6), (9, 40, 3, 7), (5, 16, 1000, 8)] {
            let s = scores(rows, cols, levels, seed);
            let budgets: Vec<usize> = (0..rows).map(|i| [0, cols, 1, cols / 2, cols - 1, 3][i % 6]).collect();
            let want = host_mask(&mask::mask_row_budgets(&s, &budgets));
            let got = select_budgets(&on_cpu(&s), &budgets).unwrap().to_vec2::<u8>().unwrap();
            assert_eq!(got, want, "{rows}×{cols}, {levels} levels, budgets {budgets:?}");
        }
        // All rows alike at the ends.
        let s = scores(4, 8, 3, 9);
        for b in [0, 8] {
            let got = select_budgets(&on_cpu(&s), &[b; 4]).unwrap().to_vec2::<u8>().unwrap();
            assert_eq!(got, host_mask(&mask::mask_row_budgets(&s, &[b; 4])));
        }
    }

    /// The device check passes and fails where the host's does, with its messages.
    #[test]
    fn device_verify_is_the_hosts() {
        let s = scores(6, 16, 4, 5);
        for (pattern, units) in [(Pattern::Unstructured(0.5), 1), (Pattern::NM { n: 2, m: 4 }, 6)] {
            let w = mask::zeroed(&s, &mask::select(&s, pattern, true));
            // Each weight made non-zero where it was zero, then one zero too few.
            let w = faer::Mat::from_fn(6, 16, |i, j| if w[(i, j)] == 0.0 { 0.0 } else { w[(i, j)] + 1.0 });
            let host = mask::verify(&w, pattern, units).unwrap();
            assert_eq!(verify(&on_cpu(&w), pattern, units).unwrap(), host);
            let mut short = w.clone();
            let (i, j) = (0..6).flat_map(|i| (0..16).map(move |j| (i, j))).find(|&(i, j)| w[(i, j)] == 0.0).unwrap();
            short[(i, j)] = 1.0;
            if let Pattern::Unstructured(_) = pattern {
                // One unit of rounding is allowed: take away two more.
                let more: Vec<(usize, usize)> =
                    (0..6).flat_map(|i| (0..16).map(move |j| (i, j))).filter(|&(i, j)| short[(i, j)] == 0.0).collect();
                more.iter().take(2).for_each(|&(i, j)| short[(i, j)] = 1.0);
            }
            let host = mask::verify(&short, pattern, units).unwrap_err().to_string();
            assert_eq!(verify(&on_cpu(&short), pattern, units).unwrap_err().to_string(), host);
        }
    }

    /// Zeros are written as the host writes them: positive.
    #[test]
    fn zeroed_weights_are_positive_zeros() {
        let w = Tensor::new(&[[-1.5f32, 2.0], [-0.5, 3.0]], &Device::Cpu).unwrap();
        let mask = Tensor::new(&[[1u8, 0], [1, 0]], &Device::Cpu).unwrap();
        let z = zeroed(&w, &mask).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(z.iter().flatten().map(|x| x.to_bits()).collect::<Vec<_>>(), [0, 2f32.to_bits(), 0, 3f32.to_bits()]);
    }
}
