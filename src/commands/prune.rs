//! `fistaprune prune`: calibrate, walk the layers with a method, write the pruned checkpoint and its report.
//!
//! The output directory is assembled aside (`.NAME.partial-PID`, with each finished layer in `layers/`)
//! and renamed into place only when complete, so a failed or interrupted run leaves nothing half-written.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail, ensure};
use candle_core::{DType, Tensor};
use serde_json::json;

use super::{dataset_windows, tensor_specs};
use crate::data::calibration::{CalibMode, CalibSpec, Calibration};
use crate::data::dataset::TextFormat;
use crate::eval::perplexity::{PplOptions, PplResult, perplexity};
use crate::model::export::{OutDType, write_hf_contents, write_safetensors};
use crate::model::safetensors::SafetensorsStore;
use crate::model::{CausalLm, Checkpoint, DecoderLayer, Format};
use crate::output::{AtomicDir, Kind, RunPaths, check_free_space, write_atomic};
use crate::prune::allocation::{Owl, layer_outlier_ratios, owl_sparsities};
use crate::prune::fista::{Dense, FistaOptions, FistaPruner};
use crate::prune::magnitude::Magnitude;
use crate::prune::pipeline::{FinishedLayer, LayerInputs, LayerReport, PipelineOptions, prune_model};
use crate::prune::sparsegpt::SparseGpt;
use crate::prune::wanda::Wanda;
use crate::prune::{Method, Pattern};
use crate::util::{Progress, json_event};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MethodName {
    Magnitude,
    Wanda,
    Sparsegpt,
    Fista,
}

/// Where FISTAPruner starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WarmStart {
    Wanda,
    Sparsegpt,
    Magnitude,
    Dense,
}

#[derive(Debug, Clone)]
pub struct PruneArgs {
    pub model: PathBuf,
    pub method: MethodName,
    pub pattern: Pattern,
    pub calib: Option<PathBuf>,
    pub calib_format: Option<TextFormat>,
    pub calib_mode: CalibMode,
    pub nsamples: Option<usize>,
    pub seqlen: Option<usize>,
    pub seed: u64,
    pub save_calib: Option<PathBuf>,
    pub out: PathBuf,
    pub force: bool,
    /// Continue what an interrupted run with the same flags left aside.
    pub resume: bool,
    /// Default: the input's weight type (f32 for GGUF).
    pub dtype: Option<OutDType>,
    pub max_shard_bytes: usize,
    pub eval: Option<PathBuf>,
    pub eval_format: Option<TextFormat>,
    pub eval_seqlen: usize,
    pub eval_max_windows: Option<usize>,
    pub batch: usize,
    pub act_dtype: DType,
    pub percdamp: f64,
    pub blocksize: usize,
    pub magnitude_per_row: bool,
    pub layer_inputs: LayerInputs,
    /// Default: on for fista, off for the others.
    pub error_correction: Option<bool>,
    pub layers: Option<(usize, usize)>,
    /// Default: wanda for the LLaMA family, sparsegpt for OPT (as the paper).
    pub warm_start: Option<WarmStart>,
    pub fista: FistaOptions,
    /// Layers pruned at once (dense layer inputs only).
    pub jobs: usize,
    /// See [`PipelineOptions::token_cap`].
    pub token_cap: Option<f64>,
    /// Non-uniform layer sparsity (unstructured targets).
    pub owl: Option<Owl>,
    /// No summary lines on stdout.
    pub quiet: bool,
    pub progress: Progress,
}

/// SparseGPT's result is the default start for every family: the paper used it for OPT and Wanda's for LLaMA,
/// but on SmolLM2 (LLaMA) SparseGPT's start measured better (docs/BENCHMARKS.md).
fn warm_of(a: &PruneArgs) -> WarmStart {
    a.warm_start.unwrap_or(WarmStart::Sparsegpt)
}

