#!/usr/bin/env bash
# Put in .gpu/ (ignored by git, carried to the GPU machine) what scripts/gpu-check.sh reads besides the
# binary that scripts/build-cuda.sh leaves there: the WikiText-2 test text and SmolLM2's tokenizer.json (its
# 49,152-token vocabulary gives the random 7B-shaped model a real head). Needs assets/ (scripts/fetch-assets.sh)
# and ../shared. With SPARSEGPT_CHECKOUT and WANDA_CHECKOUT (the authors' repositories, IST-DASLab/sparsegpt and
# locuslab/wanda, cloned on this machine) it also copies their Python files to .gpu/peers/, ignored like the
# rest of .gpu/ and never committed, for gpu-check's timing of their code on the same card.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .gpu
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
cp ../shared/data/wikitext-2-raw/wiki.test.raw .gpu/
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cargo build --release --quiet
target/release/fistaprune --threads 2 convert --model assets/SmolLM2-135M-Instruct.Q4_1.gguf --out "$tmp/smol"
cp "$tmp/smol/tokenizer.json" .gpu/
if [ -n "${SPARSEGPT_CHECKOUT:-}" ] && [ -n "${WANDA_CHECKOUT:-}" ]; then
  rm -rf .gpu/peers && mkdir -p .gpu/peers/sparsegpt .gpu/peers/wanda/lib
  cp "$SPARSEGPT_CHECKOUT"/*.py .gpu/peers/sparsegpt/
  cp "$WANDA_CHECKOUT"/lib/*.py .gpu/peers/wanda/lib/
fi
du -sh .gpu/*
