"""Flax NNX models: CosPlace / EigenPlaces (ResNet, VGG-16 + GeM head), SALAD (DINOv2 + SALAD), the registry of
published checkpoints and :class:`~attllm_jax.models.vpr.VPRModel` (jitted inference + preprocessing)."""

from attllm_jax.models.registry import PUBLISHED, build_net, lookup
from attllm_jax.models.vpr import VPRModel

__all__ = ["PUBLISHED", "VPRModel", "build_net", "lookup"]
