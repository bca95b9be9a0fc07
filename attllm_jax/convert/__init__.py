"""PyTorch checkpoint -> Flax NNX conversion (strict both ways), used by the scripts in ``converters/``.

One path for every family::

    net, spec = convert(family, state_dict, options)          # in memory; the family's key table
    net, spec = convert_file(family, path, options=options)   # + reading the file and its provenance
    spec = convert_to_directory(family, output, checkpoint)   # + the published file when none is given, + saving

``options`` is the family's own frozen dataclass (``CnnConvertOptions``, ``SaladConvertOptions``,
``MegaLocConvertOptions``, ``BoQConvertOptions``; :func:`options_class` finds it), or None for its defaults.

Each family's module (:mod:`~attllm_jax.convert.cosplace` for CosPlace and EigenPlaces, :mod:`~attllm_jax.convert.
salad` for SALAD and CliqueMining, :mod:`~attllm_jax.convert.megaloc`, :mod:`~attllm_jax.convert.boq`) holds its key
table and ``convert_state_dict``: infer the architecture from the tensor shapes, check the caller's expectations,
then :func:`~attllm_jax.convert.keytable.convert_with_table`. The family registry (:mod:`attllm_jax.models.registry`)
says which module. :mod:`~attllm_jax.convert.keytable` holds the table machinery and the shared tail,
:mod:`~attllm_jax.convert.common` reading files and the strict fill, :mod:`~attllm_jax.convert.download` the
published files. A converted file's provenance names the release only when its content is the release (downloaded
from the release's URL, or with the SHA-256 upstream publishes), never by its name. Nothing here imports torch at
module level: :func:`attllm_jax.convert.common.read_state_dict` imports it only to read ``.pth``/``.ckpt`` files.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Protocol

from flax import nnx

from attllm_jax.models import registry
from attllm_jax.models.spec import ModelSpec

__all__ = ["ConvertOptions", "convert", "convert_file", "convert_to_directory", "options_class", "resolve_checkpoint"]


class ConvertOptions(Protocol):
    """What every family's options dataclass provides (to find the published file when no checkpoint is given)."""

    @property
    def backbone(self) -> str | None: ...

    @property
    def descriptor_dim(self) -> int | None: ...


def options_class(family: str) -> type:
    """The frozen options dataclass of ``family``'s conversion (e.g. ``CnnConvertOptions`` for ``"cosplace"``)."""
    return registry.family_entry(family).conversion_module().Options


def _checked_options(family: str, options: Any) -> ConvertOptions:
    cls = options_class(family)
    if options is None:
        return cls()
    if not isinstance(options, cls):
        raise TypeError(f"a {family} conversion takes {cls.__name__} options, got {type(options).__name__}")
    return options


def convert(
    family: str, state_dict: dict, options: ConvertOptions | None = None, *, source_name: str = "<state dict>"
) -> tuple[nnx.Module, ModelSpec]:
    """Converts an in-memory state dict of ``family`` with that family's key table.

    Args:
        family: ``"cosplace"``, ``"eigenplaces"``, ``"salad"`` (see ``registry.FAMILIES``).
        state_dict: ``{key: array}``.
        options: the family's expectations and settings (its options dataclass, see :func:`options_class`), or
            None for its defaults.
        source_name: the file name for messages.

    Returns:
        ``(net, spec)``.

    Raises:
        ConversionError: the checkpoint does not fit the family (every problem listed).
        ValueError: unknown family or option values.
        TypeError: ``options`` of another family.
    """
    entry = registry.family_entry(family)
    options = _checked_options(entry.name, options)
    return entry.conversion_module().convert_state_dict(state_dict, entry.name, source_name, options)


def convert_file(
    family: str,
    path: str | os.PathLike,
    downloaded: registry.PublishedCheckpoint | None = None,
    options: ConvertOptions | None = None,
) -> tuple[nnx.Module, ModelSpec]:
    """Reads a checkpoint file (``.pth``/``.pt``/``.ckpt``/``.bin``/``.safetensors``; a family whose release is
    another format reads it with its conversion module's ``read_checkpoint``, e.g. NetVLAD's ``.mat``) and converts it.

    The spec's provenance records the file name and its SHA-256, and names the published release only when the
    content is that release: the file was downloaded from the release's URL (``downloaded``), or its SHA-256 is
    the one upstream publishes (:func:`~attllm_jax.models.registry.published_by_sha256`). A file is never
    labelled by its name or architecture alone.

    Args:
        family: the model family.
        path: the checkpoint file.
        downloaded: the published entry ``path`` was fetched as (:func:`resolve_checkpoint`), if any.
        options: the family's options dataclass (None: its defaults).
    """
    from attllm_jax.convert.common import read_state_dict, sha256_file

    path = Path(path)
    reader = getattr(registry.family_entry(family).conversion_module(), "read_checkpoint", read_state_dict)
    net, spec = convert(family, reader(path), options, source_name=str(path))
    digest = sha256_file(path)
    published = downloaded or registry.published_by_sha256(digest)
    provenance = dataclasses.replace(
        spec.provenance,
        source_file=path.name,
        source_sha256=digest,
        published_file=None if published is None else published.file_name,
    )
    return net, spec.replace(provenance=provenance)


def resolve_checkpoint(
    family: str,
    checkpoint: str | os.PathLike | None,
    backbone: str | None = None,
    dim: int | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[Path, registry.PublishedCheckpoint | None]:
    """The checkpoint to convert: ``checkpoint`` when given, else the one published file of ``family`` matching
    ``backbone`` and ``dim`` (each optional), downloaded into ``cache_dir`` if needed.

    Returns:
        ``(path, entry)``: ``entry`` is the published checkpoint downloaded (None for a given ``checkpoint``).

    Raises:
        ValueError: no checkpoint and no single published file matches (the message lists them).
        DownloadError: the download failed (e.g. offline).
    """
    if checkpoint is not None:
        return Path(checkpoint), None
    from attllm_jax.convert.download import DEFAULT_CACHE_DIR, fetch_published

    entry = registry.find_published(family, backbone, dim)
    return fetch_published(entry, DEFAULT_CACHE_DIR if cache_dir is None else cache_dir), entry


def convert_to_directory(
    family: str,
    output: str | os.PathLike,
    checkpoint: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    options: ConvertOptions | None = None,
) -> ModelSpec:
    """What every script in ``converters/`` does: resolve (download if needed), convert, save.

    Args:
        family: the model family.
        output: model directory to write (orbax state + ``config.json``).
        checkpoint: source file; None downloads the published one that ``options`` (``backbone`` and, for the CNN
            families, ``fc_output_dim``) name.
        cache_dir: download cache (default ``$ATTLLM_JAX_CACHE`` or ``~/.cache/attllm_jax``).
        options: the family's options dataclass (None: its defaults), also used to find the published file.

    Returns:
        The spec written to ``output/config.json``.
    """
    from attllm_jax.checkpoint import save_model

    options = _checked_options(family, options)
    path, downloaded = resolve_checkpoint(family, checkpoint, options.backbone, options.descriptor_dim, cache_dir)
    net, spec = convert_file(family, path, downloaded, options)
    save_model(output, net, spec)
    return spec
