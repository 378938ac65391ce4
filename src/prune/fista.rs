//! FISTAPruner's per-operator solver (METHOD.md §4): the LASSO
//!
//! ```text
//! minimise over W':  ½ ‖W' X* − W X‖²_F + λ ‖W'‖₁
//! ```
//!
//! where `X` is the input the dense model gives the operator and `X*` the input it gets once the operators
//! before it in the layer are pruned. With `G* = X*ᵀX*`, `C = W XᵀX*` and `K = ‖W X‖²` (tokens as rows) the
//! smooth part is `½ tr(W' G* W'ᵀ) − tr(W' Cᵀ) + ½ K`, its gradient `W' G* − C`: every FISTA iteration is one
//! `m × n × n` GEMM whatever the number of calibration tokens.
//!
//! - FISTA (Beck and Teboulle 2009) with step `1/L`, `L = λ_max(G*)` by power iteration, at most `iters`
//!   iterations, stopping early when the iterate moves less than `tol` (relative);
//! - the final hard threshold `H` to the exact pattern (unstructured per row or per matrix, or N:M);
//! - λ by bisection over `rounds` rounds on `E_round / E_total` against `xi`, each round starting from the
//!   best thresholded solution so far; the warm start itself (already on the pattern) is the first candidate,
//!   so the result is never worse than it on the calibration data;
//! - beyond the paper: `refit` re-solves the surviving weights on the final support with λ = 0 (masked
//!   conjugate gradient, one GEMM per step), and `projected` keeps the pattern inside the iterations.
//!
//! λ is scale-free: `λ = α · L · rms(W)`, so that the soft threshold `λ / L` is `α` times a typical weight;
//! `α` is searched in log space inside `alpha_bracket`.

use anyhow::{Context, Result, bail, ensure};
use candle_core::Tensor;
use faer::{Accum, Mat, MatRef};
use serde::{Deserialize, Serialize};

use super::mask::{self, Pattern};
use super::{Method, MethodOptions, Observes, OpStats, Pruned, Registered, needs_stats};
use crate::linalg::par;

pub const METHOD: Registered = Registered { name: "fista", build };

/// FISTAPruner from its warm start, another registered method (with FISTA's counting, for magnitude) or
/// the dense weights.
fn build(o: &MethodOptions) -> Result<Box<dyn Method>> {
    let f = &o.fista;
    let warm: Box<dyn Method> = match f.warm_start.as_str() {
        "dense" => Box::new(Dense),
        "fista" => bail!("--warm-start fista: FISTAPruner cannot start from itself"),
        name => {
            let mut warm_opts = o.clone();
            warm_opts.magnitude.per_row = f.threshold != Threshold::PerMatrix;
            super::build(name, &warm_opts).context("--warm-start")?
        }
    };
    Ok(Box::new(FistaPruner { warm, opts: f.clone() }))
}

/// FISTAPruner as a method: a warm start from another method, then [`solve`].
pub struct FistaPruner {
    pub warm: Box<dyn Method>,
    pub opts: Options,
}

/// The dense weights as a warm start (FISTA then starts from `H(W)`, magnitude on the pattern).
pub struct Dense;

impl Method for Dense {
    fn observes(&self) -> Observes {
        Observes::Nothing
    }

    fn prune(&self, w: &Mat<f32>, _stats: Option<&OpStats>, _pattern: Pattern) -> Result<Pruned> {
        Ok(Pruned::per_row(w.clone()))
    }

    fn prune_on_device(
        &self,
        w: &Tensor,
        _stats: Option<&OpStats>,
        _pattern: Pattern,
    ) -> Result<Option<Pruned<Tensor>>> {
        Ok(Some(Pruned::masked(w.clone(), w.dim(0)?)))
    }
}

impl Method for FistaPruner {
    fn observes(&self) -> Observes {
        Observes::Cross
    }

    fn prune(&self, w: &Mat<f32>, stats: Option<&OpStats>, pattern: Pattern) -> Result<Pruned> {
        let st = needs_stats(stats, "fista")?;
        let warm = self.warm.prune(w, Some(st), pattern).context("warm start")?;
        let c = st.target(w)?;
        let mut p = st.problem(w, &c)?;
        let damped = self.damped(st)?;
        if let Some(g) = &damped {
            p.g = g;
        }
        let (out, report) = self.solve(&p, &warm.w, pattern)?;
        self.pruned(out, w.shape(), &warm, report)
    }

    /// The same with the weights, `C` and the iterates on the device from the warm start to the result: no
    /// `m × n` matrix crosses the bus, and the statistics are their device copies where `prune_layer` holds them.
    fn prune_on_device(&self, w: &Tensor, stats: Option<&OpStats>, pattern: Pattern) -> Result<Option<Pruned<Tensor>>> {
        let st = needs_stats(stats, "fista")?;
        let warm = match self.warm.prune_on_device(w, Some(st), pattern).context("warm start")? {
            Some(warm) => warm,
            None => {
                let h = self.warm.prune(&crate::linalg::tensor_to_mat(w)?, Some(st), pattern).context("warm start")?;
                let w = crate::linalg::mat_to_device(&h.w, w.device())?;
                Pruned { w, rounding_units: h.rounding_units, flops: h.flops, details: h.details }
            }
        };
        // The warm start's weight goes to the solve, which drops it once it has its first candidate.
        let Pruned { w: w0, rounding_units, flops, details } = warm;
        let warm = Pruned { w: (), rounding_units, flops, details };
        let (c, k) = st.target_on_device(w)?;
        let damped = self.damped(st)?;
        let g = damped.as_ref().map_or_else(|| st.gram(), Ok)?;
        let (out, report) = crate::linalg::with_resident(&[g], || self.solve_tensors(g, w, c, k, w0, pattern))?;
        Ok(Some(self.pruned(out, w.dims2()?, &warm, report)?))
    }
}

impl FistaPruner {
    /// `G*` damped by `--damp` (its mean diagonal times that), or `None` where it is not.
    fn damped(&self, st: &OpStats) -> Result<Option<Mat<f32>>> {
        if self.opts.damp <= 0.0 {
            return Ok(None);
        }
        let mut g = st.gram()?.clone();
        let n = g.nrows();
        let d = self.opts.damp * (0..n).map(|j| g[(j, j)] as f64).sum::<f64>() / n as f64;
        for j in 0..n {
            g[(j, j)] += d as f32;
        }
        Ok(Some(g))
    }

    /// What the report says of the result `w` of a `(rows, cols)` operator from `warm`, whichever verb made it.
    fn pruned<W, V>(
        &self,
        w: W,
        (rows, cols): (usize, usize),
        warm: &Pruned<V>,
        report: SolveReport,
    ) -> Result<Pruned<W>> {
        let o = &self.opts;
        // Power iteration, every FISTA iteration and error evaluation, and the re-fit: each a GEMM with `G*`.
        let gemm = 2.0 * rows as f64 * (cols * cols) as f64;
        // Each swap round that swapped: a re-fit and three more GEMMs; its search apart (counted as it runs).
        let swaps = report.swaps.iter().filter(|s| s.proposed > 0).count() * (o.swap_refit_iters + 3);
        let search: f64 = report.swaps.iter().map(|s| s.search_flops).sum();
        let iters = o.rounds * (o.iters + 2) + o.refit_iters + 3 + swaps;
        let power = if o.rounds > 0 { o.power_iters as f64 * 2.0 * (cols * cols) as f64 } else { 0.0 };
        let flops = warm.flops + iters as f64 * gemm + search + power;
        let own = if o.threshold == Threshold::PerMatrix { 1 } else { rows };
        // With the warm start's row budgets the count is the warm start's (or per row, when it had none).
        let rounding_units = if o.threshold == Threshold::WarmRows { rows.max(warm.rounding_units) } else { own };
        Ok(Pruned { w, rounding_units, flops, details: Some(serde_json::to_value(report)?) })
    }

