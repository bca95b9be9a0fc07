"""Search of every alpha's query descriptors in one call, then recall@N: the search stage of every command.

:func:`retrieve` takes the database descriptors ``[N, D]`` (with their validity), the query descriptors of every
alpha ``[K, Q, D]`` and the positives, and returns a :class:`Retrieval`: predictions, scores, first-hit ranks and
recall@N per alpha, as VPR-methods-evaluation computes them (docs/DESIGN.md "Retrieval").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from attllm_jax.retrieval.pod_search import pod_active, pod_search_database
from attllm_jax.retrieval.recall import alpha_key, first_hit_ranks, recall_from_ranks
from attllm_jax.retrieval.search import MemoryPlan, SearchSpec, plan_memory, search_database


@dataclass(frozen=True)
class Retrieval:
    """Retrieval outcome of every alpha.

    Attributes:
        alphas: ``[K]`` blend factors.
        predictions: ``[K, Q, M]`` database indices, best first (-1 = none).
        scores: ``[K, Q, M]`` inner products.
        first_hit: ``[K, Q]`` 0-based rank of the first positive, -1 for a miss.
        recalls: ``[K, len(recall_values)]`` percentages.
        recall_values: The N of recall@N.
        search_info: How the neighbours were found (results.json ``search``: method, exact, recall vs exact).
    """

    alphas: tuple[float, ...]
    predictions: np.ndarray
    scores: np.ndarray
    first_hit: np.ndarray
    recalls: np.ndarray
    recall_values: tuple[int, ...]
    search_info: dict[str, Any] = field(default_factory=dict)

    def recalls_dict(self) -> dict[str, dict[str, float]]:
        """``{"<alpha>": {"<N>": percent}}`` with the contract's key spelling."""
        return {
            alpha_key(a): {str(int(n)): float(r) for n, r in zip(self.recall_values, row, strict=True)}
            for a, row in zip(self.alphas, self.recalls, strict=True)
        }


def retrieve(
    database: np.ndarray,
    database_valid: np.ndarray,
    queries: np.ndarray,
    queries_valid: np.ndarray,
    positives: list[np.ndarray],
    alphas: tuple[float, ...],
    recall_values: tuple[int, ...],
    top_m: int,
    *,
    spec: SearchSpec | None = None,
    plan: MemoryPlan | None = None,
    devices: list | None = None,
) -> Retrieval:
    """Top-M search of every alpha's query descriptors in one call, then recall@N.

    Args:
        database: ``[N, D]``; only rows with ``database_valid`` are indexed.
        database_valid: ``[N]`` bool.
        queries: ``[K, Q, D]``.
        queries_valid: ``[Q]`` bool; unreadable queries get no prediction (a miss).
        positives: Q arrays of positive database indices.
        alphas: ``[K]``.
        recall_values: The N.
        top_m: Predictions kept per query.
        spec: The search method (default exact faiss Flat).
        plan: The memory plan (default: :func:`~attllm_jax.retrieval.search.plan_memory` of ``spec``).
        devices: Devices of ``exact_jax`` / ``approx_tpu``; None in a multi-process run: every device of every
            process (:mod:`~attllm_jax.retrieval.pod_search`; the other processes serve the search).

    Returns:
        The retrieval of every alpha; its ``search_info`` is the results.json ``search`` entry.
    """
    k_alphas, n_queries, dim = queries.shape
    spec = SearchSpec(method="faiss_flat") if spec is None else spec
    database_valid = np.asarray(database_valid, dtype=bool)
    predictions = np.full((k_alphas, n_queries, top_m), -1, dtype=np.int64)
    scores = np.full((k_alphas, n_queries, top_m), -np.inf, dtype=np.float32)
    info = {"method": spec.resolved_method(), "requested": spec.method, "exact": spec.is_exact(), "searched": 0}
    if database_valid.any() and queries_valid.any():
        flat = queries[:, queries_valid].reshape(-1, dim)
        plan = plan_memory(spec, len(database_valid), dim, len(flat), top_m) if plan is None else plan
        if devices is None and pod_active(spec):  # every device of every process searches its share
            found = pod_search_database(database, database_valid, flat, top_m, spec, recall_values)
        else:
            found = search_database(database, database_valid, flat, top_m, spec, plan, recall_values, devices=devices)
        predictions[:, queries_valid] = found.indices.reshape(k_alphas, -1, top_m)
        scores[:, queries_valid] = found.scores.reshape(k_alphas, -1, top_m)
        info = {**found.info, "searched": len(flat)}
    first_hit = np.stack([first_hit_ranks(predictions[k], positives) for k in range(k_alphas)])
    recalls = np.stack([recall_from_ranks(first_hit[k], recall_values) for k in range(k_alphas)])
    return Retrieval(tuple(alphas), predictions, scores, first_hit, recalls, tuple(recall_values), info)
