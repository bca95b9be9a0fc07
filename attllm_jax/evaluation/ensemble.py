"""``--attention_dir A,B``: every attention source and their mean map (the ensemble) evaluated in one run.

The first source is the run's own (its results are the top-level ones, unchanged). Every other source and the
ensemble cost one more query extraction and one more search each; the database store is shared. The ensemble's map
of a query is the per-location mean of the rendered maps of the sources whose answer defines attention (points or
grid) for it: a source with no file, a "none" or an unusable answer for that query is left out and the mean is over
the others; a query that no source answers gets the plain descriptor (docs/DESIGN.md section 13).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from attllm_jax.attention.maps import MeanAttention
from attllm_jax.evaluation.attention_source import QueryAttention, load_query_attention
from attllm_jax.evaluation.config import EvalConfig
from attllm_jax.evaluation.extract import QueryDescriptors
from attllm_jax.evaluation.stages import ImageSets, SearchPlan, describe_queries, search
from attllm_jax.models.vpr import DescriptorModel
from attllm_jax.retrieval.retrieve import Retrieval
from attllm_jax.retrieval.store import StoreContents

log = logging.getLogger("attllm_jax.evaluation")

RULE = (
    "per-location mean of the rendered maps of the sources whose answer defines attention for the query (points "
    "or grid); sources without one are left out; no source: the plain descriptor"
)


def ensemble_answers(sources: Sequence[QueryAttention]) -> list[MeanAttention]:
    """Per query, the ensemble of the sources' answers that define attention (in source order)."""
    num = len(sources[0].parsed)
    return [
        MeanAttention(tuple(s.parsed[q] for s in sources if s.parsed[q] is not None and s.parsed[q].has_attention))
        for q in range(num)
    ]


def sources_per_query(answers: Sequence[MeanAttention], num_sources: int) -> dict[str, int]:
    """``{"<n>": queries whose ensemble averages n sources}`` for n = 0 .. num_sources."""
    counts = [0] * (num_sources + 1)
    for answer in answers:
        counts[len(answer.parts)] += 1
    return {str(n): c for n, c in enumerate(counts)}


def _source_entry(directory: str, attention: QueryAttention, queries: QueryDescriptors, found: Retrieval) -> dict:
    return {
        "attention_dir": directory,
        "counts": attention.counts,
        "queries_with_attention": int(queries.with_attention.sum()),
        "recalls": found.recalls_dict(),
    }


def evaluate_sources(
    config: EvalConfig,
    sets: ImageSets,
    model: DescriptorModel,
    contents: StoreContents,
    plan: SearchPlan,
    first: tuple[QueryAttention, QueryDescriptors, Retrieval],
) -> tuple[dict[str, Any], float]:
    """Evaluates every source of ``config.attention_dirs`` and their ensemble.

    Args:
        config: The run's settings (two or more ``attention_dirs``).
        sets: The image sets and positives; model: the evaluated model; contents: the database store's contents;
        plan: the search plan of the run.
        first: The first source's answers, query descriptors and retrieval (the run's own: not computed again).

    Returns:
        results.json's ``attention_sources`` entry (``recalls`` keyed like the top-level ones) and the seconds.
    """
    t0 = time.perf_counter()
    sources, entries = [first[0]], [_source_entry(config.attention_dirs[0], *first)]
    for directory in config.attention_dirs[1:]:
        attention = load_query_attention(sets.queries, directory, config.max_points)
        described = describe_queries(config, sets.queries, attention.parsed, model)
        found = search(config, contents, described, sets.positives_all, plan).retrieval
        sources.append(attention)
        entries.append(_source_entry(directory, attention, described, found))
    answers = ensemble_answers(sources)
    described = describe_queries(config, sets.queries, answers, model)
    found = search(config, contents, described, sets.positives_all, plan).retrieval
    entry = {
        "sources": list(config.attention_dirs),
        "top_level": f"the first source, {config.attention_dirs[0]}",
        "per_source": entries,
        "ensemble": {
            "recalls": found.recalls_dict(),
            "queries_with_attention": int(described.with_attention.sum()),
            "sources_per_query": sources_per_query(answers, len(sources)),
            "rule": RULE,
        },
    }
    log.info("attention sources and their ensemble: %s", entry)
    return entry, time.perf_counter() - t0
