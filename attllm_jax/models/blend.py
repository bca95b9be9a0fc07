"""Switching a loaded model's attention blend without copying its weights (tuning and localize use it)."""

from __future__ import annotations

import dataclasses

from flax import nnx

from attllm_jax.models.vpr import DescriptorModel, VPRModel
from attllm_jax.ops.gem import BLENDS


def with_blend(model: DescriptorModel, blend: str) -> DescriptorModel:
    """The same model (same weights, no copy) aggregating with another blend ("native" or "uniform").

    Only the CosPlace / EigenPlaces GeM head has a choice of blend; SALAD's token weighting is native only.

    Raises:
        ValueError: for an unknown blend or one the model's family does not offer.
    """
    if blend not in BLENDS:
        raise ValueError(f"unknown blend {blend!r}; valid: {', '.join(BLENDS)}")
    arch = model.spec.architecture
    if getattr(arch, "blend", "native") == blend:
        return model
    if not hasattr(arch, "blend"):
        raise ValueError(f"--blends {blend!r} is not available for family {model.spec.family!r} (native only)")
    graphdef, state = nnx.split(model.net)
    net = nnx.merge(graphdef, state)
    net.aggregation.blend = blend
    spec = model.spec.replace(architecture=dataclasses.replace(arch, blend=blend))
    return VPRModel(net, spec, model.precision)
