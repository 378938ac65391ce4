//! Where FISTAPruner's dense work is done: on the host, in faer matrices ([`Host`]), or on the run's device, in
//! candle tensors ([`OnDevice`]). FISTAPruner's solve and [`super::swap::refine`] are written once over
//! [`Side`], so the method's logic has one implementation and each side only its arithmetic.
//!
//! On a device the iterate, its product with `G*` and its mask stay there from the warm start to the result.
//! When they crossed to the host between steps, an operator made 35 transfers of `m × n` values with the
//! defaults, its report's errors included (none now, with the methods' device verbs: docs/BENCHMARKS.md), each
//! with a transpose on the host: for a LLaMA-2-7B layer 0.8 GB a transfer.

use anyhow::Result;
use candle_core::{DType, Tensor};
use faer::Mat;

use super::fista::{Facts, HardThreshold, Problem, Steps};
use super::mask::{Mask, Pattern};

/// One side's arithmetic on an operator: its matrices there, and the [`Facts`] both sides share.
pub trait Side {
    /// An `(m, n)` f32 matrix of the operator's shape: weights, or their product with `G*`.
    type W: Clone;
    /// A mask of that shape (pruned: true, or 1).
    type M: Clone;

    /// The operator's shape, `K`, `G*` on the host, the dense weight's scale.
    fn facts(&self) -> &Facts<'_>;
    /// A host matrix here.
    fn load(&self, w: &Mat<f32>) -> Result<Self::W>;
    /// A matrix here on the host.
    fn store(&self, w: &Self::W) -> Result<Mat<f32>>;
    /// The zeros of each row of `w`.
    fn zeros_per_row(&self, w: &Self::W) -> Result<Vec<usize>>;
    /// The hard threshold `h` of `w`, and its mask.
    fn threshold(&self, h: &HardThreshold, w: &Self::W) -> Result<(Self::W, Self::M)>;
    /// `w G*`.
    fn times_g(&self, w: &Self::W) -> Result<Self::W>;
    /// `‖W'X* − WX‖²` given `wg = W' G*` ([`Problem::error_with`]): each column summed in f32, the columns in
    /// f64.
    fn error(&self, w: &Self::W, wg: &Self::W) -> Result<f64>;
    /// Each row's error less its constant: `Σ_j w (wG* − 2c)`, each term in f32, summed in f64.
    fn row_errors(&self, w: &Self::W, wg: &Self::W) -> Result<Vec<f64>>;
    /// FISTA from `w0` ([`super::fista::Steps`]): the last iterate and the iterations run.
    fn fista(&self, w0: &Self::W, s: Steps) -> Result<(Self::W, usize)>;
    /// The masked re-fit ([`super::fista::refit`]): the weights and their product with `G*`.
    fn refit(&self, w: &Self::W, wg: Option<Self::W>, pruned: &Self::M, iters: usize) -> Result<(Self::W, Self::W)>;
    /// One round of the swap search from `w` (`wg = w G*`, mask `pruned`): every row as the search left it
    /// (unchanged where it made no swap) with its mask, and each row's swaps and floating-point operations.
    fn search(
        &self,
        w: &Self::W,
        wg: &Self::W,
        pruned: &Self::M,
        pattern: Pattern,
        cap: usize,
    ) -> Result<Searched<Self::W, Self::M>>;
    /// `a`'s rows where `take`, `b`'s elsewhere.
    fn rows(&self, take: &[bool], a: &Self::W, b: &Self::W) -> Result<Self::W>;
    /// The same for masks.
    fn mask_rows(&self, take: &[bool], a: &Self::M, b: &Self::M) -> Result<Self::M>;
}

/// What a swap search round gives ([`Side::search`]): every row as the search left it, their mask, and each
/// row's swaps and floating-point operations.
pub struct Searched<W, M> {
    pub w: W,
    pub pruned: M,
    pub made: Vec<usize>,
    pub flops: Vec<f64>,
}

/// The host: faer matrices, the host's functions.
pub struct Host<'a> {
    p: &'a Problem<'a>,
    facts: Facts<'a>,
}

impl<'a> Host<'a> {
    pub fn new(p: &'a Problem<'a>) -> Self {
        Self { p, facts: p.facts() }
    }
}

