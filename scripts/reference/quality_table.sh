#!/usr/bin/env bash
# The quality table of FISTAPruner against SparseGPT and Wanda: the same calibration token ids (128 x 512 from
# the C4 sample, seed 0, saved by compare_peers.sh or made here), perplexity at seqlen 512 on the first WINDOWS
# windows of WikiText-2 (and of PTB with PTB=1).
#
#   scripts/reference/quality_table.sh OUTDIR WINDOWS "TAG|prune flags" ...
#
# e.g. "fista-2_4|--method fista --pattern 2:4" "sparsegpt-70|--method sparsegpt --sparsity 0.7".
# Each run writes OUTDIR/TAG/ (checkpoint and report.json) and OUTDIR/TAG.json (evaluation), and is skipped
# when its evaluation exists. Prints one line per run: tag, perplexity, sparsity, prune seconds.
# FP=path uses that binary instead of building one; THREADS=n passes --threads n; MODEL=gemma3 prunes
# Gemma-3-270M instead of SmolLM2-135M (or MODEL=path, any model we read); NO_DENSE=1 skips the dense evaluation
# (for a second lane on the same OUTDIR while the first one runs it).
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
out="$1"; windows="$2"; shift 2
mkdir -p "$out"
if [ -z "${FP:-}" ]; then cargo build --release --quiet --bin fistaprune; fi
fp="${FP:-./target/release/fistaprune}${THREADS:+ --threads $THREADS}"
model="$(scripts/fetch-assets.sh --path "${MODEL:-smollm2}")"
wiki=../shared/data/wikitext-2-raw/wiki.test.raw
ptb=../shared/data/ptb/ptb.test.txt
c4=../shared/data/c4/c4-train.00000-of-01024.first1000.jsonl
calib="$out/calib_128x512.json"
[ -f "$calib" ] || $fp prune --model "$model" --method magnitude --sparsity 0.5 --calib "$c4" --nsamples 128 \
  --seqlen 512 --save-calib "$calib" --out "$out/tmp-calib" --force --quiet
rm -rf "$out/tmp-calib"
evaluate() { # MODEL TAG: WikiText-2 to TAG.json, PTB to TAG.ptb.json
  [ -f "$out/$2.json" ] || $fp eval --model "$1" --dataset "$wiki" --max-windows "$windows" --quiet --json "$out/$2.json"
  [ -z "${PTB:-}" ] || [ -f "$out/$2.ptb.json" ] ||
    $fp eval --model "$1" --dataset "$ptb" --max-windows "$windows" --quiet --json "$out/$2.ptb.json"
}
[ -n "${NO_DENSE:-}" ] || evaluate "$model" dense
for spec in "$@"; do
  tag="${spec%%|*}"; flags="${spec#*|}"
  if [ ! -f "$out/$tag/report.json" ]; then
    /usr/bin/time -v $fp prune --model "$model" $flags --calib "$calib" --out "$out/$tag" --force --quiet \
      2> "$out/$tag.time" || { cat "$out/$tag.time" >&2; exit 1; }
  fi
  evaluate "$out/$tag" "$tag"
  python3 - "$out" "$tag" <<'PY'
import json, os, re, sys
d, tag = sys.argv[1:]
e, r = json.load(open(f"{d}/{tag}.json")), json.load(open(f"{d}/{tag}/report.json"))
ptb = f"{d}/{tag}.ptb.json"
ptb = f"\tptb {json.load(open(ptb))['perplexity']:.3f}" if os.path.exists(ptb) else ""
time = open(f"{d}/{tag}.time").read()
rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", time)
cpu = re.search(r"User time \(seconds\): ([\d.]+)", time)
print(f"{tag}\tppl {e['perplexity']:.3f}{ptb}\tsparsity {r['sparsity']:.4f}\tprune {r['prune_seconds']:.0f} s"
      + (f"\tuser {float(cpu.group(1)):.0f} s\trss {int(rss.group(1)) / 1024:.0f} MiB" if rss and cpu else ""))
PY
done
