#!/usr/bin/env python3
"""llama.cpp's perplexity of a GGUF file, on token ids that fistaprune produced: the real-client check of
`--out-format gguf` (issue 17).

    python scripts/reference/llama_cpp_ppl.py --gguf OUT/model.gguf --ids ids.json --seqlen 512 \
        [--max-windows K] [--threads N] [--json out.json]

`ids.json` comes from `fistaprune tokenize`. llama.cpp (through llama-cpp-python, which builds it from source:
`scripts/reference/llama-cpp-env.sh`) loads the file itself; each window of `seqlen` ids is evaluated from an
empty KV cache with every position's logits kept, and the loss is SparseGPT's recipe as `fistaprune eval` and
`gguf_ppl.py` compute it: non-overlapping windows, mean NLL over every predicted token, in float64.
"""
import argparse, json, math, os, time

import numpy as np
from llama_cpp import Llama, __version__ as llama_cpp_version


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--ids", required=True)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--max-windows", type=int)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json")
    a = ap.parse_args()
    ids = json.load(open(a.ids))["ids"]
    llm = Llama(model_path=a.gguf, n_ctx=a.seqlen, n_batch=a.seqlen, n_ubatch=a.seqlen, logits_all=True,
                n_threads=a.threads, n_threads_batch=a.threads, verbose=False)
    n = len(ids) // a.seqlen
    if a.max_windows:
        n = min(n, a.max_windows)
    nll = 0.0
    t0 = time.time()
    for w in range(n):
        x = ids[w * a.seqlen:(w + 1) * a.seqlen]
        llm.reset()
        llm._ctx.kv_cache_clear() if hasattr(llm._ctx, "kv_cache_clear") else None
        llm.eval(x)
        logits = np.asarray(llm.scores[:a.seqlen], dtype=np.float64)
        m = logits.max(axis=1, keepdims=True)
        logz = (m[:, 0] + np.log(np.exp(logits - m).sum(axis=1)))
        target = np.asarray(x[1:])
        nll += float((logz[:-1] - logits[np.arange(a.seqlen - 1), target]).sum())
    secs = time.time() - t0
    mean = nll / (n * (a.seqlen - 1))
    out = {"gguf": a.gguf, "ids_file": a.ids, "seqlen": a.seqlen, "llama_cpp_python": llama_cpp_version,
           "windows": n, "perplexity": math.exp(mean), "nll": mean, "seconds": secs}
    print(json.dumps(out, indent=2))
    if a.json:
        json.dump(out, open(a.json, "w"), indent=2)


if __name__ == "__main__":
    main()
