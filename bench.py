"""Performance claims, each a ratio against a named baseline measured in the same run.

    python bench.py models   # forward+backward of models.py vs torchvision/timm (goal: ratio <= 1.05)
    python bench.py data     # epoch from the pre-resized cache vs decoding the originals (goal: >= 10x)
    python bench.py cka      # all-pairs CKA vs the original per-pair code (goal: >= 90% of the ceiling
                         # 2 La Lb / (La + Lb)) and pytorch-cka; accuracy vs all-float64 (goal: 1e-8)
    python bench.py knn      # chunked k-NN vs a brute-force full similarity matrix (memory, time)
    python bench.py knn_memory  # analyze --metric knn peak memory, 500 vs 3,840 bank images (goal: growth
                                # < 1/4 of a bank in memory); the CheXpert DeiT-S figure
    python bench.py analyze  # analyze --metric all vs its forward-pass floor on tiny runs (goal: <= 1.5x)
    python bench.py train    # train.py's loop vs a bare minimal loop (goal: overhead <= 5%)
    python bench.py sweep    # sweep.py's local executor: time outside the jobs (goal: <= 5%), and
                             # jobs run in the workers' processes vs one `python train.py` process each

Each takes its own flags (`python bench.py models --help`). No timings are asserted anywhere.

models: same architecture, same weights (ours loads the reference state dict strictly), same
input, train mode. Runs alternate ours / theirs (order flipped every repetition); ratio =
median(ours) / median(theirs); "paired" is the median of per-repetition ratios.
data: generates full-size fundus-like PNGs in the APTOS layout in a temp folder, then reads
two epochs through the same DataLoader settings from the originals (build_datasets(cache=False))
and from the cache. The originals were just written and sit in the page cache, which favours them.
cka: DeiT-S-shaped (25 layers of [n, 197, 384]) and ResNet50-shaped (17 layers) activations;
ours (one Gram per layer per batch, one matrix product) against (a) the original code's
approach written plainly (both Grams recomputed for every layer pair and batch, mean over
batches) and (b) the PyPI package pytorch-cka (minibatch CKA) when it is installed. The
ceiling 2 La Lb / (La + Lb) is the speed-up if forming Grams were all the work: (a) forms
2 La Lb per batch, ours La + Lb (each with 3/4 of the multiply-adds: the Gram is symmetric).
knn_memory: analyze.py --metric knn in subprocesses on checkpoint weights (--subset on the
training side only changes the bank: the test split is smaller than the subset), peak RSS
from wait4. analyze: tiny train.py runs in a temp folder; the floor is plain torch loops over
the same data (see _bench_analyze_floor); analysis and floor alternate, 1 thread by default.
"""
import argparse
import contextlib
import copy
import io
import json
import multiprocessing
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import data
import metrics
import models

# ========================================================================================
# models
# ========================================================================================
# batch sizes small enough for a 2-core CPU; the largest models get a smaller batch
_BENCH_MODELS_BATCH = {"deit_b": 2, "resnet152": 2}


def _bench_models_reference(name, size):
    """The timm / torchvision model of the same architecture (timm with its default, fused
    attention), as models.REFERENCE_MODELS names it."""
    lib, ref_name, kwargs = models.REFERENCE_MODELS[name]
    if lib == "timm":
        import timm
        return timm.create_model(ref_name, pretrained=False, img_size=size, **kwargs)
    import torchvision
    return getattr(torchvision.models, ref_name)(weights=None, **kwargs)


def _bench_models_step(model, x, device, clock):
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = clock()
    model(x).float().square().mean().backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (clock() - t0) * 1e3


def bench_models(argv=None):
    p = argparse.ArgumentParser(prog="bench.py models", description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(models.MODELS),
                   help="comma-separated names from models.MODELS (default: all)")
    p.add_argument("--batch", type=int, default=None,
                   help="batch size (default 8; 2 for deit_b and resnet152)")
    p.add_argument("--size", type=int, default=224, help="image size (default 224)")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per model (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per model (default 1)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall time, or this process's CPU time (steadier on a shared machine; "
                        "use with --threads 1 so idle threads spinning do not count)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    names = [n for n in args.models.split(",") if n]
    bad = [n for n in names if n not in models.MODELS]
    if bad:
        raise ValueError(f"--models: unknown {', '.join(bad)}; expected names from "
                         f"{', '.join(models.MODELS)}")
    device = torch.device(args.device)
    if args.clock == "cpu" and device.type != "cpu":
        raise ValueError("--clock cpu only measures --device cpu")
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"device={device} threads={torch.get_num_threads()} size={args.size} "
          f"reps={args.reps} clock={args.clock} (forward+backward, train mode, median ms)")
    print(f"{'model':<13} {'batch':>5} {'ours ms':>9} {'theirs ms':>10} {'ratio':>6} {'paired':>7}")
    rows = []
    for name in names:
        torch.manual_seed(args.seed)
        ref = _bench_models_reference(name, args.size).to(device).train()
        ours = models.create_model(name, img_size=args.size).to(device).train()
        ours.load_state_dict(ref.state_dict(), strict=True)
        batch = args.batch or _BENCH_MODELS_BATCH.get(name, 8)
        x = torch.randn(batch, 3, args.size, args.size,
                        generator=torch.Generator().manual_seed(args.seed)).to(device)
        for _ in range(args.warmup):
            _bench_models_step(ours, x, device, clock)
            _bench_models_step(ref, x, device, clock)
        times = {"ours": [], "theirs": []}
        for r in range(args.reps):
            pair = [("ours", ours), ("theirs", ref)]
            for label, m in (pair if r % 2 == 0 else pair[::-1]):
                times[label].append(_bench_models_step(m, x, device, clock))
        a, b = statistics.median(times["ours"]), statistics.median(times["theirs"])
        paired = statistics.median(o / t for o, t in zip(times["ours"], times["theirs"]))
        rows.append((name, batch, a, b, a / b, paired))
        print(f"{name:<13} {batch:>5} {a:>9.1f} {b:>10.1f} {a / b:>6.3f} {paired:>7.3f}",
              flush=True)
        del ref, ours
    return rows


