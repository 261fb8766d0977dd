"""The paper's figures and Table 4 from a folder of run directories and their analyses.

    python plots.py --runs runs/ --out figures/ [--format png,pdf] [--spread minmax|std]

Runs are found recursively (any folder with a config.json), grouped by (model, dataset,
initialisation n) and aggregated over seeds: lines are the mean over seeds with a band
(min-max, or mean +- one std), CKA matrices the nanmean over seeds. Runs without
summary.json are skipped; missing analysis files are listed, never fatal; a figure with
no data is not written. Only numpy, matplotlib (Agg) and the standard library are used.

Files written to --out (one per format for figures), x = WT fraction n/N, 0 = ST, 1 = WT:

| file | what (paper figure) |
|---|---|
| `sweep_<data>.png` | test metric vs WT fraction, one line per model, RI dashed (Fig. 2, 7, 8) |
| `cka_init_<model>_<data>.png` | CKA fine-tuned (rows) vs initial (columns) layers, one panel per n (Fig. 9, 12) |
| `cka_ref_<model>_<data>.png` | CKA fine-tuned (rows) vs the --ref run's fine-tuned layers, e.g. WT vs ST (Fig. 10) |
| `cka_types_<model>_<data>.png` | DeiT only: as cka_ref (cka_init if no ref), rows = cls / patches / all (Fig. 11) |
| `knn_<model>_<data>.png` | k-NN metric vs depth per n (DeiT: per feature type); max over depth vs n (Fig. 13, 15) |
| `knn_max_<data>.png` | max k-NN metric over depth vs WT fraction, one line per model (Fig. 14) |
| `reinit_<model>_<data>.png` | test metric with one layer reverted to init, and the drop, one line per n (Fig. 16) |
| `l2_<model>_<data>.png` | l2 distance init -> fine-tuned per layer, one line per n (Fig. 17) |
| `attention_<model>_<data>.png` | DeiT only: mean attention distance per block, one line per n (Fig. 18) |
| `curves_<model>_<data>.png` | training loss, validation metric and lr vs iteration (log.jsonl), a colour per n |
| `convergence_<data>.png` | iterations to the best validation vs n, and the speed-up over ST (Fig. 19) |
| `table.md`, `table.csv` | test metric mean +- sample std over seeds, rows (model, init), columns datasets (Table 4) |
| `findings.md`, `findings.json` | findings F1-F4 tested over seeds per dataset with ST and WT runs (findings.py) |
"""
import argparse
import csv
import io
import json
import math
import os
import sys
import warnings

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

import findings  # noqa: E402
import rundir  # noqa: E402
from findings import (  # noqa: E402
    DATA_ORDER,
    MODEL_ORDER,
    SETTINGS,
    arr,
    by_key,
    by_n,
    init_label,
    n_key,
    nanmean,
    order,
    pretty,
    test_value,
)

TYPES = ["cls", "patches", "all"]
MAX_TICKS = 26  # layer tick labels per axis before thinning


def model_color(model):
    """The same colour for a model in every figure."""
    i = MODEL_ORDER.index(model) if model in MODEL_ORDER else len(MODEL_ORDER) + sum(map(ord, model))
    return plt.cm.tab10.colors[i % 10]


# ----------------------------------------------------------------------------- reading runs
def read_log(run, notes):
    """rundir.read_log; a log that fails its check is left out of the curves with a note."""
    try:
        return rundir.read_log(run)
    except ValueError as e:
        notes.append(f"note: {e}; its training curves are left out")
        return []


def find_runs(root):
    """findings.find_runs (the one reader of run directories), with each run's training log
    (log.jsonl) for the curves; and the notes."""
    runs, notes = findings.find_runs(root)
    for r in runs:
        r["log"] = read_log(r["dir"], notes)
    return runs, notes


def check_groups(runs):
    """Notes on seeds that will be averaged together but differ in their settings, or repeat."""
    notes = []
    for (model, data, n), g in sorted(by_key(runs, "model", "data", "n").items(), key=lambda kv: str(kv[0])):
        what = f"{model} on {data}, {init_label(n, g[0]['N'])}"
        differ = [k for k in SETTINGS if len({json.dumps(r["settings"][k]) for r in g}) > 1]
        if differ:
            notes.append(f"note: {what}: runs averaged together differ in {', '.join(differ)}")
        seeds = [r["seed"] for r in g]
        twice = sorted({s for s in seeds if seeds.count(s) > 1}, key=str)
        if twice:
            notes.append(f"note: {what}: seed(s) {twice} appear in more than one run directory (all are averaged)")
    return notes


