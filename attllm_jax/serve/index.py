"""The database's search index, built once when the service loads and searched by every batch.

localize searches once per run, so :func:`~attllm_jax.retrieval.retrieve.retrieve` reads the database descriptors
from their store and builds its index (faiss, or the devices' sharded copy) inside each call. A service that did
the same would read the whole store and rebuild the index for every batch: O(N D) work and, on an accelerator, an
upload of the whole database per request. :class:`ResidentIndex` builds the same index over the same rows once;
its neighbours and scores are those ``retrieve`` finds for the same queries (``tests/test_serve_index.py``).
A database too large for memory (the exact methods' chunked plan) or a multi-process search is left to
``retrieve`` per batch, as before.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from attllm_jax.retrieval.index import build_faiss_index
from attllm_jax.retrieval.pod_search import pod_active
from attllm_jax.retrieval.retrieve import retrieve
from attllm_jax.retrieval.search import JAX_METHODS, SearchSpec, plan_memory

log = logging.getLogger("attllm_jax.serve")


class ResidentIndex:
    """The searchable database rows, indexed once.

    Args:
        database: ``[N, D]`` float32 descriptors (an array, or a store read by rows).
        valid: ``[N]`` bool; invalid rows are never returned.
        spec: The run's search settings (localize's ``config.search``).
        max_queries: Most query vectors of one search (the service's ``--max_batch``), for the memory plan.
        top_k: Most neighbours one search asks.
    """

    def __init__(self, database: Any, valid: np.ndarray, spec: SearchSpec, max_queries: int, top_k: int):
        self.database, self.valid, self.spec = database, np.asarray(valid, bool), spec
        self.method = spec.resolved_method()
        self._index = None
        num, dim = len(self.valid), int(database.shape[1])
        plan = plan_memory(spec, num, dim, max_queries, max(1, min(top_k, num)))
        if pod_active(spec) or (plan.chunk_rows is not None and plan.chunk_rows < num) or not self.valid.any():
            log.info("search: %s per batch (database searched chunk by chunk or across processes)", self.method)
            return
        t0 = time.perf_counter()
        self.rows = np.flatnonzero(self.valid)
        if self.method in JAX_METHODS:
            from attllm_jax.retrieval.jax_search import ShardedExactIndex

            target = spec.approx_recall_target() if self.method == "approx_tpu" else None
            self._index = ShardedExactIndex(
                database, self.valid, shortlist_dtype=spec.shortlist_dtype, approx_recall_target=target
            )
        else:
            dense = np.asarray(database[:], np.float32)[self.rows]
            self._index = build_faiss_index(self.method, dense, spec.faiss)
        log.info("search: %s index of %d rows built in %.2f s", self.method, len(self.rows), time.perf_counter() - t0)

    @property
    def resident(self) -> bool:
        """The index was built once (False: each search reads the store and builds it, as ``retrieve`` does)."""
        return self._index is not None

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` database rows of each query.

        Args:
            queries: ``[Q, D]`` float32.
            k: Neighbours per query (at most the searchable rows).

        Returns:
            ``(indices [Q, k] int64 database rows (-1: none), scores [Q, k] float32)``, best first.
        """
        if self._index is None:
            found = retrieve(
                self.database, self.valid, queries[None], np.ones(len(queries), bool),
                [np.zeros(0, np.int64)] * len(queries), (0.0,), (1,), k, spec=self.spec,
            )  # fmt: skip
            return found.predictions[0], found.scores[0]
        if self.method in JAX_METHODS:
            scores, indices = self._index.search(queries, k, block_size=self.spec.block_size)
            return indices, scores
        scores, found = self._index.search(queries, k)
        return np.where(found >= 0, self.rows[np.clip(found, 0, None)], -1), scores
