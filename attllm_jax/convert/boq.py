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

import re

from flax import nnx

from attllm_jax.convert.common import ConversionError, TensorSource, describe_keys, fill_module
from attllm_jax.convert.salad import infer_dinov2_config
from attllm_jax.convert.tables import take_values
from attllm_jax.models.boq import BoQConfig, BoQNet, resnet50_layer3_config

FAMILY = "boq"
DINO_PREFIX = "backbone.dino."
RESNET_PREFIX = "backbone.net."
IGNORED = ("num_batches_tracked", "backbone.dino.mask_token")
RESNET_STAGES = {"conv1": 0, "bn1": 1, "layer1": 4, "layer2": 5, "layer3": 6}
_HEAD_DIM = 64

_ATTENTION = r"aggregator/boqs/(\d+)/(encoder/self_attn|self_attn|cross_attn)/in_proj"
KEY_TABLE = (
    (r"backbone/(cls_token|pos_embed|register_tokens|patch_embed/.+|blocks/.+|norm/.+)", r"backbone/dino/\1"),
    *((rf"backbone/{name}/(.+)", rf"backbone/net/{index}/\1") for name, index in RESNET_STAGES.items()),
    (_ATTENTION + "/kernel", r"aggregator/boqs/\1/\2/in_proj_weight="),
    (_ATTENTION + "/bias", r"aggregator/boqs/\1/\2/in_proj_bias="),
    (r"aggregator/(.+)", r"aggregator/\1"),
)


def _indices(source: TensorSource, pattern: str) -> list[int]:
    return sorted({int(m.group(1)) for k in source.keys() if (m := re.match(pattern, k))})


def infer_boq_config(
    source: TensorSource, source_name: str, num_heads: int | None = None, backbone_num_heads: int | None = None
) -> BoQConfig:
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
    try:
        if has_dino:
            return BoQConfig("dinov2", infer_dinov2_config(source, DINO_PREFIX, backbone_num_heads), None, **common)
        stages = [_indices(source, rf"backbone\.net\.{RESNET_STAGES[f'layer{i}']}\.(\d+)\.") for i in (1, 2, 3)]
        if "backbone.net.4.0.conv3.weight" not in source:
            raise ConversionError(f"{source_name}: only Bottleneck ResNets (ResNet-50) are BoQ backbones")
        empty = [
            f"{RESNET_PREFIX}{RESNET_STAGES[f'layer{i + 1}']} (layer{i + 1})" for i, s in enumerate(stages) if not s
        ]
        if empty:
            raise ConversionError(f"{source_name}: no ResNet blocks under {', '.join(empty)}")
        width = int(source.shape(f"{RESNET_PREFIX}0.weight")[0])
        resnet = resnet50_layer3_config(tuple(len(s) for s in stages), width)
        return BoQConfig("resnet50", None, resnet, **common)
    except ValueError as e:
        if isinstance(e, ConversionError):
            raise
        raise ConversionError(f"{source_name}: {e}") from e


def convert_boq_state_dict(
    state_dict: dict,
    num_heads: int | None = None,
    backbone_num_heads: int | None = None,
    source_name: str = "<state dict>",
) -> tuple[BoQNet, BoQConfig]:
    """Converts an in-memory BoQ state dict strictly.

    Args:
        state_dict: ``{key: array}``.
        num_heads: attention heads of the BoQ blocks (default ``proj_channels // 64``, as upstream).
        backbone_num_heads: DINOv2 attention heads, only for widths that are not a multiple of 64.
        source_name: the file name used in messages.

    Returns:
        ``(net, config)``.

    Raises:
        ConversionError: not a BoQ checkpoint, or any missing / extra / misshapen tensor (all listed).
    """
    source = TensorSource(state_dict, ignore=IGNORED)
    config = infer_boq_config(source, source_name, num_heads, backbone_num_heads)
    net = nnx.eval_shape(lambda: BoQNet(config, rngs=nnx.Rngs(0)))
    fill_module(net, take_values(net, source, KEY_TABLE), source)
    return net, config