def n_color(n, N):
    return "0.25" if n is None else plt.cm.viridis(0.9 * (n / N if N else 0))


def stack(vectors):
    """Seeds' arrays stacked on axis 0, keeping those with the most common shape."""
    vectors = [v for v in vectors if v.size]
    if not vectors:
        return None
    shapes = [v.shape for v in vectors]
    common = max(set(shapes), key=shapes.count)
    return np.stack([v for v in vectors if v.shape == common])


def nanstats(Y, spread):
    """Mean over seeds (axis 0) and the band: min-max or mean +- std."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(Y, 0)
        if spread == "std":
            s = np.nanstd(Y, 0)
            return mean, mean - s, mean + s
        return mean, np.nanmin(Y, 0), np.nanmax(Y, 0)


def fraction_sweep(groups, N, value):
    """A quantity vs WT fraction: x = n/N per n group (RI left out), Y = [seed, point] with
    value(item), NaN-padded where a setting has fewer seeds; and the RI values."""
    sweep = [(n, [value(i) for i in items]) for n, items in groups if n is not None]
    Y = np.full((max([len(v) for _, v in sweep] + [0]), len(sweep)), np.nan)
    for j, (_, v) in enumerate(sweep):
        Y[: len(v), j] = v
    ri = [value(i) for n, items in groups if n is None for i in items]
    return np.array([n / N for n, _ in sweep]), Y, [v for v in ri if math.isfinite(v)]


def best_layer(doc, t):
    """Max over layers of a k-NN analysis' values for feature type t (NaN if none)."""
    v = arr(doc["values"].get(t, []))
    return float(np.nanmax(v)) if v.ndim == 1 and np.isfinite(v).any() else float("nan")


# ----------------------------------------------------------------------------- drawing helpers
def band(ax, x, Y, spread, label, color, style="-", marker="o"):
    """Mean line over the seeds (rows of Y) with a shaded band; returns the mean."""
    mean, lo, hi = nanstats(Y, spread)
    ax.plot(x, mean, style, color=color, label=label, marker=marker, ms=3.5, lw=1.5)
    if len(Y) > 1:
        ax.fill_between(x, lo, hi, color=color, alpha=0.18, lw=0)
    return mean


def short(layer):
    """Compact layer names for tick labels: blocks.3.attn -> b3.attn, layer2.1 -> L2.1."""
    s = layer.replace("patch_embed.proj", "patch").replace("blocks.", "b").replace("features.", "f")
    s = s.replace("layer", "L").replace("Conv2d_", "C").replace("Mixed_", "M")
    for tail in ("_3x3", "_1x1"):
        s = s.replace(tail, "")
    return s


def layer_ticks(ax, layers, axis="x"):
    step = max(1, math.ceil(len(layers) / MAX_TICKS))
    idx = list(range(0, len(layers), step))
    labels = [short(layers[i]) for i in idx]
    if axis == "x":
        ax.set_xticks(idx)
        ax.set_xticklabels(labels, rotation=90, fontsize=7)
    else:
        ax.set_yticks(idx)
        ax.set_yticklabels(labels, fontsize=7)


def fraction_axis(ax):
    ax.set_xlim(-0.05, 1.05)
    ticks = [0, 0.25, 0.5, 0.75, 1]
    ax.set_xticks(ticks)
    ax.set_xticklabels(["0\nST", "0.25", "0.5", "0.75", "1\nWT"])
    ax.set_xlabel("WT fraction n/N")


def legend(ax, **kw):
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(fontsize=7, ncol=1 if len(handles) <= 12 else 2, **kw)


def side_legend(ax):
    legend(ax, loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)


def figure_legend(fig, axes):
    """One legend right of the figure with every labelled line of the axes, each label once."""
    seen = {}
    for ax in axes:
        for h, l in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(l, h)
    if seen:
        fig.legend(list(seen.values()), list(seen), loc="outside right center", fontsize=7, frameon=False)


def save(fig, out, name, formats, written):
    """Save each format atomically (rundir.atomic_write: a full disk is one error naming the file)."""
    for fmt in formats:
        path = os.path.join(out, f"{name}.{fmt}")
        rundir.atomic_write(path, lambda tmp, fmt=fmt: fig.savefig(tmp, format=fmt, dpi=150))
        written.append(path)
    plt.close(fig)


