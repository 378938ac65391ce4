//! SparseGPT (Frantar and Alistarh 2023), as the authors' `sparsegpt.py` does it.
//!
//! `H = G + λI` with `λ = percdamp · mean(diag G)` (dead inputs, `G_jj = 0`, get `H_jj = 1` and a zero weight
//! column); `U` = upper Cholesky factor of `H⁻¹`. Columns are swept in blocks of `blocksize`: the mask of a
//! block is chosen by `w² / U_jj²` (unstructured: the lowest over the whole block, all rows; N:M: per row, per
//! group, when the sweep reaches the group), then each column's pruned weights are zeroed and their error
//! `(w − q) / U_jj` is spread over the block's remaining columns with row `j` of `U` (the optimal brain surgeon
//! update); the rest of the matrix gets the block's errors in one GEMM (the lazy batch update).
//!
//! Two deliberate differences: the authors' unstructured threshold `tmp <= sorted[int(numel·s)]` prunes one
//! weight more than `numel·s` per block, while we prune exactly `round(numel·s)` per block; and we factor `H`
//! in f64 where they factor it in f32. `--factor-dtype f32` takes their precision: half the memory of the
//! `n × n` factors, and faster on GPUs with slow f64. Rounding in the factors moves the saliencies that choose
//! the mask; on Gemma-3-270M at 50 % that alone moves perplexity by up to 2.4 % either way (docs/BENCHMARKS.md).

use anyhow::{Context, Result, anyhow};
use candle_core::{DType, Tensor};
use faer::{Accum, Mat};

use serde::{Deserialize, Serialize};

use super::mask::{self, Pattern};
use super::{Method, MethodOptions, Observes, OpStats, Pruned, Registered, needs_stats};
use crate::linalg::par;

pub const METHOD: Registered = Registered { name: "sparsegpt", build };

fn build(o: &MethodOptions) -> Result<Box<dyn Method>> {
    anyhow::ensure!(
        o.sparsegpt.percdamp >= 0.0 && o.sparsegpt.percdamp.is_finite(),
        "--percdamp {} must be ≥ 0",
        o.sparsegpt.percdamp
    );
    Ok(Box::new(SparseGpt(o.sparsegpt.clone())))
}

/// SparseGPT's knobs, as the authors' script names them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct Options {
    /// SparseGPT: diagonal damping, as a fraction of the mean diagonal of the Hessian.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = Options::default().percdamp))]
    pub percdamp: f64,
    /// SparseGPT: columns per lazy-update block.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = Options::default().blocksize))]
    pub blocksize: usize,
    /// SparseGPT: precision of the damped Hessian's factorisations (f32: the authors' precision, half the memory).
    #[cfg_attr(feature = "cli", arg(long, value_enum, default_value = "f64"))]
    #[serde(default)]
    pub factor_dtype: FactorDtype,
}

/// The precision `H` is factorised and inverted in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum FactorDtype {
    #[default]
    F64,
    F32,
}

impl Default for Options {
    fn default() -> Self {
        Self { percdamp: 0.01, blocksize: 128, factor_dtype: FactorDtype::F64 }
    }
}

#[derive(Default)]
pub struct SparseGpt(pub Options);

/// `H = G + damping` with dead inputs handled; returns H (f64) and zeroes the dead columns of `w`.
pub fn damped_hessian(g: &Mat<f32>, w: &mut Mat<f32>, percdamp: f64) -> Mat<f64> {
    let (dead, add) = diagonal_damping(g, percdamp);
    for j in (0..g.nrows()).filter(|&j| dead[j]) {
        for i in 0..w.nrows() {
            w[(i, j)] = 0.0;
        }
    }
    let mut h = crate::linalg::mat_from_fn(g.nrows(), g.ncols(), |i, j| g[(i, j)] as f64);
    for (j, a) in add.into_iter().enumerate() {
        h[(j, j)] += a;
    }
    h
}

/// The dead inputs (`G_jj = 0`, whose columns of `w` are zeroed) and what `H` adds to the diagonal of `G`: 1
/// on a dead input, then `λ = percdamp · mean(diag)` on every input.
fn diagonal_damping(g: &Mat<f32>, percdamp: f64) -> (Vec<bool>, Vec<f64>) {
    let n = g.nrows();
    let dead: Vec<bool> = (0..n).map(|j| g[(j, j)] == 0.0).collect();
    let damp = percdamp * (0..n).map(|j| if dead[j] { 1.0 } else { g[(j, j)] as f64 }).sum::<f64>() / n as f64;
    let add = dead.iter().map(|&d| if d { 1.0 + damp } else { damp }).collect();
    (dead, add)
}

/// Upper Cholesky factor `U` of `H⁻¹` (`H⁻¹ = Uᵀ U`), in f32, computed in `dtype`; `h` is used up.
pub fn inverse_cholesky_upper(h: Mat<f64>, dtype: FactorDtype) -> Result<Mat<f32>> {
    match dtype {
        FactorDtype::F64 => upper_of_inverse(h, |x| x as f32),
        FactorDtype::F32 => {
            let h32 = crate::linalg::mat_from_fn(h.nrows(), h.ncols(), |i, j| h[(i, j)] as f32);
            drop(h);
            upper_of_inverse(h32, |x| x)
        }
    }
}

