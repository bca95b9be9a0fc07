"""PyTorch references for MegaLoc and BoQ, shared by the parity tests and the benchmark (never imported by the library).

Written from the upstream code at HEAD (gmberton/MegaLoc ``megaloc_model.py``, amaralibey/Bag-of-Queries
``src/boq.py`` and ``src/backbones.py``), not copied from it:

- MegaLoc: the input resize of its forward (torchvision's antialiased ``resize`` to the nearest multiples of 14),
  transformers' DINOv2 with upstream's position-embedding interpolation and its final norm, the SALAD head of
  :mod:`benchmarks.torch_baselines` (64 clusters of 256 channels upstream), ``aggregator.linear`` and an L2 norm;
  ``upstream_state_dict()`` has ``model.safetensors``' keys (``backbone.*`` without ``mask_token``,
  ``aggregator.agg.*``, ``aggregator.linear.*``) or, with ``legacy=True``, ``megaloc.torch``'s
  (``backbone.model.*`` with ``mask_token``).
- BoQ: transformers' DINOv2 without its final norm (the last block's output) or torchvision's ResNet-50 cut after
  ``layer3`` under upstream's ``backbone.net.{0..6}`` names, then the BoQ head built from torch's own
  ``nn.TransformerEncoderLayer`` and ``nn.MultiheadAttention``. The query-side attention path of
  :mod:`attllm_jax.models.boq` is written with torch's ``MultiheadAttention`` too: the log token weights go in as
  its additive float ``attn_mask``.

Import :mod:`benchmarks.torch_env` and call ``declare_missing_torchvision_ops()`` before importing this module in a
standalone script (pytest's conftest does it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.torch_baselines import (
    RELEASED_SALAD_ARCH,
    RELEASED_VITB14,
    TorchSaladHead,
    hf_dinov2_to_hub,
    make_dino_salad_parts,
    make_hf_dinov2,
    randomize_,
)

ALPHA_OFF = 1e-6
TOKEN_WEIGHT_EPS = 1e-6

# ---------------------------------------------------------------------------------------------------------------
# MegaLoc
# ---------------------------------------------------------------------------------------------------------------


def megaloc_resize(images: torch.Tensor, patch: int = 14) -> torch.Tensor:
    """MegaLoc's forward resize: sides not multiples of ``patch`` -> nearest multiples (antialiased bilinear)."""
    import torchvision.transforms.functional as tfm

    _, _, h, w = images.shape
    if h % patch == 0 and w % patch == 0:
        return images
    return tfm.resize(images, [round(h / patch) * patch, round(w / patch) * patch], antialias=True)


