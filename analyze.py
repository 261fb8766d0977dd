"""Where are features reused? Run the paper's analyses on a finished run directory.

    python analyze.py --run runs/deit_s-aptos-n5-s0 --metric cka
    python analyze.py --run runs/deit_s-aptos-n14-s0 --ref runs/deit_s-aptos-n0-s0 --metric cka
    python analyze.py --run runs/x --metric all

Writes runs/x/analysis/<metric>.json (schema in the README) and prints a short table.
All analyses that look at the test set share one pass over it: each batch goes once through
the initial, the fine-tuned (and the --ref) model, with every feature layer tapped by a
forward hook that turns its activation into centred Grams (CKA), pooled features (k-NN) and
attention distances right away, then frees it.
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm as progress_bar

import data
import metrics
import models

METRICS = ["cka", "knn", "reinit", "l2", "attention", "convergence"]


# ----------------------------------------------------------------------------- runs
def load_run(run):
    """config.json and summary.json of a run directory, with clear errors."""
    path = os.path.join(run, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--run {run}: no config.json (expected a run directory written by train.py)")
    with open(path) as f:
        doc = json.load(f)
    cfg = dict(doc["config"], num_classes=doc["data"]["num_classes"])
    summary = None
    if os.path.isfile(os.path.join(run, "summary.json")):
        with open(os.path.join(run, "summary.json")) as f:
            summary = json.load(f)
    return cfg, summary


def load_model(run, cfg, num_classes, which, device):
    """The run's model with the weights of init.pt or best.pt, in eval mode."""
    path = os.path.join(run, f"{which}.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing (expected a finished run with init.pt and best.pt)")
    model = models.create_model(cfg["model"], num_classes=num_classes, img_size=cfg["img_size"])
    model.load_state_dict(models.read_checkpoint(path)["model"])
    return model.to(device).eval()


# ----------------------------------------------------------------------------- feature views
def is_vit(model):
    return model.model_name.startswith("deit")


def token_views(model, out):
    """A feature layer's output as {feature type: (n, tokens, d) or (n, d...)} tensors.
    DeiT: 'cls' (token 0), 'patches' (the rest), 'all'; its patch conv has no CLS token,
    so all three types use its patch tokens there. Other models: 'all' only."""
    if not is_vit(model):
        return {"all": out}
    if out.ndim == 4:  # patch conv [B, D, h, w] -> patch tokens
        tokens = out.flatten(2).transpose(1, 2)
        return {"cls": tokens, "patches": tokens, "all": tokens}
    p = model.num_prefix_tokens
    return {"cls": out[:, :p], "patches": out[:, p:], "all": out}


def pooled_views(model, out):
    """k-NN features: CNN global average pool; Swin mean over positions; DeiT CLS, mean of
    patch tokens, and their concatenation."""
    name = model.model_name
    if name.startswith(("resnet", "inception")):
        return {"all": out.mean((2, 3))}
    if name.startswith("swin"):
        return {"all": out.mean((1, 2))}
    if out.ndim == 4:
        mean = out.mean((2, 3))
        return {"cls": mean, "patches": mean, "all": mean}
    cls, patches = out[:, 0], out[:, model.num_prefix_tokens:].mean(1)
    return {"cls": cls, "patches": patches, "all": torch.cat([cls, patches], 1)}


def feature_types(model):
    return ["cls", "patches", "all"] if is_vit(model) else ["all"]


