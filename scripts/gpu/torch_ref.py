#!/usr/bin/env python3
"""The PyTorch side of scripts/gpu-check.sh, run on the GPU machine (torch and transformers are there).

    torch_ref.py make --out DIR --hidden 4096 --intermediate 11008 --heads 32 --kv-heads 32 --layers 2 \
        --tokenizer tokenizer.json
    torch_ref.py ppl --model DIR --ids ids.json --seqlen 2048 --max-windows K --json out.json

`make` writes a random-weight LLaMA (transformers' own initialisation, seed 0) in bf16 safetensors with a
tokenizer, so that a model of real layer shapes is made on the machine instead of carried to it (bf16 → f32
is exact, so both sides read the same f32 weights). `ppl` is the library of record on the same token ids
(from `fistaprune tokenize`): transformers in f32 on the GPU, TF32 off, non-overlapping windows, mean NLL
over every predicted token (SparseGPT's recipe), and the time of the forward passes after one warm-up
window, synchronised, for the speed comparison with `fistaprune eval --device cuda`.
"""
import argparse
import json
import math
import os
import shutil
import time

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

# The GPU where there is one (the script's purpose); the CPU lets it be tried on a small model anywhere.
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def make(a):
    tok = json.load(open(a.tokenizer))
    ids = list(tok["model"]["vocab"].values()) + [t["id"] for t in tok.get("added_tokens", [])]
    vocab = max(ids) + 1
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=a.hidden,
        intermediate_size=a.intermediate,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    )
    torch.manual_seed(0)
    with torch.device(DEV):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(a.out, safe_serialization=True)
    shutil.copy(a.tokenizer, os.path.join(a.out, "tokenizer.json"))
    print(json.dumps({"made": a.out, "vocab": vocab, "parameters": sum(p.numel() for p in model.parameters())}))


def ppl(a):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ids = json.load(open(a.ids))["ids"]
    model = LlamaForCausalLM.from_pretrained(a.model, dtype=torch.float32).to(DEV).eval()
    n = min(len(ids) // a.seqlen, a.max_windows or 1 << 30)
    windows = [torch.tensor(ids[w * a.seqlen:(w + 1) * a.seqlen], device=DEV).unsqueeze(0) for w in range(n)]
    nll = 0.0
    with torch.inference_mode():
        model(windows[0])  # warm-up: kernels chosen, memory pooled
        sync()
        t0 = time.time()
        for x in windows:
            logits = model(x).logits[0]
            nll += F.cross_entropy(logits[:-1], x[0, 1:], reduction="sum").double().item()
        sync()
        secs = time.time() - t0
    mean = nll / (n * (a.seqlen - 1))
    out = {"windows": n, "seqlen": a.seqlen, "perplexity": math.exp(mean), "nll": mean, "seconds": secs,
           "tokens_per_second": n * a.seqlen / secs, "peak_gpu_bytes": torch.cuda.max_memory_allocated() if DEV == "cuda" else None, "device": DEV,
           "torch": torch.__version__}
    print(json.dumps(out))
    if a.json:
        json.dump(out, open(a.json, "w"), indent=2)


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="verb", required=True)
    m = sub.add_parser("make")
    m.add_argument("--out", required=True)
    m.add_argument("--tokenizer", required=True)
    for k, v in [("hidden", 4096), ("intermediate", 11008), ("heads", 32), ("kv-heads", 32), ("layers", 2)]:
        m.add_argument(f"--{k}", type=int, default=v)
    p = sub.add_parser("ppl")
    p.add_argument("--model", required=True)
    p.add_argument("--ids", required=True)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--max-windows", type=int)
    p.add_argument("--json")
    a = ap.parse_args()
    make(a) if a.verb == "make" else ppl(a)


if __name__ == "__main__":
    main()