class TorchMegaLoc(nn.Module):
    """DINOv2 (final norm) -> SALAD head -> ``aggregator.linear`` -> L2 norm, with MegaLoc's input resize.

    ``forward(images, attention=None, alpha=0.0)``; ``attention`` [B, h', w'] goes to the SALAD head's
    query-side path (see :class:`benchmarks.torch_baselines.TorchSaladHead`).
    """

    def __init__(self, backbone: nn.Module, agg: TorchSaladHead, descriptor_dim: int):
        super().__init__()
        self.backbone = backbone
        self.agg = agg
        self.linear = nn.Linear(agg.cluster_dim * agg.num_clusters + agg.token_features[2].out_features, descriptor_dim)
        self.patch_size = 14

    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, 3, H, W] -> (cls [B, C], patches [B, C, h, w]) of the resized images."""
        images = megaloc_resize(images, self.patch_size)
        b, _, h, w = images.shape
        tokens = self.backbone(pixel_values=images).last_hidden_state
        patches = tokens[:, 1:].reshape(b, h // self.patch_size, w // self.patch_size, -1).permute(0, 3, 1, 2)
        return tokens[:, 0], patches

    def salad(self, images, attention=None, alpha=0.0) -> torch.Tensor:
        """The L2-normalized SALAD part (the input of ``aggregator.linear``)."""
        cls, patches = self.features(images)
        return self.agg(patches, cls, attention=attention, alpha=alpha)

    def forward(self, images, attention=None, alpha=0.0) -> torch.Tensor:
        return F.normalize(self.linear(self.salad(images, attention, alpha)), p=2, dim=-1)

    def upstream_state_dict(self, legacy: bool = False) -> dict[str, torch.Tensor]:
        """``model.safetensors``' keys, or with ``legacy`` the earlier ``megaloc.torch`` release's."""
        hub = hf_dinov2_to_hub(self.backbone.state_dict())
        if legacy:
            out = {f"backbone.model.{k}": v for k, v in hub.items()}
        else:
            out = {f"backbone.{k}": v for k, v in hub.items() if k != "mask_token"}
        out.update({f"aggregator.agg.{k}": v for k, v in self.agg.state_dict().items()})
        out.update({f"aggregator.linear.{k}": v for k, v in self.linear.state_dict().items()})
        return out


# The released model.safetensors architecture: SALAD's ViT-B/14 and sizes with 256-channel clusters, then 8448.
RELEASED_MEGALOC_ARCH = dict(RELEASED_SALAD_ARCH, cluster_dim=256, descriptor_dim=8448)


def make_torch_megaloc(generator: torch.Generator, descriptor_dim: int = 40, **arch) -> TorchMegaLoc:
    """A seeded random MegaLoc reference in eval mode (``arch``: :func:`~benchmarks.torch_baselines.
    make_dino_salad_parts`; small by default, for tests)."""
    backbone, agg = make_dino_salad_parts(**arch)
    model = TorchMegaLoc(backbone, agg, descriptor_dim)
    randomize_(model, generator)
    with torch.no_grad():
        model.agg.dust_bin.fill_(0.7)
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------
# BoQ
# ---------------------------------------------------------------------------------------------------------------


class TorchBoQBlock(nn.Module):
    """Upstream's ``BoQBlock`` with torch's own layers, plus the query-side attention path."""

    def __init__(self, dim: int, num_queries: int, num_heads: int):
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(
            d_model=dim, nhead=num_heads, dim_feedforward=4 * dim, batch_first=True, dropout=0.0
        )
        self.queries = nn.Parameter(torch.randn(1, num_queries, dim))
        self.self_attn = nn.MultiheadAttention(dim, num_heads=num_heads, batch_first=True)
        self.norm_q = nn.LayerNorm(dim)
        self.cross_attn = nn.MultiheadAttention(dim, num_heads=num_heads, batch_first=True)
        self.norm_out = nn.LayerNorm(dim)

    def forward(self, x, attention=None, alpha=None):
        """Returns ``(x', out, weights)``; ``attention`` [B, N] on the token grid, ``alpha`` [B]."""
        b = x.size(0)
        x = self.encoder(x)
        q = self.queries.repeat(b, 1, 1)
        q = self.norm_q(q + self.self_attn(q, q, q)[0])
        out, attn = self.cross_attn(q, x, x)
        if attention is not None and bool((alpha > ALPHA_OFF).any()):
            heads = self.cross_attn.num_heads
            _, per_head = self.cross_attn(q, x, x, average_attn_weights=False)  # [B, H, Q, N]
            mass = per_head.mean(dim=(1, 2))
            nu = mass / mass.mean(dim=1, keepdim=True)
            w = nu + alpha[:, None] * (attention.clamp(0.0, 2.0) - nu)
            log_w = torch.log(w.clamp(min=TOKEN_WEIGHT_EPS))  # [B, N]
            mask = log_w[:, None, None, :].expand(b, heads, q.shape[1], -1).reshape(b * heads, q.shape[1], -1)
            mod_out, mod_attn = self.cross_attn(q, x, x, attn_mask=mask)
            on = (alpha > ALPHA_OFF)[:, None, None]
            out = torch.where(on, mod_out, out)
            attn = torch.where(on, mod_attn, attn)
        return x, self.norm_out(out), attn


class TorchBoQHead(nn.Module):
    """Upstream's ``BoQ`` aggregator; ``forward(x [B, C, h, w], attention [B, h', w'], alpha)`` -> (desc, attns)."""

    def __init__(self, in_channels: int, proj_channels: int, num_queries: int, num_layers: int, row_dim: int):
        super().__init__()
        self.proj_c = nn.Conv2d(in_channels, proj_channels, kernel_size=3, padding=1)
        self.norm_input = nn.LayerNorm(proj_channels)
        self.boqs = nn.ModuleList(
            [TorchBoQBlock(proj_channels, num_queries, proj_channels // 64) for _ in range(num_layers)]
        )
        self.fc = nn.Linear(num_layers * num_queries, row_dim)

    def tokens(self, x):
        return self.norm_input(self.proj_c(x).flatten(2).permute(0, 2, 1))

    def forward(self, x, attention=None, alpha=0.0):
        b, _, h, w = x.shape
        x = self.tokens(x)
        alpha = torch.as_tensor(alpha, dtype=x.dtype).reshape(-1).expand(b)
        if attention is not None:
            attention = F.interpolate(attention[:, None].to(x.dtype), size=(h, w), mode="bilinear", align_corners=False)
            attention = attention[:, 0].flatten(1)
        outs, attns = [], []
        for block in self.boqs:
            x, out, attn = block(x, attention, alpha)
            outs.append(out)
            attns.append(attn)
        out = self.fc(torch.cat(outs, dim=1).permute(0, 2, 1)).flatten(1)
        return F.normalize(out, p=2, dim=-1), attns


class TorchResNet50Layer3(nn.Module):
    """torchvision ResNet-50 up to ``layer3`` as upstream's ``backbone.net`` (``nn.Sequential`` indices 0..6)."""

    def __init__(self, layers: tuple[int, int, int] = (3, 4, 6)):
        super().__init__()
        from torchvision.models.resnet import Bottleneck, ResNet

        tv = ResNet(Bottleneck, [*layers, 1])
        self.net = nn.Sequential(tv.conv1, tv.bn1, tv.relu, tv.maxpool, tv.layer1, tv.layer2, tv.layer3)

    def forward(self, images):
        return self.net(images)


class TorchDinoNoNorm(nn.Module):
    """transformers' DINOv2 (upstream interpolation); patch tokens of the last block, final norm NOT applied."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.dino = hf_model

    def forward(self, images):
        b, _, h, w = images.shape
        hidden = self.dino(pixel_values=images, output_hidden_states=True).hidden_states[-1]
        return hidden[:, 1:].reshape(b, h // 14, w // 14, -1).permute(0, 3, 1, 2)


class TorchBoQ(nn.Module):
    """Backbone + BoQ head; ``forward`` returns the descriptor (``head(...)[0]``)."""

    def __init__(self, backbone: nn.Module, aggregator: TorchBoQHead):
        super().__init__()
        self.backbone = backbone
        self.aggregator = aggregator

    def forward(self, images, attention=None, alpha=0.0):
        return self.aggregator(self.backbone(images), attention, alpha)[0]

    def upstream_state_dict(self) -> dict[str, torch.Tensor]:
        """The released checkpoints' keys: ``backbone.dino.<hub key>`` or ``backbone.net.*``, ``aggregator.*``."""
        if isinstance(self.backbone, TorchDinoNoNorm):
            out = {f"backbone.dino.{k}": v for k, v in hf_dinov2_to_hub(self.backbone.dino.state_dict()).items()}
        else:
            out = {f"backbone.{k}": v for k, v in self.backbone.state_dict().items()}
        out.update({f"aggregator.{k}": v for k, v in self.aggregator.state_dict().items()})
        return out


def _randomize_batchnorm(module: nn.Module, generator: torch.Generator) -> None:
    from benchmarks.torch_baselines import randomize_batchnorm_stats_

    randomize_batchnorm_stats_(module, generator)


def make_torch_boq(
    generator: torch.Generator,
    backbone: str = "dinov2",
    embed_dim: int = 64,
    depth: int = 2,
    num_heads: int = 4,
    image_size: int = 56,
    resnet_layers: tuple[int, int, int] = (1, 1, 1),
    proj_channels: int = 128,
    num_queries: int = 8,
    num_layers: int = 2,
    row_dim: int = 4,
) -> TorchBoQ:
    """A seeded random BoQ reference in eval mode (small by default: 2 heads of 64 channels, 8 queries)."""
    if backbone == "dinov2":
        net = TorchDinoNoNorm(
            make_hf_dinov2(embed_dim=embed_dim, depth=depth, num_heads=num_heads, image_size=image_size)
        )
        in_channels = embed_dim
    else:
        net = TorchResNet50Layer3(resnet_layers)
        in_channels = 1024
    model = TorchBoQ(net, TorchBoQHead(in_channels, proj_channels, num_queries, num_layers, row_dim))
    randomize_(model, generator)
    _randomize_batchnorm(model, generator)
    return model.eval()


RELEASED_BOQ_ARCH = {
    "dinov2": dict(backbone="dinov2", **RELEASED_VITB14, proj_channels=384),
    "resnet50": dict(backbone="resnet50", resnet_layers=(3, 4, 6), proj_channels=512),
}
for _arch in RELEASED_BOQ_ARCH.values():
    _arch.update(num_queries=64, num_layers=2, row_dim=32)
