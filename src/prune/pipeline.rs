//! The layer walk every layer-wise method shares (METHOD.md §2 and §4.5–4.6).
//!
//! 1. Embed the calibration samples once: the inputs of decoder layer 0.
//! 2. For each decoder layer: prune it on its inputs ([`super::layer::prune_layer`]), then step the inputs past
//!    it to the next layer's ([`Streams`]).
//!
//! Where each layer's inputs come from is the walk's one choice, behind one seam ([`Streams`]): `pruned`
//! (SparseGPT / Wanda: the next layer gets the pruned layer's outputs), `dense` (FISTAPruner's paper: every
//! layer gets the dense model's inputs, so layers are independent and a range of them can be pruned alone, or
//! several in parallel), or `corrected` (the pruned stream as inputs, the dense one for the targets).
//!
//! One decoder layer is materialised in f32 at a time (twice when a dense copy is needed as the target); the
//! activations between layers may be held in f16/bf16 (`act_dtype`). Each finished layer goes to a sink, and a
//! layer an interrupted run finished comes back from `finished` instead of being pruned again.

use anyhow::{Result, anyhow, ensure};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::layer::{Cost, Inputs, LayerReport, Outputs, prune_layer};
use super::mask::Pattern;
use super::{Method, Observes};
use crate::device::{Stashed, fetch, stash};
use crate::model::{CausalLm, DecoderLayer, LayerContext};
use crate::util::{Progress, ProgressBar, check_finite, progress_bar};

/// Where each layer's calibration inputs come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum LayerInputs {
    /// The pruned previous layers' outputs (SparseGPT, Wanda).
    Pruned,
    /// The dense model's (FISTAPruner): layers are independent.
    Dense,
    /// Beyond the paper: the pruned previous layers' outputs as `X*`, the dense model's own activations for
    /// the target `W X`, so that each layer also corrects the error the layers before it left (error
    /// correction across layers as well as within). Two activation streams; implies error correction.
    Corrected,
}

/// A float type of the walk's: the activations' storage between layers (`--act-dtype`; they are computed on in
/// f32 whatever it is) or the calibration passes' products (`--matmul-dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum ActDType {
    F32,
    F16,
    Bf16,
}

impl ActDType {
    /// The default, for reports written before a field of this type existed.
    pub fn f32() -> Self {
        Self::F32
    }

    pub fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::F16 => DType::F16,
            Self::Bf16 => DType::BF16,
        }
    }
}

/// How the layer walk runs (what decides the pruned bytes; `--jobs` does not).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct WalkOptions {
    /// Calibration samples per forward batch.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = WalkOptions::default().batch, value_parser = crate::util::positive))]
    pub batch: usize,
    /// Storage type of the activations between layers.
    #[cfg_attr(feature = "cli", arg(long, value_enum, default_value = "f32"))]
    pub act_dtype: ActDType,
    /// Type the calibration passes' linear maps and attention products multiply in: bf16 or f16 round each
    /// factor to it and sum the products in f32, as the authors' fp16 runs do, for a GPU's tensor cores (about
    /// 15× its f32 rate). The softmax, the norms, the statistics, the pruners' solves, the pruned weights and
    /// eval stay f32. f16 overflows past 65504, which some models' outputs reach (Gemma's): bf16 has f32's
    /// range.
    #[cfg_attr(feature = "cli", arg(long, value_enum, default_value = "f32"))]
    #[serde(default = "ActDType::f32")]
    pub matmul_dtype: ActDType,
    /// Each layer's calibration inputs: from the pruned previous layers (SparseGPT's way, the default: it
    /// measured far better for fista too), from the dense model (the FISTAPruner paper's: layers independent,
    /// so --jobs and --layers can split the work), or corrected: the pruned layers' outputs as inputs with the
    /// dense model's as targets (error correction across layers too).
    #[cfg_attr(feature = "cli", arg(long, value_enum, default_value = "pruned"))]
    pub layer_inputs: LayerInputs,
    /// Prune the operators of a layer in data-flow order, each against the inputs the partially pruned
    /// layer gives it (default for methods that read cross terms: fista).
    #[cfg_attr(feature = "cli", arg(long, conflicts_with = "no_error_correction"))]
    pub error_correction: bool,
    /// Every operator sees the dense layer's inputs (the ablation; default for the others).
    #[cfg_attr(feature = "cli", arg(long))]
    pub no_error_correction: bool,
    /// Prune only layers A-B (inclusive; with dense layer inputs); `fistaprune merge` joins the parts.
    #[cfg_attr(feature = "cli", arg(long, value_parser = parse_layers))]
    pub layers: Option<(usize, usize)>,
    /// Scale tokens whose operator input has a mean square above this many times their sequence's median
    /// down to that level in the statistics every method uses (massive activations otherwise make a few
    /// tokens the whole least-squares objective). Off by default.
    #[cfg_attr(feature = "cli", arg(long, value_parser = parse_token_cap))]
    pub token_cap: Option<f64>,
}

