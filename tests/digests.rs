//! Refactors change no pruned byte: the sha256 of `model.safetensors` pruned from the real SmolLM2 at 8 × 128
//! calibration tokens, for every method at 50 % and 2:4 and FISTAPruner's other walks, against the digests
//! recorded before issue 13's refactor (tests/reference/digests.json), by the binary of that commit (FISTAPruner's
//! again in issue 16, whose change of its numerics and defaults was deliberate).
//!
//! The kernels' summation order depends on the instruction set the machine offers (AVX-512 or not) and on the
//! thread count, so the digests are kept per CPU class, for one thread per run (two runs at a time); one
//! calibration file, drawn once, serves every run. On a class nothing is recorded for, the test says so and
//! checks what holds on any machine (`--jobs 2` gives `--jobs 1`'s bytes). `FISTAPRUNE_RECORD_DIGESTS=1` records this machine's class
//! with the binary `FISTAPRUNE_DIGEST_BIN` (default: this build) — the binary of the commit before a change,
//! never after. SparseGPT at 50 % on two threads is checked by `smollm2.rs`'s kill test, which prunes it anyway.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use common::*;

/// FISTAPruner with fewer iterations than its defaults (every code path, a seventh of the time).
const FISTA: &[&str] =
    &["--method", "fista", "--iters", "2", "--rounds", "2", "--refit-iters", "2", "--swap-refit-iters", "2"];

/// (tag, flags) of every run, longest first. The walks other than the default start from Wanda, which is
/// quick; the default walk starts from SparseGPT, as FISTAPruner does by default.
fn with(base: &[&'static str], more: &[&'static str]) -> Vec<&'static str> {
    base.iter().chain(more).copied().collect()
}

fn runs() -> Vec<(&'static str, Vec<&'static str>)> {
    vec![
        ("fista-50", with(FISTA, &["--sparsity", "0.5"])),
        ("fista-2:4", with(FISTA, &["--pattern", "2:4"])),
        (
            "fista-50-corrected",
            with(FISTA, &["--sparsity", "0.5", "--layer-inputs", "corrected", "--warm-start", "wanda"]),
        ),
        (
            "fista-50-dense-jobs2",
            with(FISTA, &["--sparsity", "0.5", "--layer-inputs", "dense", "--jobs", "2", "--warm-start", "wanda"]),
        ),
        ("sparsegpt-2:4", vec!["--method", "sparsegpt", "--pattern", "2:4"]),
        ("wanda-50", vec!["--method", "wanda", "--sparsity", "0.5"]),
        ("wanda-2:4", vec!["--method", "wanda", "--pattern", "2:4"]),
        ("magnitude-50", vec!["--method", "magnitude", "--sparsity", "0.5"]),
        ("magnitude-2:4", vec!["--method", "magnitude", "--pattern", "2:4"]),
    ]
}

fn reference_path() -> PathBuf {
    root().join("tests/reference/digests.json")
}

#[test]
fn pruned_checkpoints_keep_their_recorded_bytes() {
    let class = cpu_class();
    let mut file: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(reference_path()).unwrap()).unwrap();
    let record = std::env::var("FISTAPRUNE_RECORD_DIGESTS").is_ok_and(|v| v == "1");
    let binary = std::env::var_os("FISTAPRUNE_DIGEST_BIN").map(PathBuf::from).unwrap_or_else(bin);
    let recorded: BTreeMap<String, String> =
        serde_json::from_value(file["digests"][&class].clone()).unwrap_or_default();
    // On a CPU class nothing was recorded for, what does not depend on the class is checked instead: the
    // parallel dense walk gives the sequential one's bytes.
    let unrecorded = !record && recorded.is_empty();
    if unrecorded {
        eprintln!(
            "no digests are recorded for this CPU class ({class}): checking only that --jobs 2 gives --jobs 1's bytes \
             (record them with FISTAPRUNE_RECORD_DIGESTS=1 on the commit before a change)"
        );
    }
    let d = tmpdir("digests");
    // The calibration ids, drawn once (C4 sample, seed 0).
    let calib = d.join("calib.json");
    let c4 = shared("c4/c4-train.00000-of-01024.first1000.jsonl");
    let (s, c) = (calib.to_str().unwrap(), c4.to_str().unwrap());
    prune_digest(
        &binary,
        &d,
        "calibration",
        &["--method", "magnitude", "--sparsity", "0.5", "--calib", c, "--save-calib", s],
    );
    // Two lanes of one thread each.
    let mut all = runs();
    if unrecorded {
        let jobs1 = with(FISTA, &["--sparsity", "0.5", "--layer-inputs", "dense", "--warm-start", "wanda"]);
        all.insert(0, ("fista-50-dense", jobs1));
    }
    let queue = Mutex::new(all.into_iter().rev().collect::<Vec<_>>());
    let got = Mutex::new(BTreeMap::new());
    std::thread::scope(|scope| {
        for _ in 0..2 {
            scope.spawn(|| {
                loop {
                    // (The guard must go before the run, or the lanes take turns.)
                    let next = queue.lock().unwrap().pop();
                    let Some((tag, flags)) = next else { break };
                    let flags: Vec<&str> = flags.iter().copied().chain(["--calib", s]).collect();
                    let sha = prune_digest(&binary, &d, tag, &flags);
                    eprintln!("{tag}: {sha}");
                    got.lock().unwrap().insert(tag.to_string(), sha);
                }
            });
        }
    });
    let got = got.into_inner().unwrap();
    if record {
        let mut all = recorded.clone();
        all.extend(got.clone());
        file["digests"][&class] = serde_json::to_value(all).unwrap();
        std::fs::write(reference_path(), serde_json::to_string_pretty(&file).unwrap() + "\n").unwrap();
        return;
    }
    if unrecorded {
        assert_eq!(got["fista-50-dense-jobs2"], got["fista-50-dense"], "--jobs 2 changed the bytes of the dense walk");
        return;
    }
    let differ: Vec<String> = got
        .iter()
        .filter(|(tag, sha)| recorded.get(*tag) != Some(sha))
        .map(|(tag, sha)| format!("{tag}: {sha}, recorded {:?}", recorded.get(tag)))
        .collect();
    assert!(differ.is_empty(), "pruned bytes moved:\n{}", differ.join("\n"));
}

/// The sha256 of `model.safetensors` pruned from SmolLM2 by `binary` with `flags` (8 × 128 tokens, one thread).
fn prune_digest(binary: &Path, d: &Path, tag: &str, flags: &[&str]) -> String {
    let out = d.join(tag.replace(':', "-"));
    let model = smollm2();
    let mut args = vec![
        "--threads",
        "1",
        "prune",
        "--model",
        model.to_str().unwrap(),
        "--nsamples",
        "8",
        "--seqlen",
        "128",
        "--quiet",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(flags);
    let r = std::process::Command::new(binary).args(&args).output().unwrap();
    assert!(r.status.success(), "{tag}: {}", String::from_utf8_lossy(&r.stderr));
    let sha = file_sha256(&out.join("model.safetensors"));
    std::fs::remove_dir_all(&out).unwrap();
    sha
}
