//! Text in: tokenizers, evaluation datasets (and, later, calibration sampling).

pub mod calibration;
pub mod dataset;
pub mod tokenizer;
