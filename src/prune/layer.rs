//! One decoder layer's pruning: the statistics passes over its calibration inputs (one pass, or group by
//! group with intra-layer error correction), each operator pruned by the method, and the layer's report, with
//! its time and FLOPs counted in one place (`Ledger`, [`Cost`]).
//!
//! With **intra-layer error correction** (FISTAPruner) the operator groups are pruned in data-flow order, each
//! against the inputs the partially pruned layer gives it (`X*`), with the dense layer's output as the target
//! (`X`, from the dense layer on the same inputs, or on the dense model's activations in the corrected walk).
//! Without it (SparseGPT's and Wanda's code) every operator sees the dense layer's inputs: one statistics pass.

use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use super::Method;
use super::mask::{self, Pattern};
use super::pipeline::{LayerInputs, PipelineOptions};
use super::stats::{Copies, Cross, Gram, OpStats, SquareSums, outlier_token_scales, sum_squares};
use crate::device::{Stashed, fetch, stash};
use crate::linalg::{mat_to_tensor, matmul_nt, sum_by_rows, tensor_to_mat};
use crate::model::{CausalLm, DecoderLayer, LayerContext};
use crate::util::{available_memory, check_finite};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OperatorReport {
    pub layer: usize,
    pub name: String,
    /// (out, in)
    pub shape: [usize; 2],
    /// Measured fraction of exact zeros.
    pub sparsity: f64,
    /// `‖W' X* − W X‖² / ‖W X‖²` on the calibration inputs: the operator's output error against the dense
    /// layer's (with error correction, `X*` are the inputs the partially pruned layer gives it). Absent where
    /// no `X*ᵀX*` was collected (magnitude; Wanda without error correction).
    pub rel_error: Option<f64>,
    /// The same error for the dense weight under the final mask, without the method's weight update.
    pub rel_error_mask_only: Option<f64>,
    pub seconds: f64,
    /// Floating-point operations the method counted for itself.
    #[serde(default)]
    pub gflop: f64,
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
    /// The GPU ran out of memory on this layer with the activations on it: the walk moved them to host memory
    /// (as `--offload-activations` does, for this layer and the rest) and pruned the layer again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub spilled: bool,
    /// Error correction's kept group inputs went to host memory: on the GPU they would have taken over half its
    /// free memory, or the walk holds its activations there (`--offload-activations`, or after a spill).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub kept_on_host: bool,
    /// On a GPU, the most bytes the run's tensors held there at once while this layer was pruned and run
    /// forward, the calibration activations on it included ([`crate::device::peak_bytes`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_peak_bytes: Option<u64>,
}

impl LayerReport {
    /// Measured fraction of zeros over the layer's pruned operators.
    pub fn sparsity(&self) -> f64 {
        let size = |o: &OperatorReport| (o.shape[0] * o.shape[1]) as f64;
        let zeros: f64 = self.operators.iter().map(|o| o.sparsity * size(o)).sum();
        zeros / self.operators.iter().map(size).sum::<f64>().max(1.0)
    }
}

impl LayerReport {
    /// Time `f`, which returns the FLOPs it spent, as the forward pass that makes the next layer's inputs.
    pub fn forward(&mut self, f: impl FnOnce() -> Result<f64>) -> Result<()> {
        let t = Instant::now();
        let flops = f()?;
        let s = t.elapsed().as_secs_f64();
        self.forward_seconds += s;
        self.seconds += s;
        self.gflop += flops / 1e9;
        Ok(())
    }
}

/// Where a layer's time and FLOPs went, phase by phase.
struct Ledger {
    start: Instant,
    stats_seconds: f64,
    prune_seconds: f64,
    forward_seconds: f64,
    flops: f64,
}

impl Ledger {
    fn new() -> Self {
        Self { start: Instant::now(), stats_seconds: 0.0, prune_seconds: 0.0, forward_seconds: 0.0, flops: 0.0 }
    }

    /// A statistics pass; `f` returns its result and the FLOPs it spent.
    fn stats<T>(&mut self, f: impl FnOnce() -> Result<(T, f64)>) -> Result<T> {
        let t = Instant::now();
        let (out, flops) = f()?;
        self.stats_seconds += t.elapsed().as_secs_f64();
        self.flops += flops;
        Ok(out)
    }

    /// Forward passes of the layer (its output error); `f` returns its result and the FLOPs it spent.
    fn forward<T>(&mut self, f: impl FnOnce() -> Result<(T, f64)>) -> Result<T> {
        let t = Instant::now();
        let (out, flops) = f()?;
        self.forward_seconds += t.elapsed().as_secs_f64();
        self.flops += flops;
        Ok(out)
    }

    /// Pruning operators; the method counts its own FLOPs in their reports.
    fn prune(&mut self, f: impl FnOnce() -> Result<Vec<OperatorReport>>) -> Result<Vec<OperatorReport>> {
        let t = Instant::now();
        let ops = f()?;
        self.prune_seconds += t.elapsed().as_secs_f64();
        self.flops += ops.iter().map(|o| o.gflop * 1e9).sum::<f64>();
        Ok(ops)
    }

