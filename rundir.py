"""The run directory: its files, how they are written, read back and checked.

One home for what train.py, analyze.py, plots.py, findings.py and sweep.py agree on.
Standard library only (no torch), so the tools that never touch a model stay light.

    <run>/config.json     settings, data info, run_id (written once, at creation)
    <run>/init.pt         the model right after initialisation
    <run>/best.pt         the best validation checkpoint
    <run>/last.pt         everything a resume needs (removed when the run finishes)
    <run>/log.jsonl       training and validation records, a JSON object a line (`read_log`)
    <run>/summary.json    written last: the run is finished
    <run>/analysis/<metric>.json   analyze.py's results, each tagged with the run's run_id
    <run>/.lock           held (flock) by the one process writing the run

Guarantees:
- every file is written through a temp file and renamed (`atomic_write`); a full disk is an
  ordinary error (`DiskFullError`, a ValueError) naming the path and the space needed, and
  the half-written temp file is removed;
- one writer per run folder (`RunLock`): a second train.py / analyze.py on the same folder
  gets one line naming the holder; the OS releases the lock when a process dies;
- every file read back goes through `read_json` (size, nesting depth, no NaN/Infinity
  constants) and `check_config` / `check_summary` / `check_analysis` (types and ranges)
  before it is used: anything else is one ValueError naming the file.
"""
import errno
import fcntl
import json
import math
import os
import re
import shutil
import socket
import time
import uuid

FORMAT = "wtst-run/1"
CONFIG, INIT, BEST, LAST, LOG, SUMMARY = "config.json", "init.pt", "best.pt", "last.pt", "log.jsonl", "summary.json"
RUN_FILES = (CONFIG, INIT, BEST, LAST, LOG, SUMMARY)
ANALYSIS_DIR = "analysis"
LOCK = ".lock"
ANALYSES = ["cka", "knn", "reinit", "l2", "attention", "convergence"]

MAX_JSON_BYTES = 256 * 2**20   # a DeiT-B CKA file with every feature type is ~0.1 MB; a split file of
                               # CheXpert ~10 MB: anything near this bound is not a file we wrote
MAX_JSON_DEPTH = 12            # the deepest file we write (cka values) is 5 levels
MAX_INT = 2**53                # integers in our files (iterations, seeds) stay exact as floats
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class DiskFullError(ValueError):
    """A write failed for want of space: one line naming the path and the space it needed."""


# ----------------------------------------------------------------------------- writing
def _human(n):
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def free_bytes(path):
    """Free space (bytes) on the file system holding path (or its nearest existing parent)."""
    p = os.path.abspath(path)
    while not os.path.exists(p):
        p = os.path.dirname(p)
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def disk_full(path, need=None):
    """The DiskFullError for a write of `need` bytes (None: unknown) to path."""
    free = free_bytes(path)
    what = f"needs {_human(need)}" if need is not None else "needs more space"
    have = f", {_human(free)} free" if free is not None else ""
    return DiskFullError(f"{path}: no space left on the device ({what}{have}); free some space "
                         "and run the same command again")


def check_space(path, need):
    """Raise DiskFullError before a write of `need` bytes that cannot fit."""
    free = free_bytes(path)
    if free is not None and need is not None and need > free:
        raise disk_full(path, need)


def is_disk_full(e):
    """An OSError (or the RuntimeError torch.save raises on a short write) for want of space."""
    if isinstance(e, OSError):
        return e.errno in DISK_FULL
    return isinstance(e, RuntimeError) and "unexpected pos" in str(e)


def atomic_write(path, write, size=None):
    """Write `path` through a temp file in the same folder, then rename it into place, so a
    killed process never leaves half a file and a reader never sees one. write(tmp) writes
    the temp file; `size` (bytes), if known, is checked against the free space first.
    A full disk raises DiskFullError; the temp file is removed and `path` is left as it was.
    The one atomic-write helper of the toolkit."""
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    if size is not None:
        check_space(path, size)
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        if is_disk_full(e):
            raise disk_full(path, size) from None
        raise
    finally:
        if os.path.exists(tmp):
            try:
                os.remove(tmp)
            except OSError:
                pass


