"""The strict JSON readers and field checks every model family's spec uses, and :class:`Provenance`.

This module knows no family: the family modules (``heads``, ``salad``, ``megaloc``, ``boq``) import it to parse
and check their ``architecture`` object of ``config.json``; :mod:`~attllm_jax.models.registry` and
:mod:`~attllm_jax.models.spec` sit above them (docs/DESIGN.md "Layers"). An unknown or missing field is a
:class:`ConfigError` naming the file and the field.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from attllm_jax.data.preprocess import PreprocessSpec
from attllm_jax.models.dinov2 import DinoV2Config, dinov2_config, preset_name


class ConfigError(ValueError):
    """A model ``config.json`` (or spec dict) is malformed; the message names the file and the field."""


@dataclasses.dataclass(frozen=True)
class Provenance:
    """Where a model's weights came from.

    Attributes:
        source_file: the converted file's name (no directory).
        source_sha256: its SHA-256.
        published_file: the release asset this file is (downloaded from its URL, or with upstream's SHA-256), if
            any; never inferred from the file's name or architecture.
        converter_version: the converter's version.
        weights: a note for weights that do not come from a file, e.g. ``"random (seed 0)"``.
    """

    source_file: str | None = None
    source_sha256: str | None = None
    published_file: str | None = None
    converter_version: str | None = None
    weights: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def strict_fields(cls: type, data: Any, where: str, require_all: bool = False) -> dict:
    """The constructor keyword arguments of dataclass ``cls`` from a JSON object, strictly.

    Args:
        cls: a dataclass.
        data: the parsed JSON value.
        where: ``"<file>: <path>"`` prefix for messages.
        require_all: every field must be present (format 2 files are complete), not only those without a default.

    Raises:
        ConfigError: ``data`` is not an object, has a field ``cls`` does not have, or lacks a required field.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a JSON object, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown field {unknown[0]!r}; valid fields: {', '.join(fields)}")
    for name, f in fields.items():
        required = require_all or (f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
        if name not in data and required:
            raise ConfigError(f"{where}: missing field {name!r}")
    return dict(data)


def construct(cls: type, kwargs: dict, where: str):
    """``cls(**kwargs)``; a ValueError/TypeError of its checks becomes a :class:`ConfigError` naming ``where``."""
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from e


def typed_value(value: Any, annotation: str, where: str) -> Any:
    """Checks a JSON scalar against a field annotation string (``int``, ``str | None``, ``float``, ``bool``)."""
    allowed = [a.strip() for a in annotation.split("|")]
    if value is None:
        if "None" in allowed:
            return None
        raise ConfigError(f"{where} must not be null")
    if "bool" in allowed:
        if isinstance(value, bool):
            return value
    elif "int" in allowed and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif "float" in allowed and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif "str" in allowed and isinstance(value, str):
        return value
    raise ConfigError(f"{where} must be {annotation}, got {value!r}")


def scalar_dataclass(cls: type, data: Any, where: str, require_all: bool = False, **extra):
    """A dataclass of JSON scalars (``int``/``float``/``str``/``bool``, optionally ``| None``) from an object.

    ``extra`` fields (already parsed, e.g. a nested spec) are passed to the constructor as they are.
    """
    hints = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    kwargs = strict_fields(
        cls, {**data, **dict.fromkeys(extra)} if isinstance(data, Mapping) else data, where, require_all
    )
    values = {k: typed_value(v, hints[k], f"{where}.{k}") for k, v in kwargs.items() if k not in extra}
    return construct(cls, {**values, **extra}, where)


def check_positive_ints(spec: Any, names: Iterable[str]) -> None:
    """Checks that each attribute ``names`` of ``spec`` is a positive ``int`` (``bool`` refused).

    Raises:
        ValueError: naming the first field that is not.
    """
    for name in names:
        value = getattr(spec, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_dinov2(value: Any) -> None:
    """Raises ValueError unless ``value`` is a :class:`~attllm_jax.models.dinov2.DinoV2Config`."""
    if not isinstance(value, DinoV2Config):
        raise ValueError(f"dinov2 must be a DinoV2Config, got {type(value).__name__}")


def dinov2_from_dict(data: Any, where: str, require_all: bool) -> DinoV2Config | None:
    """The nested ``dinov2`` object of an architecture (``None`` stays ``None``), strictly."""
    return None if data is None else scalar_dataclass(DinoV2Config, data, f"{where}.dinov2", require_all)


class DinoV2HeadSpec:
    """Base of the architectures made of a DINOv2 backbone and a head sized by positive ints (SALAD, MegaLoc).

    A subclass is a frozen dataclass with a ``dinov2: DinoV2Config`` field (default ViT-B/14) and otherwise only
    positive-int fields; this class checks them, names the backbone and reads and writes the ``architecture``
    object of ``config.json`` (``dinov2`` nested, as :meth:`DinoV2Config.to_dict` writes it).
    """

    def __post_init__(self):
        check_dinov2(self.dinov2)
        check_positive_ints(self, [f.name for f in dataclasses.fields(self) if f.name != "dinov2"])

    @property
    def backbone(self) -> str:
        """The DINOv2 preset name (``"dinov2_vitb14"``), or ``"dinov2_custom"``."""
        return preset_name(self.dinov2) or "dinov2_custom"

    @property
    def salad_dim(self) -> int:
        """``g + l * m``: width of the SALAD descriptor part (8448 for SALAD, 16640 for MegaLoc upstream)."""
        return self.token_dim + self.cluster_dim * self.num_clusters

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "dinov2": self.dinov2.to_dict()}

    @classmethod
    def from_dict(cls, data: Any, where: str, require_all: bool = True):
        """From :meth:`to_dict` output; every field must be present unless ``require_all`` is False."""
        kwargs = strict_fields(cls, data, where, require_all)
        dinov2 = dinov2_from_dict(kwargs.pop("dinov2", None), where, require_all)
        return scalar_dataclass(cls, kwargs, where, require_all=False, dinov2=dinov2 or dinov2_config("dinov2_vitb14"))


def preprocess_from_dict(data: Any, where: str, require_all: bool = False) -> PreprocessSpec:
    """A :class:`PreprocessSpec` from its JSON object (lists for ``size``, ``mean``, ``std``)."""
    kwargs = strict_fields(PreprocessSpec, data, where, require_all)
    for name in ("size", "mean", "std"):
        if isinstance(kwargs.get(name), list):
            kwargs[name] = tuple(kwargs[name])
    return construct(PreprocessSpec, kwargs, where)
