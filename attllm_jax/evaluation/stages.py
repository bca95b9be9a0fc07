"""The stages every command composes (docs/DESIGN.md section 5, "Stages").

One function per stage, each taking the run's :class:`~attllm_jax.evaluation.config.EvalConfig` and the typed
outputs of the stages before it, and returning a typed output:

1. :func:`load_image_sets` -> :class:`ImageSets` (the database and query sets, their positions, the positives);
2. :func:`load_attention` -> :class:`~attllm_jax.evaluation.attention_source.QueryAttention`;
3. :func:`prepare_model` -> :class:`LoadedModel` (the model and its weights digest);
4. :func:`open_database` -> :class:`DatabaseStage` (the descriptor store opened, filled or resumed);
5. :func:`extract_query_descriptors` -> :class:`~attllm_jax.evaluation.extract.QueryDescriptors` (backbone
   features once per query, then every alpha in one vmapped aggregation);
6. :func:`plan_search` (before stage 4, so a search that cannot fit fails before any extraction) and
   :func:`search` -> :class:`SearchResult`;
7. :func:`rerank` -> :class:`Reranked` (a no-op today: the search's ranking, typed so a re-ranker plugs in);
8. the report: :mod:`attllm_jax.evaluation.report` (results.json from the typed outputs) for eval; tuning,
   severity and localize write their own.

``experiments.eval`` runs all eight (:func:`attllm_jax.evaluation.pipeline.run_evaluation`), ``experiments.extract``
1 (database only), 3 and 4; tuning 1-4 and its own cached 5-6; severity runs eval per water level.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import numpy as np

from attllm_jax.attention.maps import Answer
from attllm_jax.data.dataset import GeoPair, ImageSet, geo_pair, load_image_set
from attllm_jax.evaluation.attention_source import QueryAttention, load_query_attention
from attllm_jax.evaluation.config import EvalConfig
from attllm_jax.evaluation.demo import random_model
from attllm_jax.evaluation.extract import (
    DatabaseExtraction,
    QueryDescriptors,
    build_database_store,
    extract_queries,
    weights_digest,
)
from attllm_jax.models.vpr import DescriptorModel
from attllm_jax.retrieval import pod_search
from attllm_jax.retrieval.positives import find_positives
from attllm_jax.retrieval.retrieve import Retrieval, retrieve
from attllm_jax.retrieval.search import MemoryPlan, plan_memory
from attllm_jax.retrieval.store import DescriptorStore, StoreContents

log = logging.getLogger("attllm_jax.evaluation")


# ----------------------------------------------------------------------------------------------------------------
# 1. Image sets and positions


@dataclass(frozen=True)
class ImageSets:
    """The images of a run and where they were taken.

    Attributes:
        database: The database image set.
        queries: The query image set.
        geo: Database and query positions in one frame.
        positives_all: Per-query positive database indices (all database images, readable or not).
    """

    database: ImageSet
    queries: ImageSet
    geo: GeoPair
    positives_all: list[np.ndarray]


def load_database_set(config: EvalConfig) -> ImageSet:
    """Stage 1 for the commands that need only the database (extract, localize)."""
    return load_image_set(config.database_folder, config.convention, config.database_csv)


def load_image_sets(config: EvalConfig) -> ImageSets:
    """Stage 1: the database and query sets, their positions in one frame and each query's positives.

    Raises:
        CoordinateError: a file name without coordinates (naming it); FileNotFoundError: a missing folder.
    """
    database = load_database_set(config)
    queries = load_image_set(config.queries_folder, config.convention, config.queries_csv)
    log.info(
        "database: %d images in %s; queries: %d images in %s", len(database), database.root, len(queries), queries.root
    )
    geo = geo_pair(database, queries, config.distance)
    positives_all = find_positives(geo.database, geo.queries, config.positive_dist_threshold, config.distance)
    return ImageSets(database, queries, geo, positives_all)


# ----------------------------------------------------------------------------------------------------------------
# 2. The attention source


def load_attention(config: EvalConfig, queries: ImageSet) -> QueryAttention:
    """Stage 2: the parsed attention answer of every query (None where there is none; bad files counted)."""
    attention = load_query_attention(queries, config.attention_dir, config.max_points)
    log.info("attention answers per kind: %s", attention.counts)
    return attention


# ----------------------------------------------------------------------------------------------------------------
# 3. The model


class ModelLoadError(ValueError):
    """The --checkpoint directory does not hold a loadable converted model (bad config.json, state, fields)."""


@dataclass(frozen=True)
class LoadedModel:
    """The model of a run.

    Attributes:
        model: The model (a :class:`~attllm_jax.models.vpr.DescriptorModel`).
        digest: sha256 of its weights (keys the descriptor stores).
        seconds: Wall time of loading it and hashing its weights.
    """

    model: DescriptorModel
    digest: str
    seconds: float


def load_eval_model(config: EvalConfig) -> DescriptorModel:
    """The converted model of ``config.checkpoint``, or the random-weight ``config.random_model`` (CosPlace
    ResNet-18/512 by default; :func:`attllm_jax.evaluation.demo.random_model`).

    Raises:
        ModelLoadError: naming the checkpoint directory, when its config or state cannot be loaded.
    """
    if config.checkpoint is None:
        return random_model(config.random_model, config.model_seed, precision=config.precision)
    from attllm_jax.checkpoint import load_model as load_checkpoint  # orbax: only when a checkpoint is read

    try:
        return load_checkpoint(config.checkpoint, precision=config.precision)
    except (ValueError, KeyError, TypeError, FileNotFoundError) as error:  # malformed config.json or state
        detail = f"missing field {error}" if isinstance(error, KeyError) else str(error)
        raise ModelLoadError(
            f"--checkpoint {config.checkpoint}: cannot load the model ({type(error).__name__}: {detail}); "
            "convert the PyTorch checkpoint again with attllm-convert"
        ) from error


def prepare_model(config: EvalConfig, model: DescriptorModel | None = None) -> LoadedModel:
    """Stage 3: ``model`` if given, else :func:`load_eval_model`; with its weights digest."""
    t0 = time.perf_counter()
    model = model if model is not None else load_eval_model(config)
    digest = weights_digest(model)
    loaded = LoadedModel(model, digest, time.perf_counter() - t0)
    log.info("model: %s, weights sha256 %s...", model, digest[:12])
    return loaded


# ----------------------------------------------------------------------------------------------------------------
# 4. The database


@dataclass(frozen=True)
class DatabaseStage:
    """The database descriptor store of a run, complete and open (the caller closes ``store``).

    Attributes:
        store: The open store.
        extraction: What opening and filling it did (status, chunks and images computed, seconds).
    """

    store: DescriptorStore
    extraction: DatabaseExtraction

    def contents(self) -> StoreContents:
        """The store's descriptors ``[N, D]`` (read lazily), validity ``[N]`` and failure records."""
        return self.store.load()


