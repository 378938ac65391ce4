#!/usr/bin/env python3
"""Load a checkpoint written by `fistaprune prune` in Python transformers; print the sparsity of its decoder
linear weights and its perplexity on the given token ids (non-overlapping windows).

    python tests/python/check_pruned.py --hf DIR --ids ids.json --seqlen 64 --windows 4
"""
import argparse, json, math

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hf", required=True)
    ap.add_argument("--ids", required=True)
    ap.add_argument("--seqlen", type=int, required=True)
    ap.add_argument("--windows", type=int, required=True)
    a = ap.parse_args()
    model = AutoModelForCausalLM.from_pretrained(a.hf, dtype=torch.float32).eval()
    z = t = 0
    layers = model.model.layers if hasattr(model.model, "layers") else model.model.decoder.layers
    for layer in layers:
        for _, m in layer.named_modules():
            if isinstance(m, torch.nn.Linear):
                z += (m.weight == 0).sum().item()
                t += m.weight.numel()
    ids = json.load(open(a.ids))["ids"]
    nll = 0.0
    with torch.no_grad():
        for w in range(a.windows):
            x = torch.tensor(ids[w * a.seqlen:(w + 1) * a.seqlen]).unsqueeze(0)
            lg = model(x).logits[0].float()
            nll += F.cross_entropy(lg[:-1], x[0, 1:], reduction="sum").double().item()
    print(json.dumps({"sparsity": z / t, "perplexity": math.exp(nll / (a.windows * (a.seqlen - 1)))}))


if __name__ == "__main__":
    main()
