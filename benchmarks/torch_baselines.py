"""PyTorch reference modules shared by the parity tests and the benchmarks (never imported by the library).

These are written from docs/DESIGN.md and the upstream projects' documented semantics, not copied from them:

- CosPlace / EigenPlaces: a torchvision backbone truncated as upstream does, followed by the
  ``L2Norm -> GeM -> Flatten -> Linear -> L2Norm`` head; module names match upstream's ``GeoLocalizationNet`` so
  that ``state_dict()`` has the published checkpoints' keys (``backbone.0.weight``, ``aggregation.1.p``,
  ``aggregation.3.weight``, ...).
- DINOv2: transformers' ``Dinov2Model`` / ``Dinov2WithRegistersModel`` with the position-embedding interpolation
  replaced by facebookresearch/dinov2's (``scale_factor=((h0 + 0.1) / M, (w0 + 0.1) / M)``), and a key mapping from
  transformers' names to the torch.hub names that SALAD checkpoints carry.
- SALAD: the aggregation head of serizba/salad (token / cluster / score MLPs, dust bin, log-space Sinkhorn) plus the
  query-side attention path of docs/DESIGN.md, and the DINOv2 + SALAD composite whose ``upstream_state_dict()`` has the
  keys of ``dino_salad.ckpt`` (``backbone.model.*`` and ``aggregator.*``).

Import :mod:`benchmarks.torch_env` and call ``declare_missing_torchvision_ops()`` before importing this module in a
standalone script (pytest's conftest does it).
"""

from __future__ import annotations

import math
import types

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# ---------------------------------------------------------------------------------------------------------------
# CosPlace / EigenPlaces
# ---------------------------------------------------------------------------------------------------------------

COSPLACE_FEATURES_DIM = {"ResNet18": 512, "ResNet50": 2048, "ResNet101": 2048, "ResNet152": 2048, "VGG16": 512}


class TorchL2Norm(nn.Module):
    """L2 normalization over one dimension (channels by default)."""

    def __init__(self, dim: int = 1):
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, p=2.0, dim=self.dim)


class TorchGeM(nn.Module):
    """Generalized-mean pooling over the whole feature map with a learnable exponent ``p`` (shape [1])."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.ones(1) * p)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x.clamp(min=self.eps).pow(self.p), (x.size(-2), x.size(-1))).pow(1.0 / self.p)


class TorchFlatten(nn.Module):
    """[B, C, 1, 1] -> [B, C]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[2] == x.shape[3] == 1, x.shape
        return x[:, :, 0, 0]


