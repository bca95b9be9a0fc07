"""The model families (one entry each) and the published checkpoints of every family.

A family entry names the family's architecture spec class (which parses its part of ``config.json`` and builds the
network) and the module holding its conversion key table. Adding a family means: a model module with its
architecture spec class, a conversion module with its key table, and one entry in :data:`FAMILY_ENTRIES` (plus its
published files in :data:`PUBLISHED`). The registry also reads release 0.1.0's flat ``config.json``
(:func:`spec_parts_from_format_1`). It sits above the family modules and below :mod:`~attllm_jax.models.spec`.
"""

from __future__ import annotations

import dataclasses
import importlib
from types import ModuleType
from typing import Any

from attllm_jax.data.preprocess import PreprocessSpec
from attllm_jax.models.boq import BoQSpec
from attllm_jax.models.fields import ConfigError, Provenance, preprocess_from_dict, scalar_dataclass
from attllm_jax.models.heads import CNN_BACKBONES, CnnSpec, normalize_backbone
from attllm_jax.models.image4vpr import ImAgeSpec
from attllm_jax.models.megaloc import MegaLocSpec
from attllm_jax.models.mixvpr import MixVPRSpec
from attllm_jax.models.netvlad import NetVLADSpec
from attllm_jax.models.salad import SaladSpec
from attllm_jax.models.supervlad import SuperVLADSpec


@dataclasses.dataclass(frozen=True)
class FamilyEntry:
    """One model family.

    Attributes:
        name: the ``family`` field of ``config.json``.
        architecture: the architecture spec class (``from_dict``, ``from_format_1``, ``default_preprocess``,
            ``build``, ``to_dict``; ``FORMAT_1_FIELDS``).
        conversion: the module with ``convert_state_dict(state_dict, family, source_name, options)``, its frozen
            ``Options`` dataclass and its key table (imported only when converting).
    """

    name: str
    architecture: type
    conversion: str

    def conversion_module(self) -> ModuleType:
        return importlib.import_module(self.conversion)


FAMILY_ENTRIES: dict[str, FamilyEntry] = {
    "cosplace": FamilyEntry("cosplace", CnnSpec, "attllm_jax.convert.cosplace"),
    "eigenplaces": FamilyEntry("eigenplaces", CnnSpec, "attllm_jax.convert.cosplace"),
    "salad": FamilyEntry("salad", SaladSpec, "attllm_jax.convert.salad"),
    "megaloc": FamilyEntry("megaloc", MegaLocSpec, "attllm_jax.convert.megaloc"),
    "boq": FamilyEntry("boq", BoQSpec, "attllm_jax.convert.boq"),
    "mixvpr": FamilyEntry("mixvpr", MixVPRSpec, "attllm_jax.convert.mixvpr"),
    "netvlad": FamilyEntry("netvlad", NetVLADSpec, "attllm_jax.convert.netvlad"),
    "supervlad": FamilyEntry("supervlad", SuperVLADSpec, "attllm_jax.convert.supervlad"),
    "image4vpr": FamilyEntry("image4vpr", ImAgeSpec, "attllm_jax.convert.image4vpr"),
}
FAMILIES = tuple(FAMILY_ENTRIES)
CNN_FAMILIES = tuple(name for name, e in FAMILY_ENTRIES.items() if e.architecture is CnnSpec)
__all__ = ["CNN_BACKBONES", "CNN_FAMILIES", "FAMILIES", "FAMILY_ENTRIES", "PUBLISHED", "family_entry", "lookup"]


def family_entry(family: str) -> FamilyEntry:
    """The entry of ``family`` (case-insensitive).

    Raises:
        ValueError: unknown family; the message lists the known ones.
    """
    key = str(family).strip().lower()
    if key not in FAMILY_ENTRIES:
        raise ValueError(f"unknown model family {family!r}; valid: {', '.join(FAMILY_ENTRIES)}")
    return FAMILY_ENTRIES[key]


# Upstream spells backbones "ResNet50", "VGG16" in file names and flags.
UPSTREAM_BACKBONE_NAMES = {
    "resnet18": "ResNet18",
    "resnet50": "ResNet50",
    "resnet101": "ResNet101",
    "resnet152": "ResNet152",
    "vgg16": "VGG16",
}


