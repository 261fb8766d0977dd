"""Fine-tune one model on one dataset from one initialisation with one seed.

    python train.py --model deit_s --n 5 --data aptos --data-root /data/APTOS2019

The recipe is the paper's (Adam 1e-4, wd 1e-5, batch 64, 1000 warm-up iterations,
ReduceLROnPlateau on the validation metric, clipping at 1.0, validation every half epoch,
test metric of the best checkpoint), plus early stopping. A run directory holds
config.json, init.pt, best.pt, last.pt, log.jsonl and summary.json (see README).
Multi-GPU: `torchrun --nproc_per_node=K train.py ...` (DDP; only rank 0 writes files).
"""
import argparse
import csv
import io
import json
import math
import os
import platform
import shutil
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

import data
import metrics
import models
import rundir
from init import describe_init, random_init, wtst_init
from rundir import FORMAT, RUN_FILES


# ----------------------------------------------------------------------------- files
def save_checkpoint(path, obj):
    """torch.save through rundir's atomic write: serialised in memory first, so its size is
    known and a full disk is one error naming the file, never a half-written checkpoint."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    rundir.write_bytes(path, buf.getbuffer())


# ----------------------------------------------------------------------------- data order
class EpochBatches(Sampler):
    """Training batches for one epoch as lists of (index, augmentation seed).
    Order and seeds depend only on (seed, epoch, rank): a resumed run, any worker count,
    sees exactly the batches and augmentations of the uninterrupted run."""

    def __init__(self, n, batch_size, seed, rank=0, world=1):
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.per_rank = n // world
        # drop the incomplete last batch (BatchNorm cannot train on one sample)
        self.steps = max(1, self.per_rank // batch_size) if self.per_rank >= batch_size else 1
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch, start=0):
        self.epoch, self.start = epoch, start

    def __len__(self):
        return self.steps - self.start

    def __iter__(self):
        perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        aug_seeds = np.random.default_rng([self.seed, self.epoch, 1]).integers(0, 2**62, size=self.n)
        mine = perm[self.rank::self.world][: self.per_rank]
        for b in range(self.start, self.steps):
            idx = mine[b * self.batch_size:(b + 1) * self.batch_size]
            yield [(int(i), int(aug_seeds[i])) for i in idx]


class SeededItems(Dataset):
    """Runs each training sample's random transforms under its own seed."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, item):
        i, s = item
        state = torch.get_rng_state()  # (torch.random.fork_rng + manual_seed cost 30x more)
        torch.default_generator.manual_seed(s)
        try:
            return self.ds[i]
        finally:
            torch.set_rng_state(state)


# ----------------------------------------------------------------------------- set-up
class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's default shown once: not appended where the help already states it, nor for
    None (the help says what happens) or on/off switches."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--model", required=True, help=f"one of {', '.join(models.MODELS)}")
    p.add_argument("--data", default="synthetic", help=f"one of {', '.join(data.DATASETS)}")
    p.add_argument("--data-root", default=None, help="dataset folder in its published layout, or your images for folder/csv (default: none; not needed for synthetic/shapes)")
    p.add_argument("--metric", default=None, choices=data.SINGLE_LABEL_METRICS,
                   help="task metric (default: the dataset's; folder/csv: roc_auc for two classes, else macro_recall)")
    p.add_argument("--n", type=int, default=None, help="WT-ST-n/m: first n module groups WT, the rest ST (default: N, full WT)")
    p.add_argument("--init", choices=["wt", "st", "ri"], default=None, help="shorthand: wt = n=N, st = n=0, ri = random init (default: from --n)")
    p.add_argument("--weights", default="imagenet", help="'imagenet' (the published checkpoint, from the torch.hub cache) or a checkpoint path, e.g. runs/x/best.pt")
    p.add_argument("--img-size", type=int, default=None, help="input size in pixels (default: the dataset's, 224 for the medical sets as in the recipe)")
    p.add_argument("--batch-size", type=int, default=64, help="global batch size (split over DDP processes)")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (Adam), reached after the warm-up")
    p.add_argument("--weight-decay", type=float, default=1e-5, help="on weights that are not 1-D and not biases")
    p.add_argument("--warmup", type=int, default=1000, help="linear warm-up iterations")
    p.add_argument("--epochs", type=int, default=100, help="maximum epochs")
    p.add_argument("--patience", type=int, default=10, help="validations (every half epoch) without improvement before stopping; counted after the warm-up")
    p.add_argument("--plateau-patience", type=int, default=3, help="validations without improvement before lr x 0.1; counted after the warm-up")
    p.add_argument("--clip", type=float, default=1.0, help="gradient clipping global norm (0: off)")
    p.add_argument("--seed", type=int, default=0, help="seed of the init, data order and augmentation")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the train/val/test split (kept fixed across --seed)")
    p.add_argument("--subset", type=int, default=None, help="use at most this many images per split (default: all; for quick runs)")
    p.add_argument("--out", default=None, help="run directory (default: runs/<model>-<data>-<init>-s<seed>)")
    p.add_argument("--runs-dir", default="runs", help="parent of the default run directory")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from last.pt (a finished run is skipped)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory (after every input is checked)")
    p.add_argument("--keep-last", action="store_true", help="keep last.pt (optimiser state, 3x the model) after the run finishes")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--amp", choices=["auto", "fp16", "bf16", "off"], default="auto",
                   help="mixed precision for training on CUDA (auto: bf16 if supported, else fp16); CPU and evaluation run float32")
    p.add_argument("--workers", type=int, default=None, help="data loader processes (default: 8 on CUDA, 0 on CPU)")
    p.add_argument("--cache-dir", default=None, help="where the pre-resized image cache lives (default: see data.py)")
    p.add_argument("--log-every", type=int, default=20, help="log the training loss every k iterations")
    p.error = lambda message: p.exit(2, f"train.py: error: {message} (see --help)\n")  # one line, no usage
    return p.parse_args(argv)


