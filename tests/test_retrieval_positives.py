"""Positives by radius (KD-tree) against a brute-force distance check, boundary included."""

import numpy as np
import pytest

from attllm_jax.retrieval.positives import (
    find_positives,
    haversine_m,
    positives_haversine,
    positives_within_radius,
)


def _brute_force(database, queries, radius):
    dist = np.linalg.norm(queries[:, None, :] - database[None, :, :], axis=-1)
    return [np.flatnonzero(row <= radius) for row in dist]


def test_matches_brute_force_on_random_utm_points():
    rng = np.random.default_rng(0)
    database = rng.uniform(0, 500, (2000, 2)) + [550_000.0, 4_180_000.0]
    queries = rng.uniform(0, 500, (100, 2)) + [550_000.0, 4_180_000.0]
    got = positives_within_radius(database, queries, 25.0)
    want = _brute_force(database, queries, 25.0)
    assert sum(len(p) for p in want) > 500  # the check is not vacuous
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)


def test_boundary_is_included_and_just_outside_is_not():
    database = np.array([[3.0, 4.0], [0.0, 5.0], [0.0, 5.000001], [-5.0, 0.0], [25.0, 0.0]])
    queries = np.array([[0.0, 0.0]])
    np.testing.assert_array_equal(positives_within_radius(database, queries, 5.0)[0], [0, 1, 3])


def test_query_without_positive_and_empty_database():
    out = positives_within_radius(np.array([[0.0, 0.0]]), np.array([[100.0, 0.0], [1.0, 0.0]]), 25)
    assert len(out[0]) == 0 and list(out[1]) == [0]
    assert len(positives_within_radius(np.zeros((0, 2)), np.zeros((2, 2)), 25)[1]) == 0


def test_haversine_matches_brute_force():
    rng = np.random.default_rng(1)
    database = np.column_stack([rng.uniform(37.70, 37.72, 1500), rng.uniform(-122.45, -122.42, 1500)])
    queries = np.column_stack([rng.uniform(37.70, 37.72, 60), rng.uniform(-122.45, -122.42, 60)])
    got = positives_haversine(database, queries, 100.0)
    dist = haversine_m(queries[:, None, 0], queries[:, None, 1], database[None, :, 0], database[None, :, 1])
    want = [np.flatnonzero(row <= 100.0) for row in dist]
    assert sum(len(p) for p in want) > 100
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)


def test_haversine_distance_known_value():
    # one degree of latitude on the published code's 6371 km sphere
    assert haversine_m(0.0, 0.0, 1.0, 0.0) == pytest.approx(6_371_000 * np.pi / 180, rel=1e-12)


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="positive distance threshold"):
        positives_within_radius(np.zeros((1, 2)), np.zeros((1, 2)), 0)
    with pytest.raises(ValueError, match=r"queries must have shape \[N, 2\]"):
        positives_within_radius(np.zeros((1, 2)), np.zeros((1, 3)), 5)
    with pytest.raises(ValueError, match="non-finite"):
        positives_within_radius(np.array([[np.nan, 0.0]]), np.zeros((1, 2)), 5)
    with pytest.raises(ValueError, match="unknown distance metric"):
        find_positives(np.zeros((1, 2)), np.zeros((1, 2)), 5, "l1")
