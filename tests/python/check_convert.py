#!/usr/bin/env python3
"""Does a directory written by `fistaprune convert` load in Python transformers and give the same logits?

    python tests/python/check_convert.py --hf DIR (--reference ref.safetensors | --gguf FILE) [--sample TEXT]

The expected logits come from `--reference` (input_ids + logits) or from transformers' own GGUF loader run on
`--gguf` (fixed random ids). Prints one JSON object: max |Δ| / max |ref|, and the ids transformers' tokenizer
gives for `--sample` from the converted tokenizer.json. Exits non-zero when the logits differ by more than
`--tol` (relative to the largest reference logit).
"""
import argparse, json, os, sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hf", required=True)
    ap.add_argument("--reference")
    ap.add_argument("--gguf")
    ap.add_argument("--sample")
    ap.add_argument("--tol", type=float, default=1e-4)
    a = ap.parse_args()
    model = AutoModelForCausalLM.from_pretrained(a.hf, dtype=torch.float32).eval()
    if a.reference:
        from safetensors.torch import load_file
        ref = load_file(a.reference)
        ids, want = ref["input_ids"], ref["logits"]
    else:
        d, f = os.path.split(os.path.abspath(a.gguf))
        g = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
        ids = torch.randint(0, model.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            want = g(ids).logits.float()
    with torch.no_grad():
        got = model(ids).logits.float()
    rel = ((got - want).abs().max() / want.abs().max()).item()
    out = {"max_rel": rel, "shape": list(got.shape)}
    if a.sample is not None:
        tok = AutoTokenizer.from_pretrained(a.hf)
        out["sample_ids"] = tok(a.sample)["input_ids"]
    print(json.dumps(out))
    sys.exit(0 if rel <= a.tol else 1)


if __name__ == "__main__":
    main()
