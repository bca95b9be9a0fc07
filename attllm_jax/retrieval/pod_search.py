"""Pod-wide search: every process searches a contiguous share of the database on its own devices.

In a multi-process run with ``--search exact_jax`` or ``approx_tpu`` (docs/DESIGN.md section 15), process 0
holds the queries and calls :func:`pod_search_database` for each search; every other process calls
:func:`serve_pod_searches`, which answers until process 0 calls :func:`finish_pod_searches`. Every message is a
device collective (``multihost_utils``: gloo on the CPU, the interconnect on TPU), so all processes run the same
programs in the same order.

One search:

1. Process 0 broadcasts a header ``[op, M, k, approximate]``.
2. Every process plans the memory of its share (rows per pass within its own budget, counted as
   :func:`~attllm_jax.retrieval.search.plan_memory` counts ``exact_jax``); the smallest plan over the processes
   is used, so every process runs the same passes.
3. Process 0 broadcasts the queries ``[M, D]``.
4. Each pass places ``rows_per_device`` rows of the process's share on each of its devices (padded with rows
   that score -inf), scores every query block, keeps a local top-k per device, all-gathers the candidates (global
   row, score) and merges them with one more top-k (:class:`~attllm_jax.retrieval.jax_search.ShardedExactIndex`);
   passes are merged on the host, ties to the lower global row.

Shares are balanced: process ``p`` holds rows ``[p N / P, (p + 1) N / P)``. Within a pass the mesh's devices are
ordered process-major, and each device's rows are consecutive, so ascending candidate position is ascending
global row: ``lax.top_k``'s lower-index-first rule gives the lower global row among equal scores.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from attllm_jax.retrieval.index import recall_vs_exact
from attllm_jax.retrieval.jax_search import GROUP, ShardedExactIndex
from attllm_jax.retrieval.search import (
    GIB,
    JAX_METHODS,
    SearchMemoryError,
    SearchResult,
    SearchSpec,
    available_memory_bytes,
    format_bytes,
    log_approx_fallback,
)

log = logging.getLogger("attllm_jax.retrieval")

_OP_STOP, _OP_SEARCH = 0, 1


def pod_active(spec: SearchSpec) -> bool:
    """Whether ``spec`` searches on every device of every process (a multi-process run of a JAX method)."""
    return jax.process_count() > 1 and spec.resolved_method() in JAX_METHODS


def pod_devices() -> list:
    """Every device of every process, process-major (the shard order of a pass)."""
    return sorted(jax.devices(), key=lambda d: (d.process_index, d.id))


@dataclass(frozen=True)
class PodLayout:
    """Which global database rows each device holds in each pass.

    Attributes:
        num_rows: Database rows N.
        processes: Processes P.
        local_devices: Devices per process L.
        rows_per_device: Rows a device holds in one pass.
        passes: Passes over each process's share.
    """

    num_rows: int
    processes: int
    local_devices: int
    rows_per_device: int
    passes: int

    def share(self, process: int) -> tuple[int, int]:
        """Rows ``[start, stop)`` of a process (balanced: sizes differ by at most one)."""
        return process * self.num_rows // self.processes, (process + 1) * self.num_rows // self.processes

    @property
    def rows_per_process(self) -> list[int]:
        return [stop - start for start, stop in (self.share(p) for p in range(self.processes))]

    def rows_of_pass(self, index: int) -> np.ndarray:
        """``[P * L * rows_per_device]`` int64: the global row at each position of pass ``index`` (-1: padding)."""
        per_pass = self.local_devices * self.rows_per_device
        table = np.full((self.processes, per_pass), -1, np.int64)
        for p in range(self.processes):
            start, stop = self.share(p)
            first = start + index * per_pass
            rows = np.arange(first, min(first + per_pass, stop))
            table[p, : len(rows)] = rows
        return table.reshape(-1)


def plan_layout(spec: SearchSpec, num_rows: int, dim: int, num_queries: int, k: int) -> PodLayout:
    """The layout every process agrees on: each plans its share within its own budget; the smallest plan wins.

    Raises:
        SearchMemoryError: naming the processes whose budget cannot hold one row per device beside the queries.
    """
    from jax.experimental import multihost_utils

    processes, local = jax.process_count(), jax.local_device_count()
    share_max = -(-num_rows // processes)
    capacity = _pass_capacity(spec, share_max, dim, num_queries, k)
    capacities = np.asarray(multihost_utils.process_allgather(np.array([capacity], np.int32))).reshape(-1)
    if capacities.min() < local:
        short = [int(p) for p in np.flatnonzero(capacities < local)]
        raise SearchMemoryError(
            f"process {', '.join(map(str, short))}: not one database row per device fits beside the {num_queries} "
            "query vectors in the search memory budget: raise --search_memory_gb or evaluate fewer --alphas at a time"
        )
    per_pass = int(min(capacities.min(), share_max))
    if per_pass >= share_max:  # one pass: the share spread over the devices
        rows_per_device = max(1, -(-share_max // local))
        if rows_per_device >= 8 * GROUP:
            rows_per_device = -(-rows_per_device // GROUP) * GROUP
    else:  # streamed: stay within the budget
        rows_per_device = max(1, per_pass // local)
        if rows_per_device >= 8 * GROUP:
            rows_per_device -= rows_per_device % GROUP
    passes = -(-share_max // (local * rows_per_device))
    return PodLayout(num_rows, processes, local, rows_per_device, passes)


def _pass_capacity(spec: SearchSpec, share_rows: int, dim: int, num_queries: int, k: int) -> int:
    """Rows of this process's share that one pass can hold within this host's budget (0: not even one).

    As :func:`~attllm_jax.retrieval.search.plan_memory` counts ``exact_jax``: the query sweep and results, and per
    row a host copy and a device copy in float32; a streamed pass takes half of what is left (one pass read while
    one is searched). A pass may hold fewer than k rows: the running top-k pads.
    """
    budget = host_budget_bytes(spec)
    queries = 4 * num_queries * dim + 12 * num_queries * k
    per_row = 8 * dim
    if queries + per_row * share_rows <= budget:
        rows = share_rows
    else:
        rows = max(0, (budget - queries) // (2 * per_row))
    log.info(
        "pod search memory on this host: query sweep and results %s, %d of its %d rows per pass (%s each), budget %s",
        format_bytes(queries),
        rows,
        share_rows,
        format_bytes(per_row),
        format_bytes(budget),
    )
    return int(rows)


def host_budget_bytes(spec: SearchSpec) -> int:
    """This host's search budget: ``--search_memory_gb``, else its available memory, capped by its devices' memory
    when they report it (accelerators)."""
    if spec.memory_gb is not None:
        return int(float(spec.memory_gb) * GIB)
    budget = available_memory_bytes()
    limits = [(d.memory_stats() or {}).get("bytes_limit") for d in jax.local_devices()]
    if all(limits):
        budget = min(budget, int(sum(limits)))
    return budget


class PassView:
    """``[P * L * rows_per_device, D]`` rows of one pass, read from the database by position (zeros for padding).

    Only the positions of this process's devices are read (by :class:`ShardedExactIndex`); each device's positions
    map to consecutive global rows, so a slice is one contiguous read.
    """

    def __init__(self, database: Any, rows: np.ndarray, dim: int):
        self._database, self._rows, self.shape = database, rows, (len(rows), dim)

    def __getitem__(self, index: slice) -> np.ndarray:
        rows = self._rows[index]
        out = np.zeros((len(rows), self.shape[1]), np.float32)
        real = np.flatnonzero(rows >= 0)
        if len(real):
            first, last = int(rows[real[0]]), int(rows[real[-1]])
            out[real[0] : real[-1] + 1] = np.asarray(self._database[first : last + 1], dtype=np.float32)
        return out


def merge_by_row(
    scores: np.ndarray, rows: np.ndarray, new_scores: np.ndarray, new_rows: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The best k of two ``[Q, k]`` results, ties to the lower global row (-1 entries have score -inf, sort last)."""
    all_scores = np.concatenate([scores, new_scores], axis=1)
    all_rows = np.concatenate([rows, new_rows], axis=1)
    order = np.lexsort((np.where(all_rows < 0, np.iinfo(np.int64).max, all_rows), -all_scores), axis=1)[:, :k]
    return np.take_along_axis(all_scores, order, axis=1), np.take_along_axis(all_rows, order, axis=1)


