"""The post-search stages on the tuning's spatial folds: query expansion (``--rerank``), shortlist-symmetric
attention (``--symmetric_k``) and their chains (``--chain_stages``).

Each fold's held-out queries are searched at the (alpha, sigma, blend) its training chose, and the stage runs on
top with its fixed parameters (they are not tuned). The held-out ranks of all folds are pooled into one recall with
its group-bootstrap interval, and paired with the plain held-out ranking of the same folds (``vs_plain``).

The symmetric stage is the evaluation's own (:func:`~attllm_jax.evaluation.post_search.symmetric_stage`) run once
over all folds: the folds' searches are stacked along the alpha axis with every query's predictions blanked (-1)
outside its own fold, so only held-out shortlists are annotated and described again, each database image once
(docs/DESIGN.md "Re-ranking and the paper's open questions").
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from attllm_jax.evaluation.post_search import symmetric_stage
from attllm_jax.evaluation.symmetric import DescribedRows
from attllm_jax.retrieval.recall import first_hit_ranks
from attllm_jax.retrieval.rerank import parse_reranks, rerank
from attllm_jax.retrieval.retrieve import Retrieval
from attllm_jax.tuning import cv, search

log = logging.getLogger("attllm_jax.tuning")

SYMMETRIC_COST_KEYS = (
    "unique_database_images_annotated",
    "num_database",
    "fraction_of_database",
    "llm_calls",
    "llm_requests",
    "reused_from_cache",
    "failed",
    "with_attention",
    "extra_backbone_passes",
    "descriptors_reused",
    "extra_backbone_seconds",
)


@dataclass(frozen=True)
class FoldSearch:
    """One fold's first search at the setting its training chose.

    Attributes:
        held: ``[h]`` indices of the fold's held-out queries.
        queries: ``[1, Q, D]`` every query's descriptor at that setting.
        first: The search of every query at that setting (``predictions [1, Q, M]``).
    """

    held: np.ndarray
    queries: np.ndarray
    first: Retrieval


@dataclass(frozen=True)
class Comparison:
    """What every stage's entry is compared with: the folds, their groups and the plain held-out ranks.

    Attributes:
        folds: tuning.json's ``folds`` (each gains the stage's held-out recalls).
        fold_of: ``[Q]`` fold of each query; groups: ``[Q]`` location group of each query.
        plain: ``[Q]`` plain held-out first-hit ranks; alpha0: ``[Q]`` first-hit ranks at alpha 0.
        recall_values: The N of recall@N; n_primary: the N of the headline McNemar test.
        samples, seed: The bootstrap's.
    """

    folds: list[dict[str, Any]]
    fold_of: np.ndarray
    groups: np.ndarray
    plain: np.ndarray
    alpha0: np.ndarray
    recall_values: tuple[int, ...]
    n_primary: int
    samples: int
    seed: int


def post_search_cv(source, config, comparison: Comparison, model=None, database_images=None, out=None) -> dict:
    """tuning.json's ``rerank``: each ``--rerank`` stage by kind, ``symmetric`` and ``chained.<kind>`` as asked.

    Args:
        source: The tuning's :class:`~attllm_jax.tuning.evaluate.CachedRetrieval`.
        config: The validated :class:`~attllm_jax.evaluation.config.EvalConfig` (``rerank``, ``symmetric_k``,
            ``alpha_db``, ``db_masks`` / ``db_provider`` / ``db_attention_dir``, ``chain_stages``).
        comparison: The folds and the plain ranking.
        model, database_images, out: The symmetric stage's model, database ImageSet and output folder (its
            default database attention cache is ``out/database_attention``).

    Returns:
        ``{"skipped": "no --rerank"}`` or one entry per kind, plus ``symmetric`` and ``chained`` when asked.
    """
    specs = parse_reranks(config.rerank)
    top_m = max(*source.recall_values, *(spec.k for spec in specs), int(config.symmetric_k))
    searches = fold_searches(source, comparison, top_m)
    part: dict[str, Any] = {} if specs else {"skipped": "no --rerank"}
    expanded: dict[str, list[tuple[Retrieval, np.ndarray]]] = {}
    for spec in specs:
        expanded[spec.kind] = [_expand(spec, source, s) for s in searches]
        ranks = pooled_ranks(searches, [found for found, _ in expanded[spec.kind]])
        part[spec.kind] = {"spec": spec.label(), "params": spec.params(), **_entry(ranks, comparison, spec.kind)}
    if int(config.symmetric_k) > 0:
        described = DescribedRows(config.alpha_db)  # the chains reuse the stage's database-side descriptors
        stage = _symmetric(config, source, searches, [s.queries for s in searches], [s.first for s in searches],
                           model, database_images, out, described)  # fmt: skip
        part["symmetric"] = {"params": _symmetric_params(config), **_with_cost(stage, comparison, "symmetric")}
        if config.chain_stages:
            part["chained"] = {}
            for spec in specs:
                found = [f for f, _ in expanded[spec.kind]]
                stage = _symmetric(config, source, searches, [q for _, q in expanded[spec.kind]], found, model,
                                   database_images, out, described)  # fmt: skip
                stages = [spec.label(), f"symmetric:k={config.symmetric_k},alpha_db={config.alpha_db:g}"]
                name = f"{spec.kind}+symmetric"
                part["chained"][spec.kind] = {"stages": stages, **_with_cost(stage, comparison, name)}
    return part


def fold_searches(source, comparison: Comparison, top_m: int) -> list[FoldSearch]:
    """Every fold's first search (top-``top_m``) at the (alpha, sigma, blend) its training chose."""
    searches = []
    for f, fold in enumerate(comparison.folds):
        best = fold["train_best"]
        queries, first = source.retrieval(best["alpha"], best["sigma"], best["blend"], top_m)
        searches.append(FoldSearch(np.flatnonzero(comparison.fold_of == f), queries, first))
    return searches


