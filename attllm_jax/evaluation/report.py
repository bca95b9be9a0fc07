"""Result files: results.json (the public contract), the per-query CSV, the published code's CSV layout."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from attllm_jax.evaluation.config import alpha_key
from attllm_jax.files import atomic_write_json
from attllm_jax.retrieval.retrieve import Retrieval


def preprocessing_used(model_preprocess: dict, image_size: int | tuple[int, int] | None) -> dict[str, Any]:
    """What the run resized its images to: the ``--image_size`` override, or the model's own preprocessing.

    Args:
        model_preprocess: The model's preprocess config (``resize`` "shorter_side" | "exact", ``size``).
        image_size: The run's override (int: shorter side; ``(height, width)``: exact), or None.

    Returns:
        ``{"resize": mode, "image_size": int | [height, width], "source": "--image_size" | "model"}``.
    """
    if image_size is not None:
        exact = not isinstance(image_size, int)
        size = list(image_size) if exact else int(image_size)
        return {"resize": "exact" if exact else "shorter_side", "image_size": size, "source": "--image_size"}
    size = model_preprocess.get("size")
    return {
        "resize": model_preprocess.get("resize"),
        "image_size": list(size) if isinstance(size, (list, tuple)) else size,
        "source": "model",
    }


def recall_beyond_database_note(recall_values: Sequence[int], num_database: int) -> str | None:
    """A warning when some N of recall@N is at least the number of (readable) database images, else None.

    At such an N every query with any positive is a hit, so R@N is the share of queries that have a positive, not a
    measure of retrieval. With no readable database image at all, nothing is retrieved and every recall is 0: the
    note says that instead.
    """
    if num_database == 0:
        return (
            "no database image could be read (see skipped_images), so nothing was retrieved and every recall is 0; "
            "these values measure nothing"
        )
    beyond = [int(n) for n in recall_values if int(n) >= num_database]
    if not beyond:
        return None
    names = ", ".join(f"R@{n}" for n in beyond)
    return (
        f"{names}: N is not below the {num_database} readable database images, so every query with a positive counts "
        "as a hit; these values measure only how many queries have a positive, not retrieval"
    )


def recall_table(retrieval: Retrieval) -> str:
    """A plain-text table: one row per alpha, one column per N."""
    header = "alpha  " + "".join(f"{'R@' + str(n):>8}" for n in retrieval.recall_values)
    lines = [header, "-" * len(header)]
    for alpha, row in zip(retrieval.alphas, retrieval.recalls, strict=True):
        lines.append(f"{alpha:<7g}" + "".join(f"{r:8.1f}" for r in row))
    return "\n".join(lines)


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Writes JSON atomically (see :func:`attllm_jax.files.atomic_write_json`)."""
    atomic_write_json(path, data)


def write_per_query_csv(
    path: str | os.PathLike,
    retrieval: Retrieval,
    query_paths: Sequence[str],
    database_paths: Sequence[str],
    positives: Sequence[np.ndarray],
    query_valid: np.ndarray,
    attention_kinds: Sequence[str],
    attention_points: Sequence[tuple[int, int, int]] | None = None,
) -> None:
    """One row per (alpha, query): the top-M database paths and scores, the positives and the first-hit rank.

    ``first_positive_rank`` is 1-based and empty for a miss; ``attention`` is the answer kind actually applied
    ("points", "grid") or why none was ("none", "invalid", "missing"); ``readable`` is 0 for skipped images.
    ``attention_points``, ``attention_dropped``, ``attention_clamped`` are the points of the query's answer that
    were used, the entries dropped (beyond N_max, malformed, non-finite) and the values clamped into range,
    given per query as ``attention_points`` (zeros when not given).
    """
    m = retrieval.predictions.shape[-1]
    points = list(attention_points) if attention_points is not None else [(0, 0, 0)] * len(query_paths)
    header = ["alpha", "query", "readable", "attention", "attention_points", "attention_dropped", "attention_clamped"]
    header += ["num_positives", "first_positive_rank"]
    header += [f"pred_{r + 1}" for r in range(m)] + [f"score_{r + 1}" for r in range(m)] + ["positives"]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for k, alpha in enumerate(retrieval.alphas):
            for q, query in enumerate(query_paths):
                preds = retrieval.predictions[k, q]
                rank = retrieval.first_hit[k, q]
                row = [alpha_key(alpha), query, int(query_valid[q]), attention_kinds[q], *points[q], len(positives[q])]
                row.append("" if rank < 0 else int(rank) + 1)
                row += [database_paths[i] if i >= 0 else "" for i in preds]
                row += [f"{s:.6f}" if i >= 0 else "" for s, i in zip(retrieval.scores[k, q], preds, strict=True)]
                row.append(";".join(database_paths[i] for i in positives[q]))
                writer.writerow(row)


def write_published_csvs(
    directory: str | os.PathLike,
    alpha_index: int,
    retrieval: Retrieval,
    query_paths: Sequence[str],
    database_paths: Sequence[str],
    positives: Sequence[np.ndarray],
    threshold_m: float,
    num_evaluated: int | None = None,
) -> tuple[Path, Path]:
    """The published VPR-AttLLM code's ``individual_results.csv`` and ``aggregated_results.csv`` for one alpha.

    Same columns and metric rows as its ``RecordEvaluator.save_results`` (';'-joined predicted and ground-truth
    paths, ``success_at_k``; ``success_rate_at_k`` as a fraction and ``_percent``), with three corrections:
    ``distance_threshold_m`` is the threshold actually used (the published code writes its default 25 even for a
    100 m evaluation), the rates are divided by all queries, unreadable ones included (``evaluated_queries`` counts
    the readable ones), and every path is written the same way: as given in ``query_paths`` / ``database_paths``
    (the pipeline passes paths relative to the query and database folders; the published code mixes full predicted
    paths with bare ground-truth file names).

    Returns:
        The two paths written.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ks = list(retrieval.recall_values)
    preds_all = retrieval.predictions[alpha_index]
    first_hit = retrieval.first_hit[alpha_index]
    individual = directory / "individual_results.csv"
    with open(individual, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["query_path", "num_predicted_paths", "num_gt_paths", "predicted_paths", "gt_paths"]
            + [f"success_at_{k}" for k in ks]
        )
        for q, query in enumerate(query_paths):
            preds = [database_paths[i] for i in preds_all[q] if i >= 0]
            gt = [database_paths[i] for i in positives[q]]
            success = [int(0 <= first_hit[q] < k) for k in ks]
            writer.writerow([query, len(preds), len(gt), ";".join(preds), ";".join(gt)] + success)
    total = len(query_paths)
    aggregated = directory / "aggregated_results.csv"
    with open(aggregated, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["metric", "value"])
        writer.writerow(["total_queries", total])
        writer.writerow(["evaluated_queries", total if num_evaluated is None else int(num_evaluated)])
        writer.writerow(["distance_threshold_m", f"{threshold_m:g}"])
        for k in ks:
            rate = float(np.count_nonzero((first_hit >= 0) & (first_hit < k))) / total if total else 0.0
            writer.writerow([f"success_rate_at_{k}", rate])
            writer.writerow([f"success_rate_at_{k}_percent", round(rate * 100, 2)])
    return individual, aggregated
