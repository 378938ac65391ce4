//! The dense engine against transformers' outputs on committed fixtures (made by scripts/make_fixtures.py).

mod common;

use candle_core::{DType, Tensor};
use common::*;
use fistaprune::model::{Checkpoint, forward_logits, gguf::GgufFile};

fn check_logits(dir: &std::path::Path, model_path: &std::path::Path) {
    let refs = load_st(&dir.join("reference.safetensors"));
    let ids = refs["input_ids"].to_dtype(DType::U32).unwrap();
    let ck = Checkpoint::open(model_path).unwrap();
    let model = ck.model().unwrap();
    let logits = forward_logits(model.as_ref(), &ids).unwrap();
    let (max_rel, fro_rel) = rel_errors(&logits, &refs["logits"]);
    eprintln!("{}: max rel {max_rel:.2e}, frobenius rel {fro_rel:.2e}", model_path.display());
    assert!(
        max_rel < 1e-4,
        "{}: logits differ from transformers: max |Δ|/max|ref| = {max_rel:e}",
        model_path.display()
    );
    assert!(fro_rel < 1e-5, "{}: ‖Δ‖/‖ref‖ = {fro_rel:e}", model_path.display());
}

#[test]
fn llama_gqa_llama3_rope_f32_matches_transformers() {
    check_logits(&fixture("llama"), &fixture("llama"));
}

#[test]
fn llama_tied_bf16_sharded_matches_transformers() {
    check_logits(&fixture("llama_bf16_sharded"), &fixture("llama_bf16_sharded"));
}

#[test]
fn qwen2_bias_mqa_f16_matches_transformers() {
    check_logits(&fixture("qwen2_f16"), &fixture("qwen2_f16"));
}

#[test]
fn qwen3_qk_norm_matches_transformers() {
    check_logits(&fixture("qwen3"), &fixture("qwen3"));
}

/// A sliding window of 8 over 24 tokens: keys beyond it must be masked.
#[test]
fn mistral_sliding_window_matches_transformers() {
    check_logits(&fixture("mistral"), &fixture("mistral"));
}

/// Sandwich norms, q/k norms, two sliding layers (window 8 over 24 tokens, their own RoPE base) and a global one,
/// query_pre_attn_scalar apart from head_dim, scaled embeddings, tied head.
#[test]
fn gemma3_sliding_and_global_layers_match_transformers() {
    check_logits(&fixture("gemma3"), &fixture("gemma3"));
}

#[test]
fn opt_pre_ln_matches_transformers() {
    check_logits(&fixture("opt"), &fixture("opt"));
}

#[test]
fn opt_350m_layout_post_ln_project_in_out_matches_transformers() {
    check_logits(&fixture("opt350m_layout"), &fixture("opt350m_layout"));
}

#[test]
fn gguf_permuted_mixed_quants_matches_transformers_gguf_loader() {
    let d = fixture("llama_gguf");
    check_logits(&d, &d.join("tiny.gguf"));
}

#[test]
fn gguf_tokenizer_matches_tokenizer_json() {
    let d = fixture("llama_gguf");
    let refs = load_st(&d.join("reference.safetensors"));
    let want: Vec<i64> = refs["sample_ids"].to_vec1().unwrap();
    let sample: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("sample.json")).unwrap()).unwrap();
    let ck = Checkpoint::open(&d.join("tiny.gguf")).unwrap();
    let got = ck.tokenizer().unwrap().encode(sample["sample"].as_str().unwrap(), true).unwrap();
    assert_eq!(got.iter().map(|&x| x as i64).collect::<Vec<_>>(), want);
}

#[test]
fn every_gguf_quantisation_dequantises_like_gguf_py() {
    let d = fixture("quants");
    let refs = load_st(&d.join("reference.safetensors"));
    let g = GgufFile::open(&d.join("quants.gguf")).unwrap();
    assert_eq!(refs.len(), 13);
    for (name, want) in &refs {
        let got = g.dequantize(name).unwrap();
        let (max_rel, _) = rel_errors(&got, want);
        assert!(max_rel < 1e-6, "{name}: dequantised values differ from gguf-py (max rel {max_rel:e})");
    }
}

