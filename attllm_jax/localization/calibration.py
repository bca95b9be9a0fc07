"""Calibrated confidence: P(estimate within the radius of the truth) from ranking features.

A logistic model on the standardized features ``(top1_score, margin, share_within)`` fitted by Newton's method
with a small L2 penalty; every coefficient is constrained >= 0 (a feature whose free fit is negative is dropped
and the model refitted), so the confidence never decreases when the margin grows. Held-out quality comes from
k-fold cross-validated predictions: reliability table, expected calibration error (ECE, equal-width bins), Brier
score and AUROC. File format: docs/DESIGN.md section 10.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import numpy as np

from attllm_jax.files import atomic_write_json

FEATURES = ("top1_score", "margin", "share_within")
FORMAT = "attllm-localize-calibration/1"


@dataclass(frozen=True)
class Calibration:
    """A fitted confidence model.

    Attributes:
        mean: ``[F]`` feature means used to standardize.
        scale: ``[F]`` feature standard deviations (1 where constant).
        coef: ``[F]`` non-negative coefficients on the standardized features.
        intercept: The bias.
        radius_m: The radius "correct" was judged at.
        estimator: The estimator whose correctness was fitted.
        quality: Held-out metrics (``ece``, ``brier``, ``auroc``, ``reliability``, ``num``, ``base_rate``).
        rerank: The ``--rerank`` stage (canonical spec) whose scores the model was fitted on, None for the plain
            search; localize refuses to apply it to another stage's scores. Written only when set.
    """

    mean: tuple[float, ...]
    scale: tuple[float, ...]
    coef: tuple[float, ...]
    intercept: float
    radius_m: float
    estimator: str
    quality: dict
    rerank: str | None = None

    def predict(self, features: np.ndarray) -> np.ndarray:
        """``[N, F]`` features (columns in :data:`FEATURES` order) -> ``[N]`` probabilities."""
        z = (np.asarray(features, np.float64) - np.asarray(self.mean)) / np.asarray(self.scale)
        return _sigmoid(z @ np.asarray(self.coef) + self.intercept)

    def save(self, path: str | os.PathLike) -> None:
        """Writes the calibration JSON atomically."""
        fields = asdict(self)
        if self.rerank is None:
            fields.pop("rerank")  # files of the plain search are written as before the field existed
        atomic_write_json(path, {"format": FORMAT, "features": list(FEATURES), **fields})


def load_calibration(path: str | os.PathLike) -> Calibration:
    """Reads a calibration file.

    Raises:
        ValueError: naming the file when it is not a calibration of this format.
    """
    try:
        data = json.loads(open(path, encoding="utf-8").read())
        if data.get("format") != FORMAT or tuple(data.get("features", ())) != FEATURES:
            raise ValueError(f"format {data.get('format')!r}, features {data.get('features')}")
        return Calibration(
            tuple(data["mean"]),
            tuple(data["scale"]),
            tuple(data["coef"]),
            float(data["intercept"]),
            float(data["radius_m"]),
            str(data["estimator"]),
            dict(data["quality"]),
            None if data.get("rerank") is None else str(data["rerank"]),
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"calibration file {path}: not an {FORMAT} file ({error})") from None


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -40, 40)))


def _newton_logistic(x: np.ndarray, y: np.ndarray, l2: float, iterations: int = 50) -> np.ndarray:
    """L2-penalized logistic regression by Newton's method; ``x`` ``[N, F]`` (no bias column); returns ``[F + 1]``."""
    xb = np.hstack([x, np.ones((len(x), 1))])
    w = np.zeros(xb.shape[1])
    penalty = np.full(xb.shape[1], l2)
    penalty[-1] = 0.0  # the bias is not penalized
    for _ in range(iterations):
        p = _sigmoid(xb @ w)
        grad = xb.T @ (p - y) + penalty * w
        hess = (xb * (p * (1 - p))[:, None]).T @ xb + np.diag(penalty) + 1e-9 * np.eye(len(w))
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return w


