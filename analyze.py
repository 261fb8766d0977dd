"""Where are features reused? Run the paper's analyses on a run directory or on checkpoints.

    python analyze.py --run runs/deit_s-aptos-n5-s0 --metric cka
    python analyze.py --run runs/deit_s-aptos-n14-s0 --ref runs/deit_s-aptos-n0-s0 --metric cka
    python analyze.py --run runs/x --metric all
    python analyze.py --model deit_t --weights FT.pth --init-weights INIT.pth [--ref-weights REF.pth] \\
        --data synthetic --img-size 224 --metric cka --out DIR

Writes <run or --out>/analysis/<metric>.json (schema in the README) and prints a short table.
Checkpoints may be ours, timm's or torchvision's (same state-dict layouts). Everything is
checked (flags, run files, checkpoints, data) before the first file is written.
All analyses that look at the test set share one pass over it: each batch goes once through
the fine-tuned, the initial (and the reference) model, with every feature layer captured
(metrics.capture) and reduced at once to centred Grams (CKA), pooled features (k-NN) and
attention distances. What differs between models is asked of the model (the protocol in
models.py), so this file has no model-specific code.
"""
import argparse
import contextlib
import math
import os
import sys
import time
import types
import warnings

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

import data
import metrics
import models
import rundir

METRICS = ["cka", "knn", "reinit", "l2", "attention", "convergence"]
ORDER = ["convergence", "l2", "cka", "knn", "attention", "reinit"]  # the order they are written in
SHARED_PASS = ("cka", "knn", "attention")  # computed in one pass over the test split


def warn(msg):
    print(f"analyze.py: warning: {msg}", file=sys.stderr)


def progress(it, desc):
    """A progress bar on a terminal, nothing in logs."""
    return tqdm(it, desc=desc, leave=False, disable=None)


# ----------------------------------------------------------------------------- inputs
def load_run(run, flag="--run"):
    """config.json (settings, plus num_classes, the run's run_id and its dataset's identity) and
    summary.json (None if unfinished) of a run directory, read and checked by rundir, with
    one-line errors."""
    r = rundir.load_run(run, flag)
    cfg = dict(r["config"], num_classes=r["data"]["num_classes"], run_id=r["run_id"],
               data_identity=r["data"].get("identity"))
    if cfg["model"] not in models.MODELS:
        raise ValueError(f"{flag} {run}: config.json names model {cfg['model']!r}, expected one of "
                         f"{', '.join(models.MODELS)}")
    return cfg, r["summary"]


def pick_device(flag):
    if flag is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(flag)
    except RuntimeError:
        raise ValueError(f"--device {flag!r}: expected cpu, cuda or cuda:K") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {flag!r}: expected cpu, cuda or cuda:K")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {flag}: CUDA is not available on this machine (use --device cpu)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {flag}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def read_weights(path, where):
    """A checkpoint file's contents, read once and early (before the data), one-line errors."""
    try:
        return models.read_checkpoint(path)
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"{where}: {e}") from None


def load_model(name, num_classes, img_size, source, where, need_head):
    """One of our models with the weights of `source` (a file or a state dict, ours, timm's or
    torchvision's layout), in eval mode on the CPU. need_head: the checkpoint's head must fit
    (it scores the test set); otherwise a head of another size is left as created."""
    model = models.create_model(name, num_classes=num_classes, img_size=img_size)
    try:
        report = models.load_pretrained(model, source)
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"{where}: {e}") from None
    head = [k for k in report["skipped"] if k.startswith(model.head_name + ".")]
    if need_head and head:
        raise ValueError(f"{where}: its head does not fit {num_classes} classes ({head[0]} skipped); "
                         f"expected weights fine-tuned on this dataset")
    return model.eval()


def facts(model):
    """What plots.py and findings.py need to know about the model (they read only JSON)."""
    return {"feature_types": model.feature_types(), "has_attention": bool(model.attention_layers()),
            "token_mixing": model.token_mixing}


