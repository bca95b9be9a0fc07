"""Figures: recall@N against alpha, and per-query prediction strips.

``recall_vs_alpha.png``: one line per N, the model and data named in a two-line title (long checkpoint paths are
shortened to their last parts), the legend outside the axes so it never hides a point.

``predictions/alpha_<a>/<query stem>.jpg`` (JPEG, quality 90): the query (with its attention map blended over it
when alpha > 0) and its top-K database images, 256 px tall; under each prediction its rank, inner-product score and
distance to the query in metres, its frame green when it is a positive (within the threshold) and red otherwise;
under the query a colour key of the overlay (blue 0 = noise, white 1 = neutral, red 2 = distinctive).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from attllm_jax.data.images import open_image

GREEN, RED, GREY, BLACK, WHITE = (40, 170, 60), (210, 40, 40), (128, 128, 128), (0, 0, 0), (255, 255, 255)


def shorten_path(path: str, keep: int = 2, max_chars: int = 48) -> str:
    """The last ``keep`` parts of a long path, prefixed with ``.../`` (short paths unchanged)."""
    text = str(path)
    if len(text) <= max_chars:
        return text
    parts = Path(text).parts[-keep:]
    short = "/".join(parts)
    return ".../" + (short if len(short) <= max_chars else "..." + short[-max_chars:])


def plot_recall_vs_alpha(
    path: str | os.PathLike,
    alphas: Sequence[float],
    recalls: np.ndarray,
    recall_values: Sequence[int],
    title: str | Sequence[str],
) -> None:
    """Saves a PNG with one line per N: recall@N (percent) against alpha.

    Args:
        path: Output PNG.
        alphas: ``[K]``.
        recalls: ``[K, len(recall_values)]`` percentages.
        recall_values: The N.
        title: Figure title: a string, or lines (each drawn on its own line).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = np.argsort(alphas)
    lines = [title] if isinstance(title, str) else list(title)
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    markers = "osD^vP*X"
    for j, n in enumerate(recall_values):
        ax.plot(
            np.asarray(alphas)[order],
            np.asarray(recalls)[order, j],
            marker=markers[j % len(markers)],
            label=f"R@{n}",
        )
    ax.set_xlabel("alpha (attention blend)")
    ax.set_ylabel("recall@N (%)")
    ax.set_title("\n".join(lines), fontsize=9, loc="left")
    ax.set_ylim(-3, 103)  # points at 0 and 100 are drawn whole
    ax.margins(x=0.04)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _thumbnail(path: str | os.PathLike, height: int) -> Image.Image:
    try:
        image = open_image(path)
    except Exception:  # noqa: BLE001 -- an unreadable image becomes a grey tile, the strip is still written
        return Image.new("RGB", (height * 4 // 3, height), GREY)
    width = max(1, min(round(image.width * height / image.height), 4 * height))
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


def colour_key(width: int, opacity: float = 0.45, font_size: int = 13) -> Image.Image:
    """The overlay's colour key: the heat ramp 0..2 as blended over a mid-grey photo, labelled below."""
    bar_h = 12
    font = _font(font_size)
    ramp = _heat(np.linspace(0.0, 2.0, width, dtype=np.float32)[None].repeat(bar_h, 0))
    grey = np.full_like(ramp, 128)
    bar = Image.blend(Image.fromarray(grey), Image.fromarray(ramp), opacity)
    key = Image.new("RGB", (width, bar_h + font_size + 6), WHITE)
    key.paste(bar, (0, 0))
    draw = ImageDraw.Draw(key)
    for text, anchor_x, anchor in (
        ("0 noise", 0, "la"),
        ("1 neutral", width // 2, "ma"),
        ("2 distinctive", width, "ra"),
    ):
        draw.text((anchor_x, bar_h + 3), text, fill=BLACK, font=font, anchor=anchor)
    return key


@dataclass(frozen=True)
class Prediction:
    """One retrieved database image as drawn in a strip.

    Attributes:
        path: The database image.
        correct: Whether it is a positive of the query.
        score: Its inner-product score (cosine similarity for unit descriptors).
        distance_m: Its distance to the query in metres (None when unknown).
    """

    path: str | os.PathLike
    correct: bool
    score: float
    distance_m: float | None = None


def score_labels(scores, min_digits: int = 3, max_digits: int = 8) -> list[str]:
    """The scores written with the fewest decimals (at least ``min_digits``) that tell neighbouring scores apart.

    The top scores of a random-weight model differ by ~1e-4, so a fixed ``0.997`` would print one number three
    times. Scores that are equal to ``max_digits`` decimals are printed with ``max_digits``.
    """
    values = [float(v) for v in scores]
    for digits in range(min_digits, max_digits + 1):
        labels = [f"{v:.{digits}f}" for v in values]
        if all(a != b for a, b, x, y in zip(labels, labels[1:], values, values[1:], strict=False) if x != y):
            return labels
    return [f"{v:.{max_digits}f}" for v in values]


def save_prediction_strip(
    path: str | os.PathLike,
    query_path: str | os.PathLike,
    predictions: Sequence[Prediction],
    attention: np.ndarray | None,
    title: str,
    query_label: str = "query",
    height: int = 256,
    border: int = 6,
) -> None:
    """Saves one query (with its attention overlay) and its top predictions, labelled and framed by correctness.

    Args:
        path: Output image (JPEG or PNG by extension).
        query_path: The query image.
        predictions: Top-K database images, best first.
        attention: The query's attention map ``[h, w]`` drawn over it with a colour key, or None.
        title: Text drawn above the strip.
        query_label: Text under the query tile (e.g. the attention kind).
        height: Thumbnail height in pixels.
        border: Frame width.
    """
    font, small = _font(15), _font(13)
    line = 18
    tiles = [ImageOps.expand(overlay_attention(_thumbnail(query_path, height), attention), border, fill=GREY)]
    labels = [[query_label, "(attention overlay)" if attention is not None else "(no overlay)"]]
    scores = score_labels([pred.score for pred in predictions])
    for rank, pred in enumerate(predictions, start=1):
        tiles.append(ImageOps.expand(_thumbnail(pred.path, height), border, fill=GREEN if pred.correct else RED))
        distance = "distance ?" if pred.distance_m is None else f"{pred.distance_m:,.0f} m away"
        labels.append([f"#{rank}  score {scores[rank - 1]}", f"{distance}, {'positive' if pred.correct else 'wrong'}"])
    gap, top = 8, 2 * line + 8
    key = colour_key(min(tiles[0].width, 260)) if attention is not None else None
    below = 2 * line + 6 + (key.height + 4 if key is not None else 0)
    width = max(sum(t.width for t in tiles) + gap * (len(tiles) - 1), 600)
    canvas = Image.new("RGB", (width, top + tiles[0].height + below), WHITE)
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 4), title, fill=BLACK, font=font)
    draw.text(
        (4, 4 + line),
        "frame: green = positive, red = not a positive; score = descriptor inner product",
        fill=GREY,
        font=small,
    )
    x = 0
    for tile, texts in zip(tiles, labels, strict=True):
        canvas.paste(tile, (x, top))
        for i, text in enumerate(texts):
            draw.text((x + 2, top + tile.height + 3 + i * line), text, fill=BLACK, font=small)
        x += tile.width + gap
    if key is not None:
        canvas.paste(key, (0, top + tiles[0].height + 2 * line + 8))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, quality=90)
