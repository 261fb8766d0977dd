"""Analysis and task metrics: activation capture, linear CKA, weighted k-NN, l2 weight
distance, mean attention distance, and the datasets' scores (kappa, AUC, recall).

Imports only torch, numpy and the standard library so the file works copied alone.
Formulas follow Kornblith et al. (2019), Song et al. (2012) for the unbiased HSIC,
Nguyen, Raghu & Kornblith (2021) for minibatch CKA and Wu et al. (2018) for the k-NN.
"""
import contextlib
import math
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------- activations


@contextlib.contextmanager
def capture(model, layer_names, transform=None):
    """Collect the outputs of named modules of any nn.Module (ours, timm, torchvision):

        with capture(model, ["blocks.0.attn", "blocks.0.mlp"]) as acts:
            model(x)                      # acts[name] = that module's output, detached

    Every forward overwrites `acts`, so in a loop consume it after each forward (e.g. feed
    an accumulator). `transform(name, output)`, if given, is stored instead of the output: it
    runs inside the hook, so a large activation can be reduced (a Gram, a pooled vector)
    and freed at once. Outputs are detached, not copied (an in-place op later in the model
    would show; clone in `transform` if a model does that). Hooks are removed on exit, also
    on an exception. Unknown names raise ValueError before any hook is added.
    """
    modules = dict(model.named_modules())
    missing = [n for n in layer_names if n not in modules]
    if missing:
        raise ValueError(f"capture: {type(model).__name__} has no module named {missing[:5]}")
    acts = {}

    def hook_for(name):
        def hook(module, inputs, out):
            if isinstance(out, torch.Tensor):
                out = out.detach()
            elif isinstance(out, (tuple, list)):
                out = type(out)(o.detach() if isinstance(o, torch.Tensor) else o for o in out)
            acts[name] = out if transform is None else transform(name, out)
        return hook

    handles = []
    try:
        for n in layer_names:
            handles.append(modules[n].register_forward_hook(hook_for(n)))
        yield acts
    finally:
        for h in handles:
            h.remove()


# ----------------------------------------------------------------------------- CKA


def _fp32_matmul_is_exact(device):
    """False when the caller let float32 matmuls run in TF32/bf16 (~3 digits lost)."""
    try:
        return torch.get_float32_matmul_precision() == "highest"
    except RuntimeError:  # raised once the per-backend fp32_precision API was used
        backend = torch.backends.cuda.matmul if device.type == "cuda" else torch.backends.mkldnn.matmul
        return getattr(backend, "fp32_precision", "ieee") == "ieee"


@contextlib.contextmanager
def exact_float32():
    """Inside, float32 matmuls and convolutions run in full float32 on every backend: no TF32
    (cuBLAS, cuDNN: cuDNN allows TF32 convolutions by default) and no bf16 (oneDNN on CPUs).
    The caller's settings are restored on leaving. Evaluation and analyses run inside it, so
    their figures do not depend on the GPU generation or on what training allowed."""
    b = torch.backends
    if hasattr(b.cuda.matmul, "fp32_precision"):  # torch >= 2.9: one switch per backend
        switches = [b.cuda.matmul, b.cudnn.conv, b.mkldnn.matmul, b.mkldnn.conv]
        saved = [s.fp32_precision for s in switches]
        for s in switches:
            s.fp32_precision = "ieee"
    else:
        saved = (torch.get_float32_matmul_precision(), b.cudnn.allow_tf32)
        torch.set_float32_matmul_precision("highest")
        b.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        if hasattr(b.cuda.matmul, "fp32_precision"):
            for s, v in zip(switches, saved):
                s.fp32_precision = v
        else:
            torch.set_float32_matmul_precision(saved[0])
            b.cudnn.allow_tf32 = saved[1]


def _gram_dtype(x, dtype):
    """float64 for float64 input, else float32 -- never fp16/bf16 (entries overflow or
    lose ~2 digits); float64 also when float32 matmuls were allowed to use TF32/bf16."""
    if dtype is not None:
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"centered_gram: dtype must be torch.float32 or torch.float64, got {dtype}")
        return dtype
    if x.dtype == torch.float64 or not _fp32_matmul_is_exact(x.device):
        return torch.float64
    return torch.float32


# bytes of one column block of the batch in a Gram: on a CPU it stays in cache while it is
# shifted, centred and multiplied, so centring costs no second trip to memory (measured on a
# 2-core EPYC, 1 MB L2 per core: 1-4 MB blocks within 10% of each other, 2 MB best with 2
# threads, 8-16 MB up to 1.6x slower); on a GPU few blocks (each costs kernel launches)
_GRAM_BLOCK_BYTES = {"cpu": 1 << 21, "cuda": 1 << 24}


