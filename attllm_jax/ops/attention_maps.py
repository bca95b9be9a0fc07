"""Dense attention maps from LLM answers: RBF maps from points, maps from grid cells, and resizing.

Every map is ``[B, h, w]`` on the feature grid, float32 (or wider), with values in ``[0, 2]``: 1 is
neutral, above 1 emphasizes a region, below 1 suppresses it.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from attllm_jax.ops.checks import as_float, check_size
from attllm_jax.ops.resize import bilinear_resize

MAX_WEIGHT = 2.0


def resize_attention(attention: ArrayLike, height: int, width: int) -> jax.Array:
    """Resizes attention maps bilinearly, as PyTorch's ``interpolate(mode="bilinear", align_corners=False)``.

    Output pixel ``i`` samples ``(i + 0.5) * in / out - 0.5`` (clamped below at 0) along each axis; there is
    no antialiasing when downsampling, as in PyTorch. A map of the target size is returned unchanged.

    Args:
        attention: maps ``[B, h, w]``.
        height: output height (static).
        width: output width (static).

    Returns:
        ``[B, height, width]`` in ``promote_types(attention.dtype, float32)``.

    Raises:
        ValueError: ``attention`` is not 3-D, or ``height``/``width`` is not a positive integer.
    """
    attention = as_float(attention)
    if attention.ndim != 3:
        raise ValueError(f"attention must have shape [B, h, w], got shape {attention.shape}")
    height, width = check_size(height, "height"), check_size(width, "width")
    _, h, w = attention.shape
    if (h, w) == (height, width):
        return attention
    return bilinear_resize(attention, height, width)


def rbf_attention_map(
    centers: ArrayLike,
    weights: ArrayLike,
    height: int,
    width: int,
    sigma: float | ArrayLike = 0.2,
    valid: ArrayLike | None = None,
) -> jax.Array:
    """Renders weighted points as a dense map by a softmax over Gaussian affinities.

    With ``ys = linspace(0, 1, height)``, ``xs = linspace(0, 1, width)`` and ``d_i`` the distance from
    ``(x, y)`` to centre ``i``::

        A(y, x) = clip(sum_i softmax_i(-d_i^2 / (2 sigma^2)) * weight_i, 0, 2)

    where the softmax runs over the valid points only. Centres are clamped to ``[0, 1]`` and weights to
    ``[0, 2]`` first. An image with no valid point gets an all-ones (neutral) map; one valid point gives a
    constant map equal to its weight. Differentiable in ``centers``, ``weights`` and ``sigma``.

    Args:
        centers: points ``[B, N, 2]`` as ``(x, y)``, ``(0, 0)`` top-left, ``(1, 1)`` bottom-right.
        weights: ``[B, N]``, 0 = noise, 1 = neutral, 2 = most distinctive.
        height: map height ``h`` (static).
        width: map width ``w`` (static).
        sigma: RBF width in normalized image units; scalar or ``[B]``, positive.
        valid: optional boolean ``[B, N]`` marking real points (False = padding). None: all valid.

    Returns:
        ``[B, h, w]`` float32 (or wider, following the inputs), values in ``[0, 2]``.

    Raises:
        ValueError: a shape does not match, ``height``/``width`` is not a positive integer, or a concrete
            ``sigma`` is not positive.
    """
    centers, weights = as_float(centers), as_float(weights)
    if centers.ndim != 3 or centers.shape[-1] != 2:
        raise ValueError(f"centers must have shape [B, N, 2], got shape {centers.shape}")
    batch, num = centers.shape[:2]
    if weights.shape != (batch, num):
        raise ValueError(f"weights must have shape {(batch, num)} to match centers, got shape {weights.shape}")
    if valid is None:
        valid = jnp.ones((batch, num), bool)
    else:
        valid = jnp.asarray(valid)
        if valid.shape != (batch, num):
            raise ValueError(f"valid must have shape {(batch, num)} to match centers, got shape {valid.shape}")
        valid = valid.astype(bool)
    height, width = check_size(height, "height"), check_size(width, "width")
    sigma = as_float(sigma)
    if sigma.ndim > 1 or (sigma.ndim == 1 and sigma.shape[0] != batch):
        raise ValueError(f"sigma must be a scalar or have shape [{batch}], got shape {sigma.shape}")
    if not isinstance(sigma, jax.core.Tracer) and not bool(np.all(np.asarray(sigma) > 0)):
        raise ValueError(f"sigma must be positive, got {np.asarray(sigma)}")
    return _rbf(centers, weights, valid, sigma, height=height, width=width)


@functools.partial(jax.jit, static_argnames=("height", "width"))
def _rbf(centers, weights, valid, sigma, height: int, width: int) -> jax.Array:
    dtype = jnp.result_type(centers, weights, sigma)
    centers = jnp.clip(centers, 0.0, 1.0).astype(dtype)
    weights = jnp.clip(weights, 0.0, MAX_WEIGHT).astype(dtype)
    ys = jnp.linspace(0.0, 1.0, height, dtype=dtype)
    xs = jnp.linspace(0.0, 1.0, width, dtype=dtype)
    dy2 = jnp.square(ys[None, :, None] - centers[:, None, :, 1])  # [B, h, N]
    dx2 = jnp.square(xs[None, :, None] - centers[:, None, :, 0])  # [B, w, N]
    inv = (1.0 / (2.0 * jnp.square(sigma))).reshape(-1, 1, 1, 1)
    logits = -(dy2[:, :, None, :] + dx2[:, None, :, :]) * inv  # [B, h, w, N]

    mask = valid[:, None, None, :]
    # A finite fill keeps exp() and its gradient finite when every point of an image is padding.
    logits = jnp.where(mask, logits, jnp.finfo(dtype).min)
    shifted = logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    expd = jnp.where(mask, jnp.exp(shifted), 0.0)
    total = jnp.sum(expd, axis=-1)
    has_point = jnp.any(valid, axis=-1)[:, None, None]
    mixed = jnp.sum(expd * weights[:, None, None, :], axis=-1) / jnp.where(has_point, total, 1.0)
    return jnp.where(has_point, jnp.clip(mixed, 0.0, MAX_WEIGHT), jnp.ones_like(mixed))


def grid_cell_bounds(size: int, cells: int) -> list[int]:
    """Edges of ``cells`` grid cells over ``size`` pixels: cell k spans ``bounds[k] .. bounds[k + 1]``.

    ``bounds[k] = round(k * size / cells)`` (Python's round, half to even) and the last cell runs to the edge:
    the grid-answer convention of docs/DESIGN.md, shared by the sharp grid map and the water-mask oracle.
    """
    return [round(k * size / cells) for k in range(cells)] + [size]


def _cell_index(size: int, cells: int) -> np.ndarray:
    """Cell of each pixel (:func:`grid_cell_bounds`)."""
    bounds = grid_cell_bounds(size, cells)
    index = np.full(size, cells - 1, np.int32)
    for k in range(cells - 1):
        index[bounds[k] : bounds[k + 1]] = k
    return index


def grid_cell_means(mask: np.ndarray, n: int) -> np.ndarray:
    """Mean of a 2-D mask over each cell of an ``n x n`` grid (cells from :func:`grid_cell_bounds`), on the host.

    Args:
        mask: ``[H, W]`` bool or numbers (e.g. True = water).
        n: Grid size.

    Returns:
        ``[n, n]`` float64; an empty cell (a side shorter than ``n``) is 0.
    """
    h, w = mask.shape
    rows, cols = grid_cell_bounds(h, n), grid_cell_bounds(w, n)
    out = np.zeros((n, n))
    for r in range(n):
        for c in range(n):
            cell = mask[rows[r] : rows[r + 1], cols[c] : cols[c + 1]]
            out[r, c] = cell.mean() if cell.size else 0.0
    return out


def grid_attention_map(grid: ArrayLike, height: int, width: int, interpolate: bool = False) -> jax.Array:
    """Expands per-cell weights of an ``n x n`` grid prompt (cells A1..Dn) to a dense map.

    Sharp mode: cell ``k`` covers rows ``round(k*h/n)`` up to ``round((k+1)*h/n)`` (Python's round, half to
    even), the last cell extends to the edge; columns likewise. Interpolated mode: bilinear upsampling of the
    grid, ``align_corners=False`` (:func:`resize_attention`). Cell weights are clamped to ``[0, 2]`` first;
    filling unspecified cells with 1.0 is the parser's job. Non-square ``[B, n_rows, n_cols]`` grids work too.

    Args:
        grid: cell weights ``[B, n, n]``, row-major (row letter, column number).
        height: map height ``h`` (static).
        width: map width ``w`` (static).
        interpolate: bilinear instead of sharp cells (static).

    Returns:
        ``[B, h, w]`` float32 (or wider), values in ``[0, 2]``.

    Raises:
        ValueError: ``grid`` is not 3-D or ``height``/``width`` is not a positive integer.
    """
    grid = as_float(grid)
    if grid.ndim != 3:
        raise ValueError(f"grid must have shape [B, n, n], got shape {grid.shape}")
    height, width = check_size(height, "height"), check_size(width, "width")
    return _grid(grid, height=height, width=width, interpolate=bool(interpolate))


@functools.partial(jax.jit, static_argnames=("height", "width", "interpolate"))
def _grid(grid: jax.Array, height: int, width: int, interpolate: bool) -> jax.Array:
    grid = jnp.clip(grid, 0.0, MAX_WEIGHT)
    if interpolate:
        return resize_attention(grid, height, width)
    _, rows, cols = grid.shape
    return grid[:, _cell_index(height, rows)][:, :, _cell_index(width, cols)]
