"""MegaLoc (Berton & Masone, 2025; gmberton/MegaLoc ``get_trained_model``) in Flax NNX, with query-side attention.

MegaLoc is a DINOv2 ViT-B/14 followed by a SALAD aggregator with 64 clusters of 256 channels and a 256-d global
token (``g + l*m = 16640`` channels), a linear layer ``16640 -> 8448`` and an L2 norm. Its forward first resizes
an image whose sides are not multiples of 14 to ``(round(H / 14) * 14, round(W / 14) * 14)`` (Python's round,
half to even) with torchvision's antialiased bilinear resize of the normalized float tensor; :meth:`MegaLocNet.
features` does the same (:func:`attllm_jax.ops.resize.antialiased_bilinear_resize`), so evaluation runs at the
image's own size. Position embeddings of a non-square grid are resized as upstream's HEAD does since its
2026-01-21 fix of the argument order (rows from the image height): that is
:class:`~attllm_jax.models.dinov2.DinoVisionTransformer`'s behaviour.

Descriptor: ``d = l2n(linear(s))`` with ``s = salad_pool(...)`` the SALAD part, itself L2-normalized (two norms).

Attention (our extension, as for SALAD): native token weight ``nu_i = sum_k P[k, i]`` (the Sinkhorn mass of token
``i`` over the clusters), divided by its mean over tokens; ``w_i = nu_i + alpha * (A_i - nu_i)`` with ``A`` the
attention map sampled on the patch grid and clamped to ``[0, 2]``; the local features become ``w_i * f_i`` before
pooling (:func:`attllm_jax.ops.salad_pool`), then the linear and the norm. ``alpha <= 1e-6`` is plain MegaLoc.

Attribute names mirror the checkpoint: ``backbone`` (``backbone.*``), ``aggregator.agg`` (the SALAD head,
``aggregator.agg.*``) and ``aggregator.linear``.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
from flax import nnx

from attllm_jax.data.preprocess import PreprocessSpec
from attllm_jax.models.dinov2 import DinoV2Config, DinoVisionTransformer, dinov2_config
from attllm_jax.models.features import TokenFeatures
from attllm_jax.models.fields import ConfigError, DinoV2HeadSpec
from attllm_jax.models.salad import SaladAggregator
from attllm_jax.ops.normalize import l2_normalize
from attllm_jax.ops.resize import antialiased_bilinear_resize


@dataclasses.dataclass(frozen=True)
class MegaLocSpec(DinoV2HeadSpec):
    """Architecture of MegaLoc.

    Attributes:
        dinov2: the DINOv2 architecture (ViT-B/14 upstream).
        num_clusters: ``m`` (64).
        cluster_dim: ``l`` (256).
        token_dim: ``g`` (256).
        hidden_dim: hidden width of the SALAD MLPs (512).
        descriptor_dim: output of ``aggregator.linear`` (8448).
    """

    dinov2: DinoV2Config = dataclasses.field(default_factory=lambda: dinov2_config("dinov2_vitb14"))
    num_clusters: int = 64
    cluster_dim: int = 256
    token_dim: int = 256
    hidden_dim: int = 512
    descriptor_dim: int = 8448

    FORMAT_1_FIELDS: ClassVar[tuple[str, ...]] = ()  # MegaLoc is newer than release 0.1.0

    @classmethod
    def released(cls) -> MegaLocSpec:
        """gmberton/MegaLoc's ``model.safetensors``: ViT-B/14, m=64, l=256, g=256, linear 16640 -> 8448."""
        return cls()

    @staticmethod
    def default_preprocess() -> PreprocessSpec:
        """ToTensor and Normalize at the image's own size (the network rounds it to multiples of 14)."""
        return PreprocessSpec.tensor(None)

    def build(self, rngs: nnx.Rngs | None = None) -> MegaLocNet:
        """The network with random weights (``nnx.Rngs(0)`` unless given)."""
        return MegaLocNet(self, rngs=rngs if rngs is not None else nnx.Rngs(0))

    @classmethod
    def from_format_1(cls, data: dict, where: str) -> MegaLocSpec:
        """Release 0.1.0 had no MegaLoc: a format-1 MegaLoc config is an error."""
        raise ConfigError(f"{where}: a 'megaloc' model needs config.json format 2 (release 0.1.0 had no MegaLoc)")


def patch_multiple_size(height: int, width: int, patch_size: int = 14) -> tuple[int, int]:
    """MegaLoc's input size: each side rounded to the nearest multiple of the patch (Python's round, half to even).

    Sides already multiples of the patch are kept (upstream resizes only when one of them is not).

    Raises:
        ValueError: a side rounds to 0 (an image smaller than half a patch).
    """
    if height % patch_size == 0 and width % patch_size == 0:
        return height, width
    size = (round(height / patch_size) * patch_size, round(width / patch_size) * patch_size)
    if min(size) < patch_size:
        raise ValueError(f"image {height}x{width} is too small for MegaLoc: a side rounds to 0 patches of {patch_size}")
    return size


