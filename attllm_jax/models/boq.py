"""BoQ, Bag-of-Queries (Ali-bey et al., CVPR 2024; amaralibey/Bag-of-Queries ``get_trained_boq``) in Flax NNX.

Backbones (upstream ``src/backbones.py`` at HEAD):

- ``dinov2``: DINOv2 ViT-B/14, patch tokens after the last block WITHOUT the final norm (upstream removed it;
  the checkpoint still holds ``backbone.dino.norm.*``, loaded here and never applied), class token dropped;
  ``[B, H/14, W/14, 768]``. Released: 322x322 input, 384 projected channels, descriptor 384 * 32 = 12288.
- ``resnet50``: torchvision ResNet-50 truncated after ``layer3`` (``crop_last_block=True``), stride 16,
  ``[B, H/16, W/16, 1024]``. Released: 384x384 input, 512 projected channels, descriptor 512 * 32 = 16384.
  BatchNorm uses its running statistics (inference; note that ``get_trained_boq`` itself does not call
  ``.eval()``).

Aggregator (upstream ``src/boq.py``): a 3x3 convolution ``proj_c`` (padding 1) to ``d`` channels, the grid
flattened row-major to ``N`` tokens, ``norm_input`` (LayerNorm), then ``L = 2`` BoQ blocks. Block ``b``:
``x = encoder(x)`` (``torch.nn.TransformerEncoderLayer``: post-norm, ReLU, feed-forward ``4d``, ``d / 64`` heads);
learned queries ``q = norm_q(Q + self_attn(Q, Q, Q))`` (``Q`` ``[1, 64, d]``, independent of the image);
``o_b = norm_out(cross_attn(q, x, x))``. Output: ``fc`` (``L * 64 -> row_dim``) applied over the concatenated
queries of all blocks, channel-major flatten (element ``c * row_dim + r``), L2 norm. Every LayerNorm has eps 1e-5.

Attention (our extension): in block ``b`` let ``a[h, q, i]`` be the plain cross-attention weights (softmax over the
tokens ``i``). The native token weight is ``nu_i = mean_{h, q} a[h, q, i]`` divided by its mean over tokens (mean
1); the blended weight ``w_i = nu_i + alpha * (A_i - nu_i)`` with ``A`` the attention map sampled on the token grid
and clamped to ``[0, 2]``; the cross-attention logits become ``logits + log(max(w_i, eps))`` (``eps`` =
:data:`TOKEN_WEIGHT_EPS`), i.e. the attention weights are multiplied by ``w`` and renormalized. Every block does
this with its own ``nu``; the encoder stream does not change, so under ``jax.vmap`` over alpha only the
cross-attention softmax and value product are repeated. ``alpha <= 1e-6`` is plain BoQ.

Attribute names mirror the checkpoint (``backbone.dino.*`` / ``backbone.net.*``, ``aggregator.{proj_c, norm_input,
boqs.N.*, fc}``), torch's ``MultiheadAttention`` ``in_proj_weight`` being ``in_proj``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from attllm_jax import ops
from attllm_jax.data.preprocess import PreprocessSpec
from attllm_jax.models.dinov2 import (
    DinoV2Config,
    DinoVisionTransformer,
    dinov2_config,
    multi_head_attention,
    preset_name,
)
from attllm_jax.models.features import CnnFeatures
from attllm_jax.models.fields import (
    ConfigError,
    check_dinov2,
    check_positive_ints,
    dinov2_from_dict,
    scalar_dataclass,
    strict_fields,
)
from attllm_jax.models.resnet import ResNet, ResNetConfig
from attllm_jax.ops.attention_maps import MAX_WEIGHT
from attllm_jax.ops.gem import ALPHA_OFF
from attllm_jax.ops.normalize import l2_normalize

BACKBONES = ("dinov2", "resnet50")
LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm / TransformerEncoderLayer default
TOKEN_WEIGHT_EPS = 1e-6  # floor of the blended token weight before its log is added to the logits
_HEAD_DIM = 64


def resnet50_layer3_config(layers: tuple[int, int, int] = (3, 4, 6), width: int = 64) -> ResNetConfig:
    """A ResNet-50 that ends after ``layer3`` (``layer4`` has no blocks), as BoQ's ``crop_last_block=True``."""
    return ResNetConfig("resnet50_layer3", "bottleneck", (*layers, 0), width)


RELEASED_IMAGE_SIZE = {"dinov2": (322, 322), "resnet50": (384, 384)}


