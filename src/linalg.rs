//! Dense kernels on f32 tensors, done by faer.
//!
//! candle's CPU matmul runs on the `gemm` crate's kernels; on this project's machines faer's are faster
//! (measured: about 155 against 120 GFLOP/s on two AVX2 cores; `cargo run --release --example gemm`), so
//! the hot products of the forward pass and of the pruners come here. Tensors stay candle tensors; we
//! borrow their storage as faer views. Off the CPU (`--device cuda`) the same functions are compositions of
//! candle's own operators, which run on any device ([`crate::device::generic`]).

use anyhow::{Result, bail, ensure};
use candle_core::{CpuStorage, DType, Device, Storage, Tensor};
use faer::{Accum, MatMut, MatRef, Par};

/// Parallelism for faer: the global rayon pool.
pub fn par() -> Par {
    let n = rayon::current_num_threads();
    if n > 1 { Par::rayon(n) } else { Par::Seq }
}

/// Run `f` on the contiguous f32 data of `t` (copied to the host first when it lives on another device).
pub fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    ensure!(t.dtype() == DType::F32, "expected an f32 tensor, got {:?}", t.dtype());
    // Contiguous first: candle's `to_device` copies a view's whole storage, not only the view.
    let t = if t.device().is_cpu() { t.contiguous()? } else { t.contiguous()?.to_device(&Device::Cpu)? };
    let (storage, layout) = t.storage_and_layout();
    let (start, end) = layout.contiguous_offsets().expect("contiguous");
    match &*storage {
        Storage::Cpu(CpuStorage::F32(v)) => Ok(f(&v[start..end])),
        _ => bail!("expected a CPU f32 tensor"),
    }
}

/// `x · wᵀ` for `x`: `(r, k)` and `w`: `(n, k)`, as a `(r, n)` tensor.
pub fn matmul_nt(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (r, k) = x.dims2()?;
    let (n, k2) = w.dims2()?;
    ensure!(k == k2, "matmul: inner dimensions differ ({k} vs {k2})");
    if crate::device::generic(x) {
        // Contiguous (a no-op where they are): candle's CUDA matmul takes only packed row- or column-major
        // operands, where its CPU one takes any strides.
        return Ok(x.contiguous()?.matmul(&w.contiguous()?.t()?)?);
    }
    let mut out = vec![0f32; r * n];
    with_f32(x, |xs| {
        with_f32(w, |ws| {
            let a = MatRef::from_row_major_slice(xs, r, k);
            // w is (n, k) row-major, i.e. wᵀ is (k, n) column-major.
            let b = MatRef::from_column_major_slice(ws, k, n);
            let c = MatMut::from_row_major_slice_mut(&mut out, r, n);
            faer::linalg::matmul::matmul(c, Accum::Replace, a, b, 1.0f32, par());
        })
    })??;
    Ok(Tensor::from_vec(out, (r, n), &Device::Cpu)?)
}

/// [`matmul_nt`] multiplied in `dtype`: for bf16 or f16, both factors rounded to it, their products summed in
/// f32 and the result rounded to it, as a GPU's tensor cores multiply (there at ~15× f32's rate); returned in
/// f32. The CPU rounds the same way around an f32 product, so both devices give the same values up to the
/// order of the sums.
pub fn matmul_nt_in(x: &Tensor, w: &Tensor, dtype: DType) -> Result<Tensor> {
    if dtype == DType::F32 {
        return matmul_nt(x, w);
    }
    let y = if crate::device::generic(x) {
        x.to_dtype(dtype)?.contiguous()?.matmul(&w.to_dtype(dtype)?.contiguous()?.t()?)?
    } else {
        matmul_nt(&round_to(x, dtype)?, &round_to(w, dtype)?)?.to_dtype(dtype)?
    };
    Ok(y.to_dtype(DType::F32)?)
}

/// Columns (or rows) per parallel task of the copies below.
const COPY_BLOCK: usize = 64;

/// Visit every `(i, j)` of a `rows × cols` matrix tile by tile (64 × 64), `i` fastest within a tile. Copies
/// between row-major and column-major storage read one side across its stride: element by element over a
/// large matrix that misses the cache on every element (a 5632 × 5632 transpose took seconds, on one thread
/// while the others waited); tile by tile both sides stay in cache.
pub fn for_each_tiled(rows: usize, cols: usize, mut f: impl FnMut(usize, usize)) {
    const TILE: usize = 64;
    for j0 in (0..cols).step_by(TILE) {
        for i0 in (0..rows).step_by(TILE) {
            for j in j0..(j0 + TILE).min(cols) {
                for i in i0..(i0 + TILE).min(rows) {
                    f(i, j);
                }
            }
        }
    }
}

/// A `rows × cols` matrix with `m[(i, j)] = f(i, j)`, made tile by tile on all threads (blocks of columns).
pub fn mat_from_fn<T: Copy + Send + Sync>(
    rows: usize,
    cols: usize,
    f: impl Fn(usize, usize) -> T + Sync,
) -> faer::Mat<T> {
    use rayon::prelude::*;
    // Written once, in place: filling it with zeros first was a serial pass (and all its page faults) over
    // every `n × n` factor and statistic before the parallel one.
    struct Columns<T>(*mut T);
    // SAFETY: each task writes its own block of columns only.
    unsafe impl<T> Sync for Columns<T> {}
    let mut m = faer::Mat::<T>::with_capacity(rows, cols);
    let (base, stride) = (Columns(m.as_ptr_mut()), m.col_stride() as usize);
    (0..cols.div_ceil(COPY_BLOCK)).into_par_iter().for_each(|b| {
        let j0 = b * COPY_BLOCK;
        let base = &base;
        // SAFETY: (i, j) is inside the capacity reserved above, and every element is written exactly once.
        for_each_tiled(rows, COPY_BLOCK.min(cols - j0), |i, j| unsafe {
            base.0.add(i + (j0 + j) * stride).write(f(i, j0 + j))
        });
    });
    // SAFETY: every element of the rows × cols matrix is initialised above.
    unsafe { m.set_dims(rows, cols) };
    m
}

/// The elements of `m` in column-major order (columns on all threads).
pub fn col_major(m: MatRef<f32>) -> Vec<f32> {
    use rayon::prelude::*;
    let (r, c) = m.shape();
    let mut v = vec![0f32; r * c];
    if r > 0 {
        v.par_chunks_mut(r)
            .enumerate()
            .for_each(|(j, col)| col.iter_mut().enumerate().for_each(|(i, x)| *x = m[(i, j)]));
    }
    v
}

/// The first non-finite element of `m` in column-major order, searched on all threads.
pub fn first_non_finite(m: MatRef<f32>) -> Option<(usize, usize)> {
    use rayon::prelude::*;
    (0..m.ncols()).into_par_iter().find_map_first(|j| (0..m.nrows()).find(|&i| !m[(i, j)].is_finite()).map(|i| (i, j)))
}

/// The sum of all of `t`'s elements (a 0-d tensor in its dtype), off the CPU per row of its last dimension
/// first ([`sum_rows_first`]): candle's CUDA sum to a single value is one thread block's work, one SM for the
/// whole tensor (a 7B operator's outputs on a batch, 180 MB in f64: milliseconds), where a sum per row spreads
/// over the GPU. On the CPU one sum, as before (the host path's reports to the bit).
pub fn sum_by_rows(t: &Tensor) -> Result<Tensor> {
    if t.device().is_cpu() { Ok(t.sum_all()?) } else { sum_rows_first(t) }
}

