"""SuperVLAD (Lu et al., NeurIPS 2024; Lu-Feng/SuperVLAD) on a DINOv2 backbone, in Flax NNX.

A port of VPR-methods-evaluation's ``vpr_models/supervlad.py`` (``get_supervlad("SuperVLAD")``) in inference mode:
torch.hub's DINOv2 ViT-B/14 (original position-embedding resize: offset 0.1, no antialias, as SALAD), its patch
tokens after the final norm, then the SuperVLAD layer:

1. ``x_i <- x_i / max(||x_i||, 1e-12)`` over the channels (``normalize_input``);
2. ``a[k, i] = softmax_k(W x_i)`` over ``K + G`` logits (a bias-free 1x1 convolution ``W``; no centroids);
3. ``V[k] = sum_i a[k, i] x_i`` for every cluster, then the ``G`` LAST (ghost) clusters are dropped;
4. per-cluster L2, flatten cluster-major (element ``k * C + c``), L2 (upstream normalizes twice more: idempotent).

Released: ``K = 4``, ``G = 1``, ``C = 768``: 3072-d. ``1-ClusterVLAD`` is ``K = 1``, ``G = 2`` (768-d); the ghost
count is not in the weights, so it is a spec field. ``SuperVLAD-CrossImage`` (a transformer across the images of a
batch, so a descriptor depends on the batch) is not supported.

Attention (our extension): each location's contribution to every cluster's sum is scaled by
``w_i = nu_i + alpha * (A_i - nu_i)`` with the native weight ``nu_i = 1`` (plain SuperVLAD weighs every location
equally) and ``A`` the map on the patch grid, clamped to ``[0, 2]``: ``V[k] = sum_i w_i a[k, i] x_i``. The sums are
linear in ``w``, so they are computed once for ``w = 1`` and ``w = A`` and blended per alpha. ``alpha <= 1e-6`` is
plain SuperVLAD.

Attribute names mirror the checkpoint (``backbone.*``, ``aggregation.conv.weight``).
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
from attllm_jax.ops.attention_maps import MAX_WEIGHT
from attllm_jax.ops.checks import check_batch_alpha
from attllm_jax.ops.gem import ALPHA_OFF
from attllm_jax.ops.normalize import l2_normalize

DEFAULT_IMAGE_SIZE = (322, 322)  # VPR-methods-evaluation's --image_size for supervlad


@dataclasses.dataclass(frozen=True)
class SuperVLADSpec(DinoV2HeadSpec):
    """Architecture of a DINOv2 + SuperVLAD network.

    Attributes:
        dinov2: the DINOv2 backbone's architecture.
        num_clusters: ``K``, clusters kept in the descriptor (4 released).
        ghost_clusters: ``G``, trailing clusters of the softmax that are dropped (1 released; 2 for 1-ClusterVLAD).
    """

    dinov2: DinoV2Config = dataclasses.field(default_factory=lambda: dinov2_config("dinov2_vitb14"))
    num_clusters: int = 4
    ghost_clusters: int = 1

    FORMAT_1_FIELDS: ClassVar[tuple[str, ...]] = ()  # newer than release 0.1.0

    @classmethod
    def released(cls, ghost_clusters: int = 1) -> SuperVLADSpec:
        """``SuperVLAD.pth`` (K=4, G=1, 3072-d), or with ``ghost_clusters=2`` ``1-ClusterVLAD.pth`` (K=1, 768-d)."""
        return cls(num_clusters=4 if ghost_clusters == 1 else 1, ghost_clusters=ghost_clusters)

    @property
    def descriptor_dim(self) -> int:
        """``K * C`` (3072 released)."""
        return self.num_clusters * self.dinov2.embed_dim

    @staticmethod
    def default_preprocess() -> PreprocessSpec:
        """VPR-methods-evaluation's transform: ToTensor, Normalize, then antialiased bilinear to 322 x 322."""
        return PreprocessSpec.tensor(DEFAULT_IMAGE_SIZE)

    def build(self, rngs: nnx.Rngs | None = None) -> SuperVLADNet:
        """The network with random weights (``nnx.Rngs(0)`` unless given)."""
        return SuperVLADNet(self, rngs=rngs if rngs is not None else nnx.Rngs(0))

    @classmethod
    def from_format_1(cls, data: dict, where: str) -> SuperVLADSpec:
        """Release 0.1.0 had no SuperVLAD: a format-1 config is an error."""
        raise ConfigError(f"{where}: a 'supervlad' model needs config.json format 2 (release 0.1.0 had no SuperVLAD)")


