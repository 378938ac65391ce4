//! The `fistaprune` command line: the verbs' options are the library's own structs (`commands`); this file
//! only adds the global flags and dispatches.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use fistaprune::commands::{self, compare, prune};
use fistaprune::util::Progress;

/// How steps report progress.
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
    /// Compute device: cpu, cuda (GPU 0) or cuda:N (needs a build with the `cuda` feature).
    #[arg(long, global = true, default_value = "cpu")]
    device: String,
    /// Keep the calibration activations in host memory between their uses, each batch moved to the GPU when it
    /// is used (prune, compare): for models whose activations do not fit beside a layer (a 70B model's do not in
    /// 40 GB). Costs the transfers; the results are the same.
    #[arg(long, global = true)]
    offload_activations: bool,
    /// The most GPU memory the run may use, in GB (10⁹ bytes): what is free beyond it is held back from the
    /// start, so that the run behaves as with that much free (beside other jobs, or to size a smaller card's
    /// run). A layer that does not fit then moves the calibration activations to host memory, as
    /// --offload-activations does, and is pruned again. Default: all that is free.
    #[arg(long, global = true, value_name = "GB")]
    gpu_memory: Option<f64>,
    /// Progress display: bars (auto), JSON lines on stderr for machines (json), or none.
    #[arg(long, global = true, value_enum, default_value = "auto")]
    progress: ProgressMode,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Perplexity of a model on a text dataset (WikiText-2, C4, PTB or any text file), zero-shot tasks, or both.
    Eval(commands::EvalArgs),
    /// Prune a model layer by layer and write it as a Hugging Face folder with report.json.
    Prune(prune::Prune),
    /// Run several methods on the same calibration token ids; write a table (Markdown, JSON) and a per-layer
    /// plot of reconstruction error.
    Compare(compare::Compare),
    /// Join the parts written by `prune --layers A-B` into one checkpoint.
    Merge(prune::Merge),
    /// Write a checkpoint (e.g. a GGUF file) as a Hugging Face folder.
    Convert(commands::Convert),
    /// Architecture, shapes, dtypes and parameter counts of a checkpoint.
    Inspect(commands::Inspect),
    /// Write the token ids of a dataset (as `eval` reads it) to a JSON file.
    Tokenize(commands::Tokenize),
    /// Greedy continuation of a prompt.
    Generate(commands::Generate),
}

impl Command {
    /// Whether errors go out as JSON events too.
    fn json(&self, progress: ProgressMode) -> bool {
        progress == ProgressMode::Json
            || matches!(self, Command::Prune(p) if p.args.json)
            || matches!(self, Command::Compare(c) if c.args.json)
    }
}

/// `--progress`, `--quiet` and `--json` together.
fn progress_of(args: &prune::PruneArgs, mode: ProgressMode) -> Progress {
    if args.json { Progress::Json } else { mode.resolve(args.quiet) }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    if let Some(n) = cli.threads {
        rayon::ThreadPoolBuilder::new().num_threads(n).build_global().ok();
        // SAFETY: set before any other thread is started.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
    }
    fistaprune::device::set(fistaprune::device::open(&cli.device)?)?;
    fistaprune::device::set_offload(cli.offload_activations);
    if let Some(gb) = cli.gpu_memory {
        anyhow::ensure!(gb > 0.0 && gb.is_finite(), "--gpu-memory {gb}: expected a positive number of GB");
        if fistaprune::device::limit_memory((gb * 1e9) as u64)? == 0 {
            eprintln!("--gpu-memory {gb}: the GPU has no more than that free; nothing held back");
        }
    }
    match cli.command {
        Command::Eval(mut a) => {
            a.progress = cli.progress.resolve(a.quiet);
            commands::eval(&a)?;
        }
        Command::Prune(mut p) => {
            p.args.progress = progress_of(&p.args, cli.progress);
            p.args.quiet |= p.args.json;
            prune::prune(&p)?;
        }
        Command::Compare(mut c) => {
            c.args.progress = progress_of(&c.args, cli.progress);
            c.args.quiet |= c.args.json;
            compare::compare(&c)?;
        }
        Command::Merge(m) => {
            prune::merge(&m)?;
        }
        Command::Convert(c) => {
            commands::convert(&c)?;
            println!("wrote {}", c.out.display());
        }
        Command::Inspect(i) => commands::print_inspect(&i)?,
        Command::Tokenize(t) => {
            let n = commands::tokenize(&t)?;
            println!("{n} tokens written to {}", t.out.display());
        }
        Command::Generate(g) => {
            let text = commands::generate(&g.model, &g.prompt, g.max_new_tokens)?;
            println!("{}{text}", g.prompt);
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let missing = fistaprune::util::missing_cpu_features();
    if !missing.is_empty() {
        eprintln!(
            "error: this build of fistaprune needs an x86-64-v3 CPU; this one lacks {} (build it for this CPU \
             with RUSTFLAGS=\"-C target-cpu=native\" cargo build --release)",
            missing.join(", ")
        );
        return ExitCode::FAILURE;
    }
    // Logs on stderr, off unless RUST_LOG asks (e.g. RUST_LOG=fistaprune=debug).
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("off")).format_timestamp_millis().init();
    fistaprune::util::tune_allocator();
    // `fistaprune inspect | head` ends quietly when the reader goes, as other command-line tools do.
    #[cfg(unix)]
    // SAFETY: restoring the default action of one signal, before any other thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    let json = cli.command.json(cli.progress);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            if let Some(h) = fistaprune::device::hint(&e) {
                eprintln!("hint: {h}");
            }
            if json {
                fistaprune::util::json_event(serde_json::json!({"event": "error", "message": format!("{e:#}")}));
            }
            ExitCode::FAILURE
        }
    }
}
