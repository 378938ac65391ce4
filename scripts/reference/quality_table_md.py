#!/usr/bin/env python3
"""The Markdown table of a quality_table.sh folder: perplexity of every method at every pattern on WikiText-2
and PTB (a dash where a run is missing), FISTAPruner against SparseGPT, then each run's user CPU time and peak
RSS from its /usr/bin/time output.

    python3 scripts/reference/quality_table_md.py target/gemma-table
"""
import json, os, re, sys

d = sys.argv[1]
PATTERNS = [("50 %", "50"), ("60 %", "60"), ("70 %", "70"), ("2:4", "2_4"), ("4:8", "4_8")]
METHODS = ["magnitude", "wanda", "sparsegpt", "fista"]


def ppl(tag, ptb=False):
    f = f"{d}/{tag}{'.ptb' if ptb else ''}.json"
    return json.load(open(f))["perplexity"] if os.path.exists(f) else None


def fmt(x):
    return "–" if x is None else f"{x:,.3f}" if x < 1e4 else f"{x:.3g}"


print("| pattern | text | magnitude | Wanda | SparseGPT | FISTAPruner | FISTAPruner vs SparseGPT |")
print("|---|---|---|---|---|---|---|")
print(f"| dense | WikiText-2 / PTB | {fmt(ppl('dense'))} / {fmt(ppl('dense', True))} | | | | |")
for name, p in PATTERNS:
    for text, ptb in [("WikiText-2", False), ("PTB", True)]:
        v = [ppl(f"{m}-{p}", ptb) for m in METHODS]
        if all(x is None for x in v):
            continue
        rel = f"{v[3] / v[2] - 1:+.1%}" if v[3] and v[2] else "–"
        print(f"| {name} | {text} | " + " | ".join(fmt(x) for x in v) + f" | {rel} |")
print()
print("| run | user CPU s | peak RSS MiB |")
print("|---|---|---|")
for f in sorted(os.listdir(d)):
    if f.endswith(".time"):
        t = open(f"{d}/{f}").read()
        u = re.search(r"User time \(seconds\): ([\d.]+)", t)
        r = re.search(r"Maximum resident set size \(kbytes\): (\d+)", t)
        if u and r:
            print(f"| {f[:-5]} | {float(u.group(1)):.0f} | {int(r.group(1)) // 1024} |")
