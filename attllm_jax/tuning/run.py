"""The tuning run behind ``python -m experiments.tune``: caches, grid, refinement, cross-validation, optax.

One run: the evaluation's inputs (datasets, positives, attention answers, model, database store) are prepared
exactly as ``experiments.eval`` prepares them; the query backbone features come from (or go into) an on-disk
cache; every (alpha, sigma, blend) then costs one aggregation and one search. Writes ``tuning.json``,
``recall_vs_alpha_folds.png`` and ``tune.log`` into the output folder.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from attllm_jax.evaluation.config import EvalConfig
from attllm_jax.evaluation.extract import database_store_key
from attllm_jax.evaluation.pipeline import EvalInputs, prepare_inputs
from attllm_jax.evaluation.progress import setup_logging
from attllm_jax.evaluation.stages import ImageSets, readable_positives
from attllm_jax.files import atomic_write_json
from attllm_jax.models.vpr import DescriptorModel
from attllm_jax.ops.gem import ALPHA_OFF, BLENDS
from attllm_jax.outputs import OUTPUTS_KEY, OutputLock, remove_previous_outputs
from attllm_jax.retrieval.adaptive import ALPHA_POLICIES, choose_from_margins
from attllm_jax.retrieval.store import StoreContents
from attllm_jax.tuning import cv, search
from attllm_jax.tuning.cache import QueryFeatures, cached_query_features
from attllm_jax.tuning.evaluate import CachedRetrieval, RankSource, with_blend
from attllm_jax.tuning.figures import plot_folds
from attllm_jax.tuning.stages_cv import Comparison, post_search_cv
from attllm_jax.tuning.surrogate import SIGMA_MIN, optimize

log = logging.getLogger("attllm_jax.tuning")

TUNING_FILE = "tuning.json"
LOG_FILE = "tune.log"
FIGURE_FILE = "recall_vs_alpha_folds.png"
METHODS = ("grid", "optax", "both")


@dataclass(frozen=True)
class TuneSettings:
    """What to search and how to estimate it (the dataset side is an :class:`EvalConfig`).

    Attributes:
        alphas: The alpha grid (default 101 points 0, 0.01, ..., 1).
        sigmas: RBF widths to grid over.
        blends: "native" and/or "uniform".
        objective: "r@1", "r@5" or "mean" (mean of recall@N over every N).
        folds: Cross-validation folds (>= 2).
        group_radius: Queries closer than this (metres) share a location group; None = 2 x the positive radius.
        method: "grid", "optax" or "both".
        feature_cache_dir: Query-feature cache (None = ``output_dir/query_features``).
        seed: Seed of the fold assignment and of the bootstrap.
        bootstrap_samples: Bootstrap resamples.
        refine_iterations: Golden-section evaluations per refined coordinate (0 = no refinement).
        optax_steps: Adam steps per fold and blend.
        optax_learning_rate: Adam step size.
        temperature: Soft-rank temperature of the surrogate (standardized-score units).
        alpha_policy: None, or a query-adaptive alpha policy (``"margin"``) compared with the best global alpha
            on the same folds.
    """

    alphas: tuple[float, ...] = tuple(i / 100 for i in range(101))
    sigmas: tuple[float, ...] = (0.2,)
    blends: tuple[str, ...] = ("native",)
    objective: str = "r@1"
    folds: int = 5
    group_radius: float | None = None
    method: str = "grid"
    feature_cache_dir: str | None = None
    seed: int = 0
    bootstrap_samples: int = 2000
    refine_iterations: int = 8
    optax_steps: int = 100
    optax_learning_rate: float = 0.05
    temperature: float = 0.1
    notes: tuple[str, ...] = field(default=())
    alpha_policy: str | None = None

    def validated(self, recall_values) -> TuneSettings:
        """Checks every setting; raises ValueError naming the flag."""
        alphas = tuple(float(a) for a in self.alphas)
        if not alphas or any(not (math.isfinite(a) and 0.0 <= a <= 1.0) for a in alphas):
            raise ValueError(f"--alphas must be numbers in [0, 1], got {list(alphas)}")
        if len(set(alphas)) != len(alphas):
            raise ValueError("--alphas must be distinct")
        sigmas = tuple(float(s) for s in self.sigmas)
        if not sigmas or any(not (math.isfinite(s) and s > 0) for s in sigmas) or len(set(sigmas)) != len(sigmas):
            raise ValueError(f"--sigmas must be distinct positive numbers, got {list(sigmas)}")
        blends = tuple(self.blends)
        if not blends or any(b not in BLENDS for b in blends) or len(set(blends)) != len(blends):
            raise ValueError(f"--blends must be distinct values of {BLENDS}, got {list(blends)}")
        search.check_objective(self.objective, recall_values)
        if self.method not in METHODS:
            raise ValueError(f"--method must be one of {METHODS}, got {self.method!r}")
        if int(self.folds) < 2:
            raise ValueError(f"--folds must be >= 2, got {self.folds}")
        if self.group_radius is not None and not (math.isfinite(self.group_radius) and self.group_radius > 0):
            raise ValueError(f"--group_radius must be a positive number of metres, got {self.group_radius}")
        for name in ("bootstrap_samples", "optax_steps"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if int(self.refine_iterations) < 0:
            raise ValueError(f"--refine_iterations must be >= 0, got {self.refine_iterations}")
        if self.alpha_policy is not None and self.alpha_policy not in ALPHA_POLICIES:
            raise ValueError(f"--alpha_policy must be one of {ALPHA_POLICIES}, got {self.alpha_policy!r}")
        if not (self.optax_learning_rate > 0 and self.temperature > 0):
            raise ValueError("--optax_learning_rate and --temperature must be > 0")
        if self.method != "grid" and optax_start_sigma(sigmas) <= SIGMA_MIN:
            raise ValueError(
                f"--method {self.method} starts Adam at the median of --sigmas ({optax_start_sigma(sigmas):g}), "
                f"which must be > {SIGMA_MIN:g} (the surrogate's smallest sigma); give larger --sigmas or --method grid"
            )
        return TuneSettings(**{**asdict(self), "alphas": alphas, "sigmas": sigmas, "blends": blends})


def optax_start_sigma(sigmas) -> float:
    """Where the optax search starts sigma: the median of the searched sigmas."""
    return float(np.median(sigmas))


def run_tuning(config: EvalConfig, settings: TuneSettings, model: DescriptorModel | None = None) -> dict[str, Any]:
    """Tunes (alpha, sigma, blend) on a dataset and writes tuning.json, the fold figure and the log.

    Args:
        config: The dataset / model / attention settings (its alphas and sigma are not used).
        settings: The search and the estimate.
        model: Optional already loaded model.

    Returns:
        The content of tuning.json.
    """
    t_start = time.perf_counter()
    config = config.validated()
    settings = settings.validated(config.recall_values)
    config.check_output_outside_inputs()
    out = Path(config.output_dir)
    with OutputLock(out, "tune") as lock:
        setup_logging(out / LOG_FILE)
        lock.log_takeover()
        remove_previous_outputs(out, TUNING_FILE, also=[FIGURE_FILE])
        log.info("tuning settings: %s", json.dumps(asdict(settings), default=str))
        inputs = prepare_inputs(config, model)
        try:
            return _run(config, settings, inputs, out, t_start)
        finally:
            inputs.store.close()


@dataclass(frozen=True)
class CachedQueries:
    """The tuning's stage 5: cached query features and the retrieval source over them.

    Attributes:
        source: Aggregates and searches the cached features for any (alpha, sigma, blend).
        features: The query backbone features (and the cache's status, failures, seconds).
        cache_dir: The feature cache's folder.
    """

    source: CachedRetrieval
    features: QueryFeatures
    cache_dir: Path | str


@dataclass(frozen=True)
class GridStage:
    """The grid over (alpha, sigma, blend) on all queries.

    Attributes:
        ranks: ``[B, S, K, Q]`` first-hit ranks per blend, sigma, alpha and query (-1 = miss).
        rows: tuning.json's ``grid``: every point with its recalls.
        seconds: Wall time.
    """

    ranks: np.ndarray
    rows: list[dict[str, Any]]
    seconds: float


@dataclass(frozen=True)
class CrossValidation:
    """The in-sample best setting and the spatially blocked cross-validation of the grid search.

    Attributes:
        best: The setting tuned on all queries.
        groups: ``[Q]`` location group of each query.
        fold_of: ``[Q]`` fold of each query.
        folds: tuning.json's ``folds``.
        cv_ranks: ``[Q]`` held-out first-hit rank of each query (tuned on the other folds).
        baseline: ``[Q]`` first-hit ranks at alpha 0.
        summary: tuning.json's ``cv``.
        seconds: Wall time.
    """

    best: search.Choice
    groups: np.ndarray
    fold_of: np.ndarray
    folds: list[dict[str, Any]]
    cv_ranks: np.ndarray
    baseline: np.ndarray
    summary: dict[str, Any]
    seconds: float


def _run(config: EvalConfig, settings: TuneSettings, inputs: EvalInputs, out: Path, t_start: float) -> dict[str, Any]:
    """Stages 5-6 as the tuning's own (cached features, the grid, cross-validation, optax), then tuning.json."""
    contents = inputs.db.contents()
    for blend in settings.blends:  # fail before any query work when a blend is not available
        with_blend(inputs.model, blend)
    cached = _cached_queries(config, settings, inputs, contents, out)
    source = cached.source
    timings = {**inputs.timings, "query_features": cached.features.seconds}
    grid = _grid(source, settings, config.recall_values)
    timings["grid"] = grid.seconds
    cross = _grid_cv(source, grid.ranks, settings, config, inputs.sets)
    timings["grid_cv"] = cross.seconds
    n_primary = search.primary_n(settings.objective, config.recall_values)
    optax_part: dict[str, Any] = {"skipped": f"--method {settings.method}"}
    if settings.method in ("optax", "both"):
        t0 = time.perf_counter()
        optax_part = _optax(source, cross.fold_of, cross.groups, cross.cv_ranks, cross.baseline, settings, n_primary)
        timings["optax"] = time.perf_counter() - t0

    policy_part: dict[str, Any] = {"skipped": "no --alpha_policy"}
    if settings.alpha_policy:
        t0 = time.perf_counter()
        policy_part = _alpha_policy(
            source, cross.folds, cross.fold_of, cross.groups, cross.cv_ranks, cross.baseline, settings, n_primary
        )
        timings["alpha_policy"] = time.perf_counter() - t0

    rerank_part: dict[str, Any] = {"skipped": "no --rerank"}
    if config.rerank or config.symmetric_k:
        t0 = time.perf_counter()
        comparison = Comparison(
            cross.folds, cross.fold_of, cross.groups, cross.cv_ranks, cross.baseline, tuple(config.recall_values),
            n_primary, settings.bootstrap_samples, settings.seed,
        )  # fmt: skip
        rerank_part = post_search_cv(source, config, comparison, inputs.model, inputs.database, out)
        timings["rerank"] = time.perf_counter() - t0

    plot_folds(
        out / FIGURE_FILE,
        source,
        grid.ranks,
        settings,
        cross.fold_of,
        cross.best.setting,
        [f["train_best"] for f in cross.folds],
        n_primary,
        f"{inputs.model.spec.describe()}, {source.num_queries} queries, {settings.folds} spatial folds",
    )
    timings["total"] = time.perf_counter() - t_start
    result = _tuning_results(config, settings, inputs, contents, cached, grid, cross, optax_part, policy_part, timings)
    result["rerank"] = rerank_part
    atomic_write_json(out / TUNING_FILE, result)
    best = cross.best
    log.info(
        "best (all queries): alpha %.4g sigma %.3g blend %s, %s %.2f; held-out %s over %d folds: %s",
        best.setting.alpha,
        best.setting.sigma,
        best.setting.blend,
        settings.objective,
        best.objective,
        settings.objective,
        settings.folds,
        json.dumps(cross.summary["heldout"]),
    )
    log.info("tuning written to %s", out / TUNING_FILE)
    return result


def _cached_queries(
    config: EvalConfig, settings: TuneSettings, inputs: EvalInputs, contents: StoreContents, out: Path
) -> CachedQueries:
    """Stage 5 of the tuning: query backbone features from (or into) the on-disk cache, and the retrieval source
    that aggregates and searches them for any (alpha, sigma, blend)."""
    cache_dir = settings.feature_cache_dir or out / "query_features"
    key = database_store_key(inputs.model, inputs.queries, config.image_size, inputs.digest)
    features = cached_query_features(
        inputs.model,
        inputs.queries,
        cache_dir,
        key,
        batch_size=config.batch_size,
        image_size=config.image_size,
        num_workers=config.num_workers,
    )
    database = np.asarray(contents.descriptors, np.float32)  # the tuning reuses it for every point
    source = CachedRetrieval(
        inputs.model,
        features,
        inputs.attention.parsed,
        database,
        contents.valid,
        readable_positives(inputs.positives_all, contents.valid),
        config.recall_values,
        config.grid_interpolate,
        config.search,
    )
    return CachedQueries(source, features, cache_dir)


def _grid(source: CachedRetrieval, settings: TuneSettings, recall_values) -> GridStage:
    """Stage 6 of the tuning: first-hit ranks at every grid point (one aggregation and one search each)."""
    t0 = time.perf_counter()
    ranks = search.grid_ranks(source, settings.alphas, settings.sigmas, settings.blends)
    rows = [
        {"alpha": a, "sigma": s, "blend": b, "recalls": search.recalls_dict(ranks[bi, si, k], recall_values)}
        for bi, b in enumerate(settings.blends)
        for si, s in enumerate(settings.sigmas)
        for k, a in enumerate(settings.alphas)
    ]
    return GridStage(ranks, rows, time.perf_counter() - t0)


def _grid_cv(
    source: CachedRetrieval, ranks: np.ndarray, settings: TuneSettings, config: EvalConfig, sets: ImageSets
) -> CrossValidation:
    """The best setting on all queries, then the spatially blocked cross-validation of the same search."""
    t0 = time.perf_counter()
    best = _tune_on(source, np.arange(source.num_queries), ranks, settings)
    radius = settings.group_radius or 2.0 * config.positive_dist_threshold
    groups = cv.location_groups(sets.geo.queries, radius, config.distance, sets.positives_all)
    fold_of = cv.blocked_folds(groups, settings.folds, settings.seed)
    folds, cv_ranks = _cross_validate(source, ranks, fold_of, groups, settings)
    baseline = source.first_hits([0.0], settings.sigmas[0], settings.blends[0])[0]
    seconds = time.perf_counter() - t0
    n_primary = search.primary_n(settings.objective, config.recall_values)
    summary = _summary(cv_ranks, baseline, groups, config.recall_values, n_primary, settings)
    summary["in_sample_best"] = best.recalls
    summary["alpha0_recalls"] = search.recalls_dict(baseline, config.recall_values)
    summary["num_groups"] = int(groups.max() + 1) if len(groups) else 0
    summary["group_radius_m"] = radius
    return CrossValidation(best, groups, fold_of, folds, cv_ranks, baseline, summary, seconds)


def _tuning_results(
    config: EvalConfig,
    settings: TuneSettings,
    inputs: EvalInputs,
    contents: StoreContents,
    cached: CachedQueries,
    grid: GridStage,
    cross: CrossValidation,
    optax_part: dict[str, Any],
    policy_part: dict[str, Any],
    timings: dict[str, float],
) -> dict[str, Any]:
    """The content of tuning.json (docs/DESIGN.md section 4)."""
    return {
        "best": {**cross.best.to_dict(), "objective_name": settings.objective},
        "grid": grid.rows,
        "folds": cross.folds,
        "cv": cross.summary,
        "optax": optax_part,
        "alpha_policy": policy_part,
        "model": inputs.model.spec.to_dict(),
        "num_database": len(inputs.database),
        "num_queries": cached.source.num_queries,
        "positive_dist_threshold": config.positive_dist_threshold,
        "recall_values": list(config.recall_values),
        "settings": {k: v for k, v in asdict(settings).items() if k != "notes"},
        "attention": {"source": inputs.attention.source, "counts": inputs.attention.counts},
        "query_feature_cache": {"directory": str(cached.cache_dir), "status": cached.features.status},
        "num_skipped": {"database": len(contents.failures), "queries": len(cached.features.failures)},
        "evaluations": cached.source.evaluations,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "notes": list(config.notes) + list(settings.notes),
        OUTPUTS_KEY: [FIGURE_FILE],
    }


def _tune_on(source: RankSource, queries: np.ndarray, ranks: np.ndarray, settings: TuneSettings) -> search.Choice:
    objective = search.Objective(source, queries, settings.objective)
    choice = search.choose_on_grid(objective, ranks, settings.alphas, settings.sigmas, settings.blends)
    if settings.refine_iterations:
        choice = search.refine(objective, choice, settings.alphas, settings.sigmas, settings.refine_iterations)
    return choice


def _cross_validate(source, ranks, fold_of, groups, settings) -> tuple[list[dict], np.ndarray]:
    cv_ranks = np.full(source.num_queries, -1, np.int64)
    folds = []
    for f in range(settings.folds):
        held = np.flatnonzero(fold_of == f)
        train = np.flatnonzero(fold_of != f)
        choice = _tune_on(source, train, ranks, settings)
        s = choice.setting
        held_ranks = source.first_hits([s.alpha], s.sigma, s.blend)[0][held]
        cv_ranks[held] = held_ranks
        folds.append(
            {
                "train_best": choice.to_dict(),
                "heldout_recalls": search.recalls_dict(held_ranks, source.recall_values),
                "query_count": int(len(held)),
                "train_query_count": int(len(train)),
                "group_count": int(len(np.unique(groups[held]))),
            }
        )
        log.info("fold %d: train best %s -> held-out %s", f, choice.to_dict(), folds[-1]["heldout_recalls"])
    return folds, cv_ranks


def _summary(cv_ranks, baseline, groups, recall_values, n_primary, settings) -> dict[str, Any]:
    """Held-out recall with its group-bootstrap interval, the paired gain over another rank vector, McNemar."""
    return cv.heldout_summary(
        cv_ranks, baseline, groups, recall_values, n_primary, settings.bootstrap_samples, settings.seed
    )


def _alpha_policy(source, folds, fold_of, groups, global_ranks, baseline, settings, n_primary) -> dict[str, Any]:
    """The query-adaptive alpha on the grid's folds: each held-out query takes the grid alpha its policy picks
    (from scores only) at the sigma and blend its fold's training chose; compared with the best global alpha of
    the same folds (paired group bootstrap, exact McNemar) and with alpha 0."""
    ranks = np.full(source.num_queries, -1, np.int64)
    counts = np.zeros(len(settings.alphas), np.int64)
    for f, fold in enumerate(folds):
        held = np.flatnonzero(fold_of == f)
        sigma, blend = fold["train_best"]["sigma"], fold["train_best"]["blend"]
        choice = choose_from_margins(source.margins(settings.alphas, sigma, blend)[:, held])
        ranks[held] = source.first_hits(settings.alphas, sigma, blend)[choice, held]
        counts += np.bincount(choice, minlength=len(settings.alphas))
        fold["alpha_policy_heldout_recalls"] = search.recalls_dict(ranks[held], source.recall_values)
    summary = _summary(ranks, baseline, groups, source.recall_values, n_primary, settings)
    vs_global = _summary(ranks, global_ranks, groups, source.recall_values, n_primary, settings)
    return {
        "policy": settings.alpha_policy,
        "heldout": summary["heldout"],
        "gain_vs_alpha0": summary["gain_vs_alpha0"],
        "vs_global": cv.paired(
            vs_global,
            "adaptive held-out hits minus best-global-alpha held-out hits, same folds, paired group bootstrap",
        ),
        "alphas_chosen": {str(float(a)): int(c) for a, c in zip(settings.alphas, counts, strict=True) if c},
    }


def _optax(source, fold_of, groups, grid_cv_ranks, baseline, settings, n_primary) -> dict[str, Any]:
    """Per fold and blend: Adam on the surrogate (training queries); the blend whose end point has the higher
    exact training objective is kept; then the held-out recall, compared with the grid search's on the same folds.
    """
    alpha0, sigma0 = 0.5, optax_start_sigma(settings.sigmas)
    problems = {b: source.surrogate(b) for b in settings.blends}
    recall_values = source.recall_values
    all_entry, _ = _optax_fit(source, problems, np.arange(source.num_queries), settings, alpha0, sigma0)
    folds, cv_ranks = [], np.full(source.num_queries, -1, np.int64)
    for f in range(settings.folds):
        held, train = np.flatnonzero(fold_of == f), np.flatnonzero(fold_of != f)
        entry, s = _optax_fit(source, problems, train, settings, alpha0, sigma0)
        cv_ranks[held] = source.first_hits([s.alpha], s.sigma, s.blend)[0][held]
        folds.append(
            {
                "train_best": entry,
                "heldout_recalls": search.recalls_dict(cv_ranks[held], recall_values),
                "query_count": int(len(held)),
            }
        )
    summary = _summary(cv_ranks, baseline, groups, recall_values, n_primary, settings)
    vs_grid = _summary(cv_ranks, grid_cv_ranks, groups, recall_values, n_primary, settings)
    return {
        "best": all_entry,
        "folds": folds,
        "heldout": summary["heldout"],
        "gain_vs_alpha0": summary["gain_vs_alpha0"],
        "mcnemar_p": summary["mcnemar_p"],
        "vs_grid": {
            "gain": vs_grid["gain_vs_alpha0"],
            "mcnemar_p": vs_grid["mcnemar_p"],
            "mcnemar": vs_grid["mcnemar"],
            "note": "optax held-out hits minus grid held-out hits, same folds, paired group bootstrap",
        },
        "start": {"alpha": alpha0, "sigma": sigma0},
        "steps": settings.optax_steps,
        "learning_rate": settings.optax_learning_rate,
        "temperature": settings.temperature,
        "alpha_off": ALPHA_OFF,
    }


def _optax_fit(
    source: RankSource, problems: dict, train: np.ndarray, settings: TuneSettings, alpha0: float, sigma0: float
) -> tuple[dict[str, Any], search.Setting]:
    """Adam on every blend's surrogate over the ``train`` queries from ``(alpha0, sigma0)``; keeps the blend whose
    end point has the higher exact objective. Returns its tuning.json entry and setting."""
    objective = search.Objective(source, train, settings.objective)
    mask = np.zeros(source.num_queries, bool)
    mask[train] = True
    best, best_value = None, -np.inf
    for blend, problem in problems.items():
        result = optimize(
            problem,
            blend,
            mask,
            source.recall_values,
            settings.objective,
            alpha0=alpha0,
            sigma0=sigma0,
            steps=settings.optax_steps,
            learning_rate=settings.optax_learning_rate,
            temperature=settings.temperature,
        )
        setting = search.Setting(result.alpha, result.sigma, blend)
        value = objective(setting)
        if value > best_value:
            best, best_value = (result, setting), value
    result, setting = best
    ranks = source.first_hits([setting.alpha], setting.sigma, setting.blend)[0]
    entry = {
        **asdict(setting),
        "objective": best_value,
        "recalls": search.recalls_dict(ranks[train], source.recall_values),
        "surrogate_start": result.surrogate[0],
        "surrogate_end": result.surrogate[-1],
    }
    return entry, setting