# ========================================================================================
# data
# ========================================================================================
def _bench_data_write(job):
    """One full-size PNG: the 64 px fundus upsampled plus fine noise, so that it compresses
    like a photograph (a few MB); compress_level 1 only to generate quickly."""
    path, small, width, height, seed = job
    big = np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC), dtype=np.int16)
    big = big + np.random.default_rng(seed).integers(-3, 4, big.shape, dtype=np.int16)
    Image.fromarray(np.clip(big, 0, 255).astype(np.uint8)).save(path, compress_level=1)


def _bench_data_make_aptos(root, n, width, height, workers):
    """n fundus-like PNGs in the APTOS layout (train.csv + train_images/)."""
    small, labels = data.make_fundus(n, seed=0)
    (root / "train_images").mkdir(parents=True)
    jobs = [(root / "train_images" / f"img{k:04d}.png", small[k], width, height, k) for k in range(n)]
    with multiprocessing.Pool(max(1, workers)) as pool:
        pool.map(_bench_data_write, jobs)
    lines = ["id_code,diagnosis"] + [f"img{k:04d},{labels[k]}" for k in range(n)]
    (root / "train.csv").write_text("\n".join(lines) + "\n")


def _bench_data_all(parts):
    """Every image of the dataset (train, val, test) with the train transforms."""
    views = []
    for ds in parts[:3]:
        v = copy.copy(ds)
        v.transform = ds.train_transform
        views.append(v)
    return torch.utils.data.ConcatDataset(views)


def _bench_data_epochs(ds, batch, workers, seed=0):
    """images/s of epoch 1 (worker start included) and epoch 2 (persistent workers)."""
    g = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, generator=g,
                                         persistent_workers=workers > 0)
    rates = []
    for _ in range(2):
        t, n = time.perf_counter(), 0
        for x, _ in loader:
            n += len(x)
        rates.append(n / (time.perf_counter() - t))
    return rates


def bench_data(argv=None):
    p = argparse.ArgumentParser(description="cache vs decoding originals: images/s of one epoch")
    p.add_argument("--n", type=int, default=96, help="images to generate")
    p.add_argument("--size", default="2000x1500", help="WIDTHxHEIGHT of the generated PNGs")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers (and cache-building processes)")
    p.add_argument("--batch", type=int, default=16)
    args = p.parse_args(argv)
    try:
        width, height = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        raise ValueError(f"--size {args.size!r}: expected WIDTHxHEIGHT, e.g. 2000x1500") from None
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "aptos"
        t = time.perf_counter()
        _bench_data_make_aptos(root, args.n, width, height, args.workers)
        mb = sum(f.stat().st_size for f in (root / "train_images").iterdir()) / 2 ** 20
        print(f"generated {args.n} PNGs of {width}x{height} ({mb / args.n:.1f} MiB each) "
              f"in {time.perf_counter() - t:.1f}s")
        direct = _bench_data_all(data.build_datasets("aptos", root, img_size=args.img_size, cache=False))
        t = time.perf_counter()
        cached = _bench_data_all(data.build_datasets("aptos", root, img_size=args.img_size, workers=args.workers))
        build = time.perf_counter() - t
        print(f"cache built once in {build:.1f}s ({args.n / build:.1f} img/s, {args.workers} processes)")
        print(f"epoch = all {len(cached)} images with the train transforms, img_size {args.img_size}, "
              f"batch {args.batch}, {args.workers} DataLoader workers, shuffled")
        d1, d2 = _bench_data_epochs(direct, args.batch, args.workers)
        c1, c2 = _bench_data_epochs(cached, args.batch, args.workers)
    print(f"{'':24s}{'epoch 1 (workers start)':>26s}{'epoch 2 (workers warm)':>26s}")
    print(f"{'decode originals':24s}{d1:>21.1f} im/s{d2:>21.1f} im/s")
    print(f"{'cache (memmap)':24s}{c1:>21.1f} im/s{c2:>21.1f} im/s")
    print(f"{'ratio cache/originals':24s}{c1 / d1:>24.1f}x{c2 / d2:>24.1f}x")
    return {"direct": [d1, d2], "cached": [c1, c2], "ratio": [c1 / d1, c2 / d2], "cache_build_s": build}


# ========================================================================================
# metrics
# ========================================================================================
_METRICS_LAYER_SETS = {
    "deit_s": [(197, 384)] * 25,
    "resnet50": [(64, 112, 112)] + [(256, 56, 56)] * 3 + [(512, 28, 28)] * 4
                + [(1024, 14, 14)] * 6 + [(2048, 7, 7)] * 3,
}