fn method_of(a: &PruneArgs) -> Box<dyn Method> {
    let sparsegpt = || Box::new(SparseGpt { percdamp: a.percdamp, blocksize: a.blocksize });
    match a.method {
        MethodName::Magnitude => Box::new(Magnitude { per_row: a.magnitude_per_row }),
        MethodName::Wanda => Box::new(Wanda),
        MethodName::Sparsegpt => sparsegpt(),
        MethodName::Fista => {
            let warm: Box<dyn Method> = match warm_of(a) {
                WarmStart::Wanda => Box::new(Wanda),
                WarmStart::Sparsegpt => sparsegpt(),
                WarmStart::Magnitude => Box::new(Magnitude { per_row: a.fista.per_row }),
                WarmStart::Dense => Box::new(Dense),
            };
            Box::new(FistaPruner { warm, opts: a.fista.clone() })
        }
    }
}

/// The decoder layer a tensor belongs to (`...layers.{i}.…`).
pub fn layer_of(name: &str) -> Option<usize> {
    let rest = &name[name.find("layers.")? + "layers.".len()..];
    rest.split('.').next()?.parse().ok()
}

/// The stored weight type of a checkpoint's decoder layers, as an output type.
fn input_dtype(ck: &Checkpoint) -> OutDType {
    if ck.format == Format::Gguf {
        return OutDType::F32;
    }
    let names = ck.weights.names();
    let dt = names.iter().find(|n| layer_of(n).is_some()).and_then(|n| ck.weights.meta(n)).map(|m| m.dtype);
    match dt.as_deref() {
        Some("BF16") => OutDType::Bf16,
        Some("F16") => OutDType::F16,
        _ => OutDType::F32,
    }
}

fn layer_file(dir: &Path, i: usize) -> PathBuf {
    dir.join(format!("layer-{i:05}.safetensors"))
}

fn layer_report_file(dir: &Path, i: usize) -> PathBuf {
    dir.join(format!("layer-{i:05}.json"))
}

/// Write a finished layer (f32) and its report to `dir`; the weights land last, so that a layer whose weights
/// are there is complete.
fn save_layer(dir: &Path, i: usize, layer: &dyn DecoderLayer, report: &LayerReport) -> Result<()> {
    write_atomic(&layer_report_file(dir, i), serde_json::to_string(report)?.as_bytes())?;
    let tensors = layer.named_tensors();
    let specs: Vec<(String, Vec<usize>)> = tensors.iter().map(|(n, t)| (n.clone(), t.dims().to_vec())).collect();
    let mut load = |name: &str| -> Result<Tensor> {
        Ok(tensors.iter().find(|(n, _)| n == name).map(|(_, t)| t.clone()).expect("named"))
    };
    let tmp = dir.join(format!(".layer-{i:05}.tmp"));
    write_safetensors(&tmp, &specs, OutDType::F32, &mut load)?;
    std::fs::rename(&tmp, layer_file(dir, i))?;
    Ok(())
}

/// Layer `i` as an interrupted run left it in `dir` (its weights on top of the model's layer), if it finished.
fn load_finished(dir: &Path, model: &dyn CausalLm, i: usize) -> Result<Option<FinishedLayer>> {
    let (file, rep) = (layer_file(dir, i), layer_report_file(dir, i));
    if !file.exists() || !rep.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&rep).with_context(|| format!("{}: cannot read", rep.display()))?;
    let report: LayerReport =
        serde_json::from_str(&text).with_context(|| format!("{}: not a layer report", rep.display()))?;
    ensure!(report.layer == i, "{}: the report of layer {}, not {i}", rep.display(), report.layer);
    let store = SafetensorsStore::open_files(std::slice::from_ref(&file))?;
    let mut layer = model.load_layer(i)?;
    let names: Vec<String> = layer.named_tensors().into_iter().map(|(n, _)| n).collect();
    for op in layer.linear_names() {
        let suffix = format!(".{op}.weight");
        let full = names
            .iter()
            .find(|n| n.ends_with(&suffix))
            .ok_or_else(|| anyhow!("decoder layer {i}: no tensor for {op}"))?;
        let w = store.load_f32(full).with_context(|| format!("{}: {full}", file.display()))?;
        let lin = layer.linear_mut(op).expect("listed");
        ensure!(
            w.dims() == lin.weight.dims(),
            "{}: {full} has shape {:?}, the model {:?}",
            file.display(),
            w.dims(),
            lin.weight.dims()
        );
        lin.weight = w;
    }
    Ok(Some((layer, report)))
}