@dataclasses.dataclass(frozen=True)
class PublishedCheckpoint:
    """One released checkpoint.

    Attributes:
        family: ``"cosplace"``, ``"eigenplaces"`` or ``"salad"``.
        backbone: our backbone name (``"resnet50"``, ``"vgg16"``, ``"dinov2_vitb14"``).
        descriptor_dim: output descriptor dimension.
        file_name: the release asset's file name.
        url: the release download URL (or, for ``auto_download=False`` files, the page to fetch it from by hand).
        sha256: the SHA-256 upstream publishes for the file, or None (no upstream listed here publishes one).
        size_bytes: the size upstream publishes, or None.
        auto_download: whether a converter fetches it when no ``--checkpoint`` is given (False for a file behind
            a web page, e.g. Google Drive, and for a superseded release of a family that has a newer one).
        method: the method's name when it differs from the family's (CliqueMining is a SALAD checkpoint).
    """

    family: str
    backbone: str
    descriptor_dim: int
    file_name: str
    url: str
    sha256: str | None = None
    size_bytes: int | None = None
    auto_download: bool = True
    method: str | None = None


# fc_output_dim lists as in each upstream hubconf.py (AVAILABLE_TRAINED_MODELS).
_COSPLACE_DIMS = {
    "vgg16": (64, 128, 256, 512),
    "resnet18": (32, 64, 128, 256, 512),
    "resnet50": (32, 64, 128, 256, 512, 1024, 2048),
    "resnet101": (32, 64, 128, 256, 512, 1024, 2048),
    "resnet152": (32, 64, 128, 256, 512, 1024, 2048),
}
_EIGENPLACES_DIMS = {
    "vgg16": (512,),
    "resnet18": (256, 512),
    "resnet50": (128, 256, 512, 1024, 2048),
    "resnet101": (128, 256, 512, 1024, 2048),
}
# MixVPR (amaralibey/MixVPR README; VPR-methods-evaluation vpr_models/mixvpr.py MODELS_INFO): plain state dicts on
# Google Drive; download them by hand. descriptor -> (Drive file id, channels, rows).
_MIXVPR_FILES = {
    128: ("1DQnefjk1hVICOEYPwE4-CZAZOvi1NSJz", 64, 2),
    512: ("1khiTUNzZhfV2UUupZoIsPIbsMRBYVDqj", 256, 2),
    4096: ("1vuz3PvnR7vxnDDLQrdHJaOA04SQrtk5L", 1024, 4),
}
_HLOC_NETVLAD = "https://cvg-data.inf.ethz.ch/hloc/netvlad"
_RELEASES = {
    "cosplace": "https://github.com/gmberton/CosPlace/releases/download/v1.0",
    "eigenplaces": "https://github.com/gmberton/EigenPlaces/releases/download/v1.0",
}


def _mixvpr_entries() -> list[PublishedCheckpoint]:
    return [
        PublishedCheckpoint(
            "mixvpr",
            "resnet50",
            dim,
            f"resnet50_MixVPR_{dim}_channels({channels})_rows({rows}).ckpt",
            f"https://drive.google.com/file/d/{file_id}/view",
            auto_download=False,
        )
        for dim, (file_id, channels, rows) in _MIXVPR_FILES.items()
    ]


def _cnn_entries(family: str, dims: dict[str, tuple[int, ...]]) -> list[PublishedCheckpoint]:
    out = []
    for backbone, dim_list in dims.items():
        for dim in dim_list:
            name = f"{UPSTREAM_BACKBONE_NAMES[backbone]}_{dim}_{family}.pth"
            out.append(PublishedCheckpoint(family, backbone, dim, name, f"{_RELEASES[family]}/{name}"))
    return out


