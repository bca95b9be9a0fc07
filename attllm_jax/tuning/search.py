"""Gradient-free search of (alpha, sigma, blend): a dense grid, its plateaus, then golden-section refinement.

Recall is a step function of alpha (a query's first-hit rank changes only when two scores cross), so the
maximum is usually a plateau: a run of neighbouring grid alphas with the same objective. The grid choice is
the middle of the widest maximal plateau (its extent is reported). Under the native blend alpha = 0 is plain
pooling while any alpha > 1e-6 pools with the model's own saliency weights, so alpha = 0 forms a plateau of
its own and the golden-section brackets never cross it.

Refinement evaluates only the training queries' objective of new points (each costs one aggregation and one
search of all queries, memoized by the rank source): golden-section on alpha inside the bracket formed by the
plateau's grid neighbours, then coordinate search (golden-section on log sigma, then on alpha again). A
refined point replaces the grid choice only if its objective is strictly higher.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from attllm_jax.ops.gem import ALPHA_OFF
from attllm_jax.retrieval.recall import recall_from_ranks

OBJECTIVES = ("r@1", "r@5", "mean")
GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def check_objective(objective: str, recall_values: Sequence[int]) -> None:
    """Raises ValueError naming --objective when the recall values cannot express it."""
    if objective not in OBJECTIVES:
        raise ValueError(f"--objective must be one of {OBJECTIVES}, got {objective!r}")
    need = {"r@1": 1, "r@5": 5}.get(objective)
    if need is not None and need not in recall_values:
        raise ValueError(f"--objective {objective} needs {need} in --recall_values, got {list(recall_values)}")


def objective_value(recalls: np.ndarray, recall_values: Sequence[int], objective: str) -> np.ndarray:
    """The objective of recall percentages ``[..., len(recall_values)]``: R@1, R@5, or their mean over every N."""
    recalls = np.asarray(recalls, np.float64)
    if objective == "mean":
        return recalls.mean(axis=-1)
    return recalls[..., list(recall_values).index({"r@1": 1, "r@5": 5}[objective])]


def primary_n(objective: str, recall_values: Sequence[int]) -> int:
    """The N whose per-query hits the McNemar test compares (R@5 for r@5; otherwise the smallest N)."""
    return 5 if objective == "r@5" else min(recall_values)


@dataclass(frozen=True)
class Setting:
    """One point of the search space."""

    alpha: float
    sigma: float
    blend: str


@dataclass
class Choice:
    """A chosen setting and why.

    Attributes:
        setting: The point.
        objective: Its objective on the queries it was chosen on.
        recalls: ``{"<N>": percent}`` on those queries.
        plateau: ``[alpha_lo, alpha_hi]`` of the grid plateau it came from (a refined point: its own alpha).
        source: "grid", "grid-middle" (the plateau middle, between grid points), "golden" or "coordinate".
    """

    setting: Setting
    objective: float
    recalls: dict[str, float]
    plateau: tuple[float, float]
    source: str = "grid"

    def to_dict(self) -> dict:
        return {
            **asdict(self.setting),
            "objective": self.objective,
            "recalls": self.recalls,
            "plateau": list(self.plateau),
            "source": self.source,
        }


def recalls_dict(ranks: np.ndarray, recall_values: Sequence[int]) -> dict[str, float]:
    """``{"<N>": percent}`` of first-hit ranks ``[Q]``, computed as ``experiments.eval`` does."""
    return {str(int(n)): float(r) for n, r in zip(recall_values, recall_from_ranks(ranks, recall_values), strict=True)}


def plateaus(alphas: np.ndarray, values: np.ndarray, blend: str) -> list[tuple[int, int]]:
    """Maximal runs ``(i, j)`` (inclusive, indices into ascending ``alphas``) where ``values`` equals its maximum.

    Under the native blend the run never joins alpha <= 1e-6 (plain pooling) with alpha > 1e-6.
    """
    best = np.max(values)
    runs, start = [], None
    for k in range(len(alphas)):
        on = values[k] == best
        broken = start is not None and blend == "native" and (alphas[k - 1] <= ALPHA_OFF < alphas[k])
        if start is not None and (not on or broken):
            runs.append((start, k - 1))
            start = None
        if on and start is None:
            start = k
    if start is not None:
        runs.append((start, len(alphas) - 1))
    return runs


class Objective:
    """The training objective of any setting, computed from a rank source on a subset of queries."""

    def __init__(self, source, queries: np.ndarray, objective: str):
        self.source = source
        self.queries = np.asarray(queries, np.int64)
        self.objective = objective
        self.recall_values = tuple(source.recall_values)

    def recalls(self, ranks: np.ndarray) -> np.ndarray:
        """``[K, len(N)]`` recall percentages of ``[K, Q]`` ranks on the subset."""
        return np.stack([recall_from_ranks(r[self.queries], self.recall_values) for r in np.atleast_2d(ranks)])

    def __call__(self, setting: Setting) -> float:
        ranks = self.source.first_hits([setting.alpha], setting.sigma, setting.blend)
        return float(objective_value(self.recalls(ranks)[0], self.recall_values, self.objective))


def grid_ranks(source, alphas: Sequence[float], sigmas: Sequence[float], blends: Sequence[str]) -> np.ndarray:
    """``[len(blends), len(sigmas), K, Q]`` first-hit ranks of the whole grid (one sweep per sigma and blend)."""
    return np.stack([np.stack([source.first_hits(alphas, s, b) for s in sigmas]) for b in blends])


def choose_on_grid(
    objective: Objective,
    ranks: np.ndarray,
    alphas: Sequence[float],
    sigmas: Sequence[float],
    blends: Sequence[str],
) -> Choice:
    """The middle of the widest maximal plateau of the grid (ties: first sigma, first blend, lowest alpha).

    When the middle falls between grid points it is evaluated; if it scores below the plateau (the curve dips
    between grid points) the grid point of the plateau nearest the middle is taken instead.
    """
    alphas = np.asarray(alphas, np.float64)
    order = np.argsort(alphas)
    flat = objective.recalls(ranks.reshape(-1, ranks.shape[-1]))
    values = objective_value(flat, objective.recall_values, objective.objective).reshape(ranks.shape[:3])
    best = values.max()
    candidates = []
    for b, blend in enumerate(blends):
        for s in range(len(sigmas)):
            line = values[b, s, order]
            if line.max() < best:
                continue
            for i, j in plateaus(alphas[order], line, blend):
                candidates.append((-(alphas[order][j] - alphas[order][i]), b, s, alphas[order][i], i, j))
    _, b, s, _, i, j = min(candidates)
    lo, hi = float(alphas[order][i]), float(alphas[order][j])
    blend, sigma = blends[b], float(sigmas[s])
    middle = (lo + hi) / 2.0
    grid_points = alphas[order][i : j + 1]
    on_grid = np.flatnonzero(np.abs(grid_points - middle) <= ON_GRID_TOLERANCE)  # (0.81 + 0.83) / 2 != 0.82
    if not len(on_grid):
        if objective(Setting(middle, sigma, blend)) >= best:
            return _choice(objective, Setting(float(middle), sigma, blend), (lo, hi), "grid-middle")
        on_grid = [np.argmin(np.abs(grid_points - middle))]
    k = int(order[i + on_grid[0]])
    return _grid_choice(objective, ranks[b, s, k], Setting(float(alphas[k]), sigma, blend), (lo, hi))


# A midpoint this close to a grid alpha is that grid point: it is reported from the grid's own ranks (another
# evaluation of the same alpha may order float32 near-ties differently, and the best would disagree with its row).
ON_GRID_TOLERANCE = 1e-9


def _grid_choice(objective: Objective, ranks: np.ndarray, setting: Setting, plateau) -> Choice:
    """A grid point's choice, from the grid's ranks ``[Q]`` of that point (the computation of the grid rows)."""
    recalls = recalls_dict(ranks[objective.queries], objective.recall_values)
    value = float(objective_value(np.array(list(recalls.values())), objective.recall_values, objective.objective))
    return Choice(setting, value, recalls, tuple(plateau), "grid")


def _choice(objective: Objective, setting: Setting, plateau, source: str) -> Choice:
    ranks = objective.source.first_hits([setting.alpha], setting.sigma, setting.blend)[0]
    recalls = recalls_dict(ranks[objective.queries], objective.recall_values)
    value = float(objective_value(np.array(list(recalls.values())), objective.recall_values, objective.objective))
    return Choice(setting, value, recalls, tuple(plateau), source)


def golden_section_max(f: Callable[[float], float], lo: float, hi: float, iterations: int) -> tuple[float, float]:
    """Golden-section search for a maximum of ``f`` on ``[lo, hi]``; returns the best point seen and its value.

    On a step function the bracket still shrinks (ties keep the left part), so this is a local refinement,
    not a guarantee; the caller keeps a point only when it is strictly better.
    """
    a, b = float(lo), float(hi)
    c, d = b - GOLDEN * (b - a), a + GOLDEN * (b - a)
    fc, fd = f(c), f(d)
    best = (c, fc) if fc >= fd else (d, fd)
    for _ in range(max(0, iterations - 2)):
        if fc >= fd:
            b, d, fd = d, c, fc
            c = b - GOLDEN * (b - a)
            fc = f(c)
            if fc > best[1]:
                best = (c, fc)
        else:
            a, c, fc = c, d, fd
            d = a + GOLDEN * (b - a)
            fd = f(d)
            if fd > best[1]:
                best = (d, fd)
    return best


def _alpha_bracket(alphas: np.ndarray, choice: Choice) -> tuple[float, float]:
    """The grid neighbours just outside the choice's plateau (kept on the alpha > 0 side for the native blend)."""
    lo, hi = choice.plateau
    below, above = alphas[alphas < lo], alphas[alphas > hi]
    left = float(below.max()) if len(below) else lo
    right = float(above.min()) if len(above) else hi
    if choice.setting.blend == "native" and lo > ALPHA_OFF:
        left = max(left, 2 * ALPHA_OFF)
    return left, right


