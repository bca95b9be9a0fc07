"""A PyTorch SuperVLAD reference for the parity tests (test-only; never imported by the library).

Written from Lu-Feng/SuperVLAD ``model/network.py`` / ``model/supervlad_layer.py`` and VPR-methods-evaluation's
``vpr_models/supervlad.py`` (not copied): transformers' DINOv2 with upstream's position-embedding interpolation and
its final norm (the ``x_norm_patchtokens`` upstream aggregates), then the SuperVLAD layer: channel L2, a bias-free
1x1 ``Conv2d`` to ``K + G`` logits, softmax over the clusters, per-cluster sums of the tokens, the ghost clusters
dropped, intra-L2, flatten, L2, and the model's final L2. The attention path scales each location's contribution
by ``w_i = 1 + alpha (A_i - 1)`` (``A`` clamped to [0, 2], resized with ``F.interpolate`` bilinear).

``upstream_state_dict()`` has the release's keys (``module.backbone.<hub key>`` with ``mask_token``,
``module.aggregation.conv.weight``); ``torch.save({"model_state_dict": ...})`` writes the release layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.torch_baselines import hf_dinov2_to_hub, make_hf_dinov2, randomize_

ALPHA_OFF = 1e-6


class TorchSuperVLADLayer(nn.Module):
    """``forward(x [B, C, h, w], attention [B, h', w'] | None, alpha)`` -> [B, K * C]."""

    def __init__(self, dim: int, clusters: int, ghost: int):
        super().__init__()
        self.clusters, self.ghost = clusters, ghost
        self.conv = nn.Conv2d(dim, clusters + ghost, kernel_size=(1, 1), bias=False)

    def forward(self, x, attention=None, alpha=0.0):
        b, c, h, w = x.shape
        x = F.normalize(x, p=2, dim=1)
        flat = x.view(b, c, -1)  # [B, C, N]
        assign = F.softmax(self.conv(x).view(b, self.clusters + self.ghost, -1), dim=1)  # [B, K+G, N]
        if attention is not None:
            a = F.interpolate(attention[:, None], size=(h, w), mode="bilinear", align_corners=False).view(b, -1)
            alpha = torch.as_tensor(alpha, dtype=x.dtype).expand(b)
            weight = 1.0 + alpha[:, None] * (a.clamp(0.0, 2.0) - 1.0)
            weight = torch.where((alpha <= ALPHA_OFF)[:, None], torch.ones_like(weight), weight)
            assign = assign * weight[:, None, :]
        vlad = torch.zeros(b, self.clusters + self.ghost, c, dtype=x.dtype)
        for k in range(self.clusters + self.ghost):
            vlad[:, k] = (flat * assign[:, k : k + 1]).sum(dim=-1)
        vlad = F.normalize(vlad[:, : -self.ghost], p=2, dim=2).reshape(b, -1)
        return F.normalize(vlad, p=2, dim=1)


class TorchSuperVLAD(nn.Module):
    """transformers DINOv2 (final norm) -> SuperVLAD layer -> L2."""

    def __init__(self, backbone: nn.Module, aggregation: TorchSuperVLADLayer):
        super().__init__()
        self.backbone = backbone
        self.aggregation = aggregation

    def patches(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> patch tokens after the final norm [B, C, H/14, W/14]."""
        b, _, h, w = images.shape
        tokens = self.backbone(pixel_values=images).last_hidden_state[:, 1:]
        return tokens.reshape(b, h // 14, w // 14, -1).permute(0, 3, 1, 2)

    def forward(self, images, attention=None, alpha=0.0):
        return F.normalize(self.aggregation(self.patches(images), attention, alpha), p=2, dim=-1)

    def upstream_state_dict(self) -> dict[str, torch.Tensor]:
        out = {f"module.backbone.{k}": v for k, v in hf_dinov2_to_hub(self.backbone.state_dict()).items()}
        out["module.aggregation.conv.weight"] = self.aggregation.conv.weight
        return out


def make_torch_supervlad(
    generator: torch.Generator,
    embed_dim: int = 64,
    depth: int = 2,
    num_heads: int = 4,
    image_size: int = 56,
    clusters: int = 4,
    ghost: int = 1,
) -> TorchSuperVLAD:
    """A seeded random reference in eval mode (small by default; ViT-B/14 with ``embed_dim=768, depth=12,
    num_heads=12, image_size=518``)."""
    backbone = make_hf_dinov2(embed_dim=embed_dim, depth=depth, num_heads=num_heads, image_size=image_size)
    model = TorchSuperVLAD(backbone, TorchSuperVLADLayer(embed_dim, clusters, ghost))
    randomize_(model, generator)
    return model.eval()