def write_bytes(path, payload):
    """atomic_write of a bytes payload (its size is known, so a full disk is found first)."""
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(payload)
    atomic_write(path, write, size=len(payload))


def json_safe(x):
    """x with every non-finite float as None (JSON has no NaN: an undefined number, e.g. the CKA
    of a constant layer or the AUC of a one-class split, is written as null) and arrays (numpy,
    torch: anything with .tolist()) as lists."""
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if hasattr(x, "tolist") and not isinstance(x, (str, bytes)):
        return json_safe(x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def dumps(obj):
    """JSON text as every tool writes it: indented, sorted keys, non-finite numbers as null."""
    return json.dumps(json_safe(obj), indent=2, sort_keys=True, allow_nan=False) + "\n"


def save_json(path, obj):
    """Write obj as JSON atomically (see `dumps`)."""
    write_bytes(path, dumps(obj).encode())


def append_line(path, text):
    """Append one line to a log file (log.jsonl); returns the file's size after it. A full disk
    is a DiskFullError, and the partial line is cut off again so the log stays whole."""
    with open(path, "ab") as f:
        start = f.tell()
        try:
            f.write(text.encode() + b"\n")
            f.flush()
        except OSError as e:
            try:
                f.truncate(start)
            except OSError:
                pass
            if is_disk_full(e):
                raise disk_full(path, len(text) + 1) from None
            raise
        return f.tell()


def check_writable_dir(folder, flag):
    """`flag folder` is, or can be created as, a folder this process can write: checked before
    anything is written (train.py --out, analyze.py --run/--out, plots.py --out)."""
    path = os.path.abspath(folder)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag} {folder}: is a file, expected a folder")
    parent = path
    while not os.path.exists(parent):  # the nearest existing folder is where it will be created
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"{flag} {folder}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {folder}: {parent} is not writable")


def make_dir(folder, flag):
    """Create a folder (and parents); an OSError becomes one line naming the flag."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:  # e.g. a read-only or virtual file system that os.access cannot tell
        if is_disk_full(e):
            raise disk_full(folder) from None
        raise ValueError(f"{flag} {folder}: cannot create the folder ({e.strerror})") from None


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError, ValueError):
        return True  # someone else's process, or not a pid we can check: keep the file
    return True


def remove_stale_tmp(folder):
    """Delete `*.tmp<pid>` files (atomic_write's, also hidden `.name.tmp<pid>` ones) in folder
    whose writer process is gone (left by a SIGKILL); temp files of live processes on this
    machine stay. The pid is checked on this machine only. Returns the removed paths."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        m = re.search(r"\.tmp(\d+)$", name)
        p = os.path.join(folder, name)
        if m and os.path.isfile(p) and not os.path.islink(p) and not _pid_alive(int(m.group(1))):
            try:
                os.remove(p)
                removed.append(p)
            except OSError:
                pass
    return removed


# ----------------------------------------------------------------------------- one writer per run
class RunLock:
    """An exclusive lock on a run folder, held while a process writes it:

        with RunLock(run, "train.py"):   # ValueError naming the holder if another process has it
            ...

    flock on <run>/.lock: the OS releases it when the process exits or is killed, so no stale
    lock survives a crash. The file records the holder (pid, host, tool, start time) for the
    message a second writer gets. Creates the folder (the caller has validated every input).
    On file systems without flock (some network mounts) the lock is a no-op with no error."""

    def __init__(self, folder, tool, flag="--out"):
        self.folder, self.tool, self.flag, self.fd = os.fspath(folder), tool, flag, None

    def holder(self):
        try:
            with open(os.path.join(self.folder, LOCK)) as f:
                return f.read(500).strip() or "another process"
        except OSError:
            return "another process"

    def acquire(self):
        make_dir(self.folder, self.flag)
        path = os.path.join(self.folder, LOCK)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            if is_disk_full(e):
                raise disk_full(path) from None
            raise ValueError(f"{self.flag} {self.folder}: cannot create its lock file ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ValueError(f"{self.flag} {self.folder}: another process is writing this run ({self.holder()}); "
                             "wait for it to end, or choose another folder") from None
        except OSError:
            pass  # no flock on this file system: carry on unlocked
        self.fd = fd
        info = (f"{self.tool} pid {os.getpid()} on {socket.gethostname()}, "
                f"since {time.strftime('%Y-%m-%d %H:%M:%S')}").encode()
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, info, 0)
        except OSError:
            pass  # the holder's name is a courtesy; the lock holds without it
        return self

    def release(self):
        if self.fd is not None:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            except OSError:
                pass
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def is_locked(folder):
    """True when a live process holds the run folder's lock (e.g. a run still training)."""
    path = os.path.join(folder, LOCK)
    if not os.path.isfile(path):
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def new_run_id():
    """A run's identity, written into config.json at creation and into every analysis file."""
    return uuid.uuid4().hex


