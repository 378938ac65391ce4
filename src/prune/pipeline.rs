//! The layer walk every layer-wise method shares (METHOD.md §2 and §4.5–4.6).
//!
//! 1. Embed the calibration samples once: the inputs of decoder layer 0.
//! 2. For each decoder layer: run it on its inputs while accumulating the statistics of each operator's input
//!    (one set per shared input: q/k/v, gate/up), prune every operator, then produce the next layer's inputs
//!    (they replace these in place).
//!
//! Two choices shape the walk:
//! - **intra-layer error correction** (FISTAPruner): the operator groups are pruned in data-flow order, each
//!   against the inputs the partially pruned layer gives it (`X*`), with the dense layer's output as the
//!   target (`X`, from the dense layer on the same inputs). Without it (SparseGPT's and Wanda's code) every
//!   operator sees the dense layer's inputs: one statistics pass.
//! - **layer inputs**: `pruned` (SparseGPT / Wanda: the next layer gets the pruned layer's outputs) or `dense`
//!   (FISTAPruner's paper: every layer gets the dense model's inputs, so layers are independent and a range of
//!   them can be pruned alone, or several in parallel).
//!
//! One decoder layer is materialised in f32 at a time (twice when a dense copy is needed as the target); the
//! activations between layers may be held in f16/bf16 (`act_dtype`). Each finished layer goes to a sink.

use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail, ensure};
use candle_core::{DType, Device, Tensor};
use faer::Mat;
use serde::{Deserialize, Serialize};

use super::Method;
use super::mask::{self, Pattern};
use super::stats::{Cross, Gram, OpStats, outlier_token_scales};
use crate::linalg::{mat_to_tensor, tensor_to_mat};
use crate::model::{CausalLm, DecoderLayer, LayerContext};
use crate::util::{Progress, check_finite, progress_bar};

/// Where each layer's calibration inputs come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
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

