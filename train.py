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
import hashlib
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
from rundir import BEST, CONFIG, FORMAT, INIT, LAST, LOG, RUN_FILES


# ----------------------------------------------------------------------------- files
def save_checkpoint(path, obj):
    """torch.save through rundir's atomic write: serialised in memory first, so its size is
    known and a full disk is one error naming the file, never a half-written checkpoint."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    rundir.write_bytes(path, buf.getbuffer())


def state_checksum(sd):
    """sha256 of a state dict's names, dtypes, shapes and values (not of the file, whose bytes
    depend on the torch version): config.json records init.pt's, to check it on --resume or
    rebuild it exactly."""
    h = hashlib.sha256()
    for k in sorted(sd):
        v = sd[k].detach().cpu().contiguous()
        h.update(f"{k}|{v.dtype}|{tuple(v.shape)}|".encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_weights(sd, model, where):
    """A checkpoint's state dict fits the run's model exactly (names, shapes, dtypes); anything
    else (another model's file, a foreign key) is one line naming the file."""
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{where}: holds no state dict of tensors under 'model'")
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    other = [k for k in own if k in sd and (sd[k].shape != own[k].shape or sd[k].dtype != own[k].dtype)]
    if missing or unexpected or other:
        parts = [f"{what} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}" for what, keys in
                 (("missing", missing), ("unexpected", unexpected), ("other shape or type:", other)) if keys]
        raise ValueError(f"{where}: its weights do not fit this run's model ({'; '.join(parts)})")


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
    p.add_argument("--data-root", default=None,
                   help="dataset folder in its published layout, or your images for folder/csv (default: none; not "
                        "needed for synthetic/shapes)")
    p.add_argument("--metric", default=None, choices=data.SINGLE_LABEL_METRICS,
                   help="task metric (default: the dataset's; folder/csv: roc_auc for two classes, else macro_recall)")
    p.add_argument("--n", type=int, default=None,
                   help="WT-ST-n/m: first n module groups WT, the rest ST (default: N, full WT)")
    p.add_argument("--init", choices=["wt", "st", "ri"], default=None,
                   help="shorthand: wt = n=N, st = n=0, ri = random init (default: from --n)")
    p.add_argument("--weights", default="imagenet",
                   help="'imagenet' (the published checkpoint, from the torch.hub cache) or a checkpoint path, e.g. "
                        "runs/x/best.pt")
    p.add_argument("--img-size", type=int, default=None,
                   help="input size in pixels (default: the dataset's, 224 for the medical sets as in the recipe)")
    p.add_argument("--batch-size", type=int, default=64, help="global batch size (split over DDP processes)")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (Adam), reached after the warm-up")
    p.add_argument("--weight-decay", type=float, default=1e-5, help="on weights that are not 1-D and not biases")
    p.add_argument("--warmup", type=int, default=1000, help="linear warm-up iterations")
    p.add_argument("--epochs", type=int, default=100, help="maximum epochs")
    p.add_argument("--patience", type=int, default=10,
                   help="validations (every half epoch) without improvement before stopping; counted after the "
                        "warm-up")
    p.add_argument("--plateau-patience", type=int, default=3,
                   help="lr x 0.1 once more than this many validations in a row bring no improvement (PyTorch's "
                        "ReduceLROnPlateau patience: with 3, at the 4th); counted after the warm-up")
    p.add_argument("--clip", type=float, default=1.0, help="gradient clipping global norm (0: off)")
    p.add_argument("--seed", type=int, default=0, help="seed of the init, data order and augmentation")
    p.add_argument("--split-seed", type=int, default=0,
                   help="seed of the train/val/test split (kept fixed across --seed)")
    p.add_argument("--subset", type=int, default=None,
                   help="use at most this many images per split (default: all; for quick runs)")
    p.add_argument("--out", default=None, help="run directory (default: runs/<model>-<data>-<init>-s<seed>)")
    p.add_argument("--runs-dir", default="runs", help="parent of the default run directory")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from last.pt (a finished run is skipped)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing run directory (after every input is checked)")
    p.add_argument("--keep-last", action="store_true",
                   help="keep last.pt (optimiser state, 3x the model) after the run finishes")
    p.add_argument("--sync-bn", action="store_true",
                   help="DDP: BatchNorm statistics over the global batch (SyncBatchNorm, CUDA only), as one GPU "
                        "computes them; without it each process normalises over its own share")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--amp", choices=["auto", "fp16", "bf16", "off"], default="auto",
                   help="mixed precision for training on CUDA (auto: bf16 if supported, else fp16); "
                        "CPU and evaluation run float32")
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
    default_name = f"{args.model}-{data.display_name(args.data, args.data_root)}-{tag}-s{args.seed}"
    out = args.out or os.path.join(args.runs_dir, default_name)
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
    """Linear warm-up over `warmup` iterations, then the rule of PyTorch's ReduceLROnPlateau
    (mode max, factor 0.1, threshold 0): x0.1 once more than `patience` validations in a row
    bring no new best (patience 2: at the 3rd), the count then starting again. Validations inside the
    warm-up update the best but never count as bad: the plateau starts once the warm-up is over."""

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