def _centred_gram_blocks(x):
    """X_c X_c^T in float64 for X (n, d), X_c = X centred over the batch, from column blocks:
    each block is shifted by its first row (a constant column becomes exactly zero), then
    centred (column means are per column, so centring block by block is exact), and its Gram
    is a product in x's dtype added to a float64 sum. The Gram is symmetric, so of its 2 x 2
    blocks of rows only three are products (3/4 of the multiply-adds)."""
    n, d = x.shape
    block = max(1, _GRAM_BLOCK_BYTES.get(x.device.type, 1 << 24) // (n * x.element_size()))
    h = n // 2
    mean_weights = x.new_full((1, n), 1.0 / n)  # a product is ~20x faster than mean(0) on CPU
    k = torch.zeros(n, n, dtype=torch.float64, device=x.device)
    for start in range(0, d, block):
        y = x[:, start:start + block] - x[:1, start:start + block]
        y -= mean_weights @ y
        top, bottom = y[:h], y[h:]
        k[:h, :h] += top @ top.T
        k[h:, h:] += bottom @ bottom.T
        k[:h, h:] += top @ bottom.T
    k[h:, :h] = k[:h, h:].T
    return k


def centered_gram(x, debiased=True, dtype=None):
    """Centred linear Gram matrix of a batch of activations, as float64 (n, n).

    x: (n, ...) activations, flattened per sample to X (n, d). X is mean-centred over the
    batch and K = X X^T formed in column blocks (`_centred_gram_blocks`), each block's product
    in float32 (float64 for float64 input or when float32 matmuls may use TF32/bf16; `dtype`
    overrides; never fp16/bf16) and summed in float64, then
      debiased=True:  U-centring (Song et al. 2012), zero diagonal; with row sums r_i of K
                      (diagonal zeroed) and total S = sum_i r_i, for i != j
                      K~_ij = K_ij - r_i/(n-2) - r_j/(n-2) + S/((n-1)(n-2)),  K~_ii = 0
                      so that HSIC_1(K, L) = <K~, L~> / (n(n-3))  (needs n >= 4).
      debiased=False: H K H with H = I - 11^T/n, so HSIC(K, L) = <HKH, HLH> / (n-1)^2.
    Centring the features first changes neither estimator but avoids cancellation in the
    float32 products (uncentred float32 Grams are off by ~1e-6); the float64 sum over blocks
    keeps rounding from growing with d (CKA agrees with all-float64 to ~1e-9). Shifting by
    the first sample makes a constant layer's Gram exactly zero, so its CKA is NaN rather than
    rounding noise. On a CPU a block stays in cache, so centring it costs no second trip to
    memory (centring the whole batch first cost as much as the product itself).
    """
    n = x.shape[0]
    if debiased and n < 4:
        raise ValueError(f"centered_gram: debiased HSIC needs n >= 4 samples, got {n}")
    k = _centred_gram_blocks(x.reshape(n, -1).to(_gram_dtype(x, dtype)))
    if debiased:
        k.fill_diagonal_(0)
        r = k.sum(1)
        k = k - (r[:, None] + r[None, :]) / (n - 2) + r.sum() / ((n - 1) * (n - 2))
        k.fill_diagonal_(0)
    else:
        k = k - k.mean(0, keepdim=True)
        k = k - k.mean(1, keepdim=True)
    return k


def _feature_cka(x, y):
    """Biased linear CKA of column-centred X, Y: ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)."""
    return (y.T @ x).pow(2).sum() / ((x.T @ x).norm() * (y.T @ y).norm())


def _gram_cka(k, l):
    """CKA from centred Grams: <K, L>_F / (||K||_F ||L||_F) (HSIC normalisation cancels)."""
    return (k * l).sum() / (k.norm() * l.norm())


def cka(x, y, debiased=True):
    """One-shot linear CKA between two activation tensors x (n, ...) and y (n, ...), in float64.

    Default: the debiased estimator (as CKAAccumulator and the analyses); debiased=False
    gives the biased one, which tends to 1 for unrelated features when d >> n (two
    independent noise matrices, n=64, d=20000: 0.997 biased, ~0 debiased).
    Biased:   CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) on column-centred X, Y, which
              equals the Gram form <HKH, HLH> / (||HKH|| ||HLH||); the cheaper form is used
              (features when d_x + d_y < n, Grams otherwise).
    Debiased: CKA = HSIC_1(K, L) / sqrt(HSIC_1(K, K) HSIC_1(L, L)) with U-centred Grams.
    A constant layer gives 0/0 = NaN (no epsilon: it would break scale invariance).
    Returns a Python float.
    """
    n = x.shape[0]
    if y.shape[0] != n:
        raise ValueError(f"cka: x and y need the same number of samples, got {n} and {y.shape[0]}")
    if n < (4 if debiased else 2):
        raise ValueError(f"cka: needs n >= {4 if debiased else 2} samples (debiased={debiased}), got {n}")
    x = x.reshape(n, -1).double()
    y = y.reshape(n, -1).double()
    if debiased:
        return float(_gram_cka(centered_gram(x, True), centered_gram(y, True)))
    if x.shape[1] + y.shape[1] < n:
        x = x - x.mean(0)
        y = y - y.mean(0)
        return float(_feature_cka(x, y))
    return float(_gram_cka(centered_gram(x, False), centered_gram(y, False)))


def _stack_grams(grams, num_layers, side):
    """List of L (n, n) Grams or an (L, n, n) tensor -> (L, n^2) float64 matrix G."""
    g = torch.stack(list(grams)) if isinstance(grams, (list, tuple)) else grams
    if g.dim() != 3 or g.shape[1] != g.shape[2] or g.shape[0] != num_layers:
        raise ValueError(f"CKAAccumulator.update: grams_{side} must be {num_layers} square (n, n) "
                         f"matrices, got shape {tuple(g.shape)}")
    return g.reshape(num_layers, -1).double()


class CKAAccumulator:
    """All-pairs linear CKA between L_a layers of model A and L_b layers of model B, streamed
    over batches (feed both models the same batches in the same order).

    Per batch b, each layer's centred Gram is flattened to a row of G (L, n^2); then
      cross_b = G_a G_b^T / c,   self_b = rowwise ||G||^2 / c,
    with c = n(n-3) (debiased, HSIC_1 of U-centred Grams) or (n-1)^2 (biased HSIC of HKH).
    mode="minibatch" (Nguyen, Raghu & Kornblith 2021):
      CKA = sum_b cross_b / sqrt(sum_b self_a,b  x  sum_b self_b,b)
    mode="mean" (the original code): CKA = mean_b [cross_b / sqrt(self_a,b x self_b,b)].
    Both are accumulated in float64 on the Grams' device; `compute()` returns the chosen one.
    Default: debiased (as `cka`); debiased=False gives the biased estimator.
    Batches with n < 4 (debiased) or n < 2 are skipped with a warning. A layer that is
    constant (self term 0) gives NaN; in "mean" mode one constant batch makes it NaN.
    """

    def __init__(self, num_layers_a, num_layers_b=None, debiased=True, mode="minibatch"):
        if mode not in ("minibatch", "mean"):
            raise ValueError(f"CKAAccumulator: mode must be 'minibatch' or 'mean', got {mode!r}")
        self.num_layers_a = int(num_layers_a)
        self.num_layers_b = int(num_layers_a if num_layers_b is None else num_layers_b)
        self.debiased, self.mode = bool(debiased), mode
        self.min_n = 4 if debiased else 2
        la, lb = self.num_layers_a, self.num_layers_b
        z = lambda *s: torch.zeros(*s, dtype=torch.float64)
        self.cross, self.self_a, self.self_b, self.cka_sum = z(la, lb), z(la), z(lb), z(la, lb)
        self.n_batches, self.n_samples = 0, 0

    def _skip(self, n):
        if n >= self.min_n:
            return False
        warnings.warn(f"CKAAccumulator: skipped a batch of {n} samples "
                      f"({'debiased' if self.debiased else 'biased'} HSIC needs n >= {self.min_n})", stacklevel=2)
        return True

    def update(self, grams_a, grams_b=None):
        """Add one batch given its centred Grams (from `centered_gram` with the same
        `debiased`): lists of L_a and L_b (n, n) tensors, or (L, n, n) tensors.
        grams_b=None means "same as grams_a" (within-model L x L)."""
        ga = _stack_grams(grams_a, self.num_layers_a, "a")
        n = math.isqrt(ga.shape[1])
        if grams_b is None:
            if self.num_layers_b != self.num_layers_a:
                raise ValueError("CKAAccumulator.update: grams_b=None needs num_layers_b == num_layers_a")
            gb = ga
        else:
            gb = _stack_grams(grams_b, self.num_layers_b, "b")
            if gb.shape[1] != ga.shape[1]:
                raise ValueError(f"CKAAccumulator.update: grams_a are {n}x{n} but grams_b are "
                                 f"{math.isqrt(gb.shape[1])}x{math.isqrt(gb.shape[1])} (same batch expected)")
        if self._skip(n):
            return
        if self.debiased and ga.reshape(-1, n, n).diagonal(dim1=1, dim2=2).abs().max() != 0:
            raise ValueError("CKAAccumulator.update: debiased=True expects U-centred Grams "
                             "(zero diagonal) from centered_gram(x, debiased=True)")
        c = n * (n - 3) if self.debiased else (n - 1) ** 2
        cross = ga @ gb.T / c
        sa = ga.pow(2).sum(1) / c
        sb = sa if grams_b is None else gb.pow(2).sum(1) / c
        if self.cross.device != cross.device:  # first batch decides the device
            self._to(cross.device)
        self.cross += cross
        self.self_a += sa
        self.self_b += sb
        self.cka_sum += cross / (sa[:, None] * sb[None, :]).sqrt()
        self.n_batches += 1
        self.n_samples += n

    def update_activations(self, acts_a, acts_b=None):
        """Convenience: form each layer's Gram with `centered_gram` and call `update`.
        acts_*: lists of (n, ...) activations of one batch. Each Gram is formed once, even
        when acts_b is None (within-model)."""
        n = acts_a[0].shape[0]
        if self._skip(n):
            return
        grams_a = [centered_gram(a, self.debiased) for a in acts_a]
        grams_b = None if acts_b is None else [centered_gram(b, self.debiased) for b in acts_b]
        self.update(grams_a, grams_b)

    def compute(self):
        """(L_a, L_b) float64 numpy array of CKA values (NaN where a layer is constant)."""
        if self.n_batches == 0:
            raise ValueError("CKAAccumulator.compute: no batch was accumulated (all skipped or none given)")
        if self.mode == "mean":
            return (self.cka_sum / self.n_batches).cpu().numpy()
        with np.errstate(divide="ignore", invalid="ignore"):
            cross, sa, sb = (t.cpu().numpy() for t in (self.cross, self.self_a, self.self_b))
            return cross / np.sqrt(np.outer(sa, sb))

    def _to(self, device):
        for k in ("cross", "self_a", "self_b", "cka_sum"):
            setattr(self, k, getattr(self, k).to(device))

    def state_dict(self):
        """Sums so far (CPU tensors) plus the settings; `merge` adds such states, e.g. one per
        DDP rank gathered with torch.distributed.all_gather_object."""
        sums = {k: getattr(self, k).cpu() for k in ("cross", "self_a", "self_b", "cka_sum")}
        return dict(sums, n_batches=self.n_batches, n_samples=self.n_samples, debiased=self.debiased,
                    num_layers_a=self.num_layers_a, num_layers_b=self.num_layers_b)

    def merge(self, other):
        """Add another accumulator's (or its state_dict's) sums to this one. Returns self."""
        s = other.state_dict() if isinstance(other, CKAAccumulator) else other
        if (s["debiased"], s["num_layers_a"], s["num_layers_b"]) != (
                self.debiased, self.num_layers_a, self.num_layers_b):
            raise ValueError("CKAAccumulator.merge: accumulators differ in debiased or layer counts")
        for k in ("cross", "self_a", "self_b", "cka_sum"):
            getattr(self, k).add_(s[k].to(getattr(self, k).device))
        self.n_batches += s["n_batches"]
        self.n_samples += s["n_samples"]
        return self


# ----------------------------------------------------------------------------- k-NN


def _order_ties_by_index(s, i):
    """Column order of each row of similarities s with bank indices i: similarity descending,
    among equal similarities lowest index first. (n, m) int64."""
    by_index = i.argsort(dim=1)
    by_value = s.gather(1, by_index).argsort(dim=1, descending=True, stable=True)
    return by_index.gather(1, by_value)


class KNNAccumulator:
    """The k nearest bank items (cosine) of fixed queries, the bank streamed in chunks, then
    the weighted vote of `knn_predict` (which is built on this class):

        acc = KNNAccumulator(queries, k=200)      # queries (n, d), L2-normalised per use
        for chunk in bank_chunks:                 # bank rows in order, chunks of any size
            acc.update(chunk)
        scores = acc.predict(bank_labels, t=0.1)  # (n, C) float32, as knn_predict

    Neighbours: the k largest similarities, and among equal similarities the lowest bank index
    wins (the k-th place included), so every chunking of the bank gives the same neighbours;
    a similarity is one float32 dot product of normalised rows, so scores agree to its
    rounding (~1e-7). Per query the state is the set of the k best so far, unordered (k
    float32 similarities, k int32 bank indices), and its smallest similarity: the first k
    items fill the set, then an item enters only if it beats that smallest one (a tie keeps
    the older, lower index), by a selection (topk) over the set and the chunk, no sort; rows
    that nothing enters are left alone (most rows, late in a large bank). Memory: the queries
    plus that state (8k bytes per query), whatever the bank's size; an update works on
    `chunk_size` queries at a time (a chunk_size x (k + chunk rows) block). Labels are given
    once, to `predict`: the search needs none, and one label array serves any number of
    accumulators (one per layer and feature type). Everything is computed and kept on
    `device` (default: the queries').
    """

    def __init__(self, queries, k=200, chunk_size=1024, device=None):
        if k < 1 or chunk_size < 1 or queries.dim() != 2:
            raise ValueError(f"KNNAccumulator: need (n, d) queries, k >= 1 and chunk_size >= 1, got queries "
                             f"{tuple(queries.shape)}, k={k}, chunk_size={chunk_size}")
        self.device = torch.device(device) if device is not None else queries.device
        self.queries = queries.to(self.device)
        self.k, self.chunk_size, self.seen = int(k), int(chunk_size), 0
        n = queries.shape[0]
        # placeholders (-inf, index -1); items fill the set column by column until it holds k
        self.sims = torch.full((n, self.k), -math.inf, device=self.device)
        self.index = torch.full((n, self.k), -1, dtype=torch.int32, device=self.device)
        self.kth = torch.full((n,), -math.inf, device=self.device)  # smallest similarity in the set

    def update(self, bank_chunk):
        """Merge the next rows of the bank, (m, d) features of any float dtype, into the top-k."""
        if bank_chunk.dim() != 2 or bank_chunk.shape[1] != self.queries.shape[1]:
            raise ValueError(f"KNNAccumulator.update: bank chunk {tuple(bank_chunk.shape)} does not match the "
                             f"queries {tuple(self.queries.shape)}")
        if self.seen + bank_chunk.shape[0] > torch.iinfo(torch.int32).max:
            raise ValueError("KNNAccumulator.update: the bank exceeds 2^31 - 1 items")
        b = F.normalize(bank_chunk.to(self.device).float(), dim=1)
        free = min(self.k - self.seen, b.shape[0])
        if free > 0:  # the set has room: the first items join it without a selection
            for rows, q in self._query_chunks():
                self.sims[rows, self.seen:self.seen + free] = q @ b[:free].T
            self.index[:, self.seen:self.seen + free] = torch.arange(self.seen, self.seen + free, dtype=torch.int32,
                                                                     device=self.device)
            self.seen += free
            if self.seen == self.k:
                self.kth = self.sims.min(1).values
            b = b[free:]
        if b.shape[0]:
            for rows, q in self._query_chunks():
                self._merge(self.sims[rows], self.index[rows], self.kth[rows], q @ b.T, self.seen)
            self.seen += b.shape[0]

    def _query_chunks(self):
        """(rows, normalised float32 queries of those rows), chunk_size rows at a time."""
        for start in range(0, self.queries.shape[0], self.chunk_size):
            rows = slice(start, start + self.chunk_size)
            yield rows, F.normalize(self.queries[rows].float(), dim=1)

    def _merge(self, best_s, best_i, kth, s, first):
        """Merge similarities s (rows, m) of bank items first, first + 1, ... into views of the
        state: per row a selection of k among its k + m candidates (old ones first)."""
        rows = (s > kth[:, None]).any(1).nonzero().squeeze(1)  # a tie with the k-th keeps the older item
        if rows.numel() == 0:
            return
        if rows.numel() < s.shape[0]:
            s, old_s, old_i = s[rows], best_s[rows], best_i[rows]
        else:
            rows, old_s, old_i = slice(None), best_s, best_i
        cand = torch.cat([old_s, s], 1)
        top_s, top = cand.topk(self.k, dim=1, sorted=False)  # the right set but for ties at its minimum
        cand.scatter_(1, top, -math.inf)  # now the items left out (a max is ~6x cheaper than counting)
        tied = (cand.amax(1) >= top_s.amin(1)).nonzero().squeeze(1)
        if tied.numel():  # the k-th similarity is shared with an item left out: lowest index wins
            index = torch.arange(first, first + s.shape[1], dtype=torch.int32, device=s.device)
            cand = torch.cat([old_s[tied], s[tied]], 1)
            top[tied] = _order_ties_by_index(cand, torch.cat([old_i[tied], index.expand(len(tied), -1)], 1))[:, :self.k]
            top_s[tied] = cand.gather(1, top[tied])
        is_old = top < self.k  # column j < k is old entry j, column k + i is bank item first + i
        best_i[rows] = torch.where(is_old, old_i.gather(1, top.clamp(max=self.k - 1)), (top - self.k + first).int())
        best_s[rows] = top_s
        kth[rows] = top_s.amin(1)

    def neighbours(self):
        """(similarities, bank indices) of the min(k, seen) nearest items per query, (n, k')
        each, most similar first (lowest index first among equals)."""
        order = _order_ties_by_index(self.sims, self.index)[:, :min(self.k, self.seen)]
        return self.sims.gather(1, order), self.index.gather(1, order).long()

    def predict(self, bank_labels, t=0.1, num_classes=None):
        """Class scores (n, C) float32 of the weighted vote, as `knn_predict`; bank_labels:
        (seen,) ints or (seen, C) multi-label floats, tensor or numpy, in bank order."""
        if not t > 0:
            raise ValueError(f"KNNAccumulator.predict: need t > 0, got t={t}")
        labels = torch.as_tensor(bank_labels)  # datasets hand out numpy label arrays
        if labels.dim() not in (1, 2) or labels.shape[0] != self.seen:
            raise ValueError(f"KNNAccumulator.predict: bank_labels {tuple(labels.shape)} do not match the "
                             f"{self.seen} bank items seen")
        if self.seen == 0:
            raise ValueError("KNNAccumulator.predict: the bank is empty (no update)")
        multilabel = labels.dim() == 2
        labels = labels.to(self.device).float() if multilabel else labels.to(self.device).long()
        if num_classes is None:
            num_classes = labels.shape[1] if multilabel else int(labels.max()) + 1
        if self.k > self.seen:
            warnings.warn(f"knn_predict: k={self.k} is larger than the bank ({self.seen} items); using k={self.seen}",
                          stacklevel=2)
        real = min(self.k, self.seen)  # while the set fills, its first `seen` columns are the real items
        out = []
        for s, idx in zip(self.sims[:, :real].split(self.chunk_size), self.index[:, :real].split(self.chunk_size)):
            w = ((s - s.max(1, keepdim=True).values) / t).exp()
            idx = idx.long()
            if multilabel:
                scores = torch.einsum("bk,bkc->bc", w, labels[idx])
            else:
                scores = torch.zeros(len(s), num_classes, device=self.device).scatter_add_(1, labels[idx], w)
            out.append(scores / w.sum(1, keepdim=True))
        return torch.cat(out) if out else torch.zeros(0, num_classes, device=self.device)


def knn_predict(bank, bank_labels, queries, k=200, t=0.1, num_classes=None, chunk_size=1024,
                bank_chunk_size=None):
    """Weighted cosine k-NN class scores (Wu et al. 2018), (n_queries, C) float32 tensor.

    Bank and queries are L2-normalised (float32); for query q the k nearest bank items j
    (cosine s_j = q.x_j; k larger than the bank is clipped to its size, with a warning; among
    equal similarities the lowest bank index wins) vote with w_j = exp(s_j / t):
      single label (bank_labels (N,) int):    score_c = sum_{j: y_j = c} w_j / sum_j w_j
      multi-label (bank_labels (N, C) float): score = sum_j w_j y_j / sum_j w_j
    The weights are computed as exp((s_j - s_max) / t): the common factor exp(s_max/t)
    cancels in the normalisation and small t cannot overflow. Queries are processed in
    chunks of `chunk_size`, the bank in chunks of `bank_chunk_size` rows (None: one chunk)
    merged into a running top-k (KNNAccumulator, the same code and neighbours for every
    chunking): the similarity block is chunk_size x bank_chunk_size, plus a normalised
    float32 copy of one bank chunk. Computed and returned on bank's device.
    """
    if k < 1 or not t > 0:
        raise ValueError(f"knn_predict: need k >= 1 and t > 0, got k={k}, t={t}")
    bank_labels = torch.as_tensor(bank_labels)
    if bank.shape[0] != bank_labels.shape[0] or bank.shape[1] != queries.shape[1]:
        raise ValueError(f"knn_predict: bank {tuple(bank.shape)}, bank_labels {tuple(bank_labels.shape)} "
                         f"and queries {tuple(queries.shape)} do not match")
    acc = KNNAccumulator(queries, k, chunk_size, device=bank.device)
    for chunk in bank.split(bank_chunk_size or max(1, bank.shape[0])):
        acc.update(chunk)
    return acc.predict(bank_labels, t, num_classes)


# ----------------------------------------------------------------------------- weights


def norm_param_names(model):
    """State-dict names of the parameters of normalisation layers (LayerNorm, GroupNorm,
    BatchNorm*) in `model`, for `l2_distance(..., norm_keys=...)`."""
    norms = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)
    return {f"{m}.{p}" if m else p for m, mod in model.named_modules() if isinstance(mod, norms)
            for p, _ in mod.named_parameters(recurse=False)}