/// Cholesky of `h`, its inverse, and the Cholesky of that (as the authors' script does), in `T`. faer's
/// kernels in place, on the lower triangles only: its `Llt` and `inverse` add serial copies of the whole
/// `n × n` matrix (into a fresh one, and mirrored), which were most of SparseGPT's serial time on many threads.
fn upper_of_inverse<T: faer::traits::RealField + Copy>(
    mut h: Mat<T>,
    to_f32: impl Fn(T) -> f32 + Sync,
) -> Result<Mat<f32>> {
    use faer::dyn_stack::{MemBuffer, MemStack, StackReq};
    use faer::linalg::cholesky::llt::{factor, inverse};
    let n = h.nrows();
    let par = faer::get_global_parallelism(); // as faer's `Llt` takes it, for the same bits
    let mut mem = MemBuffer::new(StackReq::any_of(&[
        factor::cholesky_in_place_scratch::<T>(n, par, Default::default()),
        inverse::inverse_scratch::<T>(n, par),
    ]));
    let cholesky = |a: faer::MatMut<T>, mem: &mut MemBuffer| {
        factor::cholesky_in_place(a, Default::default(), par, MemStack::new(mem), Default::default())
    };
    cholesky(h.as_mut(), &mut mem)
        .map_err(|e| anyhow!("the damped Hessian is not positive definite ({e:?}); raise --percdamp"))?;
    let mut hinv = crate::linalg::mat_from_fn(n, n, |_, _| T::zero());
    inverse::inverse(hinv.as_mut(), h.as_ref(), par, MemStack::new(&mut mem));
    drop(h);
    cholesky(hinv.as_mut(), &mut mem).map_err(|e| anyhow!("H⁻¹ is not positive definite ({e:?})"))?;
    Ok(crate::linalg::mat_from_fn(n, n, |i, j| if j >= i { to_f32(hinv[(j, i)]) } else { 0.0 }))
}

/// [`inverse_cholesky_upper`] on the run's device ([`crate::linalg::upper_inverse_cholesky`], blocks of 256),
/// in the factor's type there (the sweep takes its blocks to f32 as it reads them: a whole f32 copy would sit
/// beside it, 3.1 GiB for a 70B down_proj), from `H` made there by [`device_damped_hessian`].
fn device_inverse_cholesky_upper(g: &Mat<f32>, add: &[f64], dtype: FactorDtype) -> Result<Tensor> {
    let dt = match dtype {
        FactorDtype::F64 => DType::F64,
        FactorDtype::F32 => DType::F32,
    };
    let h = device_damped_hessian(g, add, dt)?;
    crate::linalg::upper_inverse_cholesky(h, 256)
        .map_err(|e| anyhow!("the damped Hessian is not positive definite ({e:#}); raise --percdamp"))
}

/// [`damped_hessian`]'s `H` (`G` in f64 plus `add` on the diagonal) in `dtype` on the run's device, from `G`'s
/// device copy: the host's values exactly (in f32, the host's `H` rounded). A copy of `G` in `dtype` with its
/// diagonal set in place: one `n × n` matrix beside `G`, where adding onto the diagonal made another (for a
/// LLaMA-2-70B down_proj in f64, 6.1 GiB), and the f32 factor went through both in f64.
fn device_damped_hessian(g: &Mat<f32>, add: &[f64], dtype: DType) -> Result<Tensor> {
    let (n, dev) = (g.nrows(), crate::device::current());
    anyhow::ensure!(n * n <= u32::MAX as usize, "sparsegpt: {n} inputs are too many for the device's factor");
    // A packed copy of its own (`to_dtype` to `G`'s own type gives `G` itself): the diagonal is written through
    // a flat view of it, and the factorisation works in it.
    let g_dev = crate::linalg::mat_to_device(g, dev)?;
    let h = if g_dev.dtype() == dtype { g_dev.force_contiguous()? } else { g_dev.to_dtype(dtype)? };
    drop(g_dev);
    // Rounded to `dtype` as the host's `H` is (to nearest).
    let diagonal: Vec<f64> = (0..n).map(|j| g[(j, j)] as f64 + add[j]).collect();
    let values = Tensor::from_vec(diagonal, n, dev)?.to_dtype(dtype)?;
    let at = Tensor::from_vec((0..n).map(|j| (j * (n + 1)) as u32).collect::<Vec<_>>(), n, dev)?;
    h.flatten_all()?.scatter_set(&at, &values, 0)?;
    Ok(h)
}

impl SparseGpt {
    /// Prune `w` given the Gram matrix of its inputs, on the host ([`Self::prune_gram_tensor`] on a device).
    pub fn prune_gram(&self, w: &Mat<f32>, g: &Mat<f32>, pattern: Pattern) -> Result<Mat<f32>> {
        let mut w = w.clone();
        let h = damped_hessian(g, &mut w, self.0.percdamp);
        let u = inverse_cholesky_upper(h, self.0.factor_dtype).context("sparsegpt")?;
        sweep(&mut w, &u, pattern, self.0.blocksize.max(1));
        Ok(w)
    }

