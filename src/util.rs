//! Small shared helpers: numeric checks, progress bars.

use std::time::Instant;

use anyhow::{Result, bail};
use candle_core::{DType, Tensor};
use indicatif::{ProgressDrawTarget, ProgressStyle};

/// The instruction sets this build was compiled to use (`.cargo/config.toml`: x86-64-v3) that the CPU lacks,
/// read with CPUID: std's feature macros answer from the build's flags there, not from the CPU.
pub fn missing_cpu_features() -> Vec<&'static str> {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{__cpuid, __cpuid_count};
        let (l1, l7) = (__cpuid(1), __cpuid_count(7, 0));
        let wanted = [
            (cfg!(target_feature = "avx2"), l7.ebx & (1 << 5) != 0, "AVX2"),
            (cfg!(target_feature = "fma"), l1.ecx & (1 << 12) != 0, "FMA"),
            (cfg!(target_feature = "f16c"), l1.ecx & (1 << 29) != 0, "F16C"),
            (cfg!(target_feature = "bmi2"), l7.ebx & (1 << 8) != 0, "BMI2"),
        ];
        wanted.iter().filter(|(built, has, _)| *built && !has).map(|w| w.2).collect()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Vec::new()
    }
}

/// Keep freed memory in the process instead of returning each large block to the kernel.
///
/// glibc serves allocations above 128 KiB (growing adaptively to 32 MiB) with fresh `mmap`s and unmaps them on
/// free, so every activation-sized temporary of a forward pass page-faults its memory in again (6 % of a
/// layer's time, measured). Raising the thresholds keeps those blocks in the heap for reuse.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called once at start-up.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

/// Whether every value of `t` is finite, by one reduction where `t` lives: 0·x is 0 for every finite x and NaN
/// otherwise, so the sum is finite iff every value is.
fn finite_by_reduction(t: &Tensor) -> Result<bool> {
    Ok(crate::linalg::sum_by_rows(&(t * 0.0)?)?.to_dtype(DType::F32)?.to_scalar::<f32>()?.is_finite())
}

/// Fail with `what` in the message if `t` holds a NaN or an infinity.
pub fn check_finite(t: &Tensor, what: &str) -> Result<()> {
    // Off the CPU, one reduction on the device; only a failure copies the tensor to the host, to say where.
    if !t.device().is_cpu() && finite_by_reduction(t)? {
        return Ok(());
    }
    use rayon::prelude::*;
    let bad = crate::linalg::with_f32(&t.to_dtype(DType::F32)?, |v| {
        let i = v.par_iter().position_first(|x| !x.is_finite())?;
        Some((i, v[i], v.par_iter().filter(|x| !x.is_finite()).count()))
    })?;
    if let Some((i, x, bad)) = bad {
        bail!("{what}: {bad} non-finite values (first at flat index {i}: {x})");
    }
    Ok(())
}

/// How long steps show their progress.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Progress {
    /// Nothing (`--quiet`).
    #[default]
    Hidden,
    /// A bar with ETA on stderr, drawn only when stderr is a terminal.
    Bar,
    /// One JSON object per line on stderr, for machines (`--json`): `{"event":"progress","stage":..,"done":..,
    /// "total":..,"elapsed_s":..,"eta_s":..}` at most about once a second and at the end of each stage.
    Json,
}

/// Print one machine-readable event line on stderr (in `--json` mode).
pub fn json_event(value: serde_json::Value) {
    use std::io::Write;
    let mut err = std::io::stderr().lock();
    // A closed stderr must not stop the work.
    writeln!(err, "{value}").ok();
}

/// The progress of one stage: an indicatif bar, or JSON lines (see [`Progress::Json`]).
pub struct ProgressBar {
    bar: indicatif::ProgressBar,
    json: Option<std::sync::Mutex<JsonState>>,
}

struct JsonState {
    stage: String,
    done: u64,
    total: u64,
    start: Instant,
    last: Option<Instant>,
    message: String,
}

