//! Input statistics of a linear operator: the Gram matrix `G = Σ x xᵀ` over every calibration token
//! (SparseGPT's Hessian up to a factor; Wanda needs only its diagonal), accumulated in f32 by GEMM.
//! Inputs on a GPU are summed there ([`Blocks`]): only the finished `n × n` sums come to the host, not every
//! batch's product (for a 7B layer under FISTAPruner's error correction, 16 batches of 8 × 2048 tokens, that
//! would be 18 GB over PCIe and as many additions on one host thread).

use anyhow::{Result, ensure};
use candle_core::{D, Tensor};
use faer::{Accum, Mat, MatRef};

use crate::linalg::{par, with_f32};

/// Running `Σ x xᵀ` and the token count.
pub struct Gram {
    n: usize,
    /// The host's sum so far (its lower triangle), made at the first host batch.
    g: Option<Mat<f32>>,
    /// The sum so far where the inputs are device tensors ([`crate::device::generic`]).
    on_device: Option<Blocks>,
    pub tokens: usize,
}

impl Gram {
    pub fn new(n: usize) -> Self {
        Self { n, g: None, on_device: None, tokens: 0 }
    }

    pub fn dim(&self) -> usize {
        self.n
    }

    /// The width of the block columns in which a sum of `n` inputs is made on the device ([`Blocks`]).
    pub fn device_block_width(n: usize) -> usize {
        Blocks::width(n)
    }

    /// Add the rows of `x` (`(..., n)`, f32) to the sum.
    pub fn add(&mut self, x: &Tensor) -> Result<()> {
        let n = x.dim(D::Minus1)?;
        ensure!(n == self.dim(), "Gram: input width {n}, expected {}", self.dim());
        let rows = x.elem_count() / n;
        self.tokens += rows;
        if rows == 0 {
            return Ok(());
        }
        if crate::device::generic(x) {
            let sum = self.on_device.get_or_insert_with(|| Blocks::new(n, Blocks::width(n), true));
            let x = x.reshape((rows, n))?;
            return sum.add(&x, &x, TRANSPOSED_VALUES);
        }
        let g = self.g.get_or_insert_with(|| Mat::zeros(n, n));
        with_f32(x, |xs| {
            let a = MatRef::from_row_major_slice(xs, rows, n);
            // G += aᵀ a; only the lower triangle is computed, then mirrored in `finish`.
            faer::linalg::matmul::triangular::matmul(
                g.as_mut(),
                faer::linalg::matmul::triangular::BlockStructure::TriangularLower,
                Accum::Add,
                a.transpose(),
                faer::linalg::matmul::triangular::BlockStructure::Rectangular,
                a,
                faer::linalg::matmul::triangular::BlockStructure::Rectangular,
                1.0f32,
                par(),
            );
        })?;
        Ok(())
    }

    /// The full symmetric matrix (the upper triangle copied from the lower), on the host.
    pub fn finish(self) -> Result<Mat<f32>> {
        Ok(self.finish_summed()?.0)
    }

    /// [`Self::finish`], with the same matrix on the device where it was summed there.
    pub fn finish_summed(self) -> Result<(Mat<f32>, Option<Tensor>)> {
        if let Some(t) = self.on_device.map(Blocks::sum).transpose()?.flatten() {
            let lower = Tensor::tril2(self.n, candle_core::DType::U8, t.device())?;
            let g = lower.where_cond(&t, &t.t()?)?;
            return Ok((crate::linalg::tensor_to_mat(&g)?, Some(g)));
        }
        let n = self.n;
        let Some(g) = self.g else { return Ok((Mat::zeros(n, n), None)) };
        Ok((crate::linalg::mat_from_fn(n, n, |i, j| if i < j { g[(j, i)] } else { g[(i, j)] }), None))
    }
}

/// At most this many values in the transposed copy of a batch's inputs that [`Blocks::add`] makes for a Gram
/// matrix (512 MiB): a LLaMA-2-70B down_proj's batch of 8 × 2048 tokens would be 1.9 GB at once.
const TRANSPOSED_VALUES: usize = 1 << 27;

/// A sum of products `xᵀy` over batches of tokens on the device, kept as block columns: column block `j` holds
/// columns `j w..(j + 1) w`, all of its rows, or for a Gram matrix (`lower`, `y = x`) only rows `j w..n`. A
/// full product would compute every entry above the diagonal too, which the host's rule (`finish`) throws
/// away: with `B` blocks the Gram's products cost `(B + 1) / 2B` of its flops (9/16 at eighths). And each
/// batch's sum holds one block's product and sum beside the running sum, where one product of the whole held
/// two more matrices of its size.
struct Blocks {
    n: usize,
    width: usize,
    lower: bool,
    cols: Vec<Option<Tensor>>,
}

