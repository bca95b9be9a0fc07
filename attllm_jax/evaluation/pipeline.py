"""The evaluation pipeline behind ``python -m experiments.eval``.

Database descriptors come from (or go into) a resumable store; query backbone features are computed once and
aggregated for every alpha in one vmapped call; faiss exact search gives the top-M database images; recall@N is
computed as VPR-methods-evaluation does. See :func:`run_evaluation`.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np

from attllm_jax.attention.maps import attention_maps
from attllm_jax.data.dataset import GeoPair, ImageSet, geo_pair, load_image_set
from attllm_jax.evaluation import hosts
from attllm_jax.evaluation.attention_source import QueryAttention, load_query_attention
from attllm_jax.evaluation.config import EvalConfig, alpha_key
from attllm_jax.evaluation.demo import random_model
from attllm_jax.evaluation.extract import DatabaseExtraction, build_database_store, extract_queries, weights_digest
from attllm_jax.evaluation.figures import Prediction, plot_recall_vs_alpha, save_prediction_strip, shorten_path
from attllm_jax.evaluation.progress import setup_logging
from attllm_jax.evaluation.report import (
    Retrieval,
    preprocessing_used,
    recall_beyond_database_note,
    recall_table,
    write_json,
    write_per_query_csv,
    write_published_csvs,
)
from attllm_jax.models.vpr import DescriptorModel
from attllm_jax.outputs import OUTPUTS_KEY, OutputLock, relative_outputs, remove_previous_outputs
from attllm_jax.retrieval import pod_search
from attllm_jax.retrieval.positives import find_positives, haversine_m
from attllm_jax.retrieval.retrieve import retrieve
from attllm_jax.retrieval.search import MemoryPlan, plan_memory
from attllm_jax.retrieval.store import DescriptorStore

log = logging.getLogger("attllm_jax.evaluation")

RESULTS_FILE = "results.json"
LOG_FILE = "eval.log"


class ModelLoadError(ValueError):
    """The --checkpoint directory does not hold a loadable converted model (bad config.json, state, fields)."""


def load_eval_model(config: EvalConfig) -> DescriptorModel:
    """The converted model of ``config.checkpoint``, or the random-weight ``config.random_model`` (CosPlace
    ResNet-18/512 by default; :func:`attllm_jax.evaluation.demo.random_model`).

    Raises:
        ModelLoadError: naming the checkpoint directory, when its config or state cannot be loaded.
    """
    if config.checkpoint is None:
        return random_model(config.random_model, config.model_seed, precision=config.precision)
    from attllm_jax.checkpoint import load_model

    try:
        return load_model(config.checkpoint, precision=config.precision)
    except (ValueError, KeyError, TypeError, FileNotFoundError) as error:  # malformed config.json or state
        detail = f"missing field {error}" if isinstance(error, KeyError) else str(error)
        raise ModelLoadError(
            f"--checkpoint {config.checkpoint}: cannot load the model ({type(error).__name__}: {detail}); "
            "convert the PyTorch checkpoint again with attllm-convert"
        ) from error


@dataclass
class EvalResult:
    """What :func:`run_evaluation` produced.

    Attributes:
        results: The content of results.json.
        retrieval: Predictions, scores, first-hit ranks and recalls of every alpha.
        database_descriptors: ``[N, D]`` (zeros for unreadable images).
        query_descriptors: ``[K, Q, D]``.
        positives: Per-query positive database indices (readable database images only).
        output_dir: Where the files are.
        model: The model that was evaluated.
    """

    results: dict[str, Any]
    retrieval: Retrieval
    database_descriptors: np.ndarray
    query_descriptors: np.ndarray
    positives: list[np.ndarray]
    output_dir: Path
    model: DescriptorModel | None = None


def run_evaluation(config: EvalConfig, model: DescriptorModel | None = None) -> EvalResult | None:
    """Evaluates flood-query geo-localization for every alpha and writes the result files.

    Writes into ``config.output_dir``: ``results.json``, ``per_query.csv``, ``csv_results/alpha_<a>/``
    (the published code's ``individual_results.csv`` / ``aggregated_results.csv``), ``recall_vs_alpha.png``,
    ``eval.log`` and, with ``num_preds_to_save``, ``predictions/alpha_<a>/<query>.jpg``.

    In a multi-process run (:mod:`~attllm_jax.evaluation.hosts`) every process fills its share of the database
    store; then process 0 alone extracts the queries (a few hundred to thousands, small beside the database) and
    writes every result file. With ``--search exact_jax`` or ``approx_tpu`` every process searches its share of the
    database on its own devices (:mod:`~attllm_jax.retrieval.pod_search`); with faiss process 0 searches alone.
    The other processes then wait at a barrier. Each process logs to its own file beside the results: ``eval.log``
    (process 0), ``eval.process_<i>.log``.

    Args:
        config: The run's settings (validated here, before any work).
        model: Optional already loaded model (else loaded from ``config.checkpoint`` or built with random weights).

    Returns:
        The results and the arrays behind them (on process 0; None on the other processes).

    Raises:
        ValueError / FileNotFoundError: bad settings (an output folder inside an input folder too);
            CoordinateError: a file name without coordinates; OutputLockError: another run holds the output folder.
    """
    t_start = time.perf_counter()
    config = config.validated()
    config.check_output_outside_inputs()
    out = Path(config.output_dir)
    lock = OutputLock(out, "eval").acquire() if hosts.process_index() == 0 else None
    try:
        setup_logging(hosts.log_file(out, Path(LOG_FILE).stem))
        if lock is not None:
            lock.log_takeover()
            remove_previous_outputs(out, RESULTS_FILE, also=_legacy_outputs(out))
        log.info("evaluation settings: %s", json.dumps(asdict(config), default=str))
        log.info("hosts: %s", json.dumps(hosts.hosts_entry()))
        inputs = prepare_inputs(config, model)
        try:
            if lock is not None:
                try:
                    result = _evaluate_with_store(config, inputs, out, t_start)
                finally:
                    pod_search.finish_pod_searches(config.search)  # releases the other processes' search loop
            else:
                log.info("process %d: database share done; process 0 searches, writes results", hosts.process_index())
                if pod_search.pod_active(config.search):  # search this process's share of the database with process 0
                    contents = inputs.store.load()
                    pod_search.serve_pod_searches(contents.descriptors, contents.valid, config.search)
                result = None
        finally:
            inputs.store.close()
        hosts.barrier("evaluation_done")
    finally:
        if lock is not None:
            lock.release()
    return result


def _legacy_outputs(out: Path) -> list[str]:
    """What a run of a version whose results.json has no "outputs" list wrote (its alphas' CSVs, the figure)."""
    try:
        alphas = json.loads((out / RESULTS_FILE).read_text(encoding="utf-8")).get("alphas", [])
        keys = [alpha_key(float(a)) for a in alphas]
    except (OSError, ValueError, TypeError, AttributeError):
        keys = []
    csvs = [
        f"csv_results/alpha_{k}/{name}" for k in keys for name in ("individual_results.csv", "aggregated_results.csv")
    ]
    return ["per_query.csv", "recall_vs_alpha.png", *csvs]


def _evaluate_with_store(config: EvalConfig, inputs: EvalInputs, out: Path, t_start: float) -> EvalResult:
    database, queries, geo, attention = inputs.database, inputs.queries, inputs.geo, inputs.attention
    model, store, db_run, timings = inputs.model, inputs.store, inputs.db_run, inputs.timings
    contents = store.load()
    timings["database"] = db_run.seconds

    q = extract_queries(
        model,
        queries,
        attention.parsed,
        config.alphas,
        batch_size=config.batch_size,
        image_size=config.image_size,
        num_workers=config.num_workers,
        sigma=config.sigma,
        grid_interpolate=config.grid_interpolate,
        max_batch_pixels=config.max_batch_pixels,
    )
    timings["queries"] = q.seconds

    t0 = time.perf_counter()
    db_valid = contents.valid
    positives = [p[db_valid[p]] for p in inputs.positives_all]
    retrieval = retrieve(
        contents.descriptors,
        db_valid,
        q.descriptors,
        q.valid,
        positives,
        config.alphas,
        config.recall_values,
        inputs.top_m,
        spec=config.search,
        plan=inputs.plan,
        devices=None if pod_search.pod_active(config.search) else jax.local_devices(),
    )
    timings["search"] = time.perf_counter() - t0

    kinds = [_applied_kind(a, applied) for a, applied in zip(attention.parsed, q.with_attention, strict=True)]
    written = [out / "per_query.csv", out / "recall_vs_alpha.png"]
    write_per_query_csv(
        out / "per_query.csv",
        retrieval,
        queries.paths,
        database.paths,
        positives,
        q.valid,
        kinds,
        attention.point_counts(),
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
            num_evaluated=int(q.valid.sum()),
        )
    weights_note = model.spec.provenance.weights or f"checkpoint {config.checkpoint}"
    weights_label = model.spec.provenance.weights or f"checkpoint {shorten_path(config.checkpoint)}"
    plot_recall_vs_alpha(
        out / "recall_vs_alpha.png",
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
        written += _save_strips(
            out / "predictions", config, queries, database, attention.parsed, q, retrieval, positives, geo
        )

    no_positive = [queries.paths[i] for i, p in enumerate(positives) if len(p) == 0]
    notes = list(config.notes)
    if config.checkpoint is not None and (model.spec.provenance.weights or "").startswith("random"):
        notes.append(f"NOTE: the model's weights are {model.spec.provenance.weights}: results say nothing of a release")
    beyond = recall_beyond_database_note(config.recall_values, int(db_valid.sum()))
    if beyond:
        log.warning("%s", beyond)
        notes.append(f"WARNING: {beyond}")
    timings["total"] = time.perf_counter() - t_start
    results = {
        "model": model.spec.to_dict(),
        "precision": model.precision,
        "weights": {"source": weights_note, "sha256": inputs.digest},
        "num_database": len(database),
        "num_queries": len(queries),
        "database_folder": str(database.root),
        "queries_folder": str(queries.root),
        "preprocessing": preprocessing_used(model.spec.preprocess.to_dict(), config.image_size),
        "positive_dist_threshold": config.positive_dist_threshold,
        "recalls": retrieval.recalls_dict(),
        "alphas": list(config.alphas),
        "recall_values": list(config.recall_values),
        "distance": config.distance,
        "utm_zone": list(geo.zone) if geo.zone else None,
        "recall_denominator": "all queries (unreadable queries and queries without positives count as misses)",
        "queries_without_positives": {"count": len(no_positive), "queries": no_positive},
        "num_skipped": {"database": len(contents.failures), "queries": len(q.failures)},
        "skipped_images": {
            "database": contents.failures,
            "queries": [{"index": f.index, "path": f.path, "error": f.error} for f in q.failures],
        },
        "attention": {
            "source": attention.source,
            "counts": attention.counts,
            "queries_with_attention": int(q.with_attention.sum()),
            "queries_without_attention": int(len(queries) - q.with_attention.sum()),
            "missing_files": attention.missing,
            "unusable_files": attention.invalid,
            "unused_files": attention.unused,
            "dropped_entries": sum(d for _, d, _ in attention.point_counts()),
            "clamped_values": sum(c for _, _, c in attention.point_counts()),
            "adjusted_answers": attention.adjusted(list(queries.paths)),
            "sigma": config.sigma,
            "grid_interpolate": config.grid_interpolate,
        },
        "store": {
            "directory": str(store.directory),
            "dtype": store.dtype,
            "chunk_size": store.chunk_size,
            **db_run.entry(),
        },
        "search": retrieval.search_info,
        "hosts": hosts.hosts_entry(),
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "notes": notes,
        OUTPUTS_KEY: relative_outputs(out, written),
    }
    write_json(out / RESULTS_FILE, results)
    log.info(
        "recall@N (%%) over %d queries, positives within %g m:\n%s",
        len(queries),
        config.positive_dist_threshold,
        recall_table(retrieval),
    )
    log.info("results written to %s", out / RESULTS_FILE)
    return EvalResult(results, retrieval, contents.descriptors, q.descriptors, positives, out, model)


@dataclass
class EvalInputs:
    """What every evaluation of a dataset needs before any query is aggregated (see :func:`prepare_inputs`).

    Attributes:
        database: The database image set.
        queries: The query image set.
        geo: Database and query positions in one frame.
        positives_all: Per-query positive database indices (all database images, readable or not).
        attention: The parsed attention answer of every query.
        model: The model.
        digest: sha256 of its weights.
        store: The complete database descriptor store, open (the caller closes it).
        db_run: What filling the store did.
        timings: Seconds spent loading the model.
        top_m: Predictions kept per query.
        plan: The search's memory plan (decided before the database is extracted).
    """

    database: ImageSet
    queries: ImageSet
    geo: GeoPair
    positives_all: list[np.ndarray]
    attention: QueryAttention
    model: DescriptorModel
    digest: str
    store: DescriptorStore
    db_run: DatabaseExtraction
    timings: dict[str, float]
    top_m: int
    plan: MemoryPlan


def prepare_inputs(config: EvalConfig, model: DescriptorModel | None = None) -> EvalInputs:
    """Loads the datasets, positives, attention answers and model, plans the search and fills the database store.

    Args:
        config: Validated settings.
        model: Optional already loaded model.

    Returns:
        The inputs of an evaluation; close ``inputs.store`` when done.
    """
    database = load_image_set(config.database_folder, config.convention, config.database_csv)
    queries = load_image_set(config.queries_folder, config.convention, config.queries_csv)
    log.info(
        "database: %d images in %s; queries: %d images in %s", len(database), database.root, len(queries), queries.root
    )
    geo = geo_pair(database, queries, config.distance)
    positives_all = find_positives(geo.database, geo.queries, config.positive_dist_threshold, config.distance)
    attention = load_query_attention(queries, config.attention_dir, config.max_points)
    log.info("attention answers per kind: %s", attention.counts)

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    model = model if model is not None else load_eval_model(config)
    digest = weights_digest(model)
    timings["load_model"] = time.perf_counter() - t0
    log.info("model: %s, weights sha256 %s...", model, digest[:12])
    top_m = max(max(config.recall_values), config.num_preds_to_save)
    dim = model.spec.descriptor_dim
    plan = plan_memory(config.search, len(database), dim, len(config.alphas) * len(queries), top_m)
    log.info("search %s (%s requested); %s", config.search.resolved_method(), config.search.method, plan.describe())

    store, db_run = database_store(config, model, database, digest)
    return EvalInputs(
        database, queries, geo, positives_all, attention, model, digest, store, db_run, timings, top_m, plan
    )


def database_store(config: EvalConfig, model: DescriptorModel, database: ImageSet, digest: str | None = None):
    """:func:`~attllm_jax.evaluation.extract.build_database_store` with the run's store and batch settings.

    Returns:
        The open store (the caller closes it) and what filling it did.
    """
    return build_database_store(
        model,
        database,
        config.resolved_store_dir,
        chunk_size=config.resolved_chunk_size,
        store_dtype=config.store_dtype,
        batch_size=config.batch_size,
        image_size=config.image_size,
        num_workers=config.num_workers,
        weights_sha256=digest,
        max_batch_pixels=config.max_batch_pixels,
    )


def run_extraction(
    config: EvalConfig, model: DescriptorModel | None = None, log_dir: str | Path | None = None
) -> tuple[str, DatabaseExtraction]:
    """Builds the database store of ``config`` on its own (``python -m experiments.extract``), every process its share.

    Args:
        config: Validated settings (the queries folder is not read).
        model: Optional already loaded model.
        log_dir: Where ``extract.log`` (process 0) and ``extract.process_<i>.log`` go; None: stderr only.

    Returns:
        The store's directory or URL, and what the extraction did (every process's figures on process 0).
    """
    setup_logging(None if log_dir is None else hosts.log_file(log_dir, "extract"))
    log.info("extraction settings: %s", json.dumps(asdict(config), default=str))
    log.info("hosts: %s", json.dumps(hosts.hosts_entry()))
    database = load_image_set(config.database_folder, config.convention, config.database_csv)
    model = model if model is not None else load_eval_model(config)
    store, summary = database_store(config, model, database)
    store.close()
    return str(store.directory), summary


def _applied_kind(parsed, applied: bool) -> str:
    if parsed is None:
        return "missing"
    return parsed.kind if applied or not parsed.has_attention else "unreadable"


def _distances_m(geo, query: int, database_indices: list[int]) -> np.ndarray:
    """Metres from one query to some database images, in the frame positives were found in."""
    if not database_indices:
        return np.zeros(0)
    db, qp = geo.database[database_indices], geo.queries[query]
    if geo.metric == "haversine":
        return haversine_m(db[:, 0], db[:, 1], qp[0], qp[1])
    return np.hypot(db[:, 0] - qp[0], db[:, 1] - qp[1])


def strip_names(paths: list[str]) -> list[str]:
    """The prediction strip of each query, relative to ``predictions/alpha_<a>/``: its relative path with ``.jpg``.

    Queries ``a/X.jpg`` and ``b/X.jpg`` get ``a/X.jpg`` and ``b/X.jpg``; names that still meet (``X.jpg`` and
    ``X.png``) keep their own suffix before ``.jpg`` (``X.jpg.jpg``, ``X.png.jpg``).
    """
    plain = [Path(p).with_suffix(".jpg").as_posix() for p in paths]
    taken = {name: plain.count(name) for name in plain}
    return [name if taken[name] == 1 else f"{p}.jpg" for name, p in zip(plain, paths, strict=True)]


def _save_strips(
    directory: Path, config: EvalConfig, queries, database, parsed, q, retrieval, positives, geo
) -> list[Path]:
    """Writes the prediction strips of every readable query and alpha; returns their paths."""
    k_preds = config.num_preds_to_save
    names = strip_names(list(queries.paths))
    written = []
    for qi in range(len(queries)):
        if not q.valid[qi]:
            continue
        answer = parsed[qi]
        overlay = None
        if answer is not None and answer.has_attention:
            overlay = np.asarray(
                attention_maps([answer], 24, 32, sigma=config.sigma, grid_interpolate=config.grid_interpolate)
            )[0]
        pos = set(positives[qi].tolist())
        kind = _applied_kind(answer, bool(q.with_attention[qi]))
        for k, alpha in enumerate(retrieval.alphas):
            preds = [int(i) for i in retrieval.predictions[k, qi, :k_preds] if i >= 0]
            scores = retrieval.scores[k, qi, : len(preds)]
            distances = _distances_m(geo, qi, preds)
            rank = retrieval.first_hit[k, qi]
            first = "no positive in the top results" if rank < 0 else f"first positive at rank {int(rank) + 1}"
            radius = f"positives within {config.positive_dist_threshold:g} m"
            title = f"alpha {alpha:g} | {queries.paths[qi]} | {first} | {radius}"
            written.append(directory / f"alpha_{alpha_key(alpha)}" / names[qi])
            save_prediction_strip(
                written[-1],
                queries.absolute(qi),
                [
                    Prediction(database.absolute(i), i in pos, float(score), float(dist))
                    for i, score, dist in zip(preds, scores, distances, strict=True)
                ],
                overlay if alpha > 0 else None,
                title,
                query_label=f"query, attention: {kind}",
            )
    return written
