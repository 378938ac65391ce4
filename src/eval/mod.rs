//! Evaluation: perplexity and zero-shot multiple-choice accuracy.

pub mod perplexity;
pub mod zeroshot;
