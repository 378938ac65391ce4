//! GGUF output (`--out-format gguf`): what goes in comes out (tensors bit for bit in f32, llama.cpp's names,
//! shapes and metadata), pruned zeros stay exactly zero in every type offered, and combinations that cannot be
//! written are refused before any work. llama.cpp itself reading our files is `scripts/reference/llama_cpp_ppl.py`.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::*;
use fistaprune::model::Checkpoint;
use fistaprune::model::gguf::GgufFile;

fn values(ck: &Checkpoint, name: &str) -> Vec<f32> {
    ck.weights.load(name).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn gguf_to_gguf_keeps_every_tensor_and_key() {
    let d = tmpdir("gguf-out-roundtrip");
    let src = fixture("llama_gguf/tiny.gguf");
    let out = d.join("f32");
    let (ok, _, err) =
        run(&["convert", "--model", src.to_str().unwrap(), "--out", out.to_str().unwrap(), "--out-format", "gguf"]);
    assert!(ok, "{err}");
    assert!(out.join("report.json").exists(), "the output folder carries our marker");

    // Through our reader (Q/K rows un-permuted again): every tensor bit for bit, whatever type it came in.
    let (a, b) = (Checkpoint::open(&src).unwrap(), Checkpoint::open(&out).unwrap());
    assert_eq!(a.weights.names(), b.weights.names());
    for name in a.weights.names() {
        let (x, y) = (values(&a, &name), values(&b, &name));
        assert!(x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()), "{name} changed");
    }
    // As llama.cpp sees the file: the same names and shapes (its permuted Q/K layout), matrices and vectors in
    // f32, and the input's metadata, its tokenizer included, but for the file type.
    let (ga, gb) = (GgufFile::open(&src).unwrap(), GgufFile::open(&out.join("model.gguf")).unwrap());
    assert_eq!(gb.version, 3);
    assert_eq!(ga.order.iter().collect::<BTreeSet<_>>(), gb.order.iter().collect::<BTreeSet<_>>());
    for (name, t) in &gb.tensors {
        assert_eq!(t.shape, ga.tensors[name].shape, "{name}");
        assert_eq!(format!("{:?}", t.dtype), "F32", "{name}");
        // The raw data, as llama.cpp reads it: equal to the input's dequantised (so still permuted).
        let (x, y) = (ga.dequantize(name).unwrap(), gb.dequantize(name).unwrap());
        let (x, y) =
            (x.flatten_all().unwrap().to_vec1::<f32>().unwrap(), y.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        assert_eq!(x, y, "{name}: not the input's layout");
    }
    let storage = ["general.file_type", "general.quantization_version"];
    let keys = |g: &GgufFile| g.metadata.keys().filter(|k| !storage.contains(&k.as_str())).cloned().collect::<Vec<_>>();
    assert_eq!(keys(&ga), keys(&gb));
    for k in keys(&ga) {
        assert_eq!(ga.metadata[&k], gb.metadata[&k], "{k}");
    }
    assert_eq!(gb.get_u64("general.file_type").unwrap(), 0, "all f32");
}

/// Prune the tiny GGUF model to half with magnitude (no calibration), written as `args` say.
fn prune_tiny(out: &Path, args: &[&str]) {
    let src = fixture("llama_gguf/tiny.gguf");
    let mut a = vec!["prune", "--model", src.to_str().unwrap(), "--method", "magnitude", "--sparsity", "0.5"];
    a.extend(["--out", out.to_str().unwrap(), "--quiet"]);
    a.extend(args);
    let (ok, _, err) = run(&a);
    assert!(ok, "{args:?}: {err}");
}

#[test]
fn pruned_zeros_stay_zero_in_every_gguf_type() {
    let d = tmpdir("gguf-out-types");
    prune_tiny(&d.join("hf"), &[]);
    let hf = Checkpoint::open(&d.join("hf")).unwrap();
    let linears: Vec<String> = hf.tensor_specs().into_iter().filter(|t| t.linear).map(|t| t.name).collect();
    for dtype in ["f32", "f16", "bf16", "q8_0", "q4_0"] {
        let out = d.join(dtype);
        prune_tiny(&out, &["--out-format", "gguf", "--dtype", dtype]);
        let g = Checkpoint::open(&out).unwrap();
        let (mut zeros, mut kept) = (0usize, 0usize);
        for name in &linears {
            let (want, got) = (values(&hf, name), values(&g, name));
            for (w, x) in want.iter().zip(&got) {
                if *w == 0.0 {
                    // (Q4_0 gives −0 where its block scale is negative: `(8 − 8) · d`.)
                    assert!(*x == 0.0, "{dtype} {name}: a pruned weight is {x}");
                    zeros += 1;
                } else {
                    kept += 1;
                    if dtype == "f32" {
                        assert_eq!(w, x, "{name}");
                    }
                }
            }
        }
        assert_eq!(zeros, kept, "{dtype}: half of the weights pruned");
        // The file says which type its matrices are in (norms stay f32).
        let file = GgufFile::open(&out.join("model.gguf")).unwrap();
        let t = &file.tensors["blk.0.ffn_up.weight"];
        assert_eq!(format!("{:?}", t.dtype).to_lowercase().replace('_', ""), dtype.replace('_', ""));
        assert_eq!(format!("{:?}", file.tensors["blk.0.attn_norm.weight"].dtype), "F32");
    }
}

#[test]
fn a_hugging_face_folder_becomes_gguf_with_its_tokenizer() {
    let d = tmpdir("gguf-out-from-hf");
    // Qwen2 (biases on q, k, v; f16): the LLaMA fixture's LLaMA-3.1 RoPE would need llama.cpp's rope_freqs.
    let src = fixture("qwen2_f16");
    let out = d.join("gguf");
    let args = ["convert", "--model", src.to_str().unwrap(), "--out", out.to_str().unwrap(), "--out-format", "gguf"];
    let (ok, _, err) = run(&args);
    assert!(ok, "{err}");
    let (a, b) = (Checkpoint::open(&src).unwrap(), Checkpoint::open(&out).unwrap());
    // The weights bit for bit (Q/K permuted for llama.cpp and back), the configuration as llama.cpp keeps it.
    for name in a.weights.names() {
        let (x, y) = (values(&a, &name), values(&b, &name));
        assert!(x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()), "{name} changed");
    }
    assert_eq!(a.config.num_layers(), b.config.num_layers());
    assert_eq!(a.config.eos_token_id(), b.config.eos_token_id());
    // The tokenizer rebuilt from the GGUF's metadata (llama.cpp's pre-tokenizer name found for it) gives the
    // tokenizer.json's ids.
    let text = std::fs::read_to_string(shared("wikitext-2-raw/wiki.test.raw")).unwrap();
    let text = &text[..20_000];
    let ids = |ck: &Checkpoint| ck.tokenizer.as_ref().unwrap().encode(text, true).unwrap();
    assert_eq!(ids(&a), ids(&b));
    let g = GgufFile::open(&out.join("model.gguf")).unwrap();
    assert_eq!(g.get_str("general.architecture").unwrap(), "qwen2");
    assert_eq!(g.get_str("tokenizer.ggml.model").unwrap(), "gpt2");
}

#[test]
fn gguf_output_refuses_what_it_cannot_write() {
    let d = tmpdir("gguf-out-refused");
    let out = d.join("out");
    // A GGUF block type in a safetensors folder.
    let src = fixture("llama_gguf/tiny.gguf");
    let args = ["convert", "--model", src.to_str().unwrap(), "--out", out.to_str().unwrap(), "--dtype", "q8_0"];
    let (ok, _, err) = run(&args);
    assert!(!ok && err.contains("--dtype q8_0 is a GGUF type: add --out-format gguf"), "{err}");
    assert!(!out.exists());
    // An architecture whose Hugging Face folder we cannot write as GGUF: refused, nothing left behind.
    let opt = fixture("opt");
    let args = ["convert", "--model", opt.to_str().unwrap(), "--out", out.to_str().unwrap(), "--out-format", "gguf"];
    let (ok, _, err) = run(&args);
    assert!(!ok && err.contains("a Hugging Face opt folder cannot be written as GGUF yet"), "{err}");
    assert!(!out.exists(), "a refused run left an output");
    assert_eq!(std::fs::read_dir(&d).unwrap().count(), 0, "a refused run left something in {}", d.display());
}