/// Each row's sum (rows of the last dimension), then theirs.
fn sum_rows_first(t: &Tensor) -> Result<Tensor> {
    let cols = t.dims().last().copied().unwrap_or(1).max(1);
    Ok(t.reshape((t.elem_count() / cols, cols))?.sum_keepdim(1)?.sum_all()?)
}

/// [`first_non_finite`] of a `(rows, cols)` tensor wherever it is: one sum there says whether there is any
/// (`0 · x` is NaN for an infinity or a NaN, 0 otherwise); only then does the matrix come to the host.
pub fn tensor_non_finite(t: &Tensor) -> Result<Option<(usize, usize)>> {
    let flag = sum_by_rows(&(t * 0.0)?)?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    if flag == 0.0 {
        return Ok(None);
    }
    Ok(first_non_finite(tensor_to_mat(t)?.as_ref()))
}

/// A `(rows, cols)` f32 tensor as a faer matrix.
pub fn tensor_to_mat(t: &Tensor) -> Result<faer::Mat<f32>> {
    let (r, c) = t.dims2()?;
    #[cfg(test)]
    MOVED.with_borrow_mut(|m| m.push(Moved::Down(r, c)));
    with_f32(t, |s| mat_from_fn(r, c, |i, j| s[i * c + j]))
}

/// A faer matrix as a `(rows, cols)` f32 tensor (blocks of rows on all threads).
pub fn mat_to_tensor(m: &faer::Mat<f32>) -> Result<Tensor> {
    Ok(Tensor::from_vec(row_major(m.as_ref(), |x| x), m.shape(), &Device::Cpu)?)
}

/// `f` of each element of `m`, in row-major order (blocks of rows on all threads).
pub fn row_major<T: Copy + Sync, U: Copy + Default + Send>(m: MatRef<T>, f: impl Fn(T) -> U + Sync) -> Vec<U> {
    use rayon::prelude::*;
    let (r, c) = m.shape();
    let mut v = vec![U::default(); r * c];
    if c > 0 {
        v.par_chunks_mut(COPY_BLOCK * c).enumerate().for_each(|(b, strip)| {
            let i0 = b * COPY_BLOCK;
            for_each_tiled(strip.len() / c, c, |i, j| strip[i * c + j] = f(m[(i0 + i, j)]));
        });
    }
    v
}

/// `U`, upper triangular with `H⁻¹ = Uᵀ U`, for a symmetric positive definite `h` on any device, in `h`'s
/// dtype (SparseGPT's factor, [`crate::prune::sparsegpt`]). With `J` the reversal permutation and `L` the
/// lower Cholesky factor of `J H J`, `H = R Rᵀ` for the upper `R = J L J`, so `U = R⁻¹ = J L⁻¹ J`: one
/// Cholesky and one triangular inverse (2/3 n³) where the host path takes Cholesky, inverse and Cholesky.
/// Both go in blocks of `block` columns: the diagonal blocks are factored and inverted on the host in f64,
/// everything else is GEMMs on the device. candle's GEMM wants exact strides on the GPU, so every operand
/// that is a view is made contiguous first. All of it is done in `h`'s own storage (the flips strip by strip,
/// the factor and its inverse block by block), so one `n × n` matrix is held and copies of at most a quarter of
/// one beside it (for a 70B model's down_proj, 28,672 inputs: 6.6 GB in f64 and 1.6 at most beside it, where
/// separate results held two or three). `h` must be the only handle on its storage.
pub fn upper_inverse_cholesky(h: Tensor, block: usize) -> Result<Tensor> {
    let n = h.dim(0)?;
    ensure!(h.dims2()? == (n, n), "expected a square matrix, got {:?}", h.dims());
    ensure!(n > 0, "an empty matrix has no inverse");
    let h = if h.is_contiguous() { h } else { h.force_contiguous()? };
    let strip = n.div_ceil(8);
    flip_in_place(&h, strip)?;
    cholesky_lower_in_place(&h, block)?;
    invert_lower_in_place(&h, block)?;
    flip_in_place(&h, strip)?;
    Ok(h)
}

/// `J t J` (rows and columns in reverse order) written over `t`: each pair of strips of `strip` rows (then
/// columns) from the two ends swapped, reversed, through copies of the two.
fn flip_in_place(t: &Tensor, strip: usize) -> Result<()> {
    let n = t.dim(0)?;
    for dim in 0..2 {
        let mut a = 0;
        while a < n / 2 {
            let w = strip.min(n / 2 - a);
            // New position p takes old n − 1 − p: the strip at `a` takes the far strip's, and the far one this.
            let ids = |from: usize| {
                Tensor::from_vec((0..w as u32).map(|k| (n - 1 - from) as u32 - k).collect::<Vec<_>>(), w, t.device())
            };
            let (near, far) = (t.index_select(&ids(a)?, dim)?, t.index_select(&ids(n - a - w)?, dim)?);
            t.slice_set(&near, dim, a)?;
            t.slice_set(&far, dim, n - a - w)?;
            a += w;
        }
    }
    Ok(())
}

/// `a`'s lower Cholesky factor `L` (`a = L Lᵀ`) written over `a`, zeros above the diagonal: left-looking by
/// blocks of columns, each computed from `a`'s own block (not yet written) and the columns of `L` done before
/// it (a copy of those below the block: at most a quarter of the matrix).
fn cholesky_lower_in_place(a: &Tensor, block: usize) -> Result<()> {
    let n = a.dim(0)?;
    let (dtype, device) = (a.dtype(), a.device().clone());
    let mut k0 = 0;
    while k0 < n {
        let b = block.min(n - k0);
        let below = n - k0;
        // S = A[k0.., k0..k0+b] − L[k0.., ..k0] L[k0..k0+b, ..k0]ᵀ
        let mut s = a.narrow(0, k0, below)?.narrow(1, k0, b)?.contiguous()?;
        if k0 > 0 {
            let done = a.narrow(0, k0, below)?.narrow(1, 0, k0)?.contiguous()?;
            s = (&s - done.matmul(&done.narrow(0, 0, b)?.t()?)?)?;
        }
        let lkk = to_host_f64(&s.narrow(0, 0, b)?)?
            .llt(faer::Side::Lower)
            .map_err(|e| anyhow::anyhow!("the matrix is not positive definite near column {k0} ({e:?})"))?
            .L()
            .to_owned();
        // (No zero-sized tensors: not every device allocates them.)
        let mut column = Vec::new();
        if k0 > 0 {
            column.push(Tensor::zeros((k0, b), dtype, &device)?);
        }
        column.push(to_device_like(&lkk, a)?);
        if below > b {
            // L_rk = S_rk L_kk⁻ᵀ
            let s_rk = s.narrow(0, b, below - b)?;
            column.push(s_rk.matmul(&to_device_like(&invert_lower_host(&lkk), a)?.t()?)?);
        }
        a.slice_set(&Tensor::cat(&column, 0)?, 1, k0)?;
        k0 += b;
    }
    Ok(())
}

