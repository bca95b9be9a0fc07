"""Converts BoQ checkpoints (amaralibey/Bag-of-Queries) into :class:`~attllm_jax.models.boq.BoQNet` modules.

The released files (``dinov2_12288.pth``, ``resnet50_16384.pth``) are the state dicts of upstream's ``VPRModel``:

- DINOv2 backbone: the torch.hub DINOv2 under ``backbone.dino.`` (``cls_token``, ``pos_embed``, ``mask_token``,
  ``patch_embed.proj.*``, ``blocks.N.*``, ``norm.*``); ``mask_token`` is dropped, ``norm`` is read but never
  applied (upstream's forward skips it);
- ResNet-50 backbone: ``backbone.net.{0: conv1, 1: bn1, 4: layer1, 5: layer2, 6: layer3}.*`` (``nn.Sequential``
  indices; ``layer4`` is cropped);
- the aggregator under ``aggregator.``: ``proj_c`` (3x3 conv), ``norm_input``, ``boqs.N.{encoder.{self_attn.
  {in_proj_weight, in_proj_bias, out_proj.*}, linear1, linear2, norm1, norm2}, queries, self_attn.*, norm_q,
  cross_attn.*, norm_out}``, ``fc``.

Backbone, widths, query count, block count and ``row_dim`` are inferred from the shapes; the head count is upstream's
``proj_channels // 64`` (not stored in the weights) unless given.
"""

from __future__ import annotations

import dataclasses
import re

from flax import nnx

from attllm_jax.convert.common import ConversionError, TensorSource, as_conversion_error, describe_keys
from attllm_jax.convert.keytable import (
    KeyTable,
    Rule,
    check_expected_backbone,
    check_family,
    checked_image_size,
    convert_with_table,
    torch_kernel_to_flax,
    torch_linear_to_io,
)
from attllm_jax.convert.salad import DINOV2_KEYS, infer_dinov2_config
from attllm_jax.models.boq import BoQSpec
from attllm_jax.models.spec import ModelSpec

CONVERTER_VERSION = "1.0"
FAMILY = "boq"


@dataclasses.dataclass(frozen=True)
class BoQConvertOptions:
    """What a BoQ conversion is told besides the checkpoint.

    Attributes:
        options: expected backbone, heads and evaluation size (default :class:`BoQConvertOptions`).
    """

    backbone: str | None = None
    num_heads: int | None = None
    backbone_num_heads: int | None = None
    image_size: tuple[int, int] | None = None

    @property
    def descriptor_dim(self) -> None:
        """BoQ's dimension follows from the checkpoint; nothing to expect."""
        return None


Options = BoQConvertOptions  # the options class of this conversion module (see attllm_jax.convert.convert)
DINO_PREFIX = "backbone.dino."
RESNET_PREFIX = "backbone.net."
IGNORED = ("num_batches_tracked", "backbone.dino.mask_token")
RESNET_STAGES = {"conv1": 0, "bn1": 1, "layer1": 4, "layer2": 5, "layer3": 6}
_HEAD_DIM = 64

_ATTENTION = r"aggregator/boqs/(\d+)/(encoder/self_attn|self_attn|cross_attn)/in_proj"
_RESNET_RULES = tuple(
    Rule(f"backbone/{name}/(.+)", rf"backbone.net.{index}.\1") for name, index in RESNET_STAGES.items()
)
# Our BoQNet -> checkpoint. ResNet (first: DINOv2's table ends with a catch-all): our torchvision names at upstream's
# nn.Sequential indices under backbone.net.; DINOv2: the torch.hub names under backbone.dino.; the head: the same
# names, torch's MultiheadAttention in_proj_weight / in_proj_bias being our fused in_proj Linear. Kernels by rank.
_LEAVES = {"kernel": "weight", "scale": "weight", "mean": "running_mean", "var": "running_var"}
KEYS = (
    KeyTable(_RESNET_RULES, _LEAVES, {"kernel": torch_kernel_to_flax})
    + DINOV2_KEYS.prefixed("backbone/", DINO_PREFIX)
    + KeyTable(
        rules=(
            Rule(_ATTENTION + "/kernel", r"aggregator.boqs.\1.\2.in_proj_weight", torch_linear_to_io),
            Rule(_ATTENTION + "/bias", r"aggregator.boqs.\1.\2.in_proj_bias", None),
            Rule("aggregator/(.+)", r"aggregator.\1"),
        ),
        leaves=_LEAVES,
    )
)


def _indices(source: TensorSource, pattern: str) -> list[int]:
    return sorted({int(m.group(1)) for k in source.keys() if (m := re.match(pattern, k))})


