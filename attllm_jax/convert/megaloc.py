"""Converts MegaLoc checkpoints (gmberton/MegaLoc) into :class:`~attllm_jax.models.megaloc.MegaLocNet` modules.

Two releases, both read strictly:

- ``model.safetensors`` (Hugging Face ``gberton/MegaLoc``, what ``get_trained_model`` loads at HEAD): upstream's own
  DINOv2 under ``backbone.`` (``cls_token``, ``pos_embed``, ``patch_embed.proj.*``, ``blocks.N.{norm1, attn.qkv,
  attn.proj, ls1.gamma, norm2, mlp.fc1, mlp.fc2, ls2.gamma}.*``, ``norm.*``; no ``mask_token``);
- ``megaloc.torch`` (the GitHub v1.0 release asset of the earlier code): the torch.hub DINOv2 under
  ``backbone.model.``, whose unused ``mask_token`` is dropped.

Both hold the SALAD head under ``aggregator.agg.`` (``token_features.{0,2}``, ``cluster_features.{0,3}`` and
``score.{0,3}`` as 1x1 convolutions, ``dust_bin``) and the projection ``aggregator.linear.*``. Every dimension is
inferred from the shapes (the head count from DINOv2's 64-channel heads unless given).
"""

from __future__ import annotations

import dataclasses

from flax import nnx

from attllm_jax.convert.common import ConversionError, TensorSource, as_conversion_error, describe_keys
from attllm_jax.convert.keytable import (
    KeyTable,
    Rule,
    check_expected_backbone,
    check_family,
    convert_with_table,
    torch_linear_to_io,
)
from attllm_jax.convert.salad import DINOV2_KEYS, infer_dinov2_config
from attllm_jax.models.megaloc import MegaLocSpec
from attllm_jax.models.spec import ModelSpec

CONVERTER_VERSION = "1.0"
FAMILY = "megaloc"


@dataclasses.dataclass(frozen=True)
class MegaLocConvertOptions:
    """What a MegaLoc conversion is told besides the checkpoint.

    Attributes:
        backbone: optional expected DINOv2 preset (``"dinov2_vitb14"``), checked against the shapes.
        num_heads: attention heads, only for widths that are not a multiple of 64.
    """

    backbone: str | None = None
    num_heads: int | None = None

    @property
    def descriptor_dim(self) -> None:
        """MegaLoc's dimension follows from the checkpoint; nothing to expect."""
        return None


Options = MegaLocConvertOptions  # the options class of this conversion module (see attllm_jax.convert.convert)
PREFIXES = {"backbone.": "model.safetensors", "backbone.model.": "megaloc.torch"}
IGNORED = ("num_batches_tracked", "backbone.model.mask_token")

# Our MegaLocNet -> checkpoint: the SALAD head's MLPs at upstream's Sequential indices (token_features 0 and 2,
# cluster_features / score 0 and 3; 1x1 convolutions become Linear layers), then the projection.
HEAD_KEYS = KeyTable(
    rules=(
        Rule("aggregator/agg/dust_bin", "aggregator.agg.dust_bin"),
        Rule("aggregator/agg/(token_features|cluster_features|score)/fc1/(.+)", r"aggregator.agg.\1.0.\2"),
        Rule("aggregator/agg/(token_features)/fc2/(.+)", r"aggregator.agg.\1.2.\2"),
        Rule("aggregator/agg/(cluster_features|score)/fc2/(.+)", r"aggregator.agg.\1.3.\2"),
        Rule("aggregator/linear/(.+)", r"aggregator.linear.\1"),
    ),
    leaves={"kernel": "weight"},
    transforms={"kernel": torch_linear_to_io},
)
KEYS = DINOV2_KEYS.prefixed("backbone/", "backbone.") + HEAD_KEYS  # model.safetensors
LEGACY_KEYS = DINOV2_KEYS.prefixed("backbone/", "backbone.model.") + HEAD_KEYS  # megaloc.torch


def backbone_prefix(source: TensorSource, source_name: str) -> str:
    """``"backbone."`` (model.safetensors) or ``"backbone.model."`` (megaloc.torch), from the keys.

    Raises:
        ConversionError: not a MegaLoc checkpoint; the message says what it looks like instead.
    """
    required = ("aggregator.agg.dust_bin", "aggregator.linear.weight", "aggregator.agg.score.3.weight")
    for prefix in PREFIXES:
        if f"{prefix}cls_token" in source and all(k in source for k in required):
            return prefix
    keys = source.keys()
    hint = ""
    if "aggregator.dust_bin" in source:
        hint = " It looks like a SALAD / CliqueMining checkpoint: use converters/salad.py."
    elif any(k.startswith("aggregator.boqs.") for k in keys):
        hint = " It looks like a BoQ checkpoint: use converters/boq.py."
    raise ConversionError(
        f"{source_name} is not a MegaLoc checkpoint (DINOv2 under 'backbone.' or 'backbone.model.', SALAD head "
        f"under 'aggregator.agg.', projection 'aggregator.linear'); found {describe_keys(keys)}.{hint}"
    )


def _dim(source: TensorSource, key: str, axis: int = 0) -> int:
    shape = source.shape(key)
    if shape is None or len(shape) < 2:
        raise ConversionError(f"{key} must be a Linear or 1x1-conv weight, got shape {shape}")
    return int(shape[axis])


def infer_megaloc_spec(source: TensorSource, prefix: str, num_heads: int | None = None) -> MegaLocSpec:
    """The architecture the tensor shapes describe.

    Raises:
        ConversionError: shapes that fit no MegaLoc (the message names the tensors).
    """
    dinov2 = infer_dinov2_config(source, prefix, num_heads)
    agg = "aggregator.agg."
    with as_conversion_error("cannot infer the MegaLoc architecture: "):
        return MegaLocSpec(
            dinov2=dinov2,
            num_clusters=_dim(source, agg + "score.3.weight"),
            cluster_dim=_dim(source, agg + "cluster_features.3.weight"),
            token_dim=_dim(source, agg + "token_features.2.weight"),
            hidden_dim=_dim(source, agg + "token_features.0.weight"),
            descriptor_dim=_dim(source, "aggregator.linear.weight"),
        )


def convert_state_dict(
    state_dict: dict,
    family: str = FAMILY,
    source_name: str = "<state dict>",
    options: MegaLocConvertOptions | None = None,
) -> tuple[nnx.Module, ModelSpec]:
    """Converts an in-memory MegaLoc state dict (either release) strictly.

    Args:
        state_dict: ``{key: array}``.
        family: ``"megaloc"``.
        source_name: the file name used in messages.
        options: expected backbone and heads (default: none expected).

    Returns:
        ``(net, spec)``: the filled :class:`~attllm_jax.models.megaloc.MegaLocNet` and its spec (evaluation at the
        image's own size, as upstream; the net rounds the sides to multiples of 14).

    Raises:
        ConversionError: not a MegaLoc checkpoint, a contradicting ``backbone``, or any missing / extra /
            misshapen tensor (all listed).
    """
    check_family(family, FAMILY)
    options = MegaLocConvertOptions() if options is None else options
    source = TensorSource(state_dict, ignore=IGNORED)
    prefix = backbone_prefix(source, source_name)
    arch = infer_megaloc_spec(source, prefix, options.num_heads)
    check_expected_backbone(source_name, options.backbone, arch)
    table = KEYS if prefix == "backbone." else LEGACY_KEYS
    return convert_with_table(FAMILY, arch, table, source, arch.default_preprocess(), CONVERTER_VERSION)
