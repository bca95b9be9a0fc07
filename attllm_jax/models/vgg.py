"""torchvision VGG-16 ``features`` in Flax NNX, NHWC, truncated as CosPlace does.

CosPlace keeps ``list(vgg16.features.children())[:-2]``: the last ReLU and the last max-pool are dropped, so
the output is the final 3x3 convolution before its ReLU (stride 16). Convolutions live in ``features`` under the
same indices as in ``torchvision.models.vgg16().features`` ("0", "2", "5", ...), so checkpoint keys map 1:1.
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


@dataclasses.dataclass(frozen=True)
class VGGConfig:
    """A VGG variant: ``cfg`` lists conv widths and "M" for 2x2 max-pools, as torchvision's."""

    name: str = "vgg16"
    cfg: tuple = VGG16_CFG

    @property
    def out_channels(self) -> int:
        return [c for c in self.cfg if c != "M"][-1]


def vgg_layer_plan(cfg: tuple) -> list[tuple[int, str, int]]:
    """torchvision's ``features`` indices after CosPlace's truncation.

    Returns:
        ``[(index, kind, channels)]`` with kind ``"conv"``, ``"relu"`` or ``"pool"``, the last two torchvision
        modules (final ReLU and max-pool) removed.
    """
    plan = []
    for c in cfg:
        if c == "M":
            plan.append((len(plan), "pool", 0))
        else:
            plan.append((len(plan), "conv", c))
            plan.append((len(plan), "relu", 0))
    return plan[:-2]


def _max_pool_2x2(x: jax.Array) -> jax.Array:
    return jax.lax.reduce_window(x, -jax.numpy.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


class VGG(nnx.Module):
    """VGG ``features`` truncated as CosPlace: ``[B, H, W, 3]`` -> ``[B, H/16, W/16, 512]`` (floored)."""

    def __init__(self, config: VGGConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.plan = tuple(vgg_layer_plan(config.cfg))
        convs = {}
        in_ch = 3
        for index, kind, ch in self.plan:
            if kind == "conv":
                convs[str(index)] = nnx.Conv(in_ch, ch, (3, 3), padding=((1, 1), (1, 1)), rngs=rngs)
                in_ch = ch
        self.features = nnx.Dict(convs)

    @property
    def out_channels(self) -> int:
        return self.config.out_channels

    def stages(self, x: jax.Array) -> dict[str, jax.Array]:
        """The output after each max-pool (``"pool1"``..``"pool4"``) and the final one (``"features"``)."""
        out = {}
        for index, kind, _ in self.plan:
            if kind == "conv":
                x = self.features[str(index)](x)
            elif kind == "relu":
                x = jax.nn.relu(x)
            else:
                x = _max_pool_2x2(x)
                out[f"pool{len(out) + 1}"] = x
        out["features"] = x
        return out

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[B, H, W, 3]`` -> last conv output before its ReLU ``[B, h, w, 512]``."""
        return self.stages(x)["features"]
