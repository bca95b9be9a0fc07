"""Tests of attllm_jax.ops.gem against float64 NumPy transcriptions of docs/DESIGN.md's formulas."""

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attllm_jax import ops

gem_module = importlib.import_module("attllm_jax.ops.gem")  # the name ops.gem is the function

TOL = 1e-5


def _features(key: int, shape=(3, 5, 7, 16)) -> np.ndarray:
    """L2-normalized (over channels) ReLU features, as a backbone produces, with some exact zeros."""
    x = np.maximum(np.random.default_rng(key).normal(size=shape), 0.0)
    return (x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)).astype(np.float32)


def _attention(key: int, shape=(3, 5, 7)) -> np.ndarray:
    return np.random.default_rng(key).uniform(0.0, 2.0, size=shape).astype(np.float32)


def _ref_gem(x, p=3.0, eps=1e-6):
    x = np.asarray(x, np.float64)
    return np.mean(np.maximum(x, eps) ** p, axis=(1, 2)) ** (1 / p)


def _ref_modulated_gem(x, att, alpha, p=3.0, eps=1e-6, blend="native"):
    """docs/DESIGN.md "Modulated GeM", one image at a time, float64; att already of the feature-grid size."""
    x = np.asarray(x, np.float64)
    att = np.clip(np.asarray(att, np.float64), 0.0, 2.0)
    alpha = np.broadcast_to(np.asarray(alpha, np.float64), (x.shape[0],))
    out = []
    for xb, ab, al in zip(x, att, alpha, strict=True):
        xp = np.maximum(xb, eps) ** p
        hw = xb.shape[0] * xb.shape[1]
        if al <= 1e-6:
            out.append(np.mean(xp, axis=(0, 1)) ** (1 / p))
            continue
        if blend == "native":
            c = np.maximum(xp.sum(-1) / (hw + eps), eps) ** (1 / p)
            base = c / (c.mean() + eps)
        else:
            base = np.ones_like(ab)
        w = base + al * (ab - base)
        out.append((np.sum(w[..., None] * xp, axis=(0, 1)) / (w.sum() + eps)) ** (1 / p))
    return np.stack(out)


def _assert_close(actual, expected, tol=TOL):
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("p", [1.0, 3.0, 4.5])
def test_gem_matches_reference(p):
    x = _features(0)
    _assert_close(ops.gem(x, p=p), _ref_gem(x, p=p))


def test_gem_accepts_learned_p_array():
    x = _features(1)
    _assert_close(ops.gem(x, p=jnp.array([2.7])), _ref_gem(x, p=2.7))


def test_gem_p1_is_mean_pooling():
    x = _features(2)
    _assert_close(ops.gem(x, p=1.0, eps=0.0), np.mean(x.astype(np.float64), axis=(1, 2)))


@pytest.mark.parametrize("blend", ["native", "uniform"])
@pytest.mark.parametrize("alpha", [0.0, 1e-6, 2e-6, 0.3, 1.0])
def test_modulated_gem_matches_reference(blend, alpha):
    x, att = _features(3), _attention(4)
    _assert_close(ops.modulated_gem(x, att, alpha, blend=blend), _ref_modulated_gem(x, att, alpha, blend=blend))


@pytest.mark.parametrize("blend", ["native", "uniform"])
def test_modulated_gem_per_image_alpha_and_p(blend):
    x, att = _features(5), _attention(6)
    alpha = np.array([0.0, 0.5, 1.0], np.float32)
    _assert_close(
        ops.modulated_gem(x, att, alpha, p=2.5, blend=blend), _ref_modulated_gem(x, att, alpha, p=2.5, blend=blend)
    )


def test_modulated_gem_clamps_out_of_range_attention():
    x = _features(7)
    att = np.random.default_rng(8).uniform(-3.0, 5.0, size=(3, 5, 7)).astype(np.float32)
    _assert_close(ops.modulated_gem(x, att, 0.7), _ref_modulated_gem(x, np.clip(att, 0, 2), 0.7))


@pytest.mark.torch
def test_modulated_gem_resizes_attention_bilinearly():
    torch = pytest.importorskip("torch")
    x, att = _features(9), _attention(10, shape=(3, 3, 4))
    resized = torch.nn.functional.interpolate(
        torch.from_numpy(att)[:, None], size=(5, 7), mode="bilinear", align_corners=False
    )[:, 0].numpy()
    _assert_close(ops.modulated_gem(x, att, 0.6), _ref_modulated_gem(x, resized, 0.6))


@pytest.mark.parametrize("alpha", [0.0, 1e-7, 1e-6])
def test_alpha_off_is_plain_gem(alpha):
    x, att = _features(11), _attention(12)
    np.testing.assert_allclose(ops.modulated_gem(x, att, alpha), ops.gem(x), rtol=TOL, atol=TOL)