impl JsonState {
    fn emit(&mut self, event: &str) {
        let elapsed = self.start.elapsed().as_secs_f64();
        let eta = (self.done > 0).then(|| elapsed / self.done as f64 * self.total.saturating_sub(self.done) as f64);
        let mut v = serde_json::json!({
            "event": event, "stage": self.stage, "done": self.done, "total": self.total,
            "elapsed_s": (elapsed * 1000.0).round() / 1000.0, "eta_s": eta.map(|e| (e * 10.0).round() / 10.0),
        });
        if !self.message.is_empty() {
            v["message"] = self.message.clone().into();
        }
        json_event(v);
        self.last = Some(Instant::now());
    }
}

impl ProgressBar {
    pub fn inc(&self, n: u64) {
        self.bar.inc(n);
        if let Some(j) = &self.json {
            let mut j = j.lock().expect("progress state");
            j.done += n;
            if j.done >= j.total || j.last.is_none_or(|t| t.elapsed().as_secs_f64() >= 1.0) {
                j.emit("progress");
            }
        }
    }

    pub fn set_message(&self, msg: String) {
        if let Some(j) = &self.json {
            j.lock().expect("progress state").message = msg.clone();
        }
        self.bar.set_message(msg);
    }

    pub fn finish_and_clear(&self) {
        self.bar.finish_and_clear();
        if let Some(j) = &self.json {
            j.lock().expect("progress state").emit("done");
        }
    }
}

/// The progress of a stage of `len` steps named `prefix`.
pub fn progress_bar(len: u64, prefix: &str, mode: Progress) -> ProgressBar {
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(len),
        if mode == Progress::Bar { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() },
    );
    bar.set_style(
        ProgressStyle::with_template("{prefix:>12} [{bar:30}] {pos}/{len} {msg} (ETA {eta})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(prefix.to_string());
    let json = (mode == Progress::Json).then(|| {
        let mut st = JsonState {
            stage: prefix.to_string(),
            done: 0,
            total: len,
            start: Instant::now(),
            last: None,
            message: String::new(),
        };
        st.emit("start");
        std::sync::Mutex::new(st)
    });
    ProgressBar { bar, json }
}

/// A whole number of at least 1 (`--batch`, `--jobs`).
pub fn positive(s: &str) -> Result<usize> {
    match s.trim().parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => bail!("{s:?}: expected a whole number of at least 1"),
    }
}

/// Bytes this process may still allocate: the kernel's `MemAvailable`, or less where a cgroup (v2) limit is
/// tighter, as in most containers, whose `/proc/meminfo` shows the host's. `FISTAPRUNE_AVAILABLE_MB` overrides
/// it (the tests use it to take the low-memory paths). `None` where neither can be read.
pub fn available_memory() -> Option<u64> {
    if let Ok(mb) = std::env::var("FISTAPRUNE_AVAILABLE_MB") {
        return mb.trim().parse::<u64>().ok().map(|mb| mb << 20);
    }
    let read = |p: &str| std::fs::read_to_string(p).ok();
    let meminfo = read("/proc/meminfo").and_then(|s| {
        let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
        line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kb| kb << 10)
    });
    let cgroup = (|| {
        let max = read("/sys/fs/cgroup/memory.max")?.trim().parse::<u64>().ok()?; // "max" when unlimited
        let used = read("/sys/fs/cgroup/memory.current")?.trim().parse::<u64>().ok()?;
        Some(max.saturating_sub(used))
    })();
    meminfo.into_iter().chain(cgroup).min()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The device test `check_finite` uses off the CPU, on every kind of non-finite value and a large finite one.
    #[test]
    fn the_reduction_finds_every_non_finite_value() {
        let dev = &candle_core::Device::Cpu;
        let with = |v: f32| Tensor::new(&[1.0f32, -3e38, v, 2.0], dev).unwrap();
        assert!(finite_by_reduction(&with(5.0)).unwrap());
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            assert!(!finite_by_reduction(&with(bad)).unwrap(), "{bad}");
            assert!(check_finite(&with(bad), "x").is_err());
        }
    }
}
