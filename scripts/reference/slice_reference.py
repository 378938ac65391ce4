#!/usr/bin/env python3
"""Write tests/reference/peers_slice.json from a compare_peers.sh run on the small slice:

    scripts/reference/compare_peers.sh SPARSEGPT WANDA target/compare-slice 8 16 256
    python3 scripts/reference/slice_reference.py target/compare-slice > tests/reference/peers_slice.json
"""
import json, sys

d = sys.argv[1]
calib = json.load(open(f"{d}/calib_16x256.json"))
runs = {}
for m in ["magnitude", "wanda", "sparsegpt"]:
    for p, flags in [("0.5", ["--sparsity", "0.5"]), ("2_4", ["--pattern", "2:4"])]:
        tag = f"{m}-{p}"
        ours, theirs = json.load(open(f"{d}/ours-{tag}.json")), json.load(open(f"{d}/peers-{tag}.json"))
        ag = theirs.get("against") or {}
        ties = ag.get("groups_differing_not_by_ties") == 0 and ag.get("mask_positions_differing", 0) > 0
        runs[tag] = {"flags": ["--method", m] + flags, "authors": theirs["perplexity"], "fistaprune": ours["perplexity"],
                     "ties_only": ties, "mask_positions_differing": ag.get("mask_positions_differing"),
                     "authors_eval_of_fistaprune_weights": ag.get("perplexity_of_fistaprune_weights")}
print(json.dumps({
    "how": "scripts/reference/compare_peers.sh SPARSEGPT WANDA target/compare-slice 8 16 256, then "
           "scripts/reference/slice_reference.py: IST-DASLab/sparsegpt and locuslab/wanda as published, run by "
           "scripts/reference/peers_prune.py with transformers 4.36.2 / torch " + theirs["torch"] + " in f32 on the "
           "converted SmolLM2-135M-Instruct, the same calibration ids; perplexity on our WikiText-2 ids",
    "calibration": {"source": "c4/c4-train.00000-of-01024.first1000.jsonl", "nsamples": calib["nsamples"],
                    "seqlen": calib["seqlen"], "seed": calib["seed"], "sha256": calib["sha256"]},
    "eval": {"dataset": "wikitext-2-raw/wiki.test.raw", "windows": 8, "seqlen": 512},
    "dense": json.load(open(f"{d}/dense.json"))["perplexity"],
    "runs": runs,
}, indent=2))
