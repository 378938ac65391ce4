//! The command-line verbs, as library functions (`main.rs` only parses arguments).

pub mod compare;
pub mod prune;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use candle_core::{Device, Tensor};
use serde_json::json;

use crate::data::dataset::{self, TextFormat};
use crate::eval::perplexity::{PplOptions, PplResult, perplexity};
use crate::eval::zeroshot;
use crate::model::export::{OutDType, write_hf_contents};
use crate::model::{Checkpoint, Format, forward_logits};
use crate::output::{AtomicDir, Claim, Kind, RunPaths};
use crate::util::Progress;

/// `fistaprune eval`: perplexity on a dataset, zero-shot tasks, or both.
pub struct EvalArgs {
    pub model: PathBuf,
    /// Text for perplexity.
    pub dataset: Option<PathBuf>,
    pub format: Option<TextFormat>,
    pub seqlen: usize,
    pub max_windows: Option<usize>,
    pub batch: usize,
    /// See [`PplOptions::layer_budget_bytes`].
    pub layer_memory_bytes: usize,
    /// Zero-shot tasks.
    pub tasks: Vec<String>,
    /// Folder holding the task files (`boolq/dev.jsonl`, ...; see [`zeroshot::task_file`]), or `hub`.
    pub tasks_dir: PathBuf,
    /// Score only the first K examples of each task.
    pub limit: Option<usize>,
    /// The results as JSON; with both a dataset and tasks, the tasks go beside it (`NAME.tasks.json`).
    pub json: Option<PathBuf>,
    /// Replace an earlier `--json` output.
    pub force: bool,
    /// No summary lines on stdout.
    pub quiet: bool,
    pub progress: Progress,
}

/// What `eval` measured.
pub struct EvalResult {
    pub perplexity: Option<PplResult>,
    pub tasks: Vec<zeroshot::TaskResult>,
}

/// `fistaprune eval`: every input and output is checked before any model work, then the zero-shot tasks and
/// the perplexity are measured.
pub fn eval(a: &EvalArgs) -> Result<EvalResult> {
    ensure!(a.dataset.is_some() || !a.tasks.is_empty(), "eval: give --dataset, --tasks, or both");
    let local_tasks = !(a.tasks_dir == Path::new("hub") && !a.tasks_dir.is_dir());
    let mut paths = RunPaths::new()
        .model(&a.model)?
        .input("--dataset", a.dataset.as_deref())?
        .input("--tasks-dir", (!a.tasks.is_empty() && local_tasks).then_some(a.tasks_dir.as_path()))?;
    let (ppl_json, tasks_json) = match (&a.json, a.dataset.is_some(), a.tasks.is_empty()) {
        (None, _, _) => (None, None),
        (Some(j), true, false) => (Some(j.clone()), Some(j.with_extension("tasks.json"))),
        (Some(j), true, true) => (Some(j.clone()), None),
        (Some(j), false, _) => (None, Some(j.clone())),
    };
    let ppl_claim = ppl_json.map(|j| paths.claim("--json", &j, Kind::File, a.force)).transpose()?;
    let tasks_claim = tasks_json.map(|j| paths.claim("--json", &j, Kind::File, a.force)).transpose()?;
    let tasks = if a.tasks.is_empty() { Vec::new() } else { zeroshot_tasks(a, local_tasks, tasks_claim.as_ref())? };
    let perplexity = match &a.dataset {
        Some(d) => Some(perplexity_of(a, d, ppl_claim.as_ref())?),
        None => None,
    };
    Ok(EvalResult { perplexity, tasks })
}