# ----------------------------------------------------------------------------- reading back
def _no_constant(name):
    raise ValueError(f"holds {name}, which is not JSON (the toolkit writes undefined numbers as null)")


def _depth(x, limit, level=1):
    if level > limit:
        return False
    if isinstance(x, dict):
        return all(_depth(v, limit, level + 1) for v in x.values())
    if isinstance(x, list):
        return all(_depth(v, limit, level + 1) for v in x)
    return True


def read_json(path, what=None, max_bytes=MAX_JSON_BYTES, max_depth=MAX_JSON_DEPTH):
    """A JSON file we wrote, read back with checks: at most max_bytes, nested at most max_depth,
    no NaN/Infinity tokens. Any problem is one ValueError naming the file (FileNotFoundError
    when it is absent)."""
    where = f"{what} {path}" if what else str(path)
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{where}: no such file") from None
    except OSError as e:
        raise ValueError(f"{where}: unreadable ({e.strerror})") from None
    if size > max_bytes:
        raise ValueError(f"{where}: {_human(size)}, larger than any file the toolkit writes "
                         f"({_human(max_bytes)}); not reading it")
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read().decode("utf-8"), parse_constant=_no_constant)
    except RecursionError:
        raise ValueError(f"{where}: nested deeper than any file the toolkit writes") from None
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{where}: not readable JSON ({type(e).__name__}: {str(e)[:200]})") from None
    if not _depth(doc, max_depth):
        raise ValueError(f"{where}: nested deeper than {max_depth} levels, more than any file the toolkit writes")
    return doc


def is_int(v, lo=None, hi=None):
    """A JSON integer (not a bool) within [lo, hi]."""
    return (isinstance(v, int) and not isinstance(v, bool) and (lo is None or v >= lo)
            and (hi is None or v <= hi))