def _bench_metrics_scaled(shape, scale):
    """Shrink a CNN [C, H, W] shape's spatial size by `scale` (ViT token shapes unchanged)."""
    return shape if len(shape) == 2 else (shape[0], max(1, shape[1] // scale), max(1, shape[2] // scale))


def _bench_metrics_acts(shapes, n, batch, model, seed, device):
    """Random-ish but correlated activations: layer l = relu(z_l P_l) with a latent z_l (n, 16)
    drifting with depth (so CKA decays between distant layers) and a fixed random projection
    P_l per layer; model B ("fine-tuned") perturbs model A's latents."""
    g = torch.Generator().manual_seed(seed * 1000 + batch)
    z = torch.randn(n, 16, generator=g)
    gb = torch.Generator().manual_seed(seed * 1000 + batch + 500)
    acts = []
    for l, shape in enumerate(shapes):
        z = z + 0.35 * torch.randn(n, 16, generator=g)
        zl = z + 0.6 * torch.randn(n, 16, generator=gb) if model == "b" else z
        p = torch.randn(16, int(np.prod(shape)), generator=torch.Generator().manual_seed(seed + l))
        acts.append(torch.relu(zl @ p - 0.3).reshape(n, *shape).to(device))
    return acts


def _bench_metrics_original_center(gram):
    """Unbiased centring as in the original code (Kornblith et al.'s demo), float64."""
    if not torch.allclose(gram, gram.t()):
        raise ValueError("Input must be a symmetric matrix.")
    gram = gram.clone().double()
    n = gram.shape[0]
    gram.fill_diagonal_(0)
    means = gram.sum(0) / (n - 2)
    means -= means.sum() / (2 * (n - 1))
    gram -= means[:, None]
    gram -= means[None, :]
    gram.fill_diagonal_(0)
    return gram


def _bench_metrics_original_cka(x, y):
    """The original per-pair CKA: both Grams from the raw (uncentred) features, then centred."""
    gx = _bench_metrics_original_center(x @ x.t())
    gy = _bench_metrics_original_center(y @ y.t())
    return (gx.reshape(-1) @ gy.reshape(-1)) / (gx.norm() * gy.norm())


def _bench_metrics_sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class _BenchMetricsTimer:
    """Wall-clock and process CPU seconds (the latter is steadier on a shared CPU machine)."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        _bench_metrics_sync(self.device)
        self.t0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        _bench_metrics_sync(self.device)
        self.wall, self.cpu = time.perf_counter() - self.t0, time.process_time() - self.c0


def _bench_metrics_pytorch_cka(batches, la, lb, device):
    """pytorch-cka's own path (hooks, Grams, its HSIC) on replayed activations, or None."""
    try:
        import torch.nn as nn
        from cka import compute_cka
    except ImportError as e:
        print(f"  (b) pytorch-cka: not installed ({e}); skipped. Try `.venv/bin/pip install pytorch-cka`.")
        return None

    class Replay(nn.Module):
        """Replays stored activations through identity layers so the package's hooks see them."""
        def __init__(self, which, num):
            super().__init__()
            self.which = which
            self.layers = nn.ModuleList(nn.Identity() for _ in range(num))

        def forward(self, x):
            acts = batches[int(x[0])][self.which]
            for layer, a in zip(self.layers, acts):
                layer(a)

    n = batches[0][0][0].shape[0]
    loader = [torch.full((n,), float(b)) for b in range(len(batches))]
    names_a = [f"layers.{i}" for i in range(la)]
    names_b = [f"layers.{i}" for i in range(lb)]
    try:
        with _BenchMetricsTimer(device) as tm:
            # a list is read as a list of loaders: wrap ours
            out = compute_cka(Replay(0, la), Replay(1, lb), [loader], layers=names_a, model2_layers=names_b,
                              device=device, progress=False)[0]
        return tm, out.double().cpu().numpy()
    except Exception as e:  # an incompatible API version: report, do not fail the benchmark
        print(f"  (b) pytorch-cka: failed with {type(e).__name__}: {e}; skipped.")
        return None


def _bench_metrics_float64_minibatch(batches, la, lb):
    """Independent all-float64 reference: features centred in float64, Grams x x^T, the
    original code's unbiased centring, ratio of summed HSIC (the minibatch estimator)."""
    cross, sa, sb = np.zeros((la, lb)), np.zeros(la), np.zeros(lb)
    for acts_a, acts_b in batches:
        grams = [[_bench_metrics_original_center(x @ x.T).reshape(-1).cpu().numpy()
                  for x in (a.flatten(1).double() - a.flatten(1).double().mean(0) for a in acts)]
                 for acts in (acts_a, acts_b)]
        ga, gb = np.stack(grams[0]), np.stack(grams[1])
        cross += ga @ gb.T
        sa += (ga * ga).sum(1)
        sb += (gb * gb).sum(1)
    return cross / np.sqrt(np.outer(sa, sb))


def _bench_metrics_cka_ours(batches, la, lb):
    acc = metrics.CKAAccumulator(la, lb, debiased=True, mode="mean")
    for acts_a, acts_b in batches:
        acc.update([metrics.centered_gram(x) for x in acts_a], [metrics.centered_gram(y) for y in acts_b])
    return acc


def _bench_metrics_cka_one(name, shapes, args):
    la = lb = len(shapes)
    dev, n = args.device, args.batch_size
    ceiling = 2 * la * lb / (la + lb)
    print(f"\n== {name}: {la} x {lb} layers, {args.batches} batches of {n}, "
          f"{sum(int(np.prod(s)) for s in shapes) / 1e6:.2f}M features/sample/model, device {dev}")
    batches = [(_bench_metrics_acts(shapes, n, b, "a", args.seed, dev),
                _bench_metrics_acts(shapes, n, b, "b", args.seed, dev)) for b in range(args.batches)]
    # first calls per shape pay one-off library set-up (kernel selection/JIT): warm up, untimed
    metrics.CKAAccumulator(la, lb).update_activations(*batches[0])

    # ours: one Gram per layer per batch, then one (L_a, n^2) x (n^2, L_b) product per batch;
    # --reps runs around the single (long) run of (a), the median taken
    t_ours = []
    for rep in range(args.reps):
        if rep == 1:
            # (a) original approach: per pair and per batch, both Grams recomputed
            with _BenchMetricsTimer(dev) as t_orig:
                per_batch = []
                for acts_a, acts_b in batches:
                    sim = torch.zeros(la, lb, dtype=torch.float64)
                    for i in range(la):
                        for j in range(lb):
                            sim[i, j] = _bench_metrics_original_cka(acts_a[i].flatten(1), acts_b[j].flatten(1))
                    per_batch.append(sim)
                orig = torch.stack(per_batch).mean(0).numpy()
        with _BenchMetricsTimer(dev) as t:
            acc = _bench_metrics_cka_ours(batches, la, lb)
            ours_mean = acc.compute()
        t_ours.append(t)
    wall, cpu = (statistics.median(getattr(t, k) for t in t_ours) for k in ("wall", "cpu"))
    t_ours = types.SimpleNamespace(wall=wall, cpu=cpu)
    ours_mb = metrics.CKAAccumulator(la, lb, mode="minibatch").merge(acc).compute()

    res_b = _bench_metrics_pytorch_cka(batches, la, lb, dev)
    ref = _bench_metrics_float64_minibatch(batches, la, lb)
    print(f"  CKA range (ours, minibatch): {np.nanmin(ours_mb):.3f} .. {np.nanmax(ours_mb):.3f}")
    print(f"  {'method':55s} {'wall s':>7s} {'cpu s':>7s} {'x faster (wall/cpu)':>20s} {'max |diff|':>10s}")
    row = lambda name, t, diff: print(f"  {name:55s} {t.wall:7.2f} {t.cpu:7.2f} "
                                      f"{t.wall / t_ours.wall:9.1f} / {t.cpu / t_ours.cpu:8.1f} {diff:>10s}")
    row(f"ours (Gram once per layer, G_a G_b^T), median of {args.reps}", t_ours, "-")
    d_orig = np.abs(ours_mean - orig).max()
    row("(a) original: per-pair Grams, mean of per-batch CKA", t_orig, f"{d_orig:.2e}")
    print(f"      (a) vs ours mode='mean': {'OK' if d_orig < 1e-6 else 'MISMATCH'} (tolerance 1e-6)")
    print(f"      ceiling 2 La Lb / (La + Lb) = {ceiling:.1f}x (every Gram formed once instead of twice per pair);"
          f" ours reaches {t_orig.wall / t_ours.wall / ceiling:.0%} of it (wall), "
          f"{t_orig.cpu / t_ours.cpu / ceiling:.0%} (cpu) (goal >= 90%)")
    d_ref = np.abs(ref - ours_mb).max()
    print(f"      ours minibatch vs an all-float64 reference: {d_ref:.2e} "
          f"({'OK' if d_ref < 1e-8 else 'MISMATCH'}, tolerance 1e-8)")
    if res_b is not None:
        t_b, vals_b = res_b
        d_b = np.abs(ours_mb - vals_b).max()
        row("(b) pytorch-cka compute_cka (minibatch, float32)", t_b, f"{d_b:.2e}")
        print(f"      (b) vs ours mode='minibatch': {'OK' if d_b < 1e-6 else 'differs by more than 1e-6'}")
        if d_b >= 1e-6:
            print("      pytorch-cka forms uncentred float32 Grams and float32 HSIC sums (then clamps to [0, 1]);"
                  f" the gap is its rounding: all-float64 reference vs pytorch-cka {np.abs(ref - vals_b).max():.2e}")
    return t_ours.wall, t_orig.wall


def bench_cka(argv):
    ap = argparse.ArgumentParser(prog="bench.py metrics_cka", description=__doc__)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batches", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3, help="timed runs of ours (median), around the one run of (a)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: on a busy machine 2 "
                                                           "threads wait on each other at every op, a cost that "
                                                           "grows with the number of ops, not the work)")
    ap.add_argument("--layers", default="deit_s,resnet50",
                    help=f"comma-separated layer sets from {sorted(_METRICS_LAYER_SETS)}")
    ap.add_argument("--resnet-downscale", type=int, default=2,
                    help="divide the CNN layers' H and W by this; default 2 (a 112 px input) keeps the CPU run "
                         "to a few minutes, 1 gives the 224 px shapes")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"CKA all pairs, device {args.device}, {torch.get_num_threads()} CPU threads")
    for name in args.layers.split(","):
        if name not in _METRICS_LAYER_SETS:
            raise ValueError(f"--layers: unknown layer set {name!r}; expected some of {sorted(_METRICS_LAYER_SETS)}")
        shapes = [_bench_metrics_scaled(s, args.resnet_downscale) for s in _METRICS_LAYER_SETS[name]]
        with torch.no_grad():
            _bench_metrics_cka_one(name, shapes, args)


