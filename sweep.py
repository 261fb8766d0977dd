"""The study as one plan of jobs, run on this machine or on a SLURM cluster.

    python sweep.py                                    # the offline study (what `bash study.sh` runs)
    python sweep.py --data folder --data-root /data/mine --models "deit_s resnet50"
    python sweep.py --executor slurm --partition gpu --gpus-per-job 1 --data aptos --data-root /data/APTOS2019
    python sweep.py --executor print ...               # the commands, one per line, for another scheduler

What runs is `plan()`: source pretraining (offline study only), every fine-tuning run (WT-ST-n/m
for each n and seed, random init), every analysis and the figures/findings step, each job with
its command (an argv list) and the jobs it needs. How it runs is the executor:
- local (default): worker processes; one job per GPU (each worker pinned with
  CUDA_VISIBLE_DEVICES), on a CPU the cores split between the workers. A worker runs its jobs in
  its own process (`python train.py ...` semantics, torch imported once per worker); each job
  writes one log, <runs>/logs/<job>.log; the first failure stops every worker and is printed.
- slurm: one job array per stage (a stage = jobs whose longest chain of needs has the same
  length), each stage after the stages it needs (--dependency=afterok). A task runs
  `python sweep.py --run-task <stage file>` with $SLURM_ARRAY_TASK_ID picking its job.
- print: the commands in dependency order.
Re-running skips finished work (a finished run: rundir.run_finished; an analysis: every file it
writes is rundir.analysis_done for the run's identity); killed runs continue (--resume).
One sweep at a time per --runs folder (a lock; a second one is refused with one line, exit 2).
"""
import argparse
import contextlib
import json
import math
import os
import re
import runpy
import select
import shlex
import shutil
import signal
import subprocess
import sys
import time
import traceback

import rundir

HERE = os.path.dirname(os.path.abspath(__file__))

# ----------------------------------------------------------------------------- the offline study
# Every default of the offline study lives in this table (and those of the study on your own
# data in the next); nothing else in this file holds a study setting. A --models entry
# `model:size:lr:source lr:source epochs:epochs:batch` overrides its model's row field by field.
OFFLINE = {
    "source": "shapes",      # the ImageNet stand-in: each model is pretrained on it once, from random init
    "target": "lesions",     # the small medical stand-in, fine-tuned with WT-ST-n/m from the source's best.pt
    "models": {              # image size (px), target lr, source lr, source epochs, target epochs, target batch
        "resnet18": {"size": 32, "lr": 1e-4, "source_lr": 1e-3, "source_epochs": 2, "epochs": 30, "batch": 32},
        "deit_t": {"size": 64, "lr": 3e-4, "source_lr": 5e-4, "source_epochs": 10, "epochs": 30, "batch": 32},
    },
    "other_model": {"size": None, "lr": None, "source_lr": None,  # a model not above (None: train.py's default)
                    "source_epochs": 3, "epochs": 5, "batch": 32},
    "source_recipe": {"batch": 32, "warmup": 30, "patience": 10},
    "warmup": 6, "patience": 6, "plateau": 2,  # target runs; patience and plateau count validations after warm-up
    "seeds": [0, 1, 2, 3, 4],  # 5 seeds: Welch's t over 3 vs 3 (df ~2) resolves only very large effects
    "ri_seeds": "first",     # random init is a reference, not a WT-ST init: the first seed only ("all": every seed)
    "ns": "0 N",             # n values of WT-ST-n/m (N: the model's module groups): ST and WT, the verdicts' pair
    "reinit": "first-wt",    # re-init (the slowest analysis) on the first seed's run of the largest n only
    "device": "cpu",
    "format": "png",
}
OWN_DATA = {                 # --data DATA: from ImageNet weights, train.py's recipe (None: train.py's default)
    "models": "deit_s", "weights": "imagenet", "warmup": None, "patience": None, "plateau": None,
    "seeds": [0, 1, 2], "ri_seeds": "all", "ns": "0 N/2 N", "reinit": "first-wt", "device": None,
    "format": "png,pdf",
}
ENTRY_FIELDS = ["size", "lr", "source_lr", "source_epochs", "epochs", "batch"]  # after the model, in this order
TIMING = ("wall_seconds", "train_seconds", "images_per_second")  # summary.json fields that differ run to run
LOG_TAIL = 15                # lines of a failed job's log printed


class Stop(Exception):
    """Bad input: one line, exit 2, nothing written."""


# ----------------------------------------------------------------------------- inputs
def whole(flag, text, low=1):
    """An integer >= low from a flag's text, else a one-line error naming the flag."""
    try:
        v = int(text)
    except (TypeError, ValueError):
        v = None
    if v is None or v < low or str(text).strip() != str(text):
        raise Stop(f"{flag} {text}: expected a whole number >= {low}")
    return v


def positive(flag, text):
    """A finite float > 0 (a learning rate)."""
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not (math.isfinite(v) and v > 0):
        raise Stop(f"{flag} {text}: expected a finite number > 0")
    return v


def words(text):
    """Items of a list flag: separated by spaces or commas."""
    return [w for w in re.split(r"[\s,]+", text or "") if w]


def parse_entry(entry, offline, overrides):
    """One --models entry model[:size[:lr[:source lr[:source epochs[:epochs[:batch]]]]]] ->
    {model, size, lr, source_lr, source_epochs, epochs, batch}. Empty fields take the model's
    row of OFFLINE (offline study) or train.py's defaults (own data); --size, --lr, --epochs,
    --batch and --source-epochs override every entry."""
    model, *fields = entry.split(":")
    if not model or len(fields) > len(ENTRY_FIELDS):
        raise Stop(f"--models entry {entry!r}: expected model[:size[:lr[:source lr[:source epochs[:epochs[:batch]]]]]]")
    row = dict(OFFLINE["models"].get(model, OFFLINE["other_model"])) if offline else dict.fromkeys(ENTRY_FIELDS)
    for name, text in zip(ENTRY_FIELDS, fields):
        if text:
            flag = f"--models entry {entry!r}: {name.replace('_', ' ')}"
            row[name] = positive(flag, text) if name.endswith("lr") else whole(flag, text)
    for name, value in overrides.items():
        if value is not None:
            row[name] = value
    if offline and row["source_lr"] is None:
        row["source_lr"] = row["lr"]
    return {"model": model, **row}


