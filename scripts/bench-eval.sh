#!/usr/bin/env bash
# Benchmark of `fistaprune eval` on the demo model against PyTorch's CPU forward on the same windows.
#
#   scripts/bench-eval.sh [WINDOWS=40] [SEQLEN=512]
#
# Prints tokens/s for both, the ratio, fistaprune's peak resident memory (/usr/bin/time), its GFLOP/s from the
# FLOP count of the configuration, and the machine's GEMM rate (examples/gemm.rs) for the roofline fraction.
# MODEL=gemma3 runs Gemma-3-270M (its GEMM rate on its MLP shape; its 262,144 x 640 head is in the FLOP count).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
windows="${1:-40}"
seqlen="${2:-512}"
scripts/python-env.sh >/dev/null
cargo build --release --quiet --bin fistaprune --example gemm
case "${MODEL:-smollm2}" in
  smollm2) model="$(scripts/fetch-assets.sh --path smollm2)"; shapes="512x576x576 512x576x1536 512x1536x576 512x576x49152" ;;
  gemma3) model="$(scripts/fetch-assets.sh --path gemma3)"; shapes="512x640x1024 512x640x2048 512x2048x640 512x640x262144" ;;
  *) echo "MODEL must be smollm2 or gemma3" >&2; exit 2 ;;
esac
data=../shared/data/wikitext-2-raw/wiki.test.raw
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "== GEMM rate (faer, f32, all cores)"
./target/release/examples/gemm $shapes | tee "$tmp/gemm.txt"
echo "== fistaprune eval: $windows windows x $seqlen tokens"
/usr/bin/time -v ./target/release/fistaprune eval --model "$model" --dataset "$data" --seqlen "$seqlen" \
  --max-windows "$windows" --quiet --json "$tmp/ours.json" 2> "$tmp/time.txt"
./target/release/fistaprune tokenize --model "$model" --dataset "$data" --out "$tmp/ids.json" >/dev/null
echo "== PyTorch (transformers) forward on the same windows"
.venv/bin/python scripts/reference/gguf_ppl.py --gguf "$model" --ids "$tmp/ids.json" --seqlen "$seqlen" \
  --max-windows "$windows" --json "$tmp/torch.json" >/dev/null 2>&1
python3 - "$tmp" "${shapes#* }" <<'PY'
import json, re, sys
d, shape = sys.argv[1], sys.argv[2].split()[0]
ours, torch = json.load(open(f"{d}/ours.json")), json.load(open(f"{d}/torch.json"))
rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", open(f"{d}/time.txt").read()).group(1))
gemm = [float(x) for line in open(f"{d}/gemm.txt") if line.split()[:1] == [shape] for x in line.split()[2:3]]
print(f"perplexity        fistaprune {ours['perplexity']:.4f}   PyTorch {torch['perplexity']:.4f}")
print(f"tokens/s          fistaprune {ours['tokens_per_second']:.0f}   PyTorch {torch['tokens_per_second']:.0f}   ratio {ours['tokens_per_second'] / torch['tokens_per_second']:.2f}x")
print(f"fistaprune        {ours['gflop_per_second']:.1f} GFLOP/s ({ours['seconds']:.1f} s, incl. materialising the layers)")
if gemm:
    print(f"GEMM rate         {gemm[0]:.1f} GFLOP/s ({shape}) -> {100 * ours['gflop_per_second'] / gemm[0]:.0f}% of the roofline")
print(f"peak RSS          {rss / 1024:.0f} MiB")
PY