#[derive(Debug, Clone)]
pub struct PipelineOptions {
    pub pattern: Pattern,
    /// Calibration samples per forward batch.
    pub batch: usize,
    /// Storage type of the activations between layers.
    pub act_dtype: DType,
    pub layer_inputs: LayerInputs,
    pub error_correction: bool,
    /// Prune only these layers (inclusive range; dense inputs only).
    pub layers: Option<(usize, usize)>,
    /// Layers pruned at the same time (dense inputs only); the result does not depend on it.
    pub jobs: usize,
    pub progress: Progress,
    /// Per-layer unstructured sparsity (a non-uniform allocation such as OWL's) instead of `pattern`'s.
    pub layer_sparsity: Option<Vec<f64>>,
    /// Scale outlier tokens down to this many times their sequence's median in every operator's statistics
    /// ([`outlier_token_scales`]); `None`: every token counts as it is (the paper, SparseGPT, Wanda).
    pub token_cap: Option<f64>,
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

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OperatorReport {
    pub layer: usize,
    pub name: String,
    /// (out, in)
    pub shape: [usize; 2],
    /// Measured fraction of exact zeros.
    pub sparsity: f64,
    /// `‖W' X* − W X‖² / ‖W X‖²` on the calibration inputs: the operator's output error against the dense
    /// layer's (with error correction, `X*` are the inputs the partially pruned layer gives it).
    pub rel_error: Option<f64>,
    /// The same error for the dense weight under the final mask, without the method's weight update.
    pub rel_error_mask_only: Option<f64>,
    pub seconds: f64,
    /// Method-specific details (FISTAPruner: λ rounds, warm-start error).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerReport {
    pub layer: usize,
    pub seconds: f64,
    /// Statistics passes.
    pub stats_seconds: f64,
    pub prune_seconds: f64,
    /// Forward pass producing the next layer's inputs.
    pub forward_seconds: f64,
    /// Floating-point operations counted for this layer (statistics passes, Gram matrices, the method, forward).
    pub gflop: f64,
    /// `‖f'(x) − f(x)‖² / ‖f(x) − x‖²`: how much of the dense layer's update `f(x) − x` the pruned layer `f'`
    /// misses, on (up to [`OUTPUT_ERROR_SAMPLES`]) calibration inputs of this layer. The same measure for
    /// every method, unlike the operators' errors.
    pub output_rel_error: Option<f64>,
    pub operators: Vec<OperatorReport>,
}

impl LayerReport {
    /// Measured fraction of zeros over the layer's pruned operators.
    pub fn sparsity(&self) -> f64 {
        let size = |o: &OperatorReport| (o.shape[0] * o.shape[1]) as f64;
        let zeros: f64 = self.operators.iter().map(|o| o.sparsity * size(o)).sum();
        zeros / self.operators.iter().map(size).sum::<f64>().max(1.0)
    }
}

/// Calibration samples the layer output error is measured on.
pub const OUTPUT_ERROR_SAMPLES: usize = 16;

/// See [`LayerReport::output_rel_error`].
fn layer_output_error(
    dense: &dyn DecoderLayer,
    work: &dyn DecoderLayer,
    acts: &[Tensor],
    ctx: &LayerContext,
) -> Result<f64> {
    let (mut num, mut den, mut seen) = (0f64, 0f64, 0usize);
    for x in acts {
        if seen >= OUTPUT_ERROR_SAMPLES {
            break;
        }
        let x = x.to_dtype(DType::F32)?;
        let yd = dense.forward(&x, ctx, None)?;
        let yp = work.forward(&x, ctx, None)?;
        num += (&yp - &yd)?.sqr()?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        den += (&yd - &x)?.sqr()?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        seen += x.dims()[0];
    }
    Ok(num / den.max(f64::MIN_POSITIVE))
}

/// FLOPs of one layer's linear operators and attention per token, split by input group: entry `g` is what a
/// forward pass spends before group `g`'s input is ready; the last entry is the whole layer.
fn prefix_flops(layer: &dyn DecoderLayer, seqlen: usize) -> Vec<f64> {
    let lin = |n: &str| layer.linear(n).map(|l| 2.0 * (l.out_features() * l.in_features()) as f64).unwrap_or(0.0);
    let groups = layer.input_groups();
    // QKᵀ and PV over the (seqlen + 1) / 2 keys a query sees on average; the query width is q_proj's output.
    let width = layer.linear(groups[0][0]).map(|l| l.out_features()).unwrap_or(0) as f64;
    let attn = 2.0 * 2.0 * (seqlen as f64 + 1.0) / 2.0 * width;
    let mut out = Vec::with_capacity(groups.len() + 1);
    let mut acc = 0.0;
    for (gi, g) in groups.iter().enumerate() {
        out.push(acc);
        acc += g.iter().map(|n| lin(n)).sum::<f64>();
        if gi == 0 {
            acc += attn;
        }
    }
    out.push(acc);
    out
}

/// An error a capture hook raises to stop the forward pass once it has what it needs.
#[derive(Debug)]
struct StopCapture;

impl std::fmt::Display for StopCapture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("capture stopped")
    }
}

impl std::error::Error for StopCapture {}

/// The input `layer` gives operator group `leader` on `x` (the pass stops there).
fn capture_input(layer: &dyn DecoderLayer, x: &Tensor, ctx: &LayerContext, leader: &str) -> Result<Tensor> {
    let mut got = None;
    let mut hook = |name: &str, inp: &Tensor| -> Result<()> {
        if name == leader {
            got = Some(inp.clone());
            return Err(StopCapture.into());
        }
        Ok(())
    };
    match layer.capture(x, ctx, &mut hook) {
        Err(e) if e.is::<StopCapture>() => {}
        Err(e) => return Err(e),
        Ok(()) => {}
    }
    got.ok_or_else(|| anyhow!("the layer never reported an input for {leader}"))
}

/// Statistics of every group from one pass of the dense layer (no error correction: `X* = X`).
fn collect_dense(
    layer: &dyn DecoderLayer,
    acts: &[Tensor],
    ctx: &LayerContext,
    cap: Option<f64>,
) -> Result<Vec<OpStats>> {
    let groups = layer.input_groups();
    let mut grams: Vec<Option<Gram>> = (0..groups.len()).map(|_| None).collect();
    for x in acts {
        let x = x.to_dtype(DType::F32)?;
        let mut hook = |name: &str, inp: &Tensor| -> Result<()> {
            if let Some(gi) = groups.iter().position(|g| g[0] == name) {
                let n = inp.dim(candle_core::D::Minus1)?;
                let gram = grams[gi].get_or_insert_with(|| Gram::new(n));
                match cap {
                    Some(k) => gram.add(&inp.broadcast_mul(&outlier_token_scales(inp, k)?)?)?,
                    None => gram.add(inp)?,
                }
            }
            Ok(())
        };
        layer.capture(&x, ctx, &mut hook)?;
    }
    grams
        .into_iter()
        .zip(groups.iter())
        .map(|(g, names)| {
            let g = g.ok_or_else(|| anyhow!("no statistics were collected for {}", names[0]))?;
            let tokens = g.tokens;
            let st = OpStats { gram: g.finish(), cross: None, dense: None, tokens };
            st.check_finite(&format!("input of {}", names.join(", ")))?;
            Ok(st)
        })
        .collect()
}