def run_inputs(args, todo):
    """--run (and --ref): the run's settings, the JSON header fields, the weights files."""
    ckpt_flags = [f for f in ("model", "weights", "init_weights", "ref_weights", "ref_model", "out", "data",
                              "data_root", "img_size", "split_seed", "subset", "cache_dir")
                  if getattr(args, f) is not None]
    if ckpt_flags:
        raise ValueError(f"--run and --{ckpt_flags[0].replace('_', '-')} exclude each other "
                         "(a run directory names its own model, weights and data)")
    run = args.run.rstrip("/") or "/"
    cfg, summary = load_run(run)
    if summary is None:
        raise ValueError(f"--run {run}: the run has not finished (no summary.json), so its best.pt is not "
                         "final; finish it (train.py ... --resume) before analysing it")
    meta = {"run": os.path.abspath(run), "run_id": cfg["run_id"], "model": cfg["model"], "data": cfg["data"],
            "init": cfg["init"], "n": cfg["n"], "N": cfg["N"], "seed": cfg["seed"]}
    best = read_weights(os.path.join(run, "best.pt"), f"--run {run}: best.pt")
    if isinstance(best, dict) and best.get("run_id") not in (None, cfg["run_id"]):  # (older runs' files have none)
        raise ValueError(f"--run {run}: best.pt belongs to another run (run_id {best['run_id']}, config.json's "
                         f"{cfg['run_id']})")
    src = {"final": (best, f"--run {run}: best.pt"), "init": (os.path.join(run, "init.pt"), f"--run {run}: init.pt")}
    if args.ref:
        ref = args.ref.rstrip("/") or "/"
        ref_cfg, ref_summary = load_run(ref, "--ref")
        if ref_summary is None:
            raise ValueError(f"--ref {ref}: the run has not finished (no summary.json)")
        same_data(cfg, ref_cfg, args.ref)
        src["ref"] = (os.path.join(ref, "best.pt"), f"--ref {ref}: best.pt", ref_cfg["model"], ref_cfg["num_classes"],
                      {"ref": os.path.abspath(args.ref), "ref_init": ref_cfg["init"], "ref_n": ref_cfg["n"]})
    return cfg, meta, src, summary, os.path.join(run, "analysis"), todo


def same_data(cfg, ref_cfg, ref):
    """--ref was trained on --run's dataset (the same images and classes: data.dataset_identity)
    at the same image size. Runs from before identities were recorded: by dataset name only."""
    a, b = cfg["data_identity"], ref_cfg["data_identity"]
    if a is not None and b is not None and a != b:
        raise ValueError(f"--ref {ref}: trained on other images or classes than --run (dataset identity {b} vs "
                         f"{a}, {ref_cfg['data']} vs {cfg['data']})")
    if a is None or b is None:
        warn(f"--ref {ref}: {'--run' if a is None else '--ref'} has no dataset identity (an older run): the datasets "
             "are compared by name and image size only")
    for k in ("data", "img_size"):
        if ref_cfg[k] != cfg[k]:
            raise ValueError(f"--ref {ref}: its {k} {ref_cfg[k]!r} differs from --run's {cfg[k]!r}")


def checkpoint_inputs(args, todo):
    """--model/--weights (--init-weights, --ref-weights): settings from the flags, the JSON
    header fields, the weights files."""
    if args.model is None or args.weights is None:
        raise ValueError("expected --run DIR, or --model and --weights (a checkpoint) with --data and --out")
    if args.ref:
        raise ValueError("--ref names a run directory: with --weights, give --ref-weights instead")
    for flag, name in (("--model", args.model), ("--ref-model", args.ref_model)):
        if name is not None and name not in models.MODELS:
            raise ValueError(f"{flag} {name!r}: expected one of {', '.join(models.MODELS)}")
    data_name = args.data or "synthetic"
    if data_name not in data.DATASETS:
        raise ValueError(f"--data {data_name!r}: expected one of {', '.join(data.DATASETS)}")
    for flag, v in (("--img-size", args.img_size), ("--subset", args.subset)):
        if v is not None and v < 1:
            raise ValueError(f"{flag} {v}: expected an integer >= 1")
    if args.out is None:
        raise ValueError("--out: needed with --weights (the analyses go to OUT/analysis/)")
    if args.metric == "convergence":
        raise ValueError("--metric convergence: needs a run directory (--run) and its log.jsonl")
    skip = [m for m in todo if m == "convergence" or (args.init_weights is None and m in ("cka", "l2", "reinit"))]
    if args.metric != "all" and skip:
        raise ValueError(f"--init-weights: needed by --metric {skip[0]} (the model before fine-tuning)")
    if skip:
        print(f"skipping {', '.join(skip)}: " + ("no --init-weights; " if len(skip) > 1 else "")
              + "convergence needs a run directory")
    cfg = {"model": args.model, "data": data_name, "data_root": args.data_root, "split_seed": args.split_seed or 0,
           "subset": args.subset, "cache_dir": args.cache_dir,
           "img_size": args.img_size or data.DEFAULT_IMG_SIZE[data_name]}
    meta = {"run": None, "run_id": None, "weights": os.path.abspath(args.weights), "model": args.model,
            "data": data_name, "init": None, "n": None, "N": None, "seed": None}
    src = {"final": (read_weights(args.weights, "--weights"), f"--weights {args.weights}")}
    if args.init_weights:
        src["init"] = (read_weights(args.init_weights, "--init-weights"), f"--init-weights {args.init_weights}")
    if args.ref_weights:
        ref_model = args.ref_model or args.model
        src["ref"] = (read_weights(args.ref_weights, "--ref-weights"), f"--ref-weights {args.ref_weights}",
                      ref_model, None,
                      {"ref": os.path.abspath(args.ref_weights), "ref_model": ref_model, "ref_init": None,
                       "ref_n": None})
    return cfg, meta, src, None, os.path.join(args.out, "analysis"), [m for m in todo if m not in skip]