def _bench_metrics_knn_bruteforce(bank, labels, queries, k, t, num_classes):
    """Full (n_queries x n_bank) similarity matrix, B x k x C one-hot vote (InstDisc/DINO style)."""
    b = torch.nn.functional.normalize(bank, dim=1)
    q = torch.nn.functional.normalize(queries, dim=1)
    sim = q @ b.T
    s, idx = sim.topk(k, dim=1)
    w = (s / t).exp()
    one_hot = torch.zeros(len(q) * k, num_classes).scatter_(1, labels[idx].view(-1, 1), 1)
    scores = (one_hot.view(len(q), k, num_classes) * w[..., None]).sum(1)
    return scores / scores.sum(1, keepdim=True)


def _bench_metrics_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_knn(argv):
    ap = argparse.ArgumentParser(prog="bench.py metrics_knn")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bank", type=int, default=50000)
    ap.add_argument("--queries", type=int, default=10000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--classes", type=int, default=5)
    ap.add_argument("--k", type=int, default=200)
    ap.add_argument("--chunk-size", type=int, default=1024)
    ap.add_argument("--bank-chunk-size", type=int, default=16384)
    args = ap.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(args.classes, args.dim, generator=g)
    yb = torch.randint(0, args.classes, (args.bank,), generator=g)
    yq = torch.randint(0, args.classes, (args.queries,), generator=g)
    bank = (centres[yb] + 2 * torch.randn(args.bank, args.dim, generator=g)).to(args.device)
    queries = (centres[yq] + 2 * torch.randn(args.queries, args.dim, generator=g)).to(args.device)
    yb = yb.to(args.device)
    cuda = torch.device(args.device).type == "cuda"
    print(f"\n== k-NN: bank {args.bank} x {args.dim}, {args.queries} queries, k={args.k}, "
          f"{args.classes} classes, device {args.device}")
    state = args.queries * args.k * 8  # the running top-k: float32 similarity + int32 index per neighbour
    runs = [(f"ours, query chunks of {args.chunk_size}",
             lambda: metrics.knn_predict(bank, yb, queries, args.k, num_classes=args.classes,
                                         chunk_size=args.chunk_size),
             (args.chunk_size * (2 * args.bank + args.k) + args.bank * args.dim) * 4 + state),  # sims + candidates
            (f"ours, + bank chunks of {args.bank_chunk_size}",
             lambda: metrics.knn_predict(bank, yb, queries, args.k, num_classes=args.classes,
                                         chunk_size=args.chunk_size, bank_chunk_size=args.bank_chunk_size),
             (args.chunk_size * (2 * args.bank_chunk_size + args.k) + args.bank_chunk_size * args.dim) * 4 + state),
            ("brute force: full similarity matrix, one-hot vote",
             lambda: _bench_metrics_knn_bruteforce(bank, yb, queries, args.k, 0.1, args.classes),
             (args.queries * args.bank + (args.bank + args.queries) * args.dim
              + args.queries * args.k * args.classes) * 4)]  # full sims + normalised copies + one-hot
    print(f"  {'method':52s} {'wall s':>7s} {'cpu s':>7s} {'est. peak MiB':>14s} {'meas. MiB':>10s} "
          f"{'max |diff|':>11s}")
    out = []
    for name, fn, est in runs:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        rss0 = _bench_metrics_rss_mb()
        with _BenchMetricsTimer(args.device) as tm:
            scores = fn()
        meas = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else _bench_metrics_rss_mb() - rss0
        out.append((name, tm, est / 2**20, meas, scores))
    ref_scores = out[-1][4]
    for name, tm, est, meas, scores in out:
        diff = (scores - ref_scores).abs().max().item()
        print(f"  {name:52s} {tm.wall:7.2f} {tm.cpu:7.2f} {est:14.0f} {meas:10.0f} {diff:11.2e}")
    print("  (meas. MiB: peak CUDA allocation on GPU; on CPU the growth of the process's RSS high-water mark,"
          " so runs are measured in order and a later run only shows growth beyond the earlier peaks)")
    print(f"  brute force / ours wall time: {out[-1][1].wall / out[0][1].wall:.2f}x (query chunks), "
          f"{out[-1][1].wall / out[1][1].wall:.2f}x (query + bank chunks)")


# ========================================================================================
# analyze: the whole analysis against its forward-pass floor; k-NN memory against the bank
# ========================================================================================
def _bench_analyze_run(out, model, size, subset, data_name):
    """A tiny finished run to analyse: train.py, RI, one epoch (its output silenced)."""
    import train
    argv = ["--model", model, "--data", data_name, "--init", "ri", "--img-size", str(size), "--subset", str(subset),
            "--epochs", "1", "--batch-size", "32", "--warmup", "2", "--device", "cpu", "--workers", "0", "--out", out]
    with contextlib.redirect_stdout(io.StringIO()):
        if train.main(argv) != 0:
            raise RuntimeError(f"bench.py: train.py {' '.join(argv)} failed")
    return out


def _bench_analyze_analysis(run, batch_size):
    """analyze.py --metric all on the run, in this process (imports excluded), stdout silenced."""
    import analyze
    with _BenchMetricsTimer("cpu") as t, contextlib.redirect_stdout(io.StringIO()):
        if analyze.main(["--run", run, "--metric", "all", "--device", "cpu", "--batch-size", str(batch_size)]) != 0:
            raise RuntimeError(f"bench.py: analyze.py --run {run} failed")
    return t


@torch.no_grad()
def _bench_analyze_floor(run, batch_size):
    """The forward passes analyze --metric all cannot avoid, as plain loops over the same data
    (loading included): the test split through the fine-tuned and the initial model (the
    shared pass: CKA, k-NN queries, attention), the training split through the fine-tuned model
    (the k-NN bank), and per feature layer the fine-tuned model's stages from that layer's on
    (re-init; the stage inputs are the fine-tuned model's test forward, counted once above).
    Returns {part: timer}."""
    import analyze
    cfg, _ = analyze.load_run(run)
    train_ds, _, test_ds, _ = data.load_splits(cfg, eval_train=True)
    final, initial = (analyze.load_model(cfg["model"], cfg["num_classes"], cfg["img_size"],
                                         str(Path(run) / f"{w}.pt"), w, False) for w in ("best", "init"))
    batches = lambda ds: torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False)
    parts = {}
    with _BenchMetricsTimer("cpu") as parts["test split, fine-tuned + initial model"]:
        for x, _ in batches(test_ds):
            final(x)
            initial(x)
    with _BenchMetricsTimer("cpu") as parts["training split (k-NN bank), fine-tuned model"]:
        for x, _ in batches(train_ds):
            final(x)
    stages, head = final.forward_stages()
    starts = [analyze.stage_of(stages, layer) for layer in final.feature_layers()]
    wall = cpu = 0.0
    for x, _ in batches(test_ds):
        h = [x]
        for _, fn in stages:
            h.append(fn(h[-1]))
        with _BenchMetricsTimer("cpu") as t:
            for s in starts:
                z = h[s]
                for _, fn in stages[s:]:
                    z = fn(z)
                head(z)
        wall, cpu = wall + t.wall, cpu + t.cpu
    parts[f"re-init: stages from each of {len(starts)} layers on, test split"] = types.SimpleNamespace(wall=wall,
                                                                                                        cpu=cpu)
    return parts