class Taps:
    """Forward hooks on every feature layer of a model. For each batch, `grams[type][i]`
    holds layer i's centred Gram (float64), `pooled[type][i]` its pooled features and
    `attn[i]` its summed attention distance per head; activations are not kept."""

    def __init__(self, model, want_grams=False, want_pooled=False, want_attn=False, debiased=True):
        self.model, self.debiased = model, debiased
        self.want = (want_grams, want_pooled, want_attn)
        self.layers = model.feature_layers()
        modules = dict(model.named_modules())
        self.handles = [modules[n].register_forward_hook(self._hook(i)) for i, n in enumerate(self.layers)]
        self.reset()

    def reset(self):
        self.grams, self.pooled, self.attn = {}, {}, {}

    def _hook(self, i):
        def hook(module, inputs, out):
            want_grams, want_pooled, want_attn = self.want
            if want_grams:
                for t, v in token_views(self.model, out).items():
                    self.grams.setdefault(t, {})[i] = metrics.centered_gram(v.flatten(1), debiased=self.debiased)
            if want_pooled:
                for t, v in pooled_views(self.model, out).items():
                    self.pooled.setdefault(t, {})[i] = v.float().cpu()
            probs = getattr(module, "attn_probs", None)
            if want_attn and probs is not None:
                m = self.model
                self.attn[i] = metrics.attention_distance_sum(probs, m.grid_size, m.patch_size, m.num_prefix_tokens)
                module.attn_probs = None  # free it now
        return hook

    def gram_list(self, t):
        return [self.grams[t][i] for i in range(len(self.layers))]

    def remove(self):
        for h in self.handles:
            h.remove()


def loader(ds, args, device):
    return DataLoader(ds, batch_size=args.batch_size, shuffle=False, num_workers=args.workers,
                      pin_memory=device.type == "cuda")


# ----------------------------------------------------------------------------- passes
@torch.no_grad()
def test_pass(run_models, test_ds, info, args, device, todo):
    """One pass over the test set. run_models: {"final": m, "init": m, "ref": m}. Returns
    CKA accumulators, query features for k-NN, attention sums, and the labels."""
    final = run_models["final"]
    types = feature_types(final)
    taps = {k: Taps(m, want_grams="cka" in todo, debiased=not args.biased,
                    want_pooled=(k == "final" and "knn" in todo),
                    want_attn=(k == "final" and "attention" in todo))
            for k, m in run_models.items()}
    if "attention" in todo:
        final.record_attention(True)
    L = len(final.feature_layers())
    acc = {}
    for other in [k for k in run_models if k != "final"]:
        Lo = len(run_models[other].feature_layers())
        other_types = feature_types(run_models[other])
        for t in types:
            t_other = t if t in other_types else "all"
            acc[(other, t, t_other)] = metrics.CKAAccumulator(L, Lo, debiased=not args.biased, mode=args.cka_mode)
    queries = {t: [[] for _ in range(L)] for t in types}
    attn_sum, n_images, labels = None, 0, []
    for x, y in tqdm(loader(test_ds, args, device), "test pass"):
        x = x.to(device, non_blocking=True)
        for k, m in run_models.items():
            taps[k].reset()
            m(x)
        for (other, t, t_other), a in acc.items():
            a.update(taps["final"].gram_list(t), taps[other].gram_list(t_other))
        if "knn" in todo:
            for t in types:
                for i in range(L):
                    queries[t][i].append(taps["final"].pooled[t][i].half())  # as the bank: bounded memory
        if "attention" in todo:
            sums = torch.stack([taps["final"].attn[i] for i in sorted(taps["final"].attn)])
            attn_sum = sums if attn_sum is None else attn_sum + sums
        n_images += x.shape[0]
        labels.append(y)
    for t in taps.values():
        t.remove()
    if "attention" in todo:
        final.record_attention(False)
    queries = {t: [torch.cat(q) for q in qs] for t, qs in queries.items()} if "knn" in todo else None
    attn = (attn_sum / n_images) if attn_sum is not None else None
    return acc, queries, attn, torch.cat(labels).numpy()


@torch.no_grad()
def bank_pass(model, bank_ds, args, device):
    """Pooled features of every feature layer over the k-NN bank (training split, eval
    transforms), kept as float16 on the CPU: {type: [tensor (n, d) per layer]}."""
    taps = Taps(model, want_pooled=True)
    feats = {t: [[] for _ in taps.layers] for t in feature_types(model)}
    for x, _ in tqdm(loader(bank_ds, args, device), "k-NN bank"):
        taps.reset()
        model(x.to(device, non_blocking=True))
        for t in feats:
            for i in range(len(taps.layers)):
                feats[t][i].append(taps.pooled[t][i].half())
    taps.remove()
    return {t: [torch.cat(f) for f in fs] for t, fs in feats.items()}


def layer_entries(model, layer):
    """State-dict names of the parameters and buffers of one analysis layer."""
    return [k for k in model.state_dict() if k.startswith(layer + ".")]


