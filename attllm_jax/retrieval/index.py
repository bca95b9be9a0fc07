"""Exact nearest-neighbour search with faiss.

Descriptors are L2-normalized, so the inner product ranks exactly as the L2 distance VPR-methods-evaluation
uses (``|q - d|^2 = 2 - 2 q.d``); ``IndexFlatIP`` is exact.
"""

from __future__ import annotations

import faiss
import numpy as np


def _as_matrix(x: np.ndarray, name: str, dim: int | None = None) -> np.ndarray:
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape [N, D], got {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name} has dimension {x.shape[1]}, the database has {dim}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contains non-finite values")
    return x


class ExactIndex:
    """Exact inner-product index over unit-norm database descriptors.

    Args:
        database: ``[N, D]`` float32 descriptors.
    """

    def __init__(self, database: np.ndarray):
        database = _as_matrix(database, "database descriptors")
        self.dim = database.shape[1]
        self.size = database.shape[0]
        self._index = faiss.IndexFlatIP(self.dim)
        self._index.add(database)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k database rows by inner product.

        Args:
            queries: ``[Q, D]`` float32.
            k: Neighbours per query; more than the database size yields -1 indices (score -inf) at the end.

        Returns:
            ``(scores [Q, k] float32, indices [Q, k] int64)``, best first.
        """
        queries = _as_matrix(queries, "query descriptors", self.dim)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if len(queries) == 0:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        scores, indices = self._index.search(queries, k)
        scores = np.where(indices >= 0, scores, -np.inf).astype(np.float32)
        return scores, indices.astype(np.int64)


def search_inner_product(database: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """One-shot exact search: ``ExactIndex(database).search(queries, k)``."""
    return ExactIndex(database).search(queries, k)