@dataclasses.dataclass(frozen=True)
class BoQSpec:
    """Architecture of a BoQ network (exactly one of ``dinov2`` and ``resnet_layers`` is set).

    Attributes:
        dinov2: the DINOv2 backbone's architecture, or None for a ResNet-50 backbone.
        resnet_layers: Bottleneck blocks of ``layer1``..``layer3`` (``(3, 4, 6)`` for ResNet-50), or None.
        resnet_width: stem channels of the ResNet (64).
        proj_channels: ``d``, width of the projected tokens (384 for DINOv2, 512 for ResNet-50).
        num_queries: learned queries per block (64).
        num_layers: BoQ blocks ``L`` (2).
        row_dim: output of ``fc`` per channel (32).
        num_heads: attention heads of every block (upstream: ``d / 64``).
    """

    dinov2: DinoV2Config | None = dataclasses.field(default_factory=lambda: dinov2_config("dinov2_vitb14"))
    resnet_layers: tuple[int, int, int] | None = None
    resnet_width: int = 64
    proj_channels: int = 384
    num_queries: int = 64
    num_layers: int = 2
    row_dim: int = 32
    num_heads: int = 6

    FORMAT_1_FIELDS: ClassVar[tuple[str, ...]] = ()  # BoQ is newer than release 0.1.0

    def __post_init__(self):
        if (self.dinov2 is None) == (self.resnet_layers is None):
            raise ValueError("a BoQ spec needs exactly one backbone: dinov2 or resnet_layers")
        if self.dinov2 is not None:
            check_dinov2(self.dinov2)
        if self.resnet_layers is not None:
            layers = tuple(self.resnet_layers)
            if len(layers) != 3 or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in layers):
                raise ValueError(f"resnet_layers must be 3 positive ints, got {self.resnet_layers!r}")
            object.__setattr__(self, "resnet_layers", layers)
        sizes = [f.name for f in dataclasses.fields(self) if f.name not in ("dinov2", "resnet_layers")]
        check_positive_ints(self, sizes)
        if self.proj_channels % self.num_heads:
            raise ValueError(f"proj_channels {self.proj_channels} is not divisible by num_heads {self.num_heads}")

    @classmethod
    def released(cls, backbone: str = "dinov2") -> BoQSpec:
        """A released architecture: ``"dinov2"`` (``dinov2_12288.pth``) or ``"resnet50"`` (``resnet50_16384.pth``)."""
        if backbone == "dinov2":
            return cls()
        if backbone == "resnet50":
            return cls(dinov2=None, resnet_layers=(3, 4, 6), proj_channels=512, num_heads=8)
        raise ValueError(f"BoQ backbone must be one of {BACKBONES}, got {backbone!r}")

    @property
    def kind(self) -> str:
        """``"dinov2"`` or ``"resnet50"``."""
        return "dinov2" if self.dinov2 is not None else "resnet50"

    @property
    def backbone(self) -> str:
        """``"dinov2_vitb14"`` (another DINOv2 preset, ``"dinov2_custom"``), ``"resnet50"`` or ``"resnet_custom"``."""
        if self.dinov2 is not None:
            return preset_name(self.dinov2) or "dinov2_custom"
        return "resnet50" if (self.resnet_layers, self.resnet_width) == ((3, 4, 6), 64) else "resnet_custom"

    @property
    def resnet(self) -> ResNetConfig | None:
        """The truncated ResNet's config (:func:`resnet50_layer3_config`), or None."""
        return None if self.resnet_layers is None else resnet50_layer3_config(self.resnet_layers, self.resnet_width)

    @property
    def in_channels(self) -> int:
        """Channels of the backbone map (768 for ViT-B/14, 1024 for ResNet-50's ``layer3``)."""
        if self.dinov2 is not None:
            return self.dinov2.embed_dim
        return self.resnet_width * 4 * 4  # layer3: planes 4 * width, bottleneck expansion 4

    @property
    def descriptor_dim(self) -> int:
        """``proj_channels * row_dim`` (12288 / 16384 for the released models)."""
        return self.proj_channels * self.row_dim

    def default_preprocess(self) -> PreprocessSpec:
        """VPR-methods-evaluation's transform: normalize, then resize the float image to 322x322 (DINOv2) or
        384x384 (ResNet-50), antialiased bilinear."""
        return PreprocessSpec.tensor(RELEASED_IMAGE_SIZE[self.kind])

    def build(self, rngs: nnx.Rngs | None = None) -> BoQNet:
        """The network with random weights (``nnx.Rngs(0)`` unless given)."""
        return BoQNet(self, rngs=rngs if rngs is not None else nnx.Rngs(0))

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["dinov2"] = None if self.dinov2 is None else self.dinov2.to_dict()
        out["resnet_layers"] = None if self.resnet_layers is None else list(self.resnet_layers)
        return out

    @classmethod
    def from_dict(cls, data: Any, where: str, require_all: bool = True) -> BoQSpec:
        """From :meth:`to_dict` output; every field must be present unless ``require_all`` is False."""
        kwargs = strict_fields(cls, data, where, require_all)
        dinov2 = dinov2_from_dict(kwargs.pop("dinov2", None), where, require_all)
        layers = kwargs.pop("resnet_layers", None)
        if layers is not None and (not isinstance(layers, list) or not all(type(n) is int for n in layers)):
            raise ConfigError(f"{where}.resnet_layers must be a list of 3 ints or null, got {layers!r}")
        layers = None if layers is None else tuple(layers)
        return scalar_dataclass(cls, kwargs, where, require_all=False, dinov2=dinov2, resnet_layers=layers)

    @classmethod
    def from_format_1(cls, data: dict, where: str) -> BoQSpec:
        """Release 0.1.0 had no BoQ: a format-1 BoQ config is an error."""
        raise ConfigError(f"{where}: a 'boq' model needs config.json format 2 (release 0.1.0 had no BoQ)")