def n_values(spec, N):
    """The n of WT-ST-n/m for a model of N module groups: integers, 'N' or 'N/2', sorted, unique."""
    ns = {N if w == "N" else N // 2 if w == "N/2" else int(w) for w in words(spec)}
    return sorted(ns)


def check_ns(spec):
    for w in words(spec):
        if w not in ("N", "N/2") and not re.fullmatch(r"\d+", w):
            raise Stop(f"--ns {spec}: {w!r} is not a whole number >= 0, N or N/2")
    if not words(spec):
        raise Stop(f"--ns {spec!r}: expected n values, e.g. '0 N/2 N'")
    return spec


def study_settings(args):
    """Every flag checked and resolved to the study's settings (a dict plan() reads); a bad value
    raises Stop naming the flag. Reads the file system (data root, weights) but writes nothing."""
    offline = args.data is None
    d = OFFLINE if offline else OWN_DATA
    if offline and args.weights is not None:
        raise Stop(f"--weights {args.weights}: only with --data (the offline study pretrains its own on "
                   f"'{args.source or OFFLINE['source']}')")
    if offline and args.data_root is not None:
        raise Stop(f"--data-root {args.data_root}: only with --data (the offline study's tasks are generated)")
    if not offline and (args.source is not None or args.target is not None):
        raise Stop(f"--{'source' if args.source is not None else 'target'}: only for the offline study "
                   "(without --data)")
    overrides = {name: None if text is None else (positive if name == "lr" else whole)(f"--{flag}", text)
                 for name, flag, text in (("size", "size", args.size), ("lr", "lr", args.lr),
                                          ("epochs", "epochs", args.epochs), ("batch", "batch", args.batch),
                                          ("source_epochs", "source-epochs", args.source_epochs))}
    entries = [parse_entry(e, offline, overrides) for e in words(args.models or default_models(d))]
    if not entries:
        raise Stop(f"--models {args.models!r}: expected at least one model entry")
    names = [e["model"] for e in entries]
    twice = [m for m in names if names.count(m) > 1]
    if twice:
        raise Stop(f"--models {args.models}: {twice[0]} appears twice (its runs would share folders)")
    seeds = [whole("--seeds", s, 0) for s in words(args.seeds)] if args.seeds else d["seeds"]
    if not seeds or len(set(seeds)) != len(seeds):
        raise Stop(f"--seeds {args.seeds!r}: expected distinct whole numbers >= 0")
    if args.ri_seeds is not None:
        ri = [] if args.ri_seeds.strip() == "none" else [whole("--ri-seeds", s, 0) for s in words(args.ri_seeds)]
        bad = [s for s in ri if s not in seeds]
        if bad:
            raise Stop(f"--ri-seeds {args.ri_seeds}: seed {bad[0]} is not one of --seeds ({' '.join(map(str, seeds))})")
    else:
        ri = seeds[:1] if d["ri_seeds"] == "first" else list(seeds)
    formats = words(args.format or d["format"])
    if not formats or any(f not in ("png", "pdf", "svg") for f in formats):
        raise Stop(f"--format {args.format}: expected png, pdf or svg, comma-separated")
    device = args.device if args.device is not None else d["device"]
    if device == "auto":
        device = None
    if device is not None and not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise Stop(f"--device {device}: expected cpu, cuda, cuda:K or auto")
    study = {
        "offline": offline, "source": (args.source or OFFLINE["source"]) if offline else None,
        "data": (args.target or OFFLINE["target"]) if offline else args.data, "data_root": args.data_root,
        "weights": None if offline else (args.weights or OWN_DATA["weights"]), "models": entries,
        "ns": check_ns(args.ns if args.ns is not None else d["ns"]), "seeds": seeds, "ri_seeds": ri,
        "reinit": d["reinit"],
        "warmup": whole("--warmup", args.warmup, 0) if args.warmup is not None else d["warmup"],
        "patience": whole("--patience", args.patience) if args.patience is not None else d["patience"],
        "plateau": whole("--plateau", args.plateau) if args.plateau is not None else d["plateau"],
        "subset": whole("--subset", args.subset) if args.subset is not None else None,
        "device": device, "runs": args.runs, "figures": args.figures, "format": ",".join(formats)}
    check_data(study)
    for flag, folder in (("--runs", args.runs), ("--figures", args.figures)):
        try:
            rundir.check_writable_dir(folder, flag)
        except ValueError as e:
            raise Stop(str(e)) from None
    return study


def default_models(d):
    """The default --models of a mode (OFFLINE or OWN_DATA) as entries."""
    return " ".join(d["models"]) if isinstance(d["models"], dict) else d["models"]


def check_data(study):
    """The datasets exist (names; a folder for data that needs one) and the weights file too."""
    import data  # torch and torchvision: only once the cheap checks have passed
    for flag, name in (("--source", study["source"]), ("--target" if study["offline"] else "--data", study["data"])):
        if name is not None and name not in data.DATASETS:
            raise Stop(f"{flag} {name}: unknown dataset (expected one of {', '.join(data.DATASETS)})")
    if study["offline"]:
        for flag, name in (("--source", study["source"]), ("--target", study["data"])):
            if name not in data.GENERATED_TASKS:
                raise Stop(f"{flag} {name}: the offline study uses generated tasks "
                           f"({', '.join(data.GENERATED_TASKS)}); "
                           "for data on disk pass --data and --data-root")
        return
    root = study["data_root"]
    if study["data"] not in data.GENERATED_TASKS:
        if root is None:
            raise Stop(f"--data {study['data']}: needs --data-root (the dataset's folder)")
        if not os.path.isdir(root):
            raise Stop(f"--data-root {root}: no such folder")
    w = study["weights"]
    if w != "imagenet" and not os.path.isfile(w):
        raise Stop(f"--weights {w}: no such checkpoint file (expected 'imagenet' or a path)")


def model_facts(entries):
    """{model: (N module groups, has global attention)}, asked of models.py on the meta device
    (no memory, no weights). A bad model name or size is a Stop naming the entry."""
    import torch

    import models
    facts = {}
    for e in entries:
        size = e["size"] or 224
        try:
            with torch.device("meta"):
                m = models.create_model(e["model"], num_classes=2, img_size=size)
        except ValueError as err:
            raise Stop(f"--models entry {e['model']} at size {size}: {err}") from None
        facts[e["model"]] = (len(m.wtst_groups()), bool(m.attention_layers()))
    return facts


# ----------------------------------------------------------------------------- the plan
def run_name(model, data, n, seed):
    return f"{model}-{data}-{'ri' if n == 'ri' else f'n{n}'}-s{seed}"


def plan(study, facts):
    """Every job of the study, in dependency order: [{id, kind (train, analyze, figures), argv
    (script and its arguments), needs (ids), run, metrics (the analysis files it writes), ref,
    log}]. Pure: reads nothing, writes nothing; facts = model_facts(study['models'])."""
    runs, data = study["runs"], study["data"]
    target = os.path.join(runs, "target")
    dev = ["--device", study["device"]] if study["device"] else []
    subset = ["--subset", str(study["subset"])] if study["subset"] else []
    data_args = ["--data", data] + (["--data-root", study["data_root"]] if study["data_root"] else [])
    tune = [x for flag, v in (("--warmup", study["warmup"]), ("--patience", study["patience"]),
                              ("--plateau-patience", study["plateau"])) if v is not None for x in (flag, str(v))]
    jobs = []

    def add(kind, run, argv, needs=(), metrics=(), ref=None):
        name = "figures" if run is None else f"{kind}-{os.path.basename(run)}"
        jobs.append({"id": f"{kind} {run}" if run else kind, "kind": kind, "argv": argv, "needs": list(needs),
                     "run": run, "metrics": list(metrics), "ref": ref,
                     "log": os.path.join(runs, "logs", f"{name}.log")})
        return jobs[-1]["id"]

    def flag(name, v):
        return [name, f"{v:g}" if isinstance(v, float) else str(v)] if v is not None else []

    for e in study["models"]:
        model, (N, attention) = e["model"], facts[e["model"]]
        ns = n_values(study["ns"], N)
        img = flag("--img-size", e["size"])
        opt = flag("--lr", e["lr"]) + flag("--epochs", e["epochs"]) + flag("--batch-size", e["batch"])
        src_needs = []
        if study["offline"]:
            src = os.path.join(runs, "source", f"{model}-{study['source']}")
            r = OFFLINE["source_recipe"]
            src_needs = [add("train", src, ["train.py", "--model", model, "--data", study["source"], "--init", "ri",
                                            *img, *flag("--lr", e["source_lr"]), "--epochs", str(e["source_epochs"]),
                                            "--batch-size", str(r["batch"]), "--warmup", str(r["warmup"]),
                                            "--patience", str(r["patience"]), *dev, *subset, "--out", src,
                                            "--resume"])]
            weights = os.path.join(src, "best.pt")
        else:
            weights = study["weights"]
        trained = {}  # (n, seed) -> train job id
        for seed in study["seeds"]:
            for n in ns:
                run = os.path.join(target, run_name(model, data, n, seed))
                trained[n, seed] = add("train", run, ["train.py", "--model", model, *data_args, "--n", str(n),
                                                      "--weights", weights, *img, *opt, *tune, "--seed", str(seed),
                                                      *dev, *subset, "--out", run, "--resume"], src_needs)
            if seed in study["ri_seeds"]:
                run = os.path.join(target, run_name(model, data, "ri", seed))
                trained["ri", seed] = add("train", run, ["train.py", "--model", model, *data_args, "--init", "ri",
                                                         *img, *opt, *tune, "--seed", str(seed), *dev, *subset,
                                                         "--out", run, "--resume"])
        for (n, seed), train_id in list(trained.items()):
            run = os.path.join(target, run_name(model, data, n, seed))
            full = reinit_here(study["reinit"], n, seed, ns, study["seeds"])
            metrics = [m for m in rundir.ANALYSES if (m != "reinit" or full) and (m != "attention" or attention)]
            ref, needs = None, [train_id]
            if n == ns[-1] and len(ns) > 1:  # CKA of WT (the largest n) against ST (the smallest), same seed
                ref = os.path.join(target, run_name(model, data, ns[0], seed))
                needs.append(trained[ns[0], seed])
            argv = ["analyze.py", "--run", run, "--metric", "all", *([] if full else ["--skip", "reinit"]),
                    *(["--ref", ref] if ref else []), *dev]
            add("analyze", run, argv, needs, metrics, ref)
    add("figures", None, ["plots.py", "--runs", target, "--out", study["figures"], "--format", study["format"]],
        [j["id"] for j in jobs])
    return jobs


def reinit_here(rule, n, seed, ns, seeds):
    """Whether a run gets the re-init analysis (the slowest): 'first-wt' the first seed's run of
    the largest n, 'wt' every seed's run of the largest n, 'all' every run."""
    return rule == "all" or (n == ns[-1] and (rule == "wt" or seed == seeds[0]))


# ----------------------------------------------------------------------------- what is done
def job_done(job):
    """A finished run (config.json and summary.json valid); an analysis whose every file belongs
    to the finished run (its run_id), with CKA against --ref when it has one. The figures are
    drawn again each time (from whatever the runs hold)."""
    if job["kind"] == "train":
        return rundir.run_finished(job["run"])
    if job["kind"] != "analyze" or not rundir.run_finished(job["run"]):
        return False
    try:
        run_id = rundir.load_run(job["run"])["run_id"]
        if not all(rundir.analysis_done(job["run"], m, run_id) for m in job["metrics"]):
            return False
        return job["ref"] is None or "ref" in rundir.read_analysis(job["run"], "cka", run_id)["values"]
    except (ValueError, OSError, TypeError):
        return False


def pending(jobs, done=job_done):
    """The jobs left to run (in plan order), each with only the needs that are left too, and the
    number of finished ones skipped."""
    finished = {j["id"] for j in jobs if done(j)}
    return [dict(j, needs=[n for n in j["needs"] if n not in finished]) for j in jobs if j["id"] not in finished], \
        len(finished)


def stages(jobs):
    """Jobs grouped for SLURM: stage k holds the jobs whose longest chain of needs (among the jobs
    given) has k links; returns [(jobs of the stage, indices of the stages they need)]."""
    depth = {}
    for j in jobs:  # plan order is dependency order: needs come first
        depth[j["id"]] = 1 + max((depth[n] for n in j["needs"] if n in depth), default=-1)
    out = []
    for k in range(1 + max(depth.values(), default=-1)):
        members = [j for j in jobs if depth[j["id"]] == k]
        needs = sorted({depth[n] for j in members for n in j["needs"] if n in depth})
        out.append((members, needs))
    return out


def command_line(job, python="python"):
    """The job as one shell line (for people, logs and the print executor; never run by a shell)."""
    return shlex.join([python, os.path.relpath(os.path.join(HERE, job["argv"][0])), *job["argv"][1:]])


# ----------------------------------------------------------------------------- running one job
def run_job(job):
    """Run one job in this process, as `python script.py args` would (runpy: the script's own
    `if __name__ == "__main__"` block), with fds 1 and 2 appended to its log; returns the exit
    code. Modules stay imported between jobs, so a worker imports torch once."""
    script = os.path.join(HERE, job["argv"][0])
    os.makedirs(os.path.dirname(job["log"]), exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(job["log"], "ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    argv, sys.argv = sys.argv, [script, *job["argv"][1:]]
    try:
        print(f"== {time.strftime('%Y-%m-%d %H:%M:%S')} $ {command_line(job)}", flush=True)
        try:
            runpy.run_path(script, run_name="__main__")
            rc = 0
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
        except Exception:  # noqa: BLE001  (any crash is this job's failure, not the worker's: logged, exit 1)
            traceback.print_exc()
            rc = 1
    finally:
        sys.argv = argv
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])
    release_memory()
    return rc


def release_memory():
    """Between jobs: drop the last job's objects and its cached GPU memory (the next job's own)."""
    import gc
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def worker_main():
    """A local worker (`sweep.py --worker`): reads one job per line (JSON) on stdin, runs it
    (run_job) and answers one line {"rc", "seconds"}; ends at EOF."""
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    answer = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # fd 1 is the answer pipe: nothing else may write there
    for line in sys.stdin:
        start = time.perf_counter()
        rc = run_job(json.loads(line))
        answer.write(json.dumps({"rc": rc, "seconds": time.perf_counter() - start}) + "\n")
    return 0


def tail(path, lines=LOG_TAIL):
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 64 * 1024))
            return f.read().decode("utf-8", "replace").splitlines()[-lines:]
    except OSError:
        return []


