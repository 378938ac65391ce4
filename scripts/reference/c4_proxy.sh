#!/usr/bin/env bash
# A tuning proxy kept apart from the texts we report (issue 16): the C4 sample split by document, calibration
# 32 x 512 (seed 0) from documents 0-899, perplexity on the first 24 windows x 512 of documents 900-999.
#
#   scripts/reference/c4_proxy.sh OUTDIR MODEL TAG prune-flags...
#
# MODEL: smollm2 | gemma3 | a path. Writes OUTDIR/MODEL-TAG.json (evaluation), .time (/usr/bin/time -v) and the
# report (the pruned weights are deleted once evaluated); skipped when the evaluation exists. Prints
# perplexity and user CPU seconds. FP=path uses that binary instead of building one; --threads 1 always.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
out="$1"; model="$2"; tag="$3"; shift 3
mkdir -p "$out"
if [ -z "${FP:-}" ]; then cargo build --release --quiet --bin fistaprune; fi
fp="${FP:-./target/release/fistaprune} --threads 1"
m="$(scripts/fetch-assets.sh --path "$model")"
[ "$m" != "$model" ] || model="$(basename "$model")"
c4=../shared/data/c4/c4-train.00000-of-01024.first1000.jsonl
[ -f "$out/c4-hold.jsonl" ] || python3 - "$c4" "$out" <<'PY'
import sys
lines = open(sys.argv[1]).read().splitlines()
assert len(lines) == 1000, len(lines)
open(f"{sys.argv[2]}/c4-calib.jsonl", "w").write("\n".join(lines[:900]) + "\n")
open(f"{sys.argv[2]}/c4-hold.jsonl", "w").write("\n".join(lines[900:]) + "\n")
PY
calib="$out/$model-calib.json"
[ -f "$calib" ] || $fp prune --model "$m" --method magnitude --sparsity 0.5 --calib "$out/c4-calib.jsonl" \
  --nsamples 32 --seqlen 512 --seed 0 --save-calib "$calib" --out "$out/tmp-$model" --force --quiet
rm -rf "$out/tmp-$model"
evaluate() { $fp eval --model "$1" --dataset "$out/c4-hold.jsonl" --format c4 --max-windows 24 --quiet --json "$2"; }
[ -f "$out/$model-dense.json" ] || evaluate "$m" "$out/$model-dense.json"
if [ ! -f "$out/$model-$tag.json" ]; then
  /usr/bin/time -v $fp prune --model "$m" "$@" --calib "$calib" --out "$out/$model-$tag" --force --quiet \
    2> "$out/$model-$tag.time" || { cat "$out/$model-$tag.time" >&2; exit 1; }
  evaluate "$out/$model-$tag" "$out/$model-$tag.json"
  rm -f "$out/$model-$tag"/model*.safetensors
fi
python3 - "$out/$model-$tag" <<'PY'
import json, re, sys
p = sys.argv[1]
ppl = json.load(open(p + ".json"))["perplexity"]
user = re.search(r"User time \(seconds\): ([\d.]+)", open(p + ".time").read()).group(1)
print(f"{p}: perplexity {ppl:.3f}, user {user} s")
PY
