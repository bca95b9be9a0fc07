"""Spatially blocked folds, group-bootstrap coverage in a seeded simulation, and the exact McNemar test."""

import numpy as np
import pytest
from scipy import stats

from attllm_jax.tuning import blocked_folds, bootstrap_mean_ci, location_groups, mcnemar_exact


def _clustered_coordinates(num_places=12, per_place=(1, 6), spread=8.0, seed=0):
    """Places 500 m apart; each holds a few queries within ``spread`` metres of its centre."""
    rng = np.random.default_rng(seed)
    coords, place = [], []
    for p in range(num_places):
        centre = np.array([500_000.0 + 500.0 * p, 4_000_000.0 + 300.0 * (p % 3)])
        for _ in range(rng.integers(*per_place, endpoint=True)):
            coords.append(centre + rng.uniform(-spread, spread, 2))
            place.append(p)
    return np.array(coords), np.array(place)


def test_groups_are_the_places_and_folds_never_split_one():
    coords, place = _clustered_coordinates()
    groups = location_groups(coords, radius=30.0)
    # same group <=> same place (places are 500 m apart, queries of a place within 2 * 8 * sqrt(2) m)
    np.testing.assert_array_equal(groups[:, None] == groups[None, :], place[:, None] == place[None, :])
    for seed in range(5):
        folds = blocked_folds(groups, 4, seed=seed)
        for g in np.unique(groups):
            assert len(np.unique(folds[groups == g])) == 1
        counts = np.bincount(folds, minlength=4)
        assert counts.min() > 0 and counts.max() - counts.min() <= 6  # balanced to within the largest group


def test_chains_and_shared_positives_link_queries():
    coords = np.array([[0.0, 0.0], [40.0, 0.0], [80.0, 0.0], [1000.0, 0.0], [2000.0, 0.0]])
    groups = location_groups(coords, radius=50.0)
    assert groups.tolist() == [0, 0, 0, 1, 2]  # a chain within the radius is one place (union-find)
    positives = [np.array([1]), np.array([2]), np.array([3]), np.array([7, 9]), np.array([9])]
    groups = location_groups(coords, radius=50.0, positives=positives)
    assert groups.tolist() == [0, 0, 0, 1, 1]  # queries 3 and 4 share database image 9


def test_haversine_groups():
    lat = 40.0
    metres_per_degree = 2 * np.pi * 6_371_000.0 / 360
    coords = np.array([[lat, -74.0], [lat + 20.0 / metres_per_degree, -74.0], [lat + 0.01, -74.0]])
    assert location_groups(coords, radius=25.0, metric="haversine").tolist() == [0, 0, 1]


def test_too_few_groups_for_the_folds_is_an_error_naming_the_flag():
    with pytest.raises(ValueError, match="--folds 5 needs at least 5 location groups"):
        blocked_folds(np.array([0, 0, 1, 1, 2]), 5)


def test_bootstrap_interval_covers_at_the_nominal_rate_iid():
    rng = np.random.default_rng(0)
    p, n, trials = 0.3, 150, 300
    covered = 0
    for t in range(trials):
        hits = (rng.random(n) < p).astype(float)
        _, lo, hi = bootstrap_mean_ci(hits, None, num_samples=400, seed=t)
        covered += lo <= p <= hi
    rate = covered / trials
    assert 0.91 <= rate <= 0.98, rate  # nominal 0.95; binomial sd over 300 trials is 0.013


def test_group_bootstrap_covers_clustered_hits_where_the_iid_one_does_not():
    rng = np.random.default_rng(1)
    places, size, trials = 40, 5, 300
    groups = np.repeat(np.arange(places), size)
    covered_group = covered_iid = 0
    for t in range(trials):
        place_p = rng.beta(1.0, 1.0, places)  # every place its own success rate, mean 0.5
        hits = (rng.random(places * size) < np.repeat(place_p, size)).astype(float)
        _, lo, hi = bootstrap_mean_ci(hits, groups, num_samples=400, seed=t)
        covered_group += lo <= 0.5 <= hi
        _, lo, hi = bootstrap_mean_ci(hits, None, num_samples=400, seed=t)
        covered_iid += lo <= 0.5 <= hi
    assert 0.90 <= covered_group / trials <= 0.985, covered_group / trials
    assert covered_iid / trials < 0.85  # ignoring the clustering is over-confident


def test_bootstrap_mean_and_shapes():
    values = np.array([[100.0, 0.0], [0.0, 0.0], [100.0, 100.0]])
    mean, lo, hi = bootstrap_mean_ci(values, np.array([0, 0, 1]), num_samples=200)
    np.testing.assert_array_equal(mean, values.mean(axis=0))
    assert mean.shape == lo.shape == hi.shape == (2,)
    assert np.all(lo <= mean) and np.all(mean <= hi)


@pytest.mark.parametrize("b,c", [(0, 0), (3, 0), (16, 2), (7, 7), (40, 25), (600, 560)])
def test_mcnemar_equals_scipy_exact_binomial(b, c):
    a = np.array([True] * b + [False] * c + [True] * 5 + [False] * 4)
    other = np.array([False] * b + [True] * c + [True] * 5 + [False] * 4)
    result = mcnemar_exact(a, other)
    assert (result["a_only"], result["b_only"]) == (b, c)
    expected = 1.0 if b + c == 0 else stats.binomtest(min(b, c), b + c, 0.5).pvalue
    assert result["p"] == pytest.approx(expected, rel=1e-9)