class TorchCosPlace(nn.Module):
    """CosPlace / EigenPlaces network: truncated torchvision backbone + GeM head, upstream module names."""

    def __init__(self, backbone: str = "ResNet50", fc_output_dim: int = 2048, gem_p: float = 3.0):
        super().__init__()
        import torchvision

        if backbone not in COSPLACE_FEATURES_DIM:
            raise ValueError(f"backbone must be one of {sorted(COSPLACE_FEATURES_DIM)}, got {backbone!r}")
        tv = getattr(torchvision.models, backbone.lower())(weights=None)
        if backbone.startswith("ResNet"):
            layers = list(tv.children())[:-2]  # drop avgpool and fc
        else:
            layers = list(tv.features.children())[:-2]  # drop the last ReLU and max-pool
        self.backbone = nn.Sequential(*layers)
        features_dim = COSPLACE_FEATURES_DIM[backbone]
        self.aggregation = nn.Sequential(
            TorchL2Norm(), TorchGeM(p=gem_p), TorchFlatten(), nn.Linear(features_dim, fc_output_dim), TorchL2Norm()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.aggregation(self.backbone(x))


def randomize_batchnorm_stats_(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """Gives every BatchNorm non-trivial running statistics and affine parameters, in place (seeded)."""
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            with torch.no_grad():
                m.running_mean.copy_(0.1 * torch.randn(c, generator=generator))
                m.running_var.copy_(0.5 + torch.rand(c, generator=generator))
                m.weight.copy_(0.5 + 0.5 * torch.rand(c, generator=generator))
                m.bias.copy_(0.1 * torch.randn(c, generator=generator))
    return module


# ---------------------------------------------------------------------------------------------------------------
# DINOv2
# ---------------------------------------------------------------------------------------------------------------


def upstream_interpolate_pos_encoding(
    pos_embed: torch.Tensor, h0: int, w0: int, offset: float = 0.1, antialias: bool = False
) -> torch.Tensor:
    """facebookresearch/dinov2's position-embedding resize for an ``h0 x w0`` patch grid.

    Upstream unpacks ``B, nc, w, h = x.shape`` (so its ``w`` is the image height) and passes
    ``scale_factor=((h0 + offset) / M, (w0 + offset) / M)`` (rows, columns) to bicubic ``interpolate``, or
    ``size=(h0, w0)`` when ``offset`` is 0. A square grid of the stored size is returned unchanged.

    Args:
        pos_embed: [1, 1 + M*M, C] (class token first).
        h0: patch rows.
        w0: patch columns.
        offset: upstream's ``interpolate_offset`` (0.1 for the original models, 0.0 for the register models).
        antialias: upstream's ``interpolate_antialias`` (True for the register models).

    Returns:
        [1, 1 + h0*w0, C].
    """
    n = pos_embed.shape[1] - 1
    m = int(math.sqrt(n))
    assert m * m == n, pos_embed.shape
    if h0 == w0 == m:
        return pos_embed
    dim = pos_embed.shape[-1]
    grid = pos_embed[:, 1:].float().reshape(1, m, m, dim).permute(0, 3, 1, 2)
    if offset:
        kwargs = {"scale_factor": ((h0 + offset) / m, (w0 + offset) / m)}
    else:
        kwargs = {"size": (h0, w0)}
    grid = F.interpolate(grid, mode="bicubic", antialias=antialias, **kwargs)
    assert tuple(grid.shape[-2:]) == (h0, w0), (grid.shape, h0, w0)
    grid = grid.permute(0, 2, 3, 1).reshape(1, h0 * w0, dim)
    return torch.cat([pos_embed[:, :1].float(), grid], dim=1).to(pos_embed.dtype)


def patch_upstream_interpolation(hf_model: nn.Module, offset: float = 0.1, antialias: bool = False) -> nn.Module:
    """Replaces a transformers DINOv2 model's position-embedding interpolation with upstream's, in place.

    Args:
        hf_model: a ``Dinov2Model`` or ``Dinov2WithRegistersModel``.
        offset: see :func:`upstream_interpolate_pos_encoding`.
        antialias: see :func:`upstream_interpolate_pos_encoding`.

    Returns:
        ``hf_model``.
    """
    embeddings = hf_model.embeddings
    patch = embeddings.patch_embeddings.patch_size
    patch_h, patch_w = (patch, patch) if isinstance(patch, int) else patch

    def interpolate(self, emb: torch.Tensor, height: int, width: int) -> torch.Tensor:
        del emb
        return upstream_interpolate_pos_encoding(
            self.position_embeddings, height // patch_h, width // patch_w, offset=offset, antialias=antialias
        )

    embeddings.interpolate_pos_encoding = types.MethodType(interpolate, embeddings)
    return hf_model


def make_hf_dinov2(
    embed_dim: int = 64,
    depth: int = 2,
    num_heads: int = 4,
    image_size: int = 56,
    patch_size: int = 14,
    num_register_tokens: int = 0,
    swiglu: bool = False,
    upstream_interpolation: bool = True,
) -> nn.Module:
    """Builds a transformers DINOv2 (eval mode) with upstream's interpolation semantics.

    Without registers the model gets upstream's original interpolation (offset 0.1, no antialias) through
    :func:`patch_upstream_interpolation`; with registers it keeps transformers' own, which already equals the
    upstream register models' (``size=``, antialias). The stored position grid is ``image_size // patch_size``.

    Returns:
        The model; its ``state_dict()`` has transformers' key names (see :func:`hf_dinov2_to_hub`).
    """
    import transformers

    common = dict(
        hidden_size=embed_dim,
        num_hidden_layers=depth,
        num_attention_heads=num_heads,
        image_size=image_size,
        patch_size=patch_size,
        use_swiglu_ffn=swiglu,
        layerscale_value=1.0,
        layer_norm_eps=1e-6,
        hidden_act="gelu",
    )
    if num_register_tokens:
        config = transformers.Dinov2WithRegistersConfig(num_register_tokens=num_register_tokens, **common)
        model = transformers.Dinov2WithRegistersModel(config)
    else:
        model = transformers.Dinov2Model(transformers.Dinov2Config(**common))
        if upstream_interpolation:
            patch_upstream_interpolation(model, offset=0.1, antialias=False)
    return model.eval()


def randomize_(module: nn.Module, generator: torch.Generator, scale: float = 1.0) -> nn.Module:
    """Overwrites every parameter of ``module`` with seeded random values, in place.

    Weights get ``N(0, 1/fan_in)`` (times ``scale``); 1-D parameters named like norm weights or layer scales get
    values around 1 or in (0.2, 1.2); biases and tokens get small Gaussian values, so that every parameter matters.
    """
    with torch.no_grad():
        for name, p in module.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if p.ndim >= 2 and leaf in ("weight",):
                fan_in = p[0].numel()
                p.copy_(scale * torch.randn(p.shape, generator=generator) / math.sqrt(fan_in))
            elif leaf in ("lambda1", "gamma"):
                p.copy_(0.2 + torch.rand(p.shape, generator=generator))
            elif "norm" in name and leaf == "weight":
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=generator))
            elif leaf in ("cls_token", "mask_token", "register_tokens", "position_embeddings"):
                p.copy_(0.5 * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=generator))
    return module