impl Side for Host<'_> {
    type W = Mat<f32>;
    type M = Mask;

    fn facts(&self) -> &Facts<'_> {
        &self.facts
    }

    fn load(&self, w: &Mat<f32>) -> Result<Mat<f32>> {
        Ok(w.clone())
    }

    fn store(&self, w: &Mat<f32>) -> Result<Mat<f32>> {
        Ok(w.clone())
    }

    fn zeros_per_row(&self, w: &Mat<f32>) -> Result<Vec<usize>> {
        Ok((0..w.nrows()).map(|i| (0..w.ncols()).filter(|&j| w[(i, j)] == 0.0).count()).collect())
    }

    fn threshold(&self, h: &HardThreshold, w: &Mat<f32>) -> Result<(Mat<f32>, Mask)> {
        Ok(h.apply(w))
    }

    fn times_g(&self, w: &Mat<f32>) -> Result<Mat<f32>> {
        crate::linalg::product(w, self.p.g)
    }

    fn error(&self, w: &Mat<f32>, wg: &Mat<f32>) -> Result<f64> {
        Ok(self.p.error_with(w, wg))
    }

    fn row_errors(&self, w: &Mat<f32>, wg: &Mat<f32>) -> Result<Vec<f64>> {
        Ok(super::swap::row_errors(w, wg, self.p.c))
    }

    fn fista(&self, w0: &Mat<f32>, s: Steps) -> Result<(Mat<f32>, usize)> {
        Ok(super::fista::fista_host(self.p, w0, s))
    }

    fn refit(&self, w: &Mat<f32>, wg: Option<Mat<f32>>, pruned: &Mask, iters: usize) -> Result<(Mat<f32>, Mat<f32>)> {
        super::fista::refit(self.p, w, wg, pruned, iters)
    }

    fn search(
        &self,
        w: &Mat<f32>,
        wg: &Mat<f32>,
        pruned: &Mask,
        pattern: Pattern,
        cap: usize,
    ) -> Result<Searched<Mat<f32>, Mask>> {
        Ok(super::swap::search_host(self.p.g, self.p.c, w, wg, pruned, pattern, cap))
    }

    fn rows(&self, take: &[bool], a: &Mat<f32>, b: &Mat<f32>) -> Result<Mat<f32>> {
        Ok(take_rows(take, a, b))
    }

    fn mask_rows(&self, take: &[bool], a: &Mask, b: &Mask) -> Result<Mask> {
        Ok(take_rows(take, a, b))
    }
}

/// `a`'s rows where `take`, `b`'s elsewhere (the host's [`Side::rows`] and [`Side::mask_rows`]).
fn take_rows<T: Copy + Send + Sync>(take: &[bool], a: &Mat<T>, b: &Mat<T>) -> Mat<T> {
    crate::linalg::mat_from_fn(b.nrows(), b.ncols(), |i, j| if take[i] { a[(i, j)] } else { b[(i, j)] })
}

/// [`Problem::error_with`] on tensors where they are, given `C` and `K`: `Σ w (wG* − 2C) + K`, each column
/// summed in f32, the columns in f64.
pub fn error_on_device(w: &Tensor, wg: &Tensor, c: &Tensor, k: f64) -> Result<f64> {
    let per_column = terms(w, wg, c)?.sum_keepdim(0)?.to_dtype(DType::F64)?;
    Ok((per_column.sum_all()?.to_scalar::<f64>()? + k).max(0.0))
}

/// `w (wG* − 2C)`, each term in f32: the errors' terms. `2 C` is made for each call (exact: the same bits as
/// one kept), not held beside the solve: for a LLaMA-2-70B MLP operator it is 0.9 GiB.
fn terms(w: &Tensor, wg: &Tensor, c: &Tensor) -> Result<Tensor> {
    Ok((w * (wg - (c * 2.0)?)?)?)
}

/// The run's device: tensors there (masks as u8), `G*` and `C` held there for the operator.
pub struct OnDevice<'a> {
    facts: Facts<'a>,
    g: Tensor,
    c: Tensor,
    /// `C` on the host, made once where the swap search falls back to the host's.
    c_host: std::cell::OnceCell<Mat<f32>>,
}