def test_uniform_blend_with_ones_map_is_plain_gem_at_every_alpha():
    x = _features(13)
    ones = np.ones((3, 5, 7), np.float32)
    for alpha in [0.0, 1e-3, 0.25, 0.5, 1.0]:
        np.testing.assert_allclose(
            ops.modulated_gem(x, ones, alpha, blend="uniform"), ops.gem(x), rtol=TOL, atol=TOL, err_msg=str(alpha)
        )


def test_native_blend_differs_from_plain_at_tiny_alpha():
    """The published method is discontinuous at alpha = 0: just above the threshold it uses native weights."""
    x, att = _features(14), _attention(15)
    native_only = _ref_modulated_gem(x, att, 1e-5)
    _assert_close(ops.modulated_gem(x, att, 1e-5), native_only)
    assert np.max(np.abs(native_only - _ref_gem(x))) > 1e-3


def test_batch_of_one_equals_slice_of_batch():
    x, att = _features(16), _attention(17)
    alpha = np.array([0.2, 0.0, 0.9], np.float32)
    full = ops.modulated_gem(x, att, alpha)
    for b in range(3):
        np.testing.assert_allclose(
            ops.modulated_gem(x[b : b + 1], att[b : b + 1], alpha[b]), full[b : b + 1], rtol=TOL, atol=1e-6
        )