/// The first place where two run descriptions differ, as `key: old → new`.
fn first_difference(path: &str, old: &serde_json::Value, new: &serde_json::Value) -> Option<String> {
    use serde_json::Value::Object;
    match (old, new) {
        (Object(a), Object(b)) => {
            let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            keys.into_iter().find_map(|k| {
                let p = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                let null = serde_json::Value::Null;
                first_difference(&p, a.get(k).unwrap_or(&null), b.get(k).unwrap_or(&null))
            })
        }
        _ => (old != new).then(|| format!("{path}: {old} → {new}")),
    }
}

/// The calibration set `a` asks for (drawn or loaded), checked against the model's context and vocabulary.
pub fn load_calibration(a: &PruneArgs, ck: &Checkpoint) -> Result<Calibration> {
    let src = a.calib.as_ref().ok_or_else(|| anyhow!("--calib is required for --method {:?}", a.method))?;
    let max_pos = ck.config.max_positions();
    let check_len = |n: usize| {
        ensure!(n <= max_pos, "--seqlen {n} is above the model's context of {max_pos} positions");
        Ok(())
    };
    if let Some(n) = a.seqlen {
        check_len(n)?;
    }
    let c = Calibration::build(
        ck.tokenizer()?,
        &CalibSpec {
            source: src,
            format: a.calib_format,
            nsamples: a.nsamples,
            seqlen: a.seqlen,
            seed: a.seed,
            mode: a.calib_mode,
        },
    )?;
    check_len(c.seqlen).with_context(|| format!("{}", src.display()))?;
    c.check_vocab(ck.config.vocab_size(), src)?;
    Ok(c)
}

/// With `--eval`: the evaluation windows and the dense model's perplexity on them.
pub fn dense_eval(a: &PruneArgs, ck: &Checkpoint) -> Result<(Option<Vec<Vec<u32>>>, Option<PplResult>)> {
    let Some(p) = &a.eval else { return Ok((None, None)) };
    let windows = dataset_windows(ck, p, a.eval_format, a.eval_seqlen, a.eval_max_windows)?.1;
    let ppl_opts = PplOptions { progress: a.progress, ..Default::default() };
    let before = perplexity(ck.model()?.as_ref(), &windows, &ppl_opts).context("evaluating the dense model")?;
    Ok((Some(windows), Some(before)))
}

