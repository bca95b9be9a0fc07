"""The published checkpoints of every supported family, and building a network from a config dict.

A config (``config.json`` written by a converter) names the family and backbone; :func:`build_net` turns it into
an NNX module with the right shapes (weights random until restored or filled by a converter).
"""

from __future__ import annotations

import dataclasses

from flax import nnx

CNN_FAMILIES = ("cosplace", "eigenplaces")
FAMILIES = CNN_FAMILIES + ("salad",)
CNN_BACKBONES = ("resnet18", "resnet50", "resnet101", "resnet152", "vgg16")

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
        url: the release download URL.
    """

    family: str
    backbone: str
    descriptor_dim: int
    file_name: str
    url: str


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
_RELEASES = {
    "cosplace": "https://github.com/gmberton/CosPlace/releases/download/v1.0",
    "eigenplaces": "https://github.com/gmberton/EigenPlaces/releases/download/v1.0",
}


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
    + [
        PublishedCheckpoint(
            "salad",
            "dinov2_vitb14",
            8448,
            "dino_salad.ckpt",
            "https://github.com/serizba/salad/releases/download/v1.0.0/dino_salad.ckpt",
        )
    ]
)


def normalize_backbone(name: str) -> str:
    """Maps upstream spellings (``"ResNet50"``, ``"VGG16"``, ``"ResNet-50"``) to ours (``"resnet50"``, ``"vgg16"``)."""
    return name.strip().lower().replace("-", "")


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


def build_net(config: dict, rngs: nnx.Rngs | None = None) -> nnx.Module:
    """Builds the network a config describes (random weights).

    Args:
        config: a converter's config; ``config["family"]`` selects the builder. CNN families need
            ``backbone`` and ``descriptor_dim`` (optional ``blend``); SALAD's keys are read by
            :func:`attllm_jax.models.salad.build_salad_net`.
        rngs: initializers' randomness; defaults to ``nnx.Rngs(0)``.

    Raises:
        ValueError: unknown family or backbone, or a missing key.
    """
    family = str(config.get("family", "")).lower()
    if family in CNN_FAMILIES:
        return build_cnn_net(config, rngs)
    if family == "salad":
        from attllm_jax.models.salad import build_salad_net

        return build_salad_net(config, rngs=rngs)
    raise ValueError(f"unknown model family {config.get('family')!r} in config; valid: {', '.join(FAMILIES)}")


def build_cnn_net(config: dict, rngs: nnx.Rngs | None = None) -> nnx.Module:
    """A CosPlace / EigenPlaces :class:`~attllm_jax.models.heads.GeoLocalizationNet` from a config."""
    from attllm_jax.models.heads import GeMHead, GeoLocalizationNet
    from attllm_jax.models.resnet import ResNet, resnet_config
    from attllm_jax.models.vgg import VGG, VGGConfig

    missing = [k for k in ("backbone", "descriptor_dim") if k not in config]
    if missing:
        raise ValueError(f"{config.get('family')} config lacks {missing}")
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    backbone_name = normalize_backbone(str(config["backbone"]))
    if backbone_name not in CNN_BACKBONES:
        raise ValueError(f"unknown CNN backbone {config['backbone']!r}; valid: {', '.join(CNN_BACKBONES)}")
    backbone = (
        VGG(VGGConfig(), rngs=rngs) if backbone_name == "vgg16" else ResNet(resnet_config(backbone_name), rngs=rngs)
    )
    head = GeMHead(backbone.out_channels, int(config["descriptor_dim"]), blend=config.get("blend", "native"), rngs=rngs)
    return GeoLocalizationNet(backbone, head)
