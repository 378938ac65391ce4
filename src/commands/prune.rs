//! `fistaprune prune`: calibrate, walk the layers with a method, write the pruned checkpoint and its report.
//!
//! The output directory is assembled aside (`.NAME.partial-PID`, with each finished layer in `layers/`)
//! and renamed into place only when complete, so a failed or interrupted run leaves nothing half-written.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, anyhow, ensure};
use candle_core::{DType, Tensor};
use serde_json::json;

use super::{dataset_windows, tensor_specs};
use crate::data::calibration::{CalibMode, CalibSpec, Calibration};
use crate::data::dataset::TextFormat;
use crate::eval::perplexity::{PplOptions, perplexity};
use crate::model::export::{OutDType, write_hf_contents, write_safetensors};
use crate::model::safetensors::SafetensorsStore;
use crate::model::{Checkpoint, DecoderLayer, Format};
use crate::prune::magnitude::Magnitude;
use crate::prune::pipeline::{PipelineOptions, prune_sequential};
use crate::prune::sparsegpt::SparseGpt;
use crate::prune::wanda::Wanda;
use crate::prune::{Method, Pattern};
use crate::util::{AtomicDir, write_atomic};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MethodName {
    Magnitude,
    Wanda,
    Sparsegpt,
}

#[derive(Debug, Clone)]
pub struct PruneArgs {
    pub model: PathBuf,
    pub method: MethodName,
    pub pattern: Pattern,
    pub calib: Option<PathBuf>,
    pub calib_format: Option<TextFormat>,
    pub calib_mode: CalibMode,
    pub nsamples: usize,
    pub seqlen: usize,
    pub seed: u64,
    pub save_calib: Option<PathBuf>,
    pub out: PathBuf,
    pub force: bool,
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
    pub quiet: bool,
}

