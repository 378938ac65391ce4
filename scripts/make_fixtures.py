#!/usr/bin/env python3
"""Make the small random-weight test fixtures and the reference outputs Python transformers gives for them.

    .venv/bin/python scripts/make_fixtures.py [--out tests/fixtures]

Writes, for each fixture directory: a Hugging Face checkpoint (config.json, safetensors, tokenizer.json) and
`reference.safetensors` holding `input_ids` (I64, batch x seq) and the `logits` transformers computes (F32).
Also:
- `llama_gguf/tiny.gguf`: the llama fixture written as llama.cpp does (Q/K permuted, mixed quantisations),
  with `reference.safetensors` holding what transformers computes from that GGUF;
- `quants/quants.gguf` + `quants/reference.safetensors`: one tensor per quantisation type, random blocks,
  dequantised by gguf-py;
- `eval_reference.json`: perplexity of the llama fixture on the first windows of WikiText-2, tokenized by
  transformers from tokenizer.json.
`--only qwen3,mistral,gemma3` writes just those fixtures (the architectures added after the first set),
leaving the others as they are.
Deterministic (fixed seeds). Run it again only when a fixture must change; commit what it writes.
"""
import argparse, json, math, os, shutil, sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "reference"))
from fistaprune_ref_text import eval_text  # noqa: E402

import gguf  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, processors, trainers  # noqa: E402
from transformers import (AutoModelForCausalLM, AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig,  # noqa: E402
                          LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, OPTConfig,
                          OPTForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                          Qwen3ForCausalLM)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIKI = os.path.join(ROOT, "..", "shared", "data", "wikitext-2-raw", "wiki.test.raw")
VOCAB = 320


def make_tokenizer():
    """A small byte-level BPE trained on the start of WikiText-2 (BOS <s> added, as LLaMA's does)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = open(WIKI, encoding="utf-8").read()[:200_000]
    tok.train_from_iterator([text], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    return tok


def randomize(model, seed):
    """Weights far from initialisation, so that logits are not near-uniform; norms around 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(0.15 * noise)
    return model


def save_hf(model, tok, out, ids, dtype=torch.float32, max_shard_size=None):
    os.makedirs(out, exist_ok=True)
    model = model.to(dtype)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, safe_serialization=True, **kw)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(out)
    # Reference: reload what was written, compute in f32.
    m = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = m(ids).logits.float().contiguous()
    save_file({"input_ids": ids.contiguous(), "logits": logits}, os.path.join(out, "reference.safetensors"))
    return m


def permute(w, n_head):
    """llama.cpp's Q/K permutation (convert_hf_to_gguf.py LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(hf_dir, tok, path):
    """The llama fixture as llama.cpp would write it, with a mix of quantisation types."""
    cfg = json.load(open(os.path.join(hf_dir, "config.json")))
    from safetensors.torch import load_file
    sd = {}
    for f in sorted(os.listdir(hf_dir)):
        if f.endswith(".safetensors") and f.startswith("model"):
            sd.update(load_file(os.path.join(hf_dir, f)))
    sd = {k: v.float().numpy() for k, v in sd.items()}
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(nh)
    w.add_head_count_kv(nkv)
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_dimension_count(cfg["head_dim"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    vocab = tok.get_vocab()
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    w.add_token_list(tokens)
    w.add_token_types([3 if t in ("<unk>", "<s>", "</s>") else 1 for t in tokens])
    model_json = json.loads(tok.to_str())
    merges = [m if isinstance(m, str) else " ".join(m) for m in model_json["model"]["merges"]]
    w.add_token_merges(merges)
    w.add_bos_token_id(tok.token_to_id("<s>"))
    w.add_eos_token_id(tok.token_to_id("</s>"))
    w.add_add_bos_token(True)
    Q = gguf.GGMLQuantizationType
    kinds = {"attn_q": Q.Q8_0, "attn_k": Q.Q4_0, "attn_v": Q.Q4_1, "attn_output": Q.Q5_0,
             "ffn_gate": Q.Q5_1, "ffn_up": Q.Q8_0, "ffn_down": Q.F16}
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}

    def add(name, arr, qt):
        arr = np.ascontiguousarray(arr)
        if qt == Q.F32:
            w.add_tensor(name, arr.astype(np.float32))
        elif qt == Q.F16:
            w.add_tensor(name, arr.astype(np.float16))
        else:
            data = gguf.quants.quantize(arr, qt)
            w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qt)

    add("token_embd.weight", sd["model.embed_tokens.weight"], Q.BF16)
    add("output_norm.weight", sd["model.norm.weight"], Q.F32)
    if "lm_head.weight" in sd:
        add("output.weight", sd["lm_head.weight"], Q.Q8_0)
    for l in range(cfg["num_hidden_layers"]):
        for hf, g in names.items():
            t = sd[f"model.layers.{l}.{hf}.weight"]
            if g == "attn_q":
                t = permute(t, nh)
            elif g == "attn_k":
                t = permute(t, nkv)
            add(f"blk.{l}.{g}.weight", t, kinds.get(g, Q.F32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# Byte offsets of the f16 scale fields in each block (ggml-common.h).
F16_FIELDS = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0],
              "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}


def write_quants(out):
    """One tensor per type: random blocks with sane f16 scales; reference = gguf-py's dequantisation."""
    rng = np.random.default_rng(7)
    Q = gguf.GGMLQuantizationType
    w = gguf.GGUFWriter(os.path.join(out, "quants.gguf"), "llama")
    ref = {}
    rows, cols = 3, 512
    for name in ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]:
        qt = Q[name]
        if name in ("F32", "F16", "BF16"):
            x = rng.standard_normal((rows, cols)).astype(np.float32)
            if name == "F32":
                data = x
                w.add_tensor(name, data)
            elif name == "F16":
                data = x.astype(np.float16)
                w.add_tensor(name, data)
            else:
                data = gguf.quants.quantize(x, qt)
                w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qt)
        else:
            bs, ts = gguf.GGML_QUANT_SIZES[qt]
            nblocks = rows * cols // bs
            blocks = rng.integers(0, 256, size=(nblocks, ts), dtype=np.uint8)
            for off in F16_FIELDS[name]:
                scales = rng.uniform(0.01, 0.1, size=nblocks).astype(np.float16)
                blocks[:, off:off + 2] = scales.view(np.uint8).reshape(nblocks, 2)
            data = blocks.reshape(rows, cols // bs * ts)
            w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qt)
        ref[name] = torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(data, qt).astype(np.float32)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    save_file(ref, os.path.join(out, "reference.safetensors"))


