"""Gradients of the attention-modulated aggregators with respect to the attention map and alpha, against float64
central differences of the same functions (``jax.enable_x64``; the ops compute in their inputs' dtype).

The objective is a fixed random projection of the pooled output, so no symmetry hides an error. Autodiff runs in
float32; the differences in float64 with step 1e-6. Tolerance: :data:`GRAD_RTOL`, about 3x the measured error.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attllm_jax import ops

STEP = 1e-6
# max |autodiff - reference| / max |reference|: measured at most 6.6e-7 over these cases (float32 round-off)
GRAD_RTOL = 2e-6


def _central_differences(objective, x: np.ndarray) -> np.ndarray:
    """d objective / d x for every element of ``x`` (float64), all perturbations in one vmapped call."""
    flat = x.reshape(-1)
    eye = np.eye(flat.size)
    with jax.enable_x64(True):
        f = jax.jit(jax.vmap(lambda d: objective(jnp.asarray(flat + d, jnp.float64).reshape(x.shape))))
        plus, minus = np.asarray(f(STEP * eye)), np.asarray(f(-STEP * eye))
    return ((plus - minus) / (2 * STEP)).reshape(x.shape)


def _relative_error(autodiff, reference) -> float:
    return float(np.max(np.abs(np.asarray(autodiff, np.float64) - reference)) / np.max(np.abs(reference)))


def _gem_case(seed: int):
    rng = np.random.default_rng(seed)
    x = np.maximum(rng.normal(size=(2, 4, 5, 8)), 0.0)
    x /= np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    att = rng.uniform(0.1, 1.9, size=(2, 4, 5))  # away from the clamps at 0 and 2
    proj = rng.normal(size=(2, 8))
    return x, att, proj


@pytest.mark.parametrize("blend", ["native", "uniform"])
@pytest.mark.parametrize("alpha", [0.3, 0.8])
def test_modulated_gem_gradients_match_float64_central_differences(blend, alpha):
    x, att, proj = _gem_case(0)

    def objective(att, alpha, x=x):
        return jnp.sum(ops.modulated_gem(x, att, alpha, p=3.0, blend=blend) * proj)

    g_att, g_alpha = jax.grad(objective, argnums=(0, 1))(jnp.float32(att), jnp.float32(alpha), x.astype(np.float32))
    ref_att = _central_differences(lambda a: objective(a, np.float64(alpha), x), att)
    ref_alpha = _central_differences(lambda a: objective(att, a[0], x), np.array([alpha]))
    assert _relative_error(g_att, ref_att) < GRAD_RTOL
    assert _relative_error(g_alpha, ref_alpha[0]) < GRAD_RTOL


def _salad_case(seed: int):
    rng = np.random.default_rng(seed)
    b, n, m, l_dim, g_dim = 2, 12, 3, 4, 5
    f = rng.normal(size=(b, n, l_dim))
    s = 2.0 * rng.normal(size=(b, m, n))
    g = rng.normal(size=(b, g_dim))
    att = rng.uniform(0.1, 1.9, size=(b, n))
    proj = rng.normal(size=(b, g_dim + l_dim * m))
    return f, s, g, att, proj


@pytest.mark.parametrize("alpha", [0.3, 0.8])
def test_salad_pool_gradients_match_float64_central_differences(alpha):
    f, s, g, att, proj = _salad_case(1)

    def objective(att, alpha, f=f, s=s, g=g):
        return jnp.sum(ops.salad_pool(f, s, 0.7, g, att, alpha) * proj)

    args32 = [v.astype(np.float32) for v in (f, s, g)]
    g_att, g_alpha = jax.grad(objective, argnums=(0, 1))(jnp.float32(att), jnp.float32(alpha), *args32)
    ref_att = _central_differences(lambda a: objective(a, np.float64(alpha)), att)
    ref_alpha = _central_differences(lambda a: objective(att, a[0]), np.array([alpha]))
    assert _relative_error(g_att, ref_att) < GRAD_RTOL
    assert _relative_error(g_alpha, ref_alpha[0]) < GRAD_RTOL
