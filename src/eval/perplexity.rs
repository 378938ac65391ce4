//! Perplexity over windows of token ids: `exp(mean negative log-likelihood)` over every predicted token
//! of every window, as SparseGPT / Wanda report it.
//!
//! Windows go through the model in batches, layer by layer. Layers are materialised once and kept while
//! they fit the layer budget; otherwise each batch re-reads them from the memory map, so that only one
//! layer is ever in f32 working memory.

use std::cell::RefCell;
use std::ops::Range;
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use candle_core::{Device, Tensor};
use rayon::prelude::*;

use crate::model::{CausalLm, DecoderLayer};
use crate::util::{Progress, check_finite, progress_bar};

#[derive(Debug, Clone)]
pub struct PplOptions {
    /// Windows per forward batch.
    pub batch: usize,
    /// Keep materialised layers while their f32 size stays under this many bytes.
    pub layer_budget_bytes: usize,
    pub progress: Progress,
}

impl Default for PplOptions {
    fn default() -> Self {
        Self { batch: 1, layer_budget_bytes: 4 << 30, progress: Progress::Hidden }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct PplResult {
    pub perplexity: f64,
    /// Mean negative log-likelihood (nats per predicted token).
    pub nll: f64,
    /// Tokens run through the model (windows × seqlen).
    pub tokens: usize,
    /// Tokens whose likelihood was scored (windows × (seqlen − 1)).
    pub predicted_tokens: usize,
    pub windows: usize,
    pub seqlen: usize,
    pub seconds: f64,
    pub tokens_per_second: f64,
    /// Forward FLOPs counted from the configuration ([`crate::model::Config::flops_per_token`]) per second.
    pub gflop_per_second: f64,
}

/// Sum of `−log p(target)` over the rows of a `(rows, vocab)` logits matrix.
pub fn nll_sum(logits: &[f32], vocab: usize, targets: &[u32]) -> f64 {
    // Rows on all threads, summed in order: a parallel sum's association follows how the work was split, which
    // varies run to run, and so did the perplexity's last digits.
    let rows: Vec<f64> = logits
        .par_chunks_exact(vocab)
        .zip(targets.par_iter())
        .map(|(row, &tgt)| crate::linalg::logsumexp(row) - row[tgt as usize] as f64)
        .collect();
    rows.iter().sum()
}

/// Tokens per chunk of logits: a `(HEAD_CHUNK, vocab)` buffer is reused instead of materialising
/// `(seq, vocab)` logits (100 MB for one 512-token window of a 49k vocabulary).
const HEAD_CHUNK: usize = 128;

/// Sum of `−log p(targets[i] | x_i)` where the logits are `x · headᵀ`: `x` is `(n, e)`, `head` `(vocab, e)`.
pub fn head_nll_sum(x: &Tensor, head: &Tensor, targets: &[u32]) -> Result<f64> {
    let (n, e) = x.dims2()?;
    let (vocab, e2) = head.dims2()?;
    ensure!(e == e2 && n == targets.len(), "head: x {:?}, head {:?}, {} targets", x.dims(), head.dims(), targets.len());
    ensure!(targets.iter().all(|&t| (t as usize) < vocab), "a target id is outside the vocabulary of {vocab}");
    if crate::device::generic(x) {
        return head_nll_sum_generic(x, head, targets);
    }
    let mut buf = vec![0f32; HEAD_CHUNK.min(n) * vocab];
    let mut total = 0f64;
    crate::linalg::with_f32(x, |xs| {
        crate::linalg::with_f32(head, |ws| {
            let w = faer::MatRef::from_column_major_slice(ws, e, vocab);
            for (c, tg) in targets.chunks(HEAD_CHUNK).enumerate() {
                let rows = tg.len();
                let a =
                    faer::MatRef::from_row_major_slice(&xs[c * HEAD_CHUNK * e..(c * HEAD_CHUNK + rows) * e], rows, e);
                let out = faer::MatMut::from_row_major_slice_mut(&mut buf[..rows * vocab], rows, vocab);
                faer::linalg::matmul::matmul(out, faer::Accum::Replace, a, w, 1.0f32, crate::linalg::par());
                total += nll_sum(&buf[..rows * vocab], vocab, tg);
            }
        })
    })??;
    Ok(total)
}

/// [`head_nll_sum`] in candle's operators, for any device: per chunk of rows, `logsumexp(row) − row[target]`
/// on the device, summed on the host in f64.
fn head_nll_sum_generic(x: &Tensor, head: &Tensor, targets: &[u32]) -> Result<f64> {
    // Rows per chunk: the logits of one chunk are `rows × vocab` floats (1 GiB at 1024 × 262k).
    const ROWS: usize = 1024;
    let mut total = 0f64;
    for (c, tg) in targets.chunks(ROWS).enumerate() {
        let logits = x.narrow(0, c * ROWS, tg.len())?.matmul(&head.t()?)?;
        let m = logits.max_keepdim(1)?;
        let lse = (logits.broadcast_sub(&m)?.exp()?.sum_keepdim(1)?.log()? + &m)?;
        let ids = Tensor::from_slice(tg, (tg.len(), 1), x.device())?;
        let nll = (lse - logits.gather(&ids, 1)?)?.flatten_all()?.to_vec1::<f32>()?;
        total += nll.iter().map(|&v| v as f64).sum::<f64>();
    }
    Ok(total)
}

/// Layers, either kept or re-read on every use.
pub struct LayerCache<'a> {
    model: &'a dyn CausalLm,
    /// A cell, so that a run out of GPU memory can let the kept layers go ([`Self::let_go`]) between the uses of
    /// a shared cache.
    kept: RefCell<Option<Vec<Box<dyn DecoderLayer>>>>,
}

impl<'a> LayerCache<'a> {
    pub fn new(model: &'a dyn CausalLm, budget_bytes: usize) -> Result<Self> {
        let kept = if model.num_layers() == 0 {
            Some(Vec::new())
        } else {
            // Size of one layer in f32 (all layers of these architectures have the same shapes).
            let first = model.load_layer(0)?;
            let bytes: usize = first.named_tensors().iter().map(|(_, t)| t.elem_count() * 4).sum();
            if bytes * model.num_layers() <= budget_bytes {
                let rest = (1..model.num_layers()).map(|i| model.load_layer(i));
                match std::iter::once(Ok(first)).chain(rest).collect::<Result<Vec<_>>>() {
                    Ok(v) => Some(v),
                    // The GPU cannot hold them all: each use reads them instead (a notice: not as asked).
                    Err(e) if crate::device::out_of_memory(&e) => {
                        eprintln!("eval: out of GPU memory keeping the layers: reading them again for every batch");
                        None
                    }
                    Err(e) => return Err(e),
                }
            } else {
                None
            }
        };
        Ok(Self { model, kept: RefCell::new(kept) })
    }

