"""PyTorch-compatible separable resizes, written as small interpolation matrices built on the host.

``torch.nn.functional.interpolate`` and ``jax.image.resize`` disagree on the source-index mapping and on
the cubic kernel, so both resizes here build, in NumPy float64, the exact ``[out, in]`` weight matrix of
each axis as PyTorch defines it (``align_corners=False``, no antialiasing, edge indices clamped) and apply
it with two einsums. Shapes are static, so the matrices are compile-time constants under ``jax.jit``.
"""

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from attllm_jax.ops.checks import check_size

_CUBIC_A = -0.75  # PyTorch's bicubic coefficient (Keys uses -0.5)


def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """Weights of PyTorch's bilinear resize along one axis (``align_corners=False``, no antialias).

    Output index ``i`` samples ``src = (i + 0.5) * in_size / out_size - 0.5``, clamped below at 0, and
    blends the two neighbours ``floor(src)`` and ``min(floor(src) + 1, in_size - 1)``.

    Args:
        in_size: length of the input axis.
        out_size: length of the output axis.

    Returns:
        A float64 matrix ``[out_size, in_size]`` whose rows sum to 1.
    """
    scale = in_size / out_size
    src = np.maximum((np.arange(out_size) + 0.5) * scale - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    lam = src - i0
    weights = np.zeros((out_size, in_size))
    rows = np.arange(out_size)
    np.add.at(weights, (rows, i0), 1.0 - lam)
    np.add.at(weights, (rows, i1), lam)
    return weights


def _cubic_coefficients(t: np.ndarray) -> np.ndarray:
    """The four cubic-convolution weights for taps at offsets -1, 0, 1, 2 from ``floor(src)``; ``t`` in [0, 1]."""
    a = _CUBIC_A

    def near(d):  # |d| <= 1
        return ((a + 2.0) * d - (a + 3.0)) * d * d + 1.0

    def far(d):  # 1 < |d| < 2
        return ((a * d - 5.0 * a) * d + 8.0 * a) * d - 4.0 * a

    return np.stack([far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)], axis=-1)


def bicubic_matrix(in_size: int, scale_factor: float) -> np.ndarray:
    """Weights of PyTorch's bicubic resize by ``scale_factor`` along one axis (``align_corners=False``).

    As ``interpolate(mode="bicubic", scale_factor=s, align_corners=False, antialias=False)`` with
    ``recompute_scale_factor`` unset: the output length is ``floor(in_size * s)`` and output index ``i``
    samples ``src = (i + 0.5) / s - 0.5`` (from the given ``s``, not from the sizes), evaluated in float32
    as PyTorch does, with the cubic kernel ``a = -0.75`` and taps clamped to ``[0, in_size - 1]``.

    Args:
        in_size: length of the input axis.
        scale_factor: positive scale ``s``.

    Returns:
        A float64 matrix ``[floor(in_size * s), in_size]`` whose rows sum to 1.
    """
    out_size = int(math.floor(in_size * scale_factor))
    inv_scale = np.float32(1.0 / scale_factor)
    src = inv_scale * (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
    base = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    t = np.clip(src.astype(np.float64) - base, 0.0, 1.0)
    coeffs = _cubic_coefficients(t)
    weights = np.zeros((out_size, in_size))
    rows = np.arange(out_size)
    for tap in range(4):
        np.add.at(weights, (rows, np.clip(base + tap - 1, 0, in_size - 1)), coeffs[:, tap])
    return weights


def apply_separable(x: jax.Array, rows: np.ndarray, cols: np.ndarray) -> jax.Array:
    """Applies per-axis resize matrices to axes 1 and 2 of ``x`` (``[B, H, W, ...]``) in float32 or wider.

    Args:
        x: array ``[B, H, W]`` or ``[B, H, W, C]``.
        rows: matrix ``[H', H]``.
        cols: matrix ``[W', W]``.

    Returns:
        ``[B, H', W']`` or ``[B, H', W', C]`` in ``promote_types(x.dtype, float32)``.
    """
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    x = x.astype(dtype)
    mr = jnp.asarray(rows, dtype)
    mc = jnp.asarray(cols, dtype)
    hp = jax.lax.Precision.HIGHEST
    if x.ndim == 3:
        y = jnp.einsum("ph,bhw->bpw", mr, x, precision=hp)
        return jnp.einsum("qw,bpw->bpq", mc, y, precision=hp)
    y = jnp.einsum("ph,bhwc->bpwc", mr, x, precision=hp)
    return jnp.einsum("qw,bpwc->bpqc", mc, y, precision=hp)


def bicubic_resize_scale_factor(x: ArrayLike, scale_factor: float | Sequence[float]) -> jax.Array:
    """Resizes a channels-last batch exactly as PyTorch's bicubic ``interpolate`` with ``scale_factor``.

    Equals ``torch.nn.functional.interpolate(x_nchw, scale_factor=(sh, sw), mode="bicubic",
    align_corners=False, antialias=False)`` transposed to channels-last: source index of output pixel ``i``
    is ``(i + 0.5) / s - 0.5``, cubic coefficient ``a = -0.75``, edge indices clamped. DINOv2 uses it to
    resize its 37x37 position-embedding grid with ``s = (h0 + 0.1) / 37``, which ``jax.image.resize``
    (Keys kernel, size-based mapping) does not reproduce.

    Args:
        x: array ``[B, H, W, C]``.
        scale_factor: ``(sh, sw)`` or a single ``s`` for both axes; static positive Python floats.

    Returns:
        ``[B, floor(H * sh), floor(W * sw), C]`` in ``promote_types(x.dtype, float32)`` (computed in it). The
        sizes are floored float64 products, as PyTorch computes them: ``37 * (39 / 37)`` gives 38, not 39.

    Raises:
        ValueError: ``x`` is not 4-D, or ``scale_factor`` is not one or two positive numbers, or gives an
            empty output.
    """
    x = jnp.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"x must have shape [B, H, W, C], got shape {x.shape}")
    if isinstance(scale_factor, (int, float, np.number)):
        scale_factor = (scale_factor, scale_factor)
    try:
        scales = tuple(float(s) for s in scale_factor)
    except (TypeError, jax.errors.ConcretizationTypeError) as err:
        raise ValueError(f"scale_factor must be one or two static positive numbers, got {scale_factor!r}") from err
    if len(scales) != 2 or not all(math.isfinite(s) and s > 0 for s in scales):
        raise ValueError(f"scale_factor must be one or two static positive numbers, got {scale_factor!r}")
    _, height, width, _ = x.shape
    for size, s in zip((height, width), scales, strict=True):
        if math.floor(size * s) < 1:
            raise ValueError(f"scale_factor {scale_factor!r} resizes an axis of length {size} to zero")
    return _bicubic(x, scales)