/// `L⁻¹` of a lower triangular `l` written over it, by blocks of rows: `X_ii = L_ii⁻¹` and
/// `X_i,<i = −L_ii⁻¹ L_i,<i X_<i,<i`. Row block `i` of `L` is read only by step `i`, which then writes `X`'s
/// there; the rows above are `X`'s by then.
fn invert_lower_in_place(l: &Tensor, block: usize) -> Result<()> {
    let n = l.dim(0)?;
    let mut r0 = 0;
    while r0 < n {
        let b = block.min(n - r0);
        let lii = to_host_f64(&l.narrow(0, r0, b)?.narrow(1, r0, b)?)?;
        let xii = to_device_like(&invert_lower_host(&lii), l)?;
        // (No zero-sized tensors: not every device allocates them.)
        let mut row = Vec::new();
        if r0 > 0 {
            // X's rows above, whole (contiguous, as a GPU's product takes them): zero beyond column r0, so the
            // product's first r0 columns are X_i,<i.
            let li = l.narrow(0, r0, b)?.narrow(1, 0, r0)?.contiguous()?;
            let xi = xii.matmul(&li.matmul(&l.narrow(0, 0, r0)?)?)?.neg()?;
            row.push(xi.narrow(1, 0, r0)?);
        }
        row.push(xii);
        if r0 + b < n {
            row.push(Tensor::zeros((b, n - r0 - b), l.dtype(), l.device())?);
        }
        l.slice_set(&Tensor::cat(&row, 1)?, 0, r0)?;
        r0 += b;
    }
    Ok(())
}

/// The inverse of a small lower triangular matrix, on the host.
fn invert_lower_host(l: &faer::Mat<f64>) -> faer::Mat<f64> {
    let mut x = faer::Mat::<f64>::zeros(l.nrows(), l.ncols());
    faer::linalg::triangular_inverse::invert_lower_triangular(x.as_mut(), l.as_ref(), Par::Seq);
    x
}

/// A (small) matrix tensor on the host as f64.
fn to_host_f64(t: &Tensor) -> Result<faer::Mat<f64>> {
    let (r, c) = t.dims2()?;
    let v: Vec<f64> = t.contiguous()?.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
    Ok(faer::Mat::from_fn(r, c, |i, j| v[i * c + j]))
}

/// A host f64 matrix as a tensor on `like`'s device, in its dtype.
fn to_device_like(m: &faer::Mat<f64>, like: &Tensor) -> Result<Tensor> {
    let (r, c) = m.shape();
    let v: Vec<f64> = (0..r).flat_map(|i| (0..c).map(move |j| m[(i, j)])).collect();
    Ok(Tensor::from_vec(v, (r, c), like.device())?.to_dtype(like.dtype())?)
}

/// A faer matrix as a `(rows, cols)` f32 tensor on `device` (the way back is [`tensor_to_mat`], from any
/// device); within [`with_resident`] of `m`, its one copy there.
pub fn mat_to_device(m: &faer::Mat<f32>, device: &Device) -> Result<Tensor> {
    let key = resident_key(m);
    let here = |e: &(ResidentKey, Option<Tensor>)| e.1.as_ref().filter(|t| t.device().same_device(device)).cloned();
    if let Some(t) = RESIDENT.with_borrow(|r| r.iter().filter(|e| e.0 == key).find_map(here)) {
        return Ok(t);
    }
    #[cfg(test)]
    MOVED.with_borrow_mut(|v| v.push(Moved::Up(m.nrows(), m.ncols())));
    let t = mat_to_tensor(m)?.to_device(device)?;
    RESIDENT.with_borrow_mut(|r| r.iter_mut().filter(|e| e.0 == key).for_each(|e| e.1 = Some(t.clone())));
    Ok(t)
}

/// A matrix by where it lies and its shape; unique among matrices alive at once.
type ResidentKey = (usize, usize, usize, isize);

fn resident_key(m: &faer::Mat<f32>) -> ResidentKey {
    (m.as_ptr() as usize, m.nrows(), m.ncols(), m.col_stride())
}

/// A matrix [`mat_to_device`] sent up or [`tensor_to_mat`] brought down (rows, columns), for the tests.
#[cfg(test)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Moved {
    Up(usize, usize),
    Down(usize, usize),
}