/// Each calibration batch's input of the previous operator group: (partially pruned layer, dense layer; `None`
/// where the two were the same), from which the layer may step to the next group's input.
type GroupInputs = Vec<(Tensor, Option<Tensor>)>;

/// Statistics of group `gi` with error correction: `X*` from the partially pruned layer `work` on `acts`, `X`
/// from the dense layer `dense` on `targets` (the dense model's activations) or else on the same `acts`.
/// `prev` holds the previous group's inputs (empty for the first group) and is replaced by this group's when
/// `keep` (the next group steps from them instead of rerunning the layer up to there).
#[allow(clippy::too_many_arguments)]
fn collect_corrected(
    dense: &dyn DecoderLayer,
    work: &dyn DecoderLayer,
    gi: usize,
    acts: &[Tensor],
    targets: Option<&[Tensor]>,
    ctx: &LayerContext,
    prev: &mut GroupInputs,
    keep: Option<DType>,
    cap: Option<f64>,
) -> Result<(OpStats, bool)> {
    let leader = dense.input_groups()[gi][0];
    let mut gram: Option<Gram> = None;
    let mut cross: Option<Cross> = None;
    let mut dgram: Option<Gram> = None;
    let mut next = GroupInputs::new();
    let stepped = std::cell::Cell::new(false);
    // The input of this group for layer `l` on `x`, stepping from the previous group's when it can.
    let input = |l: &dyn DecoderLayer, x: &Tensor, p: Option<&Tensor>| -> Result<Tensor> {
        if let Some(p) = p
            && let Some(t) = l.next_group_input(gi, x, &p.to_dtype(DType::F32)?)?
        {
            stepped.set(true);
            return Ok(t);
        }
        capture_input(l, x, ctx, leader)
    };
    for (b, x) in acts.iter().enumerate() {
        let x = x.to_dtype(DType::F32)?;
        let p = prev.get(b);
        let xs = input(work, &x, p.map(|p| &p.0))?;
        let n = xs.dim(candle_core::D::Minus1)?;
        // Before any operator is pruned the two inputs are the same, unless the targets come from elsewhere.
        let xd = if gi > 0 || targets.is_some() {
            let xt = match targets {
                Some(t) => t[b].to_dtype(DType::F32)?,
                None => x.clone(),
            };
            Some(input(dense, &xt, p.map(|p| p.1.as_ref().unwrap_or(&p.0)))?)
        } else {
            None
        };
        // One scale per token for X and X* alike (from the dense input), so the three sums stay one objective.
        let scale = cap.map(|k| outlier_token_scales(xd.as_ref().unwrap_or(&xs), k)).transpose()?;
        let scaled = |t: &Tensor| -> Result<Tensor> {
            Ok(match &scale {
                Some(s) => t.broadcast_mul(s)?,
                None => t.clone(),
            })
        };
        let xs_w = scaled(&xs)?;
        gram.get_or_insert_with(|| Gram::new(n)).add(&xs_w)?;
        if let Some(xd) = &xd {
            let xd_w = scaled(xd)?;
            cross.get_or_insert_with(|| Cross::new(n)).add(&xd_w, &xs_w)?;
            dgram.get_or_insert_with(|| Gram::new(n)).add(&xd_w)?;
        }
        if let Some(dt) = keep {
            next.push((xs.to_dtype(dt)?, xd.map(|t| t.to_dtype(dt)).transpose()?));
        }
    }
    *prev = next;
    let g = gram.ok_or_else(|| anyhow!("no calibration batches"))?;
    let tokens = g.tokens;
    let st = OpStats { gram: g.finish(), cross: cross.map(|c| c.c), dense: dgram.map(Gram::finish), tokens };
    st.check_finite(&format!("input of {}", dense.input_groups()[gi].join(", ")))?;
    Ok((st, stepped.get()))
}

