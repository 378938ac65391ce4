//! `fistaprune prune`: open the model, calibrate, walk the layers with a method, write the pruned checkpoint
//! and its report.
//!
//! The output is assembled aside and renamed into place only when complete ([`resume::Aside`]), so a failed or
//! interrupted run leaves nothing half-written, and `--resume` continues a killed one.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail, ensure};
use candle_core::Tensor;
use serde_json::json;

use super::dataset_windows;
use super::resume::{self, Aside, Fingerprint};
use crate::data::calibration::{CalibOptions, Calibration};
use crate::data::dataset::TextFormat;
use crate::eval::perplexity::{PplOptions, PplResult, perplexity};
use crate::model::export::{OutDType, WithLayers, WriteOptions, write_checkpoint};
use crate::model::safetensors::SafetensorsStore;
use crate::model::{Checkpoint, layer_of};
use crate::output::{AtomicDir, Claim, Force, Kind, RunPaths, check_free_space};
use crate::prune::allocation::{layer_outlier_ratios, owl_sparsities};
use crate::prune::pipeline::{LayerInputs, PipelineOptions, prune_model};
use crate::prune::{self, Method, Observes, Pattern, PruneOptions};
use crate::report::{Allocation, EvalInfo, PruneReport, write_prune_summary};
use crate::util::{Progress, json_event};

/// `fistaprune prune`: one method into one output folder.
#[derive(Debug, Clone)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct Prune {
    /// The pruning method.
    #[cfg_attr(feature = "cli", arg(long, value_parser = prune::method_names()))]
    pub method: String,
    /// Output folder (Hugging Face layout), with report.json, report.md and layers.svg.
    #[cfg_attr(feature = "cli", arg(long))]
    pub out: PathBuf,
    #[cfg_attr(feature = "cli", command(flatten))]
    pub args: PruneArgs,
}

/// What `prune` and `compare` share: the model, the options that decide the pruned weights, the calibration,
/// the output and the evaluation.
#[derive(Debug, Clone)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct PruneArgs {
    /// Hugging Face model folder, .gguf file or Hub id (org/name).
    #[cfg_attr(feature = "cli", arg(long))]
    pub model: PathBuf,
    #[cfg_attr(feature = "cli", command(flatten))]
    pub options: PruneOptions,
    #[cfg_attr(feature = "cli", command(flatten))]
    pub calib: CalibOptions,
    /// Save the calibration token ids here (reload them with --calib FILE).
    #[cfg_attr(feature = "cli", arg(long))]
    pub save_calib: Option<PathBuf>,
    #[cfg_attr(feature = "cli", command(flatten))]
    pub write: WriteOptions,
    #[cfg_attr(feature = "cli", command(flatten))]
    pub force: Force,
    /// Continue an interrupted run into the same --out with the same flags: the layers it finished (kept in
    /// `.OUT.partial` beside --out) are not pruned again; the result is the same bytes.
    #[cfg_attr(feature = "cli", arg(long))]
    pub resume: bool,
    #[cfg_attr(feature = "cli", command(flatten))]
    pub eval: PruneEval,
    /// Layers pruned at the same time (dense layer inputs); the checkpoint does not depend on it.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 1, value_parser = crate::util::positive))]
    pub jobs: usize,
    /// No progress bars or summary lines.
    #[cfg_attr(feature = "cli", arg(long))]
    pub quiet: bool,
    /// For machines: JSON lines on stderr (progress, each layer, the result) and nothing on stdout (the same as
    /// --progress json --quiet).
    #[cfg_attr(feature = "cli", arg(long))]
    pub json: bool,
    /// How progress shows (from the global --progress, --quiet and --json).
    #[cfg_attr(feature = "cli", arg(skip))]
    pub progress: Progress,
    /// The free disk space to assume instead of asking the filesystem (for tests).
    #[cfg_attr(feature = "cli", arg(skip))]
    pub assume_free_bytes: Option<u64>,
}

/// `prune --eval`: perplexity before and after pruning.
#[derive(Debug, Clone, Default)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct PruneEval {
    /// Print perplexity on this dataset (a file, or wikitext2, c4, ptb) before and after pruning.
    #[cfg_attr(feature = "cli", arg(long))]
    pub eval: Option<PathBuf>,
    #[cfg_attr(feature = "cli", arg(long, value_enum))]
    pub eval_format: Option<TextFormat>,
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 512))]
    pub eval_seqlen: usize,
    #[cfg_attr(feature = "cli", arg(long))]
    pub eval_max_windows: Option<usize>,
}

