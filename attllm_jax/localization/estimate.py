"""Where a photo was taken, from its top-K database matches: the estimate, its uncertainty and ranking features.

All positions are planar UTM metres ``(east, north)`` in one zone; scores are the search's inner products of
L2-normalized descriptors (higher = more similar). See docs/DESIGN.md section 10 for the formulas.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ESTIMATORS = ("top1", "cluster")


@dataclass(frozen=True)
class Estimate:
    """One photo's estimate.

    Attributes:
        east: Estimated easting in metres.
        north: Estimated northing in metres.
        radius_m: Uncertainty radius: the score-weighted RMS distance of the top-K candidates from the estimate.
        members: Indices (into the top-K) of the candidates the estimate was computed from.
    """

    east: float
    north: float
    radius_m: float
    members: tuple[int, ...]


def _weights(scores: np.ndarray) -> np.ndarray:
    """Non-negative candidate weights ``w_j = max(s_j - s_min, 0) + 1e-6`` over the top-K (the floor keeps ties)."""
    return np.maximum(scores - scores.min(), 0.0) + 1e-6


def largest_cluster(positions: np.ndarray, scores: np.ndarray, radius_m: float) -> np.ndarray:
    """The candidates within ``radius_m`` of the candidate that has the most such neighbours.

    Ties between centres go to the larger summed weight, then to the better rank.

    Args:
        positions: ``[K, 2]`` metres.
        scores: ``[K]``.
        radius_m: The cluster radius in metres (boundary included).

    Returns:
        Sorted indices of the cluster's members.
    """
    dist = np.hypot(*(positions[:, None, :] - positions[None, :, :]).transpose(2, 0, 1))  # [K, K]
    inside = dist <= radius_m
    w = _weights(scores)
    counts, mass = inside.sum(1), inside @ w
    best = max(range(len(positions)), key=lambda i: (counts[i], mass[i], -i))
    return np.flatnonzero(inside[best])


def estimate_position(
    positions: np.ndarray, scores: np.ndarray, estimator: str = "top1", cluster_radius_m: float = 25.0
) -> Estimate:
    """The estimate of one photo from its top-K matches (rank order, best first).

    ``top1``: the best match's position. ``cluster``: the score-weighted centre
    ``sum_j w_j p_j / sum_j w_j`` of :func:`largest_cluster`, ``w_j`` as in :func:`_weights`.

    Args:
        positions: ``[K, 2]`` metres of the top-K matches, K >= 1.
        scores: ``[K]`` their scores.
        estimator: "top1" or "cluster".
        cluster_radius_m: The cluster radius of ``cluster``.

    Returns:
        The estimate, with its uncertainty radius.
    """
    positions, scores = np.asarray(positions, np.float64), np.asarray(scores, np.float64)
    if estimator == "top1":
        members = np.array([0])
        centre = positions[0]
    elif estimator == "cluster":
        members = largest_cluster(positions, scores, cluster_radius_m)
        w = _weights(scores)[members]
        centre = (w[:, None] * positions[members]).sum(0) / w.sum()
    else:
        raise ValueError(f"unknown estimator {estimator!r}; valid: {', '.join(ESTIMATORS)}")
    w = _weights(scores)
    spread = np.sqrt((w * ((positions - centre) ** 2).sum(1)).sum() / w.sum())
    return Estimate(float(centre[0]), float(centre[1]), float(spread), tuple(int(i) for i in members))


def ranking_features(positions: np.ndarray, scores: np.ndarray, estimate: Estimate, radius_m: float) -> dict:
    """The calibration features of one photo.

    Returns:
        ``{"top1_score", "margin" (top-1 minus top-2; 0 with one match), "share_within" (fraction of the top-K
        within ``radius_m`` of the estimate)}``.
    """
    scores = np.asarray(scores, np.float64)
    dist = np.hypot(positions[:, 0] - estimate.east, positions[:, 1] - estimate.north)
    return {
        "top1_score": float(scores[0]),
        "margin": float(scores[0] - scores[1]) if len(scores) > 1 else 0.0,
        "share_within": float(np.mean(dist <= radius_m)),
    }
