"""Flax NNX models: CosPlace / EigenPlaces (ResNet, VGG-16 + GeM head), SALAD (DINOv2 + SALAD), their typed
specs (:mod:`~attllm_jax.models.spec`), the family registry with the published checkpoints, and
:class:`~attllm_jax.models.vpr.VPRModel` (jitted inference + preprocessing)."""

from attllm_jax.models.features import CnnFeatures, Features, TokenFeatures
from attllm_jax.models.registry import FAMILIES, PUBLISHED, family_entry, lookup
from attllm_jax.models.spec import ConfigError, ModelSpec, Provenance
from attllm_jax.models.vpr import VPRModel

__all__ = [
    "FAMILIES",
    "PUBLISHED",
    "CnnFeatures",
    "ConfigError",
    "Features",
    "ModelSpec",
    "Provenance",
    "TokenFeatures",
    "VPRModel",
    "family_entry",
    "lookup",
]
