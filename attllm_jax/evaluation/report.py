"""The report stage of eval (stage 8, docs/DESIGN.md section 5): results.json (the public contract, built here from
the stages' typed outputs), the per-query CSV, the published code's CSV layout, the recall figure, the strips."""

from __future__ import annotations

import csv
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from attllm_jax.evaluation import hosts
from attllm_jax.evaluation.attention_source import QueryAttention
from attllm_jax.evaluation.config import EvalConfig, alpha_key
from attllm_jax.evaluation.extract import QueryDescriptors
from attllm_jax.evaluation.figures import plot_recall_vs_alpha, shorten_path
from attllm_jax.evaluation.post_search import PostSearch
from attllm_jax.evaluation.stages import DatabaseStage, ImageSets, LoadedModel, Reranked, SearchResult
from attllm_jax.evaluation.strips import applied_kind, save_strips
from attllm_jax.files import atomic_write_json
from attllm_jax.outputs import OUTPUTS_KEY, relative_outputs
from attllm_jax.retrieval.retrieve import Retrieval
from attllm_jax.retrieval.store import StoreContents

log = logging.getLogger("attllm_jax.evaluation")

RESULTS_FILE = "results.json"
RECALL_DENOMINATOR = "all queries (unreadable queries and queries without positives count as misses)"


@dataclass(frozen=True)
class EvalRun:
    """Every stage's output of one evaluation: the report's input.

    Attributes:
        config: The run's settings.
        sets: Stage 1 (image sets, positions, positives).
        attention: Stage 2 (the queries' parsed answers).
        loaded: Stage 3 (the model, its digest, its load time).
        database: Stage 4 (the store and what filling it did).
        contents: The store's contents (descriptors ``[N, D]``, ``valid [N]``, failures).
        queries: Stage 5 (descriptors ``[K, Q, D]``, validity, attention applied, failures).
        search: Stage 6 (the search's retrieval and time).
        ranked: Stage 7 (the final ranking; what every file reports).
        extra: What the optional stages after the search produced (saved descriptors, ``--rerank`` recalls,
            ``--alpha_policy``, ``--symmetric_k``): their results.json entries, files and timings.
    """

    config: EvalConfig
    sets: ImageSets
    attention: QueryAttention
    loaded: LoadedModel
    database: DatabaseStage
    contents: StoreContents
    queries: QueryDescriptors
    search: SearchResult
    ranked: Reranked
    extra: PostSearch = field(default_factory=PostSearch)


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


# ----------------------------------------------------------------------------------------------------------------
# The eval report: files, then results.json from the typed stage outputs


def write_eval_report(run: EvalRun, out: Path, t_start: float) -> dict[str, Any]:
    """Writes every eval result file into ``out`` (see :func:`write_eval_files`), then ``results.json``.

    Args:
        run: Every stage's output.
        out: The output folder.
        t_start: ``time.perf_counter()`` at the run's start (for ``timings_s.total``).

    Returns:
        The content of results.json.
    """
    written = write_eval_files(run, out) + list(run.extra.written)
    notes = eval_notes(run)
    results = eval_results(run, out, written, notes, time.perf_counter() - t_start)
    write_json(out / RESULTS_FILE, results)
    log.info(
        "recall@N (%%) over %d queries, positives within %g m:\n%s",
        len(run.sets.queries),
        run.config.positive_dist_threshold,
        recall_table(run.ranked.retrieval),
    )
    log.info("results written to %s", out / RESULTS_FILE)
    return results


def write_eval_files(run: EvalRun, out: Path) -> list[Path]:
    """``per_query.csv``, ``csv_results/alpha_<a>/``, ``recall_vs_alpha.png`` and, with ``num_preds_to_save``, the
    prediction strips; returns the paths written."""
    config, sets, retrieval, positives = run.config, run.sets, run.ranked.retrieval, run.ranked.positives
    queries, database = sets.queries, sets.database
    kinds = [applied_kind(a, w) for a, w in zip(run.attention.parsed, run.queries.with_attention, strict=True)]
    written = [out / "per_query.csv", out / "recall_vs_alpha.png"]
    write_per_query_csv(
        written[0],
        retrieval,
        queries.paths,
        database.paths,
        positives,
        run.queries.valid,
        kinds,
        run.attention.point_counts(),
    )
    for k, alpha in enumerate(config.alphas):
        written += write_published_csvs(
            out / "csv_results" / f"alpha_{alpha_key(alpha)}",
            k,
            retrieval,
            queries.paths,
            database.paths,
            positives,
            config.positive_dist_threshold,
            num_evaluated=int(run.queries.valid.sum()),
        )
    model = run.loaded.model
    weights_label = model.spec.provenance.weights or f"checkpoint {shorten_path(config.checkpoint)}"
    plot_recall_vs_alpha(
        written[1],
        config.alphas,
        retrieval.recalls,
        config.recall_values,
        [
            f"{model.spec.describe()}, weights: {weights_label}",
            f"{len(queries)} queries, {len(database)} database images, positives within "
            f"{config.positive_dist_threshold:g} m",
        ],
    )
    if config.num_preds_to_save:
        written += save_strips(
            out / "predictions",
            config,
            queries,
            database,
            run.attention.parsed,
            run.queries,
            retrieval,
            positives,
            sets.geo,
        )
    return written