def _expand(spec, source, s: FoldSearch) -> tuple[Retrieval, np.ndarray]:
    """One fold's query expansion: the re-ranked retrieval and the expanded queries ``[1, Q, D]``."""
    return rerank(
        spec, source.database, source.database_valid, s.queries, source.features.valid, s.first, source.positives,
        search=source.search,
    )  # fmt: skip


def pooled_ranks(searches: list[FoldSearch], found: list[Retrieval]) -> np.ndarray:
    """``[Q]`` held-out first-hit ranks: each query's from its own fold's retrieval (``found[f]``)."""
    ranks = np.full(found[0].first_hit.shape[-1], -1, np.int64)
    for s, retrieval in zip(searches, found, strict=True):
        ranks[s.held] = retrieval.first_hit[0, s.held]
    return ranks


def stacked_held_out(searches: list[FoldSearch], retrievals: list[Retrieval], positives) -> Retrieval:
    """The folds' retrievals stacked along the alpha axis (``[F, Q, M]``), each query's predictions kept only in
    its own fold's row (-1 elsewhere), so a shortlist is taken of held-out queries only."""
    predictions = np.concatenate([r.predictions for r in retrievals]).copy()
    scores = np.concatenate([r.scores for r in retrievals]).copy()
    for f, s in enumerate(searches):
        outside = np.ones(predictions.shape[1], bool)
        outside[s.held] = False
        predictions[f, outside] = -1
        scores[f, outside] = -np.inf
    first_hit = np.stack([first_hit_ranks(p, positives) for p in predictions])
    alphas = tuple(float(a) for r in retrievals for a in r.alphas)
    base = retrievals[0]
    return replace(base, alphas=alphas, predictions=predictions, scores=scores, first_hit=first_hit,
                   recalls=np.concatenate([r.recalls for r in retrievals]))  # fmt: skip


@dataclass(frozen=True)
class _Stage:
    ranks: np.ndarray
    cost: dict[str, Any]


def _symmetric(config, source, searches, queries, firsts, model, database_images, out, described) -> _Stage:
    """The evaluation's symmetric stage over the stacked held-out searches; the pooled held-out ranks."""
    stacked = stacked_held_out(searches, firsts, source.positives)
    found, costs = symmetric_stage(
        config,
        model,
        database_images,
        source.database,
        np.concatenate(queries),
        stacked,
        source.positives,
        Path(out),
        described,
    )
    ranks = np.full(stacked.first_hit.shape[1], -1, np.int64)
    for f, s in enumerate(searches):
        ranks[s.held] = found.first_hit[f, s.held]
    cost = {key: costs[key] for key in SYMMETRIC_COST_KEYS if key in costs}
    cost["shortlist_entries"] = int(len(ranks) * int(config.symmetric_k))
    return _Stage(ranks, cost)


def _symmetric_params(config) -> dict[str, Any]:
    return {"k": int(config.symmetric_k), "alpha_db": float(config.alpha_db)}


def _with_cost(stage: _Stage, comparison: Comparison, name: str) -> dict[str, Any]:
    return {**_entry(stage.ranks, comparison, name), "cost": stage.cost}


def _entry(ranks: np.ndarray, comparison: Comparison, name: str) -> dict[str, Any]:
    """A stage's held-out recall (interval), gain over alpha 0 and paired comparison with the plain ranking;
    each fold gains ``<name>_heldout_recalls``."""
    c = comparison
    recall_values = c.recall_values
    for f, fold in enumerate(c.folds):
        held = np.flatnonzero(c.fold_of == f)
        fold[f"rerank_{name}_heldout_recalls"] = search.recalls_dict(ranks[held], recall_values)
    summary = cv.heldout_summary(ranks, c.alpha0, c.groups, recall_values, c.n_primary, c.samples, c.seed)
    vs_plain = cv.heldout_summary(ranks, c.plain, c.groups, recall_values, c.n_primary, c.samples, c.seed)
    log.info("%s held-out: %s", name, json.dumps(summary["heldout"]))
    return {
        "heldout": summary["heldout"],
        "gain_vs_alpha0": summary["gain_vs_alpha0"],
        "vs_plain": cv.paired(
            vs_plain,
            "re-ranked held-out hits minus plain held-out hits, same folds and alphas, paired group bootstrap",
        ),
    }
