"""Nearest-neighbour search with faiss on the CPU: exact Flat, and approximate IVF-Flat, IVF-PQ and HNSW.

Descriptors are L2-normalized, so the inner product ranks exactly as the L2 distance VPR-methods-evaluation
uses (``|q - d|^2 = 2 - 2 q.d``); ``IndexFlatIP`` is exact. The approximate indexes trade recall for speed and
memory; :func:`recall_vs_exact` measures what they lose on the run's own queries.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import faiss
import numpy as np

FAISS_METHODS = ("faiss_flat", "faiss_ivf", "faiss_hnsw")


def _as_matrix(x: np.ndarray, name: str, dim: int | None = None) -> np.ndarray:
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape [N, D], got {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name} has dimension {x.shape[1]}, the database has {dim}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contains non-finite values")
    return x


@dataclass(frozen=True)
class FaissParams:
    """Parameters of the approximate faiss indexes.

    Attributes:
        nlist: IVF cells (0 = ``4 sqrt(N)``, at most ``N / 39`` so every cell gets training points).
        nprobe: IVF cells visited per query.
        pq_m: IVF-PQ sub-quantizers (0 = IVF-Flat); must divide the descriptor dimension.
        hnsw_m: HNSW neighbours per node.
        ef_search: HNSW search breadth.
        seed: Seed of the IVF training sample.
    """

    nlist: int = 0
    nprobe: int = 16
    pq_m: int = 0
    hnsw_m: int = 32
    ef_search: int = 128
    seed: int = 0

    def validated(self) -> FaissParams:
        for name in ("nlist", "pq_m"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}")
        for name in ("nprobe", "hnsw_m", "ef_search"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        return self


class ExactIndex:
    """Exact inner-product index (faiss ``IndexFlatIP``) over unit-norm database descriptors.

    Args:
        database: ``[N, D]`` float32 descriptors.
    """

    exact = True

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


class ApproximateIndex(ExactIndex):
    """An approximate faiss index (IVF-Flat, IVF-PQ or HNSW) with the same ``search`` contract.

    Args:
        method: "faiss_ivf" (IVF-Flat, or IVF-PQ with ``params.pq_m``) or "faiss_hnsw".
        database: ``[N, D]`` float32.
        params: The index parameters.
    """

    exact = False

    def __init__(self, method: str, database: np.ndarray, params: FaissParams = FaissParams()):  # noqa: B008
        database = _as_matrix(database, "database descriptors")
        params = params.validated()
        self.size, self.dim = database.shape
        self.method = method
        if method == "faiss_hnsw":
            self._index = faiss.IndexHNSWFlat(self.dim, int(params.hnsw_m), faiss.METRIC_INNER_PRODUCT)
            self._index.hnsw.efSearch = int(params.ef_search)
            self._index.add(database)
            self.params = {"hnsw_m": int(params.hnsw_m), "ef_search": int(params.ef_search)}
            return
        if method != "faiss_ivf":
            raise ValueError(f"unknown approximate faiss index {method!r}; expected faiss_ivf or faiss_hnsw")
        nlist = ivf_nlist(self.size, params.nlist)
        quantizer = faiss.IndexFlatIP(self.dim)
        if params.pq_m:
            if self.dim % params.pq_m:
                raise ValueError(f"--pq_m {params.pq_m} must divide the descriptor dimension {self.dim}")
            nbits = int(min(8, max(1, math.floor(math.log2(max(2, self.size // 4))))))
            self._index = faiss.IndexIVFPQ(
                quantizer, self.dim, nlist, int(params.pq_m), nbits, faiss.METRIC_INNER_PRODUCT
            )
            self.params = {"nlist": nlist, "nprobe": int(params.nprobe), "pq_m": int(params.pq_m), "pq_nbits": nbits}
        else:
            self._index = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
            self.params = {"nlist": nlist, "nprobe": int(params.nprobe)}
        self._quantizer = quantizer  # faiss does not own it: keep it alive
        rng = np.random.default_rng(params.seed)
        sample = database if self.size <= 256 * nlist else database[np.sort(rng.choice(self.size, 256 * nlist, False))]
        self._index.train(sample)
        self._index.add(database)
        self._index.nprobe = min(int(params.nprobe), nlist)


def ivf_nlist(num_items: int, requested: int = 0) -> int:
    """IVF cell count: ``requested`` or ``4 sqrt(N)``, capped at ``N / 39`` (faiss wants 39 points per cell)."""
    nlist = int(requested) if requested else int(round(4 * math.sqrt(num_items)))
    return int(max(1, min(nlist, num_items // 39)))


def build_faiss_index(method: str, database: np.ndarray, params: FaissParams = FaissParams()) -> ExactIndex:  # noqa: B008
    """The faiss index for ``method`` ("faiss_flat", "faiss_ivf", "faiss_hnsw") over ``database`` ``[N, D]``."""
    if method == "faiss_flat":
        return ExactIndex(database)
    return ApproximateIndex(method, database, params)


def faiss_index_bytes(method: str, num_items: int, dim: int, params: FaissParams = FaissParams()) -> int:  # noqa: B008
    """Estimated bytes of a faiss index (vectors or codes, ids, graph links)."""
    if method == "faiss_flat":
        return 4 * num_items * dim
    if method == "faiss_hnsw":
        return num_items * (4 * dim + 8 * int(params.hnsw_m) + 16)
    nlist = ivf_nlist(num_items, params.nlist)
    per_item = int(params.pq_m) if params.pq_m else 4 * dim
    return num_items * (per_item + 8) + 4 * nlist * dim


def recall_vs_exact(approximate: np.ndarray, exact: np.ndarray, values: Sequence[int]) -> dict[str, float]:
    """Mean fraction (percent) of the exact top-N found in the approximate top-N, for each N.

    Args:
        approximate: ``[Q, M]`` indices of the approximate search (-1 = none).
        exact: ``[Q, M]`` indices of the exact search.
        values: The N (each at most M).

    Returns:
        ``{"<N>": percent}``; positions where the exact search has no neighbour (-1) are not counted.
    """
    out = {}
    for n in values:
        found, total = 0, 0
        for a, e in zip(approximate[:, :n], exact[:, :n], strict=True):
            e = e[e >= 0]
            total += len(e)
            found += len(np.intersect1d(a[a >= 0], e))
        out[str(int(n))] = 100.0 * found / total if total else 100.0
    return out


def search_inner_product(database: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """One-shot exact search: ``ExactIndex(database).search(queries, k)``."""
    return ExactIndex(database).search(queries, k)


__all__ = [
    "FAISS_METHODS",
    "ApproximateIndex",
    "ExactIndex",
    "FaissParams",
    "build_faiss_index",
    "faiss_index_bytes",
    "ivf_nlist",
    "recall_vs_exact",
    "search_inner_product",
]
