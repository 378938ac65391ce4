//! Pruning: the layer walk shared by every method, masks, and one file per method.
//!
//! A method sees one linear operator at a time: its dense weight `(out, in)` and the statistics of its inputs
//! over the calibration tokens ([`stats::OpStats`]), and returns the pruned weight.

pub mod allocation;
pub mod fista;
pub mod magnitude;
pub mod mask;
pub mod pipeline;
pub mod sparsegpt;
pub mod stats;
pub mod wanda;

use anyhow::Result;
use faer::Mat;

pub use mask::Pattern;
pub use stats::OpStats;

/// A pruned weight and what the method wants to report about it.
pub struct Pruned {
    pub w: Mat<f32>,
    pub details: Option<serde_json::Value>,
}

impl From<Mat<f32>> for Pruned {
    fn from(w: Mat<f32>) -> Self {
        Self { w, details: None }
    }
}

/// A pruning method for one operator.
pub trait Method: Send + Sync {
    fn name(&self) -> &'static str;
    /// Whether the method reads input statistics (magnitude does not).
    fn needs_gram(&self) -> bool {
        true
    }
    fn prune(&self, w: &Mat<f32>, stats: Option<&OpStats>, pattern: Pattern) -> Result<Pruned>;
    /// Floating-point operations to prune one `(rows, cols)` operator (for the roofline figures).
    fn flops(&self, _rows: usize, _cols: usize) -> f64 {
        0.0
    }
    /// How many units the unstructured zero count is rounded in (one per row by default), so that the
    /// pattern check allows that rounding and nothing more.
    fn rounding_units(&self, rows: usize, _cols: usize, _pattern: Pattern) -> usize {
        rows
    }
}
