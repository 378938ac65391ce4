#!/usr/bin/env python3
"""Run the authors' own pruning code on a Hugging Face checkpoint with fistaprune's calibration token ids,
then measure WikiText-2 perplexity on fistaprune's token ids: the reference for `fistaprune prune`.

    python scripts/reference/peers_prune.py --method sparsegpt|wanda|magnitude (--sparsity 0.5 | --pattern 2:4) \
        --model HF_DIR --calib calib.json --eval-ids wt2_ids.json [--seqlen 512] [--max-windows K] \
        --sparsegpt-repo PATH --wanda-repo PATH [--device cpu|cuda] [--json out.json]

- SparseGPT: `llama_sequential` from IST-DASLab/sparsegpt's `llama.py` (its `SparseGPT.fasterprune`).
- Wanda and magnitude: `prune_wanda` / `prune_magnitude` from locuslab/wanda's `lib/prune.py`.

The repositories are checkouts made on this machine (they are read and imported from where they are, never
copied into this project). Their code targets a GPU and older transformers: run LLaMA with transformers 4.36
(`scripts/reference/peers-env.sh`). The only changes are to the environment, not to their code: CUDA-only
calls become no-ops on CPU, their data loaders are replaced by our calibration ids, and the model is loaded in
f32 (as fistaprune computes) with `seqlen` set to the calibration length. With `--device cuda` (issue 14's
speed comparison on the GPU machine, scripts/gpu-check.sh) their code runs as published on the GPU: SparseGPT
moves one layer at a time there as its `llama.py` does, and Wanda gets the whole model there as its `main.py`
does (`device_map="auto"` on one GPU), and the JSON adds the peak GPU memory.

Architectures newer than their code (Gemma 3, which needs transformers >= 4.50: use `.venv`) compute the rotary
embeddings, and Gemma 3 one attention mask per layer type, once in the model and pass them to each decoder
layer; the authors' loops call a layer with `attention_mask` (and `position_ids`) only. For those the harness
records what the model passes each layer on one calibration window (the same for every window of that length)
and has the layer use it whatever their loop passes (`Replay`); their pruning code runs unchanged.
"""
import argparse, inspect, json, math, sys, time
from types import SimpleNamespace

import torch
import torch.nn.functional as F


def load_ids(path):
    return json.load(open(path))["ids"]


def ppl(model, ids, seqlen, max_windows=None):
    n = len(ids) // seqlen
    if max_windows:
        n = min(n, max_windows)
    nll = 0.0
    with torch.inference_mode():
        for w in range(n):
            x = torch.tensor(ids[w * seqlen:(w + 1) * seqlen]).unsqueeze(0)
            logits = model(x).logits[0].float()
            nll += F.cross_entropy(logits[:-1], x[0, 1:], reduction="sum").double().item()
    return math.exp(nll / (n * (seqlen - 1))), n


class Replay(torch.nn.Module):
    """A decoder layer called with the arguments the model itself passed it (see the module's docstring)."""

    def __init__(self, layer, kwargs):
        super().__init__()
        self.layer, self.kwargs = layer, kwargs
        self.on = {}  # the recorded arguments, per device

    def forward(self, hidden_states, *args, **kwargs):
        d = hidden_states.device
        if d not in self.on:
            self.on[d] = to_device(self.kwargs, d)
        return self.layer(hidden_states, **self.on[d])


def to_device(x, d):
    """`x` with every tensor in it (in tuples, lists and dicts too) on device `d`."""
    if torch.is_tensor(x):
        return x.to(d)
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(v, d) for v in x)
    if isinstance(x, dict):
        return {k: to_device(v, d) for k, v in x.items()}
    return x


def replay_layers(model, window):
    """Wrap every decoder layer in `Replay` when the layers take model-level position embeddings; returns a
    function that unwraps them. A no-op for the transformers the authors wrote against."""
    layers = model.model.layers
    if "position_embeddings" not in inspect.signature(type(layers[0]).forward).parameters:
        return lambda: None
    seen = {}

    def record(i):
        def hook(_, args, kwargs):
            seen[i] = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values", "use_cache")}
        return hook

    hooks = [l.register_forward_pre_hook(record(i), with_kwargs=True) for i, l in enumerate(layers)]
    with torch.no_grad():
        model(torch.tensor(window, device=model.device).unsqueeze(0))
    for h in hooks:
        h.remove()
    for i in range(len(layers)):
        layers[i] = Replay(layers[i], seen[i])

    def unwrap():
        for i in range(len(layers)):
            layers[i] = layers[i].layer
    return unwrap


def sparsity(model):
    z = t = 0
    for layer in model.model.layers:
        for name, m in layer.named_modules():
            if isinstance(m, torch.nn.Linear):
                z += (m.weight == 0).sum().item()
                t += m.weight.numel()
    return z / t