def prepare(args):
    """Check every flag and input, read the configs, checkpoints and data: a job holding all
    an analysis needs. Nothing is written here; every error is one line."""
    for flag, v, low in (("--batch-size", args.batch_size, 1), ("--k", args.k, 1), ("--workers", args.workers, 0)):
        if v < low:
            raise ValueError(f"{flag} {v}: expected an integer >= {low}")
    if not (args.temperature > 0 and math.isfinite(args.temperature)):
        raise ValueError(f"--temperature {args.temperature}: expected a finite number > 0")
    device = pick_device(args.device)
    skip = [m.strip() for m in (args.skip or "").split(",") if m.strip()]
    bad = [m for m in skip if m not in METRICS]
    if bad:
        raise ValueError(f"--skip {args.skip}: {bad[0]!r} is not an analysis "
                         f"(expected names from {', '.join(METRICS)})")
    if skip and args.metric != "all":
        raise ValueError(f"--skip {args.skip}: only with --metric all")
    todo = [m for m in METRICS if m not in skip] if args.metric == "all" else [args.metric]
    stamp = run_stamp(args.run) if args.run else None  # before reading: a later change is caught under the lock
    cfg, meta, src, summary, out, todo = (run_inputs if args.run else checkpoint_inputs)(args, todo)
    job = types.SimpleNamespace(device=device, models={}, summary=summary, out=out, meta=meta, stamp=stamp,
                                run=args.run.rstrip("/") or "/" if args.run else None)
    job.flag = "--run" if args.run else "--out"
    job.folder = job.run if args.run else args.out  # the folder whose lock analyze.py holds while writing
    rundir.check_writable_dir(out, job.flag)

    # the data first: for checkpoints, its class count decides the head
    job.train_ds = job.test_ds = job.info = None
    if any(m in todo for m in ("cka", "knn", "reinit", "attention")):
        # the run's own --metric (None: the dataset's), so k-NN and re-init score what the run was scored by
        split_cfg = {k: cfg.get(k) for k in ("data", "data_root", "img_size", "split_seed", "subset", "cache_dir",
                                             "metric")}
        split_cfg["split_seed"] = split_cfg["split_seed"] or 0
        try:
            job.train_ds, _, job.test_ds, job.info = data.load_splits(split_cfg, eval_train=True)
        except (ValueError, FileNotFoundError) as e:
            raise ValueError(f"--data {cfg['data']}: {e}") from None
        if args.run and None not in (cfg["data_identity"], job.info.get("identity")) \
                and cfg["data_identity"] != job.info["identity"]:
            warn(f"--run {job.run}: its dataset now holds other images or classes than when the run was trained "
                 f"(identity {job.info['identity']}, then {cfg['data_identity']})")
        min_n = 2 if args.biased else 4
        if "cka" in todo and len(job.test_ds) < min_n:
            raise ValueError(f"--metric cka: the test split has {len(job.test_ds)} images, CKA needs >= {min_n}")
    # the run's class count; for checkpoints the dataset's (2 when nothing scores the test set:
    # a head of another size is then skipped on loading, as it is never used)
    num_classes = cfg["num_classes"] if args.run else (job.info["num_classes"] if job.info else 2)
    path, where = src["final"]
    final = load_model(cfg["model"], num_classes, cfg["img_size"], path, where, need_head="reinit" in todo)
    meta["N"] = meta["N"] if meta["N"] is not None else len(final.wtst_groups())
    if "attention" in todo and not final.attention_layers():
        if args.metric == "attention":
            raise ValueError(f"--metric attention: needs a model with global token attention (DeiT), "
                             f"{cfg['model']} has none")
        todo = [m for m in todo if m != "attention"]
    job.models["final"] = final
    if any(m in todo for m in ("cka", "l2", "reinit")):
        path, where = src["init"]
        job.models["init"] = load_model(cfg["model"], num_classes, cfg["img_size"], path, where, False)
    if "ref" in src and "cka" in todo:
        path, where, ref_model, ref_classes, job.ref_meta = src["ref"]
        job.models["ref"] = load_model(ref_model, ref_classes or num_classes, cfg["img_size"], path, where, False)
    job.todo = [m for m in ORDER if m in todo]
    job.facts = facts(final)
    return job