def open_database(
    config: EvalConfig, model: DescriptorModel, database: ImageSet, digest: str | None = None
) -> DatabaseStage:
    """Stage 4: opens (creating, resuming or rebuilding) the run's store and fills its missing chunks
    (:func:`~attllm_jax.evaluation.extract.build_database_store`; every process its share)."""
    store, extraction = build_database_store(
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
    return DatabaseStage(store, extraction)


# ----------------------------------------------------------------------------------------------------------------
# 5. Query extraction


def extract_query_descriptors(
    config: EvalConfig, queries: ImageSet, attention: QueryAttention, model: DescriptorModel
) -> QueryDescriptors:
    """Stage 5: backbone features once per query, then the aggregation of every alpha of ``config`` at once.

    Returns:
        ``descriptors [K, Q, D]``, ``valid [Q]``, ``with_attention [Q]``, the unreadable queries and the seconds.
    """
    return describe_queries(config, queries, attention.parsed, model)


def describe_queries(
    config: EvalConfig, queries: ImageSet, answers: Sequence[Answer], model: DescriptorModel
) -> QueryDescriptors:
    """Stage 5 with given answers (one per query: parsed, an ensemble ``MeanAttention``, or None)."""
    return extract_queries(
        model,
        queries,
        answers,
        config.alphas,
        batch_size=config.batch_size,
        image_size=config.image_size,
        num_workers=config.num_workers,
        sigma=config.sigma,
        grid_interpolate=config.grid_interpolate,
        max_batch_pixels=config.max_batch_pixels,
    )


# ----------------------------------------------------------------------------------------------------------------
# 6. Search


@dataclass(frozen=True)
class SearchPlan:
    """How the search will run, decided before the database is extracted.

    Attributes:
        top_m: Predictions kept per query (the largest N of recall@N, or more for the prediction strips).
        memory: The search's memory plan.
    """

    top_m: int
    memory: MemoryPlan


def plan_search(config: EvalConfig, num_database: int, num_queries: int, descriptor_dim: int) -> SearchPlan:
    """Stage 6, first half: the predictions kept per query and the memory plan of searching every alpha."""
    top_m = max(max(config.recall_values), config.num_preds_to_save)
    memory = plan_memory(config.search, num_database, descriptor_dim, len(config.alphas) * num_queries, top_m)
    log.info("search %s (%s requested); %s", config.search.resolved_method(), config.search.method, memory.describe())
    return SearchPlan(top_m, memory)


@dataclass(frozen=True)
class SearchResult:
    """The search of every alpha.

    Attributes:
        retrieval: Predictions ``[K, Q, M]``, scores, first-hit ranks ``[K, Q]`` and recall@N per alpha.
        positives: Per-query positive database indices among the readable database images.
        seconds: Wall time of the search.
    """

    retrieval: Retrieval
    positives: list[np.ndarray]
    seconds: float


def readable_positives(positives_all: list[np.ndarray], database_valid: np.ndarray) -> list[np.ndarray]:
    """Each query's positives without the database images that could not be read (they are never retrieved)."""
    return [p[database_valid[p]] for p in positives_all]


def search(
    config: EvalConfig,
    database: StoreContents,
    queries: QueryDescriptors,
    positives_all: list[np.ndarray],
    plan: SearchPlan,
) -> SearchResult:
    """Stage 6: top-M search of every alpha's query descriptors in the database's readable rows, then recall@N.

    Args:
        config: The run's settings (search method, alphas, recall values).
        database: The store's contents: descriptors ``[N, D]``, ``valid [N]``.
        queries: Stage 5's output: descriptors ``[K, Q, D]``, ``valid [Q]``.
        positives_all: Per-query positives over all database images.
        plan: :func:`plan_search`'s output.
    """
    t0 = time.perf_counter()
    positives = readable_positives(positives_all, database.valid)
    retrieval = retrieve(
        database.descriptors,
        database.valid,
        queries.descriptors,
        queries.valid,
        positives,
        config.alphas,
        config.recall_values,
        plan.top_m,
        spec=config.search,
        plan=plan.memory,
        # None: every device of every process searches its share (retrieval.pod_search); else this process's own
        devices=None if pod_search.pod_active(config.search) else jax.local_devices(),
    )
    return SearchResult(retrieval, positives, time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------------------------------
# 7. Re-rank


@dataclass(frozen=True)
class RerankInput:
    """What a re-ranker may use: the search's ranking and the descriptors behind it.

    Attributes:
        search: Stage 6's output (predictions ``[K, Q, M]`` and scores per alpha, the readable positives).
        queries: Stage 5's output (descriptors ``[K, Q, D]``, ``valid [Q]``).
        database: The store's contents (descriptors ``[N, D]``, ``valid [N]``).
    """

    search: SearchResult
    queries: QueryDescriptors
    database: StoreContents


@dataclass(frozen=True)
class Reranked:
    """The final ranking of every alpha.

    Attributes:
        retrieval: Predictions, scores, first-hit ranks and recalls after re-ranking.
        positives: Per-query positives among the readable database images (as searched).
        method: The re-ranker, "none" when the search's ranking is kept.
    """

    retrieval: Retrieval
    positives: list[np.ndarray]
    method: str = "none"


def rerank(request: RerankInput) -> Reranked:
    """Stage 7: a no-op today; the search's ranking is returned unchanged, typed as every re-ranker's output."""
    return Reranked(request.search.retrieval, request.search.positives)
