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

import jax
import jax.numpy as jnp
from flax import nnx

from attllm_jax import ops
from attllm_jax.models.dinov2 import DinoV2Config, DinoVisionTransformer, dinov2_config

DEFAULT_IMAGE_SIZE = (322, 322)


@dataclasses.dataclass(frozen=True)
class SaladConfig:
    """Architecture of a DINOv2 + SALAD network.

    Attributes:
        backbone: the DINOv2 architecture.
        num_clusters: ``m`` (64 upstream).
        cluster_dim: ``l``, channels per cluster (128).
        token_dim: ``g``, global-token width (256).
        hidden_dim: hidden width of the three MLPs (512).
    """

    backbone: DinoV2Config = dataclasses.field(default_factory=lambda: dinov2_config("dinov2_vitb14"))
    num_clusters: int = 64
    cluster_dim: int = 128
    token_dim: int = 256
    hidden_dim: int = 512

    @property
    def descriptor_dim(self) -> int:
        """``g + l * m`` (8448 for the released model)."""
        return self.token_dim + self.cluster_dim * self.num_clusters


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

    def __init__(self, config: SaladConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.backbone = DinoVisionTransformer(config.backbone, rngs=rngs)
        self.aggregator = SaladAggregator(
            config.backbone.embed_dim,
            config.num_clusters,
            config.cluster_dim,
            config.token_dim,
            config.hidden_dim,
            rngs=rngs,
        )

    def features(self, images: jax.Array) -> dict[str, jax.Array]:
        """DINOv2 tokens after its final norm.

        Args:
            images: [B, H, W, 3] normalized images, H and W multiples of 14.

        Returns:
            ``{"cls": [B, C], "patches": [B, H/14, W/14, C]}``.
        """
        out = self.backbone(images)
        return {"cls": out["cls"], "patches": out["patches"]}

    def aggregate(
        self, feats: dict[str, jax.Array], attention: jax.Array | None = None, alpha: float | jax.Array = 0.0
    ) -> jax.Array:
        """SALAD descriptors [B, D] from :meth:`features` output, optionally attention-modulated.

        Args:
            feats: ``{"cls": [B, C], "patches": [B, h, w, C]}``.
            attention: optional [B, h', w'] map (resized to ``h x w``).
            alpha: blend factor in [0, 1], scalar or [B]; ``<= 1e-6`` is plain SALAD.
        """
        if not isinstance(feats, dict) or not {"cls", "patches"} <= set(feats):
            raise ValueError("SALAD features must be a dict with 'cls' [B, C] and 'patches' [B, h, w, C]")
        return self.aggregator(feats["patches"], feats["cls"], attention=attention, alpha=alpha)

    def feature_grid(self, feats: dict[str, jax.Array]) -> tuple[int, int]:
        """The (h, w) patch grid of :meth:`features` output."""
        return int(feats["patches"].shape[1]), int(feats["patches"].shape[2])

    def __call__(
        self, images: jax.Array, attention: jax.Array | None = None, alpha: float | jax.Array = 0.0
    ) -> jax.Array:
        """``aggregate(features(images), attention, alpha)``: [B, H, W, 3] -> [B, D]."""
        return self.aggregate(self.features(images), attention=attention, alpha=alpha)


def salad_config_from_dict(config: dict) -> SaladConfig:
    """The :class:`SaladConfig` a model config dict describes.

    The backbone architecture is ``config["dinov2"]`` (a :meth:`DinoV2Config.to_dict`) when present, else the
    preset named by ``config["backbone"]``; head sizes default to upstream's.

    Raises:
        ValueError: unknown backbone name or malformed entries.
    """
    if "dinov2" in config:
        backbone = DinoV2Config.from_dict(dict(config["dinov2"]))
    else:
        backbone = dinov2_config(str(config.get("backbone", "dinov2_vitb14")))
    try:
        salad = SaladConfig(
            backbone=backbone,
            num_clusters=int(config.get("num_clusters", 64)),
            cluster_dim=int(config.get("cluster_dim", 128)),
            token_dim=int(config.get("token_dim", 256)),
            hidden_dim=int(config.get("hidden_dim", 512)),
        )
    except (TypeError, ValueError) as e:
        raise ValueError(f"malformed SALAD config: {e}") from e
    dim = config.get("descriptor_dim")
    if dim is not None and int(dim) != salad.descriptor_dim:
        raise ValueError(
            f"SALAD config descriptor_dim {dim} does not match token_dim + cluster_dim * num_clusters "
            f"= {salad.descriptor_dim}"
        )
    return salad


def build_salad_net(config: dict, rngs: nnx.Rngs | None = None) -> SaladNet:
    """Builds a (randomly initialized) :class:`SaladNet` from a model config dict.

    Config keys: ``backbone`` (torch.hub name, e.g. ``"dinov2_vitb14"``), ``dinov2`` (optional full architecture,
    written by the converter), ``num_clusters``, ``cluster_dim``, ``token_dim``, ``hidden_dim``, ``descriptor_dim``
    (checked), ``image_size`` (used by preprocessing, not here).

    Args:
        config: the config dict.
        rngs: initializers' randomness; defaults to ``nnx.Rngs(0)``.
    """
    return SaladNet(salad_config_from_dict(config), rngs=rngs if rngs is not None else nnx.Rngs(0))
