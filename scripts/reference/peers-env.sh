#!/usr/bin/env bash
# A separate Python environment for the authors' code (SparseGPT, Wanda), which predates transformers 4.38's
# rotary changes: transformers 4.36.2 with the current torch. Used by peers_prune.py only. Idempotent.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
venv="$root/.venv-peers"
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import torch, transformers, accelerate" 2>/dev/null; then
  echo "$venv (ready)"
  exit 0
fi
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet torch "transformers==4.36.2" accelerate safetensors "numpy<2"
"$venv/bin/python" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