    /// [`Self::prune_gram`] of the f32 tensor `w`, on its device: the factorisation, the lazy updates, and on
    /// a GPU each block's mask and sweep there; the result stays there.
    fn prune_gram_tensor(&self, w: &Tensor, g: &Mat<f32>, pattern: Pattern) -> Result<Tensor> {
        let (dead, add) = diagonal_damping(g, self.0.percdamp);
        let w = if dead.iter().any(|&d| d) {
            let dead: Vec<u8> = dead.iter().map(|&d| u8::from(d)).collect();
            let dead = Tensor::from_vec(dead, (1, w.dim(1)?), w.device())?.broadcast_as(w.shape())?;
            super::device_mask::zeroed(w, &dead)?
        } else {
            w.clone()
        };
        let u = device_inverse_cholesky_upper(g, &add, self.0.factor_dtype).context("sparsegpt")?;
        sweep_on_device(&w, &u, pattern, self.0.blocksize.max(1))
    }

    /// What the report says of pruning a `(rows, cols)` weight, whichever verb pruned it.
    fn pruned<W>(&self, w: W, (rows, cols): (usize, usize)) -> Pruned<W> {
        let (m, n, b) = (rows as f64, cols as f64, self.0.blocksize as f64);
        Pruned {
            w,
            // The zero count is rounded per block of columns.
            rounding_units: cols.div_ceil(self.0.blocksize.max(1)),
            // Two Cholesky factorisations and an inverse (4/3 n³), the lazy block updates (m n²) and the
            // in-block rank-1 updates (m n B).
            flops: 4.0 / 3.0 * n * n * n + m * n * n + m * n * b,
            details: None,
        }
    }
}

impl Method for SparseGpt {
    fn observes(&self) -> Observes {
        Observes::Gram
    }

    fn prune(&self, w: &Mat<f32>, stats: Option<&OpStats>, pattern: Pattern) -> Result<Pruned> {
        let g = needs_stats(stats, "sparsegpt")?.gram()?;
        Ok(self.pruned(self.prune_gram(w, g, pattern)?, w.shape()))
    }

    fn prune_on_device(&self, w: &Tensor, stats: Option<&OpStats>, pattern: Pattern) -> Result<Option<Pruned<Tensor>>> {
        let g = needs_stats(stats, "sparsegpt")?.gram()?;
        Ok(Some(self.pruned(self.prune_gram_tensor(w, g, pattern)?, w.dims2()?)))
    }
}

/// The blocked OBS sweep over the columns of `w` with the upper Cholesky factor `u` of `H⁻¹`: each block's
/// mask and in-block sweep ([`sweep_block`]), then the lazy update of the columns after the block in one GEMM.
fn sweep(w: &mut Mat<f32>, u: &Mat<f32>, pattern: Pattern, blocksize: usize) {
    let cols = w.ncols();
    let mut i1 = 0;
    while i1 < cols {
        let i2 = (i1 + blocksize).min(cols);
        let count = i2 - i1;
        let err1 = sweep_block(w.subcols_mut(i1, count), u.submatrix(i1, i1, count, count), pattern);
        if i2 < cols {
            // W[:, i2:] -= Err1 · U[i1:i2, i2:]
            faer::linalg::matmul::matmul(
                w.subcols_mut(i2, cols - i2),
                Accum::Add,
                err1.as_ref(),
                u.submatrix(i1, i2, count, cols - i2),
                -1.0f32,
                par(),
            );
        }
        i1 = i2;
    }
}

/// The same sweep with `W`, `U` and the columns not yet swept on the device, where the `n³` factorisation and
/// the `m n²` lazy updates run, and on a GPU each block's mask and in-block sweep too (sparsegpt.cu, the
/// host's bits): no block waits on the host, and the swept weight stays there.
fn sweep_on_device(w: &Tensor, u: &Tensor, pattern: Pattern, blocksize: usize) -> Result<Tensor> {
    let cols = w.dim(1)?;
    let mut rest = w.clone(); // W[:, i1:]
    let mut swept = Vec::new();
    let mut i1 = 0;
    while i1 < cols {
        let i2 = (i1 + blocksize).min(cols);
        let count = i2 - i1;
        let wb = rest.narrow(1, 0, count)?.contiguous()?;
        let ub = u.narrow(0, i1, count)?.narrow(1, i1, count)?.to_dtype(DType::F32)?.contiguous()?;
        let (q, err1) = sweep_block_on(&wb, &ub, pattern)?;
        swept.push(q);
        if i2 < cols {
            let u12 = u.narrow(0, i1, count)?.narrow(1, i2, cols - i2)?.to_dtype(DType::F32)?.contiguous()?;
            rest = (rest.narrow(1, count, cols - i2)? - err1.matmul(&u12)?)?;
        }
        i1 = i2;
    }
    Ok(Tensor::cat(&swept, 1)?)
}

/// [`sweep_block`] on a block and its `U` where they are: the swept block and its scaled errors, there. On a
/// GPU the kernel sweeps (blocks of at most 1024 columns); elsewhere the block comes to the host.
fn sweep_block_on(wb: &Tensor, ub: &Tensor, pattern: Pattern) -> Result<(Tensor, Tensor)> {
    use crate::linalg::{mat_to_device, tensor_to_mat};
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(dev) = wb.device()
        && let Some(done) = gpu::sweep_block(dev, wb, ub, pattern)?
    {
        return Ok(done);
    }
    let mut w = tensor_to_mat(wb)?;
    let err = sweep_block(w.as_mut(), tensor_to_mat(ub)?.as_ref(), pattern);
    Ok((mat_to_device(&w, wb.device())?, mat_to_device(&err, wb.device())?))
}

