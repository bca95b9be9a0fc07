"""Attention maps for a batch of parsed answers, built with the jitted ops at static shapes."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from attllm_jax import ops
from attllm_jax.attention.parse import ParsedAttention, stack_attention


@functools.partial(jax.jit, static_argnames=("height", "width", "sigma"))
def _rbf_maps(centers: jax.Array, weights: jax.Array, valid: jax.Array, height: int, width: int, sigma: float):
    return ops.rbf_attention_map(centers, weights, height, width, sigma=sigma, valid=valid)


@functools.partial(jax.jit, static_argnames=("height", "width", "interpolate"))
def _blend_grid_maps(maps: jax.Array, rows: jax.Array, grids: jax.Array, height: int, width: int, interpolate: bool):
    grid_maps = ops.grid_attention_map(grids, height, width, interpolate=interpolate)
    return jnp.where(rows[:, None, None], grid_maps, maps)


@dataclass(frozen=True)
class MeanAttention:
    """An ensemble answer: the per-location mean of several sources' rendered maps of one image
    (docs/DESIGN.md section 13, "Attention ensembles").

    Attributes:
        parts: The answers that define attention (points or grid), one per source that has one; empty = no
            attention (the plain descriptor, as for a single source without an answer).
    """

    parts: tuple[ParsedAttention, ...]

    @property
    def has_attention(self) -> bool:
        return bool(self.parts)

    @property
    def kind(self) -> str:
        return "ensemble" if self.parts else "none"


Answer = ParsedAttention | MeanAttention | None


def attention_mask(parsed: Sequence[Answer]) -> np.ndarray:
    """bool [B]: True where the answer defines attention (points or grid).

    Use it to evaluate the other queries without attention (alpha = 0): under the native blend of
    modulated GeM an all-ones map with alpha > 0 is not the same as no attention.
    """
    return np.array([p is not None and p.has_attention for p in parsed], bool)


def attention_maps(
    parsed: Sequence[Answer],
    height: int,
    width: int,
    sigma: float = 0.2,
    grid_interpolate: bool = False,
    max_points: int | None = None,
) -> jax.Array:
    """Dense attention maps for a batch of answers.

    Point answers become RBF maps (:func:`attllm_jax.ops.rbf_attention_map`), grid answers grid maps
    (:func:`attllm_jax.ops.grid_attention_map`, sharp cells or bilinear with ``grid_interpolate``),
    and "none", "invalid" or None entries all-ones maps (neutral; see :func:`attention_mask` for
    turning attention off on those rows). A :class:`MeanAttention` entry is the mean of its parts' maps. All
    arrays have static shapes: one compile per (B, N_max, height, width) for points and per (B, n) for each grid
    size n present.

    Args:
        parsed: [B] answers from :func:`attllm_jax.attention.parse.parse_answer`, or None.
        height: h of the output maps.
        width: w of the output maps.
        sigma: RBF width in normalized image units.
        grid_interpolate: bilinear upsampling of grid answers instead of sharp cells.
        max_points: N_max of the stacked points (default: the largest among the answers).

    Returns:
        float32 [B, h, w] in [0, 2].

    Raises:
        ValueError: if ``parsed`` is empty or height/width are not positive.
    """
    if len(parsed) == 0:
        raise ValueError("attention_maps needs at least one answer (got an empty list)")
    if int(height) < 1 or int(width) < 1:
        raise ValueError(f"height and width must be positive, got {height}x{width}")
    if any(isinstance(p, MeanAttention) for p in parsed):
        return _mean_maps(parsed, height, width, sigma, grid_interpolate, max_points)
    batch = stack_attention(parsed, max_points)
    height, width = int(height), int(width)
    maps = _rbf_maps(batch.centers, batch.weights, batch.valid, height, width, float(sigma))
    for _, (rows, grids) in sorted(batch.grids.items()):
        maps = _blend_grid_maps(maps, rows, grids, height, width, bool(grid_interpolate))
    return maps


def _mean_maps(
    parsed: Sequence[Answer], height: int, width: int, sigma: float, grid_interpolate: bool, max_points: int | None
) -> jax.Array:
    """:func:`attention_maps` of a batch holding ensemble answers: slot j renders every row's j-th part (a plain
    answer is its row's only part), and each row takes the mean of its parts' maps (all ones without any)."""
    parts = [p.parts if isinstance(p, MeanAttention) else ((p,) if p is not None else ()) for p in parsed]
    total = jnp.zeros((len(parsed), int(height), int(width)), jnp.float32)
    count = np.zeros(len(parsed), np.float32)
    for j in range(max(len(r) for r in parts)):
        slot = [r[j] if j < len(r) else None for r in parts]
        taken = attention_mask(slot)
        maps = attention_maps(slot, height, width, sigma, grid_interpolate, max_points)
        total = total + jnp.where(jnp.asarray(taken)[:, None, None], maps, 0.0)
        count += taken
    mean = total / jnp.asarray(np.maximum(count, 1.0))[:, None, None]
    return jnp.where(jnp.asarray(count > 0)[:, None, None], mean, 1.0)
