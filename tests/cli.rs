//! The command line end to end: eval against a transformers reference, convert, inspect, and bad input.

mod common;

use std::path::{Path, PathBuf};

use common::*;

fn wikitext() -> PathBuf {
    shared("wikitext-2-raw/wiki.test.raw")
}

/// A failing command: non-zero exit, no panic, and stderr naming each of `needles`.
fn assert_clean_failure(args: &[&str], needles: &[&str]) {
    let (ok, _out, err) = run(args);
    assert!(!ok, "expected failure for {args:?}");
    assert!(!err.contains("panicked"), "panic for {args:?}: {err}");
    for n in needles {
        assert!(err.contains(n), "stderr for {args:?} should mention {n:?}: {err}");
    }
}

#[test]
fn eval_matches_transformers_perplexity_on_wikitext() {
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("eval_reference.json")).unwrap()).unwrap();
    let want = reference["perplexity"].as_f64().unwrap();
    let tmp = tmpdir("eval");
    let out = tmp.join("ppl.json");
    let (ok, _, err) = run(&[
        "eval",
        "--model",
        fixture("llama").to_str().unwrap(),
        "--dataset",
        wikitext().to_str().unwrap(),
        "--seqlen",
        "64",
        "--max-windows",
        "8",
        "--batch",
        "3",
        "--json",
        out.to_str().unwrap(),
        "--quiet",
    ]);
    assert!(ok, "{err}");
    let j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let got = j["perplexity"].as_f64().unwrap();
    assert!((got / want - 1.0).abs() < 1e-5, "perplexity {got} vs transformers {want}");
    assert_eq!(j["windows"], 8);
    assert_eq!(j["tokens"], 8 * 64);
    assert_eq!(j["format"], "wikitext");
    assert!(j["seconds"].as_f64().unwrap() > 0.0);
}

#[test]
fn tokenize_matches_transformers_tokenizer_json() {
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("eval_reference.json")).unwrap()).unwrap();
    let tmp = tmpdir("tok");
    let out = tmp.join("ids.json");
    let (ok, _, err) = run(&[
        "tokenize",
        "--model",
        fixture("llama").to_str().unwrap(),
        "--dataset",
        wikitext().to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let ids = j["ids"].as_array().unwrap();
    assert_eq!(ids.len() as u64, reference["tokens_total"].as_u64().unwrap());
    assert_eq!(&ids[..32], reference["first_ids"].as_array().unwrap().as_slice());
}

#[test]
fn inspect_reports_architecture_and_counts() {
    let (ok, out, err) = run(&["inspect", "--model", fixture("llama").to_str().unwrap(), "--json"]);
    assert!(ok, "{err}");
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["architecture"], "llama");
    // 2 layers × (q 32×32 + k 16×32 + v 16×32 + o 32×32 + 3 × 64×32) linear weights.
    assert_eq!(j["prunable_linear_parameters"], 2 * (1024 + 512 + 512 + 1024 + 3 * 2048));
    let (ok, out, _) = run(&["inspect", "--model", fixture("llama_gguf/tiny.gguf").to_str().unwrap(), "--json"]);
    assert!(ok);
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["format"], "gguf");
    let q = j["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "model.layers.0.self_attn.q_proj.weight")
        .unwrap();
    assert_eq!(q["dtype"], "Q8_0");
    assert_eq!(q["shape"], serde_json::json!([32, 32]));
}

