//! The run's compute device: `--device cpu|cuda|cuda:N`.
//!
//! One device per process, chosen once by the command line (as `--threads` sizes the one rayon pool), so that
//! no signature between the verbs and the kernels has to carry it: every model tensor is placed on it as the
//! checkpoint hands it out ([`crate::model::Weights::load_shaped`]), activations follow their weights, and the
//! dense kernels of [`crate::linalg`] take candle's own device-generic operators wherever a tensor is not on
//! the CPU. Code that works on host memory (mask selection, the pruners' numerics) reads device tensors through
//! [`crate::linalg::with_f32`], which copies them to the host. The calibration activations the walk keeps between
//! uses are [`Stashed`]: on the device, or, offloaded, in pinned host memory. The default build has no CUDA:
//! `--device cuda` then fails with a message naming the build that has it.

use std::sync::OnceLock;

use anyhow::{Result, anyhow, bail};
use candle_core::{DType, Device, Tensor};

static DEVICE: OnceLock<Device> = OnceLock::new();
static OFFLOAD: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// `cpu`, `cuda` (GPU 0) or `cuda:N`, opened.
pub fn open(spec: &str) -> Result<Device> {
    let ordinal = match spec {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        s => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => n,
            _ => bail!("--device {spec}: expected cpu, cuda or cuda:N"),
        },
    };
    if !cfg!(feature = "cuda") {
        bail!(
            "--device {spec}: this fistaprune was built without GPU support (build it with the `cuda` feature: \
             scripts/build-cuda.sh)"
        );
    }
    let device = Device::new_cuda(ordinal).map_err(|e| anyhow!("--device {spec}: cannot open GPU {ordinal}: {e}"))?;
    // bf16 and f16 products sum in f32 (`--matmul-dtype`, as the CPU's rounding of them does): candle's default,
    // pinned here rather than left to whatever else sets candle's process-wide switches.
    #[cfg(feature = "cuda")]
    {
        candle_core::cuda::set_gemm_reduced_precision_bf16(false);
        candle_core::cuda::set_gemm_reduced_precision_f16(false);
        candle_core::cuda::set_gemm_reduced_precision_f32(false);
    }
    Ok(device)
}

/// Make `device` the run's device; only before any model is read, once.
pub fn set(device: Device) -> Result<()> {
    DEVICE.set(device).map_err(|_| anyhow!("the compute device is already chosen"))
}

/// The run's device (the CPU unless [`set`] chose another).
pub fn current() -> &'static Device {
    DEVICE.get_or_init(|| Device::Cpu)
}

