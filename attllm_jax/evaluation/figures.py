"""Figures: recall@N against alpha, and per-query prediction strips."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageOps

GREEN, RED, GREY = (40, 170, 60), (210, 40, 40), (128, 128, 128)


def plot_recall_vs_alpha(
    path: str | os.PathLike, alphas: Sequence[float], recalls: np.ndarray, recall_values: Sequence[int], title: str
) -> None:
    """Saves a PNG with one line per N: recall@N (percent) against alpha.

    Args:
        path: Output PNG.
        alphas: ``[K]``.
        recalls: ``[K, len(recall_values)]`` percentages.
        recall_values: The N.
        title: Figure title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = np.argsort(alphas)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for j, n in enumerate(recall_values):
        ax.plot(np.asarray(alphas)[order], np.asarray(recalls)[order, j], marker="o", label=f"R@{n}")
    ax.set_xlabel("alpha (attention blend)")
    ax.set_ylabel("recall@N (%)")
    ax.set_title(title, fontsize=9)
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _thumbnail(path: str | os.PathLike, height: int) -> Image.Image:
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
    except Exception:  # noqa: BLE001 -- an unreadable image becomes a grey tile, the strip is still written
        return Image.new("RGB", (height * 4 // 3, height), GREY)
    width = max(1, round(image.width * height / image.height))
    return image.resize((width, height), Image.Resampling.BILINEAR)


def _heat(values: np.ndarray) -> np.ndarray:
    """[h, w] attention in [0, 2] -> RGB uint8: blue (0, noise) .. white (1, neutral) .. red (2, distinctive)."""
    t = np.clip(values / 2.0, 0.0, 1.0)[..., None]
    blue, white, red = np.array([40, 80, 230.0]), np.array([255, 255, 255.0]), np.array([230, 40, 40.0])
    low = blue + (white - blue) * (t / 0.5)
    high = white + (red - white) * ((t - 0.5) / 0.5)
    return np.where(t < 0.5, low, high).astype(np.uint8)


def overlay_attention(image: Image.Image, attention: np.ndarray | None, opacity: float = 0.45) -> Image.Image:
    """Blends a heat map of ``attention [h, w]`` (any grid size, resized bilinearly) over ``image``."""
    if attention is None:
        return image
    heat = Image.fromarray(_heat(np.asarray(attention, np.float32))).resize(image.size, Image.Resampling.BILINEAR)
    return Image.blend(image, heat, opacity)


def save_prediction_strip(
    path: str | os.PathLike,
    query_path: str | os.PathLike,
    prediction_paths: Sequence[str | os.PathLike],
    correct: Sequence[bool],
    attention: np.ndarray | None,
    caption: str,
    height: int = 160,
    border: int = 6,
) -> None:
    """Saves one query (with its attention overlay) and its top predictions framed green (correct) / red.

    Args:
        path: Output image (JPEG or PNG by extension).
        query_path: The query image.
        prediction_paths: Top-K database images, best first.
        correct: Whether each prediction is a positive.
        attention: The query's attention map ``[h, w]``, or None.
        caption: Text drawn above the strip.
        height: Thumbnail height in pixels.
        border: Frame width.
    """
    tiles = [ImageOps.expand(overlay_attention(_thumbnail(query_path, height), attention), border, fill=GREY)]
    for pred, ok in zip(prediction_paths, correct, strict=True):
        tiles.append(ImageOps.expand(_thumbnail(pred, height), border, fill=GREEN if ok else RED))
    gap, top = 4, 18
    width = sum(t.width for t in tiles) + gap * (len(tiles) - 1)
    canvas = Image.new("RGB", (width, tiles[0].height + top), (255, 255, 255))
    x = 0
    for tile in tiles:
        canvas.paste(tile, (x, top))
        x += tile.width + gap
    ImageDraw.Draw(canvas).text((4, 3), caption, fill=(0, 0, 0))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, quality=90)