impl<'a> OnDevice<'a> {
    /// `p`'s `G*` and `C` on the run's device (their resident copies where the caller holds them there).
    pub fn new(p: &'a Problem<'a>) -> Result<Self> {
        let dev = crate::device::current();
        let (g, c) = (crate::linalg::mat_to_device(p.g, dev)?, crate::linalg::mat_to_device(p.c, dev)?);
        Self::of(p.facts(), g, c)
    }

    /// An operator whose `G*` and `C` are on the device already.
    pub fn of(facts: Facts<'a>, g: Tensor, c: Tensor) -> Result<Self> {
        Ok(Self { facts, g, c, c_host: Default::default() })
    }

    /// `take` as a `(m, 1)` u8 column, to choose rows by.
    fn take(&self, take: &[bool]) -> Result<Tensor> {
        let flags: Vec<u8> = take.iter().map(|&t| u8::from(t)).collect();
        Ok(Tensor::from_vec(flags, (take.len(), 1), crate::device::current())?)
    }
}

impl Side for OnDevice<'_> {
    type W = Tensor;
    type M = Tensor;

    fn facts(&self) -> &Facts<'_> {
        &self.facts
    }

    fn load(&self, w: &Mat<f32>) -> Result<Tensor> {
        crate::linalg::mat_to_device(w, crate::device::current())
    }

    fn store(&self, w: &Tensor) -> Result<Mat<f32>> {
        crate::linalg::tensor_to_mat(w)
    }

    fn zeros_per_row(&self, w: &Tensor) -> Result<Vec<usize>> {
        Ok(super::device_mask::row_counts(&w.eq(0f32)?)?.into_iter().map(|c| c as usize).collect())
    }

    fn threshold(&self, h: &HardThreshold, w: &Tensor) -> Result<(Tensor, Tensor)> {
        h.apply_tensor(w)
    }

    fn times_g(&self, w: &Tensor) -> Result<Tensor> {
        Ok(w.matmul(&self.g)?)
    }

    fn error(&self, w: &Tensor, wg: &Tensor) -> Result<f64> {
        error_on_device(w, wg, &self.c, self.facts.k)
    }

    fn row_errors(&self, w: &Tensor, wg: &Tensor) -> Result<Vec<f64>> {
        let per_row = terms(w, wg, &self.c)?.to_dtype(DType::F64)?.sum_keepdim(1)?;
        Ok(per_row.flatten_all()?.to_vec1::<f64>()?)
    }

    fn fista(&self, w0: &Tensor, s: Steps) -> Result<(Tensor, usize)> {
        super::fista::fista_on_device(&self.g, &self.c, w0, s)
    }

    fn refit(&self, w: &Tensor, wg: Option<Tensor>, pruned: &Tensor, iters: usize) -> Result<(Tensor, Tensor)> {
        let keep = pruned.eq(0u8)?.to_dtype(DType::F32)?;
        super::fista::refit_on_device(&self.g, &self.c, w, wg, &keep, iters)
    }

    fn search(
        &self,
        w: &Tensor,
        wg: &Tensor,
        pruned: &Tensor,
        pattern: Pattern,
        cap: usize,
    ) -> Result<Searched<Tensor, Tensor>> {
        #[cfg(feature = "cuda")]
        if let Some(found) = super::swap::search_on_gpu(self.facts.g, &self.g, &self.c, wg, w, pruned, pattern, cap)? {
            return Ok(found);
        }
        // Elsewhere (the device path on the CPU, or N:M groups too wide for the kernel): the host's search.
        if self.c_host.get().is_none() {
            let _ = self.c_host.set(self.store(&self.c)?);
        }
        let cm = self.c_host.get().expect("set above");
        let (wm, wgm) = (self.store(w)?, self.store(wg)?);
        let pm = super::device_mask::to_host(pruned)?;
        let s = super::swap::search_host(self.facts.g, cm, &wm, &wgm, &pm, pattern, cap);
        let pruned = super::device_mask::from_host(&s.pruned, crate::device::current())?;
        Ok(Searched { w: self.load(&s.w)?, pruned, made: s.made, flops: s.flops })
    }

    fn rows(&self, take: &[bool], a: &Tensor, b: &Tensor) -> Result<Tensor> {
        Ok(self.take(take)?.broadcast_as(a.shape())?.where_cond(a, b)?)
    }

    fn mask_rows(&self, take: &[bool], a: &Tensor, b: &Tensor) -> Result<Tensor> {
        self.rows(take, a, b)
    }
}