impl Blocks {
    /// For a Gram matrix of `n` inputs (`lower`) or a cross product with `n` columns.
    fn new(n: usize, width: usize, lower: bool) -> Self {
        Self { n, width, lower, cols: vec![None; n.div_ceil(width)] }
    }

    /// Eighths of `n`, on 64-column boundaries, but no narrower than 256 columns: each block's product keeps a
    /// GEMM's shape (at least 256 × 256 × tokens); below 512 columns the sum is one product.
    /// `FISTAPRUNE_GRAM_BLOCKS=1` makes every sum one product, so that scripts/gpu-check.sh can time the two
    /// ways on a GPU.
    fn width(n: usize) -> usize {
        static WHOLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        if n < 512 || *WHOLE.get_or_init(|| std::env::var("FISTAPRUNE_GRAM_BLOCKS").is_ok_and(|v| v == "1")) {
            return n;
        }
        n.div_ceil(8).next_multiple_of(64).max(256)
    }

    /// Add `xᵀy` of `x` `(rows, p)` and `y` `(rows, n)` (for a Gram matrix `y` is `x`; its rows go in slices
    /// whose transposed copy holds at most `values` values).
    fn add(&mut self, x: &Tensor, y: &Tensor, values: usize) -> Result<()> {
        let (rows, n) = y.dims2()?;
        if self.cols.len() == 1 {
            return accumulate(&mut self.cols[0], x.t()?.matmul(y)?);
        }
        if !self.lower {
            // `xᵀ` is packed as cuBLAS needs it; each slab of `y`'s columns is copied to be.
            for (j, sum) in self.cols.iter_mut().enumerate() {
                let j0 = j * self.width;
                accumulate(sum, x.t()?.matmul(&y.narrow(1, j0, self.width.min(n - j0))?.contiguous()?)?)?;
            }
            return Ok(());
        }
        let step = (values / n).max(1);
        for r0 in (0..rows).step_by(step) {
            // The inputs transposed, `(n, rows)`: each block's product takes two of its slabs of rows, packed as
            // cuBLAS needs them (a slab of columns of `x` is not).
            let xt = x.narrow(0, r0, step.min(rows - r0))?.t()?.contiguous()?;
            for (j, sum) in self.cols.iter_mut().enumerate() {
                let j0 = j * self.width;
                let w = self.width.min(n - j0);
                accumulate(sum, xt.narrow(0, j0, n - j0)?.matmul(&xt.narrow(0, j0, w)?.t()?)?)?;
            }
        }
        Ok(())
    }

    /// The sum as one matrix (a Gram matrix's lower triangle, zeros above its diagonal blocks), each block
    /// dropped once it is placed; `None` where nothing was added.
    fn sum(self) -> Result<Option<Tensor>> {
        let mut cols = self.cols.into_iter();
        if cols.len() == 1 {
            return Ok(cols.next().flatten());
        }
        let mut out: Option<Tensor> = None;
        for (j, col) in cols.enumerate() {
            let Some(col) = col else { return Ok(None) };
            // The first block has all the rows.
            let o = match &out {
                Some(o) => o,
                None => out.insert(Tensor::zeros((col.dim(0)?, self.n), col.dtype(), col.device())?),
            };
            let (rows, below) = (o.dim(0)?, col.dim(0)?);
            o.narrow(0, rows - below, below)?.slice_set(&col, 1, j * self.width)?;
        }
        Ok(out)
    }
}

/// Running `Σ x_j²` per input feature over the calibration tokens, in f64: all that Wanda and OWL read of an
/// operator's inputs (`‖X_j‖`). A read of the inputs where the Gram matrix costs a GEMM: for a LLaMA-2-7B
/// layer's 128 × 2048 tokens that is 9·10¹³ f32 FLOP, about 1.8 s at an H200's f32 GEMM rate, so 57 s over 32
/// layers against the authors' 30 s for their whole Wanda. Each square is taken in f32 and summed in f64: the
/// host's sums are the same at any thread count, and a device's, summed in another order, round to the same
/// f32 norms but for a rounding tie.
pub struct SquareSums {
    host: Vec<f64>,
    /// The sum so far where the inputs are device tensors.
    on_device: Option<Tensor>,
}

impl SquareSums {
    pub fn new(n: usize) -> Self {
        Self { host: vec![0.0; n], on_device: None }
    }