/// Hold the calibration activations in host memory between their uses (`--offload-activations`), for models
/// whose activations do not fit on the GPU beside a layer: a LLaMA-2-70B layer's 128 × 2048 calibration tokens
/// are 8.6 GB per stream in f32, and error correction keeps one operator group's inputs for the next (gate/up's,
/// pruned and dense, 17 GB; with the residual stream where the walk makes the layer's outputs from them, which
/// it does only where the MLP's inner inputs, 30 GB, fit too).
pub fn set_offload(on: bool) {
    OFFLOAD.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Whether the walk holds its activations in host memory ([`set_offload`]).
pub fn offloading() -> bool {
    OFFLOAD.load(std::sync::atomic::Ordering::Relaxed)
}

/// An activation where the walk keeps it between uses ([`stash`]): the tensor itself, or, offloaded from a GPU,
/// a copy in page-locked host memory, which the GPU's copy engines read and write directly, at the bus's full
/// rate and without waiting for the host (pageable memory goes through a staging copy at a fraction of it).
#[derive(Clone)]
pub struct Stashed {
    dims: Vec<usize>,
    dtype: DType,
    at: At,
}

#[derive(Clone)]
enum At {
    Tensor(Tensor),
    #[cfg(feature = "cuda")]
    Pinned(std::sync::Arc<pinned::Block>),
}

impl Stashed {
    pub fn dims(&self) -> &[usize] {
        &self.dims
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Bytes of it in GPU memory (none once offloaded).
    pub fn gpu_bytes(&self) -> usize {
        match &self.at {
            At::Tensor(t) if !t.device().is_cpu() => t.elem_count() * t.dtype().size_in_bytes(),
            _ => 0,
        }
    }
}

/// Kept where it is.
impl From<Tensor> for Stashed {
    fn from(t: Tensor) -> Self {
        Self { dims: t.dims().to_vec(), dtype: t.dtype(), at: At::Tensor(t) }
    }
}

/// `t` where the walk keeps activations between uses: in host memory under [`set_offload`] (page-locked where
/// the tensor is on a GPU and the driver pins it), else where it is.
pub fn stash(t: Tensor) -> Result<Stashed> {
    stash_in(t, offloading())
}

/// `t` kept in host memory where `host` (as [`stash`] keeps it under [`set_offload`]), else where it is.
pub fn stash_in(t: Tensor, host: bool) -> Result<Stashed> {
    if !host {
        return Ok(t.into());
    }
    if t.device().is_cpu() {
        // Copied: the first layer's batches are views of all the calibration embeddings, which would stay.
        return Ok(t.force_contiguous()?.into());
    }
    #[cfg(feature = "cuda")]
    {
        let held = |e: anyhow::Error| e.context("holding a calibration activation in host memory");
        if let Some(block) = pinned::store(&t).map_err(held)? {
            let at = At::Pinned(std::sync::Arc::new(block));
            return Ok(Stashed { dims: t.dims().to_vec(), dtype: t.dtype(), at });
        }
        if let Some(host) = pinned::download(&t).map_err(held)? {
            return Ok(host.into());
        }
    }
    // Copied out on its device first: candle's `to_device` moves a view's whole storage.
    Ok(t.force_contiguous()?.to_device(&Device::Cpu)?.into())
}

/// Give back the pinned host memory that offloading holds and no activation uses (at the end of a walk).
pub fn release_pinned() {
    #[cfg(feature = "cuda")]
    pinned::release();
}

/// `s` where [`stash`] keeps activations now (once [`set_offload`] has turned offloading on).
pub fn restash(s: Stashed) -> Result<Stashed> {
    restash_in(s, offloading())
}

/// `s` in host memory where `host`, else where it is ([`stash_in`]).
pub fn restash_in(s: Stashed, host: bool) -> Result<Stashed> {
    match s.at {
        At::Tensor(t) if t.device().is_cpu() => Ok(Stashed { at: At::Tensor(t), ..s }),
        At::Tensor(t) => stash_in(t, host),
        #[cfg(feature = "cuda")]
        At::Pinned(_) => Ok(s),
    }
}

/// A stashed activation on the run's device, to compute with.
pub fn fetch(s: &Stashed) -> Result<Tensor> {
    match &s.at {
        At::Tensor(t) => Ok(t.to_device(current())?),
        #[cfg(feature = "cuda")]
        At::Pinned(block) => block.load(&s.dims),
    }
}

/// Whether the kernels on `t` take candle's generic operators rather than the faer ones: always off the CPU,
/// and on it too under `FISTAPRUNE_GENERIC=1`, so that the GPU's code path is tested on machines without one.
pub fn generic(t: &Tensor) -> bool {
    !t.device().is_cpu() || forced()
}

/// Whether the pruners' dense work goes through candle on the run's device ([`current`]) rather than faer on
/// the host: off the CPU, and under `FISTAPRUNE_GENERIC=1`.
pub fn offloaded() -> bool {
    !current().is_cpu() || forced()
}

fn forced() -> bool {
    static FORCED: OnceLock<bool> = OnceLock::new();
    *FORCED.get_or_init(|| std::env::var("FISTAPRUNE_GENERIC").is_ok_and(|v| v == "1"))
}

/// Kernel `$name` of the project's kernel file `$file.cu` (by its stem; build.rs lists the paths), as build.rs
/// compiled it to PTX, on CUDA device `$dev`.
#[cfg(feature = "cuda")]
macro_rules! project_kernel {
    ($dev:expr, $file:literal, $name:literal) => {
        $crate::device::cuda_kernel(
            $dev,
            concat!("fistaprune_", $file),
            include_str!(concat!(env!("OUT_DIR"), "/", $file, ".ptx")),
            $name,
        )
    };
}
#[cfg(feature = "cuda")]
pub(crate) use project_kernel;

/// Kernel `name` of one of the project's CUDA kernels, `ptx` as build.rs compiled it (`module`: its name for
/// candle's module cache, loaded once per process). Through [`project_kernel`].
#[cfg(feature = "cuda")]
pub fn cuda_kernel(
    dev: &candle_core::CudaDevice,
    module: &str,
    ptx: &str,
    name: &str,
) -> Result<candle_core::cuda::cudarc::driver::CudaFunction> {
    let func = dev.get_or_load_custom_func(name, module, ptx).map_err(|e| anyhow!("loading the kernel {name}: {e}"))?;
    Ok(func.into_cuda_function())
}

/// Whether `e` came from the GPU running out of memory: the driver reports it as `CUDA_ERROR_OUT_OF_MEMORY`,
/// cuBLAS (a workspace it could not get) as `CUBLAS_STATUS_ALLOC_FAILED`, somewhere in the error's chain.
pub fn out_of_memory(e: &anyhow::Error) -> bool {
    let chain = format!("{e:#}");
    chain.contains("OUT_OF_MEMORY") || chain.contains("STATUS_ALLOC_FAILED")
}

/// The run's GPU's free and total memory in bytes, now (`None` on the CPU, or where the driver does not say).
pub fn memory() -> Option<(usize, usize)> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = current() {
        return dev.cuda_stream().context().mem_get_info().ok();
    }
    None
}

/// Leave the run at most `bytes` of the GPU's memory (`--gpu-memory`): what is free beyond that is allocated
/// now, outside the pool that candle allocates from, and held until the process ends. The run then meets out of
/// memory where it would with that much free (a card of that size has a little less: the CUDA context's
/// share): a layer that does not fit moves the calibration activations to host memory and is pruned again, and
/// what decides by the free memory (where error correction keeps inputs) decides by what is left. Returns the
/// bytes held back.
pub fn limit_memory(bytes: u64) -> Result<u64> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = current() {
        use candle_core::cuda::cudarc::driver::result;
        let ctx = dev.cuda_stream().context().clone();
        // (`mem_get_info` binds the context to this thread, as the allocation needs.)
        let (free, _) = ctx.mem_get_info().map_err(|e| anyhow!("--gpu-memory: the GPU's free memory: {e}"))?;
        let hold = (free as u64).saturating_sub(bytes);
        if hold > 0 {
            // SAFETY: the context is bound to this thread; the allocation is never freed or read (the driver
            // frees it with the context at exit). Its error is not passed on: it would read as the run's own
            // out of memory, with that error's advice.
            unsafe { result::malloc_sync(hold as usize) }.map_err(|_| {
                anyhow!(
                    "--gpu-memory: the GPU would not give the {} to hold back (taken meanwhile?)",
                    gib(hold as usize)
                )
            })?;
        }
        return Ok(hold);
    }
    let _ = bytes;
    bail!("--gpu-memory limits a GPU's memory: it needs --device cuda")
}

