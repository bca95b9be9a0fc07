"""The evaluation pipeline behind ``python -m experiments.eval``: the stages of :mod:`attllm_jax.evaluation.stages`
in order (docs/DESIGN.md section 5).

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

from attllm_jax.data.dataset import GeoPair, ImageSet
from attllm_jax.evaluation import hosts
from attllm_jax.evaluation.attention_source import QueryAttention
from attllm_jax.evaluation.config import EvalConfig, alpha_key
from attllm_jax.evaluation.ensemble import evaluate_sources
from attllm_jax.evaluation.extract import DatabaseExtraction
from attllm_jax.evaluation.post_search import post_search
from attllm_jax.evaluation.progress import setup_logging
from attllm_jax.evaluation.report import RESULTS_FILE, EvalRun, write_eval_report
from attllm_jax.evaluation.stages import (
    DatabaseStage,
    ImageSets,
    LoadedModel,
    ModelLoadError,
    RerankInput,
    SearchPlan,
    extract_query_descriptors,
    load_attention,
    load_database_set,
    load_eval_model,
    load_image_sets,
    open_database,
    plan_search,
    prepare_model,
    rerank,
    search,
)
from attllm_jax.evaluation.strips import strip_names
from attllm_jax.models.vpr import DescriptorModel
from attllm_jax.outputs import OutputLock, remove_previous_outputs
from attllm_jax.retrieval import pod_search
from attllm_jax.retrieval.retrieve import Retrieval, retrieve
from attllm_jax.retrieval.search import MemoryPlan
from attllm_jax.retrieval.store import DescriptorStore

log = logging.getLogger("attllm_jax.evaluation")

LOG_FILE = "eval.log"

# Imported from here by the front ends, localize and the tests (they moved to the stage and report modules).
__all__ = [
    "RESULTS_FILE",
    "EvalInputs",
    "EvalResult",
    "ModelLoadError",
    "database_store",
    "load_eval_model",
    "prepare_inputs",
    "retrieve",
    "run_evaluation",
    "run_extraction",
    "strip_names",
]


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


@dataclass(frozen=True)
class EvalInputs:
    """Stages 1-4 of an evaluation: what every evaluation of a dataset needs before any query is aggregated (see
    :func:`prepare_inputs`). The properties name the parts the tuning and the benchmarks read.

    Attributes:
        sets: Image sets, positions, positives (stage 1).
        attention: The parsed attention answer of every query (stage 2).
        loaded: The model and its weights digest (stage 3).
        search_plan: Predictions kept per query and the search's memory plan (decided before stage 4).
        db: The complete database descriptor store, open (the caller closes ``store``), and what filling it did.
    """

    sets: ImageSets
    attention: QueryAttention
    loaded: LoadedModel
    search_plan: SearchPlan
    db: DatabaseStage

    @property
    def database(self) -> ImageSet:
        return self.sets.database

    @property
    def queries(self) -> ImageSet:
        return self.sets.queries

    @property
    def geo(self) -> GeoPair:
        return self.sets.geo

    @property
    def positives_all(self) -> list[np.ndarray]:
        return self.sets.positives_all

    @property
    def model(self) -> DescriptorModel:
        return self.loaded.model

    @property
    def digest(self) -> str:
        return self.loaded.digest

    @property
    def store(self) -> DescriptorStore:
        return self.db.store

    @property
    def db_run(self) -> DatabaseExtraction:
        return self.db.extraction

    @property
    def timings(self) -> dict[str, float]:
        """Seconds spent loading the model (the first entry of every command's ``timings_s``)."""
        return {"load_model": self.loaded.seconds}

    @property
    def top_m(self) -> int:
        return self.search_plan.top_m

    @property
    def plan(self) -> MemoryPlan:
        return self.search_plan.memory


def prepare_inputs(config: EvalConfig, model: DescriptorModel | None = None) -> EvalInputs:
    """Stages 1-4: the datasets and positives, the attention answers, the model, the search plan, the database store.

    Args:
        config: Validated settings.
        model: Optional already loaded model.

    Returns:
        The inputs of an evaluation; close ``inputs.store`` when done.
    """
    sets = load_image_sets(config)
    attention = load_attention(config, sets.queries)
    loaded = prepare_model(config, model)
    plan = plan_search(config, len(sets.database), len(sets.queries), loaded.model.spec.descriptor_dim)
    db = open_database(config, loaded.model, sets.database, loaded.digest)
    return EvalInputs(sets, attention, loaded, plan, db)


def evaluate(config: EvalConfig, inputs: EvalInputs, out: Path, t_start: float) -> EvalResult:
    """Stages 5-8 on prepared inputs: query extraction, search, re-rank, report (written into ``out``)."""
    contents = inputs.db.contents()
    queries = extract_query_descriptors(config, inputs.queries, inputs.attention, inputs.model)
    found = search(config, contents, queries, inputs.positives_all, inputs.search_plan)
    ranked = rerank(RerankInput(found, queries, contents))
    extra = post_search(
        config, contents.descriptors, contents.valid, queries.descriptors, queries.valid, found.retrieval,
        found.positives, list(inputs.queries.paths), out, inputs.plan, jax.local_devices(),
        model=inputs.model, database_images=inputs.database,
    )  # fmt: skip
    if len(config.attention_dirs) > 1:
        first = (inputs.attention, queries, found.retrieval)
        entry, seconds = evaluate_sources(config, inputs.sets, inputs.model, contents, inputs.search_plan, first)
        extra.entries["attention_sources"], extra.timings["attention_sources"] = entry, seconds
    run = EvalRun(
        config, inputs.sets, inputs.attention, inputs.loaded, inputs.db, contents, queries, found, ranked, extra
    )
    results = write_eval_report(run, out, t_start)
    return EvalResult(
        results, ranked.retrieval, contents.descriptors, queries.descriptors, ranked.positives, out, inputs.model
    )


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
                    result = evaluate(config, inputs, out, t_start)
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


def database_store(
    config: EvalConfig, model: DescriptorModel, database: ImageSet, digest: str | None = None
) -> tuple[DescriptorStore, DatabaseExtraction]:
    """Stage 4 as a pair (:func:`~attllm_jax.evaluation.stages.open_database`): the open store (the caller closes
    it) and what filling it did."""
    stage = open_database(config, model, database, digest)
    return stage.store, stage.extraction


def run_extraction(
    config: EvalConfig, model: DescriptorModel | None = None, log_dir: str | Path | None = None
) -> tuple[str, DatabaseExtraction]:
    """Builds the database store of ``config`` on its own (``python -m experiments.extract``), every process its share:
    stages 1 (the database only), 3 and 4.

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
    database = load_database_set(config)
    loaded = prepare_model(config, model)
    stage = open_database(config, loaded.model, database, loaded.digest)
    stage.store.close()
    return str(stage.store.directory), stage.extraction