def l2_distance(state_a, state_b, layers, norm_keys=()):
    """Per analysis layer, ||W_a - W_b||_2 / (number of weights), as {layer: float}.

    A layer (module name) owns the state-dict entries named `layer` or `layer.*`; of those
    it uses the floating-point tensors that are not in `norm_keys` (normalisation
    parameters; compute them with `norm_param_names(model)`) and not BatchNorm running
    statistics. The value is ||concat(W_a - W_b over those tensors)||_2 / total element
    count, in float64.
    """
    out = {}
    for layer in layers:
        keys = [k for k in state_a if (k == layer or k.startswith(layer + "."))
                and k not in norm_keys and torch.is_floating_point(state_a[k])
                and not k.endswith(("running_mean", "running_var"))]
        if not keys:
            raise ValueError(f"l2_distance: layer {layer!r} has no weight tensors in the state dict")
        sq, count = 0.0, 0
        for k in keys:
            if k not in state_b or state_b[k].shape != state_a[k].shape:
                raise ValueError(f"l2_distance: {k!r} is missing from state_b or has another shape")
            sq += (state_a[k].double() - state_b[k].double().to(state_a[k].device)).pow(2).sum().item()
            count += state_a[k].numel()
        out[layer] = math.sqrt(sq) / count
    return out


