"""Tests of rbf_attention_map and grid_attention_map against float64 NumPy / PyTorch references."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attllm_jax import ops
from attllm_jax.ops.attention_maps import grid_cell_means

TOL = 1e-5


def _points(key: int, batch: int = 3, num: int = 5):
    rng = np.random.default_rng(key)
    centers = rng.uniform(0.0, 1.0, size=(batch, num, 2)).astype(np.float32)
    weights = rng.uniform(0.0, 2.0, size=(batch, num)).astype(np.float32)
    return centers, weights


def _ref_rbf(centers, weights, h, w, sigma=0.2, valid=None):
    """docs/DESIGN.md "Attention maps" in float64, one pixel and one image at a time over the valid points."""
    centers = np.clip(np.asarray(centers, np.float64), 0.0, 1.0)
    weights = np.clip(np.asarray(weights, np.float64), 0.0, 2.0)
    valid = np.ones(weights.shape, bool) if valid is None else np.asarray(valid)
    sigmas = np.broadcast_to(np.asarray(sigma, np.float64), (centers.shape[0],))
    ys, xs = np.linspace(0.0, 1.0, h), np.linspace(0.0, 1.0, w)
    out = np.ones((centers.shape[0], h, w))
    for b in range(centers.shape[0]):
        c, wt = centers[b][valid[b]], weights[b][valid[b]]
        if len(c) == 0:
            continue
        for i, y in enumerate(ys):
            for j, x in enumerate(xs):
                logits = -((x - c[:, 0]) ** 2 + (y - c[:, 1]) ** 2) / (2 * sigmas[b] ** 2)
                soft = np.exp(logits - logits.max())
                out[b, i, j] = np.clip(np.sum(soft / soft.sum() * wt), 0.0, 2.0)
    return out


def _ref_sharp_grid(grid, h, w):
    """Cell k spans round(k*size/n) .. round((k+1)*size/n) (Python round), the last cell to the edge."""
    grid = np.clip(np.asarray(grid, np.float64), 0.0, 2.0)
    rows, cols = grid.shape[1:]

    def bounds(size, n):
        edges = [round(k * size / n) for k in range(n)] + [size]
        return [(edges[k], edges[k + 1]) for k in range(n)]

    out = np.full((grid.shape[0], h, w), np.nan)
    for r, (r0, r1) in enumerate(bounds(h, rows)):
        for c, (c0, c1) in enumerate(bounds(w, cols)):
            out[:, r0:r1, c0:c1] = grid[:, r, c, None, None]
    return out


@pytest.mark.parametrize("h, w, sigma", [(16, 22, 0.2), (5, 7, 0.05), (1, 3, 0.5)])
def test_rbf_matches_reference(h, w, sigma):
    centers, weights = _points(0)
    np.testing.assert_allclose(
        ops.rbf_attention_map(centers, weights, h, w, sigma=sigma),
        _ref_rbf(centers, weights, h, w, sigma),
        rtol=TOL,
        atol=TOL,
    )


def test_rbf_valid_mask_and_per_image_sigma():
    centers, weights = _points(1)
    valid = np.array([[1, 1, 0, 1, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]], bool)
    sigma = np.array([0.1, 0.2, 0.3], np.float32)
    out = ops.rbf_attention_map(centers, weights, 6, 9, sigma=sigma, valid=valid)
    np.testing.assert_allclose(out, _ref_rbf(centers, weights, 6, 9, sigma, valid), rtol=TOL, atol=TOL)
    # Padding must not matter: garbage in masked slots changes nothing.
    noisy = np.where(valid[..., None], centers, 7.0), np.where(valid, weights, -4.0)
    np.testing.assert_allclose(ops.rbf_attention_map(*noisy, 6, 9, sigma=sigma, valid=valid), out, rtol=0, atol=0)


def test_rbf_no_valid_point_gives_ones():
    centers, weights = _points(2)
    valid = np.zeros((3, 5), bool)
    valid[1, 2] = True
    out = np.asarray(ops.rbf_attention_map(centers, weights, 4, 5, valid=valid))
    np.testing.assert_array_equal(out[[0, 2]], 1.0)
    np.testing.assert_allclose(out[1], weights[1, 2], rtol=1e-6)


def test_rbf_one_centre_gives_constant_map():
    out = ops.rbf_attention_map(np.array([[[0.3, 0.9]]]), np.array([[1.7]]), 8, 11)
    np.testing.assert_allclose(out, np.full((1, 8, 11), 1.7), rtol=1e-6)


def test_rbf_stays_in_range_with_out_of_range_inputs():
    rng = np.random.default_rng(3)
    centers = rng.uniform(-2.0, 3.0, size=(4, 6, 2)).astype(np.float32)
    weights = rng.uniform(-5.0, 9.0, size=(4, 6)).astype(np.float32)
    out = np.asarray(ops.rbf_attention_map(centers, weights, 9, 13, sigma=0.01))
    assert out.min() >= 0.0 and out.max() <= 2.0
    np.testing.assert_allclose(out, _ref_rbf(centers, weights, 9, 13, 0.01), rtol=TOL, atol=TOL)


@jax.jit
@functools.partial(jax.grad, argnums=(0, 1, 2))
def _rbf_grads(centers, weights, sigma, valid):
    maps = ops.rbf_attention_map(centers, weights, 7, 9, sigma=sigma, valid=valid)
    return jnp.sum(maps * jnp.arange(63.0).reshape(7, 9))


def test_rbf_gradients_finite_and_jit_matches_eager():
    centers, weights = _points(4)
    valid = np.ones((3, 5), bool)
    valid[0] = False  # an image with only padding
    grads = _rbf_grads(jnp.asarray(centers), jnp.asarray(weights), jnp.float32(0.2), valid)
    assert all(np.all(np.isfinite(g)) for g in grads)
    assert np.all(np.asarray(grads[1])[0] == 0) and np.any(np.asarray(grads[1])[1:] != 0)
    jitted = jax.jit(lambda c, w, s: ops.rbf_attention_map(c, w, 7, 9, sigma=s, valid=valid))
    np.testing.assert_allclose(
        jitted(centers, weights, 0.3), ops.rbf_attention_map(centers, weights, 7, 9, 0.3, valid), rtol=1e-6, atol=1e-6
    )
    jitted(centers + 0.01, weights, 0.1)
    assert jitted._cache_size() == 1


def test_rbf_vmap_over_sigma_and_bfloat16():
    centers, weights = _points(5)
    sigmas = jnp.array([0.1, 0.2, 0.4])
    swept = jax.vmap(lambda s: ops.rbf_attention_map(centers, weights, 5, 6, sigma=s))(sigmas)
    for k, sigma in enumerate([0.1, 0.2, 0.4]):
        np.testing.assert_allclose(swept[k], _ref_rbf(centers, weights, 5, 6, sigma), rtol=TOL, atol=TOL)
    out = ops.rbf_attention_map(jnp.asarray(centers, jnp.bfloat16), jnp.asarray(weights, jnp.bfloat16), 5, 6)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, _ref_rbf(centers, weights, 5, 6), rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize(
    "centers_shape, weights_shape, valid_shape, sigma, name",
    [
        ((3, 5), (3, 5), None, 0.2, "centers"),
        ((3, 5, 3), (3, 5), None, 0.2, "centers"),
        ((3, 5, 2), (3, 4), None, 0.2, "weights"),
        ((3, 5, 2), (3, 5), (3, 4), 0.2, "valid"),
        ((3, 5, 2), (3, 5), None, 0.0, "sigma"),
        ((3, 5, 2), (3, 5), None, np.ones(2), "sigma"),
    ],
)
def test_rbf_bad_inputs_raise(centers_shape, weights_shape, valid_shape, sigma, name):
    valid = None if valid_shape is None else np.ones(valid_shape, bool)
    with pytest.raises(ValueError, match=name):
        ops.rbf_attention_map(np.zeros(centers_shape), np.ones(weights_shape), 4, 4, sigma=sigma, valid=valid)
    with pytest.raises(ValueError, match="height"):
        ops.rbf_attention_map(np.zeros((1, 2, 2)), np.ones((1, 2)), -1, 4)


@pytest.mark.parametrize("n, h, w", [(4, 16, 22), (4, 23, 23), (3, 10, 7), (4, 2, 3), (2, 5, 5), (4, 6, 10)])
def test_sharp_grid_matches_reference(n, h, w):
    grid = np.random.default_rng(6).uniform(0.0, 2.0, size=(2, n, n)).astype(np.float32)
    np.testing.assert_allclose(ops.grid_attention_map(grid, h, w), _ref_sharp_grid(grid, h, w), rtol=0, atol=1e-7)


def test_sharp_grid_uses_round_half_to_even():
    """h = 6, n = 4: edges round(1.5) = 2, round(3.0) = 3, round(4.5) = 4 (half to even), so rows 2,1,1,2."""
    grid = np.arange(16, dtype=np.float32).reshape(1, 4, 4) / 8.0
    out = np.asarray(ops.grid_attention_map(grid, 6, 4))
    np.testing.assert_array_equal(out[0, :, 0], np.array([0, 0, 4, 8, 12, 12]) / 8.0)


@pytest.mark.torch
@pytest.mark.parametrize("n, h, w", [(4, 16, 22), (3, 23, 23), (4, 3, 2)])
def test_interpolated_grid_matches_torch(n, h, w):
    torch = pytest.importorskip("torch")
    grid = np.random.default_rng(7).uniform(-1.0, 3.0, size=(2, n, n)).astype(np.float32)
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(np.clip(grid, 0, 2))[:, None], size=(h, w), mode="bilinear", align_corners=False
    )[:, 0]
    out = ops.grid_attention_map(grid, h, w, interpolate=True)
    np.testing.assert_allclose(out, expected.numpy(), rtol=TOL, atol=TOL)
    assert np.asarray(out).min() >= 0.0 and np.asarray(out).max() <= 2.0


def test_grid_clamps_jit_gradient_and_errors():
    grid = np.random.default_rng(8).uniform(-1.0, 3.0, size=(2, 4, 4)).astype(np.float32)
    out = np.asarray(ops.grid_attention_map(grid, 16, 22))
    assert out.min() >= 0.0 and out.max() <= 2.0
    for interpolate in [False, True]:
        jitted = jax.jit(lambda g, i=interpolate: ops.grid_attention_map(g, 9, 5, interpolate=i))
        np.testing.assert_allclose(jitted(grid), ops.grid_attention_map(grid, 9, 5, interpolate), rtol=1e-6)
        grad = jax.grad(lambda g, i=interpolate: jnp.sum(ops.grid_attention_map(g, 9, 5, i)))(jnp.ones((2, 4, 4)))
        assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad) > 0)
    with pytest.raises(ValueError, match="grid"):
        ops.grid_attention_map(np.ones((4, 4)), 8, 8)
    with pytest.raises(ValueError, match="width"):
        ops.grid_attention_map(np.ones((1, 4, 4)), 8, 0)


def test_grid_cell_means_uses_python_round_cells_as_the_sharp_grid_map():
    mask = np.zeros((10, 10), bool)
    mask[5:] = True
    grid = grid_cell_means(mask, 4)  # rows 0,2,5,8,10 (round(2.5) = 2, round(7.5) = 8)
    np.testing.assert_allclose(grid[:, 0], [0.0, 0.0, 1.0, 1.0])
    mask[:] = False
    mask[4] = True
    np.testing.assert_allclose(grid_cell_means(mask, 4)[:, 0], [0.0, 1 / 3, 0.0, 0.0])
    # the same cells as the sharp grid map: a one-hot grid expands to exactly the pixels averaged above
    onehot = np.zeros((1, 4, 4), np.float32)
    onehot[0, 1, 0] = 2.0
    dense = np.asarray(ops.grid_attention_map(onehot, 10, 10))[0]
    np.testing.assert_array_equal(np.flatnonzero(dense[:, 0] == 2.0), [2, 3, 4])
