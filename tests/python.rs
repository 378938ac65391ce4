//! `convert` output checked by Python transformers: it loads, gives the same logits, and its tokenizer gives
//! our ids. Runs when a Python with transformers is found (`FISTAPRUNE_PYTHON`, else `.venv/bin/python`,
//! else `python3`); with `FISTAPRUNE_REQUIRE_PYTHON=1` (as CI sets) a missing Python is a failure.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

fn python() -> Option<PathBuf> {
    let candidates: Vec<PathBuf> = match std::env::var_os("FISTAPRUNE_PYTHON") {
        Some(p) => vec![PathBuf::from(p)],
        None => vec![root().join(".venv/bin/python"), PathBuf::from("python3")],
    };
    for p in candidates {
        let ok = Command::new(&p)
            .args(["-c", "import transformers, torch, gguf, safetensors"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if ok {
            return Some(p);
        }
    }
    if std::env::var("FISTAPRUNE_REQUIRE_PYTHON").is_ok_and(|v| v == "1") {
        panic!("FISTAPRUNE_REQUIRE_PYTHON=1 but no Python with transformers, torch, gguf and safetensors was found");
    }
    eprintln!("SKIPPED: no Python with transformers found (set FISTAPRUNE_REQUIRE_PYTHON=1 to make this fail)");
    None
}

fn check(py: &Path, args: &[&str]) -> serde_json::Value {
    let out = Command::new(py).arg(root().join("tests/python/check_convert.py")).args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "check_convert.py {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

fn convert(model: &Path, out: &Path) {
    let (ok, _, err) = run(&["convert", "--model", model.to_str().unwrap(), "--out", out.to_str().unwrap(), "--force"]);
    assert!(ok, "{err}");
}

#[test]
fn converted_tiny_gguf_loads_in_transformers_with_same_logits_and_ids() {
    let Some(py) = python() else { return };
    let tmp = tmpdir("py-tiny");
    let out = tmp.join("hf");
    convert(&fixture("llama_gguf/tiny.gguf"), &out);
    let sample = "Valkyria Chronicles III, released in 2011 for 1,234 yen.";
    let j = check(
        &py,
        &[
            "--hf",
            out.to_str().unwrap(),
            "--reference",
            fixture("llama_gguf/reference.safetensors").to_str().unwrap(),
            "--sample",
            sample,
        ],
    );
    eprintln!("{j}");
    let ck = fistaprune::model::Checkpoint::open(&fixture("llama_gguf/tiny.gguf")).unwrap();
    let ours = ck.tokenizer().unwrap().encode(sample, true).unwrap();
    let theirs: Vec<u32> = j["sample_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    assert_eq!(ours, theirs);
}

#[test]
fn converted_smollm2_loads_in_transformers_with_same_logits_and_ids() {
    let Some(py) = python() else { return };
    let gguf = smollm2();
    let tmp = tmpdir("py-smollm2");
    let out = tmp.join("hf");
    convert(&gguf, &out);
    // Digits are single pre-tokens in SmolLM2's tokenizer.json; transformers' GGUF loader would merge them.
    let sample = "In 1998, the 2,048 soldiers of the 47th regiment marched 12.5 km.";
    let j = check(&py, &["--hf", out.to_str().unwrap(), "--gguf", gguf.to_str().unwrap(), "--sample", sample]);
    eprintln!("{j}");
    let ck = fistaprune::model::Checkpoint::open(&gguf).unwrap();
    let ours = ck.tokenizer().unwrap().encode(sample, true).unwrap();
    let theirs: Vec<u32> = j["sample_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    assert_eq!(ours, theirs);
    let tok = ck.tokenizer().unwrap();
    let digits: Vec<String> = ours
        .iter()
        .map(|&i| tok.decode(&[i]).unwrap())
        .filter(|s| s.trim().chars().all(|c| c.is_ascii_digit()) && !s.trim().is_empty())
        .collect();
    assert!(digits.iter().all(|s| s.trim().len() == 1), "digits not split one by one: {digits:?}");
}

#[test]
fn pruned_checkpoints_reload_in_transformers_with_same_perplexity_and_sparsity() {
    let Some(py) = python() else { return };
    let d = tmpdir("py-pruned");
    let wiki = shared("wikitext-2-raw/wiki.test.raw");
    let c4 = shared("c4/c4-train.00000-of-01024.first1000.jsonl");
    for (model, method, target) in [
        ("llama", "sparsegpt", "--sparsity"),
        ("opt", "wanda", "--pattern"),
        ("llama_bf16_sharded", "sparsegpt", "--pattern"),
        ("qwen3", "wanda", "--sparsity"),
        ("mistral", "sparsegpt", "--sparsity"),
        ("gemma3", "fista", "--pattern"),
    ] {
        let out = d.join(format!("{model}-{method}"));
        let value = if target == "--sparsity" { "0.6" } else { "2:4" };
        let (ok, _, err) = run(&[
            "prune",
            "--model",
            fixture(model).to_str().unwrap(),
            "--method",
            method,
            target,
            value,
            "--calib",
            c4.to_str().unwrap(),
            "--nsamples",
            "8",
            "--seqlen",
            "32",
            "--out",
            out.to_str().unwrap(),
            "--eval",
            wiki.to_str().unwrap(),
            "--eval-seqlen",
            "64",
            "--eval-max-windows",
            "4",
            "--quiet",
        ]);
        assert!(ok, "{err}");
        let report: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
        let ids = d.join("ids.json");
        // Each model's ids replace the previous one's (an earlier output of fistaprune: --force).
        let (ok, _, err) = run(&[
            "tokenize",
            "--model",
            out.to_str().unwrap(),
            "--dataset",
            wiki.to_str().unwrap(),
            "--out",
            ids.to_str().unwrap(),
            "--force",
        ]);
        assert!(ok, "{err}");
        let o = Command::new(&py)
            .arg(root().join("tests/python/check_pruned.py"))
            .args(["--hf", out.to_str().unwrap(), "--ids", ids.to_str().unwrap(), "--seqlen", "64", "--windows", "4"])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let j: serde_json::Value =
            serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().last().unwrap()).unwrap();
        let (ours, theirs) = (report["perplexity_after"].as_f64().unwrap(), j["perplexity"].as_f64().unwrap());
        // bf16 storage: both read the same rounded weights.
        assert!((ours / theirs - 1.0).abs() < 1e-4, "{model} {method}: fistaprune {ours} vs transformers {theirs}");
        assert!(
            (report["sparsity"].as_f64().unwrap() - j["sparsity"].as_f64().unwrap()).abs() < 1e-9,
            "{model}: sparsity {} vs {}",
            report["sparsity"],
            j["sparsity"]
        );
    }
}