/// Prune one operator of `layer` given its input statistics (if the method uses them); returns its report.
pub fn prune_operator(
    layer: &mut dyn DecoderLayer,
    layer_idx: usize,
    name: &str,
    stats: Option<&OpStats>,
    method: &dyn Method,
    pattern: Pattern,
) -> Result<OperatorReport> {
    let t0 = Instant::now();
    let lin = layer.linear(name).ok_or_else(|| anyhow!("layer {layer_idx}: no operator {name}"))?;
    let w = tensor_to_mat(&lin.weight)?;
    let (rows, cols) = w.shape();
    pattern.check_cols(cols, &format!("layer {layer_idx} {name}"))?;
    let pruned = method.prune(&w, stats, pattern).with_context(|| format!("layer {layer_idx} {name}"))?;
    let pw = &pruned.w;
    if let Some((i, j)) = (0..cols).flat_map(|j| (0..rows).map(move |i| (i, j))).find(|&(i, j)| !pw[(i, j)].is_finite())
    {
        bail!("layer {layer_idx} {name}: {} produced a non-finite weight at ({i}, {j})", method.name());
    }
    let sparsity = mask::verify(pw, pattern, method.rounding_units(rows, cols, pattern))
        .with_context(|| format!("layer {layer_idx} {name}: the pruned weight misses the pattern {pattern}"))?;
    let (rel_error, rel_error_mask_only) = match stats {
        Some(st) => {
            let c = st.target(&w);
            let p = st.problem(&w, &c);
            let base = p.k.max(f64::MIN_POSITIVE);
            let masked = Mat::from_fn(rows, cols, |i, j| if pw[(i, j)] == 0.0 { 0.0 } else { w[(i, j)] });
            (Some(p.error(pw) / base), Some(p.error(&masked) / base))
        }
        None => (None, None),
    };
    layer.linear_mut(name).expect("checked above").weight = mat_to_tensor(pw)?;
    Ok(OperatorReport {
        layer: layer_idx,
        name: name.to_string(),
        shape: [rows, cols],
        sparsity,
        rel_error,
        rel_error_mask_only,
        seconds: t0.elapsed().as_secs_f64(),
        details: pruned.details,
    })
}

/// Embed the calibration samples in batches: the inputs of layer 0.
pub fn embed_calibration(
    model: &dyn CausalLm,
    ids: &[Vec<u32>],
    batch: usize,
    act_dtype: DType,
) -> Result<Vec<Tensor>> {
    let seqlen = ids[0].len();
    ids.chunks(batch.max(1))
        .map(|b| {
            let flat: Vec<u32> = b.iter().flatten().copied().collect();
            let t = Tensor::from_vec(flat, (b.len(), seqlen), &Device::Cpu)?;
            Ok(model.embed(&t)?.to_dtype(act_dtype)?)
        })
        .collect()
}

/// Replace each batch of `acts` by `layer`'s output on it.
pub fn advance(
    layer: &dyn DecoderLayer,
    acts: &mut [Tensor],
    ctx: &LayerContext,
    act_dtype: DType,
    what: &str,
) -> Result<()> {
    for x in acts.iter_mut() {
        let y = layer.forward(&x.to_dtype(DType::F32)?, ctx, None)?;
        check_finite(&y, what)?;
        *x = y.to_dtype(act_dtype)?;
    }
    Ok(())
}

