"""Converts DINOv2 + SALAD PyTorch checkpoints (serizba/salad ``dino_salad.ckpt``) into :class:`SaladNet` modules.

The released checkpoint is the state dict of upstream's ``VPRModel``: the torch.hub DINOv2 under
``backbone.model.`` (``cls_token``, ``pos_embed``, ``mask_token``, ``register_tokens``, ``patch_embed.proj.*``,
``blocks.N.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2, mlp.fc1 | mlp.w12, mlp.fc2 | mlp.w3, ls2.gamma}.*``,
``norm.*``) and the SALAD head under ``aggregator.`` (``token_features.{0,2}``, ``cluster_features.{0,3}``,
``score.{0,3}`` with 1x1-convolution weights, ``dust_bin``). A Lightning ``{"state_dict": ...}`` wrapper is
accepted too. Every dimension (width, depth, feed-forward kind and width, patch size, position grid, registers,
cluster sizes) is inferred from the shapes; only the head count is not in the weights (DINOv2 uses 64-dimensional
heads, the default). :data:`DINOV2_KEYS` and :data:`KEYS` map every target parameter to its source key, checked
strictly both ways by :func:`~attllm_jax.convert.common.fill_module`; ``mask_token`` (used only for masked
pre-training) is the one tensor deliberately dropped.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence

from flax import nnx

from attllm_jax.convert.common import ConversionError, TensorSource, describe_keys, fill_module
from attllm_jax.convert.keytable import (
    KeyTable,
    Rule,
    check_family,
    checked_image_size,
    convert_with_table,
    take_all,
    torch_conv_to_hwio,
    torch_linear_to_io,
)
from attllm_jax.data.preprocess import PreprocessSpec
from attllm_jax.models.dinov2 import DINOV2_PRESETS, DinoV2Config, DinoVisionTransformer, dinov2_config
from attllm_jax.models.salad import DEFAULT_IMAGE_SIZE, SaladSpec
from attllm_jax.models.spec import ModelSpec

CONVERTER_VERSION = "1.0"
FAMILY = "salad"


@dataclasses.dataclass(frozen=True)
class SaladConvertOptions:
    """What a SALAD (or CliqueMining) conversion is told besides the checkpoint.

    Attributes:
        backbone: optional expected torch.hub name (``"dinov2_vitb14"``), checked against the shapes.
        num_heads: attention heads, when the width is not a multiple of 64 (custom models).
        image_size: evaluation ``(height, width)``, multiples of the patch size (322x322 upstream).
        interpolate_offset: position-embedding interpolation offset (default: as the torch.hub model).
        interpolate_antialias: antialiased position-embedding interpolation (default: as the torch.hub model).
    """

    backbone: str | None = None
    num_heads: int | None = None
    image_size: Sequence[int] = DEFAULT_IMAGE_SIZE
    interpolate_offset: float | None = None
    interpolate_antialias: bool | None = None

    @property
    def descriptor_dim(self) -> None:
        """SALAD's dimension follows from the checkpoint; nothing to expect."""
        return None


Options = SaladConvertOptions  # the options class of this conversion module (see attllm_jax.convert.convert)
BACKBONE_PREFIX = "backbone.model."
AGGREGATOR_PREFIX = "aggregator."
IGNORED = ("num_batches_tracked", "mask_token")  # also matches "backbone.model.mask_token"
_HEAD_DIM = 64  # every DINOv2 release
_REQUIRED_BACKBONE = ("cls_token", "pos_embed", "patch_embed.proj.weight")
_REQUIRED_HEAD = (
    "token_features.0.weight",
    "token_features.2.weight",
    "cluster_features.3.weight",
    "score.3.weight",
    "dust_bin",
)

# Target path in our DinoVisionTransformer -> torch.hub key: the same names, kernels transposed.
DINOV2_KEYS = KeyTable(
    rules=(
        Rule("patch_embed/proj/kernel", "patch_embed.proj.weight", torch_conv_to_hwio),
        Rule("(.+)", r"\1"),
    ),
    leaves={"kernel": "weight", "scale": "weight"},
    transforms={"kernel": torch_linear_to_io},
)
# Our SaladNet -> dino_salad.ckpt: DINOv2 under backbone.model., the head's MLPs (upstream Sequential indices:
# token_features 0 and 2, cluster_features / score 0 and 3; 1x1 convolutions become Linear layers).
KEYS = DINOV2_KEYS.prefixed("backbone/", BACKBONE_PREFIX) + KeyTable(
    rules=(
        Rule("aggregator/dust_bin", "aggregator.dust_bin"),
        Rule("aggregator/(token_features|cluster_features|score)/fc1/(.+)", r"aggregator.\1.0.\2"),
        Rule("aggregator/(token_features)/fc2/(.+)", r"aggregator.\1.2.\2"),
        Rule("aggregator/(cluster_features|score)/fc2/(.+)", r"aggregator.\1.3.\2"),
    ),
    leaves={"kernel": "weight"},
    transforms={"kernel": torch_linear_to_io},
)


