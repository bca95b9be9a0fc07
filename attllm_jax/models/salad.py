"""SALAD (Sinkhorn Algorithm for Locally Aggregated Descriptors) on a DINOv2 backbone, in Flax NNX.

A port of serizba/salad's ``VPRModel(backbone="dinov2_vitb14", agg_arch="SALAD")`` in inference mode: the DINOv2
tokens after its final norm, the class token through the token MLP (global token ``g``), the patch tokens through
the cluster MLP (local features ``f``, ``l`` channels) and the score MLP (``m`` cluster scores), pooled by
:func:`attllm_jax.ops.salad_pool` (log-space Sinkhorn with a learned dust bin). Upstream's 1x1 convolutions act per
token, so they are :class:`flax.nnx.Linear` layers on ``[B, N, C]`` here. Register tokens, when the backbone has
them, are dropped before aggregation (upstream SALAD has no register variant).

Attribute names mirror the checkpoint (``backbone.model.*`` -> ``backbone``, ``aggregator.*`` -> ``aggregator``),
with ``token_features.{0,2}``, ``cluster_features.{0,3}`` and ``score.{0,3}`` named ``fc1``/``fc2``.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from attllm_jax import ops
from attllm_jax.data.preprocess import PreprocessSpec
from attllm_jax.models.dinov2 import DinoV2Config, DinoVisionTransformer, dinov2_config
from attllm_jax.models.features import TokenFeatures
from attllm_jax.models.fields import ConfigError, DinoV2HeadSpec

DEFAULT_IMAGE_SIZE = (322, 322)


@dataclasses.dataclass(frozen=True)
class SaladSpec(DinoV2HeadSpec):
    """Architecture of a DINOv2 + SALAD network.

    Attributes:
        dinov2: the DINOv2 backbone's architecture.
        num_clusters: ``m`` (64 upstream).
        cluster_dim: ``l``, channels per cluster (128).
        token_dim: ``g``, global-token width (256).
        hidden_dim: hidden width of the three MLPs (512).
    """

    dinov2: DinoV2Config = dataclasses.field(default_factory=lambda: dinov2_config("dinov2_vitb14"))
    num_clusters: int = 64
    cluster_dim: int = 128
    token_dim: int = 256
    hidden_dim: int = 512

    FORMAT_1_FIELDS: ClassVar[tuple[str, ...]] = (
        "backbone",
        "dinov2",
        "num_clusters",
        "cluster_dim",
        "token_dim",
        "hidden_dim",
        "descriptor_dim",
    )

    @classmethod
    def released(cls) -> SaladSpec:
        """serizba/salad's ``dino_salad.ckpt``: DINOv2 ViT-B/14, m=64, l=128, g=256 (D = 8448)."""
        return cls()

    @property
    def descriptor_dim(self) -> int:
        """``g + l * m`` (8448 for the released model)."""
        return self.salad_dim

    @staticmethod
    def default_preprocess() -> PreprocessSpec:
        """322 x 322, bilinear, ImageNet normalization (upstream's evaluation transform)."""
        return PreprocessSpec.exact(DEFAULT_IMAGE_SIZE)

    def build(self, rngs: nnx.Rngs | None = None) -> SaladNet:
        """The network with random weights (``nnx.Rngs(0)`` unless given)."""
        return SaladNet(self, rngs=rngs if rngs is not None else nnx.Rngs(0))

    @classmethod
    def from_format_1(cls, data: dict, where: str) -> SaladSpec:
        """From release 0.1.0's flat fields: ``dinov2`` (or the preset named by ``backbone``), head sizes
        (upstream's defaults when absent, as 0.1.0 read them); ``descriptor_dim`` is checked and dropped."""
        data = dict(data)
        backbone, dim = data.pop("backbone", "dinov2_vitb14"), data.pop("descriptor_dim", None)
        if "dinov2" not in data:
            try:
                data["dinov2"] = dinov2_config(str(backbone)).to_dict()
            except ValueError as e:
                raise ConfigError(f"{where}: field 'backbone': {e}") from e
        spec = cls.from_dict(data, where, require_all=False)
        if dim is not None and dim != spec.descriptor_dim:
            raise ConfigError(
                f"{where}: field 'descriptor_dim' is {dim!r}, but token_dim + cluster_dim * num_clusters is "
                f"{spec.descriptor_dim}"
            )
        return spec


