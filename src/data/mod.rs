//! Text in: tokenizers, evaluation datasets (WikiText-2, C4, PTB, any text) and calibration sets.

pub mod calibration;
pub mod dataset;
pub mod tokenizer;