# ----------------------------------------------------------------------------- attention


def _patch_distances(grid, patch_size, device):
    """(P, P) pixel distances between patch centres of an (h, w) grid: ||p_q - p_k|| x patch_size."""
    h, w = grid
    ij = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1).reshape(-1, 2)
    d = (ij[:, None, :] - ij[None, :, :]).double().pow(2).sum(-1).sqrt() * patch_size
    return d.to(device)


def attention_distance_sum(attn, grid, patch_size, num_prefix_tokens=1, renormalize=False):
    """Per head, sum over images of the mean attention distance, (heads,) float64 tensor.

    attn: (B, heads, N, N) attention probabilities, N = num_prefix_tokens + h*w. For patch
    query q: d_q = sum_{k in patches} A_qk ||p_q - p_k|| (pixels); the image's value is the
    mean of d_q over patch queries. Prefix (CLS) queries and keys are dropped; with
    renormalize=True d_q is divided by the patch-key mass sum_{k in patches} A_qk, i.e. the
    CLS share is renormalised away instead of simply dropped (the common public code drops
    it). Sum over images lets a caller average over a test set (divide by its size).
    """
    p = num_prefix_tokens
    h, w = grid
    if attn.dim() != 4 or attn.shape[-1] != attn.shape[-2] or attn.shape[-1] != p + h * w:
        raise ValueError(f"attention_distance_sum: attn must be (B, heads, N, N) with N = "
                         f"{p} + {h}*{w}, got {tuple(attn.shape)}")
    a = attn[:, :, p:, p:].float()  # float32 product, float64 reductions over queries/images
    d_q = (a * _patch_distances(grid, patch_size, attn.device).float()).sum(-1).double()
    if renormalize:
        d_q = d_q / a.sum(-1).double()
    return d_q.mean(-1).sum(0)


