"""Write tests/fixtures/zeroshot_hub: the project's own zero-shot task rows (tests/fixtures/zeroshot) as the
Parquet files lm-evaluation-harness's datasets have on the Hugging Face Hub (same repo paths and schemas), laid
out as a Hugging Face cache (`datasets--ORG--NAME/snapshots/COMMIT/...` with `refs/main`).

    python scripts/reference/hub_task_fixtures.py     # needs pyarrow

tests/zeroshot.rs reads each task from both and asserts the same examples, prompts and gold answers.
"""
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "tests/fixtures/zeroshot"
OUT = ROOT / "tests/fixtures/zeroshot_hub"
COMMIT = "0000000000000000000000000000000000000001"

# task -> (dataset repo, file of the split the harness scores, local fixture file)
TASKS = {
    "boolq": ("aps/super_glue", "boolq/validation-00000-of-00001.parquet", "boolq/dev.jsonl"),
    "rte": ("aps/super_glue", "rte/validation-00000-of-00001.parquet", "rte/dev.jsonl"),
    "hellaswag": ("Rowan/hellaswag", "data/validation-00000-of-00001.parquet", "hellaswag/hellaswag_val.jsonl"),
    "winogrande": ("allenai/winogrande", "winogrande_xl/validation-00000-of-00001.parquet", "winogrande/dev.jsonl"),
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy/test-00000-of-00001.parquet", "arc_easy/test.json"),
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge/test-00000-of-00001.parquet", "arc_challenge/test.jsonl"),
    "openbookqa": ("allenai/openbookqa", "main/test-00000-of-00001.parquet", "openbookqa/test.jsonl"),
}


def rows(path: Path) -> list[dict]:
    text = path.read_text()
    return json.loads(text) if text.lstrip().startswith("[") else [json.loads(l) for l in text.splitlines() if l.strip()]


def choices_struct(c) -> dict:
    if isinstance(c, dict):
        return {"text": list(c["text"]), "label": list(c["label"])}
    return {"text": [x["text"] for x in c], "label": [x["label"] for x in c]}


def hub_row(task: str, i: int, r: dict) -> dict:
    if task == "boolq":  # super_glue: the title joined to the passage, label 1 = yes
        passage = f"{r['title']} -- {r['passage']}" if "title" in r else r["passage"]
        label = int(r["answer"]) if "answer" in r else r["label"]
        return {"question": r["question"], "passage": passage, "idx": i, "label": label}
    if task == "rte":  # super_glue: premise / hypothesis, label 0 = entailment
        label = r["label"]
        if isinstance(label, str):
            label = 0 if label == "entailment" else 1
        return {"premise": r.get("premise", r.get("sentence1")), "hypothesis": r.get("hypothesis", r.get("sentence2")),
                "idx": i, "label": label}
    if task == "hellaswag":  # label as a string, as on the hub
        return {"ind": i, "activity_label": r["activity_label"], "ctx_a": r["ctx_a"], "ctx_b": r["ctx_b"],
                "ctx": f"{r['ctx_a']} {r['ctx_b']}", "endings": r["endings"], "source_id": "x", "split": "val",
                "split_type": "indomain", "label": str(r["label"])}
    if task == "winogrande":
        return {k: r[k] for k in ("sentence", "option1", "option2", "answer")}
    if task in ("arc_easy", "arc_challenge"):
        return {"id": r["id"], "question": r["question"], "choices": choices_struct(r["choices"]), "answerKey": r["answerKey"]}
    if task == "openbookqa":  # the hub flattens AI2's nested rows
        q = r["question"] if isinstance(r.get("question"), dict) else None
        stem = q["stem"] if q else r["question_stem"]
        ch = q["choices"] if q else r["choices"]
        return {"id": r["id"], "question_stem": stem, "choices": choices_struct(ch), "answerKey": r["answerKey"]}
    raise ValueError(task)


def main() -> None:
    shutil.rmtree(OUT, ignore_errors=True)
    for task, (repo, file, local) in TASKS.items():
        repo_dir = OUT / "hub" / ("datasets--" + repo.replace("/", "--"))
        dest = repo_dir / "snapshots" / COMMIT / file
        dest.parent.mkdir(parents=True, exist_ok=True)
        (repo_dir / "refs").mkdir(exist_ok=True)
        (repo_dir / "refs" / "main").write_text(COMMIT)
        table = pa.Table.from_pylist([hub_row(task, i, r) for i, r in enumerate(rows(SRC / local))])
        # Snappy, as the hub's files mostly are; one task in zstd, which some are.
        pq.write_table(table, dest, compression="zstd" if task == "openbookqa" else "snappy")
        print(dest.relative_to(ROOT), table.num_rows)


if __name__ == "__main__":
    main()