thread_local! {
    /// The matrices of the open [`with_resident`] scopes, with their device copies once made.
    static RESIDENT: std::cell::RefCell<Vec<(ResidentKey, Option<Tensor>)>> = const { std::cell::RefCell::new(Vec::new()) };
    /// The matrices [`mat_to_device`] and [`tensor_to_mat`] moved on this thread, for the tests.
    #[cfg(test)]
    pub static MOVED: std::cell::RefCell<Vec<Moved>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Run `f` with each of `ms` copied to the device at most once, however often [`mat_to_device`] (on this
/// thread) is asked for it: an operator's `G*` is asked for by the warm start, FISTAPruner's solve, the
/// power iteration and the report's errors, and a 7B model's down_proj `G*` is 485 MB. Sound because `ms` are borrowed until
/// `f` returns, so they neither change nor move, and no other matrix can lie where they do.
pub fn with_resident<R>(ms: &[&faer::Mat<f32>], f: impl FnOnce() -> R) -> R {
    with_resident_copies(&ms.iter().map(|&m| (m, None)).collect::<Vec<_>>(), f)
}

/// [`with_resident`], with the device copy of a matrix where the caller has one already (the same values: a
/// sum made on the device and brought to the host), so that it does not go up at all.
pub fn with_resident_copies<R>(ms: &[(&faer::Mat<f32>, Option<&Tensor>)], f: impl FnOnce() -> R) -> R {
    /// Closes the scope, also when `f` panics.
    struct Scope(usize);
    impl Drop for Scope {
        fn drop(&mut self) {
            RESIDENT.with_borrow_mut(|r| r.truncate(self.0));
        }
    }
    let _scope = Scope(RESIDENT.with_borrow_mut(|r| {
        let open = r.len();
        r.extend(ms.iter().map(|(m, t)| (resident_key(m), t.cloned())));
        open
    }));
    f()
}

/// `a b`, for the host path's `m × n × n` products with a Gram matrix (errors, targets, `W G*`), on all
/// threads. (On a device the methods' device verbs make them on tensors there.)
pub fn product(a: &faer::Mat<f32>, b: &faer::Mat<f32>) -> Result<faer::Mat<f32>> {
    let mut out = faer::Mat::<f32>::zeros(a.nrows(), b.ncols());
    faer::linalg::matmul::matmul(out.as_mut(), Accum::Replace, a.as_ref(), b.as_ref(), 1.0f32, par());
    Ok(out)
}

/// `silu(gate) · up`, the gated MLP's activation: on the host on all threads, where candle's element-wise maps
/// run on one (SiLU and the product of a 512-token window of a 1B model's MLP: about 20 ms a layer, a third of
/// its time once 16 threads share the GEMMs), with candle's own f32 expressions in its order, so the same bits;
/// candle's operators off the CPU.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    use rayon::prelude::*;
    let f32s = gate.dtype() == DType::F32 && up.dtype() == DType::F32;
    if crate::device::generic(gate) || !f32s || gate.dims() != up.dims() {
        return Ok((gate.silu()? * up)?);
    }
    let out: Vec<f32> = with_f32(gate, |g| {
        with_f32(up, |u| g.par_iter().zip(u).map(|(&g, &u)| g / (1.0 + (-g).exp()) * u).collect())
    })??;
    Ok(Tensor::from_vec(out, gate.dims(), &Device::Cpu)?)
}

/// Send a raw pointer into rayon tasks that write disjoint parts of one buffer.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
// SAFETY: every task writes a disjoint region; the buffer outlives the parallel loop.
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

/// Causal self-attention with grouped K/V heads.
///
/// `q`: `(b, nh, t, d)`, `k`, `v`: `(b, nkv, t, d)`, all contiguous f32; query head `h` reads K/V head
/// `h / (nh / nkv)`. With a sliding `window`, a query at position `p` sees only keys `j` with `p − j < window`.
/// Returns `(b, t, nh·d)`, ready for the output projection. Queries go in blocks of [`ATTN_BLOCK`] so that keys
/// past the block's last position are never touched (the causal upper triangle costs nothing but the diagonal
/// blocks), and the softmax uses [`softmax_row`].
///
/// `dtype` bf16 or f16 multiplies as the linear maps do under `--matmul-dtype` ([`matmul_nt_in`]), and as an
/// fp16 model's eager attention does: the scaled queries, the keys and the values rounded to it, the scores
/// summed in f32 and rounded, masked and normalised in f32, the probabilities rounded, `P·V` summed in f32 and
/// rounded. At 2048 tokens a LLaMA-2-7B layer's two attention products (the whole square, as the generic path
/// computes them) are a twelfth of its linear maps' FLOP: in f32, at a fifteenth of a GPU's bf16 rate, they
/// would take about as long as all the linear maps in bf16.
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    window: Option<usize>,
    dtype: DType,
) -> Result<Tensor> {
    use rayon::prelude::*;
    let (b, nh, t, d) = q.dims4()?;
    let (b2, nkv, t2, d2) = k.dims4()?;
    ensure!(
        b == b2 && t == t2 && d == d2 && nkv > 0 && nh % nkv == 0,
        "attention: q {:?} / k {:?}",
        q.dims(),
        k.dims()
    );
    ensure!(v.dims() == k.dims(), "attention: v {:?} differs from k {:?}", v.dims(), k.dims());
    let rep = nh / nkv;
    if crate::device::generic(q) {
        return attention_generic(q, k, v, scale, window, dtype);
    }
    // In f32 the scale rides in the product, as it always has; rounded, the queries are scaled before theirs (a
    // pass over the queries, not over the scores, on a GPU).
    let reduced = dtype != DType::F32;
    let q = if reduced { round_to(&(q * scale as f64)?, dtype)? } else { q.clone() };
    let (k, v) = (round_to(k, dtype)?, round_to(v, dtype)?);
    let round = rounding(dtype)?;
    let mut out = vec![0f32; b * t * nh * d];
    let optr = SharedMut(out.as_mut_ptr());
    with_f32(&q, |qs| {
        with_f32(&k, |ks| {
            with_f32(&v, |vs| {
                let nblocks = t.div_ceil(ATTN_BLOCK);
                (0..b * nh * nblocks).into_par_iter().for_each(|task| {
                    let blk = task % nblocks;
                    let bh = task / nblocks;
                    let (bi, h) = (bh / nh, bh % nh);
                    let kvh = h / rep;
                    let s = blk * ATTN_BLOCK;
                    let e = (s + ATTN_BLOCK).min(t);
                    let rows = e - s;
                    // Keys k0..e: the block's first query sees back to k0 (a sliding window drops what lies
                    // before: a query at p sees keys j with p − j < window).
                    let k0 = window.map_or(0, |w| (s + 1).saturating_sub(w));
                    let nk = e - k0;
                    let qoff = ((bi * nh + h) * t + s) * d;
                    let kvoff = ((bi * nkv + kvh) * t + k0) * d;
                    let qm = MatRef::from_row_major_slice(&qs[qoff..qoff + rows * d], rows, d);
                    let km = MatRef::from_row_major_slice(&ks[kvoff..kvoff + nk * d], nk, d);
                    let vm = MatRef::from_row_major_slice(&vs[kvoff..kvoff + nk * d], nk, d);
                    let mut scores = vec![0f32; rows * nk];
                    let sm = MatMut::from_row_major_slice_mut(&mut scores, rows, nk);
                    let alpha = if reduced { 1.0 } else { scale };
                    faer::linalg::matmul::matmul(sm, Accum::Replace, qm, km.transpose(), alpha, Par::Seq);
                    for (i, row) in scores.chunks_exact_mut(nk).enumerate() {
                        let p = s + i;
                        // Columns are keys k0.., the query sees keys lo..=p.
                        let lo = window.map_or(0, |w| (p + 1).saturating_sub(w)) - k0;
                        let valid = p + 1 - k0;
                        row[..lo].fill(0.0);
                        let seen = &mut row[lo..valid];
                        round(seen);
                        softmax_row(seen);
                        round(seen);
                        row[valid..].fill(0.0);
                    }
                    let pm = MatRef::from_row_major_slice(&scores, rows, nk);
                    let o = optr;
                    // SAFETY: rows s..e of head h of batch bi: disjoint across tasks, inside `out`.
                    let om = unsafe {
                        MatMut::from_raw_parts_mut(
                            o.0.add((bi * t + s) * nh * d + h * d),
                            rows,
                            d,
                            (nh * d) as isize,
                            1,
                        )
                    };
                    faer::linalg::matmul::matmul(om, Accum::Replace, pm, vm, 1.0f32, Par::Seq);
                });
            })
        })
    })???;
    if reduced {
        out.par_chunks_mut(1 << 14).for_each(round);
    }
    Ok(Tensor::from_vec(out, (b, t, nh * d), &Device::Cpu)?)
}

/// `t` (f32) rounded to `dtype`'s values, kept in f32; itself for f32.
fn round_to(t: &Tensor, dtype: DType) -> Result<Tensor> {
    Ok(if dtype == DType::F32 { t.clone() } else { t.to_dtype(dtype)?.to_dtype(DType::F32)? })
}

/// In-place rounding of f32 values to `dtype`'s (to nearest, ties to even, as candle's and CUDA's
/// conversions round); nothing for f32.
fn rounding(dtype: DType) -> Result<fn(&mut [f32])> {
    Ok(match dtype {
        DType::F32 => |_| {},
        DType::BF16 => |xs| xs.iter_mut().for_each(|x| *x = half::bf16::from_f32(*x).to_f32()),
        DType::F16 => |xs| xs.iter_mut().for_each(|x| *x = half::f16::from_f32(*x).to_f32()),
        other => bail!("attention: no products in {other:?}"),
    })
}