/// Zero-shot acc and acc_norm of each task, as lm-evaluation-harness scores them.
fn zeroshot_tasks(a: &EvalArgs, local: bool, json: Option<&Claim>) -> Result<Vec<zeroshot::TaskResult>> {
    // Every file is found (or downloaded) before any model work.
    let files: Vec<PathBuf> = if !local {
        a.tasks
            .iter()
            .map(|t| {
                let (repo, file) = zeroshot::hub_task_file(t)?;
                crate::model::hub::dataset_file(repo, file).with_context(|| format!("--tasks {t}"))
            })
            .collect::<Result<_>>()?
    } else {
        ensure!(
            a.tasks_dir.is_dir(),
            "--tasks-dir {}: not a folder (a folder of task files, or `hub` for the Hugging Face Hub)",
            a.tasks_dir.display()
        );
        a.tasks.iter().map(|t| zeroshot::task_file(&a.tasks_dir, t)).collect::<Result<_>>()?
    };
    let ck = Checkpoint::open(&a.model)?;
    let tok = ck.tokenizer()?;
    // Padding, and the stand-in for an empty context (the harness's prefix token: BOS, else EOS).
    let eos = tok.bos_id.or(tok.eos_id).or(ck.config.eos_token_id()).unwrap_or(0);
    let model = ck.model()?;
    let mut results = Vec::new();
    for (t, f) in a.tasks.iter().zip(&files) {
        let r = zeroshot::evaluate(model.as_ref(), tok, eos, t, f, a.limit, a.progress)?;
        if !a.quiet {
            println!(
                "{:<14} acc {:.4} ± {:.4}  acc_norm {:.4} ± {:.4}  ({} examples, {:.0} s)",
                r.task, r.acc, r.acc_stderr, r.acc_norm, r.acc_norm_stderr, r.examples, r.seconds
            );
        }
        results.push(r);
    }
    if let Some(out) = json {
        let mean = |f: fn(&zeroshot::TaskResult) -> f64| results.iter().map(f).sum::<f64>() / results.len() as f64;
        out.write_json(&json!({
            "model": a.model.display().to_string(), "tasks": results, "limit": a.limit,
            "mean_acc": mean(|r| r.acc), "mean_acc_norm": mean(|r| r.acc_norm),
        }))?;
    }
    Ok(results)
}

/// Tokenize a dataset file the peers' way and cut it into windows.
pub fn dataset_windows(
    ck: &Checkpoint,
    path: &Path,
    format: Option<TextFormat>,
    seqlen: usize,
    max_windows: Option<usize>,
) -> Result<(TextFormat, Vec<Vec<u32>>)> {
    let format = format.unwrap_or_else(|| dataset::detect_format(path));
    let text = dataset::eval_text(path, format)?;
    let ids = ck.tokenizer()?.encode(&text, true)?;
    let max_pos = ck.config.max_positions();
    ensure!(seqlen <= max_pos, "--seqlen {seqlen} is above the model's context of {max_pos} positions");
    let windows = dataset::windows(&ids, seqlen, max_windows, &path.display().to_string())?;
    Ok((format, windows))
}

/// Token ids of a dataset as the evaluation sees them (before windowing), for cross-checks with other tools.
pub fn tokenize(model: &Path, dataset: &Path, format: Option<TextFormat>, out: &Path, force: bool) -> Result<usize> {
    let out =
        RunPaths::new().model(model)?.input("--dataset", Some(dataset))?.claim("--out", out, Kind::File, force)?;
    let ck = Checkpoint::open(model)?;
    let format = format.unwrap_or_else(|| dataset::detect_format(dataset));
    let text = dataset::eval_text(dataset, format)?;
    let ids = ck.tokenizer()?.encode(&text, true)?;
    out.write_json(&json!({"model": model.display().to_string(), "dataset": dataset.display().to_string(), "format": format, "ids": ids}))?;
    Ok(ids.len())
}

/// Perplexity on `dataset`, as the peers measure it.
fn perplexity_of(a: &EvalArgs, dataset: &Path, json: Option<&Claim>) -> Result<PplResult> {
    let ck = Checkpoint::open(&a.model)?;
    let (format, windows) = dataset_windows(&ck, dataset, a.format, a.seqlen, a.max_windows)?;
    let model = ck.model()?;
    let opts = PplOptions { batch: a.batch, layer_budget_bytes: a.layer_memory_bytes, progress: a.progress };
    let r = perplexity(model.as_ref(), &windows, &opts)?;
    if !a.quiet {
        println!(
            "{}: perplexity {:.4} on {} ({} windows x {} tokens, {:.1} s, {:.0} tok/s)",
            a.model.display(),
            r.perplexity,
            dataset.display(),
            r.windows,
            r.seqlen,
            r.seconds,
            r.tokens_per_second
        );
    }
    if let Some(out) = json {
        let mut j = serde_json::to_value(&r)?;
        j["model"] = json!(a.model.display().to_string());
        j["dataset"] = json!(dataset.display().to_string());
        j["format"] = json!(format);
        out.write_json(&j)?;
    }
    Ok(r)
}

