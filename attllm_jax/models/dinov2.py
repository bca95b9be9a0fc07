"""DINOv2 vision transformers (ViT-S/14, B/14, L/14, g/14, optionally with register tokens) in Flax NNX.

A port of facebookresearch/dinov2's ``DinoVisionTransformer`` in inference mode, channels-last. Attribute names
mirror the torch.hub module names (``patch_embed.proj``, ``cls_token``, ``pos_embed``, ``register_tokens``,
``blocks[i].{norm1, attn.qkv, attn.proj, ls1, norm2, mlp.fc1 | mlp.w12, mlp.fc2 | mlp.w3, ls2}``, ``norm``) so a
checkpoint maps onto it by renames and transposes (see :mod:`attllm_jax.convert.salad`). Semantics: LayerNorm eps
1e-6 (two-pass variance), exact (erf) GELU, layer scale on both residual branches, SwiGLU feed-forward for ViT-g.

Position embeddings are stored on an ``M x M`` grid (37 x 37 for the released models) and resized to the input's
``H/14 x W/14`` patch grid as upstream does:

- original models (``interpolate_offset=0.1``, no antialias): bicubic with
  ``scale_factor=((h0 + 0.1) / M, (w0 + 0.1) / M)``, torch-exact through
  :func:`attllm_jax.ops.bicubic_resize_scale_factor`.
  Upstream's variable names look swapped (``B, nc, w, h = x.shape``), but its ``w`` is the image height, so the
  first (row) factor comes from the height: there is no transposition to reproduce, also for non-square inputs.
- register models (``interpolate_offset=0``, antialias): ``size=(h0, w0)`` with torch's antialiased bicubic
  (PIL-style support scaling, cubic ``a = -0.5``, weights renormalized at the edges).

A square ``M x M`` patch grid uses the stored embeddings unchanged, as upstream.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from attllm_jax import ops
from attllm_jax.ops.resize import antialiased_bicubic_matrix, apply_separable

FFN_LAYERS = ("mlp", "swiglu")


@dataclasses.dataclass(frozen=True)
class DinoV2Config:
    """Architecture of a DINOv2 vision transformer.

    Attributes:
        embed_dim: token width ``C``.
        depth: number of transformer blocks.
        num_heads: attention heads (``embed_dim`` must be divisible by it).
        ffn_layer: ``"mlp"`` (fc1 -> GELU -> fc2) or ``"swiglu"`` (w12 -> SiLU gate -> w3).
        ffn_hidden_dim: hidden width of the feed-forward (4C for the MLP; for SwiGLU upstream's
            ``(int(4C * 2 / 3) + 7) // 8 * 8``).
        patch_size: patch side in pixels (14).
        pos_embed_grid: side ``M`` of the stored position-embedding grid (37 for 518-pixel training).
        num_register_tokens: register tokens inserted after the class token (0 or 4 upstream).
        interpolate_offset: upstream's offset added to the target grid in the scale factor; 0 means resize by size.
        interpolate_antialias: antialiased bicubic when resizing the position embeddings.
        layer_norm_eps: LayerNorm epsilon.
    """

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    ffn_layer: str = "mlp"
    ffn_hidden_dim: int = 3072
    patch_size: int = 14
    pos_embed_grid: int = 37
    num_register_tokens: int = 0
    interpolate_offset: float = 0.1
    interpolate_antialias: bool = False
    layer_norm_eps: float = 1e-6

    def __post_init__(self):
        if self.ffn_layer not in FFN_LAYERS:
            raise ValueError(f"ffn_layer must be one of {FFN_LAYERS}, got {self.ffn_layer!r}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        for name in ("embed_dim", "depth", "num_heads", "ffn_hidden_dim", "patch_size", "pos_embed_grid"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.num_register_tokens < 0:
            raise ValueError(f"num_register_tokens must be >= 0, got {self.num_register_tokens}")

    def to_dict(self) -> dict:
        """A JSON-serializable dict (the inverse of :meth:`from_dict`)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DinoV2Config:
        """Builds a config from :meth:`to_dict` output; unknown keys are an error naming them."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"unknown DINOv2 config keys {unknown}; valid: {sorted(fields)}")
        return cls(**d)


def swiglu_hidden_dim(embed_dim: int, mlp_ratio: float = 4.0) -> int:
    """Upstream's SwiGLU hidden width: two thirds of the MLP width, rounded up to a multiple of 8."""
    return (int(int(embed_dim * mlp_ratio) * 2 / 3) + 7) // 8 * 8


def _preset(embed_dim: int, depth: int, ffn_layer: str = "mlp", registers: bool = False) -> DinoV2Config:
    hidden = swiglu_hidden_dim(embed_dim) if ffn_layer == "swiglu" else 4 * embed_dim
    return DinoV2Config(
        embed_dim=embed_dim,
        depth=depth,
        num_heads=embed_dim // 64,
        ffn_layer=ffn_layer,
        ffn_hidden_dim=hidden,
        num_register_tokens=4 if registers else 0,
        interpolate_offset=0.0 if registers else 0.1,
        interpolate_antialias=registers,
    )


# torch.hub names -> architectures (all with 64-dimensional heads, 37 x 37 position grids, patch 14).
DINOV2_PRESETS: dict[str, DinoV2Config] = {
    "dinov2_vits14": _preset(384, 12),
    "dinov2_vitb14": _preset(768, 12),
    "dinov2_vitl14": _preset(1024, 24),
    "dinov2_vitg14": _preset(1536, 40, "swiglu"),
    "dinov2_vits14_reg": _preset(384, 12, registers=True),
    "dinov2_vitb14_reg": _preset(768, 12, registers=True),
    "dinov2_vitl14_reg": _preset(1024, 24, registers=True),
    "dinov2_vitg14_reg": _preset(1536, 40, "swiglu", registers=True),
}


def dinov2_config(name: str) -> DinoV2Config:
    """The preset architecture of a torch.hub DINOv2 model name, e.g. ``"dinov2_vitb14"``.

    Raises:
        ValueError: unknown name; the message lists the valid ones.
    """
    if name not in DINOV2_PRESETS:
        raise ValueError(f"unknown DINOv2 model {name!r}; valid: {', '.join(DINOV2_PRESETS)}")
    return DINOV2_PRESETS[name]


def preset_name(config: DinoV2Config) -> str | None:
    """The preset name whose architecture (ignoring interpolation settings) equals ``config``, or None."""
    for name, preset in DINOV2_PRESETS.items():
        if dataclasses.replace(preset, interpolate_offset=0.0, interpolate_antialias=False) == dataclasses.replace(
            config, interpolate_offset=0.0, interpolate_antialias=False
        ):
            return name
    return None


class PatchEmbed(nnx.Module):
    """Non-overlapping ``p x p`` patches projected to ``C`` channels: [B, H, W, 3] -> [B, H/p, W/p, C]."""

    def __init__(self, patch_size: int, embed_dim: int, *, rngs: nnx.Rngs):
        self.patch_size = patch_size
        self.proj = nnx.Conv(3, embed_dim, (patch_size, patch_size), strides=patch_size, padding="VALID", rngs=rngs)

    def __call__(self, images: jax.Array) -> jax.Array:
        _, height, width, _ = images.shape
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"image size {height}x{width} is not divisible by the patch size {p}")
        return self.proj(images)


