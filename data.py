"""Datasets: the five medical sets in their published layouts, seeded splits, the training
transforms, a pre-resized image cache, and two generated offline tasks.

    train, val, test, info = build_datasets("aptos", "/data/aptos2019", img_size=224, seed=0)
    x, y = train[0]            # x: float [3, 224, 224] normalised; y: int (or float32 [14] for chexpert)
    bank = eval_view(train)    # same items, eval transforms (the k-NN bank)

Layouts read (root = the folder the user passes):
    aptos     train.csv (id_code, diagnosis) + train_images/<id_code>.png
    ddsm      ddsm_raw/<file> + ddsm_raw_image_lists/{train,val,test}.txt (one file name a line;
              label from the name's prefix: normal -> 0, benign/benign_without_callback/cancer -> 1)
    isic      ISIC_2019_Training_GroundTruth.csv (image, MEL..SCC, UNK ignored) + train/<image>.jpg
              (or ISIC_2019_Training_Input/<image>.jpg when train/ is absent)
    chexpert  train.csv (Path + 14 observations); Path is resolved against root, then root's parent,
              then root with Path's first folder dropped; U-Zeroes (blank, -1 -> 0); no positive ->
              "No Finding" = 1; split by patient (the 'patientNNNNN' folder in Path)
    camelyon  camelyonpatch_level_2_split_{train,valid,test}_{x,y}.h5 (HDF5 datasets x, y)
Your own images (png, jpg, jpeg, bmp, tif; cached as RGB: grey replicated, alpha dropped):
    folder    <class name>/<image> (classes = sorted folder names, sub-folders searched), or
              {train,val,test}/<class name>/<image>: then those folders are the split
    csv       labels.csv (image = path relative to root, label = class name or integer, optional
              patient: then the split is by patient); integer labels are classes in numeric order
    The split holds out 0.3 (half val, half test) within each class, or of the patients; the
    metric defaults to roc_auc (two classes) or macro_recall; mean/std are computed over the
    training split's cached images, once. Nothing is written before the whole folder (every
    image decoded) has been checked.

Splits: the held-out part (aptos 0.3, isic 0.2, chexpert 0.2 of the patients) is a seeded
permutation (numpy default_rng(seed)) of the sorted ids; its first half is val, the rest test
(as the original code). The split is written once to <cache_dir>/split_<name>_seed<seed>.json and
reused while it covers exactly the dataset's ids. ddsm and camelyon use their published splits.

Cache: every image is decoded once, resized to (r, r) with r = round(img_size * 256 / 224)
and stored, for the whole dataset, in one uint8 .npy memmap (grey sets keep one channel) plus
an index .json, in cache_dir (default <root>/.wtst_cache when writable, else
$XDG_CACHE_HOME/wtst/<hash of root> or ~/.cache/wtst/<hash of root>). The key hashes
(dataset, root, r, files with sizes and mtimes); a mismatch rebuilds it (rows of unchanged
files are copied from the old cache), atomically. camelyon reads HDF5 directly; the
generated sets live in memory.

Transforms (section 5 of the spec): Resize((r, r)) [done by the cache], then train:
RandomResizedCrop(img_size, scale=(0.8, 1)), vertical and horizontal flips, ColorJitter(0.2, 0.2,
0.1, 0.1) with p 0.2, RandomGrayscale(0.2); eval: CenterCrop(img_size); then ToTensor, Normalize.
All augmentation randomness comes from torch's RNG, so torch.manual_seed and the DataLoader's
per-worker seeding govern it. Grey images are replicated to 3 channels.
"""
import copy
import csv
import functools
import hashlib
import json
import multiprocessing
import os
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T
from torchvision.transforms import functional as TF

import rundir

DATASETS = ["aptos", "ddsm", "isic", "chexpert", "camelyon", "synthetic", "shapes", "lesions"]
GENERATED_TASKS = ("synthetic", "shapes", "lesions")
DEFAULT_IMG_SIZE = {"aptos": 224, "ddsm": 224, "isic": 224, "chexpert": 224, "camelyon": 224,
                    "synthetic": 64, "shapes": 64, "lesions": 64}

CACHE_VERSION = 1            # bump to invalidate every cache after a change in decoding
CACHE_WORKERS = None         # processes that build a cache (None: all cores)
SYNTHETIC_SIZE = 3000        # images in the generated fundus-like task (all splits)
SHAPES_SIZE = 4800           # images in the generated shapes task (all splits)
LESIONS_SPLIT = (256, 128, 200)  # train, val, test images of the generated dermoscopy-like target
GENERATED_RES = 64           # native resolution of both generated tasks

CHEXPERT_CLASSES = ["No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity",
                    "Lung Lesion", "Edema", "Consolidation", "Pneumonia", "Atelectasis",
                    "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices"]
ISIC_CLASSES = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"]
SHAPE_NAMES = ["circle", "square", "triangle", "cross"]
SCENE_NAMES = ["dark", "light"]                         # the background brightness of `shapes`
LESION_CLASSES = ["regular", "irregular"]                # the border of a `lesions` lesion
LESION_NOTCHES = (0.15, 0.30)   # notch amplitude of an irregular border (fraction of the radius)
LESION_NOISE = 0.5              # sensor noise of `lesions`: uniform, this peak-to-peak (of 1)

# your own images: --data folder (D/<class>/<image>) or csv (D/labels.csv); see _read_folder
USER_DATA = ["folder", "csv"]
DATASETS += USER_DATA
DEFAULT_IMG_SIZE.update({d: 224 for d in USER_DATA})
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
FEW_IMAGES = 10              # a class with fewer images is a warning (noisy or missing val/test)
# the task metrics a single-label dataset can be scored with (train.py --metric)
SINGLE_LABEL_METRICS = ["quadratic_kappa", "roc_auc", "macro_recall", "accuracy"]

# name -> fixed facts: classes, metric, loss, mean/std, grey files, held-out fraction, layout hint
_SPECS = {
    "aptos": dict(classes=["No DR", "Mild", "Moderate", "Severe", "Proliferative DR"],
                  metric="quadratic_kappa", mean=(0.415, 0.221, 0.073), std=(0.275, 0.150, 0.081),
                  grey=False, heldout=0.3, layout="train.csv and train_images/<id_code>.png"),
    "ddsm": dict(classes=["normal", "abnormal"], metric="roc_auc", mean=(0.286,) * 3, std=(0.267,) * 3,
                 grey=True, heldout=None,
                 layout="ddsm_raw/<file> and ddsm_raw_image_lists/{train,val,test}.txt"),
    "isic": dict(classes=ISIC_CLASSES, metric="macro_recall", mean=(0.668, 0.530, 0.524),
                 std=(0.224, 0.204, 0.215), grey=False, heldout=0.2,
                 layout="ISIC_2019_Training_GroundTruth.csv and train/<image>.jpg"),
    "chexpert": dict(classes=CHEXPERT_CLASSES, metric="mean_auc", mean=(0.503,) * 3, std=(0.292,) * 3,
                     grey=True, heldout=0.2, layout="train.csv with Path and the 14 observation columns"),
    "camelyon": dict(classes=["normal", "tumor"], metric="roc_auc", mean=(0.700, 0.538, 0.691),
                     std=(0.231, 0.274, 0.209), grey=False, heldout=None,
                     layout="camelyonpatch_level_2_split_{train,valid,test}_{x,y}.h5"),
    "synthetic": dict(classes=[f"grade{g}" for g in range(5)], metric="quadratic_kappa", heldout=0.3),
    "shapes": dict(classes=[f"{s}-on-{b}" for s in SHAPE_NAMES for b in SCENE_NAMES],
                   metric="macro_recall", heldout=0.2),
    "lesions": dict(classes=LESION_CLASSES, metric="roc_auc", heldout=None),
}
_SPECS.update(
    folder=dict(classes=[], metric=None, grey=False, heldout=0.3,
                layout="<root>/<class name>/<image> or <root>/{train,val,test}/<class name>/<image>"),
    csv=dict(classes=[], metric=None, grey=False, heldout=0.3,
             layout="<root>/labels.csv with columns image, label and optionally patient"),
)


