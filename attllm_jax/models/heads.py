"""The CosPlace / EigenPlaces aggregation head and the full CNN network.

Upstream (gmberton/CosPlace ``GeoLocalizationNet``, EigenPlaces the same) aggregates a backbone map with
``L2Norm(channels) -> GeM(p learned) -> Flatten -> Linear -> L2Norm``. Here the GeM step goes through
:func:`attllm_jax.ops.gem`, or :func:`attllm_jax.ops.modulated_gem` when an attention map is given.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from attllm_jax import ops
from attllm_jax.models.resnet import ResNet
from attllm_jax.models.vgg import VGG

GEM_EPS = 1e-6
L2_EPS = 1e-12  # torch.nn.functional.normalize's default
BLENDS = ("native", "uniform")


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = L2_EPS) -> jax.Array:
    """``x / max(||x||_2, eps)`` along ``axis``, as ``torch.nn.functional.normalize``."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
    return x / jnp.maximum(norm, eps)


class GeMHead(nnx.Module):
    """``L2 norm -> GeM -> Linear -> L2 norm`` over a ``[B, h, w, C]`` feature map.

    Attributes:
        p: the GeM exponent, shape ``[1]`` as upstream's ``aggregation.1.p``.
        fc: the projection, upstream's ``aggregation.3``.
        blend: how attention is blended in, ``"native"`` (published) or ``"uniform"``; see ``ops.modulated_gem``.
    """

    def __init__(self, in_features: int, out_features: int, p: float = 3.0, blend: str = "native", *, rngs: nnx.Rngs):
        if blend not in BLENDS:
            raise ValueError(f"unknown blend {blend!r}; valid: {', '.join(BLENDS)}")
        self.p = nnx.Param(jnp.full((1,), p, jnp.float32))
        self.fc = nnx.Linear(in_features, out_features, rngs=rngs)
        self.blend = blend

    def pool(self, x: jax.Array, attention: jax.Array | None = None, alpha: jax.Array | float = 0.0) -> jax.Array:
        """L2 norm over channels then (modulated) GeM: ``[B, h, w, C]`` -> ``[B, C]``."""
        x = l2_normalize(x, axis=-1)
        p = self.p[...][0]
        if attention is None:
            return ops.gem(x, p=p, eps=GEM_EPS)
        return ops.modulated_gem(x, attention, alpha, p=p, eps=GEM_EPS, blend=self.blend)

    def __call__(self, x: jax.Array, attention: jax.Array | None = None, alpha: jax.Array | float = 0.0) -> jax.Array:
        """Aggregates ``[B, h, w, C]`` (attention ``[B, h', w']``, alpha ``[]`` or ``[B]``) into ``[B, D]``."""
        return l2_normalize(self.fc(self.pool(x, attention, alpha)), axis=-1)


class GeoLocalizationNet(nnx.Module):
    """A CosPlace / EigenPlaces network: ``backbone`` (ResNet or VGG) then ``aggregation`` (:class:`GeMHead`)."""

    def __init__(self, backbone: ResNet | VGG, aggregation: GeMHead):
        self.backbone = backbone
        self.aggregation = aggregation

    def features(self, images: jax.Array) -> jax.Array:
        """``[B, H, W, 3]`` ImageNet-normalized -> raw backbone map ``[B, h, w, C]``."""
        return self.backbone(images)

    def aggregate(
        self, feats: jax.Array, attention: jax.Array | None = None, alpha: jax.Array | float = 0.0
    ) -> jax.Array:
        """Backbone map ``[B, h, w, C]`` -> L2-normalized descriptors ``[B, D]``.

        Args:
            feats: output of :meth:`features`.
            attention: optional ``[B, h', w']`` map, resized to ``[h, w]`` inside ``ops.modulated_gem``.
            alpha: blend factor, a scalar or ``[B]`` (may be traced, e.g. under ``jax.vmap``).
        """
        return self.aggregation(feats, attention, alpha)

    def feature_grid(self, feats: jax.Array) -> tuple[int, int]:
        """The ``(h, w)`` grid an attention map is resized to."""
        return int(feats.shape[1]), int(feats.shape[2])

    def __call__(
        self, images: jax.Array, attention: jax.Array | None = None, alpha: jax.Array | float = 0.0
    ) -> jax.Array:
        """``[B, H, W, 3]`` -> ``[B, D]``; equals ``aggregate(features(images), attention, alpha)``."""
        return self.aggregate(self.features(images), attention, alpha)
