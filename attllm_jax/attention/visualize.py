"""A picture of one answer: the photo, its attention map as a heat overlay, the points with their
weights and reasoning (or the grid cells with their weights)."""

from __future__ import annotations

import os
import textwrap

import numpy as np
from PIL import Image

from attllm_jax.attention.maps import attention_maps
from attllm_jax.attention.overlay import resize_longest_side
from attllm_jax.attention.parse import ParsedAttention
from attllm_jax.files import atomic_write


def wrap_title(lines: list[str], fig_width_in: float, fontsize: float = 11.0) -> str:
    """Title lines wrapped to the figure's width (a long photo name, e.g. a crowdsourced file's, would otherwise run
    past both edges of the figure: the title is centred over the axes). Long names break anywhere."""
    max_chars = max(20, int(fig_width_in * 72 / (0.6 * fontsize) * 0.85))  # ~0.6 em per character, a margin
    wrapped = [textwrap.fill(line, max_chars, break_long_words=True, break_on_hyphens=False) for line in lines]
    return "\n".join(wrapped)


def render_attention(
    photo: Image.Image,
    parsed: ParsedAttention,
    output: str | os.PathLike,
    sigma: float = 0.2,
    grid_interpolate: bool = False,
    max_side: int = 1024,
    title: str | None = None,
    map_resolution: int = 96,
) -> np.ndarray:
    """Draws the photo with its attention map and writes a PNG.

    Args:
        photo: the photo.
        parsed: its parsed answer.
        output: the PNG to write.
        sigma: RBF width of point answers.
        grid_interpolate: bilinear grid maps instead of sharp cells.
        max_side: the photo is shown with its longest side at most this.
        title: a first title line (e.g. the file name and model).
        map_resolution: the map's longest side (it is drawn stretched over the photo).

    Returns:
        The map that was drawn, float32 [h, w].
    """
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    photo = resize_longest_side(photo.convert("RGB"), max_side)
    width, height = photo.size
    scale = map_resolution / max(width, height)
    map_h, map_w = max(2, round(height * scale)), max(2, round(width * scale))
    heat = np.asarray(attention_maps([parsed], map_h, map_w, sigma=sigma, grid_interpolate=grid_interpolate))[0]

    has_notes = parsed.kind == "points"
    fig_w = 10.0
    fig_h = fig_w * height / width + (1.6 if has_notes else 0.6)
    fig = Figure(figsize=(fig_w, fig_h), dpi=100)
    ax = fig.add_subplot()
    # Pixel centres at 0..1 as in the maps (linspace(0, 1, n)): the photo spans half a pixel beyond.
    half_x, half_y = 0.5 / max(width - 1, 1), 0.5 / max(height - 1, 1)
    extent = (-half_x, 1 + half_x, 1 + half_y, -half_y)
    ax.imshow(photo, extent=extent)
    shown = ax.imshow(heat, extent=extent, cmap="jet", vmin=0.0, vmax=2.0, alpha=0.45, interpolation="bilinear")
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    ax.set_aspect((height / (1 + 2 * half_y)) / (width / (1 + 2 * half_x)))  # square photo pixels
    fig.colorbar(shown, ax=ax, fraction=0.03, pad=0.02, label="attention weight")

    notes = _draw_points(ax, parsed) if parsed.kind == "points" else []
    if parsed.kind == "grid":
        _draw_grid(ax, parsed.grid)
    ax.set_title(wrap_title([t for t in (title, answer_summary(parsed)) if t], fig_w), fontsize=11)
    ax.set_xticks(np.linspace(0, 1, 6))
    ax.set_yticks(np.linspace(0, 1, 6))
    if notes:
        wrapped = "\n".join(textwrap.shorten(note, 140) for note in notes)
        fig.text(0.02, 0.01, wrapped, fontsize=8, va="bottom", family="monospace")
    fig.tight_layout(rect=(0, 0.02 + 0.018 * len(notes), 1, 1))
    atomic_write(output, lambda f: fig.savefig(f, format="png"))
    return heat


def _draw_points(ax, parsed: ParsedAttention) -> list[str]:
    """Circles (sized by weight) and numbered labels at a point answer's centres; returns one note per point."""
    notes = []
    for i in np.flatnonzero(parsed.valid):
        x, y = parsed.centers[i]
        weight = float(parsed.weights[i])
        ax.scatter([x], [y], s=60 + 60 * weight, facecolors="none", edgecolors="white", linewidths=2)
        ax.annotate(
            f"{i + 1}: {weight:.1f}",
            (x, y),
            xytext=(6, -6),
            textcoords="offset points",
            color="white",
            fontsize=10,
            weight="bold",
            bbox={"facecolor": "black", "alpha": 0.5, "pad": 1, "edgecolor": "none"},
        )
        notes.append(f"{i + 1} ({weight:.1f}): {parsed.reasoning[i] or '-'}")
    return notes


def _draw_grid(ax, grid: np.ndarray) -> None:
    """The ``[n, n]`` grid's lines and each cell's name (A1 top left) and weight."""
    n = grid.shape[0]
    for k in range(1, n):
        ax.axhline(k / n, color="white", linewidth=1)
        ax.axvline(k / n, color="white", linewidth=1)
    for r in range(n):
        for c in range(n):
            ax.text(
                (c + 0.5) / n,
                (r + 0.5) / n,
                f"{chr(ord('A') + r)}{c + 1}: {grid[r, c]:.1f}",
                ha="center",
                va="center",
                color="white",
                fontsize=9,
                bbox={"facecolor": "black", "alpha": 0.4, "pad": 1, "edgecolor": "none"},
            )


def answer_summary(parsed: ParsedAttention) -> str:
    """The title line saying what the answer was: its points, a grid, None, or why it is invalid."""
    summary = {
        "points": f"{parsed.num_points} points",
        "grid": "grid answer",
        "none": "answer None: no attention (single landmark)",
        "invalid": f"invalid answer: {parsed.error}",
    }[parsed.kind]
    if parsed.num_dropped:
        summary += f", {parsed.num_dropped} entries dropped"
    return summary
