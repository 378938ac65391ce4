//! Where a run writes, and what it may replace: one place decides it for every verb.
//!
//! A tool people trust loses nothing it was not asked to replace. So, before any work:
//! - every path a run reads or writes is resolved (absolute, through `..` and symbolic links), and an output
//!   may never be, contain or lie inside one of the run's inputs or another of its outputs, `--force` or not;
//! - an existing output path is refused without `--force`, and with it replaced only when it is an earlier
//!   output of fistaprune (a folder whose `report.json` or `compare.json` carries [`VERSION_KEY`] and which
//!   holds nothing fistaprune does not write; a JSON file that carries it) or empty;
//! - the output is locked (`flock` on `.NAME.lock` beside it) for as long as the run lives: a second run writing
//!   it is refused at once. The kernel releases the lock however the first run ends, so a crash leaves none.
//!
//! Folders are then assembled aside ([`AtomicDir`]) and files written aside ([`write_atomic`]), and renamed
//! into place when complete, so an output is absent, the old contents, or the whole new contents.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Component, Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail, ensure};
use serde_json::Value;

/// The key that marks what fistaprune wrote: every report and JSON output carries it, with the version.
pub const VERSION_KEY: &str = "fistaprune_version";

/// The reports one of which marks an output folder as fistaprune's.
const FOLDER_REPORTS: [&str; 2] = ["report.json", "compare.json"];

/// `--force`, declared once for every verb that writes.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct Force {
    /// Replace an earlier output of fistaprune, or an empty folder or file (nothing else is ever replaced), and
    /// clear what an interrupted run left aside.
    #[cfg_attr(feature = "cli", arg(long))]
    pub force: bool,
}

/// The paths a run reads and the outputs it has claimed, resolved.
#[derive(Default)]
pub struct RunPaths {
    inputs: Vec<(String, PathBuf)>,
    outputs: Vec<(String, PathBuf)>,
}

/// What an output is: a folder ([`AtomicDir`]) or a single file.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    Folder,
    File,
}

impl RunPaths {
    pub fn new() -> Self {
        Self::default()
    }

    /// The run reads `path` (named `flag` in messages). A path that does not exist reads nothing yet (its
    /// reader will say so), so it is not recorded.
    pub fn input(mut self, flag: &str, path: Option<&Path>) -> Result<Self> {
        if let Some(p) = path.filter(|p| fs::symlink_metadata(p).is_ok()) {
            self.inputs.push((flag.to_string(), resolve(p)?));
        }
        Ok(self)
    }

    /// `--model`: a local path, or a Hugging Face Hub id, whose cached snapshot is then the input.
    pub fn model(self, path: &Path) -> Result<Self> {
        let local = crate::model::hub::cached_path(path);
        self.input("--model", local.as_deref())
    }

    /// Claim `path` as an output of this run (named `flag` in messages): refused where it overlaps an input or
    /// an earlier claim, or exists and may not be replaced (see the module doc); locked until the claim drops.
    pub fn claim(&mut self, flag: &str, path: &Path, kind: Kind, force: bool) -> Result<Claim> {
        let dest = resolve(path)?;
        let shown = shown(path, &dest);
        ensure!(dest.parent().is_some(), "{flag} {shown}: cannot write over the root of the filesystem");
        let inputs = self.inputs.iter().map(|(f, p)| ("input", f, p));
        for (what, other, p) in inputs.chain(self.outputs.iter().map(|(f, p)| ("output", f, p))) {
            let problem = if dest == *p {
                format!("is the {what} {other} itself")
            } else if dest.starts_with(p) {
                format!("lies inside the {what} {other} {}", p.display())
            } else if p.starts_with(&dest) {
                format!("contains the {what} {other} {}", p.display())
            } else {
                continue;
            };
            bail!(
                "{flag} {shown} {problem}: an output may not overlap what the run reads or writes (refused with or without --force); choose another {flag}"
            );
        }
        let lock = Lock::acquire(&dest, &shown)?;
        check_existing(flag, &shown, &dest, kind, force)?;
        self.outputs.push((flag.to_string(), dest.clone()));
        Ok(Claim { path: dest, shown, kind, force, _lock: lock })
    }
}