    /// Run layer `i` on `h`.
    pub fn forward(&self, i: usize, h: &Tensor, ctx: &crate::model::LayerContext) -> Result<Tensor> {
        match &*self.kept.borrow() {
            Some(v) => v[i].forward(h, ctx, None),
            None => self.model.load_layer(i)?.forward(h, ctx, None),
        }
    }

    /// Re-read the layers on every use from here, freeing the memory of those kept; whether any were.
    pub fn let_go(&self) -> bool {
        self.kept.take().is_some_and(|v| !v.is_empty())
    }
}

/// The sum of the terms `run` gives for the batches of `0..n`, `per` at a time, in order (one term each). Out
/// of GPU memory on a batch, the run goes on with less on the GPU rather than stopping: first `let_go` frees
/// what is kept between batches (the layers; `false` where nothing was), then batches are halved, down to one
/// window, for the rest of the run. A window's likelihood does not depend on its batch (up to the kernels'
/// rounding of a different shape).
fn sum_over_batches(
    n: usize,
    per: usize,
    let_go: &dyn Fn() -> bool,
    run: &dyn Fn(Range<usize>) -> Result<Vec<f64>>,
) -> Result<f64> {
    let (mut per, mut done, mut total, mut kept) = (per, 0, 0.0, true);
    while done < n {
        let range = done..(done + per).min(n);
        crate::device::reset_peak();
        let e = match run(range.clone()) {
            Ok(terms) => {
                // One by one, whatever the batches: the sum's association does not change with them.
                total = terms.iter().fold(total, |t, s| t + s);
                done = range.end;
                continue;
            }
            Err(e) => e,
        };
        if crate::device::out_of_memory(&e) {
            // Notices, not log lines: the run goes on differently from how it was asked to.
            if std::mem::replace(&mut kept, false) && let_go() {
                eprintln!("eval: out of GPU memory: reading the layers again for every batch from here");
                continue;
            }
            if range.len() > 1 {
                per = range.len().div_ceil(2);
                eprintln!("eval: out of GPU memory on {} windows at once: {per} at a time from here", range.len());
                continue;
            }
        }
        let what = match range.len() {
            1 => format!("window {} of {n}", range.end),
            _ => format!("windows {} to {} of {n}", range.start + 1, range.end),
        };
        return Err(if crate::device::out_of_memory(&e) {
            crate::device::out_of_memory_in(e, &what, "one window at a time, no layer kept")
        } else {
            e.context(what)
        });
    }
    Ok(total)
}

/// The negative log-likelihood of each of a batch of windows, the first of which is window `first`.
fn batch_nll(
    model: &dyn CausalLm,
    cache: &LayerCache,
    ctx: &crate::model::LayerContext,
    batch: &[Vec<u32>],
    first: usize,
) -> Result<Vec<f64>> {
    let seqlen = batch[0].len();
    let flat: Vec<u32> = batch.iter().flatten().copied().collect();
    let ids = Tensor::from_vec(flat, (batch.len(), seqlen), &Device::Cpu)?;
    let mut h = model.embed(&ids)?;
    for i in 0..model.num_layers() {
        h = cache.forward(i, &h, ctx).with_context(|| format!("decoder layer {i}"))?;
        check_finite(&h, &format!("output of decoder layer {i}"))?;
    }
    let fin = model.final_hidden(&h)?;
    let mut nll = Vec::with_capacity(batch.len());
    for (w, window) in batch.iter().enumerate() {
        let x = fin.get(w)?.narrow(0, 0, seqlen - 1)?;
        let s = head_nll_sum(&x, model.lm_head()?, &window[1..])?;
        ensure!(s.is_finite(), "non-finite log-likelihood in window {} (logits hold NaN or Inf)", first + w + 1);
        nll.push(s);
    }
    Ok(nll)
}

/// Perplexity of `model` on `windows` (each of the same length).
pub fn perplexity(model: &dyn CausalLm, windows: &[Vec<u32>], opts: &PplOptions) -> Result<PplResult> {
    ensure!(!windows.is_empty(), "no windows to evaluate");
    let seqlen = windows[0].len();
    ensure!(windows.iter().all(|w| w.len() == seqlen), "windows differ in length");
    let max_pos = model.config().max_positions();
    ensure!(seqlen <= max_pos, "--seqlen {seqlen} is above the model's context of {max_pos} positions");
    let start = Instant::now();
    let cache = LayerCache::new(model, opts.layer_budget_bytes)?;
    let ctx = model.context(seqlen)?;
    let pb = progress_bar(windows.len() as u64, "perplexity", opts.progress);
    let run = |range: Range<usize>| -> Result<Vec<f64>> {
        let nll = batch_nll(model, &cache, &ctx, &windows[range.clone()], range.start)?;
        pb.inc(range.len() as u64);
        let secs = start.elapsed().as_secs_f64();
        pb.set_message(format!("{:.0} tok/s", (range.end * seqlen) as f64 / secs));
        Ok(nll)
    };
    let nll = sum_over_batches(windows.len(), opts.batch.max(1), &|| cache.let_go(), &run)?;
    pb.finish_and_clear();
    let seconds = start.elapsed().as_secs_f64();
    let predicted = windows.len() * (seqlen - 1);
    let mean = nll / predicted as f64;
    Ok(PplResult {
        perplexity: mean.exp(),
        nll: mean,
        tokens: windows.len() * seqlen,
        predicted_tokens: predicted,
        windows: windows.len(),
        seqlen,
        seconds,
        tokens_per_second: (windows.len() * seqlen) as f64 / seconds,
        gflop_per_second: model.config().flops_per_token(seqlen) * (windows.len() * seqlen) as f64 / seconds / 1e9,
    })
}

#[cfg(test)]
mod tests {
    use std::cell::{Cell, RefCell};

