"""The attention answer of every query, read once from an annotation directory."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from attllm_jax.attention.parse import ParsedAttention
from attllm_jax.attention.store import find_attention_file, read_attention_file
from attllm_jax.data.dataset import ImageSet

log = logging.getLogger("attllm_jax.evaluation")
KINDS = ("points", "grid", "none", "invalid", "missing")


@dataclass
class QueryAttention:
    """Per-query answers and what was found.

    Attributes:
        parsed: One answer per query; None when the query has no attention file (or there is no directory).
        counts: Queries per kind: "points", "grid", "none", "invalid", "missing".
        missing: Query paths without an attention file.
        invalid: ``{"query", "file", "error"}`` for files that could not be used (e.g. truncated JSON).
        source: The annotation directory, or None.
    """

    parsed: list[ParsedAttention | None]
    counts: dict[str, int]
    missing: list[str] = field(default_factory=list)
    invalid: list[dict[str, str]] = field(default_factory=list)
    source: str | None = None


def load_query_attention(images: ImageSet, attention_dir: str | Path | None, max_points: int = 8) -> QueryAttention:
    """Reads the attention file of each query (``find_attention_file`` naming).

    Never raises for a bad file: a missing file or an unusable one (not JSON, truncated, no usable answer) means
    the query runs without attention, and is counted and listed.

    Args:
        images: The queries.
        attention_dir: The annotation directory, or None for no attention at all.
        max_points: Point slots per answer.

    Returns:
        The answers and the bookkeeping.
    """
    if attention_dir is None:
        return QueryAttention(
            [None] * len(images), {**dict.fromkeys(KINDS, 0), "missing": len(images)}, missing=list(images.paths)
        )
    parsed: list[ParsedAttention | None] = []
    counts: Counter = Counter()
    missing, invalid = [], []
    for rel in images.paths:
        path = find_attention_file(attention_dir, rel)
        if path is None:
            parsed.append(None)
            counts["missing"] += 1
            missing.append(rel)
            continue
        try:
            answer = read_attention_file(path, max_points=max_points)
        except OSError as error:
            answer = None
            invalid.append({"query": rel, "file": str(path), "error": f"{type(error).__name__}: {error}"})
            counts["invalid"] += 1
            parsed.append(None)
            continue
        parsed.append(answer)
        counts[answer.kind] += 1
        if answer.kind == "invalid":
            invalid.append({"query": rel, "file": str(path), "error": str(answer.error)})
    if missing:
        log.warning(
            "%d queries have no attention file in %s (they run without attention), first: %s",
            len(missing),
            attention_dir,
            missing[0],
        )
    if invalid:
        log.warning(
            "%d attention files are unusable (those queries run without attention), first: %s: %s",
            len(invalid),
            invalid[0]["file"],
            invalid[0]["error"],
        )
    return QueryAttention(parsed, {k: int(counts.get(k, 0)) for k in KINDS}, missing, invalid, str(attention_dir))
