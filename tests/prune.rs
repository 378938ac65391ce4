//! `fistaprune prune` end to end on the small fixtures: patterns met exactly on the written checkpoint,
//! reports, determinism, saved calibration, bad input.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use fistaprune::model::Checkpoint;

fn c4() -> String {
    shared("c4/c4-train.00000-of-01024.first1000.jsonl").to_str().unwrap().to_string()
}

fn prune(model: &str, out: &Path, extra: &[&str]) -> serde_json::Value {
    let c4 = c4();
    let mut args = vec![
        "prune",
        "--model",
        model,
        "--calib",
        &c4,
        "--nsamples",
        "8",
        "--seqlen",
        "32",
        "--out",
        out.to_str().unwrap(),
        "--quiet",
    ];
    args.extend_from_slice(extra);
    let (ok, _, err) = run(&args);
    assert!(ok, "prune {extra:?} failed: {err}");
    serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap()
}

/// Every prunable operator of the written checkpoint: (name, weight as rows).
fn operators(dir: &Path) -> Vec<(String, Vec<Vec<f32>>)> {
    let ck = Checkpoint::open(dir).unwrap();
    let m = ck.model().unwrap();
    let mut v = Vec::new();
    for i in 0..m.num_layers() {
        let l = m.load_layer(i).unwrap();
        for n in l.linear_names() {
            v.push((format!("{i}.{n}"), l.linear(n).unwrap().weight.to_vec2::<f32>().unwrap()));
        }
    }
    v
}

/// `fistaprune merge` of the parts in `dir` named `parts` into `dir/out`: (succeeded, stderr).
fn merge(model: &Path, dir: &Path, parts: &[&str], out: &str) -> (bool, String) {
    let model = model.to_str().unwrap().to_string();
    let paths: Vec<String> = parts.iter().map(|p| dir.join(p).to_str().unwrap().to_string()).collect();
    let out = dir.join(out).to_str().unwrap().to_string();
    let mut args = vec!["merge", "--model", &model, "--parts"];
    args.extend(paths.iter().map(String::as_str));
    args.extend(["--out", &out]);
    let (ok, _, err) = run(&args);
    (ok, err)
}

#[test]
fn sparsegpt_unstructured_on_llama_meets_target_and_reports() {
    let d = tmpdir("p-sgpt");
    let out = d.join("out");
    let wt = shared("wikitext-2-raw/wiki.test.raw");
    let r = prune(
        fixture("llama").to_str().unwrap(),
        &out,
        &[
            "--method",
            "sparsegpt",
            "--sparsity",
            "0.6",
            "--eval",
            wt.to_str().unwrap(),
            "--eval-seqlen",
            "64",
            "--eval-max-windows",
            "4",
        ],
    );
    assert!((r["sparsity"].as_f64().unwrap() - 0.6).abs() < 0.01, "{}", r["sparsity"]);
    let before = r["perplexity_before"].as_f64().unwrap();
    let after = r["perplexity_after"].as_f64().unwrap();
    assert!(before.is_finite() && after.is_finite() && after > 0.0);
    assert_eq!(r["layers"].as_array().unwrap().len(), 2);
    let op = &r["layers"][0]["operators"][0];
    assert_eq!(op["name"], "q_proj");
    // The OBS update must not do worse than the bare mask.
    for l in r["layers"].as_array().unwrap() {
        for o in l["operators"].as_array().unwrap() {
            assert!(o["rel_error"].as_f64().unwrap() <= o["rel_error_mask_only"].as_f64().unwrap() * 1.0001, "{o}");
        }
    }
    // The written weights: 60 % zeros per operator (SparseGPT rounds per 128-column block).
    for (name, w) in operators(&out) {
        let n = w.len() * w[0].len();
        let z = w.iter().flatten().filter(|&&x| x == 0.0).count();
        assert!((z as f64 / n as f64 - 0.6).abs() < 0.01, "{name}: {z}/{n}");
    }
    // The Markdown summary and the per-layer plot beside report.json.
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    let s = format!("{:.4}", r["sparsity"].as_f64().unwrap());
    assert!(md.contains(&format!("| sparsity (measured) | {s} |")) && md.contains(&format!("| 1 | {s} |")), "{md}");
    assert!(md.contains(&format!("{before:.3} → {after:.3}")), "{md}");
    let svg = std::fs::read_to_string(out.join("layers.svg")).unwrap();
    assert!(svg.contains("<svg") && svg.contains("layer output error") && svg.contains("sparsity"));
    // Embeddings and norms untouched.
    let a = Checkpoint::open(&fixture("llama")).unwrap();
    let b = Checkpoint::open(&out).unwrap();
    for name in ["model.embed_tokens.weight", "model.layers.1.input_layernorm.weight", "lm_head.weight"] {
        assert_eq!(
            a.weights.load(name).unwrap().to_vec2::<f32>().ok(),
            b.weights.load(name).unwrap().to_vec2::<f32>().ok(),
            "{name}"
        );
    }
}

