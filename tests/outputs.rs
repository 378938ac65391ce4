//! `--force` never destroys what fistaprune did not write (issue 12): outputs that overlap an input, foreign
//! paths with and without `--force`, an earlier output replaced, symbolic links, two runs at once, a kill.
//! Every refusal leaves the refused path byte-for-byte as it was.

mod common;

use std::path::{Path, PathBuf};

use common::*;

fn c4() -> String {
    shared("c4/c4-train.00000-of-01024.first1000.jsonl").to_str().unwrap().to_string()
}

fn wiki() -> String {
    shared("wikitext-2-raw/wiki.test.raw").to_str().unwrap().to_string()
}

/// Every file, folder and link under `p` (or `p` itself), with its bytes or target.
fn snapshot(p: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v = Vec::new();
    if std::fs::symlink_metadata(p).is_err() {
        return v;
    }
    fn walk(p: &Path, rel: String, v: &mut Vec<(String, Vec<u8>)>) {
        let m = std::fs::symlink_metadata(p).unwrap();
        if m.file_type().is_symlink() {
            v.push((rel, std::fs::read_link(p).unwrap().to_string_lossy().into_owned().into_bytes()));
        } else if m.is_dir() {
            v.push((format!("{rel}/"), Vec::new()));
            let mut names: Vec<_> = std::fs::read_dir(p).unwrap().map(|e| e.unwrap().file_name()).collect();
            names.sort();
            for n in names {
                walk(&p.join(&n), format!("{rel}/{}", n.to_string_lossy()), v);
            }
        } else {
            v.push((rel, std::fs::read(p).unwrap()));
        }
    }
    walk(p, String::new(), &mut v);
    v
}

/// Runs `args`, expects a refusal whose message holds every one of `needles`, and that `guarded` is unchanged.
fn refused(args: &[&str], needles: &[&str], guarded: &[&Path]) {
    let before: Vec<_> = guarded.iter().map(|p| snapshot(p)).collect();
    let (ok, _, err) = run(args);
    assert!(!ok, "{args:?} should be refused");
    for n in needles {
        assert!(err.contains(n), "{args:?}: the message lacks {n:?}: {err}");
    }
    for (p, b) in guarded.iter().zip(before) {
        assert!(snapshot(p) == b, "{args:?}: {} changed", p.display());
    }
}

fn ok(args: &[&str]) {
    let (ok, _, err) = run(args);
    assert!(ok, "{args:?}: {err}");
}

fn prune_args<'a>(model: &'a str, out: &'a str, c4: &'a str) -> Vec<&'a str> {
    with(prune_base(model, out, c4), &["--method", "wanda", "--sparsity", "0.5"])
}

/// `prune` without a method or target.
fn prune_base<'a>(model: &'a str, out: &'a str, c4: &'a str) -> Vec<&'a str> {
    vec!["prune", "--model", model, "--calib", c4, "--nsamples", "4", "--seqlen", "16", "--out", out, "--quiet"]
}