/// The most bytes the run's GPU tensors held at once since the last [`reset_peak`]: the high-water mark of the
/// driver's memory pool that candle allocates from (`None` on the CPU, or where the driver keeps no pool). What a
/// layer needed, to size a run or to read an out-of-memory error by: the allocation that failed is not known
/// (the driver's error does not carry its size), how far the layer had got is.
pub fn peak_bytes() -> Option<u64> {
    #[cfg(feature = "cuda")]
    return pool::attribute(pool::Attr::CU_MEMPOOL_ATTR_USED_MEM_HIGH, None);
    #[cfg(not(feature = "cuda"))]
    None
}

/// Start [`peak_bytes`]'s count again from what the run holds now.
pub fn reset_peak() {
    #[cfg(feature = "cuda")]
    pool::attribute(pool::Attr::CU_MEMPOOL_ATTR_USED_MEM_HIGH, Some(0));
}

/// The run's GPU's memory pool (stream-ordered allocation, which cudarc uses where the GPU has it).
#[cfg(feature = "cuda")]
mod pool {
    use candle_core::Device;
    use candle_core::cuda::cudarc::driver::{result, sys};

    pub use sys::CUmemPool_attribute as Attr;

    /// Pool attribute `attr` (a byte count), read, or set to `to` (the high-water mark takes only 0: reset).
    pub fn attribute(attr: Attr, to: Option<u64>) -> Option<u64> {
        let Device::Cuda(dev) = super::current() else { return None };
        let ctx = dev.cuda_stream().context().clone();
        if !ctx.has_async_alloc() {
            return None;
        }
        let mut value: u64 = to.unwrap_or(0);
        let at = (&mut value as *mut u64).cast();
        // SAFETY: the device is the context's own; both attributes of this module are `cuuint64_t`, which `at`
        // points to.
        unsafe {
            let pool = result::device::get_mem_pool(ctx.cu_device()).ok()?;
            match to {
                Some(_) => result::mem_pool::set_attribute(pool, attr, at).ok()?,
                None => result::mem_pool::get_attribute(pool, attr, at).ok()?,
            }
        }
        Some(value)
    }
}

