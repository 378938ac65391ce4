//! Magnitude pruning: drop the smallest `|w|`, per matrix (as the Wanda repository's baseline does) or per
//! output row. No calibration data, no weight update.

use anyhow::Result;
use faer::Mat;

use super::mask::{self, Pattern};
use super::{Method, OpStats, Pruned};

pub struct Magnitude {
    /// One threshold per output row instead of one per matrix.
    pub per_row: bool,
}

impl Method for Magnitude {
    fn name(&self) -> &'static str {
        "magnitude"
    }

    fn needs_gram(&self) -> bool {
        false
    }

    fn rounding_units(&self, rows: usize, _cols: usize, _pattern: Pattern) -> usize {
        if self.per_row { rows } else { 1 }
    }

    fn prune(&self, w: &Mat<f32>, _stats: Option<&OpStats>, pattern: Pattern) -> Result<Pruned> {
        let scores = Mat::from_fn(w.nrows(), w.ncols(), |i, j| w[(i, j)].abs());
        let mut out = w.clone();
        mask::apply(&mut out, &mask::select(&scores, pattern, self.per_row));
        Ok(out.into())
    }
}