def bench_analyze(argv):
    """analyze.py --metric all on a tiny run of each model against the forward passes it needs
    (goal: ratio <= 1.5). Analysis and floor alternate --reps times; medians."""
    ap = argparse.ArgumentParser(prog="bench.py analyze", description=bench_analyze.__doc__)
    ap.add_argument("--models", default="deit_t,resnet18")
    ap.add_argument("--data", default="shapes")
    ap.add_argument("--size", type=int, default=48, help="image size (default 48)")
    ap.add_argument("--subset", type=int, default=256, help="images per split (default 256)")
    ap.add_argument("--batch-size", type=int, default=128, help="analyze.py's --batch-size (default 128)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: steady on a shared "
                                                           "machine, where 2 threads wait on each other)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"analyze.py --metric all vs its forward-pass floor: {args.data} at {args.size} px, --subset {args.subset}, "
          f"batch {args.batch_size}, cpu, {torch.get_num_threads()} threads, median of {args.reps}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            run = _bench_analyze_run(str(Path(tmp) / name), name, args.size, args.subset, args.data)
            _bench_analyze_analysis(run, args.batch_size)  # warm-up: first calls set up kernels
            analysis, floors = [], []
            for _ in range(args.reps):
                analysis.append(_bench_analyze_analysis(run, args.batch_size))
                floors.append(_bench_analyze_floor(run, args.batch_size))
            med = lambda ts, k: statistics.median(getattr(t, k) for t in ts)
            print(f"\n== {name}")
            for part in floors[0]:
                print(f"  floor: {part:58s} {med([f[part] for f in floors], 'wall'):7.2f} s wall "
                      f"{med([f[part] for f in floors], 'cpu'):7.2f} s cpu")
            totals = [types.SimpleNamespace(wall=sum(t.wall for t in f.values()), cpu=sum(t.cpu for t in f.values()))
                      for f in floors]
            fw, fc, aw, ac = med(totals, "wall"), med(totals, "cpu"), med(analysis, "wall"), med(analysis, "cpu")
            spread = max(a.wall / f.wall for a, f in zip(analysis, totals)) - min(
                a.wall / f.wall for a, f in zip(analysis, totals))
            print(f"  floor: {'total':58s} {fw:7.2f} s wall {fc:7.2f} s cpu")
            print(f"  analyze.py --metric all (in-process, imports excluded)       {aw:7.2f} s wall {ac:7.2f} s cpu")
            print(f"  ratio analysis / floor: {aw / fw:.2f}x wall, {ac / fc:.2f}x cpu "
                  f"(per-rep wall ratios spread {spread:.2f}) (goal <= 1.5x)")
            rows.append((name, aw / fw, ac / fc))
    return rows


def _bench_knn_memory_peak(argv):
    """Peak RSS (MiB) of one analyze.py process: its own ru_maxrss, read with wait4."""
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("analyze.py"))] + argv,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode()
    proc.stderr.close()
    if proc.returncode != 0:
        raise RuntimeError(f"bench.py: analyze.py {' '.join(argv)} failed: {err.strip()[-500:]}")
    return usage.ru_maxrss / 1024  # KiB on Linux