pub fn prune(a: &PruneArgs) -> Result<serde_json::Value> {
    let t_start = Instant::now();
    // Before any work: what the run writes may replace nothing it should not, and no other run writes it.
    let mut paths =
        RunPaths::new().model(&a.model)?.input("--calib", a.calib.as_deref())?.input("--eval", a.eval.as_deref())?;
    let out = paths.claim("--out", &a.out, Kind::Folder, a.force)?;
    let save_calib = a.save_calib.as_ref().map(|p| paths.claim("--save-calib", p, Kind::File, a.force)).transpose()?;
    let ck = Checkpoint::open(&a.model)?;
    let method = method_of(a);
    let is_fista = a.method == MethodName::Fista;
    let layer_inputs = a.layer_inputs;
    // The corrected walk is error correction across layers: it implies it within them.
    ensure!(
        !(layer_inputs == LayerInputs::Corrected && a.error_correction == Some(false)),
        "--layer-inputs corrected implies error correction: drop --no-error-correction"
    );
    let error_correction = a.error_correction.unwrap_or(is_fista) || layer_inputs == LayerInputs::Corrected;
    ensure!(a.batch > 0, "--batch must be at least 1");
    // Every layer has the same shapes: check the pattern against layer 0 before any work.
    if ck.config.num_layers() > 0 {
        let l0 = ck.model()?.load_layer(0)?;
        for name in l0.linear_names() {
            let lin = l0.linear(name).expect("listed");
            a.pattern.check_cols(lin.in_features(), name)?;
        }
    }

    // Before any work: room for the output, plus every layer in f32 aside until it is assembled (an estimate, with 5 % to spare).
    let n_layers = ck.config.num_layers();
    let out_dtype = a.dtype.unwrap_or_else(|| input_dtype(&ck));
    let specs = tensor_specs(&ck);
    let elems = |layer_only: bool| {
        specs
            .iter()
            .filter(|(n, _)| !layer_only || layer_of(n).is_some())
            .map(|(_, s)| s.iter().product::<usize>() as u64)
            .sum::<u64>()
    };
    let need = elems(false) * out_dtype.size() as u64 + elems(true) * 4;
    check_free_space(&out.path, need + need / 20)?;

    // Calibration (magnitude needs none, but may be asked to save it for other runs).
    let calib = if method.needs_gram() || a.save_calib.is_some() || a.owl.is_some() {
        let c = load_calibration(a, &ck)?;
        if let Some(p) = &save_calib {
            c.save(&p.path)?;
        }
        Some(c)
    } else {
        None
    };

    let (eval_windows, before) = dense_eval(a, &ck)?;

    let (dir, resumed) = AtomicDir::resumable(out, a.resume)?;
    let layers_dir = dir.tmp.join("layers");
    std::fs::create_dir_all(&layers_dir)?;
    let model = ck.model()?;
    let ids: &[Vec<u32>] = calib.as_ref().map(|c| c.ids.as_slice()).unwrap_or(&[]);
    // OWL: per-layer sparsities from the dense model's outlier ratios, before any layer is pruned.
    let allocation = match (a.owl, a.pattern) {
        (None, _) => None,
        (Some(o), Pattern::Unstructured(s)) => {
            ensure!(!ids.is_empty(), "--owl needs calibration data (--calib)");
            ensure!(
                o.lambda >= 0.0 && s - o.lambda > 0.0 && s + o.lambda < 1.0,
                "--owl-lambda {} must keep every layer's sparsity inside (0, 1) around {s}",
                o.lambda
            );
            let ratios = layer_outlier_ratios(model.as_ref(), ids, a.batch, a.act_dtype, o.m, a.progress)?;
            Some((o, owl_sparsities(&ratios, s, o.lambda), ratios))
        }
        (Some(_), p) => anyhow::bail!("--owl allocates unstructured sparsity; --pattern {p} fixes every layer's"),
    };
    let opts = PipelineOptions {
        pattern: a.pattern,
        layer_sparsity: allocation.as_ref().map(|(_, s, _)| s.clone()),
        batch: a.batch,
        act_dtype: a.act_dtype,
        layer_inputs,
        error_correction,
        layers: a.layers,
        jobs: a.jobs,
        progress: a.progress,
        token_cap: a.token_cap,
    };
    let range = a.layers.unwrap_or((0, n_layers.saturating_sub(1)));
    let partial = range != (0, n_layers.saturating_sub(1));
    let dtype = out_dtype;
    let options = json!({
        "percdamp": a.percdamp, "blocksize": a.blocksize, "magnitude_per_row": a.magnitude_per_row,
        "batch": a.batch, "act_dtype": format!("{:?}", a.act_dtype).to_lowercase(),
        "layer_inputs": layer_inputs, "error_correction": error_correction, "token_cap": a.token_cap,
        "warm_start": is_fista.then(|| warm_of(a)), "fista": is_fista.then(|| a.fista.clone()),
    });
    // What decides the layers' bytes: a resumed run must match the interrupted one on all of it.
    let run = json!({
        "model": std::fs::canonicalize(&a.model).unwrap_or_else(|_| a.model.clone()).display().to_string(),
        "method": a.method, "pattern": a.pattern.to_string(), "target_sparsity": a.pattern.sparsity(),
        "layer_range": [range.0, range.1],
        "options": options, "layer_sparsity": opts.layer_sparsity,
        "calibration_sha256": calib.as_ref().map(|c| c.sha256.clone()),
    });
    let run_file = dir.tmp.join("run.json");
    if resumed && run_file.exists() {
        let text =
            std::fs::read_to_string(&run_file).with_context(|| format!("{}: cannot read", run_file.display()))?;
        let old: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", run_file.display()))?;
        if let Some(d) = first_difference("", &old, &run) {
            bail!(
                "--resume: the interrupted run in {} differs ({d}); rerun it with its flags, or --force to start over",
                dir.tmp.display()
            );
        }
    } else {
        // Nothing to continue from without the description: start clean.
        std::fs::remove_dir_all(&layers_dir).ok();
        std::fs::create_dir_all(&layers_dir)?;
        write_atomic(&run_file, serde_json::to_string_pretty(&run)?.as_bytes())?;
    }
    let done = (range.0..=range.1)
        .filter(|&i| layer_file(&layers_dir, i).exists() && layer_report_file(&layers_dir, i).exists())
        .count();
    if a.resume && !a.quiet {
        eprintln!("--resume: {done} of {} layers already pruned in {}", range.1 + 1 - range.0, dir.tmp.display());
    }

    let t_prune = Instant::now();
    let layers = prune_model(
        model.as_ref(),
        ids,
        method.as_ref(),
        &opts,
        &mut |i| load_finished(&layers_dir, model.as_ref(), i),
        &mut |i, layer, report| {
            save_layer(&layers_dir, i, layer, report)?;
            if a.progress == Progress::Json {
                json_event(json!({
                    "event": "layer", "layer": i, "seconds": report.seconds, "output_rel_error": report.output_rel_error,
                    "sparsity": report.sparsity(),
                }));
            }
            // Tests stand in for a kill at a chosen layer with this (an exit that runs no destructors).
            if std::env::var("FISTAPRUNE_TEST_EXIT_AFTER_LAYER").is_ok_and(|v| v == i.to_string()) {
                std::process::exit(137);
            }
            Ok(())
        },
    )?;
    let prune_seconds = t_prune.elapsed().as_secs_f64();
    drop(model);
    let mut report = json!({
        "command": std::env::args().collect::<Vec<_>>(),
        "model": a.model.display().to_string(),
        "architecture": ck.config.model_type(),
        "method": a.method,
        "pattern": a.pattern.to_string(),
        "target_sparsity": a.pattern.sparsity(),
        "dtype": dtype.torch_name(),
        "layer_range": [range.0, range.1],
        "options": run["options"],
        "resumed_layers": done,
        "allocation": allocation.as_ref().map(|(o, s, r)| json!({
            "method": "owl", "lambda": o.lambda, "m": o.m, "layer_sparsity": s, "outlier_ratios": r,
        })),
        "calibration": calib.as_ref().map(|c| json!({
            "source": c.source, "nsamples": c.nsamples, "seqlen": c.seqlen, "seed": c.seed, "mode": c.mode,
            "documents": c.documents, "long_documents": c.long_documents, "sha256": c.sha256,
        })),
        "prune_seconds": prune_seconds,
        "jobs": a.jobs,
        "layers": layers,
    });
    summarise(&mut report);

    if partial {
        // A part: its layers only, to be joined by `fistaprune merge`.
        report["seconds"] = json!(t_start.elapsed().as_secs_f64());
        dir.write_report(&report)?;
        std::fs::remove_file(&run_file)?;
        dir.commit()?;
        if !a.quiet {
            println!(
                "{}: layers {}-{} pruned into {} (join the parts with `fistaprune merge`)",
                a.model.display(),
                range.0,
                range.1,
                a.out.display()
            );
        }
        return Ok(report);
    }

    assemble(&ck, &dir.tmp, std::slice::from_ref(&layers_dir), dtype, a.max_shard_bytes)?;
    let after = match &eval_windows {
        Some(w) => {
            let pruned = Checkpoint::open(&dir.tmp)?;
            let ppl_opts = PplOptions { progress: a.progress, ..Default::default() };
            Some(perplexity(pruned.model()?.as_ref(), w, &ppl_opts).context("evaluating the pruned model")?)
        }
        None => None,
    };
    report["eval"] = json!(eval_windows.as_ref().map(|w| json!({
        "dataset": a.eval.as_ref().map(|p| p.display().to_string()),
        "seqlen": a.eval_seqlen, "windows": w.len(),
    })));
    report["perplexity_before"] = json!(before.as_ref().map(|r| r.perplexity));
    report["perplexity_after"] = json!(after.as_ref().map(|r| r.perplexity));
    report["seconds"] = json!(t_start.elapsed().as_secs_f64());
    dir.write_report(&report)?;
    crate::report::write_prune_summary(&dir.tmp, &report)?;
    // Kept until now so that a run killed while assembling or evaluating resumes without pruning again.
    std::fs::remove_dir_all(&layers_dir)?;
    std::fs::remove_file(&run_file)?;
    dir.commit()?;
    if a.progress == Progress::Json {
        json_event(json!({
            "event": "result", "out": a.out.display().to_string(), "method": method.name(), "pattern": a.pattern.to_string(),
            "sparsity": report["sparsity"], "pruned_parameters": report["pruned_parameters"], "prune_seconds": prune_seconds,
            "perplexity_before": report["perplexity_before"], "perplexity_after": report["perplexity_after"],
        }));
    }
    if !a.quiet {
        println!(
            "{}: {} {} -> {} (sparsity {:.4} over {} weights, {:.1} s)",
            a.model.display(),
            method.name(),
            a.pattern,
            a.out.display(),
            report["sparsity"].as_f64().unwrap_or(0.0),
            report["pruned_parameters"],
            prune_seconds
        );
        if let (Some(b), Some(af)) = (&before, &after) {
            println!(
                "perplexity before {:.4}  after {:.4}  ({} windows x {})",
                b.perplexity, af.perplexity, b.windows, b.seqlen
            );
        }
    }
    Ok(report)
}