/// An output this run may write: checked, and locked against other runs until dropped.
pub struct Claim {
    /// The destination, resolved (a symbolic link's target is written).
    pub path: PathBuf,
    /// The path as the user gave it (with the resolved one when they differ), for messages.
    shown: String,
    kind: Kind,
    force: bool,
    _lock: Lock,
}

impl Claim {
    /// Write the file atomically, marked as ours: `value` (a JSON object) with [`VERSION_KEY`] added.
    pub fn write_json(&self, value: &Value) -> Result<()> {
        debug_assert_eq!(self.kind, Kind::File);
        write_atomic(&self.path, serde_json::to_string_pretty(&marked(value.clone()))?.as_bytes())
    }
}

/// `value` (a JSON object) with [`VERSION_KEY`] set: how every report and JSON output says it is fistaprune's.
pub fn marked(mut value: Value) -> Value {
    if let Value::Object(m) = &mut value {
        m.insert(VERSION_KEY.into(), env!("CARGO_PKG_VERSION").into());
    }
    value
}

/// `path` as given, and resolved where that reads otherwise.
fn shown(path: &Path, dest: &Path) -> String {
    let given = path.display().to_string();
    if given == dest.display().to_string() { given } else { format!("{given} (= {})", dest.display()) }
}

/// `path` made absolute, `.`/`..` and symbolic links resolved component by component as far as the path
/// exists (the rest is taken as written, as the kernel would create it).
pub fn resolve(path: &Path) -> Result<PathBuf> {
    let mut cur = std::env::current_dir().context("the current folder")?;
    let mut exists = true;
    for c in path.components() {
        match c {
            Component::Prefix(_) | Component::RootDir => cur = PathBuf::from("/"),
            Component::CurDir => {}
            Component::ParentDir => {
                cur.pop();
            }
            Component::Normal(name) => {
                cur.push(name);
                if exists && fs::symlink_metadata(&cur).is_ok() {
                    cur = fs::canonicalize(&cur).map_err(|e| {
                        let target = fs::read_link(&cur).map(|t| t.display().to_string()).unwrap_or_default();
                        anyhow!("{}: a symbolic link to {target}, which cannot be followed ({e})", cur.display())
                    })?;
                } else {
                    exists = false;
                }
            }
        }
    }
    Ok(cur)
}

/// What stands at an output path now.
enum Existing {
    Absent,
    /// An empty folder or an empty file: nothing to lose.
    Empty,
    /// An earlier output of fistaprune.
    Ours,
    /// Anything else, described for the message.
    Foreign(String),
}

/// Refuse an existing `dest` without `force`, and anything there fistaprune did not write even with it.
fn check_existing(flag: &str, shown: &str, dest: &Path, kind: Kind, force: bool) -> Result<()> {
    match existing(dest, kind) {
        Existing::Absent => Ok(()),
        Existing::Foreign(what) => bail!(
            "{flag} {shown}: already exists and is not an output of fistaprune ({what}); it is left untouched, \
             with or without --force: choose another {flag}, or move it away"
        ),
        Existing::Empty | Existing::Ours if !force => bail!("{shown}: already exists (use --force to replace it)"),
        Existing::Empty | Existing::Ours => Ok(()),
    }
}

fn existing(dest: &Path, kind: Kind) -> Existing {
    let Ok(meta) = fs::metadata(dest) else { return Existing::Absent };
    match (kind, meta.is_dir()) {
        (Kind::Folder, true) => {
            let names = match entries(dest) {
                Ok(n) => n,
                Err(e) => return Existing::Foreign(format!("a folder that cannot be read: {e}")),
            };
            if names.is_empty() {
                return Existing::Empty;
            }
            if !FOLDER_REPORTS.iter().any(|r| is_marked(&dest.join(r))) {
                return Existing::Foreign(format!("a folder holding {}", list(&names)));
            }
            let foreign = foreign_entries(dest, "");
            if foreign.is_empty() {
                Existing::Ours
            } else {
                Existing::Foreign(format!("a fistaprune output to which {} were added", list(&foreign)))
            }
        }
        (Kind::Folder, false) => Existing::Foreign("a file, not a folder".into()),
        (Kind::File, true) => Existing::Foreign("a folder, not a file".into()),
        (Kind::File, false) if meta.len() == 0 => Existing::Empty,
        (Kind::File, false) if is_marked(dest) => Existing::Ours,
        (Kind::File, false) => {
            Existing::Foreign(format!("a file of {} bytes that fistaprune did not write", meta.len()))
        }
    }
}