impl Default for WalkOptions {
    fn default() -> Self {
        Self {
            batch: 8,
            act_dtype: ActDType::F32,
            matmul_dtype: ActDType::F32,
            layer_inputs: LayerInputs::Pruned,
            error_correction: false,
            no_error_correction: false,
            layers: None,
            token_cap: None,
        }
    }
}

impl WalkOptions {
    /// Refuse options that contradict each other or are out of range (the command line checks the ranges
    /// as it parses; a library caller gets the same messages here).
    pub fn check(&self) -> Result<()> {
        ensure!(self.batch > 0, "--batch must be at least 1");
        if let Some(k) = self.token_cap {
            check_token_cap(k)?;
        }
        ensure!(
            !(self.layer_inputs == LayerInputs::Corrected && self.no_error_correction),
            "--layer-inputs corrected implies error correction: drop --no-error-correction"
        );
        Ok(())
    }

    /// Whether the operators of a layer are pruned with intra-layer error correction: as asked, else when
    /// the method reads cross terms; the corrected walk implies it.
    pub fn error_correction(&self, observes: Observes) -> bool {
        self.error_correction
            || self.layer_inputs == LayerInputs::Corrected
            || (!self.no_error_correction && observes == Observes::Cross)
    }
}

/// `A-B` or `A` (inclusive).
pub fn parse_layers(s: &str) -> Result<(usize, usize)> {
    let parse = |x: &str| x.trim().parse::<usize>().map_err(|_| anyhow!("--layers {s:?}: expected A-B, e.g. 0-14"));
    let (a, b) = match s.split_once('-') {
        Some((a, b)) => (parse(a)?, parse(b)?),
        None => parse(s).map(|a| (a, a))?,
    };
    ensure!(a <= b, "--layers {s}: the first layer is after the last");
    Ok((a, b))
}

#[cfg(feature = "cli")]
fn parse_token_cap(s: &str) -> Result<f64> {
    let k: f64 = s.trim().parse().map_err(|_| anyhow!("{s:?} is not a number"))?;
    check_token_cap(k)?;
    Ok(k)
}

fn check_token_cap(k: f64) -> Result<()> {
    ensure!(k >= 1.0 && k.is_finite(), "--token-cap {k} must be at least 1 (a multiple of the median)");
    Ok(())
}

/// How one run walks the layers: the walk options and what the run resolved around them.
#[derive(Debug, Clone)]
pub struct PipelineOptions {
    pub walk: WalkOptions,
    pub pattern: Pattern,
    /// Per-layer unstructured sparsity (a non-uniform allocation such as OWL's) instead of `pattern`'s.
    pub layer_sparsity: Option<Vec<f64>>,
    /// Resolved: [`WalkOptions::error_correction`].
    pub error_correction: bool,
    /// Layers pruned at the same time (dense inputs only); the result does not depend on it.
    pub jobs: usize,
    pub progress: Progress,
    /// The method's name, for the progress bar and messages.
    pub label: String,
}

impl PipelineOptions {
    /// The pattern layer `i` is pruned to.
    pub fn pattern_for(&self, i: usize) -> Pattern {
        match &self.layer_sparsity {
            Some(s) => Pattern::Unstructured(s[i]),
            None => self.pattern,
        }
    }
}

/// A layer an earlier, interrupted run already pruned: its weights and its report.
pub type FinishedLayer = (Box<dyn DecoderLayer>, LayerReport);