# ----------------------------------------------------------------------------- local executor
def gpu_count():
    """CUDA devices this process sees (0 without torch's CUDA)."""
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def worker_envs(device, workers, threads, gpus, cores, visible=None):
    """The environment of each local worker. With GPUs (device unset or 'cuda', gpus > 0): one
    worker per GPU by default, worker i pinned to GPU i (of CUDA_VISIBLE_DEVICES `visible`, if
    set; more workers than GPUs share them round-robin); otherwise (CPU, or an explicit cuda:K)
    one worker per model by default (`workers`). The cores are split between the workers:
    OMP/MKL threads = cores // workers unless `threads` is given."""
    on_gpus = gpus > 0 and device in (None, "cuda")
    count = workers or (gpus if on_gpus else 1)
    per = threads or max(1, cores // count)
    ids = [v for v in (visible or "").split(",") if v.strip()] or [str(i) for i in range(gpus)]
    envs = []
    for i in range(count):
        env = {"OMP_NUM_THREADS": str(per), "MKL_NUM_THREADS": str(per)}
        if on_gpus:
            env["CUDA_VISIBLE_DEVICES"] = ids[i % len(ids)]
        envs.append(env)
    return envs


def start_worker(env):
    """One worker process with its own environment (pinning, threads) and process group (so the
    pool stops it and anything it started at once)."""
    return subprocess.Popen([sys.executable, os.path.join(HERE, "sweep.py"), "--worker"], cwd=os.getcwd(),
                            env=dict(os.environ, **env), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            start_new_session=True, text=True, bufsize=1)


def stop_workers(procs):
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except OSError:
                p.terminate()
    deadline = time.time() + 10
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except OSError:
                p.kill()
            p.wait()
        for f in (p.stdin, p.stdout):
            try:
                f.close()
            except OSError:
                pass


def clock(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    """Jobs done/total, running jobs, elapsed and an estimate of the time left: one updating
    line (tqdm) on a terminal, a plain line per finished job otherwise."""

    def __init__(self, total, stream=None):
        self.total, self.done, self.start = total, 0, time.time()
        self.stream = stream or sys.stderr
        self.bar = None
        if self.stream.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, unit="job", desc="jobs", file=self.stream, dynamic_ncols=True)

    def update(self, job, seconds, running):
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix_str(f"running {running}", refresh=False)
            self.bar.update(1)
            return
        elapsed = time.time() - self.start
        left = elapsed / self.done * (self.total - self.done)
        print(f"   [{self.done}/{self.total}] {job['id']} done in {clock(seconds)}; running {running}, "
              f"elapsed {clock(elapsed)}, about {clock(left)} left (estimate)", flush=True)

    def tick(self, running):
        if self.bar is not None:
            self.bar.set_postfix_str(f"running {running}", refresh=False)
            self.bar.refresh()

    def close(self):
        if self.bar is not None:
            self.bar.close()


def priority(jobs):
    """Order of the ready jobs: those that more jobs wait on first (the sources, then the runs
    with analyses after them), then plan order; so a core never idles for want of an input."""
    waiting = {j["id"]: set() for j in jobs}
    for j in reversed(jobs):  # every job's transitive dependents, from the end of the plan
        for n in j["needs"]:
            if n in waiting:
                waiting[n] |= {j["id"]} | waiting[j["id"]]
    return {j["id"]: (-len(waiting[j["id"]]), i) for i, j in enumerate(jobs)}


def run_local(jobs, envs, progress=None, echo=("figures",)):
    """Run the jobs on worker processes (one per env of worker_envs), each job once its needs are
    done. Returns {job id: seconds} on success. The first failure stops every worker at once and
    raises JobFailed naming the job, its exit code and the end of its log."""
    rank = priority(jobs)
    todo = sorted(jobs, key=lambda j: rank[j["id"]])
    ids = {j["id"] for j in jobs}
    procs = [start_worker(env) for env in envs[:max(1, len(jobs))]]
    busy, finished, seconds, shown = {}, set(), {}, []
    try:
        while todo or busy:
            for w, p in enumerate(procs):
                if w in busy:
                    continue
                ready = next((j for j in todo if all(n in finished or n not in ids for n in j["needs"])), None)
                if ready is None:
                    break
                todo.remove(ready)
                offset = os.path.getsize(ready["log"]) if os.path.exists(ready["log"]) else 0
                busy[w] = (ready, offset)
                try:
                    p.stdin.write(json.dumps(ready) + "\n")
                    p.stdin.flush()
                except BrokenPipeError:  # the worker died between two jobs
                    raise JobFailed(ready, f"its worker had died (exit {p.wait()})") from None
            if not busy:
                raise RuntimeError("jobs wait on jobs that are not in the plan")  # plan() never does this
            readable, _, _ = select.select([procs[w].stdout for w in busy], [], [], 1.0)
            for w in [w for w in busy if procs[w].stdout in readable]:
                job, offset = busy.pop(w)
                line = procs[w].stdout.readline()
                if not line:  # EOF: the worker died (killed, out of memory) in the middle of the job
                    rc = procs[w].wait()
                    raise JobFailed(job, f"its worker died ({'signal ' + str(-rc) if rc < 0 else 'exit ' + str(rc)})")
                answer = json.loads(line)
                if answer["rc"] != 0:
                    raise JobFailed(job, f"exit {answer['rc']}")
                finished.add(job["id"])
                seconds[job["id"]] = answer["seconds"]
                if progress:
                    progress.update(job, answer["seconds"], len(busy))
                if job["kind"] in echo:  # shown once the progress line is gone
                    with open(job["log"], "rb") as f:
                        f.seek(offset)
                        shown.append(f.read().decode("utf-8", "replace"))
            if progress:
                progress.tick(len(busy))
    except JobFailed as e:
        e.stopped = [j["id"] for j, _ in busy.values() if j is not e.job]
        raise
    finally:
        if progress:
            progress.close()
        stop_workers(procs)
    for text in shown:
        print(text, end="", flush=True)
    return seconds


class JobFailed(Exception):
    def __init__(self, job, why):
        super().__init__(f"{job['id']} failed ({why})")
        self.job, self.why, self.stopped = job, why, []

    def report(self):
        lines = [f"sweep.py: {self.job['id']} failed ({self.why}); the end of its log {self.job['log']}:"]
        lines += ["  " + line for line in tail(self.job["log"])]
        if self.stopped:
            lines.append(f"sweep.py: stopped {len(self.stopped)} running job(s): {', '.join(self.stopped)}")
        lines.append("sweep.py: fix the cause and run the same command again: finished work is kept, "
                     "killed runs continue")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- SLURM executor
SLURM_TIME = re.compile(r"(\d+-)?\d+(:\d+){0,2}|\d+-\d+|UNLIMITED|INFINITE", re.IGNORECASE)


def slurm_call(cmd, what):
    """Run a SLURM client command; its failure is a Stop with its first line of error."""
    try:
        res = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise Stop(f"{what}: {cmd[0]} did not answer ({e})") from None
    if res.returncode != 0:
        first = (res.stderr.strip() or res.stdout.strip() or f"exit {res.returncode}").splitlines()[0]
        raise Stop(f"{what}: {first}")
    return res.stdout


def slurm_resources(args, study):
    """The sbatch flags from --partition, --gpus-per-job, --cpus-per-job, --time, --slurm-extra,
    each checked (sbatch present, the partition exists) before anything is written."""
    if shutil.which("sbatch") is None:
        raise Stop("--executor slurm: sbatch not found (is this a SLURM login node? otherwise use --executor "
                   "local or print)")
    flags = []
    if args.gpus_per_job is not None:
        gpus = whole("--gpus-per-job", args.gpus_per_job)
        if study["device"] == "cpu":
            raise Stop(f"--gpus-per-job {gpus}: the sweep runs on the CPU (--device cpu"
                       f"{', the offline study default' if study['offline'] else ''}); pass --device cuda for GPUs")
        flags.append(f"--gres=gpu:{gpus}")
    if args.cpus_per_job is not None:
        flags.append(f"--cpus-per-task={whole('--cpus-per-job', args.cpus_per_job)}")
    if args.time is not None:
        if not SLURM_TIME.fullmatch(args.time):
            raise Stop(f"--time {args.time}: expected a SLURM time (minutes, HH:MM:SS, D-HH:MM, ...)")
        flags.append(f"--time={args.time}")
    try:
        extra = shlex.split(args.slurm_extra or "")
    except ValueError as e:
        raise Stop(f"--slurm-extra {args.slurm_extra}: {e}") from None
    partitions = slurm_call(["sinfo", "-h", "-o", "%R"], "sinfo (is the SLURM controller running?)").split()
    if args.partition is not None:
        if args.partition not in partitions:
            raise Stop(f"--partition {args.partition}: no such partition (this cluster has: "
                       f"{', '.join(partitions) or 'none'})")
        flags.append(f"--partition={args.partition}")
    return flags + extra


def submitted_path(runs):
    return os.path.join(runs, "logs", "slurm", "submitted.json")


def in_queue(ids):
    """Which of these SLURM job ids still have tasks pending or running."""
    out = slurm_call(["squeue", "-h", "-o", "%F"], "squeue")
    return sorted(set(ids) & set(out.split()))


def last_submission(runs):
    """The previous submission on this --runs folder: refused while in the queue; otherwise the
    lines naming its unfinished tasks (failed, killed, never started) with their logs."""
    path = submitted_path(runs)
    if not os.path.isfile(path):
        return []
    try:
        sub = rundir.read_json(path)
        ids, stages_ = [str(s["job_id"]) for s in sub["stages"]], sub["stages"]
    except (ValueError, KeyError, TypeError):
        return [f"sweep.py: note: {path} is not a submission record sweep.py wrote; ignored"]
    queued = in_queue(ids)
    if queued:
        raise Stop(f"--runs {runs}: the sweep submitted at {sub.get('time')} is still in the queue (jobs "
                   f"{' '.join(queued)}); wait for it (squeue -j {','.join(queued)}) or cancel it "
                   f"(scancel {' '.join(queued)})")
    lines = []
    for s in stages_:
        for i, job in enumerate(s["jobs"]):
            status = os.path.join(os.path.dirname(s["file"]), f"stage{s['stage']}_{i}.rc")
            out = os.path.join(os.path.dirname(s["file"]), f"stage{s['stage']}_{i}.out")
            try:
                with open(status) as f:
                    rc = f.read().strip()
            except OSError:
                rc = None
            if rc == "0":
                continue
            what = (f"failed (exit {rc})" if rc is not None else
                    "killed (time limit, memory or scancel)" if os.path.exists(out) else
                    "not started (a stage it needs failed)")
            slurm_log = f", SLURM log {out}" if os.path.exists(out) else ""
            lines.append(f"  {what}: {job['id']}: log {job['log']}{slurm_log}")
    if lines:
        lines.insert(0, f"sweep.py: the last submission ({sub.get('time')}, jobs {' '.join(ids)}) left "
                        f"{len(lines)} task(s) unfinished:")
    return lines


def submit_slurm(jobs, study, resources, threads):
    """One sbatch job array per stage, each after the stages it needs; the stage files (the jobs
    as JSON) are written atomically before their array is submitted. Returns the submission record."""
    runs = study["runs"]
    folder = os.path.join(os.path.abspath(runs), "logs", "slurm", time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}")
    sweep = os.path.join(HERE, "sweep.py")
    plan_ = stages(jobs)
    record = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "stages": []}

    def sbatch(k, members, after, test=False):
        file = os.path.join(folder, f"stage{k}.json")
        cmd = ["sbatch", "--parsable", f"--array=0-{len(members) - 1}", f"--job-name=wtst-stage{k}",
               f"--output={os.path.join(folder, f'stage{k}_%a.out')}", f"--chdir={os.getcwd()}", *resources]
        if after:
            cmd += [f"--dependency=afterok:{':'.join(after)}", "--kill-on-invalid-dep=yes"]
        cmd += ["--test-only"] if test else []
        cmd += ["--wrap", shlex.join([sys.executable, sweep, "--run-task", file])]
        return cmd, file

    cmd, _ = sbatch(0, plan_[0][0], [], test=True)  # the resources, checked by SLURM itself before any write
    slurm_call(cmd, "sbatch --test-only (checking the resources)")
    submitted = []
    try:
        for k, (members, needs) in enumerate(plan_):
            cmd, file = sbatch(k, members, [record["stages"][i]["job_id"] for i in needs])
            rundir.make_dir(folder, "--runs")
            rundir.save_json(file, {"format": "wtst-sweep-stage/1", "threads": threads, "jobs": members})
            job_id = slurm_call(cmd, f"sbatch (stage {k})").strip().split(";")[0]
            submitted.append(job_id)
            record["stages"].append({"stage": k, "job_id": job_id, "file": file, "jobs": members})
    except Stop:
        if submitted:
            subprocess.run(["scancel", *submitted], check=False, capture_output=True)
        raise
    rundir.save_json(submitted_path(runs), record)
    return record


