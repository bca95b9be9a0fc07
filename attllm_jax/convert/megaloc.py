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

from flax import nnx

from attllm_jax.convert.common import ConversionError, TensorSource, describe_keys, fill_module
from attllm_jax.convert.salad import infer_dinov2_config
from attllm_jax.convert.tables import take_values
from attllm_jax.models.megaloc import MegaLocConfig, MegaLocNet

FAMILY = "megaloc"
PREFIXES = {"backbone.": "model.safetensors", "backbone.model.": "megaloc.torch"}
IGNORED = ("num_batches_tracked", "backbone.model.mask_token")


def key_table(backbone_prefix: str) -> tuple[tuple[str, str], ...]:
    """Target path -> checkpoint key rules (see :mod:`attllm_jax.convert.tables`) for one backbone prefix."""
    bb = backbone_prefix.rstrip(".").replace(".", "/")
    return (
        (r"backbone/(.+)", bb + r"/\1"),
        (r"aggregator/agg/token_features/fc1/(\w+)", r"aggregator/agg/token_features/0/\1"),
        (r"aggregator/agg/token_features/fc2/(\w+)", r"aggregator/agg/token_features/2/\1"),
        (r"aggregator/agg/(cluster_features|score)/fc1/(\w+)", r"aggregator/agg/\1/0/\2"),
        (r"aggregator/agg/(cluster_features|score)/fc2/(\w+)", r"aggregator/agg/\1/3/\2"),
        (r"aggregator/agg/dust_bin", "aggregator/agg/dust_bin="),
        (r"aggregator/linear/(\w+)", r"aggregator/linear/\1"),
    )


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


def infer_megaloc_config(source: TensorSource, prefix: str, num_heads: int | None = None) -> MegaLocConfig:
    """The architecture the tensor shapes describe.

    Raises:
        ConversionError: shapes that fit no MegaLoc (the message names the tensors).
    """
    dinov2 = infer_dinov2_config(source, prefix, num_heads)
    agg = "aggregator.agg."
    return MegaLocConfig(
        backbone=dinov2,
        num_clusters=_dim(source, agg + "score.3.weight"),
        cluster_dim=_dim(source, agg + "cluster_features.3.weight"),
        token_dim=_dim(source, agg + "token_features.2.weight"),
        hidden_dim=_dim(source, agg + "token_features.0.weight"),
        descriptor_dim=_dim(source, "aggregator.linear.weight"),
    )


def convert_megaloc_state_dict(
    state_dict: dict, num_heads: int | None = None, source_name: str = "<state dict>"
) -> tuple[MegaLocNet, MegaLocConfig, str]:
    """Converts an in-memory MegaLoc state dict strictly.

    Args:
        state_dict: ``{key: array}`` of either release.
        num_heads: attention heads, only for widths that are not a multiple of 64.
        source_name: the file name used in messages.

    Returns:
        ``(net, config, release)`` with ``release`` ``"model.safetensors"`` or ``"megaloc.torch"`` (the key layout).

    Raises:
        ConversionError: not a MegaLoc checkpoint, or any missing / extra / misshapen tensor (all listed).
    """
    source = TensorSource(state_dict, ignore=IGNORED)
    prefix = backbone_prefix(source, source_name)
    config = infer_megaloc_config(source, prefix, num_heads)
    net = nnx.eval_shape(lambda: MegaLocNet(config, rngs=nnx.Rngs(0)))
    fill_module(net, take_values(net, source, key_table(prefix)), source)
    return net, config, PREFIXES[prefix]
