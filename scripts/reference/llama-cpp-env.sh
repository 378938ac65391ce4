#!/usr/bin/env bash
# Create .venv-llama with llama-cpp-python 0.3.36 (which builds llama.cpp from source: about 40 minutes on two
# busy cores) and unpack the llama.cpp it vendors (its convert_hf_to_gguf.py and gguf-py) into
# .venv-llama/llama.cpp, for scripts/reference/gguf_out_check.sh. Idempotent; not part of CI.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
venv="$root/.venv-llama"
version=0.3.36
if ! { [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import llama_cpp, numpy" 2>/dev/null; }; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet "llama-cpp-python==$version" numpy
fi
if [ ! -f "$venv/llama.cpp/convert_hf_to_gguf.py" ]; then
  # The same source release, from PyPI: only its vendored llama.cpp.
  "$venv/bin/python" - "$venv" "$version" <<'PY'
import hashlib, io, re, sys, tarfile, urllib.request
venv, version = sys.argv[1:]
index = urllib.request.urlopen("https://pypi.org/simple/llama-cpp-python/").read().decode()
url, sha = next(iter(re.findall(rf'href="([^"#]+/llama_cpp_python-{re.escape(version)}\.tar\.gz)#sha256=([0-9a-f]+)"', index)))
data = urllib.request.urlopen(url).read()
assert hashlib.sha256(data).hexdigest() == sha, "sdist sha256 mismatch"
tar = tarfile.open(fileobj=io.BytesIO(data))
prefix = f"llama_cpp_python-{version}/vendor/"
members = [m for m in tar.getmembers() if m.name.startswith(prefix + "llama.cpp/")]
for m in members:
    m.name = m.name[len(prefix):]
tar.extractall(venv, members=members)
PY
fi
"$venv/bin/python" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"
