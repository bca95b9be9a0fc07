"""Shortlist-symmetric attention: database-side attention for each query's top-K only (the paper's open question 4,
made affordable).

The first search gives every query (and alpha) its top-K database images. The union of those shortlists is
annotated once per database image: the answers are cached as attention files in one folder (the annotation
runner's resumable layout), so every query, alpha and later run reuses them. Each annotated image is described
again with its attention at ``alpha_db`` (the query pipeline's own extraction), each shortlist is re-scored with the
new descriptors and re-sorted (stable: equal scores keep the first search's order); ranks beyond K are unchanged.
A cost model (LLM calls, extra backbone passes, their projection to a large database) goes beside the recalls
(docs/DESIGN.md "Re-ranking and the paper's open questions").
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from attllm_jax.attention.store import find_attention_file, read_attention_file
from attllm_jax.data.dataset import ImageSet
from attllm_jax.retrieval.recall import first_hit_ranks, recall_from_ranks
from attllm_jax.retrieval.rerank import gather_rows
from attllm_jax.retrieval.retrieve import Retrieval

log = logging.getLogger("attllm_jax.evaluation")

PROJECTION = (1_000_000, 1000)  # database images, queries


@dataclass(frozen=True)
class SymmetricSpec:
    """The shortlist-symmetric stage.

    Attributes:
        k: Shortlist length per query (>= 1, at most the predictions kept).
        alpha_db: Blend factor of the database-side attention, in [0, 1].
        attention_dir: The cache: one attention file per annotated database image.
        cost_per_1000_calls: Price of 1000 LLM calls in the user's currency (None = not given: no cost estimate).
    """

    k: int
    alpha_db: float
    attention_dir: str
    cost_per_1000_calls: float | None = None


def shortlist_rows(predictions: np.ndarray, k: int) -> np.ndarray:
    """Sorted unique database indices in the top-``k`` of any query and alpha (``predictions`` ``[K, Q, M]``)."""
    top = np.asarray(predictions)[..., :k]
    return np.unique(top[top >= 0])


@dataclass
class Annotation:
    """What annotating a shortlist did.

    Attributes:
        parsed: One answer (or None: no usable file) per shortlisted image.
        calls: Answers asked of the provider in this run (cached images are not asked again).
        requests: Requests the provider sent (retries included; 0 for masks and stored files).
        failed: Images the provider could not answer.
    """

    parsed: list
    calls: int
    requests: int
    failed: int


def annotate_shortlist(database: ImageSet, rows: np.ndarray, spec: SymmetricSpec, provider, run_config) -> Annotation:
    """Annotates the shortlisted database images that have no usable file in ``spec.attention_dir`` yet.

    Args:
        database: The database images.
        rows: Shortlisted indices into ``database``.
        spec: The stage (its ``attention_dir`` is the cache).
        provider: An :class:`~attllm_jax.attention.providers.base.AnswerSource` (Gemini, OpenAI-compatible, the
            masks oracle, stored answers), or None to use only the files already in the cache.
        run_config: The annotation runner's :class:`~attllm_jax.attention.runner.RunConfig` (with a provider).

    Returns:
        The answers of ``rows`` (in order) and the call counts.
    """
    paths = [database.paths[int(i)] for i in rows]
    calls = requests = failed = 0
    if provider is not None and paths:
        from attllm_jax.attention.runner import annotate_folder

        summary = annotate_folder(database.root, spec.attention_dir, provider, run_config, images=paths)
        calls, requests, failed = summary.done, summary.requests, summary.failed
    parsed = []
    for path in paths:
        found = find_attention_file(spec.attention_dir, path)
        parsed.append(None if found is None else read_attention_file(found))
    return Annotation(parsed, calls, requests, failed)


@dataclass
class DescribedRows:
    """Database-side descriptors a run already computed at ``alpha_db``, by database row: a later symmetric call of
    the run (a chain after the stand-alone stage, tune's chains) describes only the rows it adds. Only rows whose
    attention was applied are kept; the others are described again (a later call may have their answer).

    Attributes:
        alpha_db: The blend factor they were described at.
        descriptors: Row -> ``[D]`` float32 descriptor with attention.
    """

    alpha_db: float
    descriptors: dict[int, np.ndarray] = field(default_factory=dict)


def describe_with_attention(model, database: ImageSet, rows: np.ndarray, parsed: list, alpha_db: float, **extract):
    """Descriptors of the shortlisted database images with their attention at ``alpha_db``, through the query
    extraction (:func:`~attllm_jax.evaluation.extract.extract_queries`; images without attention get the plain
    descriptor).

    Returns:
        ``(descriptors [n, D] float32, valid [n] bool, with_attention [n] bool, seconds)``.
    """
    from attllm_jax.evaluation.extract import extract_queries

    subset = replace(
        database,
        paths=tuple(database.paths[int(i)] for i in rows),
        locations=tuple(database.locations[int(i)] for i in rows),
    )
    q = extract_queries(model, subset, parsed, (float(alpha_db),), **extract)
    return q.descriptors[0], q.valid, q.with_attention, q.seconds


def rerank_shortlists(
    queries: np.ndarray,
    first: Retrieval,
    k: int,
    database,
    rows: np.ndarray,
    new_descriptors: np.ndarray,
    use_new: np.ndarray,
    positives: list[np.ndarray],
) -> Retrieval:
    """Re-scores each query's top-``k`` with the database-side descriptors and re-sorts it (stable).

    Args:
        queries: ``[K, Q, D]`` the descriptors of the first search.
        first: The first search.
        k: Shortlist length.
        database: ``[N, D]`` array-like, the store's descriptors (used where ``use_new`` is False).
        rows: ``[n]`` sorted shortlisted indices; new_descriptors: their ``[n, D]`` descriptors with attention;
            use_new: ``[n]`` bool, True where the new descriptor replaces the store's.
        positives: Q arrays of positive database indices (recall only).

    Returns:
        The re-ranked retrieval (ranks beyond ``k`` as in ``first``).
    """
    described = gather_rows(database, rows) if len(rows) else np.zeros((0, queries.shape[-1]), np.float32)
    described[use_new] = new_descriptors[use_new]
    top = first.predictions[..., :k]
    exists = top >= 0
    position = np.searchsorted(rows, np.where(exists, top, rows[0] if len(rows) else 0))
    vectors = described[position] if len(rows) else np.zeros((*top.shape, queries.shape[-1]), np.float32)
    scores = np.einsum("aqd,aqkd->aqk", queries.astype(np.float64), vectors.astype(np.float64))
    scores = np.where(exists, scores, -np.inf)
    order = np.argsort(-scores, axis=-1, kind="stable")
    predictions, new_scores = first.predictions.copy(), first.scores.copy()
    predictions[..., :k] = np.take_along_axis(top, order, -1)
    new_scores[..., :k] = np.take_along_axis(scores, order, -1).astype(np.float32)
    first_hit = np.stack([first_hit_ranks(p, positives) for p in predictions])
    recalls = np.stack([recall_from_ranks(h, first.recall_values) for h in first_hit])
    return Retrieval(first.alphas, predictions, new_scores, first_hit, recalls, first.recall_values, first.search_info)


def cost_model(
    spec: SymmetricSpec,
    num_database: int,
    num_queries: int,
    num_alphas: int,
    annotation: Annotation,
    rows,
    seconds,
    passes: int | None = None,
) -> dict[str, Any]:
    """The stage's cost, measured and projected (a 1 M database with 1000 queries; full symmetric annotation).

    Unique images are bounded by ``min(N, alphas x Q x k)``; the projection uses that bound (no shortlist overlap
    assumed: overlap measured on a small database does not carry over to a large one). ``passes``: the images
    described in ``seconds`` (default all of ``rows``; fewer when earlier calls of the run described the others).
    """
    unique = int(len(rows))
    passes = unique if passes is None else int(passes)
    price = spec.cost_per_1000_calls

    def cost(calls: int | float) -> float | None:
        return None if price is None else float(calls) / 1000.0 * float(price)

    per_pass = seconds / passes if passes else 0.0
    big_n, big_q = PROJECTION
    bound = min(big_n, big_q * spec.k * num_alphas)
    return {
        "unique_database_images_annotated": unique,
        "num_database": int(num_database),
        "fraction_of_database": unique / num_database if num_database else 0.0,
        "shortlist_entries": int(num_alphas * num_queries * spec.k),
        "llm_calls": annotation.calls,
        "llm_requests": annotation.requests,
        "reused_from_cache": unique - annotation.calls,
        "failed": annotation.failed,
        "cost_per_1000_calls": price,
        "estimated_cost": cost(annotation.calls),
        "extra_backbone_passes": passes,
        "descriptors_reused": unique - passes,
        "extra_backbone_seconds": round(float(seconds), 3),
        "full_symmetric": {"llm_calls": int(num_database), "estimated_cost": cost(num_database)},
        "projection": {
            "num_database": big_n,
            "num_queries": big_q,
            "num_alphas": num_alphas,
            "llm_calls_at_most": bound,
            "estimated_cost_at_most": cost(bound),
            "extra_backbone_seconds_at_most": round(bound * per_pass, 1),
            "full_symmetric_llm_calls": big_n,
            "full_symmetric_estimated_cost": cost(big_n),
            "note": "bound min(N, alphas x queries x k), no shortlist overlap assumed; seconds at this run's rate",
        },
    }


def run_symmetric(
    spec: SymmetricSpec,
    model,
    database: ImageSet,
    database_descriptors,
    queries: np.ndarray,
    first: Retrieval,
    positives: list[np.ndarray],
    provider=None,
    run_config=None,
    described: DescribedRows | None = None,
    **extract,
) -> tuple[Retrieval, dict[str, Any]]:
    """Annotates the shortlists (cached), describes them with attention and re-ranks them.

    Args:
        spec: The stage.
        model: The evaluated model; database: its database images; database_descriptors: ``[N, D]`` (the store).
        queries: ``[K, Q, D]``; first: the first search; positives: Q arrays (recall only).
        provider, run_config: Who answers (None: only the cached files), see :func:`annotate_shortlist`.
        described: Descriptors earlier calls of the run computed at ``spec.alpha_db`` (read and extended), or None.
        **extract: Batch settings of the extraction (``batch_size``, ``image_size``, ``sigma``, ...).

    Returns:
        The re-ranked retrieval and the cost model.
    """
    described = DescribedRows(spec.alpha_db) if described is None else described
    if described.alpha_db != spec.alpha_db:
        raise ValueError(f"descriptors described at alpha_db {described.alpha_db:g} reused at {spec.alpha_db:g}")
    rows = shortlist_rows(first.predictions, spec.k)
    Path(spec.attention_dir).mkdir(parents=True, exist_ok=True)
    annotation = annotate_shortlist(database, rows, spec, provider, run_config)
    todo = np.array([i for i, row in enumerate(rows) if int(row) not in described.descriptors], np.int64)
    t0 = time.perf_counter()
    if len(todo):
        parsed = [annotation.parsed[i] for i in todo]
        new, valid, applied, _ = describe_with_attention(model, database, rows[todo], parsed, spec.alpha_db, **extract)
        for j in np.flatnonzero(valid & applied):
            described.descriptors[int(rows[todo[j]])] = new[j]
    seconds = time.perf_counter() - t0
    use = np.array([int(row) in described.descriptors for row in rows], bool)
    vectors = np.zeros((len(rows), queries.shape[-1]), np.float32)
    for i in np.flatnonzero(use):
        vectors[i] = described.descriptors[int(rows[i])]
    found = rerank_shortlists(queries, first, spec.k, database_descriptors, rows, vectors, use, positives)
    costs = cost_model(spec, len(database), queries.shape[1], queries.shape[0], annotation, rows, seconds, len(todo))
    costs["with_attention"] = int(use.sum())
    log.info("shortlist-symmetric attention (k %d, alpha_db %g): %s", spec.k, spec.alpha_db, costs)
    return found, costs
