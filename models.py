"""Hand-written backbones whose state_dict layout equals the published checkpoints.

Models (``MODELS``): DeiT-T/S/B and DeiT-S-5b (timm ``VisionTransformer`` layout), Swin-T,
ResNet18/50/152 and Inception-v3 (torchvision layouts). Every key and shape matches the
published file, so ``model.load_state_dict(checkpoint, strict=True)`` works with no renaming.
Imports only torch / stdlib, so this file can be copied alone into another project.

    model = create_model("deit_s", num_classes=5, img_size=224)
    report = load_pretrained(model, "imagenet")   # or a local file
    model.wtst_groups()      # ordered module groups for WT-ST-n/m (method.md section 3)
    model.init_weights()     # re-draw every parameter with the architecture's usual init

The analysis protocol: every model answers what analyze.py needs, so no other file tests a
model's name (analyze.py has no model-specific code):

    model.feature_layers()             # module names whose outputs are the analysis layers
    model.feature_types()              # ["cls", "patches", "all"] (DeiT) or ["all"]
    model.feature_views(layer, out)    # {type: activations (n, ...)} of one layer's output (CKA)
    model.pooled_views(layer, out)     # {type: (n, d) pooled features} (k-NN)
    model.forward_stages()             # ([(module prefix, fn)], head): the forward as a chain,
                                       #   head(fn_k(...fn_1(x))) == model(x) (re-init reuses it)
    model.attention_layers()           # modules whose recorded softmax is global token attention
                                       #   (DeiT; [] otherwise); such models also have
                                       #   record_attention(on), grid_size, patch_size,
                                       #   num_prefix_tokens (attention distance)
    model.prefers_channels_last        # True for CNNs: faster convolutions on CUDA
    model.token_mixing                 # how positions exchange information: "attention" (DeiT,
                                       #   Swin) or "convolution" (ResNet, Inception); train.py
                                       #   writes it to config.json, findings group models by it

Choices worth knowing:
- DeiT at another image size: the 14x14 ``pos_embed`` grid of a 224 checkpoint is resampled
  bicubic with ``antialias=True`` (as timm does when it loads a checkpoint at another size;
  the DeiT repository uses antialias=False). The cls entry is kept as is.
- Inception-v3 never transforms its input (torchvision's ``transform_input=False``): the
  toolkit normalises every dataset with its own mean/std, like the original code.
  torchvision turns ``transform_input`` on when it loads ImageNet weights.
- Inception-v3 has no auxiliary head; ``AuxLogits.*`` keys of a checkpoint are skipped.
- DeiT attention uses ``F.scaled_dot_product_attention``. Swin attention is computed
  explicitly (matmul, softmax, matmul) exactly like torchvision: for its 49-token windows the
  fused CPU kernel measured slower, and the explicit form keeps torchvision's numerics.
"""
import functools
import math
import os
import pickle

import torch
import torch.nn as nn
import torch.nn.functional as F

MODELS = ["deit_t", "deit_s", "deit_b", "deit_s_5b", "swin_t",
          "resnet18", "resnet50", "resnet152", "inception_v3"]

_TV = "https://download.pytorch.org/models/"
_FB = "https://dl.fbaipublicfiles.com/deit/"
PRETRAINED_URLS = {
    "deit_t": _FB + "deit_tiny_patch16_224-a1311bcf.pth",
    "deit_s": _FB + "deit_small_patch16_224-cd65a155.pth",
    "deit_b": _FB + "deit_base_patch16_224-b5f2ef4d.pth",
    "deit_s_5b": _FB + "deit_small_patch16_224-cd65a155.pth",  # DeiT-S, blocks 5-11 skipped
    "swin_t": _TV + "swin_t-704ceda3.pth",
    "resnet18": _TV + "resnet18-f37072fd.pth",     # IMAGENET1K_V1
    "resnet50": _TV + "resnet50-0676ba61.pth",     # IMAGENET1K_V1 (paper era)
    "resnet152": _TV + "resnet152-394f9c45.pth",   # IMAGENET1K_V1
    "inception_v3": _TV + "inception_v3_google-0cc3c7bd.pth",
}
# the published implementation each model reproduces: (library, its name, extra arguments);
# same state-dict keys and outputs (bench.py and the tests compare against them)
REFERENCE_MODELS = {
    "deit_t": ("timm", "deit_tiny_patch16_224", {}),
    "deit_s": ("timm", "deit_small_patch16_224", {}),
    "deit_b": ("timm", "deit_base_patch16_224", {}),
    "deit_s_5b": ("timm", "deit_small_patch16_224", {"depth": 5}),
    "swin_t": ("torchvision", "swin_t", {}),
    "resnet18": ("torchvision", "resnet18", {}),
    "resnet50": ("torchvision", "resnet50", {}),
    "resnet152": ("torchvision", "resnet152", {}),
    "inception_v3": ("torchvision", "inception_v3", {"aux_logits": False, "init_weights": False}),
}