def write_spm_gguf(out):
    """A SentencePiece BPE vocabulary (as LLaMA 1/2 and Mistral have) in GGUF, the way llama.cpp's converter
    writes it; reference ids from sentencepiece itself."""
    import io
    import sentencepiece as spm
    text = open(WIKI, encoding="utf-8").read()[:300_000]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text.split("\n")), model_writer=model, vocab_size=400,
                                   model_type="bpe", byte_fallback=True, character_coverage=0.9995,
                                   split_digits=True, add_dummy_prefix=True, allow_whitespace_only_pieces=True,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   unk_id=0, bos_id=1, eos_id=2, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    w = gguf.GGUFWriter(os.path.join(out, "spm.gguf"), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list([sp.id_to_piece(i) for i in range(sp.get_piece_size())])
    w.add_token_scores([sp.get_score(i) for i in range(sp.get_piece_size())])
    types = []
    for i in range(sp.get_piece_size()):
        types.append(2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 5 if sp.is_unused(i) else 6 if sp.is_byte(i) else 1)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    samples = ["The game began development in 2010, carrying over a large portion of the work.",
               "  Two  spaces, tabs\tand ünïcödé — dashes; 12,345 and émoji 🙂 fall back to bytes.",
               " = Robert Boulter = \n"]
    json.dump({"samples": samples, "ids": [[1] + sp.encode(t) for t in samples]},
              open(os.path.join(out, "spm_reference.json"), "w"), indent=1)


COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=128, bos_token_id=1, eos_token_id=2)


