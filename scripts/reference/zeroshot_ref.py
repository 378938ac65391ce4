"""Reference zero-shot scores from lm-evaluation-harness for the project's own small task files.

    .venv/bin/python scripts/reference/zeroshot_ref.py MODEL_DIR TASKS_DIR OUT.json

Builds each example's (context, continuation) pairs with the harness's own helpers where it has them as
functions (HellaSwag's `preprocess`, WinoGrande's `doc_to_choice` / `doc_to_target`) and its YAML templates
otherwise (BoolQ, RTE, ARC, OpenBookQA, written out below), scores them with the harness's `HFLM.loglikelihood`
(float32, CPU), and writes every choice's strings and log-likelihood plus acc / acc_norm per task, for
tests/zeroshot.rs to compare with `fistaprune`'s scorer.
"""
import json
import sys

import numpy as np
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks.hellaswag.utils import preprocess as hellaswag_preprocess
from lm_eval.tasks.winogrande import preprocess_winogrande as wg


def rows(path):
    text = open(path).read()
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(l) for l in text.splitlines() if l.strip()]


def mc(context, texts, gold):
    return [(context, " " + t, len(t)) for t in texts], gold


def boolq(d):
    passage = f"{d['title']} -- {d['passage']}" if "title" in d else d["passage"]
    gold = int(d["answer"]) if "answer" in d else int(d["label"])
    return mc(f"{passage}\nQuestion: {d['question']}?\nAnswer:", ["no", "yes"], gold)


def rte(d):
    s1, s2 = (d["sentence1"], d["sentence2"]) if "sentence1" in d else (d["premise"], d["hypothesis"])
    label = d["label"]
    entail = label in (0, "0", "entailment")
    return mc(f"{s1}\nQuestion: {s2} True or False?\nAnswer:", ["True", "False"], 0 if entail else 1)


def hellaswag(d):
    ctx = d["ctx_a"] + " " + d["ctx_b"].capitalize()
    query = hellaswag_preprocess(d["activity_label"] + ": " + ctx)
    return mc(query, [hellaswag_preprocess(e) for e in d["endings"]], int(d["label"]))


def winogrande(d):
    target = " " + wg.doc_to_target(d)
    return [(c, target, len(target) - 1) for c in wg.doc_to_choice(d)], wg.doc_to_text(d)


def arc(d):
    return mc(f"Question: {d['question']}\nAnswer:", d["choices"]["text"], d["choices"]["label"].index(d["answerKey"]))


def openbookqa(d):
    if "question_stem" in d:
        stem, texts, labels = d["question_stem"], d["choices"]["text"], d["choices"]["label"]
    else:
        stem = d["question"]["stem"]
        texts = [c["text"] for c in d["question"]["choices"]]
        labels = [c["label"] for c in d["question"]["choices"]]
    return mc(stem, texts, labels.index(d["answerKey"]))


TASKS = {
    "boolq": ("boolq/dev.jsonl", boolq),
    "rte": ("rte/dev.jsonl", rte),
    "hellaswag": ("hellaswag/hellaswag_val.jsonl", hellaswag),
    "winogrande": ("winogrande/dev.jsonl", winogrande),
    "arc_easy": ("arc_easy/test.json", arc),
    "arc_challenge": ("arc_challenge/test.jsonl", arc),
    "openbookqa": ("openbookqa/test.jsonl", openbookqa),
}


def main():
    model_dir, tasks_dir, out = sys.argv[1:]
    lm = HFLM(pretrained=model_dir, device="cpu", dtype="float32", batch_size=1)
    result = {"how": "scripts/reference/zeroshot_ref.py " + " ".join(sys.argv[1:]), "lm_eval_max_length": lm.max_length, "tasks": {}}
    for task, (rel, build) in TASKS.items():
        examples = [build(d) for d in rows(f"{tasks_dir}/{rel}")]
        reqs = [
            Instance(request_type="loglikelihood", doc={}, arguments=(c, t), idx=j)
            for choices, _ in examples
            for j, (c, t, _) in enumerate(choices)
        ]
        lls = [ll for ll, _ in lm.loglikelihood(reqs, disable_tqdm=True)]
        out_ex, acc, norm, k = [], 0, 0, 0
        for choices, gold in examples:
            ll = np.array(lls[k : k + len(choices)])
            k += len(choices)
            lens = np.array([float(n) for _, _, n in choices])
            acc += int(np.argmax(ll) == gold)
            norm += int(np.argmax(ll / lens) == gold)
            out_ex.append({"gold": gold, "choices": [{"context": c, "continuation": t, "norm_len": n, "loglikelihood": float(x)} for (c, t, n), x in zip(choices, ll)]})
        result["tasks"][task] = {"file": rel, "acc": acc / len(examples), "acc_norm": norm / len(examples), "examples": out_ex}
        print(task, result["tasks"][task]["acc"], result["tasks"][task]["acc_norm"])
    with open(out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