fn with<'a>(mut a: Vec<&'a str>, extra: &[&'a str]) -> Vec<&'a str> {
    a.extend_from_slice(extra);
    a
}

/// A folder holding a user's file that is not fistaprune's.
fn foreign_folder(d: &Path, name: &str) -> PathBuf {
    let f = d.join(name);
    std::fs::create_dir_all(&f).unwrap();
    std::fs::write(f.join("thesis.txt"), "three years of work").unwrap();
    f
}

#[test]
fn prune_never_overwrites_its_inputs() {
    let d = tmpdir("out-inputs");
    let m = d.join("model");
    copy_dir(&fixture("llama"), &m);
    let (ms, c4) = (m.to_str().unwrap(), c4());
    // The model as the output, with and without --force; through `..`; through a symbolic link to it.
    for out in [ms.to_string(), format!("{}/../model", m.display()), format!("{}/./", m.display())] {
        refused(
            &with(prune_args(ms, &out, &c4), &["--force"]),
            &["is the input --model itself", "with or without --force"],
            &[&m],
        );
        refused(&prune_args(ms, &out, &c4), &["is the input --model itself"], &[&m]);
    }
    std::os::unix::fs::symlink(&m, d.join("link")).unwrap();
    let link = d.join("link");
    refused(
        &with(prune_args(ms, link.to_str().unwrap(), &c4), &["--force"]),
        &["is the input --model itself"],
        &[&m, &link],
    );
    // An output inside the model, and a folder that contains the model.
    let inside = m.join("pruned");
    refused(
        &with(prune_args(ms, inside.to_str().unwrap(), &c4), &["--force"]),
        &["lies inside the input --model"],
        &[&m],
    );
    assert!(!inside.exists());
    refused(&with(prune_args(ms, d.to_str().unwrap(), &c4), &["--force"]), &["contains the input --model"], &[&d]);
    // The same for the other inputs: --calib, --eval, --save-calib.
    let calib = d.join("calib.jsonl");
    std::fs::copy(&c4, &calib).unwrap();
    let cs = calib.to_str().unwrap();
    refused(&with(prune_args(ms, cs, cs), &["--force"]), &["is the input --calib itself"], &[&calib]);
    let evals = d.join("evals");
    std::fs::create_dir(&evals).unwrap();
    let text = evals.join("text.txt");
    std::fs::copy(wiki(), &text).unwrap();
    refused(
        &with(prune_args(ms, evals.to_str().unwrap(), &c4), &["--eval", text.to_str().unwrap(), "--force"]),
        &["contains the input --eval"],
        &[&evals],
    );
    refused(
        &with(prune_args(ms, d.join("o2").to_str().unwrap(), cs), &["--save-calib", cs, "--force"]),
        &["--save-calib", "is the input --calib itself"],
        &[&calib],
    );
    refused(
        &with(
            prune_args(ms, d.join("o3").to_str().unwrap(), &c4),
            &["--save-calib", d.join("o3/calib.json").to_str().unwrap()],
        ),
        &["--save-calib", "lies inside the output --out"],
        &[&d.join("o3")],
    );
    assert!(!d.join("o2").exists() && !d.join("o3").exists());
}

#[test]
fn force_replaces_only_what_fistaprune_wrote() {
    let d = tmpdir("out-force");
    let m = fixture("llama");
    let (ms, c4) = (m.to_str().unwrap(), c4());
    // A foreign folder: refused with and without --force, and named with what it holds.
    let f = foreign_folder(&d, "work");
    let fs_ = f.to_str().unwrap();
    for extra in [&[][..], &["--force"][..]] {
        refused(&with(prune_args(ms, fs_, &c4), extra), &["is not an output of fistaprune", "thesis.txt"], &[&f]);
    }
    // `--out .` in someone's working folder.
    let before = snapshot(&f);
    let r = std::process::Command::new(bin())
        .current_dir(&f)
        .args(with(prune_args(ms, ".", &c4), &["--force"]))
        .output()
        .unwrap();
    assert!(!r.status.success() && String::from_utf8_lossy(&r.stderr).contains("is not an output of fistaprune"));
    assert!(snapshot(&f) == before, "--out . --force changed the working folder");
    // A file where a folder goes.
    let file = d.join("notes.txt");
    std::fs::write(&file, "notes").unwrap();
    refused(&with(prune_args(ms, file.to_str().unwrap(), &c4), &["--force"]), &["a file, not a folder"], &[&file]);
    // An earlier output: refused without --force, replaced with it.
    let out = d.join("out");
    let os = out.to_str().unwrap();
    ok(&prune_args(ms, os, &c4));
    refused(&prune_args(ms, os, &c4), &["already exists", "--force"], &[&out]);
    ok(&with(prune_base(ms, os, &c4), &["--force", "--method", "wanda", "--sparsity", "0.6"]));
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(r["target_sparsity"], 0.6);
    assert!(r["fistaprune_version"].is_string());
    // An earlier output to which the user added a file is no longer ours alone.
    std::fs::write(out.join("my-notes.md"), "keep me").unwrap();
    refused(&with(prune_args(ms, os, &c4), &["--force"]), &["my-notes.md"], &[&out]);
    std::fs::remove_file(out.join("my-notes.md")).unwrap();
    // An empty folder is replaced with --force; a symbolic link to an earlier output writes its target.
    let empty = d.join("empty");
    std::fs::create_dir(&empty).unwrap();
    refused(&prune_args(ms, empty.to_str().unwrap(), &c4), &["already exists"], &[&empty]);
    ok(&with(prune_args(ms, empty.to_str().unwrap(), &c4), &["--force"]));
    assert!(empty.join("model.safetensors").exists());
    std::os::unix::fs::symlink(&out, d.join("to-out")).unwrap();
    ok(&with(
        prune_base(ms, d.join("to-out").to_str().unwrap(), &c4),
        &["--force", "--method", "wanda", "--sparsity", "0.7"],
    ));
    assert!(std::fs::symlink_metadata(d.join("to-out")).unwrap().file_type().is_symlink());
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(r["target_sparsity"], 0.7);
    // Nothing left aside: no lock, no partial folder.
    let hidden: Vec<String> = std::fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(hidden.is_empty(), "{hidden:?}");
}

fn go(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Every verb that writes follows the same rules.
#[test]
fn every_verb_that_writes_follows_the_rules() {
    let d = tmpdir("out-verbs");
    let m = fixture("llama");
    let gguf = fixture("llama_gguf/tiny.gguf");
    let (ms, gs, c4, w) = (m.to_str().unwrap(), gguf.to_str().unwrap(), c4(), wiki());
    let foreign_file = d.join("data.json");
    std::fs::write(&foreign_file, r#"{"mine": true}"#).unwrap();
    let ff = foreign_file.to_str().unwrap();
    let folder = foreign_folder(&d, "work");
    let fo = folder.to_str().unwrap();
    // Parts for merge.
    let part = |name: &str, layers: &str| {
        let p = d.join(name);
        ok(&with(prune_args(ms, p.to_str().unwrap(), &c4), &["--layer-inputs", "dense", "--layers", layers]));
        p
    };
    let (p0, p1) = (part("p0", "0"), part("p1", "1"));
    let (p0s, p1s) = (p0.to_str().unwrap(), p1.to_str().unwrap());
    // (verb arguments with OUT where the output goes, whether the output is a folder).
    let verbs: Vec<(&str, Vec<&str>, bool)> = vec![
        ("convert", vec!["convert", "--model", gs, "--out", "OUT"], true),
        ("merge", vec!["merge", "--model", ms, "--parts", p0s, p1s, "--out", "OUT"], true),
        (
            "compare",
            vec![
                "compare",
                "--model",
                ms,
                "--methods",
                "magnitude,wanda",
                "--sparsity",
                "0.5",
                "--calib",
                &c4,
                "--nsamples",
                "4",
                "--seqlen",
                "16",
                "--out",
                "OUT",
                "--quiet",
            ],
            true,
        ),
        ("tokenize", vec!["tokenize", "--model", ms, "--dataset", &w, "--out", "OUT"], false),
        (
            "eval",
            vec![
                "eval",
                "--model",
                ms,
                "--dataset",
                &w,
                "--seqlen",
                "16",
                "--max-windows",
                "2",
                "--json",
                "OUT",
                "--quiet",
            ],
            false,
        ),
        (
            "save-calib",
            with(prune_base(ms, "PRUNED", &c4), &["--method", "magnitude", "--sparsity", "0.5", "--save-calib", "OUT"]),
            false,
        ),
    ];
    for (verb, args, is_folder) in verbs {
        let at = |out: &str, extra: &[&str]| -> Vec<String> {
            let pruned = d.join(format!("pruned-{verb}")).to_string_lossy().into_owned();
            let mut v: Vec<String> = args.iter().map(|a| a.replace("OUT", out).replace("PRUNED", &pruned)).collect();
            v.extend(extra.iter().map(|s| s.to_string()));
            v
        };
        // A path fistaprune did not write, with --force.
        let (foreign, what) = if is_folder { (fo, &folder) } else { (ff, &foreign_file) };
        refused(&go(&at(foreign, &["--force"])), &["is not an output of fistaprune"], &[what]);
        // Its own earlier output: refused without --force, replaced with it.
        let out = d.join(format!("{verb}-out"));
        let os = out.to_str().unwrap();
        ok(&go(&at(os, &[])));
        // (save-calib: without the pruned output, so that the refusal is the calibration file's.)
        let _ = std::fs::remove_dir_all(d.join("pruned-save-calib"));
        refused(&go(&at(os, &[])), &["already exists", "--force"], &[&out]);
        ok(&go(&at(os, &["--force"])));
        // The output over the model.
        let model_arg = if verb == "convert" { gs } else { ms };
        let model_path = PathBuf::from(model_arg);
        refused(&go(&at(model_arg, &["--force"])), &["is the input --model itself"], &[&model_path]);
    }
    // An eval --json over its dataset; merge into one of its parts.
    let data = d.join("text.txt");
    std::fs::copy(&w, &data).unwrap();
    let ds = data.to_str().unwrap();
    refused(
        &["eval", "--model", ms, "--dataset", ds, "--seqlen", "16", "--max-windows", "1", "--json", ds, "--force"],
        &["is the input --dataset itself"],
        &[&data],
    );
    refused(
        &["merge", "--model", ms, "--parts", p0s, p1s, "--out", p1s, "--force"],
        &["is the input --parts itself"],
        &[&p1],
    );
}

fn lock_file(out: &Path) -> PathBuf {
    out.with_file_name(format!(".{}.lock", out.file_name().unwrap().to_string_lossy()))
}

/// Waits until the lock `p` names process `pid` (written once it is held).
fn wait_for_lock(p: &Path, pid: u32) {
    for _ in 0..4000 {
        if std::fs::read_to_string(p).is_ok_and(|s| s == pid.to_string()) {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    panic!("{} was never taken by process {pid}", p.display());
}

fn signal(child: &std::process::Child, sig: i32) {
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
}

/// Two runs writing the same output at once: the second is refused at once, the first finishes undamaged; a
/// killed run's lock is stale, and `--resume` continues its work.
#[test]
fn a_second_run_on_the_same_output_is_refused_and_a_killed_one_is_not_in_the_way() {
    let d = tmpdir("out-lock");
    let m = fixture("llama");
    let (ms, c4) = (m.to_str().unwrap(), c4());
    let fista = |out: &Path| -> Vec<String> {
        with(
            prune_base(ms, out.to_str().unwrap(), &c4),
            &["--method", "fista", "--sparsity", "0.5", "--refit-iters", "3", "--threads", "1"],
        )
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let reference = d.join("reference");
    ok(&fista(&reference).iter().map(String::as_str).collect::<Vec<_>>());
    // The first run is stopped (SIGSTOP) as soon as it holds its output; the second comes then.
    let out = d.join("out");
    let mut first = std::process::Command::new(bin()).args(fista(&out)).spawn().unwrap();
    wait_for_lock(&lock_file(&out), first.id());
    signal(&first, libc::SIGSTOP);
    let t = std::time::Instant::now();
    let (ok2, _, err) = run(&fista(&out).iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        !ok2 && err.contains("another fistaprune run") && err.contains(&format!("process {}", first.id())),
        "{err}"
    );
    assert!(t.elapsed().as_secs_f64() < 30.0, "the second run was not refused at once");
    // The same with --force, and another verb on the same output.
    let (ok3, _, err) = run(&with(fista(&out).iter().map(String::as_str).collect(), &["--force"]));
    assert!(!ok3 && err.contains("another fistaprune run"), "{err}");
    let (ok4, _, err) = run(&[
        "convert",
        "--model",
        fixture("llama_gguf/tiny.gguf").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--force",
    ]);
    assert!(!ok4 && err.contains("another fistaprune run"), "{err}");
    signal(&first, libc::SIGCONT);
    assert!(first.wait().unwrap().success());
    assert!(
        std::fs::read(out.join("model.safetensors")).unwrap()
            == std::fs::read(reference.join("model.safetensors")).unwrap(),
        "the first run's output was damaged"
    );
    assert!(!lock_file(&out).exists(), "the lock outlived its run");

    // A run killed while it holds the output: its lock is stale, and --resume continues its work.
    let killed = d.join("killed");
    let mut child = std::process::Command::new(bin())
        .args(fista(&killed))
        .args(["--progress", "json"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Killed once its first layer has landed.
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(child.stderr.take().unwrap()));
    assert!(lines.any(|l| l.unwrap().contains(r#""event":"layer""#)), "no layer event");
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(lock_file(&killed).exists() && !killed.exists());
    let (ok5, _, err) = run(&fista(&killed).iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!ok5 && err.contains("--resume continues it"), "{err}");
    ok(&with(fista(&killed).iter().map(String::as_str).collect(), &["--resume"]));
    assert!(
        std::fs::read(killed.join("model.safetensors")).unwrap()
            == std::fs::read(reference.join("model.safetensors")).unwrap()
    );
    assert!(!lock_file(&killed).exists());
}
