#!/usr/bin/env bash
# Create .venv with the Python reference stack (torch, transformers, gguf, safetensors, accelerate), used by
# the tests that check our output in transformers and by the scripts in scripts/reference/. Idempotent.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/.venv"
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import torch, transformers, gguf, safetensors, accelerate" 2>/dev/null; then
  echo "$venv (ready)"
  exit 0
fi
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --upgrade pip
"$venv/bin/pip" install --quiet torch transformers gguf safetensors accelerate numpy
"$venv/bin/python" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
