"""The CosPlace / EigenPlaces aggregation head and the full CNN network.

Upstream (gmberton/CosPlace ``GeoLocalizationNet``, EigenPlaces the same) aggregates a backbone map with
``L2Norm(channels) -> GeM(p learned) -> Flatten -> Linear -> L2Norm``. Here the GeM step goes through
:func:`attllm_jax.ops.gem`, or :func:`attllm_jax.ops.modulated_gem` when an attention map is given.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from attllm_jax import ops
from attllm_jax.data.preprocess import PreprocessSpec
from attllm_jax.models.features import CnnFeatures
from attllm_jax.models.fields import ConfigError, scalar_dataclass
from attllm_jax.models.resnet import ResNet, resnet_config
from attllm_jax.models.vgg import VGG, VGGConfig

GEM_EPS = 1e-6
CNN_BACKBONES = ("resnet18", "resnet50", "resnet101", "resnet152", "vgg16")


def normalize_backbone(name: str) -> str:
    """Maps upstream spellings (``"ResNet50"``, ``"VGG16"``, ``"ResNet-50"``) to ours (``"resnet50"``, ``"vgg16"``)."""
    return name.strip().lower().replace("-", "")


@dataclasses.dataclass(frozen=True)
class CnnSpec:
    """Architecture of a CosPlace / EigenPlaces network.

    Attributes:
        backbone: ``"resnet18"``, ``"resnet50"``, ``"resnet101"``, ``"resnet152"`` or ``"vgg16"`` (upstream
            spellings such as ``"ResNet50"`` are normalized).
        descriptor_dim: ``D``, the output width of the projection (upstream's ``fc_output_dim``).
        blend: how attention is blended into GeM, ``"native"`` (published) or ``"uniform"``.
    """

    backbone: str
    descriptor_dim: int
    blend: str = "native"

    FORMAT_1_FIELDS: ClassVar[tuple[str, ...]] = ("backbone", "descriptor_dim", "blend", "features_dim")

    def __post_init__(self):
        if not isinstance(self.backbone, str) or normalize_backbone(self.backbone) not in CNN_BACKBONES:
            raise ValueError(f"unknown CNN backbone {self.backbone!r}; valid: {', '.join(CNN_BACKBONES)}")
        object.__setattr__(self, "backbone", normalize_backbone(self.backbone))
        if isinstance(self.descriptor_dim, bool) or int(self.descriptor_dim) != self.descriptor_dim:
            raise ValueError(f"descriptor_dim must be a positive int, got {self.descriptor_dim!r}")
        if int(self.descriptor_dim) < 1:
            raise ValueError(f"descriptor_dim must be a positive int, got {self.descriptor_dim!r}")
        object.__setattr__(self, "descriptor_dim", int(self.descriptor_dim))
        if self.blend not in ops.BLENDS:
            raise ValueError(f"unknown blend {self.blend!r}; valid: {', '.join(ops.BLENDS)}")

    @property
    def features_dim(self) -> int:
        """Channels ``C`` of the backbone map (512 for ResNet-18 and VGG-16, else 2048)."""
        return 512 if self.backbone in ("resnet18", "vgg16") else 2048

    @staticmethod
    def default_preprocess() -> PreprocessSpec:
        """Shorter side 512, bilinear, ImageNet normalization (upstream's evaluation transform)."""
        return PreprocessSpec.shorter_side(512)

    def build(self, rngs: nnx.Rngs | None = None) -> GeoLocalizationNet:
        """The network with random weights (``nnx.Rngs(0)`` unless given)."""
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        backbone = (
            VGG(VGGConfig(), rngs=rngs) if self.backbone == "vgg16" else ResNet(resnet_config(self.backbone), rngs=rngs)
        )
        head = GeMHead(backbone.out_channels, self.descriptor_dim, blend=self.blend, rngs=rngs)
        return GeoLocalizationNet(backbone, head)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str) -> CnnSpec:
        """From :meth:`to_dict` output; every field must be present."""
        return scalar_dataclass(cls, data, where, require_all=True)

    @classmethod
    def from_format_1(cls, data: dict, where: str) -> CnnSpec:
        """From release 0.1.0's flat fields; ``features_dim`` (derived) is checked and dropped."""
        features_dim = data.pop("features_dim", None)
        spec = scalar_dataclass(cls, data, where)
        if features_dim is not None and features_dim != spec.features_dim:
            raise ConfigError(
                f"{where}: field 'features_dim' is {features_dim!r}, a {spec.backbone} has {spec.features_dim}"
            )
        return spec


class GeMHead(nnx.Module):
    """``L2 norm -> GeM -> Linear -> L2 norm`` over a ``[B, h, w, C]`` feature map.

    Attributes:
        p: the GeM exponent, shape ``[1]`` as upstream's ``aggregation.1.p``.
        fc: the projection, upstream's ``aggregation.3``.
        blend: how attention is blended in, ``"native"`` (published) or ``"uniform"``; see ``ops.modulated_gem``.
    """

    def __init__(self, in_features: int, out_features: int, p: float = 3.0, blend: str = "native", *, rngs: nnx.Rngs):
        if blend not in ops.BLENDS:
            raise ValueError(f"unknown blend {blend!r}; valid: {', '.join(ops.BLENDS)}")
        self.p = nnx.Param(jnp.full((1,), p, jnp.float32))
        self.fc = nnx.Linear(in_features, out_features, rngs=rngs)
        self.blend = blend

    def pool(self, x: jax.Array, attention: jax.Array | None = None, alpha: jax.Array | float = 0.0) -> jax.Array:
        """L2 norm over channels then (modulated) GeM: ``[B, h, w, C]`` -> ``[B, C]``."""
        x = ops.l2_normalize(x, axis=-1)
        p = self.p[...][0]
        if attention is None:
            return ops.gem(x, p=p, eps=GEM_EPS)
        return ops.modulated_gem(x, attention, alpha, p=p, eps=GEM_EPS, blend=self.blend)

    def __call__(self, x: jax.Array, attention: jax.Array | None = None, alpha: jax.Array | float = 0.0) -> jax.Array:
        """Aggregates ``[B, h, w, C]`` (attention ``[B, h', w']``, alpha ``[]`` or ``[B]``) into ``[B, D]``."""
        return ops.l2_normalize(self.fc(self.pool(x, attention, alpha)), axis=-1)


class GeoLocalizationNet(nnx.Module):
    """A CosPlace / EigenPlaces network: ``backbone`` (ResNet or VGG) then ``aggregation`` (:class:`GeMHead`)."""

    def __init__(self, backbone: ResNet | VGG, aggregation: GeMHead):
        self.backbone = backbone
        self.aggregation = aggregation

    def features(self, images: jax.Array) -> CnnFeatures:
        """``[B, H, W, 3]`` ImageNet-normalized -> the raw backbone map ``[B, h, w, C]``."""
        return CnnFeatures(self.backbone(images))

    def aggregate(
        self, feats: CnnFeatures, attention: jax.Array | None = None, alpha: jax.Array | float = 0.0
    ) -> jax.Array:
        """Backbone map -> L2-normalized descriptors ``[B, D]``.

        Args:
            feats: output of :meth:`features`.
            attention: optional ``[B, h', w']`` map, resized to ``[h, w]`` inside ``ops.modulated_gem``.
            alpha: blend factor, a scalar or ``[B]`` (may be traced, e.g. under ``jax.vmap``).
        """
        if not isinstance(feats, CnnFeatures):
            raise ValueError(f"CosPlace / EigenPlaces features must be CnnFeatures, got {type(feats).__name__}")
        return self.aggregation(feats.maps, attention, alpha)

    def __call__(
        self, images: jax.Array, attention: jax.Array | None = None, alpha: jax.Array | float = 0.0
    ) -> jax.Array:
        """``[B, H, W, 3]`` -> ``[B, D]``; equals ``aggregate(features(images), attention, alpha)``."""
        return self.aggregate(self.features(images), attention, alpha)