# ----------------------------------------------------------------------------- transforms
def resize_size(img_size):
    """Side r of the square resize before cropping: 256 for 224 (the paper's ratio)."""
    return int(round(img_size * 256 / 224))


def build_transforms(img_size, mean, std):
    """(train, eval) transforms applied to a PIL RGB image already resized to (r, r)."""
    tail = [T.ToTensor(), T.Normalize(mean, std)]
    train = T.Compose([
        T.RandomResizedCrop(img_size, scale=(0.8, 1.0)),
        T.RandomVerticalFlip(),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.2, 0.2, 0.1, 0.1)], p=0.2),
        T.RandomGrayscale(0.2),
    ] + tail)
    evaluate = T.Compose([T.CenterCrop(img_size)] + tail)
    return train, evaluate


def _resize(img, r):
    """Resize((r, r)) exactly as torchvision does it on PIL images (bilinear, antialiased)."""
    return img if img.size == (r, r) else TF.resize(img, [r, r], interpolation=T.InterpolationMode.BILINEAR)


def to_8bit(img):
    """An image of any mode Pillow opens as 8-bit 'L', 'RGB' or 'RGBA' values, the way a viewer
    shows them: 16-bit grey (I;16*) scaled by 1/257; 32-bit integers ('I') kept when they fit
    0..255, scaled by 1/257 when they fit 0..65535, else stretched from their own min..max;
    floats ('F') scaled by 255 when in [0, 1], else stretched from their own min..max (a
    constant image keeps its clipped value). Palette and bilevel images are expanded, CMYK,
    YCbCr, LAB and HSV converted to RGB, alpha kept for the caller to drop. Non-finite float
    pixels are refused: there is no way to show them."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        if not np.isfinite(a).all():
            raise ValueError(f"mode {img.mode} image with non-finite (NaN or infinite) pixel values")
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if img.mode.startswith("I;16") or (img.mode == "I" and lo >= 0 and 255 < hi <= 65535):
            a = a / 257
        elif img.mode == "F" and lo >= 0 and hi <= 1:
            a = a * 255
        elif not (lo >= 0 and hi <= 255) and hi > lo:   # outside the 8-bit range: stretch
            a = (a - lo) / (hi - lo) * 255
        return Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8))
    if img.mode in ("L", "RGB", "RGBA"):
        return img
    alpha = img.mode in ("LA", "La", "PA", "RGBa") or "transparency" in img.info
    try:
        return img.convert("RGBA" if alpha else "RGB")
    except ValueError:
        raise ValueError(f"mode {img.mode} images cannot be converted to RGB (expected grey, RGB, "
                         "palette, CMYK, 16-bit or float images)") from None


def decode_image(path, mode, r):
    """Decode one file fully (PIL .load() catches truncation; a multi-frame file gives its first
    frame), convert it to 8 bits as a viewer shows it (`to_8bit`), then to `mode` ('L' or
    'RGB'; alpha is dropped) and resize to (r, r)."""
    try:
        with Image.open(path) as img:
            img.load()
            img = to_8bit(img)
            img = img.convert(mode) if img.mode != mode else img.copy()
    except FileNotFoundError:
        raise FileNotFoundError(f"image {path} does not exist") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot decode image {path}: {e} (expected a complete, readable image file)") from None
    return _resize(img, r)


# ----------------------------------------------------------------------------- image sources
class _FileSource:
    """Decodes and resizes the original files on every access (no cache)."""

    def __init__(self, paths, mode, r):
        self.paths, self.mode, self.r = list(paths), mode, r

    def image(self, i):
        return decode_image(self.paths[i], self.mode, self.r).convert("RGB")


class _MemmapSource:
    """Rows of the cache memmap; the map is opened lazily, once per process (DataLoader workers)."""

    def __init__(self, path, rows):
        self.path, self.rows = str(path), np.asarray(rows, dtype=np.int64)
        self._mm, self._pid = None, None

    def __getstate__(self):
        return {**self.__dict__, "_mm": None, "_pid": None}

    def image(self, i):
        if self._mm is None or self._pid != os.getpid():
            self._mm, self._pid = np.load(self.path, mmap_mode="r"), os.getpid()
        return Image.fromarray(np.asarray(self._mm[self.rows[i]])).convert("RGB")


class _ArraySource:
    """In-memory uint8 images [N, H, W, 3] (generated tasks), resized on access."""

    def __init__(self, images, r):
        self.images, self.r = images, r

    def image(self, i):
        return _resize(Image.fromarray(self.images[i]), self.r)


class _H5Source:
    """PatchCamelyon HDF5 `x` [N, 96, 96, 3] uint8, opened lazily once per process."""

    def __init__(self, path, r):
        self.path, self.r = str(path), r
        self._x, self._pid = None, None

    def __getstate__(self):
        return {**self.__dict__, "_x": None, "_pid": None}

    def image(self, i):
        if self._x is None or self._pid != os.getpid():
            import h5py
            self._x, self._pid = h5py.File(self.path, "r")["x"], os.getpid()
        return _resize(Image.fromarray(np.asarray(self._x[i])), self.r)


class ImageDataset(Dataset):
    """(normalised float [3, H, W], label) items; `.labels` holds every label as numpy
    (int64 [n] or float32 [n, C]); `.ids` the file ids (relative paths) or row numbers."""

    def __init__(self, source, labels, ids, train_transform, eval_transform, name, split):
        self.source, self.labels, self.ids = source, labels, list(ids)
        self.train_transform, self.eval_transform = train_transform, eval_transform
        # augment the training split only; val and test are scored with the eval transforms
        self.transform = train_transform if split == "train" else eval_transform
        self.name, self.split = name, split

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        x = self.transform(self.source.image(i))
        y = self.labels[i]
        return x, (torch.tensor(y, dtype=torch.float32) if self.labels.ndim == 2 else int(y))

    def __repr__(self):
        return f"ImageDataset({self.name}/{self.split}, n={len(self)})"


def eval_view(ds):
    """The same items as `ds` with the eval transforms (k-NN bank = training split)."""
    view = copy.copy(ds)
    view.transform = ds.eval_transform
    return view


# ----------------------------------------------------------------------------- readers
class _Table:
    """What a reader found: ids (file paths relative to `base`), labels, optional groups
    (patients) or published splits, and the files the ids came from (for messages)."""

    def __init__(self, ids, labels, base, source, groups=None, splits=None, resolve=None):
        self.ids, self.labels, self.base, self.source = ids, labels, Path(base), source
        self.groups, self.splits = groups, splits
        self.resolve = resolve or (lambda i: self.base / i)


def _check_root(name, root):
    if root is None or not Path(root).is_dir():
        raise FileNotFoundError(f"{name}: dataset root '{root}' is not a folder (expected {_SPECS[name]['layout']})")
    return Path(root).resolve()


def _read_csv(path, required, name):
    """Rows of a CSV as dicts; checks the file and its required columns."""
    if not path.is_file():
        raise FileNotFoundError(f"{name}: {path} does not exist (expected {_SPECS[name]['layout']})")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{name}: {path} lacks column(s) {', '.join(missing)} "
                             f"(found {', '.join(reader.fieldnames or []) or 'no header'})")
        try:
            rows = [(reader.line_num, row) for row in reader]
        except csv.Error as e:  # e.g. a field over the csv module's size limit
            raise ValueError(f"{name}: {path}: a row after line {reader.line_num}: {e}") from None
    for line, row in rows:
        if any(row[c] is None for c in required):
            raise ValueError(f"{name}: {path} line {line} has fewer fields than the header "
                             f"(expected values for {', '.join(required)})")
    if not rows:
        raise ValueError(f"{name}: {path} has no rows")
    return rows


def _no_duplicates(ids, where, name):
    seen = set()
    for i in ids:
        if i in seen:
            raise ValueError(f"{name}: {where} lists '{i}' twice (expected each image once)")
        seen.add(i)


def _read_aptos(root):
    csv_path = root / "train.csv"
    ids, labels = [], []
    for line, row in _read_csv(csv_path, ["id_code", "diagnosis"], "aptos"):
        v = row["diagnosis"].strip()
        if not re.fullmatch(r"[0-4](\.0*)?", v):
            raise ValueError(f"aptos: {csv_path} line {line}: diagnosis '{v}' for {row['id_code']} "
                             f"is not a grade 0..4")
        ids.append(f"train_images/{row['id_code'].strip()}.png")
        labels.append(int(float(v)))
    _no_duplicates(ids, csv_path, "aptos")
    return _Table(ids, np.array(labels, dtype=np.int64), root, csv_path)


def _read_ddsm(root):
    list_dir = root / "ddsm_raw_image_lists"
    codes = {"normal": 0, "benign": 1, "cancer": 1}
    ids, labels, splits = [], [], {}
    for split in ("train", "val", "test"):
        path = list_dir / f"{split}.txt"
        if not path.is_file():
            raise FileNotFoundError(f"ddsm: {path} does not exist (expected {_SPECS['ddsm']['layout']})")
        names = []
        for line, text in enumerate(path.read_text().splitlines(), 1):
            if not text.strip():
                continue
            fname = text.split()[0]
            prefix = Path(fname).name.split("_")[0]
            if prefix not in codes:
                raise ValueError(f"ddsm: {path} line {line}: '{fname}' does not start with normal_, benign_ "
                                 f"or cancer_ (the label comes from that prefix)")
            names.append(f"ddsm_raw/{fname}")
            labels.append(codes[prefix])
        if not names:
            raise ValueError(f"ddsm: {path} lists no images")
        splits[split] = names
        ids += names
    _no_duplicates(ids, f"{list_dir} (train/val/test together)", "ddsm")
    return _Table(ids, np.array(labels, dtype=np.int64), root, list_dir, splits=splits)


def _read_isic(root):
    csv_path = root / "ISIC_2019_Training_GroundTruth.csv"
    folder = "train" if (root / "train").is_dir() else "ISIC_2019_Training_Input"
    if not (root / folder).is_dir():
        raise FileNotFoundError(f"isic: neither {root / 'train'} nor {root / 'ISIC_2019_Training_Input'} "
                                f"exists (expected the images as train/<image>.jpg)")
    ids, labels = [], []
    for line, row in _read_csv(csv_path, ["image"] + ISIC_CLASSES, "isic"):
        try:
            v = np.array([float(row[c] or 0) for c in ISIC_CLASSES])
        except ValueError:
            raise ValueError(f"isic: {csv_path} line {line}: non-numeric class value in "
                             f"{[row[c] for c in ISIC_CLASSES]}") from None
        if not (np.isin(v, (0, 1)).all() and v.sum() == 1):
            raise ValueError(f"isic: {csv_path} line {line}: image {row['image']} has {v.tolist()} in "
                             f"{','.join(ISIC_CLASSES)} (expected exactly one 1; UNK-only rows are not supported)")
        ids.append(f"{folder}/{row['image'].strip()}.jpg")
        labels.append(int(v.argmax()))
    _no_duplicates(ids, csv_path, "isic")
    return _Table(ids, np.array(labels, dtype=np.int64), root, csv_path)


def _chexpert_resolver(root, first):
    """Path columns start with 'CheXpert-v1.0[-small]/'; find the folder they are relative to."""
    p = Path(first)
    if (root / p).is_file():
        return lambda i: root / i
    if (root.parent / p).is_file():
        return lambda i: root.parent / i
    if len(p.parts) > 1 and (root / Path(*p.parts[1:])).is_file():
        return lambda i: root / Path(*Path(i).parts[1:])
    raise FileNotFoundError(f"chexpert: image '{first}' (first row of train.csv) is neither under {root} "
                            f"nor under {root.parent} (expected root = the CheXpert-v1.0[-small] folder or its parent)")


def _read_chexpert(root):
    csv_path = root / "train.csv"
    ids, labels, groups = [], [], []
    for line, row in _read_csv(csv_path, ["Path"] + CHEXPERT_CLASSES, "chexpert"):
        y = np.zeros(len(CHEXPERT_CLASSES), dtype=np.float32)
        for k, c in enumerate(CHEXPERT_CLASSES):
            v = row[c].strip()
            if v not in ("", "1", "1.0", "0", "0.0", "-1", "-1.0"):
                raise ValueError(f"chexpert: {csv_path} line {line}: column '{c}' has '{v}' "
                                 f"(expected blank, 1, 0 or -1)")
            y[k] = 1.0 if v in ("1", "1.0") else 0.0      # U-Zeroes: blank and -1 -> 0
        if y.sum() == 0:
            y[0] = 1.0                                     # no positive -> "No Finding"
        m = re.search(r"patient\d+", row["Path"])
        if m is None:
            raise ValueError(f"chexpert: {csv_path} line {line}: cannot derive a patient id from Path "
                             f"'{row['Path']}' (expected a 'patientNNNNN' folder)")
        ids.append(row["Path"].strip())
        labels.append(y)
        groups.append(m.group(0))
    _no_duplicates(ids, csv_path, "chexpert")
    return _Table(ids, np.stack(labels), root, csv_path, groups=groups,
                  resolve=_chexpert_resolver(root, ids[0]))


_READERS = {"aptos": _read_aptos, "ddsm": _read_ddsm, "isic": _read_isic, "chexpert": _read_chexpert}


# ----------------------------------------------------------------------------- your own images
def display_name(name, root):
    """How figures and run names call a dataset: the folder's name for folder/csv data."""
    if name in USER_DATA and root is not None:
        return Path(root).resolve().name or name
    return name


