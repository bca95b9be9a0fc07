"""PyTorch-compatible separable resizes, written as small interpolation matrices built on the host.

``torch.nn.functional.interpolate`` and ``jax.image.resize`` disagree on the source-index mapping, the cubic
kernel and antialiasing, so every resize here builds, in NumPy, the exact ``[out, in]`` weight matrix of each axis
as PyTorch defines it and applies it with two einsums (:func:`apply_separable`): plain bilinear and bicubic
(``align_corners=False``, edge indices clamped; :func:`bilinear_matrix`, :func:`bicubic_matrix`) and the
antialiased resizes (:func:`antialiased_matrix` with a triangle or cubic kernel). Shapes are static, so the
matrices are compile-time constants under ``jax.jit``.
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


def cubic_kernel(x: np.ndarray, a: float) -> np.ndarray:
    """The cubic-convolution kernel of coefficient ``a`` at offsets ``x`` (zero for ``|x| >= 2``).

    ``a = -0.75`` is PyTorch's plain bicubic, ``a = -0.5`` (Keys) its antialiased bicubic.
    """
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0  # |x| < 1
    far = ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a  # 1 <= |x| < 2
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


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
    coeffs = cubic_kernel(np.stack([t + 1.0, t, 1.0 - t, 2.0 - t], axis=-1), _CUBIC_A)  # taps -1, 0, 1, 2
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
    return antialiased_matrix(in_size, out_size, _triangle, 1.0, np.float32)


def antialiased_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """Weights of ``torch.nn.functional.interpolate(mode="bicubic", size=..., antialias=True)`` along one axis.

    As :func:`antialiased_bilinear_matrix` with the cubic kernel ``a = -0.5`` of support ``2 * max(s, 1)``, at
    most ``2 * ceil(support) + 1`` taps, evaluated in float64 (DINOv2's register models resize their
    position-embedding grid with it).

    Returns:
        A float64 matrix ``[out_size, in_size]``.
    """
    in_size, out_size = check_size(in_size, "in_size"), check_size(out_size, "out_size")
    return antialiased_matrix(in_size, out_size, lambda x: cubic_kernel(x, -0.5), 2.0, np.float64, bounded=True)


def _triangle(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


def antialiased_matrix(
    in_size: int, out_size: int, kernel, radius: float, dtype: type = np.float64, bounded: bool = False
) -> np.ndarray:
    """PyTorch's (and PIL's) antialiased resize weights along one axis, for any kernel.

    With ``s = in_size / out_size``, output ``i`` is centred at ``center = s * (i + 0.5)`` and takes the inputs
    ``j`` in ``[trunc(center - support + 0.5), trunc(center + support + 0.5))`` clipped to the axis (and, when
    ``bounded``, to at most ``2 * ceil(support) + 1`` taps), ``support = radius * max(s, 1)``, with weights
    ``kernel((j - center + 0.5) / max(s, 1))`` normalized to sum to 1. Scale, centres and weights are evaluated in
    ``dtype`` (PyTorch uses the tensor's float type for the bilinear weights).

    Args:
        in_size: input length.
        out_size: output length.
        kernel: the interpolation kernel on offsets in input pixels (``radius`` wide).
        radius: the kernel's support at scale 1 (1 bilinear, 2 bicubic).
        dtype: ``np.float32`` or ``np.float64``.
        bounded: cap the taps per output as PyTorch's antialiased bicubic does.

    Returns:
        A float64 matrix ``[out_size, in_size]`` (``dtype`` values).
    """
    f = dtype
    scale = f(in_size / out_size)
    support = f(radius) * max(scale, f(1.0))
    inv_scale = f(1.0) / scale if scale >= 1.0 else f(1.0)
    max_taps = int(math.ceil(support)) * 2 + 1
    weights = np.zeros((out_size, in_size))
    for i in range(out_size):
        center = f(float(scale) * (i + 0.5))
        lo = max(int(float(center) - float(support) + 0.5), 0)
        hi = min(int(float(center) + float(support) + 0.5), in_size)
        if bounded:
            hi = lo + min(max(hi - lo, 0), max_taps)
        taps = np.arange(lo, hi)
        w = kernel(((taps - center).astype(f) + f(0.5)) * inv_scale).astype(f)
        total = w.sum(dtype=f)
        weights[i, taps] = w / total if total != 0.0 else w
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