def run_task(stage_file, index):
    """One SLURM array task: run job `index` of a stage file (or say it is already done), with
    torch's threads set to the task's CPUs; writes stage<k>_<index>.rc with the exit code."""
    stage = rundir.read_json(stage_file, "--run-task")
    job = stage["jobs"][index]
    threads = os.environ.get("SLURM_CPUS_PER_TASK") or stage.get("threads")
    if threads:
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    print(f"sweep.py: task {index} of {stage_file}: {job['id']}; its log: {job['log']}", flush=True)
    if job_done(job):
        print("already done", flush=True)
        rc = 0
    else:
        rc = run_job(job)
    print(f"exit {rc}", flush=True)
    base = os.path.splitext(stage_file)[0]
    rundir.write_bytes(f"{base}_{index}.rc", f"{rc}\n".encode())
    return rc


# ----------------------------------------------------------------------------- command line
def build_parser():
    p = argparse.ArgumentParser(prog="sweep.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Offline defaults and per-model settings: the OFFLINE table at the top of "
                                       "sweep.py. Lists take spaces or commas.")
    s = p.add_argument_group("the study")
    s.add_argument("--models", "--model", default=None, help="model entries model[:size[:lr[:source lr[:source "
                   "epochs[:epochs[:batch]]]]]]; empty fields take the model's defaults (offline: "
                   f"'{default_models(OFFLINE)}' with the table's settings; --data: '{OWN_DATA['models']}')")
    s.add_argument("--data", default=None, help="your own data (folder, csv, aptos, ...): the sweep from --weights, "
                   "no source pretraining (default: the offline study)")
    s.add_argument("--data-root", default=None, help="with --data: the dataset's folder")
    s.add_argument("--weights", default=None, help="with --data: 'imagenet' (default) or a checkpoint file")
    s.add_argument("--source", default=None, help=f"offline: the source task (default {OFFLINE['source']})")
    s.add_argument("--target", default=None, help=f"offline: the target task (default {OFFLINE['target']})")
    s.add_argument("--ns", default=None, help="n values of WT-ST-n/m: whole numbers, N, N/2 (default '0 N/2 N')")
    s.add_argument("--seeds", default=None, help="seeds (default '0 1 2')")
    s.add_argument("--ri-seeds", default=None, help="seeds with a random-init run, or 'none' (default: offline "
                   "the first seed, --data every seed)")
    for name, what in (("epochs", "fine-tuning epochs"), ("size", "image size"), ("lr", "fine-tuning lr"),
                       ("batch", "fine-tuning batch size"), ("source-epochs", "source pretraining epochs")):
        s.add_argument(f"--{name}", default=None, help=f"{what} of every model (over --models)")
    s.add_argument("--warmup", default=None, help="warm-up iterations (offline default 6; --data: train.py's)")
    s.add_argument("--patience", default=None, help="early stopping, in validations (offline default 6)")
    s.add_argument("--plateau", default=None, help="validations before lr x0.1 (offline default 2)")
    s.add_argument("--subset", default=None, help="at most this many images per split in every run (quick checks)")
    s.add_argument("--device", default=None, help="cpu, cuda, cuda:K or auto (default: offline cpu, --data auto)")
    s.add_argument("--runs", default="runs/study", help="where the runs and logs go (default %(default)s)")
    s.add_argument("--figures", default="figures", help="where the figures, table.md and findings.md go "
                   "(default %(default)s)")
    s.add_argument("--format", default=None, help="figure formats (default: offline png, --data png,pdf)")
    e = p.add_argument_group("how it runs")
    e.add_argument("--executor", choices=["local", "slurm", "print"], default="local",
                   help="local: worker processes here (default); slurm: sbatch job arrays; print: the commands")
    e.add_argument("--workers", default=None, help="local: worker processes (default: one per GPU, on a CPU one "
                   "per model)")
    e.add_argument("--threads", default=None, help="local: torch threads per worker (default: cores / workers); "
                   "slurm: per task when --cpus-per-job is not given")
    e.add_argument("--partition", default=None, help="slurm: the partition (default: the cluster's)")
    e.add_argument("--gpus-per-job", default=None, help="slurm: GPUs per task (--gres=gpu:K)")
    e.add_argument("--cpus-per-job", default=None, help="slurm: CPUs per task (--cpus-per-task)")
    e.add_argument("--time", default=None, help="slurm: time limit per task (e.g. 4:00:00)")
    e.add_argument("--slurm-extra", default=None,
                   help="slurm: more sbatch flags, e.g. --slurm-extra='--account=x --qos=y'")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--run-task", nargs="+", default=None, help=argparse.SUPPRESS)

    def error(message):
        raise Stop(f"{message} (python sweep.py --help lists the flags)")
    p.error = error
    return p