/// The names in `dir`, sorted.
fn entries(dir: &Path) -> std::io::Result<Vec<String>> {
    let mut names: Vec<String> = fs::read_dir(dir)?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()?;
    names.sort();
    Ok(names)
}

/// `a, b, c and 4 more`.
fn list(names: &[String]) -> String {
    const SHOWN: usize = 5;
    let head = names.iter().take(SHOWN).cloned().collect::<Vec<_>>().join(", ");
    if names.len() > SHOWN { format!("{head} and {} more", names.len() - SHOWN) } else { head }
}

/// Whether `path` is a JSON object that carries [`VERSION_KEY`] (read through, not loaded whole).
fn is_marked(path: &Path) -> bool {
    #[derive(serde::Deserialize)]
    struct Marker {
        fistaprune_version: Option<serde::de::IgnoredAny>,
    }
    let Ok(f) = File::open(path) else { return false };
    serde_json::from_reader::<_, Marker>(std::io::BufReader::new(f)).is_ok_and(|m| m.fistaprune_version.is_some())
}

/// Entries of the output folder `dir` (relative names, below `prefix`) that fistaprune does not write.
fn foreign_entries(dir: &Path, prefix: &str) -> Vec<String> {
    let Ok(names) = entries(dir) else { return vec![format!("{prefix}(unreadable)")] };
    let mut foreign = Vec::new();
    for name in names {
        let path = dir.join(&name);
        let rel = format!("{prefix}{name}");
        let Ok(meta) = fs::symlink_metadata(&path) else { continue };
        if meta.is_file() && is_output_file(&name) {
            continue;
        }
        if meta.is_dir() {
            if name == "layers" {
                // A `prune --layers` part's finished layers.
                foreign.extend(
                    entries(&path)
                        .unwrap_or_default()
                        .into_iter()
                        .filter(|n| !is_layer_file(n))
                        .map(|n| format!("{rel}/{n}")),
                );
                continue;
            }
            // `compare` holds one output per method.
            if FOLDER_REPORTS.iter().any(|r| is_marked(&path.join(r))) {
                foreign.extend(foreign_entries(&path, &format!("{rel}/")));
                continue;
            }
        }
        foreign.push(rel);
    }
    foreign
}

/// The files fistaprune writes into an output folder.
fn is_output_file(name: &str) -> bool {
    const NAMES: [&str; 13] = [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors",
        "model.safetensors.index.json",
        "report.json",
        "report.md",
        "layers.svg",
        "compare.json",
        "compare.md",
        "layer_error.svg",
        "calib.json",
        "run.json",
    ];
    // Shards: model-00001-of-00004.safetensors.
    let shard = name
        .strip_prefix("model-")
        .and_then(|r| r.strip_suffix(".safetensors"))
        .and_then(|r| r.split_once("-of-"))
        .is_some_and(|(a, b)| digits(a, 5) && digits(b, 5));
    NAMES.contains(&name) || shard
}

/// `layer-00012.safetensors` / `layer-00012.json`.
fn is_layer_file(name: &str) -> bool {
    name.strip_prefix("layer-")
        .and_then(|r| r.strip_suffix(".safetensors").or_else(|| r.strip_suffix(".json")))
        .is_some_and(|d| digits(d, 5))
}

fn digits(s: &str, n: usize) -> bool {
    s.len() == n && s.bytes().all(|b| b.is_ascii_digit())
}

/// `.NAME.SUFFIX` beside `dest`.
fn beside(dest: &Path, suffix: &str) -> PathBuf {
    let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "out".into());
    dest.with_file_name(format!(".{name}.{suffix}"))
}