    fn report(self, layer: usize, output_rel_error: Option<f64>, operators: Vec<OperatorReport>) -> LayerReport {
        LayerReport {
            layer,
            seconds: self.start.elapsed().as_secs_f64(),
            stats_seconds: self.stats_seconds,
            prune_seconds: self.prune_seconds,
            forward_seconds: self.forward_seconds,
            gflop: self.flops / 1e9,
            output_rel_error,
            operators,
            spilled: false,
            kept_on_host: false,
            gpu_peak_bytes: None,
        }
    }
}

/// Multiply-add FLOPs (2 per MAC) of one layer per calibration token: the one place they are derived.
pub struct Cost {
    /// Entry `g`: what a forward pass spends before group `g`'s input is ready; the last entry is the whole
    /// layer (linear operators, and attention's QKᵀ and PV over the (seqlen + 1) / 2 keys a query sees).
    prefix: Vec<f64>,
    /// Each group's input width `n` (its Gram matrix costs `n²` per token).
    widths: Vec<f64>,
    /// Each group's output width: its operators' outputs together.
    outputs: Vec<f64>,
}

impl Cost {
    pub fn of(layer: &dyn DecoderLayer, seqlen: usize) -> Self {
        let lin = |n: &str| layer.linear(n).map(|l| 2.0 * (l.out_features() * l.in_features()) as f64).unwrap_or(0.0);
        let groups = layer.input_groups();
        // The query width is q_proj's output.
        let width = layer.linear(groups[0][0]).map(|l| l.out_features()).unwrap_or(0) as f64;
        let attn = 2.0 * 2.0 * (seqlen.max(1) as f64 + 1.0) / 2.0 * width;
        let mut prefix = Vec::with_capacity(groups.len() + 1);
        let mut acc = 0.0;
        for (gi, g) in groups.iter().enumerate() {
            prefix.push(acc);
            acc += g.iter().map(|n| lin(n)).sum::<f64>();
            if gi == 0 {
                acc += attn;
            }
        }
        prefix.push(acc);
        let widths = groups.iter().map(|g| layer.linear(g[0]).map(|l| l.in_features()).unwrap_or(0) as f64).collect();
        let out = |g: &[&str]| g.iter().map(|n| layer.linear(n).map_or(0, |l| l.out_features())).sum::<usize>() as f64;
        let outputs = groups.iter().map(|g| out(g)).collect();
        Self { prefix, widths, outputs }
    }

    /// Whether error correction takes group `gi`'s target from its operator's dense outputs `Y` (`YᵀX*` and
    /// `‖Y‖²`: `Y` and the product, `4 m n` per token) rather than from `XᵀX*` and `XᵀX` (`3 n²`): for an
    /// operator alone in its group and narrower than its input, such as down_proj.
    pub fn targets_from_outputs(&self, layer: &dyn DecoderLayer, gi: usize) -> bool {
        let (m, n) = (self.outputs[gi], self.widths[gi]);
        layer.input_groups()[gi].len() == 1 && 4.0 * m * n < 3.0 * n * n
    }

    /// What group `gi`'s error-correction statistics cost per token beyond the Gram matrix `X*ᵀX*`.
    fn correction(&self, layer: &dyn DecoderLayer, gi: usize) -> f64 {
        let (m, n) = (self.outputs[gi], self.widths[gi]);
        if self.targets_from_outputs(layer, gi) { 4.0 * m * n } else { 3.0 * n * n }
    }

    /// The whole layer's forward pass.
    pub fn forward(&self) -> f64 {
        *self.prefix.last().expect("at least one entry")
    }
}

/// Calibration samples the layer output error is measured on.
pub const OUTPUT_ERROR_SAMPLES: usize = 16;

/// The layer's outputs on the first calibration batches (at least those of the [`OUTPUT_ERROR_SAMPLES`]), dense
/// and pruned, in f32: computed for [`LayerReport::output_rel_error`], then reused by the walk, which would
/// otherwise compute them again to make the next layer's inputs. Error correction makes them from what it
/// holds at its end, for every batch of the stream the walk goes on with.
pub struct Outputs {
    pub dense: Vec<Stashed>,
    pub pruned: Vec<Stashed>,
}

/// How many of the first calibration batches hold the [`OUTPUT_ERROR_SAMPLES`].
fn error_batches(acts: &[Stashed]) -> usize {
    let mut seen = 0;
    acts.iter()
        .take_while(|x| {
            let before = seen;
            seen += x.dims()[0];
            before < OUTPUT_ERROR_SAMPLES
        })
        .count()
}

/// A finished sum that may be missing, and its device copy.
fn split<T>(sum: Option<(T, Option<Tensor>)>) -> (Option<T>, Option<Tensor>) {
    sum.map_or((None, None), |(s, c)| (Some(s), c))
}