/// [`causal_attention`] in candle's operators, for any device: per sequence of the batch (the scores of one
/// are `nh·t²` floats), the query heads that share a K/V head as one `(rep·t, d)` block, and a softmax over
/// the keys each query sees ([`causal_softmax`]). The scale goes where the host kernel puts it: on the scores
/// in f32, on the queries before their product in bf16 or f16. There the two products run in that type (on a
/// GPU, cuBLAS on the tensor cores, summing in f32), and the softmax runs in f32 between them, read and
/// written in the type: candle's own bf16 softmax rounds twice on a GPU and sums in bf16 on the CPU, which
/// would part the devices.
fn attention_generic(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    window: Option<usize>,
    dtype: DType,
) -> Result<Tensor> {
    let (b, nh, t, d) = q.dims4()?;
    let nkv = k.dim(1)?;
    let rep = nh / nkv;
    let reduced = dtype != DType::F32;
    let mut outs = Vec::with_capacity(b);
    for bi in 0..b {
        let qb = q.get(bi)?.contiguous()?;
        let qb = if reduced { (qb * scale as f64)?.to_dtype(dtype)? } else { qb }.reshape((nkv, rep * t, d))?;
        let (kb, vb) = (k.get(bi)?.contiguous()?.to_dtype(dtype)?, v.get(bi)?.contiguous()?.to_dtype(dtype)?);
        let scores = qb.matmul(&kb.t()?)?;
        let probs = causal_softmax(&scores, if reduced { 1.0 } else { scale }, window)?;
        // (nkv, rep·t, d) → (t, nh·d), query head h = g·rep + r.
        let o = probs.matmul(&vb)?.to_dtype(DType::F32)?.reshape((nh, t, d))?.transpose(0, 1)?.reshape((t, nh * d))?;
        outs.push(o);
    }
    Ok(Tensor::stack(&outs, 0)?)
}

/// Attention's softmax over the scores `s`, rows of `t` keys in the products' type (f32, bf16 or f16), row `r`
/// the query at position `r mod t`: the row times `scale`, normalised in f32 over the keys the query sees (up
/// to its own position, and within the sliding `window`), rounded to the type; the keys it does not see 0. On
/// a GPU one pass of causal_softmax.cu (4 bytes a score in bf16, where a mask, a softmax and two conversions in
/// candle's operators take 24); elsewhere those operators: an additive mask (−∞ above the diagonal and outside
/// the window) and candle's softmax on an f32 copy.
pub fn causal_softmax(s: &Tensor, scale: f32, window: Option<usize>) -> Result<Tensor> {
    let s = s.contiguous()?;
    let t = s.dim(candle_core::D::Minus1)?;
    ensure!(t > 0 && s.elem_count() % (t * t) == 0, "attention: scores {:?} are not squares of keys", s.dims());
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = s.device() {
        return gpu::causal_softmax(dev, &s, t, scale, window);
    }
    let mask: Vec<f32> = (0..t * t)
        .map(|i| {
            let (p, j) = (i / t, i % t);
            if j <= p && window.is_none_or(|w| p - j < w) { 0.0 } else { f32::NEG_INFINITY }
        })
        .collect();
    let mask = Tensor::from_vec(mask, (t, t), s.device())?;
    let x = s.to_dtype(DType::F32)?.reshape((s.elem_count() / (t * t), t, t))?;
    let x = if scale == 1.0 { x } else { (x * scale as f64)? };
    let p = candle_nn::ops::softmax_last_dim(&x.broadcast_add(&mask)?)?;
    Ok(p.reshape(s.shape())?.to_dtype(s.dtype())?)
}

/// causal_softmax.cu on the run's GPU (PTX from build.rs, loaded once): one block of threads per row.
#[cfg(feature = "cuda")]
mod gpu {
    use anyhow::{Result, bail, ensure};
    use candle_core::cuda::CudaDType;
    use candle_core::cuda::cudarc::driver::{CudaFunction, CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::{CudaDevice, CudaStorage, DType, Storage, Tensor, op::BackpropOp};
    use half::{bf16, f16};

    /// Threads per block: the kernel's `THREADS`.
    const THREADS: u32 = 256;

    /// [`super::causal_softmax`] of `s` (contiguous, rows of `t`) on `dev`.
    pub(super) fn causal_softmax(
        dev: &CudaDevice,
        s: &Tensor,
        t: usize,
        scale: f32,
        window: Option<usize>,
    ) -> Result<Tensor> {
        use crate::device::project_kernel;
        let out = match s.dtype() {
            DType::F32 => {
                launch::<f32>(dev, project_kernel!(dev, "causal_softmax", "causal_softmax_f32")?, s, t, scale, window)
            }
            DType::BF16 => {
                launch::<bf16>(dev, project_kernel!(dev, "causal_softmax", "causal_softmax_bf16")?, s, t, scale, window)
            }
            DType::F16 => {
                launch::<f16>(dev, project_kernel!(dev, "causal_softmax", "causal_softmax_f16")?, s, t, scale, window)
            }
            other => bail!("attention: no softmax in {other:?}"),
        }?;
        Ok(Tensor::from_storage(Storage::Cuda(out), s.shape().clone(), BackpropOp::none(), false))
    }

    /// The kernel `func` for `T` on `s`: its probabilities, rows × t in `T`.
    fn launch<T: CudaDType + DeviceRepr>(
        dev: &CudaDevice,
        func: CudaFunction,
        s: &Tensor,
        t: usize,
        scale: f32,
        window: Option<usize>,
    ) -> Result<CudaStorage> {
        let (len, rows) = (s.elem_count(), s.elem_count() / t);
        ensure!(rows <= i32::MAX as usize && t <= i32::MAX as usize, "attention: {rows} rows of {t} scores");
        let (storage, layout) = s.storage_and_layout();
        let Storage::Cuda(storage) = &*storage else { bail!("attention's scores are not on the GPU") };
        let s0 = layout.start_offset();
        let sv = storage.as_cuda_slice::<T>()?.slice(s0..s0 + len);
        // SAFETY: the kernel writes every element of every row.
        let mut out: CudaSlice<T> = unsafe { dev.alloc::<T>(len) }?;
        let (t32, window) = (t as i32, window.map_or(0, |w| w.min(i32::MAX as usize) as i32));
        let stream = dev.cuda_stream();
        let mut launch = stream.launch_builder(&func);
        launch.arg(&sv).arg(&mut out).arg(&t32).arg(&window).arg(&scale);
        let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: the arguments are causal_softmax.cu's, in its order and types (T's bits as the kernel's);
        // `sv` and `out` hold rows × t elements.
        unsafe { launch.launch(cfg) }.map_err(|e| anyhow::anyhow!("attention's softmax kernel: {e:?}"))?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
}

/// Query rows per attention task.
pub const ATTN_BLOCK: usize = 64;

/// `exp(x)` for `x ≤ 0` to about 2 ulp (Cephes' polynomial on a range-reduced argument), written
/// branch-free so that loops over it vectorise.
#[inline(always)]
fn exp_neg(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    let x = if x < -87.0 { -87.0 } else { x };
    // Round to nearest with the 1.5·2²³ trick (no SSE4.1 round needed).
    const MAGIC: f32 = 12_582_912.0;
    let n = (x * LOG2E + MAGIC) - MAGIC;
    let r = x - n * C1 - n * C2;
    let z = r * r;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 1.666_666_5e-1)
        * r
        + 5e-1;
    let y = p * z + r + 1.0;
    f32::from_bits(((n as i32 + 127) << 23) as u32) * y
}

#[inline(always)]
fn max_of(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let mut it = xs.chunks_exact(8);
    for c in &mut it {
        for j in 0..8 {
            acc[j] = if c[j] > acc[j] { c[j] } else { acc[j] };
        }
    }
    let mut m = it.remainder().iter().fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
    for a in acc {
        m = if a > m { a } else { m };
    }
    m
}

/// Σ exp(x − m) over `xs`, eight lanes at a time.
#[inline(always)]
fn sum_exp(xs: &[f32], m: f32) -> f32 {
    let mut acc = [0f32; 8];
    let mut it = xs.chunks_exact(8);
    for c in &mut it {
        for j in 0..8 {
            acc[j] += exp_neg(c[j] - m);
        }
    }
    it.remainder().iter().map(|&x| exp_neg(x - m)).sum::<f32>() + acc.iter().sum::<f32>()
}

#[inline(always)]
fn softmax_generic(row: &mut [f32]) {
    let m = max_of(row);
    for x in row.iter_mut() {
        *x = exp_neg(*x - m);
    }
    let inv = 1.0 / row.iter().sum::<f32>();
    for x in row.iter_mut() {
        *x *= inv;
    }
}

#[inline(always)]
fn logsumexp_generic(row: &[f32]) -> f64 {
    let m = max_of(row);
    // f32 lanes within a chunk, f64 across chunks.
    let s: f64 = row.chunks(4096).map(|c| sum_exp(c, m) as f64).sum();
    s.ln() + m as f64
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_avx2(row: &mut [f32]) {
    softmax_generic(row)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn logsumexp_avx2(row: &[f32]) -> f64 {
    logsumexp_generic(row)
}

fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// In-place softmax of one row (AVX2 code path chosen at run time).
pub fn softmax_row(row: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { softmax_avx2(row) };
    }
    softmax_generic(row)
}

/// `log Σ exp(x)` of one row, accumulated in f64 across chunks.
pub fn logsumexp(row: &[f32]) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { logsumexp_avx2(row) };
    }
    logsumexp_generic(row)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The parallel gated activation gives candle's bits, also on a transposed (strided) input.
    #[test]
    fn silu_mul_is_candles_bit_for_bit() {
        let v = |k: f32| (0..3 * 1000).map(move |i| (i as f32 * 0.37 + k).sin() * 12.0).collect::<Vec<f32>>();
        let gate = Tensor::from_vec(v(0.0), (3, 1000), &Device::Cpu).unwrap();
        let up = Tensor::from_vec(v(1.0), (1000, 3), &Device::Cpu).unwrap().t().unwrap();
        let want = (gate.silu().unwrap() * &up).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let got = silu_mul(&gate, &up).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(want.iter().zip(&got).all(|(a, b)| a.to_bits() == b.to_bits()));
    }