/// Walk the decoder layers of `model`, pruning each with `method`; every finished layer goes to `sink` with its
/// report. `finished(i)` gives layer `i` as an interrupted run left it, if it did: that layer is not pruned
/// again, only run forward where the walk needs its outputs, so a resumed run ends where an uninterrupted one
/// would.
pub fn prune_model(
    model: &dyn CausalLm,
    calib: &[Vec<u32>],
    method: &dyn Method,
    opts: &PipelineOptions,
    finished: &mut dyn FnMut(usize) -> Result<Option<FinishedLayer>>,
    sink: &mut dyn FnMut(usize, &dyn DecoderLayer, &LayerReport) -> Result<()>,
) -> Result<Vec<LayerReport>> {
    let n_layers = model.num_layers();
    ensure!(n_layers > 0, "the model has no decoder layers");
    let (first, last) = opts.walk.layers.unwrap_or((0, n_layers - 1));
    ensure!(first <= last && last < n_layers, "--layers {first}-{last}: the model has layers 0-{}", n_layers - 1);
    let mode = opts.walk.layer_inputs;
    ensure!(
        (first, last) == (0, n_layers - 1) || mode == LayerInputs::Dense,
        "--layers needs --layer-inputs dense (layers are then independent)"
    );
    let mut streams = match method.observes() {
        Observes::Nothing => None,
        _ => Some(Streams::new(model, calib, mode, &opts.walk)?),
    };
    let parallel = streams.is_some() && opts.jobs > 1;
    ensure!(!parallel || mode == LayerInputs::Dense, "--jobs needs --layer-inputs dense (layers are then independent)");
    let pb = progress_bar((last + 1 - first) as u64, &opts.label, opts.progress);
    let reports = std::thread::scope(|scope| -> Result<Vec<LayerReport>> {
        let ctx = streams.as_ref().map(|s| s.ctx.clone());
        let mut workers = ctx.as_ref().filter(|_| parallel).map(|c| Workers::start(scope, model, method, opts, c));
        let mut walk = Walk { reports: Vec::new(), sink, pb: &pb };
        for i in 0..=last {
            let next = i < last;
            if i < first {
                // Dense inputs of the layers before the range.
                if let Some(s) = &mut streams {
                    s.advance(model, i, None, None, None)?;
                }
                continue;
            }
            if let Some((mut work, report)) = finished(i)? {
                work.set_matmul_dtype(opts.walk.matmul_dtype.dtype());
                log::info!("layer {i}: pruned by the interrupted run, reloaded");
                walk.done(report);
                // Only its outputs are needed (none in the parallel walk: its streams are dense).
                if let Some(s) = streams.as_mut().filter(|_| next) {
                    s.advance(model, i, Some(work.as_ref()), None, None)?;
                }
            } else if let (Some(w), Some(s)) = (&mut workers, &mut streams) {
                w.submit(i, s.acts.clone())?;
                if next {
                    s.advance(model, i, None, None, None)?;
                }
            } else {
                crate::device::reset_peak();
                let mut p = prune_or_spill(model, i, streams.as_mut(), method, opts)?;
                if let Some(s) = streams.as_mut().filter(|_| next) {
                    let (work, dense, known) = (p.work.as_ref(), p.dense.as_deref(), p.outputs.as_ref());
                    p.report.forward(|| s.advance(model, i, Some(work), dense, known))?;
                }
                p.report.gpu_peak_bytes = crate::device::peak_bytes();
                walk.pruned(i, p.work.as_ref(), p.report)?;
            }
            if let Some(w) = &workers {
                w.collect(&mut walk)?;
            }
        }
        if let Some(w) = workers.take() {
            w.finish(&mut walk)?;
        }
        Ok(walk.reports)
    })?;
    pb.finish_and_clear();
    crate::device::release_pinned();
    let mut reports = reports;
    reports.sort_by_key(|r| r.layer);
    Ok(reports)
}

/// [`prune_layer`] on the streams' inputs. Out of GPU memory with the activations on the GPU, they move to host
/// memory, where `--offload-activations` would have held them from the start (it changes no pruned byte), and
/// the layer is pruned again; out of memory again (or already offloaded), the error says what the GPU held.
fn prune_or_spill(
    model: &dyn CausalLm,
    i: usize,
    streams: Option<&mut Streams>,
    method: &dyn Method,
    opts: &PipelineOptions,
) -> Result<super::layer::PrunedLayer> {
    let attempt = |s: Option<&Streams>| prune_layer(model, i, s.map(|s| s.inputs()), method, opts);
    let e = match attempt(streams.as_deref()) {
        Err(e) if crate::device::out_of_memory(&e) => e,
        done => return done,
    };
    let held = streams.as_deref().map_or(0, Streams::device_bytes);
    let what = format!("decoder layer {i}");
    let Some(s) = streams.filter(|_| !crate::device::offloading()) else {
        return Err(out_of_memory(e, &what, held));
    };
    // A notice, not a log line: the run goes on differently from how it was asked to.
    eprintln!(
        "layer {i}: out of GPU memory with {} of calibration activations on it: holding them in host memory from \
         here (as --offload-activations does) and pruning the layer again",
        crate::device::gib(held)
    );
    crate::device::set_offload(true);
    s.spill()?;
    crate::device::reset_peak();
    let mut p = attempt(Some(s)).map_err(|e| with_oom_context(e, &what))?;
    p.report.spilled = true;
    Ok(p)
}

/// An error of `what` with the activations already in host memory: out of GPU memory, it says where.
fn with_oom_context(e: anyhow::Error, what: &str) -> anyhow::Error {
    if crate::device::out_of_memory(&e) { out_of_memory(e, what, 0) } else { e }
}