#[test]
fn two_four_and_four_eight_hold_in_every_group() {
    for (model, method, pat) in
        [("opt", "wanda", "2:4"), ("llama", "sparsegpt", "4:8"), ("qwen2_f16", "magnitude", "2:4")]
    {
        let d = tmpdir(&format!("p-nm-{model}"));
        let out = d.join("out");
        let r = prune(fixture(model).to_str().unwrap(), &out, &["--method", method, "--pattern", pat]);
        let (n, m): (usize, usize) = {
            let (a, b) = pat.split_once(':').unwrap();
            (a.parse().unwrap(), b.parse().unwrap())
        };
        assert!(
            (r["sparsity"].as_f64().unwrap() - n as f64 / m as f64).abs() < 1e-9,
            "{model} {method} {pat}: {}",
            r["sparsity"]
        );
        for (name, w) in operators(&out) {
            for row in &w {
                for g in row.chunks(m) {
                    assert!(g.iter().filter(|&&x| x == 0.0).count() >= n, "{model} {method} {name}: group {g:?}");
                }
            }
        }
    }
}

#[test]
fn wanda_per_row_and_magnitude_per_matrix_counts() {
    let d = tmpdir("p-counts");
    let out = d.join("w");
    prune(fixture("llama").to_str().unwrap(), &out, &["--method", "wanda", "--sparsity", "0.5"]);
    for (name, w) in operators(&out) {
        for row in &w {
            assert_eq!(row.iter().filter(|&&x| x == 0.0).count(), row.len() / 2, "{name}");
        }
    }
    let out = d.join("m");
    let (ok, _, err) = run(&[
        "prune",
        "--model",
        fixture("llama").to_str().unwrap(),
        "--method",
        "magnitude",
        "--sparsity",
        "0.3",
        "--out",
        out.to_str().unwrap(),
        "--quiet",
    ]);
    assert!(ok, "magnitude needs no calibration: {err}");
    for (name, w) in operators(&out) {
        let n = w.len() * w[0].len();
        assert_eq!(w.iter().flatten().filter(|&&x| x == 0.0).count(), (n as f64 * 0.3).round() as usize, "{name}");
    }
}

/// `--matmul-dtype bf16` runs the calibration passes in bf16: layer 0's q, k and v read the embeddings (no
/// product yet), so they come out as in f32; the other operators' statistics move a little, so their weights
/// do, their masks hardly; the report records the type.
#[test]
fn bf16_calibration_passes_move_the_statistics_a_little() {
    let d = tmpdir("p-matmul");
    let (f32_out, bf16_out) = (d.join("f32"), d.join("bf16"));
    let model = fixture("llama");
    let args = ["--method", "sparsegpt", "--sparsity", "0.5"];
    prune(model.to_str().unwrap(), &f32_out, &args);
    let r = prune(model.to_str().unwrap(), &bf16_out, &[&args[..], &["--matmul-dtype", "bf16"]].concat());
    assert_eq!(r["options"]["walk"]["matmul_dtype"], "bf16", "{}", r["options"]);
    let (a, b) = (operators(&f32_out), operators(&bf16_out));
    let (mut same_mask, mut all, mut moved, mut compared) = (0usize, 0usize, 0usize, 0usize);
    for ((name, wa), (_, wb)) in a.iter().zip(&b) {
        let (xa, xb): (Vec<f32>, Vec<f32>) = (wa.concat(), wb.concat());
        if ["0.q_proj", "0.k_proj", "0.v_proj"].contains(&name.as_str()) {
            assert_eq!(xa, xb, "{name}: its inputs hold no product yet");
            continue;
        }
        same_mask += xa.iter().zip(&xb).filter(|(x, y)| (**x == 0.0) == (**y == 0.0)).count();
        all += xa.len();
        moved += usize::from(xa != xb);
        compared += 1;
    }
    assert_eq!(moved, compared, "operators whose weights did not move: the passes did not all run in bf16");
    let agree = same_mask as f64 / all as f64;
    assert!(agree > 0.95, "the masks agree on only {agree}");
}

/// Every way the walk loads its layers multiplies in the asked type: with dense layer inputs in bf16, two
/// workers, and two parts merged (layer 1's inputs then made by a pass through layer 0 alone), give the bytes of
/// one worker over all layers, which are not f32's.
#[test]
fn bf16_passes_reach_every_layer_the_walk_loads() {
    let d = tmpdir("p-matmul-walks");
    let model = fixture("llama");
    let args = ["--method", "sparsegpt", "--sparsity", "0.5", "--layer-inputs", "dense", "--matmul-dtype", "bf16"];
    let go = |name: &str, extra: &[&str]| {
        prune(model.to_str().unwrap(), &d.join(name), &[&args[..], extra].concat());
    };
    go("one", &[]);
    go("two", &["--jobs", "2"]);
    go("part-a", &["--layers", "0-0"]);
    go("part-b", &["--layers", "1-1"]);
    let (ok, err) = merge(&model, &d, &["part-a", "part-b"], "merged");
    assert!(ok, "{err}");
    prune(model.to_str().unwrap(), &d.join("f32"), &args[..6]);
    let one = operators(&d.join("one"));
    assert!(operators(&d.join("two")) == one, "--jobs 2 differs from --jobs 1 under bf16 passes");
    assert!(operators(&d.join("merged")) == one, "the merged parts differ from the whole walk under bf16 passes");
    assert!(operators(&d.join("f32")) != one, "bf16 passes gave f32's checkpoint");
}