def eval_notes(run: EvalRun) -> list[str]:
    """results.json's ``notes``: the config's, a random-weights note for a checkpoint with random weights, and a
    warning (also logged) when some N of recall@N is not below the readable database size."""
    notes = list(run.config.notes)
    weights = run.loaded.model.spec.provenance.weights or ""
    if run.config.checkpoint is not None and weights.startswith("random"):
        notes.append(f"NOTE: the model's weights are {weights}: results say nothing of a release")
    beyond = recall_beyond_database_note(run.config.recall_values, int(run.contents.valid.sum()))
    if beyond:
        log.warning("%s", beyond)
        notes.append(f"WARNING: {beyond}")
    return notes


def eval_results(run: EvalRun, out: Path, written: list[Path], notes: list[str], total_s: float) -> dict[str, Any]:
    """The content of results.json (docs/DESIGN.md section 4) from the stages' typed outputs."""
    config, sets, model = run.config, run.sets, run.loaded.model
    queries = sets.queries
    no_positive = [queries.paths[i] for i, p in enumerate(run.ranked.positives) if len(p) == 0]
    timings = {
        "load_model": run.loaded.seconds,
        "database": run.database.extraction.seconds,
        "queries": run.queries.seconds,
        "search": run.search.seconds,
        **run.extra.timings,
        "total": total_s,
    }
    return {
        "model": model.spec.to_dict(),
        "precision": model.precision,
        "weights": {
            "source": model.spec.provenance.weights or f"checkpoint {config.checkpoint}",
            "sha256": run.loaded.digest,
        },
        "num_database": len(sets.database),
        "num_queries": len(queries),
        "database_folder": str(sets.database.root),
        "queries_folder": str(queries.root),
        "preprocessing": preprocessing_used(model.spec.preprocess.to_dict(), config.image_size),
        "positive_dist_threshold": config.positive_dist_threshold,
        "recalls": run.ranked.retrieval.recalls_dict(),
        "alphas": list(config.alphas),
        "recall_values": list(config.recall_values),
        "distance": config.distance,
        "utm_zone": list(sets.geo.zone) if sets.geo.zone else None,
        "recall_denominator": RECALL_DENOMINATOR,
        "queries_without_positives": {"count": len(no_positive), "queries": no_positive},
        "num_skipped": {"database": len(run.contents.failures), "queries": len(run.queries.failures)},
        "skipped_images": {
            "database": run.contents.failures,
            "queries": [{"index": f.index, "path": f.path, "error": f.error} for f in run.queries.failures],
        },
        "attention": attention_entry(run.attention, run.queries, list(queries.paths), config),
        "store": {
            "directory": str(run.database.store.directory),
            "dtype": run.database.store.dtype,
            "chunk_size": run.database.store.chunk_size,
            **run.database.extraction.entry(),
        },
        "search": run.ranked.retrieval.search_info,
        "hosts": hosts.hosts_entry(),
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "notes": notes,
        **run.extra.entries,
        OUTPUTS_KEY: relative_outputs(out, written),
    }


def attention_entry(
    attention: QueryAttention, extracted: QueryDescriptors, query_paths: list[str], config: EvalConfig
) -> dict[str, Any]:
    """results.json's ``attention``: where the answers came from, what was applied, what was dropped or clamped."""
    points = attention.point_counts()
    applied = int(extracted.with_attention.sum())
    return {
        "source": attention.source,
        "counts": attention.counts,
        "queries_with_attention": applied,
        "queries_without_attention": int(len(query_paths) - applied),
        "missing_files": attention.missing,
        "unusable_files": attention.invalid,
        "unused_files": attention.unused,
        "dropped_entries": sum(d for _, d, _ in points),
        "clamped_values": sum(c for _, _, c in points),
        "adjusted_answers": attention.adjusted(query_paths),
        "sigma": config.sigma,
        "grid_interpolate": config.grid_interpolate,
    }
