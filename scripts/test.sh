#!/usr/bin/env bash
# The test command (README, CI): fetch the demo model, set up the Python reference stack, run every test.
# FISTAPRUNE_REQUIRE_PYTHON=1 makes the transformers cross-checks fail instead of skipping without Python.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
[ -d ../shared/data ] || { echo "error: ../shared/data (the reference text) must sit beside the checkout" >&2; exit 1; }
scripts/fetch-assets.sh
scripts/python-env.sh
export FISTAPRUNE_PYTHON="$root/.venv/bin/python"
export FISTAPRUNE_REQUIRE_PYTHON="${FISTAPRUNE_REQUIRE_PYTHON:-1}"
cargo test --release --all-targets "$@"
