"""A PyTorch MixVPR for the parity tests and the benchmark (never imported by the library).

Written from amaralibey/MixVPR ``models/aggregators/mixvpr.py`` and VPR-methods-evaluation ``vpr_models/mixvpr.py``
(``MixVPRModel``), not copied: torchvision's ResNet-50 with ``layer4``, ``avgpool`` and ``fc`` replaced by
``Identity`` under ``backbone.model``; the forward resizes its input with ``transforms.Resize([S, S],
antialias=True)``; the aggregator flattens ``[B, C, H, W]`` to ``[B, C, H*W]``, runs the Feature-Mixer layers
(``Sequential(LayerNorm, Linear, ReLU, Linear)`` plus the residual), ``channel_proj`` over channels, ``row_proj``
over positions, flattens and L2-normalizes. The state dict has the release's keys (``backbone.model.*``,
``aggregator.*``).

The query-side attention of :mod:`attllm_jax.models.mixvpr` enters as per-location weights ``[B, H, W]`` that
multiply the backbone map before the aggregator (``forward(images, location_weights)``); the tests compute them
with a NumPy transcription of the formula.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.torch_baselines import randomize_, randomize_batchnorm_stats_


class TorchFeatureMixer(nn.Module):
    def __init__(self, positions: int, mlp_ratio: int):
        super().__init__()
        hidden = int(positions * mlp_ratio)
        self.mix = nn.Sequential(
            nn.LayerNorm(positions), nn.Linear(positions, hidden), nn.ReLU(), nn.Linear(hidden, positions)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mix(x)


class TorchMixVPRHead(nn.Module):
    def __init__(self, in_channels: int, grid: int, out_channels: int, mix_depth: int, mlp_ratio: int, out_rows: int):
        super().__init__()
        positions = grid * grid
        self.mix = nn.Sequential(*[TorchFeatureMixer(positions, mlp_ratio) for _ in range(mix_depth)])
        self.channel_proj = nn.Linear(in_channels, out_channels)
        self.row_proj = nn.Linear(positions, out_rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mix(x.flatten(2))  # [B, C, H*W]
        x = self.channel_proj(x.permute(0, 2, 1)).permute(0, 2, 1)  # [B, out_channels, H*W]
        x = self.row_proj(x)  # [B, out_channels, out_rows]
        return F.normalize(x.flatten(1), p=2, dim=-1)


class TorchResNetLayer3(nn.Module):
    """torchvision's ResNet (Bottleneck) with layer4, avgpool and fc replaced by Identity, as ``backbone.model``."""

    def __init__(self, layers: tuple[int, int, int]):
        super().__init__()
        from torchvision.models.resnet import Bottleneck, ResNet

        self.model = ResNet(Bottleneck, [*layers, 1])
        self.model.layer4 = nn.Identity()
        self.model.avgpool = nn.Identity()
        self.model.fc = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        return m.layer3(m.layer2(m.layer1(x)))


class TorchMixVPR(nn.Module):
    """``Resize([S, S], antialias=True)`` -> ResNet to layer3 -> MixVPR head."""

    def __init__(self, layers=(3, 4, 6), image_size=320, out_channels=1024, mix_depth=4, mlp_ratio=1, out_rows=4):
        super().__init__()
        self.image_size = image_size
        self.backbone = TorchResNetLayer3(layers)
        self.aggregator = TorchMixVPRHead(1024, -(-image_size // 16), out_channels, mix_depth, mlp_ratio, out_rows)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        from torchvision import transforms

        return self.backbone(transforms.Resize([self.image_size, self.image_size], antialias=True)(images))

    def forward(self, images: torch.Tensor, location_weights: torch.Tensor | None = None) -> torch.Tensor:
        x = self.features(images)
        if location_weights is not None:
            x = x * location_weights[:, None]
        return self.aggregator(x)


def make_torch_mixvpr(generator: torch.Generator, **arch) -> TorchMixVPR:
    """A seeded random MixVPR in eval mode: every parameter random, non-trivial BatchNorm statistics, LayerNorm
    weights around 1."""
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
    model = TorchMixVPR(**arch)
    randomize_(model, generator)
    randomize_batchnorm_stats_(model, generator)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(1.0 + 0.2 * torch.randn(m.weight.shape, generator=generator))
    return model.eval()
