//! `fistaprune compare`: several methods on the same calibration token ids, one table and one plot.
//!
//! The calibration set is drawn once (or loaded) and saved as `calib.json` in the output directory, each
//! method prunes into its own sub-directory from that file, the dense model and every pruned one are evaluated
//! on the same windows, and `compare.md`, `compare.json` and `layer_error.svg` sum it up.

use std::path::Path;

use anyhow::{Context, Result, ensure};
use serde_json::json;

use super::prune::{MethodName, PruneArgs, dense_eval, load_calibration, prune};
use crate::eval::perplexity::{PplOptions, perplexity};
use crate::model::Checkpoint;
use crate::output::{AtomicDir, Kind, RunPaths, marked, write_atomic};
use crate::report::{Series, layer_errors, markdown_table, plot_layers};

pub struct Comparison {
    pub json: serde_json::Value,
    pub markdown: String,
}

pub fn compare(base: &PruneArgs, methods: &[MethodName], out: &Path) -> Result<Comparison> {
    ensure!(!methods.is_empty(), "--methods is empty");
    let claim = RunPaths::new()
        .model(&base.model)?
        .input("--calib", base.calib.as_deref())?
        .input("--eval", base.eval.as_deref())?
        .claim("--out", out, Kind::Folder, base.force)?;
    let ck = Checkpoint::open(&base.model)?;
    // Assembled aside like a pruned checkpoint; each method's own prune resumes inside it with --resume.
    let (dir, _) = AtomicDir::resumable(claim, base.resume)?;
    // One calibration set for every method.
    let calib_path = dir.tmp.join("calib.json");
    let needs_calib = methods.iter().any(|m| *m != MethodName::Magnitude);
    let calib = if needs_calib {
        let c = load_calibration(base, &ck)?;
        c.save(&calib_path)?;
        Some(c)
    } else {
        None
    };
    let (windows, dense) = dense_eval(base, &ck)?;
    let dense = dense.map(|r| r.perplexity);
    let ppl_opts = PplOptions { progress: base.progress, ..Default::default() };
    let mut rows = Vec::new();
    let mut results = Vec::new();
    let mut series = Vec::new();
    for &m in methods {
        let name = serde_json::to_value(m)?.as_str().unwrap_or("method").to_string();
        let method_dir = dir.tmp.join(&name);
        let args = PruneArgs {
            method: m,
            calib: calib.as_ref().map(|_| calib_path.clone()),
            save_calib: None,
            out: method_dir.clone(),
            force: true,
            eval: None,
            ..base.clone()
        };
        let report = prune(&args).with_context(|| format!("--method {name}"))?;
        let ppl = match &windows {
            Some(w) => Some(perplexity(Checkpoint::open(&method_dir)?.model()?.as_ref(), w, &ppl_opts)?.perplexity),
            None => None,
        };
        let errs = layer_errors(&report);
        let mean_err =
            if errs.is_empty() { None } else { Some(errs.iter().map(|e| e.1).sum::<f64>() / errs.len() as f64) };
        rows.push(vec![
            name.clone(),
            ppl.map_or("–".into(), |p| format!("{p:.3}")),
            format!("{:.4}", report["sparsity"].as_f64().unwrap_or(0.0)),
            mean_err.map_or("–".into(), |e| format!("{e:.3e}")),
            format!("{:.1}", report["prune_seconds"].as_f64().unwrap_or(0.0)),
        ]);
        results.push(json!({
            "method": name, "perplexity": ppl, "sparsity": report["sparsity"], "mean_layer_output_error": mean_err,
            "prune_seconds": report["prune_seconds"], "prune_gflop": report["prune_gflop"], "checkpoint": out.join(&name).display().to_string(),
        }));
        series.push(Series { label: name, values: errs });
    }
    let title = format!("{} at {}", base.model.display(), base.pattern);
    let mut markdown = format!("{title}\n\n");
    if let (Some(d), Some(w)) = (dense, &windows) {
        markdown.push_str(&format!("dense perplexity {d:.3} ({} windows x {} tokens)\n\n", w.len(), base.eval_seqlen));
    }
    markdown
        .push_str(&markdown_table(&["method", "perplexity", "sparsity", "mean layer output error", "prune s"], &rows));
    let j = marked(json!({
        "model": base.model.display().to_string(),
        "pattern": base.pattern.to_string(),
        "calibration_sha256": calib.as_ref().map(|c| c.sha256.clone()),
        "dense_perplexity": dense,
        "eval": base.eval.as_ref().map(|p| json!({"dataset": p.display().to_string(), "seqlen": base.eval_seqlen, "windows": windows.as_ref().map(|w| w.len())})),
        "results": results,
    }));
    write_atomic(&dir.tmp.join("compare.md"), markdown.as_bytes())?;
    write_atomic(&dir.tmp.join("compare.json"), serde_json::to_string_pretty(&j)?.as_bytes())?;
    plot_layers(&dir.tmp.join("layer_error.svg"), &title, "layer output error ‖f'(x) − f(x)‖² / ‖f(x) − x‖²", &series)?;
    dir.commit()?;
    Ok(Comparison { json: j, markdown })
}