    /// Add the rows of `x` (`(..., n)`, f32) to the sums.
    pub fn add(&mut self, x: &Tensor) -> Result<()> {
        let n = x.dim(D::Minus1)?;
        ensure!(n == self.host.len(), "square sums: input width {n}, expected {}", self.host.len());
        ensure!(x.dtype() == candle_core::DType::F32, "square sums: expected f32 inputs, got {:?}", x.dtype());
        let rows = x.elem_count() / n;
        if crate::device::generic(x) {
            // In slices of at most 2²⁶ values: the f64 copy of a 70B MLP's batch would be 7.5 GB at once.
            return device_square_add(&mut self.on_device, &x.reshape((rows, n))?, ((1usize << 26) / n).max(1));
        }
        with_f32(x, |xs| {
            use rayon::prelude::*;
            // Blocks of columns on all threads, each column summed in row order (the same bits at any count).
            const BLOCK: usize = 256;
            self.host.par_chunks_mut(BLOCK).enumerate().for_each(|(b, acc)| {
                for row in xs.chunks_exact(n) {
                    for (a, &v) in acc.iter_mut().zip(&row[b * BLOCK..]) {
                        *a += (v * v) as f64;
                    }
                }
            });
        })
    }

    /// The sums, on the host.
    pub fn finish(self) -> Result<Vec<f64>> {
        match self.on_device {
            Some(t) => Ok(t.to_vec1()?),
            None => Ok(self.host),
        }
    }
}

/// `acc += Σ x_j²` over the rows of `x` `(rows, n)`, on its device, `step` rows at a time.
fn device_square_add(acc: &mut Option<Tensor>, x: &Tensor, step: usize) -> Result<()> {
    let rows = x.dim(0)?;
    for r0 in (0..rows).step_by(step) {
        accumulate(acc, x.narrow(0, r0, step.min(rows - r0))?.sqr()?.to_dtype(candle_core::DType::F64)?.sum(0)?)?;
    }
    Ok(())
}

/// `acc += part`, the first part being the sum itself.
fn accumulate(acc: &mut Option<Tensor>, part: Tensor) -> Result<()> {
    *acc = Some(match acc.take() {
        Some(sum) => (sum + part)?,
        None => part,
    });
    Ok(())
}

/// Running cross products `Σ x yᵀ` over the tokens of two streams: dense inputs `x` against the actual ones
/// `y` of the same operator, or an operator's dense outputs against its actual inputs.
pub struct Cross {
    shape: (usize, usize),
    /// The host's sum so far, made at the first host batch.
    c: Option<Mat<f32>>,
    /// The sum so far where the inputs are device tensors.
    on_device: Option<Blocks>,
}

impl Cross {
    /// For `x` of width `p` and `y` of width `n`.
    pub fn new(p: usize, n: usize) -> Self {
        Self { shape: (p, n), c: None, on_device: None }
    }

    /// The sum, on the host.
    pub fn finish(self) -> Result<Mat<f32>> {
        Ok(self.finish_summed()?.0)
    }

    /// [`Self::finish`], with the same matrix on the device where it was summed there.
    pub fn finish_summed(self) -> Result<(Mat<f32>, Option<Tensor>)> {
        if let Some(t) = self.on_device.map(Blocks::sum).transpose()?.flatten() {
            return Ok((crate::linalg::tensor_to_mat(&t)?, Some(t)));
        }
        Ok((self.c.unwrap_or_else(|| Mat::zeros(self.shape.0, self.shape.1)), None))
    }

    /// Add `xᵀ y` over the rows of `x` `(..., p)` and `y` `(..., n)`.
    pub fn add(&mut self, x: &Tensor, y: &Tensor) -> Result<()> {
        let (p, n) = (x.dim(D::Minus1)?, y.dim(D::Minus1)?);
        let rows = x.elem_count() / p;
        ensure!((p, n) == self.shape && y.elem_count() == rows * n, "Cross: shapes {:?} / {:?}", x.dims(), y.dims());
        if rows == 0 {
            return Ok(());
        }
        if crate::device::generic(x) {
            let sum = self.on_device.get_or_insert_with(|| Blocks::new(n, Blocks::width(n), false));
            return sum.add(&x.reshape((rows, p))?, &y.reshape((rows, n))?, TRANSPOSED_VALUES);
        }
        let c = self.c.get_or_insert_with(|| Mat::zeros(p, n));
        with_f32(x, |xs| {
            with_f32(y, |ys| {
                let a = MatRef::from_row_major_slice(xs, rows, p);
                let b = MatRef::from_row_major_slice(ys, rows, n);
                faer::linalg::matmul::matmul(c.as_mut(), Accum::Add, a.transpose(), b, 1.0f32, par());
            })
        })??;
        Ok(())
    }
}

/// `Σ y²` over a tensor, in f64.
pub fn sum_squares(y: &Tensor) -> Result<f64> {
    if !y.device().is_cpu() {
        return Ok(crate::linalg::sum_by_rows(&y.to_dtype(candle_core::DType::F64)?.sqr()?)?.to_scalar::<f64>()?);
    }
    with_f32(y, |ys| ys.iter().map(|&v| v as f64 * v as f64).sum())
}