def _bench_knn_memory_dims(name, size):
    """Pooled k-NN features per image: (float count over every feature layer and type,
    number of (layer, type) pairs), from one forward."""
    model = models.create_model(name, img_size=size).eval()
    with metrics.capture(model, model.feature_layers(), lambda n, o: model.pooled_views(n, o)) as acts, \
            torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    return sum(v.shape[1] for a in acts.values() for v in a.values()), sum(len(a) for a in acts.values())


def bench_knn_memory(argv):
    """Peak memory of analyze.py --metric knn with a small and a full training split (the
    bank), each in its own process, against what a bank held in memory would add (goal:
    growth < 1/4 of it); then the CheXpert DeiT-S figure from the same memory model."""
    ap = argparse.ArgumentParser(prog="bench.py knn_memory", description=bench_knn_memory.__doc__)
    ap.add_argument("--model", default="deit_t")
    ap.add_argument("--data", default="shapes")
    ap.add_argument("--size", type=int, default=48)
    ap.add_argument("--small", type=int, default=500, help="training images of the small bank (--subset)")
    ap.add_argument("--k", type=int, default=200)
    ap.add_argument("--reps", type=int, default=3, help="runs of each size; the figures are medians")
    args = ap.parse_args(argv)
    per_image, pairs = _bench_knn_memory_dims(args.model, args.size)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        weights = Path(tmp) / "weights.pt"
        torch.save({"model": models.create_model(args.model, img_size=args.size).state_dict()}, weights)
        common = ["--model", args.model, "--weights", str(weights), "--data", args.data, "--img-size", str(args.size),
                  "--metric", "knn", "--k", str(args.k), "--device", "cpu", "--out"]
        peaks, sizes = {}, {}
        for label, extra in (("small", ["--subset", str(args.small)]), ("full", [])):
            out = Path(tmp) / label
            runs = [_bench_knn_memory_peak(common + [str(out)] + extra) for _ in range(args.reps)]
            peaks[label] = (statistics.median(runs), max(runs) - min(runs))
            doc = json.loads((out / "analysis" / "knn.json").read_text())
            sizes[label] = (doc["settings"]["bank_images"], doc["settings"]["query_images"])
    (n_small, n_query), (n_full, _) = sizes["small"], sizes["full"]
    mib = 2 ** 20
    bank_extra = (n_full - n_small) * per_image * 4 / mib
    growth = peaks["full"][0] - peaks["small"][0]
    print(f"k-NN memory: analyze.py --metric knn, {args.model} at {args.size} px on {args.data}, k={args.k}, "
          f"{n_query} query images, {per_image} pooled floats per image over {pairs} (layer, type) pairs; "
          f"peak RSS of each process (median of {args.reps}, spread in brackets)")
    for label in ("small", "full"):
        print(f"  bank of {sizes[label][0]:6d} training images: peak {peaks[label][0]:7.0f} MiB "
              f"({peaks[label][1]:.0f})")
    print(f"  growth {growth:.0f} MiB for {n_full - n_small} more bank images; a bank held in memory adds "
          f"{bank_extra:.0f} MiB (float32): {growth / bank_extra:.1%} of it (goal < 25%)")
    queries = n_query * per_image * 4 / mib
    state = n_query * pairs * args.k * 8 / mib
    fixed = peaks["full"][0] - queries - state
    print(f"  memory model: queries {queries:.0f} MiB + top-k state {state:.0f} MiB (k float32 + int32 per query and "
          f"pair) + the rest {fixed:.0f} MiB (torch, model, data, one batch), none of it growing with the bank")
    # CheXpert: 224,316 images, 0.2 of the patients held out, half of them test (data.py)
    s_per_image, s_pairs = _bench_knn_memory_dims("deit_s", 224)
    n_test, n_train = 224316 // 10, 224316 - 2 * (224316 // 10)
    gb = 1e9
    print(f"  CheXpert, DeiT-S (~{n_train} training, ~{n_test} test images, {s_per_image} floats per image, "
          f"k={args.k}): queries {n_test * s_per_image * 4 / gb:.1f} GB + top-k state "
          f"{n_test * s_pairs * args.k * 8 / gb:.1f} GB + a fixed working set (model, one batch of activations); "
          f"a bank in memory would add {n_train * s_per_image * 4 / gb:.1f} GB")
    return peaks, sizes