/// See [`LayerReport::output_rel_error`]: from the layers' outputs on the first batches of `acts`.
fn output_error(acts: &[Stashed], out: &Outputs) -> Result<f64> {
    let (mut num, mut den) = (0f64, 0f64);
    for ((x, yd), yp) in acts.iter().zip(&out.dense).zip(&out.pruned).take(error_batches(acts)) {
        let (x, yd, yp) = (fetch(x)?.to_dtype(DType::F32)?, fetch(yd)?, fetch(yp)?);
        let sum = |t: Tensor| -> Result<f64> { Ok(sum_by_rows(&t.sqr()?)?.to_dtype(DType::F64)?.to_scalar::<f64>()?) };
        num += sum((&yp - &yd)?)?;
        den += sum((yd - x)?)?;
    }
    Ok(num / den.max(f64::MIN_POSITIVE))
}

/// See [`LayerReport::output_rel_error`]; also the outputs it ran and their FLOPs.
fn layer_output_error(
    dense: &dyn DecoderLayer,
    work: &dyn DecoderLayer,
    acts: &[Stashed],
    ctx: &LayerContext,
) -> Result<(f64, Outputs, f64)> {
    let mut out = Outputs { dense: Vec::new(), pruned: Vec::new() };
    for x in &acts[..error_batches(acts)] {
        let x = fetch(x)?.to_dtype(DType::F32)?;
        out.dense.push(dense.forward(&x, ctx, None)?.into());
        out.pruned.push(work.forward(&x, ctx, None)?.into());
    }
    let tokens: usize = out.dense.iter().map(|y| y.dims()[0] * y.dims()[1]).sum();
    let flops = 2.0 * tokens as f64 * Cost::of(work, ctx.seqlen).forward();
    Ok((output_error(acts, &out)?, out, flops))
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

/// Statistics of every group from one pass of the dense layer (no error correction: `X* = X`): each
/// feature's sum of squares where the method reads no more (`norms_only`), else the Gram matrix.
fn collect_dense(
    layer: &dyn DecoderLayer,
    acts: &[Stashed],
    ctx: &LayerContext,
    cap: Option<f64>,
    norms_only: bool,
) -> Result<Vec<OpStats>> {
    enum Sums {
        Gram(Gram),
        Squares(SquareSums),
    }
    let groups = layer.input_groups();
    let mut sums: Vec<Option<Sums>> = (0..groups.len()).map(|_| None).collect();
    for x in acts {
        let x = fetch(x)?.to_dtype(DType::F32)?;
        let mut hook = |name: &str, inp: &Tensor| -> Result<()> {
            if let Some(gi) = groups.iter().position(|g| g[0] == name) {
                let n = inp.dim(candle_core::D::Minus1)?;
                let scaled;
                let inp = match cap {
                    Some(k) => {
                        scaled = inp.broadcast_mul(&outlier_token_scales(inp, k)?)?;
                        &scaled
                    }
                    None => inp,
                };
                match sums[gi].get_or_insert_with(|| {
                    if norms_only { Sums::Squares(SquareSums::new(n)) } else { Sums::Gram(Gram::new(n)) }
                }) {
                    Sums::Gram(g) => g.add(inp)?,
                    Sums::Squares(s) => s.add(inp)?,
                }
            }
            Ok(())
        };
        layer.capture(&x, ctx, &mut hook)?;
    }
    sums.into_iter()
        .zip(groups.iter())
        .map(|(s, names)| {
            let st = match s.ok_or_else(|| anyhow!("no statistics were collected for {}", names[0]))? {
                Sums::Gram(g) => {
                    let (gram, copy) = g.finish_summed()?;
                    OpStats { copies: Copies { gram: copy, ..Default::default() }, ..OpStats::of_gram(gram) }
                }
                Sums::Squares(s) => OpStats::of_square_sums(s.finish()?),
            };
            st.check_finite(&format!("input of {}", names.join(", ")))?;
            Ok(st)
        })
        .collect()
}

/// What error correction holds of one batch in one layer between groups: the previous group's input, from
/// which the layer may step to the next group's, and, where the walk makes the layer's outputs from what it
/// holds, the residual stream after attention once a step has passed it (with the last group's input, the
/// layer's output).
/// The input is a [`Tensor`] while the group computes with it, [`Stashed`] while it waits for the next group.
struct Held<T> {
    input: T,
    residual: Option<Stashed>,
}

/// Each calibration batch's [`Held`] inputs: (partially pruned layer, dense layer; `None` where the two were
/// the same, or not kept).
type GroupInputs = Vec<(Held<Stashed>, Option<Held<Stashed>>)>;

/// The statistics passes of error correction, group by group: `X*` from the partially pruned layer `work` on
/// `acts`, `X` from the dense layer `dense` on `targets` (the dense model's activations) or else on the same
/// `acts`.
struct Correction<'a> {
    dense: &'a dyn DecoderLayer,
    cost: &'a Cost,
    acts: &'a [Stashed],
    targets: Option<&'a [Stashed]>,
    ctx: &'a LayerContext,
    cap: Option<f64>,
    /// The previous group's inputs (empty before the first group): the next group steps from them instead of
    /// rerunning the layer up to there.
    prev: GroupInputs,
    /// Whether kept inputs keep the residual stream too: only [`Self::outputs`] reads it, so only a walk that
    /// makes the layer's outputs from what it holds. (For a LLaMA-2-70B layer's 128 × 2048 tokens in f32 it is
    /// 8 GiB for the pruned layer and 8 for the dense one.)
    residuals: bool,
    /// Whether kept inputs go to host memory: where the walk holds its activations there, or keeps them on the
    /// GPU but these would not fit there beside the layer's work ([`fits`]).
    held_on_host: bool,
}

