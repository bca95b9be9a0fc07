"""Converts CosPlace / EigenPlaces PyTorch checkpoints into :class:`GeoLocalizationNet` modules.

Both families publish the state dict of upstream's ``GeoLocalizationNet``: ``backbone`` is an ``nn.Sequential``
of torchvision children (ResNet: 0 conv1, 1 bn1, 2 relu, 3 maxpool, 4..7 layer1..layer4; VGG-16: the
``features`` indices up to 28) and ``aggregation`` is ``Sequential(L2Norm, GeM, Flatten, Linear, L2Norm)``, so
the GeM exponent is ``aggregation.1.p`` and the projection ``aggregation.3.weight/bias``. The backbone and the
dimensions are inferred from the tensor shapes; :data:`KEYS` maps every target parameter to its source key, checked
strictly both ways by :func:`fill_module`.
"""

from __future__ import annotations

import dataclasses
import re

from flax import nnx

from attllm_jax.convert.common import ConversionError, TensorSource, describe_keys
from attllm_jax.convert.keytable import KeyTable, Rule, convert_with_table, torch_kernel_to_flax
from attllm_jax.models import registry
from attllm_jax.models.heads import CnnSpec, normalize_backbone
from attllm_jax.models.resnet import RESNET_CONFIGS
from attllm_jax.models.spec import ModelSpec
from attllm_jax.models.vgg import VGG16_CFG, vgg_layer_plan

CONVERTER_VERSION = "1.0"


@dataclasses.dataclass(frozen=True)
class CnnConvertOptions:
    """What a CosPlace / EigenPlaces conversion is told besides the checkpoint (each checked against the shapes).

    Attributes:
        backbone: expected backbone (``"ResNet50"``, ``"resnet50"``, ``"VGG16"`` ...), or None.
        fc_output_dim: expected descriptor dimension, or None.
    """

    backbone: str | None = None
    fc_output_dim: int | None = None

    @property
    def descriptor_dim(self) -> int | None:
        """The expected descriptor dimension (finds the published file to download)."""
        return self.fc_output_dim


Options = CnnConvertOptions  # the options class of this conversion module (see attllm_jax.convert.convert)
_REQUIRED = ("backbone.0.weight", "aggregation.1.p", "aggregation.3.weight", "aggregation.3.bias")

# Target path (our GeoLocalizationNet) -> upstream key. ResNet children are numbered in upstream's Sequential
# (0 conv1, 1 bn1, 2 relu, 3 maxpool, 4..7 layer1..layer4); VGG-16 keeps torchvision's ``features`` indices.
KEYS = KeyTable(
    rules=(
        Rule("aggregation/p", "aggregation.1.p"),
        Rule("aggregation/fc/(.+)", r"aggregation.3.\1"),
        Rule("backbone/features/(.+)", r"backbone.\1"),
        Rule("backbone/conv1/(.+)", r"backbone.0.\1"),
        Rule("backbone/bn1/(.+)", r"backbone.1.\1"),
        *(Rule(f"backbone/layer{i}/(.+)", rf"backbone.{i + 3}.\1") for i in range(1, 5)),
    ),
    leaves={"kernel": "weight", "scale": "weight", "mean": "running_mean", "var": "running_var"},
    transforms={"kernel": torch_kernel_to_flax},
)


def _check_family(source: TensorSource, path: str, family: str) -> None:
    missing = [k for k in _REQUIRED if k not in source]
    if not missing:
        return
    keys = source.keys()
    hint = ""
    if any(k.startswith(("aggregator.", "backbone.model.")) for k in keys):
        hint = " It looks like a SALAD checkpoint: use converters/salad.py."
    raise ConversionError(
        f"{path} is not a {family} checkpoint (CosPlace/EigenPlaces GeoLocalizationNet state dict): missing "
        f"{describe_keys(missing)}; found {describe_keys(keys)}.{hint}"
    )


def infer_backbone(source: TensorSource) -> str:
    """Infers ``"resnet18/50/101/152"`` or ``"vgg16"`` from the tensor names and shapes.

    Raises:
        ConversionError: the backbone tensors match no supported architecture.
    """
    stem = source.shape("backbone.0.weight")
    if stem is not None and len(stem) == 4 and stem[2:] == (7, 7):
        counts = []
        for stage in range(4, 8):
            blocks = {int(m.group(1)) for k in source.keys() if (m := re.match(rf"backbone\.{stage}\.(\d+)\.", k))}
            counts.append(len(blocks))
        kind = "bottleneck" if "backbone.4.0.conv3.weight" in source else "basic"
        for name, cfg in RESNET_CONFIGS.items():
            if cfg.block == kind and tuple(counts) == cfg.layers:
                return name
        raise ConversionError(
            f"unsupported ResNet: {kind} blocks per stage {counts}; supported: "
            + ", ".join(f"{n} {c.block} {list(c.layers)}" for n, c in RESNET_CONFIGS.items())
        )
    conv_indices = [i for i, kind, _ in vgg_layer_plan(VGG16_CFG) if kind == "conv"]
    if stem is not None and len(stem) == 4 and stem[2:] == (3, 3) and f"backbone.{conv_indices[-1]}.weight" in source:
        return "vgg16"
    raise ConversionError(
        f"cannot infer the backbone: 'backbone.0.weight' has shape {list(stem) if stem else None}, expected a "
        f"ResNet stem [64, 3, 7, 7] or a VGG-16 first conv [64, 3, 3, 3] (with 'backbone.{conv_indices[-1]}.weight')"
    )


def convert_state_dict(
    state_dict: dict,
    family: str = "cosplace",
    source_name: str = "<state dict>",
    options: CnnConvertOptions | None = None,
) -> tuple[nnx.Module, ModelSpec]:
    """Converts an in-memory CosPlace / EigenPlaces state dict (upstream's ``GeoLocalizationNet``).

    Args:
        state_dict: ``{key: array}``.
        family: ``"cosplace"`` or ``"eigenplaces"`` (the layouts are identical; this labels the spec).
        source_name: the file name for messages.
        options: the expected backbone and descriptor dimension (default: none expected).

    Returns:
        ``(net, spec)``: the filled :class:`GeoLocalizationNet` and its spec (provenance: converter version).

    Raises:
        ConversionError: wrong family, flags contradicting the shapes, or any missing / extra / misshapen tensor
            (all listed in one message).
    """
    family = family.lower()
    options = CnnConvertOptions() if options is None else options
    backbone, fc_output_dim = options.backbone, options.fc_output_dim
    if family not in registry.CNN_FAMILIES:
        raise ValueError(f"family must be one of {registry.CNN_FAMILIES}, got {family!r}")
    source = TensorSource(state_dict)
    _check_family(source, source_name, family)
    inferred = infer_backbone(source)
    dim, features_dim = source.shape("aggregation.3.weight")
    problems = []
    if backbone is not None and normalize_backbone(backbone) != inferred:
        problems.append(f"--backbone={backbone} but the checkpoint holds a {inferred}")
    if fc_output_dim is not None and int(fc_output_dim) != dim:
        problems.append(f"--fc_output_dim={fc_output_dim} but 'aggregation.3.weight' has shape {[dim, features_dim]}")
    if problems:
        raise ConversionError(f"{source_name}: " + "; ".join(problems))
    arch = CnnSpec(inferred, int(dim))
    return convert_with_table(family, arch, KEYS, source, CnnSpec.default_preprocess(), CONVERTER_VERSION)
