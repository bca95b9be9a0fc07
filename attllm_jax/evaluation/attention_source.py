"""The attention answer of every query, read once from an annotation directory."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from attllm_jax.attention.parse import ParsedAttention
from attllm_jax.attention.store import find_attention_file, list_attention_files, read_attention_file
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
        invalid: ``{"query", "file", "error"}`` for files that could not be used (e.g. truncated JSON, too deep).
        source: The annotation directory, or None.
        unused: Attention files of the directory that belong to no query (paths relative to it).
    """

    parsed: list[ParsedAttention | None]
    counts: dict[str, int]
    missing: list[str] = field(default_factory=list)
    invalid: list[dict[str, str]] = field(default_factory=list)
    source: str | None = None
    unused: list[str] = field(default_factory=list)

    def point_counts(self) -> list[tuple[int, int, int]]:
        """Per query ``(points used, entries dropped, values clamped)``; zeros for queries without an answer."""
        return [(0, 0, 0) if p is None else (p.num_points, p.num_dropped, p.num_clamped) for p in self.parsed]

    def adjusted(self, query_paths: list[str]) -> list[dict[str, int | str]]:
        """``{"query", "points", "dropped", "clamped"}`` for every query whose answer lost or clamped something."""
        return [
            {"query": query, "points": used, "dropped": dropped, "clamped": clamped}
            for query, (used, dropped, clamped) in zip(query_paths, self.point_counts(), strict=True)
            if dropped or clamped
        ]


def load_query_attention(
    images: ImageSet, attention_dir: str | Path | None, max_points: int = 8, list_unused: bool = True
) -> QueryAttention:
    """Reads the attention file of each query (``find_attention_file`` naming).

    Never raises for a bad file: a missing file or an unusable one (not JSON, truncated, beyond the size, depth
    or type limits of :mod:`attllm_jax.attention.store`, unreadable, no usable answer) means the query runs
    without attention, and is counted and listed. Attention files that belong to no query are listed as unused.

    Args:
        images: The queries.
        attention_dir: The annotation directory, or None for no attention at all.
        max_points: Point slots per answer.
        list_unused: List the directory's files that belong to no query (False for a caller that reads the answers
            of a few queries at a time, e.g. localize's chunks: the others' files are not unused, and listing the
            whole directory per chunk would cost O(files) each time).

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
    used: set[Path] = set()
    for rel in images.paths:
        path = find_attention_file(attention_dir, rel)
        if path is None:
            parsed.append(None)
            counts["missing"] += 1
            missing.append(rel)
            continue
        used.add(path)
        try:
            answer = read_attention_file(path, max_points=max_points)
        except OSError as error:
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
    root = Path(attention_dir)
    unused = [name for name in list_attention_files(root) if root / name not in used] if list_unused else []
    if unused:
        log.warning("%d attention files belong to no query, first: %s", len(unused), unused[0])
    counted = {k: int(counts.get(k, 0)) for k in KINDS}
    return QueryAttention(parsed, counted, missing, invalid, str(attention_dir), unused)