    /// [`solve`] in the chosen basis.
    fn solve(&self, p: &Problem, w0: &Mat<f32>, pattern: Pattern) -> Result<(Mat<f32>, SolveReport)> {
        if self.opts.basis == Basis::Raw {
            return solve(p, w0, pattern, &self.opts);
        }
        let (s, g) = normalized(p.g);
        let n = g.nrows();
        let c = Mat::from_fn(p.c.nrows(), n, |i, j| p.c[(i, j)] / s[j]);
        let w = Mat::from_fn(p.w.nrows(), n, |i, j| p.w[(i, j)] * s[j]);
        let w0 = Mat::from_fn(w0.nrows(), n, |i, j| w0[(i, j)] * s[j]);
        let scaled = Problem { w: &w, g: &g, c: &c, k: p.k };
        let (v, report) = solve(&scaled, &w0, pattern, &self.opts)?;
        Ok((Mat::from_fn(v.nrows(), n, |i, j| if v[(i, j)] == 0.0 { 0.0 } else { v[(i, j)] / s[j] }), report))
    }

    /// [`Self::solve`] on the device's tensors: the dense weight `w`, `C`, the warm start `w0`; `G*` and `K`
    /// as the host has them.
    fn solve_tensors(
        &self,
        g: &Mat<f32>,
        w: &Tensor,
        c: Tensor,
        k: f64,
        w0: Tensor,
        pattern: Pattern,
    ) -> Result<(Tensor, SolveReport)> {
        use super::side::OnDevice;
        let on = |g: &Mat<f32>, w: &Tensor, c: Tensor, w0: Tensor| -> Result<(Tensor, SolveReport)> {
            let g_dev = crate::linalg::mat_to_device(g, w.device())?;
            let side = OnDevice::of(Facts::of(w.dims2()?, g, k, frob_tensor(w)?), g_dev, c)?;
            solve_on(&side, w0, pattern, &self.opts)
        };
        if self.opts.basis == Basis::Raw {
            return on(g, w, c, w0);
        }
        let (s, g) = normalized(g);
        let s = Tensor::from_vec(s, (1, g.nrows()), w.device())?;
        // In the new basis, each dropped once its scaled copy is made (for a 70B MLP operator 0.9 GiB each).
        let v0 = w0.broadcast_mul(&s)?;
        drop(w0);
        let cs = c.broadcast_div(&s)?;
        drop(c);
        let (c, w, w0) = (cs, w.broadcast_mul(&s)?, v0);
        let (v, report) = crate::linalg::with_resident(&[&g], || on(&g, &w, c, w0))?;
        Ok((v.eq(0f32)?.where_cond(&v.zeros_like()?, &v.broadcast_div(&s)?)?, report))
    }
}

/// The normalized basis (`--basis normalized`): solve for `V = W' S` with `S = diag(√G*ⱼⱼ)`. The Gram of the
/// scaled inputs has a unit diagonal (a far better conditioned problem for 20 steps of 1/L), the L1 term
/// becomes `Σ |w'ᵢⱼ| ‖x*ⱼ‖` and the hard threshold ranks `|w'ᵢⱼ| ‖x*ⱼ‖`, Wanda's score, instead of `|w'ᵢⱼ|`.
/// Returns `S`'s diagonal and `S⁻¹ G* S⁻¹`.
fn normalized(g: &Mat<f32>) -> (Vec<f32>, Mat<f32>) {
    let n = g.nrows();
    let top = (0..n).map(|j| g[(j, j)]).fold(0f32, f32::max).max(f32::MIN_POSITIVE).sqrt();
    let s: Vec<f32> = (0..n).map(|j| g[(j, j)].max(0.0).sqrt().max(1e-12 * top)).collect();
    let scaled = Mat::from_fn(n, n, |i, j| g[(i, j)] / (s[i] * s[j]));
    (s, scaled)
}

/// [`frob`] of a tensor where it is: each column summed in f32, the columns in f64.
fn frob_tensor(a: &Tensor) -> Result<f64> {
    let per_column = a.sqr()?.sum_keepdim(0)?.to_dtype(candle_core::DType::F64)?;
    Ok(per_column.sum_all()?.to_scalar::<f64>()?.sqrt())
}

/// `--warm-start` values: the registry's methods, or the dense weights.
#[cfg(feature = "cli")]
fn warm_starts() -> clap::builder::PossibleValuesParser {
    clap::builder::PossibleValuesParser::new(std::iter::once("dense").chain(super::METHODS.iter().map(|m| m.name)))
}

/// How the final hard threshold counts an unstructured target's zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum Threshold {
    /// Per output row (the paper).
    PerRow,
    /// Per matrix.
    PerMatrix,
    /// Each row keeps as many zeros as the warm start has in it (per row when it has none).
    WarmRows,
}

/// The basis FISTA solves in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Basis {
    /// The weights as they are (the paper).
    Raw,
    /// Unit-norm input channels (Jacobi-scaled `G*`).
    Normalized,
}

/// FISTAPruner's knobs (METHOD.md §4) and the extensions beyond the paper.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct Options {
    /// FISTAPruner's starting point: a registered method or `dense` (SparseGPT's start measured better than
    /// Wanda's, which the paper used for the LLaMA family: docs/BENCHMARKS.md).
    #[cfg_attr(feature = "cli", arg(long, default_value_t = Options::default().warm_start, value_parser = warm_starts()))]
    pub warm_start: String,
    /// FISTA: iterations per λ (K).
    #[cfg_attr(feature = "cli", arg(long, default_value_t = Options::default().iters))]
    pub iters: usize,
    /// FISTA: stop when the iterate moves less than this (relative).
    #[cfg_attr(feature = "cli", arg(long, default_value_t = Options::default().tol))]
    pub tol: f64,
    /// FISTA: λ bisection rounds (T; the paper's search). Off by default: on both real models the rounds did
    /// not lower perplexity below their warm start re-fitted, at twice its time (docs/BENCHMARKS.md, issue 16).
    #[cfg_attr(feature = "cli", arg(long, default_value_t = Options::default().rounds))]
    pub rounds: usize,
    /// FISTA: target share of the rounding error in the total error (ξ).
    #[cfg_attr(feature = "cli", arg(long, default_value_t = Options::default().xi))]
    pub xi: f64,
    /// FISTA: initial λ, as a multiple of L · rms(W) (the soft threshold in units of a typical weight).
    #[cfg_attr(feature = "cli", arg(long, default_value_t = Options::default().alpha))]
    pub alpha: f64,
    /// FISTA: the bracket λ is searched in (log space), with --alpha-max.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = Options::default().alpha_min))]
    pub alpha_min: f64,
    #[cfg_attr(feature = "cli", arg(long, default_value_t = Options::default().alpha_max))]
    pub alpha_max: f64,
    /// FISTA: unstructured hard threshold per row with the warm start's count of zeros in each row (the
    /// default: SparseGPT spreads its zeros unevenly over the rows, and that is worth 15 % perplexity at
    /// 50 %), per output row (the paper), or per matrix. N:M patterns are per group whatever this says.
    #[cfg_attr(feature = "cli", arg(long, value_enum, default_value = "warm-rows"))]
    pub threshold: Threshold,
    /// FISTA: masked conjugate-gradient re-fit steps on the final support (0: off, as in the paper).
    #[cfg_attr(feature = "cli", arg(long, default_value_t = Options::default().refit_iters))]
    pub refit_iters: usize,
    /// FISTA: keep the pattern inside the iterations (hard threshold every step).
    #[cfg_attr(feature = "cli", arg(long))]
    pub projected: bool,
    /// Power iterations for `L` (not a flag).
    #[cfg_attr(feature = "cli", arg(skip = Options::default().power_iters))]
    pub power_iters: usize,
    /// FISTA: ridge on G*, as a fraction of its mean diagonal (as SparseGPT's --percdamp): the solver minimises
    /// `‖W'X* − WX‖² + δ‖W'‖²` besides the `λ‖W'‖₁`, which keeps the fit off the directions the calibration
    /// data barely excites.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = Options::default().damp))]
    pub damp: f64,
    /// FISTA: solve for the weights as they are (the paper) or in the basis of unit-norm input channels
    /// (Jacobi-scaled G*: better conditioned, and the L1 term and the hard threshold weigh each weight by its
    /// input's norm, as Wanda's score does).
    #[cfg_attr(feature = "cli", arg(long, value_enum, default_value = "raw"))]
    pub basis: Basis,
    /// FISTA: rounds of swaps after the re-fit (0: off): a kept weight traded for a pruned one in the same row
    /// or N:M group where that lowers the row's re-fitted error (each round one re-fit). What moves the mask
    /// usefully, on both real models (docs/BENCHMARKS.md, issue 16).
    #[cfg_attr(feature = "cli", arg(long, default_value_t = Options::default().swap_rounds))]
    pub swap_rounds: usize,
    /// FISTA: conjugate-gradient steps of each swap round's re-fit (it starts from the re-fitted weights, with
    /// each added weight already at its best value given the rest of its row; 20 measured about 1 % better at
    /// 2:4, inside the noise, for 6 % more time).
    #[cfg_attr(feature = "cli", arg(long, default_value_t = Options::default().swap_refit_iters))]
    pub swap_refit_iters: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            warm_start: "sparsegpt".into(),
            iters: 20,
            tol: 1e-4,
            rounds: 0,
            xi: 0.3,
            alpha: 0.1,
            alpha_min: 1e-3,
            alpha_max: 1.0,
            threshold: Threshold::WarmRows,
            refit_iters: 20,
            projected: false,
            power_iters: 30,
            damp: 0.0,
            basis: Basis::Raw,
            swap_rounds: 2,
            swap_refit_iters: 10,
        }
    }
}