def _warn(msg):
    """A one-line warning on stderr (the value is legitimate but surprising)."""
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def _image_files(folder):
    """Image files under `folder` (recursive, sorted, hidden ones skipped) and the other files.
    Links to folders are followed, but a link to the folder itself or one above it (a loop,
    which would list the same images without end) is an error naming it."""
    images, other = [], []
    for here, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        real = os.path.realpath(here)
        for d in dirs:
            target = os.path.realpath(os.path.join(here, d))
            if real == target or real.startswith(target.rstrip(os.sep) + os.sep):
                raise ValueError(f"folder: {Path(here) / d} links to {target}, a folder above it (a symlink "
                                 "loop that would count its images again and again); remove the link")
        for f in sorted(files):
            if not f.startswith("."):
                (images if Path(f).suffix.lower() in IMAGE_EXTS else other).append(Path(here) / f)
    return images, other


def _subfolders(folder):
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _check_classes(name, classes, where):
    if len(classes) < 2:
        raise ValueError(f"{name}: {where} has {len(classes)} class(es) {classes} "
                         f"(expected at least two; layout {_SPECS[name]['layout']})")


def _read_folder(root):
    """ImageFolder convention: classes are the sorted folder names. When root/train, val and
    test exist they are the split (each with the class folders)."""
    given = [s for s in ("train", "val", "test") if (root / s).is_dir()]
    if given and len(given) < 3:
        missing = [s + "/" for s in ("train", "val", "test") if s not in given]
        raise ValueError(f"folder: {root} has {', '.join(s + '/' for s in given)} but no {', '.join(missing)} "
                         "(expected all of train/, val/, test/, each with the class folders, "
                         "or the class folders directly)")
    parts = given or [""]
    classes = sorted(set().union(*(_subfolders(root / p) for p in parts)))
    _check_classes("folder", classes, f"{root}" + (" (train/, val/, test/ together)" if given else ""))
    ids, labels, splits, skipped = [], [], {}, []
    count = {(p, c): 0 for p in parts for c in classes}
    for p in parts:
        names = []
        for k, c in enumerate(classes):
            files, other = _image_files(root / p / c) if (root / p / c).is_dir() else ([], [])
            skipped += other
            names += [f.relative_to(root).as_posix() for f in files]
            labels += [k] * len(files)
            count[p, c] = len(files)
        splits[p] = names
        ids += names
    exts = ", ".join(e[1:] for e in IMAGE_EXTS)
    for c in classes:
        if sum(count[p, c] for p in parts) == 0:
            other = [f for f in skipped if c in f.relative_to(root).parts[:2]]
            where = " or ".join(str(root / p / c) for p in parts)
            raise ValueError(f"folder: class '{c}' has no image file in {where} "
                             f"(expected {exts} files" + (f"; found {len(other)} other file(s), e.g. {other[0].name})"
                                                          if other else ")"))
        if given and count["train", c] == 0:
            raise ValueError(f"folder: class '{c}' has no image in {root / 'train' / c} (a class must be trained on)")
    for p in given:
        if not splits[p]:
            raise ValueError(f"folder: {root / p} holds no image (expected <class name>/<image> files in each of "
                             f"train/, val/, test/)")
    if skipped:
        _warn(f"folder: ignored {len(skipped)} file(s) that are not {exts} images, e.g. {skipped[0]}")
    t = _Table(ids, np.array(labels, dtype=np.int64), root, root, splits=splits if given else None)
    t.classes = classes
    return t


