"""Honest estimates: spatially blocked folds, group bootstrap intervals and the exact McNemar test.

Queries are grouped by location: two queries within ``radius`` metres of each other, or sharing a positive
database image, are linked, and the groups are the connected components (union-find). Folds are unions of
whole groups, so near-duplicate queries never sit on both sides of a split. Intervals resample whole groups
(a cluster bootstrap), which keeps its nominal coverage when queries of one place succeed or fail together.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from attllm_jax.retrieval.positives import find_positives
from attllm_jax.retrieval.recall import recall_from_ranks


class _UnionFind:
    def __init__(self, n: int):
        self.parent = np.arange(n)

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:
            self.parent[i], i = root, self.parent[i]
        return int(root)

    def union(self, i: int, j: int) -> None:
        a, b = self.find(i), self.find(j)
        if a != b:
            self.parent[max(a, b)] = min(a, b)


def location_groups(
    coordinates: np.ndarray,
    radius: float,
    metric: str = "utm",
    positives: Sequence[np.ndarray] | None = None,
) -> np.ndarray:
    """Connected components of queries linked by distance ``<= radius`` or by a shared positive.

    Args:
        coordinates: ``[Q, 2]`` query positions (UTM metres, or lat/lon degrees with ``metric="haversine"``).
        radius: Linking distance in metres (> 0).
        metric: "utm" or "haversine".
        positives: Optional Q arrays of positive database indices; queries sharing one are linked.

    Returns:
        ``[Q]`` int64 group ids ``0 .. G-1``, numbered in order of first appearance.
    """
    coordinates = np.asarray(coordinates, np.float64)
    n = len(coordinates)
    uf = _UnionFind(n)
    if n:
        for q, near in enumerate(find_positives(coordinates, coordinates, radius, metric)):
            for other in near:
                uf.union(q, int(other))
    if positives is not None:
        if len(positives) != n:
            raise ValueError(f"{len(positives)} positive lists for {n} queries")
        owner: dict[int, int] = {}
        for q, pos in enumerate(positives):
            for d in np.asarray(pos).tolist():
                if d in owner:
                    uf.union(q, owner[d])
                else:
                    owner[d] = q
    roots = [uf.find(q) for q in range(n)]
    numbering: dict[int, int] = {}
    return np.array([numbering.setdefault(r, len(numbering)) for r in roots], np.int64)


def blocked_folds(groups: np.ndarray, folds: int, seed: int = 0) -> np.ndarray:
    """Assigns whole groups to ``folds`` folds of nearly equal query counts.

    Groups are taken in a seeded random order, largest first, each into the fold with the fewest queries so far.

    Returns:
        ``[Q]`` int64 fold of each query.

    Raises:
        ValueError: naming --folds when there are fewer groups than folds, or ``folds < 2``.
    """
    groups = np.asarray(groups, np.int64)
    ids, sizes = np.unique(groups, return_counts=True)
    if folds < 2:
        raise ValueError(f"--folds must be >= 2, got {folds}")
    if len(ids) < folds:
        raise ValueError(
            f"--folds {folds} needs at least {folds} location groups, but the queries form only {len(ids)} "
            "(lower --folds or --group_radius)"
        )
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(ids))
    order = order[np.argsort(-sizes[order], kind="stable")]
    load = np.zeros(folds, np.int64)
    fold_of_group = {}
    for g in order:
        f = int(np.argmin(load))
        fold_of_group[int(ids[g])] = f
        load[f] += sizes[g]
    return np.array([fold_of_group[int(g)] for g in groups], np.int64)


def _group_sums(values: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ids, inverse = np.unique(groups, return_inverse=True)
    sums = np.zeros((len(ids), *values.shape[1:]), np.float64)
    np.add.at(sums, inverse, values)
    return sums, np.bincount(inverse, minlength=len(ids)).astype(np.float64)


def bootstrap_mean_ci(
    values: np.ndarray,
    groups: np.ndarray | None = None,
    num_samples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean of ``values`` over queries with a percentile cluster-bootstrap interval.

    Whole groups are resampled with replacement; each resample's statistic is its total over its total query
    count. With ``groups=None`` every query is its own group (the ordinary bootstrap). A paired difference is
    the same call on ``a - b``.

    Args:
        values: ``[Q]`` or ``[Q, M]`` per-query values (e.g. hits in {0, 1}).
        groups: ``[Q]`` group ids, or None.
        num_samples: Bootstrap resamples.
        seed: RNG seed.
        level: Interval coverage.

    Returns:
        ``(mean, lo, hi)``, each ``[]`` or ``[M]``.
    """
    values = np.asarray(values, np.float64)
    if len(values) == 0:
        raise ValueError("bootstrap needs at least one query")
    groups = np.arange(len(values)) if groups is None else np.asarray(groups)
    sums, counts = _group_sums(values, groups)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(counts), size=(num_samples, len(counts)))
    weights = np.zeros((num_samples, len(counts)))
    np.add.at(weights, (np.arange(num_samples)[:, None], draws), 1.0)
    stats = (weights @ sums.reshape(len(counts), -1)) / (weights @ counts)[:, None]
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(stats, [tail, 1.0 - tail], axis=0)
    mean = values.mean(axis=0)
    shape = values.shape[1:]
    return mean, lo.reshape(shape), hi.reshape(shape)