class TokenMLP(nnx.Module):
    """fc1 -> ReLU -> fc2 applied to the last axis (upstream's Linear / 1x1-conv MLPs; dropout is inference-off)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, *, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(in_dim, hidden_dim, rngs=rngs)
        self.fc2 = nnx.Linear(hidden_dim, out_dim, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.relu(self.fc1(x)))


class SaladAggregator(nnx.Module):
    """SALAD head: (patch tokens [B, h, w, C], class token [B, C]) -> descriptor [B, g + l*m].

    Attributes:
        token_features: class token -> ``g``.
        cluster_features: patch tokens -> local features ``f`` (``l`` channels).
        score: patch tokens -> cluster scores (``m``).
        dust_bin: the dust-bin score ``z`` (scalar).
    """

    def __init__(
        self,
        num_channels: int,
        num_clusters: int = 64,
        cluster_dim: int = 128,
        token_dim: int = 256,
        hidden_dim: int = 512,
        *,
        rngs: nnx.Rngs,
    ):
        self.token_features = TokenMLP(num_channels, hidden_dim, token_dim, rngs=rngs)
        self.cluster_features = TokenMLP(num_channels, hidden_dim, cluster_dim, rngs=rngs)
        self.score = TokenMLP(num_channels, hidden_dim, num_clusters, rngs=rngs)
        self.dust_bin = nnx.Param(jnp.asarray(1.0, jnp.float32))

    @classmethod
    def from_spec(cls, spec: DinoV2HeadSpec, *, rngs: nnx.Rngs) -> SaladAggregator:
        """The head sized by a :class:`SaladSpec` or a ``MegaLocSpec`` (its DINOv2 width and head fields)."""
        sizes = (spec.num_clusters, spec.cluster_dim, spec.token_dim, spec.hidden_dim)
        return cls(spec.dinov2.embed_dim, *sizes, rngs=rngs)

    def __call__(
        self,
        patches: jax.Array,
        cls: jax.Array,
        attention: jax.Array | None = None,
        alpha: float | jax.Array = 0.0,
    ) -> jax.Array:
        """Aggregates tokens into a descriptor.

        Args:
            patches: [B, h, w, C] patch tokens (after DINOv2's final norm).
            cls: [B, C] class token.
            attention: optional [B, h', w'] map, resized bilinearly to ``h x w`` (align_corners=False).
            alpha: blend factor, scalar or [B]; may be traced (e.g. under ``jax.vmap``).

        Returns:
            [B, g + l*m] L2-normalized descriptors.
        """
        b, h, w, c = patches.shape
        tokens = patches.reshape(b, h * w, c)
        local = self.cluster_features(tokens)  # [B, N, l]
        scores = jnp.swapaxes(self.score(tokens), 1, 2)  # [B, m, N]
        global_token = self.token_features(cls)  # [B, g]
        if attention is not None:
            attention = ops.resize_attention(attention, h, w).reshape(b, h * w)
        return ops.salad_pool(local, scores, self.dust_bin[...], global_token, attention=attention, alpha=alpha)


class SaladNet(nnx.Module):
    """DINOv2 backbone + SALAD aggregator with the VPR net interface (``features`` / ``aggregate`` / ``__call__``).

    Attributes:
        config: the architecture.
        backbone: :class:`~attllm_jax.models.dinov2.DinoVisionTransformer`.
        aggregator: :class:`SaladAggregator`.
    """

    def __init__(self, config: SaladSpec, *, rngs: nnx.Rngs):
        self.config = config
        self.backbone = DinoVisionTransformer(config.dinov2, rngs=rngs)
        self.aggregator = SaladAggregator.from_spec(config, rngs=rngs)

    def features(self, images: jax.Array) -> TokenFeatures:
        """DINOv2 tokens after its final norm (register tokens dropped).

        Args:
            images: [B, H, W, 3] normalized images, H and W multiples of the patch size (14).

        Returns:
            :class:`TokenFeatures` with ``patches`` [B, H/14, W/14, C] and ``cls`` [B, C].
        """
        out = self.backbone(images)
        return TokenFeatures(patches=out["patches"], cls=out["cls"])

    def aggregate(
        self, feats: TokenFeatures, attention: jax.Array | None = None, alpha: float | jax.Array = 0.0
    ) -> jax.Array:
        """SALAD descriptors [B, D] from :meth:`features` output, optionally attention-modulated.

        Args:
            feats: :class:`TokenFeatures`.
            attention: optional [B, h', w'] map (resized to ``h x w``).
            alpha: blend factor in [0, 1], scalar or [B]; ``<= 1e-6`` is plain SALAD.
        """
        if not isinstance(feats, TokenFeatures):
            raise ValueError(f"SALAD features must be TokenFeatures, got {type(feats).__name__}")
        return self.aggregator(feats.patches, feats.cls, attention=attention, alpha=alpha)

    def __call__(
        self, images: jax.Array, attention: jax.Array | None = None, alpha: float | jax.Array = 0.0
    ) -> jax.Array:
        """``aggregate(features(images), attention, alpha)``: [B, H, W, 3] -> [B, D]."""
        return self.aggregate(self.features(images), attention=attention, alpha=alpha)
