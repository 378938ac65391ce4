//! Perplexity over windows of token ids: `exp(mean negative log-likelihood)` over every predicted token
//! of every window, as SparseGPT / Wanda report it.
//!
//! Windows go through the model in batches, layer by layer. Layers are materialised once and kept while
//! they fit the layer budget; otherwise each batch re-reads them from the memory map, so that only one
//! layer is ever in f32 working memory.

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
    kept: Option<Vec<Box<dyn DecoderLayer>>>,
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
                let mut v = vec![first];
                for i in 1..model.num_layers() {
                    v.push(model.load_layer(i)?);
                }
                Some(v)
            } else {
                None
            }
        };
        Ok(Self { model, kept })
    }

    /// Run layer `i` on `h`.
    pub fn forward(&self, i: usize, h: &Tensor, ctx: &crate::model::LayerContext) -> Result<Tensor> {
        match &self.kept {
            Some(v) => v[i].forward(h, ctx, None),
            None => self.model.load_layer(i)?.forward(h, ctx, None),
        }
    }
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
    let mut nll = 0.0f64;
    let mut done = 0usize;
    for batch in windows.chunks(opts.batch.max(1)) {
        let b = batch.len();
        let flat: Vec<u32> = batch.iter().flatten().copied().collect();
        let ids = Tensor::from_vec(flat, (b, seqlen), &Device::Cpu)?;
        let mut h = model.embed(&ids)?;
        for i in 0..model.num_layers() {
            h = cache.forward(i, &h, &ctx).with_context(|| format!("decoder layer {i}"))?;
            check_finite(&h, &format!("output of decoder layer {i}"))?;
        }
        let fin = model.final_hidden(&h)?;
        for (w, window) in batch.iter().enumerate() {
            let x = fin.get(w)?.narrow(0, 0, seqlen - 1)?;
            let s = head_nll_sum(&x, model.lm_head()?, &window[1..])?;
            ensure!(s.is_finite(), "non-finite log-likelihood in window {} (logits hold NaN or Inf)", done + w);
            nll += s;
        }
        done += b;
        pb.inc(b as u64);
        let secs = start.elapsed().as_secs_f64();
        pb.set_message(format!("{:.0} tok/s", (done * seqlen) as f64 / secs));
    }
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