/// The mask of a block chosen before its sweep: unstructured, the lowest `w² / U_jj²` over the whole block
/// (`d` the block's diagonal of `U`); N:M masks are chosen during the sweep (`None`).
fn block_mask(wb: faer::MatRef<f32>, d: &[f32], pattern: Pattern) -> Option<mask::Mask> {
    match pattern {
        Pattern::Unstructured(s) => {
            let scores =
                crate::linalg::mat_from_fn(wb.nrows(), wb.ncols(), |i, j| wb[(i, j)] * wb[(i, j)] / (d[j] * d[j]));
            Some(mask::mask_per_matrix(&scores, s))
        }
        Pattern::NM { .. } => None,
    }
}

/// sparsegpt.cu on the run's GPU (PTX from build.rs, loaded once): an unstructured block's mask by one thread
/// block, then the sweep by one block of 128 threads per row; nothing comes back to the host.
#[cfg(feature = "cuda")]
mod gpu {
    use super::{Pattern, mask};
    use anyhow::{Result, bail};
    use candle_core::cuda::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::{CudaDevice, CudaStorage, Storage, Tensor, op::BackpropOp};

    /// The widest block the kernel sweeps (its `MAX_COLS`).
    const MAX_COLS: usize = 1024;
    /// The block mask kernel's threads (sparsegpt.cu's `MASK_THREADS`, which says the same): one thread block
    /// chooses a whole block's mask.
    const MASK_THREADS: u32 = 1024;

    /// `FISTAPRUNE_HOST_BLOCK_MASK=1`: unstructured block masks chosen on the host, as before their kernel, so
    /// that scripts/gpu-check.sh can time the two ways and compare their checkpoints (the same bytes).
    fn host_block_masks() -> bool {
        static HOST: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HOST.get_or_init(|| std::env::var("FISTAPRUNE_HOST_BLOCK_MASK").is_ok_and(|v| v == "1"))
    }

    /// The swept block and its scaled errors, on the GPU; `None` for blocks wider than the kernel takes.
    pub(super) fn sweep_block(
        dev: &CudaDevice,
        wb: &Tensor,
        ub: &Tensor,
        pattern: Pattern,
    ) -> Result<Option<(Tensor, Tensor)>> {
        let (rows, count) = wb.dims2()?;
        if count > MAX_COLS {
            return Ok(None);
        }
        // N:M groups are chosen in the sweep; an unstructured mask spans the whole block, all rows: chosen first,
        // by its own kernel (k = 0 prunes nothing: the zeros stand), or on the host where asked.
        let (nm_n, nm_m, mut k) = match pattern {
            Pattern::NM { n, m } => (n as i32, m as i32, 0),
            Pattern::Unstructured(s) => (0, 0, mask::count_for(rows * count, s) as u32),
        };
        let sweep = crate::device::project_kernel!(dev, "sparsegpt", "sparsegpt_sweep")?;
        let mut mask = if k > 0 && host_block_masks() {
            let u = crate::linalg::tensor_to_mat(ub)?;
            let d: Vec<f32> = (0..count).map(|j| u[(j, j)]).collect();
            let w = crate::linalg::tensor_to_mat(wb)?;
            let chosen = super::block_mask(w.as_ref(), &d, pattern).expect("an unstructured block mask");
            k = 0;
            dev.clone_htod(&crate::linalg::row_major(chosen.as_ref(), u8::from))?
        } else {
            dev.alloc_zeros::<u8>(if nm_m > 0 { 1 } else { rows * count })?
        };
        let (mut q, mut err) = (dev.alloc_zeros::<f32>(rows * count)?, dev.alloc_zeros::<f32>(rows * count)?);
        {
            let ((ws, wl), (us, ul)) = (wb.storage_and_layout(), ub.storage_and_layout());
            let (Storage::Cuda(ws), Storage::Cuda(us)) = (&*ws, &*us) else { bail!("the block is not on the GPU") };
            let (w0, u0) = (wl.start_offset(), ul.start_offset());
            let wv = ws.as_cuda_slice::<f32>()?.slice(w0..w0 + rows * count);
            let uv = us.as_cuda_slice::<f32>()?.slice(u0..u0 + count * count);
            let (r, c) = (rows as i32, count as i32);
            let stream = dev.cuda_stream();
            if k > 0 {
                let choose = crate::device::project_kernel!(dev, "sparsegpt", "sparsegpt_block_mask")?;
                let mut launch = stream.launch_builder(&choose);
                launch.arg(&wv).arg(&uv).arg(&r).arg(&c).arg(&k).arg(&mut mask);
                let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (MASK_THREADS, 1, 1), shared_mem_bytes: 0 };
                // SAFETY: the arguments are sparsegpt_block_mask's, in its order and types; wb, ub and the mask
                // are contiguous and hold rows × count, count × count and rows × count values; k ≤ rows × count.
                unsafe { launch.launch(cfg) }.map_err(|e| anyhow::anyhow!("SparseGPT's block mask kernel: {e:?}"))?;
            }
            let mut launch = stream.launch_builder(&sweep);
            launch.arg(&wv).arg(&uv).arg(&mask).arg(&r).arg(&c).arg(&nm_n).arg(&nm_m).arg(&mut q).arg(&mut err);
            let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
            // SAFETY: the arguments are sparsegpt.cu's, in its order and types; every buffer holds what it indexes
            // (wb and ub contiguous, the mask rows × count where it is read).
            unsafe { launch.launch(cfg) }.map_err(|e| anyhow::anyhow!("SparseGPT's sweep kernel: {e:?}"))?;
        }
        let wrap = |s| {
            let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(s, dev.clone()));
            Tensor::from_storage(storage, (rows, count), BackpropOp::none(), false)
        };
        Ok(Some((wrap(q), wrap(err))))
    }
}