/// An out-of-memory error of `what` (a layer's pruning, or its pass), with the `held` bytes of activations on the
/// GPU ([`crate::device::out_of_memory_in`]).
fn out_of_memory(e: anyhow::Error, what: &str, held: usize) -> anyhow::Error {
    crate::device::out_of_memory_in(e, what, &format!("{} of calibration activations on it", crate::device::gib(held)))
}

/// Where finished layers go, in the order they finish.
struct Walk<'s, 'p> {
    reports: Vec<LayerReport>,
    sink: &'s mut dyn FnMut(usize, &dyn DecoderLayer, &LayerReport) -> Result<()>,
    pb: &'p ProgressBar,
}

impl Walk<'_, '_> {
    /// A layer pruned now: logged, sunk, counted.
    fn pruned(&mut self, i: usize, layer: &dyn DecoderLayer, report: LayerReport) -> Result<()> {
        let peak =
            report.gpu_peak_bytes.map_or(String::new(), |b| format!(", GPU peak {}", crate::device::gib(b as usize)));
        log::info!(
            "layer {i}: {:.1} s (statistics {:.1} s, pruning {:.1} s), output error {:?}{peak}",
            report.seconds,
            report.stats_seconds,
            report.prune_seconds,
            report.output_rel_error
        );
        for o in &report.operators {
            log::debug!(
                "layer {i} {}: sparsity {:.4}, error {:?} (mask only {:?}), {:.2} s",
                o.name,
                o.sparsity,
                o.rel_error,
                o.rel_error_mask_only,
                o.seconds
            );
        }
        (self.sink)(i, layer, &report)?;
        self.done(report);
        Ok(())
    }

    fn done(&mut self, report: LayerReport) {
        self.reports.push(report);
        self.pb.inc(1);
    }
}

/// The calibration activations entering the current layer, as the walk's layer-input mode makes them: the one
/// place the three modes differ.
pub struct Streams {
    mode: LayerInputs,
    /// What the layer gets (`X*`): the pruned stream, or the dense one in the dense walk.
    acts: Vec<Stashed>,
    /// The dense model's activations, the targets of the corrected walk.
    targets: Option<Vec<Stashed>>,
    ctx: LayerContext,
    act_dtype: DType,
    /// What the layers it loads multiply in ([`crate::model::Linear::matmul`]).
    matmul: DType,
}

impl Streams {
    /// The calibration samples embedded (in batches of `walk`'s): the inputs of layer 0.
    pub fn new(model: &dyn CausalLm, calib: &[Vec<u32>], mode: LayerInputs, walk: &WalkOptions) -> Result<Self> {
        let (batch, act_dtype) = (walk.batch, walk.act_dtype.dtype());
        let seqlen = calib.first().map(|s| s.len()).ok_or_else(|| anyhow!("no calibration samples"))?;
        let embed = |samples: &[Vec<u32>]| -> Result<Tensor> {
            let flat: Vec<u32> = samples.iter().flatten().copied().collect();
            model.embed(&Tensor::from_vec(flat, (samples.len(), seqlen), &Device::Cpu)?)
        };
        let acts = embed_batches(&embed, calib, batch.max(1), act_dtype)?;
        let targets = (mode == LayerInputs::Corrected).then(|| acts.clone());
        let matmul = walk.matmul_dtype.dtype();
        Ok(Self { mode, acts, targets, ctx: model.context(seqlen)?, act_dtype, matmul })
    }

    /// Bytes of activations held on a GPU (none once spilled, or on the CPU).
    pub fn device_bytes(&self) -> usize {
        let tensors = self.acts.iter().chain(self.targets.iter().flatten());
        tensors.map(Stashed::gpu_bytes).sum()
    }

    /// Move the activations to where [`stash`] keeps them (host memory, once offloading is on).
    pub fn spill(&mut self) -> Result<()> {
        for t in self.acts.iter_mut().chain(self.targets.iter_mut().flatten()) {
            *t = crate::device::restash(t.clone())?;
        }
        Ok(())
    }

