"""Converts SuperVLAD checkpoints (Lu-Feng/SuperVLAD ``SuperVLAD.pth``, ``1-ClusterVLAD.pth``) into
:class:`~attllm_jax.models.supervlad.SuperVLADNet` modules.

The release is a training checkpoint ``torch.save({"model_state_dict": sd, ...})`` of a ``DataParallel`` model:
:func:`~attllm_jax.convert.common.read_state_dict` unwraps ``model_state_dict`` and strips ``module.``. The state
dict holds the DINOv2 ViT-B/14 under ``backbone.`` (torch.hub names, with the unused ``mask_token``, which is
dropped) and the assignment convolution ``aggregation.conv.weight`` ``[K + G, C, 1, 1]``. The DINOv2 architecture
and ``K + G`` come from the shapes; the ghost count ``G`` is not in the weights (1 for SuperVLAD, 2 for
1-ClusterVLAD). Every other tensor is checked strictly both ways.
"""

from __future__ import annotations

import dataclasses

from flax import nnx

from attllm_jax.convert.common import ConversionError, TensorSource, describe_keys
from attllm_jax.convert.keytable import (
    KeyTable,
    Rule,
    check_expected_backbone,
    check_family,
    convert_with_table,
    torch_linear_to_io,
)
from attllm_jax.convert.salad import DINOV2_KEYS, infer_dinov2_config
from attllm_jax.models.spec import ModelSpec
from attllm_jax.models.supervlad import SuperVLADSpec

CONVERTER_VERSION = "1.0"
FAMILY = "supervlad"
BACKBONE_PREFIX = "backbone."
CONV_KEY = "aggregation.conv.weight"
IGNORED = ("backbone.mask_token",)

KEYS = DINOV2_KEYS.prefixed("backbone/", BACKBONE_PREFIX) + KeyTable(
    rules=(Rule("aggregation/conv/kernel", CONV_KEY, torch_linear_to_io),),
)


def _check_supervlad_family(source: TensorSource, source_name: str) -> None:
    if f"{BACKBONE_PREFIX}cls_token" in source and CONV_KEY in source:
        return
    keys = source.keys()
    hint = ""
    if any(k.startswith("encoder.layers.") for k in keys):
        hint = " (SuperVLAD-CrossImage's cross-image encoder is not supported: its descriptors depend on the batch)"
    elif "backbone.model.cls_token" in source:
        hint = " It looks like a SALAD / MegaLoc checkpoint: use converters/salad.py or megaloc.py."
    elif "learnable_aggregation_tokens" in source:
        hint = " It looks like an ImAge checkpoint: use converters/image4vpr.py."
    raise ConversionError(
        f"{source_name} is not a SuperVLAD checkpoint (DINOv2 under 'backbone.', '{CONV_KEY}'); found "
        f"{describe_keys(keys)}.{hint}"
    )


def infer_supervlad_spec(source: TensorSource, ghost_clusters: int, num_heads: int | None = None) -> SuperVLADSpec:
    """The architecture the tensor shapes describe, with ``ghost_clusters`` trailing clusters dropped.

    Raises:
        ConversionError: shapes that fit no SuperVLAD, or ``ghost_clusters`` leaving no cluster.
    """
    dinov2 = infer_dinov2_config(source, BACKBONE_PREFIX, num_heads)
    shape = source.shape(CONV_KEY)
    if shape is None or len(shape) not in (2, 4) or shape[1] != dinov2.embed_dim:
        raise ConversionError(f"{CONV_KEY} must have shape [K + G, {dinov2.embed_dim}, 1, 1], got {shape}")
    if isinstance(ghost_clusters, bool) or not isinstance(ghost_clusters, int) or ghost_clusters < 1:
        raise ValueError(f"ghost_clusters must be a positive int, got {ghost_clusters!r}")
    if shape[0] <= ghost_clusters:
        raise ConversionError(f"{CONV_KEY} has {shape[0]} clusters: none left after {ghost_clusters} ghost clusters")
    return SuperVLADSpec(dinov2=dinov2, num_clusters=shape[0] - ghost_clusters, ghost_clusters=ghost_clusters)


@dataclasses.dataclass(frozen=True)
class SuperVLADConvertOptions:
    """What a supervlad conversion is told besides the checkpoint.

    Attributes:
        backbone: expected DINOv2 preset (``"dinov2_vitb14"``), checked against the shapes.
        num_heads: attention heads, only for widths that are not a multiple of 64.
        ghost_clusters: ``G`` (1 for SuperVLAD.pth, 2 for 1-ClusterVLAD.pth).
    """

    backbone: str | None = None
    num_heads: int | None = None
    ghost_clusters: int = 1

    @property
    def descriptor_dim(self) -> int | None:
        """Not an option of this family (the shapes decide it)."""
        return None


Options = SuperVLADConvertOptions  # the options class of this conversion module (see attllm_jax.convert.convert)


def convert_state_dict(
    state_dict: dict,
    family: str = FAMILY,
    source_name: str = "<state dict>",
    options: SuperVLADConvertOptions | None = None,
) -> tuple[nnx.Module, ModelSpec]:
    """Converts an in-memory SuperVLAD state dict (``module.`` already stripped) strictly.

    Args:
        state_dict: ``{key: array}``.
        family: ``"supervlad"``.
        source_name: the file name used in messages.
        options: the family's options (:class:`SuperVLADConvertOptions`; default: none expected, upstream's values).

    Returns:
        ``(net, spec)`` with VPR-methods-evaluation's 322 x 322 tensor-stage preprocessing.

    Raises:
        ConversionError: not a SuperVLAD checkpoint, a contradicting ``backbone``, or any missing / extra /
            misshapen tensor (all listed).
    """
    check_family(family, FAMILY)
    options = SuperVLADConvertOptions() if options is None else options
    backbone, num_heads, ghost_clusters = options.backbone, options.num_heads, options.ghost_clusters
    source = TensorSource(state_dict, ignore=IGNORED)
    _check_supervlad_family(source, source_name)
    arch = infer_supervlad_spec(source, ghost_clusters, num_heads)
    check_expected_backbone(source_name, backbone, arch)
    return convert_with_table(FAMILY, arch, KEYS, source, arch.default_preprocess(), CONVERTER_VERSION)
