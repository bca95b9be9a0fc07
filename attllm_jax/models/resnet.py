"""torchvision ResNet-18/50/101/152 in Flax NNX, NHWC, truncated after ``layer4`` as CosPlace uses it.

Attribute names mirror torchvision (``conv1``, ``bn1``, ``layer1[0].conv2``, ``downsample[0]`` ...), so a
checkpoint converts by renames plus kernel transposes. Semantics follow torchvision exactly: the stride of a
Bottleneck sits on its 3x3 convolution (ResNet v1.5), BatchNorm uses eps 1e-5 and its running statistics
(inference mode), and the stem's 3x3/2 max-pool pads with -inf by 1.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

BN_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
    """A torchvision ResNet variant.

    Attributes:
        name: torchvision name, e.g. ``"resnet50"``.
        block: ``"basic"`` (ResNet-18) or ``"bottleneck"`` (ResNet-50/101/152).
        layers: number of blocks in ``layer1``..``layer4``.
        width: channels of the stem (64 in torchvision); smaller widths keep tests fast.
    """

    name: str
    block: str
    layers: tuple[int, int, int, int]
    width: int = 64

    @property
    def expansion(self) -> int:
        return 4 if self.block == "bottleneck" else 1

    @property
    def out_channels(self) -> int:
        """Channels of the ``layer4`` output (512 for ResNet-18, 2048 for ResNet-50 at width 64)."""
        return self.width * 8 * self.expansion


RESNET_CONFIGS = {
    "resnet18": ResNetConfig("resnet18", "basic", (2, 2, 2, 2)),
    "resnet50": ResNetConfig("resnet50", "bottleneck", (3, 4, 6, 3)),
    "resnet101": ResNetConfig("resnet101", "bottleneck", (3, 4, 23, 3)),
    "resnet152": ResNetConfig("resnet152", "bottleneck", (3, 8, 36, 3)),
}


def resnet_config(name: str) -> ResNetConfig:
    """Returns the preset for a torchvision ResNet name (case-insensitive, e.g. ``"ResNet50"``)."""
    key = name.lower()
    if key not in RESNET_CONFIGS:
        raise ValueError(f"unknown ResNet {name!r}; valid: {', '.join(RESNET_CONFIGS)}")
    return RESNET_CONFIGS[key]


def _conv(in_ch: int, out_ch: int, kernel: int, stride: int, rngs: nnx.Rngs) -> nnx.Conv:
    pad = kernel // 2  # torchvision pads symmetrically; "SAME" would pad (0, 1) at stride 2
    return nnx.Conv(
        in_ch, out_ch, (kernel, kernel), (stride, stride), padding=((pad, pad), (pad, pad)), use_bias=False, rngs=rngs
    )


def _bn(ch: int, rngs: nnx.Rngs) -> nnx.BatchNorm:
    return nnx.BatchNorm(ch, use_running_average=True, epsilon=BN_EPS, rngs=rngs)


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    """torch ``MaxPool2d(3, stride=2, padding=1)`` on ``[B, H, W, C]`` (pads with -inf)."""
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), ((0, 0), (1, 1), (1, 1), (0, 0)))


class BasicBlock(nnx.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18)."""

    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int, *, rngs: nnx.Rngs):
        self.conv1 = _conv(in_ch, planes, 3, stride, rngs)
        self.bn1 = _bn(planes, rngs)
        self.conv2 = _conv(planes, planes, 3, 1, rngs)
        self.bn2 = _bn(planes, rngs)
        self.downsample = _downsample(in_ch, planes, stride, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        identity = x if self.downsample is None else self.downsample[1](self.downsample[0](x))
        y = jax.nn.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return jax.nn.relu(y + identity)


class Bottleneck(nnx.Module):
    """1x1 -> 3x3 (strided) -> 1x1 convolutions with a residual connection (ResNet-50/101/152)."""

    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int, *, rngs: nnx.Rngs):
        self.conv1 = _conv(in_ch, planes, 1, 1, rngs)
        self.bn1 = _bn(planes, rngs)
        self.conv2 = _conv(planes, planes, 3, stride, rngs)
        self.bn2 = _bn(planes, rngs)
        self.conv3 = _conv(planes, planes * 4, 1, 1, rngs)
        self.bn3 = _bn(planes * 4, rngs)
        self.downsample = _downsample(in_ch, planes * 4, stride, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        identity = x if self.downsample is None else self.downsample[1](self.downsample[0](x))
        y = jax.nn.relu(self.bn1(self.conv1(x)))
        y = jax.nn.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return jax.nn.relu(y + identity)


def _downsample(in_ch: int, out_ch: int, stride: int, rngs: nnx.Rngs) -> nnx.List | None:
    if stride == 1 and in_ch == out_ch:
        return None
    return nnx.List([_conv(in_ch, out_ch, 1, stride, rngs), _bn(out_ch, rngs)])


class ResNet(nnx.Module):
    """A torchvision ResNet up to and including ``layer4`` (no average pool, no fc).

    Input ``[B, H, W, 3]`` ImageNet-normalized, output ``[B, ceil(H/32), ceil(W/32), out_channels]``.
    """

    def __init__(self, config: ResNetConfig, *, rngs: nnx.Rngs):
        self.config = config
        block = Bottleneck if config.block == "bottleneck" else BasicBlock
        w = config.width
        self.conv1 = nnx.Conv(3, w, (7, 7), (2, 2), padding=((3, 3), (3, 3)), use_bias=False, rngs=rngs)
        self.bn1 = _bn(w, rngs)
        in_ch = w
        for i, depth in enumerate(config.layers):
            planes = w * 2**i
            blocks = []
            for j in range(depth):
                blocks.append(block(in_ch, planes, 2 if (i > 0 and j == 0) else 1, rngs=rngs))
                in_ch = planes * block.expansion
            setattr(self, f"layer{i + 1}", nnx.List(blocks))

    @property
    def out_channels(self) -> int:
        return self.config.out_channels

    def stem(self, x: jax.Array) -> jax.Array:
        """conv1 -> bn1 -> relu -> maxpool: ``[B, H, W, 3]`` -> ``[B, H/4, W/4, width]``."""
        return max_pool_3x3_s2(jax.nn.relu(self.bn1(self.conv1(x))))

    def stages(self, x: jax.Array) -> dict[str, jax.Array]:
        """Every intermediate output: ``{"stem", "layer1", ..., "layer4"}``, each ``[B, h, w, C]``."""
        out = {"stem": self.stem(x)}
        y = out["stem"]
        for name in ("layer1", "layer2", "layer3", "layer4"):
            for blk in getattr(self, name):
                y = blk(y)
            out[name] = y
        return out

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[B, H, W, 3]`` -> ``layer4`` features ``[B, h, w, out_channels]``."""
        return self.stages(x)["layer4"]
