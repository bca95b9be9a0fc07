"""Database search at scale: the method (sharded exact JAX, faiss Flat / IVF / HNSW), a memory plan made before
any work starts, chunk-by-chunk exact search with a running top-k when the database does not fit, and the recall
of an approximate index against exact search measured on the run's own queries.

``--search auto`` picks ``exact_jax`` when an accelerator is present and ``faiss_flat`` on the CPU; both exact
paths return the same neighbours and scores to float32 round-off. ``approx_tpu`` (explicit only) is ``exact_jax``
with a per-shard ``lax.approx_max_k``: approximate on TPU, exact elsewhere, reported with its recall vs exact.

In a multi-process run the JAX methods search on every device of every process when every process calls
(:mod:`~attllm_jax.retrieval.pod_search`, docs/DESIGN.md section 15); ``devices`` limits them to a list instead.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from attllm_jax.retrieval.index import FaissParams, build_faiss_index, faiss_index_bytes, recall_vs_exact

SEARCH_METHODS = ("auto", "exact_jax", "approx_tpu", "faiss_flat", "faiss_ivf", "faiss_hnsw")
EXACT_METHODS = ("exact_jax", "faiss_flat")
JAX_METHODS = ("exact_jax", "approx_tpu")  # searched on devices; chunked with a running top-k when too large
DEFAULT_RECALL_TARGET = 0.95
SHORTLIST_DTYPES = ("bfloat16",)
GIB = 2**30

log = logging.getLogger("attllm_jax.retrieval")


class SearchMemoryError(RuntimeError):
    """The search cannot fit in the memory budget; the message names the flag to change."""


@dataclass(frozen=True)
class SearchSpec:
    """How the database is searched.

    Attributes:
        method: One of ``SEARCH_METHODS``.
        faiss: Parameters of the approximate faiss indexes.
        block_size: Queries per block of ``exact_jax`` (None = sized to 256 MiB of scores per device).
        shortlist_dtype: None or "bfloat16": a low-precision first pass of ``exact_jax`` with an exact float32
            re-rank of a shortlist (approximate: reported with its measured recall vs exact).
        memory_gb: Memory budget in GiB (None = the memory available when the run starts).
        recall_target: ``approx_tpu`` only: the ``recall_target`` of ``lax.approx_max_k`` (None = 0.95).
    """

    method: str = "auto"
    faiss: FaissParams = field(default_factory=FaissParams)
    block_size: int | None = None
    shortlist_dtype: str | None = None
    memory_gb: float | None = None
    recall_target: float | None = None

    def validated(self) -> SearchSpec:
        if self.method not in SEARCH_METHODS:
            raise ValueError(f"--search must be one of {SEARCH_METHODS}, got {self.method!r}")
        if self.shortlist_dtype not in (None, *SHORTLIST_DTYPES):
            raise ValueError(
                f"--search_shortlist_dtype must be one of {SHORTLIST_DTYPES}, got {self.shortlist_dtype!r}"
            )
        if self.block_size is not None and int(self.block_size) < 1:
            raise ValueError(f"--search_block_size must be >= 1, got {self.block_size}")
        if self.memory_gb is not None and not float(self.memory_gb) > 0:
            raise ValueError(f"--search_memory_gb must be > 0, got {self.memory_gb}")
        if self.recall_target is not None:
            if self.method != "approx_tpu":
                raise ValueError(f"--search_recall_target applies to --search approx_tpu only, not {self.method!r}")
            if not 0 < float(self.recall_target) <= 1:
                raise ValueError(f"--search_recall_target must lie in (0, 1], got {self.recall_target}")
        if self.method == "approx_tpu" and self.shortlist_dtype is not None:
            raise ValueError("--search approx_tpu cannot take --search_shortlist_dtype (both approximate the search)")
        self.faiss.validated()
        return self

    def resolved_method(self) -> str:
        """The concrete method: ``auto`` is ``exact_jax`` on an accelerator, ``faiss_flat`` on the CPU."""
        if self.method != "auto":
            return self.method
        import jax

        return "faiss_flat" if jax.default_backend() == "cpu" else "exact_jax"

    def is_exact(self) -> bool:
        return self.resolved_method() in EXACT_METHODS and self.shortlist_dtype is None

    def approx_recall_target(self) -> float | None:
        """The ``lax.approx_max_k`` recall target of ``approx_tpu``; None for the other methods."""
        if self.resolved_method() != "approx_tpu":
            return None
        return DEFAULT_RECALL_TARGET if self.recall_target is None else float(self.recall_target)


def available_memory_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux), else the free physical pages."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes the search needs and whether the database is searched whole or chunk by chunk.

    Attributes:
        database_bytes: The float32 database held in memory (0 when searched in chunks).
        index_bytes: The index (faiss copy or codes, device copy of ``exact_jax``).
        queries_bytes: The query sweep ``[K, Q, D]`` float32 and the top-M results.
        budget_bytes: The memory budget.
        chunk_rows: None (whole database in memory) or the rows searched at a time with a running top-k.
    """

    database_bytes: int
    index_bytes: int
    queries_bytes: int
    budget_bytes: int
    chunk_rows: int | None

    @property
    def total_bytes(self) -> int:
        return self.database_bytes + self.index_bytes + self.queries_bytes

    def describe(self) -> str:
        how = "whole database in memory" if self.chunk_rows is None else f"in chunks of {self.chunk_rows} rows"
        return (
            f"search memory: database {format_bytes(self.database_bytes)} + index {format_bytes(self.index_bytes)} + "
            f"query sweep and results {format_bytes(self.queries_bytes)} = {format_bytes(self.total_bytes)} of a "
            f"{format_bytes(self.budget_bytes)} budget ({how})"
        )


