"""What eval does after its search, each part optional: saved query descriptors, query-expansion re-ranking
(``--rerank``), shortlist-symmetric attention (``--symmetric_k``), all of them chained (``--chain_stages``) and the
query-adaptive alpha (``--alpha_policy``).

:func:`post_search` is called once by the pipeline with the first search's retrieval; it returns the results.json
entries, the files it wrote and its timings (docs/DESIGN.md "Re-ranking and the paper's open questions").
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from attllm_jax.retrieval import adaptive
from attllm_jax.retrieval.recall import alpha_key, recall_from_ranks
from attllm_jax.retrieval.rerank import parse_reranks, rerank
from attllm_jax.retrieval.retrieve import Retrieval

log = logging.getLogger("attllm_jax.evaluation")

DESCRIPTORS_DIR = "descriptors"


@dataclass
class PostSearch:
    """What :func:`post_search` produced.

    Attributes:
        entries: results.json entries (``rerank``, ``symmetric``, ``chained``, ``alpha_policy``,
            ``saved_descriptors``), only those asked for.
        written: Files written (for results.json's outputs list).
        timings: Seconds per part (``rerank_<kind>``, ``save_descriptors``).
        retrievals: The re-ranked retrieval of every stage, by kind.
    """

    entries: dict[str, Any] = field(default_factory=dict)
    written: list[Path] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    retrievals: dict[str, Retrieval] = field(default_factory=dict)


def save_query_descriptors(
    directory: Path, alphas: Sequence[float], descriptors: np.ndarray, query_paths: Sequence[str]
) -> list[Path]:
    """Writes ``queries_alpha_<a>.npy`` (``[Q, D]`` float32, the rows eval searched with; zeros for unreadable
    queries) per alpha, and ``queries.txt`` (one query path per line, in row order).

    Args:
        directory: ``OUT/descriptors``.
        alphas: ``[K]``.
        descriptors: ``[K, Q, D]``.
        query_paths: Q paths relative to the queries folder.

    Returns:
        The files written.
    """
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for k, alpha in enumerate(alphas):
        written.append(directory / f"queries_alpha_{alpha_key(alpha)}.npy")
        np.save(written[-1], np.ascontiguousarray(descriptors[k], np.float32))
    written.append(directory / "queries.txt")
    written[-1].write_text("".join(f"{p}\n" for p in query_paths), encoding="utf-8")
    return written


def policy_entry(retrieval: Retrieval, policy: str) -> dict[str, Any]:
    """The ``alpha_policy`` entry: recall@N with each query at its label-free choice, and how often each alpha
    was picked."""
    choice = adaptive.choose_alphas(retrieval.scores, policy)
    ranks = adaptive.adaptive_first_hit(retrieval.first_hit, choice)
    recalls = recall_from_ranks(ranks, retrieval.recall_values)
    return {
        "policy": policy,
        "recalls": {str(int(n)): float(r) for n, r in zip(retrieval.recall_values, recalls, strict=True)},
        "alphas_chosen": adaptive.choice_counts(retrieval.alphas, choice),
    }


def post_search(
    config,
    database,
    database_valid: np.ndarray,
    queries: np.ndarray,
    queries_valid: np.ndarray,
    retrieval: Retrieval,
    positives: list[np.ndarray],
    query_paths: Sequence[str],
    out: Path,
    plan=None,
    devices: list | None = None,
    *,
    model=None,
    database_images=None,
) -> PostSearch:
    """Saves descriptors, re-ranks and applies the alpha policy as ``config`` asks (each optional).

    Args:
        config: The validated :class:`~attllm_jax.evaluation.config.EvalConfig` (``save_descriptors``,
            ``rerank``, ``alpha_policy``, ``search``).
        database: ``[N, D]`` array-like; database_valid: ``[N]`` bool.
        queries: ``[K, Q, D]`` the descriptors searched; queries_valid: ``[Q]`` bool.
        retrieval: The first search.
        positives: Q arrays of positive database indices (recall only).
        query_paths: Q query paths (``queries.txt``).
        out: The output folder.
        plan, devices: The first search's memory plan and devices (the re-ranking searches alike).
        model, database_images: The model and the database ImageSet (the symmetric stage describes images again).

    Returns:
        The entries, files and timings.
    """
    done = PostSearch()
    if config.save_descriptors:
        t0 = time.perf_counter()
        directory = out / DESCRIPTORS_DIR
        done.written += save_query_descriptors(directory, retrieval.alphas, queries, query_paths)
        done.entries["saved_descriptors"] = {
            "directory": DESCRIPTORS_DIR,
            "files": [p.name for p in done.written],
            "database": "in the store: attllm_jax.retrieval.read_store(results['store']['directory'])",
        }
        done.timings["save_descriptors"] = time.perf_counter() - t0
    expanded = _rerank_stages(
        config, database, database_valid, queries, queries_valid, retrieval, positives, done, plan, devices
    )
    described = None
    if config.symmetric_k:
        from attllm_jax.evaluation.symmetric import DescribedRows

        described = DescribedRows(config.alpha_db)  # the chains reuse the stage's database-side descriptors
        t0 = time.perf_counter()
        found, costs = symmetric_stage(
            config, model, database_images, database, queries, retrieval, positives, out, described
        )
        done.timings["symmetric"] = time.perf_counter() - t0
        done.retrievals["symmetric"] = found
        done.entries["symmetric"] = {
            "params": {"k": config.symmetric_k, "alpha_db": config.alpha_db},
            "recalls": found.recalls_dict(),
            "recalls_before": retrieval.recalls_dict(),
            "cost": costs,
        }
        log.info("shortlist-symmetric attention: recall@N (%%) before -> after:\n%s", _before_after(retrieval, found))
    if config.chain_stages:
        t0 = time.perf_counter()
        done.entries["chained"] = _chained(
            config, model, database_images, database, expanded, done, positives, out, described
        )
        done.timings["chained"] = time.perf_counter() - t0
    if config.alpha_policy:
        done.entries["alpha_policy"] = policy_entry(retrieval, config.alpha_policy)
        log.info("alpha policy %s: %s", config.alpha_policy, done.entries["alpha_policy"])
    return done


def _rerank_stages(
    config,
    database,
    database_valid,
    queries,
    queries_valid,
    retrieval: Retrieval,
    positives,
    done: PostSearch,
    plan,
    devices,
) -> dict[str, np.ndarray]:
    """Each ``--rerank`` stage from the first search, into ``done``; returns the expanded queries by kind."""
    stages: dict[str, Any] = {}
    expanded: dict[str, np.ndarray] = {}
    for spec in parse_reranks(config.rerank):
        t0 = time.perf_counter()
        found, expanded[spec.kind] = rerank(
            spec, database, database_valid, queries, queries_valid, retrieval, positives,
            search=config.search, plan=plan, devices=devices,
        )  # fmt: skip
        done.timings[f"rerank_{spec.kind}"] = time.perf_counter() - t0
        done.retrievals[spec.kind] = found
        stages[spec.kind] = {
            "spec": spec.label(),
            "params": spec.params(),
            "recalls": found.recalls_dict(),
            "recalls_before": retrieval.recalls_dict(),
        }
        if config.alpha_policy:
            stages[spec.kind]["alpha_policy"] = policy_entry(found, config.alpha_policy)
        log.info("re-ranking %s: recall@N (%%) before -> after:\n%s", spec.label(), _before_after(retrieval, found))
    if stages:
        done.entries["rerank"] = stages
    return expanded


def _chained(
    config, model, database_images, database, expanded, done: PostSearch, positives, out: Path, described=None
) -> dict:
    """All stages in one chain, per ``--rerank`` stage: its expanded queries' ranking, then the shortlist-symmetric
    re-ranking of that ranking (scored with the expanded queries), then ``--alpha_policy`` on the result. The
    database attention cache and the database-side descriptors (``described``) are shared with the stand-alone
    symmetric stage: an image is annotated and described once."""
    chains = {}
    for kind, queries in expanded.items():
        before = done.retrievals[kind]
        found, costs = symmetric_stage(
            config, model, database_images, database, queries, before, positives, out, described
        )
        done.retrievals[f"{kind}+symmetric"] = found
        chains[kind] = {
            "stages": [
                done.entries["rerank"][kind]["spec"],
                f"symmetric:k={config.symmetric_k},alpha_db={config.alpha_db:g}",
            ]
            + ([f"alpha_policy:{config.alpha_policy}"] if config.alpha_policy else []),
            "recalls": found.recalls_dict(),
            "recalls_before": before.recalls_dict(),
            "cost": costs,
        }
        if config.alpha_policy:
            chains[kind]["alpha_policy"] = policy_entry(found, config.alpha_policy)
        log.info("chained %s + symmetric: recall@N (%%) before -> after:\n%s", kind, _before_after(before, found))
    return chains


def symmetric_stage(config, model, database_images, database, queries, retrieval, positives, out: Path, described=None):
    """Runs :func:`~attllm_jax.evaluation.symmetric.run_symmetric` with the run's provider and batch settings
    (``described``: the run's :class:`~attllm_jax.evaluation.symmetric.DescribedRows`, or None)."""
    from attllm_jax.evaluation.symmetric import SymmetricSpec, run_symmetric

    directory = config.db_attention_dir or str(out / "database_attention")
    spec = SymmetricSpec(config.symmetric_k, config.alpha_db, directory, config.llm_cost_per_1000)
    provider, run_config = _database_provider(config)
    try:
        return run_symmetric(
            spec, model, database_images, database, queries, retrieval, positives, provider, run_config, described,
            batch_size=config.batch_size, image_size=config.image_size, num_workers=config.num_workers,
            sigma=config.sigma, grid_interpolate=config.grid_interpolate, max_batch_pixels=config.max_batch_pixels,
        )  # fmt: skip
    finally:
        if provider is not None:
            provider.close()


def _database_provider(config):
    """Who answers the database images not cached yet: the LLM of ``--db_provider`` (built by
    ``attention.sources.make_answer_source``, as annotate and localize build theirs), the masks oracle of
    ``--db_masks``, or nobody (None, None: the cached files only)."""
    from attllm_jax.attention.runner import RunConfig

    if config.db_provider is not None:
        from attllm_jax.attention import prompts
        from attllm_jax.attention.sources import make_answer_source

        prompt = prompts.get_prompt(config.db_prompt)
        run_config = RunConfig(city=config.db_city, prompt=prompt, workers=int(config.db_workers))
        return make_answer_source(config.db_provider), run_config
    if config.db_masks is not None:
        from attllm_jax.attention.masks import MASKS_PROMPT, MasksProvider

        return MasksProvider(config.db_masks), RunConfig(city="unknown", prompt=MASKS_PROMPT)
    return None, None


def _before_after(before: Retrieval, after: Retrieval) -> str:
    header = "alpha  " + "".join(f"{'R@' + str(n):>14}" for n in before.recall_values)
    rows = [header]
    for a, b, c in zip(before.alphas, before.recalls, after.recalls, strict=True):
        rows.append(f"{a:<7g}" + "".join(f"{x:6.1f} -> {y:5.1f}" for x, y in zip(b, c, strict=True)))
    return "\n".join(rows)
