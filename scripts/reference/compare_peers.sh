#!/usr/bin/env bash
# Side-by-side: fistaprune's magnitude / Wanda / SparseGPT against the authors' code (SparseGPT from
# IST-DASLab/sparsegpt, Wanda and magnitude from locuslab/wanda) on the demo model, same calibration token ids,
# WikiText-2 perplexity at seqlen 512 on the same token ids.
#
#   scripts/reference/compare_peers.sh SPARSEGPT_CHECKOUT WANDA_CHECKOUT [OUTDIR] [WINDOWS=100] [NSAMPLES=128] [CALIB_SEQLEN=512]
#
# The two checkouts are the authors' repositories cloned on this machine (never committed here). Writes
# OUTDIR/table.md and one JSON per run; a run whose JSON exists is skipped.
# MODEL=gemma3 runs Gemma-3-270M (their code through transformers 5 in .venv, see peers_prune.py) instead of
# SmolLM2-135M (transformers 4.36 in .venv-peers); CONFIGS="wanda --sparsity 0.5;sparsegpt --pattern 2:4" picks
# the runs (default: magnitude, Wanda and SparseGPT at 50 % and 2:4); FP=path uses that binary instead of building
# one; THREADS=n is passed to both sides.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
sg="$1"; wd="$2"; out="${3:-target/compare-peers}"; windows="${4:-100}"; nsamples="${5:-128}"; cseq="${6:-512}"
mkdir -p "$out"
case "${MODEL:-smollm2}" in
  smollm2) model="$(scripts/fetch-assets.sh --path smollm2)"; scripts/reference/peers-env.sh >/dev/null; py=.venv-peers/bin/python ;;
  gemma3) model="$(scripts/fetch-assets.sh --path gemma3)"; scripts/python-env.sh >/dev/null; py=.venv/bin/python ;;
  *) echo "MODEL must be smollm2 or gemma3" >&2; exit 2 ;;
esac
if [ -z "${FP:-}" ]; then cargo build --release --quiet --bin fistaprune; fi
fp="${FP:-./target/release/fistaprune}${THREADS:+ --threads $THREADS}"
wiki=../shared/data/wikitext-2-raw/wiki.test.raw
c4=../shared/data/c4/c4-train.00000-of-01024.first1000.jsonl
[ -d "$out/hf" ] || $fp convert --model "$model" --out "$out/hf" >/dev/null
[ -f "$out/wt2_ids.json" ] || $fp tokenize --model "$model" --dataset "$wiki" --out "$out/wt2_ids.json" >/dev/null
calib="$out/calib_${nsamples}x${cseq}.json"
[ -f "$calib" ] || $fp prune --model "$model" --method wanda --sparsity 0.5 --calib "$c4" --nsamples "$nsamples" \
  --seqlen "$cseq" --save-calib "$calib" --out "$out/tmp-calib" --force --quiet
rm -rf "$out/tmp-calib"
[ -f "$out/dense.json" ] || $fp eval --model "$model" --dataset "$wiki" --max-windows "$windows" --quiet --json "$out/dense.json"
IFS=';' read -ra configs <<< "${CONFIGS:-magnitude --sparsity 0.5;wanda --sparsity 0.5;sparsegpt --sparsity 0.5;magnitude --pattern 2:4;wanda --pattern 2:4;sparsegpt --pattern 2:4}"
for cfg in "${configs[@]}"; do
  set -- $cfg
  tag="$1-${3/:/_}"
  if [ ! -f "$out/ours-$tag.json" ]; then
    /usr/bin/time -v $fp prune --model "$model" --method $cfg --calib "$calib" --nsamples "$nsamples" --seqlen "$cseq" \
      --out "$out/ours-$tag" --force --quiet 2> "$out/ours-$tag.time"
    $fp eval --model "$out/ours-$tag" --dataset "$wiki" --max-windows "$windows" --quiet --json "$out/ours-$tag.json"
  fi
  if [ ! -f "$out/peers-$tag.json" ]; then
    $py scripts/reference/peers_prune.py --method $cfg --model "$out/hf" --calib "$calib" ${THREADS:+--threads $THREADS} \
      --eval-ids "$out/wt2_ids.json" --max-windows "$windows" --sparsegpt-repo "$sg" --wanda-repo "$wd" \
      --against "$out/ours-$tag" --json "$out/peers-$tag.json" > "$out/peers-$tag.log" 2>&1
  fi
done
python3 - "$out" <<'PY'
import json, os, re, sys
d = sys.argv[1]
dense = json.load(open(f"{d}/dense.json"))
rows = [f"dense: perplexity {dense['perplexity']:.3f} ({dense['windows']} windows x {dense['seqlen']})", "",
        "| method | pattern | fistaprune | authors' code | difference | fistaprune's weights, their eval | masks differing | of which not ties | fistaprune prune s | authors' prune s | peak RSS (fistaprune) |",
        "|---|---|---|---|---|---|---|---|---|---|---|"]
for m in ["magnitude", "wanda", "sparsegpt"]:
    for p in ["0.5", "2_4"]:
        tag = f"{m}-{p}"
        if not os.path.exists(f"{d}/peers-{tag}.json"):
            continue
        ours, theirs = json.load(open(f"{d}/ours-{tag}.json")), json.load(open(f"{d}/peers-{tag}.json"))
        rep = json.load(open(f"{d}/ours-{tag}/report.json"))
        rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", open(f"{d}/ours-{tag}.time").read()).group(1))
        diff = 100 * (ours["perplexity"] / theirs["perplexity"] - 1)
        ag = theirs.get("against") or {}
        fpe = f"{ag['perplexity_of_fistaprune_weights']:.3f}" if ag else "-"
        md = f"{100 * ag['mask_positions_differing'] / ag['mask_positions']:.2f}%" if ag else "-"
        nt = ag.get("groups_differing_not_by_ties")
        nt = "-" if nt is None else str(nt)
        rows.append(f"| {m} | {'50%' if p == '0.5' else '2:4'} | {ours['perplexity']:.3f} | {theirs['perplexity']:.3f} | "
                    f"{diff:+.2f}% | {fpe} | {md} | {nt} | {rep['prune_seconds']:.0f} | {theirs['prune_seconds']:.0f} | {rss/1024:.0f} MiB |")
open(f"{d}/table.md", "w").write("\n".join(rows) + "\n")
print("\n".join(rows))
PY