/// Names and shapes of every tensor a checkpoint of this configuration holds (what `convert` writes).
pub fn tensor_specs(ck: &Checkpoint) -> Vec<(String, Vec<usize>)> {
    ck.expected_tensors()
        .into_iter()
        .filter(|(name, _, required)| *required || ck.weights.contains(name))
        // A tied head is not stored (transformers re-ties it on load).
        .filter(|(name, _, _)| !(name == "lm_head.weight" && is_tied(ck)))
        .map(|(n, s, _)| (n, s))
        .collect()
}

fn is_tied(ck: &Checkpoint) -> bool {
    match &ck.config {
        crate::model::ModelConfig::Llama(c) => c.tie_word_embeddings,
        crate::model::ModelConfig::Opt(c) => c.tie_word_embeddings,
    }
}

pub fn convert(model: &Path, out: &Path, dtype: OutDType, max_shard_bytes: usize, force: bool) -> Result<()> {
    let claim = RunPaths::new().model(model)?.claim("--out", out, Kind::Folder, force)?;
    let ck = Checkpoint::open(model)?;
    let specs = tensor_specs(&ck);
    let dir = AtomicDir::new(claim)?;
    let mut load = |name: &str| ck.weights.load(name);
    write_hf_contents(
        &dir.tmp,
        &ck.config.to_hf_json(),
        ck.tokenizer.as_ref(),
        &specs,
        dtype,
        max_shard_bytes,
        &mut load,
    )
    .with_context(|| format!("writing {}", out.display()))?;
    dir.write_report(&json!({
        "command": std::env::args().collect::<Vec<_>>(), "model": model.display().to_string(),
        "dtype": dtype.torch_name(), "tensors": specs.len(),
    }))?;
    dir.commit()
}

/// What `inspect` prints: architecture, configuration and every tensor.
pub fn inspect(model: &Path) -> Result<serde_json::Value> {
    let ck = Checkpoint::open(model)?;
    let mut tensors = Vec::new();
    let mut total = 0usize;
    let mut in_layers = 0usize;
    let mut linear_params = 0usize;
    for name in ck.weights.names() {
        let m = ck.weights.meta(&name).expect("listed");
        let n: usize = m.shape.iter().product();
        total += n;
        if name.contains(".layers.") {
            in_layers += n;
            if name.ends_with("proj.weight") || name.ends_with("fc1.weight") || name.ends_with("fc2.weight") {
                linear_params += n;
            }
        }
        tensors.push(json!({"name": name, "shape": m.shape, "dtype": m.dtype}));
    }
    let tok =
        ck.tokenizer.as_ref().map(|t| json!({"vocab_size": t.vocab_size(), "bos_id": t.bos_id, "eos_id": t.eos_id}));
    Ok(json!({
        "path": model.display().to_string(),
        "format": if ck.format == Format::Gguf { "gguf" } else { "huggingface" },
        "architecture": ck.config.model_type(),
        "config": ck.config.to_hf_json(),
        "parameters": total,
        "decoder_layer_parameters": in_layers,
        "prunable_linear_parameters": linear_params,
        "tokenizer": tok,
        "tensors": tensors,
    }))
}

/// Greedy continuation of `prompt` (no KV cache: for checks, not for serving).
pub fn generate(model: &Path, prompt: &str, max_new_tokens: usize) -> Result<String> {
    let ck = Checkpoint::open(model)?;
    let tok = ck.tokenizer()?;
    let lm = ck.model()?;
    let mut ids = tok.encode(prompt, true)?;
    if ids.is_empty() {
        bail!("the prompt tokenizes to nothing");
    }
    let n0 = ids.len();
    for _ in 0..max_new_tokens {
        let t = Tensor::from_vec(ids.clone(), (1, ids.len()), &Device::Cpu)?;
        let logits = forward_logits(lm.as_ref(), &t)?;
        let last = logits.squeeze(0)?.get(ids.len() - 1)?.to_vec1::<f32>()?;
        let next = last
            .iter()
            .enumerate()
            .fold((0usize, f32::NEG_INFINITY), |best, (i, &v)| if v > best.1 { (i, v) } else { best })
            .0 as u32;
        if Some(next) == tok.eos_id {
            break;
        }
        ids.push(next);
    }
    tok.decode(&ids[n0..])
}