def write_later_architectures(out, tok, ids, only):
    """Qwen3 (RMSNorm on q and k, head_dim apart from hidden/heads), Mistral (sliding window shorter than the
    sequence) and Gemma 3 (sandwich norms, q/k norms, sliding and global layers with their own RoPE, a
    query_pre_attn_scalar apart from head_dim, a sliding window shorter than the sequence)."""
    if "qwen3" in only:
        c = Qwen3Config(**COMMON, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, tie_word_embeddings=False,
                        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
        save_hf(randomize(Qwen3ForCausalLM(c), 15), tok, os.path.join(out, "qwen3"), ids)
    if "mistral" in only:
        c = MistralConfig(**COMMON, num_key_value_heads=2, rms_norm_eps=1e-5, tie_word_embeddings=False,
                          sliding_window=8, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
        save_hf(randomize(MistralForCausalLM(c), 16), tok, os.path.join(out, "mistral"), ids)
    if "gemma3" in only:
        c = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=12,
                             layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                             sliding_window=8, max_position_embeddings=128, rope_theta=1e6,
                             rope_local_base_freq=1e4, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        save_hf(randomize(Gemma3ForCausalLM(c), 17), tok, os.path.join(out, "gemma3"), ids)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(ROOT, "tests", "fixtures"))
    ap.add_argument("--only", help="comma-separated: qwen3, mistral, gemma3")
    a = ap.parse_args()
    torch.manual_seed(0)
    tok = make_tokenizer()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 24), generator=g)
    if a.only:
        write_later_architectures(a.out, tok, ids, a.only.split(","))
        return
    if os.path.exists(a.out):
        shutil.rmtree(a.out)
    os.makedirs(a.out)
    common = COMMON
    # LLaMA with GQA, untied head, LLaMA-3 rope scaling; f32, one file.
    c = LlamaConfig(**common, num_key_value_heads=2, rms_norm_eps=1e-5, tie_word_embeddings=False,
                    rope_parameters={"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0,
                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 32})
    llama = randomize(LlamaForCausalLM(c), 10)
    save_hf(llama, tok, os.path.join(a.out, "llama"), ids)
    # The same architecture without scaling, tied, stored as bf16 in shards (index + two files).
    c = LlamaConfig(**common, num_key_value_heads=2, rms_norm_eps=1e-5, tie_word_embeddings=True,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    llama_tied = randomize(LlamaForCausalLM(c), 11)
    save_hf(llama_tied, tok, os.path.join(a.out, "llama_bf16_sharded"), ids, dtype=torch.bfloat16,
            max_shard_size="40KB")
    # Qwen2: q/k/v biases, MQA (1 kv head), f16.
    c = Qwen2Config(**common, num_key_value_heads=1, rms_norm_eps=1e-6, tie_word_embeddings=True,
                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    qwen = randomize(Qwen2ForCausalLM(c), 12)
    save_hf(qwen, tok, os.path.join(a.out, "qwen2_f16"), ids, dtype=torch.float16)
    # OPT (pre-LN, as 125M and up).
    oc = dict(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    opt = randomize(OPTForCausalLM(OPTConfig(**oc, word_embed_proj_dim=32, do_layer_norm_before=True)), 13)
    save_hf(opt, tok, os.path.join(a.out, "opt"), ids)
    # OPT-350M's layout: post-LN, 16-wide embeddings with project_in/out.
    opt350 = randomize(OPTForCausalLM(OPTConfig(**oc, word_embed_proj_dim=16, do_layer_norm_before=False)), 14)
    save_hf(opt350, tok, os.path.join(a.out, "opt350m_layout"), ids)
    write_later_architectures(a.out, tok, ids, ["qwen3", "mistral", "gemma3"])

    # GGUF written the llama.cpp way; reference from transformers' GGUF loader.
    gdir = os.path.join(a.out, "llama_gguf")
    os.makedirs(gdir)
    write_llama_gguf(os.path.join(a.out, "llama_bf16_sharded"), tok, os.path.join(gdir, "tiny.gguf"))
    m = AutoModelForCausalLM.from_pretrained(gdir, gguf_file="tiny.gguf", dtype=torch.float32).eval()
    with torch.no_grad():
        logits = m(ids).logits.float().contiguous()
    sample = "Valkyria Chronicles III, released in 2011 for 1,234 yen."
    save_file({"input_ids": ids.contiguous(), "logits": logits,
               "sample_ids": torch.tensor(tok.encode(sample).ids, dtype=torch.int64)},
              os.path.join(gdir, "reference.safetensors"))
    json.dump({"sample": sample}, open(os.path.join(gdir, "sample.json"), "w"))

    qdir = os.path.join(a.out, "quants")
    os.makedirs(qdir)
    write_quants(qdir)
    tdir = os.path.join(a.out, "tokenizers")
    os.makedirs(tdir)
    write_spm_gguf(tdir)

    # End-to-end perplexity reference: transformers tokenizes WikiText-2 with tokenizer.json.
    t = AutoTokenizer.from_pretrained(os.path.join(a.out, "llama"))
    enc = t(eval_text(WIKI, "wikitext"))["input_ids"]
    seqlen, nwin = 64, 8
    nll = 0.0
    with torch.no_grad():
        for w in range(nwin):
            x = torch.tensor(enc[w * seqlen:(w + 1) * seqlen]).unsqueeze(0)
            lg = llama(x).logits[0].float()
            nll += F.cross_entropy(lg[:-1], x[0, 1:], reduction="sum").double().item()
    json.dump({"model": "llama", "dataset": "wikitext-2-raw/wiki.test.raw", "seqlen": seqlen, "windows": nwin,
               "tokens_total": len(enc), "first_ids": enc[:32],
               "perplexity": math.exp(nll / (nwin * (seqlen - 1)))},
              open(os.path.join(a.out, "eval_reference.json"), "w"), indent=2)
    print("fixtures written to", a.out)


if __name__ == "__main__":
    main()
