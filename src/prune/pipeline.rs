//! The layer walk every layer-wise method shares (METHOD.md §2), as SparseGPT's and Wanda's code do it:
//!
//! 1. embed the calibration samples once: the inputs of decoder layer 0;
//! 2. for each decoder layer: run it on its inputs, accumulating the Gram matrix of each operator's input
//!    (one per shared input: q/k/v, gate/up); prune every operator; run the pruned layer to produce the next
//!    layer's inputs (which replace these in place).
//!
//! One decoder layer is materialised in f32 at a time; the activations between layers may be held in f16 or
//! bf16 (`act_dtype`) to halve their memory. Each finished layer goes to a sink (which writes it to disk).

use std::collections::HashMap;
use std::time::Instant;

use anyhow::{Context, Result, anyhow};
use candle_core::{DType, Device, Tensor};
use faer::Mat;
use serde::Serialize;

use super::mask::{self, Pattern};
use super::stats::{Gram, quad_error};
use super::Method;
use crate::linalg::{mat_to_tensor, tensor_to_mat};
use crate::model::{CausalLm, DecoderLayer, LayerContext};
use crate::util::{check_finite, progress_bar};

#[derive(Debug, Clone)]
pub struct PipelineOptions {
    pub pattern: Pattern,
    /// Calibration samples per forward batch.
    pub batch: usize,
    /// Storage type of the activations between layers.
    pub act_dtype: DType,
    pub progress: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct OperatorReport {
    pub layer: usize,
    pub name: String,
    /// (out, in)
    pub shape: [usize; 2],
    /// Measured fraction of exact zeros.
    pub sparsity: f64,
    /// `‖(W' − W) X‖² / ‖W X‖²` on the calibration inputs the operator saw.
    pub rel_error: Option<f64>,
    /// The same error for the dense weight under the final mask, without the method's weight update.
    pub rel_error_mask_only: Option<f64>,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct LayerReport {
    pub layer: usize,
    pub seconds: f64,
    /// Forward pass with statistics.
    pub stats_seconds: f64,
    pub prune_seconds: f64,
    /// Forward pass of the pruned layer (next layer's inputs).
    pub forward_seconds: f64,
    /// Floating-point operations counted for this layer (statistics pass, Gram matrices, the method, forward).
    pub gflop: f64,
    pub operators: Vec<OperatorReport>,
}

/// FLOPs of one layer's work on `tokens` tokens in windows of `seqlen`: (statistics pass without the last
/// projection, Gram matrices (lower triangles), forward pass).
pub fn layer_flops(layer: &dyn DecoderLayer, tokens: usize, seqlen: usize) -> (f64, f64, f64) {
    let lin = |n: &str| layer.linear(n).map(|l| 2.0 * (l.out_features() * l.in_features()) as f64).unwrap_or(0.0);
    let names = layer.linear_names();
    let all: f64 = names.iter().map(|n| lin(n)).sum();
    let last = names.last().map(|n| lin(n)).unwrap_or(0.0);
    // QKᵀ and PV over the (seqlen + 1) / 2 keys a query sees on average; the query width is q_proj's output.
    let width = layer.linear(names[0]).map(|l| l.out_features()).unwrap_or(0) as f64;
    let attn = 2.0 * 2.0 * (seqlen as f64 + 1.0) / 2.0 * width;
    let gram: f64 = layer
        .input_groups()
        .iter()
        .map(|g| layer.linear(g[0]).map(|l| (l.in_features() * l.in_features()) as f64).unwrap_or(0.0))
        .sum();
    let t = tokens as f64;
    (t * (all - last + attn), t * gram, t * (all + attn))
}

/// Prune one operator given its input Gram (if the method uses one); returns its report.
pub fn prune_operator(
    layer: &mut dyn DecoderLayer,
    layer_idx: usize,
    name: &str,
    gram: Option<&Mat<f32>>,
    method: &dyn Method,
    pattern: Pattern,
) -> Result<OperatorReport> {
    let t0 = Instant::now();
    let lin = layer.linear(name).ok_or_else(|| anyhow!("layer {layer_idx}: no operator {name}"))?;
    let w = tensor_to_mat(&lin.weight)?;
    let (rows, cols) = w.shape();
    pattern.check_cols(cols, &format!("layer {layer_idx} {name}"))?;
    let pruned = method.prune(&w, gram, pattern).with_context(|| format!("layer {layer_idx} {name}"))?;
    if let Some((i, j)) = (0..cols).flat_map(|j| (0..rows).map(move |i| (i, j))).find(|&(i, j)| !pruned[(i, j)].is_finite()) {
        anyhow::bail!("layer {layer_idx} {name}: {} produced a non-finite weight at ({i}, {j})", method.name());
    }
    let sparsity = mask::verify(&pruned, pattern, method.rounding_units(rows, cols, pattern))
        .with_context(|| format!("layer {layer_idx} {name}: the pruned weight misses the pattern {pattern}"))?;
    let (rel_error, rel_error_mask_only) = match gram {
        Some(g) => {
            let base = quad_error(w.as_ref(), g.as_ref()).max(f64::MIN_POSITIVE);
            let masked = Mat::from_fn(rows, cols, |i, j| if pruned[(i, j)] == 0.0 { 0.0 } else { w[(i, j)] });
            (
                Some(quad_error((&pruned - &w).as_ref(), g.as_ref()) / base),
                Some(quad_error((&masked - &w).as_ref(), g.as_ref()) / base),
            )
        }
        None => (None, None),
    };
    layer.linear_mut(name).expect("checked above").weight = mat_to_tensor(&pruned)?;
    Ok(OperatorReport {
        layer: layer_idx,
        name: name.to_string(),
        shape: [rows, cols],
        sparsity,
        rel_error,
        rel_error_mask_only,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// Run `layer` over every batch of `acts`, accumulating one Gram per input group (keyed by the group's
/// first operator).
pub fn collect_grams(
    layer: &dyn DecoderLayer,
    acts: &[Tensor],
    ctx: &LayerContext,
) -> Result<HashMap<&'static str, Gram>> {
    let groups = layer.input_groups();
    let mut grams: HashMap<&'static str, Gram> = HashMap::new();
    for x in acts {
        let x = x.to_dtype(DType::F32)?;
        let mut hook = |name: &str, inp: &Tensor| -> Result<()> {
            if let Some(g) = groups.iter().find(|g| g[0] == name) {
                let n = inp.dim(candle_core::D::Minus1)?;
                grams.entry(g[0]).or_insert_with(|| Gram::new(n)).add(inp)?;
            }
            Ok(())
        };
        layer.capture(&x, ctx, &mut hook)?;
    }
    Ok(grams)
}

/// Embed the calibration samples in batches: the inputs of layer 0.
pub fn embed_calibration(model: &dyn CausalLm, ids: &[Vec<u32>], batch: usize, act_dtype: DType) -> Result<Vec<Tensor>> {
    let seqlen = ids[0].len();
    ids.chunks(batch.max(1))
        .map(|b| {
            let flat: Vec<u32> = b.iter().flatten().copied().collect();
            let t = Tensor::from_vec(flat, (b.len(), seqlen), &Device::Cpu)?;
            Ok(model.embed(&t)?.to_dtype(act_dtype)?)
        })
        .collect()
}

/// The sequential layer walk: prune every decoder layer of `model` with `method`, giving each finished layer
/// to `sink`.
pub fn prune_sequential(
    model: &dyn CausalLm,
    calib: &[Vec<u32>],
    method: &dyn Method,
    opts: &PipelineOptions,
    sink: &mut dyn FnMut(usize, &dyn DecoderLayer) -> Result<()>,
) -> Result<Vec<LayerReport>> {
    let n_layers = model.num_layers();
    let needs_data = method.needs_gram();
    let (mut acts, ctx) = if needs_data {
        let seqlen = calib.first().map(|s| s.len()).ok_or_else(|| anyhow!("no calibration samples"))?;
        (embed_calibration(model, calib, opts.batch, opts.act_dtype)?, Some(model.context(seqlen)?))
    } else {
        (Vec::new(), None)
    };
    let pb = progress_bar(n_layers as u64, method.name(), opts.progress);
    let mut reports = Vec::with_capacity(n_layers);
    for i in 0..n_layers {
        let t0 = Instant::now();
        let mut layer = model.load_layer(i)?;
        let mut grams = match &ctx {
            Some(ctx) => collect_grams(layer.as_ref(), &acts, ctx).with_context(|| format!("decoder layer {i}"))?,
            None => HashMap::new(),
        };
        let stats_seconds = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        let mut operators = Vec::new();
        for group in layer.input_groups() {
            let g = grams.remove(group[0]).map(Gram::finish);
            if needs_data && g.is_none() {
                anyhow::bail!("decoder layer {i}: no statistics were collected for {}", group[0]);
            }
            for name in group.iter() {
                operators.push(prune_operator(layer.as_mut(), i, name, g.as_ref(), method, opts.pattern)?);
            }
        }
        let prune_seconds = t1.elapsed().as_secs_f64();
        let t2 = Instant::now();
        if let Some(ctx) = &ctx {
            for x in acts.iter_mut() {
                let y = layer.forward(&x.to_dtype(DType::F32)?, ctx, None)?;
                check_finite(&y, &format!("output of pruned decoder layer {i}"))?;
                *x = y.to_dtype(opts.act_dtype)?;
            }
        }
        let forward_seconds = t2.elapsed().as_secs_f64();
        let mut flops: f64 = operators.iter().map(|o| method.flops(o.shape[0], o.shape[1])).sum();
        if ctx.is_some() {
            let tokens = calib.len() * calib[0].len();
            let (capture, gram, forward) = layer_flops(layer.as_ref(), tokens, calib[0].len());
            flops += capture + gram + forward;
        }
        sink(i, layer.as_ref())?;
        reports.push(LayerReport {
            layer: i,
            seconds: t0.elapsed().as_secs_f64(),
            stats_seconds,
            prune_seconds,
            forward_seconds,
            gflop: flops / 1e9,
            operators,
        });
        pb.inc(1);
    }
    pb.finish_and_clear();
    Ok(reports)
}