def _sigma_bracket(sigmas: np.ndarray, sigma: float) -> tuple[float, float]:
    below, above = sigmas[sigmas < sigma], sigmas[sigmas > sigma]
    return (float(below.max()) if len(below) else sigma / 2.0, float(above.min()) if len(above) else sigma * 2.0)


def refine(
    objective: Objective,
    start: Choice,
    alphas: Sequence[float],
    sigmas: Sequence[float],
    iterations: int = 10,
    rounds: int = 2,
) -> Choice:
    """Golden-section on alpha, then coordinate search over (alpha, sigma), from a grid choice.

    alpha = 0 under the native blend (plain pooling) has nothing to refine in alpha; sigma is refined only
    when alpha > 0. Returns ``start`` unless a strictly better point was found.
    """
    alphas, sigmas = np.sort(np.asarray(alphas, np.float64)), np.sort(np.asarray(sigmas, np.float64))
    current = start
    if current.setting.alpha <= ALPHA_OFF and current.setting.blend == "native":
        return current

    def improve_alpha(choice: Choice) -> Choice:
        left, right = _alpha_bracket(alphas, choice)
        if right - left <= 0:
            return choice
        s = choice.setting
        a, value = golden_section_max(lambda x: objective(Setting(x, s.sigma, s.blend)), left, right, iterations)
        if value > choice.objective:
            return _choice(objective, Setting(a, s.sigma, s.blend), (a, a), "golden")
        return choice

    def improve_sigma(choice: Choice) -> Choice:
        s = choice.setting
        lo, hi = _sigma_bracket(sigmas, s.sigma)
        log_s, value = golden_section_max(
            lambda x: objective(Setting(s.alpha, float(math.exp(x)), s.blend)), math.log(lo), math.log(hi), iterations
        )
        if value > choice.objective:
            return _choice(
                objective, Setting(s.alpha, float(math.exp(log_s)), s.blend), (s.alpha, s.alpha), "coordinate"
            )
        return choice

    current = improve_alpha(current)
    for _ in range(rounds):
        before = current.objective
        current = improve_alpha(improve_sigma(current))
        if current.objective <= before:
            break
    return current