# ----------------------------------------------------------------------------- the shared pass
def loader(ds, args, device):
    return DataLoader(ds, batch_size=args.batch_size, shuffle=False, num_workers=args.workers,
                      pin_memory=device.type == "cuda")


def reducer(model, grams=False, pooled=False, attention=False, debiased=True):
    """A metrics.capture transform: each captured layer output becomes at once its centred
    Gram per feature type (float64), its pooled features per type (float32, on the model's
    device) and, for attention layers, per head the summed attention distance (CLS key
    dropped; renormalised over the patch keys) and CLS share, stacked (3, heads); the
    activation is not kept."""
    attn_layers = set(model.attention_layers()) if attention else set()

    def reduce(name, out):
        r = {}
        if grams:
            r["grams"] = {t: metrics.centered_gram(v.flatten(1), debiased=debiased)
                          for t, v in model.feature_views(name, out).items()}
        if pooled:
            r["pooled"] = {t: v.float() for t, v in model.pooled_views(name, out).items()}
        if name in attn_layers:
            module = model.get_submodule(name)
            a, grid, patch, p = module.attn_probs, model.grid_size, model.patch_size, model.num_prefix_tokens
            r["attn"] = torch.stack([metrics.attention_distance_sum(a, grid, patch, p),
                                     metrics.attention_distance_sum(a, grid, patch, p, renormalize=True),
                                     metrics.attention_prefix_share_sum(a, p)])
            module.attn_probs = None  # free it now
        return r
    return reduce


def captured_layers(model, attention):
    extra = [n for n in model.attention_layers() if n not in model.feature_layers()] if attention else []
    return model.feature_layers() + extra


@torch.no_grad()
def shared_pass(job, args):
    """One pass over the test split through every model of the job: CKA accumulators
    {(other, type, other's type): acc}, k-NN queries {type: [(n, d) float32 per layer]} (on
    the CPU, each written batch by batch into its place, never held twice), attention
    (block, [dropped, renormalised, CLS share], head) (mean over images), re-init scores (or
    None) and the labels.
    Re-init needs the fine-tuned model's stage inputs, a forward of this pass: it is scored
    here unless attention is recorded, whose explicit softmax differs from the fused one in
    rounding (the re-init baseline then equals the run's test figure exactly); the capture
    hooks are on for the batch's forwards only, not for the re-runs of reverted layers."""
    todo, final = job.todo, job.models["final"]
    want = {"cka": "cka" in todo, "knn": "knn" in todo, "attention": "attention" in todo}
    layers = final.feature_layers()
    acc = {}
    if want["cka"]:
        for other in [k for k in job.models if k != "final"]:
            other_types = job.models[other].feature_types()
            for t in final.feature_types():
                t_other = t if t in other_types else "all"
                acc[(other, t, t_other)] = metrics.CKAAccumulator(
                    len(layers), len(job.models[other].feature_layers()), debiased=not args.biased, mode=args.cka_mode)
    run_models = {k: m for k, m in job.models.items() if k == "final" or want["cka"]}
    scorer = (ReinitScorer(final, job.models["init"].state_dict(), job.info, job.device)
              if "reinit" in todo and not want["attention"] else None)
    queries = {t: [None] * len(layers) for t in final.feature_types()}
    attn_sum, n_images, labels = None, 0, []
    if want["attention"]:
        final.record_attention(True)
    try:
        for x, y in progress(loader(job.test_ds, args, job.device), "test pass"):
            x = x.to(job.device, non_blocking=True)
            with contextlib.ExitStack() as stack:
                acts = {k: stack.enter_context(metrics.capture(
                    m, captured_layers(m, k == "final" and want["attention"]),
                    reducer(m, grams=want["cka"], pooled=(k == "final" and want["knn"]),
                            attention=(k == "final" and want["attention"]), debiased=not args.biased)))
                    for k, m in run_models.items()}
                stage_inputs = None
                for k, m in run_models.items():
                    if k == "final" and scorer is not None:
                        stage_inputs = scorer.stage_inputs(x)  # the forward, its stage inputs kept
                    else:
                        m(x)
            if scorer is not None:
                scorer.add(stage_inputs)
            for (other, t, t_other), a in acc.items():
                a.update([acts["final"][l]["grams"][t] for l in layers],
                         [acts[other][l]["grams"][t_other] for l in job.models[other].feature_layers()])
            if want["knn"]:
                for t, per_layer in queries.items():
                    for i, l in enumerate(layers):
                        q = acts["final"][l]["pooled"][t]
                        if per_layer[i] is None:
                            per_layer[i] = torch.empty(len(job.test_ds), q.shape[1])
                        per_layer[i][n_images:n_images + len(q)] = q
            if want["attention"]:
                sums = torch.stack([acts["final"][l]["attn"] for l in final.attention_layers()])
                attn_sum = sums if attn_sum is None else attn_sum + sums
            n_images += x.shape[0]
            labels.append(y)
    finally:
        if want["attention"]:
            final.record_attention(False)
    queries = queries if want["knn"] else None
    attn = (attn_sum / n_images) if attn_sum is not None else None
    labels = torch.cat(labels).numpy()
    return {"cka": acc, "queries": queries, "attention": attn, "labels": labels,
            "reinit": scorer.result(labels) if scorer is not None else None}