# ========================================================================================
# train
# ========================================================================================
def bench_train(argv):
    """Our training loop (train.Trainer.fit) against a bare minimal loop: same model, same
    in-memory data, same optimiser (Adam, weight decay on non-1-D weights) and clipping, no
    logging, validation, checkpoints or per-sample seeding. Interleaved
    ours/bare runs, best of --reps each; prints images/s and the ratio."""
    import argparse
    import tempfile
    import time

    import numpy as np
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, Dataset

    import models
    import train

    p = argparse.ArgumentParser(prog="bench.py train")
    p.add_argument("--models", default="resnet18,deit_t")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--images", type=int, default=512, help="training images per epoch")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", default="auto", choices=["auto", "fp16", "bf16", "off"])
    a = p.parse_args(argv)
    device = torch.device(a.device)

    class InMemory(Dataset):
        def __init__(self, n, seed):
            g = torch.Generator().manual_seed(seed)
            self.x = torch.randn(n, 3, a.size, a.size, generator=g)
            self.labels = np.asarray(torch.randint(0, 5, (n,), generator=g))

        def __len__(self):
            return len(self.labels)

        def __getitem__(self, i):
            return self.x[i], int(self.labels[i])

    info = {"num_classes": 5, "multilabel": False, "metric": "quadratic_kappa", "loss": "ce"}
    train_ds, small = InMemory(a.images, 0), InMemory(a.batch, 1)

    def ours(name):
        args = train.parse_args(["--model", name, "--init", "ri", "--img-size", str(a.size), "--batch-size",
                                 str(a.batch), "--epochs", "1", "--amp", a.amp, "--workers", "0",
                                 "--device", a.device, "--log-every", "50"])
        cfg = train.resolve_config(args)
        model = models.create_model(name, num_classes=5, img_size=a.size)
        with tempfile.TemporaryDirectory() as out:
            t = train.Trainer(cfg, model, (train_ds, small, small), info, out, device, log=lambda *k: None)
            t.fit()
        return t.progress["images"] / t.progress["train_seconds"]

    def bare(name):
        model = models.create_model(name, num_classes=5, img_size=a.size).to(device)
        dtype = train.amp_dtype({"amp": a.amp}, device)
        opt = torch.optim.Adam(train.param_groups(model, 1e-5), lr=1e-4)  # the recipe's optimiser, as ours
        scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
        loader = DataLoader(train_ds, batch_size=a.batch, shuffle=True, drop_last=True,
                            pin_memory=device.type == "cuda")
        if device.type == "cuda" and model.prefers_channels_last:
            model.to(memory_format=torch.channels_last)
        n, t0 = 0, time.perf_counter()
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = F.cross_entropy(model(x).float(), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(opt)
            scaler.update()
            n += x.shape[0]
        if device.type == "cuda":
            torch.cuda.synchronize()
        return n / (time.perf_counter() - t0)

    print(f"train loop: {a.images} images/epoch, batch {a.batch}, {a.size}px, {device}, amp {a.amp}")
    print(f"{'model':<12} {'ours img/s':>11} {'bare img/s':>11} {'overhead':>9}")
    for name in a.models.split(","):
        ours(name), bare(name)  # warm-up
        o, b = [], []
        for _ in range(a.reps):
            o.append(ours(name))
            b.append(bare(name))
        best_o, best_b = max(o), max(b)
        print(f"{name:<12} {best_o:11.1f} {best_b:11.1f} {best_b / best_o - 1:+8.1%}")


# ========================================================================================
# sweep
# ========================================================================================
def bench_sweep(argv):
    """sweep.py's local executor on tiny training jobs (ResNet18 at 32 px on 16 `lesions` images,
    one epoch, random init, one seed each; every job its own run folder):
    - overhead: --jobs jobs on --workers workers (1 thread each); the time outside the jobs is
      1 - (sum of the job times measured inside the workers) / (workers x wall time of the sweep),
      wall time from before the workers start to after they are stopped (goal: <= 5%);
    - in-process: --compare jobs on one worker (each job run in the worker's process, torch
      imported once) against the same jobs as one `python train.py ...` process each, one after
      the other; ratio = subprocesses / worker."""
    import os
    import subprocess
    import tempfile
    import time

    import sweep

    p = argparse.ArgumentParser(prog="bench.py sweep")
    p.add_argument("--jobs", type=int, default=40)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--compare", type=int, default=8, help="jobs of the in-process vs subprocess comparison")
    a = p.parse_args(argv)

    def tiny_jobs(root, n):
        jobs = []
        for i in range(n):
            run = os.path.join(root, f"r{i}")
            argv = ["train.py", "--model", "resnet18", "--data", "lesions", "--img-size", "32", "--subset", "16",
                    "--epochs", "1", "--batch-size", "8", "--init", "ri", "--seed", str(i), "--device", "cpu",
                    "--workers", "0", "--out", run]
            jobs.append({"id": f"train {run}", "kind": "train", "argv": argv, "needs": [], "run": run, "metrics": [],
                         "ref": None, "log": os.path.join(root, "logs", f"r{i}.log")})
        return jobs

    one_thread = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        jobs = tiny_jobs(os.path.join(tmp, "overhead"), a.jobs)
        start = time.perf_counter()
        seconds = sweep.run_local(jobs, [one_thread] * a.workers)
        wall = time.perf_counter() - start
        busy = sum(seconds.values())
        print(f"local executor: {a.jobs} tiny training jobs on {a.workers} workers x 1 thread: wall {wall:.1f} s, "
              f"jobs {busy:.1f} s in all (median {statistics.median(seconds.values()):.2f} s); outside the jobs "
              f"{1 - busy / (a.workers * wall):.1%} of the workers' time (goal <= 5%)")

        def children_cpu():  # CPU seconds of the finished child processes (workers, subprocesses)
            r = resource.getrusage(resource.RUSAGE_CHILDREN)
            return r.ru_utime + r.ru_stime

        jobs = tiny_jobs(os.path.join(tmp, "inprocess"), a.compare)
        start, cpu = time.perf_counter(), children_cpu()
        sweep.run_local(jobs, [one_thread])
        inprocess, inprocess_cpu = time.perf_counter() - start, children_cpu() - cpu
        jobs = tiny_jobs(os.path.join(tmp, "subprocess"), a.compare)
        start, cpu = time.perf_counter(), children_cpu()
        for job in jobs:
            with open(os.devnull, "w") as null:
                subprocess.run([sys.executable, os.path.join(sweep.HERE, job["argv"][0]), *job["argv"][1:]],
                               stdout=null, stderr=null, env=dict(os.environ, **one_thread), check=True)
        alone, alone_cpu = time.perf_counter() - start, children_cpu() - cpu
        print(f"{a.compare} jobs one after the other: in one worker's process {inprocess:.1f} s wall "
              f"({inprocess_cpu:.1f} s CPU), as one process each {alone:.1f} s wall ({alone_cpu:.1f} s CPU): "
              f"{alone / inprocess:.2f}x wall, {alone_cpu / inprocess_cpu:.2f}x CPU "
              f"({(alone - inprocess) / a.compare:.2f} s wall saved per job)")


BENCHES = {"models": bench_models, "data": bench_data, "cka": bench_cka, "knn": bench_knn, "train": bench_train,
           "analyze": bench_analyze, "knn_memory": bench_knn_memory, "sweep": bench_sweep}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in BENCHES:
        print(f"usage: python bench.py {{{','.join(BENCHES)}}} [flags]", file=sys.stderr)
        sys.exit(2)
    BENCHES[sys.argv[1]](sys.argv[2:])