impl Correction<'_> {
    /// Statistics of group `gi` with `work` as pruned so far, and whether the inputs were stepped to from the
    /// previous group's; `keep` stores this group's inputs (in that type) for the next step, the dense
    /// layer's only on the first `dense_upto` batches.
    fn group(
        &mut self,
        work: &dyn DecoderLayer,
        gi: usize,
        keep: Option<DType>,
        dense_upto: usize,
    ) -> Result<(OpStats, bool)> {
        let (dense, ctx, cap, targets) = (self.dense, self.ctx, self.cap, self.targets);
        let leader = dense.input_groups()[gi][0];
        // The operator whose dense outputs give the target, with its weight (`None`: from XᵀX* and XᵀX).
        let via = if self.cost.targets_from_outputs(dense, gi) {
            let op = dense.linear(leader).ok_or_else(|| anyhow!("no operator {leader}"))?;
            Some(op.weight.to_dtype(DType::F32)?)
        } else {
            None
        };
        let mut gram: Option<Gram> = None;
        let mut cross: Option<Cross> = None;
        let mut dgram: Option<Gram> = None;
        let mut k = 0f64;
        let mut next = GroupInputs::new();
        let stepped = std::cell::Cell::new(false);
        // The input of this group for layer `l` on `x`, stepping from the previous group's when it can.
        let input = |l: &dyn DecoderLayer, x: &Tensor, p: Option<&Held<Stashed>>| -> Result<Held<Tensor>> {
            if let Some(p) = p
                && let Some(t) = l.next_group_input(gi, x, &fetch(&p.input)?.to_dtype(DType::F32)?)?
            {
                stepped.set(true);
                let residual = t.residual.map(Stashed::from).or_else(|| p.residual.clone());
                return Ok(Held { input: t.input, residual });
            }
            Ok(Held { input: capture_input(l, x, ctx, leader)?, residual: None })
        };
        // Each previous input is dropped once this group's input is stepped from it, so the two groups' inputs
        // are never all held at once.
        let mut prev = std::mem::take(&mut self.prev).into_iter();
        for (b, x) in self.acts.iter().enumerate() {
            let x = fetch(x)?.to_dtype(DType::F32)?;
            let held = prev.next();
            let p = held.as_ref();
            let hs = input(work, &x, p.map(|p| &p.0))?;
            let xs = &hs.input;
            let n = xs.dim(candle_core::D::Minus1)?;
            // Before any operator is pruned the two inputs are the same, unless the targets come from elsewhere.
            let xd = if gi > 0 || targets.is_some() {
                let xt = match targets {
                    Some(t) => fetch(&t[b])?.to_dtype(DType::F32)?,
                    None => x.clone(),
                };
                Some(input(dense, &xt, p.map(|p| p.1.as_ref().unwrap_or(&p.0)))?)
            } else {
                None
            };
            // One scale per token for X and X* alike (from the dense input), so the three sums stay one objective.
            let scale = cap.map(|k| outlier_token_scales(xd.as_ref().map_or(xs, |h| &h.input), k)).transpose()?;
            let scaled = |t: &Tensor| -> Result<Tensor> {
                Ok(match &scale {
                    Some(s) => t.broadcast_mul(s)?,
                    None => t.clone(),
                })
            };
            let xs_w = scaled(xs)?;
            gram.get_or_insert_with(|| Gram::new(n)).add(&xs_w)?;
            if let Some(xd) = &xd {
                let xd_w = scaled(&xd.input)?;
                match &via {
                    Some(w) => {
                        let y = matmul_nt(&xd_w.flatten_to(xd_w.rank() - 2)?, w)?;
                        cross.get_or_insert_with(|| Cross::new(w.dims()[0], n)).add(&y, &xs_w)?;
                        k += sum_squares(&y)?;
                    }
                    None => {
                        cross.get_or_insert_with(|| Cross::new(n, n)).add(&xd_w, &xs_w)?;
                        dgram.get_or_insert_with(|| Gram::new(n)).add(&xd_w)?;
                    }
                }
            }
            if let Some(dt) = keep {
                // What is already kept in `dt` stays as it is.
                let host = self.held_on_host;
                let keep = |s: Stashed| -> Result<Stashed> {
                    if s.dtype() == dt {
                        crate::device::restash_in(s, host)
                    } else {
                        crate::device::stash_in(fetch(&s)?.to_dtype(dt)?, host)
                    }
                };
                let to = |h: Held<Tensor>| -> Result<Held<Stashed>> {
                    let residual = h.residual.filter(|_| self.residuals).map(keep).transpose()?;
                    Ok(Held { input: crate::device::stash_in(h.input.to_dtype(dt)?, host)?, residual })
                };
                next.push((to(hs)?, xd.filter(|_| b < dense_upto).map(to).transpose()?));
            }
        }
        self.prev = next;
        let g = gram.ok_or_else(|| anyhow!("no calibration batches"))?;
        let (cross, cross_copy) = split(cross.map(Cross::finish_summed).transpose()?);
        let (dgram, dense_copy) = split(dgram.map(Gram::finish_summed).transpose()?);
        let (gram, gram_copy) = g.finish_summed()?;
        let (cross, outputs, copies) = match via {
            Some(_) => (None, cross.map(|c| (c, k)), Copies { outputs: cross_copy, ..Default::default() }),
            None => (cross, None, Copies { cross: cross_copy, ..Default::default() }),
        };
        let copies = Copies { gram: gram_copy, dense: dense_copy, ..copies };
        let st = OpStats { cross, dense: dgram, outputs, copies, ..OpStats::of_gram(gram) };
        st.check_finite(&format!("input of {}", dense.input_groups()[gi].join(", ")))?;
        Ok((st, stepped.get()))
    }

    /// After the last group, the layers' outputs from what the walk holds (its input and the residual stream
    /// after attention): the pruned layer's on every batch, the dense one's where its inputs were kept (the
    /// first batches); `None` where the layer cannot (then run it again). Also the batches' tokens each layer
    /// ran its last group on.
    fn outputs(&mut self, work: &dyn DecoderLayer) -> Result<Option<(Outputs, usize)>> {
        let held = std::mem::take(&mut self.prev);
        if held.is_empty() || held.iter().any(|(h, _)| h.residual.is_none()) {
            return Ok(None);
        }
        let f32 = |t: &Stashed| -> Result<Tensor> { Ok(fetch(t)?.to_dtype(DType::F32)?) };
        let run = |l: &dyn DecoderLayer, h: &Held<Stashed>| -> Result<Option<Tensor>> {
            let r = h.residual.as_ref().expect("checked above");
            l.output_from(&f32(r)?, &f32(&h.input)?)
        };
        let (mut out, mut tokens) = (Outputs { dense: Vec::new(), pruned: Vec::new() }, 0);
        for (p, d) in held {
            let Some(yp) = run(work, &p)? else { return Ok(None) };
            tokens += p.input.dims()[0] * p.input.dims()[1];
            out.pruned.push(stash(yp)?);
            // The dense layer's inputs are kept on the first batches only, and in order.
            if let Some(d) = d.filter(|_| out.dense.len() + 1 == out.pruned.len()) {
                let Some(yd) = run(self.dense, &d)? else { return Ok(None) };
                tokens += d.input.dims()[0] * d.input.dims()[1];
                out.dense.push(yd.into());
            }
        }
        Ok(Some((out, tokens)))
    }
}

