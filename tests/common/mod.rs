//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixture(name: &str) -> PathBuf {
    root().join("tests").join("fixtures").join(name)
}

/// `../shared/data/...` beside the checkout.
pub fn shared(rel: &str) -> PathBuf {
    root().join("..").join("shared").join("data").join(rel)
}

/// The demo model, fetched by `scripts/fetch-assets.sh`. Tests that need it fail (not skip) without it.
pub fn smollm2() -> PathBuf {
    asset("SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// Gemma-3-270M (base), Q4_K_M GGUF, fetched by `scripts/fetch-assets.sh`.
pub fn gemma3() -> PathBuf {
    asset("gemma-3-270m-q4_k_m.gguf")
}

fn asset(name: &str) -> PathBuf {
    let p =
        std::env::var_os("FISTAPRUNE_ASSETS").map(PathBuf::from).unwrap_or_else(|| root().join("assets")).join(name);
    assert!(p.exists(), "{} is missing: run scripts/fetch-assets.sh first", p.display());
    p
}

pub fn load_st(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// (max |a − b| / max |b|, ‖a − b‖ / ‖b‖).
pub fn rel_errors(a: &Tensor, b: &Tensor) -> (f64, f64) {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let a: Vec<f32> = a.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = b.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let maxb = b.iter().fold(0f64, |m, &x| m.max((x as f64).abs()));
    let maxd = a.iter().zip(&b).fold(0f64, |m, (&x, &y)| m.max((x as f64 - y as f64).abs()));
    let nd: f64 = a.iter().zip(&b).map(|(&x, &y)| (x as f64 - y as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|&y| (y as f64).powi(2)).sum::<f64>().sqrt();
    (maxd / maxb, nd / nb)
}

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_fistaprune"))
}

/// Run the binary; returns (success, stdout, stderr).
pub fn run(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(bin()).args(args).output().expect("run fistaprune");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Copy the files of `src` (not recursive) into `dst`, created.
pub fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}

/// A fresh scratch folder for one test, removed when the guard drops. The pruning tests write whole models
/// (a resumed SmolLM2 run leaves 1 GB), so leaving them behind fills a CI disk within a few runs.
/// `FISTAPRUNE_KEEP_TMP=1` keeps them for inspection.
pub struct TmpDir(PathBuf);

impl std::ops::Deref for TmpDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for TmpDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<std::ffi::OsStr> for TmpDir {
    fn as_ref(&self) -> &std::ffi::OsStr {
        self.0.as_os_str()
    }
}

impl Drop for TmpDir {
    fn drop(&mut self) {
        if std::env::var_os("FISTAPRUNE_KEEP_TMP").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

pub fn tmpdir(name: &str) -> TmpDir {
    let d = std::env::temp_dir().join(format!("fistaprune-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    TmpDir(d)
}

/// The instruction-set class the matrix kernels dispatch on at run time: their summation order, hence the exact
/// bytes of a pruned checkpoint, follow it.
pub fn cpu_class() -> String {
    // For trying the tests on a class with no recorded digests.
    if let Ok(c) = std::env::var("FISTAPRUNE_CPU_CLASS") {
        return c;
    }
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return "x86_64-avx512".into();
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            return "x86_64-avx2".into();
        }
    }
    std::env::consts::ARCH.into()
}

pub fn file_sha256(path: &Path) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    let mut f = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = std::io::Read::read(&mut f, &mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// The digest recorded in tests/reference/digests.json for run `tag` on this CPU class.
pub fn recorded_digest(tag: &str) -> Option<String> {
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("tests/reference/digests.json")).ok()?).ok()?;
    j["digests"][cpu_class()][tag].as_str().map(str::to_string)
}

/// Runs the binary with `args` and `--progress json`, and kills it (SIGKILL) as soon as the `layer` event of
/// decoder layer `k` appears on its stderr: a real kill, at a known point, with no hook in the binary. Returns
/// whether it was killed; false when the run ended first (it could finish its last layers before the kill
/// landed), so that a caller can try again.
pub fn kill_after_layer(args: &[&str], k: usize) -> bool {
    use std::io::BufRead;
    use std::os::unix::process::ExitStatusExt;
    let mut child = std::process::Command::new(bin())
        .args(args)
        .args(["--progress", "json"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run fistaprune");
    let lines = std::io::BufReader::new(child.stderr.take().expect("piped")).lines();
    for line in lines {
        let v: serde_json::Value = serde_json::from_str(&line.expect("stderr")).unwrap_or_default();
        if v["event"] == "layer" && v["layer"] == k {
            child.kill().expect("kill");
            break;
        }
    }
    let status = child.wait().expect("wait");
    assert!(status.signal() == Some(9) || status.success(), "the run failed before layer {k}: {status}");
    status.signal() == Some(9)
}

/// `fistaprune tokenize` of every reference file in `tokens` (path under ../shared/data → its `format`,
/// `count` and `sha256_u32le`, the sha256 of the ids as little-endian u32) with `model`: the same count and
/// ids as the reference, named `against` in messages.
#[allow(dead_code)] // not every test binary uses it
pub fn check_token_ids(model: &Path, tokens: &serde_json::Value, against: &str) {
    use sha2::{Digest, Sha256};
    let d = tmpdir("token-ids");
    for (i, (rel, want)) in tokens.as_object().unwrap().iter().enumerate() {
        let out = d.join(format!("ids-{i}.json"));
        let n = fistaprune::commands::tokenize(&fistaprune::commands::Tokenize {
            model: model.to_path_buf(),
            dataset: shared(rel),
            format: Some(serde_json::from_value(want["format"].clone()).unwrap()),
            out: out.clone(),
            force: Default::default(),
        })
        .unwrap();
        let j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
        let bytes: Vec<u8> =
            j["ids"].as_array().unwrap().iter().flat_map(|v| (v.as_u64().unwrap() as u32).to_le_bytes()).collect();
        let sha: String = Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(n as u64, want["count"].as_u64().unwrap(), "{rel}: token count");
        assert_eq!(sha, want["sha256_u32le"].as_str().unwrap(), "{rel}: ids differ from {against}");
    }
}

/// Rows of the matrix `name` read alone (how a vocabulary matrix is looked up and written without being
/// whole in memory) equal the same rows of the whole tensor, and a lookup through [`VocabMatrix`] equals
/// `index_select` on the whole; an id outside the vocabulary is an error that says so.
pub fn check_rows_read_alone(model: &Path, name: &str) {
    use fistaprune::model::{Checkpoint, VocabMatrix};
    let ck = Checkpoint::open(model).unwrap();
    let whole = ck.weights.load(name).unwrap();
    let (v, h) = whole.dims2().unwrap();
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for r in [0..1, v / 3..v / 3 + 5, v - 3..v, v..v] {
        let got = ck.weights.load_rows(name, r.clone()).unwrap();
        assert_eq!(got.dims(), [r.len(), h], "{name} rows {r:?}");
        assert!(flat(&got) == flat(&whole.narrow(0, r.start, r.len()).unwrap()), "{name} rows {r:?} differ");
    }
    assert!(ck.weights.load_rows(name, v - 1..v + 1).is_err(), "rows past the end must be refused");
    let mut ids: Vec<u32> = (0..2000u64).map(|k| ((k * 7919 + 13) % v as u64) as u32).collect();
    ids.extend([0, v as u32 - 1, 0]);
    let ids = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap();
    let m = VocabMatrix::new(&ck.weights, name, [v, h]).unwrap();
    assert!(flat(&m.rows(&ids).unwrap()) == flat(&whole.index_select(&ids, 0).unwrap()), "{name}: lookup differs");
    let bad = m.rows(&Tensor::new(&[v as u32], &Device::Cpu).unwrap()).unwrap_err().to_string();
    assert!(bad.contains("outside the vocabulary"), "{bad}");
}