def save_text(out, name, text, written):
    path = os.path.join(out, name)
    rundir.write_bytes(path, text.encode())
    written.append(path)


def seeds_note(k):
    return f"{k} seed{'s' if k != 1 else ''}"


def spread_note(spread):
    return "mean, band = " + ("min-max" if spread == "minmax" else "+-1 std") + " over seeds"


# ----------------------------------------------------------------------------- figures
def plot_sweep(runs, data, args, written):
    """Figure 2/7/8: test metric vs WT fraction, a line per model; RI as a dashed line."""
    fig, ax = plt.subplots(figsize=(7, 4.2), layout="constrained")
    metric, drawn = runs[0]["metric"], False
    for model in order([r["model"] for r in runs], MODEL_ORDER):
        mruns, color = [r for r in runs if r["model"] == model], model_color(model)
        x, Y, ri = fraction_sweep(by_n(mruns), mruns[0]["N"], test_value)
        if x.size:
            for j in range(len(x)):  # each seed as a faint dot
                ax.scatter([x[j]] * len(Y), Y[:, j], color=color, s=8, alpha=0.5, lw=0)
            mean = band(ax, x, Y, args.spread, pretty(model), color)
            for j in range(len(x)):  # mark the ends: ST square, WT star
                if x[j] in (0, 1):
                    ax.plot(x[j], mean[j], "s" if x[j] == 0 else "*", color=color, ms=7 if x[j] == 0 else 9,
                            mec="k", mew=0.6)
            drawn = True
        if ri:
            ax.axhline(np.mean(ri), color=color, ls="--", lw=1.2, label=f"{pretty(model)} RI ({len(ri)})")
            drawn = True
    if not drawn:
        plt.close(fig)
        return
    fraction_axis(ax)
    ax.set_ylabel(f"test {pretty(metric)}")
    ax.set_title(f"{pretty(data)}: WT-ST-n/m sweep ({spread_note(args.spread)}; square = ST, star = WT)", fontsize=9)
    ax.grid(alpha=0.3)
    side_legend(ax)
    save(fig, args.out, f"sweep_{data}", args.formats, written)


def cka_panels(ax_row, mats, layers_r, layers_c, titles, ylabel, xlabel):
    ims = []
    cmap = plt.get_cmap("magma").with_extremes(bad="0.7")  # grey = undefined (null) CKA
    for ax, M, title, lc in zip(ax_row, mats, titles, layers_c):
        im = ax.imshow(M, vmin=0, vmax=1, cmap=cmap, origin="lower", aspect="auto", interpolation="nearest")
        ims.append(im)
        ax.set_title(title, fontsize=8)
        layer_ticks(ax, lc, "x")
        layer_ticks(ax, layers_r, "y")
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
    return ims


def cka_mean(docs, key, t):
    """nanmean over seeds of values[key][t]; None if absent."""
    mats = [arr((d["values"].get(key) or {}).get(t)) for d in docs]
    M = stack([m for m in mats if m.ndim == 2])
    if M is None:
        return None, 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(M, 0), len(M)


def pick(items, k):
    """At most k items, evenly spaced, keeping both ends."""
    if len(items) <= k:
        return items
    return [items[i] for i in sorted(set(np.linspace(0, len(items) - 1, k).round().astype(int)))]


def cka_grid(panels, row_types, model, data, what, args, name, written, max_cols=6):
    """panels: [(title, {type: matrix}, row layers, column layers, ylabel, xlabel)]; rows = types."""
    panels = [p for p in panels if any(p[1].get(t) is not None for t in row_types)]
    if not panels:
        return
    ncols = min(len(panels), max_cols) if len(row_types) == 1 else len(panels)
    chunks = [panels[i:i + ncols] for i in range(0, len(panels), ncols)]
    nrows = len(chunks) * len(row_types)
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(5.5, 3.1 * ncols + 1.2), 3.1 * nrows + 0.8),
                             layout="constrained", squeeze=False)
    im = None
    for c, chunk in enumerate(chunks):
        for i, t in enumerate(row_types):
            row = axes[c * len(row_types) + i]
            for j, (title, mats, lr, lc, yl, xl) in enumerate(chunk):
                M = mats.get(t)
                if M is None:
                    row[j].set_axis_off()
                    continue
                ttl = f"{title}\nfeatures: {t}" if len(row_types) > 1 else title
                im = cka_panels([row[j]], [M], lr, [lc], [ttl], yl, xl)[0]
            for ax in row[len(chunk):]:
                ax.set_axis_off()
    fig.colorbar(im, ax=axes, shrink=0.8 if nrows < 3 else 0.4, label="linear CKA (grey: undefined)")
    fig.suptitle(f"{pretty(model)} on {pretty(data)}\n{what} (mean over seeds)", fontsize=10)
    save(fig, args.out, name, args.formats, written)


