"""Agreement of two attention sources (two providers, two models, or two runs of one): the paper's open
question 3, how much the choice of LLM matters.

Both answers of an image are rendered on one fixed grid with :func:`~attllm_jax.attention.maps.attention_maps`
(values in [0, 2], 1 = neutral) and compared cell by cell: Pearson and Spearman correlation, and the IoU of the
low-weight (``< 0.5``, distractors) and high-weight (``> 1.5``, distinctive) regions (docs/DESIGN.md
"Re-ranking and the paper's open questions"). A statistic that is undefined (a constant map has no correlation;
two empty regions have no IoU) is None and counted, never a made-up number.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import rankdata

from attllm_jax.attention.maps import attention_maps
from attllm_jax.attention.store import list_attention_files, read_attention_file

LOW, HIGH = 0.5, 1.5
GRID = (24, 32)


def pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    """Pearson correlation of two maps of one shape (flattened), or None when either is constant."""
    x, y = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    x, y = x - x.mean(), y - y.mean()
    denominator = np.sqrt((x @ x) * (y @ y))
    return None if denominator <= 1e-12 * max(1, x.size) else float((x @ y) / denominator)


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman correlation (Pearson of the average-tie ranks), or None when either map is constant."""
    return pearson(rankdata(np.ravel(a)), rankdata(np.ravel(b)))


def region_iou(a: np.ndarray, b: np.ndarray, region: str) -> float | None:
    """IoU of the cells of ``a`` and ``b`` in ``region`` ("low": ``< 0.5``; "high": ``> 1.5``); None when neither
    map has such a cell."""
    if region not in ("low", "high"):
        raise ValueError(f"region must be 'low' or 'high', got {region!r}")
    inside = (lambda m: np.asarray(m) < LOW) if region == "low" else (lambda m: np.asarray(m) > HIGH)
    union = np.count_nonzero(inside(a) | inside(b))
    return None if union == 0 else float(np.count_nonzero(inside(a) & inside(b)) / union)


def compare_maps(a: np.ndarray, b: np.ndarray) -> dict[str, float | None]:
    """Every statistic of two ``[H, W]`` maps: ``pearson``, ``spearman``, ``iou_low``, ``iou_high``."""
    if np.shape(a) != np.shape(b):
        raise ValueError(f"maps of different shapes {np.shape(a)} and {np.shape(b)}")
    return {
        "pearson": pearson(a, b),
        "spearman": spearman(a, b),
        "iou_low": region_iou(a, b, "low"),
        "iou_high": region_iou(a, b, "high"),
    }


@dataclass
class Agreement:
    """The comparison of two attention folders.

    Attributes:
        images: Per image compared: ``{"file", "kind_a", "kind_b", <statistics>}``.
        maps_a, maps_b: ``[n, H, W]`` rendered maps of the compared images (in ``images`` order).
        skipped: ``{"only_in_a": [...], "only_in_b": [...], "without_attention": [...]}`` file lists.
    """

    images: list[dict[str, Any]]
    maps_a: np.ndarray
    maps_b: np.ndarray
    skipped: dict[str, list[str]] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """Per statistic: images where it is defined, mean, median, quartiles; and the skip counts."""
        stats = {}
        for name in ("pearson", "spearman", "iou_low", "iou_high"):
            values = np.array([r[name] for r in self.images if r[name] is not None], np.float64)
            stats[name] = {"defined": int(len(values)), "undefined": int(len(self.images) - len(values))}
            if len(values):
                q1, median, q3 = np.quantile(values, [0.25, 0.5, 0.75])
                stats[name].update(mean=float(values.mean()), median=float(median), q1=float(q1), q3=float(q3))
        return {
            "compared": len(self.images),
            "statistics": stats,
            "skipped": {k: len(v) for k, v in self.skipped.items()},
        }

    def least_agreeing(self, count: int) -> list[int]:
        """Indices into ``images`` of the ``count`` lowest Pearson correlations (undefined ones last)."""
        key = [(r["pearson"] is None, r["pearson"] if r["pearson"] is not None else 0.0) for r in self.images]
        return sorted(range(len(self.images)), key=lambda i: key[i])[:count]


def compare_folders(
    dir_a: str | os.PathLike,
    dir_b: str | os.PathLike,
    grid: tuple[int, int] = GRID,
    sigma: float = 0.2,
    grid_interpolate: bool = False,
) -> Agreement:
    """Compares the attention files two folders share (same relative path).

    Args:
        dir_a, dir_b: Attention folders (``find_attention_file`` layout, ours or the published format).
        grid: ``(H, W)`` of the rendered maps.
        sigma, grid_interpolate: How answers are rendered (as in eval).

    Returns:
        The per-image statistics, the maps and what was skipped (files in one folder only; answers without
        attention, "none" or unusable, on either side).

    Raises:
        FileNotFoundError: naming a folder that does not exist.
    """
    for flag, folder in (("--a", dir_a), ("--b", dir_b)):
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"{flag} {str(folder)!r} is not a directory")
    files_a, files_b = set(list_attention_files(dir_a)), set(list_attention_files(dir_b))
    skipped = {"only_in_a": sorted(files_a - files_b), "only_in_b": sorted(files_b - files_a), "without_attention": []}
    names, parsed_a, parsed_b = [], [], []
    for name in sorted(files_a & files_b):
        a, b = read_attention_file(Path(dir_a) / name), read_attention_file(Path(dir_b) / name)
        if not (a.has_attention and b.has_attention):
            skipped["without_attention"].append(name)
            continue
        names.append(name)
        parsed_a.append(a)
        parsed_b.append(b)
    if not names:
        empty = np.zeros((0, *grid), np.float32)
        return Agreement([], empty, empty, skipped)
    maps_a = np.asarray(attention_maps(parsed_a, *grid, sigma=sigma, grid_interpolate=grid_interpolate))
    maps_b = np.asarray(attention_maps(parsed_b, *grid, sigma=sigma, grid_interpolate=grid_interpolate))
    images = [
        {"file": n, "kind_a": pa.kind, "kind_b": pb.kind, **compare_maps(ma, mb)}
        for n, pa, pb, ma, mb in zip(names, parsed_a, parsed_b, maps_a, maps_b, strict=True)
    ]
    return Agreement(images, maps_a, maps_b, skipped)
