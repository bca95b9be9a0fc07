"""Tests of the torch-compatible resizes: bicubic_resize_scale_factor and resize_attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attllm_jax import ops

TOL = 1e-5


def _torch_interpolate(x_nhwc: np.ndarray, **kwargs) -> np.ndarray:
    torch = pytest.importorskip("torch")
    x = torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))
    return torch.nn.functional.interpolate(x, align_corners=False, **kwargs).numpy().transpose(0, 2, 3, 1)


def _random(shape, key=0) -> np.ndarray:
    return np.random.default_rng(key).normal(size=shape).astype(np.float32)


@pytest.mark.torch
@pytest.mark.parametrize(
    "size, scale_factor",
    [
        ((37, 37), (23.1 / 37, 23.1 / 37)),  # DINOv2 ViT-B/14 at 322x322: 23x23 patches
        ((37, 37), (16.1 / 37, 22.1 / 37)),  # non-square patch grid (224x308)
        ((37, 37), (45.1 / 37, 45.1 / 37)),  # upsampling (630x630)
        ((5, 7), (2.0, 1.5)),
        ((9, 4), (0.5, 2.75)),  # odd size down, non-integer up
        ((6, 6), (1.01, 1.01)),  # same output size, but not the identity
        ((8, 3), (1.0, 1.0)),
        ((37, 37), (39 / 37, 43 / 37)),  # floor(37 * (39 / 37)) = 38 in float64, as PyTorch sizes it
    ],
)
def test_bicubic_matches_torch(size, scale_factor):
    x = _random((2, *size, 3))
    expected = _torch_interpolate(x, scale_factor=scale_factor, mode="bicubic", antialias=False)
    out = ops.bicubic_resize_scale_factor(x, scale_factor)
    assert out.shape == expected.shape
    np.testing.assert_allclose(out, expected, rtol=TOL, atol=TOL)


@pytest.mark.torch
def test_bicubic_matches_dinov2_position_embedding_interpolation():
    """DINOv2's interpolate_pos_encoding: 37x37 grid, scale ((w0 + 0.1) / 37, (h0 + 0.1) / 37), 768 channels."""
    torch = pytest.importorskip("torch")
    h0, w0 = 23, 16
    pos = _random((1, 37, 37, 768), key=1)
    patch_pos = torch.from_numpy(pos).permute(0, 3, 1, 2)
    expected = torch.nn.functional.interpolate(
        patch_pos, scale_factor=((h0 + 0.1) / 37, (w0 + 0.1) / 37), mode="bicubic", antialias=False
    )
    out = ops.bicubic_resize_scale_factor(pos, ((h0 + 0.1) / 37, (w0 + 0.1) / 37))
    assert out.shape == (1, h0, w0, 768)
    np.testing.assert_allclose(out, expected.permute(0, 2, 3, 1).numpy(), rtol=TOL, atol=TOL)


def test_bicubic_is_exact_on_constants_and_under_jit():
    x = jnp.full((1, 7, 5, 2), 3.25)
    np.testing.assert_allclose(ops.bicubic_resize_scale_factor(x, 1.7), 3.25, rtol=1e-6)
    fn = jax.jit(lambda v: ops.bicubic_resize_scale_factor(v, (23.1 / 37, 23.1 / 37)))
    v = _random((1, 37, 37, 4), key=2)
    np.testing.assert_allclose(fn(v), ops.bicubic_resize_scale_factor(v, (23.1 / 37, 23.1 / 37)), rtol=1e-6, atol=1e-6)


def test_bicubic_bfloat16_and_gradient():
    x = _random((1, 9, 9, 2), key=3)
    out = ops.bicubic_resize_scale_factor(jnp.asarray(x, jnp.bfloat16), 0.6)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, ops.bicubic_resize_scale_factor(x, 0.6), rtol=3e-2, atol=3e-2)
    grad = jax.grad(lambda v: jnp.sum(ops.bicubic_resize_scale_factor(v, 1.3)))(x)
    assert np.all(np.isfinite(grad))


@pytest.mark.parametrize(
    "shape, scale_factor, match",
    [
        ((9, 9, 2), 0.5, "x"),
        ((1, 9, 9, 2), (0.5, 0.5, 0.5), "scale_factor"),
        ((1, 9, 9, 2), (0.5, -1.0), "scale_factor"),
        ((1, 9, 9, 2), (0.05, 1.0), "scale_factor"),
    ],
)
def test_bicubic_bad_inputs_raise(shape, scale_factor, match):
    with pytest.raises(ValueError, match=match):
        ops.bicubic_resize_scale_factor(np.zeros(shape, np.float32), scale_factor)


@pytest.mark.torch
@pytest.mark.parametrize(
    "in_size, out_size", [((3, 4), (16, 22)), ((37, 37), (16, 22)), ((7, 5), (7, 9)), ((4, 4), (23, 23))]
)
def test_resize_attention_matches_torch_bilinear(in_size, out_size):
    att = np.random.default_rng(4).uniform(0, 2, size=(2, *in_size)).astype(np.float32)
    expected = _torch_interpolate(att[..., None], size=out_size, mode="bilinear")[..., 0]
    np.testing.assert_allclose(ops.resize_attention(att, *out_size), expected, rtol=TOL, atol=TOL)


def test_resize_attention_identity_jit_and_errors():
    att = np.random.default_rng(5).uniform(0, 2, size=(2, 4, 6)).astype(np.float32)
    np.testing.assert_array_equal(ops.resize_attention(att, 4, 6), att)
    fn = jax.jit(lambda a: ops.resize_attention(a, 9, 3))
    np.testing.assert_allclose(fn(att), ops.resize_attention(att, 9, 3), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="attention"):
        ops.resize_attention(att[0], 4, 4)
    with pytest.raises(ValueError, match="height"):
        ops.resize_attention(att, 0, 4)
    with pytest.raises(ValueError, match="width"):
        ops.resize_attention(att, 4, 2.5)