/// The quadratic model of one operator.
pub struct Problem<'a> {
    /// Dense weight `W` `(m, n)`.
    pub w: &'a Mat<f32>,
    /// `G* = X*ᵀ X*` `(n, n)`.
    pub g: &'a Mat<f32>,
    /// `C = W XᵀX*` `(m, n)`.
    pub c: &'a Mat<f32>,
    /// `K = ‖W X‖²`.
    pub k: f64,
}

/// What the solve reads of an operator on either side besides that side's matrices.
pub struct Facts<'a> {
    /// The weight's shape `(m, n)`.
    pub shape: (usize, usize),
    /// `G*` on the host: the step's power iteration, the swap search's diagonal.
    pub g: &'a Mat<f32>,
    /// `K = ‖W X‖²`.
    pub k: f64,
    /// The dense weight's root mean square: λ's scale.
    pub rms: f64,
}

impl<'a> Facts<'a> {
    /// The facts of a dense weight of `shape` with Frobenius norm `frob`.
    fn of(shape: (usize, usize), g: &'a Mat<f32>, k: f64, frob: f64) -> Self {
        let rms = (frob / ((shape.0 * shape.1) as f64).sqrt()).max(f64::MIN_POSITIVE);
        Self { shape, g, k, rms }
    }
}

/// What the solver did, for the report.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SolveReport {
    /// `L = λ_max(G*)`, where the FISTA rounds needed it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lipschitz: Option<f64>,
    /// Relative error `‖W'X* − WX‖² / ‖WX‖²` of the warm start and of the result.
    pub warm_error: f64,
    pub error: f64,
    /// Per round: (α, relative E_total, E_round / E_total, iterations run).
    pub rounds: Vec<(f64, f64, f64, usize)>,
    /// Whether a FISTA round beat the warm start.
    pub improved: bool,
    pub refit_error: Option<f64>,
    /// The swap rounds after the re-fit.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub swaps: Vec<super::swap::SwapRound>,
}

impl<'a> Problem<'a> {
    /// What either side's solve reads of it besides its matrices.
    pub fn facts(&self) -> Facts<'a> {
        Facts::of(self.w.shape(), self.g, self.k, frob(self.w))
    }

    /// `‖W' X* − W X‖² = tr(W' G* W'ᵀ) − 2 tr(W' Cᵀ) + K`, accumulated in f64.
    pub fn error(&self, w: &Mat<f32>) -> Result<f64> {
        Ok(self.error_with(w, &crate::linalg::product(w, self.g)?))
    }

    /// [`Problem::error`] given `wg = W' G*` (computed once and shared with whoever needs it next).
    pub fn error_with(&self, w: &Mat<f32>, wg: &Mat<f32>) -> f64 {
        let mut s = 0f64;
        for j in 0..w.ncols() {
            let (wc, gc, cc) = (w.col_as_slice(j), wg.col_as_slice(j), self.c.col_as_slice(j));
            // Σ w·(wG − 2c), in f32 per column, f64 across columns.
            s += wc.iter().zip(gc).zip(cc).map(|((&x, &q), &c)| x * (q - 2.0 * c)).sum::<f32>() as f64;
        }
        (s + self.k).max(0.0)
    }
}

pub(super) fn matmul(a: MatRef<f32>, b: MatRef<f32>) -> Mat<f32> {
    let mut out = Mat::<f32>::zeros(a.nrows(), b.ncols());
    faer::linalg::matmul::matmul(out.as_mut(), Accum::Replace, a, b, 1.0f32, par());
    out
}

/// Largest eigenvalue of a symmetric positive semi-definite matrix, by power iteration: on the run's device
/// where the pruners' dense work goes there ([`crate::device::offloaded`]), else on the host.
pub fn lambda_max(g: &Mat<f32>, iters: usize) -> Result<f64> {
    if crate::device::offloaded() { lambda_max_on_device(g, iters) } else { Ok(lambda_max_host(g.as_ref(), iters)) }
}

fn lambda_max_host(g: MatRef<f32>, iters: usize) -> f64 {
    let n = g.nrows();
    if n == 0 {
        return 0.0;
    }
    // Start from the diagonal (never orthogonal to the top eigenvector of a Gram matrix).
    let mut v = Mat::<f32>::from_fn(n, 1, |i, _| g[(i, i)].abs().sqrt() + 1e-3);
    let mut est = 0f64;
    for _ in 0..iters.max(1) {
        let gv = matmul(g, v.as_ref());
        let norm = (0..n).map(|i| (gv[(i, 0)] as f64).powi(2)).sum::<f64>().sqrt();
        let vnorm = (0..n).map(|i| (v[(i, 0)] as f64).powi(2)).sum::<f64>().sqrt();
        if norm == 0.0 {
            return 0.0;
        }
        est = norm / vnorm;
        v = Mat::from_fn(n, 1, |i, _| (gv[(i, 0)] as f64 / norm) as f32);
    }
    // Power iteration approaches from below: a small margin keeps the step 1/L safe.
    est * 1.01
}

/// [`lambda_max_host`] with `G*` on the device: the same start, norms summed in f64, one `n × n` GEMV a step.
fn lambda_max_on_device(g: &Mat<f32>, iters: usize) -> Result<f64> {
    use crate::linalg::mat_to_device;
    let n = g.nrows();
    if n == 0 {
        return Ok(0.0);
    }
    let dev = crate::device::current();
    let gt = mat_to_device(g, dev)?;
    let norm = |t: &candle_core::Tensor| -> Result<f64> {
        Ok(t.to_dtype(candle_core::DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt())
    };
    let mut v = mat_to_device(&Mat::from_fn(n, 1, |i, _| g[(i, i)].abs().sqrt() + 1e-3), dev)?;
    let mut est = 0f64;
    for _ in 0..iters.max(1) {
        let gv = gt.matmul(&v)?;
        let (gn, vn) = (norm(&gv)?, norm(&v)?);
        if gn == 0.0 {
            return Ok(0.0);
        }
        est = gn / vn;
        v = (gv / gn)?;
    }
    Ok(est * 1.01)
}

/// The hard threshold `H`: keep the largest `|w|` under the pattern.
pub fn hard_threshold(w: &Mat<f32>, pattern: Pattern, per_row: bool) -> Mat<f32> {
    HardThreshold { pattern, per_row, budgets: None }.apply(w).0
}

/// What the hard threshold keeps: the pattern, counted per row or per matrix, or (unstructured) per row
/// with each row's own count of zeros.
#[derive(Debug, Clone)]
pub struct HardThreshold {
    pub pattern: Pattern,
    pub per_row: bool,
    /// Zeros per row (their sum meets the unstructured target): overrides `per_row`.
    pub budgets: Option<Vec<usize>>,
}

impl HardThreshold {
    /// The row budgets of a warm start with `zeros` per row of `cols` when it is on the unstructured `pattern`
    /// (as long as their sum reaches the target less one per row); else the plain per-row or per-matrix count.
    pub fn from_warm(zeros: Vec<usize>, cols: usize, pattern: Pattern, per_row: bool) -> Self {
        let budgets = match pattern {
            Pattern::Unstructured(s) => {
                let r = zeros.len();
                (zeros.iter().sum::<usize>() + r >= mask::count_for(r * cols, s)).then_some(zeros)
            }
            Pattern::NM { .. } => None,
        };
        Self { pattern, per_row, budgets }
    }

    /// `H(w)` and its mask (true = pruned). Positions the pattern allows keep their place in the support even
    /// where `w` is already zero, so a re-fit can use them.
    pub fn apply(&self, w: &Mat<f32>) -> (Mat<f32>, mask::Mask) {
        let scores = mask::magnitudes(w);
        let m = match &self.budgets {
            Some(b) => mask::mask_row_budgets(&scores, b),
            None => mask::select(&scores, self.pattern, self.per_row),
        };
        (mask::zeroed(w, &m), m)
    }

    /// [`Self::apply`] to a tensor where it is (the run's device): the same weights, and the mask as u8 (1 =
    /// pruned), for finite weights (an iterate gone to NaN ends in the operator's non-finite check either way).
    /// N:M groups wider than [`device_mask::MAX_GROUP`] go through the host.
    pub fn apply_tensor(&self, w: &candle_core::Tensor) -> Result<(candle_core::Tensor, candle_core::Tensor)> {
        use super::device_mask;
        let scores = w.abs()?;
        let m = match &self.budgets {
            Some(b) => device_mask::select_budgets(&scores, b)?,
            None if !device_mask::takes(self.pattern) => {
                device_mask::from_host(&self.apply(&crate::linalg::tensor_to_mat(w)?).1, w.device())?
            }
            None => device_mask::select(&scores, self.pattern, self.per_row)?,
        };
        Ok((device_mask::zeroed(w, &m)?, m))
    }
}

fn soft(z: f32, tau: f32) -> f32 {
    if z > tau {
        z - tau
    } else if z < -tau {
        z + tau
    } else {
        0.0
    }
}

fn frob(a: &Mat<f32>) -> f64 {
    (0..a.ncols()).map(|j| a.col_as_slice(j).iter().map(|&x| x * x).sum::<f32>() as f64).sum::<f64>().sqrt()
}

/// One run of FISTA: λ, the step's `L`, at most `iters` iterations, the relative move `tol` that stops it
/// early, and the hard threshold applied every step where `--projected` asks for it.
#[derive(Clone, Copy)]
pub struct Steps<'a> {
    pub lambda: f64,
    pub l: f64,
    pub iters: usize,
    pub tol: f64,
    pub project: Option<&'a HardThreshold>,
}

