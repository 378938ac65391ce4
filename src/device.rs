//! The run's compute device: `--device cpu|cuda|cuda:N`.
//!
//! One device per process, chosen once by the command line (as `--threads` sizes the one rayon pool), so that
//! no signature between the verbs and the kernels has to carry it: every model tensor is placed on it as the
//! checkpoint hands it out ([`crate::model::Weights::load_shaped`]), activations follow their weights, and the
//! dense kernels of [`crate::linalg`] take candle's own device-generic operators wherever a tensor is not on
//! the CPU. Code that works on host memory (mask selection, the pruners' numerics) reads device tensors through
//! [`crate::linalg::with_f32`], which copies them to the host. The default build has no CUDA: `--device cuda`
//! then fails with a message naming the build that has it.

use std::sync::OnceLock;

use anyhow::{Result, anyhow, bail};
use candle_core::{Device, Tensor};

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
    Device::new_cuda(ordinal).map_err(|e| anyhow!("--device {spec}: cannot open GPU {ordinal}: {e}"))
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
/// are 8.6 GB per stream in f32 and 30 GB as its MLP's inner inputs, which error correction keeps from one
/// operator group to the next.
pub fn set_offload(on: bool) {
    OFFLOAD.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Whether the walk holds its activations in host memory ([`set_offload`]).
pub fn offloading() -> bool {
    OFFLOAD.load(std::sync::atomic::Ordering::Relaxed)
}

/// `t` where the walk keeps activations between uses: in host memory under [`set_offload`], else where it is.
/// Copied out on its device first: candle's `to_device` moves a view's whole storage, and the first layer's
/// batches are views of all the calibration embeddings.
pub fn stash(t: Tensor) -> Result<Tensor> {
    if !offloading() {
        return Ok(t);
    }
    Ok(t.force_contiguous()?.to_device(&Device::Cpu)?)
}

/// A stashed activation on the run's device, to compute with (itself where it is already there).
pub fn fetch(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_device(current())?)
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

/// Kernel `name` of the CUDA C source `src` (module `module`), compiled by NVRTC once per process. FMA
/// contraction is off, so that a kernel written with the host's f32 expressions gives the host's bits.
#[cfg(feature = "cuda")]
pub fn cuda_kernel(
    dev: &candle_core::CudaDevice,
    module: &str,
    src: &str,
    name: &str,
) -> Result<candle_core::cuda::cudarc::driver::CudaFunction> {
    use candle_core::cuda::cudarc::nvrtc::{CompileOptions, compile_ptx_with_opts};
    use std::collections::BTreeMap;
    use std::sync::Mutex;
    static PTX: Mutex<BTreeMap<String, String>> = Mutex::new(BTreeMap::new());
    let mut ptx = PTX.lock().map_err(|_| anyhow!("the kernel cache is poisoned"))?;
    if !ptx.contains_key(module) {
        let opts = CompileOptions { fmad: Some(false), name: Some(format!("{module}.cu")), ..Default::default() };
        let compiled = compile_ptx_with_opts(src, opts).map_err(|e| anyhow!("compiling the {module} kernel: {e}"))?;
        ptx.insert(module.to_string(), compiled.to_src());
    }
    let func = dev.get_or_load_custom_func(name, module, &ptx[module]).map_err(|e| anyhow!("loading {name}: {e}"))?;
    Ok(func.into_cuda_function())
}

/// Whether `e` came from the GPU running out of memory: CUDA reports it as `CUDA_ERROR_OUT_OF_MEMORY`
/// somewhere in the error's chain.
pub fn out_of_memory(e: &anyhow::Error) -> bool {
    format!("{e:#}").contains("OUT_OF_MEMORY")
}

/// The run's GPU's free and total memory in bytes, now (`None` on the CPU, or where the driver does not say).
pub fn memory() -> Option<(usize, usize)> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = current() {
        return dev.cuda_stream().context().mem_get_info().ok();
    }
    None
}

/// `bytes` in GiB, for messages.
pub fn gib(bytes: usize) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// What to do about an error that came from the GPU running out of memory (CUDA reports it as
/// `CUDA_ERROR_OUT_OF_MEMORY` somewhere in the error's chain), or `None` for any other error.
pub fn hint(e: &anyhow::Error) -> Option<&'static str> {
    out_of_memory(e).then_some(
        "the GPU ran out of memory: --offload-activations holds the calibration activations in host memory \
         (prune, compare: it changes no pruned byte, so --resume continues with it); or, starting over, a lower \
         --batch, --act-dtype bf16 or --factor-dtype f32 (prune); fewer layers held with --layer-memory-mb (eval); \
         or a GPU with more memory",
    )
}

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
            let dir = std::env::temp_dir().join(format!("fistaprune-{name}-{}", std::process::id()));
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
            let (fin, fout) = (self.dir.join("in.bin"), self.dir.join("out.bin"));
            std::fs::write(&fin, input).unwrap();
            let run = std::process::Command::new(&self.exe).arg(&fin).arg(&fout).status().unwrap();
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
        assert!(hint(&anyhow!("decoder layer 3: shape mismatch")).is_none());
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