    /// A product in bf16 or f16 is the f32 product of the rounded factors, summed in f64 here, rounded: within
    /// the result type's half step. candle's CPU product in that type (what the generic path runs here) gives
    /// the same; cuBLAS's, summing in f32 too, is compared by gpu-check's step 2c.
    #[test]
    fn a_product_in_bf16_or_f16_rounds_its_factors_and_its_result() {
        let (r, k, n) = (5, 300, 7);
        let v = |len: usize, s: f32| (0..len).map(|i| (i as f32 * 0.731 + s).sin() * 3.0).collect::<Vec<f32>>();
        let x = Tensor::from_vec(v(r * k, 0.0), (r, k), &Device::Cpu).unwrap();
        let w = Tensor::from_vec(v(n * k, 1.0), (n, k), &Device::Cpu).unwrap();
        for (dtype, step) in [(DType::BF16, 2f64.powi(-8)), (DType::F16, 2f64.powi(-11))] {
            let round = |t: &Tensor| t.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap();
            let (xr, wr) = (round(&x), round(&w));
            let got = matmul_nt_in(&x, &w, dtype).unwrap();
            let candle = x.to_dtype(dtype).unwrap().matmul(&w.to_dtype(dtype).unwrap().t().unwrap()).unwrap();
            for (y, name) in [(&got, "ours"), (&candle.to_dtype(DType::F32).unwrap(), "candle's")] {
                assert_eq!((y.dtype(), y.dims()), (DType::F32, &[r, n][..]));
                let y = y.to_vec2::<f32>().unwrap();
                for i in 0..r {
                    for j in 0..n {
                        let exact: f64 = (0..k).map(|q| xr[i][q] as f64 * wr[j][q] as f64).sum();
                        let tol = exact.abs() * step + 1e-4 * (k as f64).sqrt();
                        assert!(
                            (y[i][j] as f64 - exact).abs() <= tol,
                            "{dtype:?} {name} ({i},{j}): {} vs {exact}",
                            y[i][j]
                        );
                    }
                }
            }
            // Rounded, not merely close: the result is a value of the type.
            assert_eq!(round(&got), got.to_vec2::<f32>().unwrap(), "{dtype:?}");
        }
        assert_eq!(
            matmul_nt_in(&x, &w, DType::F32).unwrap().to_vec2::<f32>().unwrap(),
            matmul_nt(&x, &w).unwrap().to_vec2::<f32>().unwrap()
        );
    }

    /// Within [`with_resident`] a matrix goes to the device once, however often it is asked for, and the same
    /// matrix registered twice (nested scopes) still once; outside, every time.
    #[test]
    fn a_resident_matrix_goes_to_the_device_once() {
        let a = faer::Mat::from_fn(3, 4, |i, j| (i * 4 + j) as f32);
        let b = faer::Mat::from_fn(3, 4, |i, j| (i + 2 * j) as f32);
        let up = |m: &faer::Mat<f32>| tensor_to_mat(&mat_to_device(m, &Device::Cpu).unwrap()).unwrap();
        let ups = || MOVED.with_borrow(|v| v.iter().filter(|m| matches!(m, Moved::Up(..))).count());
        let start = ups();
        with_resident(&[&a], || {
            with_resident(&[&a], || assert_eq!(up(&a), a));
            for _ in 0..3 {
                assert_eq!(up(&a), a);
            }
            assert_eq!((up(&b), up(&b)), (b.clone(), b.clone()));
        });
        assert_eq!(ups() - start, 3, "a once, b twice");
        assert_eq!(up(&a), a);
        assert_eq!(ups() - start, 4, "the scope outlived with_resident");
    }

    /// The GPU's sum, rows first, is the sum of every element, for tensors of rank 1 to 3 (and a 0-d one).
    #[test]
    fn rows_first_is_the_whole_sum() {
        for dims in [vec![7], vec![3, 5], vec![2, 3, 4], vec![]] {
            let count: usize = dims.iter().product();
            let t = Tensor::from_vec(
                (0..count).map(|i| i as f64 * 0.5 - 1.0).collect::<Vec<_>>(),
                dims.clone(),
                &Device::Cpu,
            )
            .unwrap();
            let want: f64 = (0..count).map(|i| i as f64 * 0.5 - 1.0).sum();
            assert_eq!(sum_rows_first(&t).unwrap().to_scalar::<f64>().unwrap(), want, "{dims:?}");
        }
    }

