//! Zero-shot scoring against lm-evaluation-harness on the project's own small task files (one per task
//! format, tests/fixtures/zeroshot) and the random-weight LLaMA fixture: the same prompts, the same
//! log-likelihood of every choice, the same acc and acc_norm (tests/reference/zeroshot_fixture.json, written
//! by scripts/reference/zeroshot_ref.py).

mod common;

use common::*;
use fistaprune::eval::zeroshot::{TASKS, accuracy, load_task, score_all, task_file};
use fistaprune::model::Checkpoint;

#[test]
fn scores_match_lm_evaluation_harness() {
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("tests/reference/zeroshot_fixture.json")).unwrap())
            .unwrap();
    let ck = Checkpoint::open(&fixture("llama")).unwrap();
    let tok = ck.tokenizer().unwrap();
    let eos = tok.bos_id.or(tok.eos_id).unwrap();
    let model = ck.model().unwrap();
    let dir = fixture("zeroshot");
    for &task in TASKS {
        let want = &r["tasks"][task];
        let examples = load_task(task, &task_file(&dir, task).unwrap(), None).unwrap();
        let scores = score_all(model.as_ref(), tok, eos, &examples, "", Default::default()).unwrap();
        let wex = want["examples"].as_array().unwrap();
        assert_eq!(examples.len(), wex.len(), "{task}");
        for (i, ((e, s), w)) in examples.iter().zip(&scores).zip(wex).enumerate() {
            assert_eq!(e.gold as u64, w["gold"].as_u64().unwrap(), "{task} {i}: gold");
            for (j, (c, wc)) in e.choices.iter().zip(w["choices"].as_array().unwrap()).enumerate() {
                assert_eq!(c.context, wc["context"].as_str().unwrap(), "{task} {i}.{j}: context");
                assert_eq!(c.continuation, wc["continuation"].as_str().unwrap(), "{task} {i}.{j}: continuation");
                assert_eq!(c.norm_len as u64, wc["norm_len"].as_u64().unwrap(), "{task} {i}.{j}: length");
                let ll = wc["loglikelihood"].as_f64().unwrap();
                assert!(
                    (s[j] - ll).abs() <= 1e-4 * ll.abs().max(1.0),
                    "{task} {i}.{j}: log-likelihood {} vs the harness's {ll}",
                    s[j]
                );
            }
        }
        let (acc, norm) = accuracy(&examples, &scores);
        assert_eq!((acc, norm), (want["acc"].as_f64().unwrap(), want["acc_norm"].as_f64().unwrap()), "{task}");
    }
}

#[test]
fn eval_tasks_from_the_command_line() {
    let d = tmpdir("zs-cli");
    let m = fixture("llama");
    let tasks_dir = fixture("zeroshot");
    let out = d.join("zs.json");
    let (ok, stdout, err) = run(&[
        "eval",
        "--model",
        m.to_str().unwrap(),
        "--tasks",
        "boolq,winogrande",
        "--tasks-dir",
        tasks_dir.to_str().unwrap(),
        "--limit",
        "2",
        "--json",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(stdout.contains("boolq") && stdout.contains("acc_norm"), "{stdout}");
    let j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(j["tasks"].as_array().unwrap().len(), 2);
    assert_eq!(j["tasks"][0]["examples"].as_u64(), Some(2));
    // Unknown task, missing folder, missing file: named, before any model work, no output.
    let bad = d.join("bad.json");
    let empty = d.join("empty");
    std::fs::create_dir(&empty).unwrap();
    for (args, needle) in [
        (vec!["--tasks", "piqa", "--tasks-dir", tasks_dir.to_str().unwrap()], "unknown task \"piqa\""),
        (vec!["--tasks", "boolq", "--tasks-dir", d.join("nowhere").to_str().unwrap()], "not a folder"),
        (vec!["--tasks", "boolq", "--tasks-dir", empty.to_str().unwrap()], "no file for task boolq"),
    ] {
        let mut a = vec!["eval", "--model", m.to_str().unwrap(), "--json", bad.to_str().unwrap()];
        a.extend(args);
        let (ok, _, err) = run(&a);
        assert!(!ok && err.contains(needle), "{needle}: {err}");
        assert!(!bad.exists());
    }
}

/// The hub's Parquet splits (tests/fixtures/zeroshot_hub, written by scripts/reference/hub_task_fixtures.py from
/// the same rows in the hub's schemas) give the same examples as the local files: same prompts, same gold.
#[test]
fn hub_parquet_splits_give_the_same_examples_as_local_files() {
    let hub = fixture("zeroshot_hub/hub");
    for task in TASKS {
        let (repo, file) = fistaprune::eval::zeroshot::hub_task_file(task).unwrap();
        let dir = hub.join(format!("datasets--{}", repo.replace('/', "--")));
        let commit = std::fs::read_to_string(dir.join("refs/main")).unwrap();
        let parquet = dir.join("snapshots").join(commit.trim()).join(file);
        let from_hub = load_task(task, &parquet, None).unwrap_or_else(|e| panic!("{task}: {e:#}"));
        let local = load_task(task, &task_file(&fixture("zeroshot"), task).unwrap(), None).unwrap();
        assert_eq!(from_hub, local, "{task}");
    }
}

/// `eval --tasks-dir hub` finds every task in the Hugging Face cache offline, and scores what the local files
/// score; with an empty cache offline, a message says what is missing and where it looked.
#[test]
fn eval_tasks_from_the_hugging_face_cache() {
    let d = tmpdir("zs-hub");
    let tasks = TASKS.join(",");
    let go = |hf_home: &std::path::Path, tasks_dir: &str, out: &str| {
        let r = std::process::Command::new(bin())
            .args([
                "eval",
                "--model",
                fixture("llama").to_str().unwrap(),
                "--tasks",
                &tasks,
                "--tasks-dir",
                tasks_dir,
                "--quiet",
            ])
            .args(["--json", d.join(out).to_str().unwrap()])
            .env("HF_HOME", hf_home)
            .env_remove("HF_HUB_CACHE")
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap();
        (r.status.success(), String::from_utf8_lossy(&r.stderr).into_owned())
    };
    let (ok, err) = go(&fixture("zeroshot_hub"), "hub", "hub.json");
    assert!(ok, "{err}");
    let (ok, err) = go(&d, fixture("zeroshot").to_str().unwrap(), "local.json");
    assert!(ok, "{err}");
    let read =
        |f: &str| -> serde_json::Value { serde_json::from_str(&std::fs::read_to_string(d.join(f)).unwrap()).unwrap() };
    let (hub, local) = (read("hub.json"), read("local.json"));
    for (h, l) in hub["tasks"].as_array().unwrap().iter().zip(local["tasks"].as_array().unwrap()) {
        assert_eq!(h["task"], l["task"]);
        assert!(h["file"].as_str().unwrap().ends_with(".parquet"), "{h}");
        for k in ["acc", "acc_norm", "examples"] {
            assert_eq!(h[k], l[k], "{}: {k}", h["task"]);
        }
    }
    let (ok, err) = go(&d.join("empty"), "hub", "none.json");
    assert!(!ok && !err.contains("panicked"), "{err}");
    assert!(
        err.contains("aps/super_glue")
            && err.contains("HF_HUB_OFFLINE")
            && err.contains(&d.join("empty").display().to_string()),
        "{err}"
    );
}