/// A layer's calibration inputs: `X*` (what it gets) and, in the corrected walk, the dense model's
/// activations for the targets.
#[derive(Clone, Copy)]
pub struct Inputs<'a> {
    pub acts: &'a [Stashed],
    pub targets: Option<&'a [Stashed]>,
    pub ctx: &'a LayerContext,
}

impl Inputs<'_> {
    fn tokens(&self) -> f64 {
        self.acts.iter().map(|t| t.dims()[0] * t.dims()[1]).sum::<usize>() as f64
    }
}

/// A layer pruned: its weights, the dense copy when one was loaded, its outputs on the first calibration
/// batches, and its report.
pub struct PrunedLayer {
    pub work: Box<dyn DecoderLayer>,
    pub dense: Option<Box<dyn DecoderLayer>>,
    pub outputs: Option<Outputs>,
    pub report: LayerReport,
}

/// Prune decoder layer `i` of `model` on its calibration inputs (none for a method that observes nothing).
pub fn prune_layer(
    model: &dyn CausalLm,
    i: usize,
    inputs: Option<Inputs>,
    method: &dyn Method,
    opts: &PipelineOptions,
) -> Result<PrunedLayer> {
    let (pattern, cap, act_dtype) = (opts.pattern_for(i), opts.walk.token_cap, opts.walk.act_dtype.dtype());
    let mut ledger = Ledger::new();
    let matmul = opts.walk.matmul_dtype.dtype();
    let mut work = super::pipeline::walk_layer(model, i, matmul)?;
    // A NaN or Inf in a weight would only surface later as unusable statistics: name it here.
    for (name, t) in work.named_tensors() {
        check_finite(&t, &format!("decoder layer {i}: weight {name}"))?;
    }
    let Some(inp) = inputs else {
        let names = work.input_groups().iter().flat_map(|g| g.iter());
        let ops =
            ledger.prune(|| names.map(|n| prune_operator(work.as_mut(), i, n, None, method, pattern)).collect())?;
        return Ok(PrunedLayer { work, dense: None, outputs: None, report: ledger.report(i, None, ops) });
    };
    // A dense copy: the target with error correction, the output error's reference, the next inputs in the
    // dense and corrected walks.
    let dense = super::pipeline::walk_layer(model, i, matmul)?;
    let groups = work.input_groups();
    let cost = Cost::of(work.as_ref(), inp.ctx.seqlen);
    let tokens = inp.tokens();
    let mut operators = Vec::new();
    let mut finished = None;
    let mut kept_on_host = false;
    if opts.error_correction || inp.targets.is_some() {
        // In the pruned walk (the default) the walk keeps the last group's inputs and makes the layer's outputs
        // from them, instead of running the pruned layer again, and the dense one again on the batches the
        // output error needs. Only with f32 activations: the outputs are then bit for bit a forward pass's, so a
        // resumed run (which runs its reloaded layers forward) ends where an uninterrupted one would. (The
        // dense and corrected walks go on with the dense layer's outputs, computed apart.) What it holds, the
        // last group's input and the residual stream for every token, must fit in half the free memory;
        // otherwise the layer runs again (same bytes, more time).
        //
        // Each group's inputs are kept where the layer steps from them to the next group's (pruned and dense, in
        // the activations' type, with the residual stream where the walk may finish from them): on the GPU where
        // they fit in half its free memory, else in host memory (for a LLaMA-2-70B layer's 128 × 2048 tokens in
        // f32, 17 GB or more, which a 40 GB card does not have beside the layer's work).
        let on_gpu = !crate::device::current().is_cpu() && !crate::device::offloading();
        let may_finish =
            opts.walk.layer_inputs == LayerInputs::Pruned && inp.targets.is_none() && act_dtype == DType::F32;
        let (hidden, ends) = (cost.widths[0], groups.len() - 1);
        let steps = |gi: usize| gi < ends && dense.steps_to(gi + 1);
        let widest =
            (0..ends).filter(|&gi| steps(gi)).map(|gi| cost.widths[gi] + if may_finish { hidden } else { 0.0 });
        let kept = 2.0 * tokens * widest.fold(0.0, f64::max) * act_dtype.size_in_bytes() as f64;
        let held_on_host = crate::device::offloading() || (on_gpu && !fits(kept, on_gpu));
        if held_on_host && on_gpu {
            log::info!("layer {i}: error correction's kept inputs ({:.0} MiB) go to host memory", kept / 1048576.0);
        }
        kept_on_host = held_on_host && kept > 0.0;
        let outputs_from = tokens * (cost.widths[ends] + hidden) * 4.0;
        let finish = may_finish
            && (fits(outputs_from, on_gpu && !held_on_host) || {
                log::info!(
                    "layer {i}: holding {:.0} MiB of activations would take over half the free {:.0} MiB; running \
                     the layer again for its outputs instead",
                    outputs_from / 1048576.0,
                    free_memory(on_gpu && !held_on_host).unwrap_or(0) as f64 / 1048576.0
                );
                false
            });
        let mut corr = Correction {
            dense: dense.as_ref(),
            cost: &cost,
            acts: inp.acts,
            targets: inp.targets,
            ctx: inp.ctx,
            cap,
            prev: Vec::new(),
            residuals: finish,
            held_on_host,
        };
        let dense_upto = error_batches(inp.acts);
        for (gi, group) in groups.iter().enumerate() {
            let last = gi + 1 == groups.len();
            let keep = (if last { finish } else { steps(gi) }).then_some(act_dtype);
            let st = ledger
                .stats(|| {
                    let upto = if last { dense_upto } else { usize::MAX };
                    let (st, stepped) = corr.group(work.as_ref(), gi, keep, upto)?;
                    // The layer up to this group's input (from the previous group's when stepping), once for the
                    // pruned layer and once for the dense one; G* and the target's statistics.
                    let n2 = cost.widths[gi].powi(2);
                    let reach = if stepped { cost.prefix[gi] - cost.prefix[gi - 1] } else { cost.prefix[gi] };
                    let per_token = if gi == 0 && inp.targets.is_none() {
                        cost.prefix[0] + n2
                    } else {
                        2.0 * reach + n2 + cost.correction(dense.as_ref(), gi)
                    };
                    Ok((st, tokens * per_token))
                })
                .with_context(|| format!("decoder layer {i}"))?;
            // The group's operators share its statistics: one copy of each on the device for all of them (methods
            // and reports).
            operators.extend(ledger.prune(|| {
                crate::linalg::with_resident_copies(&st.matrices(), || {
                    group.iter().map(|n| prune_operator(work.as_mut(), i, n, Some(&st), method, pattern)).collect()
                })
            })?);
        }
        // The last group's operators on the tokens each layer ran.
        let last = cost.forward() - cost.prefix[groups.len() - 1];
        finished = ledger.forward(|| {
            let out = corr.outputs(work.as_ref())?;
            let tokens = out.as_ref().map_or(0, |(_, t)| *t);
            Ok((out.map(|(o, _)| o), tokens as f64 * last))
        })?;
    } else {
        let stats = ledger
            .stats(|| {
                let norms_only = method.observes() == super::Observes::Norms;
                let stats = collect_dense(dense.as_ref(), inp.acts, inp.ctx, cap, norms_only)?;
                let sums: f64 = cost.widths.iter().map(|n| if norms_only { 2.0 * n } else { n * n }).sum();
                Ok((stats, tokens * (cost.prefix[groups.len() - 1] + sums)))
            })
            .with_context(|| format!("decoder layer {i}"))?;
        operators = ledger.prune(|| {
            let mut ops = Vec::new();
            // Each group's statistics, and their copies on the device, go when its operators are pruned.
            for (group, st) in groups.iter().zip(stats) {
                crate::linalg::with_resident_copies(&st.matrices(), || -> Result<()> {
                    for n in group.iter() {
                        ops.push(prune_operator(work.as_mut(), i, n, Some(&st), method, pattern)?);
                    }
                    Ok(())
                })?;
            }
            Ok(ops)
        })?;
    }
    let (error, outputs) = match finished {
        Some(out) if out.dense.len() >= error_batches(inp.acts) => (output_error(inp.acts, &out)?, out),
        _ => ledger.forward(|| {
            let (error, outputs, flops) = layer_output_error(dense.as_ref(), work.as_ref(), inp.acts, inp.ctx)?;
            Ok(((error, outputs), flops))
        })?,
    };
    Ok(PrunedLayer {
        work,
        dense: Some(dense),
        outputs: Some(outputs),
        report: LayerReport { kept_on_host, ..ledger.report(i, Some(error), operators) },
    })
}