def ref_config(settings):
    """config of the --ref run named in a CKA analysis, if its folder is still there."""
    try:
        return rundir.read_config(settings["ref"])["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def ref_model(settings, default):
    return settings.get("ref_model") or ref_config(settings).get("model") or default


def ref_N(settings, default):
    return settings.get("ref_N") or ref_config(settings).get("N") or default


def plot_cka(runs, model, data, args, written):
    """Figures 9-12: CKA fine-tuned vs init (per n), vs a reference run (e.g. WT vs ST), per type."""
    have = [r for r in runs if "cka" in r["analysis"]]
    if not have:
        return
    N = have[0]["N"]
    init_panels = []
    for n, g in by_n(have):
        docs = [r["analysis"]["cka"] for r in g]
        layers = docs[0].get("layers", [])
        mats, k = {}, 0
        for t in TYPES:
            mats[t], kt = cka_mean(docs, "init", t)
            k = max(k, kt)
        if k:
            init_panels.append((f"{init_label(n, N)} ({seeds_note(k)})", mats, layers, layers,
                                f"fine-tuned {pretty(model)} layer", f"initial {pretty(model)} layer"))
    ref_groups = {}
    for r in have:
        doc = r["analysis"]["cka"]
        if isinstance(doc["values"], dict) and doc["values"].get("ref"):
            s = doc.get("settings", {})
            key = (r["n"], s.get("ref_n"), s.get("ref_init"), ref_model(s, model))
            ref_groups.setdefault(key, []).append(doc)
    ref_panels = []
    for (n, rn, rinit, rmodel), docs in sorted(ref_groups.items(),
                                               key=lambda kv: (n_key(kv[0][0]), n_key(kv[0][1]), kv[0][3])):
        layers = docs[0].get("layers", [])
        ref_layers = docs[0].get("settings", {}).get("ref_layers") or layers
        mats, k = {}, 0
        for t in TYPES:
            mats[t], kt = cka_mean(docs, "ref", t)
            k = max(k, kt)
        a, b = init_label(n, N), "RI" if rinit == "ri" else init_label(rn, ref_N(docs[0]["settings"], N))
        title = f"{a} vs {b if rmodel == model else pretty(rmodel) + ' ' + b} ({seeds_note(k)})"
        if k:
            ref_panels.append((title, mats, layers, ref_layers, f"{a.split()[0]} fine-tuned {pretty(model)} layer",
                               f"{b.split()[0]} fine-tuned {pretty(rmodel)} layer"))
    cka_grid(init_panels, ["all"], model, data, "CKA fine-tuned vs initial model", args,
             f"cka_init_{model}_{data}", written)
    cka_grid(ref_panels, ["all"], model, data, "CKA between fine-tuned models", args,
             f"cka_ref_{model}_{data}", written)
    if any(len(r["facts"]["feature_types"]) > 1 for r in have):
        panels = ref_panels or pick(init_panels, 4)
        what = "CKA per feature type, " + ("between fine-tuned models" if ref_panels else "fine-tuned vs initial")
        cka_grid(panels, TYPES, model, data, what, args, f"cka_types_{model}_{data}", written)


def layer_lines(ax, groups, N, key, args, layers=None):
    """One mean-over-seeds line per n of a per-layer quantity; key(doc) -> vector."""
    drawn = False
    for n, docs in groups:
        Y = stack([arr(key(d)) for d in docs])
        if Y is None or Y.ndim != 2:
            continue
        band(ax, np.arange(Y.shape[1]), Y, args.spread, f"{init_label(n, N)} ({len(Y)})", n_color(n, N),
             "--" if n is None else "-", "x" if n is None else "o")
        drawn = True
    if drawn and layers:
        layer_ticks(ax, layers)
    ax.grid(alpha=0.3)
    return drawn


def analysis_groups(runs, name):
    """[(n, [analysis docs])] for the runs holding this analysis."""
    have = [r for r in runs if name in r["analysis"]]
    return [(n, [r["analysis"][name] for r in g]) for n, g in by_n(have)]


def plot_knn(runs, model, data, args, written):
    """Figures 13/15: k-NN metric per layer, one line per n (a panel per feature type), and
    the max over depth vs WT fraction."""
    groups = analysis_groups(runs, "knn")
    if not groups:
        return
    N, metric = runs[0]["N"], runs[0]["metric"]
    types = [t for t in TYPES if any(t in d["values"] for _, ds in groups for d in ds)]
    if not types:
        return
    layers = groups[0][1][0].get("layers", [])
    width = max(4.5, 0.2 * len(layers))
    fig, axes = plt.subplots(1, len(types) + 1, figsize=(width * len(types) + 5.5, 4.2), layout="constrained",
                             squeeze=False)
    axes = axes[0]
    for ax, t in zip(axes, types):
        layer_lines(ax, groups, N, lambda d, t=t: d["values"].get(t, []), args, layers)
        ax.set_title(f"k-NN per layer, features: {t}", fontsize=9)
        ax.set_xlabel("layer")
        ax.set_ylabel(f"k-NN test {pretty(metric)}")
    side_legend(axes[len(types) - 1])
    ax = axes[-1]
    colors = {"cls": "tab:blue", "patches": "tab:orange", "all": "tab:green"}
    for t in types:
        x, Y, ri = fraction_sweep(groups, N, lambda d, t=t: best_layer(d, t))
        if x.size:
            band(ax, x, Y, args.spread, f"features: {t}", colors[t])
        if ri:
            ax.axhline(np.mean(ri), color=colors[t], ls="--", lw=1, label=f"RI, {t}")
    fraction_axis(ax)
    ax.set_ylabel(f"max over layers of k-NN {pretty(metric)}")
    ax.set_title("best layer vs WT fraction", fontsize=9)
    ax.grid(alpha=0.3)
    legend(ax, loc="best")
    fig.suptitle(f"{pretty(model)} on {pretty(data)}: layer-wise k-NN ({spread_note(args.spread)})", fontsize=10)
    save(fig, args.out, f"knn_{model}_{data}", args.formats, written)


def plot_knn_max(runs, data, args, written):
    """Figure 14: max k-NN metric over depth vs WT fraction, one line per model ('all' features)."""
    fig, ax = plt.subplots(figsize=(7, 4.2), layout="constrained")
    drawn, metric = False, runs[0]["metric"]
    for model in order([r["model"] for r in runs], MODEL_ORDER):
        color = model_color(model)
        mruns = [r for r in runs if r["model"] == model]
        x, Y, ri = fraction_sweep(analysis_groups(mruns, "knn"), mruns[0]["N"], lambda d: best_layer(d, "all"))
        if x.size:
            band(ax, x, Y, args.spread, pretty(model), color)
            drawn = True
        if ri:
            ax.axhline(np.mean(ri), color=color, ls="--", lw=1.2, label=f"{pretty(model)} RI")
            drawn = True
    if not drawn:
        plt.close(fig)
        return
    fraction_axis(ax)
    ax.set_ylabel(f"max over layers of k-NN {pretty(metric)}")
    ax.set_title(f"{pretty(data)}: best-layer k-NN vs WT fraction ({spread_note(args.spread)})", fontsize=9)
    ax.grid(alpha=0.3)
    side_legend(ax)
    save(fig, args.out, f"knn_max_{data}", args.formats, written)


def plot_reinit(runs, model, data, args, written):
    """Figure 16: test metric with one layer reverted to its initial weights, and the drop."""
    groups = analysis_groups(runs, "reinit")
    if not groups:
        return
    N, metric = runs[0]["N"], runs[0]["metric"]
    layers = groups[0][1][0].get("layers", [])
    width = max(5, 0.22 * len(layers))
    fig, axes = plt.subplots(1, 2, figsize=(2 * width + 2.5, 4.4), layout="constrained")
    layer_lines(axes[0], groups, N, lambda d: d["values"].get("reverted", []), args, layers)
    layer_lines(axes[1], groups, N, lambda d: d["values"].get("drop", []), args, layers)
    axes[0].set_ylabel(f"test {pretty(metric)}, layer reverted to init")
    axes[1].set_ylabel(f"drop in test {pretty(metric)} (baseline - reverted)")
    axes[1].axhline(0, color="k", lw=0.6)
    for ax, what in zip(axes, ["metric after reverting", "drop"]):
        ax.set_xlabel("reverted layer")
        ax.set_title(what, fontsize=9)
    side_legend(axes[1])
    fig.suptitle(f"{pretty(model)} on {pretty(data)}: re-initialisation robustness ({spread_note(args.spread)})",
                 fontsize=10)
    save(fig, args.out, f"reinit_{model}_{data}", args.formats, written)


def plot_l2(runs, model, data, args, written):
    """Figure 17: l2 distance between initial and fine-tuned weights per layer."""
    groups = analysis_groups(runs, "l2")
    if not groups:
        return
    N = runs[0]["N"]
    layers = groups[0][1][0].get("layers", [])
    fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(layers)) + 2.5, 4.2), layout="constrained")
    if not layer_lines(ax, groups, N, lambda d: d["values"], args, layers):
        plt.close(fig)
        return
    allv = np.concatenate([arr(d["values"]).ravel() for _, ds in groups for d in ds])
    allv = allv[np.isfinite(allv)]
    if allv.size and allv.min() > 0 and allv.max() / allv.min() > 30:
        ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("l2 distance init -> fine-tuned / #weights")
    ax.set_title(f"{pretty(model)} on {pretty(data)}: weight l2 distance per layer ({spread_note(args.spread)})",
                 fontsize=9)
    side_legend(ax)
    save(fig, args.out, f"l2_{model}_{data}", args.formats, written)


