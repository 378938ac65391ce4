#!/usr/bin/env bash
# The main job on the demo model: fetch SmolLM2-135M-Instruct (Q4_1 GGUF) and measure its WikiText-2
# perplexity (seqlen 512; the first 40 windows, about a minute; DEMO_WINDOWS=0 for the whole test set).
# Later issues turn this into prune-then-evaluate.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
scripts/fetch-assets.sh
cargo build --release --quiet --bin fistaprune
windows="${DEMO_WINDOWS:-40}"
args=()
[ "$windows" != 0 ] && args=(--max-windows "$windows")
./target/release/fistaprune eval --model assets/SmolLM2-135M-Instruct.Q4_1.gguf \
  --dataset ../shared/data/wikitext-2-raw/wiki.test.raw --seqlen 512 "${args[@]}" --json target/demo-eval.json