/// Whether holding `bytes` of activations leaves half the free memory where they would be held: the GPU's
/// (`on_gpu`), else the host's (unknown: yes).
fn fits(bytes: f64, on_gpu: bool) -> bool {
    free_memory(on_gpu).is_none_or(|free| bytes <= free as f64 / 2.0)
}

/// The GPU's free memory (`on_gpu`), else the host's available memory, in bytes, where known.
fn free_memory(on_gpu: bool) -> Option<u64> {
    if on_gpu { crate::device::memory().map(|(free, _)| free as u64) } else { available_memory() }
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
    let what = format!("layer {layer_idx} {name}");
    let lin = layer.linear(name).ok_or_else(|| anyhow!("layer {layer_idx}: no operator {name}"))?;
    let (rows, cols) = lin.weight.dims2()?;
    pattern.check_cols(cols, &what)?;
    let done = match prune_on_device(&lin.weight, stats, method, pattern).with_context(|| what.clone())? {
        Some(done) => done,
        None => prune_on_host(&lin.weight, stats, method, pattern).with_context(|| what.clone())?,
    };
    layer.linear_mut(name).expect("checked above").set_weight(done.weight)?;
    Ok(OperatorReport {
        layer: layer_idx,
        name: name.to_string(),
        shape: [rows, cols],
        sparsity: done.sparsity,
        rel_error: done.errors.map(|e| e.0),
        rel_error_mask_only: done.errors.map(|e| e.1),
        seconds: t0.elapsed().as_secs_f64(),
        gflop: done.flops / 1e9,
        details: done.details,
    })
}