# analysis protocol pieces shared by the models with one feature type (Swin, CNNs)
def _one_type(model):
    return ["all"]


def _whole_output(model, layer, out):
    return {"all": out}


def _global_average_pool(model, layer, out):
    return {"all": out.mean((2, 3))}  # [B, C, H, W] -> [B, C]


def _no_attention(model):
    return []


# ----------------------------------------------------------------------------------------------
# DeiT (timm VisionTransformer layout)

class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm layout).

    softmax(q k^T / sqrt(d)) v per head, heads concatenated, then ``proj``. The module output
    (after ``proj``, before the residual add) is the analysis activation [B, N, D].
    """

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)  # rows q | k | v, heads contiguous
        self.proj = nn.Linear(dim, dim)
        self.record = False     # when True: explicit softmax, probabilities kept in attn_probs
        self.attn_probs = None

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.record:
            # same arithmetic as timm's non-fused path, so logits match it exactly
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
            self.attn_probs = attn.detach().float()
            x = attn @ v
        else:
            x = F.scaled_dot_product_attention(q, k, v)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2 (timm ``Mlp``; its dropouts have p=0 and are left out)."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x


class PatchEmbed(nn.Module):
    """Non-overlapping patch conv; ``proj`` output [B, D, h, w] is the patch analysis layer."""

    def __init__(self, img_size, patch_size, dim):
        super().__init__()
        self.img_size = img_size
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"DeiT input is {tuple(x.shape[-2:])}, expected "
                             f"({self.img_size}, {self.img_size}) (the model's img_size)")
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, h*w, D]


class VisionTransformer(nn.Module):
    """DeiT: tokens = [cls, patches] + pos_embed -> blocks -> LayerNorm -> head(token 0).

    LayerNorm eps 1e-6, exact GELU, no layer scale, no distillation token. ``pos_embed`` has
    1 + (img_size/16)^2 entries; ``load_pretrained`` resamples a 224 checkpoint's grid.
    """

    def __init__(self, img_size=224, patch_size=16, dim=384, depth=12, num_heads=6,
                 num_classes=1000):
        super().__init__()
        self.model_name = "deit"
        self.head_name = "head"
        self.num_classes = num_classes
        self.img_size = img_size
        self.patch_size = patch_size
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_prefix_tokens = 1
        self.patch_embed = PatchEmbed(img_size, patch_size, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid_size[0] * self.grid_size[1], dim))
        self.blocks = nn.Sequential(*[Block(dim, num_heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        self.init_weights()

    def init_weights(self):
        """timm's default ViT init: trunc-normal(0.02) Linear weights and pos_embed, zero
        biases, cls_token N(0, 1e-6); conv and LayerNorm keep their PyTorch defaults."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.Conv2d, nn.LayerNorm)):
                m.reset_parameters()

    def forward(self, x):
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])

    def wtst_groups(self):
        groups = [("patchifier", ["patch_embed", "cls_token", "pos_embed"])]
        groups += [(f"block{i + 1}", [f"blocks.{i}"]) for i in range(len(self.blocks))]
        return groups + [("norm", ["norm"])]

    def feature_layers(self):
        names = ["patch_embed.proj"]
        for i in range(len(self.blocks)):
            names += [f"blocks.{i}.attn", f"blocks.{i}.mlp"]
        return names

    # analysis protocol (see the module docstring)
    prefers_channels_last = False
    token_mixing = "attention"

    def feature_types(self):
        return ["cls", "patches", "all"]

    def feature_views(self, layer, out):
        """'cls' (prefix tokens), 'patches' (the rest), 'all'; the patch conv [B, D, h, w] has
        no CLS token, so all three types use its patch tokens there."""
        if out.ndim == 4:  # patch conv -> patch tokens
            tokens = out.flatten(2).transpose(1, 2)
            return {"cls": tokens, "patches": tokens, "all": tokens}
        p = self.num_prefix_tokens
        return {"cls": out[:, :p], "patches": out[:, p:], "all": out}

    def pooled_views(self, layer, out):
        """k-NN features: CLS token, mean of patch tokens, and their concatenation (the patch
        conv: its spatial mean for all three)."""
        if out.ndim == 4:
            mean = out.mean((2, 3))
            return {"cls": mean, "patches": mean, "all": mean}
        cls, patches = out[:, 0], out[:, self.num_prefix_tokens:].mean(1)
        return {"cls": cls, "patches": patches, "all": torch.cat([cls, patches], 1)}

    def forward_stages(self):
        def embed(x):
            x = self.patch_embed(x)
            return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        stages = [("patch_embed", embed)] + [(f"blocks.{i}", b) for i, b in enumerate(self.blocks)]
        return stages, lambda x: self.head(self.norm(x)[:, 0])

    def attention_layers(self):
        return [f"blocks.{i}.attn" for i in range(len(self.blocks))]

    def record_attention(self, on=True):
        for blk in self.blocks:
            blk.attn.record = bool(on)
            blk.attn.attn_probs = None

    def attention_probs(self):
        """Per block, the last recorded softmax probabilities [B, heads, 1+h*w, 1+h*w]."""
        return [blk.attn.attn_probs for blk in self.blocks]