def is_number(v, finite=True):
    """A JSON number (int or float, not a bool), finite unless finite=False."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and (not finite or math.isfinite(v))


def _need(ok, where, what):
    if not ok:
        raise ValueError(f"{where}: {what}")


def check_config(doc, path):
    """config.json as train.py writes it: {"format", "run_id", "config": {...}, "data": {...},
    "sizes", "init", "versions", "facts"}; returns doc. Types and ranges of every field the tools use."""
    where = str(path)
    _need(isinstance(doc, dict) and doc.get("format") == FORMAT and isinstance(doc.get("config"), dict)
          and isinstance(doc.get("data"), dict), where, f"not a train.py run's config (expected format {FORMAT!r} "
          "with 'config' and 'data' objects)")
    c, d = doc["config"], doc["data"]
    _need(isinstance(c.get("model"), str) and 0 < len(c["model"]) <= 64, where, "config.model is not a model name")
    _need(isinstance(c.get("data"), str) and 0 < len(c["data"]) <= 64, where, "config.data is not a dataset name")
    _need(is_int(c.get("img_size"), 8, 8192), where, "config.img_size is not an integer in 8..8192")
    _need(is_int(c.get("N"), 1, 10_000), where, "config.N is not an integer in 1..10000")
    _need(c.get("init") in ("wt", "st", "wtst", "ri"), where, "config.init is not one of wt, st, wtst, ri")
    if c["init"] == "ri":
        _need(c.get("n") is None, where, "config.n must be null for random init")
    else:
        _need(is_int(c.get("n"), 0, c["N"]), where, f"config.n is not an integer in 0..N ({c['N']})")
    for k in ("seed", "split_seed"):
        _need(is_int(c.get(k), 0, MAX_INT), where, f"config.{k} is not an integer >= 0")
    for k in ("epochs", "batch_size", "warmup", "patience"):
        if k in c:
            _need(is_int(c[k], 0, MAX_INT), where, f"config.{k} is not an integer >= 0")
    _need(c.get("subset") is None or is_int(c["subset"], 1, MAX_INT), where, "config.subset is not null or >= 1")
    for k in ("data_root", "cache_dir", "weights", "metric"):
        _need(c.get(k) is None or isinstance(c[k], str), where, f"config.{k} is not null or text")
    _need(doc.get("run_id") is None or (isinstance(doc["run_id"], str) and re.fullmatch(r"[0-9a-f]{32}",
          doc["run_id"])), where, "run_id is not a 32-digit hex identity")
    _need(is_int(d.get("num_classes"), 1, 100_000), where, "data.num_classes is not an integer in 1..100000")
    _need(isinstance(d.get("metric"), str), where, "data.metric is not a metric name")
    _need(isinstance(d.get("classes", []), list) and len(d.get("classes", [])) <= 100_000, where,
          "data.classes is not a list")
    _need(d.get("display_name") is None or isinstance(d["display_name"], str), where, "data.display_name is not text")
    _need(d.get("identity") is None or isinstance(d["identity"], str), where, "data.identity is not text")
    facts = doc.get("facts", {})  # the model's facts (models.py), e.g. token_mixing; absent in older runs
    _need(isinstance(facts, dict) and all(isinstance(v, str) for v in facts.values()), where,
          "facts is not an object of text values")
    return doc


def check_summary(doc, path, metric=None):
    """summary.json as train.py writes it; returns doc. Checks the fields that figures, the
    table and findings read."""
    where = str(path)
    _need(isinstance(doc, dict), where, "not a JSON object as train.py writes it")
    _need(isinstance(doc.get("test", {}), dict), where, "'test' is not an object of test metrics")
    for k, v in doc.get("test", {}).items():
        _need(v is None or is_number(v) or (isinstance(v, list) and len(v) <= 100_000
                                            and all(x is None or is_number(x) for x in v)), where,
              f"test.{k} is not a number, null or a list of them")
    for k in ("best_iteration", "iterations", "validations"):
        _need(doc.get(k) is None or is_int(doc[k], 0, MAX_INT), where, f"{k} is not an integer >= 0")
    for k in ("best_val_metric", "epochs_run", "wall_seconds", "train_seconds", "images_per_second"):
        _need(doc.get(k) is None or is_number(doc[k]), where, f"{k} is not a finite number or null")
    for k in ("stop_reason", "stop_detail", "metric"):
        _need(doc.get(k) is None or isinstance(doc[k], str), where, f"{k} is not text")
    if metric is not None and doc.get("test"):
        v = doc["test"].get(metric)
        _need(v is None or is_number(v), where, f"test.{metric} is not a number or null")
    return doc


def read_config(run, flag="--run"):
    """config.json of a run directory, read and checked (check_config). A folder holding run
    files but no config.json is refused: it is not a run a tool may resume or replace."""
    path = os.path.join(run, CONFIG)
    if not os.path.isfile(path):
        present = has_run_files(run)
        why = f"it holds {', '.join(present)} but no {CONFIG}" if present else f"no {CONFIG}"
        raise FileNotFoundError(f"{flag} {run}: {why} (expected a run directory written by train.py)")
    return check_config(read_json(path, flag), path)


def read_summary(run, metric=None, flag="--run"):
    """summary.json of a run directory, checked; None while the run is unfinished."""
    path = os.path.join(run, SUMMARY)
    if not os.path.isfile(path):
        return None
    return check_summary(read_json(path, flag), path, metric)


def load_run(path, flag="--run", need_summary=False):
    """One run directory, read and checked: {"dir", "config" (the settings), "data" (dataset info),
    "doc" (all of config.json), "run_id", "summary" (None while unfinished)}. A folder with run
    files but no config.json, or any file that fails its check, is a ValueError naming it."""
    run = os.fspath(path).rstrip("/") or "/"
    if not os.path.isdir(run):
        raise FileNotFoundError(f"{flag} {run}: no such folder "
                                "(expected a run directory: train.py writes its config.json)")
    doc = read_config(run, flag)
    summary = read_summary(run, doc["data"].get("metric"), flag)
    if summary is None and need_summary:
        raise ValueError(f"{flag} {run}: the run has not finished (no {SUMMARY}); finish it "
                         "(train.py ... --resume) first")
    return {"dir": run, "config": doc["config"], "data": doc["data"], "doc": doc, "run_id": doc.get("run_id"),
            "summary": summary}


def _log_number(v):
    return v is None or is_number(v)


def _log_record(r):
    """A record train.py writes: a whole-number "iteration"; numbers (finite), booleans or null;
    "val" an object of numbers or null, or lists of them (per-class values)."""
    return (isinstance(r, dict) and is_int(r.get("iteration"), 0, MAX_INT)
            and all(k == "val" or _log_number(v) or isinstance(v, bool) for k, v in r.items())
            and ("val" not in r or (isinstance(r["val"], dict) and all(
                _log_number(v) or (isinstance(v, list) and all(map(_log_number, v))) for v in r["val"].values()))))


def read_log(run, flag="--run"):
    """The records of a run's log.jsonl, in order ([] when the run has none), every line checked.
    A last line without its newline is a write cut short by a kill (train.py --resume cuts it
    off) and is left out; any other line that is not a record train.py writes is one ValueError
    naming the file and the line. NaN/Infinity tokens (older logs) read as null."""
    path = os.path.join(run, LOG)
    try:
        if os.path.getsize(path) > MAX_JSON_BYTES:
            raise ValueError(f"{flag} {run}: {path} is larger than any log train.py writes; not reading it")
        with open(path, "rb") as f:
            lines = f.read().split(b"\n")
    except FileNotFoundError:
        return []
    except OSError as e:
        raise ValueError(f"{flag} {run}: {path}: unreadable ({e.strerror})") from None
    lines.pop()  # the text after the last newline: empty, or a line cut short
    records = []
    for i, line in enumerate(lines, 1):
        try:
            r = json.loads(line, parse_constant=lambda c: None)
        except (ValueError, RecursionError):
            r = None
        if not _log_record(r):
            raise ValueError(f"{flag} {run}: {path} line {i} is not a record train.py writes "
                             "({\"iteration\", ...} with numbers or null, \"val\" an object of them)")
        records.append(r)
    return records


def has_run_files(folder):
    """The run files present in a folder (a folder with some but no config.json is refused)."""
    return [f for f in RUN_FILES if os.path.exists(os.path.join(folder, f))]


# ----------------------------------------------------------------------------- analyses
def analysis_path(run, metric):
    return os.path.join(run, ANALYSIS_DIR, f"{metric}.json")


def check_analysis(metric, doc, path):
    """The containers plots.py and findings.py read from analysis/<metric>.json (README schema);
    returns doc. Numbers are checked to be finite numbers or null (an undefined CKA is null);
    lengths are checked against 'layers'."""
    where = str(path)
    _need(isinstance(doc, dict), where, "not a JSON object")
    values = doc.get("values")
    _need(isinstance(values, list if metric == "l2" else dict), where,
          f"'values' is not a {'list' if metric == 'l2' else 'dict'} as in the README schema")
    layers = doc.get("layers", [])
    _need(isinstance(layers, list) and len(layers) <= 10_000 and all(isinstance(x, str) for x in layers), where,
          "'layers' is not a list of layer names")
    settings = doc.get("settings", {})
    _need(isinstance(settings, dict), where, "'settings' is not a dict")
    _need(all(settings.get(k) is None or is_int(settings[k], 0, 10_000) for k in ("ref_n", "ref_N")), where,
          "'settings' ref_n / ref_N are not integers")
    _need(doc.get("run_id") is None or isinstance(doc["run_id"], str), where, "'run_id' is not text")

    def vector(v, what, length=None):
        _need(isinstance(v, list) and (length is None or len(v) == length)
              and all(x is None or is_number(x) for x in v), where,
              f"{what} is not a list of {length if length is not None else ''} finite numbers or null"
              .replace("  ", " "))

    def matrix(m, what, rows):
        _need(isinstance(m, list) and len(m) == rows and all(isinstance(r, list) for r in m), where,
              f"{what} is not a {rows}-row matrix")
        cols = len(m[0]) if m else 0
        _need(cols <= 10_000, where, f"{what} has {cols} columns")
        for r in m:
            vector(r, what, cols)

    n = len(layers)
    if metric == "l2":
        vector(values, "'values'", n)
    elif metric == "knn":
        for t, v in values.items():
            vector(v, f"values.{t}", n)
    elif metric == "reinit":
        _need(values.get("baseline") is None or is_number(values["baseline"]), where, "values.baseline is not a number")
        for k in ("reverted", "drop"):
            vector(values.get(k, []), f"values.{k}", n if k in values else 0)
    elif metric == "cka":
        for key in ("init", "ref"):
            by_type = values.get(key)
            if by_type is None:
                continue
            _need(isinstance(by_type, dict), where, f"values.{key} is not a dict of matrices")
            for t, m in by_type.items():
                matrix(m, f"values.{key}.{t}", n)
    elif metric == "attention":
        vector(values.get("per_block", []), "values.per_block", n if "per_block" in values else 0)
        per_head = values.get("per_head", [])
        _need(isinstance(per_head, list) and len(per_head) in (0, n), where, "values.per_head is not one row per block")
        for r in per_head:
            vector(r, "values.per_head")
        for k, v in values.items():
            if k not in ("per_block", "per_head"):
                if isinstance(v, list) and v and isinstance(v[0], list):
                    _need(len(v) == n, where, f"values.{k} is not one row per block")
                    for r in v:
                        vector(r, f"values.{k}")
                else:
                    vector(v, f"values.{k}", n)
    elif metric == "convergence":
        for k in ("best_iteration", "iterations"):
            _need(values.get(k) is None or is_int(values[k], 0, MAX_INT), where, f"values.{k} is not an integer >= 0")
        _need(values.get("best_val_metric") is None or is_number(values["best_val_metric"]), where,
              "values.best_val_metric is not a number")
        curve = values.get("curve", [])
        _need(isinstance(curve, list) and all(isinstance(p, list) and len(p) == 2 and is_number(p[0])
                                              and (p[1] is None or is_number(p[1])) for p in curve), where,
              "values.curve is not a list of [iteration, value] pairs")
    return doc


def read_analysis(run, metric, run_id=None):
    """analysis/<metric>.json of a run, checked; None when absent or written for another run
    (its run_id differs from the run's: e.g. an analysis left from before --overwrite)."""
    path = analysis_path(run, metric)
    if not os.path.isfile(path):
        return None
    doc = check_analysis(metric, read_json(path), path)
    if run_id is not None and doc.get("run_id") != run_id:
        return None
    return doc


def analysis_done(run, metric, run_id=None):
    """Whether analysis/<metric>.json exists and belongs to this run (same run_id): what the
    sweep asks before it schedules an analysis. A file that fails its check is not done."""
    try:
        return read_analysis(run, metric, run_id) is not None
    except (ValueError, OSError):
        return False


def run_finished(run):
    """Whether a run directory holds a finished run (a valid config.json and summary.json)."""
    try:
        return load_run(run)["summary"] is not None
    except (ValueError, OSError):
        return False