KNN_BANK_CHUNK = 512  # bank images merged into the running top-k at once (see knn_bank_pass)


@torch.no_grad()
def knn_bank_pass(model, bank_ds, queries, args, device):
    """The k nearest bank items of every query, per feature layer and type: the bank (training
    split, eval transforms) goes once through the model; the pooled features of each batch
    are copied into a buffer of KNN_BANK_CHUNK images per layer and type, merged into that
    layer's and type's running top-k (metrics.KNNAccumulator) when full, and overwritten, so
    memory does not grow with the bank. Merging 512 images at once rather than one batch of
    128 halves the k-NN time on a CPU for thousands of queries (fewer, larger selections;
    1024 would gain ~10% more) for a fixed buffer of 512 x (pooled floats per image) x 4
    bytes (DeiT-S: 78 MB). Returns {type: [accumulator per layer]}."""
    layers = model.feature_layers()
    accs = {t: [metrics.KNNAccumulator(q, args.k, device=device) for q in qs] for t, qs in queries.items()}
    buffers = {t: [None] * len(layers) for t in accs}
    filled = 0

    def merge():
        for t, per_layer in accs.items():
            for acc, buffer in zip(per_layer, buffers[t]):
                acc.update(buffer[:filled])

    with metrics.capture(model, layers, reducer(model, pooled=True)) as acts:
        for x, _ in progress(loader(bank_ds, args, device), "k-NN bank"):
            model(x.to(device, non_blocking=True))
            if filled + len(x) > max(KNN_BANK_CHUNK, len(x)):
                merge()
                filled = 0
            for t, per_layer in buffers.items():
                for i, l in enumerate(layers):
                    v = acts[l]["pooled"][t]
                    if per_layer[i] is None:
                        per_layer[i] = torch.empty(max(KNN_BANK_CHUNK, len(v)), v.shape[1], device=v.device)
                    per_layer[i][filled:filled + len(v)] = v
            filled += len(x)
    if filled:
        merge()
    return accs


# ----------------------------------------------------------------------------- re-initialisation
def layer_entries(model, layer):
    """State-dict names of the parameters and buffers of one analysis layer."""
    return [k for k in model.state_dict() if k.startswith(layer + ".")]


def stage_of(stages, layer):
    """Index of the stage that holds an analysis layer."""
    for i, (prefix, _) in enumerate(stages):
        if layer == prefix or layer.startswith(prefix + "."):
            return i
    raise ValueError(f"layer {layer} is in no stage")


def to_scores(logits, info):
    """Class scores from float32 logits (cast first: the scores never depend on bf16 rounding)."""
    logits = logits.float()
    return torch.sigmoid(logits) if info["multilabel"] else logits.softmax(1)


