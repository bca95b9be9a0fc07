"""Strict PyTorch-checkpoint-to-NNX conversion helpers shared by every model family.

A conversion reads the source file into a flat ``{key: np.ndarray}`` dict (:func:`read_state_dict`), takes
tensors out of it through a :class:`TensorSource` (which records what was consumed and what was missing), and
fills an NNX module with :func:`fill_module`. The fill is strict in both directions: every target parameter or
batch statistic must receive a value of the right shape, every value must land on a target, and every source
tensor not explicitly ignored must have been consumed. All problems are collected and raised as one
:class:`ConversionError`, and the module is left untouched when there is any.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import hashlib
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

TORCH_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin", ".torch")  # .torch: MegaLoc's v1.0 release
SAFETENSORS_SUFFIXES = (".safetensors",)
DEFAULT_IGNORE = ("num_batches_tracked",)
_MAX_LISTED = 60  # problems listed in full before the error message is shortened


class ConversionError(ValueError):
    """A checkpoint cannot be converted; the message names every offending key and shape."""


@contextlib.contextmanager
def as_conversion_error(prefix: str):
    """Turns a ValueError of an architecture spec's own checks into a ConversionError (``prefix`` + its message);
    a ConversionError passes unchanged."""
    try:
        yield
    except ConversionError:
        raise
    except ValueError as e:
        raise ConversionError(f"{prefix}{e}") from e


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Returns the hex SHA-256 digest of a file, read in chunks.

    Args:
        path: file to hash.
        chunk_size: bytes read at a time.

    Returns:
        The 64-character lowercase hex digest.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a PyTorch or safetensors checkpoint into a flat dict of NumPy arrays.

    ``.pth/.pt/.ckpt/.bin`` files are read with ``torch.load(..., map_location="cpu", weights_only=True)``, so no
    pickled code is ever executed (torch is imported here only). ``.safetensors`` files are read with
    ``safetensors.numpy``. A Lightning-style ``{"state_dict": {...}}`` or a training checkpoint's
    ``{"model_state_dict": {...}, ...}`` wrapper (:data:`STATE_DICT_WRAPPERS`) is unwrapped and a leading
    ``"module."`` (DataParallel) is stripped from every key. bfloat16 tensors are widened to float32.

    Args:
        path: the checkpoint file.

    Returns:
        ``{key: array}`` in the file's key order.

    Raises:
        ConversionError: the file is missing, truncated, corrupt, of an unknown type, or not a state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"checkpoint file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        raw = _read_safetensors(path)
    elif suffix in TORCH_SUFFIXES:
        raw = _read_torch(path)
    else:
        known = ", ".join(TORCH_SUFFIXES + SAFETENSORS_SUFFIXES)
        raise ConversionError(f"unknown checkpoint type {suffix!r} for {path}; expected one of {known}")
    return _strip_module_prefix(raw)


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        return dict(load_file(str(path)))
    except Exception as e:  # safetensors raises its own error types for header/truncation problems
        raise ConversionError(f"cannot read safetensors file {path} (truncated or corrupt?): {e}") from e


# Wrappers whose entry holds the weights: Lightning's ``{"state_dict": ...}`` and the training checkpoints of
# Lu-Feng/SuperVLAD and Lu-Feng/ImAge, ``{"model_state_dict": ..., "epoch_num": ..., ...}`` (upstream reads only
# that entry, so the other entries are ignored here too).
STATE_DICT_WRAPPERS = ("state_dict", "model_state_dict")


def _unwrap(obj):
    for key in STATE_DICT_WRAPPERS:
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            return obj[key]
    return obj


def _read_torch(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise ConversionError(
            f'reading {path.name} needs PyTorch, which is not installed: pip install -e ".[convert]" '
            "(or convert a .safetensors copy of the checkpoint)"
        ) from e

    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError, ... for bad files
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConversionError(
            f"cannot read PyTorch checkpoint {path} (truncated, corrupt, or holds pickled code that "
            f"weights_only=True refuses): {first_line}"
        ) from e
    obj = _unwrap(obj)
    if not isinstance(obj, Mapping) or not obj:
        raise ConversionError(f"{path} does not hold a state dict (a non-empty mapping of tensors): got {type(obj)}")
    out = {}
    bad = []
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            bad.append(f"{key!r} ({type(value).__name__})")
            continue
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:
            value = value.float()
        out[str(key)] = value.numpy()
    if bad:
        raise ConversionError(f"{path} is not a state dict of tensors; non-tensor entries: {', '.join(bad[:10])}")
    return out


def _strip_module_prefix(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k.removeprefix("module."): v for k, v in state_dict.items()}


def describe_keys(keys: list[str], limit: int = 8) -> str:
    """``'a', 'b', ... (N keys)``: a short, quoted listing of checkpoint keys for error messages."""
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f", ... ({len(keys)} keys)" if len(keys) > limit else "")


def _shape(x) -> tuple[int, ...]:
    return tuple(int(d) for d in np.shape(x))


class TensorSource:
    """A state dict that records which tensors were taken and which requested keys were missing.

    Attributes:
        problems: messages for requested keys that the state dict lacks (reported by :func:`fill_module`).
    """

    def __init__(self, state_dict: Mapping[str, np.ndarray], ignore: Iterable[str] = DEFAULT_IGNORE):
        """Wraps a state dict.

        Args:
            state_dict: ``{key: array}``, e.g. from :func:`read_state_dict`.
            ignore: keys that need not be consumed; an entry matches a key equal to it, a key ending in
                ``"." + entry``, or a key matching it as an ``fnmatch`` pattern.
        """
        self._tensors = dict(state_dict)
        self._ignore = tuple(ignore)
        self._taken: set[str] = set()
        self._origin: dict[int, tuple[str, tuple[int, ...], np.ndarray]] = {}
        self.problems: list[str] = []

    def __contains__(self, key: str) -> bool:
        return key in self._tensors

    def keys(self) -> list[str]:
        """All keys of the wrapped state dict, in order."""
        return list(self._tensors)

    def shape(self, key: str) -> tuple[int, ...] | None:
        """The shape of a tensor without consuming it, or None when absent."""
        return _shape(self._tensors[key]) if key in self._tensors else None

    def take(self, key: str, transform: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray | None:
        """Consumes one tensor.

        Args:
            key: the source key.
            transform: optional layout change (e.g. a transpose) applied to the tensor; the result remembers
                the key it came from, so shape errors in :func:`fill_module` name the source key.

        Returns:
            The (transformed) array, or None when the key is missing; the missing key is recorded in
            :attr:`problems` rather than raised, so that one error can list everything wrong.
        """
        if key not in self._tensors:
            self.problems.append(f"missing source tensor {key!r}")
            return None
        self._taken.add(key)
        raw = np.asarray(self._tensors[key])
        value = np.asarray(transform(raw)) if transform is not None else raw
        self._origin[id(value)] = (key, _shape(raw), value)  # keeps value alive so the id stays unique
        return value

    def origin(self, value: object) -> str | None:
        """Describes the source tensor an array returned by :meth:`take` came from, or None."""
        entry = self._origin.get(id(value))
        if entry is None or entry[2] is not value:
            return None
        return f"source {entry[0]!r} {list(entry[1])}"

    def is_ignored(self, key: str) -> bool:
        """Whether ``key`` matches the ignore list."""
        return any(key == p or key.endswith("." + p) or fnmatch.fnmatchcase(key, p) for p in self._ignore)

    def unused(self) -> list[str]:
        """Keys neither taken nor ignored, in state-dict order."""
        return [k for k in self._tensors if k not in self._taken and not self.is_ignored(k)]

    def describe(self, key: str) -> str:
        """``"key [shape]"`` for messages."""
        return f"{key!r} {list(self.shape(key))}" if key in self._tensors else repr(key)


def _target_variables(module: nnx.Module) -> dict[str, nnx.Variable]:
    flat = nnx.to_flat_state(nnx.state(module, nnx.Any(nnx.Param, nnx.BatchStat)))
    return {"/".join(str(p) for p in path): var for path, var in flat}


def fill_module(
    module: nnx.Module,
    values: Mapping[str, np.ndarray | None],
    source: TensorSource,
) -> None:
    """Fills every Param and BatchStat of ``module`` from ``values``, strictly, in place.

    Args:
        module: the target, e.g. built with ``nnx.eval_shape`` (abstract) or concretely.
        values: ``{nnx state path joined by "/": array}``, e.g. ``"backbone/layer1/0/conv1/kernel"``. A None
            value stands for a source key already reported missing by ``source.take``.
        source: the tensor source the values were taken from; its missing keys and its unconsumed,
            non-ignored keys are problems too.

    Raises:
        ConversionError: listing every problem (missing/unused targets and values with their shapes, shape or
            dtype mismatches, missing and unconsumed source tensors). ``module`` is not modified in that case.
    """
    targets = _target_variables(module)
    problems = list(source.problems)
    updates: dict[str, np.ndarray] = {}
    for path, value in values.items():
        if path not in targets:
            where = source.origin(value)
            problems.append(
                f"value for unknown target {path!r} {list(_shape(value))}" + (f" ({where})" if where else "")
            )
            continue
        if value is None:
            continue  # the missing source key is already in source.problems
        var = targets[path]
        expected_shape, expected_dtype = _shape(var.get_value()), np.dtype(var.get_value().dtype)
        value = np.asarray(value)
        where = source.origin(values[path])
        suffix = f" ({where})" if where else ""
        if _shape(value) != expected_shape:
            problems.append(
                f"shape mismatch for {path!r}: expected {list(expected_shape)}, got {list(value.shape)}{suffix}"
            )
            continue
        if not _castable(value.dtype, expected_dtype):
            problems.append(f"dtype mismatch for {path!r}: expected {expected_dtype}, got {value.dtype}{suffix}")
            continue
        updates[path] = value.astype(expected_dtype, copy=False)
    for path, var in targets.items():
        if path not in values:
            problems.append(f"target {path!r} {list(_shape(var.get_value()))} was not filled")
    problems.extend(f"unused source tensor {source.describe(k)}" for k in source.unused())
    if problems:
        raise ConversionError(_format_problems(problems))
    for path, value in updates.items():
        targets[path].set_value(jnp.asarray(value))


def _castable(src: np.dtype, dst: np.dtype) -> bool:
    if np.issubdtype(dst, np.floating):
        return np.issubdtype(src, np.floating)
    return np.can_cast(src, dst, casting="same_kind")


def _format_problems(problems: list[str]) -> str:
    shown = problems[:_MAX_LISTED]
    more = len(problems) - len(shown)
    lines = [f"checkpoint conversion failed with {len(problems)} problem(s):"] + [f"  - {p}" for p in shown]
    if more:
        lines.append(f"  ... and {more} more")
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class DimensionOptions:
    """Options of a family whose only choice besides the checkpoint is the descriptor dimension (MixVPR, NetVLAD).

    Attributes:
        descriptor_dim: expected descriptor dimension, or None (checked against the shapes).
        backbone: unused (one backbone per family); present for :class:`attllm_jax.convert.ConvertOptions`.
    """

    descriptor_dim: int | None = None
    backbone: str | None = None
