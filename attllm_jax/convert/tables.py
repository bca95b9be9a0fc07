"""Declarative key tables: each target parameter path of an NNX module -> the PyTorch key it is read from.

A table is an ordered tuple of ``(target regex, source template)`` rules. Every Param / BatchStat path of the
target module (``"aggregator/boqs/0/cross_attn/out_proj/kernel"``) is matched against the rules in order; the first
full match gives the source key by ``re.sub`` with the template, whose ``/`` become ``.`` and whose last segment is
renamed the PyTorch way (``kernel`` and ``scale`` -> ``weight``, ``mean`` -> ``running_mean``, ``var`` ->
``running_var``) unless the template already names the tensor (it ends with ``=``: ``...in_proj_weight=``). The
layout change follows from the target: a rank-4 ``kernel`` is a convolution (``[O, I, kh, kw] -> [kh, kw, I, O]``),
a rank-2 ``kernel`` a dense layer (``[O, I]`` or a 1x1 convolution ``[O, I, 1, 1]`` -> ``[I, O]``). Strictness in
both directions is :func:`~attllm_jax.convert.common.fill_module`'s.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
from flax import nnx

from attllm_jax.convert.common import ConversionError, TensorSource

KeyTable = Sequence[tuple[str, str]]
TORCH_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def conv_to_hwio(w: np.ndarray) -> np.ndarray:
    """``[O, I, kh, kw] -> [kh, kw, I, O]``; another rank is left for the shape check to report."""
    return np.transpose(w, (2, 3, 1, 0)) if w.ndim == 4 else w


def dense_to_io(w: np.ndarray) -> np.ndarray:
    """Linear ``[O, I]`` or 1x1 convolution ``[O, I, 1, 1]`` -> ``[I, O]`` (a larger kernel fails the shape check)."""
    return np.reshape(w, (w.shape[0], -1)).T if w.ndim >= 2 else w


def target_paths(module: nnx.Module) -> dict[str, int]:
    """``{path: rank}`` of every Param and BatchStat of ``module``."""
    flat = nnx.to_flat_state(nnx.state(module, nnx.Any(nnx.Param, nnx.BatchStat)))
    return {"/".join(str(p) for p in path): len(var.get_value().shape) for path, var in flat}


def source_key(target: str, table: KeyTable) -> str:
    """The PyTorch key of one target path (see the module docstring).

    Raises:
        ConversionError: no rule matches (a bug in the table: the message names the path).
    """
    for pattern, template in table:
        if re.fullmatch(pattern, target):
            key = re.sub(f"^{pattern}$", template, target)
            if key.endswith("="):
                return key[:-1].replace("/", ".")
            head, _, leaf = key.rpartition("/")
            return (head + "/" + TORCH_LEAF.get(leaf, leaf)).replace("/", ".") if head else TORCH_LEAF.get(leaf, leaf)
    raise ConversionError(f"no key-table rule for target parameter {target!r}")


def take_values(module: nnx.Module, source: TensorSource, table: KeyTable) -> dict[str, np.ndarray | None]:
    """Takes from ``source`` the value of every parameter of ``module`` through ``table``."""
    values = {}
    for target, rank in target_paths(module).items():
        transform = None
        if target.endswith("/kernel"):
            transform = conv_to_hwio if rank == 4 else dense_to_io
        values[target] = source.take(source_key(target, table), transform)
    return values
