"""Converts MixVPR checkpoints (amaralibey/MixVPR) into :class:`~attllm_jax.models.mixvpr.MixVPRNet` modules.

The released files (``resnet50_MixVPR_{128, 512, 4096}_channels(C)_rows(R).ckpt``) are plain state dicts of
upstream's ``VPRModel`` / VPR-methods-evaluation's ``MixVPRModel``, loaded there with ``load_state_dict`` (strict):

- ``backbone.model.{conv1, bn1, layer1, layer2, layer3}.*``: torchvision's ResNet-50 names (``layer4``, ``avgpool``
  and ``fc`` are ``Identity`` and hold nothing);
- ``aggregator.mix.N.mix.{0: LayerNorm, 1: Linear, 3: Linear}.*``, ``aggregator.channel_proj.*``,
  ``aggregator.row_proj.*``.

Blocks, widths, mixer depth and ratio, and the projections are inferred from the shapes; the input size the network
resizes to is ``16 * sqrt(N)`` with ``N`` the mixer's positions (320 for the releases).
"""

from __future__ import annotations

import math
import re

from flax import nnx

from attllm_jax.convert.common import (
    ConversionError,
    DimensionOptions,
    TensorSource,
    as_conversion_error,
    describe_keys,
)
from attllm_jax.convert.keytable import (
    KeyTable,
    Rule,
    check_family,
    convert_with_table,
    torch_kernel_to_flax,
)
from attllm_jax.models.mixvpr import BACKBONE_STRIDE, MixVPRSpec
from attllm_jax.models.spec import ModelSpec

CONVERTER_VERSION = "1.0"
FAMILY = "mixvpr"
PREFIX = "backbone.model."
_REQUIRED = (
    "backbone.model.conv1.weight",
    "aggregator.mix.0.mix.1.weight",
    "aggregator.channel_proj.weight",
    "aggregator.row_proj.weight",
)
_MIXER_PARTS = {"norm": 0, "fc1": 1, "fc2": 3}  # our names -> upstream's Sequential indices

# Our MixVPRNet -> checkpoint: the ResNet under backbone.model. with torchvision's names, the mixer layers' parts at
# upstream's Sequential indices, the projections by name. Kernels: conv [O, I, kh, kw] and linear [out, in] by rank.
KEYS = KeyTable(
    rules=(
        Rule("backbone/(.+)", r"backbone.model.\1"),
        *(
            Rule(rf"aggregator/mix/(\d+)/{ours}/(.+)", rf"aggregator.mix.\1.mix.{index}.\2")
            for ours, index in _MIXER_PARTS.items()
        ),
        Rule("aggregator/(channel_proj|row_proj)/(.+)", r"aggregator.\1.\2"),
    ),
    leaves={"kernel": "weight", "scale": "weight", "mean": "running_mean", "var": "running_var"},
    transforms={"kernel": torch_kernel_to_flax},
)


def _indices(source: TensorSource, pattern: str) -> list[int]:
    return sorted({int(m.group(1)) for k in source.keys() if (m := re.match(pattern, k))})


def _check_is_mixvpr(source: TensorSource, source_name: str) -> None:
    missing = [k for k in _REQUIRED if k not in source]
    if not missing:
        return
    keys = source.keys()
    hint = ""
    if "aggregator.boqs.0.queries" in source:
        hint = " It looks like a BoQ checkpoint: use converters/boq.py."
    elif "aggregation.3.weight" in source:
        hint = " It looks like a CosPlace / EigenPlaces checkpoint: use converters/cosplace.py."
    raise ConversionError(
        f"{source_name} is not a MixVPR checkpoint (ResNet under 'backbone.model.', mixer under 'aggregator.mix.', "
        f"'aggregator.channel_proj', 'aggregator.row_proj'): missing {describe_keys(missing)}; found "
        f"{describe_keys(keys)}.{hint}"
    )


