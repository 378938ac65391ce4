//! Refactors change no pruned byte: the sha256 of `model.safetensors` pruned from the real SmolLM2 at 8 × 128
//! calibration tokens, for every method at 50 % and 2:4 and FISTAPruner's other walks, against the digests
//! recorded before the refactor (tests/reference/digests.json).
//!
//! The kernels' summation order depends on the instruction set the machine offers (AVX-512 or not), so the
//! digests are kept per CPU class; `FISTAPRUNE_RECORD_DIGESTS=1` records this machine's class (do it on the
//! commit before a change, never after). SparseGPT at 50 % is checked by `smollm2.rs`'s kill test, which prunes
//! it anyway.

mod common;

use std::collections::BTreeMap;

use common::*;

/// FISTAPruner with fewer iterations than its defaults (every code path, a seventh of the time).
const FISTA: &[&str] = &["--method", "fista", "--iters", "2", "--rounds", "2", "--refit-iters", "2"];

/// (tag, flags) of every run; `sparsegpt-50` is the kill test's (tests/smollm2.rs).
fn runs() -> Vec<(&'static str, Vec<&'static str>)> {
    let with = |base: &[&'static str], more: &[&'static str]| base.iter().chain(more).copied().collect::<Vec<_>>();
    vec![
        ("magnitude-50", vec!["--method", "magnitude", "--sparsity", "0.5"]),
        ("magnitude-2:4", vec!["--method", "magnitude", "--pattern", "2:4"]),
        ("wanda-50", vec!["--method", "wanda", "--sparsity", "0.5"]),
        ("wanda-2:4", vec!["--method", "wanda", "--pattern", "2:4"]),
        ("sparsegpt-2:4", vec!["--method", "sparsegpt", "--pattern", "2:4"]),
        ("fista-50", with(FISTA, &["--sparsity", "0.5"])),
        ("fista-2:4", with(FISTA, &["--pattern", "2:4"])),
        ("fista-50-corrected", with(FISTA, &["--sparsity", "0.5", "--layer-inputs", "corrected"])),
        ("fista-50-dense-jobs2", with(FISTA, &["--sparsity", "0.5", "--layer-inputs", "dense", "--jobs", "2"])),
    ]
}

fn reference_path() -> std::path::PathBuf {
    root().join("tests/reference/digests.json")
}

#[test]
fn pruned_checkpoints_keep_their_recorded_bytes() {
    let class = cpu_class();
    let mut file: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(reference_path()).unwrap()).unwrap();
    let record = std::env::var("FISTAPRUNE_RECORD_DIGESTS").is_ok_and(|v| v == "1");
    let recorded: BTreeMap<String, String> =
        serde_json::from_value(file["digests"][&class].clone()).unwrap_or_default();
    assert!(
        record || !recorded.is_empty(),
        "no digests are recorded for this CPU class ({class}): record them with FISTAPRUNE_RECORD_DIGESTS=1 on the commit before a change"
    );
    let d = tmpdir("digests");
    let mut got = BTreeMap::new();
    let mut differ = Vec::new();
    let mut all = runs();
    if record {
        all.push(("sparsegpt-50", vec!["--method", "sparsegpt", "--sparsity", "0.5"]));
    }
    for (tag, flags) in all {
        let sha = prune_digest(&d, tag, &flags);
        eprintln!("{tag}: {sha}");
        if !record && recorded.get(tag) != Some(&sha) {
            differ.push(format!("{tag}: {sha}, recorded {:?}", recorded.get(tag)));
        }
        got.insert(tag.to_string(), sha);
    }
    if record {
        let mut all = recorded.clone();
        all.extend(got);
        file["digests"][&class] = serde_json::to_value(all).unwrap();
        std::fs::write(reference_path(), serde_json::to_string_pretty(&file).unwrap() + "\n").unwrap();
    }
    assert!(differ.is_empty(), "pruned bytes moved:\n{}", differ.join("\n"));
}

/// The sha256 of `model.safetensors` pruned from SmolLM2 with `flags` (8 × 128 C4 calibration, seed 0, 2 threads).
fn prune_digest(d: &std::path::Path, tag: &str, flags: &[&str]) -> String {
    let out = d.join(tag.replace(':', "-"));
    let c4 = shared("c4/c4-train.00000-of-01024.first1000.jsonl");
    let model = smollm2();
    let mut args = vec![
        "--threads",
        "2",
        "prune",
        "--model",
        model.to_str().unwrap(),
        "--calib",
        c4.to_str().unwrap(),
        "--nsamples",
        "8",
        "--seqlen",
        "128",
        "--quiet",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(flags);
    let (ok, _, err) = run(&args);
    assert!(ok, "{tag}: {err}");
    let sha = file_sha256(&out.join("model.safetensors"));
    std::fs::remove_dir_all(&out).unwrap();
    sha
}