def _one_spelling(path):
    """A relative image path in one spelling ('./a//b.png' -> 'a/b.png'), so that one image
    listed twice under two spellings is caught as a duplicate."""
    return Path(os.path.normpath(path)).as_posix()


def _read_user_csv(root):
    """root/labels.csv: image (path relative to root), label (class name or integer), optional
    patient (then the split is by patient). Integer labels are classes in numeric order."""
    path = root / "labels.csv"
    rows = _read_csv(path, ["image", "label"], "csv")
    by_patient = "patient" in rows[0][1]
    ids, raw, groups = [], [], []
    for line, row in rows:
        for col in ["image", "label"] + (["patient"] if by_patient else []):
            if not (row[col] or "").strip():
                raise ValueError(f"csv: {path} line {line} has no {col} (expected a value in every row)")
        ids.append(_one_spelling(row["image"].strip()))
        raw.append(row["label"].strip())
        if by_patient:
            groups.append(row["patient"].strip())
    _no_duplicates(ids, path, "csv")
    numeric = all(re.fullmatch(r"[+-]?\d+(\.0*)?", v) for v in raw)
    keys = [int(float(v)) for v in raw] if numeric else raw
    values = sorted(set(keys))
    classes = [str(v) for v in values]
    _check_classes("csv", classes, f"{path} (column label)")
    missing = [i for i in ids if not (root / i).is_file()]
    if missing:
        raise FileNotFoundError(f"csv: {len(missing)} of {len(ids)} images listed in {path} do not exist: "
                                f"{', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''} "
                                f"(expected paths relative to {root})")
    index = {v: k for k, v in enumerate(values)}
    t = _Table(ids, np.array([index[v] for v in keys], dtype=np.int64), root, path,
               groups=groups if by_patient else None)
    t.classes = classes
    return t


def _min_units(heldout):
    """Fewest images (or patients) for which make_split fills all three splits."""
    m = 1
    while not (round(m * heldout) >= 2 and m - round(m * heldout) >= 1):
        m += 1
    return m


def _user_split(name, table, seed, saved=None):
    """The folder's own split, a saved split covering the images, or a seeded one: by patient
    when there are patients, else within each class (so every class reaches val and test)."""
    heldout = _SPECS[name]["heldout"]
    if table.splits is not None:
        parts, by = {s: table.splits[s] for s in ("train", "val", "test")}, "folders"
    elif saved is not None:
        parts, by = saved, "split file"
    elif table.groups is not None:
        parts, by = make_split(table.ids, heldout, seed, table.groups), "patient"
        if not all(parts.values()):
            n = len(set(table.groups))
            raise ValueError(f"{name}: {n} patient(s) are too few for non-empty train/val/test splits "
                             f"(held-out fraction {heldout}: at least {_min_units(heldout)} patients are needed)")
    else:
        parts, by, members = {"train": [], "val": [], "test": []}, "class", {}
        for i, y in zip(table.ids, table.labels.tolist()):
            members.setdefault(y, []).append(i)
        for k in sorted(members):
            for s, v in make_split(members[k], heldout, seed).items():
                parts[s] += v
        parts = {s: sorted(v) for s, v in parts.items()}
        if not all(parts.values()):
            raise ValueError(f"{name}: {len(table.ids)} images are too few for non-empty train/val/test splits "
                             f"(held-out fraction {heldout}, taken within each class: at least "
                             f"{_min_units(heldout)} images in one class are needed)")
    if not all(parts.values()):             # an edited split file
        raise ValueError(f"{name}: the saved split has an empty {[s for s, v in parts.items() if not v][0]} split")
    return parts, by


def _user_warnings(name, table, parts):
    pos = {i: k for k, i in enumerate(table.ids)}
    counts = np.bincount(table.labels, minlength=len(table.classes))
    for c, n in zip(table.classes, counts):
        if n < FEW_IMAGES:
            _warn(f"{name}: class '{c}' has only {n} image(s) (fewer than {FEW_IMAGES}: its val/test scores are noisy)")
    for s in ("val", "test"):
        seen = set(table.labels[[pos[i] for i in parts[s]]].tolist())
        absent = [c for k, c in enumerate(table.classes) if k not in seen]
        if absent:
            _warn(f"{name}: the {s} split has no image of class(es) {', '.join(absent)} "
                  f"(its {s} metric may be undefined)")


def check_metric(name, metric, num_classes, multilabel, what=None):
    """The task metric: the given one when it fits the task, else an error naming the flag."""
    what = what or name
    if multilabel:
        if metric not in (None, "mean_auc"):
            raise ValueError(f"--metric {metric}: {what} is multi-label, its metric is mean_auc (leave --metric out)")
        return "mean_auc"
    if metric is None:
        return "roc_auc" if num_classes == 2 else "macro_recall"
    if metric not in SINGLE_LABEL_METRICS:
        raise ValueError(f"--metric {metric!r}: expected one of {', '.join(SINGLE_LABEL_METRICS)}")
    if metric == "roc_auc" and num_classes != 2:
        raise ValueError(f"--metric roc_auc needs two classes, {what} has {num_classes} "
                         f"(expected quadratic_kappa, macro_recall or accuracy)")
    return metric


def _mean_std(images):
    """Per-channel mean and std of uint8 [.., 3] image chunks, in [0, 1] (float64 sums)."""
    s, s2, n = np.zeros(3), np.zeros(3), 0
    for x in images:
        x = np.asarray(x, dtype=np.float64).reshape(-1, 3) / 255.0
        s, s2, n = s + x.sum(0), s2 + (x * x).sum(0), n + len(x)
    mean = s / n
    std = np.sqrt(np.maximum(s2 / n - mean * mean, 0))
    return tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)


def _train_stats(table, rows, npy, r):
    """Mean/std over the training split's pre-resized images, computed once and stored beside
    the cache (its name starts with the cache's, so a rebuilt cache drops it)."""
    key = hashlib.sha1(json.dumps(sorted(table.ids[k] for k in rows)).encode()).hexdigest()[:12]
    if npy is None:                          # no cache: decode the training images
        return _mean_std(np.asarray(decode_image(table.resolve(table.ids[k]), "RGB", r)) for k in rows)
    path = npy.with_name(f"{npy.stem}.mean_std_{key}.json")
    try:
        saved = rundir.read_json(path)
        mean, std = tuple(saved["mean"]), tuple(saved["std"])
        if len(mean) == len(std) == 3 and all(rundir.is_number(v) and 0 <= v <= 1 for v in mean) \
                and all(rundir.is_number(v) and 0 < v <= 1 for v in std):
            return mean, std
    except (OSError, ValueError, KeyError, TypeError):
        pass                                 # absent or not ours: computed again below
    mm, rows = np.load(npy, mmap_mode="r"), np.sort(rows)
    mean, std = _mean_std(mm[rows[k:k + 256]] for k in range(0, len(rows), 256))
    rundir.save_json(path, {"mean": mean, "std": std, "train_images": len(rows)})
    return mean, std