def precision_name(dtype):
    """The precision training runs in, as config.json records it (a resume must match it)."""
    return {None: "float32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


@torch.no_grad()
def evaluate(model, loader, device, info, rank=0, world=1):
    """Scores (softmax or sigmoid) and labels over a loader; gathered over DDP ranks.
    Pass the unwrapped model: ranks may see different numbers of eval batches.
    Runs in float32 (no autocast, and no TF32: metrics.exact_float32), so validation and test
    figures do not depend on bf16/fp16 rounding or the GPU, and equal analyze.py's evaluation of
    the same checkpoint. The loss has the training loss's reduction (mean over images, and over
    classes for the multi-label BCE); a multi-label task also gets its per-class AUCs."""
    model.eval()
    scores, labels, loss_sum, count = [], [], 0.0, 0
    with metrics.exact_float32():
        for x, y in loader:
            x = x.to(device, non_blocking=True)
            logits = model(x).float()
            y = y.to(device)
            loss_sum += float(loss_fn(logits, y, info, reduction="sum"))
            count += y.numel()  # images (cross-entropy) or image-class pairs (BCE): what "mean" divides by
            scores.append((torch.sigmoid(logits) if info["multilabel"] else logits.softmax(1)).cpu())
            labels.append(y.cpu())
    s = torch.cat(scores).numpy() if scores else np.zeros((0, info["num_classes"]), np.float32)
    l = torch.cat(labels).numpy() if labels else np.zeros((0,), np.int64)
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, (s, l, loss_sum, count))
        s = np.concatenate([p[0] for p in parts])
        l = np.concatenate([p[1] for p in parts])
        loss_sum, count = sum(p[2] for p in parts), sum(p[3] for p in parts)
    model.train()
    res = {info["metric"]: metrics.task_metric(info["metric"], s, l), "loss": loss_sum / max(1, count)}
    if info["multilabel"]:  # in the order of config.json's data.classes; NaN (null) for a class with one label value
        res["per_class_auc"] = metrics.per_class_auc(s, l)
    return res


def loss_fn(logits, y, info, reduction="mean"):
    if info["loss"] == "bce":
        return F.binary_cross_entropy_with_logits(logits, y.float(), reduction=reduction)
    return F.cross_entropy(logits, y, reduction=reduction)


def eval_loader(ds, batch_size, workers, pin, rank, world):
    if world > 1:  # every rank scores its own slice; evaluate() gathers them
        ds = torch.utils.data.Subset(ds, list(range(rank, len(ds), world)))
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=pin,
                      persistent_workers=workers > 0, generator=torch.Generator())


def seed_training(seed, rank):
    """Seed the generators dropout and drop-path draw from (CPU, and CUDA where used), one stream
    per DDP rank: ranks draw different masks, as one GPU would over the whole batch, and a seed
    draws the same masks again. The stream does not depend on how many numbers the init drew, so
    runs of one seed with different inits see the same masks. Data order and augmentation have
    their own seeds (EpochBatches), the same on every rank."""
    torch.manual_seed(int(np.random.default_rng([seed, rank, 2]).integers(2**62)))


def has_batchnorm(model):
    """Whether the model normalises over the batch (what --sync-bn changes under DDP)."""
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


