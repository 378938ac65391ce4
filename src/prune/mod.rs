//! Pruning: the methods, their registry, the options that decide a pruned model, and the layer walk they share.
//!
//! A method is one file with SparseGPT's two verbs: what it [observes](Method::observes) of an operator's
//! inputs over the calibration tokens, and [`prune`](Method::prune), which turns the dense weight `(out, in)`
//! and those statistics ([`stats::OpStats`]) into a weight on the pattern. Adding one is its file and one line
//! in [`METHODS`].

pub mod allocation;
pub mod device_mask;
pub mod fista;
pub mod layer;
pub mod magnitude;
pub mod mask;
pub mod pipeline;
pub mod random;
pub mod side;
pub mod sparsegpt;
pub mod stats;
pub mod swap;
pub mod wanda;

use anyhow::{Result, anyhow};
use faer::Mat;
use serde::{Deserialize, Serialize};

pub use mask::{Pattern, Target};
pub use stats::OpStats;

/// Every method, by name: the registry `--method`, `compare --methods` and FISTA's `--warm-start` read. One
/// line a method.
#[rustfmt::skip]
pub const METHODS: &[Registered] = &[
    magnitude::METHOD,
    wanda::METHOD,
    sparsegpt::METHOD,
    fista::METHOD,
    random::METHOD,
];

/// A method in the registry: its name and how to build it from the options.
pub struct Registered {
    pub name: &'static str,
    pub build: fn(&MethodOptions) -> Result<Box<dyn Method>>,
}

/// The registered method `name`.
pub fn method(name: &str) -> Result<&'static Registered> {
    METHODS.iter().find(|m| m.name == name).ok_or_else(|| {
        anyhow!("unknown method {name:?} (known: {})", METHODS.iter().map(|m| m.name).collect::<Vec<_>>().join(", "))
    })
}

/// Build the registered method `name` with `opts`.
pub fn build(name: &str, opts: &MethodOptions) -> Result<Box<dyn Method>> {
    (method(name)?.build)(opts)
}

/// `--method` values: the registry's names.
#[cfg(feature = "cli")]
pub fn method_names() -> clap::builder::PossibleValuesParser {
    clap::builder::PossibleValuesParser::new(METHODS.iter().map(|m| m.name))
}

/// What a method reads of an operator's inputs over the calibration tokens, from least to most.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Observes {
    /// Nothing: no calibration data (magnitude).
    Nothing,
    /// Each input feature's norm `‖X_j‖` (Wanda).
    Norms,
    /// The Gram matrix `X*ᵀX*` of the inputs it gets (SparseGPT).
    Gram,
    /// Also the cross terms `XᵀX*` against the dense layer's inputs, the target of intra-layer error correction
    /// (FISTAPruner): such a method corrects errors within the layer by default.
    Cross,
}

/// A pruning method for one linear operator.
pub trait Method: Send + Sync {
    /// What it reads of the operator's inputs.
    fn observes(&self) -> Observes;
    /// The dense weight `w` `(out, in)` on `pattern`, given the statistics of its inputs (present unless the
    /// method observes nothing).
    fn prune(&self, w: &Mat<f32>, stats: Option<&OpStats>, pattern: Pattern) -> Result<Pruned>;
    /// [`Self::prune`] where `w` (f32) is, on the run's device, with the statistics as they are: the pruned
    /// weight stays there, so an operator's `m × n` weight crosses the bus neither way. `None` (the default):
    /// this method prunes on the host only, or not this pattern on the device.
    fn prune_on_device(
        &self,
        _w: &candle_core::Tensor,
        _stats: Option<&OpStats>,
        _pattern: Pattern,
    ) -> Result<Option<Pruned<candle_core::Tensor>>> {
        Ok(None)
    }
}

/// A pruned weight (on the host, or a tensor where [`Method::prune_on_device`] made it) and what the method
/// tells about it.
pub struct Pruned<W = Mat<f32>> {
    pub w: W,
    /// The units the unstructured zero count was rounded in (per row, per matrix, per block of columns), so
    /// that the pattern check allows that rounding and nothing more.
    pub rounding_units: usize,
    /// Floating-point operations spent (for the roofline figures).
    pub flops: f64,
    /// Method-specific details for the report (FISTAPruner: λ rounds, warm-start error).
    pub details: Option<serde_json::Value>,
}

impl<W> Pruned<W> {
    /// A weight under a mask whose zeros were counted in `units`, at negligible cost.
    pub fn masked(w: W, units: usize) -> Self {
        Self { w, rounding_units: units, flops: 0.0, details: None }
    }
}

impl Pruned {
    /// A weight whose zeros were counted per row, at negligible cost.
    pub fn per_row(w: Mat<f32>) -> Self {
        let rows = w.nrows();
        Self::masked(w, rows)
    }
}

/// The statistics `method` needs, or an error naming it.
pub fn needs_stats<'a>(stats: Option<&'a OpStats>, method: &str) -> Result<&'a OpStats> {
    stats.ok_or_else(|| anyhow!("{method} needs input statistics"))
}

/// Every method's options, each declared in its method's file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct MethodOptions {
    #[cfg_attr(feature = "cli", command(flatten))]
    pub magnitude: magnitude::Options,
    #[cfg_attr(feature = "cli", command(flatten))]
    pub sparsegpt: sparsegpt::Options,
    #[cfg_attr(feature = "cli", command(flatten))]
    pub fista: fista::Options,
}

/// Everything that decides the pruned weights besides the model, the method and the calibration ids: the
/// target, the walk, the methods' options, the allocation over layers. A resumed run must match the
/// interrupted one on all of it (compared as this typed value, so that no option can be left out).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct PruneOptions {
    #[cfg_attr(feature = "cli", command(flatten))]
    pub target: Target,
    #[cfg_attr(feature = "cli", command(flatten))]
    pub walk: pipeline::WalkOptions,
    #[cfg_attr(feature = "cli", command(flatten))]
    pub methods: MethodOptions,
    #[cfg_attr(feature = "cli", command(flatten))]
    pub owl: allocation::OwlOptions,
}

impl PruneOptions {
    /// The defaults, with `target`.
    pub fn new(target: Target) -> Self {
        Self { target, walk: Default::default(), methods: Default::default(), owl: Default::default() }
    }
}