def supervlad_pool(
    tokens: jax.Array,
    logits: jax.Array,
    num_clusters: int,
    attention: jax.Array | None = None,
    alpha: jax.Array | float = 0.0,
) -> jax.Array:
    """SuperVLAD aggregation of L2-normalized tokens, optionally attention-weighted.

    Args:
        tokens: [B, N, C] tokens, already L2-normalized over C.
        logits: [B, N, K + G] assignment logits.
        num_clusters: ``K``; the trailing ``G`` (ghost) clusters are dropped after the softmax.
        attention: optional [B, N] map on the tokens (clamped to [0, 2]).
        alpha: scalar or [B] blend factors.

    Returns:
        [B, K * C] L2-normalized descriptors, cluster-major.
    """
    b, _, c = tokens.shape
    assign = jax.nn.softmax(logits, axis=-1)[:, :, :num_clusters]  # [B, N, K]
    hp = jax.lax.Precision.HIGHEST
    if attention is None:
        clusters = jnp.einsum("bnk,bnc->bkc", assign, tokens, precision=hp)
    else:
        alpha = check_batch_alpha(alpha, b)
        weights = jnp.stack([jnp.ones_like(attention), jnp.clip(attention, 0.0, MAX_WEIGHT)], axis=1)  # [B, 2, N]
        sums = jnp.einsum("btn,bnk,bnc->btkc", weights, assign, tokens, precision=hp)  # [B, 2, K, C]
        a = alpha[:, None, None]
        blended = sums[:, 0] + a * (sums[:, 1] - sums[:, 0])  # native weight 1: w = 1 + alpha (A - 1)
        clusters = jnp.where((alpha <= ALPHA_OFF)[:, None, None], sums[:, 0], blended)
    return l2_normalize(l2_normalize(clusters, axis=-1).reshape(b, -1), axis=-1)


class SuperVLADAggregator(nnx.Module):
    """SuperVLAD layer: patch tokens [B, h, w, C] -> descriptor [B, K * C].

    Attributes:
        conv: the bias-free 1x1 assignment convolution ``C -> K + G`` (a Linear on tokens).
        num_clusters: ``K``.
    """

    def __init__(self, dim: int, num_clusters: int, ghost_clusters: int, *, rngs: nnx.Rngs):
        self.num_clusters = num_clusters
        self.conv = nnx.Linear(dim, num_clusters + ghost_clusters, use_bias=False, rngs=rngs)

    def __call__(
        self, patches: jax.Array, attention: jax.Array | None = None, alpha: float | jax.Array = 0.0
    ) -> jax.Array:
        """Descriptors [B, K * C]; ``attention`` [B, h', w'] is resized bilinearly to ``h x w``."""
        b, h, w, c = patches.shape
        tokens = l2_normalize(patches.reshape(b, h * w, c), axis=-1)
        if attention is not None:
            attention = ops.resize_attention(attention, h, w).reshape(b, h * w)
        return supervlad_pool(tokens, self.conv(tokens), self.num_clusters, attention, alpha)


class SuperVLADNet(nnx.Module):
    """DINOv2 + SuperVLAD with the VPR net interface (``features`` / ``aggregate`` / ``__call__``).

    Attributes:
        config: the architecture.
        backbone: :class:`~attllm_jax.models.dinov2.DinoVisionTransformer`.
        aggregation: :class:`SuperVLADAggregator`.
    """

    def __init__(self, config: SuperVLADSpec, *, rngs: nnx.Rngs):
        self.config = config
        self.backbone = DinoVisionTransformer(config.dinov2, rngs=rngs)
        self.aggregation = SuperVLADAggregator(
            config.dinov2.embed_dim, config.num_clusters, config.ghost_clusters, rngs=rngs
        )

    def features(self, images: jax.Array) -> TokenFeatures:
        """DINOv2 tokens after its final norm: ``patches`` [B, H/14, W/14, C] and ``cls`` [B, C] (unused)."""
        out = self.backbone(images)
        return TokenFeatures(patches=out["patches"], cls=out["cls"])

    def aggregate(
        self, feats: TokenFeatures, attention: jax.Array | None = None, alpha: float | jax.Array = 0.0
    ) -> jax.Array:
        """SuperVLAD descriptors [B, K * C] from :meth:`features` output; ``alpha <= 1e-6`` is plain SuperVLAD."""
        if not isinstance(feats, TokenFeatures):
            raise ValueError(f"SuperVLAD features must be TokenFeatures, got {type(feats).__name__}")
        return self.aggregation(feats.patches, attention, alpha)

    def __call__(
        self, images: jax.Array, attention: jax.Array | None = None, alpha: float | jax.Array = 0.0
    ) -> jax.Array:
        """``aggregate(features(images), attention, alpha)``: [B, H, W, 3] -> [B, K * C]."""
        return self.aggregate(self.features(images), attention=attention, alpha=alpha)