/// One block of columns, all rows: its mask (unstructured: over the whole block, chosen before any of it is
/// updated), then the sweep. Rows are independent within a block (a row's updates read only that row and
/// `U`), so chunks of rows sweep on their own threads; each element sees the same updates in the same order
/// as in one serial sweep, so the result does not depend on the thread count. Returns the scaled errors.
fn sweep_block(mut wb: faer::MatMut<f32>, ub: faer::MatRef<f32>, pattern: Pattern) -> Mat<f32> {
    use rayon::prelude::*;
    let (rows, count) = wb.shape();
    let chunk = rows.div_ceil(4 * rayon::current_num_threads()).max(32);
    let d: Vec<f32> = (0..count).map(|j| ub[(j, j)]).collect();
    let block_mask = block_mask(wb.as_ref(), &d, pattern);
    let mut err1 = Mat::<f32>::zeros(rows, count);
    let row_chunks = wb.as_mut().par_row_chunks_mut(chunk).zip(err1.as_mut().par_row_chunks_mut(chunk));
    row_chunks.enumerate().for_each(|(k, (wc, ec))| {
        let mask = block_mask.as_ref().map(|m| m.subrows(k * chunk, wc.nrows()));
        sweep_rows(wc, ec, mask, ub, &d, pattern);
    });
    err1
}

