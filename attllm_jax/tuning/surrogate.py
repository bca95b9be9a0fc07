"""Gradient-based search with optax on a smooth surrogate of recall@N.

For a query with scores ``s_j = <d(alpha, sigma), db_j>`` and positives ``P``, first standardized over the
database (``z_j = (s_j - mean_j s) / std_j s``, the statistics held constant in the gradient, so one temperature
fits models whose cosine scores spread over 1e-3 or over 1), with ``s`` below standing for ``z``:

- smooth first-positive score ``s_P = T * logsumexp_{j in P}(s_j / T)`` (a soft maximum, ``>= max_P s_j``);
- soft rank ``r = sum_{j not in P} sigmoid((s_j - s_P) / T)``: the number of negatives scored above the first
  positive, counted smoothly (the exact rank is this count with a step instead of the sigmoid);
- soft hit ``h_N = sigmoid((N - 1/2 - r) / tau)``: the exact hit@N is ``r <= N - 1``.

The objective (R@1, R@5 or the mean over every N) of the soft hits, averaged over the training queries that
have attention (the others do not depend on alpha or sigma), is maximized with Adam over unconstrained
``(u, v)``: ``alpha = sigmoid(u)`` stays in (0, 1) and ``sigma = softplus(v) + 1e-3`` stays positive. The
native blend's jump at alpha = 0 (plain pooling) is not reachable by gradients; the grid search covers it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
import optax

from attllm_jax.tuning.evaluate import SurrogateProblem

SIGMA_MIN = 1e-3
_FILL = -1e4  # stands for "not a positive" in the soft maximum (standardized scores are far above it)


def soft_hits(
    scores: jax.Array, positives: jax.Array, recall_values: Sequence[int], temperature: float, rank_temperature: float
) -> jax.Array:
    """Smooth hit@N of each query.

    Args:
        scores: ``[b, N]`` inner products with the database (standardized per query here).
        positives: ``[b, P]`` int positive rows, -1 padded.
        recall_values: The N.
        temperature: ``T`` of the soft maximum and the soft rank (standardized-score units).
        rank_temperature: ``tau`` of the soft hit (rank units).

    Returns:
        ``[b, len(recall_values)]`` in (0, 1).
    """
    b, n = scores.shape
    mean = jax.lax.stop_gradient(jnp.mean(scores, axis=1, keepdims=True))
    std = jax.lax.stop_gradient(jnp.std(scores, axis=1, keepdims=True))
    scores = (scores - mean) / jnp.maximum(std, 1e-12)
    is_pos = positives >= 0
    pos_scores = jnp.where(is_pos, jnp.take_along_axis(scores, jnp.clip(positives, 0), axis=1), _FILL)
    s_pos = temperature * jax.nn.logsumexp(pos_scores / temperature, axis=1)
    rows = jnp.arange(b)[:, None]
    negatives = scores.at[rows, jnp.where(is_pos, positives, n)].set(-jnp.inf, mode="drop")
    rank = jnp.sum(jax.nn.sigmoid((negatives - s_pos[:, None]) / temperature), axis=1)
    cut = jnp.asarray(recall_values, scores.dtype) - 0.5
    return jax.nn.sigmoid((cut[None, :] - rank[:, None]) / rank_temperature)


def combine(hits: jax.Array, recall_values: Sequence[int], objective: str) -> jax.Array:
    """The objective of ``[b, len(N)]`` (soft) hits per query: hit@1, hit@5 or their mean over every N."""
    if objective == "mean":
        return hits.mean(axis=-1)
    return hits[:, list(recall_values).index({"r@1": 1, "r@5": 5}[objective])]


@dataclass
class OptaxResult:
    """Where the optimizer ended.

    Attributes:
        alpha: Final alpha.
        sigma: Final sigma.
        blend: The blend optimized.
        surrogate: Surrogate objective (percent) at the start and after every step.
    """

    alpha: float
    sigma: float
    blend: str
    surrogate: list[float] = field(default_factory=list)


def optimize(
    problem: SurrogateProblem,
    blend: str,
    train: np.ndarray,
    recall_values: Sequence[int],
    objective: str,
    *,
    alpha0: float = 0.5,
    sigma0: float = 0.2,
    steps: int = 100,
    learning_rate: float = 0.05,
    temperature: float = 0.1,
    rank_temperature: float = 1.0,
) -> OptaxResult:
    """Maximizes the surrogate over (alpha, sigma) with Adam on the training queries.

    Args:
        problem: The differentiable queries of one blend.
        blend: Its name (recorded).
        train: ``[Q]`` bool, the queries the objective averages over.
        recall_values: The N.
        objective: "r@1", "r@5" or "mean".
        alpha0: Start alpha in (0, 1).
        sigma0: Start sigma (> 1e-3).
        steps: Adam steps.
        learning_rate: Adam step size on (u, v).
        temperature: Soft-rank temperature (standardized-score units).
        rank_temperature: Soft-hit temperature (rank units).

    Returns:
        The final point and the surrogate trace.
    """
    if not (0.0 < alpha0 < 1.0) or sigma0 <= SIGMA_MIN:
        raise ValueError(f"optax start needs alpha in (0, 1) and sigma > {SIGMA_MIN}, got {alpha0}, {sigma0}")
    train = np.asarray(train, bool)
    inputs = [batch for batch, _ in problem.batches]
    weights = [jnp.asarray((idx >= 0) & train[np.clip(idx, 0, None)], jnp.float32) for _, idx in problem.batches]
    positives = [jnp.asarray(problem.positives[np.clip(idx, 0, None)]) for _, idx in problem.batches]
    key = (tuple(recall_values), objective, float(temperature), float(rank_temperature))
    if key not in problem.compiled:  # one compile per problem and surrogate, reused by every fold
        problem.compiled[key] = jax.jit(jax.value_and_grad(_negative_surrogate(problem, *key)))
    grad_fn = problem.compiled[key]
    params = {
        "u": jnp.asarray(np.log(alpha0 / (1.0 - alpha0)), jnp.float32),
        "v": jnp.asarray(np.log(np.expm1(sigma0 - SIGMA_MIN)), jnp.float32),
    }
    optimizer = optax.adam(learning_rate)
    state = optimizer.init(params)
    trace = []
    for _ in range(int(steps)):
        loss, grads = grad_fn(params, inputs, weights, positives, problem.database)
        trace.append(-float(loss))
        updates, state = optimizer.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    final, _ = grad_fn(params, inputs, weights, positives, problem.database)
    trace.append(-float(final))
    alpha = float(jax.nn.sigmoid(params["u"]))
    sigma = float(jax.nn.softplus(params["v"]) + SIGMA_MIN)
    return OptaxResult(min(max(alpha, 0.0), 1.0), sigma, blend, trace)


def _negative_surrogate(problem: SurrogateProblem, recall_values, objective, temperature, rank_temperature):
    """``-(surrogate objective in percent)`` as a function of ``(params, inputs, weights, positives, database)``."""

    def negative(params, inputs, weights, positives, database):
        alpha = jax.nn.sigmoid(params["u"])
        sigma = jax.nn.softplus(params["v"]) + SIGMA_MIN
        total, count = 0.0, 0.0
        for x, w, pos in zip(inputs, weights, positives, strict=True):
            d = problem.describe(x, alpha, sigma)
            scores = jnp.matmul(d, database.T, precision=jax.lax.Precision.HIGHEST)
            hits = combine(
                soft_hits(scores, pos, recall_values, temperature, rank_temperature), recall_values, objective
            )
            total = total + jnp.sum(jnp.where(w > 0, w * hits, 0.0))
            count = count + jnp.sum(w)
        return -100.0 * total / jnp.maximum(count, 1.0)

    return negative
