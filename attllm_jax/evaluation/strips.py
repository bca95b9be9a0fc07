"""Prediction strips of an evaluation: per query and alpha, the query beside its top predictions (part of the report).

``predictions/alpha_<a>/<query>.jpg`` for every readable query, written with ``--num_preds_to_save``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from attllm_jax.attention.maps import attention_maps
from attllm_jax.attention.parse import ParsedAttention
from attllm_jax.data.dataset import GeoPair, ImageSet
from attllm_jax.evaluation.config import EvalConfig, alpha_key
from attllm_jax.evaluation.extract import QueryDescriptors
from attllm_jax.evaluation.figures import Prediction, save_prediction_strip
from attllm_jax.retrieval.positives import haversine_m
from attllm_jax.retrieval.retrieve import Retrieval

OVERLAY_GRID = (24, 32)  # (rows, columns) of the attention overlay drawn on a strip's query


def applied_kind(parsed: ParsedAttention | None, applied: bool) -> str:
    """The attention a query ran with: its answer's kind, "missing", or "unreadable" when it had one that was not
    applied (the query could not be read)."""
    if parsed is None:
        return "missing"
    return parsed.kind if applied or not parsed.has_attention else "unreadable"


def distances_m(geo: GeoPair, query: int, database_indices: list[int]) -> np.ndarray:
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


def _overlay(answer: ParsedAttention | None, config: EvalConfig) -> np.ndarray | None:
    """The ``[24, 32]`` attention map drawn over a query, or None when it has no attention."""
    if answer is None or not answer.has_attention:
        return None
    rows, cols = OVERLAY_GRID
    maps = attention_maps([answer], rows, cols, sigma=config.sigma, grid_interpolate=config.grid_interpolate)
    return np.asarray(maps)[0]


def save_strips(
    directory: Path,
    config: EvalConfig,
    queries: ImageSet,
    database: ImageSet,
    parsed: list[ParsedAttention | None],
    extracted: QueryDescriptors,
    retrieval: Retrieval,
    positives: list[np.ndarray],
    geo: GeoPair,
) -> list[Path]:
    """Writes the prediction strips of every readable query and alpha; returns their paths."""
    names = strip_names(list(queries.paths))
    written = []
    for qi in range(len(queries)):
        if not extracted.valid[qi]:
            continue
        overlay = _overlay(parsed[qi], config)
        pos = set(positives[qi].tolist())
        kind = applied_kind(parsed[qi], bool(extracted.with_attention[qi]))
        for k, alpha in enumerate(retrieval.alphas):
            written.append(directory / f"alpha_{alpha_key(alpha)}" / names[qi])
            preds = [int(i) for i in retrieval.predictions[k, qi, : config.num_preds_to_save] if i >= 0]
            scores = retrieval.scores[k, qi, : len(preds)]
            distances = distances_m(geo, qi, preds)
            rank = retrieval.first_hit[k, qi]
            first = "no positive in the top results" if rank < 0 else f"first positive at rank {int(rank) + 1}"
            radius = f"positives within {config.positive_dist_threshold:g} m"
            save_prediction_strip(
                written[-1],
                queries.absolute(qi),
                [
                    Prediction(database.absolute(i), i in pos, float(score), float(dist))
                    for i, score, dist in zip(preds, scores, distances, strict=True)
                ],
                overlay if alpha > 0 else None,
                f"alpha {alpha:g} | {queries.paths[qi]} | {first} | {radius}",
                query_label=f"query, attention: {kind}",
            )
    return written