    use anyhow::{Result, ensure};

    /// Out of GPU memory, eval lets the kept layers go, then halves its batches, and sums the same terms in the
    /// same order; out of memory on one window with nothing kept, the error says so and where.
    #[test]
    fn out_of_gpu_memory_eval_holds_less_and_goes_on() {
        let term = |w: usize| 1.0 / (w as f64 + 3.0);
        let serial = (0..7).fold(0.0, |t, w| t + term(w));
        let oom = "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")";
        let seen = RefCell::new(Vec::new());
        let (freed, fits) = (Cell::new(0), Cell::new(usize::MAX));
        let let_go = || {
            freed.set(freed.get() + 1);
            true
        };
        let run = |r: std::ops::Range<usize>| -> Result<Vec<f64>> {
            seen.borrow_mut().push(r.clone());
            ensure!(r.len() <= fits.get(), "{oom}");
            Ok(r.map(term).collect())
        };
        assert_eq!(super::sum_over_batches(7, 3, &let_go, &run).unwrap(), serial);
        assert_eq!((seen.take(), freed.get()), (vec![0..3, 3..6, 6..7], 0));
        // At most two windows fit: the layers go first, then three windows become two at a time.
        fits.set(2);
        assert_eq!(super::sum_over_batches(7, 3, &let_go, &run).unwrap(), serial);
        let once = vec![0..3, 0..3, 0..2, 2..4, 4..6, 6..7];
        assert_eq!((seen.take(), freed.get()), (once, 1));
        // Nothing fits, nothing was kept: an error naming the windows, after halving down to one.
        fits.set(0);
        let e = super::sum_over_batches(3, 2, &|| false, &run).unwrap_err();
        let e = format!("{e:#}");
        assert!(e.contains("window 1 of 3: out of GPU memory (one window at a time, no layer kept"), "{e}");
        assert_eq!(seen.take(), vec![0..2, 0..1]);
        // Any other error stops the run at once, with the windows it was in.
        let e = super::sum_over_batches(3, 2, &|| true, &|_| anyhow::bail!("shape mismatch")).unwrap_err();
        assert_eq!(format!("{e:#}"), "windows 1 to 2 of 3: shape mismatch");
    }

    /// The rows' terms are summed in row order whatever the thread count, so a perplexity does not change in its
    /// last digits from run to run (a parallel sum's association follows how rayon split the work).
    #[test]
    fn the_nll_is_summed_in_row_order() {
        let (rows, vocab) = (3000, 7);
        let logits: Vec<f32> = (0..rows * vocab).map(|i| ((i * 7919 % 1013) as f32 / 97.0).sin() * 3.0).collect();
        let targets: Vec<u32> = (0..rows).map(|r| (r * 5 % vocab) as u32).collect();
        let serial = logits
            .chunks_exact(vocab)
            .zip(&targets)
            .fold(0f64, |s, (row, &t)| s + (crate::linalg::logsumexp(row) - row[t as usize] as f64));
        let pool = |n| rayon::ThreadPoolBuilder::new().num_threads(n).build().unwrap();
        for threads in [1, 2, 3, 8] {
            assert_eq!(pool(threads).install(|| super::nll_sum(&logits, vocab, &targets)), serial, "{threads} threads");
        }
    }
}