def forward_stages(model):
    """The model's forward as a chain: [(module names, fn)] and a head fn, such that
    head(fn_k(...fn_1(x))) == model(x). Lets re-initialisation re-run only the stages
    from the reverted layer on (the prefix before it is unchanged)."""
    name = model.model_name
    if name.startswith("deit"):
        def embed(x):
            x = model.patch_embed(x)
            return torch.cat([model.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + model.pos_embed
        stages = [("patch_embed", embed)] + [(f"blocks.{i}", b) for i, b in enumerate(model.blocks)]
        return stages, lambda x: model.head(model.norm(x)[:, 0])
    if name.startswith("swin"):
        stages = [("features.0", model.features[0])]
        for i, f in enumerate(model.features[1:], 1):
            stages += [(f"features.{i}.{j}", b) for j, b in enumerate(f)] if isinstance(f, torch.nn.Sequential) \
                else [(f"features.{i}", f)]
        return stages, lambda x: model.head(model.norm(x).mean(dim=(1, 2)))
    if name.startswith("resnet"):
        stages = [("conv1", model.conv1), ("bn1", lambda x: model.maxpool(model.relu(model.bn1(x))))]
        for i in range(1, 5):
            stages += [(f"layer{i}.{j}", b) for j, b in enumerate(getattr(model, f"layer{i}"))]
        return stages, lambda x: model.fc(torch.flatten(model.avgpool(x), 1))
    if name.startswith("inception"):
        stem = [n for n in model._STEM]
        stages = [(n, getattr(model, n)) for n in stem[:3]] + [("maxpool1", model.maxpool1)]
        stages += [(n, getattr(model, n)) for n in stem[3:]] + [("maxpool2", model.maxpool2)]
        stages += [(n, getattr(model, n)) for n in model._MIXED]
        return stages, lambda x: model.fc(torch.flatten(model.dropout(model.avgpool(x)), 1))
    raise ValueError(f"no stage decomposition for {name}")


def stage_of(stages, layer):
    """Index of the stage that holds an analysis layer."""
    for i, (prefix, _) in enumerate(stages):
        if layer == prefix or layer.startswith(prefix + "."):
            return i
    raise ValueError(f"layer {layer} is in no stage")


@torch.no_grad()
def reinit_pass(model, init_state, test_ds, info, args, device):
    """Re-initialisation robustness: for each analysis layer, revert its parameters and
    buffers to init.pt, score the test set, restore. Per batch, the stage inputs of the
    fine-tuned model are computed once; each reverted layer re-runs only the stages from its
    own on. Returns (baseline, [metric per layer])."""
    model.eval()
    stages, head = forward_stages(model)
    layers = model.feature_layers()
    starts = [stage_of(stages, l) for l in layers]
    state = model.state_dict()
    swap = [{k: (state[k], init_state[k].to(device)) for k in layer_entries(model, l)} for l in layers]
    to_scores = (lambda z: torch.sigmoid(z)) if info["multilabel"] else (lambda z: z.softmax(1))
    base_scores, layer_scores, labels = [], [[] for _ in layers], []
    for x, y in tqdm(loader(test_ds, args, device), "re-init"):
        h = [x.to(device, non_blocking=True)]
        for _, fn in stages:
            h.append(fn(h[-1]))
        base_scores.append(to_scores(head(h[-1]).float()).cpu())
        for i, s in enumerate(starts):
            saved = {k: live.clone() for k, (live, _) in swap[i].items()}
            for live, initial in swap[i].values():
                live.copy_(initial)
            z = h[s]
            for _, fn in stages[s:]:
                z = fn(z)
            layer_scores[i].append(to_scores(head(z).float()).cpu())
            for k, (live, _) in swap[i].items():
                live.copy_(saved[k])
        labels.append(y)
    labels = torch.cat(labels).numpy()
    score = lambda parts: metrics.task_metric(info["metric"], torch.cat(parts).numpy(), labels)
    return score(base_scores), [score(p) for p in layer_scores]


def convergence(run):
    """Iterations to the best validation metric, and the validation curve, from log.jsonl."""
    curve = []
    path = os.path.join(run, "log.jsonl")
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                if "val" in r:
                    curve.append([r["iteration"], r["val"]])
    return curve


# ----------------------------------------------------------------------------- main
def tqdm(it, desc):
    """A progress bar on a terminal, nothing in logs."""
    return progress_bar(it, desc=desc, leave=False, disable=None)


def nan_to_none(x):
    """JSON has no NaN: undefined values (e.g. CKA of a constant layer) are written as null."""
    if isinstance(x, dict):
        return {k: nan_to_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [nan_to_none(v) for v in x]
    if isinstance(x, np.ndarray):
        return nan_to_none(x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write(run, metric, cfg, layers, values, settings):
    out = os.path.join(run, "analysis")
    os.makedirs(out, exist_ok=True)
    doc = {"metric": metric, "run": os.path.abspath(run), "model": cfg["model"], "data": cfg["data"],
           "init": cfg["init"], "n": cfg["n"], "N": cfg["N"], "seed": cfg["seed"], "layers": layers,
           "values": nan_to_none(values), "settings": settings, "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    path = os.path.join(out, f"{metric}.json")
    data.save_json(path, doc)
    return path


def short(layers):
    return [l.replace("blocks.", "b").replace("features.", "f").replace("layer", "L") for l in layers]


def print_row(label, values, fmt="{:.3f}"):
    vals = " ".join("  nan " if v is None or (isinstance(v, float) and not math.isfinite(v)) else fmt.format(v)
                    for v in values)
    print(f"  {label:<16} {vals}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--run", required=True, help="run directory written by train.py")
    p.add_argument("--metric", default="all", choices=METRICS + ["all"])
    p.add_argument("--ref", default=None, help="second run (e.g. the ST run) for cross-model CKA against --run")
    p.add_argument("--batch-size", type=int, default=128, help="CKA batch size (the paper's 128)")
    p.add_argument("--cka-mode", choices=["minibatch", "mean"], default="minibatch",
                   help="minibatch: Nguyen et al. 2021 ratio of summed HSIC; mean: mean of per-batch CKA (original code)")
    p.add_argument("--biased", action="store_true", help="biased HSIC instead of the unbiased estimator")
    p.add_argument("--k", type=int, default=200, help="k-NN neighbours")
    p.add_argument("--temperature", type=float, default=0.1, help="k-NN weight temperature")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--workers", type=int, default=0)
    return p.parse_args(argv)


def analyze(args):
    run = args.run.rstrip("/")
    cfg, summary = load_run(run)
    todo = METRICS if args.metric == "all" else [args.metric]
    if "attention" in todo and not cfg["model"].startswith("deit"):
        if args.metric == "attention":
            raise ValueError(f"--metric attention: needs a DeiT run, {run} is {cfg['model']}")
        todo = [m for m in todo if m != "attention"]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    written = []

    if "convergence" in todo:
        if summary is None:
            raise FileNotFoundError(f"{run}/summary.json: missing (the run has not finished)")
        curve = convergence(run)
        written.append(write(run, "convergence", cfg, [], {
            "best_iteration": summary["best_iteration"], "best_val_metric": summary["best_val_metric"],
            "iterations": summary["iterations"], "val_metric": summary["metric"],
            "curve": [[it, v.get(summary["metric"])] for it, v in curve]}, {}))
        print(f"{run}: convergence: best val {summary['metric']} {summary['best_val_metric']} "
              f"at iteration {summary['best_iteration']} of {summary['iterations']}")

    needs_data = [m for m in todo if m in ("cka", "knn", "reinit", "attention")]
    if not needs_data and "l2" not in todo:
        return written
    train_ds, _, test_ds, info = data.load_splits(cfg, eval_train=True) if needs_data else (None, None, None, None)
    num_classes = cfg["num_classes"]
    final = load_model(run, cfg, num_classes, "best", device)
    init_state = models.read_checkpoint(os.path.join(run, "init.pt"))["model"]
    layers = final.feature_layers()

    if "l2" in todo:
        d = metrics.l2_distance(init_state, final.state_dict(), layers, norm_keys=metrics.norm_param_names(final))
        written.append(write(run, "l2", cfg, layers, [d[l] for l in layers],
                             {"definition": "||W_init - W_final||_2 / number of weights, non-norm tensors"}))
        print(f"{run}: l2 distance per layer (x1e-6)")
        print_row("l2", [d[l] * 1e6 for l in layers], "{:.2f}")

    pass_todo = [m for m in todo if m in ("cka", "knn", "attention")]
    if pass_todo:
        run_models = {"final": final}
        if "cka" in todo:
            run_models["init"] = load_model(run, cfg, num_classes, "init", device)
            if args.ref:
                ref_cfg, _ = load_run(args.ref.rstrip("/"))
                for k in ("data", "img_size"):
                    if ref_cfg[k] != cfg[k]:
                        raise ValueError(f"--ref {args.ref}: its {k} {ref_cfg[k]!r} differs from --run's {cfg[k]!r}")
                run_models["ref"] = load_model(args.ref.rstrip("/"), ref_cfg, ref_cfg["num_classes"], "best", device)
        acc, queries, attn, labels = test_pass(run_models, test_ds, info, args, device, pass_todo)
        if "cka" in todo:
            settings = {"batch_size": args.batch_size, "mode": args.cka_mode, "debiased": not args.biased,
                        "rows": "fine-tuned model (best.pt) layers", "test_images": len(test_ds)}
            values = {}
            for (other, t, _), a in acc.items():
                key = "init" if other == "init" else "ref"
                values.setdefault(key, {})[t] = a.compute()
            if "ref" in values:
                settings.update(ref=os.path.abspath(args.ref), ref_layers=run_models["ref"].feature_layers(),
                                ref_init=ref_cfg["init"], ref_n=ref_cfg["n"])
            written.append(write(run, "cka", cfg, layers, values, settings))
            for key, by_type in values.items():
                m = by_type["all"]
                print(f"{run}: CKA fine-tuned vs {key}, matching layers (diagonal), feature type 'all'")
                print_row(key, [m[i, i] if i < m.shape[1] else float("nan") for i in range(m.shape[0])])
        if "knn" in todo:
            bank = bank_pass(final, train_ds, args, device)
            bank_labels = torch.as_tensor(np.asarray(train_ds.labels))
            values = {}
            for t in bank:
                values[t] = []
                for i in range(len(layers)):
                    scores = metrics.knn_predict(bank[t][i].to(device).float(), bank_labels.to(device),
                                                 queries[t][i].to(device).float(), k=args.k, t=args.temperature,
                                                 num_classes=info["num_classes"])
                    values[t].append(metrics.task_metric(info["metric"], scores.cpu().numpy(), labels))
            written.append(write(run, "knn", cfg, layers, values, {
                "k": args.k, "temperature": args.temperature, "task_metric": info["metric"],
                "bank_images": len(train_ds), "query_images": len(test_ds)}))
            print(f"{run}: k-NN {info['metric']} per layer")
            for t, v in values.items():
                print_row(t, v)
        if "attention" in todo:
            blocks = [l for l in layers if l.endswith(".attn")]
            per_head = attn.cpu().numpy()
            written.append(write(run, "attention", cfg, blocks, {
                "per_block": per_head.mean(1), "per_head": per_head}, {
                "unit": "pixels", "patch_size": final.patch_size, "grid": list(final.grid_size),
                "cls_share": "dropped, not renormalised", "test_images": len(test_ds)}))
            print(f"{run}: mean attention distance per block (px)")
            print_row("distance", per_head.mean(1).tolist(), "{:.1f}")

    if "reinit" in todo:
        base, values = reinit_pass(final, init_state, test_ds, info, args, device)
        written.append(write(run, "reinit", cfg, layers, {
            "baseline": base, "reverted": values, "drop": [base - v for v in values]},
            {"task_metric": info["metric"], "test_images": len(test_ds)}))
        print(f"{run}: test {info['metric']} with one layer reverted to init (baseline {base:.3f})")
        print_row("reverted", values)
    return written


def main(argv=None):
    args = parse_args(argv)
    try:
        for path in analyze(args):
            print(f"wrote {path}")
        return 0
    except (ValueError, FileNotFoundError) as e:
        print(f"analyze.py: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