def attention_prefix_share_sum(attn, num_prefix_tokens=1):
    """Per head, sum over images of the CLS share: the attention mass that patch queries put
    on the prefix (CLS) keys, sum_{k in prefix} A_qk, averaged over patch queries; (heads,)
    float64 tensor. It tells a smaller dropped-CLS distance ("more local") from more attention
    on CLS: the renormalised distance is the dropped one divided by (1 - this share) per query."""
    p = num_prefix_tokens
    if attn.dim() != 4 or attn.shape[-1] != attn.shape[-2] or attn.shape[-1] <= p:
        raise ValueError(f"attention_prefix_share_sum: attn must be (B, heads, N, N) with N > {p}, "
                         f"got {tuple(attn.shape)}")
    return attn[:, :, p:, :p].double().sum(-1).mean(-1).sum(0)


def mean_attention_distance(attn, grid, patch_size, num_prefix_tokens=1, renormalize=False):
    """Mean attention distance per head over queries and images, (heads,) float64 tensor;
    see `attention_distance_sum` for the definition."""
    return attention_distance_sum(attn, grid, patch_size, num_prefix_tokens, renormalize) / attn.shape[0]


# ----------------------------------------------------------------------------- task metrics


def _np(x):
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _classes(labels, preds, num_classes, fn):
    """Sorted class list (union of observed values, or range(C)) and both arrays as indices."""
    labels, preds = _np(labels).ravel(), _np(preds).ravel()
    if labels.shape != preds.shape:
        raise ValueError(f"{fn}: labels and preds differ in length ({labels.size} vs {preds.size})")
    if num_classes is None:
        classes = np.union1d(labels, preds)
    else:
        classes = np.arange(num_classes)
        if np.setdiff1d(np.union1d(labels, preds), classes).size:
            raise ValueError(f"{fn}: labels/preds outside range({num_classes})")
    return classes.size, np.searchsorted(classes, labels), np.searchsorted(classes, preds)