/// Totals of a report's `layers`: measured sparsity, pruned parameters, counted GFLOP.
fn summarise(report: &mut serde_json::Value) {
    let (mut zeros, mut total, mut gflop) = (0f64, 0f64, 0f64);
    for l in report["layers"].as_array().into_iter().flatten() {
        gflop += l["gflop"].as_f64().unwrap_or(0.0);
        for o in l["operators"].as_array().into_iter().flatten() {
            let n = o["shape"][0].as_f64().unwrap_or(0.0) * o["shape"][1].as_f64().unwrap_or(0.0);
            zeros += o["sparsity"].as_f64().unwrap_or(0.0) * n;
            total += n;
        }
    }
    report["sparsity"] = json!(if total > 0.0 { zeros / total } else { 0.0 });
    report["pruned_parameters"] = json!(total as u64);
    report["prune_gflop"] = json!(gflop);
    if let Some(s) = report["prune_seconds"].as_f64().filter(|&s| s > 0.0) {
        report["prune_gflop_per_second"] = json!(gflop / s);
    }
}

/// Write the Hugging Face checkpoint into `dir`: pruned layers from the `layer-*.safetensors` files found in
/// `layer_dirs`, every other tensor from the input.
fn assemble(
    ck: &Checkpoint,
    dir: &Path,
    layer_dirs: &[PathBuf],
    dtype: OutDType,
    max_shard_bytes: usize,
) -> Result<()> {
    let find = |i: usize| layer_dirs.iter().map(|d| layer_file(d, i)).find(|p| p.exists());
    for i in 0..ck.config.num_layers() {
        ensure!(find(i).is_some(), "no pruned weights for decoder layer {i}");
    }
    let specs = tensor_specs(ck);
    let mut current: Option<(usize, SafetensorsStore)> = None;
    let mut load = |name: &str| -> Result<Tensor> {
        match layer_of(name) {
            Some(i) => {
                if current.as_ref().is_none_or(|(c, _)| *c != i) {
                    current = Some((i, SafetensorsStore::open_files(&[find(i).expect("checked")])?));
                }
                current.as_ref().expect("set").1.load_f32(name)
            }
            None => ck.weights.load(name),
        }
    };
    write_hf_contents(dir, &ck.config.to_hf_json(), ck.tokenizer.as_ref(), &specs, dtype, max_shard_bytes, &mut load)
}

