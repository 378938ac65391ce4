//! The command-line verbs, as library functions: each verb's options are declared here, once, as a struct the
//! command line reads (`main.rs` only dispatches), and its function does the work.

pub mod compare;
pub mod prune;
pub mod resume;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use candle_core::{Device, Tensor};
use serde_json::json;

use crate::data::dataset::{self, TextFormat};
use crate::eval::perplexity::{PplOptions, PplResult, perplexity};
use crate::eval::zeroshot;
use crate::model::export::{WriteOptions, write_checkpoint};
use crate::model::{Checkpoint, Format, forward_logits};
use crate::output::{AtomicDir, Claim, Force, Kind, RunPaths};
use crate::util::Progress;

/// `fistaprune eval`: perplexity on a dataset, zero-shot tasks, or both.
#[derive(Debug, Clone)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct EvalArgs {
    /// Hugging Face model folder, .gguf file or Hub id (org/name).
    #[cfg_attr(feature = "cli", arg(long))]
    pub model: PathBuf,
    /// Dataset for perplexity: a file (.raw/.txt, .jsonl, .json.gz, .parquet) or a name the peers use
    /// (wikitext2, c4, ptb: fetched through the Hugging Face cache).
    #[cfg_attr(feature = "cli", arg(long, required_unless_present = "tasks"))]
    pub dataset: Option<PathBuf>,
    /// How to read the dataset (default: guessed from the file name).
    #[cfg_attr(feature = "cli", arg(long, value_enum))]
    pub format: Option<TextFormat>,
    /// Tokens per window.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 512))]
    pub seqlen: usize,
    /// Evaluate only the first K windows.
    #[cfg_attr(feature = "cli", arg(long))]
    pub max_windows: Option<usize>,
    /// Windows per forward batch.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 1))]
    pub batch: usize,
    /// Keep materialised (f32) decoder layers up to this many MB; past it, each batch re-reads every layer from
    /// the memory map, so that only one layer is in working memory.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 4096))]
    pub layer_memory_mb: usize,
    /// Zero-shot tasks, scored as lm-evaluation-harness does (acc, acc_norm): boolq, rte, hellaswag, winogrande,
    /// arc_easy, arc_challenge, openbookqa.
    #[cfg_attr(feature = "cli", arg(long, value_delimiter = ','))]
    pub tasks: Vec<String>,
    /// Folder of the task files (`boolq/dev.jsonl`, `winogrande/dev.jsonl`, `arc_easy/test.json`,
    /// `openbookqa/test.jsonl`, ...), or `hub`: the datasets lm-evaluation-harness reads (Parquet splits of
    /// aps/super_glue, allenai/ai2_arc, ...) from the Hugging Face cache, downloaded into it when online.
    #[cfg_attr(feature = "cli", arg(long, default_value = "../shared/data/zeroshot"))]
    pub tasks_dir: PathBuf,
    /// Zero-shot: score only the first K examples of each task.
    #[cfg_attr(feature = "cli", arg(long))]
    pub limit: Option<usize>,
    /// Also write the result as JSON here (with both a dataset and tasks, the tasks go beside it, in
    /// NAME.tasks.json).
    #[cfg_attr(feature = "cli", arg(long))]
    pub json: Option<PathBuf>,
    #[cfg_attr(feature = "cli", command(flatten))]
    pub force: Force,
    /// No progress bar or summary line.
    #[cfg_attr(feature = "cli", arg(long))]
    pub quiet: bool,
    #[cfg_attr(feature = "cli", arg(skip))]
    pub progress: Progress,
}

impl EvalArgs {
    /// The defaults, for the perplexity of `model` on `dataset`.
    pub fn perplexity(model: &Path, dataset: &Path) -> Self {
        Self {
            model: model.to_path_buf(),
            dataset: Some(dataset.to_path_buf()),
            format: None,
            seqlen: 512,
            max_windows: None,
            batch: 1,
            layer_memory_mb: 4096,
            tasks: Vec::new(),
            tasks_dir: PathBuf::from("../shared/data/zeroshot"),
            limit: None,
            json: None,
            force: Force::default(),
            quiet: true,
            progress: Progress::Hidden,
        }
    }
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
    let local_tasks = a.tasks_dir != Path::new("hub") || a.tasks_dir.is_dir();
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
    let ppl_claim = ppl_json.map(|j| paths.claim("--json", &j, Kind::File, a.force.force)).transpose()?;
    let tasks_claim = tasks_json.map(|j| paths.claim("--json", &j, Kind::File, a.force.force)).transpose()?;
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
                crate::model::hub::dataset_file(repo, "main", file, "pass --tasks-dir FOLDER")
                    .with_context(|| format!("--tasks {t}"))
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
    let source = dataset::Source::locate(path, format, dataset::Role::Evaluation)?;
    let ids = ck.tokenizer()?.encode(&source.text()?, true)?;
    let max_pos = ck.config.max_positions();
    ensure!(seqlen <= max_pos, "--seqlen {seqlen} is above the model's context of {max_pos} positions");
    let windows = dataset::windows(&ids, seqlen, max_windows, &source.shown())?;
    Ok((source.format, windows))
}

/// `fistaprune tokenize`: the token ids of a dataset as `eval` reads it (before windowing), as JSON, for
/// cross-checks with other tools.
#[derive(Debug, Clone)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct Tokenize {
    #[cfg_attr(feature = "cli", arg(long))]
    pub model: PathBuf,
    #[cfg_attr(feature = "cli", arg(long))]
    pub dataset: PathBuf,
    #[cfg_attr(feature = "cli", arg(long, value_enum))]
    pub format: Option<TextFormat>,
    #[cfg_attr(feature = "cli", arg(long))]
    pub out: PathBuf,
    #[cfg_attr(feature = "cli", command(flatten))]
    pub force: Force,
}