def hf_dinov2_to_hub(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Maps transformers' DINOv2 keys to facebookresearch/dinov2 torch.hub keys (what SALAD checkpoints hold).

    ``q_proj``/``k_proj``/``v_proj`` are concatenated into ``attn.qkv``; SwiGLU's ``gate_proj``/``up_proj`` into
    ``mlp.w12`` (gate first, as ``chunk(2)`` reads it) and ``down_proj`` becomes ``mlp.w3``.

    Args:
        state_dict: ``Dinov2Model`` / ``Dinov2WithRegistersModel`` state dict.

    Returns:
        The same tensors under hub names (``cls_token``, ``pos_embed``, ``patch_embed.proj.*``, ``blocks.N.*``,
        ``norm.*``, ``mask_token``, ``register_tokens``).
    """
    out: dict[str, torch.Tensor] = {}
    simple = {
        "embeddings.cls_token": "cls_token",
        "embeddings.mask_token": "mask_token",
        "embeddings.register_tokens": "register_tokens",
        "embeddings.position_embeddings": "pos_embed",
        "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
        "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
        "layernorm.weight": "norm.weight",
        "layernorm.bias": "norm.bias",
    }
    renames = {
        "norm1": "norm1",
        "norm2": "norm2",
        "attention.o_proj": "attn.proj",
        "layer_scale1.lambda1": "ls1.gamma",
        "layer_scale2.lambda1": "ls2.gamma",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
        "mlp.down_proj": "mlp.w3",
    }
    merged: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if key in simple:
            out[simple[key]] = value
            continue
        prefix = "encoder.layer."
        if not key.startswith(prefix):
            raise KeyError(f"unexpected transformers DINOv2 key {key!r}")
        index, rest = key[len(prefix) :].split(".", 1)
        block = f"blocks.{index}."
        module, leaf = rest.rsplit(".", 1)
        if rest in ("layer_scale1.lambda1", "layer_scale2.lambda1"):
            out[block + renames[rest]] = value
        elif module in renames:
            out[f"{block}{renames[module]}.{leaf}"] = value
        elif module in ("attention.q_proj", "attention.k_proj", "attention.v_proj"):
            merged.setdefault(f"{block}attn.qkv.{leaf}", {})[module[-6]] = value
        elif module in ("mlp.gate_proj", "mlp.up_proj"):
            merged.setdefault(f"{block}mlp.w12.{leaf}", {})[module] = value
        else:
            raise KeyError(f"unexpected transformers DINOv2 key {key!r}")
    for key, parts in merged.items():
        order = ("q", "k", "v") if ".qkv." in key else ("mlp.gate_proj", "mlp.up_proj")
        out[key] = torch.cat([parts[p] for p in order], dim=0)
    return out


# ---------------------------------------------------------------------------------------------------------------
# SALAD
# ---------------------------------------------------------------------------------------------------------------


def torch_log_sinkhorn(scores: torch.Tensor, dustbin: torch.Tensor, num_iters: int = 3, reg: float = 1.0):
    """Upstream SALAD's log-space Sinkhorn with a dust-bin row.

    Args:
        scores: [B, m, n].
        dustbin: scalar dust-bin score.
        num_iters: Sinkhorn iterations.
        reg: entropic regularization (the cost matrix is divided by it).

    Returns:
        [B, m + 1, n] log transport plan plus ``log(n + m)`` (so ``exp`` gives mass ~1 per token).
    """
    b, m, n = scores.shape
    aug = torch.cat([scores, dustbin.reshape(1, 1, 1).expand(b, 1, n).to(scores.dtype)], dim=1) / reg
    norm = -math.log(n + m)
    log_a = torch.full((b, m + 1), norm, dtype=scores.dtype)
    log_a[:, -1] = norm + math.log(n - m)
    log_b = torch.full((b, n), norm, dtype=scores.dtype)
    u = torch.zeros_like(log_a)
    v = torch.zeros_like(log_b)
    for _ in range(num_iters):
        u = log_a - torch.logsumexp(aug + v[:, None, :], dim=2)
        v = log_b - torch.logsumexp(aug + u[:, :, None], dim=1)
    return aug + u[:, :, None] + v[:, None, :] - norm


class TorchSaladHead(nn.Module):
    """SALAD aggregation (upstream module names) with docs/DESIGN.md's query-side attention path.

    ``forward(x, t, attention=None, alpha=0.0)``: ``x`` [B, C, h, w] patch tokens, ``t`` [B, C] class token,
    ``attention`` [B, h', w'] resized bilinearly (align_corners=False) to ``h x w``, ``alpha`` a float or [B].
    Returns the L2-normalized descriptor [B, token_dim + cluster_dim * num_clusters].
    """

    def __init__(
        self,
        num_channels: int = 768,
        num_clusters: int = 64,
        cluster_dim: int = 128,
        token_dim: int = 256,
        hidden_dim: int = 512,
    ):
        super().__init__()
        self.num_clusters = num_clusters
        self.cluster_dim = cluster_dim
        self.token_features = nn.Sequential(
            nn.Linear(num_channels, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, token_dim)
        )
        self.cluster_features = nn.Sequential(
            nn.Conv2d(num_channels, hidden_dim, 1), nn.Dropout(0.3), nn.ReLU(), nn.Conv2d(hidden_dim, cluster_dim, 1)
        )
        self.score = nn.Sequential(
            nn.Conv2d(num_channels, hidden_dim, 1), nn.Dropout(0.3), nn.ReLU(), nn.Conv2d(hidden_dim, num_clusters, 1)
        )
        self.dust_bin = nn.Parameter(torch.tensor(1.0))

    def forward(self, x, t, attention=None, alpha=0.0):
        _, _, h, w = x.shape
        f = self.cluster_features(x).flatten(2)  # [B, l, n]
        s = self.score(x).flatten(2)  # [B, m, n]
        g = self.token_features(t)
        p = torch.exp(torch_log_sinkhorn(s, self.dust_bin, 3))[:, :-1, :]  # [B, m, n]
        alpha = torch.as_tensor(alpha, dtype=x.dtype).reshape(-1)
        if attention is not None and bool((alpha > 1e-6).any()):
            a = F.interpolate(attention[:, None].to(x.dtype), size=(h, w), mode="bilinear", align_corners=False)
            a = a[:, 0].flatten(1).clamp(0.0, 2.0)  # [B, n]
            native = p.sum(dim=1)
            native = native / native.mean(dim=1, keepdim=True)
            weights = native + alpha[:, None] * (a - native)
            weights = torch.where(alpha[:, None] > 1e-6, weights, torch.ones_like(weights))
            f = f * weights[:, None, :]
        pooled = torch.einsum("bln,bmn->blm", f, p)
        desc = torch.cat([F.normalize(g, p=2, dim=-1), F.normalize(pooled, p=2, dim=1).flatten(1)], dim=-1)
        return F.normalize(desc, p=2, dim=-1)


class TorchDinoSalad(nn.Module):
    """DINOv2 (transformers, upstream interpolation) -> final norm -> SALAD, as serizba/salad's VPR model.

    Attributes:
        backbone: the transformers DINOv2 model (its ``layernorm`` is DINOv2's final norm).
        aggregator: :class:`TorchSaladHead`.
    """

    def __init__(self, backbone: nn.Module, aggregator: TorchSaladHead):
        super().__init__()
        self.backbone = backbone
        self.aggregator = aggregator
        patch = backbone.embeddings.patch_embeddings.patch_size
        self.patch_size = patch if isinstance(patch, int) else patch[0]
        self.num_register_tokens = getattr(backbone.config, "num_register_tokens", 0)

    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, 3, H, W] -> (cls [B, C], patches [B, C, H/p, W/p]) after the final norm."""
        b, _, h, w = images.shape
        tokens = self.backbone(pixel_values=images).last_hidden_state
        cls = tokens[:, 0]
        patches = tokens[:, 1 + self.num_register_tokens :]
        patches = patches.reshape(b, h // self.patch_size, w // self.patch_size, -1).permute(0, 3, 1, 2)
        return cls, patches

    def forward(self, images, attention=None, alpha=0.0):
        cls, patches = self.features(images)
        return self.aggregator(patches, cls, attention=attention, alpha=alpha)

    def upstream_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict under ``dino_salad.ckpt``'s keys: ``backbone.model.<hub key>`` and ``aggregator.*``."""
        out = {f"backbone.model.{k}": v for k, v in hf_dinov2_to_hub(self.backbone.state_dict()).items()}
        out.update({f"aggregator.{k}": v for k, v in self.aggregator.state_dict().items()})
        return out


# The released DINOv2 ViT-B/14 (a 37x37 stored position grid), shared by SALAD, MegaLoc and BoQ.
RELEASED_VITB14 = dict(embed_dim=768, depth=12, num_heads=12, image_size=518)
# The released dino_salad.ckpt architecture: ViT-B/14, m=64, l=128, g=256.
RELEASED_SALAD_ARCH = dict(**RELEASED_VITB14, num_clusters=64, cluster_dim=128, token_dim=256, hidden_dim=512)


def make_dino_salad_parts(
    embed_dim: int = 64,
    depth: int = 2,
    num_heads: int = 4,
    image_size: int = 56,
    num_register_tokens: int = 0,
    swiglu: bool = False,
    num_clusters: int = 8,
    cluster_dim: int = 16,
    token_dim: int = 32,
    hidden_dim: int = 48,
) -> tuple[nn.Module, TorchSaladHead]:
    """A transformers DINOv2 and a SALAD head (not yet randomized; small by default, for tests): the parts of the
    SALAD and MegaLoc references."""
    backbone = make_hf_dinov2(
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        image_size=image_size,
        num_register_tokens=num_register_tokens,
        swiglu=swiglu,
    )
    return backbone, TorchSaladHead(embed_dim, num_clusters, cluster_dim, token_dim, hidden_dim)


def make_torch_dino_salad(generator: torch.Generator, **arch) -> TorchDinoSalad:
    """A seeded random DINOv2 + SALAD reference model in eval mode (``arch``: :func:`make_dino_salad_parts`)."""
    backbone, head = make_dino_salad_parts(**arch)
    model = TorchDinoSalad(backbone, head)
    randomize_(model, generator)
    with torch.no_grad():
        model.aggregator.dust_bin.fill_(0.7)
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------
# Query-side LLM attention for CosPlace / EigenPlaces, the published VPR-AttLLM way (added by the eval helper)
# ---------------------------------------------------------------------------------------------------------------


def torch_grid_attention_map(grid: dict, height: int, width: int, interpolate: bool = False) -> torch.Tensor:
    """A grid answer ``{"A1": w, ...}`` as an ``[height, width]`` map (docs/DESIGN.md "Attention maps").

    Sharp cells span rows ``round(r * height / n)`` .. ``round((r + 1) * height / n)`` (Python's round, the last
    cell to the edge; unspecified cells 1.0, weights clamped to [0, 2]), or the n x n grid upsampled bilinearly
    (align_corners=False) with ``interpolate``; n comes from the labels.
    """
    cells = {}
    for label, weight in grid.items():
        row, col = ord(label[0].upper()) - ord("A"), int(label[1:]) - 1
        cells[(row, col)] = min(2.0, max(0.0, float(weight)))
    n = max(max(r, c) for r, c in cells) + 1
    small = torch.ones(n, n)
    for (r, c), weight in cells.items():
        small[r, c] = weight
    if interpolate:
        return F.interpolate(small[None, None], size=(height, width), mode="bilinear", align_corners=False)[0, 0]
    out = torch.ones(height, width)
    for (r, c), weight in cells.items():
        y0, x0 = round(r * height / n), round(c * width / n)
        y1 = height if r == n - 1 else round((r + 1) * height / n)
        x1 = width if c == n - 1 else round((c + 1) * width / n)
        out[y0:y1, x0:x1] = weight
    return out


def torch_modulated_gem(
    x: torch.Tensor, attention: torch.Tensor, alpha: float, p: torch.Tensor | float, eps: float = 1e-6
) -> torch.Tensor:
    """Attention-modulated GeM of L2-normalized features ``[B, C, h, w]`` with the native blend -> ``[B, C]``.

    ``native = c / (mean(c) + eps)`` with ``c = max(sum_C(max(x, eps)^p) / (hw + eps), eps)^(1/p)``;
    ``w = native + alpha * (A - native)``; ``y = (sum(w * x^p) / (sum(w) + eps))^(1/p)``; the attention map is
    resized bilinearly (align_corners=False) to the feature grid.
    """
    b, _, h, w = x.shape
    att = attention.expand(b, -1, -1) if attention.dim() == 2 else attention
    if att.shape[-2:] != (h, w):
        att = F.interpolate(att[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]
    xp = x.clamp(min=eps).pow(p)
    contribution = (xp.sum(dim=1) / (h * w + eps)).clamp(min=eps).pow(1.0 / p)
    native = contribution / (contribution.mean(dim=(-2, -1), keepdim=True) + eps)
    weights = native + alpha * (att - native)
    pooled = (weights[:, None] * xp).sum(dim=(-2, -1)) / (weights.sum(dim=(-2, -1))[:, None] + eps)
    return pooled.pow(1.0 / p)


def torch_cosplace_with_attention(
    model: TorchCosPlace, images: torch.Tensor, attention: torch.Tensor | None, alpha: float
) -> torch.Tensor:
    """A :class:`TorchCosPlace` forward with the attention-modulated GeM (plain forward when alpha <= 1e-6)."""
    if attention is None or alpha <= 1e-6:
        return model(images)
    l2norm, gem, flatten, linear, l2norm_out = model.aggregation
    feats = l2norm(model.backbone(images))
    return l2norm_out(linear(torch_modulated_gem(feats, attention, alpha, gem.p, gem.eps)))
