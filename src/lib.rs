//! fistaprune: post-training pruning of large language models (FISTAPruner, SparseGPT, Wanda, magnitude),
//! with the loading, evaluation and export around it. The library does the work; the `fistaprune` binary
//! (the `cli` feature) only reads the options the library declares and dispatches.
//!
//! From the bottom up:
//! - [`util`], [`device`], [`linalg`]: progress, numeric checks, the run's compute device, the matrix kernels.
//! - [`data`]: tokenizers, evaluation text, calibration sets.
//! - [`model`]: checkpoints (Hugging Face safetensors, GGUF) and one file per architecture (LLaMA family, OPT),
//!   run layer by layer; writing checkpoints.
//! - [`prune`]: the methods and their registry, the options that decide a pruned model, the layer walk.
//! - [`eval`](mod@eval): perplexity and zero-shot tasks.
//! - [`output`]: where a run writes and what it may replace; [`report`]: the typed `report.json` and its plots.
//! - [`commands`]: the verbs (`prune`, `compare`, `merge`, `eval`, `convert`, ...), each with its options.

pub mod commands;
pub mod data;
pub mod device;
pub mod eval;
pub mod linalg;
pub mod model;
pub mod output;
pub mod prune;
pub mod report;
pub mod util;