/// Prune one layer given its calibration inputs; returns the pruned layer and its report.
fn prune_layer(
    model: &dyn CausalLm,
    i: usize,
    acts: Option<&[Tensor]>,
    targets: Option<&[Tensor]>,
    ctx: Option<&LayerContext>,
    method: &dyn Method,
    opts: &PipelineOptions,
) -> Result<(Box<dyn DecoderLayer>, Option<Box<dyn DecoderLayer>>, LayerReport)> {
    let t0 = Instant::now();
    let mut work = model.load_layer(i)?;
    // A NaN or Inf in a weight would only surface later as unusable statistics: name it here.
    for (name, t) in work.named_tensors() {
        check_finite(&t, &format!("decoder layer {i}: weight {name}"))?;
    }
    // A dense copy is the target with error correction, and produces the next inputs in dense mode.
    let needs_dense = acts.is_some() && (opts.error_correction || opts.layer_inputs != LayerInputs::Pruned);
    let dense = if needs_dense { Some(model.load_layer(i)?) } else { None };
    let groups = work.input_groups();
    let mut operators = Vec::new();
    let (mut stats_seconds, mut prune_seconds) = (0.0, 0.0);
    let mut flops: f64 = 0.0;
    let seqlen = ctx.map(|c| c.seqlen).unwrap_or(0);
    let tokens = acts.map(|a| a.iter().map(|t| t.dims()[0] * t.dims()[1]).sum::<usize>()).unwrap_or(0) as f64;
    let pre = prefix_flops(work.as_ref(), seqlen.max(1));
    let in_dim =
        |layer: &dyn DecoderLayer, g: usize| layer.linear(groups[g][0]).map(|l| l.in_features()).unwrap_or(0) as f64;
    match (acts, ctx) {
        (Some(acts), Some(ctx)) if opts.error_correction || targets.is_some() => {
            let dense = dense.as_deref().expect("loaded");
            let mut prev = GroupInputs::new();
            for (gi, group) in groups.iter().enumerate() {
                let ts = Instant::now();
                let keep = (gi + 1 < groups.len()).then_some(opts.act_dtype);
                let (st, stepped) =
                    collect_corrected(dense, work.as_ref(), gi, acts, targets, ctx, &mut prev, keep, opts.token_cap)
                        .with_context(|| format!("decoder layer {i}"))?;
                stats_seconds += ts.elapsed().as_secs_f64();
                let n = in_dim(work.as_ref(), gi);
                // The layer's FLOPs up to this group's input (from the previous group's when stepping), once
                // for the pruned layer and once for the dense one; G*, XX*ᵀ and XXᵀ.
                let reach = if stepped { pre[gi] - pre[gi - 1] } else { pre[gi] };
                flops += tokens * if gi == 0 && targets.is_none() { pre[0] + n * n } else { 2.0 * reach + 4.0 * n * n };
                let tp = Instant::now();
                for name in group.iter() {
                    operators.push(prune_operator(work.as_mut(), i, name, Some(&st), method, opts.pattern_for(i))?);
                }
                prune_seconds += tp.elapsed().as_secs_f64();
            }
        }
        (Some(acts), Some(ctx)) => {
            let ts = Instant::now();
            let stats = collect_dense(dense.as_deref().unwrap_or(work.as_ref()), acts, ctx, opts.token_cap)
                .with_context(|| format!("decoder layer {i}"))?;
            stats_seconds = ts.elapsed().as_secs_f64();
            flops += tokens
                * (pre[groups.len() - 1] + (0..groups.len()).map(|g| in_dim(work.as_ref(), g).powi(2)).sum::<f64>());
            let tp = Instant::now();
            for (group, st) in groups.iter().zip(&stats) {
                for name in group.iter() {
                    operators.push(prune_operator(work.as_mut(), i, name, Some(st), method, opts.pattern_for(i))?);
                }
            }
            prune_seconds = tp.elapsed().as_secs_f64();
        }
        _ => {
            let tp = Instant::now();
            for group in groups {
                for name in group.iter() {
                    operators.push(prune_operator(work.as_mut(), i, name, None, method, opts.pattern_for(i))?);
                }
            }
            prune_seconds = tp.elapsed().as_secs_f64();
        }
    }
    flops += operators.iter().map(|o| method.flops(o.shape[0], o.shape[1])).sum::<f64>();
    let dense = match (&dense, acts) {
        (None, Some(_)) => Some(model.load_layer(i)?),
        _ => dense,
    };
    let output_rel_error = match (acts, ctx, &dense) {
        (Some(a), Some(c), Some(d)) => Some(layer_output_error(d.as_ref(), work.as_ref(), a, c)?),
        _ => None,
    };
    let report = LayerReport {
        layer: i,
        seconds: t0.elapsed().as_secs_f64(),
        stats_seconds,
        prune_seconds,
        forward_seconds: 0.0,
        gflop: flops / 1e9,
        output_rel_error,
        operators,
    };
    Ok((work, dense, report))
}