@functools.partial(jax.jit, static_argnames=("scales",))
def _bicubic(x: jax.Array, scales: tuple[float, float]) -> jax.Array:
    _, height, width, _ = x.shape
    return apply_separable(x, bicubic_matrix(height, scales[0]), bicubic_matrix(width, scales[1]))


@functools.partial(jax.jit, static_argnames=("height", "width"))
def bilinear_resize(x: jax.Array, height: int, width: int) -> jax.Array:
    """PyTorch's bilinear resize (``align_corners=False``, no antialias) of axes 1, 2 of ``x`` ``[B, H, W, ...]``."""
    return apply_separable(x, bilinear_matrix(x.shape[1], height), bilinear_matrix(x.shape[2], width))


def antialiased_bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """Weights of ``interpolate(mode="bilinear", size=..., antialias=True, align_corners=False)`` along one axis.

    PyTorch's (and PIL's) antialiased resize: with ``s = in_size / out_size``, output ``i`` is centred at
    ``center = s * (i + 0.5)`` and takes the inputs ``j`` in ``[trunc(center - r + 0.5), trunc(center + r + 0.5))``
    (clipped to the axis), ``r = max(s, 1)``, with triangle weights ``max(0, 1 - |j - center + 0.5| / r)``
    normalized to sum to 1. When downsampling (``s > 1``) the triangle is stretched over ``s`` input pixels; when
    upsampling it equals plain bilinear interpolation. Scale, centres and weights are evaluated in float32, as
    PyTorch does for float32 tensors (a float64 evaluation differs from it by up to ~3e-5 per weight at 500-pixel
    axes). torchvision's ``transforms.functional.resize(tensor, size, antialias=True)`` (MegaLoc's forward,
    VPR-methods-evaluation's ``Resize``) is this resize.

    Args:
        in_size: input length.
        out_size: output length.

    Returns:
        A float64 matrix ``[out_size, in_size]`` (float32 values) whose rows sum to 1 up to float32 round-off.
    """
    in_size, out_size = check_size(in_size, "in_size"), check_size(out_size, "out_size")
    f32 = np.float32
    scale = f32(in_size / out_size)
    support = max(scale, f32(1.0))
    inv_scale = f32(1.0) / scale if scale >= 1.0 else f32(1.0)
    weights = np.zeros((out_size, in_size))
    for i in range(out_size):
        center = f32(float(scale) * (i + 0.5))
        lo = max(int(float(center) - float(support) + 0.5), 0)
        hi = min(int(float(center) + float(support) + 0.5), in_size)
        taps = np.arange(lo, hi)
        x = np.abs(((taps - center).astype(f32) + f32(0.5)) * inv_scale)
        w = np.where(x < 1.0, f32(1.0) - x, f32(0.0)).astype(f32)
        weights[i, taps] = w / w.sum(dtype=f32)
    return weights


def antialiased_bilinear_resize(x: ArrayLike, height: int, width: int) -> jax.Array:
    """Resizes axes 1 and 2 of ``x`` as ``torch.nn.functional.interpolate(..., mode="bilinear", antialias=True)``.

    Args:
        x: ``[B, H, W]`` or ``[B, H, W, C]``.
        height: output rows (static).
        width: output columns (static).

    Returns:
        ``[B, height, width(, C)]`` in ``promote_types(x.dtype, float32)``; ``x`` itself (cast) when the size is
        already ``height x width``.

    Raises:
        ValueError: ``x`` is not 3-D or 4-D, or a size is not a positive integer.
    """
    x = jnp.asarray(x)
    if x.ndim not in (3, 4):
        raise ValueError(f"x must have shape [B, H, W] or [B, H, W, C], got shape {x.shape}")
    height, width = check_size(height, "height"), check_size(width, "width")
    if x.shape[1:3] == (height, width):
        return x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return _antialiased_bilinear(x, height, width)


@functools.partial(jax.jit, static_argnames=("height", "width"))
def _antialiased_bilinear(x: jax.Array, height: int, width: int) -> jax.Array:
    rows = antialiased_bilinear_matrix(x.shape[1], height)
    cols = antialiased_bilinear_matrix(x.shape[2], width)
    return apply_separable(x, rows, cols)