/// Per-token scales that tame outlier tokens in the statistics (`--token-cap κ`): a token whose input has a
/// mean square above `κ` times the median of its sequence's tokens is scaled down to that level, so that it
/// weighs in `G`, `XᵀX*` and `XᵀX` as a token at the cap would. Models with massive activations (a few
/// tokens, often the first, with inputs hundreds of times larger than the rest) otherwise make those tokens
/// the whole least-squares objective. Returns `(..., 1)` factors in `(0, 1]` for `x` `(..., seq, n)`.
pub fn outlier_token_scales(x: &Tensor, cap: f64) -> Result<Tensor> {
    ensure!(cap > 0.0 && cap.is_finite(), "token cap {cap} must be a positive number");
    let dims = x.dims().to_vec();
    ensure!(dims.len() >= 2, "token scales: expected (..., seq, n), got {dims:?}");
    let seq = dims[dims.len() - 2].max(1);
    let ms: Vec<f32> = x.to_dtype(candle_core::DType::F32)?.sqr()?.mean_keepdim(D::Minus1)?.flatten_all()?.to_vec1()?;
    let mut out = Vec::with_capacity(ms.len());
    for s in ms.chunks(seq) {
        let mut sorted = s.to_vec();
        sorted.sort_by(|a, b| a.total_cmp(b));
        let limit = cap * sorted[sorted.len() / 2] as f64;
        out.extend(s.iter().map(|&m| if m as f64 > limit && m > 0.0 { (limit / m as f64).sqrt() as f32 } else { 1.0 }));
    }
    let mut shape = dims;
    *shape.last_mut().expect("rank ≥ 2") = 1;
    Ok(Tensor::from_vec(out, shape, x.device())?)
}

/// What a method knows of one operator's inputs over the calibration tokens (rows = tokens):
/// `gram = X*ᵀX*` of the inputs it actually gets, or only its diagonal (`square_sums`) where the method reads no
/// more ([`Observes::Norms`](super::Observes::Norms)); with intra-layer error correction also `cross = XᵀX*`
/// and `dense = XᵀX` of the inputs the dense layer gives it (without, all three are the same matrix), or, for
/// an operator alone in its group and narrower than its input, its target itself (`outputs`).
pub struct OpStats {
    pub gram: Option<Mat<f32>>,
    /// `Σ x*_j²` per input feature ([`SquareSums`]) where there is no `gram`.
    pub square_sums: Option<Vec<f64>>,
    pub cross: Option<Mat<f32>>,
    pub dense: Option<Mat<f32>>,
    /// `(C, K) = (YᵀX*, ‖Y‖²)` from the operator's dense outputs `Y = W X` (no bias): `2 m n` per token
    /// against `3 n²` for `XᵀX*` and `XᵀX`.
    pub outputs: Option<(Mat<f32>, f64)>,
    /// The same matrices on the device, where they were summed there.
    pub copies: Copies,
}

/// The device's copies of an [`OpStats`]'s matrices, where they were summed there: each the same values as
/// its host matrix, held as that matrix's copy on the device ([`OpStats::matrices`]), so that it does not go
/// up again (for a 7B layer under error correction about 1.1 GB).
#[derive(Default)]
pub struct Copies {
    pub gram: Option<Tensor>,
    pub cross: Option<Tensor>,
    pub dense: Option<Tensor>,
    pub outputs: Option<Tensor>,
}

impl OpStats {
    /// `G*` alone (no error correction).
    pub fn of_gram(gram: Mat<f32>) -> Self {
        Self { gram: Some(gram), square_sums: None, cross: None, dense: None, outputs: None, copies: Copies::default() }
    }

    /// Each input feature's `Σ x*_j²` alone.
    pub fn of_square_sums(sums: Vec<f64>) -> Self {
        Self { gram: None, square_sums: Some(sums), cross: None, dense: None, outputs: None, copies: Copies::default() }
    }

    /// The matrices it holds with their device copies where it has them, to keep on the device while an
    /// operator group uses them ([`crate::linalg::with_resident_copies`]).
    pub fn matrices(&self) -> Vec<(&Mat<f32>, Option<&Tensor>)> {
        let c = &self.copies;
        [
            (self.gram.as_ref(), c.gram.as_ref()),
            (self.cross.as_ref(), c.cross.as_ref()),
            (self.dense.as_ref(), c.dense.as_ref()),
            (self.outputs.as_ref().map(|o| &o.0), c.outputs.as_ref()),
        ]
        .into_iter()
        .filter_map(|(m, t)| Some((m?, t)))
        .collect()
    }