impl PruneArgs {
    /// The defaults for `model`, `target` and calibration `calib`.
    pub fn new(model: &Path, target: prune::Target, calib: Option<&Path>) -> Self {
        Self {
            model: model.to_path_buf(),
            options: PruneOptions::new(target),
            calib: CalibOptions { calib: calib.map(Path::to_path_buf), ..Default::default() },
            save_calib: None,
            write: Default::default(),
            force: Default::default(),
            resume: false,
            eval: PruneEval { eval_seqlen: 512, ..Default::default() },
            jobs: 1,
            quiet: false,
            json: false,
            progress: Progress::Hidden,
            assume_free_bytes: None,
        }
    }
}

pub fn prune(job: &Prune) -> Result<PruneReport> {
    let t_start = Instant::now();
    let a = &job.args;
    // Before any work: what the run writes may replace nothing it should not, and no other run writes it.
    let mut paths = RunPaths::new()
        .model(&a.model)?
        .input("--calib", a.calib.calib.as_deref())?
        .input("--eval", a.eval.eval.as_deref())?;
    let out = paths.claim("--out", &job.out, Kind::Folder, a.force.force)?;
    let save_calib =
        a.save_calib.as_ref().map(|p| paths.claim("--save-calib", p, Kind::File, a.force.force)).transpose()?;

    let ck = Checkpoint::open(&a.model)?;
    let method = prune::build(&job.method, &a.options.methods)?;
    let plan = Plan::new(&ck, method.as_ref(), job, &out)?;
    let calib = calibrate(a, &ck, method.observes(), save_calib.as_ref())?;
    let dense = dense_eval(a, &ck)?;
    let model = ck.model()?;
    let ids: &[Vec<u32>] = calib.as_ref().map(|c| c.ids.as_slice()).unwrap_or(&[]);
    let allocation = allocate(a, model.as_ref(), ids, plan.pipeline.pattern)?;
    let fingerprint = Fingerprint {
        model: crate::output::resolve(&a.model).map(|p| p.display().to_string()).unwrap_or_default(),
        method: job.method.clone(),
        options: a.options.clone(),
        calibration_sha256: calib.as_ref().map(|c| c.info.sha256.clone()),
    };
    let mut aside = Aside::open(out, a.resume, &fingerprint, plan.range)?;
    if a.resume && !a.quiet {
        let n = plan.range.1 + 1 - plan.range.0;
        eprintln!("--resume: {} of {n} layers already pruned in {}", aside.resumed, aside.dir.tmp.display());
    }

    let opts =
        PipelineOptions { layer_sparsity: allocation.as_ref().map(|al| al.layer_sparsity.clone()), ..plan.pipeline };
    let t_prune = Instant::now();
    let walked = prune_model(
        model.as_ref(),
        ids,
        method.as_ref(),
        &opts,
        &mut |i| aside.finished(model.as_ref(), i),
        &mut |i, layer, report| {
            aside.save(i, layer, report)?;
            if a.progress == Progress::Json {
                json_event(json!({
                    "event": "layer", "layer": i, "seconds": report.seconds, "output_rel_error": report.output_rel_error,
                    "sparsity": report.sparsity(),
                }));
            }
            Ok(())
        },
    );
    let layers = walked.map_err(|e| aside.fail(e, plan.range))?;
    drop(model);
    let mut report = PruneReport {
        fistaprune_version: env!("CARGO_PKG_VERSION").into(),
        command: std::env::args().collect(),
        model: a.model.display().to_string(),
        architecture: ck.config.model_type().to_string(),
        method: job.method.clone(),
        pattern: opts.pattern.to_string(),
        target_sparsity: opts.pattern.sparsity(),
        dtype: plan.dtype,
        layer_range: plan.range,
        options: a.options.clone(),
        error_correction: opts.error_correction,
        resumed_layers: aside.resumed,
        allocation,
        calibration: calib.as_ref().map(|c| c.info.clone()),
        jobs: a.jobs,
        layers,
        sparsity: 0.0,
        pruned_parameters: 0,
        prune_seconds: t_prune.elapsed().as_secs_f64(),
        prune_gflop: 0.0,
        prune_gflop_per_second: None,
        eval: None,
        perplexity_before: None,
        perplexity_after: None,
        seconds: 0.0,
        merged_from: None,
    };
    report.totals();

    if plan.partial {
        // A part: its layers only, to be joined by `fistaprune merge`.
        report.seconds = t_start.elapsed().as_secs_f64();
        aside.dir.write_report(&serde_json::to_value(&report)?)?;
        aside.commit(true)?;
        if !a.quiet {
            let (first, last) = plan.range;
            println!(
                "{}: layers {first}-{last} pruned into {} (join the parts with `fistaprune merge`)",
                a.model.display(),
                job.out.display()
            );
        }
        return Ok(report);
    }

    assemble(&ck, &aside.dir.tmp, &[aside.layers()], plan.dtype, &a.write)?;
    if let Some(d) = &dense {
        let pruned = Checkpoint::open(&aside.dir.tmp)?;
        let ppl_opts = PplOptions { progress: a.progress, ..Default::default() };
        let after =
            perplexity(pruned.model()?.as_ref(), &d.windows, &ppl_opts).context("evaluating the pruned model")?;
        report.eval = Some(EvalInfo {
            dataset: a.eval.eval.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
            seqlen: a.eval.eval_seqlen,
            windows: d.windows.len(),
        });
        report.perplexity_before = Some(d.before.perplexity);
        report.perplexity_after = Some(after.perplexity);
    }
    report.seconds = t_start.elapsed().as_secs_f64();
    aside.dir.write_report(&serde_json::to_value(&report)?)?;
    write_prune_summary(&aside.dir.tmp, &report)?;
    aside.commit(false)?;
    summarise(job, &report);
    Ok(report)
}

