#!/usr/bin/env bash
# The main job on the demo model: fetch SmolLM2-135M-Instruct (Q4_1 GGUF), prune it to 50 % with SparseGPT
# (128 x 512 calibration tokens from the C4 sample, seed 0) and print its WikiText-2 perplexity (seqlen 512)
# before and after. About 8 minutes on two cores. Knobs: DEMO_MODEL (smollm2, or gemma3: Gemma-3-270M,
# Q4_K_M GGUF), DEMO_METHOD (sparsegpt, wanda, magnitude, fista, random), DEMO_SPARSITY (0.5) or DEMO_PATTERN
# (2:4), DEMO_NSAMPLES (128), DEMO_WINDOWS (40; 0 = the whole test set). Without ../shared/data beside the
# checkout, the texts come by name from the Hugging Face Hub (`c4`, `wikitext2`; the full C4 shard then).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
cargo build --release --quiet --bin fistaprune
windows="${DEMO_WINDOWS:-40}"
target=(--sparsity "${DEMO_SPARSITY:-0.5}")
[ -n "${DEMO_PATTERN:-}" ] && target=(--pattern "$DEMO_PATTERN")
evalw=()
[ "$windows" != 0 ] && evalw=(--eval-max-windows "$windows")
case "${DEMO_MODEL:-smollm2}" in
  smollm2 | gemma3) model="$(scripts/fetch-assets.sh --path "${DEMO_MODEL:-smollm2}")" ;;
  *) echo "error: DEMO_MODEL=$DEMO_MODEL: smollm2 or gemma3" >&2; exit 1 ;;
esac
calib=../shared/data/c4/c4-train.00000-of-01024.first1000.jsonl
wiki=../shared/data/wikitext-2-raw/wiki.test.raw
[ -f "$calib" ] || calib=c4
[ -f "$wiki" ] || wiki=wikitext2
./target/release/fistaprune prune --model "$model" \
  --method "${DEMO_METHOD:-sparsegpt}" "${target[@]}" \
  --calib "$calib" --nsamples "${DEMO_NSAMPLES:-128}" --seqlen 512 \
  --out target/demo-pruned --force \
  --eval "$wiki" --eval-seqlen 512 "${evalw[@]}"
echo "pruned checkpoint and report.json: target/demo-pruned"