class ReinitScorer:
    """Re-initialisation robustness, batch by batch: for each analysis layer, revert its
    parameters and buffers to the initial state, score the batch, restore. The stage inputs
    of the fine-tuned model are computed once per batch (`stage_inputs`, one forward); each
    reverted layer re-runs only the stages from its own on (model.forward_stages())."""

    def __init__(self, model, init_state, info, device):
        model.eval()
        self.stages, self.head = model.forward_stages()
        layers = model.feature_layers()
        self.starts = [stage_of(self.stages, l) for l in layers]
        state = model.state_dict()
        self.swap = [{k: (state[k], init_state[k].to(device)) for k in layer_entries(model, l)} for l in layers]
        self.info, self.base_scores, self.layer_scores = info, [], [[] for _ in layers]

    def stage_inputs(self, x):
        """[x, output of stage 1, ..., output of the last stage]: the model's forward, kept."""
        h = [x]
        for _, fn in self.stages:
            h.append(fn(h[-1]))
        return h

    @torch.no_grad()
    def add(self, h):
        """Score one batch, given its stage inputs, with the model as is and each layer reverted."""
        self.base_scores.append(to_scores(self.head(h[-1]), self.info).cpu())
        for i, s in enumerate(self.starts):
            saved = {k: live.clone() for k, (live, _) in self.swap[i].items()}
            for live, initial in self.swap[i].values():
                live.copy_(initial)
            z = h[s]
            for _, fn in self.stages[s:]:
                z = fn(z)
            self.layer_scores[i].append(to_scores(self.head(z), self.info).cpu())
            for k, (live, _) in self.swap[i].items():
                live.copy_(saved[k])

    def result(self, labels):
        """(baseline, [metric per layer], per_class) over the batches added, given their labels in
        order; per_class is None, or for a multi-label task {"baseline": [AUC per class],
        "reverted": [[...] per layer]}."""
        score = lambda parts: metrics.task_metric(self.info["metric"], torch.cat(parts).numpy(), labels)
        auc = lambda parts: metrics.per_class_auc(torch.cat(parts).numpy(), labels)
        per_class = ({"baseline": auc(self.base_scores), "reverted": [auc(p) for p in self.layer_scores]}
                     if self.info["multilabel"] else None)
        return score(self.base_scores), [score(p) for p in self.layer_scores], per_class


@torch.no_grad()
def reinit_scores(model, init_state, test_ds, info, args, device):
    """Re-initialisation robustness over the test split in a pass of its own (see
    ReinitScorer; the shared pass does the same when it runs). Returns ReinitScorer.result."""
    scorer = ReinitScorer(model, init_state, info, device)
    labels = []
    for x, y in progress(loader(test_ds, args, device), "re-init"):
        scorer.add(scorer.stage_inputs(x.to(device, non_blocking=True)))
        labels.append(y)
    return scorer.result(torch.cat(labels).numpy())


# ----------------------------------------------------------------------------- output
def write(job, metric, layers, values, settings):
    """analysis/<metric>.json, tagged with the run's run_id (a file of another run is absent to
    plots.py and the sweep), written atomically under the folder's lock."""
    rundir.make_dir(job.out, job.flag)
    doc = dict(job.meta, metric=metric, layers=layers, values=values, settings=settings,
               facts=job.facts, created=time.strftime("%Y-%m-%d %H:%M:%S"))
    path = os.path.join(job.out, f"{metric}.json")
    rundir.save_json(path, doc)
    return path


def print_row(label, values, fmt="{:.3f}"):
    vals = " ".join("  nan " if v is None or (isinstance(v, float) and not math.isfinite(v)) else fmt.format(v)
                    for v in values)
    print(f"  {label:<16} {vals}")


def label(job):
    return job.run or job.meta["weights"]


# ----------------------------------------------------------------------------- the analyses
def read_curve(run, metric):
    """[[iteration, validation metric]] from a run's log.jsonl (rundir.read_log: every line checked)."""
    if not os.path.isfile(os.path.join(run, rundir.LOG)):
        warn(f"--run {run}: no {rundir.LOG}: the convergence curve is empty")
    return [[r["iteration"], r["val"].get(metric)] for r in rundir.read_log(run) if "val" in r]


def convergence(job, args, shared):
    """Iterations to the best validation metric, and the validation curve, from log.jsonl."""
    s = job.summary
    values = {"best_iteration": s["best_iteration"], "best_val_metric": s["best_val_metric"],
              "iterations": s["iterations"], "val_metric": s["metric"], "curve": read_curve(job.run, s["metric"])}
    print(f"{label(job)}: convergence: best val {s['metric']} {s['best_val_metric']} "
          f"at iteration {s['best_iteration']} of {s['iterations']}")
    return write(job, "convergence", [], values, {})


def l2(job, args, shared):
    final = job.models["final"]
    layers = final.feature_layers()
    d = metrics.l2_distance(job.models["init"].state_dict(), final.state_dict(), layers,
                            norm_keys=metrics.norm_param_names(final))
    print(f"{label(job)}: l2 distance per layer (x1e-6)")
    print_row("l2", [d[l] * 1e6 for l in layers], "{:.2f}")
    return write(job, "l2", layers, [d[l] for l in layers],
                 {"definition": "||W_init - W_final||_2 / number of weights, non-norm tensors"})


