#!/usr/bin/env python3
"""Reference perplexity of a GGUF model with Python transformers, on token ids that fistaprune produced.

    python scripts/reference/gguf_ppl.py --gguf assets/SmolLM2-135M-Instruct.Q4_1.gguf \
        --ids ids.json --seqlen 512 [--max-windows K] [--json out.json]

`ids.json` comes from `fistaprune tokenize`. transformers dequantises the GGUF itself (gguf-py) and un-permutes
Q/K; the windows and the loss follow SparseGPT's recipe (non-overlapping windows, mean NLL over all predicted
tokens). Also reports how transformers' own GGUF tokenizer differs from our ids (it ignores
`tokenizer.ggml.pre`), and times the forward passes (tokens/s) for the speed comparison. `--sparsity` counts
the exact zeros of the decoder's linear weights as transformers loaded them (for pruned `--out-format gguf`
files).
"""
import argparse, json, math, os, time

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer


def main():
    ap = argparse.ArgumentParser()
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--gguf")
    src.add_argument("--hf", help="a Hugging Face folder (e.g. a pruned checkpoint) instead of a GGUF file")
    ap.add_argument("--ids", required=True)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--max-windows", type=int)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json")
    ap.add_argument("--compare-tokenizer", action="store_true")
    ap.add_argument("--sparsity", action="store_true", help="also report the share of exact zeros in the decoder's linear weights")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    d, f = os.path.split(os.path.abspath(a.gguf)) if a.gguf else (a.hf, None)
    rec = json.load(open(a.ids))
    ids = rec["ids"]
    out = {"gguf": a.gguf, "hf": a.hf, "ids_file": a.ids, "seqlen": a.seqlen, "torch": torch.__version__}
    if a.compare_tokenizer:
        tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
        from fistaprune_ref_text import eval_text  # noqa: E402  (same directory)
        theirs = tok(eval_text(rec["dataset"], rec["format"]))["input_ids"]
        out["transformers_tokens"] = len(theirs)
        out["our_tokens"] = len(ids)
        out["ids_differing_at_same_position"] = sum(1 for x, y in zip(ids, theirs) if x != y)
    kw = {"gguf_file": f} if f else {}
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, **kw)
    model.eval()
    if a.sparsity:
        ws = [p for n, p in model.named_parameters() if ".layers." in n and n.endswith("proj.weight")]
        out["decoder_linear_sparsity"] = sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)
    n = len(ids) // a.seqlen
    if a.max_windows:
        n = min(n, a.max_windows)
    nll = 0.0
    t0 = time.time()
    with torch.inference_mode():
        for w in range(n):
            x = torch.tensor(ids[w * a.seqlen:(w + 1) * a.seqlen]).unsqueeze(0)
            logits = model(x).logits[0].float()
            nll += F.cross_entropy(logits[:-1], x[0, 1:], reduction="sum").double().item()
    secs = time.time() - t0
    mean = nll / (n * (a.seqlen - 1))
    out.update(windows=n, perplexity=math.exp(mean), nll=mean, seconds=secs, tokens_per_second=n * a.seqlen / secs)
    print(json.dumps(out, indent=2))
    if a.json:
        json.dump(out, open(a.json, "w"), indent=2)


if __name__ == "__main__":
    main()