    /// This layer's inputs.
    pub fn inputs(&self) -> Inputs<'_> {
        Inputs { acts: &self.acts, targets: self.targets.as_deref(), ctx: &self.ctx }
    }

    /// Step past layer `i`: through `pruned` for the pruned stream, through the dense layer (`dense`, else
    /// loaded from `model`) for the dense one; `known` holds both layers' outputs on the first batches of the
    /// current inputs, which are taken instead of computed again. Returns the FLOPs spent.
    pub fn advance(
        &mut self,
        model: &dyn CausalLm,
        i: usize,
        pruned: Option<&dyn DecoderLayer>,
        dense: Option<&dyn DecoderLayer>,
        known: Option<&Outputs>,
    ) -> Result<f64> {
        // The dense layer, loaded unless given, where the mode runs the dense stream.
        let loaded = match (self.mode, dense) {
            (LayerInputs::Pruned, _) | (_, Some(_)) => None,
            _ => Some(walk_layer(model, i, self.matmul)?),
        };
        let dense_layer = || dense.or(loaded.as_deref()).ok_or_else(|| anyhow!("layer {i}: no dense layer"));
        let pruned_layer = || pruned.ok_or_else(|| anyhow!("layer {i}: the pruned layer is needed to go on"));
        let (ctx, dt) = (&self.ctx, self.act_dtype);
        let dense_out = format!("output of decoder layer {i}");
        let pruned_out = format!("output of pruned decoder layer {i}");
        let (known_dense, known_pruned) = known.map_or((&[][..], &[][..]), |k| (&k.dense[..], &k.pruned[..]));
        let mut flops = 0.0;
        let (acts, none) = (&mut self.acts, &mut Vec::new());
        match self.mode {
            LayerInputs::Pruned => {
                flops += forward(pruned_layer()?, acts, none, known_pruned, ctx, dt, &pruned_out)?;
            }
            LayerInputs::Dense => flops += forward(dense_layer()?, acts, none, known_dense, ctx, dt, &dense_out)?,
            LayerInputs::Corrected => {
                // The targets are another stream: nothing known of them.
                let targets = self.targets.as_mut().expect("kept in the corrected walk");
                flops += forward(dense_layer()?, targets, acts, &[], ctx, dt, &dense_out)?;
                flops += forward(pruned_layer()?, acts, targets, known_pruned, ctx, dt, &pruned_out)?;
            }
        }
        Ok(flops)
    }
}

/// The calibration samples embedded, in batches of `batch`, where [`stash`] keeps activations. One call for all of
/// them, so that the embedding matrix is read once (it is not kept while the layers are pruned). Out of GPU
/// memory, the activations go to host memory from here (as for a layer's pruning, [`prune_or_spill`]) and each
/// batch is embedded on its own.
fn embed_batches(
    embed: &dyn Fn(&[Vec<u32>]) -> Result<Tensor>,
    calib: &[Vec<u32>],
    batch: usize,
    act_dtype: DType,
) -> Result<Vec<Stashed>> {
    let what = "the embedding of the calibration set";
    match embed(calib) {
        Err(e) if crate::device::out_of_memory(&e) && !crate::device::offloading() => {
            eprintln!(
                "{what}: out of GPU memory: holding the activations in host memory from here (as \
                 --offload-activations does) and embedding one batch at a time"
            );
            crate::device::set_offload(true);
            let one = |b: &[Vec<u32>]| -> Result<Stashed> {
                let x = embed(b).map_err(|e| with_oom_context(e, what))?;
                stash(x.to_dtype(act_dtype)?)
            };
            calib.chunks(batch).map(one).collect()
        }
        all => {
            let all = all.map_err(|e| with_oom_context(e, what))?;
            // On a GPU each batch gets storage of its own: views would keep the whole embedding until the last
            // batch is replaced by the first layer's output (for a 70B model's 128 × 2048 tokens in f32, 8 GiB
            // beside that layer's work). The copies are made while nothing else is on the GPU.
            let own =
                |t: Tensor| if t.device().is_cpu() || t.dtype() != all.dtype() { Ok(t) } else { t.force_contiguous() };
            let starts = (0..calib.len()).step_by(batch);
            starts
                .map(|start| stash(own(all.narrow(0, start, batch.min(calib.len() - start))?.to_dtype(act_dtype)?)?))
                .collect()
        }
    }
}

/// Replace each batch of `acts` by `layer`'s output on it (`known[b]` where given, in f32); `other` is the walk's
/// other stream, if any. Returns the FLOPs spent.
fn forward(
    layer: &dyn DecoderLayer,
    acts: &mut [Stashed],
    other: &mut [Stashed],
    known: &[Stashed],
    ctx: &LayerContext,
    act_dtype: DType,
    what: &str,
) -> Result<f64> {
    let run = |x: &Tensor| layer.forward(&x.to_dtype(DType::F32)?, ctx, None);
    let tokens = forward_batches(acts, other, known, act_dtype, what, &run)?;
    Ok(tokens as f64 * Cost::of(layer, ctx.seqlen).forward())
}