#[test]
fn saved_calibration_reproduces_the_checkpoint_byte_for_byte() {
    let d = tmpdir("p-calib");
    let calib = d.join("calib.json");
    let a = prune(
        fixture("llama").to_str().unwrap(),
        &d.join("a"),
        &["--method", "sparsegpt", "--sparsity", "0.5", "--save-calib", calib.to_str().unwrap(), "--seed", "3"],
    );
    let c4 = c4();
    let (ok, _, err) = run(&[
        "prune",
        "--model",
        fixture("llama").to_str().unwrap(),
        "--calib",
        calib.to_str().unwrap(),
        "--nsamples",
        "8",
        "--seqlen",
        "32",
        "--out",
        d.join("b").to_str().unwrap(),
        "--quiet",
        "--method",
        "sparsegpt",
        "--sparsity",
        "0.5",
    ]);
    assert!(ok, "{err}");
    let b: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("b/report.json")).unwrap()).unwrap();
    assert_eq!(a["calibration"]["sha256"], b["calibration"]["sha256"]);
    assert!(
        std::fs::read(d.join("a/model.safetensors")).unwrap() == std::fs::read(d.join("b/model.safetensors")).unwrap(),
        "checkpoints differ"
    );
    // A saved file sets the sample count and length itself.
    let (ok, _, err) = run(&[
        "prune",
        "--model",
        fixture("llama").to_str().unwrap(),
        "--calib",
        calib.to_str().unwrap(),
        "--out",
        d.join("e").to_str().unwrap(),
        "--quiet",
        "--method",
        "sparsegpt",
        "--sparsity",
        "0.5",
    ]);
    assert!(ok, "{err}");
    assert!(
        std::fs::read(d.join("a/model.safetensors")).unwrap() == std::fs::read(d.join("e/model.safetensors")).unwrap(),
        "checkpoints differ"
    );
    let (ok, _, err) = run(&[
        "prune",
        "--model",
        fixture("llama").to_str().unwrap(),
        "--calib",
        calib.to_str().unwrap(),
        "--seqlen",
        "16",
        "--out",
        d.join("f").to_str().unwrap(),
        "--quiet",
        "--method",
        "sparsegpt",
        "--sparsity",
        "0.5",
    ]);
    assert!(!ok && err.contains("holds 8 x 32 samples, but --nsamples 8 --seqlen 16"), "{err}");
    assert!(!d.join("f").exists());
    // Magnitude needs no calibration but still saves it when asked (to share it with later runs).
    let calib2 = d.join("calib2.json");
    prune(
        fixture("llama").to_str().unwrap(),
        &d.join("g"),
        &["--method", "magnitude", "--sparsity", "0.5", "--save-calib", calib2.to_str().unwrap(), "--seed", "3"],
    );
    assert_eq!(std::fs::read(&calib).unwrap(), std::fs::read(&calib2).unwrap(), "the same draw");
    // Another seed draws other samples.
    let c = prune(
        fixture("llama").to_str().unwrap(),
        &d.join("c"),
        &["--method", "wanda", "--sparsity", "0.5", "--seed", "4"],
    );
    assert_ne!(a["calibration"]["sha256"], c["calibration"]["sha256"]);
    let _ = c4;
}