/// `e`, an out-of-memory error ([`out_of_memory`]) of `what`, with `held` (what the run held on the GPU, in
/// words), the most the run's tensors had held at once since `what` began ([`peak_bytes`]) and, where the driver
/// says, the GPU's free and total memory once the failed step's own tensors were freed.
pub fn out_of_memory_in(e: anyhow::Error, what: &str, held: &str) -> anyhow::Error {
    let peak = peak_bytes().map_or(String::new(), |p| format!("; its tensors had reached {}", gib(p as usize)));
    let free = memory().map_or(String::new(), |(f, t)| format!(", {} free of {}", gib(f), gib(t)));
    e.context(format!("{what}: out of GPU memory ({held}{peak}{free})"))
}

/// `bytes` in GiB, for messages.
pub fn gib(bytes: usize) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// What to do about an error that came from the GPU running out of memory ([`out_of_memory`]), or `None` for
/// any other error.
pub fn hint(e: &anyhow::Error) -> Option<&'static str> {
    out_of_memory(e).then_some(
        "the GPU ran out of memory: --offload-activations holds the calibration activations in host memory \
         (prune, compare: it changes no pruned byte, so --resume continues with it); or, starting over, a lower \
         --batch, --act-dtype bf16 or --factor-dtype f32 (prune); fewer layers held with --layer-memory-mb (eval); \
         or a GPU with more memory",
    )
}

/// The bookkeeping of a pool of reusable buffers within a byte limit, keyed by dtype and length: the pinned
/// memory's ([`pinned`]), apart from CUDA so that it is tested on any machine.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct Pool<B> {
    /// The buffers not in use, with their keys and bytes.
    free: Vec<((DType, usize), usize, B)>,
    /// Bytes held in all, in use or not.
    held: usize,
    /// Whether a request was refused yet.
    refused: bool,
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
impl<B> Pool<B> {
    const fn new() -> Self {
        Self { free: Vec::new(), held: 0, refused: false }
    }

    /// A buffer for `key` (`bytes` long): a free one of that key, else a new one from `make` if it fits within
    /// `limit`. Free buffers of other keys are released only where that makes room: near the limit, buffers of
    /// two sizes used in turn would otherwise be made again and again. `Err`: why there is none.
    fn take(
        &mut self,
        key: (DType, usize),
        bytes: usize,
        limit: usize,
        make: impl FnOnce() -> Result<B, String>,
    ) -> Result<B, String> {
        if let Some(i) = self.free.iter().position(|f| f.0 == key) {
            return Ok(self.free.swap_remove(i).2);
        }
        if limit == 0 {
            return Err("the available host memory could not be read, so none is pinned".into());
        }
        let idle: usize = self.free.iter().map(|f| f.1).sum();
        if self.held + bytes > limit && self.held - idle + bytes <= limit {
            while self.held + bytes > limit
                && let Some(f) = self.free.pop()
            {
                self.held -= f.1;
            }
        }
        if self.held + bytes > limit {
            return Err(format!("{} pinned, the limit (half of the available host memory)", gib(self.held)));
        }
        let b = make()?;
        self.held += bytes;
        Ok(b)
    }

    /// `b`, taken for `key`, free again.
    fn give(&mut self, key: (DType, usize), bytes: usize, b: B) {
        self.free.push((key, bytes, b));
    }

    /// Drop the free buffers.
    fn release(&mut self) {
        self.held -= self.free.iter().map(|f| f.1).sum::<usize>();
        self.free.clear();
    }

    /// Whether this is the first refusal (for a notice said once).
    fn first_refusal(&mut self) -> bool {
        !std::mem::replace(&mut self.refused, true)
    }
}

/// Page-locked host memory for offloaded activations, from a pool: pinning costs about as much as the copy it
/// speeds up, so buffers are pinned once and reused by the next batches and layers, whose activations have the
/// same sizes. At most half of the available host memory is pinned: the rest stays pageable, for the host's own
/// work and the page cache of the memory-mapped weights. Beyond that, for dtypes other than f32, bf16 and f16, or
/// where the driver refuses, [`super::stash`] keeps the activation in pageable memory as before.
#[cfg(feature = "cuda")]
mod pinned {
    use std::sync::{Arc, Mutex, OnceLock};

