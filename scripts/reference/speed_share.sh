#!/usr/bin/env bash
# Eval and SparseGPT pruning as shares of the faer GEMM rate measured in the same run, on SmolLM2-135M and
# Gemma-3-270M (run it on an idle machine; compare shares, not times, across machines):
#
#   scripts/reference/speed_share.sh OUTDIR
#
# FP=path uses that binary instead of building one; FP_BASE=path also runs the SparseGPT prunes with a second
# binary (before/after a change, in the same run). Prints each share, the prune's forward / statistics / sweep
# seconds and its peak RSS.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
o="$1"; mkdir -p "$o"
cargo build --release --quiet --example gemm
if [ -z "${FP:-}" ]; then cargo build --release --quiet --bin fistaprune; fi
declare -A bin=([new]="${FP:-./target/release/fistaprune}")
[ -z "${FP_BASE:-}" ] || bin[base]="$FP_BASE"
c4=../shared/data/c4/c4-train.00000-of-01024.first1000.jsonl
wiki=../shared/data/wikitext-2-raw/wiki.test.raw
./target/release/examples/gemm 512x576x1536 512x640x2048 | tee "$o/gemm.txt"
for n in smollm2 gemma3; do
  p="$(scripts/fetch-assets.sh --path $n)"
  ${bin[new]} eval --model "$p" --dataset "$wiki" --max-windows 8 --quiet --json "$o/eval-$n.json" --force
  for b in "${!bin[@]}"; do
    /usr/bin/time -v ${bin[$b]} prune --model "$p" --method sparsegpt --sparsity 0.5 --calib "$c4" --nsamples 32 \
      --seqlen 512 --out "$o/sg-$n-$b" --force --quiet 2> "$o/sg-$n-$b.time"
  done
done
python3 - "$o" <<'PY'
import json, os, re, sys
o = sys.argv[1]
g = {l.split()[0]: float(l.split()[2]) for l in open(f"{o}/gemm.txt") if l.split() and l.split()[0][0].isdigit()}
for n, shape in [("smollm2", "512x576x1536"), ("gemma3", "512x640x2048")]:
    e = json.load(open(f"{o}/eval-{n}.json"))
    print(f"{n}: GEMM {g[shape]:.1f} GFLOP/s ({shape}); eval {e['gflop_per_second']:.1f} GFLOP/s = {100 * e['gflop_per_second'] / g[shape]:.0f}%")
    for b in ["new", "base"]:
        if not os.path.exists(f"{o}/sg-{n}-{b}/report.json"):
            continue
        r = json.load(open(f"{o}/sg-{n}-{b}/report.json"))
        rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", open(f"{o}/sg-{n}-{b}.time").read()).group(1)) // 1024
        f, s, p = (sum(l[k] for l in r["layers"]) for k in ("forward_seconds", "stats_seconds", "prune_seconds"))
        share = 100 * r["prune_gflop_per_second"] / g[shape]
        print(f"  sparsegpt ({b}): {r['prune_gflop']:.0f} GFLOP in {r['prune_seconds']:.1f} s = {share:.0f}%; "
              f"forward / statistics / sweep {f:.1f} / {s:.1f} / {p:.1f} s; peak RSS {rss} MiB")
PY
