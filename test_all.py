"""The toolkit's tests: a class per file under test (TestRundir, TestModels, ..., TestReadme), each
in sections named by behaviour; fixtures and helpers that several classes use come first.
Everything: python -m pytest test_all.py -q (2 CPU cores, no GPU, no network).
Quick loop: python -m pytest test_all.py -q -m "not slow" (leaves out the tests marked slow: end to
end or heavy, i.e. the offline study, SLURM, DDP, training runs and resumes, a process per case, the
larger models' init checks, the README's command blocks)."""
import contextlib
import copy
import csv
import errno
import functools
import importlib
import itertools
import json
import math
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from torchvision import transforms as T

import analyze
import data
import init
import metrics
import models
import plots
import rundir
import train

ROOT = os.path.dirname(os.path.abspath(__file__))
HERE = ROOT


# ========================================================================================
# shared fixtures and helpers
# ========================================================================================


torchvision = pytest.importorskip("torchvision")


def _data_img(path, seed, mode="RGB", size=(40, 30)):
    """A small random image file (PNG or JPEG by suffix)."""
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)


def _data_csv(path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def _data_aptos(root, n=20):
    rows = []
    for k in range(n):
        rows.append([f"id{k:03d}", k % 5])
        _data_img(root / "train_images" / f"id{k:03d}.png", k)
    _data_csv(root / "train.csv", ["id_code", "diagnosis"], rows)
    return {f"train_images/id{k:03d}.png": k % 5 for k in range(n)}


_DATA_CHEX_VALUES = ["", "1.0", "0.0", "-1.0"]


def _data_chexpert(base, csv_dir, n_patients=10):
    """Images under base/CheXpert-v1.0-small/train/...; train.csv written in csv_dir.
    Returns {Path: expected label vector}."""
    rng = np.random.default_rng(0)
    rows, labels, k = [], {}, 0
    for p in range(1, n_patients + 1):
        for s in range(1, 1 + (p % 3) + 1):
            for view in ["view1_frontal", "view2_lateral"][: 1 + (p + s) % 2]:
                rel = f"CheXpert-v1.0-small/train/patient{p:05d}/study{s}/{view}.jpg"
                _data_img(base / rel, k, mode="L", size=(32, 36))
                vals = [_DATA_CHEX_VALUES[v] for v in rng.integers(0, 4, 14)]
                if k % 5 == 0:                         # some rows with no positive at all
                    vals = [v if v != "1.0" else "-1.0" for v in vals]
                rows.append([rel, "Female", 50, "Frontal", "AP"] + vals)
                y = np.array([1.0 if v == "1.0" else 0.0 for v in vals], np.float32)
                if y.sum() == 0:
                    y[0] = 1.0
                labels[rel] = y
                k += 1
    _data_csv(csv_dir / "train.csv", ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA"] + data.CHEXPERT_CLASSES, rows)
    return labels


_USER_KINDS = {"rgb": ".png", "grey": ".png", "rgba": ".png", "jpg": ".jpg", "16bit": ".png", "bmp": ".bmp",
               "tif": ".tif"}


def _user_img(path, seed, kind, size=(20, 16)):
    """A small image file of one kind; returns the RGB uint8 array the toolkit must see (before resizing)."""
    rng = np.random.default_rng(seed)
    w, h = size
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    g = rng.integers(0, 256, (h, w), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "grey":
        Image.fromarray(g, "L").save(path)
        return np.repeat(g[..., None], 3, 2)
    if kind == "rgba":                                   # alpha is dropped
        Image.fromarray(np.dstack([rgb, g]), "RGBA").save(path)
        return rgb
    if kind == "16bit":                                  # I;16 PNG, scaled back by 1/257 exactly
        Image.fromarray(g.astype(np.uint16) * 257).save(path)
        return np.repeat(g[..., None], 3, 2)
    Image.fromarray(rgb).save(path)
    return np.asarray(Image.open(path).convert("RGB")) if kind == "jpg" else rgb


def _user_folder(root, classes, n, prefix=""):
    """root/<prefix>/<class>/<k>_<kind><ext>, every kind in turn; {relative path: (label, pixels)}."""
    truth, kinds = {}, list(_USER_KINDS)
    for c, name in enumerate(sorted(classes)):
        for k in range(n):
            kind = kinds[(k + c) % len(kinds)]
            rel = f"{prefix}{name}/{k:02d}_{kind}{_USER_KINDS[kind]}"
            truth[rel] = (c, _user_img(root / rel, 100 * c + k, kind))
    return truth


# a tiny run: resnet18 at 32 px on 64 images per split, batch 16 -> 4 iterations per epoch
_TRAIN_TINY = ["--data", "synthetic", "--subset", "64", "--img-size", "32", "--batch-size", "16",
               "--warmup", "4", "--log-every", "2", "--workers", "0", "--device", "cpu"]


_TIME_KEYS = ("wall_seconds", "train_seconds", "images_per_second")


def _train_env(tmp_path, threads=1):
    env = dict(os.environ, TORCH_HOME=str(tmp_path / "torch_home"), OMP_NUM_THREADS=str(threads),
               PYTHONPATH=ROOT)
    return env


def _train_run(args, tmp_path, check=True, timeout=600, **kw):
    p = subprocess.run([sys.executable, os.path.join(ROOT, "train.py")] + args, capture_output=True, text=True,
                       env=_train_env(tmp_path), cwd=str(tmp_path), timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"train.py failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def _train_summary(out):
    with open(os.path.join(out, "summary.json")) as f:
        s = json.load(f)
    return {k: v for k, v in s.items() if k not in _TIME_KEYS}


def _train_main(argv, capsys=None):
    """train.main in-process (no interpreter start-up): (exit code, stdout, stderr)."""
    import contextlib
    import io
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = train.main(argv)
        except SystemExit as e:  # argparse's own errors
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


def _train_tree(root):
    """{relative path: sha1 of the content} of every file under root: a failed start must not change it."""
    import hashlib
    tree = {}
    for here, _, files in os.walk(root):
        for f in files:
            p = os.path.join(here, f)
            tree[os.path.relpath(p, root)] = hashlib.sha1(open(p, "rb").read()).hexdigest()
    return tree


def _train_dead_pid():
    """The pid of a process that has exited (a killed writer)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _train_tf32():
    """The float32 switches metrics.exact_float32 turns off: TF32 matmuls and cuDNN convolutions."""
    b = torch.backends
    if hasattr(b.cuda.matmul, "fp32_precision"):
        return b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision
    return torch.get_float32_matmul_precision(), b.cudnn.allow_tf32


@pytest.fixture
def tf32_on():
    """TF32 allowed for matmuls and cuDNN (as a user may set it), restored after the test."""
    b = torch.backends
    new_api = hasattr(b.cuda.matmul, "fp32_precision")
    saved = (b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision) if new_api else \
        (torch.get_float32_matmul_precision(), b.cudnn.allow_tf32)
    if new_api:
        b.cuda.matmul.fp32_precision = b.cudnn.conv.fp32_precision = "tf32"
    else:
        torch.set_float32_matmul_precision("high")
        b.cudnn.allow_tf32 = True
    yield _train_tf32()
    if new_api:
        b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision = saved
    else:
        torch.set_float32_matmul_precision(saved[0])
        b.cudnn.allow_tf32 = saved[1]


_PLOTS_LAYERS = {
    "resnet18": ["conv1", "layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0", "layer3.1", "layer4.0",
                 "layer4.1"],
    "deit_s": ["patch_embed.proj"] + [f"blocks.{i}.{m}" for i in range(12) for m in ("attn", "mlp")],
    "deit_s_5b": ["patch_embed.proj"] + [f"blocks.{i}.{m}" for i in range(5) for m in ("attn", "mlp")],
    "swin_t": ["features.0.0"] + [f"features.{s}.{b}.{m}" for s, d in ((1, 2), (3, 2), (5, 6), (7, 2))
                                  for b in range(d) for m in ("attn", "mlp")],
}


_PLOTS_N = {"resnet18": 6, "deit_s": 14, "deit_s_5b": 7, "swin_t": 10}


_PLOTS_MIXING = {"resnet18": "convolution", "deit_s": "attention", "deit_s_5b": "attention", "swin_t": "attention"}


def _plots_run_cli(*argv, cwd=ROOT, timeout=600):
    return subprocess.run([sys.executable, *argv], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _plots_dump(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def _plots_write_run(root, model, data, n, seed, analyses=None, ref=None, summary=True):
    """One run directory in the README's layout, with made-up but well-formed numbers.
    n=None is a random-init run. ref: (ref_n, ref_init) adds a values['cka']['ref'] block."""
    N, layers = _PLOTS_N[model], _PLOTS_LAYERS[model]
    L = len(layers)
    init = "ri" if n is None else "wt" if n == N else "st" if n == 0 else "wtst"
    tag = "ri" if n is None else f"n{n}"
    run = os.path.join(root, f"{model}-{data}-{tag}-s{seed}")
    rng = np.random.default_rng([seed, L, 0 if n is None else n + 1])
    frac = 0.0 if n is None else n / N
    metric = "roc_auc" if data == "synthetic" else "macro_recall"
    cfg = {"model": model, "data": data, "n": n, "N": N, "init": init, "seed": seed, "split_seed": 0,
           "img_size": 64, "batch_size": 64, "lr": 1e-4, "out": run, "weights": None if n is None else "imagenet"}
    info = {"name": data, "classes": ["a", "b"], "num_classes": 2, "multilabel": False, "metric": metric,
            "loss": "ce", "mean": [0.5] * 3, "std": [0.25] * 3}
    _plots_dump(os.path.join(run, "config.json"), {"config": cfg, "data": info, "sizes": [64, 32, 32],
                                                   "init": ["x"], "versions": {"torch": "2.x-test"},
                                                   "facts": {"token_mixing": _PLOTS_MIXING[model]},
                                                   "format": "wtst-run/1"})
    test = 0.6 + 0.3 * frac + 0.02 * rng.standard_normal()
    best_it = int(400 - 250 * frac + 20 * seed)
    if summary:
        _plots_dump(os.path.join(run, "summary.json"), {
            "model": model, "data": data, "init": init, "n": n, "N": N, "seed": seed, "metric": metric,
            "best_val_metric": test + 0.01, "best_iteration": best_it, "convergence_iteration": best_it,
            "test": {metric: test, "loss": 0.5}, "iterations": 500, "epochs_run": 5.0, "validations": 10,
            "stop_reason": "early stopping: 6 validations without improvement", "wall_seconds": 10.0,
            "train_seconds": 9.0,
            "images_per_second": 100.0})
    deit = model.startswith("deit")
    types = ["cls", "patches", "all"] if deit else ["all"]
    depth = np.linspace(0, 1, L)

    def cka(Lc, scale):
        i, j = np.meshgrid(np.arange(L), np.arange(Lc), indexing="ij")
        m = np.exp(-np.abs(i / L - j / Lc) * 4) * scale + 0.05 * rng.random((L, Lc))
        m = np.clip(m, 0, 1).tolist()
        m[0][-1] = None  # an undefined value (constant layer) is null
        return m

    head = {"run": os.path.abspath(run), "model": model, "data": data, "init": init, "n": n, "N": N, "seed": seed,
            "layers": layers, "facts": {"feature_types": types, "has_attention": deit}}
    docs = {}
    values = {"init": {t: cka(L, 0.5 + 0.5 * frac) for t in types}}
    settings = {"batch_size": 128, "mode": "minibatch", "debiased": True}
    if ref is not None:
        values["ref"] = {t: cka(L, 0.7) for t in types}
        settings.update(ref="/x", ref_layers=layers, ref_init=ref[1], ref_n=ref[0])
    docs["cka"] = dict(head, metric="cka", values=values, settings=settings)
    docs["knn"] = dict(head, metric="knn", values={t: (0.55 + 0.3 * depth * (0.5 + frac) / 1.5
                                                       + 0.01 * rng.standard_normal(L)).tolist() for t in types},
                       settings={"k": 200})
    reverted = (test - 0.2 * rng.random(L)).tolist()
    docs["reinit"] = dict(head, metric="reinit", values={"baseline": test, "reverted": reverted,
                                                         "drop": [test - v for v in reverted]}, settings={})
    docs["l2"] = dict(head, metric="l2", values=(1e-6 * (1 + 10 * depth) * (2 - frac)).tolist(), settings={})
    if deit:
        blocks = [l for l in layers if l.endswith(".attn")]
        per_head = 20 + 60 * np.linspace(0, 1, len(blocks))[:, None] * (1 - 0.5 * frac) + rng.random((len(blocks), 6))
        share = 0.1 + 0.05 * rng.random((len(blocks), 6))  # CLS share; the dropped form is renormalised x (1 - it)
        docs["attention"] = dict(head, metric="attention", layers=blocks, settings={"unit": "pixels"},
                                 values={"per_block": (per_head * (1 - share)).mean(1).tolist(),
                                         "per_head": (per_head * (1 - share)).tolist(),
                                         "per_block_renormalized": per_head.mean(1).tolist(),
                                         "per_head_renormalized": per_head.tolist(),
                                         "cls_share_per_block": share.mean(1).tolist(),
                                         "cls_share_per_head": share.tolist()})
    docs["convergence"] = dict(head, metric="convergence", layers=[], settings={}, values={
        "best_iteration": best_it, "best_val_metric": test + 0.01, "iterations": 500, "val_metric": metric,
        "curve": [[100, 0.5], [best_it, test + 0.01]]})
    for name in (analyses if analyses is not None else docs):
        _plots_dump(os.path.join(run, "analysis", f"{name}.json"), docs[name])
    return run


# ========================================================================================
# rundir.py: the run directory: its files, written and read back with checks
# ========================================================================================


class TestRundir:
    """rundir.py: the run directory: its files, written and read back with checks."""

    # ---- log.jsonl: one checked reader
    def test_rundir_read_log_records_torn_last_line_and_nan(self, tmp_path):
        """rundir.read_log (analyze.py's convergence and plots.py's curves): the records in order,
        NaN tokens of older logs as null, per-class lists kept, a last line cut short by a kill left
        out, no log at all an empty list."""
        run = tmp_path / "run"
        run.mkdir()
        assert rundir.read_log(str(run)) == []
        lines = ['{"iteration": 2, "train_loss": 1.5, "lr": 0.001}',
                 '{"iteration": 4, "epoch": 0.5, "val": {"mean_auc": NaN, "loss": 0.7, '
                 '"per_class_auc": [0.5, null]}, "best": true}']
        (run / "log.jsonl").write_text("\n".join(lines) + '\n{"iteration": 6, "train_lo')
        assert rundir.read_log(str(run)) == [
            {"iteration": 2, "train_loss": 1.5, "lr": 0.001},
            {"iteration": 4, "epoch": 0.5, "val": {"mean_auc": None, "loss": 0.7, "per_class_auc": [0.5, None]},
             "best": True}]
        (run / "log.jsonl").write_text("\n".join(lines) + "\n")
        assert len(rundir.read_log(str(run))) == 2

    @pytest.mark.parametrize("line", ['{"iteration": 6, "train_lo', '{"train_loss": 1.0}', '{"iteration": -1}',
                                      '{"iteration": 2.5}', '{"iteration": 2, "val": [0.5]}',
                                      '{"iteration": 2, "lr": "high"}', '{"iteration": 2, "val": {"auc": "x"}}',
                                      '[1, 2]', ''],
                             ids=["torn_inside", "no_iteration", "negative", "float_iteration", "val_list",
                                  "text_value", "val_text", "not_object", "empty"])
    def test_rundir_read_log_refuses_a_line_train_py_does_not_write(self, tmp_path, line):
        """A line that is not a record train.py writes, anywhere but a torn last line, is one
        ValueError naming the file and the line number."""
        run = tmp_path / "run"
        run.mkdir()
        (run / "log.jsonl").write_text('{"iteration": 2, "lr": 0.1}\n' + line + '\n{"iteration": 4, "lr": 0.1}\n')
        with pytest.raises(ValueError, match=r"log\.jsonl line 2 is not a record"):
            rundir.read_log(str(run))

    def test_rundir_plots_leaves_out_a_bad_log_with_a_note(self, tmp_path):
        """plots.py draws no curves from a log that fails its check, and says so in a note."""
        run = tmp_path / "run"
        run.mkdir()
        (run / "log.jsonl").write_text('{"iteration": 2}\n{not json\n{"iteration": 4}\n')
        notes = []
        assert plots.read_log(str(run), notes) == []
        assert len(notes) == 1 and "log.jsonl line 2" in notes[0] and "left out" in notes[0]


# ========================================================================================
# models.py: the architectures, their facts and checkpoints
# ========================================================================================


# published parameter counts with a 1000-class head (models.md); inception without aux head
_MODELS_PARAMS = {"deit_t": 5_717_416, "deit_s": 22_050_664, "deit_b": 86_567_656,
                  "swin_t": 28_288_354, "resnet18": 11_689_512, "resnet50": 25_557_032,
                  "resnet152": 60_192_808, "inception_v3": 23_834_568}


# smallest sensible test input per model (DeiT-S/B/5b are built with img_size=64: a 4x4 grid)
_MODELS_INPUT = {"deit_t": 224, "deit_s": 64, "deit_b": 64, "deit_s_5b": 64, "swin_t": 100,
                 "resnet18": 64, "resnet50": 64, "resnet152": 64, "inception_v3": 80}


_MODELS_N_GROUPS = {"deit_t": 14, "deit_s": 14, "deit_b": 14, "deit_s_5b": 7, "swin_t": 14,
                    "resnet18": 6, "resnet50": 6, "resnet152": 6, "inception_v3": 7}


_MODELS_N_LAYERS = {"deit_t": 25, "deit_s": 25, "deit_b": 25, "deit_s_5b": 11, "swin_t": 25,
                    "resnet18": 9, "resnet50": 17, "resnet152": 51, "inception_v3": 16}


_MODELS_TIMM = {"deit_t": "deit_tiny_patch16_224", "deit_s": "deit_small_patch16_224",
                "deit_b": "deit_base_patch16_224", "deit_s_5b": "deit_small_patch16_224"}


def _models_reference(name, img_size=224):
    """The torchvision / timm model of the same architecture, random weights, eval mode.
    timm attention runs its non-fused path (explicit softmax)."""
    torch.manual_seed(0)
    if name in _MODELS_TIMM:
        timm = pytest.importorskip("timm")
        ref = timm.create_model(_MODELS_TIMM[name], pretrained=False, img_size=img_size)
        if name == "deit_s_5b":
            ref.blocks = ref.blocks[:5]
        for blk in ref.blocks:
            blk.attn.fused_attn = False
        return ref.eval()
    if name == "inception_v3":
        return torchvision.models.inception_v3(weights=None, aux_logits=False,
                                               init_weights=False).eval()
    if name == "swin_t":  # used by many tests and slow to initialise: build once, copy
        return copy.deepcopy(_models_torchvision_swin())
    return getattr(torchvision.models, name)(weights=None).eval()


@functools.lru_cache(maxsize=1)
def _models_torchvision_swin():
    torch.manual_seed(0)
    return torchvision.models.swin_t(weights=None).eval()


def _models_pair(name, img_size=224):
    """(ours, reference) holding the same weights; ours is built on the meta device (no init
    cost) and takes the reference tensors with strict=True and zero renaming."""
    ref = _models_reference(name, img_size)
    with torch.device("meta"):
        ours = models.create_model(name, img_size=img_size)
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    return ours.eval(), ref


def _models_param_count(name):
    with torch.device("meta"):
        return sum(p.numel() for p in models.create_model(name).parameters())


class _ModelsPayload:
    """Any custom class instance makes a pickle carry code that weights_only refuses."""


@pytest.fixture
def _models_empty_hub(tmp_path, monkeypatch):
    """Empty torch.hub cache and no network: any download attempt fails at once."""
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    calls = []

    def no_network(url, *args, **kwargs):
        calls.append(url)
        raise urllib.error.URLError("network disabled in tests")
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return calls


class TestModels:
    """models.py: the architectures, their facts and checkpoints."""

    # ---- outputs, gradients and facts against torchvision / timm
    @pytest.mark.parametrize("name", models.MODELS)
    def test_models_match_reference(self, name):
        if name in _MODELS_PARAMS:
            assert _models_param_count(name) == _MODELS_PARAMS[name]
        s = _MODELS_INPUT[name]
        ours, ref = _models_pair(name, img_size=s if name.startswith("deit") else 224)
        assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
        assert list(ours.state_dict()) == list(ref.state_dict())
        x = torch.randn(2, 3, s, s, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            diff = (ours(x) - ref(x)).abs().max().item()
        assert diff <= 1e-5, f"{name}: max |ours - reference| = {diff}"

    def test_models_swin_shifted_windows_and_gradients(self):
        """112 px: shifted windows over 4x4 and 2x2 window grids, then a backward pass."""
        ours, ref = _models_pair("swin_t")
        x = torch.randn(1, 3, 112, 112, generator=torch.Generator().manual_seed(2))
        a, b = ours(x), ref(x)
        assert (a - b).abs().max().item() <= 1e-5
        a.square().sum().backward()
        b.square().sum().backward()
        refp = dict(ref.named_parameters())
        for n, p in ours.named_parameters():
            g = refp[n].grad
            assert (p.grad - g).norm() <= 1e-4 * g.norm() + 1e-7, n

    def test_models_swin_stochastic_depth_matches_torchvision(self):
        ours, ref = _models_pair("swin_t")
        ours.train(), ref.train()
        x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
        torch.manual_seed(7)
        a = ours(x)
        torch.manual_seed(7)
        b = ref(x)
        assert (a - b).abs().max().item() <= 1e-5
        with torch.no_grad():  # branches were really dropped in training mode
            assert (a - ours.eval()(x)).abs().max().item() > 1e-3

    def test_models_deit_gradients_match_timm(self):
        ours, ref = _models_pair("deit_t", img_size=64)
        x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
        ours(x).square().sum().backward()
        ref(x).square().sum().backward()
        refp = dict(ref.named_parameters())
        for n, p in ours.named_parameters():
            g = refp[n].grad  # fused vs explicit attention: equal up to float rounding
            assert (p.grad - g).norm() <= 1e-4 * g.norm() + 1e-7, n

    def test_models_unknown_name_and_bad_args(self):
        with pytest.raises(ValueError, match="deit_t.*inception_v3"):
            models.create_model("vit_huge")
        with pytest.raises(ValueError, match="multiple of 16"):
            models.create_model("deit_t", img_size=100)
        with pytest.raises(ValueError, match="num_classes"):
            models.create_model("resnet18", num_classes=0)
        m = models.create_model("deit_t", img_size=96)
        with pytest.raises(ValueError, match="expected \\(96, 96\\)"):
            m(torch.zeros(1, 3, 64, 64))

    @pytest.mark.parametrize("name", models.MODELS)
    def test_models_metadata_groups_and_layers(self, name):
        size = _MODELS_INPUT[name] if name.startswith("deit") else 224
        m = models.create_model(name, num_classes=7, img_size=size).eval()
        assert m.model_name == name and m.num_classes == 7 and m.img_size == size
        head = m.get_submodule(m.head_name)
        assert isinstance(head, nn.Linear) and head.out_features == 7

        # groups: every backbone parameter and buffer in exactly one group, the head in none
        groups = m.wtst_groups()
        assert len(groups) == _MODELS_N_GROUPS[name]
        assert len({label for label, _ in groups}) == len(groups)
        modules = dict(m.named_modules())
        params = dict(m.named_parameters())
        for _, names in groups:
            for n in names:
                assert n in modules or n in params, n
        for key in m.state_dict():
            owners = [label for label, names in groups
                      if any(key == n or key.startswith(n + ".") for n in names)]
            expected = 0 if key.startswith(m.head_name + ".") else 1
            assert len(owners) == expected, (key, owners)

        # analysis layers: real modules, documented output layouts, outputs never mutated later
        layers = m.feature_layers()
        assert len(layers) == _MODELS_N_LAYERS[name] and len(set(layers)) == len(layers)
        seen = {}
        hooks = [modules[n].register_forward_hook(
            lambda mod, inp, out, n=n: seen.__setitem__(n, (out, out.clone()))) for n in layers]
        s = 96 if name.startswith("swin") else _MODELS_INPUT[name]
        with torch.no_grad():
            m(torch.randn(2, 3, s, s))
        for h in hooks:
            h.remove()
        assert list(seen) == layers  # hooks fire in forward order
        for n, (out, out_copy) in seen.items():
            assert torch.equal(out, out_copy), f"{n} output was modified in place after its hook"
            assert out.ndim == (3 if name.startswith("deit") and n != "patch_embed.proj" else 4), n
        if name.startswith("deit"):
            d, g = m.pos_embed.shape[-1], size // 16
            assert seen["patch_embed.proj"][0].shape == (2, d, g, g)
            assert layers[1:3] == ["blocks.0.attn", "blocks.0.mlp"]
            assert all(seen[n][0].shape == (2, 1 + g * g, d) for n in layers[1:])
            assert (m.patch_size, m.grid_size, m.num_prefix_tokens) == (16, (g, g), 1)
        elif name == "swin_t":
            # the patch conv itself, as DeiT's patch_embed.proj (issue 10: not conv + permute + LayerNorm)
            assert layers[:3] == ["features.0.0", "features.1.0.attn", "features.1.0.mlp"]
            assert isinstance(modules["features.0.0"], nn.Conv2d)
            assert seen["features.0.0"][0].shape == (2, 96, 24, 24)
            assert seen["features.7.1.mlp"][0].shape == (2, 3, 3, 768)
            assert [lab for lab, _ in groups][:4] == ["patchifier", "stage1.block1", "stage1.block2",
                                                     "stage2.block1"]
            assert groups[3][1] == ["features.2", "features.3.0"]
        elif name.startswith("resnet"):
            assert layers[:2] == ["conv1", "layer1.0"]
            assert [lab for lab, _ in groups] == ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4"]
        else:
            assert layers[5] == "Mixed_5b" and layers[-1] == "Mixed_7c"
            assert groups[1] == ("Conv2d_2", ["Conv2d_2a_3x3", "Conv2d_2b_3x3"])

    @pytest.mark.parametrize("name", ["deit_t", "swin_t"])
    def test_models_attention_recording(self, name):
        m = models.create_model(name).eval()
        s = 224 if name == "deit_t" else 64
        x = torch.randn(2, 3, s, s)
        with torch.no_grad():
            fused = m(x)
            m.record_attention(True)
            rec = m(x)
        probs = m.attention_probs()
        assert len(probs) == 12 and all(p is not None and p.dtype == torch.float32 for p in probs)
        for p in probs:
            assert torch.allclose(p.sum(-1), torch.ones(()), atol=1e-5) and not p.requires_grad
        if name == "deit_t":
            assert probs[0].shape == (2, 3, 197, 197)
        else:
            assert probs[0].shape == (2 * 9, 3, 49, 49)  # 16x16 map padded to 21x21: 9 windows
        assert (fused - rec).abs().max().item() <= 1e-5
        m.record_attention(False)
        assert all(p is None for p in m.attention_probs())

    def test_models_token_mixing_fact(self):
        """Each model states how it mixes positions (train.py writes it to config.json; findings.py
        groups models by it for F4): attention for DeiT and Swin, convolution for ResNet and Inception."""
        assert models.VisionTransformer.token_mixing == models.SwinTransformer.token_mixing == "attention"
        assert models.ResNet.token_mixing == models.Inception3.token_mixing == "convolution"
        assert models.create_model("deit_t", img_size=32).token_mixing == "attention"
        assert models.create_model("resnet18", img_size=32).token_mixing == "convolution"

    def test_models_deit_record_matches_timm_exactly(self):
        ours, ref = _models_pair("deit_s", img_size=64)
        ours.record_attention(True)
        x = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            assert (ours(x) - ref(x)).abs().max().item() <= 1e-6

    # ---- checkpoints
    @pytest.mark.parametrize("wrap", ["flat", "model", "state_dict"])
    def test_models_checkpoint_wrappings(self, tmp_path, wrap):
        src = models.create_model("resnet18")
        sd = src.state_dict()
        obj = {"flat": sd, "model": {"model": sd, "epoch": 3}, "state_dict": {"state_dict": sd}}[wrap]
        path = tmp_path / "ckpt.pth"
        torch.save(obj, path)
        dst = models.create_model("resnet18")
        rep = models.load_pretrained(dst, str(path))
        assert rep["skipped"] == [] and rep["source"] == str(path)
        assert sorted(rep["loaded"]) == sorted(sd)
        for k, v in dst.state_dict().items():
            assert torch.equal(v, sd[k]), k

    def test_models_checkpoint_inception_aux_and_swin_index(self, tmp_path):
        ref = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
        torch.save(ref.state_dict(), tmp_path / "inc.pth")
        m = models.create_model("inception_v3")
        rep = models.load_pretrained(m, str(tmp_path / "inc.pth"))
        assert rep["skipped"] and all(k.startswith("AuxLogits.") for k in rep["skipped"])
        assert torch.equal(m.fc.weight, ref.fc.weight)

        sd = _models_reference("swin_t").state_dict()
        assert "features.1.0.attn.relative_position_index" in sd
        torch.save(sd, tmp_path / "swin.pth")
        m = models.create_model("swin_t")
        rep = models.load_pretrained(m, str(tmp_path / "swin.pth"))
        assert rep["skipped"] == [] and "features.5.3.attn.relative_position_index" in rep["loaded"]

    def test_models_checkpoint_head_of_other_size_is_skipped(self, tmp_path):
        torch.save({"model": models.create_model("deit_t").state_dict()}, tmp_path / "d.pth")
        m = models.create_model("deit_t", num_classes=5)
        head = m.head.weight.detach().clone()
        rep = models.load_pretrained(m, str(tmp_path / "d.pth"))
        assert sorted(rep["skipped"]) == ["head.bias", "head.weight"]
        assert torch.equal(m.head.weight, head) and m.head.out_features == 5

    def test_models_checkpoint_deit_s_5b_skips_blocks(self, tmp_path):
        src = models.create_model("deit_s")
        torch.save({"model": src.state_dict()}, tmp_path / "s.pth")
        m = models.create_model("deit_s_5b")
        rep = models.load_pretrained(m, str(tmp_path / "s.pth"))
        assert {k.split(".")[1] for k in rep["skipped"]} == {str(i) for i in range(5, 12)}
        assert torch.equal(m.blocks[4].mlp.fc2.weight, src.blocks[4].mlp.fc2.weight)
        assert torch.equal(m.norm.weight, src.norm.weight)

    def test_models_checkpoint_errors(self, tmp_path):
        m = models.create_model("resnet18")
        with pytest.raises(FileNotFoundError, match="nope.pth"):
            models.load_pretrained(m, str(tmp_path / "nope.pth"))

        good = tmp_path / "good.pth"
        torch.save(m.state_dict(), good)
        cut = tmp_path / "cut.pth"
        cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
        with pytest.raises(ValueError, match="cut.pth.*truncated"):
            models.load_pretrained(m, str(cut))

        evil = tmp_path / "evil.pth"
        torch.save({"model": m.state_dict(), "extra": _ModelsPayload()}, evil)
        with pytest.raises(ValueError, match="refusing to load .*evil.pth"):
            models.load_pretrained(m, str(evil))

        sd = m.state_dict()
        sd["extra.weight"] = torch.zeros(1)
        del sd["layer1.0.conv1.weight"]
        sd["layer2.0.conv1.weight"] = torch.zeros(1, 1, 1, 1)
        torch.save(sd, tmp_path / "bad.pth")
        with pytest.raises(ValueError) as e:
            models.load_pretrained(m, str(tmp_path / "bad.pth"))
        msg = str(e.value)
        assert "\n" not in msg and "bad.pth" in msg
        for part in ("missing: layer1.0.conv1.weight", "unexpected: extra.weight",
                     "shape mismatch: layer2.0.conv1.weight"):
            assert part in msg

        torch.save(models.create_model("resnet50").state_dict(), tmp_path / "r50.pth")
        with pytest.raises(ValueError, match="does not fit resnet18"):
            models.load_pretrained(m, str(tmp_path / "r50.pth"))

    def test_models_imagenet_offline_error_names_url_and_path(self, _models_empty_hub):
        m = models.create_model("resnet18")
        path = os.path.join(torch.hub.get_dir(), "checkpoints", "resnet18-f37072fd.pth")
        with pytest.raises(FileNotFoundError) as e:
            models.load_pretrained(m, "imagenet")
        msg = str(e.value)
        assert "\n" not in msg and models.PRETRAINED_URLS["resnet18"] in msg and path in msg
        assert _models_empty_hub == [models.PRETRAINED_URLS["resnet18"]]

    def test_models_imagenet_file_placed_by_hand(self, _models_empty_hub):
        src = models.create_model("deit_t")
        path = os.path.join(torch.hub.get_dir(), "checkpoints", "deit_tiny_patch16_224-a1311bcf.pth")
        os.makedirs(os.path.dirname(path))
        torch.save({"model": src.state_dict()}, path)
        m = models.create_model("deit_t", num_classes=3)
        rep = models.load_pretrained(m, "imagenet")
        assert rep["source"] == models.PRETRAINED_URLS["deit_t"] and _models_empty_hub == []
        assert sorted(rep["skipped"]) == ["head.bias", "head.weight"]
        assert torch.equal(m.pos_embed, src.pos_embed)

    # ---- other sizes
    @pytest.mark.parametrize("size", [96, 384])
    def test_models_deit_other_img_size(self, tmp_path, size):
        timm = pytest.importorskip("timm")
        from timm.layers import resample_abs_pos_embed
        src = models.create_model("deit_t")
        torch.save({"model": src.state_dict()}, tmp_path / "t.pth")
        m = models.create_model("deit_t", img_size=size).eval()
        rep = models.load_pretrained(m, str(tmp_path / "t.pth"))
        g = size // 16
        assert "pos_embed" in rep["loaded"] and m.pos_embed.shape == (1, 1 + g * g, 192)
        assert m.grid_size == (g, g)
        expected = resample_abs_pos_embed(src.pos_embed.detach(), new_size=(g, g), num_prefix_tokens=1)
        assert torch.equal(m.pos_embed.detach(), expected)  # antialias=True, like timm
        assert torch.equal(m.pos_embed[:, :1], src.pos_embed[:, :1])
        # the same weights in timm at this size give the same logits
        ref = timm.create_model("deit_tiny_patch16_224", img_size=size).eval()
        ref.load_state_dict(m.state_dict())
        x = torch.randn(1, 3, size, size)
        with torch.no_grad():
            out = m(x)
            assert torch.isfinite(out).all()
            assert (out - ref(x)).abs().max().item() <= 1e-5

    @pytest.mark.parametrize("size", [96, 384])
    def test_models_swin_other_img_size(self, size):
        ours, ref = _models_pair("swin_t", img_size=size)
        assert ours.img_size == size
        x = torch.randn(1, 3, size, size)
        with torch.no_grad():
            out = ours(x)
            assert torch.isfinite(out).all() and out.shape == (1, 1000)
            if size == 96:
                assert (out - ref(x)).abs().max().item() <= 1e-5

    # ---- published weights from memory (no torch.hub)
    def test_models_load_pretrained_from_memory(self):
        torch.manual_seed(0)
        src = models.create_model("resnet18", num_classes=7)
        for source in (src.state_dict(), {"model": src.state_dict()}, {"state_dict": src.state_dict()}):
            dst = models.create_model("resnet18", num_classes=7)
            rep = models.load_pretrained(dst, source)
            assert rep["source"] == "state dict" and not rep["skipped"]
            for k, v in src.state_dict().items():
                assert torch.equal(dst.state_dict()[k], v), k
        with pytest.raises(ValueError, match="state dict"):
            models.load_pretrained(dst, {"model": "nope"})


# ========================================================================================
# init.py: WT, ST and WT-ST-n/m initialisation
# ========================================================================================


def _init_pretrained(name):
    """A random 'pretrained' state with distinctive statistics per tensor."""
    torch.manual_seed(123)
    src = models.create_model(name, num_classes=1000, img_size=96 if name != "inception_v3" else 299)
    g = torch.Generator().manual_seed(5)
    state = {}
    for k, v in src.state_dict().items():
        if v.is_floating_point():
            v = (v * (1 + torch.rand((), generator=g)) + 0.1 * torch.randn((), generator=g)
                 + 0.01 * torch.randn(v.shape, generator=g))
        state[k] = v.clone()
    return state


@pytest.fixture(scope="module", params=[pytest.param("deit_s", marks=pytest.mark.slow),
                                        pytest.param("swin_t", marks=pytest.mark.slow),
                                        pytest.param("resnet50", marks=pytest.mark.slow),
                                        pytest.param("inception_v3", marks=pytest.mark.slow)])
def init_case(request):
    name = request.param
    size = 299 if name == "inception_v3" else 96
    return name, size, _init_pretrained(name)


def _init_fresh(name, size, num_classes=7):
    torch.manual_seed(0)
    return models.create_model(name, num_classes=num_classes, img_size=size)


def _init_tol(numel, k=6.0):
    """Tolerances for sample mean (in units of std) and relative std of numel i.i.d. normals."""
    return k / math.sqrt(numel), k * math.sqrt(0.5 / max(1, numel - 1)) + 1e-6


class TestInit:
    """init.py: WT, ST and WT-ST-n/m initialisation."""

    def test_init_wtst_groups_wt_st(self, init_case):
        name, size, pre = init_case
        N = len(_init_fresh(name, size).wtst_groups())
        norms = init.norm_entries(_init_fresh(name, size))
        for n in sorted({0, 1, N // 2, N - 1}):
            model = _init_fresh(name, size)
            groups = model.wtst_groups()
            head_before = {k: v.clone() for k, v in model.state_dict().items() if init.group_index(k, groups) is None}
            buffers_before = {k: v.clone() for k, v in model.named_buffers()}
            init.wtst_init(model, pre, n, seed=3)
            state = model.state_dict()
            params = dict(model.named_parameters())
            for k, v in state.items():
                g = init.group_index(k, groups)
                if g is None:  # the head is left as created
                    assert torch.equal(v, head_before[k]), k
                elif g < n:
                    assert torch.equal(v, pre[k]), f"{k} should be WT (n={n})"
                elif k in norms:
                    leaf = k.rsplit(".", 1)[-1]
                    want = 1.0 if leaf in ("weight", "running_var") else 0.0
                    assert torch.all(v == want), f"{k} should be identity in ST (n={n})"
                elif k not in params:  # other buffers are never redrawn
                    assert torch.equal(v, buffers_before[k]), k
                elif v.numel() < 2:
                    assert torch.equal(v, pre[k]), k
                else:
                    src = pre[k].double()
                    assert not torch.equal(v, pre[k]), f"{k} should be redrawn (n={n})"
                    tol_mean, tol_std = _init_tol(v.numel())
                    s = src.std().item()
                    assert abs(v.double().mean().item() - src.mean().item()) <= tol_mean * s + 1e-7, k
                    assert abs(v.double().std().item() / s - 1) <= tol_std, k

    def test_init_n_equals_N_is_load_state_dict(self, init_case):
        name, size, pre = init_case
        model = _init_fresh(name, size)
        N = len(model.wtst_groups())
        init.wtst_init(model, pre, N, seed=0)
        ref = _init_fresh(name, size)
        head = ref.head_name + "."
        ref.load_state_dict({k: v for k, v in pre.items() if not k.startswith(head) and k in ref.state_dict()},
                            strict=False)
        for k, v in ref.state_dict().items():
            assert torch.equal(model.state_dict()[k], v), k

    def test_init_st_draw_determinism(self, init_case):
        name, size, pre = init_case
        groups = _init_fresh(name, size).wtst_groups()
        a = init.wtst_init(_init_fresh(name, size), pre, 0, seed=1).state_dict()
        b = init.wtst_init(_init_fresh(name, size), pre, 0, seed=1).state_dict()
        c = init.wtst_init(_init_fresh(name, size), pre, 0, seed=2).state_dict()
        fresh = _init_fresh(name, size)
        params, norms = dict(fresh.named_parameters()), init.norm_entries(fresh)
        redrawn = [k for k in params if init.group_index(k, groups) is not None and params[k].numel() > 1
                   and k not in norms]
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert all(not torch.equal(a[k], c[k]) for k in redrawn)
        # group k's ST draw is the same for n = 0 and n = k - 1 (k = 1-based group index)
        k = len(groups) // 2 + 1
        d = init.wtst_init(_init_fresh(name, size), pre, k - 1, seed=1).state_dict()
        for name_ in redrawn:
            if init.group_index(name_, groups) >= k - 1:
                assert torch.equal(a[name_], d[name_]), name_

    def test_init_bad_n_and_describe(self):
        model = models.create_model("resnet18", num_classes=3, img_size=64)
        pre = model.state_dict()
        with pytest.raises(ValueError, match=r"0\.\.6.*conv1"):
            init.wtst_init(model, pre, 7)
        with pytest.raises(ValueError, match="N=6"):
            init.wtst_init(model, pre, -1)
        lines = init.describe_init(model, 2)
        assert len(lines) == 6 and "WT" in lines[1] and "ST" in lines[2]
        total = sum(int(l.split()[-2].replace(",", "")) for l in lines)
        head = sum(p.numel() for k, p in model.named_parameters() if k.startswith("fc."))
        assert total + head == sum(p.numel() for p in model.parameters())

    def test_init_one_element_and_missing(self):
        t = torch.tensor([2.5])
        assert torch.equal(init.st_tensor(t, 0, "x"), t)
        c = torch.full((4, 5), 0.25)  # zero std: the draw is the constant itself
        assert torch.equal(init.st_tensor(c, 0, "c"), c)
        model = models.create_model("resnet18", num_classes=3, img_size=64)
        pre = {k: v for k, v in model.state_dict().items() if not k.startswith("layer4")}
        with pytest.raises(ValueError, match="layer4"):
            init.wtst_init(model, pre, 6)

    def test_init_random_init_seeded(self):
        a = init.random_init(models.create_model("deit_t", num_classes=3, img_size=32), seed=4).state_dict()
        b = init.random_init(models.create_model("deit_t", num_classes=3, img_size=32), seed=4).state_dict()
        c = init.random_init(models.create_model("deit_t", num_classes=3, img_size=32), seed=5).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert not torch.equal(a["blocks.0.attn.qkv.weight"], c["blocks.0.attn.qkv.weight"])
        # the architecture's own scheme: timm-style truncated normal, std 0.02, for DeiT linears
        assert abs(a["blocks.0.mlp.fc1.weight"].std().item() - 0.02) < 0.002


# ========================================================================================
# data.py: datasets, splits, the image cache, generated tasks and your own images
# ========================================================================================


_DATA_DDSM_PREFIX = ["normal", "benign", "benign_without_callback", "cancer"]


def _data_ddsm(root):
    labels, k = {}, 0
    for split, n in (("train", 8), ("val", 4), ("test", 4)):
        names = []
        for _ in range(n):
            prefix = _DATA_DDSM_PREFIX[k % 4]
            name = f"{prefix}_01-B_{k:04d}_1.LEFT_CC.LJPEG.1.jpg"
            _data_img(root / "ddsm_raw" / name, k, mode="L", size=(30, 44))
            names.append(name)
            labels[f"ddsm_raw/{name}"] = 0 if prefix == "normal" else 1
            k += 1
        (root / "ddsm_raw_image_lists").mkdir(parents=True, exist_ok=True)
        (root / "ddsm_raw_image_lists" / f"{split}.txt").write_text("\n".join(names) + "\n")
    return labels


def _data_isic(root, n=20, folder="train"):
    header = ["image"] + data.ISIC_CLASSES + ["UNK"]
    rows, labels = [], {}
    for k in range(n):
        onehot = [0.0] * 9
        onehot[k % 8] = 1.0
        rows.append([f"ISIC_{k:07d}"] + onehot)
        _data_img(root / folder / f"ISIC_{k:07d}.jpg", k)
        labels[f"{folder}/ISIC_{k:07d}.jpg"] = k % 8
    _data_csv(root / "ISIC_2019_Training_GroundTruth.csv", header, rows)
    return labels


def _data_pcam(root, sizes=(("train", 12), ("valid", 6), ("test", 6))):
    import h5py
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for k, (tag, n) in enumerate(sizes):
        rng = np.random.default_rng(k)
        x = rng.integers(0, 256, (n, 96, 96, 3), dtype=np.uint8)
        y = (np.arange(n) % 2).astype(np.uint8).reshape(n, 1, 1, 1)
        with h5py.File(root / f"camelyonpatch_level_2_split_{tag}_x.h5", "w") as f:
            f["x"] = x
        with h5py.File(root / f"camelyonpatch_level_2_split_{tag}_y.h5", "w") as f:
            f["y"] = y
        out[tag] = (x, y.reshape(-1))
    return out


def _data_expected(path, info, grey=False):
    """Eval tensor of an original file by hand: decode, Resize((r, r)), CenterCrop, ToTensor, Normalize."""
    img = Image.open(path).convert("RGB")
    t = T.Compose([T.Resize((info["resize"], info["resize"])), T.CenterCrop(info["img_size"]), T.ToTensor(),
                   T.Normalize(info["mean"], info["std"])])
    return t(img)


def _data_labels_of(ds):
    return dict(zip(ds.ids, ds.labels.tolist()))


def _data_split_matches(built, seed):
    """The split equals make_split on the sorted ids (machine independent: numpy default_rng)."""
    tr, va, te, info = built
    ids = sorted(tr.ids + va.ids + te.ids)
    want = data.make_split(ids, 0.3, seed)
    return want == {"train": tr.ids, "val": va.ids, "test": te.ids}


def _data_expect(exc, match, name, root, **kw):
    with pytest.raises(exc, match=match) as e:
        data.build_datasets(name, root, img_size=16, workers=1, **kw)
    assert "\n" not in str(e.value)
    return str(e.value)


def _data_mk(path, *sub):
    for s in sub:
        (path / s).mkdir(parents=True, exist_ok=True)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _data_mode_cases(tmp_path):
    """(file, what the toolkit must see as uint8 grey values) for images of every kind of mode."""
    g = np.arange(48, dtype=np.float64).reshape(6, 8)
    cases = []

    def add(name, img, want, **kw):
        img.save(tmp_path / name, **kw)
        cases.append((tmp_path / name, np.asarray(want)))
    f01 = (g / 47).astype(np.float32)                          # float in [0, 1]: x 255
    add("f01.tif", Image.fromarray(f01), np.round(f01 * 255))
    fwide = (g * 10 - 200).astype(np.float32)                  # float elsewhere: stretched
    add("fwide.tif", Image.fromarray(fwide), np.round((fwide - fwide.min()) / np.ptp(fwide) * 255))
    i8 = (g * 5).astype(np.int32)                              # 32-bit ints that fit 8 bits: kept
    add("i8.tif", Image.fromarray(i8), i8)
    ibig = (g * 100_000).astype(np.int32)                      # beyond 16 bits: stretched
    add("ibig.tif", Image.fromarray(ibig), np.round(ibig / ibig.max() * 255))
    i16 = (g * 1000).astype(np.uint16)                         # 16-bit PNG: / 257
    add("i16.png", Image.fromarray(i16), np.round(i16 / 257))
    la = np.dstack([g * 5, np.full_like(g, 7)]).astype(np.uint8)  # grey + alpha: alpha dropped
    add("la.png", Image.fromarray(la, "LA"), g * 5)
    bw = (g % 2 == 0)                                          # bilevel: 0 / 255
    add("bw.bmp", Image.fromarray(bw), bw * 255)
    return cases


def _data_dying_worker(job):
    os._exit(3)  # a cache worker killed (out of memory, SIGBUS on a full memory-mapped disk)


@contextlib.contextmanager
def _tmpfs(path, size):
    """A tmpfs of `size` mounted at path (root only; the test skips otherwise)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {p.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _user_csv(root, patients=8, per_patient=2, labels=("normal", "tumour"), column="patient"):
    """root/labels.csv with image, label (one label per patient) and a patient column."""
    rows, truth = [], {}
    for p in range(patients):
        for k in range(per_patient):
            rel = f"imgs/p{p:02d}_{k}.png"
            kind = ["rgb", "grey", "rgba", "16bit"][(p + k) % 4]
            truth[rel] = (p % len(labels), _user_img(root / rel, 10 * p + k, kind))
            rows.append([rel, labels[p % len(labels)], f"P{p:03d}"])
    _data_csv(root / "labels.csv", ["image", "label", column], rows)
    return truth


def _user_mean_std(arrays, r):
    """Per-channel mean/std by numpy over the images resized to (r, r) as torchvision does."""
    px = np.concatenate([np.asarray(T.Resize((r, r))(Image.fromarray(a))).reshape(-1, 3) for a in arrays]) / 255
    return px.mean(0), px.std(0)


def _user_files(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def _data_aptos_root(tmp_path):
    _data_aptos(tmp_path / "aptos", n=10)
    return tmp_path / "aptos"


def _user_bad(tmp_path, case):
    """A bad dataset under tmp_path/d; returns (train.py arguments, expected message)."""
    d = tmp_path / "d"
    if case == "one_class":
        _user_folder(d, ["only"], 10)
        return ["--data", "folder"], "has 1 class(es) ['only'] (expected at least two"
    if case == "class_without_image":
        _user_folder(d, ["a"], 10)
        (d / "b").mkdir()
        (d / "b" / "scan.dcm").write_text("x")
        return ["--data", "folder"], "class 'b' has no image file in"
    if case == "undecodable":
        _user_folder(d, ["a", "b"], 10)
        (d / "b" / "03_broken.png").write_bytes(b"not a png")
        return ["--data", "folder"], f"cannot decode image {d / 'b' / '03_broken.png'}"
    if case == "truncated_jpg":
        _user_folder(d, ["a", "b"], 10)
        jpg = d / "a" / "03_jpg.jpg"
        jpg.write_bytes(jpg.read_bytes()[:-200])
        return ["--data", "folder"], f"cannot decode image {jpg}"
    if case in ("csv_without_image", "csv_without_label"):
        _user_csv(d)
        rows = list(csv.reader(open(d / "labels.csv")))
        drop = rows[0].index(case.split("_")[-1])
        _data_csv(d / "labels.csv", [c for k, c in enumerate(rows[0]) if k != drop],
                  [[v for k, v in enumerate(r) if k != drop] for r in rows[1:]])
        return ["--data", "csv"], f"labels.csv lacks column(s) {case.split('_')[-1]}"
    if case == "csv_missing_images":
        _user_csv(d)
        for p in ("imgs/p01_0.png", "imgs/p02_1.png", "imgs/p04_0.png", "imgs/p05_0.png"):
            (d / p).unlink()
        return ["--data", "csv"], "4 of 16 images listed in"
    if case == "csv_one_class":
        _user_csv(d, labels=("normal",))
        return ["--data", "csv"], "has 1 class(es) ['normal']"
    if case == "too_few_images":
        _user_folder(d, ["a", "b"], 4)
        return ["--data", "folder"], "at least 5 images in one class are needed"
    if case == "too_few_patients":
        _user_csv(d, patients=4, per_patient=5)
        return ["--data", "csv"], ("4 patient(s) are too few for non-empty train/val/test splits "
                                   "(held-out fraction 0.3: at least 5")
    if case == "partial_presplit":
        _user_folder(d, ["a", "b"], 6, prefix="train/")
        _user_folder(d, ["a", "b"], 2, prefix="val/")
        return ["--data", "folder"], "has train/, val/ but no test/"
    if case == "roc_auc_three_classes":
        _user_folder(d, ["a", "b", "c"], 10)
        return ["--data", "folder", "--metric", "roc_auc"], "--metric roc_auc needs two classes"
    if case == "symlink_loop":  # a/loop -> ../a listed 24 images as 7,576 before
        _user_folder(d, ["a", "b"], 12)
        os.symlink("../a", d / "a" / "loop")
        return ["--data", "folder"], "a folder above it (a symlink loop"
    if case == "same_file_two_classes":  # one image, two labels, through a file link
        _user_folder(d, ["a", "b"], 12)
        os.symlink(d / "a" / "00_rgb.png", d / "b" / "zz_link.png")
        return ["--data", "folder"], "'a/00_rgb.png' and 'b/zz_link.png' in"
    if case == "csv_two_spellings":  # './imgs/p00_0.png' beside 'imgs/p00_0.png' was two images
        _user_csv(d)
        with open(d / "labels.csv", "a") as f:
            f.write("./imgs//p00_0.png,tumour,P099\n")
        return ["--data", "csv"], "lists 'imgs/p00_0.png' twice"
    raise AssertionError(case)


_USER_BAD = ["one_class", "class_without_image", "undecodable", "truncated_jpg", "csv_without_image",
             "csv_without_label", "csv_missing_images", "csv_one_class", "too_few_images", "too_few_patients",
             "partial_presplit", "roc_auc_three_classes", "symlink_loop", "same_file_two_classes",
             "csv_two_spellings"]


class TestData:
    """data.py: datasets, splits, the image cache, generated tasks and your own images."""

    # ---- layouts
    def test_data_aptos_labels_splits_and_items(self, tmp_path):
        truth = _data_aptos(tmp_path / "aptos")
        tr, va, te, info = data.build_datasets("aptos", tmp_path / "aptos", img_size=32, seed=0, workers=1)
        assert (len(tr), len(va), len(te)) == (14, 3, 3) and info["sizes"] == {"train": 14, "val": 3, "test": 3}
        assert info["num_classes"] == 5 and info["metric"] == "quadratic_kappa" and info["loss"] == "ce"
        assert not info["multilabel"] and info["mean"] == (0.415, 0.221, 0.073)
        ids = tr.ids + va.ids + te.ids
        assert sorted(ids) == sorted(truth) and len(set(ids)) == 20
        for ds in (tr, va, te):
            assert ds.labels.dtype == np.int64
            assert all(truth[i] == y for i, y in _data_labels_of(ds).items())
        x, y = tr[0]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and isinstance(y, int)
        assert Path(info["split_file"]).parent == tmp_path / "aptos" / ".wtst_cache"  # default cache dir

    def test_data_ddsm_published_splits_and_grey(self, tmp_path):
        truth = _data_ddsm(tmp_path / "ddsm")
        tr, va, te, info = data.build_datasets("ddsm", tmp_path / "ddsm", img_size=32, workers=1)
        assert (len(tr), len(va), len(te)) == (8, 4, 4) and info["split_file"] is None
        lists = tmp_path / "ddsm" / "ddsm_raw_image_lists"
        for ds, s in ((tr, "train"), (va, "val"), (te, "test")):
            assert sorted(ds.ids) == sorted("ddsm_raw/" + n for n in (lists / f"{s}.txt").read_text().split())
            assert all(truth[i] == y for i, y in _data_labels_of(ds).items())
        assert set(tr.labels.tolist()) == {0, 1} and info["mean"] == (0.286,) * 3
        x, _ = data.eval_view(tr)[0]
        assert x.shape == (3, 32, 32) and torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])   # grey -> 3 channels

    @pytest.mark.parametrize("folder", ["train", "ISIC_2019_Training_Input"])
    def test_data_isic_labels_ignore_unk(self, tmp_path, folder):
        truth = _data_isic(tmp_path / "isic", folder=folder)
        tr, va, te, info = data.build_datasets("isic", tmp_path / "isic", img_size=32, workers=1)
        assert (len(tr), len(va), len(te)) == (16, 2, 2) and info["num_classes"] == 8
        assert info["classes"] == data.ISIC_CLASSES and info["metric"] == "macro_recall"
        for ds in (tr, va, te):
            assert all(truth[i] == y for i, y in _data_labels_of(ds).items())

    @pytest.mark.parametrize("layout", ["csv_in_small_folder", "csv_beside_small_folder"])
    def test_data_chexpert_uzeroes_and_patient_split(self, tmp_path, layout):
        base = tmp_path / "chex"
        root = base / "CheXpert-v1.0-small" if layout == "csv_in_small_folder" else base
        truth = _data_chexpert(base, root, n_patients=10)
        tr, va, te, info = data.build_datasets("chexpert", root, img_size=32, seed=3, workers=1)
        assert info["multilabel"] and info["loss"] == "bce"
        assert info["metric"] == "mean_auc" and info["num_classes"] == 14
        assert len(tr) + len(va) + len(te) == len(truth)
        for ds in (tr, va, te):
            assert ds.labels.dtype == np.float32 and ds.labels.shape == (len(ds), 14)
            for i, y in zip(ds.ids, ds.labels):
                np.testing.assert_array_equal(y, truth[i])
        assert (tr.labels.sum(1) > 0).all()                  # every row has a positive ("No Finding" fill)
        patients = [{i.split("/")[2] for i in ds.ids} for ds in (tr, va, te)]
        assert not (patients[0] & patients[1] or patients[0] & patients[2] or patients[1] & patients[2])
        assert [len(p) for p in patients] == [8, 1, 1]       # 20% of 10 patients held out, split in half
        x, y = tr[0]
        assert x.shape == (3, 32, 32) and y.dtype == torch.float32 and y.shape == (14,)

    def test_data_camelyon_hdf5_official_splits(self, tmp_path):
        arrays = _data_pcam(tmp_path / "pcam")
        tr, va, te, info = data.build_datasets("camelyon", tmp_path / "pcam", img_size=96)
        assert (len(tr), len(va), len(te)) == (12, 6, 6) and info["metric"] == "roc_auc"
        np.testing.assert_array_equal(va.labels, arrays["valid"][1])
        x, y = data.eval_view(te)[3]
        assert x.shape == (3, 96, 96) and y == 1
        # eval view = resize 96 -> 110, centre-crop 96 of the stored patch
        want = T.Compose([T.Resize((110, 110)), T.CenterCrop(96), T.ToTensor(), T.Normalize(info["mean"], info["std"])])
        assert torch.equal(x, want(Image.fromarray(arrays["test"][0][3])))
        # lazily opened per worker, picklable
        xs = [b[0] for b in torch.utils.data.DataLoader(data.eval_view(tr), batch_size=4, num_workers=2)]
        assert torch.cat(xs).shape == (12, 3, 96, 96)

    # ---- splits
    def test_data_split_reproducible_and_reused(self, tmp_path):
        _data_aptos(tmp_path / "aptos", n=30)
        root = tmp_path / "aptos"
        a = data.build_datasets("aptos", root, img_size=16, seed=0, cache_dir=tmp_path / "c1", workers=1)
        b = data.build_datasets("aptos", root, img_size=16, seed=0, cache_dir=tmp_path / "c2", workers=1)
        c = data.build_datasets("aptos", root, img_size=16, seed=1, cache_dir=tmp_path / "c1", workers=1)
        assert [d.ids for d in a[:3]] == [d.ids for d in b[:3]]          # same seed, fresh dir: same split
        assert [d.ids for d in a[:3]] != [d.ids for d in c[:3]]          # other seed: other split
        assert _data_split_matches(a, seed=0)
        # the written file is what is used: edit it and the datasets follow
        f = Path(a[3]["split_file"])
        split = json.loads(f.read_text())
        moved = split["train"].pop(0)
        split["val"].append(moved)
        f.write_text(json.dumps(split))
        tr, va, _, _ = data.build_datasets("aptos", root, img_size=16, seed=0, cache_dir=tmp_path / "c1", workers=1)
        assert moved in va.ids and moved not in tr.ids
        # a split file that no longer covers the images is rewritten (with a warning)
        split["val"].remove(moved)
        f.write_text(json.dumps(split))
        with pytest.warns(UserWarning, match="split file"):
            tr, va, te, _ = data.build_datasets("aptos", root, img_size=16, seed=0, cache_dir=tmp_path / "c1",
                                                workers=1)
        assert [tr.ids, va.ids, te.ids] == [d.ids for d in a[:3]]

    def test_data_make_split_fixed_values(self):
        """Pinned output, so a change in the split procedure is noticed (splits must not move)."""
        ids = [f"i{k}" for k in range(10)]
        s = data.make_split(ids, 0.3, seed=0)
        assert sorted(s["train"] + s["val"] + s["test"]) == ids and [len(v) for v in s.values()] == [7, 1, 2]
        assert s == data.make_split(list(reversed(ids)), 0.3, seed=0)    # input order does not matter
        assert (s["val"], s["test"]) == (["i4"], ["i2", "i6"])

    # ---- cache
    @pytest.mark.parametrize("name", ["aptos", "ddsm"])
    def test_data_cache_equals_direct_decoding(self, tmp_path, name):
        root = tmp_path / name
        (_data_aptos if name == "aptos" else _data_ddsm)(root)
        cached = data.build_datasets(name, root, img_size=24, workers=2)     # 2 processes build the cache
        direct = data.build_datasets(name, root, img_size=24, cache=False)
        info = cached[3]
        assert info["cache_file"] and Path(info["cache_file"]).is_file() and direct[3]["cache_file"] is None
        for dc, dd in zip(cached[:3], direct[:3]):
            assert dc.ids == dd.ids
            for k in range(len(dc)):
                xc = data.eval_view(dc)[k][0]
                assert torch.equal(xc, data.eval_view(dd)[k][0])
                assert torch.equal(xc, _data_expected(root / dc.ids[k], info))
        # the train transforms draw from torch's RNG: same seed, same augmented tensor
        torch.manual_seed(5)
        a = cached[0][1][0]
        torch.manual_seed(5)
        assert torch.equal(a, direct[0][1][0])
        assert not torch.equal(cached[0][1][0], a)

    def test_data_cache_reused_and_rebuilt_when_stale(self, tmp_path, monkeypatch):
        root = tmp_path / "aptos"
        _data_aptos(root)
        calls = []
        real = data.decode_image
        monkeypatch.setattr(data, "decode_image", lambda *a: calls.append(a[0]) or real(*a))
        tr, va, te, info = data.build_datasets("aptos", root, img_size=16, workers=1)
        assert len(calls) == 20
        calls.clear()
        info2 = data.build_datasets("aptos", root, img_size=16, workers=1)[3]
        assert calls == [] and info2["cache_file"] == info["cache_file"]   # key matches: reused
        # replace one image: only that file is decoded again, the old cache files are removed
        target = root / tr.ids[0]
        _data_img(target, 999)
        os.utime(target, ns=(1_000_000_000, 1_000_000_000))
        tr3, _, _, info3 = data.build_datasets("aptos", root, img_size=16, workers=1)
        assert calls == [str(target)] and info3["cache_file"] != info["cache_file"]
        assert not Path(info["cache_file"]).exists()
        assert len(list(Path(info["cache_dir"]).glob("aptos_*.npy"))) == 1
        assert torch.equal(data.eval_view(tr3)[0][0], _data_expected(target, info3))
        # add an image (and its row): rebuilt with it, the split file rewritten to include it
        _data_img(root / "train_images" / "new.png", 1000)
        with open(root / "train.csv", "a", newline="") as f:
            csv.writer(f).writerow(["new", 2])
        calls.clear()
        with pytest.warns(UserWarning):
            parts = data.build_datasets("aptos", root, img_size=16, workers=1)
        assert calls == [str(root / "train_images" / "new.png")] and sum(len(d) for d in parts[:3]) == 21
        # another size is another cache
        info4 = data.build_datasets("aptos", root, img_size=20, workers=1)[3]
        assert info4["resize"] == 23 and info4["cache_file"] != parts[3]["cache_file"]

    def test_data_datasets_picklable_with_workers(self, tmp_path):
        root = tmp_path / "aptos"
        _data_aptos(root)
        tr, _, _, _ = data.build_datasets("aptos", root, img_size=16, workers=1)
        tr[0]                                               # opens the memmap in this process
        clone = pickle.loads(pickle.dumps(tr))
        assert torch.equal(data.eval_view(clone)[1][0], data.eval_view(tr)[1][0])
        loader = torch.utils.data.DataLoader(data.eval_view(tr), batch_size=5, num_workers=2)
        xs = torch.cat([b[0] for b in loader])
        assert torch.equal(xs, torch.stack([data.eval_view(tr)[k][0] for k in range(len(tr))]))

    def test_data_default_cache_dir_fallback(self, tmp_path, monkeypatch):
        root = tmp_path / "ro"
        root.mkdir()
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
        monkeypatch.setattr(data.os, "access", lambda p, m: False)        # as if root were read-only
        d = data.default_cache_dir(root)
        assert d.parent == tmp_path / "xdg" / "wtst" and d.is_dir()

    # ---- bad input
    def test_data_bad_names_and_roots(self, tmp_path):
        _data_expect(ValueError, "expected one of aptos, ddsm", "imagenet", tmp_path)
        _data_expect(FileNotFoundError, "missing.*not a folder", "aptos", tmp_path / "missing")
        _data_expect(FileNotFoundError, "not a folder", "isic", None)
        _data_expect(FileNotFoundError, "train.csv does not exist", "aptos", tmp_path)
        _data_expect(FileNotFoundError, "GroundTruth.csv does not exist", "isic", _data_mk(tmp_path / "i", "train"))
        _data_expect(FileNotFoundError, "ISIC_2019_Training_Input", "isic", _data_mk(tmp_path / "i2"))
        _data_expect(FileNotFoundError, "train.txt does not exist", "ddsm", tmp_path)
        _data_expect(FileNotFoundError, "camelyonpatch_level_2_split_train_x.h5 does not exist", "camelyon", tmp_path)

    def test_data_bad_csv_columns_and_labels(self, tmp_path):
        root = tmp_path / "aptos"
        _data_aptos(root, n=10)
        _data_csv(root / "train.csv", ["id", "diagnosis"], [["id000", 0]])
        _data_expect(ValueError, r"train.csv lacks column\(s\) id_code", "aptos", root)
        _data_csv(root / "train.csv", ["id_code", "diagnosis"], [[f"id{k:03d}", 7 if k == 4 else 0] for k in range(10)])
        _data_expect(ValueError, "line 6: diagnosis '7' for id004 is not a grade 0..4", "aptos", root)
        _data_csv(root / "train.csv", ["id_code", "diagnosis"], [[f"id{k:03d}", 0] for k in range(10)] + [["id999", 1]])
        msg = _data_expect(FileNotFoundError, "does not exist", "aptos", root)
        assert "id999.png" in msg and "train.csv" in msg
        # isic: UNK-only row, missing class column
        isic = tmp_path / "isic"
        _data_isic(isic, n=10)
        _data_csv(isic / "ISIC_2019_Training_GroundTruth.csv", ["image"] + data.ISIC_CLASSES + ["UNK"],
                  [["ISIC_0000000"] + [0.0] * 8 + [1.0]])
        _data_expect(ValueError, "ISIC_0000000.*expected exactly one 1", "isic", isic)
        _data_csv(isic / "ISIC_2019_Training_GroundTruth.csv", ["image", "MEL", "NV"], [["ISIC_0000000", 1, 0]])
        _data_expect(ValueError, r"lacks column\(s\) BCC, AK", "isic", isic)
        # chexpert: bad value, missing column, no patient id
        chex = tmp_path / "chex"
        _data_chexpert(chex, chex, n_patients=3)
        rows = list(csv.reader(open(chex / "train.csv")))
        rows[2][5 + 2] = "2.0"
        _data_csv(chex / "train.csv", rows[0], rows[1:])
        _data_expect(ValueError, "line 3: column 'Cardiomegaly' has '2.0'", "chexpert", chex)
        _data_csv(chex / "train.csv", rows[0][:-1], [r[:-1] for r in rows[1:]])
        _data_expect(ValueError, r"lacks column\(s\) Support Devices", "chexpert", chex)
        rows[2][5 + 2] = "1.0"
        rows[1][0] = "CheXpert-v1.0-small/train/p1/study1/view1_frontal.jpg"
        _data_csv(chex / "train.csv", rows[0], rows[1:])
        _data_expect(ValueError, "cannot derive a patient id from Path 'CheXpert-v1.0-small/train/p1", "chexpert", chex)
        # ddsm: a file name without the label prefix
        ddsm = tmp_path / "ddsm"
        _data_ddsm(ddsm)
        (ddsm / "ddsm_raw_image_lists" / "val.txt").write_text("weird_01.jpg\n")
        _data_expect(ValueError, "val.txt line 1: 'weird_01.jpg' does not start with normal_", "ddsm", ddsm)

    @pytest.mark.parametrize("damage", ["truncated_png", "truncated_jpg", "not_an_image"])
    def test_data_bad_image_named(self, tmp_path, damage):
        root = tmp_path / "aptos"
        _data_aptos(root, n=10)
        bad = root / "train_images" / "id003.png"
        if damage == "truncated_png":
            bad.write_bytes(bad.read_bytes()[:-300])
        elif damage == "truncated_jpg":
            Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(
                tmp_path / "x.jpg")
            bad.write_bytes((tmp_path / "x.jpg").read_bytes()[:-500])
        else:
            bad.write_text("hello")
        msg = _data_expect(ValueError, "cannot decode image", "aptos", root)
        assert str(bad) in msg
        assert not list((root / ".wtst_cache").glob("*.npy*"))              # no cache left behind
        # without the cache the error surfaces when the item is read
        parts = data.build_datasets("aptos", root, img_size=16, cache=False)
        ds = next(d for d in parts[:3] if "train_images/id003.png" in d.ids)
        with pytest.raises(ValueError, match="cannot decode image .*id003.png"):
            ds[ds.ids.index("train_images/id003.png")]

    def test_data_image_modes_shown_as_a_viewer_does(self, tmp_path):
        """Issue 23: float and 32-bit images were stored black (or saturated) without a word."""
        for path, want in _data_mode_cases(tmp_path):
            img = data.to_8bit(Image.open(path))
            got = np.asarray(img.convert("L"))
            assert got.shape == want.shape and np.abs(got.astype(int) - want).max() <= 1, path.name
            assert got.max() > 0, f"{path.name} stored black"
        cmyk = Image.fromarray(np.full((4, 4, 4), 60, np.uint8), "CMYK")
        assert np.asarray(data.to_8bit(cmyk)).min() > 0                 # CMYK as RGB, not its raw channels
        p = Image.new("P", (4, 4))
        p.putpalette([200, 100, 50] * 256)
        assert np.asarray(data.to_8bit(p).convert("RGB"))[0, 0].tolist() == [200, 100, 50]
        nan = np.full((4, 4), np.nan, np.float32)
        Image.fromarray(nan).save(tmp_path / "nan.tif")
        with pytest.raises(ValueError, match="nan.tif.*non-finite"):
            data.decode_image(tmp_path / "nan.tif", "RGB", 4)

    def test_data_cache_worker_death_is_an_error_not_a_hang(self, tmp_path, monkeypatch):
        root = tmp_path / "aptos"
        _data_aptos(root, n=40)
        monkeypatch.setattr(data, "_cache_worker", _data_dying_worker)
        with pytest.raises(ValueError, match="a process building the image cache died"):
            data.build_datasets("aptos", root, img_size=16, workers=2)
        assert not [p for p in (root / ".wtst_cache").iterdir() if ".tmp" in p.name or p.suffix == ".npy"]

    def test_data_cache_disk_full_names_path_and_space(self, tmp_path, monkeypatch):
        root = tmp_path / "aptos"
        _data_aptos(root, n=10)

        def full(fd, offset, length):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(os, "posix_fallocate", full)
        with pytest.raises(rundir.DiskFullError, match=r"\.npy: no space left on the device \(needs [0-9.]+ KB"):
            data.build_datasets("aptos", root, img_size=16, workers=1)
        assert not [p for p in (root / ".wtst_cache").iterdir() if ".tmp" in p.name or p.suffix == ".npy"]

    @pytest.mark.slow
    def test_data_cache_on_a_full_tmpfs_fails_fast(self, tmp_path):
        """Issue 23.1: a cache built on a disk that fills up hung until a 600 s timeout, twice, and
        left an 11.8 MB .npy.tmp<pid> behind. Now: one line naming the file and the space, exit 2,
        nothing left, the same on a second start."""
        root = tmp_path / "imgs"
        for c in ("a", "b"):
            for k in range(30):
                _user_img(root / c / f"{k:02d}.png", k, "rgb", size=(224, 224))
        with _tmpfs(tmp_path / "small", "3m") as small:
            for _attempt in range(2):
                p = _train_run(["--model", "resnet18", "--init", "ri", "--data", "folder", "--data-root", str(root),
                                "--cache-dir", str(small), "--device", "cpu", "--out", str(tmp_path / "run")],
                               tmp_path, check=False, timeout=120)
                lines = p.stderr.strip().splitlines()
                assert p.returncode == 2 and len(lines) == 1 and "no space left" in lines[0], p.stderr
                assert ".npy" in lines[0] and "needs" in lines[0]
                assert not [f for f in os.listdir(small) if ".tmp" in f or f.endswith(".npy")], os.listdir(small)
                assert not (tmp_path / "run").exists()

    def test_data_bad_hdf5(self, tmp_path):
        import h5py
        root = tmp_path / "pcam"
        _data_pcam(root)
        with h5py.File(root / "camelyonpatch_level_2_split_valid_x.h5", "w") as f:
            f["images"] = np.zeros((6, 96, 96, 3), np.uint8)
        _data_expect(ValueError, "valid_x.h5 has no dataset 'x'", "camelyon", root)
        _data_pcam(root)
        with h5py.File(root / "camelyonpatch_level_2_split_test_y.h5", "w") as f:
            f["y"] = np.full((6, 1, 1, 1), 3, np.uint8)
        _data_expect(ValueError, "test_y.h5 has label 3", "camelyon", root)
        _data_pcam(root)
        (root / "camelyonpatch_level_2_split_train_y.h5").rename(root / "camelyonpatch_level_2_split_train_y.h5.gz")
        _data_expect(FileNotFoundError, "gunzip", "camelyon", root)

    # ---- generated tasks
    def test_data_generated_mean_std_from_histogram_equals_float64(self):
        """Issue 21: the generated tasks' normalisation constants come from exact integer sums
        (10x faster than numpy on float64 pixels); they must be the values recorded so far."""
        for make in (data.make_fundus, data.make_shapes, data.make_lesions):
            for seed in (0, 1):
                images, _ = make(64, seed)
                px = images.reshape(-1, 3) / 255.0
                want = tuple(np.round(px.mean(0), 3).tolist()), tuple(np.round(px.std(0), 3).tolist())
                assert data._channel_mean_std(images) == want, (make.__name__, seed)
        # a case worked by hand: half the pixels 0, half 255
        images = np.zeros((2, 3, 3, 3), dtype=np.uint8)
        images[0] = 255
        assert data._channel_mean_std(images) == ((0.5,) * 3, (0.5,) * 3)

    @pytest.mark.parametrize("name, size, classes, metric", [("synthetic", 200, 5, "quadratic_kappa"),
                                                              ("shapes", 320, 8, "macro_recall"),
                                                              ("lesions", 120, 2, "roc_auc")])
    def test_data_generated_deterministic(self, name, size, classes, metric, monkeypatch):
        monkeypatch.setattr(data, "SYNTHETIC_SIZE", 200)
        monkeypatch.setattr(data, "SHAPES_SIZE", 320)
        monkeypatch.setattr(data, "LESIONS_SPLIT", (60, 30, 30))
        a = data.build_datasets(name, None, img_size=40, seed=0)
        b = data.build_datasets(name, None, img_size=40, seed=0)
        c = data.build_datasets(name, None, img_size=40, seed=1)
        info = a[3]
        assert info["num_classes"] == classes and info["root"] is None
        assert info["metric"] == metric
        assert sum(info["sizes"].values()) == size and a[3] == b[3]
        for da, db, dc in zip(a[:3], b[:3], c[:3]):
            np.testing.assert_array_equal(da.labels, db.labels)
            assert torch.equal(data.eval_view(da)[0][0], data.eval_view(db)[0][0])
            assert not torch.equal(data.eval_view(da)[0][0], data.eval_view(dc)[0][0])
        x, y = a[0][0]
        assert x.shape == (3, 40, 40) and isinstance(y, int)
        assert set(np.unique(a[0].labels)) == set(range(info["num_classes"]))

    def test_data_lesions_label_is_the_border_alone(self):
        """The target's label is a factor the source never labels (a regular or notched border):
        only irregular lesions have notches, and every other drawn factor (skin tone, size,
        elongation, pigment contrast) has the same distribution in both classes (class means
        within 4 standard errors on 4,000 lesions)."""
        _, labels, f = data.make_lesions(4000, 3, res=16, factors=True)
        assert set(np.unique(labels)) == {0, 1} and abs(labels.mean() - 0.5) < 0.01
        lo, hi = data.LESION_NOTCHES
        assert (f["notches"][labels == 0] == 0).all()
        assert ((f["notches"][labels == 1] >= lo) & (f["notches"][labels == 1] <= hi)).all()
        for k in ("tone", "radius", "elongation", "contrast"):
            a, b = f[k][labels == 0], f[k][labels == 1]
            se = np.sqrt(a.var() / len(a) + b.var() / len(b))
            assert abs(a.mean() - b.mean()) < 4 * se, k
        assert data.LESION_CLASSES == ["regular", "irregular"]
        assert not set(data.LESION_CLASSES) & set(data.SHAPE_NAMES)

    @pytest.mark.slow
    @pytest.mark.parametrize("name, steps, floor", [("synthetic", 150, 0.35), ("shapes", 300, 0.6)])
    def test_data_generated_learnable(self, name, steps, floor, monkeypatch):
        """A tiny CNN trained a few hundred small steps (a few seconds on one CPU thread) is well
        above chance (0.2 / 0.125) on the held-out split, through the real pipeline at 32 px."""
        monkeypatch.setattr(data, "SYNTHETIC_SIZE", 1500)
        monkeypatch.setattr(data, "SHAPES_SIZE", 2400)
        tr, _, te, info = data.build_datasets(name, None, img_size=32, seed=0)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)                            # tiny convs: threads only contend
        try:
            torch.manual_seed(0)
            bank = data.eval_view(tr)
            X, Y = torch.stack([bank[k][0] for k in range(len(tr))]), torch.as_tensor(tr.labels)
            Xt = torch.stack([te[k][0] for k in range(len(te))])
            blk = lambda i, o: [torch.nn.Conv2d(i, o, 3, 2, 1), torch.nn.BatchNorm2d(o), torch.nn.ReLU()]
            net = torch.nn.Sequential(*blk(3, 16), *blk(16, 32), *blk(32, 64), *blk(64, 64), torch.nn.Flatten(),
                                      torch.nn.Linear(64 * 4, info["num_classes"]))
            opt = torch.optim.Adam(net.parameters(), 3e-3)
            g = torch.Generator().manual_seed(0)
            for _ in range(steps):
                idx = torch.randint(0, len(X), (64,), generator=g)
                loss = torch.nn.functional.cross_entropy(net(X[idx]), Y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
            net.eval()
            with torch.no_grad():
                acc = (net(Xt).argmax(1).numpy() == te.labels).mean()
        finally:
            torch.set_num_threads(threads)
        assert acc > floor, f"{name}: held-out accuracy {acc:.3f} (chance {1 / info['num_classes']:.3f})"

    def test_data_val_test_use_eval_transforms(self):
        """Only the training split is augmented: val/test items are the same on every read."""
        train_ds, val_ds, test_ds, _ = data.build_datasets("synthetic", None, img_size=32, seed=0)
        for ds in (val_ds, test_ds):
            torch.manual_seed(0)
            a = ds[3][0]
            torch.manual_seed(1)
            assert torch.equal(a, ds[3][0])
            assert torch.equal(a, data.eval_view(ds)[3][0])
        torch.manual_seed(0)
        a = train_ds[3][0]
        torch.manual_seed(1)
        assert not torch.equal(a, train_ds[3][0])

    # ---- your own images (folder, csv)
    def test_user_folder_labels_split_mean_std_and_cache(self, tmp_path, capsys):
        root = tmp_path / "My Skin Set"
        truth = _user_folder(root, ["nevus", "melanoma"], 10)
        (root / "nevus" / "notes.txt").write_text("not an image")
        tr, va, te, info = data.build_datasets("folder", root, img_size=16, seed=0, workers=1)
        assert "ignored 1 file(s)" in capsys.readouterr().err
        assert info["classes"] == ["melanoma", "nevus"] and info["num_classes"] == 2
        assert info["metric"] == "roc_auc" and info["display_name"] == "My Skin Set" and info["loss"] == "ce"
        assert (len(tr), len(va), len(te)) == (14, 2, 4)          # 0.3 held out within each class: 7/1/2
        for ds in (tr, va, te):
            assert sorted(set(ds.labels.tolist())) == [0, 1]      # every class in every split
            assert all(truth[i][0] == y for i, y in _data_labels_of(ds).items())
        assert sorted(tr.ids + va.ids + te.ids) == sorted(truth)
        saved = json.load(open(info["split_file"]))
        assert {s: saved[s] for s in ("train", "val", "test")} == {"train": tr.ids, "val": va.ids, "test": te.ids}
        mean, std = _user_mean_std([truth[i][1] for i in tr.ids], info["resize"])
        assert np.allclose(info["mean"], mean, atol=1e-4) and np.allclose(info["std"], std, atol=1e-4)
        # grey, RGBA, 16-bit, JPEG, BMP and TIFF items are the by-hand eval tensors of the expected pixels
        t = T.Compose([T.Resize((info["resize"],) * 2), T.CenterCrop(16), T.ToTensor(), T.Normalize(info["mean"],
                                                                                                    info["std"])])
        kinds = set()
        for ds in (tr, va, te):
            for k, i in enumerate(ds.ids):
                kinds.add(i.split("_", 1)[1])
                assert torch.allclose(data.eval_view(ds)[k][0], t(Image.fromarray(truth[i][1])), atol=1e-6), i
        assert len(kinds) == 7
        # a second start reuses the cache and the stored mean/std; cache=False gives the same numbers
        npy = Path(info["cache_file"])
        stamp = {p.name: p.stat().st_mtime_ns for p in npy.parent.iterdir()}
        info2 = data.build_datasets("folder", root, img_size=16, seed=0, workers=1)[3]
        assert info2 == info and stamp == {p.name: p.stat().st_mtime_ns for p in npy.parent.iterdir()}
        assert data.build_datasets("folder", root, img_size=16, seed=0, cache=False)[3]["mean"] == info["mean"]
        # three classes: balanced accuracy by default; --metric overrides; roc_auc needs two classes
        three = tmp_path / "three"
        _user_folder(three, ["a", "b", "c"], 5)
        assert data.build_datasets("folder", three, img_size=16, workers=1)[3]["metric"] == "macro_recall"
        assert data.build_datasets("folder", three, img_size=16, workers=1,
                                   metric="accuracy")[3]["metric"] == "accuracy"
        _data_expect(ValueError, "roc_auc needs two classes, folder .*three has 3", "folder", three, metric="roc_auc")
        assert data.build_datasets("aptos", _data_aptos_root(tmp_path), img_size=16, workers=1,
                                   metric="macro_recall")[3]["metric"] == "macro_recall"
        _data_expect(ValueError, "chexpert is multi-label", "chexpert", tmp_path, metric="accuracy")

    def test_user_folder_presplit(self, tmp_path):
        root = tmp_path / "pre"
        truth = {}
        for split, n in (("train", 6), ("val", 2), ("test", 3)):
            truth[split] = _user_folder(root, ["x", "y"], n, prefix=f"{split}/")
        tr, va, te, info = data.build_datasets("folder", root, img_size=16, workers=1)
        assert info["classes"] == ["x", "y"] and info["display_name"] == "pre"
        for ds, split in ((tr, "train"), (va, "val"), (te, "test")):
            assert sorted(ds.ids) == sorted(truth[split])
            assert all(truth[split][i][0] == y for i, y in _data_labels_of(ds).items())
        saved = json.load(open(info["split_file"]))
        assert saved["by"] == "folders" and saved["test"] == te.ids and saved["test"][0].startswith("test/x/")
        mean, _ = _user_mean_std([truth["train"][i][1] for i in tr.ids], info["resize"])
        assert np.allclose(info["mean"], mean, atol=1e-4)

    def test_user_csv_patient_split_and_labels(self, tmp_path, capsys):
        root = tmp_path / "chest"
        truth = _user_csv(root, patients=12, per_patient=3)
        tr, va, te, info = data.build_datasets("csv", root, img_size=16, seed=1, workers=1)
        assert info["classes"] == ["normal",
                                   "tumour"] and info["metric"] == "roc_auc" and info["display_name"] == "chest"
        patient = lambda i: i.split("/")[1].split("_")[0]
        sets = [{patient(i) for i in ds.ids} for ds in (tr, va, te)]
        assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])      # no patient in two splits
        assert sum(map(len, sets)) == 12 and len(tr) + len(va) + len(te) == 36 and all(sets)
        for ds in (tr, va, te):
            assert all(truth[i][0] == y for i, y in _data_labels_of(ds).items())
        assert json.load(open(info["split_file"]))["by"] == "patient"
        mean, std = _user_mean_std([truth[i][1] for i in tr.ids], info["resize"])
        assert np.allclose(info["mean"], mean, atol=1e-4) and np.allclose(info["std"], std, atol=1e-4)
        capsys.readouterr()
        # integer labels are classes in numeric order (10 sorts after 2); few images per class: a warning
        rows = [[f"imgs/p{p // 3:02d}_{p % 3}.png", [2, 10, 3][p % 3]] for p in range(15)]
        _data_csv(root / "labels.csv", ["image", "label"], rows)
        tr, va, te, info = data.build_datasets("csv", root, img_size=16, workers=1)
        assert info["classes"] == ["2", "3", "10"] and info["metric"] == "macro_recall"
        labels = dict(rows)
        assert all(info["classes"][y] == str(labels[i]) for i, y in _data_labels_of(tr).items())
        err = capsys.readouterr().err
        assert "class '10' has only 5 image(s)" in err and len(err.strip().splitlines()) >= 3

    @pytest.mark.slow
    def test_user_train_analyze_plots(self, tmp_path):
        """train.py on a folder and a CSV set, analyze.py --metric all and plots.py on the folder run."""
        torch.set_num_threads(1)
        _user_folder(tmp_path / "derm", ["a", "b", "c"], 10)
        _user_csv(tmp_path / "chest", patients=10, per_patient=2)
        common = ["--model", "resnet18", "--init", "ri", "--img-size", "16", "--batch-size", "8", "--warmup", "2",
                  "--epochs", "1", "--device", "cpu", "--workers", "0", "--runs-dir", str(tmp_path / "runs")]
        assert train.main(common + ["--data", "folder", "--data-root", str(tmp_path / "derm")]) == 0
        assert train.main(common + ["--data", "csv", "--data-root", str(tmp_path / "chest"), "--metric", "accuracy",
                                    "--subset", "4"]) == 0
        run = tmp_path / "runs" / "resnet18-derm-ri-s0"                      # named after the folder
        doc = json.load(open(run / "config.json"))
        assert doc["data"]["metric"] == "macro_recall" and doc["data"]["display_name"] == "derm"
        assert doc["config"]["metric"] is None and doc["sizes"] == [21, 3, 6]
        assert "macro_recall" in _train_summary(run)["test"]
        chest = tmp_path / "runs" / "resnet18-chest-ri-s0"
        assert json.load(open(chest / "config.json"))["data"]["metric"] == "accuracy"
        assert "accuracy" in _train_summary(chest)["test"] and json.load(open(chest / "config.json"))["sizes"] == [4,
                                                                                                                   2, 4]
        assert train.main(common + ["--data", "folder", "--data-root", str(tmp_path / "derm"), "--resume"]) == 0
        assert analyze.main(["--run", str(run), "--metric", "all", "--device", "cpu"]) == 0
        for a in ("knn", "reinit"):
            doc = json.load(open(run / "analysis" / f"{a}.json"))
            assert doc["settings"]["task_metric"] == "macro_recall", a
        assert plots.main(["--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "fig"), "--format", "png"]) == 0
        assert (tmp_path / "fig" / "sweep_derm.png").is_file()
        assert (tmp_path / "fig" / "knn_resnet18_derm.png").is_file()
        table = (tmp_path / "fig" / "table.md").read_text()
        assert "derm (macro recall)" in table and "chest (accuracy)" in table

    @pytest.mark.parametrize("case", _USER_BAD)
    def test_user_bad_input_one_line_exit_2_nothing_written(self, tmp_path, capsys, case):
        args, message = _user_bad(tmp_path, case)
        before = _user_files(tmp_path)
        code = train.main(["--model", "resnet18", "--init", "ri", "--img-size", "16", "--device", "cpu",
                           "--data-root", str(tmp_path / "d"), "--out", str(tmp_path / "run")] + args)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0], err
        assert err[0].startswith("train.py: error: ")
        assert _user_files(tmp_path) == before                 # no run folder, cache or split file
        if case == "csv_missing_images":
            assert "imgs/p01_0.png, imgs/p02_1.png, imgs/p04_0.png, ..." in err[0]

    # ---- a dataset's identity
    def test_data_identity_names_images_and_classes(self, tmp_path):
        """Issue 23.9: the dataset identity is the same for the same images and classes (under any
        split seed), and differs for other images, other classes or another generation seed."""
        a, b = tmp_path / "a", tmp_path / "b"
        _user_folder(a, ["x", "y"], 6)
        _user_folder(b, ["x", "z"], 6)
        ident = lambda root, seed=0, name="folder": data.build_datasets(
            name, root, img_size=16, seed=seed, cache_dir=str(tmp_path / f"cache-{name}-{root and root.name}-{seed}"),
            workers=1)[3]["identity"]
        assert ident(a) == ident(a, seed=1) and ident(a) != ident(b)
        assert ident(None, 0, "lesions") != ident(None, 1, "lesions")
        assert re.fullmatch(r"[0-9a-f]{16}", ident(a))


# ========================================================================================
# metrics.py: CKA, k-NN, attention distance, l2 and the task metrics
# ========================================================================================


def _metrics_ref_hsic(k, l, debiased):
    """Plain float64 numpy HSIC of raw Grams K, L. Debiased: Song et al. (2012) eq. 5,
    HSIC_1 = [tr(K~L~) + 1'K~1 1'L~1/((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3)), K~ = K with
    zero diagonal. Biased: tr(K H L H) / (n-1)^2."""
    n = k.shape[0]
    if debiased:
        k, l = k.copy(), l.copy()
        np.fill_diagonal(k, 0)
        np.fill_diagonal(l, 0)
        one = np.ones(n)
        return (np.trace(k @ l) + (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2))
                - 2 / (n - 2) * (one @ k @ l @ one)) / (n * (n - 3))
    h = np.eye(n) - np.ones((n, n)) / n
    return np.trace(k @ h @ l @ h) / (n - 1) ** 2


def _metrics_ref_cka(x, y, debiased):
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    y = np.asarray(y, np.float64).reshape(len(y), -1)
    k, l = x @ x.T, y @ y.T
    return _metrics_ref_hsic(k, l, debiased) / math.sqrt(
        _metrics_ref_hsic(k, k, debiased) * _metrics_ref_hsic(l, l, debiased))


def _metrics_ref_feature_cka(x, y):
    x = x - x.mean(0)
    y = y - y.mean(0)
    return np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


def _metrics_pair(n=40, d1=30, d2=20, seed=0, dtype=torch.float64):
    """Two correlated activation sets with non-zero means, so CKA is far from 0 and 1."""
    g = torch.Generator().manual_seed(seed)
    randn = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    z = randn(n, 8)
    x = z @ randn(8, d1) + randn(n, d1) + 2
    y = torch.relu(z @ randn(8, d2)) + 0.7 * randn(n, d2)
    return x.to(dtype), y.to(dtype)


def _metrics_layers(n, num, seed, d=12):
    """`num` layers of a random linear-ReLU chain on the same n inputs."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=torch.float64)
    out = []
    for _ in range(num):
        h = torch.relu(h @ torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d)) + 0.1 * h
        out.append(h.clone())
    return out


_SHAPES = [(60, 10, 7), (12, 30, 20)]  # feature-form path (d1 + d2 < n) and Gram-form path


def _metrics_batches(la, lb, sizes, seed=0):
    """Per batch: (acts of model A (la layers), acts of model B (lb layers)), B correlated with A."""
    out = []
    for i, n in enumerate(sizes):
        a = _metrics_layers(n, la, seed + 100 * i)
        b = [h + 0.5 * t for h, t in zip(_metrics_layers(n, lb, seed + 100 * i + 7), a * lb)]
        out.append((a, b))
    return out


def _metrics_ref_minibatch(batches, la, lb):
    """Ratio of sums of HSIC_1 over batches, from the numpy reference."""
    cross, sa, sb = np.zeros((la, lb)), np.zeros(la), np.zeros(lb)
    for a, b in batches:
        ka = [x.numpy() @ x.numpy().T for x in a]
        kb = [y.numpy() @ y.numpy().T for y in b]
        for i, j in itertools.product(range(la), range(lb)):
            cross[i, j] += _metrics_ref_hsic(ka[i], kb[j], True)
        sa += [_metrics_ref_hsic(k, k, True) for k in ka]
        sb += [_metrics_ref_hsic(k, k, True) for k in kb]
    return cross / np.sqrt(np.outer(sa, sb))


def _metrics_knn_ref(bank, labels, queries, k, t, num_classes):
    """Brute force: full similarity matrix, argsort, explicit loop over neighbours."""
    b = bank.double() / bank.double().norm(dim=1, keepdim=True)
    q = queries.double() / queries.double().norm(dim=1, keepdim=True)
    sim = (q @ b.T).numpy()
    k = min(k, len(bank))
    multilabel = labels.dim() == 2
    out = np.zeros((len(q), num_classes))
    for i in range(len(q)):
        nn_idx = np.argsort(-sim[i], kind="stable")[:k]
        w = np.exp(sim[i, nn_idx] / t)
        for j, wj in zip(nn_idx, w):
            if multilabel:
                out[i] += wj * labels[j].numpy()
            else:
                out[i, int(labels[j])] += wj
        out[i] /= w.sum()
    return out


def _metrics_knn_data(n_bank=300, n_query=50, dim=16, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g) * 1.5
    yb = torch.randint(0, classes, (n_bank,), generator=g)
    yq = torch.randint(0, classes, (n_query,), generator=g)
    bank = centres[yb] + torch.randn(n_bank, dim, generator=g)
    queries = centres[yq] + torch.randn(n_query, dim, generator=g)
    return bank, yb, queries, yq


# k-NN before streaming (whole bank in memory, torch.topk ties in no fixed order), kept as
# the reference the streamed implementation must equal
def _metrics_knn_topk_before(q, bank, k, bank_chunk_size):
    step = bank.shape[0] if bank_chunk_size is None else bank_chunk_size
    best_s = best_i = None
    for start in range(0, bank.shape[0], step):
        chunk = bank[start:start + step]
        s, i = (q @ chunk.T).topk(min(k, chunk.shape[0]), dim=1)
        i = i + start
        if best_s is not None:
            s = torch.cat([best_s, s], 1)
            s, j = s.topk(min(k, s.shape[1]), dim=1)
            i = torch.cat([best_i, i], 1).gather(1, j)
        best_s, best_i = s, i
    return best_s, best_i


def _metrics_knn_predict_before(bank, bank_labels, queries, k=200, t=0.1, num_classes=None, chunk_size=1024,
                                bank_chunk_size=None):
    bank_labels = torch.as_tensor(bank_labels)
    multilabel = bank_labels.dim() == 2
    labels = bank_labels.float() if multilabel else bank_labels.long()
    if num_classes is None:
        num_classes = labels.shape[1] if multilabel else int(labels.max()) + 1
    k = min(k, bank.shape[0])
    bank = nn.functional.normalize(bank.float(), dim=1)
    out = []
    for q in queries.split(chunk_size):
        q = nn.functional.normalize(q.float(), dim=1)
        s, idx = _metrics_knn_topk_before(q, bank, k, bank_chunk_size)
        w = ((s - s[:, :1]) / t).exp()
        if multilabel:
            scores = torch.einsum("bk,bkc->bc", w, labels[idx])
        else:
            scores = torch.zeros(len(q), num_classes).scatter_add_(1, labels[idx], w)
        out.append(scores / w.sum(1, keepdim=True))
    return torch.cat(out)


def _metrics_knn_stream(bank, queries, k, chunks, chunk_size=1024):
    """A KNNAccumulator fed the bank in chunks of the given sizes (cycled)."""
    acc = metrics.KNNAccumulator(queries, k, chunk_size=chunk_size)
    start, i = 0, 0
    while start < len(bank):
        acc.update(bank[start:start + chunks[i % len(chunks)]])
        start += chunks[i % len(chunks)]
        i += 1
    return acc


def _metrics_knn_ref_neighbours(bank, queries, k):
    """float64 brute force: nearest first, lowest bank index first among equal similarities."""
    b = bank.double() / bank.double().norm(dim=1, keepdim=True)
    q = queries.double() / queries.double().norm(dim=1, keepdim=True)
    sim = (q @ b.T).numpy()
    return np.stack([np.argsort(-row, kind="stable")[:min(k, len(bank))] for row in sim])


def _metrics_knn_tied(n_bank=240, n_query=40, classes=3, seed=0):
    """Features with 4 entries of +-1 in 8 dimensions: normalised they hold +-0.5 exactly, so
    every similarity is a multiple of 0.25, computed exactly in any order: many exact ties."""
    g = torch.Generator().manual_seed(seed)

    def draw(n):
        x = torch.zeros(n, 8)
        for row in x:
            row[torch.randperm(8, generator=g)[:4]] = torch.randint(0, 2, (4,), generator=g).float() * 2 - 1
        return x
    return draw(n_bank), torch.randint(0, classes, (n_bank,), generator=g), draw(n_query)


def _metrics_grid_mean_distance(h, w, patch):
    pts = list(itertools.product(range(h), range(w)))
    return np.mean([math.dist(p, q) for p in pts for q in pts]) * patch


skm = pytest.importorskip("sklearn.metrics")


class TestMetrics:
    """metrics.py: CKA, k-NN, attention distance, l2 and the task metrics."""

    # ---- one-shot CKA
    @pytest.mark.parametrize("debiased", [False, True])
    @pytest.mark.parametrize("shape", _SHAPES)
    def test_metrics_cka_matches_reference(self, debiased, shape):
        x, y = _metrics_pair(*shape)
        assert metrics.cka(x, y, debiased) == pytest.approx(_metrics_ref_cka(x, y, debiased), abs=1e-10)

    @pytest.mark.parametrize("debiased", [False, True])
    @pytest.mark.parametrize("shape", _SHAPES)
    def test_metrics_cka_self_is_one_and_symmetric(self, debiased, shape):
        x, y = _metrics_pair(*shape)
        assert metrics.cka(x, x, debiased) == pytest.approx(1.0, abs=1e-12)
        assert metrics.cka(x, y, debiased) == pytest.approx(metrics.cka(y, x, debiased), abs=1e-12)

    @pytest.mark.parametrize("debiased", [False, True])
    @pytest.mark.parametrize("shape", _SHAPES)
    def test_metrics_cka_invariances(self, debiased, shape):
        x, y = _metrics_pair(*shape)
        base = metrics.cka(x, y, debiased)
        q, _ = torch.linalg.qr(torch.randn(x.shape[1], x.shape[1], dtype=torch.float64,
                                           generator=torch.Generator().manual_seed(1)))
        assert metrics.cka(x @ q, y, debiased) == pytest.approx(base, abs=1e-10)
        for s in (1e-3, 1e3):
            assert metrics.cka(s * x, y, debiased) == pytest.approx(base, abs=1e-10)
        c = torch.randn(x.shape[1], dtype=torch.float64) * 10
        assert metrics.cka(x + c, y, debiased) == pytest.approx(base, abs=1e-10)

    @pytest.mark.parametrize("debiased", [False, True])
    @pytest.mark.parametrize("shape", _SHAPES)
    def test_metrics_cka_not_invariant_to_generic_linear_map(self, debiased, shape):
        x, y = _metrics_pair(*shape)
        g = torch.Generator().manual_seed(2)
        a = torch.diag(torch.logspace(-2, 2, x.shape[1], dtype=torch.float64)) @ torch.randn(
            x.shape[1], x.shape[1], dtype=torch.float64, generator=g)
        assert abs(metrics.cka(x @ a, y, debiased) - metrics.cka(x, y, debiased)) > 1e-3

    def test_metrics_gram_form_equals_feature_form(self):
        x, y = _metrics_pair(60, 10, 7)  # cka() takes the feature form here
        k, l = metrics.centered_gram(x, debiased=False), metrics.centered_gram(y, debiased=False)
        gram_form = float((k * l).sum() / (k.norm() * l.norm()))
        assert metrics.cka(x, y, debiased=False) == pytest.approx(gram_form, abs=1e-12)
        assert gram_form == pytest.approx(_metrics_ref_feature_cka(x.numpy(), y.numpy()), abs=1e-12)

    def test_metrics_centered_gram_properties(self):
        x, _ = _metrics_pair(20, 9, 5)
        u = metrics.centered_gram(x, debiased=True)
        b = metrics.centered_gram(x, debiased=False)
        assert u.dtype == b.dtype == torch.float64 and u.shape == (20, 20)
        assert torch.all(u.diagonal() == 0)
        assert torch.allclose(u, u.T) and torch.allclose(b, b.T)
        assert u.sum(0).abs().max() < 1e-9 and b.sum(0).abs().max() < 1e-9  # both are doubly centred
        with pytest.raises(ValueError):
            metrics.centered_gram(x[:3], debiased=True)

    def test_metrics_cka_low_precision_inputs(self):
        x, y = _metrics_pair(64, 200, 150, dtype=torch.float32)
        ref = _metrics_ref_cka(x, y, True)
        k = metrics.centered_gram(x, True)
        l = metrics.centered_gram(y, True)
        assert float((k * l).sum() / (k.norm() * l.norm())) == pytest.approx(ref, abs=1e-6)
        # fp16 activations: the Gram must be formed in float32, not fp16 (which would overflow here)
        xh, yh = (x * 30).half(), (y * 30).half()
        kh, lh = metrics.centered_gram(xh, True), metrics.centered_gram(yh, True)
        assert torch.isfinite(kh).all()
        ref_h = _metrics_ref_cka(xh.double(), yh.double(), True)
        assert float((kh * lh).sum() / (kh.norm() * lh.norm())) == pytest.approx(ref_h, abs=1e-6)

    def test_metrics_centered_gram_blocks_match_float64(self, monkeypatch):
        """Issue 21: Grams are formed from column blocks (each shifted and centred in place, the
        products summed in float64, three of the 2 x 2 row blocks multiplied): float32 features
        with a large offset over several blocks and an odd n give CKA within 1e-8 of plain float64
        (the previous whole-batch float32 product: ~1e-8), and the block size changes nothing
        beyond rounding, down to one column per block."""
        g = torch.Generator().manual_seed(0)
        n = 33
        d = 3 * (metrics._GRAM_BLOCK_BYTES["cpu"] // (n * 4)) + 1234  # three blocks and a short one
        z = torch.randn(n, 16, generator=g)
        x = torch.relu(z @ torch.randn(16, d, generator=g) - 0.3) + 5.0
        y = torch.relu((z + 0.6 * torch.randn(n, 16, generator=g)) @ torch.randn(16, d, generator=g)) + 2.0
        for debiased in (True, False):
            k, l = metrics.centered_gram(x, debiased), metrics.centered_gram(y, debiased)
            got = float((k * l).sum() / (k.norm() * l.norm()))
            assert got == pytest.approx(_metrics_ref_cka(x, y, debiased), abs=1e-8)
        x64 = x[:, :200].double()
        whole = metrics.centered_gram(x64)
        for columns in (1, 7, 64):
            monkeypatch.setitem(metrics._GRAM_BLOCK_BYTES, "cpu", columns * n * 8)
            torch.testing.assert_close(metrics.centered_gram(x64), whole, rtol=1e-12, atol=1e-9)
        np.testing.assert_allclose(np.diag(whole.numpy()), 0)

    def test_metrics_centered_gram_avoids_reduced_precision_matmul(self):
        x, _ = _metrics_pair(16, 50, 5, dtype=torch.float32)
        prev = torch.get_float32_matmul_precision()
        try:
            torch.set_float32_matmul_precision("medium")  # would allow bf16 / TF32 float32 matmuls
            got = metrics.centered_gram(x)
        finally:
            torch.set_float32_matmul_precision(prev)
        assert torch.equal(got, metrics.centered_gram(x, dtype=torch.float64))
        with pytest.raises(ValueError):
            metrics.centered_gram(x, dtype=torch.float16)

    def test_metrics_cka_constant_layer_is_nan_and_small_n_raises(self):
        x, _ = _metrics_pair(30, 10, 5)
        const = torch.full((30, 7), 0.1, dtype=torch.float32)
        assert math.isnan(metrics.cka(x, const, debiased=False))
        assert math.isnan(metrics.cka(x, const))
        with pytest.raises(ValueError):
            metrics.cka(x[:3], x[:3], debiased=True)
        with pytest.raises(ValueError):
            metrics.cka(x[:5], x[:6])

    def test_metrics_cka_defaults_to_debiased(self):
        """One default everywhere (issue 10.5): metrics.cka is debiased like CKAAccumulator; on two
        independent noise matrices with d >> n the biased estimator says 0.997."""
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(64, 20000, generator=g), torch.randn(64, 20000, generator=g)
        assert metrics.cka(x, y, debiased=False) > 0.99
        assert abs(metrics.cka(x, y)) < 0.05
        assert metrics.cka(x, y) == metrics.cka(x, y, debiased=True)
        assert metrics.CKAAccumulator(1).debiased

    def test_metrics_cka_multidim_activations_flattened(self):
        g = torch.Generator().manual_seed(3)
        x = torch.randn(16, 3, 4, 4, generator=g, dtype=torch.float64)
        y = torch.randn(16, 5, 2, 2, generator=g, dtype=torch.float64) + x[:, :1, :2, :2]
        for debiased in (False, True):
            assert metrics.cka(x, y, debiased) == pytest.approx(_metrics_ref_cka(x, y, debiased), abs=1e-10)

    # ---- accumulator
    def test_metrics_accumulator_one_batch_equals_cka(self):
        (a, b), = _metrics_batches(3, 2, [25])
        for debiased in (True, False):
            acc = metrics.CKAAccumulator(3, 2, debiased=debiased)
            acc.update([metrics.centered_gram(x, debiased) for x in a], [metrics.centered_gram(y, debiased) for y in b])
            got = acc.compute()
            assert got.shape == (3, 2) and got.dtype == np.float64
            want = [[metrics.cka(x, y, debiased) for y in b] for x in a]
            np.testing.assert_allclose(got, want, atol=1e-10)

    def test_metrics_accumulator_streaming_equals_reference_ratio_of_sums(self):
        batches = _metrics_batches(3, 4, [20, 17, 31])
        acc = metrics.CKAAccumulator(3, 4)
        for a, b in batches:
            acc.update_activations(a, b)
        np.testing.assert_allclose(acc.compute(), _metrics_ref_minibatch(batches, 3, 4), atol=1e-10)
        # not the same thing as CKA of the concatenated data, nor as the per-batch mean
        mean_acc = metrics.CKAAccumulator(3, 4, mode="mean")
        for a, b in batches:
            mean_acc.update_activations(a, b)
        assert np.abs(mean_acc.compute() - acc.compute()).max() > 1e-6

    def test_metrics_accumulator_mean_mode_equals_mean_of_batch_cka(self):
        batches = _metrics_batches(2, 3, [20, 17, 31], seed=5)
        acc = metrics.CKAAccumulator(2, 3, mode="mean")
        for a, b in batches:
            acc.update_activations(a, b)
        want = np.mean([[[metrics.cka(x, y, True) for y in b] for x in a] for a, b in batches], 0)
        np.testing.assert_allclose(acc.compute(), want, atol=1e-10)

    def test_metrics_accumulator_within_model_symmetric_unit_diagonal(self):
        acc = metrics.CKAAccumulator(5, 5)
        for a, _ in _metrics_batches(5, 1, [16, 24]):
            acc.update([metrics.centered_gram(x) for x in a])
        m = acc.compute()
        np.testing.assert_allclose(m, m.T, atol=1e-12)
        np.testing.assert_allclose(np.diag(m), 1.0, atol=1e-12)
        assert np.all(m[~np.eye(5, dtype=bool)] < 1 - 1e-6)

    def test_metrics_accumulator_cross_block_equals_joint(self):
        batches = _metrics_batches(3, 2, [20, 26], seed=9)
        cross = metrics.CKAAccumulator(3, 2)
        joint = metrics.CKAAccumulator(5, 5)
        for a, b in batches:
            cross.update_activations(a, b)
            joint.update_activations(a + b)
        np.testing.assert_allclose(cross.compute(), joint.compute()[:3, 3:], atol=1e-12)

    def test_metrics_accumulator_constant_layer_nan(self):
        (a, b), = _metrics_batches(2, 2, [20])
        b[1] = torch.full_like(b[1], 3.7)
        for mode in ("minibatch", "mean"):
            acc = metrics.CKAAccumulator(2, 2, mode=mode)
            acc.update_activations(a, b)
            m = acc.compute()
            assert np.isnan(m[:, 1]).all() and np.isfinite(m[:, 0]).all()

    def test_metrics_accumulator_skips_small_batches_with_warning(self):
        batches = _metrics_batches(2, 2, [20, 3, 15])
        acc = metrics.CKAAccumulator(2, 2)
        for a, b in batches:
            if len(a[0]) < 4:
                with pytest.warns(UserWarning, match="skipped a batch of 3"):
                    acc.update_activations(a, b)
                with pytest.warns(UserWarning):
                    acc.update([torch.zeros(3, 3)] * 2, [torch.zeros(3, 3)] * 2)
            else:
                acc.update_activations(a, b)
        assert acc.n_batches == 2
        kept = [batches[0], batches[2]]
        np.testing.assert_allclose(acc.compute(), _metrics_ref_minibatch(kept, 2, 2), atol=1e-10)
        with pytest.raises(ValueError):
            metrics.CKAAccumulator(2, 2).compute()

    def test_metrics_accumulator_merge_equals_single(self):
        batches = _metrics_batches(2, 3, [20, 17, 31, 12], seed=11)
        for mode in ("minibatch", "mean"):
            whole, part1, part2 = (metrics.CKAAccumulator(2, 3, mode=mode) for _ in range(3))
            for i, (a, b) in enumerate(batches):
                whole.update_activations(a, b)
                (part1 if i % 2 else part2).update_activations(a, b)
            part1.merge(part2.state_dict())
            np.testing.assert_allclose(part1.compute(), whole.compute(), atol=1e-12)

    def test_metrics_accumulator_rejects_bad_input(self):
        acc = metrics.CKAAccumulator(2, 2)
        (a, b), = _metrics_batches(2, 2, [10])
        with pytest.raises(ValueError):  # biased Grams fed to a debiased accumulator
            acc.update([metrics.centered_gram(x, False) for x in a], [metrics.centered_gram(y, False) for y in b])
        with pytest.raises(ValueError):  # wrong number of layers
            acc.update([metrics.centered_gram(a[0])], [metrics.centered_gram(y) for y in b])
        with pytest.raises(ValueError):
            metrics.CKAAccumulator(2, 2, mode="avg")

    # ---- k-NN
    @pytest.mark.filterwarnings("ignore:knn_predict")
    @pytest.mark.parametrize("k", [1, 20, 1000])
    def test_metrics_knn_matches_bruteforce_single_label(self, k):
        bank, yb, queries, _ = _metrics_knn_data()
        got = metrics.knn_predict(bank, yb, queries, k=k, t=0.1)
        assert got.dtype == torch.float32 and got.shape == (50, 4)
        np.testing.assert_allclose(got.numpy(), _metrics_knn_ref(bank, yb, queries, k, 0.1, 4), atol=1e-5)
        np.testing.assert_allclose(got.sum(1).numpy(), 1.0, atol=1e-5)

    def test_metrics_knn_matches_bruteforce_multilabel(self):
        bank, _, queries, _ = _metrics_knn_data(seed=1)
        yb = (torch.rand(len(bank), 5, generator=torch.Generator().manual_seed(2)) < 0.3).float()
        got = metrics.knn_predict(bank, yb, queries, k=15, t=0.07)
        assert got.shape == (50, 5)
        np.testing.assert_allclose(got.numpy(), _metrics_knn_ref(bank, yb, queries, 15, 0.07, 5), atol=1e-5)

    def test_metrics_knn_warns_when_k_exceeds_bank(self):
        """Issue 10.7: k larger than the bank is clipped with a warning, not silently."""
        bank, yb, queries, _ = _metrics_knn_data()
        with pytest.warns(UserWarning, match="larger than the bank"):
            metrics.knn_predict(bank, yb, queries, k=len(bank) + 1)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            metrics.knn_predict(bank, yb, queries, k=len(bank))

    def test_metrics_knn_chunked_equals_unchunked(self):
        bank, yb, queries, _ = _metrics_knn_data(seed=3)
        full = metrics.knn_predict(bank, yb, queries, k=25, num_classes=6)
        for cs, bcs in [(7, None), (1024, 13), (9, 40), (50, 1)]:
            got = metrics.knn_predict(bank, yb, queries, k=25, num_classes=6, chunk_size=cs, bank_chunk_size=bcs)
            np.testing.assert_allclose(got.numpy(), full.numpy(), atol=1e-6)
        ml = (yb[:, None] == torch.arange(4)).float()
        np.testing.assert_allclose(metrics.knn_predict(bank, ml, queries, k=25, chunk_size=8,
                                                       bank_chunk_size=17).numpy(),
                                   metrics.knn_predict(bank, ml, queries, k=25).numpy(), atol=1e-6)

    def test_metrics_knn_k1_nearest_label_and_invariances(self):
        bank, yb, queries, _ = _metrics_knn_data(seed=4)
        scores = metrics.knn_predict(bank, yb, queries, k=1)
        b = bank / bank.norm(dim=1, keepdim=True)
        q = queries / queries.norm(dim=1, keepdim=True)
        assert torch.equal(scores.argmax(1), yb[(q @ b.T).argmax(1)])
        assert torch.all(scores.max(1).values == 1)
        base = metrics.knn_predict(bank, yb, queries, k=30)
        perm = torch.randperm(len(bank), generator=torch.Generator().manual_seed(0))
        np.testing.assert_allclose(metrics.knn_predict(bank[perm], yb[perm], queries, k=30).numpy(), base.numpy(),
                                   atol=1e-6)
        np.testing.assert_allclose(metrics.knn_predict(bank * 7.5, yb, queries * 0.01, k=30).numpy(), base.numpy(),
                                   atol=1e-6)

    def test_metrics_knn_train_as_test_k1_is_perfect(self):
        bank, yb, _, _ = _metrics_knn_data(seed=5)
        # numpy labels too
        scores = metrics.knn_predict(bank, yb.numpy(), bank, k=1, chunk_size=64, bank_chunk_size=100)
        assert metrics.task_metric("accuracy", scores, yb) == 1.0

    def test_metrics_knn_small_temperature_does_not_overflow(self):
        bank, yb, queries, _ = _metrics_knn_data(seed=6)
        got = metrics.knn_predict(bank, yb, queries, k=10, t=0.001)
        assert torch.isfinite(got).all()
        np.testing.assert_allclose(got.sum(1).numpy(), 1.0, atol=1e-5)

    @pytest.mark.filterwarnings("ignore:knn_predict")
    def test_metrics_knn_equals_implementation_before_streaming(self):
        """Issue 21: the streamed k-NN gives today's scores (within 1e-6) and neighbours, single-
        and multi-label, for any chunking of queries and bank, and for k > bank."""
        bank, yb, queries, _ = _metrics_knn_data(n_bank=500, n_query=70, dim=24, classes=5, seed=7)
        ml = (torch.rand(500, 6, generator=torch.Generator().manual_seed(1)) < 0.3).float()
        for labels in (yb, ml):
            for k, cs, bcs in [(1, 1024, None), (30, 16, None), (30, 1024, 7), (200, 33, 128), (600, 50, 64)]:
                want = _metrics_knn_predict_before(bank, labels, queries, k, 0.1, None, cs, bcs)
                got = metrics.knn_predict(bank, labels, queries, k, 0.1, None, cs, bcs)
                np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-6, err_msg=f"k={k} cs={cs} bcs={bcs}")
        b, q = nn.functional.normalize(bank, dim=1), nn.functional.normalize(queries, dim=1)
        _, want_idx = _metrics_knn_topk_before(q, b, 50, None)
        _, got_idx = _metrics_knn_stream(bank, queries, 50, [64]).neighbours()
        assert torch.equal(got_idx, want_idx)

    def test_metrics_knn_streamed_equals_one_shot_any_chunking(self):
        """Any bank chunking (single rows, uneven sizes, one chunk) and query chunking gives the
        same neighbours as float64 brute force and the same scores as knn_predict."""
        bank, yb, queries, _ = _metrics_knn_data(n_bank=400, n_query=60, seed=8)
        full = metrics.knn_predict(bank, yb, queries, k=40, num_classes=4)
        want = _metrics_knn_ref_neighbours(bank, queries, 40)
        for chunks, cs in [([1], 1024), ([7, 130, 3], 13), ([400], 1), ([64], 60), ([39, 41], 1000)]:
            acc = _metrics_knn_stream(bank, queries, 40, chunks, cs)
            assert acc.seen == 400 and acc.sims.shape == (60, 40)  # state fixed by queries and k, not the bank
            sims, idx = acc.neighbours()
            np.testing.assert_array_equal(idx.numpy(), want, err_msg=f"chunks {chunks}")
            assert torch.all(sims[:, :-1] >= sims[:, 1:])
            np.testing.assert_allclose(acc.predict(yb, num_classes=4).numpy(), full.numpy(), atol=1e-6)

    def test_metrics_knn_ties_lowest_bank_index_wins(self):
        """Issue 21: among equal similarities the lowest bank index wins, the k-th place included,
        whatever the chunking (ties split across chunks too), so streamed and one-shot have the
        same neighbours; with a permuted bank the same rule picks the lowest new index."""
        bank, yb, queries = _metrics_knn_tied()
        for k in (1, 5, 17, 60, 240):
            want = _metrics_knn_ref_neighbours(bank, queries, k)
            one_shot = metrics.knn_predict(bank, yb, queries, k=k, num_classes=3)
            for chunks in ([240], [1], [5, 11], [64]):
                sims, idx = _metrics_knn_stream(bank, queries, k, chunks).neighbours()
                np.testing.assert_array_equal(idx.numpy(), want, err_msg=f"k={k} chunks={chunks}")
                streamed = metrics.knn_predict(bank, yb, queries, k=k, num_classes=3, chunk_size=7,
                                               bank_chunk_size=chunks[0])
                np.testing.assert_allclose(streamed.numpy(), one_shot.numpy(), atol=1e-6)
        # the tie rule decides here: a query sharing its similarity with many bank items
        sims, _ = _metrics_knn_stream(bank, queries, 17, [64]).neighbours()
        assert (sims[:, -1:] == sims).sum(1).max() > 1
        perm = torch.randperm(240, generator=torch.Generator().manual_seed(3))
        _, idx = _metrics_knn_stream(bank[perm], queries, 17, [50]).neighbours()
        np.testing.assert_array_equal(idx.numpy(), _metrics_knn_ref_neighbours(bank[perm], queries, 17))

    def test_metrics_knn_accumulator_k1_k_above_bank_and_multilabel(self):
        bank, yb, queries, _ = _metrics_knn_data(n_bank=90, n_query=30, seed=9)
        acc = _metrics_knn_stream(bank, queries, 1, [16])
        b, q = nn.functional.normalize(bank, dim=1), nn.functional.normalize(queries, dim=1)
        assert torch.equal(acc.neighbours()[1][:, 0], (q @ b.T).argmax(1))
        assert torch.equal(acc.predict(yb).argmax(1), yb[(q @ b.T).argmax(1)])
        big = _metrics_knn_stream(bank, queries, 500, [16])
        with pytest.warns(UserWarning, match="larger than the bank"):
            scores = big.predict(yb, num_classes=4)
        assert big.neighbours()[1].shape == (30, 90)
        np.testing.assert_allclose(scores.numpy(), _metrics_knn_ref(bank, yb, queries, 500, 0.1, 4), atol=1e-5)
        ml = (torch.rand(90, 5, generator=torch.Generator().manual_seed(4)) < 0.4).float()
        np.testing.assert_allclose(_metrics_knn_stream(bank, queries, 12, [5, 31]).predict(ml.numpy(), t=0.07).numpy(),
                                   _metrics_knn_ref(bank, ml, queries, 12, 0.07, 5), atol=1e-5)

    def test_metrics_knn_accumulator_rejects_bad_input(self):
        bank, yb, queries, _ = _metrics_knn_data(n_bank=20, n_query=5)
        acc = metrics.KNNAccumulator(queries, 3)
        with pytest.raises(ValueError, match="empty"):
            acc.predict(yb[:0])
        with pytest.raises(ValueError, match="does not match"):
            acc.update(bank[:, :5])
        acc.update(bank)
        with pytest.raises(ValueError, match="do not match"):
            acc.predict(yb[:10])
        with pytest.raises(ValueError, match="t > 0"):
            acc.predict(yb, t=0)
        for bad in (dict(k=0), dict(chunk_size=0)):
            with pytest.raises(ValueError):
                metrics.KNNAccumulator(queries, **bad)

    # ---- attention distance
    def test_metrics_attention_distance_identity_and_uniform(self):
        n = 1 + 14 * 14
        eye = torch.eye(n).expand(2, 3, n, n)
        assert torch.all(metrics.mean_attention_distance(eye, (14, 14), 16) == 0)
        ref = _metrics_grid_mean_distance(14, 14, 16)
        assert ref == pytest.approx(116.5, abs=0.1)
        patches_only = torch.zeros(1, 2, n, n)
        patches_only[..., 1:] = 1 / 196
        got = metrics.mean_attention_distance(patches_only, (14, 14), 16)
        assert got.shape == (2,) and got.dtype == torch.float64
        np.testing.assert_allclose(got.numpy(), ref, rtol=1e-5)
        uniform = torch.full((1, 2, n, n), 1 / n)  # CLS key gets 1/197 of the mass
        np.testing.assert_allclose(metrics.mean_attention_distance(uniform, (14, 14), 16).numpy(), ref * 196 / 197,
                                   rtol=1e-5)
        np.testing.assert_allclose(metrics.mean_attention_distance(uniform, (14, 14), 16, renormalize=True).numpy(),
                                   ref, rtol=1e-5)

    def test_metrics_attention_distance_right_neighbour_is_one_patch(self):
        h, w = 5, 7
        a = torch.zeros(1, 1, 1 + h * w, 1 + h * w)
        for r, c in itertools.product(range(h), range(w)):
            q = 1 + r * w + c
            a[0, 0, q, q + 1 if c < w - 1 else q - 1] = 1  # last column: left neighbour
        assert metrics.mean_attention_distance(a, (h, w), 16).item() == 16.0
        a0 = a[:, :, 1:, 1:].clone()
        assert metrics.mean_attention_distance(a0, (h, w), 16, num_prefix_tokens=0).item() == 16.0

    def test_metrics_attention_distance_scales_with_patch_size_and_streams(self):
        g = torch.Generator().manual_seed(0)
        a = torch.softmax(torch.randn(4, 3, 17, 17, generator=g), -1)
        d8 = metrics.mean_attention_distance(a, (4, 4), 8)
        np.testing.assert_allclose(metrics.mean_attention_distance(a, (4, 4), 16).numpy(), 2 * d8.numpy(), rtol=1e-6)
        s = metrics.attention_distance_sum(a[:1], (4, 4), 8) + metrics.attention_distance_sum(a[1:], (4, 4), 8)
        np.testing.assert_allclose((s / 4).numpy(), d8.numpy(), rtol=1e-6)
        with pytest.raises(ValueError):
            metrics.mean_attention_distance(a, (4, 5), 8)

    def test_metrics_attention_cls_share_and_both_forms_on_a_3x3_grid(self):
        """Issue 18: at 48 px DeiT has a 3x3 patch grid. Uniform attention over all 10 tokens gives
        20.93 px with the CLS key dropped, 23.25 px renormalised (= uniform over the 9 patches), and a
        CLS share of 1/10; attention moved onto CLS shrinks the dropped form only."""
        grid, n = (3, 3), 10
        ref = _metrics_grid_mean_distance(3, 3, 16)
        assert ref == pytest.approx(23.25, abs=0.01)
        uniform = torch.full((2, 3, n, n), 1 / n, dtype=torch.float64)
        assert metrics.mean_attention_distance(uniform, grid, 16).numpy() == pytest.approx([ref * 9 / 10] * 3, rel=1e-6)
        assert ref * 9 / 10 == pytest.approx(20.93, abs=0.01)
        assert metrics.mean_attention_distance(uniform, grid, 16, renormalize=True).numpy() == pytest.approx([ref] * 3,
                                                                                                              rel=1e-6)
        share = metrics.attention_prefix_share_sum(uniform) / 2
        assert share.dtype == torch.float64 and share.numpy() == pytest.approx([0.1] * 3, rel=1e-12)
        on_cls = uniform.clone()
        on_cls[..., 0], on_cls[..., 1:] = 0.5, 0.5 / 9  # half of every query's mass on CLS
        assert (metrics.attention_prefix_share_sum(on_cls) / 2).numpy() == pytest.approx([0.5] * 3)
        assert metrics.mean_attention_distance(on_cls, grid, 16).numpy() == pytest.approx([ref / 2] * 3, rel=1e-6)
        assert metrics.mean_attention_distance(on_cls, grid, 16, renormalize=True).numpy() == pytest.approx([ref] * 3,
                                                                                                             rel=1e-6)
        g = torch.Generator().manual_seed(0)  # random attention: against a plain float64 loop
        a = torch.softmax(torch.randn(2, 2, n, n, generator=g, dtype=torch.float64), -1)
        want = [np.mean([a[b, h, q, 0].item() for b in range(2) for q in range(1, n)]) * 2 for h in range(2)]
        assert metrics.attention_prefix_share_sum(a).numpy() == pytest.approx(want, rel=1e-12)
        with pytest.raises(ValueError):
            metrics.attention_prefix_share_sum(a[0])

    # ---- l2 distance
    def test_metrics_l2_distance_hand_made(self):
        a = {"blk.fc.weight": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "blk.fc.bias": torch.tensor([0.0, 1.0]),
             "blk.norm.weight": torch.ones(2), "blk.bn.running_mean": torch.zeros(2),
             "blk.bn.num_batches_tracked": torch.tensor(5), "blk2.weight": torch.ones(3), "head.weight": torch.ones(1)}
        b = {k: v.clone() for k, v in a.items()}
        b["blk.fc.weight"] = torch.tensor([[1.0, 2.0], [3.0, 7.0]])   # diff 3
        b["blk.fc.bias"] = torch.tensor([4.0, 1.0])                   # diff 4
        b["blk.norm.weight"] = torch.full((2,), 100.0)                # excluded (norm)
        b["blk.bn.running_mean"] = torch.full((2,), 100.0)            # excluded (buffer)
        b["blk2.weight"] = torch.full((3,), 3.0)                      # other layer: sqrt(12) / 3
        got = metrics.l2_distance(a, b, ["blk", "blk2"], norm_keys={"blk.norm.weight"})
        assert got["blk"] == pytest.approx(5.0 / 6)  # ||(3, 4)|| over 4 + 2 weights
        assert got["blk2"] == pytest.approx(math.sqrt(12) / 3)
        with pytest.raises(ValueError):
            metrics.l2_distance(a, b, ["nothing"])

    def test_metrics_norm_param_names(self):
        m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                                torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4)))
        assert metrics.norm_param_names(m) == {"1.weight", "1.bias", "2.1.weight", "2.1.bias"}

    # ---- task metrics (sklearn oracle)
    def test_metrics_quadratic_kappa_vs_sklearn(self):
        rng = np.random.default_rng(0)
        y = rng.integers(0, 5, 200)
        p = np.clip(y + rng.integers(-1, 2, 200), 0, 4)
        assert metrics.quadratic_kappa(y, p) == pytest.approx(skm.cohen_kappa_score(y, p, weights="quadratic"))
        y3 = np.where(y == 3, 4, y)  # class 3 absent from the labels, present in preds
        assert metrics.quadratic_kappa(y3, p) == pytest.approx(skm.cohen_kappa_score(y3, p, weights="quadratic"))
        y2, p2 = np.where(y3 == 2, 1, y3), np.where(p == 2, 1, np.where(p == 3, 4, p))  # class 2, 3 absent from both
        for c in (None, 5):
            want = skm.cohen_kappa_score(y2, p2, weights="quadratic", labels=None if c is None else list(range(c)))
            assert metrics.quadratic_kappa(y2, p2, num_classes=c) == pytest.approx(want)
        assert metrics.quadratic_kappa(y2, p2) != pytest.approx(metrics.quadratic_kappa(y2, p2, num_classes=5))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert np.isnan(skm.cohen_kappa_score([2, 2, 2], [2, 2, 2], weights="quadratic"))
        assert math.isnan(metrics.quadratic_kappa([2, 2, 2], [2, 2, 2]))

    def test_metrics_roc_auc_vs_sklearn_with_ties(self):
        rng = np.random.default_rng(1)
        y = rng.integers(0, 2, 300)
        s = np.round(y * 0.3 + rng.random(300), 1)  # heavy ties
        assert metrics.roc_auc(y, s) == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)
        assert metrics.roc_auc(y + 3, s) == pytest.approx(skm.roc_auc_score(y + 3, s), abs=1e-12)
        assert metrics.roc_auc(y, np.zeros(300)) == 0.5
        assert math.isnan(metrics.roc_auc(np.ones(10), np.arange(10)))
        with pytest.raises(ValueError):
            metrics.roc_auc([0, 1, 2], [0.1, 0.2, 0.3])

    def test_metrics_mean_auc_skips_single_valued_classes(self):
        rng = np.random.default_rng(2)
        y = (rng.random((100, 4)) < 0.4).astype(np.float32)
        y[:, 2] = 0  # no positive: no AUC
        s = np.round(y + rng.normal(0, 0.8, (100, 4)), 1)
        mean, per_class = metrics.mean_auc(y, s, return_per_class=True)
        want = [skm.roc_auc_score(y[:, c], s[:, c]) for c in (0, 1, 3)]
        np.testing.assert_allclose(per_class[[0, 1, 3]], want, atol=1e-12)
        assert np.isnan(per_class[2]) and mean == pytest.approx(np.mean(want))
        assert metrics.mean_auc(y, s) == mean
        assert metrics.task_metric("mean_auc", torch.tensor(s), torch.tensor(y)) == pytest.approx(mean)

    @pytest.mark.filterwarnings("ignore:y_pred contains classes")
    def test_metrics_macro_recall_is_balanced_accuracy(self):
        """Issue 10.8: mean recall over the classes present in the labels (balanced accuracy), not
        over labels plus predictions (a predicted class absent from the labels, as on --subset
        runs, would count as a class of recall 0)."""
        rng = np.random.default_rng(3)
        y = rng.integers(0, 6, 150)
        y[y == 5] = 4  # class 5 absent from labels but present in preds
        p = np.where(rng.random(150) < 0.6, y, rng.integers(0, 6, 150))
        assert 5 in p
        want = skm.balanced_accuracy_score(y, p)
        assert want != pytest.approx(skm.recall_score(y, p, average="macro", zero_division=0))  # they differ here
        assert metrics.macro_recall(y, p) == pytest.approx(want, abs=1e-12)
        assert metrics.macro_recall(y, p, num_classes=8) == pytest.approx(want, abs=1e-12)
        scores = np.eye(6)[p]
        assert metrics.task_metric("macro_recall", scores, y) == pytest.approx(want, abs=1e-12)

    def test_metrics_task_metric_dispatch(self):
        rng = np.random.default_rng(4)
        logits = rng.normal(size=(120, 2)).astype(np.float32)
        y = (logits[:, 1] - logits[:, 0] + rng.normal(0, 1, 120) > 0).astype(int)
        prob1 = torch.softmax(torch.tensor(logits, dtype=torch.float64), 1)[:, 1].numpy()
        assert metrics.task_metric("roc_auc", logits, y) == pytest.approx(skm.roc_auc_score(y, prob1), abs=1e-9)
        assert metrics.task_metric("roc_auc", logits[:, 1:] - logits[:, :1], y) == pytest.approx(
            skm.roc_auc_score(y, prob1), abs=1e-9)
        scores = torch.tensor(rng.normal(size=(120, 5)))
        y5 = rng.integers(0, 5, 120)
        pred = scores.argmax(1).numpy()
        assert metrics.task_metric("accuracy", scores, y5) == pytest.approx(np.mean(pred == y5))
        assert metrics.task_metric("quadratic_kappa", scores, y5) == pytest.approx(
            skm.cohen_kappa_score(y5, pred, weights="quadratic", labels=list(range(5))))
        assert metrics.task_metric("macro_recall", scores, y5) == pytest.approx(skm.balanced_accuracy_score(y5, pred))
        with pytest.raises(ValueError):
            metrics.task_metric("f1", scores, y5)

    # ---- activations of any module, streamed
    def test_metrics_capture_any_module_and_streaming(self):
        """metrics.capture on a torchvision model: outputs detached, hooks gone on exit (also after
        an error), unknown names refused, and streaming into CKAAccumulator equals one-shot CKA."""
        import torchvision
        torch.manual_seed(0)
        a, b = torchvision.models.resnet18(weights=None).eval(), torchvision.models.resnet18(weights=None).eval()
        names = ["layer1.0", "layer3.1", "fc"]
        x = torch.randn(24, 3, 32, 32)
        with metrics.capture(a, names) as acts:
            out = a(x)
        assert set(acts) == set(names) and torch.equal(acts["fc"], out.detach()) and not acts["fc"].requires_grad
        assert not any(m._forward_hooks for m in a.modules())
        with pytest.raises(RuntimeError):
            with metrics.capture(a, names):
                a(torch.randn(2, 5))
        assert not any(m._forward_hooks for m in a.modules())
        with pytest.raises(ValueError, match="no module named"):
            with metrics.capture(a, ["layer9"]):
                pass
        acc = metrics.CKAAccumulator(len(names), mode="minibatch")
        with torch.no_grad(), metrics.capture(a, names) as fa, metrics.capture(b, names) as fb:
            for xb in x.split(12):
                a(xb)
                b(xb)
                acc.update_activations([fa[n] for n in names], [fb[n] for n in names])
            a(x)
            b(x)
            whole = {n: (fa[n], fb[n]) for n in names}
        one_batch = metrics.CKAAccumulator(len(names))
        one_batch.update_activations([whole[n][0] for n in names], [whole[n][1] for n in names])
        assert one_batch.compute()[2, 2] == pytest.approx(metrics.cka(*whole["fc"]), abs=1e-6)  # float32 Grams
        assert acc.n_samples == 24 and acc.compute().shape == (3, 3)


# ========================================================================================
# train.py: the training recipe, resumes, DDP, bad input and full disks
# ========================================================================================


def _train_fake_imagenet(tmp_path, name="resnet18"):
    """A random checkpoint saved under the published file name in $TORCH_HOME's hub cache."""
    torch.manual_seed(1)
    files = {"resnet18": "resnet18-f37072fd.pth", "deit_t": "deit_tiny_patch16_224-a1311bcf.pth"}
    d = tmp_path / "torch_home" / "hub" / "checkpoints"
    d.mkdir(parents=True, exist_ok=True)
    sd = models.create_model(name).state_dict()
    torch.save({"model": sd} if name.startswith("deit") else sd, d / files[name])
    return sd


def _train_free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def train_done(tmp_path_factory):
    """One finished tiny run shared by the tests below (resnet18, RI, 1 epoch), with an analysis file,
    its console output, and bad --weights files next to it."""
    base = tmp_path_factory.mktemp("train_done")
    out = str(base / "run")
    rc, stdout, stderr = _train_main(["--model", "resnet18", "--init", "ri", "--epochs", "1", "--out", out]
                                     + _TRAIN_TINY)
    assert rc == 0, stderr
    os.makedirs(os.path.join(out, "analysis"))
    rundir.save_json(os.path.join(out, "analysis", "l2.json"), {"metric": "l2", "values": [1.0]})
    sd = models.create_model("resnet18", num_classes=5, img_size=32).state_dict()
    nan = dict(sd, **{"layer1.0.conv1.weight": sd["layer1.0.conv1.weight"].clone().fill_(float("nan"))})
    torch.save(nan, base / "nan.pt")
    torch.save({"model": models.create_model("deit_t", num_classes=5, img_size=32).state_dict()}, base / "deit.pt")
    torch.save({"model": dict(sd, **{"conv1.weight": "not a tensor"})}, base / "text.pt")
    (base / "afile").write_text("x")
    root = base / "aptos_long"  # a CSV whose field is over the csv module's limit
    root.mkdir()
    (root / "train.csv").write_text("id_code,diagnosis\n" + "a" * 200_000 + ",1\n")
    return {"out": out, "base": str(base), "stdout": stdout, "stderr": stderr}


_TRAIN_RI = ["--init", "ri"]


_TRAIN_BAD = [  # (extra flags, text the one error line must hold); {base} = the fixture's folder
    (_TRAIN_RI + ["--batch-size", "0"], "--batch-size 0"),
    (_TRAIN_RI + ["--log-every", "0"], "--log-every 0"),
    (_TRAIN_RI + ["--subset", "0"], "--subset 0"),
    (_TRAIN_RI + ["--seed", "-1"], "--seed -1"),
    (_TRAIN_RI + ["--split-seed", "-1"], "--split-seed -1"),
    (_TRAIN_RI + ["--epochs", "0"], "--epochs 0"),
    (_TRAIN_RI + ["--epochs", "-3"], "--epochs -3"),
    (_TRAIN_RI + ["--patience", "0"], "--patience 0"),
    (_TRAIN_RI + ["--plateau-patience", "-1"], "--plateau-patience -1"),
    (_TRAIN_RI + ["--warmup", "-1"], "--warmup -1"),
    (_TRAIN_RI + ["--workers", "-1"], "--workers -1"),
    (_TRAIN_RI + ["--img-size", "0"], "--img-size 0"),
    (_TRAIN_RI + ["--model", "deit_t", "--img-size", "40"], "--img-size 40"),
    (_TRAIN_RI + ["--clip", "nan"], "--clip nan"),
    (_TRAIN_RI + ["--lr", "inf"], "--lr inf"),
    (_TRAIN_RI + ["--lr", "0"], "--lr 0"),
    (_TRAIN_RI + ["--lr", "-1e-4"], "--lr"),
    (_TRAIN_RI + ["--batch-size", "abc"], "--batch-size"),
    (_TRAIN_RI + ["--weight-decay", "-1"], "--weight-decay -1"),
    (_TRAIN_RI + ["--device", "tpu"], "--device 'tpu'"),
    (_TRAIN_RI + ["--model", "resnet99"], "--model 'resnet99'"),
    (["--n", "9"], "0..6"),
    (["--init", "st", "--n", "3"], "--init st"),
    (["--weights", "README.md"], "README.md"),
    (["--weights", "{base}/nan.pt"], "non-finite"),
    (["--weights", "{base}/deit.pt"], "does not fit resnet18"),
    (["--weights", "{base}/text.pt"], "not tensors"),
    (["--weights", "/nonexistent/w.pt"], "/nonexistent/w.pt"),
    (_TRAIN_RI + ["--data", "aptos"], "--data-root"),
    (_TRAIN_RI + ["--data", "aptos", "--data-root", "/nonexistent/APTOS"], "/nonexistent/APTOS"),
    (_TRAIN_RI + ["--data", "aptos", "--data-root", "{base}/aptos_long"], "train.csv: a row after line 1"),
]


def _train_tiny(size=32, subset=64, batch=16):
    """_TRAIN_TINY at another image size, subset or batch."""
    args = list(_TRAIN_TINY)
    for flag, v in (("--img-size", size), ("--subset", subset), ("--batch-size", batch)):
        args[args.index(flag) + 1] = str(v)
    return args


class _Killed(BaseException):
    """Stands for a SIGKILL (a BaseException: it passes train.main's error handling)."""


def _train_killed(argv, monkeypatch, after=1):
    """train.main stopped between its `after`-th checkpoint (last.pt, best.pt) and the next
    last.pt, as a kill there would stop it: log.jsonl holds lines last.pt does not count."""
    real, n = train.Trainer.save_last, [0]

    def save_last(self):
        n[0] += 1
        if n[0] > after:
            raise _Killed
        real(self)

    with monkeypatch.context() as m:
        m.setattr(train.Trainer, "save_last", save_last)
        with pytest.raises(_Killed):
            _train_main(argv)


def _train_same_run(a, b):
    """Two run folders hold the same run: summary (but times), log.jsonl and best.pt."""
    assert _train_summary(a) == _train_summary(b)
    assert open(os.path.join(a, "log.jsonl")).read() == open(os.path.join(b, "log.jsonl")).read()
    wa, wb = (models.read_checkpoint(os.path.join(r, "best.pt"))["model"] for r in (a, b))
    assert [k for k in wa if not torch.equal(wa[k], wb[k])] == []


@pytest.fixture(scope="module")
def train_killed(tmp_path_factory):
    """A tiny resnet18 WT run from a weights file, killed right after its first last.pt, and the
    same run uninterrupted: copy the killed one before changing it."""
    base = tmp_path_factory.mktemp("train_killed")
    torch.manual_seed(3)
    weights = str(base / "weights.pt")
    torch.save(models.create_model("resnet18", num_classes=1000, img_size=32).state_dict(), weights)
    args = ["--model", "resnet18", "--n", "3", "--weights", weights, "--epochs", "2"] + _TRAIN_TINY
    full, cut = str(base / "full"), str(base / "cut")
    assert _train_main(args + ["--out", full])[0] == 0
    mp = pytest.MonkeyPatch()
    _train_killed(args + ["--out", cut], mp)
    mp.undo()
    return {"args": args, "full": full, "cut": cut, "weights": weights}


def _train_copy(train_killed, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(train_killed["cut"], out)
    return out


def _train_refused(argv, tree_root, *words):
    """train.main refuses with one line holding every word, and changes nothing under tree_root."""
    before = _train_tree(tree_root)
    rc, stdout, stderr = _train_main(argv)
    lines = stderr.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "Traceback" not in stderr, stderr
    for w in words:
        assert w in lines[0], lines[0]
    assert _train_tree(tree_root) == before
    return lines[0]


_TRAIN_FULL_DISK = ["--init", "ri", "--epochs", "2", "--patience", "1"] + _TRAIN_TINY


@pytest.fixture(scope="module")
def train_refs(tmp_path_factory):
    """Uninterrupted reference runs of _TRAIN_FULL_DISK, one per model, made on first use."""
    base, refs = tmp_path_factory.mktemp("train_refs"), {}

    def ref(name):
        if name not in refs:
            refs[name] = str(base / name)
            assert _train_main(["--model", name, "--out", refs[name]] + _TRAIN_FULL_DISK)[0] == 0
        return refs[name]
    return ref


def _train_disk_full_start(argv, out):
    """A start on a full disk: exit 2, one line saying so, no traceback, no temp file left."""
    rc, stdout, stderr = _train_main(argv)
    lines = stderr.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "no space left" in lines[0] and "Traceback" not in stderr, stderr
    if os.path.isdir(out):
        assert not [f for f in os.listdir(out) if ".tmp" in f]
    return lines[0]


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size): a tmpfs of that size at tmp_path/disk (mounted again to change the size);
    unmounted after the test. Skips where it cannot mount (not root, no mount)."""
    path = str(tmp_path / "disk")
    state = {"mounted": False}

    def mount(size):
        if os.geteuid() != 0:
            pytest.skip("a tmpfs needs root")
        os.makedirs(path, exist_ok=True)
        cmd = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path] if not state["mounted"] else \
            ["mount", "-o", f"remount,size={size}", path]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs: {p.stderr.strip()}")
        state["mounted"] = True
        return path
    yield mount
    if state["mounted"]:
        subprocess.run(["umount", path], capture_output=True)


class TestTrain:
    """train.py: the training recipe, resumes, DDP, bad input and full disks."""

    # ---- a tiny run end to end, resume after a kill, DDP
    @pytest.mark.slow
    def test_train_tiny_run_end_to_end(self, tmp_path):
        pre = _train_fake_imagenet(tmp_path)
        out = str(tmp_path / "run")
        p = _train_run(["--model", "resnet18", "--n", "3", "--epochs", "2", "--out", out] + _TRAIN_TINY, tmp_path)
        assert "resnet18-f37072fd.pth" in p.stdout  # loaded from the hub cache
        for f in ("config.json", "init.pt", "best.pt", "log.jsonl", "summary.json"):
            assert os.path.getsize(os.path.join(out, f)) > 0, f
        assert not os.path.exists(os.path.join(out, "last.pt"))  # a finished run drops it (--keep-last keeps it)
        cfg = json.load(open(os.path.join(out, "config.json")))
        assert cfg["config"]["n"] == 3 and cfg["config"]["N"] == 6 and cfg["config"]["init"] == "wtst"
        assert cfg["data"]["metric"] == "quadratic_kappa" and "torch" in cfg["versions"]
        assert len(cfg["init"]) == 1 + 6 and "WT" in cfg["init"][3] and "ST" in cfg["init"][4]
        s = json.load(open(os.path.join(out, "summary.json")))
        assert s["iterations"] == 8 and s["validations"] == 4 and s["epochs_run"] == 2.0
        assert s["best_iteration"] in (2, 4, 6, 8) and s["convergence_iteration"] == s["best_iteration"]
        assert isinstance(s["test"]["quadratic_kappa"], float) and s["images_per_second"] > 0
        log = [json.loads(l) for l in open(os.path.join(out, "log.jsonl"))]
        vals = [r for r in log if "val" in r]
        assert [r["iteration"] for r in vals] == [2, 4, 6, 8]
        assert all(r["train_loss"] == r["train_loss"] for r in log if "train_loss" in r)
        # init.pt: groups 1..3 are the pretrained tensors, group 4 (layer2) is ST
        init_sd = torch.load(os.path.join(out, "init.pt"), weights_only=True)["model"]
        assert torch.equal(init_sd["layer1.0.conv1.weight"], pre["layer1.0.conv1.weight"])
        assert not torch.equal(init_sd["layer2.0.conv1.weight"], pre["layer2.0.conv1.weight"])
        assert torch.all(init_sd["layer2.0.bn1.weight"] == 1)
        # best.pt loads through models.load_pretrained as a --weights source
        m = models.create_model("resnet18", num_classes=5, img_size=32)
        rep = models.load_pretrained(m, os.path.join(out, "best.pt"))
        assert rep["skipped"] == []
        # an existing run is not overwritten
        p = _train_run(["--model", "resnet18", "--epochs", "2", "--out", out] + _TRAIN_TINY, tmp_path, check=False)
        assert p.returncode == 2 and "--resume" in p.stderr and "Traceback" not in p.stderr
        # --overwrite replaces the run and drops the old run's analyses
        os.makedirs(os.path.join(out, "analysis"))
        open(os.path.join(out, "analysis", "l2.json"), "w").write("{}")
        _train_run(["--model", "resnet18", "--init", "st", "--epochs", "1", "--out", out, "--overwrite"] + _TRAIN_TINY,
                   tmp_path)
        assert not os.path.exists(os.path.join(out, "analysis"))
        assert json.load(open(os.path.join(out, "summary.json")))["init"] == "st"

    @pytest.mark.slow
    def test_train_resume_after_sigkill_equals_uninterrupted(self, tmp_path):
        args = ["--model", "resnet18", "--init", "ri", "--epochs", "6"] + _TRAIN_TINY
        full = str(tmp_path / "full")
        _train_run(args + ["--out", full], tmp_path)
        cut = str(tmp_path / "cut")
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py")] + args + ["--out", cut],
                                env=_train_env(tmp_path), cwd=str(tmp_path), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while not os.path.exists(os.path.join(cut, "last.pt")) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not os.path.exists(os.path.join(cut, "summary.json")), "the run ended before it could be killed"
        p = _train_run(args + ["--out", cut, "--resume"], tmp_path)
        assert "resumed" in p.stdout
        assert _train_summary(cut) == _train_summary(full)
        assert open(os.path.join(cut, "log.jsonl")).read() == open(os.path.join(full, "log.jsonl")).read()
        p = _train_run(args + ["--out", cut, "--resume"], tmp_path)
        assert "already finished" in p.stdout

    @pytest.mark.slow
    def test_train_ddp_two_gloo_processes(self, tmp_path):
        """2 CPU processes (gloo) see the same global batches as one process: with a
        LayerNorm-only model the training losses agree; only rank 0 writes."""
        args = ["--model", "deit_t", "--init", "ri", "--epochs", "1"] + _TRAIN_TINY
        single = str(tmp_path / "single")
        _train_run(args + ["--out", single], tmp_path)
        ddp = str(tmp_path / "ddp")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_train_free_port()), os.path.join(ROOT, "train.py")] + args + ["--out", ddp,
                                                                                                 "--keep-last"]
        p = subprocess.run(cmd, capture_output=True, text=True, env=_train_env(tmp_path), cwd=str(tmp_path),
                           timeout=600)
        assert p.returncode == 0, p.stdout + p.stderr
        cfg = json.load(open(os.path.join(ddp, "config.json")))["config"]
        assert cfg["world_size"] == 2
        a = [json.loads(l) for l in open(os.path.join(single, "log.jsonl"))]
        b = [json.loads(l) for l in open(os.path.join(ddp, "log.jsonl"))]
        assert len(a) == len(b)  # one writer: no duplicated lines
        for ra, rb in zip(a, b):
            if "train_loss" in ra:
                assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-4, abs=1e-5)
            else:
                assert ra["val"]["loss"] == pytest.approx(rb["val"]["loss"], rel=1e-4, abs=1e-5)
        assert not [f for f in os.listdir(ddp) if ".tmp" in f]
        # issue 19.4: each rank draws its own dropout / drop-path stream; last.pt keeps every rank's state
        rng = torch.load(os.path.join(ddp, "last.pt"), weights_only=True)["rng"]
        assert len(rng) == 2 and not torch.equal(rng[0]["torch"], rng[1]["torch"])

    @pytest.mark.slow
    @pytest.mark.parametrize("extra, message", [
        (["--model", "resnet99"], "--model 'resnet99'"),
        (["--model", "resnet18", "--data", "mnist"], "--data 'mnist'"),
        (["--model", "resnet18", "--n", "9"], "0..6"),
        (["--model", "resnet18", "--data", "aptos", "--data-root", "/nonexistent/APTOS"], "/nonexistent/APTOS"),
        (["--model", "resnet18", "--weights", "/nonexistent/w.pt"], "/nonexistent/w.pt"),
        (["--model", "resnet18", "--init", "st", "--n", "3"], "--init st"),
    ])
    def test_train_bad_input_one_line_exit_2(self, tmp_path, extra, message):
        args = [a for a in _TRAIN_TINY if a not in ("synthetic",)]
        args = _TRAIN_TINY + ["--epochs", "1", "--out", str(tmp_path / "bad")] + extra
        p = _train_run(args, tmp_path, check=False)
        assert p.returncode == 2, p.stdout + p.stderr
        err = p.stderr.strip().splitlines()
        assert len(err) == 1 and message in err[0], p.stderr

    @pytest.mark.slow
    def test_train_mismatched_weights_and_nan_loss(self, tmp_path):
        # a DeiT checkpoint given to a ResNet: the mismatch is listed, exit 2
        w = tmp_path / "deit.pt"
        torch.save({"model": models.create_model("deit_t", num_classes=5, img_size=32).state_dict()}, w)
        p = _train_run(_TRAIN_TINY + ["--model", "resnet18", "--epochs", "1", "--weights", str(w),
                                      "--out", str(tmp_path / "mm")], tmp_path, check=False)
        assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "deit.pt" in p.stderr, p.stderr
        # a learning rate that blows the weights up: stop, say only what is true, exit 2
        out = str(tmp_path / "nan")
        args = _TRAIN_TINY + ["--model", "resnet18", "--init", "ri", "--epochs", "3", "--lr", "1e25", "--warmup", "1",
                              "--clip", "0", "--out", out]
        p = _train_run(args, tmp_path, check=False)
        err = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(err) == 1 and "diverged" in err[0] and "non-finite" in err[0], p.stderr
        assert "no checkpoint was saved" in err[0] and "last.pt" not in err[0]
        assert not os.path.exists(os.path.join(out, "best.pt")) and not os.path.exists(os.path.join(out, "last.pt"))
        assert json.load(open(os.path.join(out, "summary.json")))["stop_reason"] == "diverged"
        # --resume does not call it finished
        p = _train_run(args + ["--resume"], tmp_path, check=False)
        err = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(err) == 1 and "diverged" in err[0] and "--overwrite" in err[0], p.stderr
        assert "already finished" not in p.stdout

    def test_train_epoch_batches_cover_and_resume(self):
        s = train.EpochBatches(50, 8, seed=3)
        s.set_epoch(2)
        full = list(s)
        assert len(full) == 6 and len({i for b in full for i, _ in b}) == 48
        s.set_epoch(2, start=4)
        assert list(s) == full[4:]
        s.set_epoch(3)
        assert list(s) != full
        # two ranks together see the samples of one process's batch
        r0, r1 = train.EpochBatches(50, 4, 3, 0, 2), train.EpochBatches(50, 4, 3, 1, 2)
        for r in (r0, r1):
            r.set_epoch(2)
        b0, b1 = next(iter(r0)), next(iter(r1))
        assert sorted(b0 + b1) == sorted(full[0])

    # ---- bad input, console output, the schedule's first steps, evaluation precision
    @pytest.mark.slow
    @pytest.mark.parametrize("extra, message", _TRAIN_BAD, ids=[" ".join(e) for e, _ in _TRAIN_BAD])
    def test_train_bad_input_changes_nothing(self, train_done, tmp_path, extra, message):
        """Every bad input: exit 2, one line naming it, no traceback; with --overwrite the finished
        run is left byte-identical, and a fresh --out is not created."""
        extra = [a.format(base=train_done["base"]) for a in extra]
        args = ["--model", "resnet18"] + _TRAIN_TINY + ["--epochs", "1"]
        before = _train_tree(train_done["out"])
        for out in (["--out", train_done["out"], "--overwrite"], ["--out", str(tmp_path / "new" / "run")]):
            rc, stdout, stderr = _train_main(args + extra + out)
            lines = stderr.strip().splitlines()
            assert rc == 2 and len(lines) == 1 and lines[0].startswith("train.py: error:"), stderr
            assert message in lines[0], lines[0]
            assert _train_tree(train_done["out"]) == before
            assert not os.path.exists(tmp_path / "new")

    @pytest.mark.parametrize("case", ["file", "under_file", "unwritable", "uncreatable", "cuda", "not_a_run"])
    def test_train_bad_out_and_device(self, train_done, tmp_path, monkeypatch, case):
        afile = os.path.join(train_done["base"], "afile")
        out, extra, message = str(tmp_path / "run"), [], None
        if case == "file":
            out, message = afile, "is a file"
        elif case == "under_file":
            out, message = os.path.join(afile, "run"), "is a file, not a folder"
        elif case == "unwritable":  # (root ignores permission bits: the check itself is exercised)
            real = os.access
            monkeypatch.setattr(os, "access", lambda p, m: False if os.path.abspath(p) == str(tmp_path) else real(p, m))
            message = "not writable"
        elif case == "uncreatable":  # a virtual file system that os.access calls writable (as root)
            if not os.path.isdir("/proc/self"):
                pytest.skip("no /proc")
            out, message = "/proc/wtst_run", "--out /proc/wtst_run"
        elif case == "cuda":
            if torch.cuda.is_available():
                pytest.skip("this machine has CUDA")
            extra, message = ["--device", "cuda"], "CUDA is not available"
        else:  # a folder with somebody else's config.json and analyses
            os.makedirs(os.path.join(out, "analysis"))
            rundir.save_json(os.path.join(out, "config.json"), {"lr": 1})
            rundir.save_json(os.path.join(out, "analysis", "x.json"), {})
            extra, message = ["--overwrite"], "not a train.py run"
        before = _train_tree(tmp_path)
        rc, stdout, stderr = _train_main(["--model", "resnet18", "--init", "ri", "--out", out] + _TRAIN_TINY + extra)
        lines = stderr.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and message in lines[0], stderr
        assert _train_tree(tmp_path) == before and os.path.exists(out) == (case in ("file", "not_a_run"))

    def test_train_first_start_reports_every_missing_input(self, tmp_path, monkeypatch):
        """The card's first command with neither data nor ImageNet weights: one line naming
        --data-root and the exact path of the weights file; nothing written."""
        monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
        out = str(tmp_path / "runs" / "x")
        rc, stdout, stderr = _train_main(["--model", "deit_s", "--n", "5", "--data", "aptos", "--out", out])
        lines = stderr.strip().splitlines()
        assert rc == 2 and len(lines) == 1, stderr
        want = str(tmp_path / "th" / "hub" / "checkpoints" / "deit_small_patch16_224-cd65a155.pth")
        assert "--data-root" in lines[0] and want in lines[0] and models.imagenet_path("deit_s") == want
        assert not os.path.exists(tmp_path / "runs")

    def test_train_console_and_finished_files(self, train_done):
        """The start line says RI and float32 (no n=None, amp None); validation lines show only
        validation numbers; last.pt is gone after the run; no warnings."""
        lines = train_done["stdout"].splitlines()
        assert "init RI" in lines[0] and "float32" in lines[0], lines[0]
        assert not any("None" in l for l in lines[:2])
        vals = [l for l in lines if l.startswith("it ")]
        assert len(vals) == 2 and all("train" not in l and "val loss" in l for l in vals), vals
        assert train_done["stderr"] == ""
        assert not os.path.exists(os.path.join(train_done["out"], "last.pt"))
        assert json.load(open(os.path.join(train_done["out"], "summary.json")))["stop_reason"] == "reached --epochs 1"

    def test_train_writes_model_facts(self, train_done):
        """config.json records the model's facts from models.py (findings.py groups models by them)."""
        doc = rundir.read_config(train_done["out"])
        assert doc["facts"] == {"token_mixing": "convolution"}

    @pytest.mark.parametrize("tool, least", [("train", 25), ("plots", 4), ("findings", 2)])
    def test_cli_help_every_flag_once(self, capsys, tool, least):
        """Every flag has help text and its default at most once (never 'default: None')."""
        with pytest.raises(SystemExit):
            importlib.import_module(tool).parse_args(["--help"])
        text = capsys.readouterr().out.split("options:")[1]
        entries = [e for e in __import__("re").split(r"\n  (?=-)", text) if e.strip().startswith("--")]
        assert len(entries) >= least
        for e in entries:
            helptext = " ".join(e.split()[1:])
            assert len(helptext) > 10, f"{e.split()[0]} has no help text"
            assert helptext.count("default") <= 1 and "default: None" not in helptext, e

    @pytest.mark.slow
    def test_train_warmup_neither_stops_nor_cuts_lr(self, tmp_path):
        """Issue 10.1: an lr so small that the validation metric cannot move; patience 2 and plateau
        patience 0 would stop the run at iteration 6 and cut the lr at 4 if the warm-up (8) counted."""
        out = str(tmp_path / "run")
        lr = 1e-30
        rc, stdout, stderr = _train_main(["--model", "deit_t", "--init", "ri", "--epochs", "3", "--lr", str(lr),
                                          "--weight-decay", "0", "--warmup", "8", "--patience", "2",
                                          "--plateau-patience", "0", "--out", out]
                                         + [a for a in _TRAIN_TINY if a not in ("--warmup", "4")] + ["--log-every",
                                                                                                     "1"])
        assert rc == 0, stderr
        log = [json.loads(l) for l in open(os.path.join(out, "log.jsonl"))]
        vals = [r["val"]["quadratic_kappa"] for r in log if "val" in r]
        assert len(set(vals)) == 1  # the metric did not move: every validation after the first is "bad"
        lrs = {r["iteration"]: r["lr"] for r in log if "lr" in r}
        assert sorted(lrs) == list(range(1, 13))  # not stopped inside the warm-up (nor at its end)
        for it in range(1, 11):  # steps 1..10 run before the first post-warm-up validation (at 10)
            assert lrs[it] == pytest.approx(lr * min(1.0, it / 8), rel=1e-6), it
        assert lrs[11] == pytest.approx(lr * 0.1, rel=1e-6)  # then the plateau counts (patience 0)
        s = json.load(open(os.path.join(out, "summary.json")))
        assert s["iterations"] == 12 and s["stop_reason"].startswith("early stopping")
        assert s["best_iteration"] == 2  # the best is tracked from the start

    def test_train_pcam_default_size_is_the_recipe(self):
        """Issue 10.2: PatchCamelyon is resized to 256 and cropped to 224 like every dataset; 96 stays possible."""
        args = train.parse_args(["--model", "deit_s", "--data", "camelyon", "--data-root", "/x", "--init", "ri"])
        assert train.resolve_config(args)["img_size"] == 224
        args = train.parse_args(["--model", "deit_s", "--data", "camelyon", "--init", "ri", "--img-size", "96"])
        assert train.resolve_config(args)["img_size"] == 96

    @pytest.mark.slow
    def test_train_evaluation_is_float32_under_amp(self, tmp_path, monkeypatch):
        """Issue 10.3: training in bf16 autocast (CPU here), the test figure of summary.json equals a
        float32 evaluation of best.pt (what analyze.py's re-init baseline computes)."""
        monkeypatch.setattr(train, "amp_dtype", lambda cfg, device: torch.bfloat16)
        out = str(tmp_path / "run")
        rc, stdout, stderr = _train_main(["--model", "resnet18", "--init", "ri", "--epochs", "1", "--out", out]
                                         + _TRAIN_TINY)
        assert rc == 0 and "amp bfloat16" in stdout, stdout + stderr
        cfg = json.load(open(os.path.join(out, "config.json")))["config"]
        _, _, test_ds, info = data.load_splits(cfg)
        model = models.create_model("resnet18", num_classes=info["num_classes"], img_size=32)
        model.load_state_dict(models.read_checkpoint(os.path.join(out, "best.pt"))["model"])
        loader = torch.utils.data.DataLoader(test_ds, batch_size=16)
        model.eval()
        with torch.no_grad():
            logits = torch.cat([model(x) for x, _ in loader]).float()
            labels = torch.cat([y for _, y in loader])
        test = json.load(open(os.path.join(out, "summary.json")))["test"]
        assert test["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, labels)), rel=1e-6)
        assert test["quadratic_kappa"] == metrics.task_metric("quadratic_kappa", logits.softmax(1).numpy(),
                                                              labels.numpy())

    def test_train_small_training_set_warns_and_keep_last(self, tmp_path):
        """Issue 10.7: fewer training images than one batch is a one-line warning (the run goes on);
        --keep-last keeps last.pt after the run."""
        out = str(tmp_path / "run")
        rc, stdout, stderr = _train_main(["--model", "resnet18", "--init", "ri", "--epochs", "1", "--out", out,
                                          "--keep-last"] + _TRAIN_TINY + ["--subset", "8"])
        assert rc == 0, stderr
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and "warning" in lines[0] and "8 images" in lines[0] and "--batch-size 16" in lines[0]
        assert os.path.exists(os.path.join(out, "last.pt"))

    def test_train_stale_temp_files_removed(self, train_done, tmp_path):
        """Issue 13.5: temp files of a killed writer go on the next start in that place (run dir,
        its analysis folder, the data cache); those of a live process stay."""
        dead, live = _train_dead_pid(), os.getpid()
        out = train_done["out"]
        stale = [os.path.join(out, f"last.pt.tmp{dead}"), os.path.join(out, "analysis", f"l2.json.tmp{dead}")]
        keep = os.path.join(out, f"best.pt.tmp{live}")
        for f in stale + [keep]:
            open(f, "w").write("x")
        rc, stdout, stderr = _train_main(["--model", "resnet18", "--init", "ri", "--epochs", "1", "--out", out,
                                          "--resume"] + _TRAIN_TINY)
        assert rc == 0 and "already finished" in stdout, stderr
        assert not any(os.path.exists(f) for f in stale) and os.path.exists(keep)
        os.remove(keep)
        # the data cache: a killed cache build's .npy.tmp<pid>
        root, cache = tmp_path / "aptos", tmp_path / "cache"
        _data_aptos(root)
        cache.mkdir()
        (cache / f"aptos_x_r36_y.npy.tmp{dead}").write_bytes(b"x" * 100)
        (cache / f"aptos_x_r36_y.npy.tmp{live}").write_bytes(b"x")
        data.build_datasets("aptos", str(root), img_size=32, cache_dir=str(cache), workers=1)
        names = os.listdir(cache)
        assert f"aptos_x_r36_y.npy.tmp{dead}" not in names and f"aptos_x_r36_y.npy.tmp{live}" in names

    # ---- exact resumes, run identity, one writer per run folder, full disks
    @pytest.mark.slow
    @pytest.mark.parametrize("name, size", [("swin_t", 64), ("inception_v3", 75), ("resnet18", 32)])
    def test_train_resume_exact_for_models_that_draw(self, tmp_path, monkeypatch, name, size):
        """Issue 19.5: killed right after the first last.pt (mid-epoch: iteration 1 of 2) and resumed,
        Swin (drop-path) and Inception (dropout) train exactly as uninterrupted: creating the training
        loader's iterator again must not shift their masks."""
        args = ["--model", name, "--init", "ri", "--epochs", "1", "--log-every", "1"] + _train_tiny(size, 16, 8)
        full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
        assert _train_main(args + ["--out", full])[0] == 0
        _train_killed(args + ["--out", cut], monkeypatch)
        p = torch.load(os.path.join(cut, "last.pt"), weights_only=True)["progress"]
        assert p["pos"] == 1 and not os.path.exists(os.path.join(cut, "summary.json"))
        assert os.path.getsize(os.path.join(cut, "log.jsonl")) > p["log_bytes"]  # lines written after last.pt
        rc, stdout, stderr = _train_main(args + ["--out", cut, "--resume"])
        assert rc == 0 and "resumed" in stdout, stderr
        _train_same_run(cut, full)

    def test_train_schedule_is_reduce_lr_on_plateau(self):
        """The plateau rule is PyTorch's ReduceLROnPlateau (mode max, threshold 0): with patience 2
        the lr drops at the 3rd validation in a row without a new best (not the 2nd)."""
        rng = np.random.default_rng(0)
        values = np.round(rng.random(60), 1).tolist()  # ties count as no improvement
        for patience in (0, 1, 2, 3):
            ours = train.Schedule(1.0, warmup=0, patience=patience)
            opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
            ref = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.1, patience=patience,
                                                             threshold=0,
                                                             eps=0)
            for i, v in enumerate(values, 1):
                ours.step(v, iteration=i)
                ref.step(v)
                assert ours.lr_at(10**6) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9), (patience, i)
        s = train.Schedule(1.0, warmup=0, patience=2)
        for i, v in enumerate([1.0, 0.5, 0.5], 1):
            s.step(v, iteration=i)
        assert s.scale == 1.0  # 2 validations without improvement: not yet
        s.step(0.5, iteration=4)
        assert s.scale == pytest.approx(0.1)  # the 3rd

    def test_train_per_rank_training_seed(self):
        """Issue 19.4: dropout / drop-path streams differ across DDP ranks, repeat for a seed, and do
        not depend on what the init drew."""
        def draws(seed, rank, before=0):
            torch.rand(before)  # an init that drew more or fewer numbers
            train.seed_training(seed, rank)
            return torch.rand(5)
        assert torch.equal(draws(0, 0), draws(0, 0, before=100))
        assert not torch.equal(draws(0, 0), draws(0, 1))
        assert not torch.equal(draws(0, 1), draws(1, 1))

    def test_train_sync_bn_flag(self, tmp_path, monkeypatch):
        """Issue 19.4: --sync-bn is a recorded setting; under DDP on the CPU (no SyncBatchNorm there)
        it is one line before anything is written."""
        args = ["--model", "resnet18", "--init", "ri", "--epochs", "1", "--sync-bn"] + _TRAIN_TINY
        monkeypatch.setenv("WORLD_SIZE", "2")
        rc, stdout, stderr = _train_main(args + ["--out", str(tmp_path / "ddp")])
        assert rc == 2 and len(stderr.strip().splitlines()) == 1 and "--sync-bn" in stderr and "CUDA" in stderr, stderr
        assert not os.path.exists(tmp_path / "ddp")
        monkeypatch.delenv("WORLD_SIZE")
        cfg = train.resolve_config(train.parse_args(args + ["--out", "x"]))
        assert cfg["sync_bn"] is True and train.resolve_config(train.parse_args(_TRAIN_TINY + ["--model", "resnet18"]))[
            "sync_bn"] is False
        # a resnet's BatchNorm layers become SyncBatchNorm with the same state-dict keys
        m = models.create_model("resnet18", num_classes=3, img_size=32)
        keys = list(m.state_dict())
        synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(m)
        assert list(synced.state_dict()) == keys and train.has_batchnorm(m)
        assert not train.has_batchnorm(models.create_model("deit_t", num_classes=3, img_size=32))

    def test_train_evaluate_multilabel_loss_and_per_class_auc(self):
        """Issue 19.3: the CheXpert validation loss has the training loss's reduction (BCE mean over
        images and classes), and evaluate reports each class's AUC (NaN for a one-valued class)."""
        from sklearn.metrics import roc_auc_score
        torch.manual_seed(0)
        x = torch.randn(40, 6)
        y = (torch.rand(40, 3) < 0.5).float()
        y[:, 2] = 1.0  # one label value only: no AUC
        model = nn.Linear(6, 3)
        info = {"loss": "bce", "multilabel": True, "metric": "mean_auc", "num_classes": 3}
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
        res = train.evaluate(model, loader, torch.device("cpu"), info)
        with torch.no_grad():
            logits = model(x)
        assert res["loss"] == pytest.approx(float(train.loss_fn(logits, y, info)), rel=1e-6)  # the training loss
        want = [roc_auc_score(y[:, c].numpy(), logits[:, c].numpy()) for c in range(2)]
        assert res["per_class_auc"][:2] == pytest.approx(want, abs=1e-9) and math.isnan(res["per_class_auc"][2])
        assert res["mean_auc"] == pytest.approx(np.mean(want), abs=1e-9)

    def test_train_evaluation_turns_tf32_off(self, tf32_on):
        """Issue 19.2: evaluation runs with TF32 off (matmul and cuDNN) and restores the caller's
        settings (tested on the CPU by the switches themselves)."""
        seen = []

        class Probe(nn.Linear):
            def forward(self, x):
                seen.append(_train_tf32())
                return super().forward(x)

        info = {"loss": "ce", "multilabel": False, "metric": "accuracy", "num_classes": 2}
        data_ = torch.utils.data.TensorDataset(torch.randn(8, 4), torch.arange(8) % 2)
        train.evaluate(Probe(4, 2), torch.utils.data.DataLoader(data_, batch_size=4), torch.device("cpu"), info)
        off = ("ieee", "ieee") if hasattr(torch.backends.cuda.matmul, "fp32_precision") else ("highest", False)
        assert seen == [off, off] and _train_tf32() == tf32_on != off
        with pytest.raises(KeyError):  # restored on an error too
            with metrics.exact_float32():
                raise KeyError
        assert _train_tf32() == tf32_on

    @pytest.mark.slow
    def test_train_resume_refuses_another_precision_or_device(self, train_killed, tmp_path, monkeypatch):
        """Issue 19.6: a run trained in float32 on the CPU, resumed where --amp resolves to fp16 or
        bf16: one line naming both precisions, nothing changed (was: GradScaler.load_state_dict({}))."""
        out = _train_copy(train_killed, tmp_path)
        for dtype, name in ((torch.float16, "fp16"), (torch.bfloat16, "bf16")):
            monkeypatch.setattr(train, "amp_dtype", lambda cfg, device, d=dtype: d)
            _train_refused(train_killed["args"] + ["--out", out, "--resume"], out, "float32", name, "cpu")
        cfg = json.load(open(os.path.join(out, "config.json")))["config"]
        assert cfg["precision"] == "float32" and cfg["device_type"] == "cpu"

    @pytest.mark.slow
    def test_train_resume_epochs_change_is_recorded(self, train_killed, tmp_path):
        """Issue 19.7: --resume --epochs 3 on a 2-epoch run trains 3 epochs and config.json says so
        (with when it changed); the run equals an uninterrupted 3-epoch run (the schedule does not
        depend on --epochs). An --epochs the run has passed already is refused."""
        out = _train_copy(train_killed, tmp_path)
        args = [a if a != "2" or i == 0 or train_killed["args"][i - 1] != "--epochs" else "3"
                for i, a in enumerate(train_killed["args"])]
        assert args.count("3") == 2  # --n 3, --epochs 3
        rc, stdout, stderr = _train_main(args + ["--out", out, "--resume", "--patience", "20"])
        assert rc == 0 and "--epochs 2 -> 3" in stdout and "--patience 10 -> 20" in stdout, stdout + stderr
        doc = json.load(open(os.path.join(out, "config.json")))
        assert doc["config"]["epochs"] == 3 and doc["config"]["patience"] == 20
        assert doc["resumes"] == [{"iteration": 2, "epochs": {"from": 2, "to": 3}, "patience": {"from": 10, "to": 20}}]
        s = json.load(open(os.path.join(out, "summary.json")))
        assert s["iterations"] == 12 and s["epochs_run"] == 3.0
        longer = str(tmp_path / "longer")
        assert _train_main(args + ["--out", longer, "--patience", "20"])[0] == 0
        _train_same_run(out, longer)
        # a 3-epoch run killed after 1.5 epochs cannot become a 1-epoch run
        cut = str(tmp_path / "cut")
        mp = pytest.MonkeyPatch()
        _train_killed(args + ["--out", cut], mp, after=3)
        mp.undo()
        one = [a if a != "3" or args[i - 1] != "--epochs" else "1" for i, a in enumerate(args)]
        _train_refused(one + ["--out", cut, "--resume"], cut, "--epochs 1", "1.5 epochs")

    @pytest.mark.slow
    @pytest.mark.parametrize("damage", ["deleted", "truncated", "other_run", "best_deleted"])
    def test_train_resume_rebuilds_init_and_best(self, train_killed, tmp_path, damage):
        """Issue 19.7: init.pt deleted, truncated or replaced, then --resume: rebuilt exactly from the
        seed and the weights (checked against the checksum config.json records); the run finishes
        as the uninterrupted one. A best.pt lost while the best is the model in last.pt (a kill
        between the two writes) is written again from last.pt."""
        out = _train_copy(train_killed, tmp_path)
        path = os.path.join(out, "init.pt")
        if damage == "best_deleted":
            os.remove(os.path.join(out, "best.pt"))
            assert _train_main(train_killed["args"] + ["--out", out, "--resume"])[0] == 0
            _train_same_run(out, train_killed["full"])
            return
        if damage == "deleted":
            os.remove(path)
        elif damage == "truncated":
            with open(path, "r+b") as f:
                f.truncate(1000)
        else:
            torch.save({"model": models.create_model("resnet18", num_classes=5, img_size=32).state_dict()}, path)
        rc, stdout, stderr = _train_main(train_killed["args"] + ["--out", out, "--resume"])
        assert rc == 0 and "init.pt was missing or damaged: rebuilt" in stdout, stdout + stderr
        _train_same_run(out, train_killed["full"])
        got, want = (models.read_checkpoint(os.path.join(r, "init.pt"))["model"] for r in (out, train_killed["full"]))
        assert all(torch.equal(got[k], want[k]) for k in want) and set(got) == set(want)
        doc = json.load(open(os.path.join(out, "config.json")))
        assert train.state_checksum(got) == doc["init_sha256"]

    @pytest.mark.slow
    def test_train_resume_refuses_init_it_cannot_rebuild(self, train_killed, tmp_path):
        """Issue 19.7: init.pt gone and the --weights file changed since: the rebuilt init would be
        another one, so --resume refuses (one line naming init.pt), changing nothing."""
        out = _train_copy(train_killed, tmp_path)
        os.remove(os.path.join(out, "init.pt"))
        weights = str(tmp_path / "weights.pt")
        torch.manual_seed(4)
        torch.save(models.create_model("resnet18", num_classes=1000, img_size=32).state_dict(), weights)
        args = [weights if a == train_killed["weights"] else a for a in train_killed["args"]]
        doc = rundir.read_json(os.path.join(out, "config.json"))
        doc["config"]["weights"] = weights  # the same path, other content
        rundir.save_json(os.path.join(out, "config.json"), doc)
        _train_refused(args + ["--out", out, "--resume"], str(tmp_path), "init.pt", "is missing", "--weights")

    @pytest.mark.slow
    @pytest.mark.parametrize("case", ["log_deleted", "log_cut", "best_over_last", "foreign_key", "other_model",
                                      "other_run", "best_deleted", "progress"])
    def test_train_resume_refuses_damaged_run_files(self, train_killed, tmp_path, case):
        """Issue 19.7 / 23.7: a lost log.jsonl, best.pt copied over last.pt, a last.pt with foreign keys,
        another model's weights or another run's (run_id), a lost best.pt, a damaged progress record:
        one line naming the file, exit 2, nothing changed (was: a run with its first lines lost, or a
        traceback)."""
        out = _train_copy(train_killed, tmp_path)
        last, log = os.path.join(out, "last.pt"), os.path.join(out, "log.jsonl")
        ck = torch.load(last, weights_only=True)
        name = "last.pt"
        if case == "log_deleted":
            os.remove(log)
            name = "log.jsonl"
        elif case == "log_cut":
            with open(log, "r+b") as f:
                f.truncate(ck["progress"]["log_bytes"] - 3)
            name = "log.jsonl"
        elif case == "best_over_last":
            shutil.copy(os.path.join(out, "best.pt"), last)
        elif case == "foreign_key":
            ck["model"]["extra.weight"] = torch.zeros(3)
            torch.save(ck, last)
        elif case == "other_model":
            ck["model"] = models.create_model("deit_t", num_classes=5, img_size=32).state_dict()
            torch.save(ck, last)
        elif case == "other_run":
            ck["run_id"] = rundir.new_run_id()
            torch.save(ck, last)
        elif case == "best_deleted":
            ck["progress"]["iteration"] += 2  # best.pt is not the model in last.pt: it cannot be rewritten
            ck["progress"]["best_iteration"] = 2
            torch.save(ck, last)
            os.remove(os.path.join(out, "best.pt"))
            name = "best.pt"
        else:
            ck["progress"]["pos"] = 99
            torch.save(ck, last)
        _train_refused(train_killed["args"] + ["--out", out, "--resume"], out, name, "--resume")

    @pytest.mark.slow
    def test_train_refuses_run_files_without_config(self, train_killed, tmp_path):
        """Issue 23.5: a folder with run files but no config.json is no new run: --resume and
        --overwrite refuse it (one line naming the files), nothing changed (was: treated as new,
        last.pt and best.pt replaced, the old log appended to)."""
        out = _train_copy(train_killed, tmp_path)
        os.remove(os.path.join(out, "config.json"))
        for extra in (["--resume"], ["--overwrite"], []):
            _train_refused(train_killed["args"] + ["--out", out] + extra, out, "no config.json", "last.pt", "log.jsonl")

    @pytest.mark.slow
    def test_train_one_writer_per_run_folder(self, train_killed, tmp_path, monkeypatch):
        """Issue 23.3: while another process holds a run folder's lock, train.py refuses with one line
        naming the holder (exit 2, nothing changed); a finished run is still reported as finished.
        A run changed by another writer between the checks and the lock is refused too."""
        out = _train_copy(train_killed, tmp_path)
        args = train_killed["args"] + ["--out", out, "--resume"]
        with rundir.RunLock(out, "analyze.py"):
            _train_refused(args, out, "another process is writing", "analyze.py pid")
            rc, stdout, _ = _train_main(["--model", "resnet18", "--init", "ri", "--epochs", "1", "--resume", "--out",
                                         os.path.dirname(train_killed["full"]) + "/full"] + _TRAIN_TINY)
        new = str(tmp_path / "new")
        with rundir.RunLock(new, "train.py"):
            _train_refused(train_killed["args"] + ["--out", new], new, "train.py pid")
        # another writer finishes the run between this start's checks and its lock
        real = rundir.RunLock.acquire

        def acquire(self):
            doc = rundir.read_json(os.path.join(out, "config.json"))
            rundir.save_json(os.path.join(out, "config.json"), dict(doc, run_id=rundir.new_run_id()))
            return real(self)
        monkeypatch.setattr(rundir.RunLock, "acquire", acquire)
        rc, stdout, stderr = _train_main(args)
        assert rc == 2 and "another process changed the run" in stderr and len(stderr.strip().splitlines()) == 1
        assert os.path.exists(os.path.join(out, "last.pt")) and not os.path.exists(os.path.join(out, "summary.json"))

    @pytest.mark.slow
    def test_train_two_processes_on_one_new_folder(self, tmp_path):
        """Issue 23.3: two train.py started at once on the same new --out: one trains, the other
        exits 2 with one line; the log holds one run's lines (was: 16 interleaved lines, both exit 0)."""
        out = str(tmp_path / "run")
        args = [sys.executable, os.path.join(ROOT, "train.py"), "--model", "resnet18", "--init", "ri", "--epochs", "1",
                "--out", out] + _TRAIN_TINY
        procs = [subprocess.Popen(args, env=_train_env(tmp_path), cwd=str(tmp_path), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
        res = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
        assert sorted(rc for rc, _ in res) == [0, 2], res
        err = [e for rc, e in res if rc == 2][0].strip().splitlines()
        assert len(err) == 1 and ("another process is writing" in err[0] or "exists" in err[0]), err
        log = open(os.path.join(out, "log.jsonl")).read().splitlines()
        assert len(log) == 4 and [json.loads(l)["iteration"] for l in log] == [2, 2, 4, 4]

    @pytest.mark.slow
    @pytest.mark.parametrize("name", ["deit_t", "resnet18"])
    def test_train_full_disk_tmpfs(self, tmp_path, tmpfs, monkeypatch, train_refs, name):
        """Issue 23.6 on a real full disk: --out on a 30 MB tmpfs. DeiT-T (init.pt 22 MB fits, last.pt
        66 MB does not): one line, exit 2, the run so far kept whole (config.json, init.pt, log.jsonl),
        no temp file; --resume: the same, log.jsonl kept. ResNet18 (init.pt 45 MB does not fit; its
        free-space check is turned off so the write itself hits ENOSPC): one line and no folder left,
        so the same command works later. With space again, --resume finishes the run exactly as an
        uninterrupted one (was: exit 1, two tracebacks, a resume that deleted log.jsonl)."""
        ref = train_refs(name)
        out = os.path.join(tmpfs("30m"), "run")
        args = ["--model", name, "--out", out] + _TRAIN_FULL_DISK
        if name == "resnet18":
            monkeypatch.setattr(rundir, "free_bytes", lambda path: None)  # unknown: the write runs into ENOSPC
        run_id = None
        for extra in ([], ["--resume"]):
            line = _train_disk_full_start(args + extra, out)
            if name == "deit_t":
                assert "last.pt" in line and sorted(os.listdir(out)) == [".lock", "config.json", "init.pt", "log.jsonl"]
                doc = rundir.read_config(out)
                assert run_id in (None, doc["run_id"]) and doc["config"]["model"] == name
                run_id = doc["run_id"]
                init_sd = models.read_checkpoint(os.path.join(out, "init.pt"))["model"]
                assert train.state_checksum(init_sd) == doc["init_sha256"]
                log = [json.loads(l) for l in open(os.path.join(out, "log.jsonl"))]
                assert [r["iteration"] for r in log] == [2, 2]
                assert ("--resume" in line) == (extra == [])  # the first start says how to continue
            else:
                assert "init.pt" in line and not os.path.exists(out)
        monkeypatch.undo()
        tmpfs("400m")
        rc, stdout, stderr = _train_main(args + ["--resume"])
        assert rc == 0, stderr
        _train_same_run(out, ref)
        if name == "deit_t":
            assert rundir.read_config(out)["run_id"] == run_id

    @pytest.mark.slow
    @pytest.mark.parametrize("name, fail_at", [("resnet18", "init.pt"), ("resnet18", "last.pt"), ("deit_t", "last.pt"),
                                               ("resnet18", "best.pt"), ("resnet18", "summary.json"),
                                               ("resnet18", "log.jsonl")])
    def test_train_full_disk_monkeypatched(self, tmp_path, monkeypatch, train_refs, name, fail_at):
        """Issue 23.6 without root: the disk is full when train.py first writes `fail_at`. One line,
        exit 2, nothing half-written; the same command with --resume, once there is space, finishes
        the run exactly as an uninterrupted one (a run stopped by early stopping included)."""
        ref = train_refs(name)
        out = str(tmp_path / "run")
        args = ["--model", name, "--out", out] + _TRAIN_FULL_DISK
        real_free, real_append = rundir.free_bytes, rundir.append_line
        monkeypatch.setattr(rundir, "free_bytes", lambda p: 0 if os.path.basename(p) == fail_at else real_free(p))

        def append_line(path, text):
            if os.path.basename(path) == fail_at and os.path.exists(path):  # the second line does not fit
                raise rundir.disk_full(path, len(text) + 1)
            return real_append(path, text)
        monkeypatch.setattr(rundir, "append_line", append_line)
        line = _train_disk_full_start(args, out)
        assert fail_at in line
        if fail_at == "init.pt":
            assert not os.path.exists(out)  # the folder this start created is gone: the same command works later
        else:
            assert rundir.read_config(out)["config"]["model"] == name and "--resume" in line
        monkeypatch.undo()
        assert _train_main(args + ["--resume"])[0] == 0
        _train_same_run(out, ref)


# ========================================================================================
# analyze.py: the analyses of finished runs
# ========================================================================================


@pytest.fixture(scope="module")
def analyze_runs(tmp_path_factory):
    """Tiny real runs: a DeiT-T 'pretrained' on shapes, fine-tuned on synthetic with ST and WT."""
    root = tmp_path_factory.mktemp("analyze")
    common = ["--subset", "48", "--img-size", "32", "--batch-size", "16", "--warmup", "4", "--epochs", "1",
              "--device", "cpu", "--workers", "0"]
    pre, st, wt = str(root / "pre"), str(root / "st"), str(root / "wt")
    torch.set_num_threads(1)
    assert train.main(["--model", "deit_t", "--data", "shapes", "--init", "ri", "--out", pre] + common) == 0
    for out, init_name in ((st, "st"), (wt, "wt")):
        assert train.main(["--model", "deit_t", "--data", "synthetic", "--init", init_name, "--weights",
                           os.path.join(pre, "best.pt"), "--out", out] + common) == 0
    return st, wt


def _analyze_load(run, which):
    cfg, _ = analyze.load_run(run)
    return analyze.load_model(cfg["model"], cfg["num_classes"], cfg["img_size"], os.path.join(run, f"{which}.pt"),
                              which, need_head=True)


def _analyze_copy_run(src, dst):
    import shutil
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("analysis"))
    return str(dst)


def _analyze_snapshot(folder):
    out = {}
    for here, _, files in os.walk(folder):
        for f in files:
            with open(os.path.join(here, f), "rb") as fh:
                out[os.path.relpath(os.path.join(here, f), folder)] = fh.read()
    return out


_ANALYZE_BAD = {
    "device cuda without CUDA": lambda run, tmp: ["--run", run, "--device", "cuda"],
    "config.json is {}": lambda run, tmp: ["--run", tmp["empty"]],
    "bad --ref": lambda run, tmp: ["--run", run, "--ref", tmp["missing"]],
    "--ref unfinished": lambda run, tmp: ["--run", run, "--ref", tmp["unfinished"], "--metric", "cka"],
    "--batch-size 0": lambda run, tmp: ["--run", run, "--batch-size", "0"],
    "--k 0": lambda run, tmp: ["--run", run, "--k", "0", "--metric", "knn"],
    "cka on an unfinished run": lambda run, tmp: ["--run", tmp["unfinished"], "--metric", "cka"],
    "all on an unfinished run": lambda run, tmp: ["--run", tmp["unfinished"]],
    "--weights without --out": lambda run, tmp: ["--model", "deit_t", "--weights", os.path.join(run, "best.pt")],
    "--weights not a checkpoint": lambda run, tmp: ["--model", "deit_t", "--weights", os.path.join(run, "config.json"),
                                                    "--out", tmp["unfinished"], "--metric", "knn"],
    "--weights of another model": lambda run, tmp: ["--model", "resnet18", "--weights", os.path.join(run, "best.pt"),
                                                    "--out", tmp["unfinished"], "--metric", "knn"],
    "cka without --init-weights": lambda run, tmp: ["--model", "deit_t", "--weights", os.path.join(run, "best.pt"),
                                                    "--out", tmp["unfinished"], "--metric", "cka"],
    "--run with --weights": lambda run, tmp: ["--run", run, "--weights", os.path.join(run, "best.pt")],
    "--skip not an analysis": lambda run, tmp: ["--run", run, "--skip", "reinit,speed"],
    "--skip with one --metric": lambda run, tmp: ["--run", run, "--metric", "knn", "--skip", "reinit"],
}


def _timm_deit(num_classes=5, img_size=32, seed=0):
    timm = pytest.importorskip("timm")
    lib, name, kw = models.REFERENCE_MODELS["deit_t"]
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, num_classes=num_classes, img_size=img_size, **kw).eval()


def _analyze_main(argv):
    """analyze.main in-process: (exit code, stdout, stderr)."""
    import contextlib
    import io
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = analyze.main(argv)
    return rc, out.getvalue(), err.getvalue()


class TestAnalyze:
    """analyze.py: the analyses of finished runs."""

    # ---- each analysis on tiny finished runs
    @pytest.mark.parametrize("name, size", [("deit_t", 32), ("swin_t", 64), ("resnet18", 32), ("inception_v3", 75)])
    def test_analyze_forward_stages_equal_forward(self, name, size):
        torch.manual_seed(0)
        model = models.create_model(name, num_classes=3, img_size=size).eval()
        x = torch.randn(2, 3, size, size)
        stages, head = model.forward_stages()
        z = x
        for _, fn in stages:
            z = fn(z)
        with torch.no_grad():
            assert torch.equal(head(z), model(x))
        # every analysis layer sits in exactly one stage
        for layer in model.feature_layers():
            analyze.stage_of(stages, layer)

    def test_analyze_skip_leaves_analyses_out(self, analyze_runs, tmp_path):
        """--metric all --skip a,b runs every other analysis (study.sh skips re-init on most runs)."""
        run = _analyze_copy_run(analyze_runs[1], tmp_path / "run")
        assert analyze.main(["--run", run, "--metric", "all", "--skip", "reinit,knn", "--k", "5", "--device",
                             "cpu"]) == 0
        assert sorted(os.listdir(os.path.join(run, "analysis"))) == sorted(
            f"{m}.json" for m in analyze.METRICS if m not in ("reinit", "knn"))

    def test_analyze_all_metrics_and_cka_reference(self, analyze_runs):
        st, wt = analyze_runs
        a = ["--batch-size", "64", "--k", "5", "--device", "cpu"]
        assert analyze.main(["--run", wt, "--ref", st, "--metric", "all"] + a) == 0
        out = os.path.join(wt, "analysis")
        docs = {m: json.load(open(os.path.join(out, f"{m}.json"))) for m in analyze.METRICS}
        L = 25
        cka = docs["cka"]["values"]
        assert set(cka) == {"init", "ref"} and set(cka["init"]) == {"cls", "patches", "all"}
        assert np.asarray(cka["ref"]["all"], dtype=float).shape == (L, L)
        assert len(docs["knn"]["values"]["cls"]) == L and len(docs["reinit"]["values"]["reverted"]) == L
        assert len(docs["l2"]["values"]) == L and len(docs["attention"]["values"]["per_block"]) == 12
        assert docs["convergence"]["values"]["best_iteration"] >= 1
        # one batch holds the whole test split: minibatch CKA = debiased CKA of that batch,
        # computed here from the raw activations with metrics.cka
        cfg, _ = analyze.load_run(wt)
        _, _, test_ds, _ = data.load_splits(cfg)
        x = torch.stack([test_ds[i][0] for i in range(len(test_ds))])
        acts = {}
        for which in ("best", "init"):
            m, got = _analyze_load(wt, which), {}
            mods = dict(m.named_modules())
            _hooks = [mods[n].register_forward_hook(lambda mod, i, o, n=n, got=got: got.__setitem__(n, o.detach()))
                     for n in ("blocks.2.attn", "blocks.7.mlp")]
            with torch.no_grad():
                m(x)
            acts[which] = got
        layers = docs["cka"]["layers"]
        i, j = layers.index("blocks.2.attn"), layers.index("blocks.7.mlp")
        for a_name, b_name, (r, c) in (("blocks.2.attn", "blocks.7.mlp", (i, j)),
                                       ("blocks.7.mlp", "blocks.7.mlp", (j, j))):
            fa, fb = acts["best"][a_name], acts["init"][b_name]
            assert cka["init"]["all"][r][c] == pytest.approx(metrics.cka(fa, fb, debiased=True), abs=1e-6)
            assert cka["init"]["cls"][r][c] == pytest.approx(metrics.cka(fa[:, :1], fb[:, :1], debiased=True), abs=1e-6)
            assert cka["init"]["patches"][r][c] == pytest.approx(metrics.cka(fa[:, 1:], fb[:, 1:], debiased=True),
                                                                 abs=1e-6)

    def test_analyze_attention_keeps_both_forms_and_cls_share(self, analyze_runs, tmp_path):
        """Issue 18: the attention analysis writes per block and head the distance with the CLS key
        dropped, the distance renormalised over patch keys and the CLS share, from one pass; each
        equals metrics' functions on the recorded attention of best.pt over the whole test split."""
        run = _analyze_copy_run(analyze_runs[1], tmp_path / "run")
        assert analyze.main(["--run", run, "--metric", "attention", "--batch-size", "7", "--device", "cpu"]) == 0
        doc = json.load(open(os.path.join(run, "analysis", "attention.json")))
        v = doc["values"]
        assert doc["facts"]["token_mixing"] == "attention"
        cfg, _ = analyze.load_run(run)
        _, _, test_ds, _ = data.load_splits(cfg)
        x = torch.stack([test_ds[i][0] for i in range(len(test_ds))])
        m = _analyze_load(run, "best")
        m.record_attention(True)
        with torch.no_grad():
            m(x)
        for i, a in enumerate(m.attention_probs()):
            want = {"per_head": metrics.mean_attention_distance(a, m.grid_size, m.patch_size),
                    "per_head_renormalized": metrics.mean_attention_distance(a, m.grid_size, m.patch_size,
                                                                             renormalize=True),
                    "cls_share_per_head": metrics.attention_prefix_share_sum(a) / len(x)}
            for key, w in want.items():
                assert v[key][i] == pytest.approx(w.numpy().tolist(), rel=1e-5), (key, i)
                block = key.replace("per_head", "per_block")
                assert v[block][i] == pytest.approx(float(w.mean()), rel=1e-5), (block, i)
        # the forms differ by the CLS share: renormalised >= dropped, per block
        assert all(r >= d for r, d in zip(v["per_block_renormalized"], v["per_block"], strict=True))

    def test_analyze_reinit_prefix_reuse_equals_full_evaluation(self, analyze_runs):
        _, wt = analyze_runs
        cfg, _ = analyze.load_run(wt)
        _, _, test_ds, info = data.load_splits(cfg)
        model = _analyze_load(wt, "best")
        init_state = models.read_checkpoint(os.path.join(wt, "init.pt"))["model"]
        args = analyze.parse_args(["--run", wt, "--batch-size", "20"])
        base, values, _ = analyze.reinit_scores(model, init_state, test_ds, info, args, torch.device("cpu"))
        final_state = {k: v.clone() for k, v in model.state_dict().items()}
        loader = analyze.loader(test_ds, args, torch.device("cpu"))
        assert base == pytest.approx(train.evaluate(model, loader, torch.device("cpu"), info)[info["metric"]])
        for layer, got in list(zip(model.feature_layers(), values))[::6]:
            reverted = dict(final_state)
            reverted.update({k: init_state[k] for k in analyze.layer_entries(model, layer)})
            model.load_state_dict(reverted)
            want = train.evaluate(model, loader, torch.device("cpu"), info)[info["metric"]]
            assert got == pytest.approx(want, abs=1e-9), layer
        model.load_state_dict(final_state)  # the pass restored every layer it reverted
        for k, v in _analyze_load(wt, "best").state_dict().items():
            assert torch.equal(model.state_dict()[k], v)

    def test_analyze_bad_input(self, tmp_path, analyze_runs, capsys):
        assert analyze.main(["--run", str(tmp_path / "nope")]) == 2
        assert "config.json" in capsys.readouterr().err
        st, _ = analyze_runs
        os.makedirs(tmp_path / "unfinished")
        with open(os.path.join(st, "config.json")) as f:
            cfg = f.read()
        (tmp_path / "unfinished" / "config.json").write_text(cfg)
        assert analyze.main(["--run", str(tmp_path / "unfinished"), "--metric", "l2"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "best.pt" in err[0]

    def test_analyze_reinit_baseline_equals_run_test_figure(self, analyze_runs):
        """The re-init baseline is scored from float32 logits like train.py's test figure, so the
        two are the same number."""
        _, wt = analyze_runs
        assert analyze.main(["--run", wt, "--metric", "reinit", "--batch-size", "16", "--device", "cpu"]) == 0
        doc = json.load(open(os.path.join(wt, "analysis", "reinit.json")))
        summary = json.load(open(os.path.join(wt, "summary.json")))
        metric = doc["settings"]["task_metric"]
        assert doc["values"]["baseline"] == pytest.approx(summary["test"][metric], abs=1e-9)

    def test_analyze_knn_features_float32(self, analyze_runs, tmp_path):
        """Issue 10.6: pooled features above 65504 (float16's max) must not turn into inf/NaN.
        Scaling the patch conv (weight and bias) by 1e6 scales its output, so the cosine k-NN at
        that layer is unchanged -- with float16 storage it became garbage."""
        _, wt = analyze_runs
        plain, scaled = _analyze_copy_run(wt, tmp_path / "plain"), _analyze_copy_run(wt, tmp_path / "scaled")
        ck = models.read_checkpoint(os.path.join(scaled, "best.pt"))
        for k in ("patch_embed.proj.weight", "patch_embed.proj.bias"):
            ck["model"][k] = ck["model"][k] * 1e6
        torch.save(ck, os.path.join(scaled, "best.pt"))
        a = ["--metric", "knn", "--batch-size", "32", "--k", "5", "--device", "cpu"]
        values = []
        for run in (plain, scaled):
            assert analyze.main(["--run", run] + a) == 0
            values.append(json.load(open(os.path.join(run, "analysis", "knn.json")))["values"])
        for t in ("cls", "patches", "all"):
            assert values[1][t][0] is not None and values[1][t][0] == pytest.approx(values[0][t][0], abs=1e-9), t

    def test_analyze_knn_streamed_bank_equals_one_shot(self, analyze_runs, tmp_path, monkeypatch):
        """Issue 21: the bank streamed through running top-k (batches of 16, merged 20 images at a
        time) gives the k-NN scores of a one-shot knn_predict on the whole bank held in memory."""
        _, wt = analyze_runs
        run = _analyze_copy_run(wt, tmp_path / "run")
        monkeypatch.setattr(analyze, "KNN_BANK_CHUNK", 20)
        assert analyze.main(["--run", run, "--metric", "knn", "--batch-size", "16", "--k", "7", "--device", "cpu"]) == 0
        doc = json.load(open(os.path.join(run, "analysis", "knn.json")))
        cfg, _ = analyze.load_run(run)
        train_ds, _, test_ds, info = data.load_splits(cfg, eval_train=True)
        model = _analyze_load(run, "best")
        feats = {}
        for name, ds in (("bank", train_ds), ("queries", test_ds)):
            x = torch.stack([ds[i][0] for i in range(len(ds))])
            with metrics.capture(model, model.feature_layers(), lambda n, o: model.pooled_views(n, o)) as acts, \
                    torch.no_grad():
                model(x)
            feats[name] = {l: dict(v) for l, v in acts.items()}
        labels = np.asarray(test_ds.labels)
        for t, values in doc["values"].items():
            for l, got in zip(model.feature_layers()[::4], values[::4]):
                scores = metrics.knn_predict(feats["bank"][l][t], np.asarray(train_ds.labels), feats["queries"][l][t],
                                             k=7,
                                             num_classes=info["num_classes"])
                assert got == pytest.approx(metrics.task_metric(info["metric"], scores.numpy(), labels),
                                            abs=1e-9), (t, l)

    def test_analyze_reinit_in_shared_pass_equals_own_pass(self, analyze_runs, tmp_path):
        """Issue 21: without attention recording the shared pass also scores re-init (the
        fine-tuned model's stage inputs are its forward): the same numbers as re-init's own pass."""
        _, wt = analyze_runs
        shared, alone = _analyze_copy_run(wt, tmp_path / "shared"), _analyze_copy_run(wt, tmp_path / "alone")
        a = ["--batch-size", "20", "--k", "5", "--device", "cpu"]
        assert analyze.main(["--run", shared, "--metric", "all", "--skip", "attention"] + a) == 0
        assert analyze.main(["--run", alone, "--metric", "reinit"] + a) == 0
        docs = [json.load(open(os.path.join(r, "analysis", "reinit.json")))["values"] for r in (shared, alone)]
        assert docs[0] == docs[1]
        job = analyze.prepare(analyze.parse_args(["--run", shared, "--metric", "all", "--skip", "attention"] + a))
        assert analyze.shared_pass(job, analyze.parse_args(["--run", shared] + a))["reinit"] is not None

    @pytest.mark.slow
    def test_analyze_warns_on_small_samples(self, analyze_runs, tmp_path, capsys):
        """Issue 10.7: k > bank size and CKA over fewer images than --batch-size: one-line warnings."""
        _, wt = analyze_runs
        run = _analyze_copy_run(wt, tmp_path / "run")
        assert analyze.main(["--run", run, "--metric", "knn", "--k", "100000", "--device", "cpu"]) == 0
        err = [l for l in capsys.readouterr().err.splitlines() if "warning" in l]
        assert len(err) == 1 and "--k 100000" in err[0] and "bank" in err[0]
        assert analyze.main(["--run", run, "--metric", "cka", "--batch-size", "100000", "--device", "cpu"]) == 0
        err = [l for l in capsys.readouterr().err.splitlines() if "warning" in l]
        assert len(err) == 1 and "--batch-size 100000" in err[0]
        assert analyze.main(["--run", run, "--metric", "cka", "--batch-size", "8", "--device", "cpu"]) == 0
        assert "warning" not in capsys.readouterr().err

    @pytest.mark.slow
    @pytest.mark.parametrize("case", list(_ANALYZE_BAD))
    def test_analyze_bad_input_fails_before_writing(self, case, analyze_runs, tmp_path):
        """Issue 13: one line on stderr, exit 2, no traceback, and every analysis folder as it was
        (all checks run before the first write)."""
        if case.startswith("device cuda") and torch.cuda.is_available():
            pytest.skip("CUDA is available here")
        st, wt = analyze_runs
        run = _analyze_copy_run(wt, tmp_path / "run")
        os.makedirs(os.path.join(run, "analysis"))
        with open(os.path.join(run, "analysis", "l2.json"), "w") as f:
            f.write('{"old": true}\n')
        tmp = {"empty": str(tmp_path / "empty"), "missing": str(tmp_path / "missing"),
               "unfinished": str(tmp_path / "unfinished")}
        os.makedirs(tmp["empty"])
        with open(os.path.join(tmp["empty"], "config.json"), "w") as f:
            f.write("{}\n")
        unfinished = _analyze_copy_run(st, tmp["unfinished"])
        os.remove(os.path.join(unfinished, "summary.json"))
        before = {k: _analyze_snapshot(v) for k, v in dict(tmp, run=run).items()}
        res = subprocess.run([sys.executable, os.path.join(ROOT, "analyze.py")] + _ANALYZE_BAD[case](run, tmp),
                             capture_output=True, text=True, cwd=str(tmp_path), timeout=300,
                             env=dict(os.environ, OMP_NUM_THREADS="1"))
        err = res.stderr.strip().splitlines()
        assert res.returncode == 2, res.stderr
        assert len(err) == 1 and err[0].startswith("analyze.py: error:"), res.stderr
        assert "Traceback" not in res.stderr
        assert {k: _analyze_snapshot(v) for k, v in dict(tmp, run=run).items()} == before

    def test_analyze_flags_have_help_with_default_once(self):
        p = analyze.build_parser()
        for a in p._actions:
            if a.dest == "help":
                continue
            assert a.help, f"{a.option_strings} has no help text"
            text = a.help % {"default": a.default}
            assert text.count("default") <= 1, a.option_strings
        assert "(default: 128)" in " ".join(p.format_help().split())

    def test_analyze_has_no_model_specific_code(self):
        """Issue 12: model facts live in models.py; no other file tests a model's name."""
        import re
        pattern = re.compile(r"""startswith\(\s*\(?\s*["'](deit|swin|resnet|inception)|==\s*["'](deit|swin|resnet|"""
                             r"""inception)|model_name|_STEM|_MIXED""")
        for f in ("analyze.py", "train.py", "plots.py", "bench.py", "data.py", "init.py", "metrics.py"):
            with open(os.path.join(ROOT, f)) as fh:
                for i, line in enumerate(fh, 1):
                    assert not pattern.search(line), f"{f}:{i}: {line.strip()}"
        src = open(os.path.join(ROOT, "analyze.py")).read()
        assert "import train" not in src and "def test_" not in src and "def tqdm" not in src

    def test_analyze_timm_checkpoints(self, tmp_path):
        """Issue 12: analyze.py on saved timm checkpoints (no run directory) writes CKA with 25 layers."""
        ft, ini, ref = (str(tmp_path / f"{k}.pth") for k in ("ft", "init", "ref"))
        for path, seed in ((ft, 0), (ini, 1), (ref, 2)):
            torch.save(_timm_deit(seed=seed).state_dict(), path)
        out = str(tmp_path / "out")
        a = ["--model", "deit_t", "--weights", ft, "--init-weights", ini, "--data", "synthetic", "--img-size", "32",
             "--subset", "24", "--batch-size", "24", "--device", "cpu", "--out", out]
        assert analyze.main(a + ["--metric", "cka", "--ref-weights", ref]) == 0
        doc = json.load(open(os.path.join(out, "analysis", "cka.json")))
        assert len(doc["layers"]) == 25 and doc["model"] == "deit_t" and doc["weights"] == os.path.abspath(ft)
        for key in ("init", "ref"):
            assert np.asarray(doc["values"][key]["all"], dtype=float).shape == (25, 25)
        assert doc["facts"] == {"feature_types": ["cls", "patches", "all"], "has_attention": True,
                                "token_mixing": "attention"}
        # the re-init baseline scores the timm model's own head: it equals timm's own test metric
        assert analyze.main(a + ["--metric", "reinit"]) == 0
        doc = json.load(open(os.path.join(out, "analysis", "reinit.json")))
        _, _, test_ds, info = data.load_splits({"data": "synthetic", "data_root": None, "img_size": 32,
                                                "split_seed": 0, "subset": 24, "cache_dir": None})
        m = _timm_deit(seed=0)
        m.load_state_dict(torch.load(ft, weights_only=True))
        x = torch.stack([test_ds[i][0] for i in range(len(test_ds))])
        with torch.no_grad():
            scores = m(x).float().softmax(1).numpy()
        want = metrics.task_metric(info["metric"], scores, np.asarray(test_ds.labels))
        assert doc["values"]["baseline"] == pytest.approx(want, abs=1e-6)

    # ---- the run's metric, TF32 off, one writer, run identity, validated run files
    def test_analyze_uses_the_runs_metric(self, tmp_path):
        """Issue 19.1: a run trained with --metric accuracy (synthetic's own is quadratic kappa): its
        re-init baseline equals its summary.json test accuracy and k-NN is scored by accuracy."""
        out = str(tmp_path / "run")
        assert _train_main(["--model", "resnet18", "--init", "ri", "--epochs", "1", "--metric", "accuracy",
                            "--out", out] + _TRAIN_TINY)[0] == 0
        rc, stdout, stderr = _analyze_main(["--run", out, "--metric", "all", "--skip", "cka,l2,convergence", "--k", "5",
                                            "--device", "cpu", "--batch-size", "32"])
        assert rc == 0, stderr
        reinit = json.load(open(os.path.join(out, "analysis", "reinit.json")))
        knn = json.load(open(os.path.join(out, "analysis", "knn.json")))
        test = json.load(open(os.path.join(out, "summary.json")))["test"]
        assert reinit["settings"]["task_metric"] == knn["settings"]["task_metric"] == "accuracy"
        assert reinit["values"]["baseline"] == pytest.approx(test["accuracy"], abs=1e-12)
        assert all(v * 64 == pytest.approx(round(v * 64)) for v in knn["values"]["all"])  # accuracies over 64 images

    def test_analyze_turns_tf32_off(self, analyze_runs, tmp_path, monkeypatch, tf32_on):
        """Issue 19.2: the analyses (the shared test pass, l2) run with TF32 off; the settings are
        restored afterwards."""
        run = _analyze_copy_run(analyze_runs[1], tmp_path / "run")
        seen = []
        real_pass, real_l2 = analyze.shared_pass, analyze.ANALYSES["l2"]
        monkeypatch.setattr(analyze, "shared_pass", lambda *a: seen.append(_train_tf32()) or real_pass(*a))
        monkeypatch.setitem(analyze.ANALYSES, "l2", lambda *a: seen.append(_train_tf32()) or real_l2(*a))
        rc, _, stderr = _analyze_main(["--run", run, "--metric", "all", "--skip", "reinit,knn", "--device", "cpu"])
        assert rc == 0, stderr
        off = ("ieee", "ieee") if hasattr(torch.backends.cuda.matmul, "fp32_precision") else ("highest", False)
        assert seen == [off, off] and _train_tf32() == tf32_on

    def test_train_analyze_chexpert_per_class_auc(self, tmp_path):
        """Issue 19.3: a CheXpert run's summary.json holds the test AUC of each of the 14 classes in
        data.classes order (null where the test split has one label value), the mean over the others
        is its mean_auc; the re-init analysis writes the same per-class baseline."""
        base = tmp_path / "chex"
        _data_chexpert(base, base, n_patients=10)
        out = str(tmp_path / "run")
        args = ["--model", "resnet18", "--init", "ri", "--epochs", "1", "--data", "chexpert", "--data-root", str(base),
                "--img-size", "32", "--batch-size", "4", "--warmup", "2", "--workers", "0", "--device", "cpu",
                "--cache-dir", str(tmp_path / "cache"), "--out", out]
        rc, _, stderr = _train_main(args)
        assert rc == 0, stderr
        s = json.load(open(os.path.join(out, "summary.json")))
        per_class = s["test"]["per_class_auc"]
        assert len(per_class) == 14 and None in per_class
        assert s["test"]["mean_auc"] == pytest.approx(np.mean([v for v in per_class if v is not None]), abs=1e-12)
        assert rundir.read_config(out)["data"]["classes"] == data.CHEXPERT_CLASSES
        val = [json.loads(l)["val"] for l in open(os.path.join(out, "log.jsonl")) if "val" in l]
        assert all(len(v["per_class_auc"]) == 14 for v in val)
        rc, _, stderr = _analyze_main(["--run", out, "--metric", "reinit", "--device", "cpu", "--batch-size", "8"])
        assert rc == 0, stderr
        doc = rundir.read_analysis(out, "reinit")
        assert doc["values"]["per_class_auc"]["baseline"] == pytest.approx(per_class, abs=1e-12)
        assert len(doc["values"]["per_class_auc"]["reverted"]) == len(doc["layers"])
        assert doc["settings"]["classes"] == data.CHEXPERT_CLASSES

    def test_analyze_one_writer_and_run_id(self, analyze_runs, tmp_path, monkeypatch):
        """Issue 23.2 / 23.3: every analysis file records the run's run_id; while train.py holds the
        run, analyze.py refuses with one line naming it and writes nothing; a run replaced between
        analyze.py's checks and its lock is refused (was: old analyses inside a new run)."""
        run = _analyze_copy_run(analyze_runs[1], tmp_path / "run")
        run_id = rundir.read_config(run)["run_id"]
        assert re.fullmatch(r"[0-9a-f]{32}", run_id)
        a = ["--run", run, "--device", "cpu", "--metric", "l2"]
        with rundir.RunLock(run, "train.py"):
            rc, _, stderr = _analyze_main(a)
        assert rc == 2 and len(stderr.strip().splitlines()) == 1 and "train.py pid" in stderr, stderr
        assert not os.path.exists(os.path.join(run, "analysis"))
        assert _analyze_main(a + ["--metric", "convergence"])[0] == 0  # (the last --metric counts)
        assert rundir.read_analysis(run, "convergence")["run_id"] == run_id and rundir.analysis_done(run, "convergence",
                                                                                                      run_id)
        real = rundir.RunLock.acquire

        def acquire(self):  # train.py --overwrite finished the folder anew meanwhile
            doc = rundir.read_json(os.path.join(run, "config.json"))
            rundir.save_json(os.path.join(run, "config.json"), dict(doc, run_id=rundir.new_run_id()))
            return real(self)
        monkeypatch.setattr(rundir.RunLock, "acquire", acquire)
        rc, _, stderr = _analyze_main(a)
        assert rc == 2 and "the run changed while analyze.py was reading it" in stderr, stderr
        assert not os.path.exists(os.path.join(run, "analysis", "l2.json"))
        assert not rundir.analysis_done(run, "convergence", rundir.read_config(run)["run_id"])  # another run's file

    def test_analyze_ref_compares_dataset_identity(self, analyze_runs, tmp_path, capsys):
        """Issue 23.9: --ref trained on other images or classes (another dataset identity) is refused
        with one line, even under the same dataset name; runs from before identities fall back to
        the name with a warning."""
        st, wt = analyze_runs
        run, ref = _analyze_copy_run(wt, tmp_path / "run"), _analyze_copy_run(st, tmp_path / "ref")
        a = ["--run", run, "--ref", ref, "--metric", "cka", "--device", "cpu", "--batch-size", "48"]
        path = os.path.join(ref, "config.json")
        doc = rundir.read_json(path)
        assert doc["data"]["identity"] == rundir.read_config(run)["data"]["identity"]
        rundir.save_json(path, dict(doc, data=dict(doc["data"], identity="0123456789abcdef")))
        rc, _, stderr = _analyze_main(a)
        assert rc == 2 and len(stderr.strip().splitlines()) == 1 and "other images or classes" in stderr, stderr
        old = dict(doc, data={k: v for k, v in doc["data"].items() if k != "identity"})
        rundir.save_json(path, old)
        rc, _, stderr = _analyze_main(a)
        assert rc == 0 and "no dataset identity" in stderr, stderr

    @pytest.mark.parametrize("case", ["log_line", "log_nested", "summary_type", "config_size", "best_foreign",
                                      "best_other_run"])
    def test_analyze_validates_run_files(self, analyze_runs, tmp_path, case):
        """Issue 23.7: a run file analyze.py reads back that train.py does not write (a bad log line,
        a nested log record, a summary field of another type, an img_size of 10**12, a best.pt with a
        foreign key or of another run): one line naming the file, exit 2, nothing written."""
        run = _analyze_copy_run(analyze_runs[1], tmp_path / "run")
        metric, name = "convergence", "log.jsonl"
        if case.startswith("log"):
            with open(os.path.join(run, "log.jsonl"), "a") as f:
                nested = '{"iteration": 3, "val": ' + "[" * 5000 + "]" * 5000 + "}\n"
                f.write("{not json\n" if case == "log_line" else nested)
        elif case == "summary_type":
            doc = rundir.read_json(os.path.join(run, "summary.json"))
            rundir.save_json(os.path.join(run, "summary.json"), dict(doc, best_iteration="x"))
            name = "summary.json"
        elif case == "config_size":
            doc = rundir.read_json(os.path.join(run, "config.json"))
            rundir.save_json(os.path.join(run, "config.json"), dict(doc, config=dict(doc["config"], img_size=10**12)))
            name = "config.json"
        else:
            ck = models.read_checkpoint(os.path.join(run, "best.pt"))
            if case == "best_foreign":
                ck["model"]["blocks.0.extra"] = torch.zeros(1)
            else:
                assert ck["run_id"] == rundir.read_config(run)["run_id"]
                ck["run_id"] = rundir.new_run_id()
            torch.save(ck, os.path.join(run, "best.pt"))
            metric, name = "l2", "best.pt"
        rc, _, stderr = _analyze_main(["--run", run, "--metric", metric, "--device", "cpu"])
        lines = stderr.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and name in lines[0] and "Traceback" not in stderr, stderr
        assert not os.path.exists(os.path.join(run, "analysis"))


# ========================================================================================
# plots.py: the figures and tables
# ========================================================================================


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _plots_write_runs(root):
    """2 models x 3 n values x 2 seeds on 'synthetic' (WT runs with a ref CKA against ST), RI runs,
    DeiT-S-5b WT, a second dataset with WT runs only, a run missing analyses and an unfinished run."""
    for model in ("resnet18", "deit_s"):
        N = _PLOTS_N[model]
        for seed in (0, 1):
            for n in (0, N // 2, N):
                ref = (0, "st") if n == N else None
                _plots_write_run(root, model, "synthetic", n, seed, ref=ref)
            _plots_write_run(root, model, "shapes", N, seed)
        _plots_write_run(root, model, "synthetic", None, 0)
    for seed in (0, 1):
        _plots_write_run(root, "deit_s_5b", "synthetic", 7, seed)
        _plots_write_run(root, "deit_s_5b", "shapes", 7, seed)
    partial = _plots_write_run(os.path.join(root, "nested", "deeper"), "resnet18", "synthetic", 1, 0,
                               analyses=["l2"])
    unfinished = _plots_write_run(root, "resnet18", "synthetic", 2, 0, summary=False)
    return partial, unfinished


def _plots_is_png(path):
    with open(path, "rb") as f:
        head = f.read(8)
    return head == PNG_MAGIC and os.path.getsize(path) > 1000


def _plots_expected(models, datasets, deit, with_ref=True):
    names = []
    for d in datasets:
        names += [f"sweep_{d}", f"knn_max_{d}", f"convergence_{d}"]
        for m in models:
            names += [f"cka_init_{m}_{d}", f"knn_{m}_{d}", f"reinit_{m}_{d}", f"l2_{m}_{d}"]
            if with_ref:
                names.append(f"cka_ref_{m}_{d}")
        for m in deit:
            names += [f"cka_types_{m}_{d}", f"attention_{m}_{d}"]
    return names


def _plots_main(argv, capsys):
    import plots
    rc = plots.main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def _plots_log(run, seed, n):
    """A log.jsonl as train.py writes it: training loss + lr every 2 iterations, validation every 4."""
    with open(os.path.join(run, "log.jsonl"), "w") as f:
        for it in range(2, 21, 2):
            f.write(json.dumps({"iteration": it, "train_loss": 2.0 / it + 0.01 * seed,
                                "lr": 1e-4 * min(1, it / 8)}) + "\n")
            if it % 4 == 0:
                f.write(json.dumps({"iteration": it, "epoch": it / 8, "val": {"roc_auc": 0.5 + 0.02 * it + 0.01 * n,
                                                                             "loss": 1.0}, "best": True}) + "\n")


@pytest.fixture(scope="module")
def plots_done(tmp_path_factory):
    """Runs (resnet18 n=0 and n=6, 2 seeds, with log.jsonl) and the figures plots.py made of them."""
    import contextlib
    import io

    import plots
    base = tmp_path_factory.mktemp("plots_done")
    runs, out = base / "runs", base / "figs"
    for n in (0, 6):
        for seed in (0, 1):
            _plots_log(_plots_write_run(str(runs), "resnet18", "synthetic", n, seed), seed, n)
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        assert plots.main(["--runs", str(runs), "--out", str(out), "--format", "png"]) == 0
    return {"runs": str(runs), "out": str(out), "stdout": stdout.getvalue()}


_PLOTS_BAD = [  # (case, file under the first run to replace and its content, text the error line must hold)
    ("analysis_not_json", "analysis/knn.json", "{not json", "knn.json"),
    ("l2_values_dict", "analysis/l2.json", {"values": {"wrong": "shape"}}, "l2.json"),
    ("cka_init_number", "analysis/cka.json", {"values": {"init": 5}}, "cka.json"),
    ("knn_layers_numbers", "analysis/knn.json", {"values": {"all": [1]}, "layers": [1, 2]}, "knn.json"),
    ("cka_ref_n_text", "analysis/cka.json", {"values": {"init": {}}, "settings": {"ref_n": "x"}}, "cka.json"),
    ("summary_list", "summary.json", [], "summary.json"),
    ("summary_test_list", "summary.json", {"test": []}, "summary.json"),
    ("summary_not_json", "summary.json", "[1,", "summary.json"),
    # issue 23.7: every file read back is checked before the first figure
    ("config_n_huge", "config.json", lambda d: dict(d, config=dict(d["config"], n=10**400)), "config.json"),
    ("config_img_size_huge", "config.json", lambda d: dict(d, config=dict(d["config"], img_size=10**12)),
     "config.json"),
    ("summary_best_iteration_text", "summary.json", lambda d: dict(d, best_iteration="x"), "summary.json"),
    ("l2_nan", "analysis/l2.json", lambda d: json.dumps(dict(d, values=[None] * len(d["layers"])))
     .replace("null", "NaN"), "l2.json"),
    ("cka_infinity", "analysis/cka.json", lambda d: json.dumps(d).replace("null", "Infinity", 1), "cka.json"),
    ("knn_deep_nesting", "analysis/knn.json", "[" * 100_000 + "]" * 100_000, "knn.json"),
    ("l2_three_million", "analysis/l2.json", lambda d: dict(d, values=[1e-6] * 3_000_000), "l2.json"),
    ("out_file", None, None, "is a file"),
    ("out_under_file", None, None, "is a file, not a folder"),
    ("out_unwritable", None, None, "not writable"),
    ("out_uncreatable", None, None, "--out /proc/"),
]


def matplotlib_colors_to_rgba(c):
    import matplotlib.colors
    return matplotlib.colors.to_rgba(c)


class TestPlots:
    """plots.py: the figures and tables."""

    # ---- figures from hand-written and tiny runs
    @pytest.mark.slow
    def test_plots_handwritten_runs(self, tmp_path):
        runs, out = tmp_path / "runs", tmp_path / "figs"
        partial, unfinished = _plots_write_runs(str(runs))
        res = _plots_run_cli("plots.py", "--runs", str(runs), "--out", str(out), "--format", "png")
        assert res.returncode == 0, res.stderr
        files = set(os.listdir(out))
        expected = _plots_expected(["resnet18", "deit_s"], ["synthetic"], ["deit_s"])
        expected += _plots_expected(["resnet18", "deit_s", "deit_s_5b"], ["shapes"], ["deit_s", "deit_s_5b"],
                                    with_ref=False)
        expected += [f"{k}_deit_s_5b_synthetic" for k in ("cka_init", "knn", "reinit", "l2", "attention", "cka_types")]
        for name in expected:
            assert name + ".png" in files, f"{name}.png not written; have {sorted(files)}"
            assert _plots_is_png(os.path.join(out, name + ".png")), name
        assert len(files) == len(set(expected)) + 4, sorted(files)  # + table.md/.csv, findings.md/.json
        # no ref CKA on 'shapes' -> no cka_ref there; no temp files left behind
        assert "cka_ref_resnet18_shapes.png" not in files
        assert not [f for f in files if ".tmp" in f]
        # every written file is listed, with the output folder
        assert str(out.resolve()) in res.stdout
        for f in files:
            assert f in res.stdout
        # missing analyses are listed per analysis with the runs (a few) or their count; the
        # unfinished run is skipped with a note
        lines = res.stdout.splitlines()
        for a in ("cka", "knn", "reinit", "convergence"):
            assert any(l.startswith(f"  {a}: 1 run(s): ") and partial in l for l in lines), a
        assert not any(l.startswith("  attention:") and partial in l for l in lines)  # not expected for a ResNet
        assert any(unfinished in l and "summary.json" in l for l in res.stdout.splitlines())

        # Table 4: rows model + init, columns datasets, mean +- std over seeds
        table = (out / "table.md").read_text()
        assert "| DeiT-S | WT n=14/14 |" in table and "| DeiT-S-5b | WT n=7/7 |" in table
        assert "| ResNet18 | RI |" in table and "| ResNet18 | ST n=0/6 |" in table
        assert "±" in table and "(2)" in table
        with open(out / "table.csv") as f:
            rows = list(csv.DictReader(f))
        got = {(r["model"], r["init"]) for r in rows}
        assert {("deit_s", "WT n=14/14"), ("deit_s_5b", "WT n=7/7"), ("resnet18", "WT-ST n=3/6"),
                ("resnet18", "WT-ST n=1/6"), ("deit_s", "RI")} <= got
        assert ("resnet18", "WT-ST n=2/6") not in got  # the unfinished run
        row = next(r for r in rows if r["model"] == "deit_s_5b")
        assert row["synthetic_runs"] == "2" and row["shapes_runs"] == "2" and 0 < float(row["synthetic_mean"]) < 1
        # the means are the means over seeds of summary.json's test metric
        vals = []
        for seed in (0, 1):
            with open(runs / f"deit_s_5b-shapes-n7-s{seed}" / "summary.json") as f:
                vals.append(json.load(f)["test"]["macro_recall"])
        assert float(row["shapes_mean"]) == pytest.approx(np.mean(vals), rel=1e-5)
        assert float(row["shapes_std"]) == pytest.approx(np.std(vals, ddof=1), rel=1e-4)

    def test_plots_model_facts_from_json(self):
        """plots.py takes model facts from the analysis files (never from the model's name); files
        without "facts" (older analyze.py) are read by their content."""
        facts = {"feature_types": ["cls", "patches", "all"], "has_attention": True}
        import findings
        assert findings.run_facts({"l2": {"values": [], "facts": facts}}) == facts
        old = {"cka": {"values": {"init": {"cls": [], "patches": [], "all": []}}}, "attention": {"values": {}}}
        assert findings.run_facts(old) == {"feature_types": ["all", "cls", "patches"], "has_attention": True}
        assert findings.run_facts({"l2": {"values": []}}) == {"feature_types": ["all"], "has_attention": False}

    def test_plots_formats_and_empty_figures(self, tmp_path):
        """Default formats png + pdf; runs with no analyses give only sweep/convergence (from summary.json)
        and the table: figures without data are not written."""
        runs, out = tmp_path / "runs", tmp_path / "figs"
        _plots_write_run(str(runs), "resnet18", "synthetic", 6, 0, analyses=[])
        _plots_write_run(str(runs), "resnet18", "synthetic", 0, 0, analyses=[])
        res = _plots_run_cli("plots.py", "--runs", str(runs), "--out", str(out), "--spread", "std")
        assert res.returncode == 0, res.stderr
        assert sorted(os.listdir(out)) == ["convergence_synthetic.pdf", "convergence_synthetic.png", "findings.json",
                                           "findings.md", "sweep_synthetic.pdf", "sweep_synthetic.png", "table.csv",
                                           "table.md"]
        assert _plots_is_png(out / "sweep_synthetic.png")
        with open(out / "sweep_synthetic.pdf", "rb") as f:
            assert f.read(5) == b"%PDF-"
        lines = res.stdout.splitlines()  # missing analyses: one line per analysis, here with both runs
        for a in ("cka", "knn", "reinit", "l2", "convergence"):
            assert any(l.startswith(f"  {a}: 2 run(s): ") for l in lines), a

    def test_plots_mixed_settings_note(self, tmp_path):
        """Seeds averaged together that differ in their settings get a note."""
        runs, out = tmp_path / "runs", tmp_path / "figs"
        _plots_write_run(str(runs), "resnet18", "synthetic", 6, 0)
        b = _plots_write_run(str(runs), "resnet18", "synthetic", 6, 1)
        cfg_path = os.path.join(b, "config.json")
        with open(cfg_path) as f:
            doc = json.load(f)
        doc["config"]["img_size"] = 32
        _plots_dump(cfg_path, doc)
        res = _plots_run_cli("plots.py", "--runs", str(runs), "--out", str(out), "--format", "png")
        assert res.returncode == 0, res.stderr
        assert any("differ in img_size" in l for l in res.stdout.splitlines()), res.stdout

    @pytest.mark.parametrize("case, name, content, message", _PLOTS_BAD, ids=[c[0] for c in _PLOTS_BAD])
    def test_plots_bad_input_one_line_exit_2(self, plots_done, tmp_path, monkeypatch, capsys, case, name, content,
                                             message):
        """Malformed run files and unusable --out: one line naming the file or flag, exit 2, no
        traceback, and the output folder (figures of an earlier call) is unchanged."""
        runs, out = tmp_path / "runs", tmp_path / "figs"
        shutil.copytree(plots_done["runs"], runs)
        shutil.copytree(plots_done["out"], out)
        first = sorted(os.listdir(runs))[0]
        if name:
            path = runs / first / name
            if callable(content):  # a change of the file as written
                content = content(json.loads(path.read_text()))
            path.write_text(content if isinstance(content, str) else json.dumps(content))
        target = out
        if case == "out_file":
            target = out / "table.md"
        elif case == "out_under_file":
            target = out / "table.md" / "figs"
        elif case == "out_uncreatable":
            target = "/proc/wtst_figs"
        elif case == "out_unwritable":  # (root ignores permission bits: the check itself is exercised)
            real = os.access
            monkeypatch.setattr(os, "access", lambda p, m: False if os.path.abspath(p) == str(out) else real(p, m))
        before = _train_tree(out)
        rc, stdout, stderr = _plots_main(["--runs", str(runs), "--out", str(target), "--format", "png"], capsys)
        lines = stderr.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("plots.py: error:"), stderr
        assert message in lines[0] and (not name or first in lines[0]), lines[0]
        assert _train_tree(out) == before

    @pytest.mark.parametrize("garbage", ["x", "NaN", "Infinity"])
    def test_plots_garbage_values_refused_before_any_figure(self, plots_done, tmp_path, capsys, garbage):
        """Values that are not finite numbers (text, NaN, Infinity tokens): one line naming the file,
        exit 2, and no figure written (every file is checked before the first figure)."""
        runs, out = tmp_path / "runs", tmp_path / "figs"
        shutil.copytree(plots_done["runs"], runs)
        for run in os.listdir(runs):
            path = runs / run / "analysis" / "l2.json"
            doc = json.loads(path.read_text())
            doc["values"] = ["GARBAGE"] * len(doc["values"])
            path.write_text(json.dumps(doc).replace('"GARBAGE"', json.dumps(garbage) if garbage == "x" else garbage))
        rc, stdout, stderr = _plots_main(["--runs", str(runs), "--out", str(out), "--format", "png"], capsys)
        lines = stderr.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and "l2.json" in lines[0], stderr
        assert not out.exists() or not os.listdir(out)
        assert "not drawn" not in plots_done["stdout"]  # the intact runs draw everything

    def test_plots_training_curves(self, plots_done, monkeypatch):
        """Issue 13.10: per model and dataset, training loss / validation metric / lr vs iteration,
        one line per run, one colour per WT fraction."""
        import plots
        assert _plots_is_png(os.path.join(plots_done["out"], "curves_resnet18_synthetic.png"))
        runs, notes = plots.find_runs(plots_done["runs"])
        figs = []
        monkeypatch.setattr(plots, "save", lambda fig, out, name, formats, written: figs.append((name, fig)))
        args = __import__("types").SimpleNamespace(out=None, formats=["png"], spread="minmax")
        plots.plot_curves(runs, "resnet18", "synthetic", args, [])
        (name, fig), = figs
        loss, val, lr = fig.axes[:3]
        assert name == "curves_resnet18_synthetic" and [len(ax.get_lines()) for ax in (loss, val, lr)] == [4, 4, 4]
        colours = {tuple(np.round(matplotlib_colors_to_rgba(l.get_color()), 3)) for l in loss.get_lines()}
        assert len(colours) == 2  # n = 0 and n = 6
        x, y = val.get_lines()[0].get_data()
        assert list(x) == [4, 8, 12, 16, 20] and y[0] == pytest.approx(0.58 + 0.0 * 0.01, abs=0.011)
        assert lr.get_yscale() == "log" and max(lr.get_lines()[0].get_ydata()) == pytest.approx(1e-4)

    def test_plots_stale_temp_files_removed(self, plots_done, tmp_path, capsys):
        out = tmp_path / "figs"
        shutil.copytree(plots_done["out"], out)
        dead, live = _train_dead_pid(), os.getpid()
        (out / f".sweep_synthetic.png.tmp{dead}").write_bytes(b"x")
        (out / f".elsewhere.png.tmp{live}").write_bytes(b"x")
        rc, stdout, stderr = _plots_main(["--runs", plots_done["runs"], "--out", str(out), "--format", "png"], capsys)
        assert rc == 0, stderr
        names = os.listdir(out)
        assert f".sweep_synthetic.png.tmp{dead}" not in names and f".elsewhere.png.tmp{live}" in names

    def test_plots_bad_input(self, tmp_path):
        for argv in (["--runs", str(tmp_path / "nope")], ["--runs", str(tmp_path)],
                     ["--runs", str(tmp_path), "--format", "gif"]):
            res = _plots_run_cli("plots.py", *argv, "--out", str(tmp_path / "figs"))
            assert res.returncode == 2, (argv, res.stdout, res.stderr)
            lines = res.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("plots.py: error:") and "--" in lines[0], res.stderr
        # a folder of unfinished runs only is also "no runs"
        _plots_write_run(str(tmp_path / "r"), "resnet18", "synthetic", 0, 0, summary=False)
        res = _plots_run_cli("plots.py", "--runs", str(tmp_path / "r"), "--out", str(tmp_path / "figs"))
        assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1

    def test_plots_no_torch_import(self):
        code = ("import sys, plots; assert 'torch' not in sys.modules; import matplotlib; "
                "print(matplotlib.get_backend())")
        res = _plots_run_cli("-c", code)
        assert res.returncode == 0, res.stderr
        assert res.stdout.strip().lower() == "agg"
        res = _plots_run_cli("plots.py", "--help")
        assert res.returncode == 0 and "--runs" in res.stdout and "--format" in res.stdout

    @pytest.mark.slow
    def test_plots_end_to_end_tiny_runs(self, tmp_path):
        """Real tiny runs: train.py (ST, WT-ST, WT from a local checkpoint) and analyze.py --metric all
        (WT also with --ref the ST run), called in-process through their main(), then plots.py."""
        import torch

        import analyze
        import models
        import train
        runs, out = tmp_path / "runs", tmp_path / "figs"
        common = ["--data", "synthetic", "--subset", "32", "--img-size", "32", "--epochs", "1", "--batch-size", "16",
                  "--warmup", "5", "--runs-dir", str(runs), "--device", "cpu"]
        for model in ("resnet18", "deit_t"):
            torch.manual_seed(0)  # stands in for the ImageNet checkpoint (no downloads in tests)
            weights = str(tmp_path / f"{model}-pretrained.pt")
            torch.save({"model": models.create_model(model, num_classes=1000, img_size=32).state_dict()}, weights)
            inits = [["--init", "st"], ["--init", "wt"]] + ([["--n", "3"]] if model == "resnet18" else [])
            for init_args in inits:
                assert train.main(["--model", model, *init_args, "--weights", weights, *common]) == 0
        N = {"resnet18": 6, "deit_t": 14}
        a = ["--batch-size", "16", "--k", "10", "--device", "cpu"]
        for model in N:
            st, wt = str(runs / f"{model}-synthetic-n0-s0"), str(runs / f"{model}-synthetic-n{N[model]}-s0")
            assert analyze.main(["--run", st, "--metric", "all", *a]) == 0
            assert analyze.main(["--run", wt, "--ref", st, "--metric", "all", *a]) == 0
        partial = str(runs / "resnet18-synthetic-n3-s0")
        assert analyze.main(["--run", partial, "--metric", "l2", *a]) == 0  # the others stay missing

        res = _plots_run_cli("plots.py", "--runs", str(runs), "--out", str(out), "--format", "png")
        assert res.returncode == 0, res.stderr
        files = set(os.listdir(out))
        for name in _plots_expected(["resnet18", "deit_t"], ["synthetic"], ["deit_t"]):
            assert name + ".png" in files, f"{name}.png not written; have {sorted(files)}"
            assert _plots_is_png(os.path.join(out, name + ".png")), name
        lines = res.stdout.splitlines()  # missing analyses: one line per analysis, naming the runs
        assert any(l.startswith("  cka: ") and partial in l for l in lines)
        assert any(l.startswith("  knn: ") and partial in l for l in lines)
        assert not any(l.startswith("  l2: ") and partial in l for l in lines)
        table = (out / "table.md").read_text()
        assert "| ResNet18 | WT n=6/6 |" in table and "| ResNet18 | WT-ST n=3/6 |" in table
        assert "| DeiT-T | ST n=0/14 |" in table


# ========================================================================================
# findings.py: the paper's findings tested over seeds
# ========================================================================================


def _findings_runs(root, models=("resnet18", "deit_s"), seeds=(0, 1, 2)):
    """Made-up run sets on 'lesions' with large effects in the paper's direction: the test metric,
    CKA to init and speed rise with n, ST attention is more global, and the ViT gains more from WT."""
    for model in models:
        N = _PLOTS_N[model]
        for seed in seeds:
            for n in (0, N // 2, N):
                _plots_write_run(root, model, "lesions", n, seed)
        _plots_write_run(root, model, "lesions", None, 0)
    for seed in seeds:  # a larger WT gain for the ViT
        if "deit_s" in models:
            path = os.path.join(root, f"deit_s-lesions-n0-s{seed}", "summary.json")
            _findings_edit(path, lambda s: s["test"].update(macro_recall=s["test"]["macro_recall"] - 0.2))


def _findings_edit(path, change):
    with open(path) as f:
        doc = json.load(f)
    change(doc)
    _plots_dump(path, doc)


def _findings(root, out):
    import findings
    runs, _ = findings.find_runs(str(root))
    text = findings.write_findings(runs, str(out), [])
    with open(out / "findings.json") as f:
        return text, json.load(f)


def _findings_verdicts(doc, data="lesions"):
    return {f: d["verdict"] for f, d in doc[data].items()}


def _findings_no_effect(root, models=(("resnet18", 6), ("deit_s", 14)), seeds=(0, 1, 2)):
    """WT runs get the ST runs' files of the next seed: the same values in another seed order, so
    every WT - ST effect is exactly 0."""
    for model, N in models:
        for i, seed in enumerate(seeds):
            src = root / f"{model}-lesions-n0-s{seeds[(i + 1) % len(seeds)]}"
            dst = root / f"{model}-lesions-n{N}-s{seed}"
            for name in ["summary.json"] + [f"analysis/{x}" for x in os.listdir(src / "analysis")]:
                (dst / name).write_bytes((src / name).read_bytes())


def _findings_swap(root, model, N, seed, other_n=0, other_seed=None):
    """Swap every file of the WT run (n=N, seed) with the run (other_n, other_seed)."""
    other_seed = seed if other_seed is None else other_seed
    a, b = root / f"{model}-lesions-n{N}-s{seed}", root / f"{model}-lesions-n{other_n}-s{other_seed}"
    for name in ["summary.json"] + [f"analysis/{x}" for x in os.listdir(a / "analysis")]:
        x, y = (a / name).read_bytes(), (b / name).read_bytes()
        (a / name).write_bytes(y)
        (b / name).write_bytes(x)


def _findings_null_rates(rng, draw, groups, coefs, studies, seeds=3):
    """Verdict counts of Welch's test over simulated studies where every group has the same law."""
    import findings as fi
    counts = dict.fromkeys(("supported", "not resolved", "contradicted"), 0)
    for _ in range(studies):
        counts[fi.verdict_of(fi.welch([draw(rng, seeds) for _ in range(groups)], coefs))] += 1
    return counts


class TestFindings:
    """findings.py: the paper's findings tested over seeds."""

    def test_findings_large_effect_supported(self, tmp_path):
        """Large effects in the paper's direction: every finding `supported` for every model, with the
        effect, interval and p of Welch's test (checked against scipy), the seeds and the machine."""
        _findings_runs(str(tmp_path / "runs"))
        text, doc = _findings(tmp_path / "runs", tmp_path)
        assert _findings_verdicts(doc) == {f: "supported" for f in ("F1", "F2", "F3", "F4")}
        assert (tmp_path / "findings.md").read_text() == text
        assert "| F1 |" in text and "**supported**" in text and "Welch's t-test" in text
        assert "Warning" not in text  # 3 seeds per initialisation: no small-sample warning
        assert "other digits" in text and "2.x-test" in text  # the machine note and the runs' torch version
        assert "seeds of DeiT-S: ST n=0/14: s0 s1 s2; WT-ST n=7/14: s0 s1 s2; WT n=14/14: s0 s1 s2; RI: s0" in text
        # the numbers come from the runs: per-seed values, and the effect = mean WT - mean ST with Welch's interval
        vals = {}
        for n in (0, 6):
            vals[n] = [json.loads((tmp_path / "runs" / f"resnet18-lesions-n{n}-s{s}" / "summary.json").read_text())
                       ["test"]["macro_recall"] for s in (0, 1, 2)]
        assert f"s1 {vals[6][1]:.3f}" in text
        m = doc["lesions"]["F1"]["models"]["resnet18"]
        assert m["effect"] == pytest.approx(np.mean(vals[6]) - np.mean(vals[0]), abs=1e-12)
        assert m["seeds"] == {"WT": [0, 1, 2], "ST": [0, 1, 2]} and m["verdict"] == "supported"
        assert m["ci"][0] > 0 and 0 <= m["p"] < 0.05
        stats = pytest.importorskip("scipy.stats")
        ref = stats.ttest_ind(vals[6], vals[0], equal_var=False)
        assert m["p"] == pytest.approx(ref.pvalue, rel=1e-8)
        assert m["ci"] == pytest.approx(list(ref.confidence_interval(0.95)), rel=1e-8)
        # F1's sub-results carry their own numbers and are not gates; F3 states its window
        sub = m["sub"]
        assert set(sub) == {"WT-ST n=3/6", "RI"} and "minus_st" in sub["WT-ST n=3/6"]
        assert "1 seed" in sub["RI"]["wt_minus"]["text"]  # RI on one seed: no interval
        assert doc["lesions"]["F3"]["window"]["deit_s"] == "layers 1-9 of 25 (patch_embed.proj .. blocks.3.mlp)"
        assert "Fig. 9" in text and "Fig. 12" in text and "Fig. 9-10" not in text
        f4 = doc["lesions"]["F4"]
        assert f4["halves"] == {"attention": "supported", "gain": "supported"}
        assert set(f4["models"]) == {"deit_s"} and set(f4["gain"]) == {"deit_s - resnet18"}
        assert f4["windows"]["deit_s"] == "blocks 1-4 of 12 (blocks.0.attn .. blocks.3.attn)"

    def test_findings_against_paper_contradicted(self, tmp_path):
        """WT and ST swap their results (summary and analyses): every finding is `contradicted`;
        with one model only F4 is `not measured`."""
        root = tmp_path / "runs"
        _findings_runs(str(root))
        for model, N in (("resnet18", 6), ("deit_s", 14)):
            for seed in (0, 1, 2):
                _findings_swap(root, model, N, seed)
        text, doc = _findings(root, tmp_path)
        assert _findings_verdicts(doc) == {f: "contradicted" for f in ("F1", "F2", "F3", "F4")}
        assert all(m["ci"][1] < 0 for m in doc["lesions"]["F1"]["models"].values())

        root2 = tmp_path / "runs2"
        _findings_runs(str(root2), models=("resnet18",))
        _, doc = _findings(root2, tmp_path)
        assert _findings_verdicts(doc) == {"F1": "supported", "F2": "supported", "F3": "supported",
                                           "F4": "not measured"}

    def test_findings_no_effect_not_resolved(self, tmp_path):
        """WT runs get the ST runs' results of another seed: every effect is exactly 0, so every finding
        is `not resolved`, with 'no effect seen' instead of a number of seeds."""
        root = tmp_path / "runs"
        _findings_runs(str(root))
        _findings_no_effect(root)
        text, doc = _findings(root, tmp_path)
        assert _findings_verdicts(doc) == {f: "not resolved" for f in ("F1", "F2", "F3", "F4")}
        m = doc["lesions"]["F3"]["models"]["deit_s"]
        assert m["effect"] == pytest.approx(0, abs=1e-12) and m["p"] == pytest.approx(1) and m["seeds_needed"] is None
        assert "no effect seen" in text

    def test_findings_not_resolved_says_seeds_needed(self, tmp_path):
        """A real but noisy effect (one WT seed below the ST seeds): `not resolved`, with the number of
        seeds per initialisation that would resolve it (more than the 3 here, at most 100)."""
        root = tmp_path / "runs"
        _findings_runs(str(root), models=("resnet18",))
        st = [json.loads((root / f"resnet18-lesions-n0-s{s}" / "summary.json").read_text())["test"]["macro_recall"]
              for s in (0, 1, 2)]
        _findings_edit(str(root / "resnet18-lesions-n6-s2" / "summary.json"),
                       lambda s: s["test"].update(macro_recall=min(st) - 0.15))
        text, doc = _findings(root, tmp_path)
        m = doc["lesions"]["F1"]["models"]["resnet18"]
        assert m["verdict"] == "not resolved" and m["effect"] > 0 and m["ci"][0] < 0 < m["ci"][1]
        assert 3 < m["seeds_needed"] <= 100
        assert f"about {m['seeds_needed']} seeds per initialisation would resolve" in text

    def test_findings_runs_that_did_not_learn_leave_f2_f3_not_measured(self, tmp_path):
        """ST runs at chance (test ROC AUC ~0.5) learned nothing: their best iteration is a noise
        peak, their features had no reason to move and their attention is their init's, so F2, F3
        and F4's attention half say 'not measured' and why; ST runs clearly above chance keep the
        tested verdicts. F1 is tested either way."""
        root = tmp_path / "runs"
        for model, N in (("resnet18", 6), ("deit_s", 14)):
            for seed in (0, 1, 2):
                for n in (0, N // 2, N):
                    _plots_write_run(str(root), model, "synthetic", n, seed)  # ROC AUC
                for n, auc in ((0, 0.95), (N, 0.99)):
                    run = root / f"{model}-synthetic-n{n}-s{seed}"
                    _findings_edit(str(run / "config.json"), lambda d: d.update(sizes=[64, 32, 200]))
                    _findings_edit(str(run / "summary.json"),
                                   lambda s, a=auc + 0.01 * seed: s["test"].update(roc_auc=a))
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        _, doc = _findings(root, tmp_path / "a")
        v = _findings_verdicts(doc, "synthetic")
        assert v["F2"] != "not measured" and v["F3"] != "not measured", v
        assert doc["synthetic"]["F4"]["halves"]["attention"] != "not measured"
        for model in ("resnet18", "deit_s"):
            for seed in (0, 1, 2):
                _findings_edit(str(root / f"{model}-synthetic-n0-s{seed}" / "summary.json"),
                               lambda s, a=(0.49, 0.52, 0.50)[seed]: s["test"].update(roc_auc=a))
        text, doc = _findings(root, tmp_path / "b")
        v = _findings_verdicts(doc, "synthetic")
        assert v["F2"] == "not measured" and v["F3"] == "not measured", v
        assert doc["synthetic"]["F4"]["halves"]["attention"] == "not measured"  # ST attention: still its init's
        assert v["F1"] == "supported"
        assert "the ST runs did not learn the task" in text and "z-test" in text

    def test_findings_chance_level_of_roc_auc_matches_a_simulation(self):
        """learned() uses the Mann-Whitney null variance (n+1)/(3n^2) of a test ROC AUC (n images
        in two equal classes); a simulation of random scores gives the same spread."""
        from sklearn.metrics import roc_auc_score

        import findings
        rng = np.random.default_rng(0)
        y = np.repeat([0, 1], 100)
        aucs = [roc_auc_score(y, rng.random(200)) for _ in range(3000)]
        assert abs(np.var(aucs) / (201 / (3 * 200 ** 2)) - 1) < 0.1
        run = lambda s, a: {"seed": s, "metric": "roc_auc", "sizes": [10, 10, 200],  # noqa: E731
                            "summary": {"test": {"roc_auc": a}}}
        assert findings.learned([run(0, 0.56), run(1, 0.55), run(2, 0.54)])[0] is True   # z = 2.1
        assert findings.learned([run(0, 0.52), run(1, 0.50), run(2, 0.51)])[0] is False  # z = 0.42
        assert findings.learned([dict(run(0, 0.9), metric="macro_recall")])[0] is None   # chance unknown

    def test_findings_censored_convergence(self, tmp_path):
        """F2 with runs stopped by their budget (best iteration = a lower bound): censored WT runs give
        `not measured`, naming them; censored ST runs leave a `supported` verdict standing (the true
        effect is only larger) but turn a `not resolved` one into `not measured`."""
        budget = lambda s: s.update(stop_reason="reached --epochs 5", best_iteration=s["iterations"])
        root = tmp_path / "runs"
        _findings_runs(str(root))
        for seed in (0, 1):
            _findings_edit(str(root / f"resnet18-lesions-n6-s{seed}" / "summary.json"),
                           lambda s: s.update(stop_reason="reached --epochs 5"))
        text, doc = _findings(root, tmp_path)
        assert doc["lesions"]["F2"]["models"]["resnet18"]["verdict"] == "not measured"
        assert "WT s0: best at iteration 150 of 500" in text and "WT s1" in text and "WT s2:" not in text
        assert doc["lesions"]["F2"]["censored"]["resnet18"][0].startswith("WT s0")
        # supported for every model measured (DeiT-S), and the table says which model is left out
        assert doc["lesions"]["F2"]["verdict"] == "supported" and "**supported** (not measured: ResNet18)" in text

        root = tmp_path / "runs_st"
        _findings_runs(str(root), models=("resnet18",))
        for seed in (0, 1, 2):
            _findings_edit(str(root / f"resnet18-lesions-n0-s{seed}" / "summary.json"), budget)
        text, doc = _findings(root, tmp_path)
        assert doc["lesions"]["F2"]["verdict"] == "supported" and "conservative" in text
        assert "best at its last validation: still improving" in text

        root = tmp_path / "runs_st_none"  # ST censored and WT no faster: no verdict either way
        _findings_runs(str(root), models=("resnet18",))
        for seed in (0, 1, 2):
            _findings_edit(str(root / f"resnet18-lesions-n0-s{seed}" / "summary.json"), budget)
            _findings_edit(str(root / f"resnet18-lesions-n6-s{seed}" / "summary.json"),
                           lambda s, seed=seed: s.update(best_iteration=500 - 10 * seed))
        _, doc = _findings(root, tmp_path)
        assert doc["lesions"]["F2"]["verdict"] == "not measured"

    def test_findings_group_by_token_mixing_fact(self, tmp_path):
        """F4 groups models by config.json's facts.token_mixing (models.py), never by name: swapping
        the facts swaps the groups; runs without the fact cannot be grouped (`not measured`). A model
        with windowed attention only (Swin) has no attention half, said so, but is in the gain half."""
        root = tmp_path / "runs"
        _findings_runs(str(root))
        for run in os.listdir(root):
            path = str(root / run / "config.json")
            swap = {"attention": "convolution", "convolution": "attention"}
            _findings_edit(path, lambda d, swap=swap: d["facts"].update(token_mixing=swap[d["facts"]["token_mixing"]]))
        _, doc = _findings(root, tmp_path)
        f4 = doc["lesions"]["F4"]
        assert set(f4["gain"]) == {"resnet18 - deit_s"} and f4["token_mixing"]["resnet18"] == ["attention"]
        assert f4["models"]["resnet18"]["verdict"] == "not measured"  # no attention analysis for it
        for run in os.listdir(root):
            _findings_edit(str(root / run / "config.json"), lambda d: d.pop("facts"))
            for a in os.listdir(root / run / "analysis"):
                _findings_edit(str(root / run / "analysis" / a), lambda d: d["facts"].pop("token_mixing", None))
        text, doc = _findings(root, tmp_path)
        assert doc["lesions"]["F4"]["verdict"] == "not measured" and "no facts.token_mixing" in text

        root = tmp_path / "swin"
        _findings_runs(str(root), models=("swin_t", "resnet18"))
        text, doc = _findings(root, tmp_path)
        f4 = doc["lesions"]["F4"]
        assert f4["models"]["swin_t"]["verdict"] == "not measured" and "as Swin" in text
        assert set(f4["gain"]) == {"swin_t - resnet18"} and f4["verdict"] == "not measured"

    def test_findings_one_seed_and_exact_ties(self):
        """Welch's test on degenerate groups: one seed -> no interval, `not resolved` (no division by a
        missing spread); no spread in any group -> the effect is exact (p 0, or 1 when it is 0)."""
        import findings as fi
        t = fi.welch([[0.7], [0.5, 0.6]])
        assert t["ci"] is None and t["p"] is None and "1 seed" in t["why"] and fi.verdict_of(t) == "not resolved"
        t = fi.welch([[40.0, 40.0, 40.0], [80.0, 80.0, 80.0]])
        assert t["exact"] and t["ci"] == [-40.0, -40.0] and t["p"] == 0 and fi.verdict_of(t) == "contradicted"
        t = fi.welch([[80.0, 80.0], [80.0, 80.0, 80.0]])
        assert t["exact"] and t["p"] == 1 and fi.verdict_of(t) == "not resolved"
        t = fi.welch([[1.0, 1.0, 1.0], [0.0, 0.5, 1.0]])  # one group without spread: df = n - 1 of the other
        assert t["df"] == pytest.approx(2) and not t["exact"]
        assert fi.combine([{"verdict": "supported"}, {"verdict": "not measured"}]) == "supported"
        assert fi.combine([{"verdict": "supported"}, {"verdict": "not resolved"}]) == "not resolved"
        assert fi.combine([{"verdict": "supported"}, {"verdict": "contradicted"}]) == "contradicted"
        assert fi.combine([{"verdict": "not measured"}]) == "not measured"

    def test_findings_one_seed_runs_warn(self, tmp_path):
        _findings_runs(str(tmp_path / "runs"), seeds=(0,))
        text, doc = _findings(tmp_path / "runs", tmp_path)
        assert "Warning: only 1 seed(s) per initialisation" in text
        assert set(_findings_verdicts(doc).values()) == {"not resolved"}

    def test_findings_student_t_against_reference(self):
        """The t distribution computed in findings.py (no scipy at run time) against scipy.stats, or
        against tabulated quantiles when scipy is absent; Welch's test against scipy's."""
        import findings as fi
        table = {1: 12.706204736, 2: 4.302652730, 3: 3.182446305, 4: 2.776445105, 10: 2.228138852, 30: 2.042272456}
        for df, q in table.items():
            assert fi.t_ppf(0.975, df) == pytest.approx(q, rel=1e-9)
            assert fi.t_two_sided(q, df) == pytest.approx(0.05, rel=1e-8)
        try:
            from scipy import stats
        except ImportError:
            return
        for df in (0.7, 1, 1.5, 2, 2.9, 4, 7.3, 20, 150, 5000):
            for t in (0, 0.05, 0.7, 1.5, 2.2, 3.5, 8, 40):
                assert fi.t_cdf(t, df) == pytest.approx(stats.t.cdf(t, df), rel=1e-9, abs=1e-15)
                assert fi.t_cdf(-t, df) == pytest.approx(stats.t.cdf(-t, df), rel=1e-9, abs=1e-15)
            for q in (0.01, 0.2, 0.5, 0.8, 0.9, 0.975, 0.999):
                assert fi.t_ppf(q, df) == pytest.approx(stats.t.ppf(q, df), rel=1e-9, abs=1e-12)
        rng = np.random.default_rng(0)
        for _ in range(20):
            a, b = rng.normal(0.5, 0.1, rng.integers(2, 6)), rng.normal(0.55, 0.3, rng.integers(2, 6))
            t, ref = fi.welch([a, b]), stats.ttest_ind(a, b, equal_var=False)
            assert t["p"] == pytest.approx(ref.pvalue, rel=1e-8)
            assert t["ci"] == pytest.approx(list(ref.confidence_interval(0.95)), rel=1e-8)

    def test_findings_calibration_no_effect(self):
        """Simulated 3- and 5-seed studies (5: the offline study's default) with no effect (same law
        for WT and ST): `supported` in at most 7% (Welch's two-sided 5% test: about 2.5% expected),
        for normal and skewed (lognormal) noise, for two groups (F1-F3, F4's attention half) and four
        (F4's gain half); and a large effect (4 sd) is `supported` in most studies (not blind)."""
        studies = 1000
        rng = np.random.default_rng(2024)
        laws = {"normal": lambda r, n: r.normal(0.7, 0.05, n), "lognormal": lambda r, n: r.lognormal(0.0, 1.0, n)}
        for seeds in (3, 5):
            for name, draw in laws.items():
                for groups, coefs in ((2, (1, -1)), (4, (1, -1, -1, 1))):
                    counts = _findings_null_rates(rng, draw, groups, coefs, studies, seeds)
                    print(f"no effect, {name} noise, {groups} groups of {seeds} seeds, {studies} studies: {counts}")
                    assert counts["supported"] <= 0.07 * studies, counts
                    assert counts["contradicted"] <= 0.07 * studies, counts
        shifted = lambda r, n: r.normal(0.0, 1.0, n)
        import findings as fi
        hits = sum(fi.verdict_of(fi.welch([shifted(rng, 3) + 4, shifted(rng,
                                                                        3)])) == "supported" for _ in range(studies))
        print(f"effect of 4 sd, normal noise, 3 seeds: supported in {hits} of {studies}")
        assert hits > 0.5 * studies

    def test_findings_holm_matches_closed_testing(self):
        """holm() equals its definition as a closed test of Bonferroni tests: the adjusted p of H_i is
        the largest |S| * min(p_j, j in S) over the sets S of hypotheses that hold i, at most 1 (random
        p-values for 2-6 tests, ties, one test)."""
        import itertools

        import findings as fi
        rng = np.random.default_rng(7)
        cases = [{"a": 0.03}, {"a": 0.01, "b": 0.01, "c": 0.04}, {"a": 0.5, "b": 0.6}] + \
            [dict(zip("abcdef", rng.random(m) ** 3)) for m in (2, 3, 4, 5, 6) for _ in range(20)]
        for ps in cases:
            keys = list(ps)
            ref = {k: min(1.0, max(len(S) * min(ps[j] for j in S) for r in range(1, len(keys) + 1)
                                   for S in itertools.combinations(keys, r) if k in S)) for k in keys}
            assert fi.holm(ps) == pytest.approx(ref, abs=1e-15), ps

    def test_findings_holm_keeps_the_family_at_5_percent(self):
        """1,000 simulated 5-seed studies of 5 tests with no effect (the offline study's family: F1 for
        two models, F2, F3, F4's gain over four groups): some verdict is `supported` or `contradicted`
        in at most 6.5% of them with Holm's correction (at most 5% expected), against at least 15%
        with each test at its own 5% (1 - 0.95^5 = 23% expected)."""
        import findings as fi
        rng = np.random.default_rng(11)
        studies, with_holm, alone = 1000, 0, 0
        shapes = [(2, (1, -1))] * 4 + [(4, (1, -1, -1, 1))]
        for _ in range(studies):
            tests = [fi.welch([rng.normal(0.0, 1.0, 5) for _ in range(g)], c) for g, c in shapes]
            adjusted = fi.holm({i: t["p"] for i, t in enumerate(tests)})
            with_holm += any(fi.verdict_of(t, adjusted[i]) != "not resolved" for i, t in enumerate(tests))
            alone += any(fi.verdict_of(t) != "not resolved" for t in tests)
        print(f"no effect, 5 tests of 5 seeds, {studies} studies: some verdict significant in {with_holm} "
              f"with Holm, {alone} without")
        assert with_holm <= 0.065 * studies
        assert alone >= 0.15 * studies

    def test_findings_holm_decides_a_marginal_effect(self, tmp_path):
        """One model (F1, F2, F3: a family of 3 tests), no effect on F2 and F3, and F1 shifted so that its
        own p is 0.03: its 95% interval lies above zero, yet Holm's p (3 x 0.03) is above 5%: F1 is
        `not resolved`, and findings.md says so with both p-values and the seeds it would need."""
        import findings as fi
        root = tmp_path / "runs"
        _findings_runs(str(root), models=("resnet18",))
        _findings_no_effect(root, models=(("resnet18", 6),))  # F2 and F3: no effect at all
        st = [json.loads((root / f"resnet18-lesions-n0-s{s}" / "summary.json").read_text())["test"]["macro_recall"]
              for s in (0, 1, 2)]
        lo, hi = 0.0, 1.0  # the shift d of WT = ST + d at which Welch's p is 0.03
        for _ in range(60):
            d = (lo + hi) / 2
            lo, hi = (d, hi) if fi.welch([np.add(st, d), st])["p"] > 0.03 else (lo, d)
        for seed in (0, 1, 2):
            _findings_edit(str(root / f"resnet18-lesions-n6-s{seed}" / "summary.json"),
                           lambda s, v=st[seed] + hi: s["test"].update(macro_recall=v))
        text, doc = _findings(root, tmp_path)
        m = doc["lesions"]["F1"]["models"]["resnet18"]
        assert m["p"] == pytest.approx(0.03, abs=1e-6) and m["ci"][0] > 0
        assert m["family"] == 3 and m["p_holm"] == pytest.approx(3 * m["p"])
        assert _findings_verdicts(doc) == {"F1": "not resolved", "F2": "not resolved", "F3": "not resolved",
                                           "F4": "not measured"}
        assert "Holm-adjusted over 3 tests p = 0.090: not resolved" in text
        assert "p = 0.030, Holm 0.090" in text and "80% power at level 0.05/3" in text
        assert "Holm's correction over the 3 tests that decide a verdict here: F1 ResNet18, F2 ResNet18, " \
               "F3 ResNet18." in text

    def test_findings_cli_alone(self, tmp_path):
        """findings.py runs alone (no torch, no matplotlib) and writes findings.md / .json; bad input
        is one line, exit 2, nothing written."""
        code = "import sys, findings; assert 'torch' not in sys.modules and 'matplotlib' not in sys.modules"
        assert _plots_run_cli("-c", code).returncode == 0
        _findings_runs(str(tmp_path / "runs"), models=("resnet18",))
        res = _plots_run_cli("findings.py", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out"))
        assert res.returncode == 0, res.stderr
        assert sorted(os.listdir(tmp_path / "out")) == ["findings.json", "findings.md"]
        assert "| F1 |" in res.stdout
        for argv in (["--runs", str(tmp_path / "nope")], ["--runs", str(tmp_path / "out")]):
            res = _plots_run_cli("findings.py", *argv, "--out", str(tmp_path / "out2"))
            lines = res.stderr.strip().splitlines()
            assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("findings.py: error: --runs"), res
            assert not (tmp_path / "out2").exists()
        (tmp_path / "afile").write_text("x")
        res = _plots_run_cli("findings.py", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "afile"))
        assert res.returncode == 2 and "--out" in res.stderr and len(res.stderr.strip().splitlines()) == 1


# ========================================================================================
# study.sh: the offline study end to end
# ========================================================================================


def _study(tmp_path, **env):
    e = dict(os.environ, PY=sys.executable, RUNS=str(tmp_path / "runs"), FIGURES=str(tmp_path / "figs"),
             SEEDS="0", EPOCHS="1", SOURCE_EPOCHS="1", SUBSET="32", BATCH="16", WARMUP="2", THREADS="1")
    e.update(env)
    return subprocess.run(["bash", os.path.join(ROOT, "study.sh")], cwd=ROOT, env=e, capture_output=True,
                          text=True, timeout=900)


def _study_check_findings(tmp_path, data, models):
    """findings.md exists, names F1-F4 with a verdict each, and quotes the runs' test metrics."""
    text = (tmp_path / "figs" / "findings.md").read_text()
    with open(tmp_path / "figs" / "findings.json") as f:
        doc = json.load(f)
    assert set(doc) == {data}, doc.keys()
    assert set(doc[data]) == {"F1", "F2", "F3", "F4"}
    assert all(d["verdict"] in ("supported", "not resolved", "contradicted", "not measured")
               for d in doc[data].values())
    for model in models:
        with open(tmp_path / "runs" / "target" / f"{model}-{data}-n0-s0" / "summary.json") as f:
            s = json.load(f)
        assert f"s0 {s['test'][s['metric']]:.3f}" in text
    return doc


class TestStudy:
    """study.sh: the offline study end to end."""

    @pytest.mark.slow
    def test_study_offline_tiny(self, tmp_path):
        """The default study with tiny knobs, end to end: source pretraining once per model, the
        target sweep, analyses, figures and findings.md; a second call skips every finished step."""
        models_env = "resnet18:32::::2:8 deit_t:32::::1"  # the last fields: each model's epochs and batch
        res = _study(tmp_path, MODELS=models_env, EPOCHS="", BATCH="")
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        runs = tmp_path / "runs"
        for run, epochs, batch in [("resnet18-lesions-n0-s0", 2, 8), ("deit_t-lesions-ri-s0", 1, 32)]:
            with open(runs / "target" / run / "config.json") as f:
                cfg = json.load(f)["config"]
            assert (cfg["epochs"], cfg["batch_size"]) == (epochs, batch), run
        assert sorted(os.listdir(runs / "source")) == ["deit_t-shapes", "resnet18-shapes"]
        assert (runs / "target" / "deit_t-lesions-n0-s0" / "analysis" / "attention.json").exists()
        assert (runs / "target" / "resnet18-lesions-n6-s0" / "analysis" / "cka.json").exists()
        # re-init (the slowest analysis) on the first seed's WT run only
        reinit = {r for r in os.listdir(runs / "target") if (runs / "target" / r / "analysis" / "reinit.json").exists()}
        assert reinit == {"resnet18-lesions-n6-s0", "deit_t-lesions-n14-s0"}, reinit
        assert (runs / "target" / "deit_t-lesions-ri-s0" / "analysis" / "attention.json").exists()
        doc = _study_check_findings(tmp_path, "lesions", ["resnet18", "deit_t"])
        assert doc["lesions"]["F4"]["halves"]["gain"] != "not measured"  # a ViT and a CNN are there
        figs = set(os.listdir(tmp_path / "figs"))
        assert "sweep_lesions.png" in figs and not [f for f in figs if "shapes" in f]  # source not plotted
        assert "findings.md" in res.stdout and "| F1 |" in res.stdout  # printed too
        assert "[15/15] figures done" in res.stdout  # progress: one plain line per finished job (not a terminal)
        mtime = (runs / "target" / "resnet18-lesions-n0-s0" / "summary.json").stat().st_mtime_ns
        log = (runs / "logs" / "analyze-resnet18-lesions-n6-s0.log").read_text()
        res = _study(tmp_path, MODELS=models_env, EPOCHS="", BATCH="")
        assert res.returncode == 0, res.stderr[-3000:]
        assert "15 jobs: 14 finished before (skipped), 1 to run" in res.stdout, res.stdout  # the figures, drawn again
        assert (runs / "target" / "resnet18-lesions-n0-s0" / "summary.json").stat().st_mtime_ns == mtime
        assert (runs / "logs" / "analyze-resnet18-lesions-n6-s0.log").read_text() == log  # not run again

    @pytest.mark.slow
    def test_study_failed_job_stops_every_worker(self, tmp_path):
        """The first job that fails stops every worker at once; study.sh (sweep.py) names the job and
        prints the end of its log (exit 1). A bad knob is one line, exit 2, nothing written."""
        root = tmp_path / "tiny"
        _user_folder(root, ["a", "b"], 2)  # 2 images a class: too few for three splits, found by train.py
        weights = tmp_path / "w.pt"
        weights.write_bytes(b"not a checkpoint")
        res = _study(tmp_path, DATA="folder", DATA_ROOT=str(root), WEIGHTS=str(weights), MODELS="resnet18:32 deit_t:32",
                     WORKERS="2", NS="0")
        assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
        assert "sweep.py: train " in res.stderr and "failed (exit 2); the end of its log" in res.stderr, res.stderr
        assert "train.py: error:" in res.stderr  # the end of the job's own log
        target = tmp_path / "runs" / "target"
        assert not target.exists() or not [r for r in os.listdir(target) if (target / r / "summary.json").exists()]
        for knob, value, error in [("WORKERS", "two", "sweep.py: --workers two: expected a whole number >= 1"),
                                   ("THREADS", "0", "sweep.py: --threads 0: expected a whole number >= 1"),
                                   ("MODELS", "resnet18:32 resnet19:32",
                                    "sweep.py: --models entry resnet19 at size 32: unknown model 'resnet19'")]:
            res = _study(tmp_path / "x", **{knob: value})
            assert res.returncode == 2 and error in res.stderr and len(res.stderr.splitlines()) == 1, res.stderr
            assert not (tmp_path / "x").exists()

    @pytest.mark.slow
    def test_study_own_folder_from_weights(self, tmp_path):
        """Issue 14: `DATA=folder DATA_ROOT=... WEIGHTS=<file> bash study.sh` on a folder of your own
        images runs the sweep, the analyses and findings.md, grouped under the folder's name."""
        import torch

        import models
        root = tmp_path / "dätä" / "derm"  # issue 23: a non-ASCII path, in the C locale, in the data and the runs
        _user_folder(root, ["benign", "malignant"], 10)
        torch.manual_seed(0)
        weights = tmp_path / "pretrained.pt"
        torch.save(models.create_model("resnet18", num_classes=1000, img_size=32).state_dict(), weights)
        res = _study(tmp_path, DATA="folder", DATA_ROOT=str(root), MODEL="resnet18", WEIGHTS=str(weights),
                     SIZE="32", NS="0 6", DEVICE="cpu", LC_ALL="C", LANG="C", RUNS=str(tmp_path / "rüns"))
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        runs = tmp_path / "rüns" / "target"
        assert sorted(os.listdir(runs)) == ["resnet18-folder-n0-s0", "resnet18-folder-n6-s0", "resnet18-folder-ri-s0"]
        with open(runs / "resnet18-folder-n0-s0" / "config.json") as f:
            doc = json.load(f)
        assert doc["data"]["display_name"] == "derm" and doc["data"]["metric"] == "roc_auc"
        assert (runs / "resnet18-folder-n6-s0" / "analysis" / "cka.json").exists()
        text = (tmp_path / "figs" / "findings.md").read_text()
        with open(tmp_path / "figs" / "findings.json") as f:
            findings = json.load(f)
        assert set(findings) == {"derm"} and findings["derm"]["F4"]["verdict"] == "not measured"
        assert "Warning: only 1 seed(s) per initialisation" in text  # one seed: verdicts flagged as meaningless
        with open(runs / "resnet18-folder-n0-s0" / "summary.json") as f:
            s = json.load(f)
        assert f"s0 {s['test'][s['metric']]:.3f}" in text

    @pytest.mark.slow
    def test_study_own_data_from_weights(self, tmp_path):
        """DATA=... runs the sweep from WEIGHTS (a local checkpoint standing in for ImageNet), no
        source pretraining; one model, so F4 is 'not measured'. A missing WEIGHTS file is exit 2."""
        import torch

        import models
        torch.manual_seed(0)
        weights = tmp_path / "pretrained.pt"
        torch.save({"model": models.create_model("resnet18", num_classes=1000, img_size=32).state_dict()}, weights)
        res = _study(tmp_path, DATA="synthetic", MODEL="resnet18", WEIGHTS=str(weights), SIZE="32", NS="0 6",
                     DEVICE="cpu")
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        assert not (tmp_path / "runs" / "source").exists()
        with open(tmp_path / "runs" / "target" / "resnet18-synthetic-n6-s0" / "config.json") as f:
            assert json.load(f)["config"]["weights"] == str(weights)
        doc = _study_check_findings(tmp_path, "synthetic", ["resnet18"])
        assert doc["synthetic"]["F4"]["verdict"] == "not measured"
        res = _study(tmp_path / "x", DATA="synthetic", MODEL="resnet18", WEIGHTS=str(tmp_path / "nope.pt"))
        assert res.returncode == 2 and "nope.pt" in res.stderr and not (tmp_path / "x").exists()


# ========================================================================================
# sweep.py: planning and running a sweep locally and on SLURM
# ========================================================================================


_SWEEP_FACTS = {"resnet18": (6, False), "deit_t": (14, True)}


def _sweep_study(tmp_path, *flags):
    import sweep
    args = sweep.build_parser().parse_args(["--runs", str(tmp_path / "runs"), "--figures", str(tmp_path / "figs"),
                                            *flags])
    return sweep.study_settings(args)


def _sweep_by_id(jobs):
    return {j["id"]: j for j in jobs}


def _sweep_job(tmp_path, name, code, needs=()):
    """A job running a tiny script (no torch): for the executor's own behaviour."""
    script = tmp_path / f"{name}.py"
    script.write_text(f"import os, sys, time\n{code}\n")
    return {"id": f"job {name}", "kind": "train", "argv": [str(script), name], "needs": list(needs), "run": None,
            "metrics": [], "ref": None, "log": str(tmp_path / "logs" / f"{name}.log")}


def _slurm_missing():
    """Why SLURM cannot run here (None when sbatch is there and a controller answers)."""
    if shutil.which("sbatch") is None:
        return "SLURM absent: sbatch not found"
    try:
        res = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"SLURM absent: sinfo failed ({e})"
    if res.returncode != 0 or not res.stdout.strip():
        return f"SLURM absent: no controller answers (sinfo: {(res.stderr.strip() or 'no nodes')[:200]})"
    return None


def _slurm_submit(flags):
    """Submit a sweep and wait until its job arrays leave the queue; returns sweep.py's output."""
    import re
    res = subprocess.run([sys.executable, "sweep.py", "--executor", "slurm", *flags], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    ids = re.findall(r"job array (\d+)", res.stdout)
    assert ids, res.stdout
    deadline = time.time() + 1200
    while set(ids) & set(subprocess.run(["squeue", "-h", "-o", "%F"], capture_output=True, text=True).stdout.split()):
        assert time.time() < deadline, f"SLURM jobs {ids} still queued after 1200 s"
        time.sleep(2)
    print(res.stdout)  # the CI log (pytest -s, or a failure) shows the submission
    return res.stdout


def _sweep_results(runs, figures):
    """Every summary.json without its timing fields, and findings.json."""
    import sweep
    summaries = {}
    for path in sorted(Path(runs).rglob("summary.json")):
        doc = json.loads(path.read_text())
        summaries[str(path.relative_to(runs))] = {k: v for k, v in doc.items() if k not in sweep.TIMING}
    return summaries, json.loads((Path(figures) / "findings.json").read_text())


class TestSweep:
    """sweep.py: planning and running a sweep locally and on SLURM."""

    def test_sweep_plan_offline(self, tmp_path):
        """The offline study's plan: per model one source pretraining, 5 seeds x n in {0, N}
        from the source's best.pt, RI on the first seed, an analysis per run (re-init only on the
        first seed's WT run, CKA --ref ST on each WT run, attention only for the ViT), then the
        figures after everything; jobs in dependency order, the commands those of the old study.sh."""
        import sweep
        study = _sweep_study(tmp_path)
        jobs = sweep.plan(study, _SWEEP_FACTS)
        assert not (tmp_path / "runs").exists()  # pure: nothing written
        assert len(jobs) == 2 * (1 + 5 * 2 + 1 + 11) + 1 == 47
        by_id, seen = _sweep_by_id(jobs), set()
        assert len(by_id) == len(jobs)
        for j in jobs:  # dependency order; argv lists, never shell strings
            assert set(j["needs"]) <= seen and isinstance(j["argv"], list) and j["argv"][0].endswith(".py")
            seen.add(j["id"])
        runs = str(tmp_path / "runs")
        src = by_id[f"train {runs}/source/resnet18-shapes"]
        assert src["argv"] == ["train.py", "--model", "resnet18", "--data", "shapes", "--init", "ri",
                               "--img-size", "32", "--lr", "0.001", "--epochs", "2", "--batch-size", "32",
                               "--warmup", "30", "--patience", "10",
                               "--device", "cpu", "--out", f"{runs}/source/resnet18-shapes", "--resume"]
        wt = by_id[f"train {runs}/target/deit_t-lesions-n14-s2"]
        assert wt["needs"] == [f"train {runs}/source/deit_t-shapes"]
        assert wt["argv"] == ["train.py", "--model", "deit_t", "--data", "lesions", "--n", "14", "--weights",
                              f"{runs}/source/deit_t-shapes/best.pt", "--img-size", "64", "--lr", "0.0003",
                              "--epochs", "30", "--batch-size", "32", "--warmup", "6", "--patience", "6",
                              "--plateau-patience", "2", "--seed", "2", "--device", "cpu",
                              "--out", f"{runs}/target/deit_t-lesions-n14-s2", "--resume"]
        ri = [j for j in jobs if j["kind"] == "train" and "-ri-" in j["id"]]
        assert [os.path.basename(j["run"]) for j in ri] == ["resnet18-lesions-ri-s0", "deit_t-lesions-ri-s0"]
        assert all(j["needs"] == [] and "--weights" not in j["argv"] for j in ri)
        analyses = [j for j in jobs if j["kind"] == "analyze"]
        assert len(analyses) == 22
        full = sorted(os.path.basename(j["run"]) for j in analyses if "--skip" not in j["argv"])
        assert full == ["deit_t-lesions-n14-s0", "resnet18-lesions-n6-s0"]
        a = by_id[f"analyze {runs}/target/resnet18-lesions-n6-s1"]
        assert a["argv"] == ["analyze.py", "--run", a["run"], "--metric", "all", "--skip", "reinit", "--ref",
                             f"{runs}/target/resnet18-lesions-n0-s1", "--device", "cpu"]
        assert a["needs"] == [f"train {runs}/target/resnet18-lesions-n6-s1",
                              f"train {runs}/target/resnet18-lesions-n0-s1"]
        assert a["metrics"] == ["cka", "knn", "l2", "convergence"]  # what analyze.py writes: the "done" check
        assert by_id[f"analyze {runs}/target/deit_t-lesions-n14-s0"]["metrics"] == \
            ["cka", "knn", "reinit", "l2", "attention", "convergence"]
        fig = jobs[-1]
        assert fig["id"] == "figures" and set(fig["needs"]) == set(by_id) - {"figures"}
        assert fig["argv"] == ["plots.py", "--runs", f"{runs}/target", "--out", str(tmp_path / "figs"), "--format",
                               "png"]
        assert len({j["log"] for j in jobs}) == len(jobs)  # one log per job

    def test_sweep_plan_own_data_and_flags(self, tmp_path):
        """--data: no source pretraining, runs from --weights, train.py's recipe unless given; --ns
        with N and numbers, --seeds, --ri-seeds (none / a subset), --models entries and overrides."""
        import sweep
        (tmp_path / "mine").mkdir()
        weights = tmp_path / "w.pt"
        weights.write_bytes(b"x")
        study = _sweep_study(tmp_path, "--data", "folder", "--data-root", str(tmp_path / "mine"), "--weights",
                             str(weights), "--models", "resnet18:32:1e-3 deit_t", "--ns", "N,2", "--seeds", "3 4",
                             "--ri-seeds", "none", "--epochs", "7")
        jobs = sweep.plan(study, _SWEEP_FACTS)
        assert len(jobs) == 2 * (2 * 2 + 2 * 2) + 1  # no source, no RI
        t = [j for j in jobs if j["kind"] == "train"]
        assert [os.path.basename(j["run"]) for j in t[:4]] == ["resnet18-folder-n2-s3", "resnet18-folder-n6-s3",
                                                              "resnet18-folder-n2-s4", "resnet18-folder-n6-s4"]
        assert t[0]["argv"] == ["train.py", "--model", "resnet18", "--data", "folder", "--data-root",
                                str(tmp_path / "mine"), "--n", "2", "--weights", str(weights), "--img-size", "32",
                                "--lr", "0.001", "--epochs", "7", "--seed", "3", "--out", t[0]["run"],
                                "--resume"]  # no --device: auto (a GPU when there is one)
        assert "--img-size" not in t[4]["argv"] and t[4]["needs"] == []
        a = [j for j in jobs if j["kind"] == "analyze"]
        assert ["--ref" in j["argv"] for j in a[:4]] == [False, True, False, True]
        assert jobs[-1]["argv"][-1] == "png,pdf"
        study = _sweep_study(tmp_path, "--models", "resnet18", "--seeds", "0 1 2", "--ri-seeds", "1 2", "--ns", "0")
        runs = [os.path.basename(j["run"]) for j in sweep.plan(study, _SWEEP_FACTS) if j["kind"] == "train"]
        assert [r for r in runs if "-ri-" in r] == ["resnet18-lesions-ri-s1", "resnet18-lesions-ri-s2"]
        an = [j for j in sweep.plan(study, _SWEEP_FACTS) if j["kind"] == "analyze"]
        assert not any("--ref" in j["argv"] for j in an)  # one n: no WT against ST

    def test_sweep_pending_skips_finished_work(self, tmp_path):
        """Re-running skips a finished run (rundir.run_finished) and an analysis whose every file
        belongs to the run (its run_id; with CKA against --ref when the job has one); the needs left
        are those of unfinished jobs. An unfinished run, a file of another run_id, a CKA without its
        ref block are not done."""
        import sweep
        study = _sweep_study(tmp_path, "--models", "resnet18", "--seeds", "0", "--ns", "0 N", "--ri-seeds", "none")
        jobs = sweep.plan(study, _SWEEP_FACTS)
        target, runs = tmp_path / "runs" / "target", str(tmp_path / "runs")
        assert [j["id"] for j in sweep.pending(jobs)[0]] == [j["id"] for j in jobs]
        st = _plots_write_run(str(target), "resnet18", "lesions", 0, 0, analyses=["cka", "knn", "l2", "convergence"])
        wt = _plots_write_run(str(target), "resnet18", "lesions", 6, 0, analyses=["cka", "knn", "l2", "convergence"])
        todo, skipped = sweep.pending(jobs)
        # ST done (run and analyses); WT's analysis lacks reinit and its CKA lacks the ref block; the source is not done
        assert skipped == 3 and [j["id"] for j in todo] == [f"train {runs}/source/resnet18-shapes",
                                                            f"analyze {wt}", "figures"]
        assert todo[1]["needs"] == [] and todo[2]["needs"] == [f"train {runs}/source/resnet18-shapes", f"analyze {wt}"]
        _plots_write_run(str(target), "resnet18", "lesions", 6, 0, ref=(0, "st"))
        assert [j["id"] for j in sweep.pending(jobs)[0]] == [f"train {runs}/source/resnet18-shapes", "figures"]
        # identities: a file written for another run of the same folder is not done
        for path, run_id in ((os.path.join(st, "config.json"), "a" * 32),
                             (os.path.join(st, "analysis", "knn.json"), "b" * 32)):
            with open(path) as f:
                doc = json.load(f)
            doc["run_id"] = run_id
            _plots_dump(path, doc)
        assert f"analyze {st}" in [j["id"] for j in sweep.pending(jobs)[0]]
        os.remove(os.path.join(wt, "summary.json"))  # killed: not finished, so neither are its analyses
        todo = [j["id"] for j in sweep.pending(jobs)[0]]
        assert f"train {wt}" in todo and f"analyze {wt}" in todo

    @pytest.mark.slow
    def test_sweep_print_executor(self, tmp_path):
        """--executor print: the commands of the jobs left, one per line in dependency order, each a
        shell line giving back the job's argv; the summary goes to stderr; nothing is written."""
        import shlex

        import sweep
        flags = ["--models", "resnet18:32", "--seeds", "0 1", "--runs", str(tmp_path / "rüns"), "--figures",
                 str(tmp_path / "figs")]
        res = subprocess.run([sys.executable, "sweep.py", "--executor", "print", *flags], cwd=ROOT, capture_output=True,
                             text=True, timeout=300)
        assert res.returncode == 0, res.stderr
        jobs = sweep.plan(_sweep_study(tmp_path, *flags[:4], "--runs", str(tmp_path / "rüns")), _SWEEP_FACTS)
        lines = res.stdout.splitlines()
        assert [shlex.split(line) for line in lines] == [["python", *j["argv"]] for j in jobs]
        assert "12 to run" in res.stderr and not (tmp_path / "rüns").exists()

    def test_sweep_local_failure_stops_the_pool(self, tmp_path):
        """The first failing job stops every worker at once (a long job is killed, a job waiting on
        the failed one never starts) and is named with the end of its log; a worker that dies in a
        job fails that job. Logs are appended, never emptied."""
        import sweep
        slow = _sweep_job(tmp_path, "slow", "time.sleep(60)\nopen(sys.argv[1] + '.done', 'w').close()")
        fail = _sweep_job(tmp_path, "fail",
                          "time.sleep(0.5)\nprint('line 1'); print('boom', file=sys.stderr)\nsys.exit(3)")
        after = _sweep_job(tmp_path, "after", "open('after.done', 'w').close()", needs=[fail["id"]])
        os.makedirs(tmp_path / "logs")
        (tmp_path / "logs" / "fail.log").write_text("an earlier call\n")
        start = time.time()
        with pytest.raises(sweep.JobFailed) as e:
            sweep.run_local([slow, fail, after], [{}, {}])
        assert time.time() - start < 30  # the slow job was stopped, not waited for
        assert e.value.job["id"] == "job fail" and e.value.why == "exit 3" and e.value.stopped == ["job slow"]
        report = e.value.report()
        assert "sweep.py: job fail failed (exit 3); the end of its log" in report and "boom" in report
        assert (tmp_path / "logs" / "fail.log").read_text().startswith("an earlier call\n== ")
        assert not (tmp_path / "slow.done").exists() and not (tmp_path / "after.done").exists()
        dies = _sweep_job(tmp_path, "dies", "import signal; os.kill(os.getpid(), signal.SIGKILL)")
        with pytest.raises(sweep.JobFailed) as e:
            sweep.run_local([dies], [{}])
        assert e.value.why == "its worker died (signal 9)"

    def test_sweep_worker_pinning(self, tmp_path):
        """One worker per GPU, each pinned with CUDA_VISIBLE_DEVICES (of the visible devices when the
        parent has a list), round-robin when more workers than GPUs; on CPU the cores are split
        between the workers; an explicit cuda:K is not re-pinned. The pin reaches the job."""
        import sweep
        envs = sweep.worker_envs(None, None, None, gpus=4, cores=16)
        assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0", "1", "2", "3"] and envs[0]["OMP_NUM_THREADS"] == "4"
        envs = sweep.worker_envs("cuda", 3, None, gpus=2, cores=8, visible="5,7")
        assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["5", "7", "5"] and envs[0]["OMP_NUM_THREADS"] == "2"
        envs = sweep.worker_envs("cpu", 2, None, gpus=4, cores=2)
        assert envs == [{"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}] * 2
        assert all("CUDA_VISIBLE_DEVICES" not in e for e in sweep.worker_envs("cuda:1", None, 3, gpus=2, cores=8))
        assert sweep.worker_envs(None, None, None, gpus=0, cores=2) == [{"OMP_NUM_THREADS": "2",
                                                                         "MKL_NUM_THREADS": "2"}]
        code = "time.sleep(1); print(os.environ.get('CUDA_VISIBLE_DEVICES'), os.environ['OMP_NUM_THREADS'])"
        jobs = [_sweep_job(tmp_path, f"pin{i}", code) for i in range(2)]
        sweep.run_local(jobs, sweep.worker_envs(None, None, None, gpus=2, cores=4, visible="3,4"))
        seen = sorted((tmp_path / "logs" / f"pin{i}.log").read_text().splitlines()[-1] for i in range(2))
        assert seen == ["3 2", "4 2"]  # each job on its own worker's GPU (the jobs overlap: one per worker)

    def test_sweep_bad_input(self, tmp_path, capsys, monkeypatch):
        """Bad input is one line naming the flag and the value, exit 2, nothing written or submitted:
        unknown model, bad numbers, --ns beyond N, --weights offline, SLURM flags with another executor,
        sbatch missing, a partition that does not exist, --gpus-per-job on a CPU sweep."""
        import sweep
        fake = tmp_path / "bin"
        fake.mkdir()
        for tool, body in (("sinfo", "echo ci"), ("squeue", "true"), ("sbatch", "echo \"$@\" >> %s/sbatch.log; echo 7"
                                                                            % tmp_path)):
            (fake / tool).write_text(f"#!/bin/sh\n{body}\n")
            (fake / tool).chmod(0o755)
        runs = ["--runs", str(tmp_path / "runs"), "--figures", str(tmp_path / "figs")]
        cases = [
            ([], ["--models", "resnet18 vgg16"], "--models entry vgg16 at size 224: unknown model 'vgg16'"),
            ([], ["--seeds", "0 x"], "--seeds x: expected a whole number >= 0"),
            ([], ["--models", "resnet18:32:fast"], "--models entry 'resnet18:32:fast': lr fast: expected a finite "
                                                    "number > 0"),
            ([], ["--ns", "0 9", "--models", "resnet18"],
             "--ns 0 9: n = 9 is more than resnet18's N = 6 module groups"),
            ([], ["--workers", "0"], "--workers 0: expected a whole number >= 1"),
            ([], ["--weights", "x.pt"], "--weights x.pt: only with --data"),
            ([], ["--data", "aptos"], "--data aptos: needs --data-root"),
            ([], ["--partition", "gpu"], "--partition: not used by --executor local"),
            (["/usr/bin/nothing"], ["--executor", "slurm"], "--executor slurm: sbatch not found"),
            ([str(fake)], ["--executor", "slurm", "--partition", "gpu"], "--partition gpu: no such partition (this "
                                                                          "cluster has: ci)"),
            ([str(fake)], ["--executor", "slurm", "--gpus-per-job", "1"],
             "--gpus-per-job 1: the sweep runs on the CPU"),
            ([str(fake)], ["--executor", "slurm", "--time", "soon"], "--time soon: expected a SLURM time"),
        ]
        for path, flags, error in cases:
            if path:
                monkeypatch.setenv("PATH", os.pathsep.join(path))
            else:
                monkeypatch.delenv("PATH", raising=False)
                monkeypatch.setenv("PATH", "/usr/bin:/bin")
            assert sweep.main([*runs, *flags]) == 2, flags
            err = capsys.readouterr().err
            assert err.startswith("sweep.py: ") and error in err and len(err.splitlines()) == 1, (flags, err)
            assert not (tmp_path / "runs").exists() and not (tmp_path / "sbatch.log").exists()

    def test_sweep_second_sweep_refused(self, tmp_path, capsys):
        """One sweep per --runs folder: a second one gets one line naming the first (exit 2). A run
        being written by another process (train.py's lock) refuses the sweep before it starts."""
        import sweep
        runs = tmp_path / "runs"
        flags = ["--runs", str(runs), "--figures", str(tmp_path / "figs"), "--models", "resnet18:32", "--seeds", "0"]
        with rundir.RunLock(runs, "sweep.py", "--runs"):
            assert sweep.main(flags) == 2
        err = capsys.readouterr().err
        assert "another sweep is using this folder (sweep.py pid" in err and len(err.splitlines()) == 1, err
        run = runs / "target" / "resnet18-lesions-n0-s0"
        with rundir.RunLock(run, "train.py"):
            assert sweep.main(flags) == 2
        err = capsys.readouterr().err
        assert f"{run}: another process is writing this run (train.py pid {os.getpid()}" in err, err
        assert len(err.splitlines()) == 1 and not (runs / "logs").exists()

    def test_sweep_slurm_submission(self, tmp_path, capsys, monkeypatch):
        """--executor slurm with fake sbatch/squeue: the resources checked first (sbatch --test-only),
        then one job array per stage after the stages it needs (afterok), each task running
        `sweep.py --run-task <stage file>`; a re-run refuses while the sweep is queued, then names the
        failed, killed and never-started tasks with their logs and submits what is left."""
        import shlex

        import sweep
        fake = tmp_path / "bin"
        fake.mkdir()
        queue = tmp_path / "queue"
        queue.write_text("")
        scripts = {"sinfo": "echo ci",
                   "squeue": f"cat {queue}",
                   "sbatch": f"n=$(ls {tmp_path}/calls | wc -l); printf '%s\\n' \"$@\" > {tmp_path}/calls/$n; "
                             "echo $((101 + n))"}  # one file per call, one argument a line; job ids 101, 102, ...
        (tmp_path / "calls").mkdir()
        for tool, body in scripts.items():
            (fake / tool).write_text(f"#!/bin/sh\n{body}\n")
            (fake / tool).chmod(0o755)
        monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
        flags = ["--runs", str(tmp_path / "runs"), "--figures", str(tmp_path / "figs"), "--models", "resnet18:32",
                 "--seeds", "0", "--ns", "0 N", "--executor", "slurm", "--cpus-per-job", "2", "--time", "1:00:00",
                 "--slurm-extra=--qos=short"]
        assert sweep.main(flags) == 0
        out = capsys.readouterr().out
        calls = [(tmp_path / "calls" / str(i)).read_text().splitlines()
                 for i in range(len(os.listdir(tmp_path / "calls")))]
        assert "--test-only" in calls[0] and len(calls) == 1 + 4  # 4 stages by the longest chain of needs
        arrays = [next(a for a in c if a.startswith("--array=")) for c in calls[1:]]
        assert arrays == ["--array=0-1", "--array=0-2", "--array=0-1", "--array=0-0"]
        deps = [next((a for a in c if a.startswith("--dependency=")), None) for c in calls[1:]]
        assert deps == [None, "--dependency=afterok:102", "--dependency=afterok:103",
                        "--dependency=afterok:102:103:104"]
        for c, array in zip(calls[1:], arrays):
            assert {"--cpus-per-task=2", "--time=1:00:00", "--qos=short"} <= set(c)
            wrap = shlex.split(c[c.index("--wrap") + 1])  # the task: sweep.py reading its stage file, no shell logic
            assert wrap[0] == sys.executable and wrap[1:3] == [os.path.join(ROOT, "sweep.py"), "--run-task"]
            assert len(rundir.read_json(wrap[3])["jobs"]) == int(array.split("-")[-1]) + 1
        assert all("--kill-on-invalid-dep=yes" in c for c in calls[2:])
        record = rundir.read_json(tmp_path / "runs" / "logs" / "slurm" / "submitted.json")
        assert [s["job_id"] for s in record["stages"]] == ["102", "103", "104", "105"]
        assert [[j["kind"] for j in s["jobs"]] for s in record["stages"]] == [  # source and RI; runs and RI's analysis
            ["train", "train"], ["train", "train", "analyze"], ["analyze", "analyze"], ["figures"]]
        assert "follow: squeue -j 102,103,104,105" in out
        queue.write_text("103\n")
        assert sweep.main(flags) == 2
        assert "is still in the queue (jobs 103)" in capsys.readouterr().err
        queue.write_text("")
        folder = os.path.dirname(record["stages"][0]["file"])
        for name, text in (("stage0_0.rc", "0\n"), ("stage0_1.rc", "2\n"), ("stage1_0.out", "")):
            with open(os.path.join(folder, name), "w") as f:
                f.write(text)
        assert sweep.main(flags) == 0
        out = capsys.readouterr().out
        assert "left 7 task(s) unfinished" in out
        ri = record["stages"][0]["jobs"][1]
        assert f"  failed (exit 2): {ri['id']}: log {ri['log']}\n" in out
        assert f"  killed (time limit, memory or scancel): {record['stages'][1]['jobs'][0]['id']}" in out
        assert "  not started (a stage it needs failed): figures" in out

    @pytest.mark.slow
    def test_sweep_slurm_matches_local(self, tmp_path):
        """A tiny sweep (one model, 2 seeds, --subset, 1 epoch) submitted to SLURM (one job array per
        stage, afterok) gives the same summary.json files (minus timings) and findings.json as the
        local executor; submitting the same command again runs only the figures. Skips where SLURM is
        absent; .ci/run starts a one-node cluster and sets WTST_REQUIRE_SLURM=1 (then it must run)."""
        why = _slurm_missing()
        if why:
            if os.environ.get("WTST_REQUIRE_SLURM") == "1":
                pytest.fail(f"WTST_REQUIRE_SLURM=1 (.ci/run) but {why}")
            pytest.skip(why)
        tiny = ["--models", "resnet18:32::::1:16", "--seeds", "0 1", "--ns", "0 N", "--subset", "32", "--source-epochs",
                "1", "--warmup", "2"]
        local = subprocess.run([sys.executable, "sweep.py", *tiny, "--runs", str(tmp_path / "local"), "--figures",
                                str(tmp_path / "local-figs"), "--workers", "2", "--threads", "1"], cwd=ROOT,
                               capture_output=True, text=True, timeout=900)
        assert local.returncode == 0, local.stdout[-3000:] + local.stderr[-3000:]
        flags = [*tiny, "--runs", str(tmp_path / "slurm"), "--figures", str(tmp_path / "slurm-figs"),
                 "--cpus-per-job", "1"]
        out = _slurm_submit(flags)
        assert "12 to run" in out and "job array" in out
        again = _slurm_submit(flags)  # everything finished: only the figures are drawn again; no task failed
        assert "11 finished before (skipped), 1 to run" in again and "unfinished" not in again, again
        slurm, local = _sweep_results(tmp_path / "slurm", tmp_path / "slurm-figs"), \
            _sweep_results(tmp_path / "local", tmp_path / "local-figs")
        assert len(slurm[0]) == 1 + 5 and slurm[0].keys() == local[0].keys()  # the source and 5 target runs
        assert slurm == local


# ========================================================================================
# README.md and docs/: the copyable files and the documented commands
# ========================================================================================


_COPYABLE_SCRIPT = r'''
import sys, torch, timm
import os
assert os.path.dirname(os.path.abspath(__file__)) == sys.path[0] and not any(
    os.path.isfile(os.path.join(p, "data.py")) for p in sys.path[1:] if p), sys.path
import models, init, metrics
assert not any(m in sys.modules for m in ("data", "train", "analyze")), "pulled in a toolkit file"
torch.manual_seed(0)
lib, name, kw = models.REFERENCE_MODELS["deit_t"]
theirs = timm.create_model(name, pretrained=False, **kw).eval()
ours = models.create_model("deit_t")
report = models.load_pretrained(ours, theirs.state_dict())          # weights from memory
assert not report["skipped"], report
models.load_pretrained(ours, {"state_dict": theirs.state_dict()})   # or a dict wrapping one
ours.eval()
layers = ours.feature_layers()
x = torch.randn(16, 3, 224, 224)
with torch.no_grad(), metrics.capture(theirs, layers) as a, metrics.capture(ours, layers) as b:
    theirs(x)
    ours(x)
values = [metrics.cka(a[l], b[l]) for l in layers]
assert len(values) == 25 and all(abs(v - 1) < 1e-6 for v in values), values
assert not any(m._forward_hooks for m in theirs.modules()), "hooks left behind"

# WT-ST-n/m on the timm model with our groups: the same tensors as on ours
groups = ours.wtst_groups()
pretrained = {k: v.clone() for k, v in ours.state_dict().items()}
t2 = timm.create_model(name, pretrained=False, **kw)
o2 = models.create_model("deit_t")
init.wtst_init(t2, pretrained, 5, seed=3, groups=groups)
init.wtst_init(o2, pretrained, 5, seed=3)
for k, v in o2.state_dict().items():
    if not k.startswith("head."):
        assert torch.equal(t2.state_dict()[k], v), k
assert torch.equal(t2.state_dict()["blocks.3.mlp.fc1.weight"], pretrained["blocks.3.mlp.fc1.weight"])
assert not torch.equal(t2.state_dict()["blocks.4.mlp.fc1.weight"], pretrained["blocks.4.mlp.fc1.weight"])
# a 224 pos_embed on a 32 px timm model is resampled as load_pretrained does
t32 = timm.create_model(name, pretrained=False, img_size=32, **kw)
init.wtst_init(t32, pretrained, len(groups), groups=groups)
want = models.resample_pos_embed(pretrained["pos_embed"], (2, 2))
assert torch.equal(t32.pos_embed.detach(), want)
assert torch.equal(init.resample_pos_embed(pretrained["pos_embed"], (5, 3)),
                   models.resample_pos_embed(pretrained["pos_embed"], (5, 3)))
o32 = models.create_model("deit_t", img_size=32)
models.load_pretrained(o32, pretrained)
assert torch.equal(o32.pos_embed.detach(), want)
print("OK")
'''


_DOC_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
_RUNS_MARK = re.compile(r"<!-- test: runs(.*?) -->\n```bash\n(.*?)```", re.S)


def _doc_pages():
    return [Path(ROOT) / "README.md"] + sorted((Path(ROOT) / "docs").glob("*.md"))


def _doc_anchors(path):
    """GitHub's heading anchors of a Markdown file: lower case, punctuation but - dropped, spaces -> -."""
    heads = [l.lstrip("#").strip() for l in path.read_text().splitlines() if re.match(r"#{1,6} ", l)]
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads}


def _readme_marked_blocks():
    """[(marker text, [command lines])] of the README's blocks marked to run (continuations joined)."""
    text = (Path(ROOT) / "README.md").read_text()
    return [(m.group(1), [l for l in m.group(2).replace("\\\n", " ").splitlines() if l.strip()])
            for m in _RUNS_MARK.finditer(text)]


def _readme_command(line, extra, python):
    """A README command line as the test runs it: our scripts by absolute path with this Python, and
    the flags the marker names for each script appended (before a trailing comment)."""
    line = line.split("  #")[0].strip()
    words = line.split()
    assert words[0] == "python" and words[1].endswith(".py"), line
    return [python, os.path.join(ROOT, words[1]), *words[2:], *extra.get(words[1], [])]


class TestReadme:
    """README.md and docs/: the copyable files and the documented commands."""

    @pytest.mark.slow
    def test_copyable_files_work_alone_on_timm(self, tmp_path):
        """Issue 12 done-when: models.py, init.py and metrics.py copied alone into a folder, with
        only that folder (and site-packages) on the path: CKA of a timm DeiT against ours on the
        same weights is 1 on every layer, wtst_init runs on the timm model with our groups, and
        weights load from memory."""
        pytest.importorskip("timm")
        import shutil
        for f in ("models.py", "init.py", "metrics.py"):
            shutil.copy(os.path.join(ROOT, f), tmp_path / f)
        (tmp_path / "check.py").write_text(_COPYABLE_SCRIPT)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        # -E -s: no PYTHONPATH, no user site; the script's folder (the three files) is the only
        # project folder on sys.path
        res = subprocess.run([sys.executable, "-E", "-s", "check.py"], cwd=str(tmp_path), capture_output=True,
                             text=True,
                             timeout=300, env=dict(env, OMP_NUM_THREADS="1"))
        assert res.returncode == 0 and res.stdout.strip().endswith("OK"), res.stdout + res.stderr

    @pytest.mark.slow
    def test_readme_own_code_example_runs(self, tmp_path):
        """The README section "Use the analyses in your own code" runs as written."""
        pytest.importorskip("timm")
        text = open(os.path.join(ROOT, "README.md")).read()
        section = text.split("## Use the analyses in your own code", 1)[1]
        code = section.split("```python", 1)[1].split("```", 1)[0]
        assert 8 <= len([l for l in code.splitlines() if l.strip()]) <= 16
        res = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), capture_output=True, text=True,
                             timeout=300, env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1"))
        assert res.returncode == 0, res.stdout + res.stderr

    # ---- links and command blocks of README.md and docs/
    def test_readme_links_resolve(self):
        """Every relative link (and image) in README.md and docs/*.md names a file that exists, and
        its #anchor, if any, a heading of that file."""
        checked = 0
        for page in _doc_pages():
            for target in _DOC_LINK.findall(page.read_text()):
                if re.match(r"[a-z]+:", target):
                    continue
                path, _, anchor = target.partition("#")
                dest = (page.parent / path).resolve() if path else page
                assert dest.exists(), f"{page.name}: link {target} names no file"
                if anchor:
                    assert anchor in _doc_anchors(dest), f"{page.name}: link {target}: no heading #{anchor}"
                checked += 1
        assert checked >= 15

    def test_readme_setup_commands_and_layout(self):
        """The README's two set-up commands stay true (the study installs requirements.txt and runs
        study.sh; the tests command is the one .ci/run runs), it fits 200 lines, holds the findings
        markers, and ends with the citation and the licence."""
        text = (Path(ROOT) / "README.md").read_text()
        setup = text.split("## Set-up", 1)[1].split("\n## ", 1)[0]
        blocks = re.findall(r"```bash\n(.*?)```", setup, re.S)
        assert len(blocks) == 2, blocks
        study, tests = (b.strip() for b in blocks)
        assert study == "python3 -m venv .venv && .venv/bin/pip install -r requirements.txt && bash study.sh"
        ci = (Path(ROOT) / ".ci" / "run").read_text()
        assert tests.startswith("python3 -m venv .venv && .venv/bin/pip install -r requirements-dev.txt && ")
        assert tests.rsplit("&& ", 1)[1] in ci and "ruff check ." in ci
        assert os.path.exists(os.path.join(ROOT, "requirements.txt")) and os.path.exists(os.path.join(ROOT, "study.sh"))
        assert len(text.splitlines()) <= 200
        assert text.count("<!-- findings:start -->") == 1 and text.count("<!-- findings:end -->") == 1
        heads = re.findall(r"^## (.*)$", text, re.M)
        assert heads[-2:] == ["Cite", "Licence"] and "@inproceedings{matsoukas2022" in text

    def test_readme_findings_are_the_ones_the_study_wrote(self):
        """The README's findings table is the table of docs/findings.md, a findings.md that
        findings.py wrote from a measured run (machine, date and seeds in it), not numbers typed
        by hand: refresh both with `cp figures/findings.md docs/` and the table into the README."""
        text = (Path(ROOT) / "README.md").read_text()
        block = text.split("<!-- findings:start -->\n", 1)[1].split("<!-- findings:end -->", 1)[0].strip()
        doc = (Path(ROOT) / "docs" / "findings.md").read_text()
        assert doc.startswith("# Findings\n") and "Written " in doc and "seeds of " in doc
        table = re.search(r"^\| finding \|.*?(?=\n\n)", doc, re.S | re.M).group(0).strip()
        assert block == table
        for verdict in re.findall(r"^\| F\d \| [^|]* \| \*\*([a-z ]+)\*\*", table, re.M):
            assert verdict in ("supported", "not resolved", "contradicted", "not measured")
        # the verdicts per seed set: each row is its linked findings.md, for the seeds it names
        rows = re.findall(r"^\| \[(\d+)-(\d+)\]\((docs/findings[\w-]*\.md)\)[^|]*\|(.*)\|$", text, re.M)
        assert len(rows) >= 3, rows
        for first, last, path, cells in rows:
            doc = (Path(ROOT) / path).read_text()
            verdicts = dict(re.findall(r"^\| (F\d) \| [^|]* \| \*\*([a-z ]+)\*\*", doc, re.M))
            assert [c.strip() for c in cells.split("|")] == [verdicts[f] for f in ("F1", "F2", "F3", "F4")], path
            seeds = " ".join(f"s{i}" for i in range(int(first), int(last) + 1))
            assert re.search(rf"seeds of DeiT-T: ST n=0/\d+: {seeds}; WT n=\d+/\d+: {seeds};", doc), path

    @pytest.mark.slow
    def test_readme_marked_commands_run(self, tmp_path):
        """Each README block marked `<!-- test: runs; SCRIPT with FLAGS; ... -->` runs, line by line,
        in an empty folder: /data/APTOS2019 is a generated 40-image folder in APTOS's layout, the
        ImageNet files are randomly initialised checkpoints in an empty $TORCH_HOME, and each
        script's lines get the marker's tiny flags (docs: README, Tests and benchmarks)."""
        blocks = _readme_marked_blocks()
        assert blocks, "no README block is marked to run"
        aptos = tmp_path / "APTOS2019"
        _data_aptos(aptos, n=40)
        hub = tmp_path / "torch" / "hub" / "checkpoints"
        hub.mkdir(parents=True)
        work = tmp_path / "work"
        work.mkdir()
        env = dict(os.environ, TORCH_HOME=str(tmp_path / "torch"), OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
        for marker, lines in blocks:
            extra = {}
            for clause in marker.split(";")[1:]:
                script, _, flags = clause.strip().partition(" with ")
                extra[script] = flags.split()
            for line in lines:
                cmd = [w.replace("/data/APTOS2019", str(aptos)) for w in _readme_command(line, extra, sys.executable)]
                if "--model" in cmd:
                    model = cmd[cmd.index("--model") + 1]
                    name = os.path.basename(models.PRETRAINED_URLS[model])
                    if not (hub / name).exists():
                        torch.save({"model": models.create_model(model).state_dict()}, hub / name)
                res = subprocess.run(cmd, cwd=str(work), env=env, capture_output=True, text=True, timeout=300)
                assert res.returncode == 0, f"{line}\n{res.stdout[-2000:]}{res.stderr[-3000:]}"
        assert (work / "runs" / "deit_s-aptos-n5-s0" / "analysis" / "cka.json").exists()
        assert any(f.startswith("sweep_") for f in os.listdir(work / "figures"))
