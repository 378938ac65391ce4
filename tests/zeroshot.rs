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
        serde_json::from_str(&std::fs::read_to_string(root().join("tests/reference/zeroshot_fixture.json")).unwrap()).unwrap();
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
                assert!((s[j] - ll).abs() <= 1e-4 * ll.abs().max(1.0), "{task} {i}.{j}: log-likelihood {} vs the harness's {ll}", s[j]);
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
        "eval", "--model", m.to_str().unwrap(), "--tasks", "boolq,winogrande", "--tasks-dir", tasks_dir.to_str().unwrap(),
        "--limit", "2", "--json", out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(stdout.contains("boolq") && stdout.contains("acc_norm"), "{stdout}");
    let j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(j["tasks"].as_array().unwrap().len(), 2);
    assert_eq!(j["tasks"][0]["examples"].as_u64(), Some(2));
    // Unknown task, missing folder, missing file: named, before any model work, no output.
    let bad = d.join("bad.json");
    for (args, needle) in [
        (vec!["--tasks", "piqa", "--tasks-dir", tasks_dir.to_str().unwrap()], "unknown task \"piqa\""),
        (vec!["--tasks", "boolq", "--tasks-dir", d.join("nowhere").to_str().unwrap()], "not a folder"),
        (vec!["--tasks", "boolq", "--tasks-dir", d.to_str().unwrap()], "no file for task boolq"),
    ] {
        let mut a = vec!["eval", "--model", m.to_str().unwrap(), "--json", bad.to_str().unwrap()];
        a.extend(args);
        let (ok, _, err) = run(&a);
        assert!(!ok && err.contains(needle), "{needle}: {err}");
        assert!(!bad.exists());
    }
}
