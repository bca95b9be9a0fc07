"""The typed description of a model: :class:`ModelSpec` = family + architecture + preprocessing + provenance.

A converter returns ``(net, spec)``; :func:`attllm_jax.checkpoint.save_model` writes ``spec.to_dict()`` to
``config.json``; :func:`attllm_jax.checkpoint.load_model` reads it back with :meth:`ModelSpec.from_dict` and builds
the network with :meth:`ModelSpec.build`; ``VPRModel.spec``, the descriptor-store key and ``results.json["model"]``
all come from it. ``config.json`` (format :data:`FORMAT_VERSION`)::

    {"format": 2, "family": "cosplace",
     "architecture": {"backbone": "resnet50", "descriptor_dim": 2048, "blend": "native"},
     "preprocess": {"resize": "shorter_side", "size": 512, "interpolation": "bilinear", "antialias": true,
                    "mean": [...], "std": [...]},
     "provenance": {"source_file": ..., "source_sha256": ..., "published_file": ..., "converter_version": ...,
                    "weights": null}}

The architecture is the family's own frozen dataclass (``CnnSpec`` in :mod:`~attllm_jax.models.heads`, ``SaladSpec``
in :mod:`~attllm_jax.models.salad`, ``MegaLocSpec`` in :mod:`~attllm_jax.models.megaloc`, ``BoQSpec`` in
:mod:`~attllm_jax.models.boq`), found through :mod:`~attllm_jax.models.registry`; it provides what
:class:`ArchitectureSpec` lists plus ``from_dict``, ``from_format_1``, ``default_preprocess`` and ``FORMAT_1_FIELDS``.
The architectures made of a DINOv2 and a head of positive-int sizes (SALAD, MegaLoc) share
:class:`DinoV2HeadSpec`; the field checks (:func:`check_positive_ints`, :func:`check_dinov2`) and the strict JSON
readers (:func:`strict_fields`, :func:`scalar_dataclass`, :func:`dinov2_from_dict`) live here for every family.
Adding a family means: a model module with its spec class, a conversion module with its key table, and one
registry entry. An unknown or missing field is a :class:`ConfigError` naming the file and the field.

Directories written by release 0.1.0 (a flat dict without ``format``) are read by :func:`_from_format_1`; their
redundant fields (``gem_p``, which the weights hold, ``image_size``, which the preprocessing holds, and the derived
``features_dim`` / SALAD ``descriptor_dim``, which are checked) are dropped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from attllm_jax.data.preprocess import PreprocessSpec
from attllm_jax.models.dinov2 import DinoV2Config, dinov2_config, preset_name

FORMAT_VERSION = 2


class ConfigError(ValueError):
    """A model ``config.json`` (or spec dict) is malformed; the message names the file and the field."""


class ArchitectureSpec(Protocol):
    """What a family's architecture dataclass provides (see ``CnnSpec``, ``SaladSpec``)."""

    @property
    def backbone(self) -> str: ...

    @property
    def descriptor_dim(self) -> int: ...

    def to_dict(self) -> dict: ...

    def build(self, rngs=None): ...


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


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything a model directory says about its network, besides the weights.

    Attributes:
        family: ``"cosplace"``, ``"eigenplaces"``, ``"salad"`` (see ``registry.FAMILIES``).
        architecture: the family's architecture dataclass (``CnnSpec``, ``SaladSpec``).
        preprocess: the evaluation transform.
        provenance: where the weights came from.
    """

    family: str
    architecture: ArchitectureSpec
    preprocess: PreprocessSpec
    provenance: Provenance = Provenance()

    def __post_init__(self):
        from attllm_jax.models import registry

        entry = registry.family_entry(self.family)
        if not isinstance(self.architecture, entry.architecture):
            raise ValueError(
                f"a {self.family} model needs a {entry.architecture.__name__} architecture, "
                f"got {type(self.architecture).__name__}"
            )

    # ------------------------------------------------------------------------------------------ presets
    @classmethod
    def cosplace(cls, backbone: str = "resnet50", descriptor_dim: int = 2048, **provenance) -> ModelSpec:
        """A CosPlace network (ResNet-18/50/101/152 or VGG-16), shorter side 512."""
        from attllm_jax.models.heads import CnnSpec

        return cls(
            "cosplace", CnnSpec(backbone, descriptor_dim), PreprocessSpec.shorter_side(), Provenance(**provenance)
        )

    @classmethod
    def eigenplaces(cls, backbone: str = "resnet50", descriptor_dim: int = 2048, **provenance) -> ModelSpec:
        """An EigenPlaces network (CosPlace's architecture), shorter side 512."""
        from attllm_jax.models.heads import CnnSpec

        arch = CnnSpec(backbone, descriptor_dim)
        return cls("eigenplaces", arch, PreprocessSpec.shorter_side(), Provenance(**provenance))

    @classmethod
    def salad(cls, dinov2: str = "dinov2_vitb14", image_size=(322, 322), **provenance) -> ModelSpec:
        """A DINOv2 + SALAD network with the released head sizes, 322 x 322 input."""
        from attllm_jax.models.dinov2 import dinov2_config
        from attllm_jax.models.salad import SaladSpec

        arch = SaladSpec(dinov2=dinov2_config(dinov2))
        return cls("salad", arch, PreprocessSpec.exact(image_size), Provenance(**provenance))

    # ------------------------------------------------------------------------------------------ views
    @property
    def backbone(self) -> str:
        """The backbone's name (``"resnet50"``, ``"vgg16"``, ``"dinov2_vitb14"``, ``"dinov2_custom"``)."""
        return self.architecture.backbone

    @property
    def descriptor_dim(self) -> int:
        """Output descriptor dimension ``D``."""
        return int(self.architecture.descriptor_dim)

    def describe(self) -> str:
        """``"cosplace resnet18/512"``: a short label for logs and plots."""
        return f"{self.family} {self.backbone}/{self.descriptor_dim}"

    def build(self, rngs=None):
        """The network this spec describes, with random weights (``nnx.Rngs(0)`` unless given)."""
        return self.architecture.build(rngs)

    def replace(self, **changes) -> ModelSpec:
        """A copy with some fields changed (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------------------------------ JSON
    def to_dict(self) -> dict:
        """The ``config.json`` object (format :data:`FORMAT_VERSION`)."""
        return {
            "format": FORMAT_VERSION,
            "family": self.family,
            "architecture": self.architecture.to_dict(),
            "preprocess": self.preprocess.to_dict(),
            "provenance": self.provenance.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = "config.json") -> ModelSpec:
        """Parses a ``config.json`` object (format 2, or release 0.1.0's flat format without ``format``).

        Args:
            data: the parsed JSON.
            source: the file name used in messages.

        Raises:
            ConfigError: an unknown format, family or field, a missing field, or a value the spec rejects.
        """
        from attllm_jax.models import registry

        if not isinstance(data, Mapping):
            raise ConfigError(f"{source} must hold a JSON object, got {type(data).__name__}")
        if "format" not in data:
            return _from_format_1(dict(data), source)
        if data["format"] != FORMAT_VERSION:
            raise ConfigError(
                f"{source}: field 'format' is {data['format']!r}; this release reads format {FORMAT_VERSION} "
                "(and 0.1.0 files without 'format')"
            )
        top = strict_fields(cls, {k: v for k, v in data.items() if k != "format"}, source, require_all=True)
        family = _family(top["family"], source)
        entry = registry.family_entry(family)
        arch = entry.architecture.from_dict(top["architecture"], f"{source}: architecture")
        preprocess = preprocess_from_dict(top["preprocess"], f"{source}: preprocess", require_all=True)
        provenance = scalar_dataclass(Provenance, top["provenance"], f"{source}: provenance", require_all=True)
        return construct(
            cls, dict(family=family, architecture=arch, preprocess=preprocess, provenance=provenance), source
        )


def _family(value: Any, source: str) -> str:
    from attllm_jax.models import registry

    if not isinstance(value, str) or value.lower() not in registry.FAMILIES:
        raise ConfigError(f"{source}: field 'family' must be one of {', '.join(registry.FAMILIES)}, got {value!r}")
    return value.lower()


def preprocess_from_dict(data: Any, where: str, require_all: bool = False) -> PreprocessSpec:
    """A :class:`PreprocessSpec` from its JSON object (lists for ``size``, ``mean``, ``std``)."""
    kwargs = strict_fields(PreprocessSpec, data, where, require_all)
    for name in ("size", "mean", "std"):
        if isinstance(kwargs.get(name), list):
            kwargs[name] = tuple(kwargs[name])
    return construct(PreprocessSpec, kwargs, where)


# Release 0.1.0 wrote one flat dict per model: the family's architecture fields (``FORMAT_1_FIELDS`` of its
# architecture class, which checks the derived ones), provenance fields, and two redundant ones dropped here.
_FORMAT_1_PROVENANCE = ("source_file", "source_sha256", "published_file", "converter_version", "weights")
_FORMAT_1_DROPPED = ("image_size", "gem_p")  # the preprocessing holds the size; the weights hold GeM's p


def _from_format_1(data: dict, source: str) -> ModelSpec:
    from attllm_jax.models import registry

    if "family" not in data:
        raise ConfigError(f"{source}: missing field 'family'")
    family = _family(data.pop("family"), source)
    arch_cls = registry.family_entry(family).architecture
    provenance = {k: data.pop(k) for k in _FORMAT_1_PROVENANCE if k in data}
    for k in _FORMAT_1_DROPPED:
        data.pop(k, None)
    preprocess = data.pop("preprocess", None)
    arch_fields = {k: data.pop(k) for k in arch_cls.FORMAT_1_FIELDS if k in data}
    if data:
        valid = ("family", "preprocess") + arch_cls.FORMAT_1_FIELDS + _FORMAT_1_PROVENANCE + _FORMAT_1_DROPPED
        raise ConfigError(
            f"{source}: unknown field {sorted(data)[0]!r} for a {family} model (format 1, release 0.1.0); "
            f"valid fields: {', '.join(valid)}"
        )
    arch = arch_cls.from_format_1(arch_fields, source)
    if preprocess is None:  # 0.1.0 used the family default then
        preprocess = arch_cls.default_preprocess()
    else:
        preprocess = preprocess_from_dict(preprocess, f"{source}: preprocess")
    provenance = scalar_dataclass(Provenance, provenance, f"{source}: provenance")
    return construct(
        ModelSpec, dict(family=family, architecture=arch, preprocess=preprocess, provenance=provenance), source
    )