/// `flock` on `.NAME.lock` beside an output, holding the owner's process id for the message.
struct Lock {
    path: PathBuf,
    _file: File,
    /// Folders made to hold the lock, deepest first: removed again if the run leaves them empty.
    created: Vec<PathBuf>,
}

impl Lock {
    fn acquire(dest: &Path, shown: &str) -> Result<Self> {
        let parent = dest.parent().expect("checked: not the root");
        let created: Vec<PathBuf> = parent.ancestors().take_while(|a| !a.exists()).map(Path::to_path_buf).collect();
        fs::create_dir_all(parent).with_context(|| format!("{}: cannot create", parent.display()))?;
        let path = beside(dest, "lock");
        loop {
            let mut file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .with_context(|| format!("{}: cannot create the lock", path.display()))?;
            match file.try_lock() {
                Ok(()) => {}
                Err(fs::TryLockError::WouldBlock) => {
                    let owner = fs::read_to_string(&path).ok().filter(|s| !s.trim().is_empty());
                    let who = owner.map(|p| format!(" (process {})", p.trim())).unwrap_or_default();
                    bail!("{shown}: another fistaprune run{who} is writing it now (lock {})", path.display());
                }
                Err(fs::TryLockError::Error(e)) => {
                    return Err(e).with_context(|| format!("{}: cannot lock", path.display()));
                }
            }
            // A run that finished between our open and our lock has removed the file we hold: take the new one.
            let same = |a: &fs::Metadata, b: &fs::Metadata| {
                use std::os::unix::fs::MetadataExt;
                a.dev() == b.dev() && a.ino() == b.ino()
            };
            if fs::metadata(&path).is_ok_and(|m| file.metadata().is_ok_and(|f| same(&f, &m))) {
                file.set_len(0)?;
                write!(file, "{}", std::process::id())?;
                return Ok(Self { path, _file: file, created });
            }
        }
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        // Removed while still held, so that no other run can have locked this file meanwhile.
        fs::remove_file(&self.path).ok();
        for d in &self.created {
            // Only an empty folder goes.
            fs::remove_dir(d).ok();
        }
    }
}

/// A folder written aside (`.NAME.partial` beside its claimed destination) and renamed into place when
/// complete, so that the destination is either absent, the old contents, or the whole new contents.
pub struct AtomicDir {
    pub tmp: PathBuf,
    claim: Claim,
    committed: bool,
    /// A resumed folder holds an earlier run's work: a failure now (flags that disagree with it) keeps it.
    keep: bool,
}

impl AtomicDir {
    /// A fresh folder aside; what a killed run of the same output left there is cleared (the claim's lock
    /// says that no run is using it).
    pub fn new(claim: Claim) -> Result<Self> {
        Ok(Self::aside(claim, false, true)?.0)
    }

    /// Like [`AtomicDir::new`], but what a killed run (SIGINT, SIGTERM, `kill -9`: nothing removes it then)
    /// left aside can be continued: with `resume` it is kept and the second value is true; without, it is
    /// refused, or cleared with `--force`. (A run that fails with an error removes it, unless it was resuming:
    /// that work stays for a corrected `--resume`.)
    pub fn resumable(claim: Claim, resume: bool) -> Result<(Self, bool)> {
        Self::aside(claim, resume, false)
    }

