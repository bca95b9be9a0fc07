"""MixVPR (Ali-bey et al., WACV 2023; amaralibey/MixVPR ``models/aggregators/mixvpr.py``) in Flax NNX.

Backbone: torchvision ResNet-50 cut after ``layer3`` (upstream sets ``layer4``, ``avgpool`` and ``fc`` to
``Identity``), stride 16, ``[B, 20, 20, 1024]`` at the released 320 x 320 input. As VPR-methods-evaluation's
``MixVPRModel.forward``, the network first resizes its (ImageNet-normalized) input to ``image_size x image_size``
with torch's antialiased bilinear resize (:func:`attllm_jax.ops.resize.antialiased_bilinear_resize`); an input of
that size already is used as it is.

Aggregator (upstream ``MixVPR.forward``), with the map flattened row-major over the ``N = h * w`` positions
(position ``n = y * w + x``) and ``X`` the ``[C, N]`` matrix:

- ``mix_depth`` Feature-Mixer layers over the spatial axis: ``X = X + W2 relu(W1 LayerNorm_N(X) + b1) + b2`` with
  ``LayerNorm`` over the ``N`` positions of each channel (eps 1e-5, torch's default, not Flax's 1e-6);
- ``channel_proj`` (``C -> out_channels``) over the channels, then ``row_proj`` (``N -> out_rows``) over the
  positions: ``Y [out_channels, out_rows]``;
- flatten channel-major (element ``c * out_rows + r``) and L2 norm: ``out_channels * out_rows`` (4096 released).

Attention (our extension, the issue's rule): the per-location features are scaled before the mixer. With
``n_i = ||x_i||`` the location's feature norm, the native weight is ``nu_i = n_i / mean_i(n_i)`` (mean 1), the
blended weight ``w_i = nu_i + alpha (A_i - nu_i)`` with ``A`` the attention map resized to the grid and clamped to
``[0, 2]``, and ``x_i`` becomes ``w_i x_i``. ``alpha <= 1e-6`` is plain MixVPR (unscaled features), so the blend is
discontinuous at 0 as CosPlace's native blend is. The backbone pass does not depend on alpha; a sweep repeats only
the aggregator.

Attribute names mirror the checkpoint: ``backbone.*`` are torchvision's ResNet names (``backbone.model.*`` in the
file), ``aggregator.{mix.N.{norm, fc1, fc2}, channel_proj, row_proj}`` (``mix.N.mix.{0, 1, 3}`` in the file).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from attllm_jax import ops
from attllm_jax.data.preprocess import PreprocessSpec
from attllm_jax.models.features import CnnFeatures
from attllm_jax.models.fields import ConfigError, check_positive_ints, scalar_dataclass, strict_fields
from attllm_jax.models.resnet import ResNet, ResNetConfig
from attllm_jax.ops.attention_maps import MAX_WEIGHT
from attllm_jax.ops.gem import ALPHA_OFF
from attllm_jax.ops.normalize import l2_normalize
from attllm_jax.ops.resize import antialiased_bilinear_resize

LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default
BACKBONE_STRIDE = 16  # ResNet cut after layer3
RELEASED_DIMS = {128: (64, 2), 512: (256, 2), 4096: (1024, 4)}  # descriptor -> (out_channels, out_rows)


def mixvpr_grid(image_size: int) -> int:
    """Side of the ``layer3`` grid of a square ``image_size`` input: ``ceil(image_size / 16)`` (20 for 320)."""
    return math.ceil(image_size / BACKBONE_STRIDE)


@dataclasses.dataclass(frozen=True)
class MixVPRSpec:
    """Architecture of a MixVPR network.

    Attributes:
        resnet_layers: Bottleneck blocks of ``layer1``..``layer3`` (``(3, 4, 6)`` for ResNet-50).
        resnet_width: stem channels of the ResNet (64).
        image_size: side of the square the network resizes its input to (320); fixes the grid ``h = w =
            ceil(image_size / 16)`` the mixer is sized for.
        mix_depth: Feature-Mixer layers (4).
        mlp_ratio: hidden width of a mixer layer over ``N`` (1).
        out_channels: ``channel_proj`` output (1024 for the 4096-d release).
        out_rows: ``row_proj`` output (4 for the 4096-d release).
    """

    resnet_layers: tuple[int, int, int] = (3, 4, 6)
    resnet_width: int = 64
    image_size: int = 320
    mix_depth: int = 4
    mlp_ratio: int = 1
    out_channels: int = 1024
    out_rows: int = 4

    FORMAT_1_FIELDS: ClassVar[tuple[str, ...]] = ()  # MixVPR is newer than release 0.1.0

    def __post_init__(self):
        layers = tuple(self.resnet_layers)
        if len(layers) != 3 or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in layers):
            raise ValueError(f"resnet_layers must be 3 positive ints, got {self.resnet_layers!r}")
        object.__setattr__(self, "resnet_layers", layers)
        check_positive_ints(self, [f.name for f in dataclasses.fields(self) if f.name != "resnet_layers"])

    @classmethod
    def released(cls, descriptor_dim: int = 4096) -> MixVPRSpec:
        """A released architecture: ``resnet50_MixVPR_{128, 512, 4096}_channels(C)_rows(R).ckpt``."""
        if descriptor_dim not in RELEASED_DIMS:
            raise ValueError(f"MixVPR was released at {sorted(RELEASED_DIMS)} dimensions, got {descriptor_dim!r}")
        out_channels, out_rows = RELEASED_DIMS[descriptor_dim]
        return cls(out_channels=out_channels, out_rows=out_rows)

    @property
    def backbone(self) -> str:
        """``"resnet50"`` (layers ``(3, 4, 6)``, width 64) or ``"resnet_custom"``."""
        return "resnet50" if (self.resnet_layers, self.resnet_width) == ((3, 4, 6), 64) else "resnet_custom"

    @property
    def resnet(self) -> ResNetConfig:
        """The truncated ResNet's config (no ``layer4`` blocks)."""
        return ResNetConfig("resnet50_layer3", "bottleneck", (*self.resnet_layers, 0), self.resnet_width)

    @property
    def in_channels(self) -> int:
        """Channels of the ``layer3`` map (1024 for ResNet-50)."""
        return self.resnet_width * 16

    @property
    def grid(self) -> int:
        """Side of the ``layer3`` grid (20)."""
        return mixvpr_grid(self.image_size)

    @property
    def num_positions(self) -> int:
        """``N = h * w`` (400)."""
        return self.grid**2

    @property
    def descriptor_dim(self) -> int:
        """``out_channels * out_rows`` (4096 released)."""
        return self.out_channels * self.out_rows

    def default_preprocess(self) -> PreprocessSpec:
        """VPR-methods-evaluation feeds MixVPR ToTensor + Normalize at the image's own size and the model resizes
        the float tensor to 320 x 320 (antialiased bilinear). Resizing to ``image_size`` in the preprocessing is the
        same operation (the network then keeps its input as it is), and gives batches one shape."""
        return PreprocessSpec.tensor((self.image_size, self.image_size))

    def build(self, rngs: nnx.Rngs | None = None) -> MixVPRNet:
        """The network with random weights (``nnx.Rngs(0)`` unless given)."""
        return MixVPRNet(self, rngs=rngs if rngs is not None else nnx.Rngs(0))

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "resnet_layers": list(self.resnet_layers)}

    @classmethod
    def from_dict(cls, data: Any, where: str, require_all: bool = True) -> MixVPRSpec:
        """From :meth:`to_dict` output; every field must be present unless ``require_all`` is False."""
        kwargs = strict_fields(cls, data, where, require_all)
        layers = kwargs.pop("resnet_layers", [3, 4, 6])
        if not isinstance(layers, list) or not all(type(n) is int for n in layers):
            raise ConfigError(f"{where}.resnet_layers must be a list of 3 ints, got {layers!r}")
        return scalar_dataclass(cls, kwargs, where, require_all=False, resnet_layers=tuple(layers))

    @classmethod
    def from_format_1(cls, data: dict, where: str) -> MixVPRSpec:
        """Release 0.1.0 had no MixVPR: a format-1 MixVPR config is an error."""
        raise ConfigError(f"{where}: a 'mixvpr' model needs config.json format 2 (release 0.1.0 had no MixVPR)")


