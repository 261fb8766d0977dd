"""The paper's findings F1-F4, tested on a folder of run directories: findings.md and findings.json.

    python findings.py --runs runs/ --out figures/      (plots.py writes the same two files)

For every dataset with ST (n=0) and WT (n=N) runs, each finding and each model: the effect in
the paper's direction (e.g. mean WT test metric - mean ST test metric), its 95% interval and
p-value from Welch's t-test over seeds, and a verdict. The tests behind a dataset's verdicts
(one per finding and model, one per F4 gain pair) are one family: their p-values get Holm's
correction, so that a study of several findings says `supported` by luck at most 5% of the
time over all of them, not 5% for each:

- `supported`: the Holm-adjusted p is below 0.05 and the effect is in the paper's direction
  (two-sided test);
- `not resolved`: it is not; the text says how many seeds per initialisation an effect of
  the observed size and spread would need (80% power at 0.05 / tests), or "no effect seen";
- `contradicted`: significant (Holm) against the paper's direction;
- `not measured`: the runs cannot show it (missing runs or analyses, a model fact that is
  not recorded, or convergence censored by the iteration budget: the runs are named).

A finding over several models is `supported` only when it is for every model measured, and
`contradicted` when it is for any. Why Welch: with 3 seeds per initialisation it keeps its 5%
level for unequal spreads (the test's calibration is in test_all.py: about 2-3% of simulated
no-effect studies come out `supported`), and its interval reads in the metric's own units.
Why Holm: with one test per finding and model, 5 tests at 5% each made some verdict significant
by luck in 209 of 1,000 simulated 5-seed studies of no effect (40 with Holm; test_all.py,
test_findings_holm_keeps_the_family_at_5_percent); a verdict that a new set of seeds undoes is
one a reader should not cite. Holm controls that chance over the family at 5% for
any dependence between the tests, and is uniformly more powerful than Bonferroni.
The Student t distribution is computed here (regularized incomplete beta by continued
fraction), so this file needs only numpy, the standard library and rundir.py.

This file is also where run directories are read into the run dicts that plots.py draws
(`find_runs`), so there is one reader for both.
"""
import argparse
import json
import math
import os
import platform
import sys
import time

import numpy as np

import rundir

ANALYSES = rundir.ANALYSES
MODEL_ORDER = ["deit_t", "deit_s", "deit_s_5b", "deit_b", "swin_t", "resnet18", "resnet50", "resnet152", "inception_v3"]
DATA_ORDER = ["aptos", "ddsm", "isic", "chexpert", "camelyon", "synthetic", "shapes"]
PRETTY = {"deit_t": "DeiT-T", "deit_s": "DeiT-S", "deit_b": "DeiT-B", "deit_s_5b": "DeiT-S-5b", "swin_t": "Swin-T",
          "resnet18": "ResNet18", "resnet50": "ResNet50", "resnet152": "ResNet152", "inception_v3": "Inception-v3",
          "aptos": "APTOS2019", "ddsm": "DDSM", "isic": "ISIC2019", "chexpert": "CheXpert", "camelyon": "PCam",
          "quadratic_kappa": "quadratic kappa", "roc_auc": "ROC AUC", "macro_recall": "macro recall",
          "mean_auc": "mean AUC"}
# settings that should agree between the seeds averaged together (checked, not enforced)
SETTINGS = ["img_size", "subset", "split_seed", "epochs", "lr", "batch_size", "weights", "weight_decay", "warmup"]

SUPPORTED, NOT_RESOLVED, CONTRADICTED, NOT_MEASURED = "supported", "not resolved", "contradicted", "not measured"
VERDICTS = (SUPPORTED, NOT_RESOLVED, CONTRADICTED, NOT_MEASURED)
TEST = ("Welch's t-test over seeds (two-sided; 95% Welch interval; for a difference of gains, its "
        "Welch-Satterthwaite form over four groups), verdicts at 5% after Holm's correction over the dataset's tests")
ALPHA, POWER = 0.05, 0.8
MAX_SEEDS = 100      # seeds per initialisation beyond which "would resolve it" stops: no effect seen
MIN_SEEDS = 3        # fewer seeds per initialisation: findings.md warns that little can be resolved
EARLY_STOP = "early stopping"  # summary.json stop_reason of a run that stopped itself (not censored)

CLAIMS = {
    "F1": "WT gives a higher fine-tuned test metric than ST (Fig. 2, 7, 8); sub-results, not gates: "
          "WT-ST-n/m lies in between, and WT beats RI",
    "F2": "WT reaches its best validation metric in fewer iterations than ST (Fig. 8, 19)",
    "F3": "feature reuse: the early layers keep more of their initial features under WT (Fig. 9) than under ST "
          "(Fig. 12): CKA(initial layer i, fine-tuned layer i), feature type 'all', mean over the first third "
          "of the layers, is higher under WT",
    "F4": "models that mix tokens by attention gain more from WT over ST than convolutional ones (Fig. 2), and "
          "in a ViT's first third of blocks ST attention is more global (larger mean distance, patch keys "
          "renormalised) than WT (Fig. 18)",
}


def pretty(name):
    return PRETTY.get(name, str(name))


def order(values, reference):
    """Sort names by a reference order, unknown names after, alphabetically."""
    return sorted(set(values), key=lambda v: (reference.index(v) if v in reference else len(reference), str(v)))


# ----------------------------------------------------------------------------- reading runs
def run_facts(analyses):
    """Model facts that analyze.py writes into every analysis file ("facts": feature_types,
    has_attention, token_mixing), so no tool tests a model's name; older files: derived from
    their content (token_mixing then stays unknown)."""
    for doc in analyses.values():
        if isinstance(doc.get("facts"), dict):
            return dict({"feature_types": ["all"], "has_attention": False}, **doc["facts"])
    cka = analyses.get("cka", {}).get("values", {})
    types = sorted({t for v in cka.values() if isinstance(v, dict) for t in v}) if isinstance(cka, dict) else []
    return {"feature_types": types or ["all"], "has_attention": "attention" in analyses}