def _check_salad_family(source: TensorSource, source_name: str) -> None:
    required = [BACKBONE_PREFIX + k for k in _REQUIRED_BACKBONE] + [AGGREGATOR_PREFIX + k for k in _REQUIRED_HEAD]
    missing = [k for k in required if k not in source]
    if not missing:
        return
    keys = source.keys()
    hint = ""
    if "aggregation.3.weight" in source or any(k.startswith("backbone.0.") for k in keys):
        hint = " It looks like a CosPlace/EigenPlaces checkpoint: use converters/cosplace.py or eigenplaces.py."
    elif "cls_token" in source and "pos_embed" in source:
        hint = " It looks like a bare DINOv2 backbone without the SALAD head."
    raise ConversionError(
        f"{source_name} is not a complete SALAD checkpoint (DINOv2 under 'backbone.model.', SALAD head under "
        f"'aggregator.'): missing {describe_keys(missing)}; found {describe_keys(keys)}.{hint}"
    )


def infer_dinov2_config(
    source: TensorSource,
    prefix: str = "",
    num_heads: int | None = None,
    interpolate_offset: float | None = None,
    interpolate_antialias: bool | None = None,
) -> DinoV2Config:
    """Infers a DINOv2 architecture from torch.hub tensor shapes.

    Args:
        source: the tensors.
        prefix: key prefix of the DINOv2 tensors (``"backbone.model."`` in SALAD checkpoints).
        num_heads: attention heads (not stored in the weights); default ``embed_dim // 64``.
        interpolate_offset: position-embedding interpolation offset; default 0.1 without registers and 0 with
            them, as the torch.hub models.
        interpolate_antialias: default False without registers and True with them.

    Raises:
        ConversionError: the shapes fit no DINOv2 (the message names the tensors).
    """
    problems = []
    cls_shape = source.shape(prefix + "cls_token")
    pos_shape = source.shape(prefix + "pos_embed")
    proj_shape = source.shape(prefix + "patch_embed.proj.weight")
    if cls_shape is None or len(cls_shape) != 3 or cls_shape[:2] != (1, 1):
        raise ConversionError(f"{prefix}cls_token must have shape [1, 1, C], got {cls_shape}")
    dim = cls_shape[2]
    grid = 0
    if pos_shape is None or len(pos_shape) != 3 or pos_shape[0] != 1 or pos_shape[2] != dim:
        problems.append(f"{prefix}pos_embed must have shape [1, 1 + M*M, {dim}], got {pos_shape}")
    else:
        grid = math.isqrt(pos_shape[1] - 1)
        if grid * grid != pos_shape[1] - 1:
            problems.append(f"{prefix}pos_embed holds {pos_shape[1] - 1} patch positions, not a square grid")
    if proj_shape is None or len(proj_shape) != 4 or proj_shape[:2] != (dim, 3) or proj_shape[2] != proj_shape[3]:
        problems.append(f"{prefix}patch_embed.proj.weight must have shape [{dim}, 3, p, p], got {proj_shape}")
    block_ids = {int(m.group(1)) for k in source.keys() if (m := re.match(re.escape(prefix) + r"blocks\.(\d+)\.", k))}
    if not block_ids:
        problems.append(f"no transformer blocks ('{prefix}blocks.N.*') found")
    if source.shape(prefix + "blocks.0.mlp.w12.weight") is not None:
        ffn_layer, ffn_hidden = "swiglu", source.shape(prefix + "blocks.0.mlp.w12.weight")[0] // 2
    elif source.shape(prefix + "blocks.0.mlp.fc1.weight") is not None:
        ffn_layer, ffn_hidden = "mlp", source.shape(prefix + "blocks.0.mlp.fc1.weight")[0]
    else:
        ffn_layer, ffn_hidden = "mlp", 0
        problems.append(f"no feed-forward weights '{prefix}blocks.0.mlp.fc1.weight' or '{prefix}blocks.0.mlp.w12.*'")
    reg_shape = source.shape(prefix + "register_tokens")
    registers = 0
    if reg_shape is not None:
        if len(reg_shape) != 3 or reg_shape[0] != 1 or reg_shape[2] != dim:
            problems.append(f"{prefix}register_tokens must have shape [1, R, {dim}], got {reg_shape}")
        else:
            registers = reg_shape[1]
    if num_heads is None:
        if dim % _HEAD_DIM:
            problems.append(f"cannot infer the head count of width {dim} (not a multiple of 64): pass num_heads")
        num_heads = max(dim // _HEAD_DIM, 1)
    elif dim % int(num_heads):
        problems.append(f"num_heads={num_heads} does not divide the width {dim}")
    if problems:
        raise ConversionError("cannot infer the DINOv2 architecture: " + "; ".join(problems))
    return DinoV2Config(
        embed_dim=dim,
        depth=max(block_ids) + 1,
        num_heads=int(num_heads),
        ffn_layer=ffn_layer,
        ffn_hidden_dim=int(ffn_hidden),
        patch_size=proj_shape[2],
        pos_embed_grid=grid,
        num_register_tokens=registers,
        interpolate_offset=(0.0 if registers else 0.1) if interpolate_offset is None else float(interpolate_offset),
        interpolate_antialias=bool(registers) if interpolate_antialias is None else bool(interpolate_antialias),
    )


def infer_salad_config(source: TensorSource, backbone: DinoV2Config) -> SaladSpec:
    """Infers the SALAD head sizes from the ``aggregator.*`` shapes (1x1-conv weights ``[out, in, 1, 1]``).

    Raises:
        ConversionError: a head weight is not at least 2-D (the message names it).
    """
    dims = {}
    for key in ("token_features.0.weight", "token_features.2.weight", "cluster_features.3.weight", "score.3.weight"):
        shape = source.shape(AGGREGATOR_PREFIX + key)
        if shape is None or len(shape) < 2:
            raise ConversionError(f"{AGGREGATOR_PREFIX}{key} must be a Linear or 1x1-conv weight, got shape {shape}")
        dims[key] = shape[0]
    hidden, token_dim = dims["token_features.0.weight"], dims["token_features.2.weight"]
    cluster_dim, num_clusters = dims["cluster_features.3.weight"], dims["score.3.weight"]
    return SaladSpec(
        dinov2=backbone, num_clusters=num_clusters, cluster_dim=cluster_dim, token_dim=token_dim, hidden_dim=hidden
    )


def convert_dinov2_state_dict(
    state_dict: dict,
    num_heads: int | None = None,
    interpolate_offset: float | None = None,
    interpolate_antialias: bool | None = None,
) -> DinoVisionTransformer:
    """Converts a bare torch.hub DINOv2 state dict (``cls_token``, ``blocks.N.*``, ...) strictly.

    Args:
        state_dict: ``{key: array}``.
        num_heads: attention heads (default ``embed_dim // 64``).
        interpolate_offset: see :func:`infer_dinov2_config`.
        interpolate_antialias: see :func:`infer_dinov2_config`.

    Returns:
        The filled :class:`DinoVisionTransformer`.

    Raises:
        ConversionError: any missing, extra or misshapen tensor (all listed).
    """
    source = TensorSource(state_dict, ignore=IGNORED)
    config = infer_dinov2_config(source, "", num_heads, interpolate_offset, interpolate_antialias)
    module = nnx.eval_shape(lambda: DinoVisionTransformer(config, rngs=nnx.Rngs(0)))
    fill_module(module, take_all(module, DINOV2_KEYS, source), source)
    return module


def convert_state_dict(
    state_dict: dict,
    family: str = FAMILY,
    source_name: str = "<state dict>",
    options: SaladConvertOptions | None = None,
) -> tuple[nnx.Module, ModelSpec]:
    """Converts an in-memory DINOv2 + SALAD state dict (upstream's ``VPRModel``, plain or Lightning-wrapped).

    Args:
        state_dict: ``{key: array}``.
        family: ``"salad"``.
        source_name: the file name for messages.
        options: expected backbone, heads, evaluation size, interpolation (default :class:`SaladConvertOptions`).

    Returns:
        ``(net, spec)``: the filled :class:`SaladNet` and its spec.

    Raises:
        ConversionError: not a SALAD checkpoint, a contradicting ``backbone``, or any missing / extra / misshapen
            tensor (all listed in one message).
    """
    check_family(family, FAMILY)
    options = SaladConvertOptions() if options is None else options
    backbone, num_heads = options.backbone, options.num_heads
    source = TensorSource(state_dict, ignore=IGNORED)
    _check_salad_family(source, source_name)
    if num_heads is None and backbone in DINOV2_PRESETS:
        num_heads = dinov2_config(backbone).num_heads
    dinov2 = infer_dinov2_config(
        source, BACKBONE_PREFIX, num_heads, options.interpolate_offset, options.interpolate_antialias
    )
    arch = infer_salad_config(source, dinov2)
    if backbone is not None and backbone != arch.backbone:
        raise ConversionError(
            f"{source_name}: --backbone={backbone} but the checkpoint holds a {arch.backbone} (width "
            f"{dinov2.embed_dim}, depth {dinov2.depth}, {dinov2.ffn_layer} feed-forward, "
            f"{dinov2.num_register_tokens} registers)"
        )
    preprocess = PreprocessSpec.exact(checked_image_size(options.image_size, dinov2.patch_size))
    return convert_with_table(FAMILY, arch, KEYS, source, preprocess, CONVERTER_VERSION)