def infer_mixvpr_spec(source: TensorSource, source_name: str) -> MixVPRSpec:
    """The architecture the tensor shapes describe.

    Raises:
        ConversionError: not a MixVPR checkpoint, or shapes that fit no MixVPR (the message names the tensors).
    """
    _check_is_mixvpr(source, source_name)
    if f"{PREFIX}layer1.0.conv3.weight" not in source:
        raise ConversionError(f"{source_name}: only Bottleneck ResNets (ResNet-50) are MixVPR backbones")
    stages = [_indices(source, rf"backbone\.model\.layer{i}\.(\d+)\.") for i in (1, 2, 3)]
    empty = [f"{PREFIX}layer{i + 1}" for i, s in enumerate(stages) if not s]
    if empty:
        raise ConversionError(f"{source_name}: no ResNet blocks under {', '.join(empty)}")
    width = source.shape(f"{PREFIX}conv1.weight")[0]
    fc1 = source.shape("aggregator.mix.0.mix.1.weight")
    channel = source.shape("aggregator.channel_proj.weight")
    rows = source.shape("aggregator.row_proj.weight")
    problems = [
        f"{name} must be a Linear weight [out, in], got {list(shape)}"
        for name, shape in (
            ("aggregator.mix.0.mix.1.weight", fc1),
            ("aggregator.channel_proj.weight", channel),
            ("aggregator.row_proj.weight", rows),
        )
        if len(shape) != 2
    ]
    if problems:
        raise ConversionError(f"{source_name}: " + "; ".join(problems))
    positions = int(fc1[1])
    side = math.isqrt(positions)
    if side * side != positions or fc1[0] % positions:
        raise ConversionError(
            f"{source_name}: 'aggregator.mix.0.mix.1.weight' {list(fc1)} is not a mixer over a square grid "
            "[N * mlp_ratio, N]"
        )
    with as_conversion_error(f"{source_name}: "):
        return MixVPRSpec(
            resnet_layers=tuple(len(s) for s in stages),
            resnet_width=int(width),
            image_size=BACKBONE_STRIDE * side,
            mix_depth=len(_indices(source, r"aggregator\.mix\.(\d+)\.")),
            mlp_ratio=int(fc1[0]) // positions,
            out_channels=int(channel[0]),
            out_rows=int(rows[0]),
        )


MixVPRConvertOptions = DimensionOptions
Options = DimensionOptions  # the options class of this conversion module (see attllm_jax.convert.convert)


def convert_state_dict(
    state_dict: dict,
    family: str = FAMILY,
    source_name: str = "<state dict>",
    options: MixVPRConvertOptions | None = None,
) -> tuple[nnx.Module, ModelSpec]:
    """Converts an in-memory MixVPR state dict strictly.

    Args:
        state_dict: ``{key: array}``.
        family: ``"mixvpr"``.
        source_name: the file name used in messages.
        options: its ``descriptor_dim`` is the expected descriptor dimension (128, 512, 4096 released), checked.

    Returns:
        ``(net, spec)``: the filled :class:`~attllm_jax.models.mixvpr.MixVPRNet` and its spec (preprocessing:
        normalize, then an antialiased bilinear resize of the float image to 320 x 320).

    Raises:
        ConversionError: not a MixVPR checkpoint, a contradicting ``descriptor_dim``, or any missing / extra /
            misshapen tensor (all listed).
    """
    check_family(family, FAMILY)
    descriptor_dim = (MixVPRConvertOptions() if options is None else options).descriptor_dim
    source = TensorSource(state_dict)
    arch = infer_mixvpr_spec(source, source_name)
    if descriptor_dim is not None and int(descriptor_dim) != arch.descriptor_dim:
        raise ConversionError(
            f"{source_name}: --descriptor_dim={descriptor_dim} but the checkpoint describes {arch.out_channels} "
            f"channels x {arch.out_rows} rows = {arch.descriptor_dim}"
        )
    return convert_with_table(FAMILY, arch, KEYS, source, arch.default_preprocess(), CONVERTER_VERSION)
