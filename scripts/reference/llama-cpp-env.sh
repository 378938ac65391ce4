#!/usr/bin/env bash
# Create .venv-llama with llama-cpp-python (which builds llama.cpp from source: about 15 minutes on two cores)
# for scripts/reference/llama_cpp_ppl.py and scripts/reference/gguf_out_check.sh. Idempotent; not part of CI.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
venv="$root/.venv-llama"
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import llama_cpp, numpy" 2>/dev/null; then
  echo "$venv (ready)"
  exit 0
fi
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet llama-cpp-python==0.3.36 numpy
"$venv/bin/python" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"