/// What the run will do, checked before any work.
struct Plan {
    pipeline: PipelineOptions,
    /// The layers pruned, and whether they are only some of the model's (a part for `merge`).
    range: (usize, usize),
    partial: bool,
    dtype: OutDType,
}

impl Plan {
    fn new(ck: &Checkpoint, method: &dyn Method, job: &Prune, out: &Claim) -> Result<Self> {
        let a = &job.args;
        let n_layers = ck.config.num_layers();
        ensure!(n_layers > 0, "{}: the model has no decoder layers to prune", a.model.display());
        let pattern = a.options.target.pattern()?;
        let walk = &a.options.walk;
        walk.check()?;
        let range = walk.layers.unwrap_or((0, n_layers - 1));
        ensure!(
            range.0 <= range.1 && range.1 < n_layers,
            "--layers {}-{}: the model has layers 0-{}",
            range.0,
            range.1,
            n_layers - 1
        );
        let partial = range != (0, n_layers - 1);
        ensure!(
            !partial || walk.layer_inputs == LayerInputs::Dense,
            "--layers needs --layer-inputs dense (layers are then independent)"
        );
        // Every layer has the same shapes: check the pattern against layer 0.
        let l0 = ck.model()?.load_layer(0)?;
        for name in l0.linear_names() {
            pattern.check_cols(l0.linear(name).expect("listed").in_features(), name)?;
        }
        // Room for the output, plus every layer in f32 aside until it is assembled (an estimate, 5 % to spare).
        a.write.check()?;
        let dtype = a.write.dtype_for(ck);
        let specs = ck.tensor_specs();
        let elems = |layer_only: bool| {
            let of_layers = specs.iter().filter(|t| !layer_only || layer_of(&t.name).is_some());
            of_layers.map(|t| t.shape.iter().product::<usize>() as u64).sum::<u64>()
        };
        let need = (elems(false) as f64 * dtype.bytes_per_weight()) as u64 + elems(true) * 4;
        check_free_space(&out.path, need + need / 20, a.assume_free_bytes)?;
        let pipeline = PipelineOptions {
            walk: walk.clone(),
            pattern,
            layer_sparsity: None,
            error_correction: walk.error_correction(method.observes()),
            jobs: a.jobs,
            progress: a.progress,
            label: job.method.clone(),
        };
        Ok(Self { pipeline, range, partial, dtype })
    }
}

/// The calibration set, when the method observes its inputs, or it is to be saved or allocated over.
fn calibrate(a: &PruneArgs, ck: &Checkpoint, observes: Observes, save: Option<&Claim>) -> Result<Option<Calibration>> {
    if observes == Observes::Nothing && save.is_none() && !a.options.owl.owl {
        return Ok(None);
    }
    let c = load_calibration(a, ck)?;
    if let Some(p) = save {
        c.save(&p.path)?;
    }
    Ok(Some(c))
}