def bad_file(e):
    """A run file the tools cannot use: the one-line error that names it (rundir's check)."""
    return ValueError(f"{e}; fix or delete it (train.py / analyze.py rewrite it)")


def load_run(path, notes):
    """One run directory as a dict (config, data info, summary, analyses, model facts), or None
    to skip it. A config.json that is not a run's skips the folder with a note; a bad summary or
    analysis file of a run is an error naming it (rundir checks every file)."""
    cfg_path = os.path.join(path, rundir.CONFIG)
    try:
        raw = rundir.read_json(cfg_path)
    except (OSError, ValueError) as e:
        notes.append(f"skipped {path}: {e}")
        return None
    if not (isinstance(raw, dict) and raw.get("format") == rundir.FORMAT):
        notes.append(f"skipped {path}: its config.json is not a train.py run's")
        return None
    try:  # a run's config.json with values out of range is an error, not a run to draw
        doc = rundir.check_config(raw, cfg_path)
    except ValueError as e:
        raise bad_file(e) from None
    cfg, info = doc["config"], doc["data"]
    try:
        summary = rundir.read_summary(path, info.get("metric"))
    except ValueError as e:
        raise bad_file(e) from None
    if summary is None:
        notes.append(f"skipped {path}: no summary.json (run not finished)")
        return None
    # folder/csv runs are shown (and grouped) under the folder's name
    run = {"dir": path, "model": cfg["model"], "data": info.get("display_name") or cfg["data"], "init": cfg["init"],
           "n": cfg["n"], "N": cfg["N"], "seed": cfg["seed"], "summary": summary, "run_id": doc.get("run_id"),
           "metric": info.get("metric") or summary.get("metric") or "metric", "analysis": {}, "missing": [],
           "config": cfg, "info": info, "sizes": doc.get("sizes")}
    if run["init"] == "ri":
        run["n"] = None
    for a in ANALYSES:
        try:  # a file of another run (its run_id differs, e.g. left from before --overwrite) is absent
            got = rundir.read_analysis(path, a, doc.get("run_id"))
        except ValueError as e:
            raise bad_file(e) from None
        if got is None:
            run["missing"].append(a)
        else:
            run["analysis"][a] = got
    # config.json's facts (train.py, from models.py) first: they exist before any analysis
    run["facts"] = dict(run_facts(run["analysis"]), **doc.get("facts", {}))
    if not run["facts"]["has_attention"]:  # attention distance applies to global token attention only
        run["missing"] = [m for m in run["missing"] if not m.startswith("attention")]
    run["settings"] = {k: cfg.get(k) for k in SETTINGS}
    versions = doc.get("versions")
    run["versions"] = {k: str(v) for k, v in versions.items()} if isinstance(versions, dict) else {}
    return run


def find_runs(root):
    """All finished run directories under root (folders holding config.json), sorted; and the notes."""
    notes, runs = [], []
    for here, dirs, files in os.walk(root):
        dirs.sort()
        if "config.json" in files:
            dirs[:] = []  # a run's own subfolders (analysis/) hold no runs
            run = load_run(here, notes)
            if run is not None:
                runs.append(run)
    return runs, notes


def by_key(runs, *keys):
    groups = {}
    for r in runs:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    return groups


def n_key(n):
    """Sort inits: ST (n=0) ... WT (n=N), RI (None) last."""
    return (n is None, -1 if n is None else n)


def by_n(runs):
    groups = by_key(runs, "n")
    return [(n, groups[(n,)]) for n in sorted((k[0] for k in groups), key=n_key)]


def init_label(n, N):
    if n is None:
        return "RI"
    tag = "ST" if n == 0 else "WT" if n == N else "WT-ST"
    return f"{tag} n={n}/{N}"


def arr(x):
    """JSON numbers (null = undefined) as a float array with NaN."""
    try:
        return np.array(x, dtype=float)
    except (TypeError, ValueError):
        return np.array(float("nan"))


def nanmean(v):
    v = np.asarray(v, dtype=float)
    return float(v[np.isfinite(v)].mean()) if np.isfinite(v).any() else float("nan")


def test_value(run):
    """The test metric of the run's best checkpoint (summary.json); NaN when absent."""
    v = (run["summary"].get("test") or {}).get(run["metric"])
    return float(v) if isinstance(v, (int, float)) else float("nan")


# ----------------------------------------------------------------------------- Student's t
def _betacf(a, b, x):
    """Continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes 6.4)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        for aa in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),                   # even step
                   -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):       # odd step
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a, b, x):
    """Regularized incomplete beta I_x(a, b), a, b > 0, 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(a * math.log(x) + b * math.log1p(-x) + math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b))
    if x < (a + 1.0) / (a + b + 2.0):  # the fraction converges fast here; else use the symmetry
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_two_sided(t, df):
    """P(|T| >= |t|) for Student's t with df > 0 degrees of freedom (df may be fractional)."""
    t = abs(t)
    if math.isinf(t):
        return 0.0
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def t_cdf(t, df):
    """P(T <= t) for Student's t with df degrees of freedom."""
    tail = t_two_sided(t, df) / 2.0
    return 1.0 - tail if t > 0 else tail


def t_pdf(t, df):
    return math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - (df + 1) / 2 * math.log1p(t * t / df)) \
        / math.sqrt(df * math.pi)