def check_executor_flags(args):
    local = ("workers", "threads") if args.executor != "local" else ()
    slurm = ("partition", "gpus_per_job", "cpus_per_job", "time", "slurm_extra") if args.executor != "slurm" else ()
    for name in local + slurm:
        if getattr(args, name) is not None and not (name == "threads" and args.executor == "slurm"):
            raise Stop(f"--{name.replace('_', '-')}: not used by --executor {args.executor}")


def describe(study, facts, total, skipped, out):
    if study["offline"]:
        print(f"== offline study: source '{study['source']}' (pretraining), target '{study['data']}'; models "
              f"{' '.join(e['model'] for e in study['models'])}; seeds {' '.join(map(str, study['seeds']))}", file=out)
    else:
        print(f"== study on '{study['data']}' from weights '{study['weights']}': models "
              f"{' '.join(e['model'] for e in study['models'])}; seeds {' '.join(map(str, study['seeds']))}", file=out)
    for e in study["models"]:
        N = facts[e["model"]][0]
        shown = {k: e[k] if e[k] is not None else "train.py's" for k in ("lr", "epochs", "batch")}
        size = e["size"] or "the dataset's"
        print(f"   {e['model']}: N = {N} module groups, n = {' '.join(map(str, n_values(study['ns'], N)))}, "
              f"image size {size}, lr {shown['lr']}, epochs {shown['epochs']}, batch {shown['batch']}", file=out)
    print(f"   {total + skipped} jobs: {skipped} finished before (skipped), {total} to run; "
          f"one log per job in {os.path.join(study['runs'], 'logs')}", file=out)


