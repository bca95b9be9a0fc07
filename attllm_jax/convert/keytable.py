"""Declarative key tables: which checkpoint tensor fills which NNX parameter, and how it is laid out.

A :class:`KeyTable` is a list of ``(target regex, source template, transform)`` rules read top to bottom, plus a
table of leaf renames and per-leaf default transforms. For every Param / BatchStat path of the target network
(``"backbone/layer1/0/conv1/kernel"``) the first rule whose regex matches the whole path gives the source key:
``match.expand(template)`` with ``/`` turned into ``.`` and the last component renamed through ``leaves``
(``kernel -> weight``, ``mean -> running_mean``, ...). The table is driven by the target so that a missing
checkpoint tensor is named by its source key; :func:`~attllm_jax.convert.common.fill_module` then checks both
directions (every target filled, every source tensor used or explicitly ignored).

:func:`convert_with_table` is the tail every family's conversion ends with (the abstract network of the inferred
architecture, filled through the table, and its spec); :func:`check_family`, :func:`check_expected_backbone` and
:func:`checked_image_size` are the checks the families share.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping

import numpy as np
from flax import nnx

from attllm_jax.convert.common import ConversionError, TensorSource, fill_module
from attllm_jax.models.spec import ModelSpec, Provenance

Transform = Callable[[np.ndarray], np.ndarray]
LEAF_DEFAULT = "leaf default"  # a rule's transform: the one ``KeyTable.transforms`` gives the target's leaf


def torch_conv_to_hwio(w: np.ndarray) -> np.ndarray:
    """Conv weight ``[O, I, kh, kw]`` -> ``[kh, kw, I, O]`` (another rank is left for the shape check to report)."""
    return np.transpose(w, (2, 3, 1, 0)) if w.ndim == 4 else w


def torch_linear_to_io(w: np.ndarray) -> np.ndarray:
    """Linear ``[out, in]`` or 1x1 conv ``[out, in, 1, 1]`` weight -> ``[in, out]`` (a larger kernel is reported
    as a shape mismatch)."""
    return np.reshape(w, (w.shape[0], -1)).T if w.ndim >= 2 else w


def torch_kernel_to_flax(w: np.ndarray) -> np.ndarray:
    """Conv ``[O, I, kh, kw]`` -> ``[kh, kw, I, O]`` and linear ``[out, in]`` -> ``[in, out]``, by rank."""
    if w.ndim == 4:
        return np.transpose(w, (2, 3, 1, 0))
    if w.ndim == 2:
        return np.transpose(w)
    return w


@dataclasses.dataclass(frozen=True)
class Rule:
    """One row of a key table.

    Attributes:
        target: regex matched against the whole target path (``/``-separated).
        source: template expanded with the match (``\\1``, ...); ``/`` become ``.``.
        transform: layout change applied to the source tensor; :data:`LEAF_DEFAULT` uses the table's per-leaf one,
            None copies it as is.
    """

    target: str
    source: str
    transform: Transform | str | None = LEAF_DEFAULT


@dataclasses.dataclass(frozen=True)
class KeyTable:
    """A family's key map: ``rules`` in order, ``leaves`` renames of the source key's last component, and
    ``transforms`` per target leaf name (used by rules with :data:`LEAF_DEFAULT`)."""

    rules: tuple[Rule, ...]
    leaves: Mapping[str, str] = dataclasses.field(default_factory=dict)
    transforms: Mapping[str, Transform] = dataclasses.field(default_factory=dict)

    def prefixed(self, target_prefix: str, source_prefix: str) -> KeyTable:
        """The same table for a sub-module: targets under ``target_prefix``, sources under ``source_prefix``."""
        rules = tuple(
            Rule(re.escape(target_prefix) + r.target, source_prefix.replace("\\", r"\\") + r.source, r.transform)
            for r in self.rules
        )
        return KeyTable(rules, self.leaves, self.transforms)

    def __add__(self, other: KeyTable) -> KeyTable:
        """Rules of ``self`` first, then ``other``'s; leaf tables merged (``self`` wins)."""
        return KeyTable(
            self.rules + other.rules, {**other.leaves, **self.leaves}, {**other.transforms, **self.transforms}
        )

    def source_for(self, target: str) -> tuple[str, Transform | None] | None:
        """``(source key, transform)`` of a target path, or None when no rule matches."""
        for rule in self.rules:
            match = re.fullmatch(rule.target, target)
            if match is None:
                continue
            parts = match.expand(rule.source).replace("/", ".").split(".")
            parts[-1] = self.leaves.get(parts[-1], parts[-1])
            leaf = target.rsplit("/", 1)[-1]
            transform = self.transforms.get(leaf) if rule.transform == LEAF_DEFAULT else rule.transform
            return ".".join(parts), transform
        return None


def target_paths(module: nnx.Module) -> list[str]:
    """Every Param / BatchStat path of ``module``, ``/``-joined, in state order."""
    flat = nnx.to_flat_state(nnx.state(module, nnx.Any(nnx.Param, nnx.BatchStat)))
    return ["/".join(str(p) for p in path) for path, _ in flat]


def take_all(module: nnx.Module, table: KeyTable, source: TensorSource) -> dict[str, np.ndarray | None]:
    """Takes from ``source`` the value of every target path of ``module`` through ``table``.

    A target no rule maps is left out, so :func:`~attllm_jax.convert.common.fill_module` reports it as not filled.
    """
    values = {}
    for target in target_paths(module):
        found = table.source_for(target)
        if found is not None:
            values[target] = source.take(*found)
    return values


def check_family(family: str, expected: str) -> None:
    """Raises ValueError unless ``family`` is the one a single-family conversion module converts."""
    if family != expected:
        raise ValueError(f"family must be {expected!r}, got {family!r}")


def check_expected_backbone(source_name: str, backbone: str | None, arch) -> None:
    """Raises ConversionError when a ``--backbone`` was given and the shapes hold another (``arch.backbone``)."""
    if backbone is not None and backbone != arch.backbone:
        raise ConversionError(f"{source_name}: --backbone={backbone} but the checkpoint holds a {arch.backbone}")


def checked_image_size(image_size, patch: int) -> tuple[int, int]:
    """An evaluation ``(height, width)`` whose sides are positive multiples of the patch size.

    Raises:
        ValueError: not two sides, or a side that is not a positive multiple of ``patch``.
    """
    size = tuple(int(s) for s in image_size)
    if len(size) != 2 or any(s <= 0 or s % patch for s in size):
        raise ValueError(f"image_size must be (height, width) multiples of {patch}, got {list(size)}")
    return size


def convert_with_table(
    family: str, arch, table: KeyTable, source: TensorSource, preprocess, converter_version: str
) -> tuple[nnx.Module, ModelSpec]:
    """The tail of every family's conversion: the abstract network of ``arch``, filled strictly through ``table``.

    Args:
        family: the spec's family.
        arch: the inferred architecture spec (``build()`` makes the network).
        table: the family's key table.
        source: the checkpoint's tensors.
        preprocess: the evaluation transform written to the spec.
        converter_version: written to the spec's provenance.

    Returns:
        ``(net, spec)``.

    Raises:
        ConversionError: any missing / extra / misshapen tensor (all listed).
    """
    net = nnx.eval_shape(lambda: arch.build())
    fill_module(net, take_all(net, table, source), source)
    return net, ModelSpec(family, arch, preprocess, Provenance(converter_version=converter_version))