/// One block of columns of some rows: prune column by column, spreading each column's error over the
/// block's later columns with row `i` of the block of `U` (a rank-1 update, one contiguous column at a
/// time). `mask` is the block's mask for these rows (unstructured); N:M groups are chosen as the sweep
/// reaches them. Writes the scaled errors `(w − q) / U_ii` into `err`.
fn sweep_rows(
    mut w: faer::MatMut<f32>,
    mut err: faer::MatMut<f32>,
    mask: Option<faer::MatRef<bool>>,
    u: faer::MatRef<f32>,
    d: &[f32],
    pattern: Pattern,
) {
    let (rows, count) = w.shape();
    let mut pruned: Mat<bool> = match mask {
        Some(m) => Mat::from_fn(rows, count, |r, c| m[(r, c)]),
        None => Mat::from_fn(rows, count, |_, _| false),
    };
    for i in 0..count {
        if let Pattern::NM { n, m } = pattern
            && i % m == 0
        {
            // Each row's group on its own: this runs every `m` columns, inside a task of the block's sweep.
            let width = m.min(count - i);
            for r in 0..rows {
                let scores: Vec<f32> = (i..i + width).map(|j| w[(r, j)] * w[(r, j)] / (d[j] * d[j])).collect();
                for (c, f) in mask::lowest_k_flags(&scores, n.min(width)).into_iter().enumerate() {
                    pruned[(r, i + c)] |= f;
                }
            }
        }
        for r in 0..rows {
            let wv = w[(r, i)];
            let q = if pruned[(r, i)] { 0.0 } else { wv };
            err[(r, i)] = (wv - q) / d[i];
            w[(r, i)] = q;
        }
        let e = err.as_ref().col(i).try_as_col_major().expect("contiguous column").as_slice();
        for c in i + 1..count {
            let uc = u[(i, c)];
            let wc = w.as_mut().col_mut(c).try_as_col_major_mut().expect("contiguous column").as_slice_mut();
            for (w, &e) in wc.iter_mut().zip(e) {
                if e != 0.0 {
                    *w -= e * uc;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use faer::Side;
    use faer::linalg::solvers::DenseSolveCore;

    fn problem(rows: usize, cols: usize, seed: u64) -> (Mat<f32>, Mat<f32>) {
        let mut s = seed;
        let mut next = move || {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 33) as f64 / (1u64 << 31) as f64 - 0.5) as f32
        };
        let w = Mat::from_fn(rows, cols, |_, _| next());
        // Correlated inputs, like activations.
        let tokens = 3 * cols;
        let base: Vec<f32> = (0..tokens).map(|_| next()).collect();
        let x = Mat::from_fn(tokens, cols, |t, j| next() + 0.7 * base[t] * (j % 3) as f32);
        let mut g = Mat::<f32>::zeros(cols, cols);
        faer::linalg::matmul::matmul(g.as_mut(), Accum::Replace, x.transpose(), x.as_ref(), 1.0f32, faer::Par::Seq);
        (w, g)
    }

    /// Unblocked optimal brain surgeon with explicit inverses, independent of the Cholesky trick: column by
    /// column, `d_i² = [(H_F)⁻¹]₀₀` over the remaining columns F = {i..}, and pruning w_i moves the rest by
    /// `−(w_i / [(H_F)⁻¹]₀₀) · (H_F)⁻¹[:, 0]`. The mask is chosen at the same points with the same rule.
    fn obs_reference(w: &Mat<f32>, g: &Mat<f32>, pattern: Pattern, blocksize: usize, percdamp: f64) -> Mat<f32> {
        let mut w32 = w.clone();
        let h = damped_hessian(g, &mut w32, percdamp);
        let (rows, cols) = w.shape();
        let mut w = Mat::<f64>::from_fn(rows, cols, |i, j| w32[(i, j)] as f64);
        let inv_tail: Vec<Mat<f64>> = (0..cols)
            .map(|i| h.submatrix(i, i, cols - i, cols - i).to_owned().llt(Side::Lower).unwrap().inverse())
            .collect();
        let d: Vec<f64> = (0..cols).map(|i| inv_tail[i][(0, 0)].sqrt()).collect();
        let mut mask = Mat::from_fn(rows, cols, |_, _| false);
        for i in 0..cols {
            match pattern {
                Pattern::Unstructured(s) if i % blocksize == 0 => {
                    let c = blocksize.min(cols - i);
                    let sc =
                        Mat::from_fn(rows, c, |r, k| (w[(r, i + k)] * w[(r, i + k)] / (d[i + k] * d[i + k])) as f32);
                    let m = mask::mask_per_matrix(&sc, s);
                    for r in 0..rows {
                        for k in 0..c {
                            mask[(r, i + k)] = m[(r, k)];
                        }
                    }
                }
                Pattern::NM { n, m } if i % m == 0 => {
                    let sc =
                        Mat::from_fn(rows, m, |r, k| (w[(r, i + k)] * w[(r, i + k)] / (d[i + k] * d[i + k])) as f32);
                    let mm = mask::mask_nm(&sc, n, m);
                    for r in 0..rows {
                        for k in 0..m {
                            mask[(r, i + k)] = mm[(r, k)];
                        }
                    }
                }
                _ => {}
            }
            let hi = &inv_tail[i];
            for r in 0..rows {
                if mask[(r, i)] {
                    let f = w[(r, i)] / hi[(0, 0)];
                    for k in 0..cols - i {
                        w[(r, i + k)] -= f * hi[(k, 0)];
                    }
                    w[(r, i)] = 0.0;
                }
            }
        }
        Mat::from_fn(rows, cols, |i, j| w[(i, j)] as f32)
    }

    fn max_rel(a: &Mat<f32>, b: &Mat<f32>) -> f64 {
        let mut d = 0f64;
        let mut m = 0f64;
        for j in 0..a.ncols() {
            for i in 0..a.nrows() {
                d = d.max((a[(i, j)] - b[(i, j)]).abs() as f64);
                m = m.max(b[(i, j)].abs() as f64);
            }
        }
        d / m
    }

    #[test]
    fn blocked_sweep_equals_unblocked_obs_reference() {
        for (pattern, blocksize) in [
            (Pattern::Unstructured(0.5), 8),
            (Pattern::Unstructured(0.7), 16),
            (Pattern::Unstructured(0.6), 40),
            (Pattern::NM { n: 2, m: 4 }, 8),
            (Pattern::NM { n: 4, m: 8 }, 16),
        ] {
            let (w, g) = problem(6, 40, 3);
            let got = SparseGpt(Options { percdamp: 0.01, blocksize, ..Default::default() })
                .prune_gram(&w, &g, pattern)
                .unwrap();
            let want = obs_reference(&w, &g, pattern, blocksize, 0.01);
            let e = max_rel(&got, &want);
            assert!(e < 1e-4, "{pattern:?} block {blocksize}: max rel diff {e}");
            // Same zeros, and the pattern holds.
            for j in 0..40 {
                for i in 0..6 {
                    assert_eq!(got[(i, j)] == 0.0, want[(i, j)] == 0.0, "{pattern:?} ({i},{j})");
                }
            }
            mask::verify(&got, pattern, 40 / blocksize + 1).unwrap();
        }
    }

    #[test]
    fn the_device_path_prunes_as_the_host_path() {
        // 300 columns: two blocks of the device factorisation, three of the sweep; input 5 is dead.
        let (w, mut g) = problem(40, 300, 17);
        for k in 0..300 {
            g[(5, k)] = 0.0;
            g[(k, 5)] = 0.0;
        }
        for pattern in [Pattern::Unstructured(0.5), Pattern::NM { n: 2, m: 4 }] {
            for factor_dtype in [FactorDtype::F64, FactorDtype::F32] {
                let sg = SparseGpt(Options { factor_dtype, ..Default::default() });
                let host = sg.prune_gram(&w, &g, pattern).unwrap();
                let on = sg.prune_gram_tensor(&crate::linalg::mat_to_tensor(&w).unwrap(), &g, pattern).unwrap();
                let device = crate::linalg::tensor_to_mat(&on).unwrap();
                let e = max_rel(&device, &host);
                let tol = if factor_dtype == FactorDtype::F64 { 1e-5 } else { 1e-3 };
                assert!(e < tol, "{pattern:?} {factor_dtype:?}: max rel diff {e}");
                let differ = (0..300).flat_map(|j| (0..40).map(move |i| (i, j)));
                let differ = differ.filter(|&(i, j)| (host[(i, j)] == 0.0) != (device[(i, j)] == 0.0)).count();
                assert!(differ <= 2, "{pattern:?} {factor_dtype:?}: {differ} mask positions differ");
                mask::verify(&device, pattern, 3).unwrap();
                assert!((0..40).all(|i| device[(i, 5)] == 0.0), "a dead input keeps a weight");
            }
        }
    }

    /// The device's `H` is the host's, to the bit: in f64, and rounded to f32 for the f32 factor; the device's
    /// `G` it was made from is left as it was.
    #[test]
    fn the_device_hessian_is_the_hosts() {
        let (mut w, mut g) = problem(6, 40, 5);
        for k in 0..40 {
            (g[(7, k)], g[(k, 7)]) = (0.0, 0.0);
        }
        let (_, add) = diagonal_damping(&g, 0.01);
        let host = damped_hessian(&g, &mut w, 0.01);
        let resident = crate::linalg::mat_to_tensor(&g).unwrap();
        crate::linalg::with_resident_copies(&[(&g, Some(&resident))], || {
            let h64 = device_damped_hessian(&g, &add, DType::F64).unwrap();
            let h32 = device_damped_hessian(&g, &add, DType::F32).unwrap();
            let (h64, h32) = (h64.to_vec2::<f64>().unwrap(), h32.to_vec2::<f32>().unwrap());
            for i in 0..40 {
                for j in 0..40 {
                    assert_eq!(h64[i][j].to_bits(), host[(i, j)].to_bits(), "f64 ({i},{j})");
                    assert_eq!(h32[i][j].to_bits(), (host[(i, j)] as f32).to_bits(), "f32 ({i},{j})");
                }
            }
        });
        assert!(crate::linalg::tensor_to_mat(&resident).unwrap() == g, "G was changed");
    }

    /// sparsegpt_test's harness (sparsegpt.cu built for the host), and weights and a factor `U` of
    /// `rows × cols` to cut blocks from; `None` where there is no g++.
    fn kernel_problem(
        rows: usize,
        cols: usize,
        seed: u64,
    ) -> Option<(crate::device::emu::Harness, Mat<f32>, Mat<f32>)> {
        let harness = crate::device::emu::Harness::build("prune/sparsegpt_test")?;
        let (mut w, g) = problem(rows, cols, seed);
        let u = inverse_cholesky_upper(damped_hessian(&g, &mut w, 0.01), FactorDtype::F64).unwrap();
        Some((harness, w, u))
    }

    /// The harness's input for block `wb` and its `ub`: the header (rows, count, then `ab`), the two matrices.
    fn kernel_input(ab: [usize; 2], wb: &Mat<f32>, ub: &Mat<f32>) -> Vec<u8> {
        use crate::device::emu::bytes;
        let head = [wb.nrows(), wb.ncols(), ab[0], ab[1]].map(|v| v as i32);
        let mut input = bytes(&head, i32::to_le_bytes);
        input.extend(bytes(&crate::linalg::row_major(wb.as_ref(), |x| x), f32::to_le_bytes));
        input.extend(bytes(&crate::linalg::row_major(ub.as_ref(), |x| x), f32::to_le_bytes));
        input
    }

    /// sparsegpt.cu, run on the host (src/cuda_emu.h: an OS thread per CUDA thread, blocks of 32 here), sweeps
    /// a block as the host does, to the bit: unstructured with the host's block mask, N:M with its groups chosen
    /// in the kernel (three equal lowest scores in one group, a group cut by the block's end), blocks narrower
    /// and wider than a thread block.
    #[test]
    fn the_gpu_kernel_sweeps_a_block_as_the_host() {
        use crate::device::emu::f32s;
        let (rows, cols) = (6, 120);
        let Some((harness, w, u)) = kernel_problem(rows, cols, 23) else { return };
        let cases = [
            (Pattern::Unstructured(0.5), 10, 40),
            (Pattern::Unstructured(0.7), 40, 70),
            (Pattern::NM { n: 2, m: 4 }, 8, 38),
            (Pattern::NM { n: 4, m: 8 }, 0, 70),
            (Pattern::NM { n: 2, m: 4 }, 100, 20),
        ];
        for (pattern, i1, count) in cases {
            let mut wb = w.submatrix(0, i1, rows, count).to_owned();
            let mut ub = u.submatrix(i1, i1, count, count).to_owned();
            // Row 0's first group: three equal lowest scores (the same U_jj, weights ± the same small value),
            // of which 2:4 prunes the first two.
            for j in [2, 3] {
                ub[(j, j)] = ub[(1, 1)];
            }
            (wb[(0, 1)], wb[(0, 2)], wb[(0, 3)]) = (1e-3, -1e-3, 1e-3);
            let d: Vec<f32> = (0..count).map(|j| ub[(j, j)]).collect();
            let mask = block_mask(wb.as_ref(), &d, pattern).unwrap_or_else(|| Mat::from_fn(rows, count, |_, _| false));
            let (n, m) = if let Pattern::NM { n, m } = pattern { (n, m) } else { (0, 0) };
            let mut input = kernel_input([n, m], &wb, &ub);
            input.extend(crate::linalg::row_major(mask.as_ref(), u8::from));
            let out = harness.run(&input);
            let (q, err) = (f32s(&out, 0, rows * count), f32s(&out, 4 * rows * count, rows * count));
            let mut host = wb.clone();
            let host_err = sweep_block(host.as_mut(), ub.as_ref(), pattern);
            for r in 0..rows {
                for c in 0..count {
                    let at = format!("{pattern:?} block at {i1}, ({r}, {c})");
                    assert_eq!(host[(r, c)].to_bits(), q[r * count + c].to_bits(), "{at}: weight");
                    assert_eq!(host_err[(r, c)].to_bits(), err[r * count + c].to_bits(), "{at}: error");
                }
            }
            // Not a trivial block: the sweep moved kept weights.
            let moved = (0..rows).flat_map(|r| (0..count).map(move |c| (r, c)));
            assert!(moved.filter(|&(r, c)| host[(r, c)] != 0.0 && host[(r, c)] != wb[(r, c)]).count() > rows);
            if let Pattern::NM { n: 2, m: 4 } = pattern {
                assert_eq!((host[(0, 1)], host[(0, 2)]), (0.0, 0.0), "{pattern:?}: ties to the lower column");
                assert!(host[(0, 0)] != 0.0 && host[(0, 3)] != 0.0, "{pattern:?}: ties to the lower column");
            }
        }
    }

    /// sparsegpt.cu's block mask, run on the host (64 threads here), is the host's `block_mask` to the bit: at
    /// several sparsities (k = 1 and k = all among them), on blocks smaller and larger than a thread's stretch,
    /// with scores tied across the threshold (equal weights in columns of equal `U_jj`) and zeros.
    #[test]
    fn the_gpu_kernel_chooses_a_block_mask_as_the_host() {
        let (rows, cols) = (24, 70);
        let Some((harness, w, u)) = kernel_problem(rows, cols, 29) else { return };
        // Blocks whose threshold cut through equal scores (the ties' own pass ran), narrow and wide.
        let (mut narrow, mut wide) = (0, 0);
        // Against the harness's 64 threads: narrow blocks (several stretches of rows per column, some threads
        // idle), one stretch per column, and blocks wider than the thread block (two columns a thread).
        let cases =
            [(3, 0.5, false), (20, 0.4, true), (32, 0.6, true), (33, 0.35, true), (70, 0.4, true), (70, 0.5, false)];
        for (count, s, ties) in cases {
            let mut wb = w.submatrix(0, 0, rows, count).to_owned();
            let mut ub = u.submatrix(0, 0, count, count).to_owned();
            if ties {
                // Columns of one U_jj, with weights of four magnitudes (signs mixed, zeros among them) unevenly
                // spread over the rows, so that the sparsities above cut through one of them.
                for j in 0..count {
                    ub[(j, j)] = 0.5;
                    for i in 0..rows {
                        let level = (((i * 131 + j * 71) ^ (i * j)) % 4) as f32 * 0.25;
                        wb[(i, j)] = if (i + j) % 2 == 0 { level } else { -level };
                    }
                }
            }
            let d: Vec<f32> = (0..count).map(|j| ub[(j, j)]).collect();
            for s in [s, 1.0 / (rows * count) as f64, 1.0] {
                let want = block_mask(wb.as_ref(), &d, Pattern::Unstructured(s)).unwrap();
                let k = mask::count_for(rows * count, s);
                let got = harness.run_with(&kernel_input([k, 0], &wb, &ub), &["mask"]);
                assert_eq!(got, crate::linalg::row_major(want.as_ref(), u8::from), "{count} columns, {s}");
                let score = |i: usize, j: usize| wb[(i, j)] * wb[(i, j)] / (d[j] * d[j]);
                let cells = (0..rows).flat_map(|i| (0..count).map(move |j| (i, j)));
                let kth = cells.clone().filter(|&(i, j)| want[(i, j)]).map(|(i, j)| score(i, j)).fold(0.0, f32::max);
                let cut = cells.clone().any(|(i, j)| !want[(i, j)] && score(i, j) == kth);
                *if count <= 32 { &mut narrow } else { &mut wide } += usize::from(cut && kth > 0.0);
            }
        }
        assert!(narrow >= 2 && wide >= 2, "ties cut in {narrow} narrow and {wide} wide blocks");
    }

    #[test]
    fn update_beats_plain_masking() {
        // The OBS update must lower the output error against the same mask without update.
        let (w, g) = problem(8, 48, 11);
        let pruned = SparseGpt::default().prune_gram(&w, &g, Pattern::Unstructured(0.5)).unwrap();
        let masked = Mat::from_fn(8, 48, |i, j| if pruned[(i, j)] == 0.0 { 0.0 } else { w[(i, j)] });
        let err = |p: &Mat<f32>| super::super::stats::quad_error(&(p - &w), &g).unwrap();
        assert!(err(&pruned) < 0.8 * err(&masked), "{} vs {}", err(&pruned), err(&masked));
    }

    #[test]
    fn the_f32_factorisation_is_the_same_factor_to_f32_rounding() {
        let (mut w, g) = problem(4, 48, 7);
        let h = damped_hessian(&g, &mut w, 0.01);
        let u64 = inverse_cholesky_upper(h.clone(), FactorDtype::F64).unwrap();
        let u32 = inverse_cholesky_upper(h, FactorDtype::F32).unwrap();
        let e = max_rel(&u32, &u64);
        // f32 rounding amplified by H's condition number, but the same factor: not zero, not large.
        assert!(e > 0.0 && e < 1e-3, "max rel diff {e}");
    }

    #[test]
    fn dead_inputs_get_zero_weights() {
        let (w, mut g) = problem(4, 16, 5);
        for k in 0..16 {
            g[(3, k)] = 0.0;
            g[(k, 3)] = 0.0;
        }
        let out = SparseGpt::default().prune_gram(&w, &g, Pattern::Unstructured(0.25)).unwrap();
        assert!((0..4).all(|i| out[(i, 3)] == 0.0));
    }
}
