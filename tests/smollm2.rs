//! The demo model (SmolLM2-135M-Instruct, Q4_1 GGUF; fetched by scripts/fetch-assets.sh) against references
//! computed with Python (tests/reference/smollm2.json; how: its "how" field).

mod common;

use common::*;
use fistaprune::commands;
use sha2::{Digest, Sha256};

fn reference() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(root().join("tests/reference/smollm2.json")).unwrap()).unwrap()
}

#[test]
fn greedy_continuation_is_coherent() {
    let r = reference();
    let text = commands::generate(&smollm2(), r["greedy"]["prompt"].as_str().unwrap(), 24).unwrap();
    let want = r["greedy"]["continuation"].as_str().unwrap();
    assert!(text.starts_with(want), "got {text:?}");
}

#[test]
fn tokenization_matches_the_original_tokenizer_rules() {
    let r = reference();
    let model = smollm2();
    for (rel, want) in r["tokens"].as_object().unwrap() {
        let out = tmpdir("smol-tok").join("ids.json");
        let fmt: fistaprune::data::dataset::TextFormat =
            serde_json::from_value(want["format"].clone()).unwrap();
        let n = commands::tokenize(&model, &shared(rel), Some(fmt), &out).unwrap();
        let j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
        let bytes: Vec<u8> = j["ids"].as_array().unwrap().iter().flat_map(|v| (v.as_u64().unwrap() as u32).to_le_bytes()).collect();
        let sha: String = Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(n as u64, want["count"].as_u64().unwrap(), "{rel}: token count");
        assert_eq!(sha, want["sha256_u32le"].as_str().unwrap(), "{rel}: ids differ from the Python reference");
    }
}

#[test]
fn wikitext_perplexity_matches_transformers() {
    let r = reference();
    let want = r["wikitext2_seqlen512"]["first_10_windows"].as_f64().unwrap();
    let res = commands::eval(&commands::EvalArgs {
        model: smollm2(),
        dataset: shared("wikitext-2-raw/wiki.test.raw"),
        format: None,
        seqlen: 512,
        max_windows: Some(10),
        batch: 2,
        // Stream the layers: the other code path of the evaluation.
        layer_memory_bytes: 0,
        json: None,
        quiet: true,
    })
    .unwrap();
    eprintln!("ours {} transformers {want}", res.perplexity);
    assert!((res.perplexity / want - 1.0).abs() < 5e-4, "perplexity {} vs transformers {want}", res.perplexity);
}