class MegaLocAggregator(nnx.Module):
    """SALAD head + linear: (patches [B, h, w, C], cls [B, C]) -> pre-norm descriptor [B, descriptor_dim].

    Attributes:
        agg: :class:`~attllm_jax.models.salad.SaladAggregator` (upstream ``aggregator.agg``).
        linear: ``salad_dim -> descriptor_dim`` (upstream ``aggregator.linear``).
    """

    def __init__(self, config: MegaLocSpec, *, rngs: nnx.Rngs):
        self.agg = SaladAggregator.from_spec(config, rngs=rngs)
        self.linear = nnx.Linear(config.salad_dim, config.descriptor_dim, rngs=rngs)

    def salad(
        self,
        patches: jax.Array,
        cls: jax.Array,
        attention: jax.Array | None = None,
        alpha: float | jax.Array = 0.0,
    ) -> jax.Array:
        """The L2-normalized SALAD part ``[B, g + l*m]`` (attention as in :func:`attllm_jax.ops.salad_pool`)."""
        return self.agg(patches, cls, attention=attention, alpha=alpha)

    def __call__(
        self,
        patches: jax.Array,
        cls: jax.Array,
        attention: jax.Array | None = None,
        alpha: float | jax.Array = 0.0,
    ) -> jax.Array:
        """``linear(salad(...))``, before the final L2 norm: [B, descriptor_dim]."""
        return self.linear(self.salad(patches, cls, attention, alpha))


class MegaLocNet(nnx.Module):
    """MegaLoc with the VPR net interface (``features`` / ``aggregate`` / ``__call__``).

    Attributes:
        config: the architecture.
        backbone: :class:`~attllm_jax.models.dinov2.DinoVisionTransformer` (final norm applied).
        aggregator: :class:`MegaLocAggregator`.
    """

    def __init__(self, config: MegaLocSpec, *, rngs: nnx.Rngs):
        self.config = config
        self.backbone = DinoVisionTransformer(config.dinov2, rngs=rngs)
        self.aggregator = MegaLocAggregator(config, rngs=rngs)

    def resize_input(self, images: jax.Array) -> jax.Array:
        """Upstream's input resize: [B, H, W, 3] -> [B, H', W', 3], sides rounded to multiples of the patch.

        Antialiased bilinear on the (normalized) float images, as ``torchvision.transforms.functional.resize(images,
        [H', W'], antialias=True)``; images whose sides are already multiples are returned unchanged.
        """
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must have shape [B, H, W, 3], got {images.shape}")
        height, width = patch_multiple_size(images.shape[1], images.shape[2], self.config.dinov2.patch_size)
        return antialiased_bilinear_resize(images, height, width)

    def features(self, images: jax.Array) -> TokenFeatures:
        """DINOv2 tokens (after its final norm) of the resized images.

        Args:
            images: [B, H, W, 3] normalized images of any size (at least 7 pixels a side).

        Returns:
            :class:`TokenFeatures`: ``patches`` [B, H'/14, W'/14, C] (``H', W'`` from :func:`patch_multiple_size`)
            and ``cls`` [B, C].
        """
        out = self.backbone(self.resize_input(images))
        return TokenFeatures(patches=out["patches"], cls=out["cls"])

    def salad_descriptor(
        self, feats: TokenFeatures, attention: jax.Array | None = None, alpha: float | jax.Array = 0.0
    ) -> jax.Array:
        """The 16640-d SALAD part (L2-normalized) of :meth:`features` output, the input of ``aggregator.linear``."""
        return self.aggregator.salad(_check(feats).patches, feats.cls, attention, alpha)

    def aggregate(
        self, feats: TokenFeatures, attention: jax.Array | None = None, alpha: float | jax.Array = 0.0
    ) -> jax.Array:
        """MegaLoc descriptors [B, descriptor_dim] (L2-normalized) from :meth:`features` output.

        Args:
            feats: :class:`TokenFeatures` (``patches`` [B, h, w, C], ``cls`` [B, C]).
            attention: optional [B, h', w'] map, resized bilinearly to ``h x w``.
            alpha: blend factor in [0, 1], scalar or [B]; ``<= 1e-6`` is plain MegaLoc.
        """
        return l2_normalize(self.aggregator(_check(feats).patches, feats.cls, attention, alpha), axis=-1)

    def __call__(
        self, images: jax.Array, attention: jax.Array | None = None, alpha: float | jax.Array = 0.0
    ) -> jax.Array:
        """``aggregate(features(images), attention, alpha)``: [B, H, W, 3] -> [B, descriptor_dim]."""
        return self.aggregate(self.features(images), attention=attention, alpha=alpha)


def _check(feats) -> TokenFeatures:
    if not isinstance(feats, TokenFeatures):
        raise ValueError(f"MegaLoc features must be TokenFeatures, got {type(feats).__name__}")
    return feats