    #[test]
    fn blocked_upper_inverse_cholesky_is_the_factor_of_the_inverse() {
        use faer::linalg::solvers::DenseSolveCore;
        // Symmetric positive definite matrices with a spread spectrum: n even and odd, not a multiple of the
        // block, one strip and several (the flips go by strips of an eighth), and the smallest.
        for n in [1, 2, 36, 37] {
            let x = faer::Mat::<f64>::from_fn(2 * n, n, |i, j| {
                ((i * 7 + j * 13) % 11) as f64 - 5.0 + (i == j) as u8 as f64
            });
            let mut h = x.transpose() * &x;
            for j in 0..n {
                h[(j, j)] += 0.1;
            }
            let want =
                h.llt(faer::Side::Lower).unwrap().inverse().llt(faer::Side::Lower).unwrap().L().transpose().to_owned();
            for block in [1, 8, 37, 64] {
                let t = to_device_like(&h, &Tensor::zeros((1, 1), DType::F64, &Device::Cpu).unwrap()).unwrap();
                let got = to_host_f64(&upper_inverse_cholesky(t, block).unwrap()).unwrap();
                let scale = (0..n).map(|j| want[(j, j)].abs()).fold(0.0, f64::max);
                let worst = (0..n)
                    .flat_map(|i| (0..n).map(move |j| (i, j)))
                    .map(|(i, j)| (got[(i, j)] - want[(i, j)]).abs())
                    .fold(0.0, f64::max);
                assert!(worst < 1e-10 * scale, "n {n}, block {block}: worst {worst} against scale {scale}");
                assert!((0..n).all(|i| (0..i).all(|j| got[(i, j)] == 0.0)), "n {n}, block {block}: not upper");
            }
        }
    }

    #[test]
    fn exp_neg_is_accurate() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x <= 0.0 {
            let want = (x as f64).exp();
            let got = exp_neg(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
    }

    #[test]
    fn softmax_and_logsumexp_match_f64() {
        let row: Vec<f32> = (0..1000).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.3).collect();
        let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let s: f64 = row.iter().map(|&x| (x as f64 - m).exp()).sum();
        assert!((logsumexp(&row) - (s.ln() + m)).abs() < 1e-5);
        let mut p = row.clone();
        softmax_row(&mut p);
        for (pi, &x) in p.iter().zip(&row) {
            let want = (x as f64 - m).exp() / s;
            assert!((*pi as f64 - want).abs() <= 1e-5 * want + 1e-12, "{pi} vs {want}");
        }
    }

    /// Against a direct f64 evaluation, with and without a sliding window (which cuts across query blocks):
    /// the faer kernel and the device-generic one. In bf16 and f16 the reference rounds where the kernels do (q,
    /// k, v, the scores, the probabilities, the output), so both must land within a few of the type's steps of
    /// it, nearly all exactly, give values of the type, and move away from f32's result.
    #[test]
    fn causal_attention_matches_naive() {
        let (b, nh, nkv, t, d) = (2, 4, 2, 150, 8);
        let mk = |n: usize, seed: u64| -> Vec<f32> {
            (0..n).map(|i| (((i as u64 * 2654435761 + seed) % 1000) as f32 / 500.0) - 1.0).collect()
        };
        let q = Tensor::from_vec(mk(b * nh * t * d, 1), (b, nh, t, d), &Device::Cpu).unwrap();
        let k = Tensor::from_vec(mk(b * nkv * t * d, 7), (b, nkv, t, d), &Device::Cpu).unwrap();
        let v = Tensor::from_vec(mk(b * nkv * t * d, 13), (b, nkv, t, d), &Device::Cpu).unwrap();
        let scale = 0.35f32;
        let f32_out = causal_attention(&q, &k, &v, scale, Some(37), DType::F32).unwrap();
        for (dtype, step) in [(DType::F32, 0.0), (DType::BF16, 2f64.powi(-8)), (DType::F16, 2f64.powi(-11))] {
            let rnd = |x: f64| match dtype {
                DType::BF16 => half::bf16::from_f64(x).to_f64(),
                DType::F16 => half::f16::from_f64(x).to_f64(),
                _ => x,
            };
            let four = |x: &Tensor| -> Vec<Vec<Vec<Vec<f64>>>> {
                (0..b)
                    .map(|i| {
                        let m: Vec<Vec<Vec<f32>>> = x.get(i).unwrap().to_vec3().unwrap();
                        m.iter()
                            .map(|h| h.iter().map(|r| r.iter().map(|&e| rnd(e as f64)).collect()).collect())
                            .collect()
                    })
                    .collect()
            };
            // Rounded, the queries are scaled before their product.
            let qs = if dtype == DType::F32 { q.clone() } else { (&q * scale as f64).unwrap() };
            let (q4, k4, v4) = (four(&qs), four(&k), four(&v));
            let both = [None, Some(1), Some(37), Some(64), Some(100), Some(1000)]
                .into_iter()
                .flat_map(|w| [(w, false), (w, true)]);
            for (window, generic) in both {
                let got = if generic {
                    attention_generic(&q, &k, &v, scale, window, dtype)
                } else {
                    causal_attention(&q, &k, &v, scale, window, dtype)
                }
                .unwrap();
                if dtype != DType::F32 {
                    // Values of the type, and not f32's.
                    assert_eq!(round_to(&got, dtype).unwrap().to_vec3::<f32>().unwrap(), got.to_vec3::<f32>().unwrap());
                    let apart = (&got - &f32_out).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>();
                    assert!(window != Some(37) || apart.unwrap() > 0.0, "{dtype:?}: f32's result");
                }
                let got = got.to_vec3::<f32>().unwrap();
                let (mut worst, mut exact, mut count) = (0f64, 0usize, 0usize);
                for bi in 0..b {
                    for h in 0..nh {
                        let kh = h / (nh / nkv);
                        for i in 0..t {
                            // Keys j ≤ i with i − j < window.
                            let lo = window.map_or(0, |w| (i + 1).saturating_sub(w));
                            let s: Vec<f64> = (lo..=i)
                                .map(|j| {
                                    let dot: f64 = (0..d).map(|c| q4[bi][h][i][c] * k4[bi][kh][j][c]).sum();
                                    if dtype == DType::F32 { dot * scale as f64 } else { rnd(dot) }
                                })
                                .collect();
                            let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                            let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                            for c in 0..d {
                                let terms = (lo..=i).map(|j| rnd((s[j - lo] - m).exp() / z) * v4[bi][kh][j][c]);
                                let (sum, size) = terms.fold((0.0, 0.0), |(a, b), x| (a + x, b + x.abs()));
                                // A step of the type on the terms' size: a probability the f32 softmax rounds
                                // the other way than f64's moves the sum by a step of that term.
                                let err = (got[bi][i][h * d + c] as f64 - rnd(sum)).abs();
                                worst = worst.max(err / (1e-5 + 4.0 * step * size));
                                exact += usize::from(err == 0.0);
                                count += 1;
                            }
                        }
                    }
                }
                // Bit for bit where no f32 sum lands next to a rounding boundary: skipping the rounding of the
                // scores or of the probabilities leaves about 78 % (tried).
                assert!(
                    dtype == DType::F32 || exact * 100 >= count * 99,
                    "{dtype:?}, window {window:?}, generic {generic}: {exact} of {count} as the reference"
                );
                assert!(
                    worst < 1.0,
                    "{dtype:?}, window {window:?}, generic {generic}: worst error {worst} of the bound"
                );
            }
        }
    }

