//! Small shared helpers: numeric checks, progress bars, atomic output.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use candle_core::{DType, Tensor};
use indicatif::{ProgressDrawTarget, ProgressStyle};

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

/// Fail with `what` in the message if `t` holds a NaN or an infinity.
pub fn check_finite(t: &Tensor, what: &str) -> Result<()> {
    let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        let bad = v.iter().filter(|x| !x.is_finite()).count();
        bail!("{what}: {bad} non-finite values (first at flat index {i}: {})", v[i]);
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
        let mut st = JsonState { stage: prefix.to_string(), done: 0, total: len, start: Instant::now(), last: None, message: String::new() };
        st.emit("start");
        std::sync::Mutex::new(st)
    });
    ProgressBar { bar, json }
}

/// A directory written aside and renamed into place when complete, so that `dest` is either absent, the
/// old contents, or the whole new contents.
pub struct AtomicDir {
    pub tmp: PathBuf,
    dest: PathBuf,
    committed: bool,
    /// A resumed directory holds an earlier run's work: a failure now (flags that disagree with it) keeps it.
    keep: bool,
}

impl AtomicDir {
    /// Refuses an existing `dest` unless `force`.
    pub fn new(dest: &Path, force: bool) -> Result<Self> {
        let tmp = aside(dest, force, &format!("partial-{}", std::process::id()))?;
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        std::fs::create_dir_all(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
        Ok(Self { tmp, dest: dest.to_path_buf(), committed: false, keep: false })
    }

    /// Like [`AtomicDir::new`], but the directory aside has a fixed name, `.NAME.partial`, so that what a
    /// killed run (SIGINT, SIGTERM, `kill -9`: nothing removes it then) left there can be continued: with
    /// `resume` it is kept and the second value is true; without, it is refused, or cleared with `force`.
    /// (A run that fails with an error removes it, unless it was resuming: that work stays for a corrected
    /// `--resume`.)
    pub fn resumable(dest: &Path, force: bool, resume: bool) -> Result<(Self, bool)> {
        let tmp = aside(dest, force, "partial")?;
        let lock = tmp.join("lock");
        if let Ok(pid) = std::fs::read_to_string(&lock)
            && let Ok(pid) = pid.trim().parse::<u32>()
            && pid != std::process::id()
            && Path::new(&format!("/proc/{pid}")).exists()
        {
            bail!("{}: another run (process {pid}) is writing {} now", tmp.display(), dest.display());
        }
        let resumed = tmp.exists() && resume;
        if tmp.exists() && !resume {
            ensure!(
                force,
                "{}: an interrupted run left its finished layers here; --resume continues it, --force starts over",
                tmp.display()
            );
            std::fs::remove_dir_all(&tmp).with_context(|| format!("{}: cannot remove", tmp.display()))?;
        }
        std::fs::create_dir_all(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
        write_atomic(&lock, std::process::id().to_string().as_bytes())?;
        Ok((Self { tmp, dest: dest.to_path_buf(), committed: false, keep: resumed }, resumed))
    }

    /// Move the finished directory into place (replacing an old one, which is removed afterwards).
    pub fn commit(mut self) -> Result<()> {
        // The lock of a resumable directory is not part of the output.
        std::fs::remove_file(self.tmp.join("lock")).ok();
        let old = self.dest.with_file_name(format!(
            ".{}.old-{}",
            self.dest.file_name().unwrap_or_default().to_string_lossy(),
            std::process::id()
        ));
        let had_old = self.dest.exists();
        if had_old {
            std::fs::rename(&self.dest, &old).with_context(|| format!("{}: cannot move aside", self.dest.display()))?;
        }
        std::fs::rename(&self.tmp, &self.dest).with_context(|| format!("{}: cannot rename into place", self.dest.display()))?;
        self.committed = true;
        if had_old {
            std::fs::remove_dir_all(&old).ok();
        }
        Ok(())
    }
}

/// `.NAME.SUFFIX` beside `dest` (its parent created), after refusing an existing `dest` unless `force`.
fn aside(dest: &Path, force: bool, suffix: &str) -> Result<PathBuf> {
    if dest.exists() && !force {
        bail!("{}: already exists (use --force to replace it)", dest.display());
    }
    let parent = dest.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).with_context(|| format!("{}: cannot create", parent.display()))?;
    let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "out".into());
    Ok(parent.join(format!(".{name}.{suffix}")))
}

impl Drop for AtomicDir {
    fn drop(&mut self) {
        if !self.committed && !self.keep {
            std::fs::remove_dir_all(&self.tmp).ok();
        }
    }
}

/// Bytes free to an unprivileged writer on the filesystem holding `dir` (`FISTAPRUNE_TEST_FREE_BYTES`
/// overrides it, for tests).
pub fn free_bytes(dir: &Path) -> Result<u64> {
    if let Some(v) = std::env::var_os("FISTAPRUNE_TEST_FREE_BYTES") {
        return v.to_string_lossy().parse().context("FISTAPRUNE_TEST_FREE_BYTES");
    }
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a properly sized, writable statvfs.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    ensure!(rc == 0, "{}: cannot read the free space ({})", dir.display(), std::io::Error::last_os_error());
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

/// Refuse to start when the filesystem of `dest` has less than `need` bytes free.
pub fn check_free_space(dest: &Path, need: u64) -> Result<()> {
    let parent = dest.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut probe = parent.to_path_buf();
    // The nearest existing ancestor (the output's parent may not exist yet).
    while !probe.exists() {
        match probe.parent() {
            Some(p) if !p.as_os_str().is_empty() => probe = p.to_path_buf(),
            _ => {
                probe = PathBuf::from(".");
                break;
            }
        }
    }
    let free = free_bytes(&probe)?;
    let gb = |b: u64| b as f64 / 1e9;
    ensure!(
        free >= need,
        "{}: not enough disk space for the output: {:.2} GB free, about {:.2} GB needed (free some space or choose another --out)",
        probe.display(),
        gb(free),
        gb(need)
    );
    Ok(())
}

/// Write `contents` to `path` atomically (temporary file in the same directory, then rename).
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<()> {
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).with_context(|| format!("{}: cannot create", parent.display()))?;
    let tmp = parent.join(format!(
        ".{}.tmp-{}",
        path.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    std::fs::write(&tmp, contents).with_context(|| format!("{}: cannot write", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("{}: cannot rename into place", path.display()))?;
    Ok(())
}