def plot_attention(runs, model, data, args, written):
    """Figure 18: mean attention distance per block (DeiT), one line per n: renormalised over
    the patch keys where every file has it (what findings use), else with the CLS key dropped."""
    groups = analysis_groups(runs, "attention")
    if not groups:
        return
    N = runs[0]["N"]
    layers = groups[0][1][0].get("layers", [])
    renorm = all("per_block_renormalized" in d["values"] for _, docs in groups for d in docs)
    key = "per_block_renormalized" if renorm else "per_block"
    fig, ax = plt.subplots(figsize=(7.5, 4.2), layout="constrained")
    if not layer_lines(ax, groups, N, lambda d: d["values"].get(key, []), args):
        plt.close(fig)
        return
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels([short(l).replace(".attn", "") for l in layers], fontsize=7)
    ax.set_xlabel("block")
    ax.set_ylabel("mean attention distance (px, " + ("renormalised over patch keys)" if renorm else "CLS key dropped)"))
    ax.set_title(f"{pretty(model)} on {pretty(data)}: mean attended distance ({spread_note(args.spread)})",
                 fontsize=9)
    side_legend(ax)
    save(fig, args.out, f"attention_{model}_{data}", args.formats, written)


def convergence_value(run):
    doc = run["analysis"].get("convergence")
    v = doc["values"].get("best_iteration") if doc else run["summary"].get("best_iteration")
    return float(v) if isinstance(v, (int, float)) else float("nan")