class Trainer:
    """The state of one run and the loop that advances it. `fit()` can be called on a
    fresh or a resumed state; `progress` is everything a resume needs besides weights."""

    def __init__(self, cfg, model, splits, info, out, device, rank=0, world=1, log=print):
        self.cfg, self.info, self.out, self.device = cfg, info, out, device
        self.rank, self.world, self.log = rank, world, log
        self.main = rank == 0
        train_ds, val_ds, test_ds = splits
        self.dtype = amp_dtype(cfg, device)
        if cfg.get("sync_bn") and world > 1:  # BatchNorm over the global batch (--sync-bn); same state-dict keys
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
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
        # every loader draws its iterators' seed from its own generator, not from the global one
        # dropout and drop-path use: a resumed run creates an iterator the uninterrupted run did
        # not, and must not shift their masks (items are seeded by SeededItems, not by it)
        self.train_loader = DataLoader(SeededItems(train_ds), batch_sampler=self.sampler, num_workers=workers,
                                       pin_memory=pin, persistent_workers=workers > 0,
                                       generator=torch.Generator().manual_seed(cfg["seed"]))
        self.val_loader = eval_loader(val_ds, local_bs, workers, pin, rank, world)
        self.test_loader = eval_loader(test_ds, local_bs, workers, pin, rank, world)
        self.progress = {"epoch": 0, "pos": 0, "iteration": 0, "best_metric": -math.inf, "best_iteration": 0,
                         "bad_validations": 0, "log_bytes": 0, "images": 0, "train_seconds": 0.0,
                         "validations": 0, "best_val": None}
        self.log_cut = False  # log lines after the state this start continues from: cut at the first write
        self.run_id = None    # config.json's, also written into last.pt and best.pt (checked on --resume)
        seed_training(cfg["seed"], rank)
        if world > 1 and not cfg.get("sync_bn") and has_batchnorm(model):
            log(f"note: BatchNorm statistics are per process, over {local_bs} images (--sync-bn: over the "
                f"global batch of {cfg['batch_size']}, as in the paper's single-GPU runs)")

    # -- checkpoints
    def rng_states(self):
        """The CPU (and CUDA) generator states of every rank, gathered for last.pt (all ranks call)."""
        mine = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            mine["cuda"] = torch.cuda.get_rng_state(self.device)
        if self.world == 1:
            return [mine]
        states = [None] * self.world
        dist.all_gather_object(states, mine)
        return states

    def state(self):
        return {"format": FORMAT, "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                "schedule": self.sched.state_dict(), "scaler": self.scaler.state_dict(), "rng": self.rng_states(),
                "progress": dict(self.progress), "config": self.cfg, "run_id": self.run_id}

    def load_state(self, ck, path):
        """Continue from last.pt; anything in it that does not fit this run (a copy of best.pt,
        another model's weights, another precision, a damaged progress) is one line naming it."""
        where = f"--resume: {path}"
        need = ("model", "optimizer", "schedule", "scaler", "rng", "progress")
        lacking = [k for k in need if not isinstance(ck, dict) or k not in ck]
        if lacking:
            hint = " (a copy of best.pt or init.pt?)" if isinstance(ck, dict) and "model" in ck else ""
            raise ValueError(f"{where}: not a resume checkpoint, it has no {', '.join(lacking)}{hint}; "
                             "run again with --overwrite")
        check_weights(ck["model"], self.model, where)
        if ck.get("run_id") not in (None, self.run_id):  # (files of older runs have none)
            raise ValueError(f"{where}: belongs to another run (run_id {ck['run_id']}, config.json's {self.run_id}); "
                             "run again with --overwrite")
        if bool(ck["scaler"]) != self.scaler.is_enabled():  # older runs, whose config.json has no precision
            raise ValueError(f"{where}: was trained {'with' if ck['scaler'] else 'without'} fp16 loss scaling; this "
                             f"start trains in {precision_name(self.dtype)} on {self.device.type}: resume it with "
                             "the --device and --amp it was started with")
        rng = ck["rng"] if isinstance(ck["rng"], list) else [ck["rng"]]  # older files: one process, a dict
        if len(rng) != self.world:
            raise ValueError(f"{where}: saved by {len(rng)} process(es), this start has {self.world}")
        check_progress(ck["progress"], self.sampler.steps, where)
        try:
            self.model.load_state_dict(ck["model"])
            self.opt.load_state_dict(ck["optimizer"])
            for p, st in self.opt.state.items():
                if any(torch.is_tensor(v) and v.ndim and v.shape != p.shape for v in st.values()):
                    raise ValueError("optimizer state of another shape than its parameter")
            s = ck["schedule"]
            if not (isinstance(s, dict) and rundir.is_number(s.get("best"), finite=False)
                    and rundir.is_int(s.get("bad"), 0) and rundir.is_number(s.get("scale")) and s["scale"] > 0):
                raise ValueError("schedule is not {best, bad, scale}")
            self.sched.load_state_dict(s)
            self.scaler.load_state_dict(ck["scaler"])
            torch.set_rng_state(rng[self.rank]["torch"])
            if "cuda" in rng[self.rank] and self.device.type == "cuda":
                torch.cuda.set_rng_state(rng[self.rank]["cuda"], self.device)
        except (ValueError, KeyError, TypeError, RuntimeError, IndexError, AttributeError) as e:
            raise ValueError(f"{where}: does not fit this run ({str(e).strip().splitlines()[0][:200]}); "
                             "run again with --overwrite") from None
        self.progress = dict(ck["progress"])
        self.progress.setdefault("best_val", None)

    def write_log(self, record):
        """One line of log.jsonl (undefined numbers as null); a full disk is an error that leaves
        the log whole. The first line of a start cuts the lines a killed start wrote after the
        state it continues from (they are written again)."""
        if not self.main:
            return
        path = os.path.join(self.out, LOG)
        if not self.log_cut:
            if os.path.exists(path) and os.path.getsize(path) > self.progress["log_bytes"]:
                os.truncate(path, self.progress["log_bytes"])
            self.log_cut = True
        self.progress["log_bytes"] = rundir.append_line(path, json.dumps(rundir.json_safe(record), allow_nan=False))

    # -- one validation: log, schedule, early-stopping count
    def validate(self):
        """Score the validation split; returns whether it is a new best."""
        p, metric_name = self.progress, self.info["metric"]
        res = evaluate(self.model, self.val_loader, self.device, self.info, self.rank, self.world)
        m = res[metric_name]
        score = m if math.isfinite(m) else -math.inf
        self.sched.step(score, p["iteration"])
        p["validations"] += 1
        improved = score > p["best_metric"]
        if improved:
            p["best_metric"], p["best_iteration"], p["bad_validations"], p["best_val"] = score, p["iteration"], 0, res
        elif p["iteration"] > self.cfg["warmup"]:  # early-stopping patience counts after the warm-up
            p["bad_validations"] += 1
        self.write_log({"iteration": p["iteration"], "epoch": p["epoch"] + p["pos"] / self.sampler.steps,
                        "val": res, "best": improved})
        self.log(f"it {p['iteration']:6d} ep {p['epoch'] + p['pos'] / self.sampler.steps:6.2f}  val {metric_name} "
                 f"{m:.4f}, val loss {res['loss']:.4f}{'  *best*' if improved else ''}")
        return improved

    def best_checkpoint(self):
        """best.pt's content: the model now, which is the best so far (just after an improvement)."""
        p = self.progress
        return {"format": FORMAT, "model": self.model.state_dict(), "iteration": p["best_iteration"],
                "val": p["best_val"], "config": self.cfg, "run_id": self.run_id}

    def save_last(self):
        state = self.state()  # every rank: their generator states are gathered
        if self.main:
            save_checkpoint(os.path.join(self.out, LAST), state)

    def save_best(self):
        """After last.pt: a start killed (or out of space) between the two finds the best model
        in last.pt and writes best.pt from it on --resume."""
        if self.main:
            save_checkpoint(os.path.join(self.out, BEST), self.best_checkpoint())

    def fit(self):
        """Train until max epochs or early stopping; returns the stop reason."""
        cfg, p, model = self.cfg, self.progress, self.ddp
        if p["bad_validations"] >= cfg["patience"]:  # resumed from the validation that stopped it
            return f"early stopping: {cfg['patience']} validations without improvement"
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
                    loss_acc.zero_()
                    loss_n = 0
                if at_val:
                    p["train_seconds"] += time.perf_counter() - t0
                    if p["pos"] == self.sampler.steps:
                        p["epoch"], p["pos"] = p["epoch"] + 1, 0
                    improved = self.validate()
                    self.save_last()
                    if improved:
                        self.save_best()
                    if p["bad_validations"] >= cfg["patience"]:
                        return f"early stopping: {cfg['patience']} validations without improvement"
                    t0 = time.perf_counter()
                    if p["pos"] == 0:
                        break  # the epoch is over; the sampler moves on
        return f"reached --epochs {cfg['epochs']}"

    def finish(self, reason, wall):
        """Test metrics of the best checkpoint, then summary.json."""
        p = self.progress
        best = os.path.join(self.out, BEST)
        if self.world > 1:
            dist.barrier()
        test = {}
        if p["best_iteration"] > 0:  # a validation saved best.pt
            ck = models.read_checkpoint(best)
            check_weights(ck.get("model") if isinstance(ck, dict) else None, self.model, best)
            self.model.load_state_dict(ck["model"])
            test = evaluate(self.model, self.test_loader, self.device, self.info, self.rank, self.world)
        summary = {"model": self.cfg["model"], "data": self.cfg["data"], "init": self.cfg["init"],
                   "n": self.cfg["n"], "N": self.cfg["N"], "seed": self.cfg["seed"], "metric": self.info["metric"],
                   "best_val_metric": p["best_metric"] if math.isfinite(p["best_metric"]) else None,
                   "best_iteration": p["best_iteration"], "convergence_iteration": p["best_iteration"],
                   "test": test, "iterations": p["iteration"],
                   "epochs_run": p["epoch"] + p["pos"] / self.sampler.steps,
                   "validations": p["validations"],
                   "stop_reason": "diverged" if reason.startswith("diverged") else reason,
                   "stop_detail": reason, "wall_seconds": wall,
                   "train_seconds": p["train_seconds"],
                   "images_per_second": p["images"] / p["train_seconds"] if p["train_seconds"] > 0 else None}
        if self.main:
            rundir.save_json(os.path.join(self.out, "summary.json"), summary)
        return summary