    /// `G*`, or an error where only the features' norms were collected.
    pub fn gram(&self) -> Result<&Mat<f32>> {
        self.gram
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("only the inputs' norms were collected, not their Gram matrix"))
    }

    /// Each input feature's norm `‖X*_j‖`: from its sum of squares, else from the Gram diagonal.
    pub fn norms(&self) -> Result<Vec<f32>> {
        if let Some(s) = &self.square_sums {
            return Ok(s.iter().map(|&v| v.max(0.0).sqrt() as f32).collect());
        }
        let g = self.gram()?;
        Ok((0..g.ncols()).map(|j| g[(j, j)].max(0.0).sqrt()).collect())
    }

    pub fn cross(&self) -> Result<&Mat<f32>> {
        self.cross.as_ref().map_or_else(|| self.gram(), Ok)
    }

    pub fn dense(&self) -> Result<&Mat<f32>> {
        self.dense.as_ref().map_or_else(|| self.gram(), Ok)
    }

    /// Fail, naming `what` (the layer and its operators), if a NaN or an infinity reached these statistics:
    /// any non-finite input value makes its diagonal entry (a sum of squares) non-finite, so this catches
    /// bad activations at the operator they feed, at O(n²) cost.
    pub fn check_finite(&self, what: &str) -> Result<()> {
        if let Some((_, k)) = &self.outputs {
            ensure!(k.is_finite(), "{what}: NaN or Inf in the dense layer's outputs of this operator");
        }
        if let Some(f) = self.square_sums.as_ref().and_then(|s| s.iter().position(|v| !v.is_finite())) {
            anyhow::bail!("{what}: NaN or Inf in the calibration activations (input feature {f}; its sum of squares)");
        }
        let streams = [
            (self.gram.as_ref(), "X*, the inputs of the partially pruned layer"),
            (self.cross.as_ref(), "X·X*, dense against pruned inputs"),
            (self.dense.as_ref(), "X, the dense layer's inputs"),
            (self.outputs.as_ref().map(|o| &o.0), "Y·X*, dense outputs against pruned inputs"),
        ];
        for (m, label) in streams {
            let Some(m) = m else { continue };
            // A non-finite input value makes its feature's sum of squares non-finite; name the first such.
            if let Some(f) = (0..m.nrows().min(m.ncols())).find(|&f| !m[(f, f)].is_finite()) {
                anyhow::bail!(
                    "{what}: NaN or Inf in the calibration activations (input feature {f}; statistics of {label})"
                );
            }
            if crate::linalg::first_non_finite(m.as_ref()).is_some() {
                anyhow::bail!("{what}: the calibration activations overflow f32 in the statistics of {label}");
            }
        }
        Ok(())
    }

    /// The operator's least-squares model for weight `w`: `‖W' X* − W X‖² = tr(W'G*W'ᵀ) − 2 tr(W' Cᵀ) + K`.
    pub fn problem<'a>(&'a self, w: &'a Mat<f32>, c: &'a Mat<f32>) -> Result<super::fista::Problem<'a>> {
        let k = match &self.outputs {
            Some((_, k)) => *k,
            None => quad_error(w, self.dense()?)?,
        };
        Ok(super::fista::Problem { w, g: self.gram()?, c, k })
    }

    /// `C = W XᵀX*` (`w` is the operator's dense weight, which `outputs` already holds the product of).
    pub fn target(&self, w: &Mat<f32>) -> Result<Mat<f32>> {
        if let Some((c, _)) = &self.outputs {
            assert_eq!(c.shape(), w.shape(), "target: the statistics are of another operator");
            return Ok(c.clone());
        }
        crate::linalg::product(w, self.cross()?)
    }

    /// [`Self::target`] and `K` for the dense f32 weight `w` where it is, on the run's device: `K = ‖W X‖² =
    /// Σ w (w XᵀX)`, each term in f32, summed in f64.
    pub fn target_on_device(&self, w: &candle_core::Tensor) -> Result<(candle_core::Tensor, f64)> {
        let up = |m: &Mat<f32>| crate::linalg::mat_to_device(m, w.device());
        if let Some((c, k)) = &self.outputs {
            assert_eq!(c.shape(), w.dims2()?, "target: the statistics are of another operator");
            return Ok((up(c)?, *k));
        }
        let wd = w.matmul(&up(self.dense()?)?)?;
        let k = crate::linalg::sum_by_rows(&(w * &wd)?.to_dtype(candle_core::DType::F64)?)?.to_scalar::<f64>()?;
        // Without error correction `XᵀX*` and `XᵀX` are both `G*`: the one product is `C` too.
        let c = if self.cross.is_none() && self.dense.is_none() { wd } else { w.matmul(&up(self.cross()?)?)? };
        Ok((c, k))
    }
}