#[test]
fn hf_dtypes_load_as_f32() {
    for (dir, dtype) in [("llama", "F32"), ("llama_bf16_sharded", "BF16"), ("qwen2_f16", "F16")] {
        let ck = Checkpoint::open(&fixture(dir)).unwrap();
        let m = ck.weights.meta("model.layers.0.self_attn.q_proj.weight").unwrap();
        assert_eq!(m.dtype, dtype);
        let t: Tensor = ck.weights.load("model.layers.0.self_attn.q_proj.weight").unwrap();
        assert_eq!(t.dtype(), DType::F32);
    }
}

#[test]
fn gguf_sentencepiece_tokenizer_matches_sentencepiece() {
    let d = fixture("tokenizers");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("spm_reference.json")).unwrap()).unwrap();
    let tok = fistaprune::data::tokenizer::Tokenizer::from_gguf(&GgufFile::open(&d.join("spm.gguf")).unwrap()).unwrap();
    for (text, want) in r["samples"].as_array().unwrap().iter().zip(r["ids"].as_array().unwrap()) {
        let text = text.as_str().unwrap();
        let got = tok.encode(text, true).unwrap();
        let want: Vec<u32> = want.as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        assert_eq!(got, want, "{text:?}");
        assert_eq!(tok.decode(&got[1..]).unwrap(), text, "round trip");
    }
}

/// Error correction steps from one operator group's input to the next (`next_group_input`) instead of rerunning
/// the layer, and makes the layer's output from the residual stream and the last group's input
/// (`output_from`): both must give exactly what `capture` and `forward` give, for every architecture and
/// layer-norm placement; and `steps_to` says which groups it steps to.
#[test]
fn stepping_between_operator_groups_equals_capture() {
    use candle_core::{Device, Tensor};
    for name in ["llama", "qwen2_f16", "qwen3", "mistral", "gemma3", "opt", "opt350m_layout"] {
        let ck = fistaprune::model::Checkpoint::open(&fixture(name)).unwrap();
        let m = ck.model().unwrap();
        let ctx = m.context(12).unwrap();
        for i in 0..m.num_layers() {
            let l = m.load_layer(i).unwrap();
            let groups = l.input_groups();
            let width = l.linear(groups[0][0]).unwrap().in_features();
            let x = Tensor::randn(0f32, 1.0, (2, 12, width), &Device::Cpu).unwrap();
            let mut inputs: Vec<Tensor> = Vec::new();
            let mut hook = |n: &str, t: &Tensor| -> anyhow::Result<()> {
                if groups.iter().any(|g| g[0] == n) {
                    inputs.push(t.clone());
                }
                Ok(())
            };
            l.capture(&x, &ctx, &mut hook).unwrap();
            assert_eq!(inputs.len(), groups.len());
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let (mut stepped, mut residual) = (0, None);
            for gi in 1..groups.len() {
                let step = l.next_group_input(gi, &x, &inputs[gi - 1]).unwrap();
                assert_eq!(l.steps_to(gi), step.is_some(), "{name} layer {i}: steps_to({gi}) is not what it does");
                if let Some(t) = step {
                    assert!(flat(&t.input) == flat(&inputs[gi]), "{name} layer {i} group {gi}: stepping differs");
                    residual = t.residual.or(residual);
                    stepped += 1;
                }
            }
            assert_eq!(stepped, 2, "{name}: both FFN groups step");
            let residual = residual.expect("a step passes the residual stream after attention");
            let y = l.output_from(&residual, inputs.last().unwrap()).unwrap().expect("the layer makes its output");
            let want = l.forward(&x, &ctx, None).unwrap();
            assert!(flat(&y) == flat(&want), "{name} layer {i}: output from the held inputs differs from forward");
        }
    }
}

/// Rows of a bf16, sharded safetensors embedding read alone (GGUF: tests/gemma3.rs).
#[test]
fn safetensors_rows_read_alone_equal_the_whole_tensor() {
    check_rows_read_alone(&fixture("llama_bf16_sharded"), "model.embed_tokens.weight");
}