def _search_passes(
    database: Any, valid: np.ndarray, queries: np.ndarray, k: int, spec: SearchSpec, layout: PodLayout
) -> tuple[np.ndarray, np.ndarray]:
    """Every process: the top-k global rows of ``queries`` ``[M, D]`` over the whole database, pass by pass."""
    dim = queries.shape[1]
    scores = np.full((len(queries), k), -np.inf, np.float32)
    found = np.full((len(queries), k), -1, np.int64)
    devices = pod_devices()
    for index in range(layout.passes):
        rows = layout.rows_of_pass(index)
        mask = np.zeros(len(rows), bool)
        mask[rows >= 0] = valid[rows[rows >= 0]]
        shard = ShardedExactIndex(
            PassView(database, rows, dim),
            mask,
            shortlist_dtype=spec.shortlist_dtype,
            devices=devices,
            approx_recall_target=spec.approx_recall_target(),
        )
        s, position = shard.search(queries, k, block_size=spec.block_size)
        rows_found = np.where(position >= 0, rows[np.clip(position, 0, None)], -1)
        scores, found = merge_by_row(scores, found, s, rows_found, k)
        if layout.passes > 1:
            log.info("pod search pass %d of %d done", index + 1, layout.passes)
    return scores, found


def _run_one(database: Any, valid: np.ndarray, spec: SearchSpec, header: np.ndarray, queries: np.ndarray | None):
    """Steps 2-4 of a search on every process (``queries`` given on process 0 only)."""
    from jax.experimental import multihost_utils

    _, num_queries, k, as_asked = (int(v) for v in header)
    spec = spec if as_asked else _exact_spec(spec)
    dim = int(database.shape[1])
    layout = plan_layout(spec, len(valid), dim, num_queries, k)
    payload = queries if queries is not None else np.zeros((num_queries, dim), np.float32)
    queries = np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(payload, np.float32)))
    scores, rows = _search_passes(database, valid, queries, k, spec, layout)
    return scores, rows, layout


