//! The demo model (SmolLM2-135M-Instruct, Q4_1 GGUF; fetched by scripts/fetch-assets.sh) against references
//! computed with Python (tests/reference/smollm2.json; how: its "how" field).

mod common;

use common::*;
use fistaprune::commands;

fn reference() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(root().join("tests/reference/smollm2.json")).unwrap()).unwrap()
}

#[test]
fn greedy_continuation_is_coherent() {
    let r = reference();
    let text = commands::generate(&smollm2(), r["greedy"]["prompt"].as_str().unwrap(), 24).unwrap();
    let want = r["greedy"]["continuation"].as_str().unwrap();
    assert!(text.starts_with(want), "got {text:?}");
}

#[test]
fn tokenization_matches_the_original_tokenizer_rules() {
    check_token_ids(&smollm2(), &reference()["tokens"], "the Python reference");
}

#[test]
fn wikitext_perplexity_matches_transformers() {
    let r = reference();
    let want = r["wikitext2_seqlen512"]["first_10_windows"].as_f64().unwrap();
    let res = commands::eval(&commands::EvalArgs {
        max_windows: Some(10),
        batch: 2,
        // Stream the layers: the other code path of the evaluation.
        layer_memory_mb: 0,
        ..commands::EvalArgs::perplexity(&smollm2(), &shared("wikitext-2-raw/wiki.test.raw"))
    })
    .unwrap()
    .perplexity
    .unwrap();
    eprintln!("ours {} transformers {want}", res.perplexity);
    assert!((res.perplexity / want - 1.0).abs() < 5e-4, "perplexity {} vs transformers {want}", res.perplexity);
}

fn peers_slice() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(root().join("tests/reference/peers_slice.json")).unwrap()).unwrap()
}

/// Prunes the demo model on the slice's calibration (`r["calibration"]`) with `flags`, checks that the run saw
/// the slice's calibration ids (every method but magnitude reads them), and returns the WikiText-2 perplexity
/// on the slice's windows (`r["eval"]`) and the report.
fn slice_run(r: &serde_json::Value, tag: &str, flags: &[&str]) -> (f64, serde_json::Value) {
    let d = tmpdir(&format!("smol-slice-{tag}"));
    let model = smollm2();
    let c4 = shared("c4/c4-train.00000-of-01024.first1000.jsonl");
    let (cal, ev) = (&r["calibration"], &r["eval"]);
    let out = d.join(tag);
    let mut args = vec!["prune", "--model", model.to_str().unwrap(), "--calib", c4.to_str().unwrap(), "--quiet"];
    let (ns, sl, seed) = (cal["nsamples"].to_string(), cal["seqlen"].to_string(), cal["seed"].to_string());
    args.extend(["--nsamples", &ns, "--seqlen", &sl, "--seed", &seed, "--out", out.to_str().unwrap()]);
    args.extend(flags);
    let (ok, _, err) = run(&args);
    assert!(ok, "{tag}: {err}");
    let rep: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    if !tag.starts_with("magnitude") {
        assert_eq!(rep["calibration"]["sha256"], cal["sha256"], "{tag}: not the slice's calibration ids");
    }
    let res = commands::eval(&commands::EvalArgs {
        seqlen: ev["seqlen"].as_u64().unwrap() as usize,
        max_windows: Some(ev["windows"].as_u64().unwrap() as usize),
        batch: 2,
        layer_memory_mb: 1 << 10,
        ..commands::EvalArgs::perplexity(&out, &shared("wikitext-2-raw/wiki.test.raw"))
    })
    .unwrap()
    .perplexity
    .unwrap();
    let _ = std::fs::remove_dir_all(&out);
    (res.perplexity, rep)
}

