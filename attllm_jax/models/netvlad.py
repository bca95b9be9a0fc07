"""NetVLAD (Arandjelovic et al., CVPR 2016) as VPR-methods-evaluation loads it (``vpr_models/netvlad.py``, after
cvg/Hierarchical-Localization ``hloc/extractors/netvlad.py``), in Flax NNX.

Input: our ImageNet-normalized ``[B, H, W, 3]`` images at their own size. As the harness does, the network undoes
the normalization (``x * std + mean``, clamped to ``[0, 1]``), scales to 0-255 RGB (clamped) and subtracts the
release's mean pixel (``pixel_mean``, read from the file's ``meta.normalization.averageImage``; std 1).

Backbone: VGG-16 ``features`` without the last ReLU and the last max-pool (conv5_3 before its ReLU, stride 16), the
same truncation as CosPlace's (:class:`~attllm_jax.models.vgg.VGG`).

Aggregation, with ``x_i`` the conv5_3 feature of location ``i`` L2-normalized over its ``D = 512`` channels
(``x / max(||x||, 1e-12)``), ``K`` clusters (64), assignment weights ``W [D, K]`` (no bias) and centres
``c_k [D]``:

- soft assignment ``a_ik = softmax_k(x_i . W_k)`` (over the clusters);
- ``V[d, k] = sum_i a_ik (x_id - c_kd)``;
- intra-normalization (each cluster's ``V[:, k]`` over ``d``), flatten D-major (element ``d * K + k``, the order the
  whitening weights expect), L2 norm (all with ``max(||.||, 1e-12)``): ``D * K = 32768`` values;
- the release's PCA-whitening layer (``32768 -> 4096``, with bias) and a final L2 norm, or none for the 32768-d
  variant.

Attention (our extension, the issue's rule): each location's contribution to every cluster's residual sum is scaled
by ``w_i``: ``V[d, k] = sum_i w_i a_ik (x_id - c_kd)`` with ``w_i = 1 + alpha (A_i - 1)`` (the native weight is
uniform) and ``A`` the attention map resized to the grid and clamped to ``[0, 2]``. ``alpha <= 1e-6`` is plain
NetVLAD. ``V`` is affine in ``w`` and so in alpha: the sums for ``w = 1`` and ``w = A`` are computed once and
blended, so an alpha sweep shares the backbone pass and the assignment.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from attllm_jax import ops
from attllm_jax.data.preprocess import IMAGENET_MEAN, IMAGENET_STD, PreprocessSpec
from attllm_jax.models.features import CnnFeatures
from attllm_jax.models.fields import ConfigError, check_positive_ints, strict_fields, typed_value
from attllm_jax.models.vgg import VGG, VGGConfig
from attllm_jax.ops.attention_maps import MAX_WEIGHT
from attllm_jax.ops.gem import ALPHA_OFF
from attllm_jax.ops.normalize import l2_normalize

VGG_CHANNELS = 512
_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class NetVLADSpec:
    """Architecture of a VGG-16 NetVLAD network.

    Attributes:
        num_clusters: ``K`` (64 released).
        whiten_dim: output of the PCA-whitening layer (4096 released), or None for the 32768-d descriptor without
            it (VPR-methods-evaluation's ``--descriptors_dimension 32768``).
    """

    num_clusters: int = 64
    whiten_dim: int | None = 4096

    FORMAT_1_FIELDS: ClassVar[tuple[str, ...]] = ()  # NetVLAD is newer than release 0.1.0

    def __post_init__(self):
        check_positive_ints(self, ["num_clusters"] + ([] if self.whiten_dim is None else ["whiten_dim"]))

    @classmethod
    def released(cls, descriptor_dim: int = 4096) -> NetVLADSpec:
        """The released Pitts30K network: 4096-d (with the whitening layer) or 32768-d (without)."""
        if descriptor_dim not in (4096, 32768):
            raise ValueError(f"NetVLAD is evaluated at 4096 or 32768 dimensions, got {descriptor_dim!r}")
        return cls(whiten_dim=4096 if descriptor_dim == 4096 else None)

    @property
    def backbone(self) -> str:
        return "vgg16"

    @property
    def vlad_dim(self) -> int:
        """``D * K`` (32768)."""
        return VGG_CHANNELS * self.num_clusters

    @property
    def descriptor_dim(self) -> int:
        """``whiten_dim``, or ``D * K`` without whitening."""
        return self.vlad_dim if self.whiten_dim is None else self.whiten_dim

    @staticmethod
    def default_preprocess() -> PreprocessSpec:
        """VPR-methods-evaluation's transform for NetVLAD: ToTensor and ImageNet Normalize at the image's own size
        (no resize); the network maps that back to 0-255 RGB minus the release's mean pixel itself."""
        return PreprocessSpec.tensor(None)

    def build(self, rngs: nnx.Rngs | None = None) -> NetVLADNet:
        """The network with random weights (``nnx.Rngs(0)`` unless given)."""
        return NetVLADNet(self, rngs=rngs if rngs is not None else nnx.Rngs(0))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str, require_all: bool = True) -> NetVLADSpec:
        """From :meth:`to_dict` output; every field must be present unless ``require_all`` is False."""
        kwargs = strict_fields(cls, data, where, require_all)
        values = {
            name: typed_value(kwargs[name], annotation, f"{where}.{name}")
            for name, annotation in (("num_clusters", "int"), ("whiten_dim", "int | None"))
            if name in kwargs
        }
        try:
            return cls(**values)
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from e

    @classmethod
    def from_format_1(cls, data: dict, where: str) -> NetVLADSpec:
        """Release 0.1.0 had no NetVLAD: a format-1 NetVLAD config is an error."""
        raise ConfigError(f"{where}: a 'netvlad' model needs config.json format 2 (release 0.1.0 had no NetVLAD)")


