"""Generalized-mean (GeM) pooling and its attention-modulated variant (CosPlace, EigenPlaces).

Reductions run in float32 (or wider, following the inputs); outputs are float32 (or wider) whatever the
input dtype, so bfloat16 feature maps give float32 descriptors.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from attllm_jax.ops.attention_maps import MAX_WEIGHT, resize_attention
from attllm_jax.ops.checks import check_batch_alpha

ALPHA_OFF = 1e-6  # alpha at or below this means "no attention": plain pooling
BLENDS = ("native", "uniform")
_HIGHEST = jax.lax.Precision.HIGHEST


def _check_features(x: ArrayLike, name: str = "x") -> jax.Array:
    x = jnp.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"{name} must have shape [B, h, w, C], got shape {x.shape}")
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _per_image(fn, *arrays):
    """``jax.vmap(fn)(*arrays)`` over the batch axis, as a sequential loop on CPU.

    On CPU, looping keeps each image's ``[h, w, C]`` temporaries in cache and turns the spatial reductions into
    small matrix products; for ResNet-50 maps ([32, 16, 22, 2048]) this is 5-10x faster than the batched form.
    Accelerators get the batched form.
    """
    if _loop_over_images():
        return jax.lax.map(lambda args: fn(*args), arrays)
    return jax.vmap(fn)(*arrays)


def _loop_over_images() -> bool:
    return jax.default_backend() == "cpu"


def _split_p(p: float | ArrayLike) -> tuple[jax.Array | None, float | None]:
    """A Python-number ``p`` becomes a static argument (compiled in), an array ``p`` a traced one."""
    if not isinstance(p, jax.core.Tracer) and not (np.size(p) == 1 and np.all(np.asarray(p) > 0)):
        raise ValueError(f"p must be one positive number, got {p!r}")
    if isinstance(p, (int, float)) and not isinstance(p, bool):
        return None, float(p)
    return jnp.asarray(p), None


def _merge_p(p_dynamic: jax.Array | None, p_static: float | None) -> float | jax.Array:
    return p_static if p_static is not None else p_dynamic


def _pow(x: jax.Array, p: float | ArrayLike) -> jax.Array:
    """``x ** p``; a static integral ``p`` (the usual 3) uses repeated multiplication instead of exp/log."""
    if isinstance(p, (int, float)) and float(p).is_integer() and 1 <= p <= 16:
        return jax.lax.integer_pow(x, int(p))
    return jnp.power(x, jnp.asarray(p, x.dtype))


def _inv_pow(x: jax.Array, p: float | ArrayLike) -> jax.Array:
    """``x ** (1 / p)``."""
    if isinstance(p, (int, float)):
        return x if p == 1 else jnp.power(x, 1.0 / p)
    return jnp.power(x, 1.0 / jnp.asarray(p, x.dtype))


def gem(x: ArrayLike, p: float | ArrayLike = 3.0, eps: float = 1e-6) -> jax.Array:
    """Generalized-mean pooling over the spatial grid: ``y = mean_hw(max(x, eps) ** p) ** (1 / p)``.

    Equals CosPlace's ``GeM``: ``avg_pool2d(x.clamp(min=eps).pow(p), (h, w)).pow(1 / p)``. ``p = 1`` is
    mean pooling; large ``p`` approaches max pooling.

    Args:
        x: feature map ``[B, h, w, C]`` (L2-normalized over channels in our models).
        p: GeM exponent, a positive Python number or a (learned) scalar array.
        eps: floor applied to the features before the power.

    Returns:
        Pooled features ``[B, C]`` in float32 (or wider).

    Raises:
        ValueError: ``x`` is not 4-D.
    """
    x = _check_features(x)
    return _gem(x, eps, *_split_p(p))


@functools.partial(jax.jit, static_argnames=("p_static",))
def _gem(x: jax.Array, eps, p_dynamic, p_static) -> jax.Array:
    p = _merge_p(p_dynamic, p_static)
    _, h, w, _ = x.shape

    def image_sum(xb):  # [h, w, C] -> [C]
        return jnp.einsum("hw,hwc->c", jnp.ones((h, w), xb.dtype), _pow(jnp.maximum(xb, eps), p), precision=_HIGHEST)

    return _inv_pow(_per_image(image_sum, x) / (h * w), p)


def modulated_gem(
    x: ArrayLike,
    attention: ArrayLike,
    alpha: float | ArrayLike,
    p: float | ArrayLike = 3.0,
    eps: float = 1e-6,
    blend: str = "native",
) -> jax.Array:
    """GeM pooling with spatial weights blended from the model's own saliency and an attention map.

    With ``xp = max(x, eps) ** p`` and ``hw = h * w``:

    - native weight per location: ``c = max(sum_C(xp) / (hw + eps), eps) ** (1/p)``,
      ``native = c / (mean_hw(c) + eps)``;
    - ``blend="native"``: ``w = native + alpha * (A - native)``; ``blend="uniform"``: ``w = 1 + alpha * (A - 1)``;
    - ``y = max(sum_hw(w * xp) / (sum_hw(w) + eps), eps ** p) ** (1/p)``.

    ``A`` is the attention map clamped to ``[0, 2]``, resized bilinearly (:func:`resize_attention`) when it
    is not ``h x w``. ``alpha <= 1e-6`` gives plain :func:`gem` (per image when ``alpha`` is ``[B]``), as the
    published implementation does, so the native blend is discontinuous at 0 (at tiny alpha it pools with
    the native weights); the uniform blend is continuous there. The floor ``eps ** p`` on the pooled mean
    (our choice; it only acts when every weight is ~0) keeps gradients finite.

    Since ``w`` is affine in ``alpha``, the weighted sums are taken once per weight map (ones, native, A)
    and blended afterwards: under ``jax.vmap`` over ``alpha`` the ``[B, h, w, C]`` work is shared by every
    alpha instead of being redone, and nothing of size ``[K, B, h, w, C]`` is materialized.

    Args:
        x: feature map ``[B, h, w, C]`` (L2-normalized over channels in our models).
        attention: maps ``[B, h', w']``; any size, resized to ``h x w``.
        alpha: blend factor in ``[0, 1]``, scalar ``()`` or per-image ``[B]``.
        p: GeM exponent, a positive Python number or a (learned) scalar array.
        eps: floor of the features and stabilizer of the normalizations.
        blend: ``"native"`` (published method) or ``"uniform"`` (static).

    Returns:
        Pooled features ``[B, C]`` in float32 (or wider).

    Raises:
        ValueError: bad shapes (``x``, ``attention``, ``alpha``), a concrete ``alpha`` outside ``[0, 1]``, or an
            unknown ``blend``.
    """
    x = _check_features(x)
    batch, h, w, _ = x.shape
    attention = jnp.asarray(attention)
    if attention.ndim != 3 or attention.shape[0] != batch:
        raise ValueError(f"attention must have shape [{batch}, h, w] to match x, got shape {attention.shape}")
    alpha = check_batch_alpha(alpha, batch)
    if blend not in BLENDS:
        raise ValueError(f"blend must be one of {BLENDS}, got {blend!r}")
    return _modulated_gem(x, attention, alpha, eps, *_split_p(p), blend=blend)


@functools.partial(jax.jit, static_argnames=("p_static", "blend"))
def _modulated_gem(x, attention, alpha, eps, p_dynamic, p_static, blend) -> jax.Array:
    p = _merge_p(p_dynamic, p_static)
    _, h, w, _ = x.shape
    dtype = jnp.result_type(x, alpha)
    x = x.astype(dtype)
    attention = jnp.clip(resize_attention(attention, h, w).astype(dtype), 0.0, MAX_WEIGHT)

    hw = h * w

    def image_sums(xb, ab):  # [h, w, C], [h, w] -> sums [3, C] and masses [3] of the maps (ones, base, A)
        xp = _pow(jnp.maximum(xb, eps), p)
        ones = jnp.ones_like(ab)
        base = ones
        if blend == "native":
            c = _inv_pow(jnp.maximum(jnp.sum(xp, axis=-1) / (hw + eps), eps), p)
            base = c / (jnp.mean(c) + eps)
        maps = jnp.stack([ones, base, ab])
        return jnp.einsum("khw,hwc->kc", maps, xp, precision=_HIGHEST), jnp.sum(maps, axis=(1, 2))

    sums, masses = _per_image(image_sums, x, attention)  # [B, 3, C], [B, 3]

    off = alpha <= ALPHA_OFF
    a = alpha[:, None]
    mod_num = sums[:, 1] + a * (sums[:, 2] - sums[:, 1])
    mod_den = masses[:, 1] + alpha * (masses[:, 2] - masses[:, 1]) + eps
    floor = jnp.maximum(jnp.power(jnp.asarray(eps, dtype), jnp.asarray(p, dtype)), jnp.finfo(dtype).tiny)
    mod_mean = jnp.maximum(mod_num / mod_den[:, None], floor)
    plain_mean = sums[:, 0] / hw
    return _inv_pow(jnp.where(off[:, None], plain_mean, mod_mean), p)
