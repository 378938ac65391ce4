//! fistaprune: post-training pruning of large language models (FISTAPruner, SparseGPT, Wanda, magnitude),
//! with the loading, evaluation and export around it.
//!
//! - [`model`]: checkpoints (Hugging Face safetensors, GGUF) and architectures (LLaMA family, OPT), run
//!   layer by layer.
//! - [`data`]: tokenizers and evaluation text.
//! - [`eval`](mod@eval): perplexity.
//! - [`commands`]: what the command-line verbs do.

pub mod commands;
pub mod data;
pub mod eval;
pub mod linalg;
pub mod model;
pub mod output;
pub mod prune;
pub mod report;
pub mod util;
