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
The strict JSON readers and field checks the families share live in :mod:`~attllm_jax.models.fields` (below the
families; this module is above the registry, docs/DESIGN.md "Layers"). Adding a family means: a model module with
its spec class, a conversion module with its key table, and one registry entry. An unknown or missing field is a
:class:`ConfigError` naming the file and the field.

Directories written by release 0.1.0 (a flat dict without ``format``) are read by the registry
(:func:`~attllm_jax.models.registry.spec_parts_from_format_1`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Protocol

from attllm_jax.data.preprocess import PreprocessSpec
from attllm_jax.models import registry
from attllm_jax.models.dinov2 import dinov2_config
from attllm_jax.models.fields import (  # noqa: F401  (ConfigError, Provenance and the readers are public here too)
    ConfigError,
    DinoV2HeadSpec,
    Provenance,
    check_dinov2,
    check_positive_ints,
    construct,
    dinov2_from_dict,
    preprocess_from_dict,
    scalar_dataclass,
    strict_fields,
    typed_value,
)
from attllm_jax.models.heads import CnnSpec
from attllm_jax.models.salad import SaladSpec

FORMAT_VERSION = 2


class ArchitectureSpec(Protocol):
    """What a family's architecture dataclass provides (see ``CnnSpec``, ``SaladSpec``)."""

    @property
    def backbone(self) -> str: ...

    @property
    def descriptor_dim(self) -> int: ...

    def to_dict(self) -> dict: ...

    def build(self, rngs=None): ...


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
        return cls(
            "cosplace", CnnSpec(backbone, descriptor_dim), PreprocessSpec.shorter_side(), Provenance(**provenance)
        )

    @classmethod
    def eigenplaces(cls, backbone: str = "resnet50", descriptor_dim: int = 2048, **provenance) -> ModelSpec:
        """An EigenPlaces network (CosPlace's architecture), shorter side 512."""
        arch = CnnSpec(backbone, descriptor_dim)
        return cls("eigenplaces", arch, PreprocessSpec.shorter_side(), Provenance(**provenance))

    @classmethod
    def salad(cls, dinov2: str = "dinov2_vitb14", image_size=(322, 322), **provenance) -> ModelSpec:
        """A DINOv2 + SALAD network with the released head sizes, 322 x 322 input."""
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
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source} must hold a JSON object, got {type(data).__name__}")
        if "format" not in data:
            family, arch, preprocess, provenance = registry.spec_parts_from_format_1(dict(data), source)
            return construct(
                cls, dict(family=family, architecture=arch, preprocess=preprocess, provenance=provenance), source
            )
        if data["format"] != FORMAT_VERSION:
            raise ConfigError(
                f"{source}: field 'format' is {data['format']!r}; this release reads format {FORMAT_VERSION} "
                "(and 0.1.0 files without 'format')"
            )
        top = strict_fields(cls, {k: v for k, v in data.items() if k != "format"}, source, require_all=True)
        family = registry.family_name(top["family"], source)
        entry = registry.family_entry(family)
        arch = entry.architecture.from_dict(top["architecture"], f"{source}: architecture")
        preprocess = preprocess_from_dict(top["preprocess"], f"{source}: preprocess", require_all=True)
        provenance = scalar_dataclass(Provenance, top["provenance"], f"{source}: provenance", require_all=True)
        return construct(
            cls, dict(family=family, architecture=arch, preprocess=preprocess, provenance=provenance), source
        )