def check_numbers(args):
    """Range checks of the numeric flags (no I/O): a value the loop would crash on or silently
    replace is an error naming the flag."""
    def need(ok, flag, value, expected):
        if not ok:
            raise ValueError(f"{flag} {value}: expected {expected}")
    for flag, v, lo in (("--batch-size", args.batch_size, 1), ("--epochs", args.epochs, 1),
                        ("--patience", args.patience, 1), ("--plateau-patience", args.plateau_patience, 0),
                        ("--warmup", args.warmup, 0), ("--seed", args.seed, 0), ("--split-seed", args.split_seed, 0),
                        ("--log-every", args.log_every, 1), ("--subset", args.subset, 1),
                        ("--workers", args.workers, 0), ("--img-size", args.img_size, 8)):
        need(v is None or v >= lo, flag, v, f"an integer >= {lo}")
    need(math.isfinite(args.lr) and args.lr > 0, "--lr", args.lr, "a finite number > 0")
    need(math.isfinite(args.weight_decay) and args.weight_decay >= 0, "--weight-decay", args.weight_decay,
         "a finite number >= 0")
    need(math.isfinite(args.clip) and args.clip >= 0, "--clip", args.clip, "a finite number >= 0 (0: off)")


def check_device(flag):
    """--device names a device this machine has (checked before anything is written)."""
    if flag is None:
        return
    try:
        device = torch.device(flag)
    except RuntimeError:
        raise ValueError(f"--device {flag!r}: expected cpu, cuda or cuda:<index>") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {flag}: CUDA is not available on this machine (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {flag}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise ValueError(f"--device {flag!r}: expected cpu, cuda or cuda:<index>")


def resolve_config(args, world=1):
    """Check the flags and turn them into the settings saved in config.json."""
    check_numbers(args)
    if args.model not in models.MODELS:
        raise ValueError(f"--model {args.model!r}: expected one of {', '.join(models.MODELS)}")
    if args.data not in data.DATASETS:
        raise ValueError(f"--data {args.data!r}: expected one of {', '.join(data.DATASETS)}")
    img_size = args.img_size if args.img_size is not None else data.DEFAULT_IMG_SIZE[args.data]
    try:
        with torch.device("meta"):  # only the group count is needed: no memory, no init
            N = len(models.create_model(args.model, num_classes=2, img_size=img_size).wtst_groups())
    except ValueError as e:  # a size the model cannot take
        raise ValueError(f"--img-size {img_size}: {e}") from None
    init = args.init
    if init == "ri":
        if args.n is not None:
            raise ValueError("--init ri and --n exclude each other")
        n = None
    else:
        n = {"wt": N, "st": 0, None: N}[init] if args.n is None else args.n
        if init is not None and args.n is not None and n != {"wt": N, "st": 0}[init]:
            raise ValueError(f"--init {init} contradicts --n {args.n} (N={N} for {args.model})")
        if not 0 <= n <= N:
            raise ValueError(f"--n {n} is out of range for {args.model}: expected 0..{N}")
        init = "wt" if n == N else "st" if n == 0 else "wtst"
    if args.batch_size % world:
        raise ValueError(f"--batch-size {args.batch_size} must be divisible by the {world} processes")
    tag = "ri" if init == "ri" else f"n{n}"
    out = args.out or os.path.join(args.runs_dir, f"{args.model}-{data.display_name(args.data, args.data_root)}-{tag}-s{args.seed}")
    cfg = {k: v for k, v in vars(args).items() if k not in ("resume", "overwrite", "keep_last", "out", "runs_dir")}
    cfg.update(img_size=img_size, n=n, N=N, init=init, out=out, world_size=world,
               weights=None if init == "ri" else args.weights)
    return cfg


def versions():
    import torchvision
    return {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "numpy": np.__version__}


def build_model(cfg, num_classes):
    """Create the model and apply its initialisation; returns (model, init description)."""
    torch.manual_seed(cfg["seed"])  # the new head's init
    model = models.create_model(cfg["model"], num_classes=num_classes, img_size=cfg["img_size"])
    if cfg["init"] == "ri":
        random_init(model, seed=cfg["seed"])
        return model, ["random init (RI)"]
    head = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(model.head_name + ".")}
    report = models.load_pretrained(model, cfg["weights"])
    bad = [k for k, v in model.state_dict().items()
           if k in report["loaded"] and v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:  # ST statistics and training would turn them into NaN everywhere
        raise ValueError(f"--weights {cfg['weights']}: non-finite values (inf/NaN) in {len(bad)} tensor(s): "
                         f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}")
    pretrained = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(head, strict=False)  # the head is always newly initialised
    wtst_init(model, pretrained, cfg["n"], seed=cfg["seed"])
    lines = [f"weights: {report['source']} ({len(report['loaded'])} loaded, skipped: {report['skipped']})"]
    return model, lines + describe_init(model, cfg["n"])


def param_groups(model, weight_decay):
    """Weight decay on weights that are not 1-D and not biases."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class Schedule:
    """Linear warm-up over `warmup` iterations, then a ReduceLROnPlateau-style factor
    (x0.1 after `patience` validations without a new best). Validations inside the warm-up
    update the best but never count as bad: the plateau starts once the warm-up is over."""

    def __init__(self, lr, warmup, patience, factor=0.1):
        self.lr, self.warmup, self.patience, self.factor = lr, warmup, patience, factor
        self.best, self.bad, self.scale = -math.inf, 0, 1.0

    def lr_at(self, iteration):
        return self.lr * self.scale * min(1.0, (iteration + 1) / max(1, self.warmup))

    def step(self, metric, iteration):
        if metric > self.best:
            self.best, self.bad = metric, 0
        elif iteration > self.warmup:
            self.bad += 1
            if self.bad > self.patience:
                self.scale, self.bad = self.scale * self.factor, 0

    def state_dict(self):
        return {"best": self.best, "bad": self.bad, "scale": self.scale}

    def load_state_dict(self, s):
        self.best, self.bad, self.scale = s["best"], s["bad"], s["scale"]


# ----------------------------------------------------------------------------- the loop
def amp_dtype(cfg, device):
    if device.type != "cuda" or cfg["amp"] == "off":
        return None
    if cfg["amp"] == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp16": torch.float16, "bf16": torch.bfloat16}[cfg["amp"]]


@torch.no_grad()
def evaluate(model, loader, device, info, rank=0, world=1):
    """Scores (softmax or sigmoid) and labels over a loader; gathered over DDP ranks.
    Pass the unwrapped model: ranks may see different numbers of eval batches.
    Runs in float32 (no autocast), so validation and test figures do not depend on bf16/fp16
    rounding and equal analyze.py's float32 evaluation of the same checkpoint."""
    model.eval()
    scores, labels, loss_sum = [], [], 0.0
    for x, y in loader:
        x = x.to(device, non_blocking=True)
        logits = model(x).float()
        y = y.to(device)
        loss_sum += float(loss_fn(logits, y, info, reduction="sum"))
        scores.append((torch.sigmoid(logits) if info["multilabel"] else logits.softmax(1)).cpu())
        labels.append(y.cpu())
    s = torch.cat(scores).numpy() if scores else np.zeros((0, info["num_classes"]), np.float32)
    l = torch.cat(labels).numpy() if labels else np.zeros((0,), np.int64)
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, (s, l, loss_sum))
        s = np.concatenate([p[0] for p in parts]); l = np.concatenate([p[1] for p in parts])
        loss_sum = sum(p[2] for p in parts)
    model.train()
    return {info["metric"]: metrics.task_metric(info["metric"], s, l), "loss": loss_sum / max(1, len(l))}


