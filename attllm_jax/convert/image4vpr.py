"""Converts ImAge checkpoints (Lu-Feng/ImAge ``ImAge_Merged.pth``, ``ImAge_GSV.pth``) into
:class:`~attllm_jax.models.image4vpr.ImAgeNet` modules.

The release is ``torch.save({"model_state_dict": sd, ...})`` of a ``DataParallel`` model (what ``hubconf.ImAge``
loads into ``DataParallel(VPRmodel)``): :func:`~attllm_jax.convert.common.read_state_dict` unwraps it and strips
``module.``. It holds the DINOv2 with registers under ``backbone.`` (torch.hub names, with the unused
``mask_token``, dropped) and ``learnable_aggregation_tokens`` ``[1, T, C]``. The DINOv2 architecture and ``T``
come from the shapes; the position-embedding resize is upstream's (offset 0.1, no antialias) and the insertion
block (upstream ``freeze_te``, 8) is not in the weights. Every other tensor is checked strictly both ways.
"""

from __future__ import annotations

import dataclasses

from flax import nnx

from attllm_jax.convert.common import ConversionError, TensorSource, as_conversion_error, describe_keys
from attllm_jax.convert.keytable import KeyTable, Rule, check_expected_backbone, check_family, convert_with_table
from attllm_jax.convert.salad import DINOV2_KEYS, infer_dinov2_config
from attllm_jax.models.image4vpr import ImAgeSpec
from attllm_jax.models.spec import ModelSpec

CONVERTER_VERSION = "1.0"
FAMILY = "image4vpr"
BACKBONE_PREFIX = "backbone."
TOKENS_KEY = "learnable_aggregation_tokens"
IGNORED = ("backbone.mask_token",)
INSERTION_BLOCK = 8  # hubconf's freeze_te

KEYS = DINOV2_KEYS.prefixed("backbone/", BACKBONE_PREFIX) + KeyTable(rules=(Rule(TOKENS_KEY, TOKENS_KEY, None),))


def _check_image4vpr_family(source: TensorSource, source_name: str) -> None:
    if f"{BACKBONE_PREFIX}cls_token" in source and TOKENS_KEY in source:
        return
    keys = source.keys()
    hint = ""
    if "aggregation.conv.weight" in source:
        hint = " It looks like a SuperVLAD checkpoint: use converters/supervlad.py."
    elif any(k.startswith("aggregator.") for k in keys):
        hint = " It has an explicit aggregator (ImAge + NetVLAD / SALAD / BoQ variants are not supported)."
    raise ConversionError(
        f"{source_name} is not an ImAge checkpoint (DINOv2 under 'backbone.', '{TOKENS_KEY}'); found "
        f"{describe_keys(keys)}.{hint}"
    )


def infer_image4vpr_spec(source: TensorSource, insertion_block: int, num_heads: int | None = None) -> ImAgeSpec:
    """The architecture the tensor shapes describe, the tokens entering before block ``insertion_block``.

    Raises:
        ConversionError: shapes that fit no ImAge, or an insertion block beyond the depth.
    """
    dinov2 = infer_dinov2_config(
        source, BACKBONE_PREFIX, num_heads, interpolate_offset=0.1, interpolate_antialias=False
    )
    shape = source.shape(TOKENS_KEY)
    if shape is None or len(shape) != 3 or shape[0] != 1 or shape[2] != dinov2.embed_dim:
        raise ConversionError(f"{TOKENS_KEY} must have shape [1, T, {dinov2.embed_dim}], got {shape}")
    with as_conversion_error("cannot infer the ImAge architecture: "):
        return ImAgeSpec(dinov2=dinov2, num_agg_tokens=shape[1], insertion_block=insertion_block)


@dataclasses.dataclass(frozen=True)
class ImAgeConvertOptions:
    """What a image4vpr conversion is told besides the checkpoint.

    Attributes:
        backbone: expected DINOv2 preset (``"dinov2_vitb14_reg"``), checked against the shapes.
        num_heads: attention heads, only for widths that are not a multiple of 64.
        insertion_block: the 0-based block the aggregation tokens enter before (upstream ``freeze_te``, 8).
    """

    backbone: str | None = None
    num_heads: int | None = None
    insertion_block: int = INSERTION_BLOCK

    @property
    def descriptor_dim(self) -> int | None:
        """Not an option of this family (the shapes decide it)."""
        return None


Options = ImAgeConvertOptions  # the options class of this conversion module (see attllm_jax.convert.convert)


def convert_state_dict(
    state_dict: dict,
    family: str = FAMILY,
    source_name: str = "<state dict>",
    options: ImAgeConvertOptions | None = None,
) -> tuple[nnx.Module, ModelSpec]:
    """Converts an in-memory ImAge state dict (``module.`` already stripped) strictly.

    Args:
        state_dict: ``{key: array}``.
        family: ``"image4vpr"``.
        source_name: the file name used in messages.
        options: the family's options (:class:`ImAgeConvertOptions`; default: none expected, upstream's values).

    Returns:
        ``(net, spec)`` with upstream's 322 x 322 tensor-stage preprocessing.

    Raises:
        ConversionError: not an ImAge checkpoint, a contradicting ``backbone``, or any missing / extra /
            misshapen tensor (all listed).
    """
    check_family(family, FAMILY)
    options = ImAgeConvertOptions() if options is None else options
    backbone, num_heads, insertion_block = options.backbone, options.num_heads, options.insertion_block
    source = TensorSource(state_dict, ignore=IGNORED)
    _check_image4vpr_family(source, source_name)
    arch = infer_image4vpr_spec(source, insertion_block, num_heads)
    check_expected_backbone(source_name, backbone, arch)
    return convert_with_table(FAMILY, arch, KEYS, source, arch.default_preprocess(), CONVERTER_VERSION)
