#!/usr/bin/env bash
# Why this exists: the GPU machine (H100/H200, CUDA 13.0 driver) has no Rust, and the development machines have
# no GPU or CUDA toolkit. This builds the `cuda` feature here (toolkit from PyPI wheels via scripts/cuda-env.sh),
# in its own target folder (target/cuda, so the default CUDA-free build in target/ is never disturbed), and
# leaves a stripped binary in .gpu/fistaprune to carry over (at most 64 MiB can be carried; we fail above 60).
# On the GPU machine run it with LD_LIBRARY_PATH=/usr/local/nvidia/lib64:<venv>/.../nvidia/cu13/lib (the real
# driver and the CUDA 13 libraries); the libcuda link stub from cuda-env.sh never goes there.
# Settings (environment): JOBS (cargo -j, default 2); the CUDA ones (CUDAFORGE_THREADS, the parallel nvcc runs
# of candle's kernels, among them) are in scripts/cuda-env.sh.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
# shellcheck source=scripts/cuda-env.sh
source "$root/scripts/cuda-env.sh"

jobs="${JOBS:-2}"
export CARGO_TARGET_DIR="$root/target/cuda"

# candle-kernels' build script reruns only when its sources change, not when the nvcc settings do: if they
# changed since the last build in this target folder, clean it so that its kernels are compiled again.
stamp="$CARGO_TARGET_DIR/.nvcc-settings"
settings="CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP NVCC_APPEND_FLAGS=${NVCC_APPEND_FLAGS:-} $(nvcc --version | tail -n 1)"
if [ -d "$CARGO_TARGET_DIR/release" ] && [ "$(cat "$stamp" 2>/dev/null || true)" != "$settings" ]; then
  echo "build-cuda: nvcc settings changed; cleaning candle-kernels in $CARGO_TARGET_DIR"
  cargo clean --release -p candle-kernels
fi

start=$(date +%s)
cargo build --release --features cuda -j "$jobs"
end=$(date +%s)
echo "build-cuda: cargo build took $((end - start)) s"
mkdir -p "$CARGO_TARGET_DIR"
echo "$settings" >"$stamp"

mkdir -p "$root/.gpu"
exclude="$(git -C "$root" rev-parse --git-path info/exclude 2>/dev/null || echo "$root/.git/info/exclude")"
case "$exclude" in /*) ;; *) exclude="$root/$exclude" ;; esac
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.gpu/' "$exclude" 2>/dev/null || echo '/.gpu/' >>"$exclude"

out="$root/.gpu/fistaprune"
cp "$CARGO_TARGET_DIR/release/fistaprune" "$out.tmp"
strip "$out.tmp"
mv "$out.tmp" "$out"
size=$(stat -c %s "$out")
limit=$((60 * 1024 * 1024))
echo "build-cuda: $out: $size bytes ($(awk -v s="$size" 'BEGIN { printf "%.1f", s / 1048576 }') MiB, limit 60 MiB)"
if [ "$size" -gt "$limit" ]; then
  echo "build-cuda: the stripped binary is over 60 MiB" >&2
  exit 1
fi
echo "build-cuda: NEEDED: $(readelf -d "$out" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | tr '\n' ' ')"
echo "build-cuda: ldd $out (libcuda.so.1 and the CUDA 13 libraries are not on this machine's loader path; that is expected):"
ldd "$out" || true
echo "build-cuda: ldd with only the wheel's CUDA libraries on LD_LIBRARY_PATH (as on the GPU machine, minus the driver):"
LD_LIBRARY_PATH="$CUDA_CU13/lib" ldd "$out" || true