/// FISTA on `½‖W'X* − WX‖² + λ‖W'‖₁` from `w0` on the host; returns the last iterate and the iterations run.
/// On a device, [`fista_on_device`].
pub fn fista_host(p: &Problem, w0: &Mat<f32>, Steps { lambda, l, iters, tol, project }: Steps) -> (Mat<f32>, usize) {
    let (m, n) = w0.shape();
    let tau = (lambda / l) as f32;
    let inv_l = (1.0 / l) as f32;
    let mut w_prev = w0.clone();
    let mut y = w0.clone();
    let mut w = Mat::<f32>::zeros(m, n);
    let mut t = 1f64;
    let mut done = 0;
    for _ in 0..iters {
        done += 1;
        // W = S_{λ/L}(Y − (Y G* − C) / L)
        let yg = matmul(y.as_ref(), p.g.as_ref());
        for j in 0..n {
            let (ygc, cc, yc) = (yg.col_as_slice(j), p.c.col_as_slice(j), y.col_as_slice(j));
            for (i, wv) in w.col_as_slice_mut(j).iter_mut().enumerate() {
                *wv = soft(yc[i] - inv_l * (ygc[i] - cc[i]), tau);
            }
        }
        if let Some(h) = project {
            w = h.apply(&w).0;
        }
        let t_next = (1.0 + (1.0 + 4.0 * t * t).sqrt()) / 2.0;
        let beta = ((t - 1.0) / t_next) as f32;
        // Y = W + β (W − W_prev), and the relative change.
        let (mut dd, mut ww) = (0f64, 0f64);
        for j in 0..n {
            let (wc, pc) = (w.col_as_slice(j), w_prev.col_as_slice(j));
            let (mut d, mut q) = (0f32, 0f32);
            for (i, yv) in y.col_as_slice_mut(j).iter_mut().enumerate() {
                let diff = wc[i] - pc[i];
                *yv = wc[i] + beta * diff;
                d += diff * diff;
                q += wc[i] * wc[i];
            }
            dd += d as f64;
            ww += q as f64;
        }
        std::mem::swap(&mut w_prev, &mut w);
        t = t_next;
        if dd.sqrt() < tol * ww.sqrt().max(f64::MIN_POSITIVE) {
            break;
        }
    }
    (w_prev, done)
}

/// [`fista_host`] with `G*`, `C` and the iterates on the device, all tensors there: one GEMM and a few
/// element-wise passes a step, the soft threshold as `relu(z − τ) − relu(−z − τ)` (the host's three branches, to
/// the bit), and two sums read back for the stopping test. A projection (`--projected`) is the host's hard
/// threshold, made on the device ([`HardThreshold::apply_tensor`]).
pub(super) fn fista_on_device(
    g: &candle_core::Tensor,
    c: &candle_core::Tensor,
    w0: &candle_core::Tensor,
    Steps { lambda, l, iters, tol, project }: Steps,
) -> Result<(candle_core::Tensor, usize)> {
    use candle_core::DType;
    // The host's f32 constants.
    let (tau, inv_l) = ((lambda / l) as f32 as f64, (1.0 / l) as f32 as f64);
    let sum = |t: &Tensor| -> Result<f64> {
        Ok(crate::linalg::sum_by_rows(&t.sqr()?)?.to_dtype(DType::F64)?.to_scalar::<f64>()?)
    };
    let mut w_prev = w0.clone();
    let mut y = w_prev.clone();
    let mut t = 1f64;
    let mut done = 0;
    for _ in 0..iters {
        done += 1;
        let z = (&y - ((y.matmul(g)? - c)? * inv_l)?)?;
        let mut w = ((&z - tau)?.relu()? - (z.neg()? - tau)?.relu()?)?;
        if let Some(h) = project {
            w = h.apply_tensor(&w)?.0;
        }
        let t_next = (1.0 + (1.0 + 4.0 * t * t).sqrt()) / 2.0;
        let beta = ((t - 1.0) / t_next) as f32 as f64;
        let diff = (&w - &w_prev)?;
        y = (&w + (&diff * beta)?)?;
        let (dd, ww) = (sum(&diff)?, sum(&w)?);
        w_prev = w;
        t = t_next;
        if dd.sqrt() < tol * ww.sqrt().max(f64::MIN_POSITIVE) {
            break;
        }
    }
    Ok((w_prev, done))
}

/// Minimise the smooth part over the weights `pruned` leaves free (the masked ones stay zero), from `w`:
/// per row, conjugate gradient on `G*` restricted to the row's support, all rows at once (one GEMM per step).
/// `wg` is `w G*` where the caller has it (else it is computed here). Returns the result `x` and `x G*`, which
/// every caller needs next. On a device, [`refit_on_device`].
pub fn refit(
    p: &Problem,
    w: &Mat<f32>,
    wg: Option<Mat<f32>>,
    pruned: &mask::Mask,
    iters: usize,
) -> Result<(Mat<f32>, Mat<f32>)> {
    let x = refit_host(p, w, wg, pruned, iters);
    let xg = matmul(x.as_ref(), p.g.as_ref());
    Ok((x, xg))
}