class FeatureMixerLayer(nnx.Module):
    """``X + fc2(relu(fc1(norm(X))))`` over the last (position) axis of ``X [B, C, N]``.

    Upstream's ``FeatureMixerLayer.mix`` is ``Sequential(LayerNorm, Linear, ReLU, Linear)``: ``norm`` is its
    ``mix.0``, ``fc1`` its ``mix.1``, ``fc2`` its ``mix.3``.
    """

    def __init__(self, num_positions: int, mlp_ratio: int, *, rngs: nnx.Rngs):
        hidden = num_positions * mlp_ratio
        self.norm = nnx.LayerNorm(num_positions, epsilon=LAYER_NORM_EPS, use_fast_variance=False, rngs=rngs)
        self.fc1 = nnx.Linear(num_positions, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, num_positions, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + self.fc2(jax.nn.relu(self.fc1(self.norm(x))))


def mixvpr_location_weights(feature_map: jax.Array, attention: jax.Array, alpha: jax.Array) -> jax.Array:
    """The blended per-location weights ``w = nu + alpha (A - nu)``, ``nu = ||x_i|| / mean_i ||x_i||``.

    Args:
        feature_map: ``[B, h, w, C]`` backbone map.
        attention: ``[B, h', w']`` maps, resized bilinearly to ``h x w`` and clamped to ``[0, 2]``.
        alpha: ``[B]`` blend factors.

    Returns:
        ``[B, h, w]`` weights (mean of ``nu`` is 1; ``w >= 0``).
    """
    _, h, w, _ = feature_map.shape
    norms = jnp.sqrt(jnp.sum(jnp.square(feature_map), axis=-1))  # [B, h, w]
    mean = jnp.maximum(jnp.mean(norms, axis=(1, 2), keepdims=True), jnp.finfo(norms.dtype).tiny)
    nu = norms / mean
    target = jnp.clip(ops.resize_attention(attention, h, w), 0.0, MAX_WEIGHT)
    return nu + alpha[:, None, None] * (target - nu)


class MixVPRAggregator(nnx.Module):
    """The MixVPR head: ``[B, h, w, C]`` -> ``[B, out_channels * out_rows]`` (L2-normalized).

    Attributes:
        mix: the :class:`FeatureMixerLayer` list.
        channel_proj: ``C -> out_channels``.
        row_proj: ``N -> out_rows``.
    """

    def __init__(self, config: MixVPRSpec, *, rngs: nnx.Rngs):
        n = config.num_positions
        self.num_positions = n
        self.mix = nnx.List([FeatureMixerLayer(n, config.mlp_ratio, rngs=rngs) for _ in range(config.mix_depth)])
        self.channel_proj = nnx.Linear(config.in_channels, config.out_channels, rngs=rngs)
        self.row_proj = nnx.Linear(n, config.out_rows, rngs=rngs)

    def __call__(
        self, feature_map: jax.Array, attention: jax.Array | None = None, alpha: float | jax.Array = 0.0
    ) -> jax.Array:
        """Descriptors ``[B, out_channels * out_rows]``.

        Args:
            feature_map: ``[B, h, w, C]`` with ``h * w`` the positions the mixer was built for.
            attention: optional ``[B, h', w']`` maps.
            alpha: blend factor, a scalar or ``[B]``; ``<= 1e-6`` is plain MixVPR.
        """
        b, h, w, c = feature_map.shape
        if h * w != self.num_positions:
            raise ValueError(f"MixVPR's mixer takes {self.num_positions} positions, got a {h} x {w} map")
        if attention is not None:
            alpha = jnp.broadcast_to(jnp.asarray(alpha, feature_map.dtype), (b,))
            weights = mixvpr_location_weights(feature_map, attention, alpha)
            weights = jnp.where((alpha <= ALPHA_OFF)[:, None, None], 1.0, weights)
            feature_map = feature_map * weights[..., None]
        x = feature_map.reshape(b, h * w, c).swapaxes(1, 2)  # [B, C, N], n = y * w + x (torch's flatten(2))
        for layer in self.mix:
            x = layer(x)
        x = self.channel_proj(x.swapaxes(1, 2))  # [B, N, out_channels]
        x = self.row_proj(x.swapaxes(1, 2))  # [B, out_channels, out_rows]
        return l2_normalize(x.reshape(b, -1), axis=-1)


class MixVPRNet(nnx.Module):
    """ResNet-50 (to ``layer3``) + MixVPR head with the VPR net interface (``features`` / ``aggregate``).

    Attributes:
        config: the architecture.
        backbone: the truncated :class:`~attllm_jax.models.resnet.ResNet`.
        aggregator: :class:`MixVPRAggregator`.
    """

    def __init__(self, config: MixVPRSpec, *, rngs: nnx.Rngs):
        self.config = config
        self.backbone = ResNet(config.resnet, rngs=rngs)
        self.aggregator = MixVPRAggregator(config, rngs=rngs)

    def resize_input(self, images: jax.Array) -> jax.Array:
        """Upstream's ``Resize([320, 320], antialias=True)`` of the normalized float images: ``[B, S, S, 3]``."""
        size = self.config.image_size
        return antialiased_bilinear_resize(images, size, size)

    def features(self, images: jax.Array) -> CnnFeatures:
        """``[B, H, W, 3]`` normalized images -> the ``layer3`` map ``[B, g, g, C]`` of the resized input."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must have shape [B, H, W, 3], got {images.shape}")
        return CnnFeatures(maps=self.backbone.stages(self.resize_input(images))["layer3"])

    def aggregate(
        self, feats: CnnFeatures, attention: jax.Array | None = None, alpha: float | jax.Array = 0.0
    ) -> jax.Array:
        """MixVPR descriptors ``[B, D]`` of :meth:`features` output; attention ``[B, h', w']``, alpha ``[]``|``[B]``."""
        if not isinstance(feats, CnnFeatures):
            raise ValueError(f"MixVPR features must be CnnFeatures (the backbone map), got {type(feats).__name__}")
        return self.aggregator(feats.maps, attention, alpha)

    def __call__(
        self, images: jax.Array, attention: jax.Array | None = None, alpha: float | jax.Array = 0.0
    ) -> jax.Array:
        """``aggregate(features(images), attention, alpha)``: ``[B, H, W, 3]`` -> ``[B, D]``."""
        return self.aggregate(self.features(images), attention, alpha)