@contextlib.contextmanager
def sweep_lock(runs):
    """The sweep's lock on its --runs folder (rundir.RunLock: released by the OS when the process
    ends): a second sweep on the same folder gets one line naming the first."""
    lock = rundir.RunLock(runs, "sweep.py", flag="--runs")
    try:
        lock.acquire()
    except ValueError:
        raise Stop(f"--runs {runs}: another sweep is using this folder ({lock.holder()}); wait for it to end, "
                   "or choose another --runs") from None
    try:
        yield
    finally:
        lock.release()


def check_unlocked(jobs):
    """No run the sweep would write is being written by another process (train.py/analyze.py)."""
    for j in jobs:
        if j["run"] and rundir.is_locked(j["run"]):
            holder = rundir.RunLock(j["run"], "").holder()
            raise Stop(f"{j['run']}: another process is writing this run ({holder}); wait for it to end, "
                       "then run the same command again")


def check_ns_fit(study, facts):
    for e in study["models"]:
        N = facts[e["model"]][0]
        bad = [n for n in n_values(study["ns"], N) if n > N]
        if bad:
            raise Stop(f"--ns {study['ns']}: n = {bad[0]} is more than {e['model']}'s N = {N} module groups")


def print_sweep(jobs, study, facts, args):
    """--executor print: the commands of the jobs left, one per line, in dependency order."""
    todo, skipped = pending(jobs)
    describe(study, facts, len(todo), skipped, sys.stderr)
    for j in todo:
        print(command_line(j))
    return 0