    use anyhow::Result;
    use candle_core::cuda::CudaStorageSlice;
    use candle_core::cuda::cudarc::driver::{CudaContext, PinnedHostSlice};
    use candle_core::{CudaDevice, CudaStorage, DType, Device, Storage, Tensor, op::BackpropOp};
    use half::{bf16, f16};

    /// One pinned buffer.
    enum Buf {
        F32(PinnedHostSlice<f32>),
        Bf16(PinnedHostSlice<bf16>),
        F16(PinnedHostSlice<f16>),
    }

    static POOL: Mutex<super::Pool<Buf>> = Mutex::new(super::Pool::new());

    /// Half of the host memory available when the first buffer is pinned ([`crate::util::available_memory`],
    /// which knows a container's limit), or nothing where it cannot be read.
    fn limit() -> usize {
        static LIMIT: OnceLock<usize> = OnceLock::new();
        *LIMIT.get_or_init(|| crate::util::available_memory().map_or(0, |b| b as usize / 2))
    }

    /// A pinned buffer of `len` elements of `dtype` ([`super::Pool::take`]); `None` (and a notice, once) where
    /// there is none to be had.
    fn take(ctx: &Arc<CudaContext>, dtype: DType, len: usize) -> Option<Buf> {
        if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
            return None;
        }
        let mut pool = POOL.lock().ok()?;
        let bytes = len * dtype.size_in_bytes();
        let pin = || {
            // SAFETY: the buffer is written by a copy from the GPU before anything reads it.
            unsafe {
                match dtype {
                    DType::F32 => ctx.alloc_pinned_with_flags::<f32>(len, 0).map(Buf::F32),
                    DType::BF16 => ctx.alloc_pinned_with_flags::<bf16>(len, 0).map(Buf::Bf16),
                    _ => ctx.alloc_pinned_with_flags::<f16>(len, 0).map(Buf::F16),
                }
            }
            .map_err(|e| format!("the driver refused to pin {}: {e:?}", super::gib(bytes)))
        };
        match pool.take((dtype, len), bytes, limit(), pin) {
            Ok(buf) => Some(buf),
            Err(why) => {
                // A notice, once: the run goes on, with slower copies.
                if pool.first_refusal() {
                    eprintln!("activations held in host memory: {why}; the rest go to pageable memory");
                }
                None
            }
        }
    }

    /// Unpin the buffers not in use (at the end of a walk: the memory goes back to the host).
    pub fn release() {
        if let Ok(mut pool) = POOL.lock() {
            pool.release();
        }
    }

    /// `t`, on a GPU, in pageable host memory: only its view's elements (the first layer's batches are views of
    /// all the calibration embeddings), and without a copy on the GPU first; `None` for other dtypes.
    pub fn download(t: &Tensor) -> Result<Option<Tensor>> {
        let Device::Cuda(dev) = t.device() else { return Ok(None) };
        let t = t.contiguous()?;
        let (storage, layout) = t.storage_and_layout();
        let Storage::Cuda(cs) = &*storage else { return Ok(None) };
        let range = layout.start_offset()..layout.start_offset() + t.elem_count();
        let cpu = &Device::Cpu;
        Ok(Some(match &cs.slice {
            CudaStorageSlice::F32(s) => Tensor::from_vec(dev.clone_dtoh(&s.slice(range))?, t.dims(), cpu)?,
            CudaStorageSlice::BF16(s) => Tensor::from_vec(dev.clone_dtoh(&s.slice(range))?, t.dims(), cpu)?,
            CudaStorageSlice::F16(s) => Tensor::from_vec(dev.clone_dtoh(&s.slice(range))?, t.dims(), cpu)?,
            _ => return Ok(None),
        }))
    }

    /// An activation in pinned memory; its buffer goes back to the pool when the last copy of it is dropped.
    pub struct Block {
        buf: Option<Buf>,
        dtype: DType,
        len: usize,
        dev: CudaDevice,
    }

    impl Drop for Block {
        fn drop(&mut self) {
            if let (Some(buf), Ok(mut pool)) = (self.buf.take(), POOL.lock()) {
                pool.give((self.dtype, self.len), self.len * self.dtype.size_in_bytes(), buf);
            }
        }
    }

    /// `t`, on a GPU, copied into a pinned buffer (queued on the GPU's stream: what reads it later is queued
    /// after it); `None` where `t` is not on a GPU or no buffer is to be had.
    pub fn store(t: &Tensor) -> Result<Option<Block>> {
        let Device::Cuda(dev) = t.device() else { return Ok(None) };
        if t.elem_count() == 0 {
            return Ok(None);
        }
        let t = t.contiguous()?;
        let Some(buf) = take(dev.cuda_stream().context(), t.dtype(), t.elem_count()) else { return Ok(None) };
        let mut block = Block { buf: Some(buf), dtype: t.dtype(), len: t.elem_count(), dev: dev.clone() };
        let (storage, layout) = t.storage_and_layout();
        let Storage::Cuda(cs) = &*storage else { return Ok(None) };
        let range = layout.start_offset()..layout.start_offset() + t.elem_count();
        match (&cs.slice, block.buf.as_mut().expect("just taken")) {
            (CudaStorageSlice::F32(s), Buf::F32(p)) => dev.memcpy_dtoh(&s.slice(range), p)?,
            (CudaStorageSlice::BF16(s), Buf::Bf16(p)) => dev.memcpy_dtoh(&s.slice(range), p)?,
            (CudaStorageSlice::F16(s), Buf::F16(p)) => dev.memcpy_dtoh(&s.slice(range), p)?,
            _ => return Ok(None),
        }
        Ok(Some(block))
    }

    impl Block {
        /// The activation back on its GPU, as a `dims` tensor.
        pub fn load(&self, dims: &[usize]) -> Result<Tensor> {
            let dev = &self.dev;
            let storage = match self.buf.as_ref().expect("held until dropped") {
                Buf::F32(p) => {
                    // SAFETY: every element is written by the copy that follows.
                    let mut d = unsafe { dev.alloc::<f32>(p.len()) }?;
                    dev.memcpy_htod(p, &mut d)?;
                    CudaStorage::wrap_cuda_slice(d, dev.clone())
                }
                Buf::Bf16(p) => {
                    // SAFETY: as above.
                    let mut d = unsafe { dev.alloc::<bf16>(p.len()) }?;
                    dev.memcpy_htod(p, &mut d)?;
                    CudaStorage::wrap_cuda_slice(d, dev.clone())
                }
                Buf::F16(p) => {
                    // SAFETY: as above.
                    let mut d = unsafe { dev.alloc::<f16>(p.len()) }?;
                    dev.memcpy_htod(p, &mut d)?;
                    CudaStorage::wrap_cuda_slice(d, dev.clone())
                }
            };
            Ok(Tensor::from_storage(Storage::Cuda(storage), dims.to_vec(), BackpropOp::none(), false))
        }
    }
}