def check_progress(p, steps, where):
    """last.pt's progress record: every field of the right type and range."""
    ints = ("epoch", "pos", "iteration", "best_iteration", "bad_validations", "log_bytes", "images", "validations")
    ok = (isinstance(p, dict) and all(rundir.is_int(p.get(k), 0, rundir.MAX_INT) for k in ints)
          and rundir.is_number(p.get("train_seconds")) and rundir.is_number(p.get("best_metric"), finite=False)
          and not math.isnan(p["best_metric"]) and p["pos"] < steps and p["best_iteration"] <= p["iteration"]
          and (p.get("best_val") is None or isinstance(p["best_val"], dict)))
    if not ok:
        raise ValueError(f"{where}: its progress record is damaged or of another run (expected epoch, pos < {steps}, "
                         "iteration, best_metric, ... as train.py writes them); run again with --overwrite")


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


IGNORED = ("workers", "device", "cache_dir", "log_every", "out")  # change nothing the run computes
RECORDED = ("epochs", "patience")        # may change on --resume: config.json records the change
RUNTIME = ("precision", "device_type")   # resolved on this machine: a resume must resolve the same
NEW_KEYS = {"sync_bn": False}            # settings added later: an older config.json means their default


def existing_run(cfg, resume, overwrite):
    """What --out holds, checked without writing: {"state": 'fresh' (no run), 'replace'
    (--overwrite), 'resume' (continue it) or 'finished'; "doc": config.json; "changes": the
    RECORDED settings this --resume changes, {name: (saved, new)}}. A folder with run files but
    no config.json, or whose config.json is not a run's, is refused."""
    out = cfg["out"]
    if not os.path.exists(os.path.join(out, CONFIG)):
        present = rundir.has_run_files(out) if os.path.isdir(out) else []
        if present:
            raise ValueError(f"--out {out}: it holds {', '.join(present)} but no {CONFIG}, so it is no run train.py "
                             "can resume or replace; choose another --out (or remove the folder)")
        return {"state": "fresh", "doc": None, "changes": {}}
    if not (resume or overwrite):
        raise ValueError(f"run directory {out} exists: pass --resume to continue it or --overwrite to replace it")
    try:
        doc = rundir.read_config(out, "--out")
    except ValueError as e:
        raise ValueError(f"{e}; not touching {out}: choose another --out") from None
    if overwrite:
        return {"state": "replace", "doc": doc, "changes": {}}
    saved, path = doc["config"], os.path.join(out, CONFIG)
    diff = [k for k in cfg if k not in IGNORED + RECORDED + RUNTIME if saved.get(k, NEW_KEYS.get(k)) != cfg[k]]
    if diff:
        raise ValueError(f"--resume: settings differ from {path}: "
                         + ", ".join(f"{k}={cfg[k]!r} (saved {saved.get(k)!r})" for k in diff))
    if any(k in saved and saved[k] != cfg[k] for k in RUNTIME):
        raise ValueError(f"--resume: {out} trains in {saved.get('precision')} on {saved.get('device_type')} "
                         f"({CONFIG}); this start would train in {cfg['precision']} on {cfg['device_type']}: "
                         "resume it with the --device and --amp that give the same")
    changes = {k: (saved[k], cfg[k]) for k in RECORDED if k in saved and saved[k] != cfg[k]}
    try:
        summary = rundir.read_summary(out, doc["data"].get("metric"), "--out")
    except ValueError as e:
        raise ValueError(f"{e}; pass --overwrite to run {out} again") from None
    if summary is None:
        return {"state": "resume", "doc": doc, "changes": changes}
    if summary.get("stop_reason") == "diverged":
        raise ValueError(f"--resume: {out} diverged ({summary.get('stop_detail') or 'non-finite training loss'}); it "
                         "cannot continue: run it again with --overwrite (e.g. with a smaller --lr)")
    return {"state": "finished", "doc": doc, "changes": changes}