/// OWL: per-layer sparsities from the dense model's outlier ratios, before any layer is pruned.
fn allocate(
    a: &PruneArgs,
    model: &dyn crate::model::CausalLm,
    ids: &[Vec<u32>],
    pattern: Pattern,
) -> Result<Option<Allocation>> {
    let o = a.options.owl;
    if !o.owl {
        return Ok(None);
    }
    let Pattern::Unstructured(s) = pattern else {
        bail!("--owl allocates unstructured sparsity; --pattern {pattern} fixes every layer's")
    };
    ensure!(!ids.is_empty(), "--owl needs calibration data (--calib)");
    ensure!(
        o.owl_lambda >= 0.0 && s - o.owl_lambda > 0.0 && s + o.owl_lambda < 1.0,
        "--owl-lambda {} must keep every layer's sparsity inside (0, 1) around {s}",
        o.owl_lambda
    );
    let ratios = layer_outlier_ratios(model, ids, &a.options.walk, o.owl_m, a.progress)?;
    Ok(Some(Allocation {
        method: "owl".into(),
        lambda: o.owl_lambda,
        m: o.owl_m,
        layer_sparsity: owl_sparsities(&ratios, s, o.owl_lambda),
        outlier_ratios: ratios,
    }))
}

/// The result for people (a line or two on stdout) and for machines (a `result` event).
fn summarise(job: &Prune, r: &PruneReport) {
    let a = &job.args;
    if a.progress == Progress::Json {
        json_event(json!({
            "event": "result", "out": job.out.display().to_string(), "method": r.method, "pattern": r.pattern,
            "sparsity": r.sparsity, "pruned_parameters": r.pruned_parameters, "prune_seconds": r.prune_seconds,
            "perplexity_before": r.perplexity_before, "perplexity_after": r.perplexity_after,
        }));
    }
    if a.quiet {
        return;
    }
    println!(
        "{}: {} {} -> {} (sparsity {:.4} over {} weights, {:.1} s)",
        a.model.display(),
        r.method,
        r.pattern,
        job.out.display(),
        r.sparsity,
        r.pruned_parameters,
        r.prune_seconds
    );
    if let (Some(b), Some(af), Some(e)) = (r.perplexity_before, r.perplexity_after, &r.eval) {
        println!("perplexity before {b:.4}  after {af:.4}  ({} windows x {})", e.windows, e.seqlen);
    }
}

/// The calibration set `a` asks for (drawn or loaded), checked against the model's context and vocabulary.
pub fn load_calibration(a: &PruneArgs, ck: &Checkpoint) -> Result<Calibration> {
    let src =
        a.calib.calib.as_ref().ok_or_else(|| anyhow!("--calib is required: the method reads calibration data"))?;
    let max_pos = ck.config.max_positions();
    let check_len = |n: usize| {
        ensure!(n <= max_pos, "--seqlen {n} is above the model's context of {max_pos} positions");
        Ok(())
    };
    if let Some(n) = a.calib.seqlen {
        check_len(n)?;
    }
    let c = Calibration::build(ck.tokenizer()?, &a.calib)?;
    check_len(c.info.seqlen).with_context(|| format!("{}", src.display()))?;
    c.check_vocab(ck.config.vocab_size(), src)?;
    Ok(c)
}

/// The evaluation windows of `--eval` and the dense model's perplexity on them.
pub struct DenseEval {
    pub windows: Vec<Vec<u32>>,
    pub before: PplResult,
}

/// With `--eval`: the dense model evaluated.
pub fn dense_eval(a: &PruneArgs, ck: &Checkpoint) -> Result<Option<DenseEval>> {
    let Some(p) = &a.eval.eval else { return Ok(None) };
    let windows = dataset_windows(ck, p, a.eval.eval_format, a.eval.eval_seqlen, a.eval.eval_max_windows)?.1;
    let ppl_opts = PplOptions { progress: a.progress, ..Default::default() };
    let before = perplexity(ck.model()?.as_ref(), &windows, &ppl_opts).context("evaluating the dense model")?;
    Ok(Some(DenseEval { windows, before }))
}

