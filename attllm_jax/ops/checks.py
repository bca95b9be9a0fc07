"""Argument checks shared by the ops (host-side; tracers pass through), in one place.

Public boundaries (the ops, ``VPRModel``, the evaluation config) call :func:`validate_alpha` once on the values
they receive; everything under ``jit`` receives already-checked arrays.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike


def as_float(x: ArrayLike) -> jax.Array:
    """``x`` as an array of float32 or wider (bfloat16 and integers are promoted to float32)."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def check_size(value: int, name: str) -> int:
    """A positive Python/NumPy integer (not a bool), or a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def validate_alpha(alpha: ArrayLike, name: str = "alpha") -> jax.Array:
    """Checks a blend factor on the host: a scalar or a vector with every value in ``[0, 1]``.

    Tracers (inside ``jit``/``vmap``/``grad``) pass through unchecked, so call this at the API boundary.

    Args:
        alpha: scalar ``()`` or per-image ``[B]`` blend factor.
        name: argument name used in the error message.

    Returns:
        ``alpha`` as an array of float32 (or wider) dtype.

    Raises:
        ValueError: a concrete ``alpha`` is not numeric, has more than one dimension, or has a value outside
            ``[0, 1]`` (NaN included).
    """
    if isinstance(alpha, jax.core.Tracer):
        return alpha.astype(jnp.promote_types(alpha.dtype, jnp.float32))
    try:
        values = np.asarray(alpha)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a number or a 1-D array of numbers in [0, 1], got {alpha!r}") from err
    if values.dtype == bool or not jnp.issubdtype(values.dtype, jnp.number) or values.ndim > 1:
        raise ValueError(f"{name} must be a number or a 1-D array of numbers in [0, 1], got {alpha!r}")
    if not np.all((values >= 0) & (values <= 1)):
        raise ValueError(f"{name} must lie in [0, 1], got {values}")
    alpha = jnp.asarray(alpha)
    return alpha.astype(jnp.promote_types(alpha.dtype, jnp.float32))


def check_batch_alpha(alpha: ArrayLike, batch: int, name: str = "alpha") -> jax.Array:
    """:func:`validate_alpha`, then a scalar or ``[batch]`` shape, broadcast to ``[batch]``."""
    alpha = validate_alpha(alpha, name)
    if alpha.ndim > 1 or (alpha.ndim == 1 and alpha.shape[0] != batch):
        raise ValueError(f"{name} must be a scalar or have shape [{batch}] (the batch), got shape {alpha.shape}")
    return jnp.broadcast_to(alpha, (batch,))
