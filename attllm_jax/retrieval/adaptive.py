"""Query-adaptive alpha: per query, the grid alpha whose ranking is most confident, chosen without labels.

``margin``: the alpha with the largest gap between the top-1 and top-2 similarity, ``s_1 - s_2`` (a ranking whose
best match stands out). Ties go to the smallest alpha of the grid (the first in ``--alphas`` order). The choice
reads the search scores only, never the positives, so it can be scored on the labelled queries honestly
(docs/DESIGN.md "Re-ranking and the paper's open questions").
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

ALPHA_POLICIES = ("margin",)


def top_margins(scores: np.ndarray) -> np.ndarray:
    """``s_1 - s_2`` of every ranking.

    Args:
        scores: ``[..., M]`` similarities, best first, ``M >= 2`` (-inf = no prediction).

    Returns:
        ``[...]`` float64 margins: +inf with a single prediction, -inf with none.
    """
    scores = np.asarray(scores, np.float64)
    if scores.shape[-1] < 2:
        raise ValueError(f"the margin policy needs at least 2 predictions per query, got {scores.shape[-1]}")
    first, second = scores[..., 0], scores[..., 1]
    with np.errstate(invalid="ignore"):
        margin = first - second
    return np.where(np.isneginf(first), -np.inf, margin)


def choose_alphas(scores: np.ndarray, policy: str = "margin") -> np.ndarray:
    """Per query, the index into the alpha grid that the policy picks.

    Args:
        scores: ``[K, Q, M]`` top-M similarities of every alpha's search (the labels are not an input).
        policy: One of :data:`ALPHA_POLICIES`.

    Returns:
        ``[Q]`` int64 indices in ``[0, K)``.
    """
    if policy not in ALPHA_POLICIES:
        raise ValueError(f"--alpha_policy must be one of {ALPHA_POLICIES}, got {policy!r}")
    return choose_from_margins(top_margins(scores))


def choose_from_margins(margins: np.ndarray) -> np.ndarray:
    """``[Q]`` int64 index of the largest margin of ``margins`` ``[K, Q]`` (the first, smallest alpha, of ties)."""
    return np.argmax(np.asarray(margins), axis=0).astype(np.int64)


def adaptive_first_hit(first_hit: np.ndarray, choice: np.ndarray) -> np.ndarray:
    """``[Q]`` first-hit ranks at each query's chosen alpha, from ``first_hit`` ``[K, Q]`` and ``choice`` ``[Q]``."""
    first_hit = np.asarray(first_hit)
    return first_hit[np.asarray(choice, np.int64), np.arange(first_hit.shape[1])]


def choice_counts(alphas: Sequence[float], choice: np.ndarray) -> dict[str, int]:
    """``{"<alpha>": queries that picked it}`` for every alpha of the grid (``str(float(alpha))`` keys)."""
    counts = np.bincount(np.asarray(choice, np.int64), minlength=len(alphas))
    return {str(float(a)): int(c) for a, c in zip(alphas, counts, strict=True)}