def _fit_params(
    features: np.ndarray, correct: np.ndarray, l2: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    mean = features.mean(0)
    scale = features.std(0)
    scale = np.where(scale > 1e-12, scale, 1.0)
    z = (features - mean) / scale
    active = np.ones(features.shape[1], dtype=bool)
    while True:
        w = _newton_logistic(z[:, active], correct, l2)
        coef = np.zeros(features.shape[1])
        coef[active] = w[:-1]
        if (coef >= 0).all():
            return mean, scale, coef, float(w[-1])
        active &= coef > 0  # drop the negative ones; an intercept-only model is the base rate


def fit_calibration(
    features: np.ndarray,
    correct: np.ndarray,
    radius_m: float,
    estimator: str,
    *,
    folds: int = 5,
    l2: float = 1.0,
    bins: int = 10,
    seed: int = 0,
) -> Calibration:
    """Fits the confidence model and measures it on held-out folds.

    Args:
        features: ``[N, 3]`` in :data:`FEATURES` order.
        correct: ``[N]`` bool, the estimate lay within ``radius_m`` of the truth.
        radius_m: Metres.
        estimator: The estimator the features came from.
        folds: Cross-validation folds for the held-out metrics (at most N).
        l2: L2 penalty on the standardized coefficients.
        bins: Reliability bins.
        seed: Fold assignment seed.

    Returns:
        The model fitted on all rows, with the cross-validated quality.

    Raises:
        ValueError: with fewer than 2 rows, or rows that are all correct or all wrong.
    """
    x = np.asarray(features, np.float64)
    y = np.asarray(correct, np.float64)
    if len(x) < 2 or y.min() == y.max():
        raise ValueError(
            f"calibration needs at least 2 labelled queries with both correct and wrong estimates, got {len(x)} "
            f"with {int(y.sum())} correct"
        )
    fold_of = np.random.default_rng(seed).permutation(len(x)) % min(folds, len(x))
    held_out = np.empty(len(x))
    for f in np.unique(fold_of):
        train = fold_of != f
        if y[train].min() == y[train].max():
            held_out[~train] = y[train].mean()
            continue
        mean, scale, coef, bias = _fit_params(x[train], y[train], l2)
        held_out[~train] = _sigmoid(((x[~train] - mean) / scale) @ coef + bias)
    mean, scale, coef, bias = _fit_params(x, y, l2)
    quality = calibration_quality(held_out, y.astype(bool), bins)
    return Calibration(tuple(mean), tuple(scale), tuple(coef), bias, float(radius_m), estimator, quality)


def calibration_quality(confidence: np.ndarray, correct: np.ndarray, bins: int = 10) -> dict:
    """Reliability table, ECE, Brier score and AUROC of ``[N]`` confidences against ``[N]`` bool outcomes."""
    confidence, correct = np.asarray(confidence, np.float64), np.asarray(correct, bool)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        rows = which == b
        if not rows.any():
            continue
        mean_conf, rate = float(confidence[rows].mean()), float(correct[rows].mean())
        ece += rows.mean() * abs(mean_conf - rate)
        table.append(
            {
                "bin": [float(edges[b]), float(edges[b + 1])],
                "count": int(rows.sum()),
                "mean_confidence": mean_conf,
                "fraction_correct": rate,
            }
        )
    return {
        "num": int(len(confidence)),
        "base_rate": float(correct.mean()),
        "ece": float(ece),
        "brier": float(np.mean((confidence - correct) ** 2)),
        "auroc": auroc(confidence, correct),
        "reliability": table,
        "held_out": "k-fold cross-validated predictions",
    }


def auroc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Area under the ROC curve (ties count half); None when one class is empty."""
    scores, positive = np.asarray(scores, np.float64), np.asarray(positive, bool)
    pos, neg = scores[positive], scores[~positive]
    if len(pos) == 0 or len(neg) == 0:
        return None
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))
