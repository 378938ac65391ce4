#!/usr/bin/env python3
"""Tokenize an evaluation file with Google's SentencePiece library running a model rebuilt from a GGUF's
metadata (`tokenizer.ggml.model` = "llama": pieces, scores and types as the original `tokenizer.model` had
them), the reference for a SentencePiece vocabulary such as Gemma 3's; optionally compare with transformers'
GGUF tokenizer.

    python scripts/reference/spm_from_gguf.py --gguf assets/gemma-3-270m-q4_k_m.gguf \
        --dataset ../shared/data/wikitext-2-raw/wiki.test.raw --format wikitext [--ids-out ids.json]

The model is BPE with byte fallback; the normalizer is the identity with whitespace escaped to U+2581 and a
dummy prefix only if `tokenizer.ggml.add_space_prefix` says so (Gemma 3: no); BOS is prepended when
`tokenizer.ggml.add_bos_token` is set. Prints the token count and the sha256 of the ids as little-endian u32.
"""
import argparse, hashlib, json, os, sys

import numpy as np
import gguf
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as pb

sys.path.insert(0, os.path.dirname(__file__))
from fistaprune_ref_text import eval_text  # noqa: E402


def scalar(r, key, default=None):
    if key not in r.fields:
        return default
    f = r.fields[key]
    return f.parts[f.data[0]][0]


def model_proto(r):
    f = r.fields["tokenizer.ggml.tokens"]
    tokens = [bytes(f.parts[i]).decode("utf-8") for i in f.data]
    sf, tf = r.fields["tokenizer.ggml.scores"], r.fields["tokenizer.ggml.token_type"]
    scores = [float(sf.parts[i][0]) for i in sf.data]
    types = [int(tf.parts[i][0]) for i in tf.data]
    m = pb.ModelProto()
    for t, s, ty in zip(tokens, scores, types):
        p = m.pieces.add()
        p.piece, p.score, p.type = t, s, ty  # GGUF token types are SentencePiece's piece types
    ts = m.trainer_spec
    ts.model_type = pb.TrainerSpec.BPE
    ts.vocab_size = len(tokens)
    ts.byte_fallback = True
    ts.unk_id = int(scalar(r, "tokenizer.ggml.unknown_token_id", 0))
    ts.bos_id = int(scalar(r, "tokenizer.ggml.bos_token_id", -1))
    ts.eos_id = int(scalar(r, "tokenizer.ggml.eos_token_id", -1))
    ts.pad_id = int(scalar(r, "tokenizer.ggml.padding_token_id", -1))
    ns = m.normalizer_spec
    ns.name = "identity"
    ns.add_dummy_prefix = bool(scalar(r, "tokenizer.ggml.add_space_prefix", True))
    ns.remove_extra_whitespaces = False
    ns.escape_whitespaces = True
    return m


def split_encode(sp, r, text):
    """Hugging Face's way with special pieces: control pieces (CONTROL = 3, e.g. `<unk>` in PTB's text) and
    user-defined ones (USER_DEFINED = 4, e.g. Gemma's runs of spaces and newlines) are cut out of the raw text
    before SentencePiece sees it, so a run of two spaces is its own piece rather than two escaped spaces
    (SentencePiece escapes the spaces first, and then never matches them). llama.cpp does the same with
    user-defined pieces, and with control pieces when asked to parse special tokens."""
    import re
    f = r.fields["tokenizer.ggml.tokens"]
    tokens = [bytes(f.parts[i]).decode("utf-8") for i in f.data]
    tf = r.fields["tokenizer.ggml.token_type"]
    user = {t: i for i, t in enumerate(tokens) if int(tf.parts[tf.data[i]][0]) in (3, 4)}
    pattern = re.compile("(" + "|".join(re.escape(t) for t in sorted(user, key=len, reverse=True)) + ")")
    ids = []
    for k, piece in enumerate(pattern.split(text)):
        if k % 2:
            ids.append(user[piece])
        elif piece:
            ids.extend(sp.encode(piece))
    return ids


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--format", default="wikitext")
    ap.add_argument("--ids-out")
    ap.add_argument("--compare-transformers", action="store_true")
    ap.add_argument("--split-special", action="store_true",
                    help="as Hugging Face's tokenizers (and llama.cpp, for user-defined pieces): control and "
                         "user-defined pieces are matched in the raw text first (longest first), SentencePiece "
                         "encodes the text between them")
    a = ap.parse_args()
    r = gguf.GGUFReader(a.gguf)
    sp = spm.SentencePieceProcessor(model_proto=model_proto(r).SerializeToString())
    text = eval_text(a.dataset, a.format)
    if a.split_special:
        ids = split_encode(sp, r, text)
    else:
        ids = sp.encode(text)
    if bool(scalar(r, "tokenizer.ggml.add_bos_token", True)):
        ids = [int(scalar(r, "tokenizer.ggml.bos_token_id"))] + ids
    out = {
        "count": len(ids),
        "sha256_u32le": hashlib.sha256(np.asarray(ids, dtype="<u4").tobytes()).hexdigest(),
        "sentencepiece": spm.__version__,
    }
    if a.compare_transformers:
        from transformers import AutoTokenizer
        d, f = os.path.split(os.path.abspath(a.gguf))
        theirs = AutoTokenizer.from_pretrained(d, gguf_file=f)(text)["input_ids"]
        out["transformers_gguf_count"] = len(theirs)
        out["transformers_gguf_differing_at_same_position"] = sum(1 for x, y in zip(ids, theirs) if x != y)
    if a.ids_out:
        json.dump({"ids": ids}, open(a.ids_out, "w"))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
