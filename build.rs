//! Why this exists: the project's own CUDA kernels (`src/**/*.cu`) are compiled to PTX at build time, by the
//! nvcc that candle's CUDA backend needs anyway, so the binary carries the PTX of the toolkit it was built with
//! (CUDA 13.0: PTX ISA 9.0, which a 13.0 driver loads). Compiling them at run time would take whichever NVRTC the
//! GPU machine has, and a newer one writes PTX the driver rejects. Only with the `cuda` feature.

use std::path::PathBuf;
use std::process::Command;

/// The kernels, by path under `src/` without `.cu`; each file's PTX goes by its stem (`project_kernel!`).
const KERNELS: [&str; 3] = ["prune/sparsegpt", "prune/swap", "causal_softmax"];

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    for k in KERNELS {
        let src = format!("src/{k}.cu");
        println!("cargo::rerun-if-changed={src}");
        // compute_90: PTX for H100/H200 (candle's own kernels are built for sm_90a, so the binary is for Hopper
        // GPUs anyway). FMA contraction, flush-to-zero and approximate division off, so that kernels written with
        // the host's f32 expressions give the host's bits. nvcc would add NVCC_APPEND_FLAGS/NVCC_PREPEND_FLAGS
        // from the environment: a `--use_fast_math` there would break those bits, unseen by cargo.
        let stem = k.rsplit('/').next().expect("a file name");
        let ptx = out.join(format!("{stem}.ptx"));
        let run = Command::new(&nvcc)
            .args(["--ptx", "-arch=compute_90", "--fmad=false", "-ftz=false", "-prec-div=true", "-prec-sqrt=true"])
            .arg("-o")
            .arg(&ptx)
            .arg(&src)
            .env_remove("NVCC_APPEND_FLAGS")
            .env_remove("NVCC_PREPEND_FLAGS")
            .output();
        match run {
            Ok(o) if o.status.success() => {}
            Ok(o) => panic!("{nvcc} could not compile {src}:\n{}", String::from_utf8_lossy(&o.stderr)),
            Err(e) => {
                panic!("the `cuda` feature needs nvcc to compile {src} ({nvcc}: {e}); scripts/cuda-env.sh sets it up")
            }
        }
    }
}