class NetVLADLayer(nnx.Module):
    """Soft assignment and residual aggregation (upstream's ``NetVLADLayer``, intra-normalization on).

    Attributes:
        score_proj: the assignment, ``D -> K`` without bias (the file's ``D x K`` weights).
        centers: the cluster centres ``[D, K]`` (the file stores them negated).
    """

    def __init__(self, dim: int, num_clusters: int, *, rngs: nnx.Rngs):
        self.score_proj = nnx.Linear(dim, num_clusters, use_bias=False, rngs=rngs)
        self.centers = nnx.Param(jax.random.normal(rngs.params(), (dim, num_clusters)) * dim**-0.5)

    def assignment(self, x: jax.Array) -> jax.Array:
        """``softmax_k(x_i . W_k)``: ``[B, N, D]`` -> ``[B, N, K]``."""
        return jax.nn.softmax(self.score_proj(x), axis=-1)

    def residual_sums(self, x: jax.Array, weighted_assignment: jax.Array) -> jax.Array:
        """``V[b, d, k] = sum_i m_bik (x_bid - c_dk)``: ``x [B, N, D]``, (weighted) assignment ``m [B, N, K]``."""
        sums = jnp.einsum("bnk,bnd->bdk", weighted_assignment, x, precision=_HIGHEST)
        return sums - self.centers[...][None] * jnp.sum(weighted_assignment, axis=1)[:, None, :]

    def __call__(self, vlad: jax.Array) -> jax.Array:
        """Intra-normalization, D-major flatten and L2 norm: ``[B, D, K]`` -> ``[B, D * K]``."""
        b = vlad.shape[0]
        return l2_normalize(l2_normalize(vlad, axis=1).reshape(b, -1), axis=-1)


