//! Evaluation: perplexity (and, later, zero-shot accuracy).

pub mod perplexity;