    /// causal_softmax.cu, run on the host (src/cuda_emu.h, blocks of 32 threads here): each probability is the
    /// host's expression (`exp_neg`, times the sum's inverse) with the kernel's order of the sum (each thread's
    /// strided partial sum, then a tree), rounded to the type, bit for bit; within the window of each query,
    /// rows narrower and wider than a block, scores far enough apart for `exp_neg`'s floor. Against the host's
    /// [`causal_softmax`] (its own order of the sum) nearly all values in bf16 and f16 are the same bits. And
    /// its conversions are the `half` crate's, bit for bit: every f16 widened, f32 values of every kind (ties
    /// between the types' neighbours and either side of them, subnormals, infinities, NaN) rounded.
    #[test]
    fn the_gpu_softmax_kernel_gives_the_host_expression() {
        use crate::device::emu::{Harness, bytes, f32s};
        let Some(harness) = Harness::build("causal_softmax_test") else { return };
        let (threads, heads, t) = (32, 3, 70);
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for (kind, dtype, step) in
            [(0i32, DType::F32, 4.0 * f32::EPSILON), (1, DType::BF16, 2f32.powi(-7)), (2, DType::F16, 2f32.powi(-10))]
        {
            let rnd = |x: f32| match dtype {
                DType::BF16 => half::bf16::from_f32(x).to_f32(),
                DType::F16 => half::f16::from_f32(x).to_f32(),
                _ => x,
            };
            let bits = |x: f32| -> Vec<u8> {
                match dtype {
                    DType::BF16 => half::bf16::from_f32(x).to_bits().to_le_bytes().to_vec(),
                    DType::F16 => half::f16::from_f32(x).to_bits().to_le_bytes().to_vec(),
                    _ => x.to_le_bytes().to_vec(),
                }
            };
            for (window, scale) in [(None, 1.0f32), (Some(1), 1.0), (Some(5), 0.125), (Some(40), 1.0), (Some(500), 0.3)]
            {
                // Scores of the type, a few of them 100 below their row's others.
                let s: Vec<f32> = (0..heads * t * t)
                    .map(|_| {
                        let u = (next() % 20_001) as f32 / 1000.0 - 10.0;
                        rnd(if next() % 50 == 0 { u - 100.0 } else { u })
                    })
                    .collect();
                let mut input =
                    bytes(&[kind, (heads * t) as i32, t as i32, window.map_or(0, |w| w as i32)], i32::to_le_bytes);
                input.extend(scale.to_le_bytes());
                input.extend(s.iter().flat_map(|&x| bits(x)));
                let out = harness.run(&input);
                let got: Vec<f32> = match dtype {
                    DType::F32 => f32s(&out, 0, s.len()),
                    DType::BF16 => out.chunks(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
                    _ => out.chunks(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
                };
                let host = causal_softmax(
                    &Tensor::from_vec(s.clone(), (heads * t, t), &Device::Cpu).unwrap().to_dtype(dtype).unwrap(),
                    scale,
                    window,
                )
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
                let (mut same_as_host, mut worst) = (0, 0f32);
                for (r, (row, got)) in s.chunks(t).zip(got.chunks(t)).enumerate() {
                    let p = r % t;
                    let lo = window.map_or(0, |w| (p + 1).saturating_sub(w));
                    let x: Vec<f32> = row[lo..=p].iter().map(|&v| v * scale).collect();
                    let m = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                    let mut part = vec![0f32; threads];
                    for (i, &v) in x.iter().enumerate() {
                        part[i % threads] += exp_neg(v - m);
                    }
                    let mut width = threads / 2;
                    while width > 0 {
                        for i in 0..width {
                            part[i] += part[i + width];
                        }
                        width /= 2;
                    }
                    let inv = 1.0 / part[0];
                    for (j, &g) in got.iter().enumerate() {
                        let want = if (lo..=p).contains(&j) { rnd(exp_neg(x[j - lo] - m) * inv) } else { 0.0 };
                        assert_eq!(g.to_bits(), want.to_bits(), "{dtype:?} window {window:?}: row {r}, key {j}");
                    }
                    for (a, b) in got.iter().zip(&host[r * t..(r + 1) * t]) {
                        same_as_host += usize::from(a == b);
                        // (exp_neg's floor: keys 87 below the row's maximum get e⁻⁸⁷, candle's less.)
                        worst = worst.max(((a - b).abs() - 2e-38).max(0.0) / b.max(f32::MIN_POSITIVE));
                    }
                }
                eprintln!("{dtype:?} window {window:?}: {same_as_host} of {} as the host's softmax", s.len());
                // Within a step of the type (f32: four) of candle's softmax, which sums in another order and
                // divides by the sum.
                assert!(worst <= step, "{dtype:?} window {window:?}: {worst} from the host's softmax, relative");
                assert!(
                    dtype == DType::F32 || same_as_host * 100 >= s.len() * 99,
                    "{dtype:?} window {window:?}: {same_as_host} of {} as the host's softmax",
                    s.len()
                );
            }
        }

        // The conversions: every f16 widened; f32 values rounded to bf16 and f16.
        let mut f: Vec<f32> = Vec::new();
        for h in 0..0x7c00u16 {
            // The midpoint between each finite f16 and the next, and either side of it.
            let (a, b) = (half::f16::from_bits(h).to_f64(), half::f16::from_bits(h + 1).to_f64());
            let mid = ((a + b) / 2.0) as f32;
            for x in [mid, f32::from_bits(mid.to_bits() - 1), f32::from_bits(mid.to_bits() + 1), a as f32] {
                f.extend([x, -x]);
            }
        }
        for _ in 0..40_000 {
            // bf16's midpoints and either side of them, and any bit pattern at all.
            let b = (next() as u32) & 0xffff_0000;
            f.extend([f32::from_bits(b | 0x8000), f32::from_bits(b | 0x8001), f32::from_bits(b | 0x7fff)]);
            f.push(f32::from_bits(next() as u32));
        }
        f.extend([0.0, -0.0, f32::INFINITY, f32::NEG_INFINITY, f32::NAN, 65504.0, 65519.99, 65520.0, 1e-8, 2.9e-8]);
        let h: Vec<u16> = (0..f.len()).map(|i| (i % 65_536) as u16).collect();
        let mut input = bytes(&[3i32, f.len() as i32], i32::to_le_bytes);
        input.extend(bytes(&h, u16::to_le_bytes));
        input.extend(bytes(&f, f32::to_le_bytes));
        let out = harness.run(&input);
        let n = f.len();
        let wide = f32s(&out, 0, n);
        let u16s = |at: usize| -> Vec<u16> {
            out[at..at + 2 * n].chunks(2).map(|b| u16::from_le_bytes([b[0], b[1]])).collect()
        };
        let (to_bf16, to_f16) = (u16s(4 * n), u16s(6 * n));
        for i in 0..n {
            let want = half::f16::from_bits(h[i]).to_f32();
            assert_eq!(wide[i].to_bits(), want.to_bits(), "f16 {:#06x} widened", h[i]);
            assert_eq!(
                to_bf16[i],
                half::bf16::from_f32(f[i]).to_bits(),
                "{:e} ({:#010x}) to bf16",
                f[i],
                f[i].to_bits()
            );
            assert_eq!(to_f16[i], half::f16::from_f32(f[i]).to_bits(), "{:e} ({:#010x}) to f16", f[i], f[i].to_bits());
        }
    }
}
