//! The `fistaprune` command line: argument parsing only; the work is in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use fistaprune::commands;
use fistaprune::commands::prune::{MethodName, WarmStart};
use fistaprune::data::calibration::CalibMode;
use fistaprune::data::dataset::TextFormat;
use fistaprune::model::export::OutDType;
use fistaprune::prune::Pattern;
use fistaprune::prune::fista::FistaOptions;
use fistaprune::prune::pipeline::LayerInputs;
use fistaprune::util::Progress;

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Threshold {
    PerRow,
    PerMatrix,
    /// Each row keeps as many zeros as the warm start has in it (per row when it has none).
    WarmRows,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Basis {
    Raw,
    Normalized,
}

/// `A-B` or `A` (inclusive).
fn parse_layers(s: &str) -> anyhow::Result<(usize, usize)> {
    let parse =
        |x: &str| x.trim().parse::<usize>().map_err(|_| anyhow::anyhow!("--layers {s:?}: expected A-B, e.g. 0-14"));
    match s.split_once('-') {
        Some((a, b)) => Ok((parse(a)?, parse(b)?)),
        None => parse(s).map(|a| (a, a)),
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ActDType {
    F32,
    F16,
    Bf16,
}

impl From<ActDType> for candle_core::DType {
    fn from(d: ActDType) -> Self {
        match d {
            ActDType::F32 => candle_core::DType::F32,
            ActDType::F16 => candle_core::DType::F16,
            ActDType::Bf16 => candle_core::DType::BF16,
        }
    }
}

/// How long steps report progress.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ProgressMode {
    /// Bars with ETA on stderr when it is a terminal (none under --quiet).
    Auto,
    /// One JSON object per line on stderr: stage start/progress/done, each pruned layer, the result.
    Json,
    /// No progress at all.
    None,
}

impl ProgressMode {
    fn resolve(self, quiet: bool) -> Progress {
        match self {
            Self::Json => Progress::Json,
            Self::None => Progress::Hidden,
            Self::Auto if quiet => Progress::Hidden,
            Self::Auto => Progress::Bar,
        }
    }
}

#[derive(Parser)]
#[command(name = "fistaprune", version, about = "Post-training pruning of large language models")]
struct Cli {
    /// Worker threads for the matrix kernels (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    /// Progress display: bars (auto), JSON lines on stderr for machines (json), or none.
    #[arg(long, global = true, value_enum, default_value = "auto")]
    progress: ProgressMode,
    #[command(subcommand)]
    command: Command,
}

/// The options `prune` and `compare` share.
#[derive(clap::Args, Clone)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["sparsity", "pattern"])))]
struct PruneFlags {
    /// Hugging Face model directory or .gguf file.
    #[arg(long)]
    model: PathBuf,
    /// Unstructured: this fraction of each operator's weights becomes zero.
    #[arg(long)]
    sparsity: Option<f64>,
    /// Semi-structured N:M (N zeros in every M consecutive inputs), e.g. 2:4.
    #[arg(long)]
    pattern: Option<String>,
    /// Calibration text (C4 .jsonl/.json.gz, WikiText, any text) or a file saved with --save-calib.
    #[arg(long)]
    calib: Option<PathBuf>,
    #[arg(long, value_enum)]
    calib_format: Option<TextFormat>,
    /// documents: random long document, random window (the peers' C4 recipe); stream: documents joined
    /// with EOS, random windows; auto: documents when enough are long enough.
    #[arg(long, value_enum, default_value = "auto")]
    calib_mode: CalibMode,
    /// Calibration samples [default: 128, or the count a saved --calib file holds].
    #[arg(long)]
    nsamples: Option<usize>,
    /// Tokens per calibration sample [default: 2048, or the length a saved --calib file holds].
    #[arg(long)]
    seqlen: Option<usize>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Save the calibration token ids here (reload them with --calib FILE).
    #[arg(long)]
    save_calib: Option<PathBuf>,
    /// Replace an earlier output of fistaprune, or an empty folder (nothing else is ever replaced), and clear
    /// what an interrupted run left aside.
    #[arg(long)]
    force: bool,
    /// Continue an interrupted run into the same --out with the same flags: the layers it finished
    /// (kept in `.OUT.partial` beside --out) are not pruned again; the result is the same bytes.
    #[arg(long)]
    resume: bool,
    /// Output weight type (default: the input's; f32 for GGUF).
    #[arg(long, value_enum)]
    dtype: Option<OutDType>,
    #[arg(long, default_value_t = 5.0)]
    max_shard_gb: f64,
    /// Print perplexity on this dataset before and after pruning.
    #[arg(long)]
    eval: Option<PathBuf>,
    #[arg(long, value_enum)]
    eval_format: Option<TextFormat>,
    #[arg(long, default_value_t = 512)]
    eval_seqlen: usize,
    #[arg(long)]
    eval_max_windows: Option<usize>,
    /// Calibration samples per forward batch.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Storage type of the activations between layers.
    #[arg(long, value_enum, default_value = "f32")]
    act_dtype: ActDType,
    /// SparseGPT: diagonal damping, as a fraction of the mean diagonal of the Hessian.
    #[arg(long, default_value_t = 0.01)]
    percdamp: f64,
    /// SparseGPT: columns per lazy-update block.
    #[arg(long, default_value_t = 128)]
    blocksize: usize,
    /// Magnitude: one threshold per output row instead of per matrix.
    #[arg(long)]
    per_row: bool,
    /// Each layer's calibration inputs: from the pruned previous layers (SparseGPT's way, the default: it
    /// measured far better for fista too), from the dense model (the FISTAPruner paper's: layers independent,
    /// so --jobs and --layers can split the work), or corrected: the pruned layers' outputs as inputs with the
    /// dense model's as targets (error correction across layers too).
    #[arg(long, value_enum, default_value = "pruned")]
    layer_inputs: LayerInputs,
    /// Prune the operators of a layer in data-flow order, each against the inputs the partially pruned
    /// layer gives it (default for fista).
    #[arg(long, conflicts_with = "no_error_correction")]
    error_correction: bool,
    /// Every operator sees the dense layer's inputs (the ablation; default for the others).
    #[arg(long)]
    no_error_correction: bool,
    /// Prune only layers A-B (inclusive; with dense layer inputs); `fistaprune merge` joins the parts.
    #[arg(long)]
    layers: Option<String>,
    /// Layers pruned at the same time (dense layer inputs); the checkpoint does not depend on it.
    #[arg(long, default_value_t = 1)]
    jobs: usize,
    /// FISTAPruner's starting point (default sparsegpt; the paper used wanda for the LLaMA family).
    #[arg(long, value_enum)]
    warm_start: Option<WarmStart>,
    /// FISTA: iterations per λ (K).
    #[arg(long, default_value_t = 20)]
    iters: usize,
    /// FISTA: stop when the iterate moves less than this (relative).
    #[arg(long, default_value_t = 1e-4)]
    tol: f64,
    /// FISTA: λ bisection rounds (T).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// FISTA: target share of the rounding error in the total error (ξ).
    #[arg(long, default_value_t = 0.3)]
    xi: f64,
    /// FISTA: initial λ, as a multiple of L · rms(W) (the soft threshold in units of a typical weight).
    #[arg(long, default_value_t = 0.1)]
    alpha: f64,
    #[arg(long, default_value_t = 1e-3)]
    alpha_min: f64,
    #[arg(long, default_value_t = 1.0)]
    alpha_max: f64,
    /// FISTA: unstructured hard threshold per row with the warm start's count of zeros in each row (the
    /// default: SparseGPT spreads its zeros unevenly over the rows, and that is worth 15 % perplexity at
    /// 50 %), per output row (the paper), or per matrix. N:M patterns are per group whatever this says.
    #[arg(long, value_enum, default_value = "warm-rows")]
    threshold: Threshold,
    /// FISTA: masked conjugate-gradient re-fit steps on the final support (0: off, as in the paper).
    #[arg(long, default_value_t = 20)]
    refit_iters: usize,
    /// FISTA: keep the pattern inside the iterations (hard threshold every step).
    #[arg(long)]
    projected: bool,
    /// FISTA: ridge on G*, as a fraction of its mean diagonal (as SparseGPT's --percdamp).
    #[arg(long, default_value_t = 0.0)]
    damp: f64,
    /// FISTA: solve for the weights as they are (the paper) or in the basis of unit-norm input channels
    /// (Jacobi-scaled G*: better conditioned, and the L1 term and the hard threshold weigh each weight by its
    /// input's norm, as Wanda's score does).
    #[arg(long, value_enum, default_value = "raw")]
    basis: Basis,
    /// Scale tokens whose operator input has a mean square above this many times their sequence's median
    /// down to that level in the statistics every method uses (massive activations otherwise make a few
    /// tokens the whole least-squares objective). Off by default.
    #[arg(long)]
    token_cap: Option<f64>,
    /// Unstructured only: spread the sparsity over the layers by their outlier ratios (OWL), mean unchanged.
    #[arg(long)]
    owl: bool,
    /// OWL: half the spread of the per-layer sparsities (λ).
    #[arg(long, default_value_t = 0.08)]
    owl_lambda: f64,
    /// OWL: a score is an outlier above this many times its layer's mean score (M).
    #[arg(long, default_value_t = 5.0)]
    owl_m: f64,
    /// No progress bars or summary lines.
    #[arg(long)]
    quiet: bool,
    /// For machines: JSON lines on stderr (progress, each layer, the result) and nothing on stdout
    /// (the same as --progress json --quiet).
    #[arg(long)]
    json: bool,
}

impl PruneFlags {
    fn to_args(
        &self,
        method: MethodName,
        out: PathBuf,
        progress: ProgressMode,
    ) -> anyhow::Result<commands::prune::PruneArgs> {
        let f = self.clone();
        let pattern = match (f.sparsity, &f.pattern) {
            (Some(s), None) => Pattern::unstructured(s)?,
            (None, Some(p)) => p.parse()?,
            _ => anyhow::bail!("give exactly one of --sparsity and --pattern"),
        };
        anyhow::ensure!(f.percdamp >= 0.0 && f.percdamp.is_finite(), "--percdamp {} must be ≥ 0", f.percdamp);
        if let Some(k) = f.token_cap {
            anyhow::ensure!(k >= 1.0 && k.is_finite(), "--token-cap {k} must be at least 1 (a multiple of the median)");
        }
        Ok(commands::prune::PruneArgs {
            model: f.model,
            method,
            pattern,
            calib: f.calib,
            calib_format: f.calib_format,
            calib_mode: f.calib_mode,
            nsamples: f.nsamples,
            seqlen: f.seqlen,
            seed: f.seed,
            save_calib: f.save_calib,
            out,
            force: f.force,
            resume: f.resume,
            dtype: f.dtype,
            max_shard_bytes: (f.max_shard_gb * 1e9) as usize,
            eval: f.eval,
            eval_format: f.eval_format,
            eval_seqlen: f.eval_seqlen,
            eval_max_windows: f.eval_max_windows,
            batch: f.batch,
            act_dtype: f.act_dtype.into(),
            percdamp: f.percdamp,
            blocksize: f.blocksize,
            magnitude_per_row: f.per_row,
            layer_inputs: f.layer_inputs,
            error_correction: if f.error_correction {
                Some(true)
            } else if f.no_error_correction {
                Some(false)
            } else {
                None
            },
            layers: f.layers.as_deref().map(parse_layers).transpose()?,
            warm_start: f.warm_start,
            fista: FistaOptions {
                iters: f.iters,
                tol: f.tol,
                rounds: f.rounds,
                xi: f.xi,
                alpha0: f.alpha,
                alpha_bracket: (f.alpha_min, f.alpha_max),
                per_row: f.threshold != Threshold::PerMatrix,
                warm_rows: f.threshold == Threshold::WarmRows,
                refit_iters: f.refit_iters,
                projected: f.projected,
                damp: f.damp,
                normalize: f.basis == Basis::Normalized,
                ..FistaOptions::default()
            },
            jobs: f.jobs.max(1),
            token_cap: f.token_cap,
            owl: f.owl.then_some(fistaprune::prune::allocation::Owl { lambda: f.owl_lambda, m: f.owl_m }),
            quiet: f.quiet || f.json,
            progress: if f.json { Progress::Json } else { progress.resolve(f.quiet) },
        })
    }
}

#[derive(Subcommand)]
enum Command {
    /// Perplexity of a model on a text dataset (WikiText-2, C4, PTB or any text file).
    Eval {
        /// Hugging Face model directory or .gguf file.
        #[arg(long)]
        model: PathBuf,
        /// Dataset file (.raw/.txt, .jsonl, .json.gz) for perplexity.
        #[arg(long, required_unless_present = "tasks")]
        dataset: Option<PathBuf>,
        /// Zero-shot tasks, scored as lm-evaluation-harness does (acc, acc_norm): boolq, rte, hellaswag,
        /// winogrande, arc_easy, arc_challenge, openbookqa.
        #[arg(long, value_delimiter = ',')]
        tasks: Vec<String>,
        /// Folder of the task files (`boolq/dev.jsonl`, `winogrande/dev.jsonl`, `arc_easy/test.json`,
        /// `openbookqa/test.jsonl`, ...), or `hub`: the datasets lm-evaluation-harness reads (Parquet splits of
        /// aps/super_glue, allenai/ai2_arc, ...) from the Hugging Face cache, downloaded into it when online.
        #[arg(long, default_value = "../shared/data/zeroshot")]
        tasks_dir: PathBuf,
        /// Zero-shot: score only the first K examples of each task.
        #[arg(long)]
        limit: Option<usize>,
        /// How to read the dataset (default: guessed from the file name).
        #[arg(long, value_enum)]
        format: Option<TextFormat>,
        /// Tokens per window.
        #[arg(long, default_value_t = 512)]
        seqlen: usize,
        /// Evaluate only the first K windows.
        #[arg(long)]
        max_windows: Option<usize>,
        /// Windows per forward batch.
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Keep materialised (f32) decoder layers up to this many MB; past it, each batch re-reads every
        /// layer from the memory map, so that only one layer is in working memory.
        #[arg(long, default_value_t = 4096)]
        layer_memory_mb: usize,
        /// Also write the result as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Replace an earlier --json output of fistaprune (nothing else is ever replaced).
        #[arg(long)]
        force: bool,
        /// No progress bar or summary line.
        #[arg(long)]
        quiet: bool,
    },
    /// Prune a model layer by layer and write it as a Hugging Face directory with report.json.
    Prune {
        #[arg(long, value_enum)]
        method: MethodName,
        /// Output directory (Hugging Face layout).
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        flags: PruneFlags,
    },
    /// Run several methods on the same calibration token ids; write a table (Markdown, JSON) and a per-layer
    /// plot of reconstruction error.
    Compare {
        /// Methods to run, e.g. sparsegpt,wanda,fista.
        #[arg(long, value_enum, value_delimiter = ',', required = true)]
        methods: Vec<MethodName>,
        /// Output directory: one pruned checkpoint per method, compare.md, compare.json, layer_error.svg.
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        flags: PruneFlags,
    },
    /// Join the parts written by `prune --layers A-B` into one checkpoint.
    Merge {
        /// The model the parts were pruned from.
        #[arg(long)]
        model: PathBuf,
        /// Part directories, in any order.
        #[arg(long, num_args = 1.., required = true)]
        parts: Vec<PathBuf>,
        #[arg(long)]
        out: PathBuf,
        /// Replace an earlier output of fistaprune, or an empty folder (nothing else is ever replaced).
        #[arg(long)]
        force: bool,
        #[arg(long, value_enum)]
        dtype: Option<OutDType>,
        #[arg(long, default_value_t = 5.0)]
        max_shard_gb: f64,
    },
    /// Write a checkpoint (e.g. a GGUF file) as a Hugging Face directory.
    Convert {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, value_enum, default_value = "f32")]
        dtype: OutDType,
        /// Largest safetensors shard, in GB.
        #[arg(long, default_value_t = 5.0)]
        max_shard_gb: f64,
        /// Replace an earlier output of fistaprune, or an empty folder (nothing else is ever replaced).
        #[arg(long)]
        force: bool,
    },
    /// Architecture, shapes, dtypes and parameter counts of a checkpoint.
    Inspect {
        #[arg(long)]
        model: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Write the token ids of a dataset (as `eval` reads it) to a JSON file.
    Tokenize {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        dataset: PathBuf,
        #[arg(long, value_enum)]
        format: Option<TextFormat>,
        #[arg(long)]
        out: PathBuf,
        /// Replace an earlier output of fistaprune (nothing else is ever replaced).
        #[arg(long)]
        force: bool,
    },
    /// Greedy continuation of a prompt.
    Generate {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        prompt: String,
        #[arg(long, default_value_t = 24)]
        max_new_tokens: usize,
    },
}

fn run(cli: Cli) -> anyhow::Result<()> {
    if let Some(n) = cli.threads {
        rayon::ThreadPoolBuilder::new().num_threads(n).build_global().ok();
        // SAFETY: set before any other thread is started.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
    }
    match cli.command {
        Command::Eval {
            model,
            dataset,
            tasks,
            tasks_dir,
            limit,
            format,
            seqlen,
            max_windows,
            batch,
            layer_memory_mb,
            json,
            force,
            quiet,
        } => {
            commands::eval(&commands::EvalArgs {
                model,
                dataset,
                format,
                seqlen,
                max_windows,
                batch,
                layer_memory_bytes: layer_memory_mb << 20,
                tasks,
                tasks_dir,
                limit,
                json,
                force,
                quiet,
                progress: cli.progress.resolve(quiet),
            })?;
        }
        Command::Prune { method, out, flags } => {
            commands::prune::prune(&flags.to_args(method, out.clone(), cli.progress)?)?;
        }
        Command::Compare { methods, out, flags } => {
            let args = flags.to_args(methods[0], out.clone(), cli.progress)?;
            let r = commands::compare::compare(&args, &methods, &out)?;
            // The table is the result, printed even under --quiet; --json keeps stdout empty.
            if !flags.json {
                print!("{}", r.markdown);
            }
        }
        Command::Merge { model, parts, out, force, dtype, max_shard_gb } => {
            let r = commands::prune::merge(&model, &parts, &out, force, dtype, (max_shard_gb * 1e9) as usize)?;
            println!(
                "merged {} parts into {} (sparsity {:.4})",
                parts.len(),
                out.display(),
                r["sparsity"].as_f64().unwrap_or(0.0)
            );
        }
        Command::Convert { model, out, dtype, max_shard_gb, force } => {
            commands::convert(&model, &out, dtype, (max_shard_gb * 1e9) as usize, force)?;
            println!("wrote {}", out.display());
        }
        Command::Inspect { model, json } => {
            let info = commands::inspect(&model)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                print_inspect(&info);
            }
        }
        Command::Tokenize { model, dataset, format, out, force } => {
            let n = commands::tokenize(&model, &dataset, format, &out, force)?;
            println!("{n} tokens written to {}", out.display());
        }
        Command::Generate { model, prompt, max_new_tokens } => {
            let text = commands::generate(&model, &prompt, max_new_tokens)?;
            println!("{prompt}{text}");
        }
    }
    Ok(())
}

fn print_inspect(info: &serde_json::Value) {
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
}

fn main() -> ExitCode {
    // Logs on stderr, off unless RUST_LOG asks (e.g. RUST_LOG=fistaprune=debug).
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("off")).format_timestamp_millis().init();
    fistaprune::util::tune_allocator();
    let cli = Cli::parse();
    let json = cli.progress == ProgressMode::Json
        || matches!(&cli.command, Command::Prune { flags, .. } | Command::Compare { flags, .. } if flags.json);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            if json {
                fistaprune::util::json_event(serde_json::json!({"event": "error", "message": format!("{e:#}")}));
            }
            ExitCode::FAILURE
        }
    }
}
