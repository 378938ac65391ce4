#!/usr/bin/env bash
# Put in .gpu/ (ignored by git, carried to the GPU machine) what scripts/gpu-check.sh reads besides the
# binary that scripts/build-cuda.sh leaves there: the WikiText-2 test text and SmolLM2's tokenizer.json (its
# 49,152-token vocabulary gives the random 7B-shaped model a real head). Needs assets/ (scripts/fetch-assets.sh)
# and ../shared.
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
du -sh .gpu/*