def _confusion(yi, pi, c):
    return np.bincount(yi * c + pi, minlength=c * c).reshape(c, c).astype(np.float64)


def quadratic_kappa(labels, preds, num_classes=None):
    """Quadratic weighted Cohen kappa: 1 - sum(W O) / sum(W E), with O the confusion matrix,
    E = outer(row sums, column sums) / n and W_ij = (i - j)^2 over class indices. Classes:
    range(num_classes), or (None) the sorted union of observed values, as sklearn's
    cohen_kappa_score(weights='quadratic'[, labels=range(C)]). NaN when undefined (sum(W E) = 0)."""
    c, yi, pi = _classes(labels, preds, num_classes, "quadratic_kappa")
    o = _confusion(yi, pi, c)
    e = np.outer(o.sum(1), o.sum(0)) / max(o.sum(), 1)
    w = (np.arange(c)[:, None] - np.arange(c)[None, :]) ** 2
    den = (w * e).sum()
    return float(1 - (w * o).sum() / den) if den > 0 else float("nan")


def macro_recall(labels, preds, num_classes=None):
    """Macro-averaged recall (balanced accuracy): mean over the classes c present in labels
    of TP_c / #(labels == c), as sklearn's balanced_accuracy_score. A predicted class that
    no label holds only counts as an error (it is not a class with recall 0, which would
    depend on what the model predicts on a --subset). num_classes only checks the range."""
    c, yi, pi = _classes(labels, preds, num_classes, "macro_recall")
    o = _confusion(yi, pi, c)
    support = o.sum(1)
    present = support > 0
    if not present.any():
        return float("nan")
    return float(np.mean(np.diag(o)[present] / support[present]))


