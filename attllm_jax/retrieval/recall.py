"""Recall@N exactly as VPR-methods-evaluation computes it.

For each query the predictions are the exact top-max(N) database indices. A query counts for every N at or above
the rank of its first positive; the counts are divided by ALL queries (a query without any positive is a miss)
and multiplied by 100.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def validate_recall_values(values: Sequence[int]) -> list[int]:
    """Checks recall cut-offs: positive, distinct integers; returns them sorted ascending.

    Raises:
        ValueError: naming the bad values.
    """
    values = list(values)
    if not values:
        raise ValueError("recall values must not be empty")
    bad = [v for v in values if isinstance(v, bool) or int(v) != v or int(v) < 1]
    if bad:
        raise ValueError(f"recall values must be positive integers, got {bad}")
    ints = [int(v) for v in values]
    if len(set(ints)) != len(ints):
        raise ValueError(f"recall values must be distinct, got {ints}")
    return sorted(ints)


def first_hit_ranks(predictions: np.ndarray, positives: Sequence[np.ndarray]) -> np.ndarray:
    """0-based rank of the first correct prediction of each query.

    Args:
        predictions: ``[Q, K]`` database indices, best first (-1 = no prediction).
        positives: Q arrays of positive database indices.

    Returns:
        ``[Q]`` int64 rank in ``[0, K)``, or -1 when no prediction in the top K is a positive.
    """
    predictions = np.asarray(predictions)
    if predictions.ndim != 2 or len(predictions) != len(positives):
        raise ValueError(f"predictions {predictions.shape} must be [Q, K] with Q = {len(positives)} queries")
    ranks = np.full(len(predictions), -1, dtype=np.int64)
    for q, (preds, pos) in enumerate(zip(predictions, positives, strict=True)):
        hits = np.flatnonzero(np.isin(preds, pos) & (preds >= 0))
        if len(hits):
            ranks[q] = hits[0]
    return ranks


def recall_at_n(predictions: np.ndarray, positives: Sequence[np.ndarray], recall_values: Sequence[int]) -> np.ndarray:
    """Recall@N in percent for each N.

    Args:
        predictions: ``[Q, K]`` database indices, best first, K >= max(recall_values) or the database size.
        positives: Q arrays of positive database indices.
        recall_values: The cut-offs N.

    Returns:
        ``[len(recall_values)]`` float64 percentages, in the order of ``recall_values``.
    """
    ranks = first_hit_ranks(predictions, positives)
    return recall_from_ranks(ranks, recall_values)


def recall_from_ranks(ranks: np.ndarray, recall_values: Sequence[int]) -> np.ndarray:
    """Recall@N in percent from first-hit ranks (-1 = miss); divided by all queries."""
    ranks = np.asarray(ranks)
    if len(ranks) == 0:
        return np.zeros(len(recall_values))
    hit = ranks >= 0
    # 100 * count / total (not count / total * 100): the correctly rounded percentage, so 11 of 20 is 55.0.
    return np.array([100.0 * np.count_nonzero(hit & (ranks < n)) / len(ranks) for n in recall_values])


def alpha_key(alpha: float) -> str:
    """The results.json key of an alpha: ``str(float(alpha))`` ("0.0", "0.5")."""
    return str(float(alpha))
