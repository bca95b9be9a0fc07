"""Tuning alpha, sigma and the blend from caches: grid and golden-section search, spatial CV, optax.

See :func:`attllm_jax.tuning.run.run_tuning` (behind ``python -m experiments.tune``).
"""

from attllm_jax.tuning.cv import blocked_folds, bootstrap_mean_ci, location_groups, mcnemar_exact
from attllm_jax.tuning.evaluate import CachedRetrieval, with_blend
from attllm_jax.tuning.run import TuneSettings, run_tuning

__all__ = [
    "CachedRetrieval",
    "TuneSettings",
    "blocked_folds",
    "bootstrap_mean_ci",
    "location_groups",
    "mcnemar_exact",
    "run_tuning",
    "with_blend",
]