@pytest.mark.parametrize("blend", ["native", "uniform"])
def test_jit_equals_eager(blend):
    x, att = _features(18), _attention(19)
    jitted = jax.jit(ops.modulated_gem, static_argnames=("blend",))
    for alpha in [0.0, 0.4]:
        np.testing.assert_allclose(
            jitted(x, att, alpha, blend=blend), ops.modulated_gem(x, att, alpha, blend=blend), rtol=1e-6, atol=1e-6
        )
    np.testing.assert_allclose(jax.jit(ops.gem)(x), ops.gem(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("blend", ["native", "uniform"])
def test_vmap_over_alpha_equals_loop(blend):
    x, att = _features(20), _attention(21)
    alphas = jnp.linspace(0.0, 1.0, 6)
    swept = jax.jit(jax.vmap(lambda a: ops.modulated_gem(x, att, a, blend=blend)))(alphas)
    assert swept.shape == (6, 3, 16)
    for k, alpha in enumerate(np.asarray(alphas)):
        np.testing.assert_allclose(
            swept[k], ops.modulated_gem(x, att, float(alpha), blend=blend), rtol=TOL, atol=TOL, err_msg=str(alpha)
        )


@functools.partial(jax.jit, static_argnames=("blend",))
def _gem_value_and_grads(alpha, attention, x, blend):
    """Sum of the pooled features and its gradients wrt alpha and the attention map (compiled once per blend)."""
    return jax.value_and_grad(lambda a, m: jnp.sum(ops.modulated_gem(x, m, a, blend=blend)), argnums=(0, 1))(
        alpha, attention
    )


@pytest.mark.parametrize("blend", ["native", "uniform"])
@pytest.mark.parametrize("alpha", [0.0, 1e-6, 1.0000001e-6, 0.5, 1.0])
def test_gradients_finite(blend, alpha):
    x, att = _features(22), _attention(23)
    _, (g_alpha, g_att) = _gem_value_and_grads(jnp.float32(alpha), jnp.asarray(att), x, blend)
    assert np.isfinite(g_alpha) and np.all(np.isfinite(g_att))
    if alpha > 1e-6:
        assert np.any(g_att != 0)


@pytest.mark.parametrize("blend", ["native", "uniform"])
def test_gradients_finite_when_all_weights_vanish(blend):
    """alpha = 1 with an all-zero map gives zero weights everywhere: the pooled mean hits its floor."""
    x = _features(24)
    value, (g_alpha, g_att) = _gem_value_and_grads(jnp.float32(1.0), jnp.zeros((3, 5, 7)), x, blend)
    assert np.isfinite(value) and np.isfinite(g_alpha) and np.all(np.isfinite(g_att))


def test_gradient_wrt_alpha_matches_finite_difference():
    x, att = _features(25), _attention(26)
    x64, att64 = x.astype(np.float64), att.astype(np.float64)
    grad = jax.grad(lambda a: jnp.sum(ops.modulated_gem(x, att, a)))(0.4)
    h = 1e-5
    fd = (_ref_modulated_gem(x64, att64, 0.4 + h).sum() - _ref_modulated_gem(x64, att64, 0.4 - h).sum()) / (2 * h)
    np.testing.assert_allclose(grad, fd, rtol=1e-3, atol=1e-4)


def test_bfloat16_inputs_give_float32_close_to_float32():
    x, att = _features(27), _attention(28)
    xb, attb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(att, jnp.bfloat16)
    for out, ref in [
        (ops.gem(xb), ops.gem(x)),
        (ops.modulated_gem(xb, attb, 0.5), ops.modulated_gem(x, att, 0.5)),
        (ops.modulated_gem(xb, attb, jnp.asarray(0.5, jnp.bfloat16)), ops.modulated_gem(x, att, 0.5)),
    ]:
        assert out.dtype == jnp.float32
        assert np.all(np.isfinite(out))
        np.testing.assert_allclose(out, ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan"), [0.2, 2.0, 0.1], "0.5", True])
def test_bad_alpha_raises(alpha):
    with pytest.raises(ValueError, match="alpha"):
        ops.modulated_gem(_features(29), _attention(30), alpha)


def test_validate_alpha():
    assert ops.validate_alpha(0.5).dtype == jnp.float32
    np.testing.assert_array_equal(ops.validate_alpha(np.array([0.0, 1.0])), [0.0, 1.0])
    with pytest.raises(ValueError, match="my_alpha"):
        ops.validate_alpha(1.01, name="my_alpha")
    with pytest.raises(ValueError, match="alpha"):
        ops.validate_alpha(np.zeros((2, 2)))
    # Tracers pass through unchecked: out-of-range values cannot be seen at trace time.
    assert jax.jit(lambda a: ops.validate_alpha(a) * 2)(3.0) == 6.0


@pytest.mark.parametrize(
    "x_shape, att_shape, alpha, name",
    [
        ((3, 5, 7), (3, 5, 7), 0.5, "x"),
        ((3, 5, 7, 16), (2, 5, 7), 0.5, "attention"),
        ((3, 5, 7, 16), (3, 5, 7, 1), 0.5, "attention"),
        ((3, 5, 7, 16), (3, 5, 7), [0.5, 0.5], "alpha"),
    ],
)
def test_bad_shapes_raise(x_shape, att_shape, alpha, name):
    with pytest.raises(ValueError, match=name):
        ops.modulated_gem(np.ones(x_shape, np.float32), np.ones(att_shape, np.float32), alpha)


def test_bad_blend_and_gem_shape_raise():
    with pytest.raises(ValueError, match="blend"):
        ops.modulated_gem(_features(31), _attention(32), 0.5, blend="softmax")
    with pytest.raises(ValueError, match="x"):
        ops.gem(np.ones((5, 7, 16), np.float32))
    for p in [0.0, -3.0, np.array([3.0, 2.0])]:
        with pytest.raises(ValueError, match="^p must"):
            ops.gem(_features(31), p=p)
        with pytest.raises(ValueError, match="^p must"):
            ops.modulated_gem(_features(31), _attention(32), 0.5, p=p)


def test_no_recompilation_for_same_shapes():
    x, att = _features(33), _attention(34)
    jitted = jax.jit(lambda f, m, a: ops.modulated_gem(f, m, a))  # a fresh function: its own cache
    jitted(x, att, jnp.float32(0.1)).block_until_ready()
    jitted(x * 0.5, att + 0.1, jnp.float32(0.7)).block_until_ready()
    jitted(x, att, jnp.float32(0.0)).block_until_ready()
    assert jitted._cache_size() == 1


def test_batched_path_for_accelerators_matches_reference(monkeypatch):
    """On CPU the ops loop over images; accelerators take the vmapped path, checked here on CPU."""
    x, att = _features(35), _attention(36)
    alpha = np.array([0.0, 0.5, 1.0], np.float32)
    monkeypatch.setattr(gem_module, "_loop_over_images", lambda: False)
    jax.clear_caches()  # the jitted cores were traced with the loop
    try:
        _assert_close(ops.gem(x), _ref_gem(x))
        for blend in ["native", "uniform"]:
            _assert_close(ops.modulated_gem(x, att, alpha, blend=blend), _ref_modulated_gem(x, att, alpha, blend=blend))
    finally:
        jax.clear_caches()


def test_eager_calls_compile_the_core_once():
    """Python-float, NumPy and per-image alphas all reach the jitted core as one float32 [B] signature."""
    x, att = _features(37, shape=(2, 3, 4, 8)), _attention(38, shape=(2, 3, 4))
    before = gem_module._modulated_gem._cache_size()
    for alpha in [0.3, 0.7, np.float32(0.2), jnp.float32(0.0), np.array([0.1, 0.9], np.float32)]:
        ops.modulated_gem(x, att, alpha)
    assert gem_module._modulated_gem._cache_size() == before + 1
