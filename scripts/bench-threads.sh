#!/usr/bin/env bash
# How the CPU path scales with threads (issue 14): `eval` and SparseGPT pruning of a random-weight LLaMA with a
# 1B model's layer shapes (TinyLlama-1.1B: hidden 2048, MLP 5632, 32 query and 4 K/V heads; SmolLM2's 49,152-token
# vocabulary), once per thread count, each run alone. Prints one line per run and the speed-up of every
# count against the first; the issue's goal is at least 3x from 4 to 16 threads on a 16-core machine.
#
#   scripts/bench-threads.sh [THREADS...]        default: 1 2 (this machine's cores); the issue's check: 4 16
#
# LAYERS (default 22), WINDOWS (eval windows of 512 tokens, default 8) and NSAMPLES (calibration samples of 512
# tokens, default 16) scale the work; EVAL_FLAGS go to eval (e.g. `--layer-memory-mb 512` re-reads the layers on every
# batch, as eval does when a model's layers do not fit its default 4 GB, as at 22 layers). The model is made once with transformers (PYTHON, default .venv's, made by
# scripts/python-env.sh) in WORK (default target/bench-threads) and kept there. FP and GEMM name prebuilt
# binaries (no GEMM line where there is no such file); TOKENIZER a tokenizer.json for the model; METHODS the
# pruning methods timed, 50 % each (default sparsegpt; e.g. "sparsegpt fista").
set -euo pipefail
cd "$(dirname "$0")/.."
counts=("${@:-1 2}")
read -r -a counts <<< "${counts[*]}"
layers=${LAYERS:-22}
windows=${WINDOWS:-8}
nsamples=${NSAMPLES:-16}
methods=${METHODS:-sparsegpt}
work=${WORK:-target/bench-threads}
fp=${FP:-target/release/fistaprune}
py=${PYTHON:-.venv/bin/python}
data=../shared/data
mkdir -p "$work"
gemm=${GEMM:-target/release/examples/gemm}
if [ -z "${FP:-}" ]; then cargo build --release --quiet --bin fistaprune --example gemm; fi
model=$work/llama1b-$layers
if [ ! -f "$model/config.json" ]; then
  tok=${TOKENIZER:-$work/tok/tokenizer.json}
  if [ ! -f "$tok" ]; then
    "$fp" --threads 2 convert --model "$(scripts/fetch-assets.sh --path smollm2)" --out "$work/tok" --force >/dev/null
  fi
  "$py" scripts/gpu/torch_ref.py make --out "$model" --hidden 2048 --intermediate 5632 --heads 32 --kv-heads 4 \
    --layers "$layers" --tokenizer "$tok"
fi
field() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$1" "$2"; }
declare -A eval_s prune_s
for t in "${counts[@]}"; do
  # The machine's GEMM rate at this thread count, on the MLP's shape, for the share of it each run reaches.
  [ -x "$gemm" ] && echo "threads $t  GEMM (faer, 512x2048x5632) $(RAYON_NUM_THREADS=$t "$gemm" 512x2048x5632 | awk 'NR==2 {print $3}') GFLOP/s"
  "$fp" --threads "$t" eval --model "$model" --dataset $data/wikitext-2-raw/wiki.test.raw --seqlen 512 \
    --max-windows "$windows" ${EVAL_FLAGS:-} --quiet --json "$work/eval-$t.json" --force
  eval_s[$t]=$(field "$work/eval-$t.json" seconds)
  echo "threads $t  eval      $(printf %8.1f "${eval_s[$t]}") s  $(printf %6.1f "$(field "$work/eval-$t.json" gflop_per_second)") GFLOP/s"
  for m in $methods; do
    "$fp" --threads "$t" prune --model "$model" --method "$m" --sparsity 0.5 \
      --calib $data/c4/c4-train.00000-of-01024.first1000.jsonl --nsamples "$nsamples" --seqlen 512 \
      --out "$work/$m-$t" --force --quiet
    prune_s[$m-$t]=$(field "$work/$m-$t/report.json" prune_seconds)
    echo "threads $t  $(printf %-9s "$m") $(printf %8.1f "${prune_s[$m-$t]}") s  $(printf %6.1f "$(field "$work/$m-$t/report.json" prune_gflop_per_second)") GFLOP/s (counted)"
  done
done
t0=${counts[0]}
ratio() { python3 -c "import sys; print(f'{float(sys.argv[1]) / float(sys.argv[2]):.2f}x')" "$1" "$2"; }
for t in "${counts[@]:1}"; do
  line="speed-up $t0 -> $t threads: eval $(ratio "${eval_s[$t0]}" "${eval_s[$t]}")"
  for m in $methods; do
    line="$line, $m $(ratio "${prune_s[$m-$t0]}" "${prune_s[$m-$t]}")"
  done
  echo "$line"
done