def _average_ranks(x):
    """1-based ranks of x, ties given their average rank (scipy's rankdata 'average')."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    first = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    counts = np.diff(np.r_[first, x.size])
    ranks = np.empty(x.size)
    ranks[order] = np.repeat(first + (counts + 1) / 2, counts)
    return ranks


def roc_auc(labels, scores):
    """Binary ROC AUC by the Mann-Whitney statistic, ties counting 1/2 (average ranks):
    AUC = (sum of positives' ranks - n_pos (n_pos + 1) / 2) / (n_pos n_neg).
    The larger of the two label values is positive; NaN if labels hold a single value."""
    y, s = _np(labels).ravel(), _np(scores).ravel().astype(np.float64)
    if y.shape != s.shape:
        raise ValueError(f"roc_auc: labels and scores differ in length ({y.size} vs {s.size})")
    if np.isnan(s).any():
        raise ValueError("roc_auc: scores contain NaN")
    values = np.unique(y)
    if values.size > 2:
        raise ValueError(f"roc_auc: labels must be binary, got values {values[:5].tolist()}...")
    if values.size < 2:
        return float("nan")
    pos = y == values[1]
    n_pos, n_neg = pos.sum(), (~pos).sum()
    return float((_average_ranks(s)[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def mean_auc(labels, scores, return_per_class=False):
    """Mean over classes of the per-column ROC AUC for multi-label (n, C) labels and scores.
    Classes whose labels hold a single value have no AUC: they are NaN in the per-class
    array and left out of the mean (NaN if no class remains).
    Returns the mean, or (mean, per-class float64 array) with return_per_class=True."""
    y, s = _np(labels), _np(scores)
    if y.ndim != 2 or y.shape != s.shape:
        raise ValueError(f"mean_auc: labels and scores must both be (n, C), got {y.shape} and {s.shape}")
    per_class = np.array([roc_auc(y[:, c], s[:, c]) for c in range(y.shape[1])])
    valid = per_class[~np.isnan(per_class)]
    mean = float(valid.mean()) if valid.size else float("nan")
    return (mean, per_class) if return_per_class else mean


def per_class_auc(scores, labels):
    """ROC AUC of each class of a multi-label task from (n, C) scores and labels: a list in class
    order, NaN for a class whose labels hold one value (it has no AUC)."""
    return mean_auc(labels, scores, return_per_class=True)[1].tolist()


TASK_METRICS = ["quadratic_kappa", "roc_auc", "mean_auc", "macro_recall", "accuracy"]


def task_metric(name, scores, labels):
    """Dataset score from (n, C) class scores (logits, probabilities or k-NN scores) and labels.
      accuracy, macro_recall: on argmax; macro_recall over the classes present in the
                              labels (balanced accuracy).
      quadratic_kappa:        on argmax, over all C classes (labels=range(C), as the original).
      roc_auc:                binary; C = 2 scores by s1 - s0 (monotone in softmax[:, 1]),
                              C = 1 by the single column (monotone in its sigmoid).
      mean_auc:               multi-label (n, C) labels, per-column scores.
    """
    s, y = _np(scores).astype(np.float64), _np(labels)
    if s.ndim != 2 or len(s) != len(y):
        raise ValueError(f"task_metric: scores must be (n, C) matching {len(y)} labels, got {s.shape}")
    if name == "accuracy":
        return float(np.mean(s.argmax(1) == y.ravel()))
    if name == "macro_recall":
        return macro_recall(y, s.argmax(1))
    if name == "quadratic_kappa":
        return quadratic_kappa(y, s.argmax(1), num_classes=s.shape[1])
    if name == "roc_auc":
        if s.shape[1] > 2:
            raise ValueError(f"task_metric: roc_auc needs 1 or 2 score columns, got {s.shape[1]}")
        return roc_auc(y, s[:, 1] - s[:, 0] if s.shape[1] == 2 else s[:, 0])
    if name == "mean_auc":
        return mean_auc(y, s)
    raise ValueError(f"task_metric: unknown metric {name!r}; expected one of {TASK_METRICS}")