/// The number of token ids written.
pub fn tokenize(t: &Tokenize) -> Result<usize> {
    let out = RunPaths::new().model(&t.model)?.input("--dataset", Some(&t.dataset))?.claim(
        "--out",
        &t.out,
        Kind::File,
        t.force.force,
    )?;
    let ck = Checkpoint::open(&t.model)?;
    let source = dataset::Source::locate(&t.dataset, t.format, dataset::Role::Evaluation)?;
    let ids = ck.tokenizer()?.encode(&source.text()?, true)?;
    out.write_json(&json!({
        "model": t.model.display().to_string(), "dataset": t.dataset.display().to_string(), "format": source.format, "ids": ids,
    }))?;
    Ok(ids.len())
}

/// Perplexity on `dataset`, as the peers measure it.
fn perplexity_of(a: &EvalArgs, dataset: &Path, json: Option<&Claim>) -> Result<PplResult> {
    let ck = Checkpoint::open(&a.model)?;
    let (format, windows) = dataset_windows(&ck, dataset, a.format, a.seqlen, a.max_windows)?;
    let model = ck.model()?;
    let opts = PplOptions { batch: a.batch, layer_budget_bytes: a.layer_memory_mb << 20, progress: a.progress };
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

/// `fistaprune convert`: a checkpoint (e.g. a GGUF file) as a Hugging Face folder.
#[derive(Debug, Clone)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct Convert {
    #[cfg_attr(feature = "cli", arg(long))]
    pub model: PathBuf,
    #[cfg_attr(feature = "cli", arg(long))]
    pub out: PathBuf,
    #[cfg_attr(feature = "cli", command(flatten))]
    pub write: WriteOptions,
    #[cfg_attr(feature = "cli", command(flatten))]
    pub force: Force,
}

pub fn convert(c: &Convert) -> Result<()> {
    c.write.check()?;
    let claim = RunPaths::new().model(&c.model)?.claim("--out", &c.out, Kind::Folder, c.force.force)?;
    let ck = Checkpoint::open(&c.model)?;
    let specs = ck.tensor_specs();
    let dtype = c.write.dtype_for(&ck);
    let dir = AtomicDir::new(claim)?;
    write_checkpoint(&dir.tmp, &ck, &specs, dtype, &c.write, &mut &*ck.weights)
        .with_context(|| format!("writing {}", c.out.display()))?;
    dir.write_report(&json!({
        "command": std::env::args().collect::<Vec<_>>(), "model": c.model.display().to_string(),
        "dtype": dtype, "tensors": specs.len(),
    }))?;
    dir.commit()
}

/// `fistaprune inspect`: architecture, shapes, dtypes and parameter counts of a checkpoint.
#[derive(Debug, Clone)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct Inspect {
    #[cfg_attr(feature = "cli", arg(long))]
    pub model: PathBuf,
    /// Print JSON instead of a table.
    #[cfg_attr(feature = "cli", arg(long))]
    pub json: bool,
}

/// Print what [`inspect`] finds, as a table or as JSON.
pub fn print_inspect(i: &Inspect) -> Result<()> {
    let info = inspect(&i.model)?;
    if i.json {
        println!("{}", serde_json::to_string_pretty(&info)?);
        return Ok(());
    }
    println!("{}  ({}, {})", info["path"].as_str().unwrap_or(""), info["format"], info["architecture"]);
    println!("parameters: {}", info["parameters"]);
    println!("  in decoder layers: {}", info["decoder_layer_parameters"]);
    println!("  prunable linear weights: {}", info["prunable_linear_parameters"]);
    println!("config: {}", info["config"]);
    if let Some(t) = info["tokenizer"].as_object() {
        println!("tokenizer: vocab {} bos {} eos {}", t["vocab_size"], t["bos_id"], t["eos_id"]);
    }
    for t in info["tensors"].as_array().into_iter().flatten() {
        println!("{:<60} {:<8} {}", t["name"].as_str().unwrap_or(""), t["dtype"].as_str().unwrap_or(""), t["shape"]);
    }
    Ok(())
}

/// Architecture, configuration and every tensor of a checkpoint.
pub fn inspect(model: &Path) -> Result<serde_json::Value> {
    let ck = Checkpoint::open(model)?;
    let mut tensors = Vec::new();
    let mut total = 0usize;
    let mut in_layers = 0usize;
    for name in ck.weights.names() {
        let m = ck.weights.meta(&name).expect("listed");
        let n: usize = m.shape.iter().product();
        total += n;
        if crate::model::layer_of(&name).is_some() {
            in_layers += n;
        }
        tensors.push(json!({"name": name, "shape": m.shape, "dtype": m.dtype}));
    }
    let linear_params: usize =
        ck.tensor_specs().iter().filter(|t| t.linear).map(|t| t.shape.iter().product::<usize>()).sum();
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

/// `fistaprune generate`: greedy continuation of a prompt.
#[derive(Debug, Clone)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct Generate {
    #[cfg_attr(feature = "cli", arg(long))]
    pub model: PathBuf,
    #[cfg_attr(feature = "cli", arg(long))]
    pub prompt: String,
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 24))]
    pub max_new_tokens: usize,
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