def _build_user(name, root, img_size, seed, cache_dir, cache, workers, metric, info):
    """Datasets of a folder or CSV: validate all of it (and decode every image into the cache)
    before the split file is written; on a bad image nothing is left behind."""
    table = _read_folder(root) if name == "folder" else _read_user_csv(root)
    shown = display_name(name, root)
    info.update(classes=table.classes, num_classes=len(table.classes), display_name=shown,
                metric=check_metric(name, metric, len(table.classes), False, f"{name} {root}"))
    _user_split(name, table, seed)                        # too few images: fail before any write
    _file_entries(name, table)                            # a missing image, one file twice: likewise
    fresh = not Path(cache_dir if cache_dir is not None else root / ".wtst_cache").exists()
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir(root)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        rundir.remove_stale_tmp(cache_dir)                 # a killed cache build's .npy.tmp<pid>
        split_file = cache_dir / f"split_{name}_seed{seed}.json"
        saved = None if table.splits is not None else _read_split(name, split_file, table.ids)
        parts, by = _user_split(name, table, seed, saved)
        r = resize_size(img_size)
        npy = ensure_cache(name, table, r, cache_dir, workers) if cache else None
        pos = {i: k for k, i in enumerate(table.ids)}
        mean, std = _train_stats(table, [pos[i] for i in parts["train"]], npy, r)
        _user_warnings(name, table, parts)                 # after the last possible error
        doc = {"dataset": name, "root": str(root), "seed": seed, "by": by, **parts}
        if saved is None and _read_split(name, split_file, table.ids, quiet=True) != parts:
            rundir.save_json(split_file, doc)
    except BaseException:
        if fresh and cache_dir.is_dir() and not any(cache_dir.iterdir()):
            cache_dir.rmdir()                               # leave no empty cache folder behind
        raise
    info.update(cache_dir=str(cache_dir), split_file=str(split_file), cache_file=npy and str(npy))
    return _make_parts(name, table, parts, npy, "RGB", r, build_transforms(img_size, mean, std)), mean, std


