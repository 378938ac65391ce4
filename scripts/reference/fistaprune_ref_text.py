"""The evaluation strings the peers tokenize (see ../shared/data/README.md), written independently of the Rust code."""
import json


def eval_text(path, fmt):
    raw = open(path, encoding="utf-8").read()
    if fmt == "wikitext":
        lines = raw.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        return "\n\n".join("" if not line.strip() else line + "\n" for line in lines)
    if fmt == "c4":
        return " ".join(json.loads(l)["text"] for l in raw.splitlines() if l.strip())
    if fmt == "ptb":
        return " ".join(l.strip() for l in raw.rstrip("\n").split("\n"))
    return raw