/// An operator's pruned weight and what its report says of it.
struct Done {
    weight: Tensor,
    sparsity: f64,
    /// `(rel_error, rel_error_mask_only)`.
    errors: Option<(f64, f64)>,
    flops: f64,
    details: Option<serde_json::Value>,
}

/// The method's pruned weight made where the weight is, on the run's device ([`Method::prune_on_device`]),
/// checked there, with its errors measured there where there is a `G*`; `None` where the method (or this
/// pattern of it) prunes on the host only.
fn prune_on_device(w: &Tensor, stats: Option<&OpStats>, method: &dyn Method, pattern: Pattern) -> Result<Option<Done>> {
    if !crate::device::offloaded() {
        return Ok(None);
    }
    let dense = w.to_dtype(DType::F32)?;
    let Some(pruned) = method.prune_on_device(&dense, stats, pattern)? else { return Ok(None) };
    let pw = pruned.w;
    if let Some((i, j)) = crate::linalg::tensor_non_finite(&pw)? {
        bail!("the method produced a non-finite weight at ({i}, {j})");
    }
    let sparsity = super::device_mask::verify(&pw, pattern, pruned.rounding_units)
        .with_context(|| format!("the pruned weight misses the pattern {pattern}"))?;
    let errors = match stats {
        Some(st) if st.gram.is_some() => Some(errors_on_device(st, &dense, &pw)?),
        _ => None,
    };
    Ok(Some(Done { weight: pw, sparsity, errors, flops: pruned.flops, details: pruned.details }))
}