def format_bytes(num: int) -> str:
    """``num`` bytes in the largest binary unit that keeps it >= 1 (B, KiB, MiB, GiB)."""
    for unit, size in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if num >= size:
            return f"{num / size:.2f} {unit}"
    return f"{int(num)} B"


def plan_memory(
    spec: SearchSpec, num_database: int, dim: int, num_query_vectors: int, top_m: int, budget_bytes: int | None = None
) -> MemoryPlan:
    """The memory the search needs, decided before any work starts.

    Args:
        spec: The search settings.
        num_database: Database rows N.
        dim: Descriptor dimension D.
        num_query_vectors: Query vectors searched (alphas x queries).
        top_m: Neighbours kept per query vector.
        budget_bytes: Override of the budget (default ``spec.memory_gb`` or the available memory).

    Returns:
        The plan (whole database in memory, or chunk by chunk for the exact methods).

    Raises:
        SearchMemoryError: naming the flag to change when even the chunked search cannot fit.
    """
    if budget_bytes is None:
        budget_bytes = int(spec.memory_gb * GIB) if spec.memory_gb is not None else available_memory_bytes()
    method = spec.resolved_method()
    queries = 4 * num_query_vectors * dim + 12 * num_query_vectors * top_m
    database = 4 * num_database * dim
    if method in JAX_METHODS:
        index = database + (2 * num_database * dim if spec.shortlist_dtype else 0)
    else:
        index = faiss_index_bytes(method, num_database, dim, spec.faiss)
    if queries >= budget_bytes:
        raise SearchMemoryError(
            f"the query sweep needs {queries / GIB:.2f} GiB ({num_query_vectors} query vectors x {dim} float32), more "
            f"than the {budget_bytes / GIB:.2f} GiB budget: evaluate fewer --alphas at a time or raise "
            "--search_memory_gb"
        )
    plan = MemoryPlan(database, index, queries, budget_bytes, None)
    if plan.total_bytes <= budget_bytes:
        return plan
    if method not in (*EXACT_METHODS, *JAX_METHODS):
        raise SearchMemoryError(
            f"the {method} index needs {(database + index) / GIB:.2f} GiB with the database, more than the "
            f"{budget_bytes / GIB:.2f} GiB budget: use --search faiss_ivf with --pq_m (compressed codes), an exact "
            "--search (searched chunk by chunk), or raise --search_memory_gb"
        )
    per_row = (database + index) / max(1, num_database)
    chunk_rows = int((budget_bytes - queries) // (2 * per_row))  # half the rest: a chunk read while one is searched
    if chunk_rows < 1:  # a chunk of fewer than top_m rows is fine: the running top-k pads
        raise SearchMemoryError(
            f"not even one database row fits beside the query sweep in the {budget_bytes / GIB:.2f} GiB "
            "budget: raise --search_memory_gb or evaluate fewer --alphas at a time"
        )
    chunk = min(chunk_rows, num_database)
    return MemoryPlan(0, int(per_row * chunk), queries, budget_bytes, chunk)


@dataclass
class SearchResult:
    """Top-M neighbours of every query vector and how they were found.

    Attributes:
        scores: ``[M, k]`` float32 inner products, best first (-inf = none).
        indices: ``[M, k]`` int64 database rows (-1 = none).
        info: The results.json ``search`` entry (method, exact, parameters, recall vs exact when approximate).
    """

    scores: np.ndarray
    indices: np.ndarray
    info: dict[str, Any]


def _exact_in_memory(
    method: str, database, valid: np.ndarray, queries: np.ndarray, k: int, spec: SearchSpec, devices=None
):
    if method in JAX_METHODS:
        from attllm_jax.retrieval.jax_search import jax_exact_search

        return jax_exact_search(
            database,
            queries,
            k,
            block_size=spec.block_size,
            shortlist_dtype=spec.shortlist_dtype,
            valid=valid,
            devices=devices,
            approx_recall_target=spec.approx_recall_target() if method == "approx_tpu" else None,
        )
    rows = np.flatnonzero(valid)
    scores = np.full((len(queries), k), -np.inf, np.float32)
    indices = np.full((len(queries), k), -1, np.int64)
    if len(rows) == 0:
        return scores, indices
    dense = np.asarray(database[:], dtype=np.float32) if len(rows) == len(valid) else np.asarray(database)[rows]
    s, i = build_faiss_index("faiss_flat", dense).search(queries, k)
    return s, np.where(i >= 0, rows[np.clip(i, 0, None)], -1)


def merge_top_k(
    scores: np.ndarray, indices: np.ndarray, new_scores: np.ndarray, new_indices: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Running top-k: the best k of two ``[Q, k]`` results; among equal scores the first result's entries come
    first (a chunk searched earlier holds lower database indices)."""
    all_scores = np.concatenate([scores, new_scores], axis=1)
    all_indices = np.concatenate([indices, new_indices], axis=1)
    order = np.argsort(-all_scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(all_scores, order, axis=1), np.take_along_axis(all_indices, order, axis=1)


def exact_search(
    method: str,
    database,
    valid: np.ndarray,
    queries: np.ndarray,
    k: int,
    spec: SearchSpec,
    chunk_rows: int | None,
    devices: list | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of ``queries`` ``[M, D]`` over ``database`` ``[N, D]`` (array-like), whole or chunk by chunk.

    ``devices``: the devices ``exact_jax`` shards over (default every device of every process).
    """
    num = len(valid)
    if chunk_rows is None or chunk_rows >= num:
        return _exact_in_memory(method, database, valid, queries, k, spec, devices)
    scores = np.full((len(queries), k), -np.inf, np.float32)
    indices = np.full((len(queries), k), -1, np.int64)
    for start in range(0, num, chunk_rows):
        stop = min(start + chunk_rows, num)
        part = np.asarray(database[start:stop], dtype=np.float32)
        s, i = _exact_in_memory(method, part, valid[start:stop], queries, k, spec, devices)
        scores, indices = merge_top_k(scores, indices, s, np.where(i >= 0, i + start, -1), k)
        log.info("searched database rows %d..%d of %d", start, stop, num)
    return scores, indices


def search_database(
    database,
    valid: np.ndarray,
    queries: np.ndarray,
    k: int,
    spec: SearchSpec,
    plan: MemoryPlan,
    recall_values: Sequence[int] = (),
    *,
    devices: list | None = None,
) -> SearchResult:
    """Top-k database rows of every query vector with the method of ``spec``.

    Args:
        database: ``[N, D]`` float32 array-like (an array, or a lazily read store sliced by rows).
        valid: ``[N]`` bool; invalid rows are never returned.
        queries: ``[M, D]`` float32.
        k: Neighbours per query vector.
        spec: The search settings.
        plan: From :func:`plan_memory` (decides whole vs chunked exact search).
        recall_values: The N at which an approximate search's recall vs exact is measured.
        devices: Devices of ``exact_jax`` / ``approx_tpu`` (None: this process's local devices). The pod-wide
            search of a multi-process run is :func:`~attllm_jax.retrieval.pod_search.pod_search_database`, which
            :func:`~attllm_jax.retrieval.retrieve.retrieve` calls instead of this function.

    Returns:
        The neighbours and the ``search`` entry of results.json.
    """
    method = spec.resolved_method()
    valid = np.asarray(valid, dtype=bool)
    info: dict[str, Any] = {"method": method, "requested": spec.method, "chunk_rows": plan.chunk_rows}
    info.update(processes=1, rows_per_process=[len(valid)])
    if method in JAX_METHODS:
        info["block_size"] = spec.block_size
        info["shortlist_dtype"] = spec.shortlist_dtype
        if method == "approx_tpu":
            info["recall_target"] = spec.approx_recall_target()
            log_approx_fallback()
    if method in (*EXACT_METHODS, *JAX_METHODS):
        scores, indices = exact_search(method, database, valid, queries, k, spec, plan.chunk_rows, devices)
        info["exact"] = method in EXACT_METHODS and (spec.shortlist_dtype is None or method != "exact_jax")
        if not info["exact"]:
            plain = SearchSpec(method="exact_jax", block_size=spec.block_size)
            _, truth = exact_search("exact_jax", database, valid, queries, k, plain, plan.chunk_rows, devices)
            info["recall_vs_exact"] = recall_vs_exact(indices, truth, [n for n in recall_values if n <= k])
        return SearchResult(scores, indices, info)
    rows = np.flatnonzero(valid)
    dense = np.asarray(database, dtype=np.float32)[rows]
    index = build_faiss_index(method, dense, spec.faiss)
    s, i = index.search(queries, k)
    indices = np.where(i >= 0, rows[np.clip(i, 0, None)], -1)
    info.update(exact=False, params=index.params)
    _, truth = exact_search("faiss_flat", database, valid, queries, k, spec, plan.chunk_rows)
    info["recall_vs_exact"] = recall_vs_exact(indices, truth, [n for n in recall_values if n <= k])
    info["recall_vs_exact_reference"] = "faiss_flat"
    return SearchResult(s, indices, info)


def log_approx_fallback() -> None:
    """One log line when ``approx_tpu`` runs off TPU, where XLA computes ``approx_max_k`` exactly."""
    import jax

    backend = jax.default_backend()
    if backend != "tpu":
        log.info(
            "--search approx_tpu on %s: jax.lax.approx_max_k falls back to an exact top-k off TPU (recall vs exact "
            "is measured all the same)",
            backend,
        )