/// `fistaprune merge`: join parts written with `--layers` into one checkpoint.
pub fn merge(
    model: &Path,
    parts: &[PathBuf],
    out: &Path,
    force: bool,
    dtype: Option<OutDType>,
    max_shard_bytes: usize,
) -> Result<serde_json::Value> {
    let mut paths = RunPaths::new().model(model)?;
    for p in parts {
        paths = paths.input("--parts", Some(p))?;
    }
    let out = paths.claim("--out", out, Kind::Folder, force)?;
    let ck = Checkpoint::open(model)?;
    let n = ck.config.num_layers();
    let mut covered = vec![None::<usize>; n];
    let mut reports = Vec::new();
    for (pi, p) in parts.iter().enumerate() {
        let rp = p.join("report.json");
        let text = std::fs::read_to_string(&rp)
            .with_context(|| format!("{}: cannot read (not a part written by prune --layers?)", rp.display()))?;
        let r: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", rp.display()))?;
        let (a, b) = (r["layer_range"][0].as_u64(), r["layer_range"][1].as_u64());
        let (Some(a), Some(b)) = (a, b) else { anyhow::bail!("{}: no layer_range", rp.display()) };
        for i in a as usize..=b as usize {
            ensure!(i < n, "{}: layer {i} is beyond the model's {n} layers", p.display());
            if let Some(q) = covered[i] {
                anyhow::bail!("layer {i} is in both {} and {}", parts[q].display(), p.display());
            }
            ensure!(layer_file(&p.join("layers"), i).exists(), "{}: layer {i} is missing", p.display());
            covered[i] = Some(pi);
        }
        reports.push(r);
    }
    if let Some(i) = covered.iter().position(|c| c.is_none()) {
        anyhow::bail!("no part holds decoder layer {i}");
    }
    // The parts must come from the same run configuration.
    let key = |r: &serde_json::Value| {
        json!([r["method"], r["pattern"], r["options"], r["calibration"]["sha256"], r["dtype"]])
    };
    for (r, p) in reports.iter().zip(parts) {
        ensure!(
            key(r) == key(&reports[0]),
            "{}: pruned with other options or calibration than {}",
            p.display(),
            parts[0].display()
        );
    }
    let dtype = dtype.unwrap_or_else(|| {
        if reports[0]["dtype"] == "bfloat16" {
            OutDType::Bf16
        } else if reports[0]["dtype"] == "float16" {
            OutDType::F16
        } else {
            OutDType::F32
        }
    });
    let dir = AtomicDir::new(out)?;
    let layer_dirs: Vec<PathBuf> = parts.iter().map(|p| p.join("layers")).collect();
    assemble(&ck, &dir.tmp, &layer_dirs, dtype, max_shard_bytes)?;
    let mut layers: Vec<serde_json::Value> =
        reports.iter().flat_map(|r| r["layers"].as_array().cloned().unwrap_or_default()).collect();
    layers.sort_by_key(|l| l["layer"].as_u64());
    let mut report = reports[0].clone();
    report["command"] = json!(std::env::args().collect::<Vec<_>>());
    report["layer_range"] = json!([0, n - 1]);
    report["merged_from"] = json!(parts.iter().map(|p| p.display().to_string()).collect::<Vec<_>>());
    report["prune_seconds"] = json!(reports.iter().filter_map(|r| r["prune_seconds"].as_f64()).sum::<f64>());
    report["layers"] = json!(layers);
    summarise(&mut report);
    dir.write_report(&report)?;
    dir.commit()?;
    Ok(report)
}
