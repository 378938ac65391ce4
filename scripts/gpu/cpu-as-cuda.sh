#!/usr/bin/env bash
# Why this exists: scripts/gpu-check.sh is meant for the GPU machine, whose time is short; this stand-in for its
# binary lets the script be tried end to end on a machine without a GPU first. It runs the CPU build
# (FISTAPRUNE_BIN, default target/release/fistaprune) with every `--device cuda` / `cuda:N` turned into `cpu` and
# `--gpu-memory N` dropped, so each "cuda against cpu" comparison compares the CPU with itself: what it checks is
# the script (its steps, records and budget), not the GPU.
#   FP=scripts/gpu/cpu-as-cuda.sh OUT=dir SCRATCH=dir STEPS="1 2" scripts/gpu-check.sh
#   (MAKE_FLAGS / MAKE70_FLAGS="--hidden 128 --intermediate 256 --heads 4 --kv-heads 2" shrink the random models.)
set -euo pipefail
bin=${FISTAPRUNE_BIN:-$(cd "$(dirname "$0")/../.." && pwd)/target/release/fistaprune}
args=()
skip=0
for a in "$@"; do
  if [ $skip = 1 ]; then skip=0; continue; fi
  case "$a" in
    --gpu-memory) skip=1 ;;
    cuda | cuda:*) args+=(cpu) ;;
    *) args+=("$a") ;;
  esac
done
exec "$bin" "${args[@]}"