# ----------------------------------------------------------------------------- splits
def make_split(ids, heldout, seed, groups=None):
    """{"train","val","test"} -> sorted ids. Units (ids, or groups such as patients) are sorted,
    permuted by numpy default_rng(seed); the first round(heldout * n) are held out, the first
    half of those is val, the rest test."""
    units = sorted(set(groups)) if groups is not None else sorted(ids)
    perm = np.random.default_rng(seed).permutation(len(units))
    n_held = int(round(len(units) * heldout))
    held = [units[k] for k in perm[:n_held]]
    where = {u: "train" for u in units}
    where.update({u: "val" for u in held[:n_held // 2]})
    where.update({u: "test" for u in held[n_held // 2:]})
    keys = groups if groups is not None else ids
    out = {"train": [], "val": [], "test": []}
    for i, k in zip(ids, keys):
        out[where[k]].append(i)
    return {s: sorted(v) for s, v in out.items()}


def _read_split(name, path, ids, quiet=False):
    """The split saved in `path` when it covers exactly `ids`, else None (warns unless quiet)."""
    if not path.is_file():
        return None
    try:
        saved = rundir.read_json(path)
        parts = {s: saved[s] for s in ("train", "val", "test")}
        if all(isinstance(v, list) and all(isinstance(i, str) for i in v) for v in parts.values()) \
                and sorted(parts["train"] + parts["val"] + parts["test"]) == sorted(ids):
            return parts
    except (ValueError, KeyError, TypeError, OSError):
        pass
    if not quiet:
        warnings.warn(f"{name}: split file {path} does not match the dataset's images; rewriting it", stacklevel=2)
    return None


def _load_or_make_split(name, table, seed, cache_dir):
    """The published split (ddsm), else the split file, (re)written when absent or not
    covering exactly the dataset's ids."""
    if table.splits is not None:
        return table.splits, None
    heldout = _SPECS[name]["heldout"]
    path = Path(cache_dir) / f"split_{name}_seed{seed}.json"
    parts = _read_split(name, path, table.ids)
    if parts is not None:
        return parts, path
    parts = make_split(table.ids, heldout, seed, table.groups)
    for s, v in parts.items():
        if not v:
            raise ValueError(f"{name}: {len(table.ids)} images are too few for a non-empty {s} split "
                             f"(held-out fraction {heldout})")
    rundir.save_json(path, {"dataset": name, "seed": seed, "heldout": heldout,
                              "by": "patient" if table.groups is not None else "image", **parts})
    return parts, path


# ----------------------------------------------------------------------------- cache
def default_cache_dir(root):
    """<root>/.wtst_cache when root is writable, else ~/.cache/wtst/<sha1(root)[:12]>."""
    root = Path(root).resolve()
    local = root / ".wtst_cache"
    try:
        local.mkdir(exist_ok=True)
        if os.access(local, os.W_OK):
            return local
    except OSError:
        pass
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    d = base / "wtst" / hashlib.sha1(str(root).encode()).hexdigest()[:12]
    d.mkdir(parents=True, exist_ok=True)
    return d


def _file_entries(name, table):
    """[(id, size, mtime_ns)] for every image. A missing image is an error naming it; so is one
    file reached under two ids (a symlink, a hard link, './a.png' beside 'a.png'): each image
    must count once, in one split, with one label."""
    out, seen = [], {}
    for i in table.ids:
        try:
            st = os.stat(table.resolve(i))
        except FileNotFoundError:
            raise FileNotFoundError(f"{name}: image {table.resolve(i)} listed in {table.source} "
                                    f"does not exist") from None
        first = seen.setdefault((st.st_dev, st.st_ino), i)
        if first != i:
            raise ValueError(f"{name}: '{first}' and '{i}' in {table.source} are the same file (a link or "
                             "another spelling of one path); each image must appear once")
        out.append((i, st.st_size, st.st_mtime_ns))
    return out


def _cache_worker(args):
    """Decode a chunk of files into rows of the (temporary) cache file; runs in a pool."""
    tmp, rows, paths, mode, r = args
    mm = np.load(tmp, mmap_mode="r+")
    for row, p in zip(rows, paths):
        mm[row] = np.asarray(decode_image(p, mode, r))
    mm.flush()
    return len(rows)


def _old_rows(cache_dir, prefix, shape, entries):
    """Rows of a previous cache (same prefix and shape) whose file is unchanged: {new_row: (npy, old_row)}.
    An old index or array that does not check out (unreadable, other shape, row count) is ignored."""
    reuse = {}
    want = {e[0]: (k, tuple(e)) for k, e in enumerate(entries)}
    for idx_path in sorted(Path(cache_dir).glob(prefix + "*.json")):
        npy = idx_path.with_suffix(".npy")
        try:
            files = rundir.read_json(idx_path)["files"]
            rows = np.load(npy, mmap_mode="r").shape
            if tuple(rows[1:]) != tuple(shape[1:]) or not isinstance(files, list) or len(files) != rows[0]:
                continue
            files = [tuple(e) for e in files]
        except (ValueError, KeyError, TypeError, OSError):
            continue
        for old_row, e in enumerate(files):
            k = want.get(e[0]) if e else None
            if k is not None and k[1] == e and k[0] not in reuse:
                reuse[k[0]] = (npy, old_row)
    return reuse


def ensure_cache(name, table, r, cache_dir, workers=None):
    """Path of the cache .npy holding every image of `table` at (r, r), building it if the
    key (dataset, root, r, channels, files with sizes and mtimes) has no match."""
    mode = "L" if _SPECS[name]["grey"] else "RGB"
    entries = _file_entries(name, table)
    key_src = {"version": CACHE_VERSION, "dataset": name, "root": str(table.base), "r": r, "mode": mode,
               "files": entries}
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()
    prefix = f"{name}_{hashlib.sha1(str(table.base).encode()).hexdigest()[:8]}_r{r}_"
    npy, idx = Path(cache_dir) / f"{prefix}{key[:16]}.npy", Path(cache_dir) / f"{prefix}{key[:16]}.json"
    if idx.is_file() and npy.is_file():
        try:
            if rundir.read_json(idx).get("key") == key:
                return npy
        except (ValueError, OSError, AttributeError):
            pass                                               # unreadable index: rebuild
    shape = (len(entries), r, r) if mode == "L" else (len(entries), r, r, 3)
    tmp = f"{npy}.tmp{os.getpid()}"
    need = int(np.prod(shape)) + 4096
    rundir.check_space(npy, need)
    try:
        mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        with open(tmp, "r+b") as f:  # reserve every block now: a full disk is an error here, never
            os.posix_fallocate(f.fileno(), 0, os.path.getsize(tmp))  # a SIGBUS in a worker later
        reuse = _old_rows(cache_dir, prefix, shape, entries)
        olds = {}
        for new_row, (old_npy, old_row) in reuse.items():
            olds.setdefault(old_npy, np.load(old_npy, mmap_mode="r"))
            mm[new_row] = olds[old_npy][old_row]
        mm.flush()
        del mm, olds
        todo = [k for k in range(len(entries)) if k not in reuse]
        _decode_rows(name, tmp, todo, [str(table.resolve(entries[k][0])) for k in todo], mode, r, workers)
        os.replace(tmp, npy)
    except OSError as e:
        if rundir.is_disk_full(e):
            raise rundir.disk_full(npy, need) from None
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    rundir.save_json(idx, {**key_src, "key": key, "shape": list(shape)})
    for old in Path(cache_dir).glob(prefix + "*"):         # stale caches of this dataset and size
        if old not in (npy, idx) and ".tmp" not in old.name:
            try:
                old.unlink(missing_ok=True)
            except OSError:                                  # still mapped elsewhere (Windows)
                pass
    return npy


def _decode_rows(name, tmp, rows, paths, mode, r, workers):
    """Fill `rows` of the memmap file `tmp` from `paths`, in a process pool when worth it. A worker
    that dies (killed, out of memory) is an error naming the dataset, never a wait forever."""
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    from tqdm import tqdm
    if not rows:
        return
    workers = workers or CACHE_WORKERS or os.cpu_count() or 1
    chunk = 16
    jobs = [(tmp, rows[k:k + chunk], paths[k:k + chunk], mode, r) for k in range(0, len(rows), chunk)]
    bar = tqdm(total=len(rows), desc=f"caching {name} at {r}px", unit="img", disable=len(rows) < 64)
    with bar:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                bar.update(_cache_worker(job))
            return
        try:
            with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=multiprocessing.get_context()) as pool:
                for done in as_completed([pool.submit(_cache_worker, job) for job in jobs]):
                    bar.update(done.result())
        except BrokenProcessPool as e:
            raise ValueError(f"{name}: a process building the image cache died ({e}); the cache was not "
                             "written (run again; with little memory, pass fewer --workers)") from None


# ----------------------------------------------------------------------------- camelyon
def _build_camelyon(root, img_size, tfms):
    import h5py
    r = resize_size(img_size)
    out = {}
    for split, tag in (("train", "train"), ("val", "valid"), ("test", "test")):
        paths = {k: root / f"camelyonpatch_level_2_split_{tag}_{k}.h5" for k in ("x", "y")}
        for p in paths.values():
            if not p.is_file():
                hint = f" (found {p.name}.gz: gunzip it first)" if Path(f"{p}.gz").is_file() else ""
                raise FileNotFoundError(f"camelyon: {p} does not exist{hint}")
        try:
            with h5py.File(paths["y"], "r") as f:
                if "y" not in f:
                    raise ValueError(f"camelyon: {paths['y']} has no dataset 'y' (found {list(f.keys())})")
                y = np.asarray(f["y"]).reshape(-1).astype(np.int64)
            with h5py.File(paths["x"], "r") as f:
                if "x" not in f:
                    raise ValueError(f"camelyon: {paths['x']} has no dataset 'x' (found {list(f.keys())})")
                xs, xd = f["x"].shape, f["x"].dtype
        except OSError as e:
            raise ValueError(f"camelyon: cannot read HDF5 file ({e}) "
                             f"(expected {_SPECS['camelyon']['layout']})") from None
        if len(xs) != 4 or xs[3] != 3 or xd != np.uint8:
            raise ValueError(f"camelyon: {paths['x']} 'x' is {xd} {xs} (expected uint8 [N, 96, 96, 3])")
        if xs[0] != len(y):
            raise ValueError(f"camelyon: {paths['x']} has {xs[0]} images but {paths['y']} {len(y)} labels")
        bad = y[(y < 0) | (y > 1)]
        if bad.size:
            raise ValueError(f"camelyon: {paths['y']} has label {bad[0]} (expected 0 or 1)")
        out[split] = ImageDataset(_H5Source(paths["x"], r), y, range(len(y)), *tfms, "camelyon", split)
    return out


# ----------------------------------------------------------------------------- generated tasks
def _grid(res):
    """Pixel-centre coordinates in [-1, 1], shape [1, res, res] each."""
    c = (np.arange(res, dtype=np.float32) + 0.5) / res * 2 - 1
    return c[None, :, None], c[None, None, :]          # y, x


def make_fundus(n, seed, res=GENERATED_RES):
    """Fundus-like images (uint8 [n, res, res, 3]) and grades (int64 [n]), balanced over 0..4.

    Dark background, an orange-red disc with vignetting, a bright optic disc and dark vessel-like
    curves radiating from it. The grade sets the lesions: count ~ (0, 3, 7, 12, 18)[g] + U{0..2}
    Gaussian spots of radius ~ (0.03..0.05) * (1 + 0.25 g) disc radii, either bright yellow
    (exudates) or dark red (haemorrhages, more frequent at higher grades)."""
    rng = np.random.default_rng([seed, 101])
    labels = rng.permutation(np.arange(n) % 5).astype(np.int64)
    out = np.empty((n, res, res, 3), dtype=np.uint8)
    gy, gx = _grid(res)
    for s in range(0, n, 500):
        g = labels[s:s + 500]
        b = len(g)
        u = lambda lo, hi, *shape, b=b: rng.uniform(lo, hi, (b,) + shape).astype(np.float32)
        cy, cx, rad = u(-.06, .06, 1, 1), u(-.06, .06, 1, 1), u(.82, .95, 1, 1)
        d = np.sqrt((gy - cy) ** 2 + (gx - cx) ** 2) / rad
        inside = np.clip((1 - d) * 12, 0, 1)
        base = np.stack([u(.65, .85, 1, 1), u(.25, .40, 1, 1), u(.05, .12, 1, 1)], -1)   # [b,1,1,3]
        img = base * (1 - 0.45 * d[..., None] ** 2)
        # optic disc to one side, vessels radiating from it
        side = np.where(rng.random((b, 1, 1)) < 0.5, -1.0, 1.0).astype(np.float32)
        oy, ox = cy + u(-.1, .1, 1, 1), cx + side * 0.45 * rad
        od = np.sqrt((gy - oy) ** 2 + (gx - ox) ** 2)
        theta, freq, phase = np.arctan2(gy - oy, gx - ox), u(2., 4., 1, 1), u(0, 6.28, 1, 1)
        vessel = (np.abs(np.sin(3 * theta + freq * od + phase)) < 0.12) * np.exp(-od * 1.2) * (od > .1)
        img = img * (1 - 0.45 * vessel[..., None])
        img = img + np.exp(-(od / .11) ** 2)[..., None] * np.array([.35, .3, .15], np.float32)
        # lesions: Gaussian spots summed into a bright (exudate) and a dark (haemorrhage) map
        count = np.array([0, 3, 7, 12, 18])[g] + rng.integers(0, 3, b) * (g > 0)
        maps = np.zeros((2, b, res, res), np.float32)
        for k in range(int(count.max(initial=0))):
            on = np.nonzero(k < count)[0]
            m = len(on)
            v = lambda lo, hi, m=m: rng.uniform(lo, hi, (m, 1, 1)).astype(np.float32)
            lr, la = 0.8 * np.sqrt(v(0, 1)), v(0, 6.28)
            ly, lx = cy[on] + lr * rad[on] * np.sin(la), cx[on] + lr * rad[on] * np.cos(la)
            size = v(.03, .05) * (1 + 0.25 * g[on, None, None]) * rad[on]
            blob = np.exp(-((gy - ly) ** 2 + (gx - lx) ** 2) / (2 * size ** 2))
            dark = (rng.random(m) < 0.3 + 0.1 * g[on]).astype(np.int64)
            maps[dark, on] += blob
        bright, darkm = np.minimum(maps[0], 1)[..., None], np.minimum(maps[1], 1)[..., None]
        img = img * (1 - 0.7 * darkm * np.array([.6, 1, 1], np.float32)) + bright * np.array([.45, .4, .1], np.float32)
        img = img * inside[..., None] + (rng.random(img.shape, dtype=np.float32) - .5) * .07
        out[s:s + b] = np.clip(img * 255, 0, 255).astype(np.uint8)
    return out, labels


def _shape_mask(shape, pu, pv):
    """Boolean masks [b, res, res] of each image's shape (0 circle, 1 square, 2 triangle, 3 cross)
    in its own rotated, scaled coordinates (pu, pv), the shape filling about [-1, 1]."""
    tri = np.ones_like(pu, dtype=bool)
    for k in range(3):
        ang = -np.pi / 2 + 2 * np.pi * k / 3
        tri &= (np.cos(ang) * pu + np.sin(ang) * pv) < 0.5
    masks = np.stack([pu ** 2 + pv ** 2 < 1,
                      np.maximum(np.abs(pu), np.abs(pv)) < 0.8,
                      tri,
                      ((np.abs(pu) < .3) & (np.abs(pv) < .9)) | ((np.abs(pv) < .3) & (np.abs(pu) < .9))])
    return masks[shape, np.arange(len(shape))]


def make_shapes(n, seed, res=GENERATED_RES):
    """Natural-image-like source task (uint8 [n, res, res, 3], int64 [n]): 8 classes =
    4 object shapes (circle, square, triangle, cross) x 2 scenes (dark or light background).
    One solid object near the centre (like most ImageNet photos), scaled and slightly rotated
    at random, in a random colour of the opposite brightness to its background (so colour and
    grey-scale augmentations keep the label). The background is one of 4 textures (plain,
    stripes, checker, dots; not part of the label) in two random colours, at a coarse period
    (24-32 px at 64 px, wider than a 16 px ViT patch) along a random direction: clutter that
    only neighbouring patches together can tell from an outline."""
    rng = np.random.default_rng([seed, 202])
    labels = rng.permutation(np.arange(n) % 8).astype(np.int64)
    out = np.empty((n, res, res, 3), dtype=np.uint8)
    gy, gx = _grid(res)
    for s in range(0, n, 500):
        lab = labels[s:s + 500]
        b = len(lab)
        shape, tex = lab // 2, rng.integers(0, 4, b)
        u = lambda lo, hi, *sh, b=b: rng.uniform(lo, hi, (b,) + sh).astype(np.float32)
        # background: two colours of one brightness level in a coarse texture along a random direction
        dark_bg = (lab % 2 == 0)[:, None, None, None]
        bg_lvl = np.where(dark_bg, u(.05, .35, 1, 1, 1), u(.65, .95, 1, 1, 1))
        c1 = np.clip(bg_lvl + u(-.2, .2, 1, 1, 3), 0, 1)
        c2 = np.clip(c1 + np.where(dark_bg, .25, -.25) * u(.6, 1, 1, 1, 1), 0, 1)
        a, period = u(0, 6.28, 1, 1), u(24, 32, 1, 1) * 2 / res
        tu = (np.cos(a) * gx + np.sin(a) * gy) / period + u(0, 1, 1, 1)
        tv = (-np.sin(a) * gx + np.cos(a) * gy) / period + u(0, 1, 1, 1)
        fu, fv = tu - np.floor(tu) - .5, tv - np.floor(tv) - .5
        texs = np.stack([np.ones((b, res, res), dtype=bool), np.sin(2 * np.pi * tu) > 0,
                         np.sin(2 * np.pi * tu) * np.sin(2 * np.pi * tv) > 0, fu ** 2 + fv ** 2 < 0.09])
        bg = np.where(texs[tex, np.arange(b)][..., None], c1, c2)
        # the object: solid, of the opposite brightness, in its own rotated, scaled coordinates
        fg_lvl = np.where(dark_bg, u(.7, 1, 1, 1, 1), u(0, .3, 1, 1, 1))
        fg = np.clip(fg_lvl + u(-.3, .3, 1, 1, 3), 0, 1)
        cy, cx, size, rot = u(-.1, .1, 1, 1), u(-.1, .1, 1, 1), u(.4, .65, 1, 1), u(-.25, .25, 1, 1)
        du, dv = (gx - cx) / size, (gy - cy) / size
        pu, pv = np.cos(rot) * du + np.sin(rot) * dv, -np.sin(rot) * du + np.cos(rot) * dv
        mask = _shape_mask(shape, pu, pv)
        img = np.where(mask[..., None], fg, bg) + (rng.random((b, res, res, 3), dtype=np.float32) - .5) * .1
        out[s:s + b] = np.clip(img * 255, 0, 255).astype(np.uint8)
    return out, labels


def make_lesions(n, seed, res=GENERATED_RES, factors=False):
    """Dermoscopy-like target task (uint8 [n, res, res, 3], int64 [n]): 2 classes by a rule the
    source never labels, the border of the lesion (LESION_CLASSES: 0 regular, 1 irregular).

    One dark brown lesion near the centre of a dermoscope's round field (dark corners), on skin
    of random tone under uneven light. Its outline is a smooth random oval in both classes
    (radius 0.38-0.55 of the half-frame, elongation up to 0.25, a weak 3-lobe term); an
    irregular border adds three harmonics of order 4-8 (notches and lobes) of total amplitude
    LESION_NOTCHES (fraction of the radius). Nothing else depends on the label: the border's
    width, the pigment, its mottle and contrast, and strong sensor noise (LESION_NOISE) are
    drawn alike for both classes. Other image statistics than `shapes` (skin palette, one dark
    object with a soft edge, vignette, noise) and another question: `shapes` labels which of
    four outlines an object has, never whether a border is regular; what carries over is
    seeing an outline. factors=True also returns {name: float32 [n]} of the drawn factors
    (tone, radius, elongation, contrast, notches), for tests of what the label depends on."""
    rng = np.random.default_rng([seed, 505])
    labels = rng.permutation(np.arange(n) % 2).astype(np.int64)
    out = np.empty((n, res, res, 3), dtype=np.uint8)
    drawn = {k: np.empty(n, np.float32) for k in ("tone", "radius", "elongation", "contrast", "notches")}
    gy, gx = _grid(res)
    for s in range(0, n, 500):
        lab = labels[s:s + 500]
        b = len(lab)
        u = lambda lo, hi, *sh, b=b: rng.uniform(lo, hi, (b,) + sh).astype(np.float32)
        # skin under a dermoscope: tone, uneven light, the dark edge of the round field
        tone = u(.75, 1.05, 1, 1, 1)
        skin = np.array([.88, .70, .60], np.float32) * tone + u(-.05, .05, 1, 1, 3)
        a = u(0, 6.28, 1, 1)
        img = skin * (0.9 + 0.12 * (np.cos(a) * gx + np.sin(a) * gy))[..., None]
        field = np.clip((u(1.15, 1.45, 1, 1) - np.sqrt(gx ** 2 + gy ** 2)) * 6, 0, 1)
        # the outline as a radius per direction: a smooth oval; label 1 adds notches (orders 4-8)
        cy, cx, radius, elong = u(-.12, .12, 1, 1), u(-.12, .12, 1, 1), u(.38, .55, 1, 1), u(0, .25, 1, 1)
        th = np.arctan2(gy - cy, gx - cx)
        r = 1 + elong * np.cos(2 * (th - u(0, 6.28, 1, 1))) + u(0, .08, 1, 1) * np.cos(3 * th - u(0, 6.28, 1, 1))
        notches = np.where(lab[:, None, None] == 1, u(*LESION_NOTCHES, 1, 1), 0).astype(np.float32)
        wave = sum(np.cos(rng.integers(4, 9, (b, 1, 1)) * th - u(0, 6.28, 1, 1)) * u(.5, 1, 1, 1) for _ in range(3))
        r = r + notches * wave / 1.5
        # a soft border: the mask averaged over 7 scales of the outline, 1 +- its width / radius
        width = u(.01, .03, 1, 1)
        rho = np.sqrt((gy - cy) ** 2 + (gx - cx) ** 2) / (radius * r)
        m = sum((rho < 1 + k * width / radius).astype(np.float32) for k in np.linspace(-1, 1, 7)) / 7
        pigment = np.array([.30, .18, .12], np.float32) + u(-.08, .08, 1, 1, 3)
        fx, phx = u(10, 20, 1, 1), u(0, 6.28, 1, 1)  # mottle: a product of two sine waves
        fy, phy = u(10, 20, 1, 1), u(0, 6.28, 1, 1)
        mottle = 1 + .12 * np.sin(fx * gx + phx) * np.sin(fy * gy + phy)
        contrast = u(.85, 1, 1, 1, 1)
        img = img + (pigment * mottle[..., None] - img) * m[..., None] * contrast
        img = img * field[..., None] + (rng.random((b, res, res, 3), dtype=np.float32) - .5) * LESION_NOISE
        out[s:s + b] = np.clip(img * 255, 0, 255).astype(np.uint8)
        for k, v in (("tone", tone), ("radius", radius), ("elongation", elong), ("contrast", contrast),
                     ("notches", notches)):
            drawn[k][s:s + b] = v.reshape(b)
    return (out, labels, drawn) if factors else (out, labels)


_GENERATORS = {"synthetic": make_fundus, "shapes": make_shapes, "lesions": make_lesions}


@functools.lru_cache(maxsize=4)
def _generated_arrays(name, n, seed):
    """Generated images and labels, made once per process (a study runs many runs in one)."""
    images, labels = _GENERATORS[name](n, seed)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def _channel_mean_std(images):
    """Per-channel mean and std of uint8 (n, h, w, 3) images in [0, 1], rounded to 3 decimals,
    from exact integer sums over a histogram of the 256 values: ~10x faster than numpy on the
    float64 pixels (and no 8-bytes-per-value copy), the same values (more exact sums)."""
    count = images.shape[0] * images.shape[1] * images.shape[2]
    v = np.arange(256, dtype=np.int64)
    hist = [np.bincount(images[..., c].ravel(), minlength=256) for c in range(3)]
    s1 = np.array([(v * h).sum() for h in hist])
    s2 = np.array([(v * v * h).sum() for h in hist])
    mean = s1 / count
    std = np.sqrt((s2 - s1 * mean) / count)  # population std, as numpy's default
    return tuple(np.round(mean / 255, 3).tolist()), tuple(np.round(std / 255, 3).tolist())


def _build_generated(name, img_size, seed):
    sizes = {"synthetic": (SYNTHETIC_SIZE, None), "shapes": (SHAPES_SIZE, None),
             "lesions": (sum(LESIONS_SPLIT), LESIONS_SPLIT)}
    n, split = sizes[name]
    images, labels = _generated_arrays(name, n, seed)
    if split is None:
        n_held = int(round(n * _SPECS[name]["heldout"]))
        split = (n - n_held, n_held // 2, n_held - n_held // 2)
    n_train, n_val = split[0], split[1]             # iid draws: slicing is a random split
    cuts = {"train": slice(0, n_train), "val": slice(n_train, n_train + n_val), "test": slice(n_train + n_val, n)}
    mean, std = _channel_mean_std(images[cuts["train"]])
    tfms = build_transforms(img_size, mean, std)
    r = resize_size(img_size)
    out = {s: ImageDataset(_ArraySource(images[c], r), labels[c], range(c.start, c.stop), *tfms, name, s)
           for s, c in cuts.items()}
    return out, mean, std


# ----------------------------------------------------------------------------- entry point
def build_datasets(name, root, img_size=224, seed=0, cache_dir=None, cache=True, workers=None, metric=None):
    """(train, val, test, info) for one dataset.

    seed: the split seed (and, for the generated tasks, the generation seed). cache_dir: where the
    split file and image cache go (default: default_cache_dir(root)). cache=False decodes and resizes
    the original files on every access (same pixels, much slower). workers: cache-building processes.
    metric: the task metric (None: the dataset's; folder/csv: roc_auc for two classes, else macro_recall).
    info: name, display_name, classes, num_classes, multilabel, metric, loss, mean, std, sizes, img_size,
    resize, root, cache_dir, split_file, cache_file, identity (dataset_identity)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset '{name}' (expected one of {', '.join(DATASETS)})")
    if not isinstance(img_size, (int, np.integer)) or img_size < 8:
        raise ValueError(f"img_size {img_size!r}: expected an integer >= 8")
    spec = _SPECS[name]
    info = {"name": name, "classes": list(spec["classes"]), "num_classes": len(spec["classes"]),
            "multilabel": name == "chexpert", "metric": spec["metric"],
            "loss": "bce" if name == "chexpert" else "ce", "img_size": int(img_size),
            "resize": resize_size(img_size), "root": None, "cache_dir": None, "split_file": None,
            "cache_file": None, "display_name": name}
    if name not in USER_DATA and metric is not None:         # folder/csv: once their classes are known
        info["metric"] = check_metric(name, metric, info["num_classes"], info["multilabel"])
    if name in GENERATED_TASKS:
        parts, mean, std = _build_generated(name, img_size, seed)
    elif name in USER_DATA:
        root = _check_root(name, root)
        info["root"] = str(root)
        parts, mean, std = _build_user(name, root, img_size, seed, cache_dir, cache, workers, metric, info)
    else:
        root = _check_root(name, root)
        mean, std = spec["mean"], spec["std"]
        tfms = build_transforms(img_size, mean, std)
        info["root"] = str(root)
        if name == "camelyon":
            parts = _build_camelyon(root, img_size, tfms)
        else:
            table = _READERS[name](root)
            cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir(root)
            cache_dir.mkdir(parents=True, exist_ok=True)
            rundir.remove_stale_tmp(cache_dir)               # a killed cache build's .npy.tmp<pid>
            splits, split_file = _load_or_make_split(name, table, seed, cache_dir)
            info.update(cache_dir=str(cache_dir), split_file=split_file and str(split_file))
            r = resize_size(img_size)
            if cache:
                npy = ensure_cache(name, table, r, cache_dir, workers)
                info["cache_file"] = str(npy)
            else:
                _file_entries(name, table)                   # fail early on a missing image
            parts = _make_parts(name, table, splits, npy if cache else None, "L" if spec["grey"] else "RGB", r, tfms)
    info.update(mean=tuple(mean), std=tuple(std), sizes={s: len(d) for s, d in parts.items()},
                identity=dataset_identity(name, info["classes"], parts, seed))
    return parts["train"], parts["val"], parts["test"], info


def dataset_identity(name, classes, parts, seed):
    """A hash naming what a dataset holds: its name, class names and every image id with its label
    (sorted, so another split of the same images is the same dataset); for the generated tasks, whose
    ids are row numbers, also the generation seed. analyze.py --ref compares it between two runs."""
    rows = sorted((str(i), np.asarray(y).tobytes()) for d in parts.values() for i, y in zip(d.ids, d.labels))
    h = hashlib.sha256(json.dumps([name, list(classes), seed if name in GENERATED_TASKS else None]).encode())
    for i, y in rows:
        h.update(i.encode() + b"\0" + y)
    return h.hexdigest()[:16]


def _make_parts(name, table, splits, npy, mode, r, tfms):
    """{split: ImageDataset} reading rows of the cache `npy`, or the files when npy is None."""
    pos = {i: k for k, i in enumerate(table.ids)}
    parts = {}
    for s, ids in splits.items():
        rows = [pos[i] for i in ids]
        src = _MemmapSource(npy, rows) if npy is not None else _FileSource([table.resolve(i) for i in ids], mode, r)
        parts[s] = ImageDataset(src, table.labels[rows], ids, *tfms, name, s)
    return parts


# ----------------------------------------------------------------------------- a run's splits
def subset(ds, n, seed):
    """A seeded random subset of at most n items (for quick runs); keeps `.labels`."""
    if n is None or n >= len(ds):
        return ds
    idx = np.sort(np.random.default_rng([seed, 7]).permutation(len(ds))[:n])
    sub = torch.utils.data.Subset(ds, idx.tolist())
    sub.labels = np.asarray(ds.labels)[idx]
    return sub


def load_splits(cfg, eval_train=False):
    """(train, val, test, info) of a run's settings; analyze.py uses it to see the same images
    (eval_train: the training split with eval transforms, the k-NN bank)."""
    train_ds, val_ds, test_ds, info = build_datasets(cfg["data"], cfg["data_root"], img_size=cfg["img_size"],
                                                     seed=cfg["split_seed"], cache_dir=cfg["cache_dir"],
                                                     metric=cfg.get("metric"))
    if eval_train:
        train_ds = eval_view(train_ds)
    return [subset(d, cfg["subset"], cfg["split_seed"]) for d in (train_ds, val_ds, test_ds)] + [info]