PUBLISHED: tuple[PublishedCheckpoint, ...] = tuple(
    _cnn_entries("cosplace", _COSPLACE_DIMS)
    + _cnn_entries("eigenplaces", _EIGENPLACES_DIMS)
    + _mixvpr_entries()
    + [
        # NetVLAD (hloc extractors/netvlad.py; VPR-methods-evaluation vpr_models/netvlad.py): one MATLAB struct file
        # gives the 4096-d (PCA-whitened) and the 32768-d descriptor. TokyoTM is hloc's second network.
        *(
            PublishedCheckpoint("netvlad", "vgg16", dim, "Pitts30K_struct.mat", f"{_HLOC_NETVLAD}/Pitts30K_struct.mat")
            for dim in (4096, 32768)
        ),
        PublishedCheckpoint(
            "netvlad",
            "vgg16",
            4096,
            "TokyoTM_struct.mat",
            f"{_HLOC_NETVLAD}/TokyoTM_struct.mat",
            auto_download=False,
            method="netvlad-tokyotm",
        ),
        PublishedCheckpoint(
            "salad",
            "dinov2_vitb14",
            8448,
            "dino_salad.ckpt",
            "https://github.com/serizba/salad/releases/download/v1.0.0/dino_salad.ckpt",
        ),
        # CliqueMining (serizba/cliquemining README; VPR-methods-evaluation vpr_models/clique_mining.py): the SALAD
        # architecture, a Lightning {"state_dict": ...} file on Google Drive; download it by hand.
        PublishedCheckpoint(
            "salad",
            "dinov2_vitb14",
            8448,
            "cliquemining.ckpt",
            "https://drive.google.com/file/d/1B06ysb-Wjb4KDcNrl-7pyj1mJve1jqdk/view",
            auto_download=False,
            method="cliquemining",
        ),
        # MegaLoc (gmberton/MegaLoc hubconf.py at HEAD: hf_hub_download("gberton/MegaLoc", "model.safetensors");
        # before 2026-01-21 the GitHub release asset megaloc.torch, which converts too).
        PublishedCheckpoint(
            "megaloc",
            "dinov2_vitb14",
            8448,
            "model.safetensors",
            "https://huggingface.co/gberton/MegaLoc/resolve/main/model.safetensors",
        ),
        PublishedCheckpoint(
            "megaloc",
            "dinov2_vitb14",
            8448,
            "megaloc.torch",
            "https://github.com/gmberton/MegaLoc/releases/download/v1.0/megaloc.torch",
            auto_download=False,
        ),
        # BoQ (amaralibey/Bag-of-Queries hubconf.py MODEL_URLS).
        PublishedCheckpoint(
            "boq",
            "dinov2_vitb14",
            12288,
            "dinov2_12288.pth",
            "https://github.com/amaralibey/Bag-of-Queries/releases/download/v1.0/dinov2_12288.pth",
        ),
        PublishedCheckpoint(
            "boq",
            "resnet50",
            16384,
            "resnet50_16384.pth",
            "https://github.com/amaralibey/Bag-of-Queries/releases/download/v1.0/resnet50_16384.pth",
        ),
        # SuperVLAD (Lu-Feng/SuperVLAD README; VPR-methods-evaluation vpr_models/supervlad.py MODELS_INFO, which
        # saves them as trained_models/supervlad/<name>.pth): Google Drive files, download them by hand.
        # 1-ClusterVLAD needs --ghost_clusters 2. SuperVLAD-CrossImage is not supported (batch-dependent encoder).
        PublishedCheckpoint(
            "supervlad",
            "dinov2_vitb14",
            3072,
            "SuperVLAD.pth",
            "https://drive.google.com/file/d/1wRkUO4E8s5hNRNNIWcuA8RUvlGob3Tbf/view",
            auto_download=False,
        ),
        PublishedCheckpoint(
            "supervlad",
            "dinov2_vitb14",
            768,
            "1-ClusterVLAD.pth",
            "https://drive.google.com/file/d/1pQcJx9n2-keAh9TttssZkz6D0vjpFWU6/view",
            auto_download=False,
            method="1-clustervlad",
        ),
        # ImAge (Lu-Feng/ImAge hubconf.py; the README also links the same files on huggingface.co/fenglu96/ImAge4VPR).
        # Merged is hubconf's default training set.
        PublishedCheckpoint(
            "image4vpr",
            "dinov2_vitb14_reg",
            6144,
            "ImAge_Merged.pth",
            "https://github.com/Lu-Feng/ImAge/releases/download/v1.0.0/ImAge_Merged.pth",
        ),
        PublishedCheckpoint(
            "image4vpr",
            "dinov2_vitb14_reg",
            6144,
            "ImAge_GSV.pth",
            "https://github.com/Lu-Feng/ImAge/releases/download/v1.0.0/ImAge_GSV.pth",
            auto_download=False,
        ),
    ]
)


def valid_combinations(family: str | None = None) -> list[str]:
    """``"family/backbone/dim"`` for every published checkpoint (of one family when given)."""
    return [f"{e.family}/{e.backbone}/{e.descriptor_dim}" for e in PUBLISHED if family in (None, e.family)]


def lookup(family: str, backbone: str, dim: int) -> PublishedCheckpoint:
    """Finds a published checkpoint.

    Args:
        family: ``"cosplace"``, ``"eigenplaces"`` or ``"salad"`` (case-insensitive).
        backbone: e.g. ``"ResNet50"`` / ``"resnet50"`` / ``"dinov2_vitb14"``.
        dim: descriptor dimension.

    Raises:
        ValueError: no such release; the message lists the valid combinations.
    """
    fam, bb = family.strip().lower(), normalize_backbone(backbone)
    for entry in PUBLISHED:
        if (entry.family, entry.backbone, entry.descriptor_dim) == (fam, bb, int(dim)):
            return entry
    valid = valid_combinations(fam if fam in FAMILIES else None)
    raise ValueError(
        f"no published checkpoint for family={family!r} backbone={backbone!r} dim={dim}; valid "
        f"(family/backbone/dim): {', '.join(valid)}"
    )