/// `tr(D G Dᵀ)` for `D` `(m, n)` and symmetric `G`: the squared output error `‖D X‖²` that a weight change `D`
/// causes on the inputs whose Gram is `G`.
pub fn quad_error(d: &Mat<f32>, g: &Mat<f32>) -> Result<f64> {
    let dg = crate::linalg::product(d, g)?;
    let mut s = 0f64;
    for j in 0..d.ncols() {
        for i in 0..d.nrows() {
            s += dg[(i, j)] as f64 * d[(i, j)] as f64;
        }
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn gram_matches_direct_sum() {
        let x: Vec<f32> = (0..3 * 5 * 4).map(|i| ((i * 7 % 11) as f32 - 5.0) / 3.0).collect();
        let t = Tensor::from_vec(x.clone(), (3, 5, 4), &Device::Cpu).unwrap();
        let mut g = Gram::new(4);
        g.add(&t).unwrap();
        g.add(&t.narrow(0, 0, 1).unwrap()).unwrap();
        assert_eq!(g.tokens, 20);
        let g = g.finish().unwrap();
        for a in 0..4 {
            for b in 0..4 {
                let mut want = 0f64;
                for r in 0..15 {
                    want += x[r * 4 + a] as f64 * x[r * 4 + b] as f64;
                }
                for r in 0..5 {
                    want += x[r * 4 + a] as f64 * x[r * 4 + b] as f64;
                }
                assert!((g[(a, b)] as f64 - want).abs() < 1e-4, "({a},{b}) {} vs {want}", g[(a, b)]);
            }
        }
    }

    /// A Gram matrix summed on the device comes to the host symmetric, from its lower triangle as the host's
    /// own sum does, and its device copy, which stands for it there ([`crate::linalg::with_resident_copies`]),
    /// is that matrix to the bit.
    #[test]
    fn a_device_sum_and_its_copy_are_the_same_matrix() {
        let n = 5;
        let v: Vec<f32> = (0..n * n).map(|i| i as f32 * 0.37 - 3.0).collect();
        let t = Tensor::from_vec(v.clone(), (n, n), &Device::Cpu).unwrap();
        let on_device = Some(Blocks { n, width: n, lower: true, cols: vec![Some(t)] });
        let (host, copy) = Gram { n, g: None, on_device, tokens: 1 }.finish_summed().unwrap();
        for i in 0..n {
            for j in 0..n {
                assert_eq!(host[(i, j)], if i < j { v[j * n + i] } else { v[i * n + j] }, "({i}, {j})");
            }
        }
        assert!(crate::linalg::tensor_to_mat(&copy.expect("a device copy")).unwrap() == host);
    }

    /// The device's Gram matrix summed in block columns of its lower triangle (37 inputs in blocks of 8, the last
    /// of 5; batches sliced by rows, one of them ragged) is the host's sum to rounding, symmetric to the bit, and
    /// each entry on or below the diagonal the one full product's to rounding.
    #[test]
    fn a_device_sum_in_blocks_is_the_host_sum() {
        let n = 37;
        let val = |i: usize| ((i * 7919 % 1009) as f32 - 504.0) / 97.0;
        let batches: Vec<Tensor> = [9, 16, 3]
            .iter()
            .scan(0, |at, &rows| {
                *at += rows * n;
                Some(Tensor::from_vec((0..rows * n).map(|i| val(i + *at)).collect(), (rows, n), &Device::Cpu).unwrap())
            })
            .collect();
        let (mut host, mut blocks, mut whole) = (Gram::new(n), Blocks::new(n, 8, true), Blocks::new(n, n, true));
        for x in &batches {
            host.add(x).unwrap();
            blocks.add(x, x, 5 * n).unwrap();
            whole.add(x, x, 5 * n).unwrap();
        }
        assert_eq!(blocks.cols.len(), 5);
        let host = host.finish().unwrap();
        let on_device = Some(blocks);
        let (summed, copy) = Gram { n, g: None, on_device, tokens: 28 }.finish_summed().unwrap();
        let whole = crate::linalg::tensor_to_mat(&whole.sum().unwrap().unwrap()).unwrap();
        for i in 0..n {
            for j in 0..n {
                let tol = 1e-5 * host[(i, j)].abs().max(1.0);
                assert!(
                    (summed[(i, j)] - host[(i, j)]).abs() <= tol,
                    "({i},{j}) {} vs {}",
                    summed[(i, j)],
                    host[(i, j)]
                );
                assert_eq!(summed[(i, j)].to_bits(), summed[(j, i)].to_bits(), "({i},{j})");
                if i >= j {
                    assert!((summed[(i, j)] - whole[(i, j)]).abs() <= tol, "({i},{j}) against one product");
                }
            }
        }
        assert!(crate::linalg::tensor_to_mat(&copy.unwrap()).unwrap() == summed);
        // The widths a model's inputs get: eighths on 64-column steps, one product below 512 inputs.
        for (n, w, b) in [(64, 64, 1), (511, 511, 1), (576, 256, 3), (4096, 512, 8), (11008, 1408, 8), (28672, 3584, 8)]
        {
            assert_eq!((Blocks::width(n), Blocks::new(n, Blocks::width(n), true).cols.len()), (w, b), "{n}");
        }
    }

    /// Each feature's sum of squares on the host is the f64 sum of the f32 squares in row order, to the bit, at
    /// any number of threads (300 columns: two blocks); the device's, summed in slices, is that sum to f64
    /// rounding and gives the same f32 norms; and the norms are the Gram diagonal's to f32 rounding.
    #[test]
    fn square_sums_are_the_gram_diagonal_in_f64() {
        let n = 300;
        let val = |i: usize| ((i * 7919 % 1009) as f32 - 504.0) / 97.0;
        let batches: Vec<Tensor> = (0..3)
            .map(|b| {
                Tensor::from_vec((0..14 * n).map(|i| val(i + 14 * n * b)).collect(), (2, 7, n), &Device::Cpu).unwrap()
            })
            .collect();
        let mut want = vec![0f64; n];
        for x in &batches {
            let v: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
            for (i, &x) in v.iter().enumerate() {
                want[i % n] += (x * x) as f64;
            }
        }
        let pool = |threads| rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        for threads in [1, 3] {
            let mut host = SquareSums::new(n);
            pool(threads).install(|| batches.iter().for_each(|x| host.add(x).unwrap()));
            let got = host.finish().unwrap();
            assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "{threads} threads");
        }
        let mut on_device = None;
        for x in &batches {
            device_square_add(&mut on_device, &x.reshape((14, n)).unwrap(), 3).unwrap();
        }
        let device = OpStats::of_square_sums(on_device.unwrap().to_vec1().unwrap());
        let norms = OpStats::of_square_sums(want.clone()).norms().unwrap();
        for (j, (d, w)) in device.square_sums.as_ref().unwrap().iter().zip(&want).enumerate() {
            assert!((d - w).abs() <= 1e-14 * w, "feature {j}: {d} vs {w}");
        }
        assert_eq!(device.norms().unwrap(), norms);
        let mut gram = Gram::new(n);
        batches.iter().for_each(|x| gram.add(x).unwrap());
        let diag = OpStats::of_gram(gram.finish().unwrap()).norms().unwrap();
        for (j, (a, b)) in norms.iter().zip(&diag).enumerate() {
            assert!((a - b).abs() <= 2e-6 * a, "feature {j}: {a} vs {b}");
        }
        // A NaN in the inputs is named by its feature.
        let mut bad = want;
        bad[17] = f64::NAN;
        let err = OpStats::of_square_sums(bad).check_finite("input of q").unwrap_err().to_string();
        assert!(err.contains("input feature 17"), "{err}");
    }

    /// The device's running sums are the batches' products summed on the host: to the bit as one product each
    /// (both add in f32 from the first product), to rounding in column blocks (a cross product of 37 columns
    /// in blocks of 8, the last of 5); and the Gram matrix is the host path's, to rounding.
    #[test]
    fn device_sums_are_the_batches_products_summed() {
        let val = |i: usize| ((i * 7 % 13) as f32 - 6.0) / 5.0;
        let (p, n) = (4, 37);
        let batch = |b: usize, w: usize| {
            Tensor::from_vec((0..10 * w).map(|i| val(i + 40 * b + w)).collect(), (10, w), &Device::Cpu).unwrap()
        };
        let (xs, ys): (Vec<Tensor>, Vec<Tensor>) = (0..3).map(|b| (batch(b, p), batch(b, n))).unzip();
        let (mut gram, mut whole, mut blocks) =
            (Blocks::new(p, p, true), Blocks::new(n, n, false), Blocks::new(n, 8, false));
        let (mut gram_by_hand, mut by_hand) = (Mat::<f32>::zeros(p, p), Mat::<f32>::zeros(p, n));
        let mut host = Gram::new(p);
        for (x, y) in xs.iter().zip(&ys) {
            gram.add(x, x, usize::MAX).unwrap();
            whole.add(x, y, usize::MAX).unwrap();
            blocks.add(x, y, usize::MAX).unwrap();
            let product = |a: &Tensor, b: &Tensor| crate::linalg::tensor_to_mat(&a.t().unwrap().matmul(b).unwrap());
            gram_by_hand += product(x, x).unwrap();
            by_hand += product(x, y).unwrap();
            host.add(x).unwrap();
        }
        let sum = |b: Blocks| crate::linalg::tensor_to_mat(&b.sum().unwrap().unwrap()).unwrap();
        let (gram, whole, blocks, host) = (sum(gram), sum(whole), sum(blocks), host.finish().unwrap());
        for a in 0..p {
            for b in 0..p {
                assert_eq!(gram[(a, b)].to_bits(), gram_by_hand[(a, b)].to_bits(), "({a},{b})");
                assert!((gram[(a, b)] - host[(a, b)]).abs() <= 1e-5 * host[(a, b)].abs().max(1.0), "({a},{b})");
            }
            for b in 0..n {
                assert_eq!(whole[(a, b)].to_bits(), by_hand[(a, b)].to_bits(), "({a},{b})");
                let tol = 1e-5 * by_hand[(a, b)].abs().max(1.0);
                assert!((blocks[(a, b)] - by_hand[(a, b)]).abs() <= tol, "({a},{b}) {}", blocks[(a, b)]);
            }
        }
    }

    /// The target from an operator's dense outputs (`YᵀX*`, `‖Y‖²`) is the one from its inputs (`W XᵀX*`,
    /// `tr(W XᵀX Wᵀ)`).
    #[test]
    fn target_from_dense_outputs_equals_target_from_inputs() {
        let (t, n, m) = (40, 6, 3);
        let val = |i: usize, a: usize, b: usize| ((i * a % b) as f32 - (b / 2) as f32) / b as f32;
        let x = Tensor::from_vec((0..t * n).map(|i| val(i, 7, 13)).collect(), (2, t / 2, n), &Device::Cpu).unwrap();
        let xs = Tensor::from_vec((0..t * n).map(|i| val(i, 5, 11)).collect(), (2, t / 2, n), &Device::Cpu).unwrap();
        let w = Tensor::from_vec((0..m * n).map(|i| val(i, 3, 7)).collect(), (m, n), &Device::Cpu).unwrap();
        let wm = crate::linalg::tensor_to_mat(&w).unwrap();
        let (mut gram, mut cross, mut dense) = (Gram::new(n), Cross::new(n, n), Gram::new(n));
        gram.add(&xs).unwrap();
        cross.add(&x, &xs).unwrap();
        dense.add(&x).unwrap();
        let g = gram.finish().unwrap();
        let inputs = OpStats {
            cross: Some(cross.finish().unwrap()),
            dense: Some(dense.finish().unwrap()),
            ..OpStats::of_gram(g.clone())
        };
        let y = crate::linalg::matmul_nt(&x.flatten_to(1).unwrap(), &w).unwrap();
        let mut yc = Cross::new(m, n);
        yc.add(&y, &xs).unwrap();
        let outputs =
            OpStats { outputs: Some((yc.finish().unwrap(), sum_squares(&y).unwrap())), ..OpStats::of_gram(g) };
        let (ca, cb) = (inputs.target(&wm).unwrap(), outputs.target(&wm).unwrap());
        for i in 0..m {
            for j in 0..n {
                assert!((ca[(i, j)] - cb[(i, j)]).abs() < 1e-4, "C({i},{j}) {} vs {}", ca[(i, j)], cb[(i, j)]);
            }
        }
        let (ka, kb) = (inputs.problem(&wm, &ca).unwrap().k, outputs.problem(&wm, &cb).unwrap().k);
        assert!(ka > 1.0 && (ka - kb).abs() < 1e-5 * ka, "K {ka} vs {kb}");
    }

    #[test]
    fn outlier_tokens_are_scaled_to_the_cap_and_the_rest_kept() {
        // One sequence of five tokens, mean squares 1, 1, 4, 1, 400: the median is 1; with κ = 10 only the
        // last is over the cap and is scaled to mean square 10.
        let rows: [[f32; 2]; 5] = [[1.0, 1.0], [1.0, -1.0], [2.0, 2.0], [-1.0, 1.0], [20.0, 20.0]];
        let flat: Vec<f32> = rows.iter().flatten().copied().collect();
        let x = Tensor::from_vec(flat, (1, 5, 2), &Device::Cpu).unwrap();
        let s: Vec<f32> = outlier_token_scales(&x, 10.0).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(&s[..4], &[1.0, 1.0, 1.0, 1.0]);
        let scaled_ms = 400.0 * s[4] * s[4];
        assert!((scaled_ms - 10.0).abs() < 1e-4, "{scaled_ms}");
        // Each sequence has its own median.
        let two = Tensor::cat(&[&x, &(&x * 3.0).unwrap()], 0).unwrap();
        let s2: Vec<f32> = outlier_token_scales(&two, 10.0).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(&s2[..5], &s[..]);
        assert_eq!(&s2[5..], &s[..]);
        assert!(outlier_token_scales(&x, 0.0).is_err());
    }
}