def cka(job, args, shared):
    if len(job.test_ds) < args.batch_size:
        warn(f"CKA over only {len(job.test_ds)} test images, fewer than --batch-size {args.batch_size}: "
             "a small-sample estimate, not a final number")
    settings = {"batch_size": args.batch_size, "mode": args.cka_mode, "debiased": not args.biased,
                "rows": "fine-tuned model (best.pt) layers", "test_images": len(job.test_ds)}
    values = {}
    for (other, t, _), a in shared["cka"].items():
        values.setdefault(other, {})[t] = a.compute()
    if "ref" in values:
        settings.update(job.ref_meta, ref_layers=job.models["ref"].feature_layers())
    for key, by_type in values.items():
        m = by_type["all"]
        print(f"{label(job)}: CKA fine-tuned vs {key}, matching layers (diagonal), feature type 'all'")
        print_row(key, [m[i, i] if i < m.shape[1] else float("nan") for i in range(m.shape[0])])
    return write(job, "cka", job.models["final"].feature_layers(), values, settings)


def knn(job, args, shared):
    final, info, device = job.models["final"], job.info, job.device
    layers = final.feature_layers()
    if args.k > len(job.train_ds):
        warn(f"--k {args.k} is larger than the k-NN bank ({len(job.train_ds)} training images): "
             f"using k={len(job.train_ds)}")
    accs = knn_bank_pass(final, job.train_ds, shared["queries"], args, device)
    bank_labels = torch.as_tensor(np.asarray(job.train_ds.labels))
    values = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # k > bank: said once above
        for t, per_layer in accs.items():
            values[t] = []
            for acc in per_layer:
                scores = acc.predict(bank_labels, t=args.temperature, num_classes=info["num_classes"])
                values[t].append(metrics.task_metric(info["metric"], scores.cpu().numpy(), shared["labels"]))
    print(f"{label(job)}: k-NN {info['metric']} per layer")
    for t, v in values.items():
        print_row(t, v)
    return write(job, "knn", layers, values, {
        "k": args.k, "temperature": args.temperature, "task_metric": info["metric"],
        "bank_images": len(job.train_ds), "query_images": len(job.test_ds), "features": "float32"})


def attention(job, args, shared):
    """Mean attention distance per block and head in two forms, and the CLS share: with the
    CLS key dropped (the public code's form, 'per_block'), the distance shrinks as attention
    moves onto CLS; renormalised over the patch keys it does not, so 'more local' and 'more
    attention on CLS' are told apart (findings use the renormalised form)."""
    final = job.models["final"]
    dropped, renorm, cls_share = shared["attention"].cpu().numpy().transpose(1, 0, 2)  # each (block, head)
    print(f"{label(job)}: mean attention distance per block (px), CLS key dropped / renormalised; CLS share")
    print_row("dropped", dropped.mean(1).tolist(), "{:.1f}")
    print_row("renormalised", renorm.mean(1).tolist(), "{:.1f}")
    print_row("CLS share", cls_share.mean(1).tolist(), "{:.2f}")
    values = {"per_block": dropped.mean(1), "per_head": dropped,
              "per_block_renormalized": renorm.mean(1), "per_head_renormalized": renorm,
              "cls_share_per_block": cls_share.mean(1), "cls_share_per_head": cls_share}
    return write(job, "attention", final.attention_layers(), values, {
        "unit": "pixels", "patch_size": final.patch_size, "grid": list(final.grid_size),
        "per_block": "CLS key dropped, not renormalised",
        "per_block_renormalized": "divided per query by its attention mass on patch keys",
        "cls_share": "attention mass of patch queries on prefix (CLS) keys, mean over queries",
        "test_images": len(job.test_ds)})


def reinit(job, args, shared):
    final, info = job.models["final"], job.info
    if shared is not None and shared["reinit"] is not None:
        base, values, per_class = shared["reinit"]
    else:
        base, values, per_class = reinit_scores(final, job.models["init"].state_dict(), job.test_ds, info, args,
                                                job.device)
    print(f"{label(job)}: test {info['metric']} with one layer reverted to init (baseline {base:.3f})")
    print_row("reverted", values)
    result = {"baseline": base, "reverted": values, "drop": [base - v for v in values]}
    settings = {"task_metric": info["metric"], "test_images": len(job.test_ds)}
    if per_class is not None:  # multi-label: AUC per class, in the order of settings.classes (null: one label value)
        result["per_class_auc"] = per_class
        settings["classes"] = info["classes"]
    return write(job, "reinit", final.feature_layers(), result, settings)


ANALYSES = {"convergence": convergence, "l2": l2, "cka": cka, "knn": knn, "attention": attention, "reinit": reinit}