/// Write the checkpoint into `dir`: pruned layers from the `layer-*.safetensors` files found in `layer_dirs`,
/// every other tensor from the input.
fn assemble(ck: &Checkpoint, dir: &Path, layer_dirs: &[PathBuf], dtype: OutDType, write: &WriteOptions) -> Result<()> {
    let find = |i: usize| layer_dirs.iter().map(|d| resume::layer_file(d, i)).find(|p| p.exists());
    for i in 0..ck.config.num_layers() {
        ensure!(find(i).is_some(), "no pruned weights for decoder layer {i}");
    }
    let specs = ck.tensor_specs();
    let mut current: Option<(usize, SafetensorsStore)> = None;
    let layers = |i: usize, name: &str| -> Result<Tensor> {
        if current.as_ref().is_none_or(|(c, _)| *c != i) {
            current = Some((i, SafetensorsStore::open_files(&[find(i).expect("checked")])?));
        }
        current.as_ref().expect("set").1.load_f32(name)
    };
    write_checkpoint(dir, ck, &specs, dtype, write, &mut WithLayers { weights: &ck.weights, layers })
}

/// `fistaprune merge`: join the parts written by `prune --layers A-B` into one checkpoint.
#[derive(Debug, Clone)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct Merge {
    /// The model the parts were pruned from.
    #[cfg_attr(feature = "cli", arg(long))]
    pub model: PathBuf,
    /// Part folders, in any order.
    #[cfg_attr(feature = "cli", arg(long, num_args = 1.., required = true))]
    pub parts: Vec<PathBuf>,
    #[cfg_attr(feature = "cli", arg(long))]
    pub out: PathBuf,
    #[cfg_attr(feature = "cli", command(flatten))]
    pub force: Force,
    #[cfg_attr(feature = "cli", command(flatten))]
    pub write: WriteOptions,
}

pub fn merge(m: &Merge) -> Result<PruneReport> {
    let mut paths = RunPaths::new().model(&m.model)?;
    for p in &m.parts {
        paths = paths.input("--parts", Some(p))?;
    }
    let out = paths.claim("--out", &m.out, Kind::Folder, m.force.force)?;
    let ck = Checkpoint::open(&m.model)?;
    let n = ck.config.num_layers();
    let mut owner = vec![None::<usize>; n];
    let mut reports = Vec::new();
    for (pi, p) in m.parts.iter().enumerate() {
        let r = PruneReport::read(p).context("not a part written by prune --layers?")?;
        let (a, b) = r.layer_range;
        ensure!(b < n, "{}: layer {b} is beyond the model's {n} layers", p.display());
        for (i, o) in owner.iter_mut().enumerate().take(b + 1).skip(a) {
            if let Some(q) = *o {
                bail!("layer {i} is in both {} and {}", m.parts[q].display(), p.display());
            }
            ensure!(resume::layer_file(&p.join("layers"), i).exists(), "{}: layer {i} is missing", p.display());
            *o = Some(pi);
        }
        reports.push(r);
    }
    if let Some(i) = owner.iter().position(|c| c.is_none()) {
        bail!("no part holds decoder layer {i}");
    }
    // The parts must come from the same run configuration (but for their layers).
    let key = |r: &PruneReport| {
        let mut options = r.options.clone();
        options.walk.layers = None;
        (r.method.clone(), options, r.calibration.as_ref().map(|c| c.sha256.clone()), r.dtype)
    };
    for (r, p) in reports.iter().zip(&m.parts) {
        ensure!(
            key(r) == key(&reports[0]),
            "{}: pruned with other options or calibration than {}",
            p.display(),
            m.parts[0].display()
        );
    }
    let dtype = m.write.dtype.unwrap_or(reports[0].dtype);
    m.write.check()?;
    let dir = AtomicDir::new(out)?;
    let layer_dirs: Vec<PathBuf> = m.parts.iter().map(|p| p.join("layers")).collect();
    assemble(&ck, &dir.tmp, &layer_dirs, dtype, &m.write)?;
    let mut layers: Vec<_> = reports.iter().flat_map(|r| r.layers.clone()).collect();
    layers.sort_by_key(|l| l.layer);
    let mut report = reports[0].clone();
    report.command = std::env::args().collect();
    report.dtype = dtype;
    report.layer_range = (0, n - 1);
    report.merged_from = Some(m.parts.iter().map(|p| p.display().to_string()).collect());
    report.prune_seconds = reports.iter().map(|r| r.prune_seconds).sum();
    report.layers = layers;
    report.totals();
    dir.write_report(&serde_json::to_value(&report)?)?;
    dir.commit()?;
    println!("merged {} parts into {} (sparsity {:.4})", m.parts.len(), m.out.display(), report.sparsity);
    Ok(report)
}