#[test]
fn bad_prune_arguments_are_refused_without_output() {
    let d = tmpdir("p-bad");
    let out = d.join("out");
    let m = fixture("llama");
    let c4 = c4();
    let base = [
        "prune",
        "--model",
        m.to_str().unwrap(),
        "--calib",
        &c4,
        "--nsamples",
        "4",
        "--seqlen",
        "16",
        "--out",
        out.to_str().unwrap(),
        "--quiet",
    ];
    let cases: &[(&[&str], &[&str])] = &[
        (&["--method", "wanda", "--sparsity", "1.5"], &["--sparsity 1.5", "outside (0, 1)"]),
        (&["--method", "wanda", "--sparsity", "0"], &["outside (0, 1)"]),
        (&["--method", "wanda", "--pattern", "4:4"], &["--pattern 4:4", "N must be in 1..M"]),
        (&["--method", "wanda", "--pattern", "3:5"], &["3:5", "not a multiple of 5"]),
        (&["--method", "wanda", "--pattern", "two:four"], &["N is not a whole number"]),
    ];
    for (extra, needles) in cases {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        let (ok, _, err) = run(&args);
        assert!(!ok && !err.contains("panicked"), "{extra:?}: {err}");
        for n in *needles {
            assert!(err.contains(n), "{extra:?}: stderr should mention {n:?}: {err}");
        }
        assert!(!out.exists(), "{extra:?} left an output");
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 0, "{extra:?} left a partial directory");
    }
    let (ok, _, err) = run(&[
        "prune",
        "--model",
        m.to_str().unwrap(),
        "--method",
        "sparsegpt",
        "--sparsity",
        "0.5",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("--calib is required"), "{err}");
    let short = d.join("short.txt");
    std::fs::write(&short, "too short").unwrap();
    let (ok, _, err) = run(&[
        "prune",
        "--model",
        m.to_str().unwrap(),
        "--method",
        "wanda",
        "--sparsity",
        "0.5",
        "--calib",
        short.to_str().unwrap(),
        "--seqlen",
        "16",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("short.txt") && err.contains("not enough for one calibration window"), "{err}");
    std::fs::write(&short, "").unwrap();
    let (ok, _, err) = run(&[
        "prune",
        "--model",
        m.to_str().unwrap(),
        "--method",
        "wanda",
        "--sparsity",
        "0.5",
        "--calib",
        short.to_str().unwrap(),
        "--seqlen",
        "16",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("short.txt") && !err.contains("panicked"), "{err}");
    let (ok, _, err) = run(&[
        "prune",
        "--model",
        m.to_str().unwrap(),
        "--method",
        "wanda",
        "--sparsity",
        "0.5",
        "--calib",
        &c4,
        "--seqlen",
        "4096",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("--seqlen 4096"), "{err}");
    assert!(!out.exists());
}

/// The pruned walk makes each layer's outputs from what error correction holds, unless holding it would take
/// over half the free memory; then it runs the layer again. Both must give the same bytes.
#[test]
fn fista_is_byte_identical_whatever_the_free_memory() {
    let d = tmpdir("p-fista-mem");
    let m = fixture("llama");
    let c4 = c4();
    let go = |out: &str, available_mb: Option<&str>| -> (Vec<u8>, String) {
        let o = d.join(out);
        let mut cmd = std::process::Command::new(bin());
        cmd.args(["prune", "--model", m.to_str().unwrap(), "--method", "fista", "--pattern", "2:4"])
            .args(["--calib", &c4, "--nsamples", "8", "--seqlen", "32", "--quiet", "--swap-rounds", "1"])
            .args(["--out", o.to_str().unwrap()])
            .env("RUST_LOG", "info")
            .env_remove("FISTAPRUNE_AVAILABLE_MB");
        if let Some(mb) = available_mb {
            cmd.env("FISTAPRUNE_AVAILABLE_MB", mb);
        }
        let out = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{err}");
        (std::fs::read(o.join("model.safetensors")).unwrap(), err)
    };
    let again = "running the layer again";
    let (held, log_held) = go("held", Some("100000"));
    let (rerun, log_rerun) = go("rerun", Some("0"));
    assert!(!log_held.contains(again), "{log_held}");
    assert!(log_rerun.contains(again), "the low-memory path was not taken: {log_rerun}");
    assert!(held == rerun, "the outputs made from held inputs differ from a second run of the layer");
}

#[test]
fn fista_is_byte_identical_whatever_the_parallelism() {
    let d = tmpdir("p-fista-par");
    let m = fixture("llama");
    let c4 = c4();
    let base = [
        "prune",
        "--model",
        m.to_str().unwrap(),
        "--method",
        "fista",
        "--pattern",
        "2:4",
        "--calib",
        &c4,
        "--nsamples",
        "8",
        "--seqlen",
        "32",
        "--quiet",
        "--refit-iters",
        "5",
        "--layer-inputs",
        "dense",
    ];
    let go = |out: &str, extra: &[&str]| {
        let mut args = base.to_vec();
        let o = d.join(out);
        let os = o.to_str().unwrap().to_string();
        args.extend_from_slice(&["--out", &os]);
        args.extend_from_slice(extra);
        let (ok, _, err) = run(&args);
        assert!(ok, "{extra:?}: {err}");
    };
    go("one", &[]);
    go("two", &["--jobs", "2"]);
    go("threads1", &["--threads", "1"]);
    go("part-b", &["--layers", "1-1"]);
    go("part-a", &["--layers", "0-0"]);
    let merged = d.join("merged");
    let (ok, err) = merge(&m, &d, &["part-b", "part-a"], "merged");
    assert!(ok, "{err}");
    let one = std::fs::read(d.join("one/model.safetensors")).unwrap();
    for other in ["two", "threads1", "merged"] {
        assert!(
            std::fs::read(d.join(other).join("model.safetensors")).unwrap() == one,
            "{other} differs from the --jobs 1 run"
        );
    }
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(merged.join("report.json")).unwrap()).unwrap();
    assert_eq!(r["layers"].as_array().unwrap().len(), 2);
    assert!((r["sparsity"].as_f64().unwrap() - 0.5).abs() < 0.01, "{}", r["sparsity"]);
    // Parts that overlap, miss a layer, or disagree are refused.
    let (ok, err) = merge(&m, &d, &["part-a"], "bad1");
    assert!(!ok && err.contains("no part holds decoder layer 1"), "{err}");
    let (ok, err) = merge(&m, &d, &["part-a", "part-a", "part-b"], "bad2");
    assert!(!ok && err.contains("layer 0 is in both"), "{err}");
    go("part-b-other", &["--layers", "1-1", "--xi", "0.5"]);
    let (ok, err) = merge(&m, &d, &["part-a", "part-b-other"], "bad3");
    assert!(!ok && err.contains("other options or calibration"), "{err}");
    assert!(!d.join("bad1").exists() && !d.join("bad2").exists() && !d.join("bad3").exists());
}

#[test]
fn fista_is_never_worse_than_its_warm_start_and_reports_its_search() {
    let d = tmpdir("p-fista-warm");
    for warm in ["wanda", "sparsegpt", "magnitude", "dense"] {
        let out = d.join(warm);
        let r = prune(
            fixture("llama").to_str().unwrap(),
            &out,
            &["--method", "fista", "--sparsity", "0.5", "--warm-start", warm, "--refit-iters", "10", "--rounds", "3"],
        );
        assert_eq!(r["options"]["methods"]["fista"]["warm_start"], warm);
        for l in r["layers"].as_array().unwrap() {
            for o in l["operators"].as_array().unwrap() {
                let det = &o["details"];
                let (err, warm_err) = (det["error"].as_f64().unwrap(), det["warm_error"].as_f64().unwrap());
                assert!(err <= warm_err * (1.0 + 1e-9), "{warm} {}: {err} > warm start {warm_err}", o["name"]);
                assert!((o["rel_error"].as_f64().unwrap() - err).abs() <= 1e-6 * (1.0 + err), "{}", o["name"]);
                assert_eq!(det["rounds"].as_array().unwrap().len(), 3);
            }
        }
    }
    // Dense layer inputs with pruned-input-only options are refused.
    let (ok, _, err) = run(&[
        "prune",
        "--model",
        fixture("llama").to_str().unwrap(),
        "--method",
        "wanda",
        "--sparsity",
        "0.5",
        "--calib",
        &c4(),
        "--nsamples",
        "4",
        "--seqlen",
        "16",
        "--jobs",
        "2",
        "--out",
        d.join("x").to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("--jobs needs --layer-inputs dense"), "{err}");
    let (ok, _, err) = run(&[
        "prune",
        "--model",
        fixture("llama").to_str().unwrap(),
        "--method",
        "wanda",
        "--sparsity",
        "0.5",
        "--calib",
        &c4(),
        "--nsamples",
        "4",
        "--seqlen",
        "16",
        "--layers",
        "0-0",
        "--out",
        d.join("y").to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("--layers needs --layer-inputs dense"), "{err}");
}

#[test]
fn compare_writes_one_table_and_plot_for_all_methods_on_one_calibration() {
    let d = tmpdir("p-compare");
    let out = d.join("cmp");
    let (ok, stdout, err) = run(&[
        "compare",
        "--model",
        fixture("opt").to_str().unwrap(),
        "--methods",
        "wanda,sparsegpt,fista",
        "--pattern",
        "2:4",
        "--calib",
        &c4(),
        "--nsamples",
        "8",
        "--seqlen",
        "32",
        "--out",
        out.to_str().unwrap(),
        "--eval",
        shared("wikitext-2-raw/wiki.test.raw").to_str().unwrap(),
        "--eval-seqlen",
        "32",
        "--eval-max-windows",
        "4",
        "--quiet",
    ]);
    assert!(ok, "{err}");
    assert!(stdout.contains("| fista |"), "{stdout}");
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("compare.json")).unwrap()).unwrap();
    let results = j["results"].as_array().unwrap();
    assert_eq!(results.len(), 3);
    let sha = j["calibration_sha256"].as_str().unwrap();
    for r in results {
        let rep: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(Path::new(r["checkpoint"].as_str().unwrap()).join("report.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(rep["calibration"]["sha256"], sha, "every method saw the same calibration ids");
        assert!(r["perplexity"].as_f64().unwrap().is_finite());
        assert!(r["mean_layer_output_error"].as_f64().unwrap() > 0.0);
    }
    let svg = std::fs::read_to_string(out.join("layer_error.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("polyline") && svg.contains("fista"), "not a plot");
    assert!(std::fs::read_to_string(out.join("compare.md")).unwrap().contains("| sparsegpt |"));
}

/// The toy method that proves the registry (src/prune/random.rs, one line in METHODS): runs without calibration,
/// meets its pattern, is reproducible, and keeps less of the weights' mass than magnitude, which keeps the most.
#[test]
fn random_masks_need_no_calibration_and_keep_less_than_magnitude() {
    let d = tmpdir("p-random");
    let m = fixture("llama");
    let go = |out: &str, method: &str| {
        let o = d.join(out);
        let a = ["prune", "--model", m.to_str().unwrap(), "--method", method, "--pattern", "2:4", "--quiet", "--out"];
        let (ok, _, err) = run(&[&a[..], &[o.to_str().unwrap()]].concat());
        assert!(ok, "{method}: {err}");
        (
            serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(o.join("report.json")).unwrap())
                .unwrap(),
            o,
        )
    };
    let (r, a) = go("a", "random");
    assert_eq!(r["sparsity"], 0.5);
    assert!(r["calibration"].is_null());
    let (_, b) = go("b", "random");
    assert!(std::fs::read(a.join("model.safetensors")).unwrap() == std::fs::read(b.join("model.safetensors")).unwrap());
    let (_, mag) = go("m", "magnitude");
    let mass = |dir: &Path| -> Vec<f64> {
        operators(dir).iter().map(|(_, w)| w.iter().flatten().map(|x| x.abs() as f64).sum()).collect()
    };
    for (r, m) in mass(&a).iter().zip(mass(&mag)) {
        assert!(*r < m, "random keeps {r}, magnitude {m}");
    }
}

#[test]
fn corrected_layer_inputs_carry_two_streams_and_imply_error_correction() {
    let d = tmpdir("p-corrected");
    let m = fixture("llama");
    let flags = ["--method", "fista", "--pattern", "2:4", "--refit-iters", "5"];
    let c = prune(m.to_str().unwrap(), &d.join("c"), &[&flags[..], &["--layer-inputs", "corrected"]].concat());
    let p = prune(m.to_str().unwrap(), &d.join("p"), &[&flags[..], &["--layer-inputs", "pruned"]].concat());
    assert_eq!(c["options"]["walk"]["layer_inputs"], "corrected");
    assert_eq!(c["error_correction"], true);
    // Layer 0 sees the embeddings in both walks: the same problems (up to summation order).
    for (oc, op) in
        c["layers"][0]["operators"].as_array().unwrap().iter().zip(p["layers"][0]["operators"].as_array().unwrap())
    {
        let (ec, ep) = (oc["rel_error"].as_f64().unwrap(), op["rel_error"].as_f64().unwrap());
        assert!((ec - ep).abs() <= 1e-3 * ep.max(1e-6), "{}: {ec} vs {ep}", oc["name"]);
    }
    // From layer 1 on the targets differ (the dense model's activations against the pruned model's).
    let e1 = |r: &serde_json::Value| r["layers"][1]["operators"][0]["rel_error"].as_f64().unwrap();
    assert!((e1(&c) - e1(&p)).abs() > 1e-6 * e1(&p), "layer 1 saw the same target in both walks");
    let (ok, _, err) = run(&[
        "prune",
        "--model",
        m.to_str().unwrap(),
        "--method",
        "fista",
        "--pattern",
        "2:4",
        "--calib",
        &c4(),
        "--nsamples",
        "4",
        "--seqlen",
        "16",
        "--layer-inputs",
        "corrected",
        "--no-error-correction",
        "--out",
        d.join("x").to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("implies error correction"), "{err}");
    assert!(!d.join("x").exists());
}

#[test]
fn owl_spreads_the_sparsity_over_layers_with_the_same_mean() {
    let d = tmpdir("p-owl");
    let m = fixture("llama");
    let r = prune(
        m.to_str().unwrap(),
        &d.join("o"),
        &["--method", "sparsegpt", "--sparsity", "0.6", "--owl", "--owl-lambda", "0.1"],
    );
    let alloc = &r["allocation"];
    let s: Vec<f64> = alloc["layer_sparsity"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    let ratios: Vec<f64> = alloc["outlier_ratios"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    assert_eq!(s.len(), 2);
    assert!((s.iter().sum::<f64>() / 2.0 - 0.6).abs() < 1e-9, "{s:?}");
    // Two layers with different outlier ratios: the spread is the whole 2λ, the layer with more outliers sparser less.
    assert!(ratios[0] != ratios[1], "{ratios:?}");
    assert!(((s[0] - s[1]).abs() - 0.2).abs() < 1e-9, "{s:?}");
    assert_eq!(s[0] < s[1], ratios[0] > ratios[1]);
    // Each layer's operators meet that layer's target (SparseGPT rounds per 128-column block).
    for l in r["layers"].as_array().unwrap() {
        let want = s[l["layer"].as_u64().unwrap() as usize];
        for o in l["operators"].as_array().unwrap() {
            assert!((o["sparsity"].as_f64().unwrap() - want).abs() < 0.02, "{o} vs {want}");
        }
    }
    assert!((r["sparsity"].as_f64().unwrap() - 0.6).abs() < 0.01, "{}", r["sparsity"]);
    let (ok, _, err) = run(&[
        "prune",
        "--model",
        m.to_str().unwrap(),
        "--method",
        "wanda",
        "--pattern",
        "2:4",
        "--owl",
        "--calib",
        &c4(),
        "--nsamples",
        "4",
        "--seqlen",
        "16",
        "--out",
        d.join("x").to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("--owl allocates unstructured sparsity"), "{err}");
    assert!(!d.join("x").exists());
}

#[test]
fn resume_after_a_kill_gives_the_same_checkpoint_in_every_walk() {
    let d = tmpdir("p-resume");
    let m = fixture("llama");
    let c4 = c4();
    let input_before: Vec<(String, Vec<u8>)> = read_dir_bytes(&m);
    let walks: &[(&str, &[&str])] = &[
        ("sgpt-pruned", &["--method", "sparsegpt", "--sparsity", "0.5"]),
        (
            "fista-dense-jobs2",
            &["--method", "fista", "--pattern", "2:4", "--layer-inputs", "dense", "--jobs", "2", "--refit-iters", "5"],
        ),
        (
            "fista-corrected",
            &["--method", "fista", "--sparsity", "0.6", "--layer-inputs", "corrected", "--refit-iters", "5"],
        ),
    ];
    for (tag, flags) in walks {
        let args = |out: &str, extra: &[&str]| -> Vec<String> {
            let o = d.join(format!("{tag}-{out}"));
            let mut a = vec!["prune", "--model", m.to_str().unwrap(), "--calib", &c4, "--nsamples", "8"];
            a.extend_from_slice(&["--seqlen", "32", "--quiet", "--threads", "1", "--out", o.to_str().unwrap()]);
            a.extend_from_slice(flags);
            a.extend_from_slice(extra);
            a.into_iter().map(String::from).collect()
        };
        let go = |out: &str, extra: &[&str]| {
            let r = std::process::Command::new(bin()).args(args(out, extra)).output().unwrap();
            (r.status.success(), String::from_utf8_lossy(&r.stderr).into_owned(), d.join(format!("{tag}-{out}")))
        };
        let (ok, err, whole) = go("whole", &[]);
        assert!(ok, "{tag}: {err}");
        // Killed for real once layer 0 has landed (again, if a run outpaced the kill and finished).
        let cut = d.join(format!("{tag}-cut"));
        let killed = (0..10).any(|_| {
            let _ = std::fs::remove_dir_all(&cut);
            kill_after_layer(&args("cut", &[]).iter().map(String::as_str).collect::<Vec<_>>(), 0)
        });
        assert!(killed && !cut.exists(), "{tag}: the interrupted run should leave no output");
        let (ok, err, _) = go("cut", &["--resume"]);
        assert!(ok, "{tag}: {err}");
        let r: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(cut.join("report.json")).unwrap()).unwrap();
        assert!(r["resumed_layers"].as_u64().unwrap() >= 1, "{tag}: {}", r["resumed_layers"]);
        assert_eq!(r["layers"].as_array().unwrap().len(), 2, "{tag}: one report per layer");
        assert!(
            std::fs::read(whole.join("model.safetensors")).unwrap()
                == std::fs::read(cut.join("model.safetensors")).unwrap(),
            "{tag}: the resumed checkpoint differs"
        );
        // --resume with nothing to resume is a plain run.
        let (ok, err, _) = go("fresh", &["--resume"]);
        assert!(ok, "{tag}: {err}");
        // A finished output is never overwritten without --force, and is left as it was.
        let before = read_dir_bytes(&whole);
        let (ok, err, _) = go("whole", &[]);
        assert!(!ok && err.contains("already exists") && err.contains("--force"), "{tag}: {err}");
        assert!(read_dir_bytes(&whole) == before, "{tag}: a refused run changed the existing output");
    }
    assert!(read_dir_bytes(&m) == input_before, "the input model was modified");
    // Only the outputs are left: nothing aside.
    let left: Vec<String> = std::fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// `prune` options as the command line reads them.
fn parse_prune(args: &[&str]) -> fistaprune::commands::prune::Prune {
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        prune: fistaprune::commands::prune::Prune,
    }
    <Cli as clap::Parser>::try_parse_from(std::iter::once("prune").chain(args.iter().copied())).unwrap().prune
}

/// Every file of `dir` (not recursive) with its bytes, by name.
fn read_dir_bytes(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()))
        .collect();
    v.sort();
    v
}

/// A copy of the llama fixture in `d/model` whose F32 tensor `name` is changed by `edit`.
fn patched_llama(d: &Path, name: &str, edit: impl FnOnce(&mut [f32])) -> PathBuf {
    let model = d.join("model");
    copy_dir(&fixture("llama"), &model);
    let path = model.join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    assert_eq!(header[name]["dtype"], "F32");
    let [a, b] = [0, 1].map(|k| 8 + n + header[name]["data_offsets"][k].as_u64().unwrap() as usize);
    let mut values: Vec<f32> = bytes[a..b].chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    edit(&mut values);
    for (k, v) in values.iter().enumerate() {
        bytes[a + 4 * k..a + 4 * k + 4].copy_from_slice(&v.to_le_bytes());
    }
    std::fs::write(&path, bytes).unwrap();
    model
}

#[test]
fn a_nan_weight_is_named_by_layer_and_operator() {
    let d = tmpdir("p-nan");
    let model = patched_llama(&d, "model.layers.1.self_attn.q_proj.weight", |w| w[5] = f32::NAN);
    let out = d.join("out");
    let (ok, _, err) = run(&[
        "prune",
        "--model",
        model.to_str().unwrap(),
        "--method",
        "magnitude",
        "--sparsity",
        "0.5",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        !ok && err.contains("decoder layer 1: weight model.layers.1.self_attn.q_proj.weight: 1 non-finite values"),
        "{err}"
    );
    assert!(!out.exists() && !d.join(".out.partial").exists(), "a failed run left output");
}

#[test]
fn activations_that_overflow_are_named_by_layer_and_operator() {
    let d = tmpdir("p-overflow");
    // Finite weights whose activations are not: layer 1's MLP norm scales its output by 1e38, so the input of
    // gate_proj and up_proj overflows f32 (weights alone pass the NaN check).
    let model = patched_llama(&d, "model.layers.1.post_attention_layernorm.weight", |w| w.fill(1e38));
    let c4 = c4();
    // Wanda collects dense statistics in one pass; FISTA (error correction) collects them group by group.
    for method in ["wanda", "fista"] {
        let out = d.join("out");
        let (ok, _, err) = run(&[
            "prune",
            "--model",
            model.to_str().unwrap(),
            "--method",
            method,
            "--sparsity",
            "0.5",
            "--calib",
            &c4,
            "--nsamples",
            "2",
            "--seqlen",
            "16",
            "--out",
            out.to_str().unwrap(),
            "--quiet",
        ]);
        assert!(!ok && !err.contains("panicked"), "{method}: {err}");
        assert!(
            err.contains("decoder layer 1: input of gate_proj, up_proj: NaN or Inf in the calibration activations"),
            "{method}: {err}"
        );
        assert!(!out.exists() && !d.join(".out.partial").exists(), "{method}: a failed run left output");
    }
}

#[test]
fn too_little_disk_is_refused_before_any_work() {
    let d = tmpdir("p-disk");
    let out = d.join("sub/out");
    let c4 = c4();
    let mut job = parse_prune(&[
        "--model",
        fixture("llama").to_str().unwrap(),
        "--method",
        "sparsegpt",
        "--sparsity",
        "0.5",
        "--calib",
        &c4,
        "--nsamples",
        "4",
        "--seqlen",
        "16",
        "--out",
        out.to_str().unwrap(),
    ]);
    job.args.assume_free_bytes = Some(1000);
    let err = format!("{:#}", fistaprune::commands::prune::prune(&job).unwrap_err());
    assert!(err.contains("not enough disk space for the output") && err.contains("GB needed"), "{err}");
    assert_eq!(std::fs::read_dir(&d).unwrap().count(), 0, "nothing written");
}

#[test]
fn json_mode_reports_stages_layers_and_the_result_for_machines() {
    let d = tmpdir("p-json");
    let out = d.join("out");
    let m = fixture("llama");
    let (ok, stdout, err) = run(&[
        "prune",
        "--model",
        m.to_str().unwrap(),
        "--method",
        "sparsegpt",
        "--sparsity",
        "0.5",
        "--calib",
        &c4(),
        "--nsamples",
        "4",
        "--seqlen",
        "16",
        "--out",
        out.to_str().unwrap(),
        "--eval",
        shared("wikitext-2-raw/wiki.test.raw").to_str().unwrap(),
        "--eval-seqlen",
        "16",
        "--eval-max-windows",
        "3",
        "--json",
    ]);
    assert!(ok, "{err}");
    assert!(stdout.is_empty(), "--json keeps stdout empty: {stdout}");
    // Every stderr line is one JSON object.
    let events: Vec<serde_json::Value> =
        err.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))).collect();
    let of = |kind: &str| events.iter().filter(|e| e["event"] == kind).collect::<Vec<_>>();
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let n_layers = report["layers"].as_array().unwrap().len();
    let layers = of("layer");
    assert_eq!(
        layers.iter().map(|e| e["layer"].as_u64().unwrap() as usize).collect::<Vec<_>>(),
        (0..n_layers).collect::<Vec<_>>()
    );
    assert!(
        layers
            .iter()
            .all(|e| (e["sparsity"].as_f64().unwrap() - 0.5).abs() < 0.01 && e["output_rel_error"].as_f64().is_some())
    );
    // Each stage starts at 0 and ends done with its whole count; the pruning stage counts layers.
    for stage in ["sparsegpt", "perplexity"] {
        let s: Vec<_> = events.iter().filter(|e| e["stage"] == stage).collect();
        assert_eq!(s.first().unwrap()["event"], "start", "{stage}");
        let done: Vec<_> = s.iter().filter(|e| e["event"] == "done").collect();
        assert!(!done.is_empty() && done.iter().all(|e| e["done"] == e["total"]), "{stage}: {s:?}");
    }
    assert!(events.iter().any(|e| e["stage"] == "sparsegpt" && e["event"] == "done" && e["total"] == n_layers));
    let result = of("result");
    assert_eq!(result.len(), 1);
    assert_eq!(result[0]["sparsity"], report["sparsity"]);
    assert_eq!(result[0]["perplexity_after"], report["perplexity_after"]);
    assert!(result[0]["perplexity_before"].as_f64().unwrap() > 1.0);

    // A failure ends with an error event naming the problem.
    let (ok, _, err) = run(&[
        "prune",
        "--model",
        m.to_str().unwrap(),
        "--method",
        "wanda",
        "--sparsity",
        "0.5",
        "--calib",
        "/nonexistent/calib.jsonl",
        "--out",
        d.join("x").to_str().unwrap(),
        "--json",
    ]);
    assert!(!ok);
    let last: serde_json::Value = serde_json::from_str(err.lines().last().unwrap()).unwrap();
    assert_eq!(last["event"], "error");
    assert!(last["message"].as_str().unwrap().contains("/nonexistent/calib.jsonl"), "{last}");
    // A usage error is clap's, before any run (exit status 2).
    let r = std::process::Command::new(bin())
        .args(["prune", "--model", m.to_str().unwrap(), "--method", "wanda", "--sparsity", "2", "--out", "x", "--json"])
        .output()
        .unwrap();
    assert_eq!(r.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&r.stderr).contains("--sparsity 2 is outside (0, 1)"));
}
