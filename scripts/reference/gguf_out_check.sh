#!/usr/bin/env bash
# The real-client check of `--out-format gguf` (issue 17), one command, not in CI (it builds llama.cpp):
# 1. SmolLM2 and Gemma 3 pruned by Wanda (50 %, 16 x 256 C4 calibration tokens) straight to GGUF F32, then
#    converted to Q8_0; llama.cpp itself (llama-cpp-python) computes the WikiText-2 perplexity of each on our
#    token ids: within 0.1 % of `fistaprune eval` on the same file for F32, within 1 % for Q8_0; transformers'
#    GGUF loader reads the F32 files with the same perplexity (0.1 %) and sparsity.
# 2. llama.cpp's own converter (convert_hf_to_gguf.py of the same llama.cpp) and `fistaprune convert
#    --out-format gguf` on the same Hugging Face folder (SmolLM2): the same tensors, shapes, types and data,
#    and the same metadata keys and values (but general.name and general.size_label).
#
#   scripts/reference/gguf_out_check.sh [OUTDIR] [WINDOWS]      # defaults: target/gguf-out-check 16
#
# A step whose result is in OUTDIR is not run again (delete OUTDIR for a fresh run).
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
out="$(realpath -m "${1:-target/gguf-out-check}")"; windows="${2:-16}"
mkdir -p "$out"
scripts/python-env.sh >/dev/null
scripts/reference/llama-cpp-env.sh >/dev/null
cargo build --release --quiet --bin fistaprune
fp=./target/release/fistaprune
wiki=../shared/data/wikitext-2-raw/wiki.test.raw
c4=../shared/data/c4/c4-train.00000-of-01024.first1000.jsonl
for m in smollm2 gemma3; do
  model="$(scripts/fetch-assets.sh --path $m)"
  [ -f "$out/$m-f32/model.gguf" ] || $fp prune --model "$model" --method wanda --sparsity 0.5 --calib "$c4" \
    --nsamples 16 --seqlen 256 --out "$out/$m-f32" --out-format gguf --force --quiet
  [ -f "$out/$m-q8_0/model.gguf" ] ||
    $fp convert --model "$out/$m-f32" --out "$out/$m-q8_0" --out-format gguf --dtype q8_0 --force >/dev/null
  [ -f "$out/$m-ids.json" ] || $fp tokenize --model "$model" --dataset "$wiki" --out "$out/$m-ids.json" >/dev/null
  for t in f32 q8_0; do
    [ -f "$out/$m-$t.ours.json" ] ||
      $fp eval --model "$out/$m-$t" --dataset "$wiki" --max-windows "$windows" --quiet --json "$out/$m-$t.ours.json"
    [ -f "$out/$m-$t.llama_cpp.json" ] || .venv-llama/bin/python scripts/reference/llama_cpp_ppl.py \
      --gguf "$out/$m-$t/model.gguf" --ids "$out/$m-ids.json" --max-windows "$windows" --json "$out/$m-$t.llama_cpp.json" >/dev/null
  done
  [ -f "$out/$m-f32.transformers.json" ] || .venv/bin/python scripts/reference/gguf_ppl.py --gguf "$out/$m-f32/model.gguf" \
    --ids "$out/$m-ids.json" --max-windows "$windows" --sparsity --json "$out/$m-f32.transformers.json" >/dev/null
done
# The converter's output and ours from the same Hugging Face folder.
$fp convert --model "$(scripts/fetch-assets.sh --path smollm2)" --out "$out/smollm2-hf" --force >/dev/null
(cd .venv-llama/llama.cpp && PYTHONPATH=gguf-py "$root/.venv/bin/python" convert_hf_to_gguf.py "$out/smollm2-hf" \
  --outtype f32 --outfile "$out/smollm2-converter.gguf" 2>&1 | tail -1)
$fp convert --model "$out/smollm2-hf" --out "$out/smollm2-from-hf" --out-format gguf --force >/dev/null
PYTHONPATH=.venv-llama/llama.cpp/gguf-py .venv/bin/python - "$out" <<'PY'
import json, sys
import numpy as np
from gguf import GGUFReader
out = sys.argv[1]
fail = []
def ppl(f): return json.load(open(f"{out}/{f}"))["perplexity"]
for m in ["smollm2", "gemma3"]:
    for t, tol in [("f32", 1e-3), ("q8_0", 1e-2)]:
        ours, theirs = ppl(f"{m}-{t}.ours.json"), ppl(f"{m}-{t}.llama_cpp.json")
        rel = theirs / ours - 1
        print(f"{m} {t}: fistaprune {ours:.4f}  llama.cpp {theirs:.4f}  ({rel:+.2e})")
        if abs(rel) > tol: fail.append(f"{m} {t}: llama.cpp off by {rel:+.2e}")
    tf = json.load(open(f"{out}/{m}-f32.transformers.json"))
    rel = tf["perplexity"] / ppl(f"{m}-f32.ours.json") - 1
    print(f"{m} f32: transformers {tf['perplexity']:.4f} ({rel:+.2e}), sparsity {tf['decoder_linear_sparsity']:.4f}")
    if abs(rel) > 1e-3 or abs(tf["decoder_linear_sparsity"] - 0.5) > 1e-6: fail.append(f"{m}: transformers")
a, b = GGUFReader(f"{out}/smollm2-converter.gguf"), GGUFReader(f"{out}/smollm2-from-hf/model.gguf")
def fields(r): return {k: f for k, f in r.fields.items() if not k.startswith("GGUF.")}
fa, fb = fields(a), fields(b)
cosmetic = {"general.name", "general.size_label"}
keys = (set(fa) ^ set(fb)) - cosmetic
same = [k for k in set(fa) & set(fb) - cosmetic if fa[k].contents() == fb[k].contents()]
ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
tens = [n for n in set(ta) | set(tb) if n not in ta or n not in tb or tuple(ta[n].shape) != tuple(tb[n].shape)
        or ta[n].tensor_type != tb[n].tensor_type or not np.array_equal(np.asarray(ta[n].data), np.asarray(tb[n].data))]
print(f"converter vs ours: {len(fa)} / {len(fb)} keys, {len(same)} equal, differing sets: {sorted(keys)};"
      f" {len(ta)} / {len(tb)} tensors, {len(tens)} differ")
if keys or len(same) != len(set(fa) & set(fb) - cosmetic) or tens: fail.append("converter comparison")
print("FAILED: " + "; ".join(fail) if fail else "all checks passed")
sys.exit(1 if fail else 0)
PY