def _layer_norm(dim: int, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(dim, epsilon=LAYER_NORM_EPS, use_fast_variance=False, rngs=rngs)


class MultiheadAttention(nnx.Module):
    """``torch.nn.MultiheadAttention`` (batch-first, bias, no dropout) with a fused input projection.

    Attributes:
        num_heads: heads ``H``.
        in_proj: ``d -> 3d`` (torch's ``in_proj_weight`` / ``in_proj_bias``: query, key, value rows in that order).
        out_proj: ``d -> d``.
    """

    def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.in_proj = nnx.Linear(dim, 3 * dim, rngs=rngs)
        self.out_proj = nnx.Linear(dim, dim, rngs=rngs)

    def _heads(self, x: jax.Array, which: int) -> jax.Array:
        """Projects [B, T, d] with the query (0), key (1) or value (2) rows and splits heads: [B, H, T, d/H]."""
        dim = x.shape[-1]
        kernel = self.in_proj.kernel[...][:, which * dim : (which + 1) * dim]
        bias = self.in_proj.bias[...][which * dim : (which + 1) * dim]
        y = x @ kernel + bias
        return y.reshape(*x.shape[:-1], self.num_heads, dim // self.num_heads).swapaxes(-2, -3)

    def _merge(self, out: jax.Array) -> jax.Array:
        """[B, H, T, d/H] -> out_proj([B, T, d])."""
        b, h, t, dh = out.shape
        return self.out_proj(out.swapaxes(1, 2).reshape(b, t, h * dh))

    def self_attention(self, x: jax.Array) -> jax.Array:
        """``attn(x, x, x)``: [B, T, d] -> [B, T, d]."""
        q, k, v = (self._heads(x, i) for i in range(3))
        return self._merge(multi_head_attention(q * q.shape[-1] ** -0.5, k, v))

    def cross_logits(self, queries: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Scaled logits ``[B, H, Q, N]`` of queries [B or 1, Q, d] against tokens [B, N, d], and the values."""
        q = self._heads(queries, 0)
        k, v = self._heads(tokens, 1), self._heads(tokens, 2)
        logits = jnp.einsum("bhqd,bhnd->bhqn", q * q.shape[-1] ** -0.5, k)
        return logits, v

    def attend(self, weights: jax.Array, values: jax.Array) -> jax.Array:
        """``out_proj(weights @ values)``: weights [B, H, Q, N], values [B, H, N, d/H] -> [B, Q, d]."""
        return self._merge(weights @ values)


class TransformerEncoderLayer(nnx.Module):
    """``torch.nn.TransformerEncoderLayer(d, H, 4d, dropout=0, batch_first=True)``: post-norm, ReLU.

    ``x = norm1(x + self_attn(x))`` then ``x = norm2(x + linear2(relu(linear1(x))))``.
    """

    def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs):
        self.self_attn = MultiheadAttention(dim, num_heads, rngs=rngs)
        self.linear1 = nnx.Linear(dim, 4 * dim, rngs=rngs)
        self.linear2 = nnx.Linear(4 * dim, dim, rngs=rngs)
        self.norm1 = _layer_norm(dim, rngs)
        self.norm2 = _layer_norm(dim, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.norm1(x + self.self_attn.self_attention(x))
        return self.norm2(x + self.linear2(jax.nn.relu(self.linear1(x))))


def blended_token_log_weights(plain: jax.Array, attention: jax.Array, alpha: jax.Array) -> jax.Array:
    """``log(max(w_i, eps))`` with ``w = nu + alpha (A - nu)`` and ``nu`` the mean-1 head- and query-mean of ``plain``.

    Args:
        plain: plain cross-attention weights [B, H, Q, N].
        attention: [B, N] attention sampled on the token grid (clamped to [0, 2] here).
        alpha: [B] blend factors.

    Returns:
        [B, N] log token weights, added to every head's and query's logits.
    """
    mass = jnp.mean(plain, axis=(1, 2))  # [B, N]
    nu = mass / jnp.maximum(jnp.mean(mass, axis=1, keepdims=True), jnp.finfo(mass.dtype).tiny)
    weights = nu + alpha[:, None] * (jnp.clip(attention, 0.0, MAX_WEIGHT) - nu)
    return jnp.log(jnp.maximum(weights, TOKEN_WEIGHT_EPS))


class BoQBlock(nnx.Module):
    """One BoQ block: encoder layer over the tokens, learned queries, cross-attention queries -> tokens.

    Attributes:
        encoder: :class:`TransformerEncoderLayer`.
        queries: learned queries [1, Q, d].
        self_attn: the queries' self-attention; ``norm_q`` its LayerNorm.
        cross_attn: queries -> tokens; ``norm_out`` its LayerNorm.
    """

    def __init__(self, dim: int, num_queries: int, num_heads: int, *, rngs: nnx.Rngs):
        self.encoder = TransformerEncoderLayer(dim, num_heads, rngs=rngs)
        self.queries = nnx.Param(jax.random.normal(rngs.params(), (1, num_queries, dim)))
        self.self_attn = MultiheadAttention(dim, num_heads, rngs=rngs)
        self.norm_q = _layer_norm(dim, rngs)
        self.cross_attn = MultiheadAttention(dim, num_heads, rngs=rngs)
        self.norm_out = _layer_norm(dim, rngs)

    def learned_queries(self) -> jax.Array:
        """``norm_q(Q + self_attn(Q, Q, Q))``: [1, Q, d] (the same for every image)."""
        q = self.queries[...]
        return self.norm_q(q + self.self_attn.self_attention(q))

    def __call__(
        self, x: jax.Array, attention: jax.Array | None = None, alpha: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Runs the block.

        Args:
            x: tokens [B, N, d].
            attention: optional [B, N] map on the token grid.
            alpha: [B] blend factors (needed with ``attention``).

        Returns:
            ``(x', out, weights)``: encoded tokens [B, N, d], block output [B, Q, d] and the cross-attention
            weights actually used, averaged over heads [B, Q, N] (what upstream returns as ``attn``).
        """
        x = self.encoder(x)
        logits, values = self.cross_attn.cross_logits(self.learned_queries(), x)
        weights = jax.nn.softmax(logits, axis=-1)
        if attention is not None:
            log_w = blended_token_log_weights(weights, attention, alpha)
            modulated = jax.nn.softmax(logits + log_w[:, None, None, :], axis=-1)
            weights = jnp.where((alpha <= ALPHA_OFF)[:, None, None, None], weights, modulated)
        out = self.norm_out(self.cross_attn.attend(weights, values))
        return x, out, jnp.mean(weights, axis=1)


class BoQAggregator(nnx.Module):
    """BoQ head: backbone map [B, h, w, C] -> descriptor [B, d * row_dim].

    Attributes:
        proj_c: 3x3 convolution ``C -> d`` (padding 1).
        norm_input: LayerNorm of the flattened tokens.
        boqs: the :class:`BoQBlock` list.
        fc: ``L * Q -> row_dim`` over the concatenated block outputs.
    """

    def __init__(self, config: BoQSpec, *, rngs: nnx.Rngs):
        d = config.proj_channels
        self.proj_c = nnx.Conv(config.in_channels, d, (3, 3), padding=((1, 1), (1, 1)), rngs=rngs)
        self.norm_input = _layer_norm(d, rngs)
        self.boqs = nnx.List(
            [BoQBlock(d, config.num_queries, config.num_heads, rngs=rngs) for _ in range(config.num_layers)]
        )
        self.fc = nnx.Linear(config.num_layers * config.num_queries, config.row_dim, rngs=rngs)

    def tokens(self, feature_map: jax.Array) -> jax.Array:
        """``norm_input(flatten(proj_c(map)))``: [B, h, w, C] -> [B, h*w, d] (row-major)."""
        y = self.proj_c(feature_map)
        b, h, w, d = y.shape
        return self.norm_input(y.reshape(b, h * w, d))

    def intermediates(
        self, feature_map: jax.Array, attention: jax.Array | None = None, alpha: float | jax.Array = 0.0
    ) -> tuple[jax.Array, list[jax.Array]]:
        """The descriptor [B, d * row_dim] and every block's head-averaged cross-attention weights [B, Q, N]."""
        b, h, w, _ = feature_map.shape
        x = self.tokens(feature_map)
        if attention is not None:
            attention = ops.resize_attention(attention, h, w).reshape(b, h * w)
            alpha = jnp.broadcast_to(jnp.asarray(alpha, attention.dtype), (b,))
        outs, weights = [], []
        for block in self.boqs:
            x, out, attn = block(x, attention, alpha)
            outs.append(out)
            weights.append(attn)
        out = jnp.concatenate(outs, axis=1)  # [B, L*Q, d]
        out = self.fc(out.swapaxes(1, 2))  # [B, d, row_dim]
        return l2_normalize(out.reshape(b, -1), axis=-1), weights

    def __call__(
        self, feature_map: jax.Array, attention: jax.Array | None = None, alpha: float | jax.Array = 0.0
    ) -> jax.Array:
        """L2-normalized descriptors [B, d * row_dim]; ``attention`` [B, h', w'] is resized to ``h x w``."""
        return self.intermediates(feature_map, attention, alpha)[0]


class BoQNet(nnx.Module):
    """A BoQ backbone + aggregator with the VPR net interface (``features`` / ``aggregate`` / ``__call__``).

    Attributes:
        config: the architecture.
        backbone: :class:`~attllm_jax.models.dinov2.DinoVisionTransformer` or a truncated
            :class:`~attllm_jax.models.resnet.ResNet`.
        aggregator: :class:`BoQAggregator`.
    """

    def __init__(self, config: BoQSpec, *, rngs: nnx.Rngs):
        self.config = config
        if config.dinov2 is not None:
            self.backbone = DinoVisionTransformer(config.dinov2, rngs=rngs)
        else:
            self.backbone = ResNet(config.resnet, rngs=rngs)
        self.aggregator = BoQAggregator(config, rngs=rngs)

    def features(self, images: jax.Array) -> CnnFeatures:
        """The backbone map as :class:`~attllm_jax.models.features.CnnFeatures` (``maps`` [B, h, w, C]).

        DINOv2: tokens after the last block, without the final norm, class and register tokens dropped
        (``h = H / 14``). ResNet-50: the ``layer3`` output (``h = ceil(H / 16)``).

        Args:
            images: [B, H, W, 3] normalized images (DINOv2: sides multiples of 14).
        """
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must have shape [B, H, W, 3], got {images.shape}")
        if self.config.dinov2 is None:
            return CnnFeatures(maps=self.backbone.stages(images)["layer3"])
        vit = self.backbone
        x = vit.prepare_tokens(images)
        for block in vit.blocks:
            x = block(x)
        b, height, width, _ = images.shape
        p = vit.config.patch_size
        patches = x[:, 1 + vit.config.num_register_tokens :]
        return CnnFeatures(maps=patches.reshape(b, height // p, width // p, -1))

    def aggregate(
        self, feats: CnnFeatures, attention: jax.Array | None = None, alpha: float | jax.Array = 0.0
    ) -> jax.Array:
        """BoQ descriptors [B, d * row_dim] from :meth:`features` output.

        Args:
            feats: :class:`CnnFeatures` (``maps`` [B, h, w, C]).
            attention: optional [B, h', w'] map, resized bilinearly to ``h x w``.
            alpha: blend factor in [0, 1], scalar or [B]; ``<= 1e-6`` is plain BoQ.
        """
        if not isinstance(feats, CnnFeatures):
            raise ValueError(f"BoQ features must be CnnFeatures (the backbone map), got {type(feats).__name__}")
        return self.aggregator(feats.maps, attention, alpha)

    def __call__(
        self, images: jax.Array, attention: jax.Array | None = None, alpha: float | jax.Array = 0.0
    ) -> jax.Array:
        """``aggregate(features(images), attention, alpha)``: [B, H, W, 3] -> [B, d * row_dim]."""
        return self.aggregate(self.features(images), attention=attention, alpha=alpha)