/// Held by the tests that turn [`set_offload`] on and off, which is one switch for the whole process.
#[cfg(test)]
pub(crate) static OFFLOAD_TESTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The project's CUDA kernels built for the host, for their tests: a harness `src/<harness>.cpp` that includes
/// a kernel under `src/cuda_emu.h`, reads its input from one file and writes its outputs to another.
#[cfg(test)]
pub(crate) mod emu {
    use std::path::PathBuf;

    /// A harness built by g++ with blocks of 32 threads, FMA contraction off; `None` (and a message) where
    /// there is no g++.
    pub struct Harness {
        dir: PathBuf,
        exe: PathBuf,
    }

    impl Harness {
        pub fn build(harness: &str) -> Option<Harness> {
            let name = harness.replace('/', "-");
            // One folder per harness built: tests of one harness run side by side.
            static BUILT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let nth = BUILT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let dir = std::env::temp_dir().join(format!("fistaprune-{name}-{}-{nth}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let exe = dir.join(&name);
            let src = format!("{}/src/{harness}.cpp", env!("CARGO_MANIFEST_DIR"));
            let cc = std::process::Command::new("g++")
                .args(["-std=c++20", "-O1", "-ffp-contract=off", "-DTHREADS=32", "-pthread", &src, "-o"])
                .arg(&exe)
                .output();
            match cc {
                Err(e) => {
                    eprintln!("skipped: no g++ to build {harness} for the host ({e})");
                    None
                }
                Ok(o) => {
                    assert!(o.status.success(), "g++ {harness}: {}", String::from_utf8_lossy(&o.stderr));
                    Some(Harness { dir, exe })
                }
            }
        }

        /// The harness's output on `input`.
        pub fn run(&self, input: &[u8]) -> Vec<u8> {
            self.run_with(input, &[])
        }

        /// The same with the harness's further arguments `args` (which kernel, for a harness of several).
        pub fn run_with(&self, input: &[u8], args: &[&str]) -> Vec<u8> {
            let (fin, fout) = (self.dir.join("in.bin"), self.dir.join("out.bin"));
            std::fs::write(&fin, input).unwrap();
            let run = std::process::Command::new(&self.exe).arg(&fin).arg(&fout).args(args).status().unwrap();
            assert!(run.success(), "{}: the host build of the kernel failed", self.exe.display());
            std::fs::read(&fout).unwrap()
        }
    }

    impl Drop for Harness {
        fn drop(&mut self) {
            std::fs::remove_dir_all(&self.dir).ok();
        }
    }

    /// Little-endian bytes of `v`, as the harnesses read them.
    pub fn bytes<T: Copy, const N: usize>(v: &[T], to: impl Fn(T) -> [u8; N]) -> Vec<u8> {
        v.iter().flat_map(|&x| to(x)).collect()
    }

    /// `len` f32s from `out` at byte `at`.
    pub fn f32s(out: &[u8], at: usize, len: usize) -> Vec<f32> {
        out[at..at + 4 * len].chunks(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_gpu_memory_gets_a_hint_and_nothing_else_does() {
        let oom = anyhow!("DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")").context("decoder layer 3");
        assert!(hint(&oom).unwrap().contains("--offload-activations"));
        let cublas = anyhow!("cublas error: CUBLAS_STATUS_ALLOC_FAILED").context("decoder layer 3");
        assert!(hint(&cublas).is_some());
        assert!(hint(&anyhow!("decoder layer 3: shape mismatch")).is_none());
    }

    /// The pinned memory's bookkeeping: buffers are reused by key, new ones stay within the limit, idle ones of
    /// other sizes are released only where that makes room, and a refusal says why.
    #[test]
    fn the_pool_reuses_buffers_and_stays_within_its_limit() {
        let made = std::cell::Cell::new(0);
        let make = || -> Result<u32, String> {
            made.set(made.get() + 1);
            Ok(made.get())
        };
        let (f32s, limit) = (|n: usize| (DType::F32, n), 100);
        let mut pool = Pool::new();
        assert_eq!(pool.take(f32s(10), 40, limit, make), Ok(1));
        pool.give(f32s(10), 40, 1);
        assert_eq!(pool.take(f32s(10), 40, limit, make), Ok(1), "reused");
        let e = pool.take(f32s(20), 80, limit, make).unwrap_err();
        assert!(e.contains("the limit"), "{e}");
        pool.give(f32s(10), 40, 1);
        assert_eq!(pool.take(f32s(20), 80, limit, make), Ok(2), "the idle buffer released to make room");
        assert_eq!(pool.take((DType::BF16, 5), 10, limit, make), Ok(3));
        assert_eq!(pool.held, 90);
        pool.give(f32s(20), 80, 2);
        // Releasing every idle buffer would not make room for this one: none is released.
        assert!(pool.take(f32s(30), 120, limit, make).is_err());
        assert_eq!(pool.take(f32s(20), 80, limit, make), Ok(2), "kept");
        assert!(pool.take(f32s(1), 4, limit, || Err("refused".into())).is_err_and(|e| e == "refused"));
        assert_eq!((pool.held, made.get()), (90, 3));
        pool.give(f32s(20), 80, 2);
        pool.give((DType::BF16, 5), 10, 3);
        pool.release();
        assert_eq!((pool.held, pool.free.len()), (0, 0));
        assert!(pool.take(f32s(1), 4, 0, make).unwrap_err().contains("could not be read"));
        assert!(pool.first_refusal() && !pool.first_refusal(), "said once");
    }

    #[test]
    fn device_names_parse_and_bad_ones_say_what_is_expected() {
        assert!(open("cpu").unwrap().is_cpu());
        let e = open("gpu").unwrap_err().to_string();
        assert!(e.contains("expected cpu, cuda or cuda:N"), "{e}");
        let e = open("cuda:x").unwrap_err().to_string();
        assert!(e.contains("expected cpu, cuda or cuda:N"), "{e}");
        #[cfg(not(feature = "cuda"))]
        {
            let e = open("cuda:1").unwrap_err().to_string();
            assert!(e.contains("built without GPU support"), "{e}");
        }
    }
}
