"""Gradient-free and optax searches on a synthetic retrieval problem whose optimum is known by construction."""

import jax.numpy as jnp
import numpy as np
import pytest

from attllm_jax.retrieval.recall import first_hit_ranks, recall_from_ranks
from attllm_jax.tuning import search
from attllm_jax.tuning.evaluate import SurrogateProblem
from attllm_jax.tuning.surrogate import optimize, soft_hits

ALPHA_STAR, SIGMA_STAR = 0.37, 0.25
RECALL_VALUES = (1, 5)


class ToyProblem:
    """Query q's descriptor is its positive database row plus noise growing with the distance to the optimum.

    ``d_q = l2n(t_q + c * (|alpha - alpha*| + |log(sigma / sigma*)|) * e_q)``: at (alpha*, sigma*) every query
    retrieves its own positive first (R@1 = 100), and recall falls off on both sides as distractors win.
    """

    def __init__(self, num_queries=40, num_distractors=60, dim=24, scale=20.0, seed=0):
        rng = np.random.default_rng(seed)
        db = rng.normal(size=(num_queries + num_distractors, dim))
        self.database = db / np.linalg.norm(db, axis=1, keepdims=True)
        noise = rng.normal(size=(num_queries, dim))
        self.noise = noise / np.linalg.norm(noise, axis=1, keepdims=True)
        self.scale = scale * rng.uniform(0.5, 1.5, size=(num_queries, 1))
        self.positives = [np.array([q]) for q in range(num_queries)]
        self.num_queries = num_queries
        self.recall_values = RECALL_VALUES
        self.calls = 0

    def queries(self, alpha, sigma, xp=np):
        distance = xp.abs(alpha - ALPHA_STAR) + xp.abs(xp.log(sigma / SIGMA_STAR))
        d = self.database[: self.num_queries] + self.scale * distance * self.noise
        return d / xp.linalg.norm(d, axis=1, keepdims=True)

    def first_hits(self, alphas, sigma, blend):
        self.calls += 1
        out = []
        for a in np.atleast_1d(alphas):
            scores = self.queries(float(a), float(sigma)) @ self.database.T
            out.append(first_hit_ranks(np.argsort(-scores, axis=1)[:, :5], self.positives))
        return np.stack(out)

    def surrogate(self):
        positives = np.arange(self.num_queries, dtype=np.int32)[:, None]
        return SurrogateProblem(
            [({"q": jnp.arange(self.num_queries)}, np.arange(self.num_queries))],
            lambda inputs, alpha, sigma: self.queries(alpha, sigma, jnp)[inputs["q"]],
            jnp.asarray(self.database, jnp.float32),
            positives,
        )


def brute_force_plateau_middle(problem, alphas, sigma):
    """The reference: R@1 at every grid alpha, its maximal runs, the widest one's middle (no library code)."""
    values = [recall_from_ranks(problem.first_hits([a], sigma, "uniform")[0], [1])[0] for a in alphas]
    best = max(values)
    runs, start = [], None
    for k, v in enumerate([*values, -1.0]):
        if v == best and start is None:
            start = k
        elif v != best and start is not None:
            runs.append((alphas[k - 1] - alphas[start], alphas[start], alphas[k - 1]))
            start = None
    width, lo, hi = max(runs, key=lambda r: (r[0], -r[1]))
    return best, lo, hi


def test_grid_choice_is_the_brute_force_plateau_middle_and_the_known_optimum():
    problem = ToyProblem()
    alphas = [i / 100 for i in range(101)]
    objective = search.Objective(problem, np.arange(problem.num_queries), "r@1")
    ranks = search.grid_ranks(problem, alphas, [SIGMA_STAR], ["uniform"])
    choice = search.choose_on_grid(objective, ranks, alphas, [SIGMA_STAR], ["uniform"])
    best, lo, hi = brute_force_plateau_middle(problem, alphas, SIGMA_STAR)
    assert best == 100.0 and choice.objective == best
    assert choice.plateau == (lo, hi)
    assert lo <= ALPHA_STAR <= hi and hi - lo < 0.1  # the plateau is a real, bounded neighbourhood of alpha*
    if choice.source == "grid":
        assert choice.setting.alpha == (lo + hi) / 2
    else:
        assert choice.source == "grid-middle" and choice.setting.alpha == pytest.approx((lo + hi) / 2, abs=1e-12)
    assert abs(choice.setting.alpha - ALPHA_STAR) <= 0.02


def test_coordinate_search_reaches_the_optimum_the_sigma_grid_misses():
    problem = ToyProblem()
    alphas = [i / 20 for i in range(21)]
    sigmas = [0.1, 0.4]  # sigma* = 0.25 lies between them, far enough that the grid alone cannot reach R@1 = 100
    objective = search.Objective(problem, np.arange(problem.num_queries), "r@1")
    ranks = search.grid_ranks(problem, alphas, sigmas, ["uniform"])
    grid_choice = search.choose_on_grid(objective, ranks, alphas, sigmas, ["uniform"])
    assert grid_choice.objective < 100.0
    refined = search.refine(objective, grid_choice, alphas, sigmas, iterations=14, rounds=3)
    assert refined.objective == 100.0 > grid_choice.objective
    assert refined.source in ("golden", "coordinate")
    assert abs(refined.setting.alpha - ALPHA_STAR) < 0.05
    assert abs(np.log(refined.setting.sigma / SIGMA_STAR)) < 0.1