def t_ppf(q, df):
    """The q-quantile of Student's t (0 < q < 1). Newton from 0: the cdf is concave above 0,
    so every step stays below the root and the iteration climbs to it without overshooting."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"t_ppf: q must be in (0, 1), got {q}")
    if q < 0.5:
        return -t_ppf(1.0 - q, df)
    t = 0.0
    for _ in range(500):
        step = (q - t_cdf(t, df)) / t_pdf(t, df)
        t += step
        if step <= 1e-12 * max(1.0, t):
            break
    return t


# ----------------------------------------------------------------------------- the test
def welch(groups, coefs=(1.0, -1.0), level=0.95):
    """Welch's t-test of "sum_i c_i mean_i = 0" over independent groups of seeds.

    effect = sum_i c_i mean(x_i); its variance sum_i c_i^2 s_i^2 / n_i (s_i^2 the sample
    variance); degrees of freedom by Welch-Satterthwaite, (sum_i w_i)^2 / sum_i w_i^2/(n_i-1)
    with w_i = c_i^2 s_i^2 / n_i. Two groups with c = (1, -1) is the usual Welch test; four
    groups with (1, -1, -1, 1) compare two differences (F4's gains).
    Returns {"effect", "se", "df", "t", "p" (two-sided), "ci": [lo, hi] at `level`, "exact", "why"}:
    p and ci are None when a group has fewer than 2 values (no spread to test against; "why"
    says which); when no group has any spread the effect is exact: ci [effect, effect], p 0
    (or 1 when the effect is 0), no division by zero."""
    x = [np.asarray(g, dtype=float) for g in groups]
    effect = float(sum(c * g.mean() for c, g in zip(coefs, x, strict=True))) if all(g.size for g in x) else float("nan")
    out = {"effect": effect, "se": None, "df": None, "t": None, "p": None, "ci": None, "exact": False, "why": None}
    if not all(g.size for g in x):
        out["why"] = "a group has no values"
        return out
    if min(g.size for g in x) < 2:
        out["why"] = "1 seed in a group: no spread, so no test"
        return out
    w = [c * c * g.var(ddof=1) / g.size for c, g in zip(coefs, x, strict=True)]
    var = sum(w)
    if var == 0.0:
        out.update(exact=True, se=0.0, p=0.0 if effect != 0 else 1.0, ci=[effect, effect])
        return out
    df = var * var / sum(wi * wi / (g.size - 1) for wi, g in zip(w, x, strict=True) if wi > 0)
    se = math.sqrt(var)
    half = t_ppf(0.5 + level / 2, df) * se
    out.update(se=se, df=df, t=effect / se, p=t_two_sided(effect / se, df), ci=[effect - half, effect + half])
    return out


def verdict_of(test, p_family=None):
    """The verdict word of a test: from its interval (above zero: supported; below: contradicted),
    or, for a test in a family, from its Holm-adjusted p (below ALPHA: the effect's sign decides)."""
    if test["ci"] is None:
        return NOT_RESOLVED
    if p_family is not None:
        return NOT_RESOLVED if p_family >= ALPHA else SUPPORTED if test["effect"] > 0 else CONTRADICTED
    lo, hi = test["ci"]
    return SUPPORTED if lo > 0 else CONTRADICTED if hi < 0 else NOT_RESOLVED


def seeds_needed(groups, coefs, effect, alpha=ALPHA, power=POWER, cap=MAX_SEEDS):
    """Seeds per initialisation (the same n in every group) at which Welch's test would find an
    effect of this size with the observed spread, with probability `power`:
    |effect| / se(n) >= t_{1-alpha/2, df(n)} + t_{power, df(n)} (the normal approximation with t
    quantiles, the observed numbers taken as true). None above `cap` seeds or for no effect."""
    a = [c * c * np.var(np.asarray(g, dtype=float), ddof=1) for c, g in zip(coefs, groups, strict=True)]
    total, squares = float(sum(a)), float(sum(ai * ai for ai in a))
    if not (effect and math.isfinite(effect)) or total <= 0:
        return None

    def enough(n):
        df = total * total * (n - 1) / squares
        return abs(effect) / math.sqrt(total / n) >= t_ppf(1 - alpha / 2, df) + t_ppf(power, df)

    if not enough(cap):
        return None
    lo, hi = 1, cap  # enough(hi) holds; find the smallest such n (enough grows with n)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if enough(mid) else (mid, hi)
    return hi


def combine(parts):
    """One verdict over several models (or parts): contradicted if any is; supported only when
    every measured one is; not measured when none is measured; else not resolved."""
    words = [p["verdict"] for p in parts]
    if CONTRADICTED in words:
        return CONTRADICTED
    measured = [w for w in words if w != NOT_MEASURED]
    if not measured:
        return NOT_MEASURED
    return SUPPORTED if all(w == SUPPORTED for w in measured) else NOT_RESOLVED


def holm(pvalues):
    """Holm's step-down adjusted p-values of {key: p}: the i-th smallest p (i = 0, 1, ...) times
    (m - i), kept non-decreasing, at most 1. Rejecting where the adjusted p < ALPHA keeps the
    chance of any false rejection among the m tests at ALPHA, whatever their dependence."""
    out, running = {}, 0.0
    keys = sorted(pvalues, key=lambda k: pvalues[k])
    for i, k in enumerate(keys):
        running = max(running, min(1.0, (len(keys) - i) * pvalues[k]))
        out[k] = running
    return out


# ----------------------------------------------------------------------------- one comparison
def fmt_p(test):
    if test["exact"]:
        return "p = 0 (exact: no spread in any group)" if test["effect"] else "p = 1 (exact: all values equal)"
    return "p < 0.001" if test["p"] < 0.001 else f"p = {test['p']:.3f}"


def seed_text(pairs, fmt):
    """'mean m (per seed: s0 a, s1 b)' of [(seed, value)]."""
    ok = [v for _, v in pairs if math.isfinite(v)]
    return ("mean " + fmt.format(np.mean(ok)) if ok else "no value") + " (per seed: " + \
        ", ".join(f"s{s} " + (fmt.format(v) if math.isfinite(v) else "none") for s, v in pairs) + ")"


def values_of(runs, value):
    """[(seed, value)] of runs sorted by seed."""
    return [(r["seed"], value(r)) for r in sorted(runs, key=lambda r: r["seed"])]


def finite(pairs):
    return [v for _, v in pairs if math.isfinite(v)]


def compare(named, coefs, what, fmt, holm_p=None):
    """Welch's test over groups [(label, [(seed, value)])] and its verdict, as a part result:
    {"verdict", "effect", "ci", "p", "df", "seeds", "text", "test"}; `what` names the effect.
    holm_p: (Holm-adjusted p, number of tests) when the test is one of a dataset's verdicts
    (findings_for); its verdict then comes from the adjusted p (added as "p_holm", "family")."""
    groups = [finite(pairs) for _, pairs in named]
    empty = [label for (label, _), g in zip(named, groups, strict=True) if not g]
    if empty:  # e.g. a test metric that is null in every run of a group
        return not_measured(f"{what}: no value in {', '.join(empty)}")
    seeds = {label: [s for s, v in pairs if math.isfinite(v)] for label, pairs in named}
    test = welch(groups, coefs)
    p_family, m = holm_p if holm_p is not None and test["p"] is not None else (None, 1)
    res = {"verdict": verdict_of(test, p_family), "effect": test["effect"], "ci": test["ci"], "p": test["p"],
           "df": test["df"], "seeds": seeds, "test": test}
    if p_family is not None:
        res.update(p_holm=p_family, family=m)
    if test["ci"] is None:
        one = [label for (label, _), g in zip(named, groups, strict=True) if len(g) == 1]
        res["text"] = (f"{what} {fmt.format(test['effect'])}; 1 seed in {', '.join(one)}: no spread, so no test: "
                       f"{NOT_RESOLVED} (run {MIN_SEEDS} or more seeds per initialisation)")
        return res
    lo, hi = test["ci"]
    df = "" if test["exact"] else f", df {test['df']:.1f}"
    adjusted = "" if p_family is None else f", Holm-adjusted over {m} test{'s' * (m > 1)} p = {p_family:.3f}"
    res["text"] = (f"{what} {fmt.format(test['effect'])}, 95% interval [{fmt.format(lo)}, {fmt.format(hi)}], "
                   f"{fmt_p(test)}{df}{adjusted}: {res['verdict']}")
    if res["verdict"] == NOT_RESOLVED:
        n = seeds_needed(groups, coefs, test["effect"], alpha=ALPHA / m)
        res["seeds_needed"] = n
        level = "" if m == 1 else f" at level {ALPHA}/{m}"
        res["text"] += (f" (no effect seen: one this small would need over {MAX_SEEDS} seeds per initialisation)"
                        if n is None else f" (about {n} seeds per initialisation would resolve an effect of this "
                        f"size and spread, 80% power{level})")
    return res


def not_measured(why):
    return {"verdict": NOT_MEASURED, "effect": None, "ci": None, "p": None, "df": None, "seeds": {},
            "text": f"{NOT_MEASURED}: {why}"}


def public(part):
    """The JSON form of a part result: verdict, effect, ci, p, seeds (and why / seeds needed)."""
    out = {k: part.get(k) for k in ("verdict", "effect", "ci", "p", "df", "seeds")}
    for k in ("p_holm", "family", "seeds_needed"):
        if k in part:
            out[k] = part[k]
    out["text"] = part["text"]
    return out


# ----------------------------------------------------------------------------- the values compared
def first_third(v):
    """Mean of the first ceil(len/3) entries, NaN entries left out (NaN when none)."""
    v = arr(v)
    return nanmean(v[: math.ceil(len(v) / 3)]) if v.ndim == 1 and len(v) else float("nan")


def window_text(layers, unit):
    """Which entries the first third is: 'layers 1-9 of 25 (patch_embed.proj .. blocks.3.attn)'."""
    k = math.ceil(len(layers) / 3)
    return f"{unit} 1-{k} of {len(layers)} ({layers[0]} .. {layers[k - 1]})" if layers else f"first third of the {unit}"


def early_cka(run):
    """Mean diagonal CKA(fine-tuned layer i, initial layer i), feature type 'all', first third of the layers."""
    doc = run["analysis"].get("cka")
    m = arr(((doc or {}).get("values", {}).get("init") or {}).get("all", []))
    return first_third(np.diagonal(m)) if m.ndim == 2 and m.size else float("nan")


def attention_block_value(key):
    def value(run):
        doc = run["analysis"].get("attention")
        return first_third(doc["values"].get(key, [])) if doc else float("nan")
    return value


def best_iteration(run):
    v = run["summary"].get("best_iteration")
    return float(v) if isinstance(v, (int, float)) else float("nan")


def censored(run):
    """A run whose training stopped for another reason than early stopping (its budget): its
    best iteration is a lower bound on the iterations it needed."""
    return not str(run["summary"].get("stop_reason") or "").startswith(EARLY_STOP)


def censor_text(label, run):
    s = run["summary"]
    still = " (best at its last validation: still improving)" if s.get("best_iteration") == s.get("iterations") else ""
    return f"{label} s{run['seed']}: best at iteration {s.get('best_iteration')} of {s.get('iterations')}{still}"


def learned(runs):
    """Whether a group of runs learned the task at all: (None: cannot tell, or True/False, text).
    Only for ROC AUC, whose chance level is known: the group's mean test AUC must exceed 0.5 by
    a one-sided z-test at 5% under the Mann-Whitney null, variance (n + 1) / (3 n^2) per run for
    n test images in two equal classes (the smallest null variance: the lenient side)."""
    v = [(r["seed"], test_value(r)) for r in runs]
    n = [r["sizes"][2] for r in runs if isinstance(r.get("sizes"), list) and len(r["sizes"]) == 3]
    if not runs or runs[0]["metric"] != "roc_auc" or len(n) != len(runs) or not finite(v):
        return None, ""
    var = sum((k + 1) / (3 * k * k) for k in n) / len(n) ** 2
    z = (nanmean([x for _, x in v]) - 0.5) / math.sqrt(var)
    p = 0.5 * math.erfc(z / math.sqrt(2))
    text = f"test ROC AUC {seed_text(v, '{:.3f}')}: above chance (0.5), one-sided z-test p = {p:.3g}"
    return p < ALPHA, text


def unlearned(m, why):
    """A not-measured result when the WT or ST runs did not learn the task (see learned), else None."""
    for label, g in (("WT", m["wt"]), ("ST", m["st"])):
        ok, text = learned(g)
        if ok is False:
            res = not_measured(f"the {label} runs did not learn the task ({text}, not significant): {why}")
            res["lines"] = [res["text"]]
            return res
    return None


# ----------------------------------------------------------------------------- F1-F4 for one model
def inits(mruns):
    """{'st', 'wt', 'ri', 'mid': [(n, runs)], 'N'} of one model's runs."""
    N = mruns[0]["N"]
    g = dict(by_n(mruns))
    return {"N": N, "st": g.get(0, []), "wt": g.get(N, []), "ri": g.get(None, []),
            "mid": [(n, rs) for n, rs in g.items() if n is not None and 0 < n < N]}


def f1(m, metric, holm_p=None):
    """WT above ST (the verdict); WT-ST-n/m in between and WT above RI (sub-results, not in the family:
    each at its own 5%)."""
    wt, st = values_of(m["wt"], test_value), values_of(m["st"], test_value)
    res = compare([("WT", wt), ("ST", st)], (1, -1), f"WT - ST test {metric}", "{:+.3f}", holm_p)
    res["lines"] = [f"test {metric}: WT {seed_text(wt, '{:.3f}')}; ST {seed_text(st, '{:.3f}')}", res["text"]]
    res["sub"] = {}
    for n, rs in sorted(m["mid"], key=lambda kv: kv[0]):
        label = init_label(n, m["N"])
        mid = values_of(rs, test_value)
        above = compare([(label, mid), ("ST", st)], (1, -1), f"{label} - ST", "{:+.3f}")
        below = compare([("WT", wt), (label, mid)], (1, -1), f"WT - {label}", "{:+.3f}")
        between = bool(finite(mid) and finite(st) and finite(wt)) and \
            np.mean(finite(st)) < np.mean(finite(mid)) < np.mean(finite(wt))
        res["sub"][label] = {"mean": nanmean(finite(mid)), "between_on_average": between,
                             "minus_st": public(above), "wt_minus": public(below)}
        res["lines"] += [f"sub-result {label}: {seed_text(mid, '{:.3f}')}; between ST and WT on average: "
                         f"{'yes' if between else 'no'}", f"  {above['text']}", f"  {below['text']}"]
    if m["ri"]:
        ri = values_of(m["ri"], test_value)
        beats = compare([("WT", wt), ("RI", ri)], (1, -1), "WT - RI", "{:+.3f}")
        res["sub"]["RI"] = {"mean": nanmean(finite(ri)), "wt_minus": public(beats)}
        res["lines"] += [f"sub-result RI: {seed_text(ri, '{:.3f}')}", f"  {beats['text']}"]
    else:
        res["sub"]["RI"] = {"verdict": NOT_MEASURED, "text": "no RI runs"}
        res["lines"].append(f"sub-result WT vs RI: {NOT_MEASURED} (no RI runs)")
    return res


def f2(m, metric, holm_p=None):
    """WT reaches its best validation in fewer iterations than ST; censored runs decide 'not measured'."""
    wt, st = values_of(m["wt"], best_iteration), values_of(m["st"], best_iteration)
    res = compare([("ST", st), ("WT", wt)], (1, -1), "ST - WT iterations to the best validation", "{:+.1f}", holm_p)
    chance = unlearned(m, "their best validation is a peak of noise, not a convergence")
    if chance is not None:
        chance["lines"] = [f"iterations to the best validation {metric}: WT {seed_text(wt, '{:.0f}')}; "
                           f"ST {seed_text(st, '{:.0f}')}"] + chance["lines"]
        chance["censored"] = []
        return chance
    its = lambda g: ", ".join(f"s{r['seed']} {r['summary'].get('iterations')}"
                              for r in sorted(g, key=lambda r: r["seed"]))
    lines = [f"iterations to the best validation {metric}: WT {seed_text(wt, '{:.0f}')}; ST {seed_text(st, '{:.0f}')}",
             f"iterations run: WT {its(m['wt'])}; ST {its(m['st'])}", res["text"]]
    cw = [censor_text("WT", r) for r in m["wt"] if censored(r)]
    cs = [censor_text("ST", r) for r in m["st"] if censored(r)]
    res["censored"] = cw + cs
    if cw + cs:
        lines.append("stopped by their budget, not by early stopping (best iteration = a lower bound): "
                     + "; ".join(cw + cs))
    if cw:  # WT's true iterations may be larger: "WT faster" cannot be read off
        res["verdict"] = NOT_MEASURED
        lines.append(f"{NOT_MEASURED}: WT runs stopped by their budget, so WT's iterations to its best are not known")
    elif cs and res["verdict"] != SUPPORTED:  # ST's true iterations may be larger: no verdict either way
        res["verdict"] = NOT_MEASURED
        lines.append(f"{NOT_MEASURED}: ST runs stopped by their budget, and the effect over these lower bounds "
                     "is not supported: ST's true iterations may be larger")
    elif cs:
        lines.append("supported although ST runs stopped by their budget: their true iterations are at least "
                     "these, so the true effect is at least as large (conservative)")
    res["lines"] = lines
    return res


def f3(m, holm_p=None):
    """Early-layer CKA to the initial model, WT above ST."""
    missing = [f"{init} s{r['seed']}" for init, g in (("WT", m["wt"]), ("ST", m["st"])) for r in g
               if "cka" not in r["analysis"]]
    wt, st = values_of(m["wt"], early_cka), values_of(m["st"], early_cka)
    if not finite(wt) or not finite(st):
        res = not_measured("needs analysis/cka.json (values.init.all) of the WT and ST runs")
        res["lines"] = [res["text"]]
        return res
    layers = next(r["analysis"]["cka"].get("layers", []) for r in m["wt"] + m["st"] if "cka" in r["analysis"])
    res = compare([("WT", wt), ("ST", st)], (1, -1), "WT - ST", "{:+.3f}", holm_p)
    chance = unlearned(m, "how far their features moved from their initial state says nothing about reuse")
    res["window"] = window_text(layers, "layers")
    head = (f"CKA(initial layer i, fine-tuned layer i), type 'all', mean over {res['window']}: "
            f"WT {seed_text(wt, '{:.3f}')}; ST {seed_text(st, '{:.3f}')}")
    if chance is not None:
        chance["window"], chance["lines"] = res["window"], [head] + chance["lines"]
        return chance
    res["lines"] = [head, res["text"]]
    if missing:
        res["lines"].append(f"runs without analysis/cka.json (left out): {', '.join(missing)}")
    return res


def f4_attention(model, m, holm_p=None):
    """ST attention more global than WT in the first third of the blocks (renormalised distance)."""
    runs = m["wt"] + m["st"]
    if not any(r["facts"].get("has_attention") for r in runs):
        return not_measured(f"{pretty(model)} has no global token attention (attention only within windows, "
                            "as Swin: no attention distance over the image)")
    key = "per_block_renormalized"
    have = [r for r in runs if key in (r["analysis"].get("attention") or {}).get("values", {})]
    if not any(r in have for r in m["wt"]) or not any(r in have for r in m["st"]):
        old = [r for r in runs if "attention" in r["analysis"] and r not in have]
        return not_measured("needs analysis/attention.json with the renormalised distance of the WT and ST runs"
                            + (" (these files predate it: rerun analyze.py --metric attention)" if old else ""))
    value = attention_block_value(key)
    wt, st = values_of(m["wt"], value), values_of(m["st"], value)
    res = compare([("ST", st), ("WT", wt)], (1, -1), f"{pretty(model)}: ST - WT distance (px)", "{:+.2f}", holm_p)
    blocks = next(r["analysis"]["attention"].get("layers", []) for r in have)
    res["window"] = window_text(blocks, "blocks")
    cls_wt = values_of(m["wt"], attention_block_value("cls_share_per_block"))
    cls_st = values_of(m["st"], attention_block_value("cls_share_per_block"))
    drop_wt, drop_st = values_of(m["wt"], attention_block_value("per_block")), \
        values_of(m["st"], attention_block_value("per_block"))
    res["lines"] = [f"{pretty(model)}: mean attention distance (px, renormalised over patch keys), {res['window']}: "
                    f"ST {seed_text(st, '{:.2f}')}; WT {seed_text(wt, '{:.2f}')}",
                    f"  CLS share of patch queries' attention: ST {seed_text(cls_st, '{:.3f}')}; "
                    f"WT {seed_text(cls_wt, '{:.3f}')}",
                    f"  (CLS key dropped, not renormalised; not used: ST {seed_text(drop_st, '{:.2f}')}; "
                    f"WT {seed_text(drop_wt, '{:.2f}')})", "  " + res["text"]]
    chance = unlearned(m, "their attention is still that of their initial weights, not of a trained model")
    if chance is not None:  # the distances are shown, the test is not
        chance["window"], chance["lines"] = res["window"], res["lines"][:3] + ["  " + chance["text"]]
        return chance
    return res


def f4_gain(a, ma, c, mc, metric, holm_p=None):
    """(WT - ST) of an attention model minus (WT - ST) of a convolutional one, over 4 groups of seeds."""
    g = [values_of(ma["wt"], test_value), values_of(ma["st"], test_value),
         values_of(mc["wt"], test_value), values_of(mc["st"], test_value)]
    named = [(f"{pretty(a)} WT", g[0]), (f"{pretty(a)} ST", g[1]), (f"{pretty(c)} WT", g[2]), (f"{pretty(c)} ST", g[3])]
    res = compare(named, (1, -1, -1, 1), f"gain {pretty(a)} - gain {pretty(c)}", "{:+.3f}", holm_p)
    gain = lambda wt, st: np.mean(finite(wt)) - np.mean(finite(st)) if finite(wt) and finite(st) else float("nan")
    res["lines"] = [f"gain = mean WT - mean ST test {metric}: {pretty(a)} {gain(g[0], g[1]):+.3f}, "
                    f"{pretty(c)} {gain(g[2], g[3]):+.3f}", "  " + res["text"]]
    return res


# ----------------------------------------------------------------------------- one dataset
def model_result(parts):
    return {k: public(p) for k, p in parts.items()}


def findings_for(druns):
    """{finding: {"verdict", "claim", "numbers", "models", ...}} for one dataset, over all its models.
    Every verdict's test is one of a family (each model's F1, F2, F3 and F4 attention test, each F4
    gain pair: those that ran): the tests are made once at their own level to learn their p-values,
    then again with Holm's adjusted p-values deciding the verdicts (a few Welch tests: no cost)."""
    models = order([r["model"] for r in druns], MODEL_ORDER)
    per = {mo: inits([r for r in druns if r["model"] == mo]) for mo in models}
    metric = pretty(druns[0]["metric"])
    usable = [mo for mo in models if per[mo]["st"] and per[mo]["wt"]]
    alone = dataset_findings(models, per, usable, metric, druns, {})
    pvalues = {(f, name): part["p"] for f, e in alone.items() for name, part in parts_of(e)
               if part["verdict"] != NOT_MEASURED and part.get("p") is not None}
    adjusted = holm(pvalues)
    return dataset_findings(models, per, usable, metric, druns, {k: (p, len(adjusted)) for k, p in adjusted.items()})


def dataset_findings(models, per, usable, metric, druns, holm_ps):
    """The findings of one dataset; holm_ps: {(finding, model or 'a - c'): (Holm-adjusted p, tests)}."""
    out = {}
    for f, fn in (("F1", lambda mo: f1(per[mo], metric, holm_ps.get(("F1", mo)))),
                  ("F2", lambda mo: f2(per[mo], metric, holm_ps.get(("F2", mo)))),
                  ("F3", lambda mo: f3(per[mo], holm_ps.get(("F3", mo))))):
        parts, lines = {}, []
        for mo in models:
            if mo not in usable:
                parts[mo] = not_measured("needs ST (n=0) and WT (n=N) runs")
                parts[mo]["lines"] = [parts[mo]["text"]]
            else:
                parts[mo] = fn(mo)
            lines += [f"{pretty(mo)}: {parts[mo]['verdict']}"] + [f"  {line}" for line in parts[mo]["lines"]]
        out[f] = {"verdict": combine(parts.values()), "claim": CLAIMS[f], "numbers": lines, "test": TEST,
                  "models": model_result(parts)}
        if f == "F1":
            for mo in usable:
                out[f]["models"][mo]["sub"] = parts[mo]["sub"]
        if f == "F3":
            out[f]["window"] = {mo: parts[mo]["window"] for mo in usable if "window" in parts[mo]}
        if f == "F2":
            out[f]["censored"] = {mo: parts[mo]["censored"] for mo in usable if parts[mo].get("censored")}
    out["F4"] = f4(druns, models, per, usable, metric, holm_ps)
    return out


def f4(druns, models, per, usable, metric, holm_ps):
    """F4 over the models grouped by the fact models.py states (config.json facts.token_mixing)."""
    mixing = {mo: {r["facts"].get("token_mixing") for r in druns if r["model"] == mo} for mo in models}
    unknown = [mo for mo in models if mixing[mo] - {"attention", "convolution"} or len(mixing[mo]) != 1]
    attn = [mo for mo in usable if mixing[mo] == {"attention"}]
    conv = [mo for mo in usable if mixing[mo] == {"convolution"}]
    lines = []
    if unknown:
        lines.append("not grouped (config.json has no facts.token_mixing: runs from before it was recorded; "
                     "rerun train.py): " + ", ".join(pretty(mo) for mo in unknown))
    lines.append("token mixing (models.py): " + "; ".join(
        f"{pretty(mo)} {'/'.join(sorted(map(str, mixing[mo])))}" for mo in models if mo not in unknown))
    halves = {}
    att_parts = {mo: f4_attention(mo, per[mo], holm_ps.get(("F4", mo))) for mo in attn}
    for mo, p in att_parts.items():
        p.setdefault("lines", [f"{pretty(mo)}: {p['text']}"])
    halves["attention"] = combine(att_parts.values()) if att_parts else NOT_MEASURED
    lines.append(f"attention half: {halves['attention']}" + ("" if att_parts else
                                                               " (no attention-based model with ST and WT runs)"))
    for p in att_parts.values():
        lines += [f"  {line}" for line in p["lines"]]
    gain_parts = {f"{a} - {c}": f4_gain(a, per[a], c, per[c], metric, holm_ps.get(("F4", f"{a} - {c}")))
                  for a in attn for c in conv}
    halves["gain"] = combine(gain_parts.values()) if gain_parts else NOT_MEASURED
    lines.append(f"gain half: {halves['gain']}" + ("" if gain_parts else
                                                     " (needs ST and WT runs of an attention-based and of a "
                                                     "convolutional model)"))
    for p in gain_parts.values():
        lines += [f"  {line}" for line in p["lines"]]
    words = list(halves.values())
    verdict = CONTRADICTED if CONTRADICTED in words else NOT_MEASURED if NOT_MEASURED in words else \
        SUPPORTED if all(w == SUPPORTED for w in words) else NOT_RESOLVED
    return {"verdict": verdict, "claim": CLAIMS["F4"], "numbers": lines, "test": TEST, "halves": halves,
            "models": model_result(att_parts), "gain": model_result(gain_parts),
            "windows": {mo: p["window"] for mo, p in att_parts.items() if "window" in p},
            "token_mixing": {mo: sorted(map(str, mixing[mo])) for mo in models}}


# ----------------------------------------------------------------------------- findings.md
def source_note(mruns):
    """Where the WT weights came from: the source run's task and test metric, if it is a run directory."""
    w = mruns[0]["settings"].get("weights")
    if not w or w == "imagenet":
        return f"weights: {w or 'none'}"
    src = os.path.dirname(w)
    try:
        s = rundir.read_summary(src) or {}
        return (f"source pretraining `{src}`: {pretty(s.get('model', '?'))} on {pretty(s.get('data', '?'))}, "
                f"test {pretty(s.get('metric', 'metric'))} "
                f"{float((s.get('test') or {}).get(s.get('metric'), float('nan'))):.3f} "
                f"after {s.get('iterations')} iterations")
    except (OSError, ValueError, TypeError):
        return f"weights: `{w}` (no readable summary.json beside it)"


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_note(runs):
    """Where and when the numbers were made: this machine, the runs' torch versions (config.json)."""
    torch_versions = sorted({r["versions"].get("torch") for r in runs if r["versions"].get("torch")})
    return (f"Written {time.strftime('%Y-%m-%d %H:%M')} on {platform.platform()}, CPU: {cpu_model()} "
            f"({os.cpu_count()} cores); the runs were trained with torch "
            f"{', '.join(torch_versions) or 'unknown (not in config.json)'}. Floating-point rounding differs "
            "between CPUs (and thread counts): another machine gives other digits for the same seeds. The "
            "digits here are this machine's; a verdict is meant to survive that noise, and an effect that is "
            "`not resolved` may fall either way there.")


def seeds_line(druns, model):
    mr = [r for r in druns if r["model"] == model]
    parts = [f"{init_label(n, mr[0]['N'])}: " + " ".join(f"s{r['seed']}" for r in sorted(g, key=lambda r: r["seed"]))
             for n, g in by_n(mr)]
    return f"seeds of {pretty(model)}: " + "; ".join(parts)


def parts_of(entry):
    """[(name, part)] of a finding: one per model, then F4's gain pairs ('deit_t - resnet18')."""
    return list(entry.get("models", {}).items()) + list(entry.get("gain", {}).items())


def pretty_part(name):
    """'DeiT-T', or 'DeiT-T - ResNet18' for a pair."""
    return " - ".join(pretty(x) for x in name.split(" - "))


def unmeasured_note(entry):
    """' (not measured: ResNet18)' when a verdict over several models leaves some out."""
    out = [pretty_part(name) for name, p in parts_of(entry) if p["verdict"] == NOT_MEASURED]
    return f" (not measured: {', '.join(out)})" if out and entry["verdict"] != NOT_MEASURED else ""


def summary_cell(entry):
    """The per-model column of the table: 'DeiT-T: supported, +0.192 [+0.05, +0.33], p = 0.02'."""
    cells = []
    for name, part in parts_of(entry):
        if " - " in name:  # F4's gain half: a pair of models
            label = pretty_part(name) + " gain"
        else:
            label = pretty(name) + (" attention" if "halves" in entry else "")
        if part["ci"] is None:
            cells.append(f"{label}: {part['verdict']}")
        else:
            digits = 1 if abs(part["effect"]) >= 10 else 3
            f = f"{{:+.{digits}f}}"
            p = "p < 0.001" if part["p"] is not None and part["p"] < 0.001 else f"p = {part['p']:.3f}"
            if part.get("family", 1) > 1:
                p += f", Holm {part['p_holm']:.3f}"
            cells.append(f"{label}: {part['verdict']}, {f.format(part['effect'])} "
                         f"[{f.format(part['ci'][0])}, {f.format(part['ci'][1])}], {p}")
    return "<br>".join(cells) or "-"


def compared_runs(druns, model):
    """The ST and WT runs of a model, or none when either is missing (nothing is compared)."""
    m = inits([r for r in druns if r["model"] == model])
    return [m["st"], m["wt"]] if m["st"] and m["wt"] else []


def dataset_md(data, druns, res):
    models = order([r["model"] for r in druns], MODEL_ORDER)
    md = [f"## {pretty(data)}", ""]
    md += [f"- {source_note([r for r in druns if r['model'] == mo])} (for {pretty(mo)})" for mo in models]
    md += [f"- {seeds_line(druns, mo)}" for mo in models]
    counts = [len(g) for mo in models for g in compared_runs(druns, mo)]  # seeds behind each verdict
    seeds = min(counts) if counts else MIN_SEEDS
    if seeds < MIN_SEEDS:
        md += ["", f"**Warning: only {seeds} seed(s) per initialisation: "
                   + ("no spread can be measured, so no finding can be supported" if seeds < 2 else
                      "the test has 1-2 degrees of freedom, so only a very large effect is resolved")
                   + f" (run at least {MIN_SEEDS}).**"]
    tests = [f"{f} {pretty_part(name)}" for f, e in res.items() for name, part in parts_of(e) if "p_holm" in part]
    md += ["", f"Holm's correction over the {len(tests)} test{'s' * (len(tests) != 1)} that decide a verdict here: "
               + (", ".join(tests) or "none") + "."]
    md += ["", "| finding | paper's claim | verdict | per model: effect in the paper's direction "
               "[95% interval], p, Holm's p |", "|---|---|---|---|"]
    md += [f"| {f} | {CLAIMS[f]} | **{e['verdict']}**{unmeasured_note(e)} | {summary_cell(e)} |"
           for f, e in res.items()]
    md.append("")
    for f, e in res.items():
        md += [f"### {f}: {e['verdict']}", "", f"Paper: {CLAIMS[f]}.", "", "```"] + e["numbers"] + ["```", ""]
    return md


def findings_doc(runs):
    """{data: {finding: {...}}} for every dataset with ST runs, and the markdown."""
    md = ["# Findings", "",
          "Written by findings.py (plots.py writes it too) from the run directories' summary.json and "
          f"analysis/*.json. Test: {TEST}, over the seeds of each initialisation. The effect is in the "
          "paper's direction (positive = as the paper found). Each verdict rests on one test per model (per pair "
          "of models for F4's gain); the tests of a dataset are one family, and Holm's correction keeps the "
          "chance that any of them comes out significant by luck at 5%. Verdicts: `supported` (Holm-adjusted "
          "p < 0.05, effect in the paper's direction), `not resolved` (not significant; the seeds per "
          "initialisation an effect of this size and spread would need at the family's level are given, 80% "
          "power), `contradicted` (significant against the paper), `not measured` (runs, analyses or facts "
          "missing, or convergence censored by the budget). The 95% interval is each test's own, uncorrected; "
          "F1's sub-results are at their own 5%. A finding over several models is `supported` only when it is "
          "for every model measured, `contradicted` when it is for any.", "",
          machine_note(runs), ""]
    doc = {}
    for data in order([r["data"] for r in runs], DATA_ORDER):
        druns = [r for r in runs if r["data"] == data]
        if not any(r["n"] == 0 for r in druns):
            continue  # no ST runs: e.g. a source pretraining, not a WT-ST sweep
        doc[data] = findings_for(druns)
        md += dataset_md(data, druns, doc[data])
    if not doc:
        md.append("No dataset has both ST (n=0) and WT runs: nothing to compare.")
    return doc, "\n".join(md) + "\n"


def write_findings(runs, out, written):
    """findings.md and findings.json in `out` (atomic writes); returns the markdown."""
    doc, text = findings_doc(runs)
    for name, payload in (("findings.md", text), ("findings.json", json.dumps(rundir.json_safe(doc), indent=1) + "\n")):
        path = os.path.join(out, name)
        rundir.write_bytes(path, payload.encode())
        written.append(path)
    return text


# ----------------------------------------------------------------------------- command line
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default="runs",
                   help="folder searched recursively for run directories (default: %(default)s)")
    p.add_argument("--out", default="figures", help="folder for findings.md and findings.json (default: %(default)s)")
    p.error = lambda message: p.exit(2, f"findings.py: error: {message} (see --help)\n")  # one line, no usage
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        rundir.check_writable_dir(args.out, "--out")
        if not os.path.isdir(args.runs):
            raise FileNotFoundError(f"--runs {args.runs}: no such folder (expected a folder of run directories)")
        runs, notes = find_runs(args.runs)
        if not runs:
            raise FileNotFoundError(f"--runs {args.runs}: no finished run directories (config.json + summary.json)")
        for note in notes:
            print(note)
        rundir.make_dir(args.out, "--out")
        written = []
        print(write_findings(runs, args.out, written))
    except (ValueError, OSError) as e:
        print(f"findings.py: error: {e}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
