//! The `fistaprune` command line: argument parsing only; the work is in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use fistaprune::commands;
use fistaprune::data::dataset::TextFormat;
use fistaprune::model::export::OutDType;

#[derive(Parser)]
#[command(name = "fistaprune", version, about = "Post-training pruning of large language models")]
struct Cli {
    /// Worker threads for the matrix kernels (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Perplexity of a model on a text dataset (WikiText-2, C4, PTB or any text file).
    Eval {
        /// Hugging Face model directory or .gguf file.
        #[arg(long)]
        model: PathBuf,
        /// Dataset file (.raw/.txt, .jsonl, .json.gz).
        #[arg(long)]
        dataset: PathBuf,
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
        /// Also write the result as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// No progress bar or summary line.
        #[arg(long)]
        quiet: bool,
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
        /// Replace an existing output directory.
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
        Command::Eval { model, dataset, format, seqlen, max_windows, batch, json, quiet } => {
            commands::eval(&commands::EvalArgs { model, dataset, format, seqlen, max_windows, batch, json, quiet })?;
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
        Command::Tokenize { model, dataset, format, out } => {
            let n = commands::tokenize(&model, &dataset, format, &out)?;
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
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