def plot_convergence(runs, data, args, written):
    """Figure 19: iterations to the best validation metric vs WT fraction, and speed-up over ST.
    Uses analysis/convergence.json, or summary.json's best_iteration where it is missing."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), layout="constrained")
    drawn = sped = False
    for model in order([r["model"] for r in runs], MODEL_ORDER):
        color = model_color(model)
        mruns = [r for r in runs if r["model"] == model]
        x, Y, ri = fraction_sweep(by_n(mruns), mruns[0]["N"], convergence_value)
        if x.size:
            band(axes[0], x, Y, args.spread, pretty(model), color)
            drawn = True
            if x[0] == 0 and math.isfinite(nanmean(Y[:, 0])):
                pos = np.where(Y > 0, Y, np.nan)  # best at iteration 0: no speed-up defined
                band(axes[1], x, nanmean(Y[:, 0]) / pos, args.spread, pretty(model), color)
                sped = True
        if ri:
            axes[0].axhline(np.mean(ri), color=color, ls="--", lw=1.2, label=f"{pretty(model)} RI")
            drawn = True
    if not drawn:
        plt.close(fig)
        return
    axes[0].set_ylabel("iterations to best validation metric")
    axes[0].set_title("convergence", fontsize=9)
    axes[1].set_ylabel("speed-up over ST (iterations ST / iterations)")
    axes[1].set_title("relative speed-up" if sped else "relative speed-up (needs ST runs, n=0)", fontsize=9)
    axes[1].axhline(1, color="k", lw=0.6)
    for ax in axes:
        fraction_axis(ax)
        ax.grid(alpha=0.3)
    figure_legend(fig, axes)
    fig.suptitle(f"{pretty(data)}: convergence speed vs WT fraction ({spread_note(args.spread)})", fontsize=10)
    save(fig, args.out, f"convergence_{data}", args.formats, written)


def curve(log, key, sub=None):
    """(iterations, values) of the log records holding `key` (and val[sub]); non-numbers are NaN."""
    pts = [(r["iteration"], r[key] if sub is None else r[key].get(sub)) for r in log
           if key in r and (sub is None or isinstance(r[key], dict))]
    return arr([p[0] for p in pts]), arr([v if isinstance(v, (int, float)) else None for _, v in pts])


def plot_curves(runs, model, data, args, written):
    """Training curves of every run: training loss, validation metric and lr vs iteration,
    one colour per WT fraction (RI dashed), each seed its own line."""
    have = [r for r in runs if r["log"]]
    if not have:
        return
    N, metric = have[0]["N"], have[0]["metric"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), layout="constrained")
    drawn = False
    for n, g in by_n(have):
        for k, r in enumerate(sorted(g, key=lambda r: str(r["seed"]))):
            style = dict(color=n_color(n, N), ls="--" if n is None else "-", lw=1, alpha=0.8,
                         label=f"{init_label(n, N)} ({len(g)})" if k == 0 else None)
            for ax, (key, sub) in zip(axes, [("train_loss", None), ("val", metric), ("lr", None)]):
                x, y = curve(r["log"], key, sub)
                if x.ndim == 1 and np.isfinite(y).any():
                    ax.plot(x, y, **style)
                    drawn = True
    if not drawn:
        plt.close(fig)
        return
    for ax, label in zip(axes, ["training loss", f"validation {pretty(metric)}", "learning rate"]):
        ax.set_xlabel("iteration")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    if axes[2].get_lines() and all(np.nanmin(ln.get_ydata()) > 0 for ln in axes[2].get_lines()):
        axes[2].set_yscale("log")  # warm-up ramp and x0.1 plateau steps read as straight lines
    figure_legend(fig, axes)
    fig.suptitle(f"{pretty(model)} on {pretty(data)}: training curves (one line per run, colour = WT fraction)",
                 fontsize=10)
    save(fig, args.out, f"curves_{model}_{data}", args.formats, written)


# ----------------------------------------------------------------------------- Table 4
def table_rows(runs):
    """[(model, init label, {data: [test values]}, {data: metric})] in a stable order."""
    rows = {}
    for r in runs:
        rows.setdefault((r["model"], r["n"], r["N"]), {}).setdefault(r["data"], []).append(test_value(r))
    models = order([k[0] for k in rows], MODEL_ORDER)
    keys = sorted(rows, key=lambda k: (models.index(k[0]), k[1] is None, -(k[1] if k[1] is not None else 0)))
    return [(m, init_label(n, N), rows[(m, n, N)]) for m, n, N in keys]


def mean_std(values):
    v = np.array([x for x in values if math.isfinite(x)])
    if not v.size:
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else float("nan"), int(v.size)


def write_table(runs, args, written):
    """Table 4 style: test metric mean +- std (sample std) over seeds, rows = model + init."""
    datasets = order([r["data"] for r in runs], DATA_ORDER)
    metric = {d: next(r["metric"] for r in runs if r["data"] == d) for d in datasets}
    rows = table_rows(runs)
    md = ["# Test metric per model and initialisation", "",
          "Mean ± sample std over seeds of the test metric of the best checkpoint (summary.json); "
          "(k) = number of runs.", "",
          "| model | init | " + " | ".join(f"{pretty(d)} ({pretty(metric[d])})" for d in datasets) + " |",
          "|---|---|" + "---|" * len(datasets)]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["model", "init"] + [f"{d}_{s}" for d in datasets for s in ("mean", "std", "runs")])
    for model, label, cells in rows:
        md_cells, csv_cells = [], []
        for d in datasets:
            m, s, k = mean_std(cells.get(d, []))
            if not k:
                md_cells.append("-")
            elif math.isnan(s):
                md_cells.append(f"{m:.3f} ({k})")
            else:
                md_cells.append(f"{m:.3f} ± {s:.3f} ({k})")
            csv_cells += ["" if not k else f"{m:.6g}", "" if math.isnan(s) else f"{s:.6g}", k]
        md.append(f"| {pretty(model)} | {label} | " + " | ".join(md_cells) + " |")
        w.writerow([model, label] + csv_cells)
    save_text(args.out, "table.md", "\n".join(md) + "\n", written)
    save_text(args.out, "table.csv", buf.getvalue(), written)


# ----------------------------------------------------------------------------- main
def parse_args(argv=None):
    class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
        pass  # defaults in the flag help, and the docstring's table of files kept as written

    p = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    p.add_argument("--runs", default="runs", help="folder searched recursively for run directories (with config.json)")
    p.add_argument("--out", default="figures", help="output folder for figures and table.md/table.csv")
    p.add_argument("--format", default="png,pdf", help="comma-separated figure formats: png, pdf, svg")
    p.add_argument("--spread", choices=["minmax", "std"], default="minmax",
                   help="band around the mean over seeds: min-max or mean +- one std")
    p.error = lambda message: p.exit(2, f"plots.py: error: {message} (see --help)\n")  # one line, no usage
    return p.parse_args(argv)


def draw(fn, what, have_data, written, notes, *fn_args):
    """Run one figure function; a figure dropped although its inputs exist gets a note, and an
    input the figure cannot use is a one-line error instead of a traceback."""
    before = len(written)
    try:
        fn(*fn_args)
    except (TypeError, AttributeError, KeyError, IndexError, ValueError) as e:
        plt.close("all")
        raise ValueError(f"{what}: its input files do not have the README's layout "
                         f"({type(e).__name__}: {e})") from None
    if have_data and len(written) == before:
        notes.append(f"note: {what} not drawn: its values are not numbers (null, text or mismatched shapes)")


def plot_all(args):
    """Find the runs, draw every figure that has data; returns the files written."""
    rundir.check_writable_dir(args.out, "--out")
    if not os.path.isdir(args.runs):
        raise FileNotFoundError(f"--runs {args.runs}: no such folder (expected a folder of run directories)")
    args.formats = [f.strip().lower() for f in args.format.split(",") if f.strip()]
    bad = [f for f in args.formats if f not in ("png", "pdf", "svg")]
    if bad or not args.formats:
        raise ValueError(f"--format {args.format!r}: expected a comma-separated list of png, pdf, svg")
    runs, notes = find_runs(args.runs)
    for note in notes:
        print(note)
    if not runs:
        raise FileNotFoundError(f"--runs {args.runs}: no finished run directories (config.json + summary.json) found")
    for note in check_groups(runs):
        print(note)
    missing = {}  # analysis -> runs without it (study.sh runs re-init on one run per model, by design)
    for r in runs:
        for m in r["missing"]:
            missing.setdefault(m, []).append(r["dir"])
    if missing:
        print(f"missing analyses ({len(runs)} runs; figures use the runs that have them):")
        for m, dirs in missing.items():
            print(f"  {m}: {len(dirs)} run(s)" + (": " + ", ".join(dirs) if len(dirs) <= 3 else ""))
    rundir.make_dir(args.out, "--out")
    rundir.remove_stale_tmp(args.out)
    written, notes = [], []
    datasets = order([r["data"] for r in runs], DATA_ORDER)
    for data in datasets:
        druns = [r for r in runs if r["data"] == data]
        tests = any(r["summary"].get("test") for r in druns)
        draw(plot_sweep, f"sweep_{data}", tests, written, notes, druns, data, args, written)
        draw(plot_knn_max, f"knn_max_{data}", any("knn" in r["analysis"] for r in druns), written, notes,
             druns, data, args, written)
        draw(plot_convergence, f"convergence_{data}", False, written, notes, druns, data, args, written)
        for model in order([r["model"] for r in druns], MODEL_ORDER):
            mruns = [r for r in druns if r["model"] == model]
            figures = [(plot_curves, "curves", "log"), (plot_cka, "cka", "cka"), (plot_knn, "knn", "knn"),
                       (plot_reinit, "reinit", "reinit"), (plot_l2, "l2", "l2")]
            if any(r["facts"]["has_attention"] for r in mruns):
                figures.append((plot_attention, "attention", "attention"))
            for fn, name, source in figures:
                have = any(r[source] if source == "log" else source in r["analysis"] for r in mruns)
                draw(fn, f"{name}_{model}_{data}", have, written, notes, mruns, model, data, args, written)
    write_table(runs, args, written)
    for note in notes:
        print(note)
    print(findings.write_findings(runs, args.out, written))
    return written


def main(argv=None):
    args = parse_args(argv)
    try:
        written = plot_all(args)
    except (ValueError, OSError) as e:
        print(f"plots.py: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(written)} files to {os.path.abspath(args.out)}:")
    for path in written:
        print(f"  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
