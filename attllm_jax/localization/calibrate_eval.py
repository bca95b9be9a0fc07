"""Fits the confidence model on a labelled eval run (``OUT/results.json`` + ``OUT/per_query.csv``).

Each readable query of the chosen alpha gives one row: the features of its top-K ranking (the same estimator and
radius as localize) and whether the estimate lies within the radius of the query's true position.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np

from attllm_jax.data.dataset import geo_pair, load_image_set
from attllm_jax.evaluation.config import alpha_key
from attllm_jax.localization.calibration import FEATURES, Calibration, fit_calibration
from attllm_jax.localization.estimate import estimate_position, ranking_features


def eval_rows(eval_dir: str | os.PathLike, alpha: float | None = None) -> tuple[list[dict], dict]:
    """The per_query.csv rows of one alpha (default: the run's first) and results.json.

    Raises:
        ValueError: naming the folder when the files are missing or the alpha was not evaluated.
    """
    eval_dir = Path(eval_dir)
    try:
        results = json.loads((eval_dir / "results.json").read_text(encoding="utf-8"))
        with open(eval_dir / "per_query.csv", newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, ValueError) as error:
        raise ValueError(f"--calibrate_with {eval_dir}: not an attllm-eval output folder ({error})") from None
    alphas = [float(a) for a in results["alphas"]]
    chosen = alphas[0] if alpha is None or float(alpha) not in alphas else float(alpha)
    rows = [r for r in rows if r["alpha"] == alpha_key(chosen) and r["readable"] == "1" and r["pred_1"]]
    return rows, results


def calibration_features(
    eval_dir: str | os.PathLike, radius_m: float, estimator: str, cluster_radius_m: float, alpha: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``[N, 3]`` features and ``[N]`` correctness of the readable queries of an eval run."""
    rows, results = eval_rows(eval_dir, alpha)
    database = load_image_set(results["database_folder"])
    queries = load_image_set(results["queries_folder"])
    geo = geo_pair(database, queries, "utm")
    db_index = {p: i for i, p in enumerate(database.paths)}
    q_index = {p: i for i, p in enumerate(queries.paths)}
    features, correct = [], []
    for row in rows:
        k = sum(1 for name in row if name.startswith("pred_") and row[name])
        preds = [db_index[row[f"pred_{r + 1}"]] for r in range(k)]
        scores = np.array([float(row[f"score_{r + 1}"]) for r in range(k)])
        positions = geo.database[preds]
        estimate = estimate_position(positions, scores, estimator, cluster_radius_m)
        f = ranking_features(positions, scores, estimate, radius_m)
        truth = geo.queries[q_index[row["query"]]]
        features.append([f[name] for name in FEATURES])
        correct.append(np.hypot(truth[0] - estimate.east, truth[1] - estimate.north) <= radius_m)
    return np.array(features, np.float64).reshape(-1, len(FEATURES)), np.array(correct, bool)


def calibrate_from_eval(
    eval_dir: str | os.PathLike,
    radius_m: float,
    estimator: str = "top1",
    cluster_radius_m: float = 25.0,
    alpha: float | None = None,
) -> Calibration:
    """Fits :class:`Calibration` on an eval output folder (see :func:`calibration_features`)."""
    features, correct = calibration_features(eval_dir, radius_m, estimator, cluster_radius_m, alpha)
    return fit_calibration(features, correct, radius_m, estimator)