#[test]
fn convert_gguf_round_trips_through_fistaprune() {
    let dir = tmpdir("convert");
    let out = dir.join("hf");
    let gguf = fixture("llama_gguf/tiny.gguf");
    let (ok, _, err) = run(&["convert", "--model", gguf.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(ok, "{err}");
    for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    // An existing output is refused without --force, and left alone.
    assert_clean_failure(
        &["convert", "--model", gguf.to_str().unwrap(), "--out", out.to_str().unwrap()],
        &["already exists", "--force"],
    );
    let (ok, _, err) = run(&[
        "convert",
        "--model",
        gguf.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--force",
        "--dtype",
        "bf16",
        "--max-shard-gb",
        "0.00003",
    ]);
    assert!(ok, "{err}");
    assert!(out.join("model.safetensors.index.json").exists(), "expected shards");
    // Same logits as the GGUF (bf16 rounding aside).
    let refs = load_st(&fixture("llama_gguf/reference.safetensors"));
    let ids = refs["input_ids"].to_dtype(candle_core::DType::U32).unwrap();
    let ck = fistaprune::model::Checkpoint::open(&out).unwrap();
    let logits = fistaprune::model::forward_logits(ck.model().unwrap().as_ref(), &ids).unwrap();
    let (max_rel, _) = rel_errors(&logits, &refs["logits"]);
    assert!(max_rel < 3e-2, "bf16 conversion drifted: {max_rel}");
    // No partial directories left beside the output.
    let leftovers: Vec<_> = std::fs::read_dir(&dir).unwrap().filter_map(|e| e.ok()).map(|e| e.file_name()).collect();
    assert_eq!(leftovers.len(), 1, "{leftovers:?}");
}

fn eval_args<'a>(model: &'a str, dataset: &'a str) -> Vec<&'a str> {
    vec!["eval", "--model", model, "--dataset", dataset, "--seqlen", "16", "--max-windows", "1", "--quiet"]
}

#[test]
fn missing_files_are_named() {
    let w = wikitext();
    assert_clean_failure(
        &eval_args("/nonexistent/model", w.to_str().unwrap()),
        &["/nonexistent/model", "no such file"],
    );
    let m = fixture("llama");
    assert_clean_failure(&eval_args(m.to_str().unwrap(), "/nonexistent/data.txt"), &["/nonexistent/data.txt"]);
    let d = tmpdir("nodir");
    assert_clean_failure(&eval_args(d.to_str().unwrap(), w.to_str().unwrap()), &["config.json"]);
}

#[test]
fn truncated_safetensors_is_refused() {
    let tmp = tmpdir("trunc-st");
    let d = tmp.join("m");
    copy_dir(&fixture("llama"), &d);
    let f = d.join("model.safetensors");
    let len = std::fs::metadata(&f).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&f).unwrap().set_len(len - 100).unwrap();
    let w = wikitext();
    assert_clean_failure(&eval_args(d.to_str().unwrap(), w.to_str().unwrap()), &["model.safetensors", "truncated"]);
}

#[test]
fn safetensors_header_that_lies_about_sizes_is_refused() {
    let d = tmpdir("lie-st");
    let m = edit_safetensors_header(&d, |h| h["model.norm.weight"]["shape"] = serde_json::json!([64]));
    let w = wikitext();
    assert_clean_failure(&eval_args(m.to_str().unwrap(), w.to_str().unwrap()), &["model.safetensors", "header"]);
}

/// The llama fixture's safetensors in `d/m` with its header JSON changed by `edit` (data unchanged).
fn edit_safetensors_header(d: &Path, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let m = d.join("m");
    copy_dir(&fixture("llama"), &m);
    let f = m.join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    edit(&mut header);
    let h = serde_json::to_vec(&header).unwrap();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(&f, out).unwrap();
    m
}

#[test]
fn corrupted_safetensors_header_is_refused() {
    let tmp = tmpdir("corrupt-st");
    let d = tmp.join("m");
    copy_dir(&fixture("llama"), &d);
    let f = d.join("model.safetensors");
    let mut bytes = std::fs::read(&f).unwrap();
    // Bytes of the JSON header overwritten (a disk or transfer error): not JSON any more.
    bytes[9..40].fill(0xff);
    std::fs::write(&f, &bytes).unwrap();
    let w = wikitext();
    assert_clean_failure(&eval_args(d.to_str().unwrap(), w.to_str().unwrap()), &["model.safetensors", "header"]);
}

#[test]
fn unsupported_dtype_is_refused() {
    let d = tmpdir("dtype-st");
    // Same byte size, so the file itself is consistent: only the dtype is one we do not compute with.
    let m = edit_safetensors_header(&d, |h| h["model.layers.0.mlp.up_proj.weight"]["dtype"] = serde_json::json!("I32"));
    let w = wikitext();
    assert_clean_failure(
        &eval_args(m.to_str().unwrap(), w.to_str().unwrap()),
        &["model.safetensors", "model.layers.0.mlp.up_proj.weight", "I32", "only F32, F16 and BF16"],
    );
}

#[test]
fn config_that_disagrees_with_weights_is_refused() {
    let tmp = tmpdir("cfg");
    let d = tmp.join("m");
    copy_dir(&fixture("llama"), &d);
    let p = d.join("config.json");
    let mut c: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    c["intermediate_size"] = serde_json::json!(96);
    std::fs::write(&p, c.to_string()).unwrap();
    let w = wikitext();
    assert_clean_failure(&eval_args(d.to_str().unwrap(), w.to_str().unwrap()), &["disagrees", "mlp.gate_proj.weight"]);
}

/// A model without decoder layers is refused by name before any work, not walked into an underflow.
#[test]
fn a_model_with_no_layers_is_refused() {
    let tmp = tmpdir("nolayers");
    let d = tmp.join("m");
    copy_dir(&fixture("llama"), &d);
    let p = d.join("config.json");
    let mut c: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    c["num_hidden_layers"] = serde_json::json!(0);
    std::fs::write(&p, c.to_string()).unwrap();
    let out = d.with_file_name("out");
    let c4 = shared("c4/c4-train.00000-of-01024.first1000.jsonl");
    assert_clean_failure(
        &[
            "prune",
            "--model",
            d.to_str().unwrap(),
            "--method",
            "wanda",
            "--sparsity",
            "0.5",
            "--calib",
            c4.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
        &["the model has no decoder layers"],
    );
    assert!(!out.exists());
}

#[test]
fn unsupported_architecture_is_refused() {
    let tmp = tmpdir("arch");
    let d = tmp.join("m");
    copy_dir(&fixture("llama"), &d);
    let p = d.join("config.json");
    let mut c: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    c["model_type"] = serde_json::json!("gpt_neox");
    std::fs::write(&p, c.to_string()).unwrap();
    let w = wikitext();
    assert_clean_failure(
        &eval_args(d.to_str().unwrap(), w.to_str().unwrap()),
        &["config.json", "unsupported architecture", "gpt_neox"],
    );
}

/// A GGUF file with the given KV pairs (all strings) and tensor infos (name, dims, type, offset), no data
/// unless `data_len` bytes of zeros are appended.
fn tiny_gguf(
    kv: &[(&str, &str)],
    tensors: &[(&str, &[u64], u32, u64)],
    data_len: usize,
    n_tensors_claimed: Option<u64>,
) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(n_tensors_claimed.unwrap_or(tensors.len() as u64).to_le_bytes());
    b.extend((kv.len() as u64).to_le_bytes());
    let s = |b: &mut Vec<u8>, x: &str| {
        b.extend((x.len() as u64).to_le_bytes());
        b.extend(x.as_bytes());
    };
    for (k, v) in kv {
        s(&mut b, k);
        b.extend(8u32.to_le_bytes());
        s(&mut b, v);
    }
    for (name, dims, ty, off) in tensors {
        s(&mut b, name);
        b.extend((dims.len() as u32).to_le_bytes());
        for d in *dims {
            b.extend(d.to_le_bytes());
        }
        b.extend(ty.to_le_bytes());
        b.extend(off.to_le_bytes());
    }
    while !b.len().is_multiple_of(32) {
        b.push(0);
    }
    b.extend(vec![0u8; data_len]);
    b
}

#[test]
fn gguf_bad_headers_are_refused() {
    let d = tmpdir("gguf");
    let w = wikitext();
    let w = w.to_str().unwrap();
    let cases: Vec<(&str, Vec<u8>, Vec<&str>)> = vec![
        ("magic.gguf", b"GGML-not-really".to_vec(), vec!["bad magic"]),
        ("counts.gguf", tiny_gguf(&[], &[], 0, Some(u64::MAX / 2)), vec!["more than the file can hold"]),
        (
            "offset.gguf",
            tiny_gguf(&[("general.architecture", "llama")], &[("token_embd.weight", &[64, 8], 0, 1 << 40)], 64, None),
            vec!["token_embd.weight", "the header lies"],
        ),
        (
            "iq2.gguf",
            tiny_gguf(&[("general.architecture", "llama")], &[("token_embd.weight", &[256, 8], 16, 0)], 4096, None),
            vec!["unsupported quantisation IQ2_XXS"],
        ),
        (
            "arch.gguf",
            tiny_gguf(&[("general.architecture", "mamba")], &[("token_embd.weight", &[32, 8], 0, 0)], 1024, None),
            vec!["unsupported GGUF architecture \"mamba\""],
        ),
    ];
    for (name, bytes, needles) in cases {
        let p = d.join(name);
        std::fs::write(&p, bytes).unwrap();
        let mut n = vec![p.to_str().unwrap()];
        n.extend(needles);
        assert_clean_failure(&eval_args(p.to_str().unwrap(), w), &n);
    }
    // A real file cut short.
    let real = std::fs::read(fixture("llama_gguf/tiny.gguf")).unwrap();
    let p = d.join("cut.gguf");
    std::fs::write(&p, &real[..real.len() / 2]).unwrap();
    assert_clean_failure(&eval_args(p.to_str().unwrap(), w), &["cut.gguf", "truncated"]);
    std::fs::write(&p, &real[..100]).unwrap();
    assert_clean_failure(&eval_args(p.to_str().unwrap(), w), &["cut.gguf", "truncated"]);
}

#[test]
fn text_shorter_than_one_window_is_refused() {
    let d = tmpdir("short");
    let t = d.join("short.txt");
    std::fs::write(&t, "just a few words").unwrap();
    let m = fixture("llama");
    let args = ["eval", "--model", m.to_str().unwrap(), "--dataset", t.to_str().unwrap(), "--seqlen", "64", "--quiet"];
    assert_clean_failure(&args, &["short.txt", "shorter than one window of 64"]);
    std::fs::write(&t, "").unwrap();
    assert_clean_failure(&args, &["short.txt", "no text"]);
}

#[test]
fn seqlen_above_context_is_refused() {
    let m = fixture("llama");
    let w = wikitext();
    let args =
        ["eval", "--model", m.to_str().unwrap(), "--dataset", w.to_str().unwrap(), "--seqlen", "4096", "--quiet"];
    assert_clean_failure(&args, &["--seqlen 4096", "128"]);
}

#[test]
fn hub_ids_resolve_through_the_hugging_face_cache() {
    let d = tmpdir("hub");
    let snap = d.join("hub/models--some-org--tiny-llama/snapshots/0123abcd");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(d.join("hub/models--some-org--tiny-llama/refs")).unwrap();
    std::fs::write(d.join("hub/models--some-org--tiny-llama/refs/main"), "0123abcd").unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(fixture("llama").join(f), snap.join(f)).unwrap();
    }
    let go = |model: &str| {
        let r = std::process::Command::new(bin())
            .args(["inspect", "--model", model])
            .env("HF_HOME", &d)
            .env_remove("HF_HUB_CACHE")
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap();
        (
            r.status.success(),
            String::from_utf8_lossy(&r.stdout).into_owned(),
            String::from_utf8_lossy(&r.stderr).into_owned(),
        )
    };
    let (ok, out, err) = go("some-org/tiny-llama");
    assert!(ok, "{err}");
    assert!(out.contains("llama"), "{out}");
    // Offline with nothing cached: a clear message naming the model and the cache.
    let (ok, _, err) = go("some-org/absent-model");
    assert!(
        !ok && err.contains("some-org/absent-model: not in the Hugging Face cache") && err.contains("HF_HUB_OFFLINE"),
        "{err}"
    );
    assert!(err.contains(&d.join("hub").display().to_string()), "{err}");
}

#[test]
fn rust_log_turns_on_per_layer_logs() {
    let d = tmpdir("log");
    let go = |out: &str, log: Option<&str>| {
        let mut c = std::process::Command::new(bin());
        c.args([
            "prune",
            "--model",
            fixture("llama").to_str().unwrap(),
            "--method",
            "magnitude",
            "--sparsity",
            "0.5",
            "--quiet",
            "--out",
            d.join(out).to_str().unwrap(),
        ]);
        match log {
            Some(l) => c.env("RUST_LOG", l),
            None => c.env_remove("RUST_LOG"),
        };
        let r = c.output().unwrap();
        assert!(r.status.success());
        String::from_utf8_lossy(&r.stderr).into_owned()
    };
    let err = go("a", Some("fistaprune=debug"));
    assert!(err.contains("layer 1:") && err.contains("layer 1 down_proj: sparsity 0.5000"), "{err}");
    assert!(!go("b", None).contains("layer 1:"), "logs without RUST_LOG");
}