def check_init(out, doc, model):
    """--resume: init.pt is this run's (config.json records its checksum), or can be rebuilt
    exactly (it is a function of the seed and the weights, and the rebuilt model has that
    checksum). Returns None, or the init.pt to write; anything else is one line."""
    path, want = os.path.join(out, INIT), doc.get("init_sha256")
    try:
        ck = models.read_checkpoint(path)
        check_weights(ck.get("model") if isinstance(ck, dict) else None, model, path)
        if want is None or state_checksum(ck["model"]) == want:
            return None
        why = f"holds other weights than {CONFIG} records (init_sha256)"
    except FileNotFoundError:
        why = "is missing"
    except ValueError as e:
        why = f"is unusable ({e})"
    if want is None:
        raise ValueError(f"--resume: {path} {why}, and this older run's {CONFIG} records no checksum to rebuild it "
                         "against; run it again with --overwrite")
    if state_checksum(model.state_dict()) != want:
        raise ValueError(f"--resume: {path} {why}, and rebuilding it from --seed and --weights gives other weights "
                         f"than {CONFIG} records (init_sha256): has the --weights file changed? Run again with "
                         "--overwrite")
    return {"format": FORMAT, "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "config": doc["config"]}


def check_log(out, progress):
    """--resume from last.pt: log.jsonl holds at least the lines last.pt counts (log_bytes)."""
    path, need = os.path.join(out, LOG), progress["log_bytes"]
    if need == 0:
        return
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(need - 1)
            whole = size >= need and f.read(1) == b"\n"
    except FileNotFoundError:
        raise ValueError(f"--resume: {path} is missing, and last.pt continues after its first {need} bytes: the "
                         "run's first log lines are lost; run it again with --overwrite") from None
    except OSError as e:
        raise ValueError(f"--resume: {path}: unreadable ({e.strerror})") from None
    if not whole:
        raise ValueError(f"--resume: {path} does not hold the {need} bytes of whole lines last.pt counts "
                         f"({size} bytes): cut or edited; run the run again with --overwrite")


def check_best(out, trainer):
    """--resume from last.pt: best.pt holds the best model last.pt knows of. Returns None, or
    the best.pt to write when the best is the model in last.pt (a start stopped between the
    two writes); anything else is one line naming best.pt."""
    p, path = trainer.progress, os.path.join(out, BEST)
    if p["best_iteration"] == 0:
        return None
    try:
        ck = models.read_checkpoint(path)
        check_weights(ck.get("model") if isinstance(ck, dict) else None, trainer.model, path)
        got = ck.get("iteration")
        if ck.get("run_id") not in (None, trainer.run_id):
            why = f"belongs to another run (run_id {ck['run_id']})"
        elif got == p["best_iteration"]:
            return None
        else:
            why = f"holds iteration {got!r}"
    except FileNotFoundError:
        why = "is missing"
    except ValueError as e:
        why = f"is unusable ({e})"
    if p["best_iteration"] == p["iteration"]:
        return trainer.best_checkpoint()
    raise ValueError(f"--resume: {path} {why}, but last.pt's best is iteration {p['best_iteration']}: the best "
                     "checkpoint is lost; run the run again with --overwrite")


def file_stamp(path):
    try:
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns
    except OSError:
        return None


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
    """The first write of a start (under the lock): stale temp files go, --overwrite removes the
    old run's files and analyses (nothing else in the folder)."""
    remove_leftovers(out)
    if state == "replace":
        for f in RUN_FILES:
            if os.path.exists(os.path.join(out, f)):
                os.remove(os.path.join(out, f))
        shutil.rmtree(os.path.join(out, "analysis"), ignore_errors=True)


def create_run(out, cfg, info, splits, init_lines, model, init_sha):
    """config.json (with the run's identity and init.pt's checksum), then init.pt. config.json
    first: a start killed between the two leaves a run whose init.pt --resume rebuilds and
    checks. A failed write (a full disk) removes what this start wrote, so the same command
    works again once there is space."""
    doc = {"format": FORMAT, "run_id": rundir.new_run_id(), "config": cfg,
           "data": {k: v for k, v in info.items() if k != "sizes"}, "sizes": [len(d) for d in splits],
           "init": init_lines, "init_sha256": init_sha, "versions": versions(),
           "facts": {"token_mixing": model.token_mixing}}
    try:
        rundir.save_json(os.path.join(out, CONFIG), doc)
        save_checkpoint(os.path.join(out, INIT), {"format": FORMAT, "model": model.state_dict(), "config": cfg})
    except (ValueError, OSError):
        for f in (INIT, CONFIG):
            if os.path.exists(os.path.join(out, f)):
                os.remove(os.path.join(out, f))
        raise
    return doc["run_id"]


def record_changes(out, doc, changes, iteration):
    """--resume with another --epochs / --patience: config.json now says what the run trains to,
    and "resumes" when it changed (rewritten atomically, before training goes on)."""
    doc = dict(doc, config=dict(doc["config"], **{k: new for k, (_, new) in changes.items()}))
    doc["resumes"] = (doc["resumes"] if isinstance(doc.get("resumes"), list) else []) + [
        {"iteration": iteration, **{k: {"from": old, "to": new} for k, (old, new) in changes.items()}}]
    rundir.save_json(os.path.join(out, CONFIG), doc)


def check_sync_bn(args):
    """--sync-bn under DDP needs CUDA: PyTorch's SyncBatchNorm has no CPU implementation."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.sync_bn and world > 1 and torch.device(device).type != "cuda":
        raise ValueError("--sync-bn: PyTorch's SyncBatchNorm runs on CUDA devices only, this DDP run is on the "
                         "CPU (leave the flag out)")


def recheck(cfg, args, run, stamp):
    """Under the lock: the run is still what was checked (another writer may have finished,
    replaced or continued it in the meantime)."""
    again = existing_run(cfg, args.resume, args.overwrite)
    ident = lambda r: (r["state"], (r["doc"] or {}).get("run_id"))
    if ident(again) != ident(run) or file_stamp(os.path.join(cfg["out"], LAST)) != stamp:
        raise ValueError(f"--out {cfg['out']}: another process changed the run while this one was checking it; "
                         "run the same command again")


def drop_new_folder(out, lock):
    """A first start that failed before its config.json: remove the folder it created."""
    lock.release()
    try:
        os.remove(os.path.join(out, rundir.LOCK))
        os.rmdir(out)
    except OSError:
        pass  # not empty after all (someone else's file): leave it


def main(argv=None):
    args = parse_args(argv)
    world, log, lock, new_folder = 1, print, None, False
    try:
        check_device(args.device)
        check_sync_bn(args)
        rank, world, device = setup_distributed(args.device)
        main_rank = rank == 0
        log = print if main_rank else (lambda *a, **k: None)
        cfg = resolve_config(args, world)
        cfg.update(device_type=device.type, precision=precision_name(amp_dtype(cfg, device)))
        out = cfg["out"]
        started = time.time()
        rundir.check_writable_dir(out, "--out")
        run = existing_run(cfg, args.resume, args.overwrite)
        last = os.path.join(out, LAST)
        if run["state"] == "finished":
            # tidy a run killed right after its summary; not while another process (analyze.py) holds it
            if main_rank and not rundir.is_locked(out):
                with rundir.RunLock(out, "train.py"):
                    remove_leftovers(out)
                    if not args.keep_last and os.path.exists(last):
                        os.remove(last)
            unused = ", ".join(f"--{k} {new}" for k, (_, new) in run["changes"].items())
            log(f"{out}: already finished (summary.json exists)" + (f"; {unused} not applied" if unused else ""))
            return 0
        splits, info, model, init_lines = load_inputs(cfg)
        if main_rank and len(splits[0]) < cfg["batch_size"]:  # fine for a smoke test, surprising in a study
            print(f"train.py: warning: the training set has {len(splits[0])} images, fewer than one batch "
                  f"(--batch-size {cfg['batch_size']}): every epoch is one partial batch of {len(splits[0])}",
                  file=sys.stderr)
        init_sha = state_checksum(model.state_dict())
        resume = run["state"] == "resume"
        new_init = check_init(out, run["doc"], model) if resume and main_rank else None
        trainer = Trainer(cfg, model, splits, info, out, device, rank, world, log)
        trainer.run_id = run["doc"].get("run_id") if resume else None
        resumed, new_best = resume and os.path.exists(last), None
        stamp = file_stamp(last)
        if resumed:
            trainer.load_state(models.read_checkpoint(last), last)
            p = trainer.progress
            if "epochs" in run["changes"] and p["epoch"] + (p["pos"] > 0) > cfg["epochs"]:
                raise ValueError(f"--resume --epochs {cfg['epochs']}: the run has trained "
                                 f"{p['epoch'] + p['pos'] / trainer.sampler.steps:g} epochs already (last.pt)")
            if main_rank:
                check_log(out, p)
                new_best = check_best(out, trainer)
        # -- every input is checked: the first write is below
        if main_rank:
            new_folder = not os.path.isdir(out)
            lock = rundir.RunLock(out, "train.py").acquire()
            recheck(cfg, args, run, stamp)
            prepare_dir(out, run["state"])
            if not resume:
                trainer.run_id = create_run(out, cfg, info, splits, init_lines, trainer.model, init_sha)
            else:
                if new_init is not None:
                    save_checkpoint(os.path.join(out, INIT), new_init)
                    log(f"{out}: init.pt was missing or damaged: rebuilt from the seed and weights (checksum verified)")
                if new_best is not None:
                    save_checkpoint(os.path.join(out, BEST), new_best)
                if run["changes"]:
                    record_changes(out, run["doc"], run["changes"], trainer.progress["iteration"])
                    log(f"{out}: " + ", ".join(f"--{k} {old} -> {new}" for k, (old, new) in run["changes"].items())
                        + f" from iteration {trainer.progress['iteration']} (recorded in config.json)")
                if not resumed and os.path.exists(os.path.join(out, BEST)):  # from a start killed before last.pt
                    os.remove(os.path.join(out, BEST))
        new_folder = False
        if resumed:
            log(f"resumed {out} at iteration {trainer.progress['iteration']}")
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
        if new_folder and lock is not None:
            drop_new_folder(cfg["out"], lock)
        kept = isinstance(e, rundir.DiskFullError) and lock is not None and not new_folder \
            and os.path.exists(os.path.join(cfg["out"], CONFIG))
        print(f"train.py: error: {e}" + ("; what the run wrote so far is kept: continue it with --resume"
                                          if kept and not args.resume else ""), file=sys.stderr)
        return 2
    finally:
        if lock is not None:
            lock.release()
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