/// The method's pruned weight, on the host, checked; with its errors where there is a `G*`.
fn prune_on_host(dense: &Tensor, stats: Option<&OpStats>, method: &dyn Method, pattern: Pattern) -> Result<Done> {
    let w = tensor_to_mat(dense)?;
    let (rows, cols) = w.shape();
    // `G*` is on the device already where the GPU path runs: the caller holds it there for the operator's group.
    let pruned = method.prune(&w, stats, pattern)?;
    let pw = &pruned.w;
    if let Some((i, j)) = crate::linalg::first_non_finite(pw.as_ref()) {
        bail!("the method produced a non-finite weight at ({i}, {j})");
    }
    let sparsity = mask::verify(pw, pattern, pruned.rounding_units)
        .with_context(|| format!("the pruned weight misses the pattern {pattern}"))?;
    // The weight goes back where it came from; on a device now, where the errors are measured.
    let on_device = crate::device::offloaded();
    let weight = if on_device { crate::linalg::mat_to_device(pw, dense.device())? } else { mat_to_tensor(pw)? };
    // From `G*`: not where only the inputs' norms were collected (Wanda), whose errors would cost it the GEMM
    // it saves there; its layer's output error is still reported.
    let errors = match stats {
        Some(st) if st.gram.is_some() && on_device => Some(errors_on_device(st, dense, &weight)?),
        Some(st) if st.gram.is_some() => {
            let c = st.target(&w)?;
            let p = st.problem(&w, &c)?;
            let base = p.k.max(f64::MIN_POSITIVE);
            let masked = crate::linalg::mat_from_fn(rows, cols, |i, j| if pw[(i, j)] == 0.0 { 0.0 } else { w[(i, j)] });
            Some((p.error(pw)? / base, p.error(&masked)? / base))
        }
        _ => None,
    };
    Ok(Done { weight, sparsity, errors, flops: pruned.flops, details: pruned.details })
}

/// The report's `(rel_error, rel_error_mask_only)` of the pruned weight `pw` against the dense `w`, both on the
/// device, as the host measures them (`C` and `K` as [`OpStats::target`] and [`OpStats::problem`] make them):
/// only the two numbers come back, where the host's way took five products of the operator's size down and up.
fn errors_on_device(st: &OpStats, w: &Tensor, pw: &Tensor) -> Result<(f64, f64)> {
    let w = w.to_dtype(DType::F32)?;
    let g = crate::linalg::mat_to_device(st.gram()?, w.device())?;
    let (c, k) = st.target_on_device(&w)?;
    let base = k.max(f64::MIN_POSITIVE);
    let error = |x: &Tensor| super::side::error_on_device(x, &x.matmul(&g)?, &c, k);
    let masked = pw.eq(0f32)?.where_cond(&w.zeros_like()?, &w)?;
    Ok((error(pw)? / base, error(&masked)? / base))
}

#[cfg(test)]
mod tests {
    use super::*;
    use faer::Mat;

    /// The report's errors measured on the device (candle's operators; here on the CPU) are the host's, to f32
    /// summation order: from `G*` alone, with error correction's cross and dense terms, and from the dense
    /// outputs' `(C, K)`.
    #[test]
    fn device_errors_are_the_hosts() {
        let mut s = 7u64;
        let mut next = || {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 33) as f64 / (1u64 << 31) as f64 - 0.5) as f32
        };
        let (m, n, t) = (6, 12, 40);
        let x = Mat::from_fn(t, n, |_, _| next());
        let xs = Mat::from_fn(t, n, |i, j| x[(i, j)] + 0.1 * next());
        let w = Mat::from_fn(m, n, |_, _| next());
        let pw = Mat::from_fn(m, n, |i, j| if (i + j) % 3 == 0 { 0.0 } else { w[(i, j)] + 0.05 * next() });
        let gram = |a: &Mat<f32>, b: &Mat<f32>| crate::linalg::product(&a.transpose().to_owned(), b).unwrap();
        let corrected =
            OpStats { cross: Some(gram(&x, &xs)), dense: Some(gram(&x, &x)), ..OpStats::of_gram(gram(&xs, &xs)) };
        let c = corrected.target(&w).unwrap();
        let k = corrected.problem(&w, &c).unwrap().k;
        let from_outputs = OpStats { outputs: Some((c, k)), ..OpStats::of_gram(gram(&xs, &xs)) };
        for st in [OpStats::of_gram(gram(&xs, &xs)), corrected, from_outputs] {
            let c = st.target(&w).unwrap();
            let p = st.problem(&w, &c).unwrap();
            let base = p.k.max(f64::MIN_POSITIVE);
            let masked = Mat::from_fn(m, n, |i, j| if pw[(i, j)] == 0.0 { 0.0 } else { w[(i, j)] });
            let host = (p.error(&pw).unwrap() / base, p.error(&masked).unwrap() / base);
            let dev = errors_on_device(&st, &mat_to_tensor(&w).unwrap(), &mat_to_tensor(&pw).unwrap()).unwrap();
            for (h, d) in [(host.0, dev.0), (host.1, dev.1)] {
                assert!((h - d).abs() <= 1e-5 * h.abs().max(1e-3), "host {host:?}, device {dev:?}");
            }
            assert!(host.0 > 1e-3 && (host.1 - host.0).abs() > 1e-3, "not a telling case: {host:?}");
        }
    }
}
