//! Gemma-3-270M (Q4_K_M GGUF; fetched by scripts/fetch-assets.sh) against references computed with Python
//! (tests/reference/gemma3.json; how: its "how" field): token ids against SentencePiece, perplexity against
//! transformers at a context inside the sliding window (512) and beyond it (2048), greedy continuation.

mod common;

use common::*;
use fistaprune::commands;

fn reference() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(root().join("tests/reference/gemma3.json")).unwrap()).unwrap()
}

/// Every token of WikiText-2, PTB and the C4 sample as SentencePiece gives them with the special pieces
/// matched first (Hugging Face's way; plain SentencePiece differs only on runs of spaces and PTB's `<unk>`).
#[test]
fn tokenization_matches_sentencepiece() {
    check_token_ids(&gemma3(), &reference()["tokens"], "SentencePiece");
}

fn wikitext_perplexity(seqlen: usize, windows: usize) -> f64 {
    commands::eval(&commands::EvalArgs {
        seqlen,
        max_windows: Some(windows),
        ..commands::EvalArgs::perplexity(&gemma3(), &shared("wikitext-2-raw/wiki.test.raw"))
    })
    .unwrap()
    .perplexity
    .unwrap()
    .perplexity
}

/// Within 0.05 % of transformers, inside the sliding window and beyond it.
#[test]
fn wikitext_perplexity_matches_transformers() {
    let r = reference();
    for (seqlen, windows, key) in [(512, 10, "seqlen512_first_10_windows"), (2048, 4, "seqlen2048_first_4_windows")] {
        let want = r["wikitext2"][key].as_f64().unwrap();
        let ours = wikitext_perplexity(seqlen, windows);
        eprintln!("seqlen {seqlen}: ours {ours} transformers {want}");
        assert!((ours / want - 1.0).abs() < 5e-4, "seqlen {seqlen}: perplexity {ours} vs transformers {want}");
    }
}

#[test]
fn greedy_continuation_matches_transformers() {
    let r = reference();
    let prompt = r["greedy"]["prompt"].as_str().unwrap();
    let text = commands::generate(&gemma3(), prompt, 12).unwrap();
    assert_eq!(text, r["greedy"]["continuation"].as_str().unwrap());
}

/// Rows of the Q8_0 embedding (262,144 × 640, 671 MB in f32) read alone, and lookups a block at a time.
#[test]
fn gguf_rows_read_alone_equal_the_whole_tensor() {
    check_rows_read_alone(&gemma3(), "model.embed_tokens.weight");
}