def loss_fn(logits, y, info, reduction="mean"):
    if info["loss"] == "bce":
        return F.binary_cross_entropy_with_logits(logits, y.float(), reduction=reduction)
    return F.cross_entropy(logits, y, reduction=reduction)


def eval_loader(ds, batch_size, workers, pin, rank, world):
    if world > 1:  # every rank scores its own slice; evaluate() gathers them
        ds = torch.utils.data.Subset(ds, list(range(rank, len(ds), world)))
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=pin,
                      persistent_workers=workers > 0)


class Trainer:
    """The state of one run and the loop that advances it. `fit()` can be called on a
    fresh or a resumed state; `progress` is everything a resume needs besides weights."""

    def __init__(self, cfg, model, splits, info, out, device, rank=0, world=1, log=print):
        self.cfg, self.info, self.out, self.device = cfg, info, out, device
        self.rank, self.world, self.log = rank, world, log
        self.main = rank == 0
        train_ds, val_ds, test_ds = splits
        self.dtype = amp_dtype(cfg, device)
        model.to(device)
        # CNNs run channels_last on CUDA (faster convolutions); decided once, used per batch
        self.channels_last = device.type == "cuda" and model.prefers_channels_last
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model
        self.ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else model
        self.opt = torch.optim.Adam(param_groups(model, cfg["weight_decay"]), lr=cfg["lr"])
        self.sched = Schedule(cfg["lr"], cfg["warmup"], cfg["plateau_patience"])
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.dtype == torch.float16)
        workers = cfg["workers"] if cfg["workers"] is not None else (8 if device.type == "cuda" else 0)
        pin = device.type == "cuda"
        local_bs = cfg["batch_size"] // world
        self.sampler = EpochBatches(len(train_ds), local_bs, cfg["seed"], rank, world)
        self.train_loader = DataLoader(SeededItems(train_ds), batch_sampler=self.sampler, num_workers=workers,
                                       pin_memory=pin, persistent_workers=workers > 0)
        self.val_loader = eval_loader(val_ds, local_bs, workers, pin, rank, world)
        self.test_loader = eval_loader(test_ds, local_bs, workers, pin, rank, world)
        self.progress = {"epoch": 0, "pos": 0, "iteration": 0, "best_metric": -math.inf, "best_iteration": 0,
                         "bad_validations": 0, "log_bytes": 0, "images": 0, "train_seconds": 0.0,
                         "validations": 0}

    # -- checkpoints
    def state(self):
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {"format": FORMAT, "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                "schedule": self.sched.state_dict(), "scaler": self.scaler.state_dict(), "rng": rng,
                "progress": dict(self.progress), "config": self.cfg}

    def load_state(self, ck):
        self.model.load_state_dict(ck["model"])
        self.opt.load_state_dict(ck["optimizer"])
        self.sched.load_state_dict(ck["schedule"])
        self.scaler.load_state_dict(ck["scaler"])
        torch.set_rng_state(ck["rng"]["torch"])
        if "cuda" in ck["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(ck["rng"]["cuda"], self.device)
        self.progress = dict(ck["progress"])
        if self.main:  # drop log lines written after this checkpoint
            path = os.path.join(self.out, "log.jsonl")
            if os.path.exists(path):
                with open(path, "r+b") as f:
                    f.truncate(self.progress["log_bytes"])

    def write_log(self, record):
        if not self.main:
            return
        with open(os.path.join(self.out, "log.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            self.progress["log_bytes"] = f.tell()

    # -- one validation: log, schedule, best/last checkpoints, early stopping
    def validate(self):
        p, metric_name = self.progress, self.info["metric"]
        res = evaluate(self.model, self.val_loader, self.device, self.info, self.rank, self.world)
        m = res[metric_name]
        score = m if math.isfinite(m) else -math.inf
        self.sched.step(score, p["iteration"])
        p["validations"] += 1
        improved = score > p["best_metric"]
        if improved:
            p["best_metric"], p["best_iteration"], p["bad_validations"] = score, p["iteration"], 0
            if self.main:
                save_checkpoint(os.path.join(self.out, "best.pt"),
                                {"format": FORMAT, "model": self.model.state_dict(), "iteration": p["iteration"],
                                 "val": res, "config": self.cfg})
        elif p["iteration"] > self.cfg["warmup"]:  # early-stopping patience counts after the warm-up
            p["bad_validations"] += 1
        self.write_log({"iteration": p["iteration"], "epoch": p["epoch"] + p["pos"] / self.sampler.steps,
                        "val": res, "best": improved})
        self.log(f"it {p['iteration']:6d} ep {p['epoch'] + p['pos'] / self.sampler.steps:6.2f}  val {metric_name} "
                 f"{m:.4f}, val loss {res['loss']:.4f}{'  *best*' if improved else ''}")

    def save_last(self):
        if self.main:
            save_checkpoint(os.path.join(self.out, "last.pt"), self.state())

    def fit(self):
        """Train until max epochs or early stopping; returns the stop reason."""
        cfg, p, model = self.cfg, self.progress, self.ddp
        model.train()
        half = max(1, self.sampler.steps // 2)
        val_points = {half, self.sampler.steps}
        loss_acc, loss_n = torch.zeros((), device=self.device), 0
        while p["epoch"] < cfg["epochs"]:
            self.sampler.set_epoch(p["epoch"], p["pos"])
            t0 = time.perf_counter()
            bar = tqdm(self.train_loader, desc=f"epoch {p['epoch'] + 1}/{cfg['epochs']}", leave=False,
                       disable=None if self.main else True)  # shown on a terminal, off in logs
            for x, y in bar:
                x = x.to(self.device, non_blocking=True)
                y = y.to(self.device, non_blocking=True)
                if self.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                for g in self.opt.param_groups:
                    g["lr"] = self.sched.lr_at(p["iteration"])
                with torch.autocast(self.device.type, dtype=self.dtype) if self.dtype else nullcontext():
                    loss = loss_fn(model(x).float(), y, self.info)
                self.opt.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                if cfg["clip"] > 0:
                    self.scaler.unscale_(self.opt)
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg["clip"])
                self.scaler.step(self.opt)
                self.scaler.update()
                loss_acc += loss.detach()
                loss_n += 1
                p["iteration"] += 1
                p["pos"] += 1
                p["images"] += x.shape[0] * self.world
                at_val = p["pos"] in val_points
                if loss_n and (p["iteration"] % cfg["log_every"] == 0 or at_val):
                    if self.world > 1:  # log the global batch's loss, not rank 0's half
                        dist.all_reduce(loss_acc)
                        loss_acc /= self.world
                    mean_loss = float(loss_acc) / loss_n  # one sync per k iterations
                    if not math.isfinite(mean_loss):
                        p["train_seconds"] += time.perf_counter() - t0
                        return f"diverged: non-finite training loss ({mean_loss}) near iteration {p['iteration']}"
                    self.write_log({"iteration": p["iteration"], "train_loss": mean_loss,
                                    "lr": self.opt.param_groups[0]["lr"]})
                    loss_acc.zero_(); loss_n = 0
                if at_val:
                    p["train_seconds"] += time.perf_counter() - t0
                    if p["pos"] == self.sampler.steps:
                        p["epoch"], p["pos"] = p["epoch"] + 1, 0
                    self.validate()
                    self.save_last()
                    if p["bad_validations"] >= cfg["patience"]:
                        return f"early stopping: {cfg['patience']} validations without improvement"
                    t0 = time.perf_counter()
                    if p["pos"] == 0:
                        break  # the epoch is over; the sampler moves on
        return f"reached --epochs {cfg['epochs']}"

    def finish(self, reason, wall):
        """Test metrics of the best checkpoint, then summary.json."""
        p = self.progress
        best = os.path.join(self.out, "best.pt")
        if self.world > 1:
            dist.barrier()
        test = {}
        if os.path.exists(best):
            self.model.load_state_dict(models.read_checkpoint(best)["model"])
            test = evaluate(self.model, self.test_loader, self.device, self.info, self.rank, self.world)
        summary = {"model": self.cfg["model"], "data": self.cfg["data"], "init": self.cfg["init"],
                   "n": self.cfg["n"], "N": self.cfg["N"], "seed": self.cfg["seed"], "metric": self.info["metric"],
                   "best_val_metric": p["best_metric"] if math.isfinite(p["best_metric"]) else None,
                   "best_iteration": p["best_iteration"], "convergence_iteration": p["best_iteration"],
                   "test": test, "iterations": p["iteration"], "epochs_run": p["epoch"] + p["pos"] / self.sampler.steps,
                   "validations": p["validations"], "stop_reason": "diverged" if reason.startswith("diverged") else reason,
                   "stop_detail": reason, "wall_seconds": wall,
                   "train_seconds": p["train_seconds"],
                   "images_per_second": p["images"] / p["train_seconds"] if p["train_seconds"] > 0 else None}
        if self.main:
            rundir.save_json(os.path.join(self.out, "summary.json"), summary)
        return summary


# ----------------------------------------------------------------------------- main
def setup_distributed(device_flag):
    """(rank, world, device) from torchrun's environment; NCCL on GPU, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    want = device_flag or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(want)
    if device.type == "cuda":
        device = torch.device("cuda", local if world > 1 else (device.index or 0))
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cpu":  # share the cores instead of oversubscribing them
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    return rank, world, device


def existing_run(cfg, resume, overwrite):
    """What --out holds, checked without writing: 'fresh' (no run), 'replace' (--overwrite),
    'resume' (continue it) or 'finished'. Refuses folders whose config.json is not a run's."""
    out = cfg["out"]
    path = os.path.join(out, "config.json")
    if not os.path.exists(path):
        return "fresh"
    if not (resume or overwrite):
        raise ValueError(f"run directory {out} exists: pass --resume to continue it or --overwrite to replace it")
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is unreadable ({e}); not touching {out}: choose another --out") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("config"), dict):
        raise ValueError(f"{path} is not a train.py run's config; not touching {out}: choose another --out")
    if overwrite:
        return "replace"
    saved = doc["config"]
    ignore = {"workers", "device", "cache_dir", "log_every", "epochs", "patience", "out"}
    diff = [k for k in cfg if k not in ignore and saved.get(k) != cfg[k]]
    if diff:
        raise ValueError(f"--resume: settings differ from {path}: "
                         + ", ".join(f"{k}={cfg[k]!r} (saved {saved.get(k)!r})" for k in diff))
    summary = os.path.join(out, "summary.json")
    if not os.path.exists(summary):
        return "resume"
    try:
        with open(summary) as f:
            s = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{summary} is unreadable ({e}); pass --overwrite to run {out} again") from None
    if isinstance(s, dict) and s.get("stop_reason") == "diverged":
        raise ValueError(f"--resume: {out} diverged ({s.get('stop_detail', 'non-finite training loss')}); it cannot "
                         "continue: run it again with --overwrite (e.g. with a smaller --lr)")
    return "finished"


def load_inputs(cfg):
    """(splits, info, model, init lines): the data and the initialised model, with every missing
    or bad input of a start reported at once in one error, before anything is written."""
    problems, info = [], None
    try:
        *splits, info = data.load_splits(cfg)
    except (ValueError, OSError, csv.Error) as e:
        root = cfg["data_root"]
        problems.append(f"--data {cfg['data']} " + (f"--data-root {root}" if root else "(no --data-root given)")
                        + f": {e}")
    if info is None:  # the data failed: still say whether the weights are in place
        weights = cfg["weights"]
        if weights == "imagenet":
            path = models.imagenet_path(cfg["model"])
            if not os.path.isfile(path):
                problems.append(f"--weights imagenet: {path} is missing (downloaded from "
                                f"{models.PRETRAINED_URLS[cfg['model']]} on first use; without network place it there)")
        elif weights is not None and not os.path.isfile(weights):
            problems.append(f"--weights {weights}: no such checkpoint file (expected 'imagenet' or a path)")
        raise ValueError("; ".join(problems))
    try:
        model, init_lines = build_model(cfg, info["num_classes"])
    except (ValueError, OSError) as e:
        raise ValueError(str(e) if str(e).startswith("--weights") else f"--weights {cfg['weights']}: {e}") from None
    return splits, info, model, init_lines


def remove_leftovers(out):
    """Temp files of killed writers (`*.tmp<pid>`, pid gone) in the run and its analysis folder."""
    for folder in (out, os.path.join(out, "analysis")):
        if os.path.isdir(folder):
            rundir.remove_stale_tmp(folder)


def prepare_dir(out, state):
    """The first write of a start: stale temp files go, --overwrite removes the old run's files
    and analyses (nothing else in the folder), the folder is created."""
    remove_leftovers(out)
    if state == "replace":
        for f in RUN_FILES:
            if os.path.exists(os.path.join(out, f)):
                os.remove(os.path.join(out, f))
        shutil.rmtree(os.path.join(out, "analysis"), ignore_errors=True)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:  # e.g. a read-only or virtual file system that os.access cannot tell
        raise ValueError(f"--out {out}: cannot create the folder ({e.strerror})") from None


def main(argv=None):
    args = parse_args(argv)
    world, log = 1, print
    try:
        check_device(args.device)
        rank, world, device = setup_distributed(args.device)
        main_rank = rank == 0
        log = print if main_rank else (lambda *a, **k: None)
        cfg = resolve_config(args, world)
        out = cfg["out"]
        started = time.time()
        rundir.check_writable_dir(out, "--out")
        state = existing_run(cfg, args.resume, args.overwrite)
        last = os.path.join(out, "last.pt")
        if state == "finished":
            if main_rank:
                remove_leftovers(out)
                if not args.keep_last and os.path.exists(last):  # killed right after its summary
                    os.remove(last)
            log(f"{out}: already finished (summary.json exists)")
            return 0
        splits, info, model, init_lines = load_inputs(cfg)
        if main_rank and len(splits[0]) < cfg["batch_size"]:  # fine for a smoke test, surprising in a study
            print(f"train.py: warning: the training set has {len(splits[0])} images, fewer than one batch "
                  f"(--batch-size {cfg['batch_size']}): every epoch is one partial batch of {len(splits[0])}",
                  file=sys.stderr)
        # -- every input is checked: the first write is below
        if main_rank:
            prepare_dir(out, state)
        trainer = Trainer(cfg, model, splits, info, out, device, rank, world, log)
        if state == "resume" and os.path.exists(last):
            trainer.load_state(models.read_checkpoint(last))
            log(f"resumed {out} at iteration {trainer.progress['iteration']}")
        elif main_rank:
            if state == "resume":  # killed before its first checkpoint: start over
                for f in ("best.pt", "log.jsonl"):
                    if os.path.exists(os.path.join(out, f)):
                        os.remove(os.path.join(out, f))
            # init.pt before config.json: a config.json always comes with its init.pt
            save_checkpoint(os.path.join(out, "init.pt"), {"format": FORMAT, "model": model.state_dict(),
                                                           "config": cfg})
            rundir.save_json(os.path.join(out, "config.json"),
                           {"config": cfg, "data": {k: v for k, v in info.items() if k != "sizes"},
                            "sizes": [len(d) for d in splits], "init": init_lines, "versions": versions(),
                            "facts": {"token_mixing": model.token_mixing}, "format": FORMAT})
        init = {"ri": "RI", "wt": "WT", "st": "ST", "wtst": "WT-ST"}[cfg["init"]]
        init += "" if cfg["init"] == "ri" else f" n={cfg['n']}/{cfg['N']}"
        log(f"{out}: {cfg['model']} on {cfg['data']} ({len(splits[0])}/{len(splits[1])}/{len(splits[2])} images), "
            f"init {init}, {device}, " + (f"amp {str(trainer.dtype).split('.')[-1]}" if trainer.dtype else "float32"))
        for line in init_lines:
            log("  " + line)
        reason = trainer.fit()
        summary = trainer.finish(reason, time.time() - started)
        if main_rank and not args.keep_last and os.path.exists(last):  # a finished run needs no optimiser state
            os.remove(last)
        if summary["stop_reason"] == "diverged":
            kept = (f"best.pt holds the best checkpoint before it (iteration {summary['best_iteration']})"
                    if os.path.exists(os.path.join(out, "best.pt")) else "no checkpoint was saved before it")
            raise ValueError(f"{out}: {reason}; {kept}; summary.json has stop_reason 'diverged' "
                             "(try a smaller --lr, then --overwrite)")
        log(f"stopped: {reason}; best val {info['metric']} {summary['best_val_metric']} at iteration "
            f"{summary['best_iteration']}; test {summary['test']}")
        return 0
    except (ValueError, OSError, csv.Error) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