def test_optax_finds_the_known_optimum():
    problem = ToyProblem()
    result = optimize(
        problem.surrogate(),
        "uniform",
        np.ones(problem.num_queries, bool),
        RECALL_VALUES,
        "r@1",
        alpha0=0.8,
        sigma0=0.12,
        steps=300,
        learning_rate=0.05,
    )
    assert result.surrogate[-1] > result.surrogate[0] + 20.0
    ranks = problem.first_hits([result.alpha], result.sigma, "uniform")[0]
    assert recall_from_ranks(ranks, [1])[0] == 100.0  # the known optimum value, from a start where R@1 is low
    assert recall_from_ranks(problem.first_hits([0.8], 0.12, "uniform")[0], [1])[0] < 50.0
    # the optimum is a narrow plateau around (alpha*, sigma*); the surrogate saturates once inside it
    assert abs(result.alpha - ALPHA_STAR) < 0.03
    assert abs(np.log(result.sigma / SIGMA_STAR)) < 0.05


def test_soft_hits_approach_the_exact_hits_at_low_temperature():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(30, 50)).astype(np.float32)
    positives = rng.integers(0, 50, size=(30, 3)).astype(np.int32)
    positives[::4, 2] = -1
    order = np.argsort(-scores, axis=1)
    ranks = first_hit_ranks(order, [p[p >= 0] for p in positives])
    exact = np.stack([(ranks >= 0) & (ranks < n) for n in (1, 5, 10)], axis=1)
    soft = np.asarray(soft_hits(jnp.asarray(scores), jnp.asarray(positives), (1, 5, 10), 1e-3, 1e-2))
    np.testing.assert_array_equal(soft > 0.5, exact)
    assert np.all((soft < 1e-3) | (soft > 1 - 1e-3))


def test_native_plateaus_never_join_alpha_zero():
    alphas = np.array([0.0, 0.01, 0.02, 0.5])
    values = np.array([60.0, 60.0, 60.0, 10.0])
    assert search.plateaus(alphas, values, "native") == [(0, 0), (1, 2)]
    assert search.plateaus(alphas, values, "uniform") == [(0, 2)]


def test_golden_section_on_a_smooth_function():
    calls = []

    def f(x):
        calls.append(x)
        return -((x - 0.6180) ** 2)

    x, value = search.golden_section_max(f, 0.0, 1.0, 30)
    assert abs(x - 0.6180) < 1e-5 and len(calls) == 30


def test_objectives_and_their_errors():
    recalls = np.array([[10.0, 30.0, 50.0]])
    assert search.objective_value(recalls, (1, 5, 10), "r@1")[0] == 10.0
    assert search.objective_value(recalls, (1, 5, 10), "r@5")[0] == 30.0
    assert search.objective_value(recalls, (1, 5, 10), "mean")[0] == 30.0
    with pytest.raises(ValueError, match="--objective r@5 needs 5"):
        search.check_objective("r@5", (1, 10))
    with pytest.raises(ValueError, match="--objective must be one of"):
        search.check_objective("r@3", (1, 5))


class PathDependentSource:
    """Ranks that depend on how a point is computed, as float32 near-ties do: in a grid sweep (several alphas per
    call) queries 0-1 miss everywhere except 0.81..0.83 where only query 0 misses; a point evaluated on its own
    (one alpha per call) hits every query."""

    recall_values = (1,)
    num_queries = 4

    def first_hits(self, alphas, sigma, blend):
        alphas = np.atleast_1d(np.asarray(alphas, np.float64))
        if len(alphas) == 1:
            return np.zeros((1, self.num_queries), np.int64)
        ranks = np.zeros((len(alphas), self.num_queries), np.int64)
        ranks[:, :2] = -1
        ranks[(alphas > 0.805) & (alphas < 0.835), 1] = 0
        return ranks


def test_the_grid_choice_is_reported_from_the_grid_rows_it_came_from():
    source = PathDependentSource()
    alphas = [0.0 + (1.0 - 0.0) * i / 100 for i in range(101)]  # as --alphas 0:1:101 parses
    assert (alphas[81] + alphas[83]) / 2 != alphas[82]  # the plateau middle is one ulp off the grid point
    ranks = search.grid_ranks(source, alphas, [0.2], ["native"])
    grid = {a: search.recalls_dict(ranks[0, 0, k], source.recall_values) for k, a in enumerate(alphas)}
    objective = search.Objective(source, np.arange(source.num_queries), "r@1")
    choice = search.choose_on_grid(objective, ranks, alphas, [0.2], ["native"])
    assert choice.setting.alpha == alphas[82] and choice.plateau == (0.81, 0.83) and choice.source == "grid"
    assert choice.recalls == grid[choice.setting.alpha] == {"1": 75.0}
    assert choice.objective == 75.0
