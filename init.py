"""WT, ST, RI and WT-ST-n/m initialisation (Matsoukas et al., CVPR 2022, appendix H).

Works on any model with `wtst_groups()` -> ordered [(label, [names])], or any nn.Module
given such `groups` (e.g. a timm DeiT with `groups=models.create_model("deit_s").wtst_groups()`),
where each name is a module name or a parameter name, and a state-dict entry belongs to a
group when its name equals one of the names or starts with name + ".". Entries in no group
(the head) are left as created. Imports torch and the standard library only, so it can be
copied alone.

    wtst_init(model, pretrained_state, n, seed)  # groups 1..n: WT, n+1..N: ST
    random_init(model, seed)                      # RI: the architecture's own init
    describe_init(model, n)                       # one line per group, for logs
"""
import hashlib
import math

import torch
import torch.nn.functional as F
from torch import nn

# normalisation layers are reset to identity in ST groups instead of being redrawn
NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def group_index(name, groups):
    """Index of the group that owns state-dict entry `name`, or None (e.g. the head)."""
    for i, (_, members) in enumerate(groups):
        for m in members:
            if name == m or name.startswith(m + "."):
                return i
    return None


def norm_entries(model):
    """Names of every parameter and buffer that lives in a normalisation layer."""
    names = set()
    for mname, module in model.named_modules():
        if isinstance(module, NORM_TYPES):
            prefix = mname + "." if mname else ""
            names.update(prefix + k for k, _ in module.named_parameters(recurse=False))
            names.update(prefix + k for k, _ in module.named_buffers(recurse=False))
    return names


def _check_n(model, n, groups=None):
    groups = model.wtst_groups() if groups is None else [(lab, list(names)) for lab, names in groups]
    if not isinstance(n, int) or not 0 <= n <= len(groups):
        labels = ", ".join(f"{i + 1}={lab}" for i, (lab, _) in enumerate(groups))
        raise ValueError(f"n={n!r} is out of range for {type(model).__name__}: expected 0..{len(groups)} "
                         f"(N={len(groups)} groups: {labels})")
    return groups


def st_tensor(src, seed, name):
    """ST redraw of one tensor: i.i.d. N(mean, std^2) of `src` (float64 statistics over the
    whole tensor). The generator is seeded from (seed, name) alone, so the draw of a tensor
    does not depend on n, on call order or on the device."""
    src64 = src.detach().to("cpu", torch.float64)
    if src64.numel() < 2:  # std undefined for one element: keep the value
        return src.detach().clone()
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    out = torch.randn(src64.shape, generator=gen, dtype=torch.float64) * src64.std() + src64.mean()
    return out.to(src.dtype)


def _norm_identity(name, tensor):
    """Value of a normalisation entry reset to identity (weight 1, bias 0, mean 0, var 1)."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf in ("weight", "running_var"):
        return torch.ones_like(tensor)
    return torch.zeros_like(tensor)  # bias, running_mean, num_batches_tracked


def resample_pos_embed(pos_embed, grid_size, num_prefix_tokens=1):
    """A [1, P + H*W, D] position table resampled to grid (h, w): prefix (cls) entries kept,
    grid bicubic with antialias=True in float32 -- the same code as models.resample_pos_embed
    (repeated so this file works alone; a test checks both agree bit for bit)."""
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    old = int(math.isqrt(grid.shape[1]))
    if old * old != grid.shape[1]:
        raise ValueError(f"pos_embed grid of {grid.shape[1]} entries is not square")
    dim, dtype = grid.shape[-1], grid.dtype
    grid = grid.float().reshape(1, old, old, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=tuple(grid_size), mode="bicubic", align_corners=False,
                         antialias=True)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim).to(dtype)
    return torch.cat([prefix, grid], dim=1)


def _fit_pos_embed(name, src, target, num_prefix_tokens):
    """A pretrained pos_embed of another (square) grid, resampled to the model's; else src."""
    if not name.endswith("pos_embed") or src.shape == target.shape or src.ndim != 3 \
            or src.shape[-1] != target.shape[-1]:
        return src
    side = math.isqrt(target.shape[1] - num_prefix_tokens)
    if side * side != target.shape[1] - num_prefix_tokens:
        return src  # not a square grid: the shape check reports it
    return resample_pos_embed(src, (side, side), num_prefix_tokens)


@torch.no_grad()
def wtst_init(model, pretrained_state, n, seed=0, groups=None):
    """WT-ST-n/m in place: groups 1..n get the exact pretrained tensors (parameters and
    buffers); groups n+1..N get ST: each parameter tensor redrawn from N(mean, std^2) of the
    pretrained tensor, normalisation layers reset to identity; other buffers are never
    redrawn. The head (in no group) is left as created. n=0 is ST, n=N is WT.

    groups: [(label, [names])] as `model.wtst_groups()` returns (the default), so any model
    with our state-dict names can be initialised, e.g. a timm DeiT. A pretrained `pos_embed`
    of another square grid is first resampled as models.load_pretrained does (prefix tokens:
    `model.num_prefix_tokens`, default 1)."""
    groups = _check_n(model, n, groups)
    prefix = getattr(model, "num_prefix_tokens", 1)
    norms = norm_entries(model)
    entries = list(model.named_parameters()) + list(model.named_buffers())
    missing = [k for k, _ in entries if group_index(k, groups) is not None and k not in pretrained_state]
    if missing:
        raise ValueError(f"pretrained state lacks {len(missing)} backbone entries, e.g. {missing[:5]}")
    for name, t in entries:
        g = group_index(name, groups)
        if g is None:
            continue
        src = _fit_pos_embed(name, pretrained_state[name], t, prefix)
        if tuple(src.shape) != tuple(t.shape):
            raise ValueError(f"pretrained '{name}' has shape {tuple(src.shape)}, model expects {tuple(t.shape)}")
        if g < n:
            t.copy_(src)
        elif name in norms:
            t.copy_(_norm_identity(name, t))
        elif isinstance(t, nn.Parameter):
            t.copy_(st_tensor(src, seed, name))
    return model


@torch.no_grad()
def random_init(model, seed=0):
    """RI: the architecture's own random initialisation, reproducible from the seed.
    Uses `model.init_weights()` when the model defines it (its constructor's scheme),
    else every module's `reset_parameters()`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if hasattr(model, "init_weights"):
            model.init_weights()
        else:
            for m in model.modules():
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()
        for m in model.modules():  # fresh BatchNorm statistics too
            if isinstance(m, nn.modules.batchnorm._NormBase):
                m.reset_running_stats()
    return model


def describe_init(model, n, groups=None):
    """One line per group: index, label, WT or ST, parameter count."""
    groups = _check_n(model, n, groups)
    counts = [0] * len(groups)
    for name, p in model.named_parameters():
        g = group_index(name, groups)
        if g is not None:
            counts[g] += p.numel()
    width = max(len(lab) for lab, _ in groups)
    return [f"{i + 1:2d} {lab:<{width}} {'WT' if i < n else 'ST'} {c:>12,d} params"
            for i, ((lab, _), c) in enumerate(zip(groups, counts))]
