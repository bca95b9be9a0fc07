"""Exact inner-product search in JAX with the database sharded row-wise over every device (of every host).

Each device scores a block of queries against its shard of the database and keeps a local ``lax.top_k``; the
local results are all-gathered and merged with one more ``lax.top_k`` over the (replicated) candidates. A top-k
over a sharded axis is never taken: it is wrong on GPU meshes (jax issue 19271). A database whose size does not
divide by the device count is padded with rows whose score is -inf, as are rows marked invalid.

Ties go to the lower database index: ``lax.top_k`` puts the lower index first among equal values, each shard
holds consecutive rows, and the candidates are concatenated in shard order, so among equal scores the global
order is ascending index at every stage.

The float32 pass uses ``Precision.HIGHEST`` (full float32 products on GPU/TPU, where the default is a bfloat16 or
tf32 pass). ``shortlist_dtype=jnp.bfloat16`` scores a bfloat16 copy of the database first, keeps a shortlist of
``shortlist_size`` rows per device and re-ranks it exactly in float32: the returned scores are exact, but a true
neighbour that bfloat16 rounding pushed out of the shortlist is missed, so that mode is approximate.

``approx_recall_target`` replaces each shard's ``lax.top_k`` by ``lax.approx_max_k`` (the TPU's approximate top-k,
https://arxiv.org/abs/2206.14286) with ``reduction_input_size_override`` set to the whole padded database, as its
docstring prescribes when the operand is one shard of the reduction; the merge stays an exact ``lax.top_k``. Off
TPU, XLA lowers ``approx_max_k`` to an exact top-k.

In a multi-process run (every process calls with the same queries; see :mod:`~attllm_jax.retrieval.pod_search`)
each process reads only the rows of its own devices' shards, and every process gets the merged result.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "data"
# Per-device bytes of the [block, shard] score matrix that the default query block may take.
DEFAULT_SCORE_BYTES = 256 * 2**20
MAX_BLOCK = 1024
# Large shards are padded to a multiple of GROUP rows so the local top-k can first pick the best groups.
GROUP = 128


def search_mesh(devices: list | None = None) -> Mesh:
    """A 1-D mesh named "data" over ``devices`` (default: every device of every process)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.array(devices), (AXIS,))


def _check_matrix(x: Any, name: str, dim: int | None = None) -> tuple[int, int]:
    shape = tuple(getattr(x, "shape", np.shape(x)))
    if len(shape) != 2:
        raise ValueError(f"{name} must have shape [N, D], got {shape}")
    if dim is not None and shape[1] != dim:
        raise ValueError(f"{name} has dimension {shape[1]}, the database has {dim}")
    return shape