/// [`forward`] with the layer's pass as `run`; returns the tokens it ran. Out of GPU memory with the activations
/// on the GPU, both streams move to host memory (as for a layer's pruning, [`prune_or_spill`]) and the batch runs
/// again: the batches before it are already replaced, so the pass goes on from there.
fn forward_batches(
    acts: &mut [Stashed],
    other: &mut [Stashed],
    known: &[Stashed],
    act_dtype: DType,
    what: &str,
    run: &dyn Fn(&Tensor) -> Result<Tensor>,
) -> Result<usize> {
    let mut tokens = 0;
    for b in 0..acts.len() {
        if let Some(y) = known.get(b) {
            check_finite(&fetch(y)?, what)?;
            // In the stream's dtype already: kept where the stream keeps it, without a round trip through the GPU.
            acts[b] = if y.dtype() == act_dtype {
                crate::device::restash(y.clone())?
            } else {
                stash(fetch(y)?.to_dtype(act_dtype)?)?
            };
            continue;
        }
        tokens += acts[b].dims()[0] * acts[b].dims()[1];
        let x = fetch(&acts[b])?;
        let y = run(&x);
        // Not held through a retry: on the GPU, the batch would be there twice.
        drop(x);
        let y = match y {
            Err(e) if crate::device::out_of_memory(&e) => {
                let held = acts.iter().chain(other.iter()).chain(known).map(Stashed::gpu_bytes).sum();
                if crate::device::offloading() {
                    return Err(out_of_memory(e, what, held));
                }
                eprintln!(
                    "{what}: out of GPU memory with {} of calibration activations on it: holding them in host \
                     memory from here (as --offload-activations does) and going on",
                    crate::device::gib(held)
                );
                crate::device::set_offload(true);
                for t in acts.iter_mut().chain(other.iter_mut()) {
                    *t = crate::device::restash(t.clone())?;
                }
                run(&fetch(&acts[b])?).map_err(|e| with_oom_context(e, what))?
            }
            y => y?,
        };
        check_finite(&y, what)?;
        acts[b] = stash(y.to_dtype(act_dtype)?)?;
    }
    Ok(tokens)
}

/// Decoder layer `i` of `model` as a walk's passes run it: its linear maps multiplying in `matmul`.
pub fn walk_layer(model: &dyn CausalLm, i: usize, matmul: DType) -> Result<Box<dyn DecoderLayer>> {
    let mut layer = model.load_layer(i)?;
    layer.set_matmul_dtype(matmul);
    Ok(layer)
}

/// Visit every decoder layer with the dense model's calibration inputs of it (what OWL measures on), made as
/// `walk` makes them.
pub fn for_each_dense_layer(
    model: &dyn CausalLm,
    calib: &[Vec<u32>],
    walk: &WalkOptions,
    f: &mut dyn FnMut(usize, &dyn DecoderLayer, Inputs) -> Result<()>,
) -> Result<()> {
    let mut streams = Streams::new(model, calib, LayerInputs::Dense, walk)?;
    for i in 0..model.num_layers() {
        let layer = walk_layer(model, i, walk.matmul_dtype.dtype())?;
        f(i, layer.as_ref(), streams.inputs())?;
        if i + 1 < model.num_layers() {
            streams.advance(model, i, None, Some(layer.as_ref()), None)?;
        }
    }
    Ok(())
}

type LayerResult = Result<(usize, Box<dyn DecoderLayer>, LayerReport)>;

/// Several layers pruned at once (dense layer inputs): the walk hands each layer's inputs to `jobs` workers (at
/// most `jobs` inputs wait in the queue, so memory stays bounded), and finished layers go to the sink as they
/// come. Each layer's computation is the same as in the sequential walk, so the result does not depend on
/// `jobs`.
struct Workers {
    jobs: std::sync::mpsc::SyncSender<(usize, Vec<Stashed>)>,
    results: std::sync::mpsc::Receiver<LayerResult>,
}

