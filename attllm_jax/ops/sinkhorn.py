"""Log-space Sinkhorn with a dustbin and SALAD's optimal-transport aggregation.

Follows SALAD (Izquierdo & Civera, CVPR 2024; serizba/salad ``models/aggregators/salad.py``), whose solver
is SuperGlue's ``log_optimal_transport``. Computation is in float32 (or wider, following the inputs).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from attllm_jax.ops.attention_maps import MAX_WEIGHT
from attllm_jax.ops.checks import as_float, check_batch_alpha
from attllm_jax.ops.gem import ALPHA_OFF
from attllm_jax.ops.normalize import l2_normalize


def _dustbin_scalar(dustbin: ArrayLike) -> jax.Array:
    dustbin = as_float(dustbin)
    if dustbin.size != 1:
        raise ValueError(f"dustbin must be a scalar, got shape {dustbin.shape}")
    return dustbin.reshape(())


def log_sinkhorn_assignment(
    scores: ArrayLike, dustbin: float | ArrayLike, num_iters: int = 3, reg: float = 1.0
) -> jax.Array:
    """Entropic optimal transport between ``m`` clusters plus a dustbin and ``N`` tokens, in log space.

    The couplings are the scores with a dustbin row of constant value ``z`` appended, divided by ``reg``.
    With ``norm = -log(N + m)`` the row log-marginals are ``norm`` for each cluster and
    ``log(N - m) + norm`` for the dustbin, the column log-marginals ``norm`` for each token (so both sides
    carry mass ``N / (N + m)``). Starting from ``u = v = 0`` each iteration sets
    ``u = log_a - logsumexp_cols(Z + v)`` then ``v = log_b - logsumexp_rows(Z + u)``. The result is
    ``Z + u + v - norm``: the log transport plan scaled by ``N + m``, dustbin row last, as upstream SALAD's
    ``log_optimal_transport(scores, dust_bin, 3)`` (``reg = 1``).

    Args:
        scores: cluster-token scores ``[B, m, N]``; needs ``N > m`` (the dustbin mass is ``N - m``).
        dustbin: dustbin score ``z``, a scalar (a learned parameter in SALAD).
        num_iters: Sinkhorn iterations (static, >= 0); SALAD uses 3.
        reg: entropic regularization (static or scalar array, > 0); 1 reproduces SALAD.

    Returns:
        Log assignment ``[B, m + 1, N]`` in float32 (or wider); ``exp`` of its first ``m`` rows is SALAD's
        ``P``.

    Raises:
        ValueError: ``scores`` is not 3-D or has ``N <= m``, ``dustbin`` is not a scalar, or ``num_iters`` is
            not a non-negative integer.
    """
    scores = as_float(scores)
    if scores.ndim != 3:
        raise ValueError(f"scores must have shape [B, m, N], got shape {scores.shape}")
    _, m, n = scores.shape
    if n <= m:
        raise ValueError(f"scores must have more tokens than clusters (N > m), got shape {scores.shape}")
    if isinstance(num_iters, bool) or not isinstance(num_iters, int) or num_iters < 0:
        raise ValueError(f"num_iters must be a non-negative integer, got {num_iters!r}")
    if not isinstance(reg, jax.core.Tracer) and not np.all(np.asarray(reg) > 0):
        raise ValueError(f"reg must be positive, got {reg!r}")
    return _log_sinkhorn(scores, _dustbin_scalar(dustbin), reg, num_iters=num_iters)


@functools.partial(jax.jit, static_argnames=("num_iters",))
def _log_sinkhorn(scores: jax.Array, dustbin: jax.Array, reg, num_iters: int) -> jax.Array:
    batch, m, n = scores.shape
    dtype = jnp.result_type(scores, dustbin)
    bins = jnp.broadcast_to(dustbin.astype(dtype), (batch, 1, n))
    couplings = jnp.concatenate([scores.astype(dtype), bins], axis=1) / jnp.asarray(reg, dtype)

    norm = -jnp.log(jnp.asarray(n + m, dtype))
    log_a = jnp.concatenate([jnp.full((m,), norm, dtype), (jnp.log(jnp.asarray(n - m, dtype)) + norm)[None]])
    log_b = jnp.full((n,), norm, dtype)

    def step(_, uv):
        u, v = uv
        u = log_a - jax.nn.logsumexp(couplings + v[:, None, :], axis=2)
        v = log_b - jax.nn.logsumexp(couplings + u[:, :, None], axis=1)
        return u, v

    init = (jnp.zeros((batch, m + 1), dtype), jnp.zeros((batch, n), dtype))
    u, v = jax.lax.fori_loop(0, num_iters, step, init)
    return couplings + u[:, :, None] + v[:, None, :] - norm


def salad_pool(
    local_features: ArrayLike,
    scores: ArrayLike,
    dustbin: float | ArrayLike,
    global_token: ArrayLike,
    attention: ArrayLike | None = None,
    alpha: float | ArrayLike = 0.0,
) -> jax.Array:
    """SALAD aggregation: optimal-transport soft assignment of tokens to clusters, optionally attention-weighted.

    ``P = exp(log_sinkhorn_assignment(scores, dustbin, 3))`` without the dustbin row; per cluster ``k``,
    ``V[:, k] = l2n(sum_i P[k, i] * w_i * f_i)`` over the ``l`` channels; the descriptor is
    ``l2n(concat(l2n(g), flatten(V)))`` with ``V`` of shape ``[l, m]`` flattened row-major (element
    ``j * m + k`` is channel ``j`` of cluster ``k``), as upstream SALAD. ``l2n`` divides by
    ``max(norm, 1e-12)``.

    Token weights: ``w_i = 1`` (plain SALAD) when ``attention`` is None or ``alpha <= 1e-6``; otherwise
    ``w_i = nu_i + alpha * (A_i - nu_i)`` with ``nu_i = sum_k P[k, i]`` divided by its mean over tokens
    (the model's own token mass, mean 1) and ``A`` the attention clamped to ``[0, 2]``. ``P`` itself is not
    changed. As in :func:`modulated_gem`, the weighted sums are taken once per weight vector (ones, nu, A)
    and blended afterwards, so ``jax.vmap`` over ``alpha`` shares the cluster sums across the alpha grid.

    Args:
        local_features: ``f``, ``[B, N, l]`` (SALAD's ``cluster_features`` output, tokens row-major).
        scores: ``S``, ``[B, m, N]`` (SALAD's ``score`` output); needs ``N > m``.
        dustbin: the dustbin score ``z`` (scalar).
        global_token: ``g``, ``[B, g]`` (SALAD's ``token_features`` output).
        attention: optional ``[B, N]`` map sampled on the patch grid, row-major like the tokens.
        alpha: blend factor in ``[0, 1]``, scalar ``()`` or per-image ``[B]``; ignored without ``attention``.

    Returns:
        L2-normalized descriptors ``[B, g + l * m]`` in float32 (or wider).

    Raises:
        ValueError: mismatched shapes (named in the message) or a concrete ``alpha`` outside ``[0, 1]``.
    """
    f = as_float(local_features)
    if f.ndim != 3:
        raise ValueError(f"local_features must have shape [B, N, l], got shape {f.shape}")
    batch, n, l_dim = f.shape
    scores = as_float(scores)
    if scores.ndim != 3 or scores.shape[0] != batch or scores.shape[2] != n:
        raise ValueError(f"scores must have shape [{batch}, m, {n}] to match local_features, got {scores.shape}")
    g = as_float(global_token)
    if g.ndim != 2 or g.shape[0] != batch:
        raise ValueError(f"global_token must have shape [{batch}, g], got shape {g.shape}")
    alpha = check_batch_alpha(alpha, batch)
    if scores.shape[2] <= scores.shape[1]:
        raise ValueError(f"scores must have more tokens than clusters (N > m), got shape {scores.shape}")
    dustbin = _dustbin_scalar(dustbin)
    if attention is not None:
        attention = as_float(attention)
        if attention.shape != (batch, n):
            raise ValueError(f"attention must have shape [{batch}, {n}] (one value per token), got {attention.shape}")
    return _salad_pool(f, scores, dustbin, g, attention, alpha)


@jax.jit
def _salad_pool(f, scores, dustbin, g, attention, alpha) -> jax.Array:
    batch, _, l_dim = f.shape
    m = scores.shape[1]
    prob = jnp.exp(_log_sinkhorn(scores, dustbin, 1.0, num_iters=3)[:, :m])  # [B, m, N]
    hp = jax.lax.Precision.HIGHEST
    if attention is None:
        clusters = jnp.einsum("bkn,bnl->blk", prob, f, precision=hp)  # [B, l, m]
    else:
        dtype = jnp.result_type(prob, f, attention, alpha)
        attention = jnp.clip(attention.astype(dtype), 0.0, MAX_WEIGHT)
        mass = jnp.sum(prob, axis=1)  # [B, N]
        nu = mass / jnp.maximum(jnp.mean(mass, axis=1, keepdims=True), jnp.finfo(dtype).tiny)
        weights = jnp.stack([jnp.ones_like(nu), nu, attention], axis=1)  # [B, 3, N]
        sums = jnp.einsum("bkn,btn,bnl->btlk", prob, weights, f, precision=hp)  # [B, 3, l, m]
        a = alpha[:, None, None]
        weighted = sums[:, 1] + a * (sums[:, 2] - sums[:, 1])
        clusters = jnp.where((alpha <= ALPHA_OFF)[:, None, None], sums[:, 0], weighted)

    local = l2_normalize(clusters, axis=1).reshape(batch, l_dim * m)
    return l2_normalize(jnp.concatenate([l2_normalize(g, axis=-1), local], axis=-1), axis=-1)