# On CPU, attention runs over groups of (image, head) pairs whose [T, T] weights fit in about this many bytes: the
# whole [B, heads, T, T] tensor of a batch (~108 MB for 8 images at 322x322) falls out of cache and runs 2x slower.
CPU_ATTENTION_CHUNK_BYTES = 4 << 20


def _attention_core(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """softmax(q k^T) v over the last two axes; q is already scaled. [..., T, d] -> [..., T, d] float32 (or wider).

    The logits, the softmax and its normalization are float32 also for bfloat16 ``q, k, v``; the unnormalized
    weights enter the value product in ``v``'s dtype, accumulated in float32.
    """
    f32 = jnp.promote_types(q.dtype, jnp.float32)
    logits = jnp.matmul(q, jnp.swapaxes(k, -1, -2), preferred_element_type=f32)
    weights = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    # Normalizing after the value product divides a [T, d] block instead of a [T, T] one; same result to round-off.
    values = jnp.matmul(weights.astype(v.dtype), v, preferred_element_type=f32)
    return values / jnp.sum(weights, axis=-1, keepdims=True)


def multi_head_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Scaled dot-product attention without masking: [B, heads, T, d] (q already scaled) -> [B, heads, T, d].

    Logits and softmax in float32 whatever the inputs' dtype (bfloat16 under the bfloat16 precision); the output
    is float32 (or wider).

    On CPU the (image, head) pairs are processed in groups of :data:`CPU_ATTENTION_CHUNK_BYTES` of attention
    weights with ``jax.lax.map``; elsewhere in one batched computation.
    """
    b, h, t, d = q.shape
    group = max(1, CPU_ATTENTION_CHUNK_BYTES // (t * t * max(q.dtype.itemsize, 4)))  # float32 logits
    if jax.default_backend() != "cpu" or group >= b * h:
        return _attention_core(q, k, v)
    flat = tuple(x.reshape(b * h, t, d) for x in (q, k, v))
    out = jax.lax.map(lambda qkv: _attention_core(*qkv), flat, batch_size=group)
    return out.reshape(b, h, t, d)


class Attention(nnx.Module):
    """Multi-head self-attention with a fused ``qkv`` projection: [B, T, C] -> [B, T, C]."""

    def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.qkv = nnx.Linear(dim, 3 * dim, rngs=rngs)
        self.proj = nnx.Linear(dim, dim, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, c = x.shape
        head_dim = c // self.num_heads
        qkv = self.qkv(x)
        if self.qkv.dtype is not None:  # the bfloat16 precision: attention products on bfloat16 operands too
            qkv = qkv.astype(self.qkv.dtype)
        qkv = qkv.reshape(b, t, 3, self.num_heads, head_dim).transpose(2, 0, 3, 1, 4)
        out = multi_head_attention(qkv[0] * head_dim**-0.5, qkv[1], qkv[2])  # [B, heads, T, head_dim]
        return self.proj(out.transpose(0, 2, 1, 3).reshape(b, t, c))


class Mlp(nnx.Module):
    """fc1 -> exact GELU -> fc2."""

    def __init__(self, dim: int, hidden_dim: int, *, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(dim, hidden_dim, rngs=rngs)
        self.fc2 = nnx.Linear(hidden_dim, dim, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class SwiGLUFFN(nnx.Module):
    """w12 -> split into (gate, value) -> SiLU(gate) * value -> w3."""

    def __init__(self, dim: int, hidden_dim: int, *, rngs: nnx.Rngs):
        self.w12 = nnx.Linear(dim, 2 * hidden_dim, rngs=rngs)
        self.w3 = nnx.Linear(hidden_dim, dim, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        gate, value = jnp.split(self.w12(x), 2, axis=-1)
        return self.w3(jax.nn.silu(gate) * value)


class LayerScale(nnx.Module):
    """Per-channel scaling ``x * gamma``."""

    def __init__(self, dim: int, init_value: float = 1.0):
        self.gamma = nnx.Param(jnp.full((dim,), init_value, jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x * self.gamma[...]


def _layer_norm(dim: int, eps: float, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # Two-pass variance as PyTorch: DINOv2 tokens have large-magnitude channels where E[x^2] - E[x]^2 loses digits.
    return nnx.LayerNorm(dim, epsilon=eps, use_fast_variance=False, rngs=rngs)


class Block(nnx.Module):
    """Pre-norm transformer block: ``x + ls1(attn(norm1(x)))`` then ``x + ls2(mlp(norm2(x)))``."""

    def __init__(self, config: DinoV2Config, *, rngs: nnx.Rngs):
        dim = config.embed_dim
        self.norm1 = _layer_norm(dim, config.layer_norm_eps, rngs)
        self.attn = Attention(dim, config.num_heads, rngs=rngs)
        self.ls1 = LayerScale(dim)
        self.norm2 = _layer_norm(dim, config.layer_norm_eps, rngs)
        ffn = SwiGLUFFN if config.ffn_layer == "swiglu" else Mlp
        self.mlp = ffn(dim, config.ffn_hidden_dim, rngs=rngs)
        self.ls2 = LayerScale(dim)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


def resize_pos_embed_grid(grid: jax.Array, h0: int, w0: int, offset: float, antialias: bool) -> jax.Array:
    """Resizes a position-embedding grid [1, M, M, C] to [1, h0, w0, C] with upstream DINOv2's semantics.

    Args:
        grid: position embeddings of the patch tokens as a grid.
        h0: target rows.
        w0: target columns.
        offset: ``interpolate_offset``; > 0 resizes by ``scale_factor=((h0 + offset) / M, (w0 + offset) / M)``,
            0 by size.
        antialias: antialiased (PIL-style) bicubic; only the size-based mode of the register models uses it.

    Returns:
        [1, h0, w0, C] float32.
    """
    m_rows, m_cols = grid.shape[1], grid.shape[2]
    if offset:
        scale = ((h0 + offset) / m_rows, (w0 + offset) / m_cols)
        if antialias:
            raise NotImplementedError("antialiased resizing with a nonzero interpolate_offset (no upstream model)")
        out = ops.bicubic_resize_scale_factor(grid, scale)
    elif antialias:
        out = apply_separable(grid, antialiased_bicubic_matrix(m_rows, h0), antialiased_bicubic_matrix(m_cols, w0))
    else:
        out = ops.bicubic_resize_scale_factor(grid, (h0 / m_rows, w0 / m_cols))
    if out.shape[1:3] != (h0, w0):
        raise ValueError(f"position-embedding resize produced grid {out.shape[1:3]}, expected {(h0, w0)}")
    return out


class DinoVisionTransformer(nnx.Module):
    """DINOv2 backbone: images [B, H, W, 3] (H, W multiples of the patch size) -> normalized tokens.

    Attributes:
        config: the architecture.
        patch_embed: :class:`PatchEmbed`.
        cls_token: [1, 1, C].
        pos_embed: [1, 1 + M*M, C] (class token's embedding first).
        register_tokens: [1, R, C], or None without registers.
        blocks: the transformer :class:`Block` list.
        norm: the final LayerNorm.
    """

    def __init__(self, config: DinoV2Config, *, rngs: nnx.Rngs):
        self.config = config
        c = config.embed_dim
        self.patch_embed = PatchEmbed(config.patch_size, c, rngs=rngs)
        self.cls_token = nnx.Param(1e-6 * jax.random.normal(rngs.params(), (1, 1, c)))
        self.pos_embed = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, 1 + config.pos_embed_grid**2, c)))
        if config.num_register_tokens:
            self.register_tokens = nnx.Param(
                1e-6 * jax.random.normal(rngs.params(), (1, config.num_register_tokens, c))
            )
        else:
            self.register_tokens = None
        self.blocks = nnx.List([Block(config, rngs=rngs) for _ in range(config.depth)])
        self.norm = _layer_norm(c, config.layer_norm_eps, rngs)

    def interpolate_pos_encoding(self, h0: int, w0: int) -> jax.Array:
        """Position embeddings for an ``h0 x w0`` patch grid: [1, 1 + h0*w0, C]."""
        pos = self.pos_embed[...]
        m = self.config.pos_embed_grid
        if h0 == w0 == m:
            return pos
        grid = pos[:, 1:].reshape(1, m, m, -1)
        grid = resize_pos_embed_grid(grid, h0, w0, self.config.interpolate_offset, self.config.interpolate_antialias)
        return jnp.concatenate([pos[:, :1], grid.reshape(1, h0 * w0, -1).astype(pos.dtype)], axis=1)

    def prepare_tokens(self, images: jax.Array) -> jax.Array:
        """Patch embedding, class token, position embeddings, then registers: [B, 1 + R + h0*w0, C]."""
        x = self.patch_embed(images)
        b, h0, w0, c = x.shape
        x = x.reshape(b, h0 * w0, c)
        cls = jnp.broadcast_to(self.cls_token[...], (b, 1, c))
        x = jnp.concatenate([cls, x], axis=1) + self.interpolate_pos_encoding(h0, w0)
        if self.register_tokens is not None:
            regs = jnp.broadcast_to(self.register_tokens[...], (b, self.config.num_register_tokens, c))
            x = jnp.concatenate([x[:, :1], regs, x[:, 1:]], axis=1)
        return x

    def forward_features(self, images: jax.Array) -> dict[str, jax.Array]:
        """Runs the transformer.

        Args:
            images: [B, H, W, 3] normalized images, H and W divisible by the patch size.

        Returns:
            ``{"cls": [B, C], "registers": [B, R, C], "patches": [B, H/p, W/p, C]}``, all after the final norm.

        Raises:
            ValueError: a bad image shape.
        """
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must have shape [B, H, W, 3], got {images.shape}")
        b, height, width, _ = images.shape
        x = self.prepare_tokens(images)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        r = self.config.num_register_tokens
        p = self.config.patch_size
        return {
            "cls": x[:, 0],
            "registers": x[:, 1 : 1 + r],
            "patches": x[:, 1 + r :].reshape(b, height // p, width // p, -1),
        }

    def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
        """Alias of :meth:`forward_features`."""
        return self.forward_features(images)
