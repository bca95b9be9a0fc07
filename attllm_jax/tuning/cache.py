"""An on-disk cache of query backbone features, so that a second tuning run does no backbone pass.

Layout of a cache directory::

    manifest.json              {"format", "key", "key_sha256", "num_items", "batches": [...], "valid", "failures"}
    batch_000000_leaf_0.npy    one array per feature leaf per batch, ``[B, ...]`` float32, memory-mapped on load
    ...

Batches are the evaluation's own fixed-size, single-shape batches (padding rows have index -1), so aggregating
them compiles exactly the shapes an evaluation compiles. The key is the descriptor store's key (model config,
weights digest, resize override, image list; see :func:`attllm_jax.evaluation.extract.database_store_key`) plus
the batch size. The manifest is written last and atomically: a cache without a matching manifest is rebuilt,
never half-trusted; a stale cache is wiped (only its own files), and a directory with foreign files is refused.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np

from attllm_jax.data.dataset import ImageSet
from attllm_jax.data.loading import LoadFailure, batch_pixel_budget, decode_stream, shape_batches
from attllm_jax.evaluation.extract import data_sharding, device_batch_size, output_size_fn
from attllm_jax.evaluation.progress import Progress
from attllm_jax.files import atomic_write, atomic_write_json
from attllm_jax.models.vpr import DescriptorModel
from attllm_jax.retrieval.store import key_digest

CACHE_FORMAT = 1
MANIFEST = "manifest.json"
_PREFIX = "batch_"

log = logging.getLogger("attllm_jax.tuning")


class CacheError(RuntimeError):
    """The cache directory cannot be used (foreign files, unreadable manifest or arrays)."""


@dataclass
class FeatureBatch:
    """One cached batch.

    Attributes:
        indices: ``[B]`` int64 query indices, -1 for padding rows.
        leaves: The feature pytree's leaves, each ``[B, ...]`` (memory-mapped arrays after a load).
        image_shape: ``(H, W)`` of the batch's preprocessed images.
    """

    indices: np.ndarray
    leaves: list[np.ndarray]
    image_shape: tuple[int, int]

    def features(self, model) -> Any:
        """The batch as :meth:`model.features` output (the pytree rebuilt from the model's own structure)."""
        shape = jax.ShapeDtypeStruct((len(self.indices), *self.image_shape, 3), np.float32)
        treedef = jax.tree_util.tree_structure(jax.eval_shape(model.features, shape))
        return jax.tree_util.tree_unflatten(treedef, [jax.numpy.asarray(leaf) for leaf in self.leaves])


@dataclass
class QueryFeatures:
    """Backbone features of every readable query.

    Attributes:
        batches: The cached batches (each query index appears in exactly one, unless unreadable).
        valid: ``[Q]`` bool, False for unreadable queries.
        failures: ``{"index", "path", "error"}`` of the unreadable queries.
        status: "created", "reused" or "rebuilt".
        seconds: Wall time of this run's extraction (0 when reused).
    """

    batches: list[FeatureBatch]
    valid: np.ndarray
    failures: list[dict[str, Any]] = field(default_factory=list)
    status: str = "created"
    seconds: float = 0.0


def cached_query_features(
    model: DescriptorModel,
    queries: ImageSet,
    directory: str | os.PathLike,
    key: dict[str, Any],
    *,
    batch_size: int,
    image_size=None,
    num_workers: int | None = None,
) -> QueryFeatures:
    """Loads the query features from ``directory`` when its key matches, else computes and writes them.

    Args:
        model: A :class:`~attllm_jax.models.vpr.VPRModel`.
        queries: The query image set.
        directory: The cache directory (created when missing).
        key: What the features depend on (the descriptor store's key for the queries).
        batch_size: Images per device batch (part of the key: it fixes the cached batch shapes).
        image_size: Resize override passed to ``model.preprocess``.
        num_workers: Decode threads.

    Returns:
        The features.

    Raises:
        CacheError: the directory holds foreign files, or a matching cache cannot be read.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    batch_size = device_batch_size(batch_size)
    full_key = {"key": key, "batch_size": batch_size, "num_items": len(queries), "format": CACHE_FORMAT}
    digest = key_digest(full_key)
    manifest_path = directory / MANIFEST
    status = "created"
    if manifest_path.exists():
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as error:
            raise CacheError(f"unreadable query-feature cache manifest {manifest_path}: {error}") from error
        if manifest.get("key_sha256") == digest:
            cached = _load(directory, manifest)
            log.info("query-feature cache %s reused (%d batches)", directory, len(cached.batches))
            return cached
        log.warning("query-feature cache %s is stale; rebuilding it", directory)
        _wipe(directory)
        status = "rebuilt"
    else:
        foreign = [p.name for p in directory.iterdir() if not _own(p.name)]
        if foreign:
            raise CacheError(
                f"{directory} is not empty and is not a query-feature cache (found {foreign[:3]}); "
                "choose another --feature_cache_dir or empty it"
            )
        _wipe(directory)  # leftovers of an interrupted run (no manifest yet)
    features = _extract(model, queries, directory, batch_size, image_size, num_workers)
    features.status = status
    atomic_write_json(
        manifest_path,
        {
            "format": CACHE_FORMAT,
            "key_sha256": digest,
            "key": json.loads(json.dumps(full_key, default=str)),
            "num_items": len(queries),
            "batches": [
                {"indices": b.indices.tolist(), "image_shape": list(b.image_shape), "leaves": len(b.leaves)}
                for b in features.batches
            ],
            "valid": features.valid.tolist(),
            "failures": features.failures,
        },
    )
    return features


def _extract(model, queries: ImageSet, directory: Path, batch_size: int, image_size, num_workers) -> QueryFeatures:
    sharding = data_sharding()
    failures: list[dict[str, Any]] = []
    valid = np.zeros(len(queries), dtype=bool)
    batches: list[FeatureBatch] = []
    progress = Progress("query features", len(queries), log, 5.0)
    t0 = time.perf_counter()

    def on_failure(failure: LoadFailure) -> None:
        log.warning("skipping unreadable query image %s (%s)", failure.path, failure.error)
        failures.append({"index": failure.index, "path": failure.path, "error": failure.error})
        progress.update()

    budget = batch_pixel_budget(batch_size)
    stream = decode_stream(
        ((i, str(queries.absolute(i))) for i in range(len(queries))),
        lambda image: model.preprocess(image, image_size=image_size),
        num_workers,
        max_pixels=budget,
        output_size=output_size_fn(model, image_size),
        root=queries.root,
    )
    for batch in shape_batches(stream, batch_size, on_failure, max_batch_pixels=budget):
        feats = model.features(jax.device_put(batch.images, sharding))
        leaves = [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(feats)]
        number = len(batches)
        for j, leaf in enumerate(leaves):
            atomic_write(directory / _leaf_name(number, j), lambda f, leaf=leaf: np.save(f, leaf))
        batches.append(FeatureBatch(batch.indices.copy(), leaves, tuple(batch.images.shape[1:3])))
        valid[batch.indices[batch.indices >= 0]] = True
        progress.update(batch.num_valid)
    progress.finish()
    return QueryFeatures(batches, valid, failures, seconds=time.perf_counter() - t0)


def _load(directory: Path, manifest: dict[str, Any]) -> QueryFeatures:
    batches = []
    try:
        for number, entry in enumerate(manifest["batches"]):
            leaves = [
                np.load(directory / _leaf_name(number, j), mmap_mode="r", allow_pickle=False)
                for j in range(int(entry["leaves"]))
            ]
            indices = np.asarray(entry["indices"], dtype=np.int64)
            if any(len(leaf) != len(indices) for leaf in leaves):
                raise ValueError(f"batch {number} arrays do not have {len(indices)} rows")
            batches.append(FeatureBatch(indices, leaves, tuple(int(s) for s in entry["image_shape"])))
        valid = np.asarray(manifest["valid"], dtype=bool)
        failures = list(manifest["failures"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CacheError(f"corrupt query-feature cache {directory}: {error}; delete it to recompute") from error
    return QueryFeatures(batches, valid, failures, status="reused")


def _leaf_name(batch: int, leaf: int) -> str:
    return f"{_PREFIX}{batch:06d}_leaf_{leaf}.npy"


def _own(name: str) -> bool:
    return name == MANIFEST or name.startswith(_PREFIX) or name.endswith(".tmp")


def _wipe(directory: Path) -> None:
    for path in directory.iterdir():
        if _own(path.name) and path.is_file():
            path.unlink()
