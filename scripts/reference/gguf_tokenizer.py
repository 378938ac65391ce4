#!/usr/bin/env python3
"""Tokenize an evaluation file with a tokenizer built independently from a GGUF's metadata, the way the
original SmolLM2 tokenizer.json is made (Digits(individual_digits) then GPT-2 byte-level BPE), and compare with
transformers' GGUF tokenizer (which ignores `tokenizer.ggml.pre`).

    python scripts/reference/gguf_tokenizer.py --gguf assets/SmolLM2-135M-Instruct.Q4_1.gguf \
        --dataset ../shared/data/wikitext-2-raw/wiki.test.raw --format wikitext

Prints the token count and the sha256 of the ids as little-endian u32, for ours-vs-theirs regression tests.
"""
import argparse, hashlib, json, os, sys

import numpy as np
import gguf
from tokenizers import Tokenizer, models, pre_tokenizers

sys.path.insert(0, os.path.dirname(__file__))
from fistaprune_ref_text import eval_text  # noqa: E402


def field(r, key):
    f = r.fields[key]
    return [bytes(f.parts[i]).decode("utf-8") for i in f.data]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--format", default="wikitext")
    a = ap.parse_args()
    r = gguf.GGUFReader(a.gguf)
    pre = bytes(r.fields["tokenizer.ggml.pre"].parts[-1]).decode()
    assert pre == "smollm", pre
    tokens = field(r, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in field(r, "tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    text = eval_text(a.dataset, a.format)
    ids = tok.encode(text).ids
    out = {"tokens": len(ids), "sha256_u32le": hashlib.sha256(np.asarray(ids, dtype="<u4").tobytes()).hexdigest()}
    try:
        from transformers import AutoTokenizer
        d, f = os.path.split(os.path.abspath(a.gguf))
        theirs = AutoTokenizer.from_pretrained(d, gguf_file=f)(text)["input_ids"]
        out["transformers_gguf_tokens"] = len(theirs)
    except ImportError:
        pass
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