def recheck(job):
    """Under the lock: the run is still the one prepare() read (train.py --overwrite or --resume
    may have replaced or changed it since; it cannot while analyze.py holds the lock)."""
    try:
        cfg, summary = load_run(job.run)
    except (ValueError, OSError):
        cfg = summary = None
    if summary is None or cfg["run_id"] != job.meta["run_id"] or run_stamp(job.run) != job.stamp:
        raise ValueError(f"--run {job.run}: the run changed while analyze.py was reading it (train.py replaced or "
                         "continued it); run the same command again")


def run_stamp(run):
    """(size, mtime) of best.pt and summary.json: what an analysis of the run was computed from."""
    stamp = []
    for f in (rundir.BEST, rundir.SUMMARY):
        try:
            st = os.stat(os.path.join(run, f))
            stamp.append((st.st_size, st.st_mtime_ns))
        except OSError:
            stamp.append(None)
    return stamp


def analyze(args):
    """Check everything, then, holding the folder's lock (one writer per run) and with TF32 off
    (float32 numbers on any GPU), run each requested analysis (the test-split ones share one
    pass); returns the paths written."""
    job = prepare(args)
    with rundir.RunLock(job.folder, "analyze.py", job.flag), metrics.exact_float32():
        if job.run:
            recheck(job)
        rundir.remove_stale_tmp(job.out)  # temp files of a killed analyze.py
        for m in job.models.values():
            m.to(job.device)
        shared = shared_pass(job, args) if any(m in SHARED_PASS for m in job.todo) else None
        return [ANALYSES[m](job, args, shared) for m in job.todo]


# ----------------------------------------------------------------------------- command line
def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_argument_group("what to analyse: a run directory, or checkpoints")
    src.add_argument("--run", default=None, help="run directory written by train.py (analyses go to RUN/analysis/)")
    src.add_argument("--ref", default=None, help="a second run directory (e.g. the ST run) for cross-model CKA "
                                                 "against --run")
    src.add_argument("--model", default=None, help=f"with --weights: one of {', '.join(models.MODELS)}")
    src.add_argument("--weights", default=None, help="fine-tuned checkpoint (ours, timm or torchvision layout)")
    src.add_argument("--init-weights", default=None, help="the same model before fine-tuning (needed by cka, l2, "
                                                          "reinit)")
    src.add_argument("--ref-weights", default=None, help="a second fine-tuned checkpoint for cross-model CKA")
    src.add_argument("--ref-model", default=None, help="model of --ref-weights (default: --model)")
    src.add_argument("--out", default=None, help="with --weights: folder for OUT/analysis/<metric>.json")
    src.add_argument("--data", default=None, help=f"with --weights: one of {', '.join(data.DATASETS)} "
                                                   "(default: synthetic)")
    src.add_argument("--data-root", default=None, help="with --weights: dataset folder (not needed for "
                                                       "synthetic/shapes)")
    src.add_argument("--img-size", type=int, default=None, help="with --weights: input size (default: the "
                                                                "dataset's, as train.py)")
    src.add_argument("--split-seed", type=int, default=None, help="with --weights: seed of the train/val/test "
                                                                  "split (default: 0, as train.py)")
    src.add_argument("--subset", type=int, default=None, help="with --weights: at most this many images per split "
                                                              "(default: all)")
    src.add_argument("--cache-dir", default=None, help="with --weights: image cache folder (default: see data.py)")
    p.add_argument("--metric", default="all", choices=METRICS + ["all"],
                   help="the analysis to run; all: every one that applies (default: %(default)s)")
    p.add_argument("--skip", default=None, help="with --metric all: analyses to leave out, comma-separated "
                                                "(e.g. reinit, the slowest) (default: none)")
    p.add_argument("--batch-size", type=int, default=128, help="CKA batch size, the paper's (default: %(default)s)")
    p.add_argument("--cka-mode", choices=["minibatch", "mean"], default="minibatch",
                   help="minibatch: Nguyen et al. 2021 ratio of summed HSIC; mean: mean of per-batch CKA "
                        "(original code) (default: %(default)s)")
    p.add_argument("--biased", action="store_true", help="biased HSIC instead of the debiased estimator")
    p.add_argument("--k", type=int, default=200, help="k-NN neighbours (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.1, help="k-NN weight temperature (default: %(default)s)")
    p.add_argument("--device", default=None, help="cuda, cuda:K or cpu (default: cuda if available)")
    p.add_argument("--workers", type=int, default=0, help="data loader processes (default: %(default)s)")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.run is None and args.weights is None and args.model is None:
        p.error("expected --run DIR, or --model and --weights (checkpoints)")
    return args


def main(argv=None):
    try:
        args = parse_args(argv)
    except SystemExit as e:  # argparse: usage and one error line, exit 2
        return e.code
    try:
        for path in analyze(args):
            print(f"wrote {path}")
        return 0
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"analyze.py: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