class ShardedExactIndex:
    """A database placed row-sharded on a mesh once, searched exactly for any number of query blocks.

    Args:
        database: ``[N, D]`` array-like of float32 (a NumPy array, or anything sliceable by rows, e.g. a lazily
            read store; only each device's rows are read).
        valid: Optional ``[N]`` bool; rows marked False are never returned.
        shortlist_dtype: None (exact float32 scoring) or a low-precision dtype (``jnp.bfloat16``) for a first
            scoring pass followed by an exact float32 re-rank of ``shortlist_size`` rows per device.
        shortlist_size: Rows per device kept by the low-precision pass (default ``max(4 k, k + 64)``).
        devices: Devices of the mesh, in shard order (default every device of every process).
        approx_recall_target: None (exact) or the ``recall_target`` of a per-shard ``lax.approx_max_k``.
    """

    def __init__(
        self,
        database: Any,
        valid: np.ndarray | None = None,
        *,
        shortlist_dtype=None,
        shortlist_size: int | None = None,
        devices: list | None = None,
        approx_recall_target: float | None = None,
    ):
        self.size, self.dim = _check_matrix(database, "database descriptors")
        if approx_recall_target is not None and shortlist_dtype is not None:
            raise ValueError("approx_recall_target and shortlist_dtype cannot be combined")
        self.approx_recall_target = approx_recall_target
        self.mesh = search_mesh(devices)
        self.num_devices = self.mesh.devices.size
        self.shard_rows = max(1, -(-self.size // self.num_devices))
        if self.shard_rows >= 8 * GROUP:
            self.shard_rows = -(-self.shard_rows // GROUP) * GROUP
        padded = self.shard_rows * self.num_devices
        if valid is not None:
            valid = np.asarray(valid, dtype=bool)
            if valid.shape != (self.size,):
                raise ValueError(f"valid must have shape [{self.size}], got {valid.shape}")
        self.shortlist_dtype = None if shortlist_dtype is None else jnp.dtype(shortlist_dtype)
        self.shortlist_size = shortlist_size
        rows = NamedSharding(self.mesh, P(AXIS))

        def rows_of(index) -> np.ndarray:
            start, stop = index[0].start or 0, index[0].stop if index[0].stop is not None else padded
            part = np.zeros((stop - start, self.dim), np.float32)
            real = max(0, min(stop, self.size) - start)
            if real:
                part[:real] = np.asarray(database[start : start + real], dtype=np.float32)
            if not np.all(np.isfinite(part[:real])):
                raise ValueError(f"database descriptors rows {start}..{start + real} contain non-finite values")
            return part

        def bias_of(index) -> np.ndarray:
            start, stop = index[0].start or 0, index[0].stop if index[0].stop is not None else padded
            bias = np.full(stop - start, -np.inf, np.float32)
            real = max(0, min(stop, self.size) - start)
            bias[:real] = 0.0 if valid is None else np.where(valid[start : start + real], 0.0, -np.inf)
            return bias

        self._database = jax.make_array_from_callback((padded, self.dim), rows, rows_of)
        self._bias = jax.make_array_from_callback((padded,), rows, bias_of)
        self._low = None
        if self.shortlist_dtype is not None:
            self._low = jax.jit(lambda x: x.astype(self.shortlist_dtype), out_shardings=rows)(self._database)

    def default_block_size(self, num_queries: int) -> int:
        """Queries per block: the per-device score matrix stays under ``DEFAULT_SCORE_BYTES``."""
        block = DEFAULT_SCORE_BYTES // (4 * self.shard_rows)
        return int(max(1, min(block, MAX_BLOCK, num_queries)))

    def grouped_top_k(self, k: int) -> bool:
        """Whether a local top-k of ``k`` goes through the best row groups (large shards, small k)."""
        return self.shard_rows % GROUP == 0 and 2 * GROUP * k <= self.shard_rows

    def search(self, queries: Any, k: int, *, block_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k database rows of every query by inner product.

        Args:
            queries: ``[Q, D]`` float32 (the same on every process).
            k: Neighbours per query; beyond the number of valid rows the result is padded with index -1, score -inf.
            block_size: Queries scored at once (default :meth:`default_block_size`); the last block is padded.

        Returns:
            ``(scores [Q, k] float32, indices [Q, k] int64)``, best first, ties by lower index.
        """
        _check_matrix(queries, "query descriptors", self.dim)
        queries = np.ascontiguousarray(np.asarray(queries, dtype=np.float32))
        if not np.all(np.isfinite(queries)):
            raise ValueError("query descriptors contain non-finite values")
        k = int(k)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        num_queries = len(queries)
        out_scores = np.full((num_queries, k), -np.inf, np.float32)
        out_indices = np.full((num_queries, k), -1, np.int64)
        if num_queries == 0:
            return out_scores, out_indices
        block = self.default_block_size(num_queries) if block_size is None else int(block_size)
        if block < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        k_local = min(k, self.shard_rows)
        k_out = min(k, k_local * self.num_devices)
        shortlist = None
        if self._low is not None:
            wanted = self.shortlist_size or max(4 * k, k + 64)
            shortlist = max(k_local, min(int(wanted), self.shard_rows))
        approx = None
        if self.approx_recall_target is not None:
            approx = (float(self.approx_recall_target), self.shard_rows * self.num_devices)
        grouped = approx is None and self.grouped_top_k(shortlist or k_local)
        fn = _block_search(self.mesh, k_local, k_out, shortlist, grouped, approx)
        replicated = NamedSharding(self.mesh, P())
        padded = np.zeros((block, self.dim), np.float32)
        for start in range(0, num_queries, block):
            stop = min(start + block, num_queries)
            padded[: stop - start] = queries[start:stop]
            padded[stop - start :] = 0.0
            q = jax.make_array_from_callback(padded.shape, replicated, lambda index, p=padded: p[index])
            args = (self._database, self._bias, q) if shortlist is None else (self._database, self._low, self._bias, q)
            scores, indices = fn(*args)
            scores = _local_copy(scores)[: stop - start]
            indices = _local_copy(indices)[: stop - start].astype(np.int64)
            out_scores[start:stop, :k_out] = scores
            out_indices[start:stop, :k_out] = np.where(np.isfinite(scores), indices, -1)
        return out_scores, out_indices


def _grouped_top_k(scores: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """``lax.top_k(scores, k)`` (same values, same indices, same tie order) through the best row groups.

    The rows ``[B, n]`` (n a multiple of GROUP) are cut into groups of GROUP; the k groups with the largest maxima
    (ties: lower group) hold the top k: an element of rank r <= k has fewer than r elements before it in the
    (value desc, index asc) order, and each group ranked before its own group contributes a distinct one of them.
    """
    batch, n = scores.shape
    groups = scores.reshape(batch, n // GROUP, GROUP)
    _, best_groups = lax.top_k(groups.max(axis=2), k)
    best_groups = jnp.sort(best_groups, axis=1)  # ascending, so candidates stay in index order
    candidates = jnp.take_along_axis(groups, best_groups[:, :, None], axis=1).reshape(batch, k * GROUP)
    values, position = lax.top_k(candidates, k)
    indices = best_groups[jnp.arange(batch)[:, None], position // GROUP] * GROUP + position % GROUP
    return values, indices


def _local_copy(x: jax.Array) -> np.ndarray:
    """A replicated array as NumPy: this process's copy (a multi-process array is not fully addressable)."""
    return np.asarray(x if x.is_fully_addressable else x.addressable_data(0))


@functools.lru_cache(maxsize=32)
def _block_search(
    mesh: Mesh,
    k_local: int,
    k_out: int,
    shortlist: int | None,
    grouped: bool,
    approx: tuple[float, int] | None = None,
):
    """The jitted per-block search: local top-k on every shard, all-gather, replicated merge.

    ``approx``: None, or ``(recall_target, total rows)`` of a per-shard ``lax.approx_max_k``.
    """
    top_k = _grouped_top_k if grouped else lax.top_k
    if approx is not None:
        top_k = functools.partial(lax.approx_max_k, recall_target=approx[0], reduction_input_size_override=approx[1])

    def merge(scores, indices):
        # [B, k_local] per device -> [B, devices * k_local] in shard order, the same on every device
        scores = lax.all_gather(scores, AXIS, axis=1, tiled=True)
        indices = lax.all_gather(indices, AXIS, axis=1, tiled=True)
        best, position = lax.top_k(scores, k_out)
        return best, jnp.take_along_axis(indices, position, axis=1)

    def exact(database, bias, queries):
        offset = lax.axis_index(AXIS) * database.shape[0]
        scores = jnp.einsum("bd,nd->bn", queries, database, precision=lax.Precision.HIGHEST) + bias
        best, local = top_k(scores, k_local)
        return merge(best, local + offset)

    def two_pass(database, low, bias, queries):
        offset = lax.axis_index(AXIS) * database.shape[0]
        rough = jnp.einsum("bd,nd->bn", queries.astype(low.dtype), low, preferred_element_type=jnp.float32) + bias
        _, candidates = top_k(rough, shortlist)
        candidates = jnp.sort(candidates, axis=1)  # ascending index, so exact ties still go to the lower index
        rows = database[candidates]  # [B, shortlist, D]
        scores = jnp.einsum("bd,bkd->bk", queries, rows, precision=lax.Precision.HIGHEST) + bias[candidates]
        best, position = lax.top_k(scores, k_local)
        return merge(best, jnp.take_along_axis(candidates, position, axis=1) + offset)

    if shortlist is None:
        in_specs = (P(AXIS), P(AXIS), P())
        body = exact
    else:
        in_specs = (P(AXIS), P(AXIS), P(AXIS), P())
        body = two_pass
    mapped = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=(P(), P()), check_vma=False)
    return jax.jit(mapped)


def jax_exact_search(
    database: Any,
    queries: Any,
    k: int,
    *,
    block_size: int | None = None,
    shortlist_dtype=None,
    valid: np.ndarray | None = None,
    devices: list | None = None,
    approx_recall_target: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k inner-product search, the database sharded row-wise over every device.

    Descriptors are L2-normalized, so the inner product ranks as the L2 distance does (``|q - d|^2 = 2 - 2 q.d``).

    Args:
        database: ``[N, D]`` float32 array-like (rows are read per shard).
        queries: ``[Q, D]`` float32.
        k: Neighbours per query (more than the valid rows: padded with index -1 and score -inf).
        block_size: Queries per block (default: the per-device score matrix stays under 256 MiB).
        shortlist_dtype: Optional low-precision dtype for a first pass re-ranked exactly (see the module notes).
        valid: Optional ``[N]`` bool mask of rows that may be returned.
        devices: Devices to shard over (default all devices of all processes).
        approx_recall_target: None (exact) or the recall target of a per-shard ``lax.approx_max_k`` (approximate
            on TPU; exact elsewhere).

    Returns:
        ``(scores [Q, k] float32, indices [Q, k] int64)``, best first, ties broken by the lower database index.
    """
    index = ShardedExactIndex(
        database, valid, shortlist_dtype=shortlist_dtype, devices=devices, approx_recall_target=approx_recall_target
    )
    return index.search(queries, k, block_size=block_size)