/// [`refit`] on the host. Rows are independent between the GEMMs: their vector work runs in blocks of rows
/// on all threads, each row's arithmetic the same whatever the blocks.
fn refit_host(p: &Problem, w: &Mat<f32>, wg: Option<Mat<f32>>, pruned: &mask::Mask, iters: usize) -> Mat<f32> {
    use rayon::prelude::*;
    let (m, n) = w.shape();
    let rows = m.div_ceil(4 * rayon::current_num_threads()).max(1);
    // Column `j` of a block of rows, as a slice (a block of a column-major matrix keeps its columns contiguous).
    fn col<'a>(b: &'a mut faer::MatMut<f32>, j: usize) -> &'a mut [f32] {
        b.as_mut().col_mut(j).try_as_col_major_mut().expect("contiguous column").as_slice_mut()
    }
    let mut x = w.clone();
    // r = P(C − X G*), and ‖r‖² per row.
    let mut r = wg.unwrap_or_else(|| matmul(x.as_ref(), p.g.as_ref()));
    let mut rr = vec![0f64; m];
    r.as_mut().par_row_chunks_mut(rows).zip(rr.par_chunks_mut(rows)).enumerate().for_each(|(b, (mut rb, rrb))| {
        let i0 = b * rows;
        for j in 0..n {
            let rc = col(&mut rb, j);
            let (cc, mc) = (&p.c.col_as_slice(j)[i0..], &pruned.col_as_slice(j)[i0..]);
            for (k, v) in rc.iter_mut().enumerate() {
                *v = if mc[k] { 0.0 } else { cc[k] - *v };
                rrb[k] += *v as f64 * *v as f64;
            }
        }
    });
    let mut d = r.clone();
    let rr0: Vec<f64> = rr.clone();
    let mut q = Mat::<f32>::zeros(m, n);
    let mut alpha = vec![0f32; m];
    for _ in 0..iters {
        faer::linalg::matmul::matmul(q.as_mut(), Accum::Replace, d.as_ref(), p.g.as_ref(), 1.0f32, par());
        // q = P(d G*); α = ‖r‖² / (d · q) per row.
        q.as_mut().par_row_chunks_mut(rows).zip(alpha.par_chunks_mut(rows)).enumerate().for_each(
            |(b, (mut qb, ab))| {
                let i0 = b * rows;
                let mut dq = vec![0f64; ab.len()];
                for j in 0..n {
                    let qc = col(&mut qb, j);
                    let (dc, mc) = (&d.col_as_slice(j)[i0..], &pruned.col_as_slice(j)[i0..]);
                    for (k, v) in qc.iter_mut().enumerate() {
                        if mc[k] {
                            *v = 0.0;
                        }
                        dq[k] += dc[k] as f64 * *v as f64;
                    }
                }
                for (k, a) in ab.iter_mut().enumerate() {
                    *a = if dq[k] > 0.0 { (rr[i0 + k] / dq[k]) as f32 } else { 0.0 };
                }
            },
        );
        // x += α d, r −= α q; then β = ‖r_new‖² / ‖r‖² and d = r + β d (unused when the loop ends here).
        let mut rr_new = vec![0f64; m];
        let blocks = x.as_mut().par_row_chunks_mut(rows).zip(r.as_mut().par_row_chunks_mut(rows));
        blocks.zip(d.as_mut().par_row_chunks_mut(rows)).zip(rr_new.par_chunks_mut(rows)).enumerate().for_each(
            |(b, (((mut xb, mut rb), mut db), rnb))| {
                let i0 = b * rows;
                for j in 0..n {
                    let (xc, rc, dc) = (col(&mut xb, j), col(&mut rb, j), col(&mut db, j));
                    let (qc, ac) = (&q.col_as_slice(j)[i0..], &alpha[i0..]);
                    for k in 0..xc.len() {
                        xc[k] += ac[k] * dc[k];
                        rc[k] -= ac[k] * qc[k];
                        rnb[k] += rc[k] as f64 * rc[k] as f64;
                    }
                }
                let beta: Vec<f32> =
                    (0..rnb.len()).map(|k| if rr[i0 + k] > 0.0 { (rnb[k] / rr[i0 + k]) as f32 } else { 0.0 }).collect();
                for j in 0..n {
                    let (rc, dc) = (col(&mut rb, j), col(&mut db, j));
                    for k in 0..rc.len() {
                        dc[k] = rc[k] + beta[k] * dc[k];
                    }
                }
            },
        );
        if (0..m).all(|i| rr_new[i] <= 1e-12 * rr0[i].max(f64::MIN_POSITIVE)) {
            break;
        }
        rr = rr_new;
    }
    x
}

/// [`refit`] on the device, from and to tensors there: `G*`, `C`, the weights `w` (with `wg = w G*` where the
/// caller has it) and `keep` (1 where a weight is free, 0 where pruned). Every matrix stays there; the per-row
/// dot products sum in f32 (f64 on the host), and one per-row sum comes back each step for the stopping test.
pub(super) fn refit_on_device(
    g: &candle_core::Tensor,
    c: &candle_core::Tensor,
    w: &candle_core::Tensor,
    wg: Option<candle_core::Tensor>,
    keep: &candle_core::Tensor,
    iters: usize,
) -> Result<(candle_core::Tensor, candle_core::Tensor)> {
    use candle_core::Tensor;
    // a / b per row where b > 0, else 0 (as the host's α and β).
    let ratio = |a: &Tensor, b: &Tensor| -> Result<Tensor> { Ok(b.gt(0.0)?.where_cond(&(a / b)?, &a.zeros_like()?)?) };
    let mut x = w.clone();
    let xg = match wg {
        Some(wg) => wg,
        None => x.matmul(g)?,
    };
    // r = P(C − X G*), and ‖r‖² per row.
    let mut r = ((c - xg)? * keep)?;
    let mut rr = r.sqr()?.sum_keepdim(1)?;
    let rr0: Vec<f32> = rr.flatten_all()?.to_vec1()?;
    let mut d = r.clone();
    for _ in 0..iters {
        let q = (d.matmul(g)? * keep)?;
        let alpha = ratio(&rr, &(&d * &q)?.sum_keepdim(1)?)?;
        x = (x + d.broadcast_mul(&alpha)?)?;
        r = (r - q.broadcast_mul(&alpha)?)?;
        let rr_new = r.sqr()?.sum_keepdim(1)?;
        d = (&r + d.broadcast_mul(&ratio(&rr_new, &rr)?)?)?;
        let done: Vec<f32> = rr_new.flatten_all()?.to_vec1()?;
        if done.iter().zip(&rr0).all(|(&a, &b)| a as f64 <= 1e-12 * (b as f64).max(f64::MIN_POSITIVE)) {
            break;
        }
        rr = rr_new;
    }
    let xg = x.matmul(g)?;
    Ok((x, xg))
}

/// FISTAPruner for one operator: from the warm start `w0` (already on the pattern, or dense), a result on the
/// exact pattern, on the host (on a device, [`FistaPruner`]'s device verb runs [`solve_on`] there).
pub fn solve(p: &Problem, w0: &Mat<f32>, pattern: Pattern, o: &Options) -> Result<(Mat<f32>, SolveReport)> {
    let (m, n) = p.w.shape();
    ensure!(w0.shape() == (m, n) && p.c.shape() == (m, n), "fista: shapes disagree");
    solve_on(&super::side::Host::new(p), w0.clone(), pattern, o)
}