impl Workers {
    fn start<'s, 'e: 's>(
        scope: &'s std::thread::Scope<'s, 'e>,
        model: &'e dyn CausalLm,
        method: &'e dyn Method,
        opts: &'e PipelineOptions,
        ctx: &LayerContext,
    ) -> Self {
        use std::sync::{Arc, Mutex, mpsc};
        let (job_tx, job_rx) = mpsc::sync_channel::<(usize, Vec<Stashed>)>(opts.jobs);
        let job_rx = Arc::new(Mutex::new(job_rx));
        let (res_tx, res_rx) = mpsc::channel::<LayerResult>();
        for _ in 0..opts.jobs {
            let (job_rx, res_tx, ctx) = (job_rx.clone(), res_tx.clone(), ctx.clone());
            scope.spawn(move || {
                loop {
                    let job = job_rx.lock().expect("job queue").recv();
                    let Ok((i, acts)) = job else { break };
                    let inputs = Inputs { acts: &acts, targets: None, ctx: &ctx };
                    let r = prune_layer(model, i, Some(inputs), method, opts).map(|p| (i, p.work, p.report));
                    if res_tx.send(r).is_err() {
                        break;
                    }
                }
            });
        }
        Self { jobs: job_tx, results: res_rx }
    }

    fn submit(&self, i: usize, acts: Vec<Stashed>) -> Result<()> {
        self.jobs.send((i, acts)).map_err(|_| anyhow!("the pruning workers stopped"))
    }

    /// Hand the layers finished so far to `walk`.
    fn collect(&self, walk: &mut Walk) -> Result<()> {
        while let Ok(r) = self.results.try_recv() {
            let (i, layer, report) = r?;
            walk.pruned(i, layer.as_ref(), report)?;
        }
        Ok(())
    }

    /// No more layers: wait for the ones under way.
    fn finish(self, walk: &mut Walk) -> Result<()> {
        drop(self.jobs);
        for r in self.results {
            let (i, layer, report) = r?;
            walk.pruned(i, layer.as_ref(), report)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prune::sparsegpt::SparseGpt;
    use crate::prune::{OpStats, Pruned};
    use faer::Mat;
    use std::sync::Mutex;

    /// A report or `--resume` fingerprint written before `--matmul-dtype` existed reads as f32: an old run
    /// resumes, and its walk options equal today's defaults.
    #[test]
    fn walk_options_without_a_matmul_dtype_read_as_f32() {
        let mut old = serde_json::to_value(WalkOptions::default()).unwrap();
        assert!(old.as_object_mut().unwrap().remove("matmul_dtype").is_some());
        let read: WalkOptions = serde_json::from_value(old).unwrap();
        assert_eq!(read, WalkOptions::default());
    }

    /// SparseGPT, except that the operators it is handed at the calls numbered in `fail` fail as CUDA does when
    /// the GPU is out of memory.
    struct OutOfMemoryAt {
        fail: Vec<usize>,
        calls: Mutex<usize>,
    }

    impl Method for OutOfMemoryAt {
        fn observes(&self) -> Observes {
            SparseGpt::default().observes()
        }

        fn prune(&self, w: &Mat<f32>, stats: Option<&OpStats>, pattern: Pattern) -> Result<Pruned> {
            let mut calls = self.calls.lock().unwrap();
            *calls += 1;
            anyhow::ensure!(
                !self.fail.contains(&(*calls - 1)),
                "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")"
            );
            SparseGpt::default().prune(w, stats, pattern)
        }
    }

    /// Each layer as the walk finished it: whether it spilled, and its tensors; or the walk's error.
    type Layers = Vec<(bool, Vec<(String, Vec<f32>)>)>;

    fn walk(method: &dyn Method) -> Result<Layers> {
        let ck = crate::model::Checkpoint::open(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/llama").as_ref())?;
        let model = ck.model()?;
        let calib: Vec<Vec<u32>> =
            (0..4).map(|s| (0..24).map(|t| ((s * 131 + t * 17) % 320) as u32).collect()).collect();
        let opts = PipelineOptions {
            walk: WalkOptions { batch: 2, ..Default::default() },
            pattern: Pattern::Unstructured(0.5),
            layer_sparsity: None,
            error_correction: false,
            jobs: 1,
            progress: Progress::Hidden,
            label: "test".into(),
        };
        let mut layers = Vec::new();
        prune_model(model.as_ref(), &calib, method, &opts, &mut |_| Ok(None), &mut |_, layer, report| {
            let tensors = layer.named_tensors().into_iter();
            let tensors = tensors.map(|(n, t)| Ok((n, t.flatten_all()?.to_vec1::<f32>()?))).collect::<Result<_>>()?;
            layers.push((report.spilled, tensors));
            Ok(())
        })?;
        Ok(layers)
    }

    /// Out of GPU memory in the second layer's second operator: the walk moves its activations to host memory
    /// and prunes that layer again, to the same bytes as a walk that never ran out, and its report says so;
    /// out of memory once more, it gives up with an error naming the layer.
    #[test]
    fn out_of_gpu_memory_spills_the_activations_and_prunes_the_layer_again() {
        let _one = crate::device::OFFLOAD_TESTS.lock().unwrap_or_else(|e| e.into_inner());
        crate::device::set_offload(false);
        let plain = walk(&SparseGpt::default()).unwrap();
        let spilled = walk(&OutOfMemoryAt { fail: vec![8], calls: Mutex::new(0) }).unwrap();
        assert!(crate::device::offloading(), "the walk did not turn offloading on");
        assert_eq!(spilled.iter().map(|l| l.0).collect::<Vec<_>>(), [false, true], "the reports");
        let weights = |layers: Layers| layers.into_iter().map(|l| l.1).collect::<Vec<_>>();
        assert_eq!(weights(plain), weights(spilled), "the layer pruned again differs");
        crate::device::set_offload(false);
        let e = walk(&OutOfMemoryAt { fail: vec![8, 10], calls: Mutex::new(0) }).unwrap_err();
        let e = format!("{e:#}");
        assert!(e.contains("decoder layer 1: out of GPU memory") && e.contains("OUT_OF_MEMORY"), "{e}");
        crate::device::set_offload(false);
    }

    /// Out of GPU memory embedding the whole calibration set at once: the activations go to host memory and each
    /// batch is embedded on its own, to the same values.
    #[test]
    fn out_of_gpu_memory_in_the_embedding_embeds_batch_by_batch() {
        let _one = crate::device::OFFLOAD_TESTS.lock().unwrap_or_else(|e| e.into_inner());
        crate::device::set_offload(false);
        let calib: Vec<Vec<u32>> = (0..5).map(|s| (0..4).map(|t| s * 10 + t).collect()).collect();
        let embed = |samples: &[Vec<u32>]| -> Result<Tensor> {
            let flat: Vec<f32> = samples.iter().flatten().map(|&id| id as f32).collect();
            Ok(Tensor::from_vec(flat, (samples.len(), 4, 1), &Device::Cpu)?.repeat((1, 1, 3))?)
        };
        let fails_whole = |samples: &[Vec<u32>]| -> Result<Tensor> {
            anyhow::ensure!(samples.len() <= 2, "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")");
            embed(samples)
        };
        let values = |s: &[Stashed]| -> Vec<Vec<f32>> {
            s.iter().map(|t| fetch(t).unwrap().flatten_all().unwrap().to_vec1().unwrap()).collect()
        };
        let whole = embed_batches(&embed, &calib, 2, DType::F32).unwrap();
        assert!(!crate::device::offloading());
        let batched = embed_batches(&fails_whole, &calib, 2, DType::F32).unwrap();
        assert!(crate::device::offloading(), "the embedding did not turn offloading on");
        assert_eq!(batched.iter().map(|t| t.dims()[0]).collect::<Vec<_>>(), [2, 2, 1]);
        assert_eq!(values(&batched), values(&whole));
        // Already offloaded: out of memory is an error naming the embedding.
        let e = embed_batches(&fails_whole, &calib, 2, DType::F32).err().expect("an error");
        assert!(format!("{e:#}").contains("the embedding of the calibration set: out of GPU memory"), "{e:#}");
        crate::device::set_offload(false);
    }

    /// Out of GPU memory in the pass to the next layer: both streams move to host memory and the pass goes on
    /// from the batch that failed, to the same outputs; out of memory again, the error names the pass.
    #[test]
    fn out_of_gpu_memory_in_the_pass_to_the_next_layer_spills_and_goes_on() {
        let _one = crate::device::OFFLOAD_TESTS.lock().unwrap_or_else(|e| e.into_inner());
        crate::device::set_offload(false);
        let stream = || -> Vec<Stashed> {
            (0..4).map(|k| Tensor::full(k as f32 + 0.5, (2, 3, 4), &Device::Cpu).unwrap().into()).collect()
        };
        let values = |s: &[Stashed]| -> Vec<Vec<f32>> {
            s.iter().map(|t| fetch(t).unwrap().flatten_all().unwrap().to_vec1().unwrap()).collect()
        };
        let double = |x: &Tensor| -> Result<Tensor> { Ok((x * 2.0)?) };
        let (mut plain, mut other) = (stream(), stream());
        assert_eq!(forward_batches(&mut plain, &mut other, &[], DType::F32, "pass", &double).unwrap(), 24);
        assert!(!crate::device::offloading());
        let calls = std::cell::Cell::new(0);
        let fails_third = |x: &Tensor| -> Result<Tensor> {
            calls.set(calls.get() + 1);
            anyhow::ensure!(calls.get() != 3, "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")");
            double(x)
        };
        let (mut acts, mut other) = (stream(), stream());
        assert_eq!(forward_batches(&mut acts, &mut other, &[], DType::F32, "pass", &fails_third).unwrap(), 24);
        assert!(crate::device::offloading(), "the pass did not turn offloading on");
        assert_eq!((calls.get(), values(&acts)), (5, values(&plain)), "calls, and the outputs");
        assert_eq!(values(&other), values(&stream()), "the other stream changed");
        calls.set(0);
        let mut acts = stream();
        let e = forward_batches(&mut acts, &mut [], &[], DType::F32, "output of decoder layer 3", &fails_third);
        let e = format!("{:#}", e.unwrap_err());
        assert!(e.contains("output of decoder layer 3: out of GPU memory") && e.contains("OUT_OF_MEMORY"), "{e}");
        crate::device::set_offload(false);
    }
}
