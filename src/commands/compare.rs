//! `fistaprune compare`: several methods on the same calibration token ids, one table and one plot.
//!
//! The calibration set is drawn once (or loaded) and saved as `calib.json` in the output folder, each method
//! prunes into its own sub-folder from that file, the dense model and every pruned one are evaluated on the
//! same windows, and `compare.md`, `compare.json` and `layer_error.svg` sum it up. The folder is assembled
//! aside like a pruned checkpoint; with `--resume` each method's own prune continues inside it.

use std::path::PathBuf;

use anyhow::{Context, Result, ensure};
use serde_json::json;

use super::prune::{Prune, PruneArgs, dense_eval, load_calibration, prune};
use crate::data::calibration::CalibOptions;
use crate::eval::perplexity::{PplOptions, perplexity};
use crate::model::Checkpoint;
use crate::output::{AtomicDir, Force, Kind, RunPaths, marked, write_atomic};
use crate::prune::{self, Observes};
use crate::report::{Series, markdown_table, plot_layers};

/// `fistaprune compare`: every option of `prune`, several methods.
#[derive(Debug, Clone)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct Compare {
    /// Methods to run, e.g. sparsegpt,wanda,fista.
    #[cfg_attr(feature = "cli", arg(long, value_delimiter = ',', required = true, value_parser = prune::method_names()))]
    pub methods: Vec<String>,
    /// Output folder: one pruned checkpoint per method, compare.md, compare.json, layer_error.svg.
    #[cfg_attr(feature = "cli", arg(long))]
    pub out: PathBuf,
    #[cfg_attr(feature = "cli", command(flatten))]
    pub args: PruneArgs,
}

pub struct Comparison {
    pub json: serde_json::Value,
    pub markdown: String,
}

pub fn compare(c: &Compare) -> Result<Comparison> {
    let base = &c.args;
    ensure!(!c.methods.is_empty(), "--methods is empty");
    let claim = RunPaths::new()
        .model(&base.model)?
        .input("--calib", base.calib.calib.as_deref())?
        .input("--eval", base.eval.eval.as_deref())?
        .claim("--out", &c.out, Kind::Folder, base.force.force)?;
    let ck = Checkpoint::open(&base.model)?;
    let (dir, _) = AtomicDir::resumable(claim, base.resume)?;
    // One calibration set for every method that reads one.
    let calib_path = dir.tmp.join("calib.json");
    let mut observe = Observes::Nothing;
    for m in &c.methods {
        observe = observe.max(prune::build(m, &base.options.methods)?.observes());
    }
    let calib = if observe != Observes::Nothing || base.options.owl.owl {
        let cal = load_calibration(base, &ck)?;
        cal.save(&calib_path)?;
        Some(cal)
    } else {
        None
    };
    let evaluated = dense_eval(base, &ck)?;
    let windows = evaluated.as_ref().map(|d| &d.windows);
    let dense = evaluated.as_ref().map(|d| d.before.perplexity);
    let ppl_opts = PplOptions { progress: base.progress, ..Default::default() };
    let mut rows = Vec::new();
    let mut results = Vec::new();
    let mut series = Vec::new();
    for name in &c.methods {
        let method_dir = dir.tmp.join(name);
        let job = Prune {
            method: name.clone(),
            out: method_dir.clone(),
            args: PruneArgs {
                calib: CalibOptions { calib: calib.as_ref().map(|_| calib_path.clone()), ..base.calib.clone() },
                save_calib: None,
                force: Force { force: true },
                eval: Default::default(),
                ..base.clone()
            },
        };
        let report = prune(&job).with_context(|| format!("--method {name}"))?;
        let ppl = match windows {
            Some(w) => Some(perplexity(Checkpoint::open(&method_dir)?.model()?.as_ref(), w, &ppl_opts)?.perplexity),
            None => None,
        };
        let errs = report.layer_errors();
        let mean_err = (!errs.is_empty()).then(|| errs.iter().map(|e| e.1).sum::<f64>() / errs.len() as f64);
        rows.push(vec![
            name.clone(),
            ppl.map_or("–".into(), |p| format!("{p:.3}")),
            format!("{:.4}", report.sparsity),
            mean_err.map_or("–".into(), |e| format!("{e:.3e}")),
            format!("{:.1}", report.prune_seconds),
        ]);
        results.push(json!({
            "method": name, "perplexity": ppl, "sparsity": report.sparsity, "mean_layer_output_error": mean_err,
            "prune_seconds": report.prune_seconds, "prune_gflop": report.prune_gflop,
            "checkpoint": c.out.join(name).display().to_string(),
        }));
        series.push(Series { label: name.clone(), values: errs });
    }
    let pattern = base.options.target.pattern()?;
    let title = format!("{} at {pattern}", base.model.display());
    let mut markdown = format!("{title}\n\n");
    if let (Some(d), Some(w)) = (dense, windows) {
        markdown.push_str(&format!(
            "dense perplexity {d:.3} ({} windows x {} tokens)\n\n",
            w.len(),
            base.eval.eval_seqlen
        ));
    }
    markdown
        .push_str(&markdown_table(&["method", "perplexity", "sparsity", "mean layer output error", "prune s"], &rows));
    let j = marked(json!({
        "model": base.model.display().to_string(),
        "pattern": pattern.to_string(),
        "calibration_sha256": calib.as_ref().map(|c| c.info.sha256.clone()),
        "dense_perplexity": dense,
        "eval": base.eval.eval.as_ref().map(|p| json!({
            "dataset": p.display().to_string(), "seqlen": base.eval.eval_seqlen, "windows": windows.as_ref().map(|w| w.len()),
        })),
        "results": results,
    }));
    write_atomic(&dir.tmp.join("compare.md"), markdown.as_bytes())?;
    write_atomic(&dir.tmp.join("compare.json"), serde_json::to_string_pretty(&j)?.as_bytes())?;
    plot_layers(&dir.tmp.join("layer_error.svg"), &title, "layer output error ‖f'(x) − f(x)‖² / ‖f(x) − x‖²", &series)?;
    dir.commit()?;
    // The table is the result, printed even under --quiet; --json keeps stdout empty.
    if !base.json {
        print!("{markdown}");
    }
    Ok(Comparison { json: j, markdown })
}