def local_sweep(jobs, study, facts, args):
    """--executor local: the jobs left on this machine's workers, with a progress line."""
    gpus = gpu_count() if study["device"] != "cpu" else 0
    if study["device"] and study["device"].startswith("cuda") and gpus == 0:
        raise Stop(f"--device {study['device']}: no CUDA device on this machine")
    on_gpus = gpus and study["device"] in (None, "cuda")
    workers = (whole("--workers", args.workers) if args.workers is not None
               else None if on_gpus else len(study["models"]))
    threads = whole("--threads", args.threads) if args.threads is not None else None
    envs = worker_envs(study["device"], workers, threads, gpus, os.cpu_count() or 1,
                       os.environ.get("CUDA_VISIBLE_DEVICES"))
    with sweep_lock(study["runs"]):  # every input is checked: the first write
        todo, skipped = pending(jobs)
        check_unlocked(todo)
        describe(study, facts, len(todo), skipped, sys.stdout)
        pins = [e["CUDA_VISIBLE_DEVICES"] for e in envs if "CUDA_VISIBLE_DEVICES" in e]
        print(f"   {min(len(envs), len(todo))} workers x {envs[0]['OMP_NUM_THREADS']} threads"
              + (f", GPUs {' '.join(pins)}" if pins else ""))
        start = time.time()
        for sig in (signal.SIGTERM, signal.SIGHUP):  # as Ctrl-C: run_local stops its workers, none is orphaned
            signal.signal(sig, signal.default_int_handler)
        run_local(todo, envs, Progress(len(todo)))
        print(f"   all {len(todo)} jobs done in {clock(time.time() - start)}; figures: "
              f"{os.path.abspath(study['figures'])}")
    return 0


