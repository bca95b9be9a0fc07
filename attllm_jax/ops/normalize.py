"""L2 normalization, as ``torch.nn.functional.normalize``: the one used by every head and op."""

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

L2_EPS = 1e-12  # torch.nn.functional.normalize's default


def l2_normalize(x: ArrayLike, axis: int = -1, eps: float = L2_EPS) -> jax.Array:
    """``x / max(||x||_2, eps)`` along ``axis``, as ``torch.nn.functional.normalize(x, dim=axis, eps=eps)``.

    The squared norm is floored at ``eps ** 2`` before the square root; that changes nothing where
    ``||x|| >= eps`` (the same operations on the same values, so the result is bit-identical to torch's
    formula) and keeps the gradient finite at a zero vector, where ``sqrt`` has an infinite slope.

    Args:
        x: any shape.
        axis: the axis normalized over.
        eps: the floor of the norm.

    Returns:
        ``x`` scaled to unit L2 norm along ``axis`` (same shape), computed and returned in float32 or wider
        (bfloat16 and float16 inputs are upcast, as in every op).
    """
    x = jnp.asarray(x)
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    squared = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
    norm = jnp.sqrt(jnp.maximum(squared, jnp.asarray(eps, x.dtype) ** 2))
    return x / jnp.maximum(norm, eps)
