//! Magnitude pruning: drop the smallest `|w|`, per matrix (as the Wanda repository's baseline does) or per
//! output row. No calibration data, no weight update.

use anyhow::Result;
use candle_core::Tensor;
use faer::Mat;
use serde::{Deserialize, Serialize};

use super::device_mask;
use super::mask::{self, Pattern};
use super::{Method, MethodOptions, Observes, OpStats, Pruned, Registered};

pub const METHOD: Registered = Registered { name: "magnitude", build };

fn build(o: &MethodOptions) -> Result<Box<dyn Method>> {
    Ok(Box::new(Magnitude { per_row: o.magnitude.per_row }))
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct Options {
    /// Magnitude: one threshold per output row instead of per matrix.
    #[cfg_attr(feature = "cli", arg(long))]
    pub per_row: bool,
}

pub struct Magnitude {
    /// One threshold per output row instead of one per matrix.
    pub per_row: bool,
}

impl Method for Magnitude {
    fn observes(&self) -> Observes {
        Observes::Nothing
    }

    fn prune(&self, w: &Mat<f32>, _stats: Option<&OpStats>, pattern: Pattern) -> Result<Pruned> {
        let out = mask::zeroed(w, &mask::select(&mask::magnitudes(w), pattern, self.per_row));
        Ok(Pruned::masked(out, self.units(w.nrows())))
    }

    fn prune_on_device(
        &self,
        w: &Tensor,
        _stats: Option<&OpStats>,
        pattern: Pattern,
    ) -> Result<Option<Pruned<Tensor>>> {
        if !device_mask::takes(pattern) {
            return Ok(None);
        }
        let mask = device_mask::select(&w.abs()?, pattern, self.per_row)?;
        Ok(Some(Pruned::masked(device_mask::zeroed(w, &mask)?, self.units(w.dim(0)?))))
    }
}

impl Magnitude {
    /// The units the zero count is rounded in: each row, or the matrix.
    fn units(&self, rows: usize) -> usize {
        if self.per_row { rows } else { 1 }
    }
}
