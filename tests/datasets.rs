//! Datasets by name (`--dataset wikitext2|c4|ptb`, `--calib c4|...`): read from a Hugging Face cache laid out
//! as the hub's files are (tests/fixtures/datasets_hub, written by scripts/reference/dataset_fixtures.py from
//! the start of ../shared/data), they give the same token ids and calibration as the same text as local files;
//! offline with nothing cached, a clear message; a local file of the same name wins.

mod common;

use std::path::Path;

use common::*;

/// Run the binary with the fixture cache, offline.
fn run_hub(cache: &Path, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(bin())
        .args(args)
        .env("HF_HUB_CACHE", cache)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .expect("run fistaprune");
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// The ids `tokenize` writes for `dataset`.
fn ids(dataset: &str, out: &Path) -> Vec<u64> {
    let model = fixture("llama");
    let args = ["tokenize", "--model", model.to_str().unwrap(), "--dataset", dataset, "--out", out.to_str().unwrap()];
    let (ok, err) = run_hub(&fixture("datasets_hub/hub"), &args);
    assert!(ok, "{dataset}: {err}");
    let j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out).unwrap()).unwrap();
    j["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect()
}

#[test]
fn named_datasets_read_as_the_local_files() {
    let d = tmpdir("datasets-named");
    let local = fixture("datasets_hub/local");
    for (name, file) in [("wikitext2", "wiki.test.raw"), ("ptb", "ptb.test.txt"), ("c4", "c4.jsonl")] {
        let named = ids(name, &d.join(format!("{name}.json")));
        let file_ids = ids(local.join(file).to_str().unwrap(), &d.join(format!("{name}-local.json")));
        assert!(named.len() > 1000, "{name}: {} ids", named.len());
        assert_eq!(named, file_ids, "{name}: the hub's rows and the local file differ");
    }
}

#[test]
fn named_calibration_draws_the_local_files_samples() {
    let d = tmpdir("datasets-calib");
    let model = fixture("llama");
    let sha = |calib: &str, tag: &str| {
        let out = d.join(tag);
        let saved = d.join(format!("{tag}.json"));
        let args = [
            "prune",
            "--model",
            model.to_str().unwrap(),
            "--method",
            "wanda",
            "--sparsity",
            "0.5",
            "--calib",
            calib,
            "--nsamples",
            "4",
            "--seqlen",
            "32",
            "--save-calib",
            saved.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--quiet",
        ];
        let (ok, err) = run_hub(&fixture("datasets_hub/hub"), &args);
        assert!(ok, "{calib}: {err}");
        let j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&saved).unwrap()).unwrap();
        j["sha256"].as_str().unwrap().to_string()
    };
    let local = fixture("datasets_hub/local/c4.jsonl");
    assert_eq!(sha("c4", "named"), sha(local.to_str().unwrap(), "local"));
    // WikiText-2 by name calibrates on its train split: a file of its own in the cache.
    sha("wikitext2", "wiki");
}

#[test]
fn named_datasets_offline_and_uncached_say_so() {
    let d = tmpdir("datasets-offline");
    let model = fixture("llama");
    let empty = d.join("empty-cache");
    std::fs::create_dir_all(&empty).unwrap();
    let out = d.join("ids.json");
    let args = ["tokenize", "--model", model.to_str().unwrap(), "--dataset", "ptb", "--out", out.to_str().unwrap()];
    let (ok, err) = run_hub(&empty, &args);
    assert!(!ok, "no cache, offline: must fail");
    for needle in ["dataset ptb", "ptb-text-only/ptb_text_only", "HF_HUB_OFFLINE is set", "pass the file's path"] {
        assert!(err.contains(needle), "missing {needle:?}: {err}");
    }
    assert!(!out.exists());
    // A local file named like a dataset is the file, not the dataset (run where `c4` is a PTB file).
    std::fs::copy(fixture("datasets_hub/local/ptb.test.txt"), d.join("c4")).unwrap();
    let args =
        ["tokenize", "--model", model.to_str().unwrap(), "--dataset", "c4", "--format", "ptb", "--out", "ids.json"];
    let st = std::process::Command::new(bin()).args(args).current_dir(&d).env("HF_HUB_CACHE", &empty).output().unwrap();
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
    let local = ids(fixture("datasets_hub/local/ptb.test.txt").to_str().unwrap(), &d.join("ptb-local.json"));
    let j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(d.join("ids.json")).unwrap()).unwrap();
    let got: Vec<u64> = j["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    assert_eq!(got, local);
}