/// A layer an earlier, interrupted run already pruned: its weights and its report.
pub type FinishedLayer = (Box<dyn DecoderLayer>, LayerReport);

/// Walk the decoder layers of `model`, pruning each with `method`; every finished layer goes to `sink` with its
/// report.
/// `finished(i)` gives layer `i` as an interrupted run left it, if it did: that layer is not pruned again,
/// only run forward (where the walk needs its outputs), so a resumed run ends where an uninterrupted one
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
    let (first, last) = opts.layers.unwrap_or((0, n_layers.saturating_sub(1)));
    ensure!(first <= last && last < n_layers, "--layers {first}-{last}: the model has layers 0-{}", n_layers - 1);
    if (first, last) != (0, n_layers - 1) {
        ensure!(
            opts.layer_inputs == LayerInputs::Dense,
            "--layers needs --layer-inputs dense (layers are then independent)"
        );
    }
    let needs_data = method.needs_gram();
    let (mut acts, ctx) = if needs_data {
        let seqlen = calib.first().map(|s| s.len()).ok_or_else(|| anyhow!("no calibration samples"))?;
        (embed_calibration(model, calib, opts.batch, opts.act_dtype)?, Some(model.context(seqlen)?))
    } else {
        (Vec::new(), None)
    };
    let pb = progress_bar((last + 1 - first) as u64, method.name(), opts.progress);
    if let Some(ctx) = &ctx
        && opts.jobs > 1
    {
        ensure!(
            opts.layer_inputs == LayerInputs::Dense,
            "--jobs needs --layer-inputs dense (layers are then independent)"
        );
        let reports = prune_parallel(model, acts, ctx, method, opts, (first, last), finished, sink, &pb)?;
        pb.finish_and_clear();
        return Ok(reports);
    }
    // The dense model's activations, the targets of the corrected walk.
    let mut targets = (opts.layer_inputs == LayerInputs::Corrected && ctx.is_some()).then(|| acts.clone());
    let mut reports = Vec::new();
    for i in 0..=last {
        if i < first {
            // Dense inputs of the layers before the range.
            if let Some(ctx) = &ctx {
                advance(
                    model.load_layer(i)?.as_ref(),
                    &mut acts,
                    ctx,
                    opts.act_dtype,
                    &format!("output of decoder layer {i}"),
                )?;
            }
            continue;
        }
        if let Some((work, report)) = finished(i)? {
            log::info!("layer {i}: pruned by the interrupted run, reloaded");
            // Pruned before the interruption: only its outputs are needed, as the walk below makes them.
            if let Some(ctx) = &ctx
                && i < last
            {
                if opts.layer_inputs != LayerInputs::Pruned {
                    let d = model.load_layer(i)?;
                    let t = if opts.layer_inputs == LayerInputs::Dense {
                        &mut acts
                    } else {
                        targets.as_mut().expect("corrected")
                    };
                    advance(d.as_ref(), t, ctx, opts.act_dtype, &format!("output of decoder layer {i}"))?;
                }
                if opts.layer_inputs != LayerInputs::Dense {
                    advance(
                        work.as_ref(),
                        &mut acts,
                        ctx,
                        opts.act_dtype,
                        &format!("output of pruned decoder layer {i}"),
                    )?;
                }
            }
            reports.push(report);
            pb.inc(1);
            continue;
        }
        let data = needs_data.then_some(acts.as_slice());
        let (work, dense, mut report) = prune_layer(model, i, data, targets.as_deref(), ctx.as_ref(), method, opts)?;
        let t2 = Instant::now();
        if let Some(ctx) = &ctx
            && i < last
        {
            let tokens: usize = acts.iter().map(|t| t.dims()[0] * t.dims()[1]).sum();
            report.gflop +=
                tokens as f64 * prefix_flops(work.as_ref(), ctx.seqlen).last().copied().unwrap_or(0.0) / 1e9;
            match opts.layer_inputs {
                LayerInputs::Pruned => advance(
                    work.as_ref(),
                    &mut acts,
                    ctx,
                    opts.act_dtype,
                    &format!("output of pruned decoder layer {i}"),
                )?,
                LayerInputs::Corrected => {
                    let d = dense.as_deref().expect("dense copy loaded in corrected mode");
                    let t = targets.as_mut().expect("targets kept in corrected mode");
                    advance(d, t, ctx, opts.act_dtype, &format!("output of decoder layer {i}"))?;
                    report.gflop += tokens as f64 * prefix_flops(d, ctx.seqlen).last().copied().unwrap_or(0.0) / 1e9;
                    advance(
                        work.as_ref(),
                        &mut acts,
                        ctx,
                        opts.act_dtype,
                        &format!("output of pruned decoder layer {i}"),
                    )?
                }
                LayerInputs::Dense => {
                    let d = dense.as_deref().expect("dense copy loaded in dense mode");
                    advance(d, &mut acts, ctx, opts.act_dtype, &format!("output of decoder layer {i}"))?
                }
            }
        }
        report.forward_seconds = t2.elapsed().as_secs_f64();
        report.seconds += report.forward_seconds;
        log::info!(
            "layer {i}: {:.1} s (statistics {:.1} s, pruning {:.1} s), output error {:?}",
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
        sink(i, work.as_ref(), &report)?;
        reports.push(report);
        pb.inc(1);
    }
    pb.finish_and_clear();
    Ok(reports)
}