def mcnemar_exact(hits_a: np.ndarray, hits_b: np.ndarray) -> dict[str, float]:
    """Exact (binomial) two-sided McNemar test of paired per-query hits.

    With ``b`` = queries hit by A only and ``c`` = by B only, ``p = min(1, 2 * P[X <= min(b, c)])`` for
    ``X ~ Binomial(b + c, 1/2)``; ``p = 1`` when ``b + c = 0``.

    Returns:
        ``{"a_only": b, "b_only": c, "p": p}``.
    """
    hits_a, hits_b = np.asarray(hits_a, bool), np.asarray(hits_b, bool)
    if hits_a.shape != hits_b.shape:
        raise ValueError(f"paired hits must have one shape, got {hits_a.shape} and {hits_b.shape}")
    b = int(np.count_nonzero(hits_a & ~hits_b))
    c = int(np.count_nonzero(~hits_a & hits_b))
    n = b + c
    if n == 0:
        return {"a_only": b, "b_only": c, "p": 1.0}
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / (1 << n)  # exact integers, then one division
    return {"a_only": b, "b_only": c, "p": float(min(1.0, 2.0 * tail))}


def hits_at(ranks: np.ndarray, recall_values: Sequence[int]) -> np.ndarray:
    """``[Q, len(N)]`` 0/100 per query: hit at N (first positive ranked below N; rank -1 = miss)."""
    ranks = np.asarray(ranks)
    return 100.0 * np.stack([(ranks >= 0) & (ranks < n) for n in recall_values], axis=1)


def _interval(mean, lo, hi, recall_values) -> dict[str, dict[str, Any]]:
    rows = zip(recall_values, mean, lo, hi, strict=True)
    return {str(int(n)): {"mean": float(m), "ci95": [float(a), float(b)]} for n, m, a, b in rows}


def heldout_summary(
    ranks: np.ndarray,
    against: np.ndarray,
    groups: np.ndarray,
    recall_values: Sequence[int],
    n_primary: int,
    num_samples: int,
    seed: int,
) -> dict[str, Any]:
    """Held-out recall of ``ranks`` with its group-bootstrap interval, and its paired gain over ``against``.

    Args:
        ranks, against: ``[Q]`` first-hit ranks (-1 = miss) of the same queries.
        groups: ``[Q]`` location groups (the bootstrap resamples whole groups).
        recall_values: The N of recall@N; n_primary: the N of the headline McNemar test.
        num_samples, seed: The bootstrap's.

    Returns:
        ``{"heldout", "gain_vs_alpha0", "mcnemar_p", "mcnemar_n", "mcnemar"}``: recall and gain in percent keyed
        ``str(N)`` with ``ci95``, the exact McNemar test per N (``gain_vs_alpha0`` is the gain over ``against``).
    """
    hits, base = hits_at(ranks, recall_values), hits_at(against, recall_values)
    exact = recall_from_ranks(ranks, recall_values)
    _, lo, hi = bootstrap_mean_ci(hits, groups, num_samples, seed)
    gain, glo, ghi = bootstrap_mean_ci(hits - base, groups, num_samples, seed)
    tests = {str(int(n)): mcnemar_exact(hits[:, j] > 0, base[:, j] > 0) for j, n in enumerate(recall_values)}
    return {
        "heldout": _interval(exact, lo, hi, recall_values),
        "gain_vs_alpha0": _interval(gain, glo, ghi, recall_values),
        "mcnemar_p": tests[str(n_primary)]["p"],
        "mcnemar_n": n_primary,
        "mcnemar": tests,
    }


def paired(summary: dict[str, Any], note: str) -> dict[str, Any]:
    """tuning.json's paired comparison (``vs_global``, ``vs_plain``) from a :func:`heldout_summary`."""
    return {
        "gain": summary["gain_vs_alpha0"],
        "mcnemar_p": summary["mcnemar_p"],
        "mcnemar_n": summary["mcnemar_n"],
        "mcnemar": summary["mcnemar"],
        "note": note,
    }
