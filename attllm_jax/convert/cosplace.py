"""Converts CosPlace / EigenPlaces PyTorch checkpoints into :class:`GeoLocalizationNet` modules.

Both families publish the state dict of upstream's ``GeoLocalizationNet``: ``backbone`` is an ``nn.Sequential``
of torchvision children (ResNet: 0 conv1, 1 bn1, 2 relu, 3 maxpool, 4..7 layer1..layer4; VGG-16: the
``features`` indices up to 28) and ``aggregation`` is ``Sequential(L2Norm, GeM, Flatten, Linear, L2Norm)``, so
the GeM exponent is ``aggregation.1.p`` and the projection ``aggregation.3.weight/bias``. The backbone and the
dimensions are inferred from the tensor shapes; every target parameter is mapped back to its source key, so the
key map is driven by the target module and checked strictly both ways by :func:`fill_module`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
from flax import nnx

from attllm_jax.convert.common import (
    ConversionError,
    TensorSource,
    describe_keys,
    fill_module,
    read_state_dict,
    sha256_file,
)
from attllm_jax.convert.download import DEFAULT_CACHE_DIR, fetch_published
from attllm_jax.models import registry
from attllm_jax.models.resnet import RESNET_CONFIGS
from attllm_jax.models.vgg import VGG16_CFG, vgg_layer_plan
from attllm_jax.models.vpr import default_preprocess_config

CONVERTER_VERSION = "1.0"
RESNET_STAGE_INDEX = {"conv1": "0", "bn1": "1", "layer1": "4", "layer2": "5", "layer3": "6", "layer4": "7"}
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
_REQUIRED = ("backbone.0.weight", "aggregation.1.p", "aggregation.3.weight", "aggregation.3.bias")


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


def _source_key(target_path: str) -> tuple[str, bool]:
    """Maps a target state path to ``(source key, needs_transpose)``."""
    parts = target_path.split("/")
    leaf = parts[-1]
    if parts[0] == "aggregation":
        if parts[1] == "p":
            return "aggregation.1.p", False
        return f"aggregation.3.{_LEAF_NAMES[leaf]}", leaf == "kernel"
    body = parts[1:-1]
    if body[0] == "features":  # VGG: backbone/features/<index>/kernel
        body = body[1:]
    else:  # ResNet: backbone/layer1/0/conv1/kernel
        body = [RESNET_STAGE_INDEX[body[0]]] + body[1:]
    return "backbone." + ".".join(body + [_LEAF_NAMES[leaf]]), leaf == "kernel"


def _torch_to_flax(x: np.ndarray) -> np.ndarray:
    if x.ndim == 4:  # conv [O, I, kh, kw] -> [kh, kw, I, O]
        return np.transpose(x, (2, 3, 1, 0))
    if x.ndim == 2:  # linear [out, in] -> [in, out]
        return np.transpose(x)
    return x  # a wrong rank is reported by fill_module as a shape mismatch


def map_state_dict(net: nnx.Module, source: TensorSource) -> dict[str, np.ndarray | None]:
    """Takes from ``source`` the value of every Param/BatchStat path of ``net``."""
    flat = nnx.to_flat_state(nnx.state(net, nnx.Any(nnx.Param, nnx.BatchStat)))
    values = {}
    for path, _ in flat:
        target = "/".join(str(p) for p in path)
        key, transpose = _source_key(target)
        values[target] = source.take(key, _torch_to_flax if transpose else None)
    return values


def convert_cosplace_state_dict(
    state_dict: dict[str, np.ndarray],
    family: str = "cosplace",
    backbone: str | None = None,
    fc_output_dim: int | None = None,
    source_name: str = "<state dict>",
) -> tuple[nnx.Module, dict]:
    """Converts an in-memory CosPlace / EigenPlaces state dict; see :func:`convert_cosplace`."""
    family = family.lower()
    if family not in registry.CNN_FAMILIES:
        raise ValueError(f"family must be one of {registry.CNN_FAMILIES}, got {family!r}")
    source = TensorSource(state_dict)
    _check_family(source, source_name, family)
    inferred = infer_backbone(source)
    dim, features_dim = source.shape("aggregation.3.weight")
    problems = []
    if backbone is not None and registry.normalize_backbone(backbone) != inferred:
        problems.append(f"--backbone={backbone} but the checkpoint holds a {inferred}")
    if fc_output_dim is not None and int(fc_output_dim) != dim:
        problems.append(f"--fc_output_dim={fc_output_dim} but 'aggregation.3.weight' has shape {[dim, features_dim]}")
    if problems:
        raise ConversionError(f"{source_name}: " + "; ".join(problems))
    config = {
        "family": family,
        "backbone": inferred,
        "descriptor_dim": int(dim),
        "features_dim": int(features_dim),
        "blend": "native",
        "image_size": 512,
        "preprocess": default_preprocess_config(family),
        "converter_version": CONVERTER_VERSION,
    }
    net = nnx.eval_shape(lambda: registry.build_cnn_net(config))
    fill_module(net, map_state_dict(net, source), source)
    config["gem_p"] = float(np.asarray(state_dict["aggregation.1.p"]).reshape(-1)[0])
    return net, config


def convert_cosplace(
    path: str | os.PathLike,
    family: str = "cosplace",
    backbone: str | None = None,
    fc_output_dim: int | None = None,
) -> tuple[nnx.Module, dict]:
    """Reads a CosPlace / EigenPlaces checkpoint file and converts it.

    Args:
        path: ``.pth``/``.pt``/``.ckpt``/``.bin``/``.safetensors`` holding upstream's state dict.
        family: ``"cosplace"`` or ``"eigenplaces"`` (the layouts are identical; this labels the config).
        backbone: optional expected backbone (``"ResNet50"``, ``"resnet50"``, ``"VGG16"`` ...).
        fc_output_dim: optional expected descriptor dimension.

    Returns:
        ``(net, config)``: the filled :class:`GeoLocalizationNet` and the config dict for ``config.json``
        (family, backbone, descriptor_dim, features_dim, gem_p, image_size, preprocess, source_file,
        source_sha256, converter_version).

    Raises:
        ConversionError: unreadable file, wrong family, backbone/dimension flags contradicting the shapes, or any
            missing / extra / misshapen tensor (all listed in one message).
    """
    path = Path(path)
    state_dict = read_state_dict(path)
    net, config = convert_cosplace_state_dict(state_dict, family, backbone, fc_output_dim, source_name=str(path))
    config["source_file"] = path.name
    config["source_sha256"] = sha256_file(path)
    published = [
        e.file_name
        for e in registry.PUBLISHED
        if (e.family, e.backbone, e.descriptor_dim) == (config["family"], config["backbone"], config["descriptor_dim"])
    ]
    config["published_file"] = published[0] if published else None
    return net, config


def resolve_checkpoint(
    family: str,
    checkpoint: str | os.PathLike | None,
    backbone: str | None,
    dim: int | None,
    cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR,
) -> Path:
    """The checkpoint to convert: ``checkpoint`` when given, else the published file, downloaded if needed.

    Raises:
        ValueError: no checkpoint and no (backbone, dim) naming a published one (the message lists them).
        DownloadError: the download failed (e.g. offline).
    """
    if checkpoint is not None:
        return Path(checkpoint)
    if backbone is None or dim is None:
        raise ValueError(
            f"give --checkpoint, or --backbone and the descriptor dimension of a published {family} model; valid "
            f"(family/backbone/dim): {', '.join(registry.valid_combinations(family))}"
        )
    return fetch_published(registry.lookup(family, backbone, dim), cache_dir)


def convert_cnn_to_directory(
    family: str,
    output: str | os.PathLike,
    checkpoint: str | os.PathLike | None = None,
    backbone: str | None = None,
    fc_output_dim: int | None = None,
    cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR,
) -> dict:
    """What ``converters/cosplace.py`` / ``converters/eigenplaces.py`` do: resolve, convert, save.

    Args:
        family: ``"cosplace"`` or ``"eigenplaces"``.
        output: model directory to write (orbax state + ``config.json``).
        checkpoint: source file; None downloads the published one named by ``backbone`` and ``fc_output_dim``.
        backbone: expected backbone (checked against the shapes).
        fc_output_dim: expected descriptor dimension (checked against the shapes).
        cache_dir: download cache.

    Returns:
        The config written to ``output/config.json``.
    """
    from attllm_jax.checkpoint import save_model

    path = resolve_checkpoint(family, checkpoint, backbone, fc_output_dim, cache_dir)
    net, config = convert_cosplace(path, family=family, backbone=backbone, fc_output_dim=fc_output_dim)
    save_model(output, net, config)
    return config
