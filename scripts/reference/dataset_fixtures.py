"""Write tests/fixtures/datasets_hub: the start of the reference texts in ../shared/data as the files the named
datasets (`--dataset wikitext2|c4|ptb`, `--calib ...`) come from on the Hugging Face Hub, with the hub's
schemas and repo paths, laid out as a Hugging Face cache (`datasets--ORG--NAME/snapshots/COMMIT/...`, with
`refs/main`, or `refs/refs/convert/parquet` for PTB's Parquet conversion). Beside them, the same lines and
documents as local files (`local/`), which tests/datasets.rs tokenizes both ways and compares.

    python scripts/reference/dataset_fixtures.py     # needs pyarrow

WikiText rows follow the hub's (and the peers' reading of the raw file): a whitespace-only line is "", any
other line is the line plus "\n". PTB's `sentence` is the stripped line. C4 is JSON lines, gzipped.
"""
import gzip
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared/data"
OUT = ROOT / "tests/fixtures/datasets_hub"
COMMIT = "0000000000000000000000000000000000000002"
LINES, DOCS = 120, 40


def place(repo: str, revision: str, file: str) -> Path:
    repo_dir = OUT / "hub" / ("datasets--" + repo.replace("/", "--"))
    dest = repo_dir / "snapshots" / COMMIT / file
    dest.parent.mkdir(parents=True, exist_ok=True)
    ref = repo_dir / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(COMMIT)
    return dest


def main() -> None:
    shutil.rmtree(OUT, ignore_errors=True)
    (OUT / "local").mkdir(parents=True)
    wiki = (DATA / "wikitext-2-raw/wiki.test.raw").read_text().splitlines(keepends=True)[:LINES]
    (OUT / "local/wiki.test.raw").write_text("".join(wiki))
    rows = [{"text": "" if not l.strip() else l.rstrip("\n") + "\n"} for l in wiki]
    for split in ["test", "train"]:
        pq.write_table(pa.Table.from_pylist(rows),
                       place("Salesforce/wikitext", "main", f"wikitext-2-raw-v1/{split}-00000-of-00001.parquet"))
    ptb = (DATA / "ptb/ptb.test.txt").read_text().splitlines(keepends=True)[:LINES]
    (OUT / "local/ptb.test.txt").write_text("".join(ptb))
    for split in ["test", "train"]:
        pq.write_table(pa.Table.from_pylist([{"sentence": l.strip()} for l in ptb]),
                       place("ptb-text-only/ptb_text_only", "refs/convert/parquet", f"penn_treebank/{split}/0000.parquet"))
    c4 = (DATA / "c4/c4-train.00000-of-01024.first1000.jsonl").read_text().splitlines(keepends=True)[:DOCS]
    (OUT / "local/c4.jsonl").write_text("".join(c4))
    for file in ["en/c4-train.00000-of-01024.json.gz", "en/c4-validation.00000-of-00008.json.gz"]:
        with gzip.open(place("allenai/c4", "main", file), "wt") as f:
            f.write("".join(json.dumps(json.loads(l)) + "\n" for l in c4))
    for p in sorted(OUT.rglob("*")):
        if p.is_file():
            print(p.relative_to(ROOT), p.stat().st_size)


if __name__ == "__main__":
    main()