type LayerResult = Result<(usize, Box<dyn DecoderLayer>, LayerReport)>;

/// Dense layer inputs, several layers at once: this thread walks the dense model and hands each layer's
/// inputs to `opts.jobs` workers (at most `jobs` inputs wait in the queue, so memory stays bounded); finished
/// layers go to `sink` as they come. Each layer's computation is the same as in the sequential walk, so the
/// result does not depend on `jobs`.
#[allow(clippy::too_many_arguments)]
fn prune_parallel(
    model: &dyn CausalLm,
    mut acts: Vec<Tensor>,
    ctx: &LayerContext,
    method: &dyn Method,
    opts: &PipelineOptions,
    (first, last): (usize, usize),
    finished: &mut dyn FnMut(usize) -> Result<Option<FinishedLayer>>,
    sink: &mut dyn FnMut(usize, &dyn DecoderLayer, &LayerReport) -> Result<()>,
    pb: &crate::util::ProgressBar,
) -> Result<Vec<LayerReport>> {
    use std::sync::{Arc, Mutex, mpsc};
    std::thread::scope(|scope| {
        let (job_tx, job_rx) = mpsc::sync_channel::<(usize, Vec<Tensor>)>(opts.jobs);
        let job_rx = Arc::new(Mutex::new(job_rx));
        let (res_tx, res_rx) = mpsc::channel::<LayerResult>();
        for _ in 0..opts.jobs {
            let (job_rx, res_tx) = (job_rx.clone(), res_tx.clone());
            scope.spawn(move || {
                loop {
                    let job = job_rx.lock().expect("job queue").recv();
                    let Ok((i, inputs)) = job else { break };
                    let r = prune_layer(model, i, Some(&inputs), None, Some(ctx), method, opts)
                        .map(|(w, _, rep)| (i, w, rep));
                    if res_tx.send(r).is_err() {
                        break;
                    }
                }
            });
        }
        drop(res_tx);
        let mut reports = Vec::new();
        let mut resumed = Vec::new();
        let mut handle = |r: LayerResult| -> Result<()> {
            let (i, layer, report) = r?;
            sink(i, layer.as_ref(), &report)?;
            reports.push(report);
            pb.inc(1);
            Ok(())
        };
        for i in 0..=last {
            if i >= first {
                // Layers are independent here: one an interrupted run finished needs nothing more.
                if let Some((_, report)) = finished(i)? {
                    resumed.push(report);
                    pb.inc(1);
                } else {
                    job_tx.send((i, acts.clone())).map_err(|_| anyhow!("the pruning workers stopped"))?;
                }
            }
            if i < last {
                let dense = model.load_layer(i)?;
                advance(dense.as_ref(), &mut acts, ctx, opts.act_dtype, &format!("output of decoder layer {i}"))?;
            }
            while let Ok(r) = res_rx.try_recv() {
                handle(r)?;
            }
        }
        drop(job_tx);
        for r in res_rx {
            handle(r)?;
        }
        reports.extend(resumed);
        reports.sort_by_key(|r| r.layer);
        Ok(reports)
    })
}
