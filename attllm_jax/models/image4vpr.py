"""ImAge, implicit aggregation (Lu et al., NeurIPS 2025; Lu-Feng/ImAge ``hubconf.ImAge``) in Flax NNX.

A port of upstream's ``network.VPRmodel`` without an explicit aggregator, in inference mode:

1. DINOv2 ViT-B/14 with 4 register tokens, built by upstream as ``vit_base(..., num_register_tokens=4)`` with the
   ORIGINAL position-embedding resize (``interpolate_offset=0.1``, no antialias; not the register models' torch.hub
   setting): patch embedding, class token, position embeddings, then the registers after the class token;
2. blocks ``0 .. P-1`` (``P`` = ``insertion_block``, upstream's ``freeze_te``, 8) on those tokens;
3. ``T`` learned aggregation tokens (8) PREPENDED: ``[agg_1..agg_T, cls, reg_1..reg_R, patches]``;
4. blocks ``P .. depth-1`` (9-12 in 1-based counting) on all of them;
5. the final LayerNorm, the first ``T`` tokens flattened token-major (element ``t * C + c``), one L2 norm
   (8 x 768 = 6144-d released).

Attention (our extension, as BoQ's cross-attention): in every block after the insertion let ``a[h, q, j]`` be the
plain self-attention weights of aggregation token ``q`` (softmax over all keys ``j``). The native weight of patch
``i`` is ``nu_i = mean_{h, q} a[h, q, i]`` divided by its mean over the patches (mean 1); the blended weight is
``w_i = nu_i + alpha (A_i - nu_i)`` (``A`` clamped to ``[0, 2]``) and the aggregation tokens' logits to patch ``i``
get ``log(max(w_i, 1e-6))``; their logits to the other tokens and every other token's attention are unchanged.
Each block uses its own ``nu``. ``alpha <= 1e-6`` is plain ImAge. :meth:`ImAgeNet.features` stops before the
insertion, so an alpha sweep reuses the first ``P`` blocks and repeats only the last ``depth - P``.

Attribute names mirror the checkpoint (``backbone.*``, ``learnable_aggregation_tokens``).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from attllm_jax import ops
from attllm_jax.data.preprocess import PreprocessSpec
from attllm_jax.models.boq import blended_token_log_weights
from attllm_jax.models.dinov2 import Block, DinoV2Config, DinoVisionTransformer, dinov2_config, multi_head_attention
from attllm_jax.models.features import Features
from attllm_jax.models.fields import ConfigError, DinoV2HeadSpec
from attllm_jax.ops.checks import check_batch_alpha
from attllm_jax.ops.gem import ALPHA_OFF
from attllm_jax.ops.normalize import l2_normalize

DEFAULT_IMAGE_SIZE = (322, 322)  # upstream's --resize default


def image4vpr_dinov2() -> DinoV2Config:
    """ViT-B/14 with 4 registers and the original resize (offset 0.1, no antialias), as upstream builds it."""
    return dataclasses.replace(dinov2_config("dinov2_vitb14_reg"), interpolate_offset=0.1, interpolate_antialias=False)


@dataclasses.dataclass(frozen=True)
class ImAgeSpec(DinoV2HeadSpec):
    """Architecture of an ImAge network.

    Attributes:
        dinov2: the DINOv2 backbone (with registers).
        num_agg_tokens: ``T``, learned aggregation tokens (8).
        insertion_block: ``P``, the 0-based block before which they are prepended (upstream ``freeze_te``, 8).
    """

    dinov2: DinoV2Config = dataclasses.field(default_factory=image4vpr_dinov2)
    num_agg_tokens: int = 8
    insertion_block: int = 8

    FORMAT_1_FIELDS: ClassVar[tuple[str, ...]] = ()  # newer than release 0.1.0

    def __post_init__(self):
        super().__post_init__()
        if self.insertion_block >= self.dinov2.depth:
            raise ValueError(f"insertion_block {self.insertion_block} must be below the depth {self.dinov2.depth}")

    @classmethod
    def released(cls) -> ImAgeSpec:
        """``ImAge_Merged.pth`` / ``ImAge_GSV.pth``: ViT-B/14 + 4 registers, 8 tokens before block 8 (6144-d)."""
        return cls()

    @property
    def descriptor_dim(self) -> int:
        """``T * C`` (6144 released)."""
        return self.num_agg_tokens * self.dinov2.embed_dim

    @staticmethod
    def default_preprocess() -> PreprocessSpec:
        """Upstream's test transform (``datasets_ws.py``): ToTensor, Normalize, then ``functional.resize`` of the
        tensor to 322 x 322 (bilinear, antialiased from torchvision 0.17; upstream pins 0.21)."""
        return PreprocessSpec.tensor(DEFAULT_IMAGE_SIZE)

    def build(self, rngs: nnx.Rngs | None = None) -> ImAgeNet:
        """The network with random weights (``nnx.Rngs(0)`` unless given)."""
        return ImAgeNet(self, rngs=rngs if rngs is not None else nnx.Rngs(0))

    @classmethod
    def from_format_1(cls, data: dict, where: str) -> ImAgeSpec:
        """Release 0.1.0 had no ImAge: a format-1 config is an error."""
        raise ConfigError(f"{where}: an 'image4vpr' model needs config.json format 2 (release 0.1.0 had no ImAge)")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ImAgeFeatures(Features):
    """The tokens after block ``P - 1`` (before the aggregation tokens enter), without any norm.

    Attributes:
        prefix: class and register tokens [B, 1 + R, C].
        patches: patch tokens on their grid [B, h, w, C].
    """

    prefix: jax.Array
    patches: jax.Array

    @property
    def grid(self) -> tuple[int, int]:
        return int(self.patches.shape[1]), int(self.patches.shape[2])


def _biased_attention(block: Block, x: jax.Array, num_agg: int, log_weights_fn) -> jax.Array:
    """``block.attn(block.norm1(x))`` with the first ``num_agg`` query rows' logits re-weighted.

    ``log_weights_fn(plain)`` maps those rows' plain weights [B, H, num_agg, T] to the log weights [B, T] added to
    their logits, or returns None to keep them (then the rows are the plain attention's).
    """
    attn = block.attn
    h = block.norm1(x)
    b, t, c = h.shape
    head_dim = c // attn.num_heads
    qkv = attn.qkv(h)
    if attn.qkv.dtype is not None:
        qkv = qkv.astype(attn.qkv.dtype)
    qkv = qkv.reshape(b, t, 3, attn.num_heads, head_dim).transpose(2, 0, 3, 1, 4)
    q, k, v = qkv[0] * head_dim**-0.5, qkv[1], qkv[2]
    out = multi_head_attention(q, k, v)  # [B, H, T, d]
    f32 = jnp.promote_types(q.dtype, jnp.float32)
    logits = jnp.einsum("bhqd,bhnd->bhqn", q[:, :, :num_agg], k, preferred_element_type=f32)
    log_w, keep = log_weights_fn(jax.nn.softmax(logits, axis=-1))
    modulated = jnp.einsum("bhqn,bhnd->bhqd", jax.nn.softmax(logits + log_w[:, None, None, :], axis=-1), v)
    rows = jnp.where(keep[:, None, None, None], out[:, :, :num_agg], modulated.astype(out.dtype))
    out = out.at[:, :, :num_agg].set(rows)
    return attn.proj(out.transpose(0, 2, 1, 3).reshape(b, t, c))


def biased_block(block: Block, x: jax.Array, num_agg: int, patch_start: int, attention: jax.Array, alpha: jax.Array):
    """One DINOv2 block whose aggregation tokens' attention to the patches is re-weighted (module docstring).

    Args:
        block: the DINOv2 block.
        x: tokens [B, T, C]: ``num_agg`` aggregation tokens first, patches from ``patch_start`` on.
        num_agg: aggregation tokens.
        patch_start: index of the first patch token.
        attention: [B, N] map on the patch grid (row-major, N = T - patch_start).
        alpha: [B] blend factors.

    Returns:
        [B, T, C].
    """

    def log_weights(plain):
        log_w = blended_token_log_weights(plain[..., patch_start:], attention, alpha)
        return jnp.pad(log_w, ((0, 0), (patch_start, 0))), alpha <= ALPHA_OFF

    x = x + block.ls1(_biased_attention(block, x, num_agg, log_weights))
    return x + block.ls2(block.mlp(block.norm2(x)))


class ImAgeNet(nnx.Module):
    """DINOv2 with registers + learned aggregation tokens, with the VPR net interface.

    Attributes:
        config: the architecture.
        backbone: :class:`~attllm_jax.models.dinov2.DinoVisionTransformer`.
        learnable_aggregation_tokens: [1, T, C].
    """

    def __init__(self, config: ImAgeSpec, *, rngs: nnx.Rngs):
        self.config = config
        self.backbone = DinoVisionTransformer(config.dinov2, rngs=rngs)
        shape = (1, config.num_agg_tokens, config.dinov2.embed_dim)
        self.learnable_aggregation_tokens = nnx.Param(1e-6 * jax.random.normal(rngs.params(), shape))

    def features(self, images: jax.Array) -> ImAgeFeatures:
        """Tokens after the first ``insertion_block`` blocks: [B, H, W, 3] (sides multiples of 14) -> features."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must have shape [B, H, W, 3], got {images.shape}")
        vit = self.backbone
        x = vit.prepare_tokens(images)
        for block in vit.blocks[: self.config.insertion_block]:
            x = block(x)
        b, height, width, _ = images.shape
        p, start = vit.config.patch_size, 1 + vit.config.num_register_tokens
        return ImAgeFeatures(prefix=x[:, :start], patches=x[:, start:].reshape(b, height // p, width // p, -1))

    def aggregate(
        self, feats: ImAgeFeatures, attention: jax.Array | None = None, alpha: float | jax.Array = 0.0
    ) -> jax.Array:
        """ImAge descriptors [B, T * C] from :meth:`features` output.

        Args:
            feats: :class:`ImAgeFeatures`.
            attention: optional [B, h', w'] map, resized bilinearly to the patch grid.
            alpha: blend factor in [0, 1], scalar or [B]; ``<= 1e-6`` is plain ImAge.
        """
        if not isinstance(feats, ImAgeFeatures):
            raise ValueError(f"ImAge features must be ImAgeFeatures, got {type(feats).__name__}")
        b, h, w, c = feats.patches.shape
        num_agg = self.config.num_agg_tokens
        tokens = jnp.broadcast_to(self.learnable_aggregation_tokens[...], (b, num_agg, c)).astype(feats.prefix.dtype)
        x = jnp.concatenate([tokens, feats.prefix, feats.patches.reshape(b, h * w, c)], axis=1)
        patch_start = num_agg + feats.prefix.shape[1]
        if attention is not None:
            attention = ops.resize_attention(attention, h, w).reshape(b, h * w)
            alpha = check_batch_alpha(alpha, b)
        for block in self.backbone.blocks[self.config.insertion_block :]:
            x = block(x) if attention is None else biased_block(block, x, num_agg, patch_start, attention, alpha)
        x = self.backbone.norm(x)
        return l2_normalize(x[:, :num_agg].reshape(b, num_agg * c), axis=-1)

    def __call__(
        self, images: jax.Array, attention: jax.Array | None = None, alpha: float | jax.Array = 0.0
    ) -> jax.Array:
        """``aggregate(features(images), attention, alpha)``: [B, H, W, 3] -> [B, T * C]."""
        return self.aggregate(self.features(images), attention=attention, alpha=alpha)