class NetVLADNet(nnx.Module):
    """VGG-16 conv5_3 + NetVLAD (+ PCA whitening) with the VPR net interface (``features`` / ``aggregate``).

    Attributes:
        config: the architecture.
        pixel_mean: the release's mean RGB pixel on the 0-255 scale ``[3]``.
        backbone: :class:`~attllm_jax.models.vgg.VGG` (conv5_3 without ReLU, no pool5).
        netvlad: :class:`NetVLADLayer`.
        whiten: the PCA-whitening ``Linear(D * K -> whiten_dim)``, or None.
    """

    def __init__(self, config: NetVLADSpec, *, rngs: nnx.Rngs):
        self.config = config
        self.pixel_mean = nnx.Param(jnp.asarray([123.68, 116.779, 103.939], jnp.float32))
        self.backbone = VGG(VGGConfig(), rngs=rngs)
        self.netvlad = NetVLADLayer(VGG_CHANNELS, config.num_clusters, rngs=rngs)
        self.whiten = None if config.whiten_dim is None else nnx.Linear(config.vlad_dim, config.whiten_dim, rngs=rngs)

    def to_pixels(self, images: jax.Array) -> jax.Array:
        """ImageNet-normalized ``[B, H, W, 3]`` -> 0-255 RGB minus the mean pixel, as the harness's forward."""
        mean, std = jnp.asarray(IMAGENET_MEAN, images.dtype), jnp.asarray(IMAGENET_STD, images.dtype)
        rgb = jnp.clip(images * std + mean, 0.0, 1.0)
        return jnp.clip(rgb * 255.0, 0.0, 255.0) - self.pixel_mean[...]

    def features(self, images: jax.Array) -> CnnFeatures:
        """The raw conv5_3 map ``[B, H/16, W/16, 512]`` (floored) of ``[B, H, W, 3]`` normalized images."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must have shape [B, H, W, 3], got {images.shape}")
        return CnnFeatures(maps=self.backbone(self.to_pixels(images)))

    def vlad(self, feature_map: jax.Array, attention: jax.Array | None, alpha: float | jax.Array) -> jax.Array:
        """The residual sums ``V [B, D, K]`` of a ``[B, h, w, D]`` map, attention-weighted when given."""
        b, h, w, d = feature_map.shape
        x = l2_normalize(feature_map, axis=-1).reshape(b, h * w, d)
        assign = self.netvlad.assignment(x)
        plain = self.netvlad.residual_sums(x, assign)
        if attention is None:
            return plain
        alpha = jnp.broadcast_to(jnp.asarray(alpha, plain.dtype), (b,))
        target = jnp.clip(ops.resize_attention(attention, h, w), 0.0, MAX_WEIGHT).reshape(b, h * w, 1)
        weighted = self.netvlad.residual_sums(x, assign * target)
        blended = plain + alpha[:, None, None] * (weighted - plain)  # w = 1 + alpha (A - 1); V is affine in w
        return jnp.where((alpha <= ALPHA_OFF)[:, None, None], plain, blended)

    def aggregate(
        self, feats: CnnFeatures, attention: jax.Array | None = None, alpha: float | jax.Array = 0.0
    ) -> jax.Array:
        """NetVLAD descriptors ``[B, D]`` from :meth:`features` output.

        Args:
            feats: :class:`CnnFeatures` (``maps`` ``[B, h, w, 512]``).
            attention: optional ``[B, h', w']`` maps, resized bilinearly to ``h x w``.
            alpha: blend factor in [0, 1], scalar or ``[B]``; ``<= 1e-6`` is plain NetVLAD.
        """
        if not isinstance(feats, CnnFeatures):
            raise ValueError(f"NetVLAD features must be CnnFeatures (the conv5_3 map), got {type(feats).__name__}")
        desc = self.netvlad(self.vlad(feats.maps, attention, alpha))
        return desc if self.whiten is None else l2_normalize(self.whiten(desc), axis=-1)

    def __call__(
        self, images: jax.Array, attention: jax.Array | None = None, alpha: float | jax.Array = 0.0
    ) -> jax.Array:
        """``aggregate(features(images), attention, alpha)``: ``[B, H, W, 3]`` -> ``[B, D]``."""
        return self.aggregate(self.features(images), attention, alpha)