def infer_boq_spec(
    source: TensorSource, source_name: str, num_heads: int | None = None, backbone_num_heads: int | None = None
) -> BoQSpec:
    """The architecture the tensor shapes describe.

    Raises:
        ConversionError: not a BoQ checkpoint, or shapes that fit no BoQ (the message names the tensors).
    """
    keys = source.keys()
    proj = source.shape("aggregator.proj_c.weight")
    queries = source.shape("aggregator.boqs.0.queries")
    fc = source.shape("aggregator.fc.weight")
    has_dino, has_resnet = f"{DINO_PREFIX}cls_token" in source, f"{RESNET_PREFIX}0.weight" in source
    if proj is None or queries is None or fc is None or has_dino == has_resnet:
        hint = ""
        if "aggregator.agg.dust_bin" in source:
            hint = " It looks like a MegaLoc checkpoint: use converters/megaloc.py."
        elif "aggregator.dust_bin" in source:
            hint = " It looks like a SALAD / CliqueMining checkpoint: use converters/salad.py."
        raise ConversionError(
            f"{source_name} is not a BoQ checkpoint (one backbone under 'backbone.dino.' or 'backbone.net.', the "
            f"aggregator with 'aggregator.proj_c', 'aggregator.boqs.0.queries', 'aggregator.fc'); found "
            f"{describe_keys(keys)}.{hint}"
        )
    problems = []
    if len(proj) != 4 or proj[2:] != (3, 3):
        problems.append(f"aggregator.proj_c.weight must be a 3x3 convolution [d, C, 3, 3], got {list(proj)}")
    if len(queries) != 3 or queries[0] != 1:
        problems.append(f"aggregator.boqs.0.queries must have shape [1, Q, d], got {list(queries)}")
    layers = _indices(source, r"aggregator\.boqs\.(\d+)\.")
    if len(fc) != 2:
        problems.append(f"aggregator.fc.weight must be a Linear weight [row_dim, L*Q], got {list(fc)}")
    if problems:
        raise ConversionError(f"{source_name}: " + "; ".join(problems))
    d = int(proj[0])
    if num_heads is None:
        if d % _HEAD_DIM:
            raise ConversionError(f"cannot infer the head count of width {d} (not a multiple of 64): pass num_heads")
        num_heads = d // _HEAD_DIM
    common = dict(
        proj_channels=d,
        num_queries=int(queries[1]),
        num_layers=len(layers),
        row_dim=int(fc[0]),
        num_heads=int(num_heads),
    )
    with as_conversion_error(f"{source_name}: "):
        if has_dino:
            return BoQSpec(dinov2=infer_dinov2_config(source, DINO_PREFIX, backbone_num_heads), **common)
        stages = [_indices(source, rf"backbone\.net\.{RESNET_STAGES[f'layer{i}']}\.(\d+)\.") for i in (1, 2, 3)]
        if "backbone.net.4.0.conv3.weight" not in source:
            raise ConversionError(f"{source_name}: only Bottleneck ResNets (ResNet-50) are BoQ backbones")
        empty = [
            f"{RESNET_PREFIX}{RESNET_STAGES[f'layer{i + 1}']} (layer{i + 1})" for i, s in enumerate(stages) if not s
        ]
        if empty:
            raise ConversionError(f"{source_name}: no ResNet blocks under {', '.join(empty)}")
        width = int(source.shape(f"{RESNET_PREFIX}0.weight")[0])
        return BoQSpec(dinov2=None, resnet_layers=tuple(len(s) for s in stages), resnet_width=width, **common)


def convert_state_dict(
    state_dict: dict,
    family: str = FAMILY,
    source_name: str = "<state dict>",
    options: BoQConvertOptions | None = None,
) -> tuple[nnx.Module, ModelSpec]:
    """Converts an in-memory BoQ state dict strictly.

    Args:
        state_dict: ``{key: array}``.
        family: ``"boq"``.
        source_name: the file name used in messages.
        options: expected backbone, heads and evaluation size (default :class:`BoQConvertOptions`).

    Returns:
        ``(net, spec)``: the filled :class:`~attllm_jax.models.boq.BoQNet` and its spec (preprocessing: normalize,
        then an antialiased bilinear resize of the float image).

    Raises:
        ConversionError: not a BoQ checkpoint, a contradicting ``backbone``, or any missing / extra / misshapen
            tensor (all listed).
    """
    check_family(family, FAMILY)
    options = BoQConvertOptions() if options is None else options
    source = TensorSource(state_dict, ignore=IGNORED)
    arch = infer_boq_spec(source, source_name, options.num_heads, options.backbone_num_heads)
    check_expected_backbone(source_name, options.backbone, arch)
    preprocess = arch.default_preprocess()
    if options.image_size is not None:
        patch = arch.dinov2.patch_size if arch.dinov2 is not None else 1
        preprocess = dataclasses.replace(preprocess, size=checked_image_size(options.image_size, patch))
    return convert_with_table(FAMILY, arch, KEYS, source, preprocess, CONVERTER_VERSION)