fn method_of(a: &PruneArgs) -> Box<dyn Method> {
    match a.method {
        MethodName::Magnitude => Box::new(Magnitude { per_row: a.magnitude_per_row }),
        MethodName::Wanda => Box::new(Wanda),
        MethodName::Sparsegpt => Box::new(SparseGpt { percdamp: a.percdamp, blocksize: a.blocksize }),
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

/// Write a finished layer (f32) to `dir`.
fn save_layer(dir: &Path, i: usize, layer: &dyn DecoderLayer) -> Result<()> {
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

pub fn prune(a: &PruneArgs) -> Result<serde_json::Value> {
    let t_start = Instant::now();
    let ck = Checkpoint::open(&a.model)?;
    let method = method_of(a);
    ensure!(a.batch > 0, "--batch must be at least 1");
    // Every layer has the same shapes: check the pattern against layer 0 before any work.
    if ck.config.num_layers() > 0 {
        let l0 = ck.model()?.load_layer(0)?;
        for name in l0.linear_names() {
            let lin = l0.linear(name).expect("listed");
            a.pattern.check_cols(lin.in_features(), name)?;
        }
    }

    // Calibration (magnitude needs none).
    let calib = if method.needs_gram() {
        let src = a.calib.as_ref().ok_or_else(|| anyhow!("--calib is required for --method {:?}", a.method))?;
        let max_pos = ck.config.max_positions();
        ensure!(a.seqlen <= max_pos, "--seqlen {} is above the model's context of {max_pos} positions", a.seqlen);
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
        c.check_vocab(ck.config.vocab_size(), src)?;
        if let Some(p) = &a.save_calib {
            c.save(p)?;
        }
        Some(c)
    } else {
        None
    };

    let eval_windows = match &a.eval {
        Some(p) => Some(dataset_windows(&ck, p, a.eval_format, a.eval_seqlen, a.eval_max_windows)?.1),
        None => None,
    };
    let ppl_opts = PplOptions { progress: !a.quiet, ..Default::default() };
    let before = match &eval_windows {
        Some(w) => Some(perplexity(ck.model()?.as_ref(), w, &ppl_opts).context("evaluating the dense model")?),
        None => None,
    };

    let dir = AtomicDir::new(&a.out, a.force)?;
    let layers_dir = dir.tmp.join("layers");
    std::fs::create_dir_all(&layers_dir)?;
    let model = ck.model()?;
    let ids: &[Vec<u32>] = calib.as_ref().map(|c| c.ids.as_slice()).unwrap_or(&[]);
    let opts = PipelineOptions { pattern: a.pattern, batch: a.batch, act_dtype: a.act_dtype, progress: !a.quiet };
    let t_prune = Instant::now();
    let layers = prune_sequential(model.as_ref(), ids, method.as_ref(), &opts, &mut |i, layer| {
        save_layer(&layers_dir, i, layer)
    })?;
    let prune_seconds = t_prune.elapsed().as_secs_f64();
    drop(model);

    // Assemble the checkpoint: pruned layers from their files, the rest from the input.
    let dtype = a.dtype.unwrap_or_else(|| input_dtype(&ck));
    let specs = tensor_specs(&ck);
    let mut current: Option<(usize, SafetensorsStore)> = None;
    let mut load = |name: &str| -> Result<Tensor> {
        match layer_of(name) {
            Some(i) => {
                if current.as_ref().is_none_or(|(c, _)| *c != i) {
                    current = Some((i, SafetensorsStore::open_files(&[layer_file(&layers_dir, i)])?));
                }
                current.as_ref().expect("set").1.load_f32(name)
            }
            None => ck.weights.load(name),
        }
    };
    write_hf_contents(&dir.tmp, &ck.config.to_hf_json(), ck.tokenizer.as_ref(), &specs, dtype, a.max_shard_bytes, &mut load)?;
    drop(load);
    std::fs::remove_dir_all(&layers_dir)?;

    let after = match &eval_windows {
        Some(w) => {
            let pruned = Checkpoint::open(&dir.tmp)?;
            Some(perplexity(pruned.model()?.as_ref(), w, &ppl_opts).context("evaluating the pruned model")?)
        }
        None => None,
    };

    let (zeros, total) = layers
        .iter()
        .flat_map(|l| &l.operators)
        .fold((0f64, 0f64), |(z, t), o| {
            let n = (o.shape[0] * o.shape[1]) as f64;
            (z + o.sparsity * n, t + n)
        });
    let report = json!({
        "fistaprune_version": env!("CARGO_PKG_VERSION"),
        "command": std::env::args().collect::<Vec<_>>(),
        "model": a.model.display().to_string(),
        "architecture": ck.config.model_type(),
        "method": a.method,
        "pattern": a.pattern.to_string(),
        "target_sparsity": a.pattern.sparsity(),
        "sparsity": zeros / total,
        "pruned_parameters": total as u64,
        "dtype": dtype.torch_name(),
        "options": {
            "percdamp": a.percdamp, "blocksize": a.blocksize, "magnitude_per_row": a.magnitude_per_row,
            "batch": a.batch, "act_dtype": format!("{:?}", a.act_dtype).to_lowercase(),
        },
        "calibration": calib.as_ref().map(|c| json!({
            "source": c.source, "nsamples": c.nsamples, "seqlen": c.seqlen, "seed": c.seed, "mode": c.mode,
            "documents": c.documents, "long_documents": c.long_documents, "sha256": c.sha256,
        })),
        "seconds": t_start.elapsed().as_secs_f64(),
        "prune_seconds": prune_seconds,
        "prune_gflop": layers.iter().map(|l| l.gflop).sum::<f64>(),
        "prune_gflop_per_second": layers.iter().map(|l| l.gflop).sum::<f64>() / prune_seconds,
        "eval": eval_windows.as_ref().map(|w| json!({
            "dataset": a.eval.as_ref().map(|p| p.display().to_string()),
            "seqlen": a.eval_seqlen, "windows": w.len(),
        })),
        "perplexity_before": before.as_ref().map(|r| r.perplexity),
        "perplexity_after": after.as_ref().map(|r| r.perplexity),
        "layers": layers,
    });
    write_atomic(&dir.tmp.join("report.json"), serde_json::to_string_pretty(&report)?.as_bytes())?;
    dir.commit()?;
    if !a.quiet {
        println!(
            "{}: {} {} -> {} (sparsity {:.4} over {} weights, {:.1} s)",
            a.model.display(),
            method.name(),
            a.pattern,
            a.out.display(),
            zeros / total,
            total as u64,
            prune_seconds
        );
        if let (Some(b), Some(af)) = (&before, &after) {
            println!("perplexity before {:.4}  after {:.4}  ({} windows x {})", b.perplexity, af.perplexity, b.windows, b.seqlen);
        }
    }
    Ok(report)
}
