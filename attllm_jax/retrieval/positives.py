"""Ground-truth positives: database images within a radius of each query, found with a KD-tree.

The KD-tree (scipy's cKDTree) proposes candidates with a radius enlarged by a hair; the exact distance then
decides with the boundary included, so the result equals a brute-force ``distance <= radius`` check. Haversine
distances use a 3-D KD-tree on the unit sphere (chord length is monotonic in great-circle distance), which scales
to millions of database points like the planar case.
"""

from __future__ import annotations

import numpy as np

EARTH_RADIUS_M = 6_371_000.0  # the published code's haversine radius
_SLACK = 1e-9  # relative radius enlargement for the candidate query; the exact check below decides


def _validate(points: np.ndarray, name: str) -> np.ndarray:
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"{name} must have shape [N, 2], got {points.shape}")
    if not np.all(np.isfinite(points)):
        raise ValueError(f"{name} contains non-finite coordinates")
    return points


def _check_radius(radius: float) -> float:
    radius = float(radius)
    if not np.isfinite(radius) or radius <= 0:
        raise ValueError(f"the positive distance threshold must be a positive number of metres, got {radius}")
    return radius


def positives_within_radius(database: np.ndarray, queries: np.ndarray, radius: float) -> list[np.ndarray]:
    """Database indices within ``radius`` (Euclidean, boundary included) of each query.

    Args:
        database: ``[N, 2]`` planar coordinates in metres (UTM east, north).
        queries: ``[Q, 2]`` same frame.
        radius: Metres.

    Returns:
        Q sorted int64 arrays of database indices (empty when a query has no positive).
    """
    database, queries = _validate(database, "database"), _validate(queries, "queries")
    radius = _check_radius(radius)
    if len(database) == 0:
        return [np.empty(0, dtype=np.int64) for _ in range(len(queries))]
    from scipy.spatial import cKDTree  # scipy.spatial costs 0.25 s to import: only commands that find positives

    tree = cKDTree(database)
    candidates = tree.query_ball_point(queries, r=radius * (1 + _SLACK) + _SLACK)
    out = []
    for q, found in enumerate(candidates):
        found = np.asarray(sorted(found), dtype=np.int64)
        dist = np.hypot(*(database[found] - queries[q]).T) if len(found) else np.empty(0)
        out.append(found[dist <= radius])
    return out


def haversine_m(lat1: np.ndarray, lon1: np.ndarray, lat2: np.ndarray, lon2: np.ndarray) -> np.ndarray:
    """Great-circle distance in metres between points given in degrees (broadcasts)."""
    lat1, lon1, lat2, lon2 = (np.radians(np.asarray(v, dtype=np.float64)) for v in (lat1, lon1, lat2, lon2))
    a = np.sin((lat2 - lat1) / 2) ** 2 + np.cos(lat1) * np.cos(lat2) * np.sin((lon2 - lon1) / 2) ** 2
    return 2 * EARTH_RADIUS_M * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0)))


def _unit_sphere(latlon: np.ndarray) -> np.ndarray:
    lat, lon = np.radians(latlon[:, 0]), np.radians(latlon[:, 1])
    return np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], axis=1)


def positives_haversine(database: np.ndarray, queries: np.ndarray, radius: float) -> list[np.ndarray]:
    """Database indices within ``radius`` metres (great-circle, boundary included) of each query.

    Args:
        database: ``[N, 2]`` (lat, lon) in degrees.
        queries: ``[Q, 2]`` (lat, lon) in degrees.
        radius: Metres.

    Returns:
        Q sorted int64 arrays of database indices.
    """
    database, queries = _validate(database, "database"), _validate(queries, "queries")
    radius = _check_radius(radius)
    if len(database) == 0:
        return [np.empty(0, dtype=np.int64) for _ in range(len(queries))]
    angle = min(radius / EARTH_RADIUS_M, np.pi)
    chord = 2 * np.sin(angle / 2)
    from scipy.spatial import cKDTree

    tree = cKDTree(_unit_sphere(database))
    candidates = tree.query_ball_point(_unit_sphere(queries), r=chord * (1 + 1e-6) + 1e-12)
    out = []
    for q, found in enumerate(candidates):
        found = np.asarray(sorted(found), dtype=np.int64)
        dist = haversine_m(database[found, 0], database[found, 1], queries[q, 0], queries[q, 1])
        out.append(found[dist <= radius])
    return out


def find_positives(database: np.ndarray, queries: np.ndarray, radius: float, metric: str = "utm") -> list[np.ndarray]:
    """Dispatches on ``metric``: "utm" (Euclidean metres) or "haversine" (coordinates are lat/lon degrees)."""
    if metric == "utm":
        return positives_within_radius(database, queries, radius)
    if metric == "haversine":
        return positives_haversine(database, queries, radius)
    raise ValueError(f"unknown distance metric {metric!r}; expected 'utm' or 'haversine'")