    fn aside(claim: Claim, resume: bool, clear: bool) -> Result<(Self, bool)> {
        ensure!(claim.kind == Kind::Folder, "{}: not claimed as a folder", claim.shown);
        let tmp = beside(&claim.path, "partial");
        let leftover = fs::symlink_metadata(&tmp).is_ok();
        let resumed = leftover && resume;
        if leftover && !resume {
            ensure!(
                clear || claim.force,
                "{}: an interrupted run left its finished layers here; --resume continues it, --force starts over",
                tmp.display()
            );
            fs::remove_dir_all(&tmp).with_context(|| format!("{}: cannot remove", tmp.display()))?;
        }
        fs::create_dir_all(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
        Ok((Self { tmp, claim, committed: false, keep: resumed }, resumed))
    }

    /// Leave the folder in place when this value is dropped uncommitted: it holds work a later run continues.
    pub fn keep(&mut self) {
        self.keep = true;
    }

    /// Write the folder's `report.json`, marked as ours ([`marked`]).
    pub fn write_report(&self, report: &Value) -> Result<()> {
        write_atomic(&self.tmp.join("report.json"), serde_json::to_string_pretty(&marked(report.clone()))?.as_bytes())
    }

    /// Move the finished folder into place, replacing an earlier output (checked again: what stands there
    /// now may have changed since the claim), which is removed afterwards.
    pub fn commit(mut self) -> Result<()> {
        // Unmarked, a later --force could never replace it.
        ensure!(
            FOLDER_REPORTS.iter().any(|r| is_marked(&self.tmp.join(r))),
            "internal: {} carries no report marked {VERSION_KEY}",
            self.tmp.display()
        );
        let dest = self.claim.path.clone();
        if let Err(e) = check_existing("--out", &self.claim.shown, &dest, Kind::Folder, self.claim.force) {
            // Hours of work are not thrown away for that: they stay aside.
            self.keep = true;
            return Err(e.context(format!("the finished output is kept in {}", self.tmp.display())));
        }
        let old = beside(&dest, &format!("old-{}", std::process::id()));
        let had_old = dest.exists();
        if had_old {
            fs::rename(&dest, &old).with_context(|| format!("{}: cannot move aside", dest.display()))?;
        }
        fs::rename(&self.tmp, &dest).with_context(|| format!("{}: cannot rename into place", dest.display()))?;
        self.committed = true;
        if had_old {
            fs::remove_dir_all(&old).ok();
        }
        Ok(())
    }
}

impl Drop for AtomicDir {
    fn drop(&mut self) {
        if !self.committed && !self.keep {
            fs::remove_dir_all(&self.tmp).ok();
        }
    }
}

/// Write `contents` to `path` atomically (temporary file in the same folder, then rename).
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<()> {
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    fs::create_dir_all(parent).with_context(|| format!("{}: cannot create", parent.display()))?;
    let tmp = beside(path, &format!("tmp-{}", std::process::id()));
    fs::write(&tmp, contents).with_context(|| format!("{}: cannot write", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("{}: cannot rename into place", path.display()))?;
    Ok(())
}

/// Bytes free to an unprivileged writer on the filesystem holding `dir`.
pub fn free_bytes(dir: &Path) -> Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a properly sized, writable statvfs.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    ensure!(rc == 0, "{}: cannot read the free space ({})", dir.display(), std::io::Error::last_os_error());
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

/// Refuse to start when the filesystem of `dest` has less than `need` bytes free (or `assume_free`, when
/// given, instead of what the filesystem says).
pub fn check_free_space(dest: &Path, need: u64, assume_free: Option<u64>) -> Result<()> {
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
    let free = match assume_free {
        Some(f) => f,
        None => free_bytes(&probe)?,
    };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_follows_links_and_dots() {
        let d = std::env::temp_dir().join(format!("fp-resolve-{}", std::process::id()));
        fs::create_dir_all(d.join("a/b")).unwrap();
        let d = fs::canonicalize(&d).unwrap();
        std::os::unix::fs::symlink(d.join("a/b"), d.join("link")).unwrap();
        assert_eq!(resolve(&d.join("link/../b/./x/y")).unwrap(), d.join("a/b/x/y"));
        assert_eq!(resolve(&d.join("a/b/../../link")).unwrap(), d.join("a/b"));
        assert_eq!(resolve(&d.join("new/../a")).unwrap(), d.join("a"));
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn output_file_names() {
        for n in ["model-00001-of-00012.safetensors", "config.json", "report.json"] {
            assert!(is_output_file(n), "{n}");
        }
        for n in ["model-1-of-2.safetensors", "thesis.txt", "model-00001-of-00012.bin"] {
            assert!(!is_output_file(n), "{n}");
        }
        assert!(is_layer_file("layer-00003.json") && !is_layer_file("layer-3.json"));
    }
}