/// [`solve`] on `side`: the warm start, the λ rounds, the re-fit and the swaps, the iterate kept on `side`.
fn solve_on<S: super::side::Side>(side: &S, w0: S::W, pattern: Pattern, o: &Options) -> Result<(S::W, SolveReport)> {
    let Facts { shape: (_, n), g, k, rms } = *side.facts();
    ensure!(g.shape() == (n, n), "fista: shapes disagree");
    let base = k.max(f64::MIN_POSITIVE);
    // The step 1/L only where FISTA runs: its power iteration streams G* from memory `power_iters` times, a
    // second or more per large operator on the host (7B's down_proj: 30 × 485 MB), for nothing at --rounds 0.
    let l = if o.rounds > 0 { lambda_max(g, o.power_iters)?.max(f64::MIN_POSITIVE) } else { 0.0 };
    let mut report = SolveReport { lipschitz: (o.rounds > 0).then_some(l), ..Default::default() };

    // The warm start on the pattern is the first candidate.
    // Unstructured targets keep the warm start's zeros per row (SparseGPT spreads them unevenly over the rows,
    // and forcing its result to an even count costs it most of its quality) unless told to count per row.
    let per_row = o.threshold != Threshold::PerMatrix;
    let h = if o.threshold == Threshold::WarmRows {
        HardThreshold::from_warm(side.zeros_per_row(&w0)?, n, pattern, per_row)
    } else {
        HardThreshold { pattern, per_row, budgets: None }
    };
    let (mut best, mut best_mask) = side.threshold(&h, &w0)?;
    drop(w0);
    // `best G*` travels with `best`: the error, the re-fit's first residual and the swaps' start share it.
    let mut best_g = side.times_g(&best)?;
    let mut best_err = side.error(&best, &best_g)?;
    report.warm_error = best_err / base;
    let (mut lo, mut hi) = (o.alpha_min, o.alpha_max);
    let mut alpha = o.alpha.clamp(lo, hi);
    let project = o.projected.then_some(&h);
    for _ in 0..o.rounds {
        let lambda = alpha * l * rms;
        let (wk, its) = side.fista(&best, Steps { lambda, l, iters: o.iters, tol: o.tol, project })?;
        let (ht, hm) = side.threshold(&h, &wk)?;
        let htg = side.times_g(&ht)?;
        let e_total = side.error(&ht, &htg)?;
        let e_fista = side.error(&wk, &side.times_g(&wk)?)?;
        let ratio = if e_total > 0.0 { (e_total - e_fista) / e_total } else { 0.0 };
        report.rounds.push((alpha, e_total / base, ratio, its));
        if e_total < best_err {
            best = ht;
            best_g = htg;
            best_mask = hm;
            best_err = e_total;
            report.improved = true;
        }
        // Rounding dominates: more λ makes the FISTA solution sparser by itself.
        if ratio > o.xi {
            lo = alpha;
            alpha = (alpha * hi).sqrt();
        } else {
            hi = alpha;
            alpha = (lo * alpha).sqrt();
        }
    }
    if o.refit_iters > 0 {
        let (r, rg) = side.refit(&best, Some(best_g.clone()), &best_mask, o.refit_iters)?;
        let e = side.error(&r, &rg)?;
        report.refit_error = Some(e / base);
        if e < best_err {
            best = r;
            best_g = rg;
            best_err = e;
        }
    }
    if o.swap_rounds > 0 {
        ensure!(o.swap_refit_iters > 0, "--swap-rounds re-fits every swap: it needs --swap-refit-iters above 0");
        let (w, _, rounds) =
            super::swap::refine(side, best, best_g, best_mask, pattern, o.swap_rounds, o.swap_refit_iters)?;
        best = w;
        best_err = rounds.last().map_or(best_err, |r| r.error * base);
        report.swaps = rounds;
    }
    report.error = best_err / base;
    Ok((best, report))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> f32 {
            self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((self.0 >> 33) as f64 / (1u64 << 31) as f64 - 0.5) as f32
        }
    }

    /// A random problem: W (m×n), inputs X (N×n), perturbed X* (as if earlier operators were pruned).
    fn problem(m: usize, n: usize, tokens: usize, seed: u64) -> (Mat<f32>, Mat<f32>, Mat<f32>, f64) {
        let mut r = Rng(seed);
        let w = Mat::from_fn(m, n, |_, _| r.next());
        let shared: Vec<f32> = (0..tokens).map(|_| r.next()).collect();
        let x = Mat::from_fn(tokens, n, |t, j| r.next() + 0.5 * shared[t] * ((j % 4) as f32 - 1.5));
        let xs = Mat::from_fn(tokens, n, |t, j| x[(t, j)] + 0.1 * r.next());
        let mut g = Mat::<f32>::zeros(n, n);
        faer::linalg::matmul::matmul(g.as_mut(), Accum::Replace, xs.transpose(), xs.as_ref(), 1.0f32, faer::Par::Seq);
        let mut cross = Mat::<f32>::zeros(n, n);
        faer::linalg::matmul::matmul(
            cross.as_mut(),
            Accum::Replace,
            x.transpose(),
            xs.as_ref(),
            1.0f32,
            faer::Par::Seq,
        );
        let c = matmul(w.as_ref(), cross.as_ref());
        let y = matmul(x.as_ref(), w.transpose());
        let k = (0..y.ncols()).map(|j| (0..y.nrows()).map(|i| (y[(i, j)] as f64).powi(2)).sum::<f64>()).sum();
        (w, g, c, k)
    }

    /// An independent LASSO solver: cyclic coordinate descent per row, in f64, to convergence.
    fn lasso_cd(w0: &Mat<f32>, g: &Mat<f32>, c: &Mat<f32>, lambda: f64) -> Mat<f64> {
        let (m, n) = w0.shape();
        let mut w = Mat::<f64>::from_fn(m, n, |i, j| w0[(i, j)] as f64);
        for i in 0..m {
            for _sweep in 0..5000 {
                let mut moved = 0f64;
                for j in 0..n {
                    // ∂/∂w_j of ½ wGwᵀ − cwᵀ = (wG)_j − c_j
                    let mut grad = -(c[(i, j)] as f64);
                    for k in 0..n {
                        if k != j {
                            grad += w[(i, k)] * g[(k, j)] as f64;
                        }
                    }
                    let gjj = g[(j, j)] as f64;
                    let z = -grad;
                    let new = if z > lambda {
                        (z - lambda) / gjj
                    } else if z < -lambda {
                        (z + lambda) / gjj
                    } else {
                        0.0
                    };
                    moved = moved.max((new - w[(i, j)]).abs());
                    w[(i, j)] = new;
                }
                if moved < 1e-13 {
                    break;
                }
            }
        }
        w
    }

    fn objective(p: &Problem, w: MatRef<f32>, lambda: f64) -> f64 {
        let l1: f64 = (0..w.ncols()).map(|j| (0..w.nrows()).map(|i| (w[(i, j)] as f64).abs()).sum::<f64>()).sum();
        0.5 * p.error(&w.to_owned()).unwrap() + lambda * l1
    }

    #[test]
    fn fista_reaches_the_lasso_optimum_of_coordinate_descent() {
        let (w, g, c, k) = problem(4, 12, 80, 1);
        let p = Problem { w: &w, g: &g, c: &c, k };
        let l = lambda_max(&g, 100).unwrap();
        let lambda = 0.05 * l * 0.3;
        let (wf, _) = fista_host(&p, &w, Steps { lambda, l, iters: 20000, tol: 0.0, project: None });
        let wcd = lasso_cd(&w, &g, &c, lambda);
        let wcd32 = Mat::from_fn(4, 12, |i, j| wcd[(i, j)] as f32);
        let (a, b) = (objective(&p, wf.as_ref(), lambda), objective(&p, wcd32.as_ref(), lambda));
        assert!(((a - b) / b).abs() < 1e-6, "FISTA objective {a} vs coordinate descent {b}");
        // Sparse, and the same support.
        let zeros =
            (0..12).flat_map(|j| (0..4).map(move |i| (i, j))).filter(|&(i, j)| wcd[(i, j)].abs() < 1e-9).count();
        assert!(zeros > 0, "λ too small to test sparsity");
    }

    #[test]
    fn lambda_zero_without_threshold_recovers_least_squares() {
        let (w, g, c, k) = problem(3, 8, 60, 2);
        let p = Problem { w: &w, g: &g, c: &c, k };
        let l = lambda_max(&g, 100).unwrap();
        let steps = Steps { lambda: 0.0, l, iters: 5000, tol: 0.0, project: None };
        let (wf, _) = fista_host(&p, &Mat::zeros(3, 8), steps);
        // Least squares: W' G* = C.
        let gd = Mat::<f64>::from_fn(8, 8, |i, j| g[(i, j)] as f64);
        let inv = faer::linalg::solvers::DenseSolveCore::inverse(&gd.llt(faer::Side::Lower).unwrap());
        for i in 0..3 {
            for j in 0..8 {
                let want: f64 = (0..8).map(|k| c[(i, k)] as f64 * inv[(k, j)]).sum();
                assert!(
                    (wf[(i, j)] as f64 - want).abs() < 1e-3 * (1.0 + want.abs()),
                    "({i},{j}) {} vs {want}",
                    wf[(i, j)]
                );
            }
        }
        // The masked refit on a full support is the same least squares.
        let r = refit(&p, &Mat::from_fn(3, 8, |_, _| 1.0), None, &Mat::from_fn(3, 8, |_, _| false), 50).unwrap().0;
        assert!((p.error(&r).unwrap() - p.error(&wf).unwrap()).abs() <= 1e-4 * p.error(&wf).unwrap().max(1e-9));
    }

    #[test]
    fn best_so_far_is_monotone_and_meets_the_pattern() {
        for pattern in [Pattern::Unstructured(0.5), Pattern::Unstructured(0.7), Pattern::NM { n: 2, m: 4 }] {
            let (w, g, c, k) = problem(6, 16, 100, 3);
            let p = Problem { w: &w, g: &g, c: &c, k };
            let warm = hard_threshold(&w, pattern, true);
            let o = Options { rounds: 4, refit_iters: 20, ..Default::default() };
            let (out, rep) = solve(&p, &warm, pattern, &o).unwrap();
            assert!(rep.error <= rep.warm_error + 1e-12, "{pattern:?}: {} > warm {}", rep.error, rep.warm_error);
            mask::verify(&out, pattern, 6).unwrap();
            if let Pattern::Unstructured(s) = pattern {
                for i in 0..6 {
                    assert_eq!(
                        (0..16).filter(|&j| out[(i, j)] == 0.0).count(),
                        mask::count_for(16, s),
                        "{pattern:?} row {i}"
                    );
                }
            }
        }
    }

    /// The normalized basis: the warm start is still the floor, the pattern still holds, zeros stay exact, and
    /// from the dense weights the first candidate is Wanda's mask (|w|·‖x*‖) rather than magnitude's.
    #[test]
    fn normalized_basis_keeps_the_guarantees_and_ranks_by_wanda_score() {
        // Without error correction the operator's own Gram is its whole model.
        let (w, g, _, _) = problem(6, 16, 100, 6);
        // Make the input channels' norms very unequal, as in a real model.
        let sc: Vec<f32> = (0..16).map(|j| if j % 5 == 0 { 30.0 } else { 1.0 }).collect();
        let g = Mat::from_fn(16, 16, |i, j| g[(i, j)] * sc[i] * sc[j]);
        let pattern = Pattern::NM { n: 2, m: 4 };
        let method = |normalize, rounds| FistaPruner {
            warm: Box::new(Dense),
            opts: Options {
                basis: if normalize { Basis::Normalized } else { Basis::Raw },
                rounds,
                refit_iters: 10,
                swap_rounds: 0,
                ..Default::default()
            },
        };
        let st = crate::prune::OpStats::of_gram(g.clone());
        let a = method(true, 0).prune(&w, Some(&st), pattern).unwrap().w;
        mask::verify(&a, pattern, 6).unwrap();
        for i in 0..6 {
            for grp in 0..4 {
                let score = |j: usize| w[(i, j)].abs() * g[(j, j)].sqrt();
                let mut idx: Vec<usize> = (grp * 4..grp * 4 + 4).collect();
                idx.sort_by(|&x, &y| score(y).total_cmp(&score(x)));
                for &j in &idx[2..] {
                    assert_eq!(a[(i, j)], 0.0, "row {i}: weight {j} has a low Wanda score and should be pruned");
                }
            }
        }
        let full = method(true, 3).prune(&w, Some(&st), pattern).unwrap();
        mask::verify(&full.w, pattern, 6).unwrap();
        let rep = full.details.unwrap();
        let (e, e0) = (rep["error"].as_f64().unwrap(), rep["warm_error"].as_f64().unwrap());
        assert!(e <= e0 + 1e-12, "{e} > warm {e0}");
    }

    /// The re-fit's rows run in blocks on the threads there are: the bytes must not depend on how many.
    #[test]
    fn refit_gives_the_same_bytes_at_any_thread_count() {
        let (w, g, c, k) = problem(37, 24, 120, 11);
        let p = Problem { w: &w, g: &g, c: &c, k };
        let (h, hm) = HardThreshold { pattern: Pattern::NM { n: 2, m: 4 }, per_row: true, budgets: None }.apply(&w);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| refit_host(&p, &h, None, &hm, 12))
        };
        let one = run(1);
        for threads in [2, 3, 5] {
            let many = run(threads);
            for j in 0..24 {
                for i in 0..37 {
                    assert_eq!(one[(i, j)].to_bits(), many[(i, j)].to_bits(), "({i}, {j}) at {threads} threads");
                }
            }
        }
    }

    #[test]
    fn refit_never_leaves_the_support_and_lowers_the_error() {
        let (w, g, c, k) = problem(5, 12, 90, 4);
        let p = Problem { w: &w, g: &g, c: &c, k };
        let (h, hm) = HardThreshold { pattern: Pattern::Unstructured(0.5), per_row: true, budgets: None }.apply(&w);
        let (r, rg) = refit(&p, &h, None, &hm, 30).unwrap();
        let want = matmul(r.as_ref(), g.as_ref());
        assert!((0..12).all(|j| (0..5).all(|i| rg[(i, j)] == want[(i, j)])), "x G* is not the result's");
        // The device's conjugate gradient (candle's operators; here on the CPU) takes the same steps.
        let up = |m: &Mat<f32>| crate::linalg::mat_to_tensor(m).unwrap();
        let keep = up(&Mat::from_fn(5, 12, |i, j| if hm[(i, j)] { 0.0 } else { 1.0 }));
        let (d, dg) = refit_on_device(&up(&g), &up(&c), &up(&h), None, &keep, 30).unwrap();
        let (d, dg) = (crate::linalg::tensor_to_mat(&d).unwrap(), crate::linalg::tensor_to_mat(&dg).unwrap());
        let scale = (0..12).flat_map(|j| (0..5).map(move |i| (i, j))).map(|(i, j)| r[(i, j)].abs()).fold(0.0, f32::max);
        for j in 0..12 {
            for i in 0..5 {
                assert!((d[(i, j)] - r[(i, j)]).abs() <= 1e-4 * scale, "({i}, {j}): {} vs {}", d[(i, j)], r[(i, j)]);
                assert!((dg[(i, j)] - want[(i, j)]).abs() <= 1e-3 * want[(i, j)].abs().max(scale));
            }
        }
        for j in 0..12 {
            for i in 0..5 {
                if h[(i, j)] == 0.0 {
                    assert_eq!(r[(i, j)], 0.0);
                }
            }
        }
        assert!(p.error(&r).unwrap() < 0.9 * p.error(&h).unwrap());
    }

    /// The device's FISTA and power iteration (candle's operators; here on the CPU) take the host's steps, with
    /// and without the projection: the same iterates to f32 rounding, the same zeros but a few at the edge.
    #[test]
    fn device_fista_and_power_iteration_follow_the_host() {
        let (w, g, c, k) = problem(6, 16, 100, 8);
        let p = Problem { w: &w, g: &g, c: &c, k };
        let (l, ld) = (lambda_max_host(g.as_ref(), 50), lambda_max_on_device(&g, 50).unwrap());
        assert!((l - ld).abs() <= 1e-5 * l, "power iteration: host {l}, device {ld}");
        let h = HardThreshold { pattern: Pattern::Unstructured(0.5), per_row: true, budgets: None };
        for project in [None, Some(&h)] {
            let steps = Steps { lambda: 0.02 * l, l, iters: 60, tol: 0.0, project };
            let (a, na) = fista_host(&p, &w, steps);
            let up = |m: &Mat<f32>| crate::linalg::mat_to_tensor(m).unwrap();
            let (b, nb) = fista_on_device(&up(&g), &up(&c), &up(&w), steps).unwrap();
            let b = crate::linalg::tensor_to_mat(&b).unwrap();
            assert_eq!(na, nb);
            let scale =
                (0..16).flat_map(|j| (0..6).map(move |i| (i, j))).map(|(i, j)| a[(i, j)].abs()).fold(0.0, f32::max);
            let (mut zeros, mut differ) = (0, 0);
            for j in 0..16 {
                for i in 0..6 {
                    assert!(
                        (a[(i, j)] - b[(i, j)]).abs() <= 1e-4 * scale,
                        "({i}, {j}): {} vs {}",
                        a[(i, j)],
                        b[(i, j)]
                    );
                    zeros += (a[(i, j)] == 0.0) as usize;
                    differ += ((a[(i, j)] == 0.0) != (b[(i, j)] == 0.0)) as usize;
                }
            }
            assert!(zeros >= 10 && differ <= 2, "{} zeros, {differ} placed differently", zeros);
        }
    }

    /// FISTAPruner's solve on the device (candle's operators; here on the CPU) is the host's: with its defaults
    /// (re-fit, swaps) and with λ rounds, the same path through the rounds, errors to f32 summation order, the
    /// result to f32 rounding with its zeros in place but a few at the edge.
    #[test]
    fn the_device_side_solves_as_the_host() {
        use crate::prune::side::{Host, OnDevice, Side};
        let (w, g, c, k) = problem(6, 16, 100, 13);
        let p = Problem { w: &w, g: &g, c: &c, k };
        let pattern = Pattern::Unstructured(0.5);
        let w0 = hard_threshold(&w, pattern, true);
        let with_rounds = Options { rounds: 2, iters: 30, ..Default::default() };
        for o in [Options::default(), with_rounds] {
            let (a, ra) = solve_on(&Host::new(&p), w0.clone(), pattern, &o).unwrap();
            let dev = OnDevice::new(&p).unwrap();
            let (b, rb) = solve_on(&dev, dev.load(&w0).unwrap(), pattern, &o).unwrap();
            let b = dev.store(&b).unwrap();
            let close = |x: f64, y: f64| (x - y).abs() <= 1e-4 * x.abs().max(y.abs());
            assert!(close(ra.warm_error, rb.warm_error) && close(ra.error, rb.error), "{ra:?} vs {rb:?}");
            assert_eq!(ra.rounds.len(), rb.rounds.len());
            for (x, y) in ra.rounds.iter().zip(&rb.rounds) {
                assert!(close(x.0, y.0) && close(x.1, y.1) && x.3 == y.3, "rounds: {x:?} vs {y:?}");
            }
            assert_eq!(ra.improved, rb.improved);
            let cells = || (0..16).flat_map(|j| (0..6).map(move |i| (i, j)));
            let scale = cells().map(|(i, j)| a[(i, j)].abs()).fold(0.0, f32::max);
            assert!(cells().filter(|&(i, j)| (a[(i, j)] == 0.0) != (b[(i, j)] == 0.0)).count() <= 2, "masks");
            let agree = cells().filter(|&(i, j)| (a[(i, j)] == 0.0) == (b[(i, j)] == 0.0));
            assert!(agree.clone().all(|(i, j)| (a[(i, j)] - b[(i, j)]).abs() <= 1e-3 * scale), "weights");
            mask::verify(&b, pattern, 6).unwrap();
        }
    }

    /// The hard threshold made where the tensor is (here the CPU, through candle's operators) is the host's,
    /// weights and mask bit for bit, for every way it counts; N:M groups too wide for the device's ranks go
    /// through the host.
    #[test]
    fn hard_threshold_on_a_tensor_is_the_hosts() {
        let (w, _, _, _) = problem(6, 64, 10, 12);
        // Ties and zeros, as a pruned warm start and 4-bit weights have.
        let w = Mat::from_fn(6, 64, |i, j| if (i + j) % 5 == 0 { 0.0 } else { (w[(i, j)] * 8.0).round() / 8.0 });
        let budgets = vec![0, 64, 20, 31, 33, 7];
        let unstructured = Pattern::Unstructured(0.5);
        let cases = [
            HardThreshold { pattern: unstructured, per_row: true, budgets: None },
            HardThreshold { pattern: unstructured, per_row: false, budgets: None },
            HardThreshold { pattern: unstructured, per_row: true, budgets: Some(budgets) },
            HardThreshold { pattern: Pattern::NM { n: 2, m: 4 }, per_row: true, budgets: None },
            HardThreshold { pattern: Pattern::NM { n: 40, m: 64 }, per_row: true, budgets: None },
        ];
        let t = crate::linalg::mat_to_tensor(&w).unwrap();
        for h in cases {
            let (hw, hm) = h.apply(&w);
            let (tw, tm) = h.apply_tensor(&t).unwrap();
            let (tw, tm) = (crate::linalg::tensor_to_mat(&tw).unwrap(), tm.to_vec2::<u8>().unwrap());
            for i in 0..6 {
                for j in 0..64 {
                    assert_eq!(tw[(i, j)].to_bits(), hw[(i, j)].to_bits(), "{h:?} at ({i}, {j})");
                    assert_eq!(tm[i][j] == 1, hm[(i, j)], "{h:?}: mask at ({i}, {j})");
                }
            }
        }
    }

    #[test]
    fn power_iteration_finds_the_top_eigenvalue() {
        let (_, g, _, _) = problem(2, 10, 50, 5);
        let gd = Mat::<f64>::from_fn(10, 10, |i, j| g[(i, j)] as f64);
        let ev = gd.self_adjoint_eigenvalues(faer::Side::Lower).unwrap();
        let top = ev.iter().cloned().fold(f64::MIN, f64::max);
        let est = lambda_max(&g, 200).unwrap();
        assert!(est >= top * (1.0 - 1e-4) && est <= top * 1.02, "{est} vs {top}");
    }

    /// FISTAPruner's device verb (here on the CPU's tensors) moves no `m × n` matrix between host and device:
    /// SparseGPT's warm start, `C` and `K`, the solve and the re-fit stay there; only the statistics go up
    /// (`n × n`). Its result is the host verb's to f32 rounding, on the pattern. (Swaps apart: on the CPU their
    /// search is the host's, a GPU's kernel reads tensors.)
    #[test]
    fn the_device_verb_moves_no_weight_matrix() {
        use crate::linalg::{MOVED, Moved, mat_to_tensor, tensor_to_mat};
        let (m, n, tokens) = (6, 32, 120);
        let mut r = Rng(31);
        let w = Mat::from_fn(m, n, |_, _| r.next());
        let x = Mat::from_fn(tokens, n, |_, _| r.next());
        let xs = Mat::from_fn(tokens, n, |t, j| x[(t, j)] + 0.1 * r.next());
        let gram = |a: &Mat<f32>, b: &Mat<f32>| matmul(a.transpose(), b.as_ref());
        let st = OpStats { cross: Some(gram(&x, &xs)), dense: Some(gram(&x, &x)), ..OpStats::of_gram(gram(&xs, &xs)) };
        let mut o = MethodOptions::default();
        o.fista.swap_rounds = 0;
        o.sparsegpt.blocksize = 8; // blocks of 6 × 8, which the CPU sweeps on the host
        let method = build(&o).unwrap();
        let pattern = Pattern::Unstructured(0.5);
        let dense = mat_to_tensor(&w).unwrap();
        MOVED.with_borrow_mut(|v| v.clear());
        let on = method.prune_on_device(&dense, Some(&st), pattern).unwrap().expect("a device verb");
        let moved = MOVED.with_borrow(|v| v.clone());
        assert!(!moved.iter().any(|&x| x == Moved::Up(m, n) || x == Moved::Down(m, n)), "m × n crossed: {moved:?}");
        assert!(moved.contains(&Moved::Up(n, n)), "the statistics did not go up: {moved:?}");
        let host = method.prune(&w, Some(&st), pattern).unwrap();
        let error = |d: &Option<serde_json::Value>| d.as_ref().unwrap()["error"].as_f64().unwrap();
        let (a, b) = (error(&on.details), error(&host.details));
        assert!((a - b).abs() <= 1e-4 * b, "device {a} vs host {b}");
        let on = tensor_to_mat(&on.w).unwrap();
        mask::verify(&on, pattern, on.nrows()).unwrap();
    }

    #[test]
    fn warm_rows_keep_the_warm_starts_zeros_per_row() {
        let (w, g, c, k) = problem(6, 16, 120, 11);
        let p = Problem { w: &w, g: &g, c: &c, k };
        // An uneven warm start, as SparseGPT's per-block selection gives: rows with 4..12 zeros, 48 in all
        // (50 % of 96).
        let budgets = [4usize, 12, 6, 10, 8, 8];
        let scores = Mat::from_fn(6, 16, |i, j| w[(i, j)].abs());
        let w0 = mask::zeroed(&w, &mask::mask_row_budgets(&scores, &budgets));
        let pattern = Pattern::Unstructured(0.5);
        use crate::prune::side::{Host, Side};
        let zeros = |w: &Mat<f32>| Host::new(&p).zeros_per_row(w).unwrap();
        let h = HardThreshold::from_warm(zeros(&w0), 16, pattern, true);
        assert_eq!(h.budgets.as_deref(), Some(&budgets[..]));
        let (out, rep) = solve(&p, &w0, pattern, &Options::default()).unwrap();
        for (i, &b) in budgets.iter().enumerate() {
            assert_eq!((0..16).filter(|&j| out[(i, j)] == 0.0).count(), b, "row {i}");
        }
        assert!(rep.error <= rep.warm_error, "{} > {}", rep.error, rep.warm_error);
        // Without its own budgets (dense, or N:M) the threshold counts as usual.
        assert!(HardThreshold::from_warm(zeros(&w), 16, pattern, true).budgets.is_none());
        assert!(HardThreshold::from_warm(zeros(&w0), 16, Pattern::NM { n: 2, m: 4 }, true).budgets.is_none());
        // And the paper's per-row threshold forces 8 per row.
        let (even, _) =
            solve(&p, &w0, pattern, &Options { threshold: Threshold::PerRow, ..Default::default() }).unwrap();
        assert!((0..6).all(|i| (0..16).filter(|&j| even[(i, j)] == 0.0).count() == 8));
    }
}
