"""An upstream-shaped state dict with random weights, for trying the converters offline (``--random_weights``).

A family's key table maps each of our parameters to its upstream key and layout transform; run backwards over a
network built with random weights, it gives the state dict an upstream release of that architecture would hold
(upstream key names, PyTorch layouts). :func:`convert_random` writes it to a safetensors file and converts that
file through the real path (:func:`attllm_jax.convert.convert_file`), so everything but the download is exercised.
The result says in its provenance that its weights are random (``weights``), never a published file.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

import numpy as np
from flax import nnx

from attllm_jax.convert.keytable import KeyTable, torch_conv_to_hwio, torch_kernel_to_flax, torch_linear_to_io
from attllm_jax.models.spec import ModelSpec


def _kernel_to_torch(w: np.ndarray) -> np.ndarray:
    if w.ndim == 4:
        return np.transpose(w, (3, 2, 0, 1))
    return np.transpose(w) if w.ndim == 2 else w


# Each forward layout transform of the key tables and its inverse (our layout -> PyTorch's).
INVERSES = {
    None: lambda w: w,
    torch_kernel_to_flax: _kernel_to_torch,
    torch_conv_to_hwio: lambda w: np.transpose(w, (3, 2, 0, 1)) if w.ndim == 4 else w,
    torch_linear_to_io: lambda w: np.transpose(w) if w.ndim == 2 else w,
}


def upstream_state_dict(net: nnx.Module, table: KeyTable) -> dict[str, np.ndarray]:
    """``{upstream key: array}`` of every Param / BatchStat of ``net`` through ``table`` run backwards.

    Raises:
        ValueError: a parameter no rule maps, or a transform without a known inverse.
    """
    flat = nnx.to_flat_state(nnx.state(net, nnx.Any(nnx.Param, nnx.BatchStat)))
    out = {}
    for path, variable in flat:
        target = "/".join(str(p) for p in path)
        found = table.source_for(target)
        if found is None:
            raise ValueError(f"no key-table rule maps {target!r}")
        key, transform = found
        if transform not in INVERSES:
            raise ValueError(f"no inverse of the layout transform of {target!r} ({transform})")
        out[key] = np.array(INVERSES[transform](np.asarray(variable.get_value(), np.float32)), order="C")  # keeps 0-d
    return out


def random_architecture(family: str, backbone: str | None = None, fc_output_dim: int | None = None):
    """The architecture and key table of ``family``'s random model: the CNN families' ``backbone`` (default
    ResNet18) and ``fc_output_dim`` (default 512); SALAD, MegaLoc and BoQ (``backbone`` dinov2 or resnet50) as
    released."""
    from attllm_jax.convert import boq, cosplace, megaloc, salad
    from attllm_jax.models.boq import BoQSpec
    from attllm_jax.models.heads import CnnSpec, normalize_backbone
    from attllm_jax.models.megaloc import MegaLocSpec
    from attllm_jax.models.salad import SaladSpec

    if family in ("cosplace", "eigenplaces"):
        return CnnSpec(normalize_backbone(backbone or "ResNet18"), int(fc_output_dim or 512)), cosplace.KEYS
    if family == "salad":
        return SaladSpec.released(), salad.KEYS
    if family == "megaloc":
        return MegaLocSpec.released(), megaloc.KEYS
    if family == "boq":
        return BoQSpec.released("resnet50" if backbone and "resnet" in backbone else "dinov2"), boq.KEYS
    raise ValueError(f"no random architecture for family {family!r}")


def convert_random(family: str, output: str | os.PathLike, seed: int = 0, options=None) -> ModelSpec:
    """Writes a random-weight model of ``family`` to ``output`` through the real conversion path.

    Args:
        family: the model family.
        output: the model directory to write.
        seed: the weights' seed (``nnx.Rngs(seed)``, the modules' own initializers).
        options: the family converter's options dataclass (``ConvertOptions``) or None: its ``backbone`` and
            ``descriptor_dim`` choose the architecture (see :func:`random_architecture`), the rest are checked by the
            conversion as for a real file.

    Returns:
        The spec written, whose ``provenance.weights`` says the weights are random.
    """
    from safetensors.numpy import save_file

    from attllm_jax.checkpoint import save_model
    from attllm_jax.convert import convert_file

    arch, table = random_architecture(
        family, getattr(options, "backbone", None), getattr(options, "descriptor_dim", None)
    )
    state = upstream_state_dict(arch.build(nnx.Rngs(seed)), table)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"random_{family}_seed{seed}.safetensors"
        save_file(state, str(path))
        net, spec = convert_file(family, path, None, options)
    note = f"random (seed {seed}; attllm-convert --random_weights: an upstream-shaped state dict, not a release)"
    spec = spec.replace(provenance=dataclasses.replace(spec.provenance, weights=note))
    save_model(output, net, spec)
    return spec