/// Magnitude, Wanda and SparseGPT at 50 % and 2:4 on a small slice (16 × 256 calibration tokens from the C4
/// sample, seed 0; 8 WikiText-2 windows of 512), against the authors' own code run on the same calibration ids
/// (tests/reference/peers_slice.json; how: its "how" field), and against our own figures when they were made.
#[test]
fn baselines_match_the_authors_code_on_a_slice() {
    let r = peers_slice();
    let mut failures = Vec::new();
    for (tag, run_ref) in r["runs"].as_object().unwrap() {
        let flags: Vec<&str> = run_ref["flags"].as_array().unwrap().iter().map(|f| f.as_str().unwrap()).collect();
        let (ours, _) = slice_run(&r, tag, &flags);
        let (theirs, recorded) = (run_ref["authors"].as_f64().unwrap(), run_ref["fistaprune"].as_f64().unwrap());
        eprintln!("{tag}: fistaprune {ours:.4} (recorded {recorded:.4}), authors' code {theirs:.4}");
        // Our own figure, as a regression check: the computation is deterministic, so only summation order
        // across library versions may move it.
        if (ours / recorded - 1.0).abs() > 1e-3 {
            failures.push(format!("{tag}: {ours} moved from the recorded {recorded}"));
        }
        // Against the authors: within 1 %, except where their masks and ours differ only by how exact ties of
        // the score are broken (magnitude on 4-bit weights), which the reference file records; widened by the
        // spread that one-ulp changes of Wanda's norms give our own figure on this slice where that is wider
        // (`ulp_spread`: a near tie flipped in one layer cascades through the pruned-input walk).
        let tolerance = run_ref["ulp_spread"].as_f64().unwrap_or(0.0).max(0.01);
        if run_ref["ties_only"].as_bool() != Some(true) && (ours / theirs - 1.0).abs() > tolerance {
            failures.push(format!("{tag}: {ours} is not within {tolerance} of the authors' {theirs}"));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// FISTAPruner with its defaults at 2:4 on the same slice: below SparseGPT and Wanda there (their figures from
/// the test above, checked against the authors' code), by the margin recorded in tests/reference/fista_slice.json,
/// and at its own recorded figure.
#[test]
fn fista_beats_the_baselines_on_a_slice() {
    let r = peers_slice();
    let f: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("tests/reference/fista_slice.json")).unwrap())
            .unwrap();
    let base = |tag: &str| r["runs"][tag]["fistaprune"].as_f64().unwrap();
    for (tag, want) in f["runs"].as_object().unwrap() {
        let flags: Vec<&str> = want["flags"].as_array().unwrap().iter().map(|x| x.as_str().unwrap()).collect();
        let (ppl, rep) = slice_run(&r, tag, &flags);
        let (sgpt, wanda) = (base(want["sparsegpt"].as_str().unwrap()), base(want["wanda"].as_str().unwrap()));
        let recorded = want["fistaprune"].as_f64().unwrap();
        eprintln!("{tag}: {ppl:.4} (recorded {recorded:.4}); SparseGPT {sgpt:.4}, Wanda {wanda:.4}");
        assert!((rep["sparsity"].as_f64().unwrap() - 0.5).abs() < 1e-6, "{tag}: sparsity {}", rep["sparsity"]);
        let margin = want["below_sparsegpt_by"].as_f64().unwrap();
        assert!(
            ppl < sgpt * (1.0 - margin) && ppl < wanda,
            "{tag}: {ppl} not {margin} below SparseGPT {sgpt} (Wanda {wanda})"
        );
        assert!((ppl / recorded - 1.0).abs() < 1e-3, "{tag}: {ppl} moved from the recorded {recorded}");
    }
}

/// A real `prune` on SmolLM2 killed (SIGKILL) once a randomly chosen layer has landed, then `--resume`d: the
/// same bytes as an uninterrupted run, and what the killed run left is protected against the wrong flags.
#[test]
fn killed_prune_resumes_to_the_same_bytes() {
    let d = tmpdir("smol-resume");
    let model = smollm2();
    let c4 = shared("c4/c4-train.00000-of-01024.first1000.jsonl");
    // Pruned layer inputs (each layer's calibration inputs come from the pruned layers before it), so the
    // resumed run has to rebuild them through the layers it reloads.
    let args = |out: &str, extra: &[&str]| -> Vec<String> {
        let s = if extra.contains(&"--sparsity") { &[][..] } else { &["--sparsity", "0.5"][..] };
        let mut v: Vec<String> = ["prune", "--model", model.to_str().unwrap(), "--method", "sparsegpt"]
            .iter()
            .chain(s)
            .chain(&[
                "--calib",
                c4.to_str().unwrap(),
                "--nsamples",
                "8",
                "--seqlen",
                "128",
                "--threads",
                "2",
                "--quiet",
                "--out",
            ])
            .map(|s| s.to_string())
            .collect();
        v.push(d.join(out).to_str().unwrap().to_string());
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let go = |a: &[String]| run(&a.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    let (ok, _, err) = go(&args("whole", &[]));
    assert!(ok, "{err}");
    // The same run as tests/digests.rs's `sparsegpt-50`: its recorded bytes (a refactor changes none).
    // (Recorded per CPU class; on a class with none, tests/digests.rs says so.)
    if let Some(want) = recorded_digest("sparsegpt-50") {
        let sha = file_sha256(&d.join("whole/model.safetensors"));
        assert_eq!(sha, want, "SparseGPT 50 % moved from its recorded bytes ({})", cpu_class());
    }

    // A layer from 1 to 24 (of 30), drawn from the clock.
    let k =
        1 + (std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos() as usize) % 24;
    let aside = d.join(".killed.partial");
    let marker = aside.join(format!("layers/layer-{k:05}.safetensors"));
    // Killed for real when layer k's event appears on --progress json.
    assert!(
        kill_after_layer(&args("killed", &[]).iter().map(String::as_str).collect::<Vec<_>>(), k),
        "the run ended first"
    );
    assert!(marker.exists(), "layer {k} was reported before it landed");
    assert!(!d.join("killed").exists(), "a killed run left an output");
    assert!(aside.exists());

    // Without --resume the leftover is refused, with other flags --resume is refused: both keep it.
    let (ok, _, err) = go(&args("killed", &[]));
    assert!(!ok && err.contains("--resume continues it"), "{err}");
    let (ok, _, err) = go(&args("killed", &["--resume", "--sparsity", "0.6"]));
    assert!(!ok && err.contains("differs (options.target.sparsity: 0.5 → 0.6)"), "{err}");
    assert!(marker.exists(), "a refused run removed the interrupted one's layers");

    let (ok, _, err) = go(&args("killed", &["--resume"]));
    assert!(ok, "{err}");
    assert!(!aside.exists());
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("killed/report.json")).unwrap()).unwrap();
    let resumed = report["resumed_layers"].as_u64().unwrap() as usize;
    assert!(resumed > k && resumed < 30, "layer {k}: {resumed} layers resumed");
    let mut names: Vec<String> = std::fs::read_dir(d.join("whole"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut theirs: Vec<String> = std::fs::read_dir(d.join("killed"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    theirs.sort();
    assert_eq!(names, theirs);
    for n in names.iter().filter(|n| *n != "report.json" && *n != "report.md") {
        assert!(
            std::fs::read(d.join("whole").join(n)).unwrap() == std::fs::read(d.join("killed").join(n)).unwrap(),
            "{n} differs (killed after layer {k})"
        );
    }
}