def _exact_spec(spec: SearchSpec) -> SearchSpec:
    """The exact reference of an approximate search: ``exact_jax`` with the same block size and budget."""
    return SearchSpec(method="exact_jax", block_size=spec.block_size, memory_gb=spec.memory_gb)


def _broadcast_header(values: list[int] | None) -> np.ndarray:
    from jax.experimental import multihost_utils

    header = np.zeros(4, np.int32) if values is None else np.asarray(values, np.int32)
    return np.asarray(multihost_utils.broadcast_one_to_all(header))


def pod_search_database(
    database: Any, valid: np.ndarray, queries: np.ndarray, k: int, spec: SearchSpec, recall_values=()
) -> SearchResult:
    """Process 0: the top-k of ``queries`` ``[M, D]`` over the database searched on every device of every process.

    The others must be in :func:`serve_pod_searches`. An approximate search (``approx_tpu``, or ``exact_jax`` with
    a shortlist dtype) is followed by an exact one, for its recall vs exact on the same queries.

    Returns:
        Scores ``[M, k]``, global rows ``[M, k]`` (-1 = none) and the results.json ``search`` entry.
    """
    method = spec.resolved_method()
    approximate = method == "approx_tpu" or spec.shortlist_dtype is not None
    if method == "approx_tpu":
        log_approx_fallback()
    header = _broadcast_header([_OP_SEARCH, len(queries), int(k), 1])
    scores, rows, layout = _run_one(database, valid, spec, header, queries)
    info: dict[str, Any] = {
        "method": method,
        "requested": spec.method,
        "exact": not approximate,
        "processes": layout.processes,
        "rows_per_process": layout.rows_per_process,
        "rows_per_device": layout.rows_per_device,
        "passes": layout.passes,
        "chunk_rows": None if layout.passes == 1 else layout.local_devices * layout.rows_per_device,
        "block_size": spec.block_size,
        "shortlist_dtype": spec.shortlist_dtype,
    }
    if method == "approx_tpu":
        info["recall_target"] = spec.approx_recall_target()
    if approximate:
        header = _broadcast_header([_OP_SEARCH, len(queries), int(k), 0])
        _, truth, _ = _run_one(database, valid, spec, header, queries)
        info["recall_vs_exact"] = recall_vs_exact(rows, truth, [n for n in recall_values if n <= k])
    log.info(
        "pod search: %d processes, rows per process %s, %d row(s) per device, %d pass(es)",
        layout.processes,
        layout.rows_per_process,
        layout.rows_per_device,
        layout.passes,
    )
    return SearchResult(scores, rows, info)


def serve_pod_searches(database: Any, valid: np.ndarray, spec: SearchSpec) -> int:
    """A process other than 0: takes part in process 0's searches until it calls :func:`finish_pod_searches`.

    Args:
        database: ``[N, D]`` float32 array-like (the store; only this process's share is read).
        valid: ``[N]`` bool.
        spec: The run's search settings (the same on every process).

    Returns:
        How many searches this process took part in.
    """
    served = 0
    valid = np.asarray(valid, dtype=bool)
    while True:
        header = _broadcast_header(None)
        if int(header[0]) == _OP_STOP:
            return served
        _run_one(database, valid, spec, header, None)
        served += 1


def finish_pod_searches(spec: SearchSpec) -> None:
    """Process 0: releases the processes in :func:`serve_pod_searches` (a no-op when no pod search runs)."""
    if pod_active(spec):
        _broadcast_header([_OP_STOP, 0, 0, 0])