def resample_pos_embed(pos_embed, grid_size, num_prefix_tokens=1):
    """Resample a [1, P + H*W, D] position table to ``grid_size`` (h, w).

    The P prefix (cls) entries are kept; the H x W grid is interpolated bicubic with
    antialias=True, in float32 (timm's ``resample_abs_pos_embed`` choice).
    """
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


# ----------------------------------------------------------------------------------------------
# Swin-T (torchvision layout; tensors are [B, H, W, C] inside the network)

class Permute(nn.Module):
    def __init__(self, dims):
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return x.permute(self.dims)


def stochastic_depth(x, p, training):
    """Drop whole residual branches per sample with probability p, scale survivors by 1/(1-p)
    (torchvision's ``stochastic_depth`` in "row" mode, same RNG use)."""
    if not training or p == 0.0:
        return x
    survival = 1.0 - p
    noise = torch.empty([x.shape[0]] + [1] * (x.ndim - 1), dtype=x.dtype, device=x.device)
    noise = noise.bernoulli_(survival)
    if survival > 0.0:
        noise.div_(survival)
    return x * noise


@functools.lru_cache(maxsize=64)
def _shift_window_mask(pad_h, pad_w, window, shift_h, shift_w, device):
    """[num_windows, N, N] additive mask: -100 between tokens that came from different regions
    of the rolled map (torchvision's construction, built once per map size)."""
    mask = torch.zeros((pad_h, pad_w), device=device)
    h_slices = ((0, -window), (-window, -shift_h), (-shift_h, None))
    w_slices = ((0, -window), (-window, -shift_w), (-shift_w, None))
    count = 0
    for h in h_slices:
        for w in w_slices:
            mask[h[0]:h[1], w[0]:w[1]] = count
            count += 1
    mask = mask.view(pad_h // window, window, pad_w // window, window)
    mask = mask.permute(0, 2, 1, 3).reshape(-1, window * window)
    mask = mask.unsqueeze(1) - mask.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


class ShiftedWindowAttention(nn.Module):
    """Window attention with relative position bias (torchvision numerics).

    The map is padded right/bottom to a multiple of the window, cyclically shifted by
    ``shift_size`` (no shift when one window covers the padded map), split into windows of
    N = 7*7 tokens; per window softmax((q/sqrt(d)) k^T + B_rel + M) v, M = -100 across regions.
    Input and output [B, H, W, C].
    """

    def __init__(self, dim, window_size, shift_size, num_heads):
        super().__init__()
        self.window_size = window_size
        self.shift_size = shift_size
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size - 1) ** 2, num_heads))
        # index[i*N + j] = row of the table for the offset between window positions i and j
        coords = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size),
                                            indexing="ij")).flatten(1)  # 2, N
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window_size - 1)
        index = rel[:, :, 0] * (2 * window_size - 1) + rel[:, :, 1]
        self.register_buffer("relative_position_index", index.flatten())
        self.record = False
        self.attn_probs = None

    def relative_position_bias(self):
        n = self.window_size * self.window_size
        bias = self.relative_position_bias_table[self.relative_position_index]
        return bias.view(n, n, -1).permute(2, 0, 1).contiguous().unsqueeze(0)  # 1, heads, N, N

    def forward(self, x):
        B, H, W, C = x.shape
        ws, heads = self.window_size, self.num_heads
        pad_r, pad_b = (ws - W % ws) % ws, (ws - H % ws) % ws
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        pad_h, pad_w = H + pad_b, W + pad_r
        # shifting is pointless when one window already covers the (padded) map
        sh = 0 if ws >= pad_h else self.shift_size
        sw = 0 if ws >= pad_w else self.shift_size
        if sh or sw:
            x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))

        nh, nw = pad_h // ws, pad_w // ws
        x = x.view(B, nh, ws, nw, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(B * nh * nw, ws * ws, C)
        qkv = self.qkv(x).reshape(x.shape[0], x.shape[1], 3, heads, C // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * (C // heads) ** -0.5) @ k.transpose(-2, -1)
        bias = self.relative_position_bias()
        if sh or sw:
            # fold the region mask into the bias once, then one add over the attention tensor
            bias = bias + _shift_window_mask(pad_h, pad_w, ws, sh, sw, x.device).unsqueeze(1)
            n = ws * ws
            attn = (attn.view(B, nh * nw, heads, n, n) + bias).view(-1, heads, n, n)
        else:
            attn = attn + bias
        attn = attn.softmax(dim=-1)
        if self.record:
            self.attn_probs = attn.detach().float()  # [B * windows, heads, N, N]
        x = (attn @ v).transpose(1, 2).reshape(x.shape[0], x.shape[1], C)
        x = self.proj(x)

        x = x.view(B, nh, nw, ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(B, pad_h, pad_w, C)
        if sh or sw:
            x = torch.roll(x, shifts=(sh, sw), dims=(1, 2))
        return x[:, :H, :W, :].contiguous()


class SwinBlock(nn.Module):
    """x + sd(attn(norm1(x))), then x + sd(mlp(norm2(x))); ``mlp`` is torchvision's MLP
    Sequential (0 Linear, 1 GELU, 2 Dropout, 3 Linear, 4 Dropout) so keys are mlp.0 / mlp.3."""

    def __init__(self, dim, num_heads, window_size, shift_size, drop_path):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn = ShiftedWindowAttention(dim, window_size, shift_size, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(0.0),
                                 nn.Linear(4 * dim, dim), nn.Dropout(0.0))
        self.drop_path = drop_path

    def forward(self, x):
        x = x + stochastic_depth(self.attn(self.norm1(x)), self.drop_path, self.training)
        x = x + stochastic_depth(self.mlp(self.norm2(x)), self.drop_path, self.training)
        return x


class PatchMerging(nn.Module):
    """2x2 neighbours concatenated ([0::2,0::2], [1::2,0::2], [0::2,1::2], [1::2,1::2]),
    LayerNorm(4C), Linear 4C -> 2C without bias. Odd maps are padded by one first."""

    def __init__(self, dim):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim, eps=1e-5)

    def forward(self, x):
        H, W = x.shape[-3:-1]
        x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        x = torch.cat([x[..., 0::2, 0::2, :], x[..., 1::2, 0::2, :],
                       x[..., 0::2, 1::2, :], x[..., 1::2, 1::2, :]], dim=-1)
        return self.reduction(self.norm(x))


class SwinTransformer(nn.Module):
    """Swin-T: features.0 = patch conv 4x4 + LayerNorm; stages features.1/3/5/7 (depths
    2,2,6,2, dims 96..768, heads 3..24, window 7, shift 3 in odd blocks); PatchMerging at
    features.2/4/6; final ``norm``, mean over tokens, ``head``. Any input size works."""

    def __init__(self, num_classes=1000, img_size=224, embed_dim=96, depths=(2, 2, 6, 2),
                 num_heads=(3, 6, 12, 24), window_size=7, drop_path_rate=0.2):
        super().__init__()
        self.model_name = "swin_t"
        self.head_name = "head"
        self.num_classes = num_classes
        self.img_size = img_size
        layers = [nn.Sequential(nn.Conv2d(3, embed_dim, kernel_size=4, stride=4),
                                Permute([0, 2, 3, 1]), nn.LayerNorm(embed_dim, eps=1e-5))]
        total, block_id = sum(depths), 0
        for s, depth in enumerate(depths):
            dim = embed_dim * 2 ** s
            stage = []
            for j in range(depth):
                # stochastic depth grows linearly from 0 (first block) to drop_path_rate (last)
                p = drop_path_rate * block_id / (total - 1)
                stage.append(SwinBlock(dim, num_heads[s], window_size,
                                       0 if j % 2 == 0 else window_size // 2, p))
                block_id += 1
            layers.append(nn.Sequential(*stage))
            if s < len(depths) - 1:
                layers.append(PatchMerging(dim))
        self.features = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(embed_dim * 2 ** (len(depths) - 1), eps=1e-5)
        self.head = nn.Linear(embed_dim * 2 ** (len(depths) - 1), num_classes)
        self.init_weights()

    def init_weights(self):
        """torchvision's init: trunc-normal(0.02) Linear weights and relative position tables,
        zero biases; conv and LayerNorm keep their PyTorch defaults."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, ShiftedWindowAttention):
                nn.init.trunc_normal_(m.relative_position_bias_table, std=0.02)
            elif isinstance(m, (nn.Conv2d, nn.LayerNorm)):
                m.reset_parameters()

    def forward(self, x):
        x = self.norm(self.features(x))
        return self.head(x.mean(dim=(1, 2)))

    def _blocks(self):
        """(stage index, block index, module name of the block) in forward order."""
        out = []
        for s, idx in enumerate(range(1, len(self.features), 2)):
            out += [(s, j, f"features.{idx}.{j}") for j in range(len(self.features[idx]))]
        return out

    def wtst_groups(self):
        groups = [("patchifier", ["features.0"])]
        for s, j, name in self._blocks():
            names = [name]
            if j == 0 and s > 0:  # PatchMerging belongs to the block that follows it
                names.insert(0, f"features.{2 * s}")
            groups.append((f"stage{s + 1}.block{j + 1}", names))
        return groups + [("norm", ["norm"])]

    def feature_layers(self):
        names = ["features.0.0"]  # the patch conv itself, as DeiT's patch_embed.proj: [B, 96, H/4, W/4]
        for _, _, name in self._blocks():
            names += [f"{name}.attn", f"{name}.mlp"]
        return names

    # analysis protocol (see the module docstring); windowed attention has no attention
    # distance over the whole image, so no attention layers
    prefers_channels_last = False
    token_mixing = "attention"  # within windows: no attention_layers(), but attention all the same
    feature_types, feature_views, attention_layers = _one_type, _whole_output, _no_attention

    def pooled_views(self, layer, out):
        """Mean over positions: [B, C, H, W] for the patch conv, [B, H, W, C] elsewhere."""
        return {"all": out.mean((2, 3) if layer == "features.0.0" else (1, 2))}

    def forward_stages(self):
        stages = [("features.0", self.features[0])]
        for i, f in enumerate(self.features[1:], 1):
            stages += [(f"features.{i}.{j}", b) for j, b in enumerate(f)] \
                if isinstance(f, nn.Sequential) else [(f"features.{i}", f)]
        return stages, lambda x: self.head(self.norm(x).mean(dim=(1, 2)))

    def _attn_modules(self):
        return [self.get_submodule(f"{name}.attn") for _, _, name in self._blocks()]

    def record_attention(self, on=True):
        for m in self._attn_modules():
            m.record = bool(on)
            m.attn_probs = None

    def attention_probs(self):
        """Per block, the last recorded probabilities [B * windows, heads, 49, 49]."""
        return [m.attn_probs for m in self._attn_modules()]


# ----------------------------------------------------------------------------------------------
# ResNet (torchvision v1.5 layout: stride on the 3x3 conv of the bottleneck)

def conv3x3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = conv3x3(cin, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity  # in place on the block's own tensor, never on x (hooks may hold x)
        return self.relu(out)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = conv1x1(cin, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * 4)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity  # in place on the block's own tensor, never on x
        return self.relu(out)


class ResNet(nn.Module):
    """conv1 7x7/2 -> bn1 -> relu -> maxpool 3/2 -> layer1..4 -> global avg pool -> fc."""

    def __init__(self, block, layers, num_classes=1000, img_size=224):
        super().__init__()
        self.model_name = "resnet"
        self.head_name = "fc"
        self.num_classes = num_classes
        self.img_size = img_size
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        self.init_weights()

    def _make_layer(self, block, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def init_weights(self):
        """torchvision's init: Kaiming-normal (fan_out) convs, BatchNorm 1/0, default fc."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                m.reset_parameters()
            elif isinstance(m, nn.Linear):
                m.reset_parameters()

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def wtst_groups(self):
        return [(n, [n]) for n in ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")]

    def feature_layers(self):
        names = ["conv1"]
        for i in range(1, 5):
            names += [f"layer{i}.{j}" for j in range(len(getattr(self, f"layer{i}")))]
        return names

    # analysis protocol (see the module docstring)
    prefers_channels_last = True
    token_mixing = "convolution"
    feature_types, feature_views, attention_layers = _one_type, _whole_output, _no_attention
    pooled_views = _global_average_pool

    def forward_stages(self):
        stages = [("conv1", self.conv1), ("bn1", lambda x: self.maxpool(self.relu(self.bn1(x))))]
        for i in range(1, 5):
            stages += [(f"layer{i}.{j}", b) for j, b in enumerate(getattr(self, f"layer{i}"))]
        return stages, lambda x: self.fc(torch.flatten(self.avgpool(x), 1))


# ----------------------------------------------------------------------------------------------
# Inception-v3 (torchvision layout, no auxiliary head, no input transform)

class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm(eps 0.001) -> ReLU."""

    def __init__(self, cin, cout, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)), inplace=True)


class InceptionA(nn.Module):
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1))
        return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, bd, bp], 1)


class InceptionC(nn.Module):
    def __init__(self, cin, channels_7x7):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        bd = self.branch7x7dbl_5(self.branch7x7dbl_4(self.branch7x7dbl_3(self.branch7x7dbl_2(bd))))
        bp = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1))
        return torch.cat([b1, b7, bd, bp], 1)


class InceptionD(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b7, bp], 1)


class InceptionE(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        bp = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1))
        return torch.cat([b1, b3, bd, bp], 1)


class Inception3(nn.Module):
    """Inception-v3 without the auxiliary classifier; input needs >= 75x75 pixels.

    ``transform_input`` is always off: the toolkit normalises each dataset with its own
    mean/std, as the original code did (torchvision turns it on for its ImageNet weights,
    remapping ImageNet-normalised input to (x - 0.5) / 0.5). Dropout p=0.5 before ``fc``.
    """

    _STEM = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3"]
    _MIXED = ["Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c",
              "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"]

    def __init__(self, num_classes=1000, img_size=299, dropout=0.5):
        super().__init__()
        self.model_name = "inception_v3"
        self.head_name = "fc"
        self.num_classes = num_classes
        self.img_size = img_size
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.maxpool1 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.maxpool2 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280)
        self.Mixed_7c = InceptionE(2048)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(2048, num_classes)
        self.init_weights()

    def init_weights(self):
        """torchvision's init: conv and fc weights trunc-normal(0, 0.1) cut at +-2, BatchNorm
        1/0, fc bias at the PyTorch default."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                if isinstance(m, nn.Linear):
                    m.reset_parameters()  # re-draws the bias
                nn.init.trunc_normal_(m.weight, mean=0.0, std=0.1, a=-2, b=2)
            elif isinstance(m, nn.BatchNorm2d):
                m.reset_parameters()

    def forward(self, x):
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(self.maxpool1(x)))
        x = self.maxpool2(x)
        for name in self._MIXED:
            x = getattr(self, name)(x)
        x = self.dropout(self.avgpool(x))
        return self.fc(torch.flatten(x, 1))

    def wtst_groups(self):
        return [("Conv2d_1a_3x3", ["Conv2d_1a_3x3"]),
                ("Conv2d_2", ["Conv2d_2a_3x3", "Conv2d_2b_3x3"]),
                ("Conv2d_3b_1x1", ["Conv2d_3b_1x1"]),
                ("Conv2d_4a_3x3", ["Conv2d_4a_3x3"]),
                ("Mixed_5", ["Mixed_5b", "Mixed_5c", "Mixed_5d"]),
                ("Mixed_6", ["Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"]),
                ("Mixed_7", ["Mixed_7a", "Mixed_7b", "Mixed_7c"])]

    def feature_layers(self):
        return self._STEM + self._MIXED

    # analysis protocol (see the module docstring)
    prefers_channels_last = True
    token_mixing = "convolution"
    feature_types, feature_views, attention_layers = _one_type, _whole_output, _no_attention
    pooled_views = _global_average_pool

    def forward_stages(self):
        stem = self._STEM
        stages = [(n, getattr(self, n)) for n in stem[:3]] + [("maxpool1", self.maxpool1)]
        stages += [(n, getattr(self, n)) for n in stem[3:]] + [("maxpool2", self.maxpool2)]
        stages += [(n, getattr(self, n)) for n in self._MIXED]
        return stages, lambda x: self.fc(torch.flatten(self.dropout(self.avgpool(x)), 1))


# ----------------------------------------------------------------------------------------------
# Registry

_DEIT = {"deit_t": (192, 12, 3), "deit_s": (384, 12, 6), "deit_b": (768, 12, 12),
         "deit_s_5b": (384, 5, 6)}
_RESNET = {"resnet18": (BasicBlock, [2, 2, 2, 2]), "resnet50": (Bottleneck, [3, 4, 6, 3]),
           "resnet152": (Bottleneck, [3, 8, 36, 3])}


def create_model(name, num_classes=1000, img_size=224):
    """Build ``name`` (one of ``MODELS``) with random weights (the architecture's usual init).

    ``img_size`` sets the DeiT position grid (a multiple of 16) and is recorded on every
    model (CNNs and Swin accept any size; Inception needs at least 75 pixels).
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if not isinstance(img_size, int) or img_size < 1:
        raise ValueError(f"img_size must be a positive integer, got {img_size!r}")
    if name in _DEIT:
        if img_size % 16:
            raise ValueError(f"img_size for {name} must be a multiple of 16, got {img_size}")
        dim, depth, heads = _DEIT[name]
        model = VisionTransformer(img_size, 16, dim, depth, heads, num_classes)
    elif name == "swin_t":
        model = SwinTransformer(num_classes, img_size)
    elif name in _RESNET:
        model = ResNet(*_RESNET[name], num_classes=num_classes, img_size=img_size)
    else:
        if img_size < 75:
            raise ValueError(f"img_size for inception_v3 must be at least 75, got {img_size}")
        model = Inception3(num_classes, img_size)
    model.model_name = name
    return model


# ----------------------------------------------------------------------------------------------
# Checkpoints

def read_checkpoint(path):
    """torch.load(weights_only=True) with one-line errors that name the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only load failed" in str(e).lower():
            raise ValueError(f"refusing to load {path}: it holds pickled objects other than "
                             "tensors and plain containers (torch.load weights_only=True); "
                             "re-save it as a plain state dict") from None
        raise ValueError(f"cannot read checkpoint {path}: {_first_line(e)}") from None
    except Exception as e:  # truncated zip, not a checkpoint at all, ...
        raise ValueError(f"cannot read checkpoint {path}: truncated or not a PyTorch "
                         f"checkpoint ({_first_line(e)})") from None


def _first_line(e):
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:200]


def imagenet_path(name):
    """Where the published checkpoint of ``name`` is expected: torch.hub's cache
    ($TORCH_HOME/hub/checkpoints/<file name of PRETRAINED_URLS[name]>)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", PRETRAINED_URLS[name].rsplit("/", 1)[1])


def _fetch_imagenet(name):
    """The published checkpoint through torch.hub's cache ($TORCH_HOME/hub/checkpoints)."""
    url, path = PRETRAINED_URLS[name], imagenet_path(name)
    if os.path.isfile(path):
        return read_checkpoint(path), path
    try:
        sd = torch.hub.load_state_dict_from_url(url, map_location="cpu", weights_only=True,
                                                check_hash=False)
    except Exception as e:
        if os.path.isfile(path):  # downloaded but unreadable
            return read_checkpoint(path), path
        raise FileNotFoundError(f"could not download {url} ({_first_line(e)}); without network, "
                                f"place the file by hand at {path}") from None
    return sd, path


def _unwrap(obj, where):
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"{where} does not hold a state dict (flat, {{'model': sd}} or "
                         f"{{'state_dict': sd}})")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{where}: entries that are not tensors: {_listing(bad)}")
    return dict(obj)


def _listing(keys, limit=12):
    keys = list(keys)
    more = f" ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_pretrained(model, source="imagenet"):
    """Load ``source`` into ``model`` in place: "imagenet", a checkpoint file, or a state dict
    already in memory (e.g. ``timm_model.state_dict()``).

    Files and dicts may hold a flat state dict, {"model": sd} or {"state_dict": sd}. Adjustments, all
    reported: Inception ``AuxLogits.*`` dropped; DeiT-S-5b skips DeiT-S blocks 5-11; a head
    whose shape differs is skipped and left as created; a DeiT ``pos_embed`` for another grid
    is resampled (bicubic, antialias=True, cls entry kept). Any other missing / unexpected key
    or shape mismatch raises ValueError listing them: never a silent partial load.

    Returns {"loaded": [keys], "skipped": [keys], "source": url or path}.
    """
    name = getattr(model, "model_name", None)
    if name not in MODELS:
        raise ValueError(f"load_pretrained needs a model from create_model, got {type(model).__name__}")
    if isinstance(source, dict):
        raw, where, where_label = source, "state dict", "state dict"
    elif source == "imagenet":
        raw, where = _fetch_imagenet(name)
        where_label = PRETRAINED_URLS[name]
    else:
        source = os.fspath(source)
        if not os.path.isfile(source):
            raise FileNotFoundError(f"checkpoint file not found: {source} "
                                    "(expected 'imagenet' or a path to a checkpoint)")
        raw, where = read_checkpoint(source), source
        where_label = source
    sd = _unwrap(raw, where)
    own = model.state_dict()
    skipped = []

    def drop(keys):
        for k in keys:
            skipped.append(k)
            del sd[k]

    if name == "inception_v3":
        drop([k for k in sd if k.startswith("AuxLogits.")])
    if isinstance(model, VisionTransformer):
        depth = len(model.blocks)
        drop([k for k in sd if k.startswith("blocks.") and int(k.split(".")[1]) >= depth])
        pe = sd.get("pos_embed")
        if pe is not None and pe.ndim == 3 and pe.shape != own["pos_embed"].shape \
                and pe.shape[-1] == own["pos_embed"].shape[-1]:
            sd["pos_embed"] = resample_pos_embed(pe, model.grid_size, model.num_prefix_tokens)
    head_keys = [k for k in own if k.startswith(model.head_name + ".")]
    if any(k in sd and sd[k].shape != own[k].shape for k in head_keys):
        drop([k for k in head_keys if k in sd])  # another class count: keep the new head

    missing = [k for k in own if k not in sd and k not in head_keys
               and not k.endswith("num_batches_tracked")]  # BatchNorm fills its counter in
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}"
              for k in sd if k in own and sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{label}: {_listing(keys)}" for label, keys in
                 (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes))
                 if keys]
        raise ValueError(f"{where} does not fit {name}; " + "; ".join(parts))
    result = model.load_state_dict(sd, strict=False)
    assert not result.unexpected_keys and set(result.missing_keys) <= set(head_keys)
    return {"loaded": list(sd), "skipped": skipped, "source": where_label}