def slurm_sweep(jobs, study, facts, args):
    """--executor slurm: what the last submission left unfinished, then the jobs left, submitted."""
    resources = slurm_resources(args, study)
    threads = whole("--threads", args.threads) if args.threads is not None else None
    with sweep_lock(study["runs"]):
        report = last_submission(study["runs"])
        todo, skipped = pending(jobs)
        check_unlocked(todo)
        describe(study, facts, len(todo), skipped, sys.stdout)
        for line in report:
            print(line)
        record = submit_slurm(todo, study, resources, threads)
    ids = [s["job_id"] for s in record["stages"]]
    for s in record["stages"]:
        tasks = f"{len(s['jobs'])} task" + ("s" if len(s["jobs"]) > 1 else "")
        kinds = ", ".join(sorted({j["kind"] for j in s["jobs"]}))
        print(f"   stage {s['stage']}: job array {s['job_id']} ({tasks}: {kinds})")
    print(f"   follow: squeue -j {','.join(ids)}    logs: tail -f {os.path.join(study['runs'], 'logs')}/*.log")
    print("   the same command again reports failed tasks and submits what is left (finished work is kept)")
    return 0


EXECUTORS = {"local": local_sweep, "slurm": slurm_sweep, "print": print_sweep}


def main(argv=None):
    try:
        args = build_parser().parse_args(argv)
        if args.worker:
            return worker_main()
        if args.run_task:
            index = args.run_task[1] if len(args.run_task) > 1 else os.environ.get("SLURM_ARRAY_TASK_ID")
            return run_task(args.run_task[0], whole("--run-task index", index, 0))
        check_executor_flags(args)
        study = study_settings(args)
        facts = model_facts(study["models"])
        check_ns_fit(study, facts)
        return EXECUTORS[args.executor](plan(study, facts), study, facts, args)
    except Stop as e:
        print(f"sweep.py: {e}", file=sys.stderr)
        return 2
    except JobFailed as e:
        print(e.report(), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("sweep.py: interrupted; the same command continues the sweep (finished work is kept)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
