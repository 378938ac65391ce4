//! Wanda (Sun et al. 2023): score `|W_ij| · ‖X_j‖₂`, drop the lowest scores of each output row (N:M: the
//! lowest n of every m consecutive inputs); no weight update. `‖X_j‖²` is the Gram diagonal, collected alone
//! ([`super::stats::SquareSums`]) unless the whole Gram matrix is collected anyway (error correction, or
//! FISTAPruner's warm start).

use anyhow::Result;
use candle_core::Tensor;
use faer::Mat;

use super::device_mask;
use super::mask::{self, Pattern};
use super::{Method, MethodOptions, Observes, OpStats, Pruned, Registered, needs_stats};

pub const METHOD: Registered = Registered { name: "wanda", build };

fn build(_: &MethodOptions) -> Result<Box<dyn Method>> {
    Ok(Box::new(Wanda))
}

pub struct Wanda;

impl Method for Wanda {
    fn observes(&self) -> Observes {
        Observes::Norms
    }

    fn prune(&self, w: &Mat<f32>, stats: Option<&OpStats>, pattern: Pattern) -> Result<Pruned> {
        let norms = needs_stats(stats, "wanda")?.norms()?;
        // On all threads: a 7B layer is 200M scores.
        let scores = crate::linalg::mat_from_fn(w.nrows(), w.ncols(), |i, j| w[(i, j)].abs() * norms[j]);
        let out = mask::zeroed(w, &mask::select(&scores, pattern, true));
        Ok(Pruned::per_row(out))
    }

    fn prune_on_device(&self, w: &Tensor, stats: Option<&OpStats>, pattern: Pattern) -> Result<Option<Pruned<Tensor>>> {
        if !device_mask::takes(pattern) {
            return Ok(None);
        }
        let norms = needs_stats(stats, "wanda")?.norms()?;
        let norms = Tensor::from_vec(norms, (1, w.dim(1)?), w.device())?;
        let mask = device_mask::select(&w.abs()?.broadcast_mul(&norms)?, pattern, true)?;
        Ok(Some(Pruned::masked(device_mask::zeroed(w, &mask)?, w.dim(0)?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_match_a_hand_computation() {
        // W = [[1, -2, 3, 0.5]], ‖X_j‖² = [4, 1, 0.25, 16] → ‖X_j‖ = [2, 1, 0.5, 4]
        // scores = [2, 2, 1.5, 2]: 50 % per row drops inputs 2 (1.5) and 0 (2, first of the ties).
        let w = Mat::from_fn(1, 4, |_, j| [1.0, -2.0, 3.0, 0.5][j]);
        let g = Mat::from_fn(4, 4, |i, j| if i == j { [4.0, 1.0, 0.25, 16.0][i] } else { 0.3 });
        let st = OpStats::of_gram(g);
        let out = Wanda.prune(&w, Some(&st), Pattern::Unstructured(0.5)).unwrap().w;
        assert_eq!((0..4).map(|j| out[(0, j)]).collect::<Vec<_>>(), vec![0.0, -2.0, 0.0, 0.5]);
        // 2:4 keeps the same two here; and so do the inputs' sums of squares alone (what Wanda collects).
        let sums = OpStats::of_square_sums(vec![4.0, 1.0, 0.25, 16.0]);
        for st in [&st, &sums] {
            let out = Wanda.prune(&w, Some(st), Pattern::NM { n: 2, m: 4 }).unwrap().w;
            assert_eq!((0..4).map(|j| out[(0, j)]).collect::<Vec<_>>(), vec![0.0, -2.0, 0.0, 0.5]);
        }
    }
}