def published_by_sha256(sha256: str | None) -> PublishedCheckpoint | None:
    """The published checkpoint whose SHA-256 is ``sha256``, or None.

    Only the content identifies a release: a renamed copy of a published file is found, while a file that merely
    carries a release's name or architecture (e.g. random weights saved as ``ResNet18_512_cosplace.pth``) is not.
    Entries whose upstream publishes no SHA-256 match nothing here; a file the converter downloaded from the
    entry's URL is labelled by :func:`attllm_jax.convert.convert_file` itself.
    """
    if not sha256:
        return None
    for entry in PUBLISHED:
        if entry.sha256 is not None and entry.sha256.lower() == sha256.lower():
            return entry
    return None


def find_published(family: str, backbone: str | None = None, dim: int | None = None) -> PublishedCheckpoint:
    """The one auto-downloadable published checkpoint of ``family`` matching ``backbone`` and ``dim`` (each optional).

    Raises:
        ValueError: none or several match (e.g. a CNN family without backbone and dimension; the message lists the
            valid combinations), or the match is a file to download by hand (the message gives its URL).
    """
    fam = family.strip().lower()
    matches = [
        e
        for e in PUBLISHED
        if e.family == fam
        and e.auto_download
        and (backbone is None or e.backbone == normalize_backbone(backbone))
        and (dim is None or e.descriptor_dim == int(dim))
    ]
    if len(matches) == 1:
        return matches[0]
    if backbone is not None and dim is not None and not matches:
        entry = lookup(family, backbone, dim)  # raises with the valid combinations
        raise ValueError(
            f"{entry.file_name} is not downloaded automatically: download it by hand from {entry.url} and give "
            "--checkpoint"
        )
    raise ValueError(
        f"give --checkpoint, or the backbone and descriptor dimension of a published {family} model; valid "
        f"(family/backbone/dim): {', '.join(valid_combinations(fam if fam in FAMILIES else None))}"
    )


def family_name(value: Any, source: str) -> str:
    """The ``family`` field of ``source`` in lower case.

    Raises:
        ConfigError: not one of :data:`FAMILIES` (the message names ``source`` and lists them).
    """
    if not isinstance(value, str) or value.lower() not in FAMILIES:
        raise ConfigError(f"{source}: field 'family' must be one of {', '.join(FAMILIES)}, got {value!r}")
    return value.lower()


# Release 0.1.0 wrote one flat dict per model: the family's architecture fields (``FORMAT_1_FIELDS`` of its
# architecture class, which checks the derived ones), provenance fields, and two redundant ones dropped here.
_FORMAT_1_PROVENANCE = ("source_file", "source_sha256", "published_file", "converter_version", "weights")
_FORMAT_1_DROPPED = ("image_size", "gem_p")  # the preprocessing holds the size; the weights hold GeM's p


def spec_parts_from_format_1(data: dict, source: str) -> tuple[str, Any, PreprocessSpec, Provenance]:
    """Reads a release-0.1.0 ``config.json`` (a flat object without ``format``) into the parts of a ``ModelSpec``.

    The family's architecture class takes its ``FORMAT_1_FIELDS`` (and checks the derived ones); ``gem_p`` and
    ``image_size`` are dropped (the weights and the preprocessing hold them); a missing ``preprocess`` is the
    family default, as 0.1.0 used then. 0.1.0 named the release in ``published_file`` from the file's name; that
    field is derived again from the content here: the release whose published SHA-256 is ``source_sha256``
    (:func:`published_by_sha256`), else None.

    Args:
        data: the parsed JSON object (consumed).
        source: the file name used in messages.

    Returns:
        ``(family, architecture, preprocess, provenance)``.

    Raises:
        ConfigError: a missing ``family``, an unknown field (the valid ones listed) or a value the spec rejects.
    """
    if "family" not in data:
        raise ConfigError(f"{source}: missing field 'family'")
    family = family_name(data.pop("family"), source)
    arch_cls = family_entry(family).architecture
    provenance = {k: data.pop(k) for k in _FORMAT_1_PROVENANCE if k in data}
    if "published_file" in provenance:  # 0.1.0 inferred it from the name: keep it only when the content says so
        published = published_by_sha256(provenance.get("source_sha256"))
        provenance["published_file"] = None if published is None else published.file_name
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
    if preprocess is None:
        preprocess = arch_cls.default_preprocess()
    else:
        preprocess = preprocess_from_dict(preprocess, f"{source}: preprocess")
    return family, arch, preprocess, scalar_dataclass(Provenance, provenance, f"{source}: provenance")