def against(theirs, dense, ours_dir, a, m):
    """Where the authors' masks and fistaprune's differ, and whether every difference is a tie: in each row
    (each group of `m` for N:M) both masks prune the same multiset of scores, |W| for magnitude. Then
    fistaprune's pruned weights, evaluated here."""
    import glob
    from safetensors.torch import load_file
    ours = {}
    for f in sorted(glob.glob(f"{ours_dir}/*.safetensors")):
        ours.update(load_file(f))
    differ = total = untied = 0
    for i, (lt, ld) in enumerate(zip(theirs.model.layers, dense.model.layers)):
        mods_d = dict(ld.named_modules())
        for name, mt in lt.named_modules():
            if not isinstance(mt, torch.nn.Linear):
                continue
            w = mods_d[name].weight.data
            mo = ours[f"model.layers.{i}.{name}.weight"] == 0
            mt_ = mt.weight.data == 0
            differ += (mo != mt_).sum().item()
            total += mo.numel()
            if a.method == "magnitude":
                g = w.abs().reshape(w.shape[0], -1, m) if m else w.abs().unsqueeze(1)
                so = (g * mo.reshape(g.shape)).sum(-1)
                st = (g * mt_.reshape(g.shape)).sum(-1)
                untied += (so != st).sum().item()
            mods_d[name].weight.data = ours[f"model.layers.{i}.{name}.weight"].float()
    p, _ = ppl(dense, load_ids(a.eval_ids), a.seqlen, a.max_windows)
    return {"mask_positions_differing": differ, "mask_positions": total,
            "groups_differing_not_by_ties": untied if a.method == "magnitude" else None,
            "perplexity_of_fistaprune_weights": p}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", required=True, choices=["sparsegpt", "wanda", "magnitude"])
    ap.add_argument("--sparsity", type=float)
    ap.add_argument("--pattern")
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--eval-ids", help="WikiText-2 token ids to evaluate the pruned model on (none: no evaluation)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--seqlen", type=int, default=512, help="evaluation window")
    ap.add_argument("--max-windows", type=int)
    ap.add_argument("--sparsegpt-repo")
    ap.add_argument("--wanda-repo")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--json")
    ap.add_argument("--against", help="fistaprune's pruned checkpoint of the same run: compare the masks, and "
                    "evaluate fistaprune's weights with this script's evaluation")
    ap.add_argument("--factor-f64", action="store_true", help="diagnostic, not the comparison: their SparseGPT's "
                    "Cholesky factorisations and inverse computed in f64 (as fistaprune does), cast back to f32")
    a = ap.parse_args()
    if a.factor_f64:
        chol, inv = torch.linalg.cholesky, torch.cholesky_inverse
        torch.linalg.cholesky = lambda h, *args, **kw: chol(h.double(), *args, **kw).to(h.dtype)
        torch.cholesky_inverse = lambda l, *args, **kw: inv(l.double(), *args, **kw).to(l.dtype)
    if a.threads:
        torch.set_num_threads(a.threads)
    prune_n, prune_m = 0, 0
    sp = a.sparsity
    if a.pattern:
        prune_n, prune_m = map(int, a.pattern.split(":"))
        sp = prune_n / prune_m

    if a.against and not a.eval_ids:
        ap.error("--against needs --eval-ids")
    if a.device == "cpu":
        # GPU-only calls of the peers' code, made harmless on CPU.
        torch.cuda.synchronize = lambda *args, **kw: None
        torch.cuda.empty_cache = lambda *args, **kw: None
        torch.Tensor.cuda = lambda self, *args, **kw: self
    else:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False

    import transformers
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(a.model, torch_dtype=torch.float32)
    model.eval()
    calib = json.load(open(a.calib))
    ids = calib["ids"]
    model.seqlen = calib["seqlen"]
    loader = [(torch.tensor(s).unsqueeze(0), None) for s in ids]
    dev = torch.device(a.device)
    if a.device == "cuda" and a.method != "sparsegpt":
        model.to(dev)

    unwrap = replay_layers(model, ids[0])
    if a.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    if a.method == "sparsegpt":
        sys.path.insert(0, a.sparsegpt_repo)
        import llama as sg_llama  # IST-DASLab/sparsegpt llama.py
        sg_llama.args = SimpleNamespace(
            nsamples=len(ids), sparsity=sp, prunen=prune_n, prunem=prune_m, percdamp=0.01, blocksize=128,
            minlayer=-1, maxlayer=1000, prune_only="", invert=False, true_sequential=False, wbits=16,
            gmp=False, log_wandb=False)
        with torch.no_grad():
            sg_llama.llama_sequential(model, loader, dev)
    else:
        sys.path.insert(0, a.wanda_repo)
        # lib/data.py imports Hugging Face `datasets` for its loaders, which we replace anyway.
        import types
        sys.modules.setdefault("datasets", types.SimpleNamespace(load_dataset=None))
        import lib.prune as wp  # locuslab/wanda lib/prune.py
        wp.get_loaders = lambda *args, **kw: (loader, None)
        model.hf_device_map = {}
        args = SimpleNamespace(nsamples=len(ids), seed=calib["seed"], sparsity_ratio=sp, use_variant=False)
        if a.method == "wanda":
            wp.prune_wanda(args, model, None, dev, prune_n=prune_n, prune_m=prune_m)
        else:
            wp.prune_magnitude(args, model, None, dev, prune_n=prune_n, prune_m=prune_m)
    if a.device == "cuda":
        torch.cuda.synchronize()
    secs = time.time() - t0
    unwrap()
    model.to("cpu")
    p, n = ppl(model, load_ids(a.eval_ids), a.seqlen, a.max_windows) if a.eval_ids else (None, 0)
    out = {"method": a.method, "sparsity_target": sp, "pattern": a.pattern, "sparsity": sparsity(model),
           "prune_seconds": secs, "perplexity": p, "windows": n, "seqlen": a.seqlen, "device": a.device,
           "peak_gpu_bytes": torch.cuda.max_memory_allocated() if a.device == "cuda" else None,
           "calibration_sha256": calib.get("sha256"), "torch": torch.__version__,
           "transformers": transformers.__version__, "threads": torch.get_num_threads()}
    if a.against:
        out["against"] = against(model, AutoModelForCausalLM.from_pretrained(a.model, torch_dtype=torch.float32),
                                 a.against, a, prune_m)
    print(json.dumps(out, indent=2))
    if a.json:
        json.dump(out, open(a.json, "w"), indent=2)


if __name__ == "__main__":
    main()
