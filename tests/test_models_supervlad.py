"""SuperVLAD: parity with a PyTorch reference through the release format and the real converter, attention, strictness.

The reference (:mod:`torch_supervlad`) is transformers' DINOv2 (upstream interpolation, final norm) and a SuperVLAD
layer written from Lu-Feng/SuperVLAD; it is saved as the release is (``torch.save({"model_state_dict": sd})`` with
DataParallel's ``module.`` keys and the unused ``mask_token``) and read by ``read_state_dict``. Small: width 64,
2 blocks, 4 heads, K = 4, G = 1 (descriptor 256). Tolerance (float32, highest matmul precision): descriptors
1e-5 max abs.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attllm_jax.convert.supervlad import SuperVLADConvertOptions

torch = pytest.importorskip("torch")

from torch_helpers import convert_and_load_without_torch, nhwc  # noqa: E402
from torch_supervlad import make_torch_supervlad  # noqa: E402

from attllm_jax.convert import convert, convert_file  # noqa: E402
from attllm_jax.convert.common import ConversionError, read_state_dict  # noqa: E402
from attllm_jax.data.preprocess import PreprocessSpec  # noqa: E402
from attllm_jax.models.spec import ModelSpec  # noqa: E402
from attllm_jax.models.supervlad import SuperVLADSpec  # noqa: E402

pytestmark = pytest.mark.torch

DESC_ATOL = 1e-5


@pytest.fixture(scope="module")
def reference():
    return make_torch_supervlad(torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def checkpoint(reference, tmp_path_factory):
    path = tmp_path_factory.mktemp("supervlad") / "SuperVLAD_small.pth"
    torch.save({"model_state_dict": reference.upstream_state_dict(), "epoch_num": 3}, path)
    return path


@pytest.fixture(scope="module")
def converted(checkpoint):
    return convert_file(
        "supervlad", checkpoint, options=SuperVLADConvertOptions(num_heads=4)
    )  # width 64: not 64-channel heads


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, 70, 98, generator=g)  # 5 x 7 patch grid: position embeddings interpolated
    attention = 2.0 * torch.rand(3, 4, 6, generator=g)
    return images, attention


@nnx.jit
def _describe(net, images, attention=None, alpha=0.0):
    return net(images, attention, alpha)


def test_release_layout_is_read_and_the_config_inferred(converted):
    _, spec = converted
    arch = spec.architecture
    assert spec.family == "supervlad" and isinstance(arch, SuperVLADSpec)
    assert (arch.dinov2.embed_dim, arch.dinov2.depth, arch.dinov2.pos_embed_grid) == (64, 2, 4)
    assert arch.dinov2.num_heads == 4 and spec.backbone == "dinov2_custom"
    assert (arch.num_clusters, arch.ghost_clusters, spec.descriptor_dim) == (4, 1, 256)
    assert arch.dinov2.interpolate_offset == 0.1 and not arch.dinov2.interpolate_antialias
    assert spec.preprocess == PreprocessSpec("exact", (322, 322), stage="tensor")


@pytest.mark.parametrize("alpha", [None, (0.0, 0.4, 1.0)])
def test_descriptors_match_torch(reference, converted, inputs, alpha):
    net, _ = converted
    images, attention = inputs
    att = None if alpha is None else attention
    a = 0.0 if alpha is None else torch.tensor(alpha)
    with torch.no_grad():
        expected = reference(images, att, a).numpy()
    att_j = None if att is None else jnp.asarray(att.numpy())
    ours = np.asarray(_describe(net, jnp.asarray(nhwc(images)), att_j, jnp.asarray(np.asarray(a, np.float32))))
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(ours, expected, atol=DESC_ATOL, rtol=0)


def _numpy_supervlad(patches, kernel, clusters, attention, alpha):
    """The attention formula transcribed in NumPy (float64): V[k] = sum_i (1 + alpha (A_i - 1)) a[k, i] x_i."""
    b, h, w, c = patches.shape
    x = patches.reshape(b, h * w, c).astype(np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    logits = x @ kernel.astype(np.float64)
    a = np.exp(logits - logits.max(-1, keepdims=True))
    a = (a / a.sum(-1, keepdims=True))[:, :, :clusters]
    weight = 1.0 + alpha[:, None] * (np.clip(attention.reshape(b, -1), 0, 2) - 1.0)
    v = np.einsum("bn,bnk,bnc->bkc", weight, a, x)
    v = v / np.linalg.norm(v, axis=-1, keepdims=True)
    v = v.reshape(b, -1)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def test_attention_path_matches_a_numpy_transcription(converted):
    net, _ = converted
    rng = np.random.default_rng(2)
    patches = rng.normal(size=(2, 5, 7, 64)).astype(np.float32)
    attention = (2.2 * rng.random((2, 5, 7)) - 0.1).astype(np.float32)  # on the grid; values outside [0, 2] clamp
    alpha = np.asarray([0.3, 0.9], np.float32)
    feats = nnx.jit(lambda n, x: n.features(x))(net, jnp.zeros((2, 70, 98, 3)))
    feats = type(feats)(patches=jnp.asarray(patches), cls=feats.cls)
    ours = nnx.jit(lambda n, f, a, al: n.aggregate(f, a, al))(net, feats, jnp.asarray(attention), jnp.asarray(alpha))
    kernel = np.asarray(net.aggregation.conv.kernel[...])
    expected = _numpy_supervlad(patches, kernel, 4, attention, alpha.astype(np.float64))
    np.testing.assert_allclose(ours, expected, atol=1e-6, rtol=0)


def test_alpha_zero_is_plain_and_attention_is_live(converted, inputs):
    net, _ = converted
    images, attention = inputs
    x, att = jnp.asarray(nhwc(images)), jnp.asarray(attention.numpy())
    plain = np.asarray(_describe(net, x))
    np.testing.assert_allclose(_describe(net, x, att, jnp.asarray(0.0)), plain, atol=1e-6, rtol=0)
    np.testing.assert_allclose(_describe(net, x, att, jnp.asarray(1e-7)), plain, atol=1e-6, rtol=0)
    assert np.max(np.abs(np.asarray(_describe(net, x, att, jnp.asarray(0.5))) - plain)) > 1e-3


def test_alpha_sweep_equals_one_alpha_calls(converted, inputs):
    net, _ = converted
    images, attention = inputs
    feats = nnx.jit(lambda n, x: n.features(x))(net, jnp.asarray(nhwc(images)))
    att, alphas = jnp.asarray(attention.numpy()), jnp.asarray([0.0, 0.4, 1.0])
    sweep = nnx.jit(lambda n, f, a, al: jax.vmap(lambda s: n.aggregate(f, a, s))(al))(net, feats, att, alphas)
    single = nnx.jit(lambda n, f, a, al: n.aggregate(f, a, al))
    for k in range(3):
        np.testing.assert_allclose(sweep[k], single(net, feats, att, alphas[k]), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------- strictness


def _state(checkpoint):
    return read_state_dict(checkpoint)


def test_read_state_dict_unwraps_model_state_dict_and_module(checkpoint):
    state = _state(checkpoint)
    assert "aggregation.conv.weight" in state and "backbone.mask_token" in state
    assert not any(k.startswith("module.") for k in state) and "epoch_num" not in state


def test_extra_missing_and_misshapen_tensors_are_listed_together(checkpoint):
    state = dict(_state(checkpoint))
    del state["backbone.blocks.1.attn.qkv.bias"]
    state["aggregation.centroids"] = np.zeros((5, 64), np.float32)
    state["backbone.norm.weight"] = np.zeros((65,), np.float32)
    with pytest.raises(ConversionError) as info:
        convert("supervlad", state, options=SuperVLADConvertOptions(num_heads=4))
    message = str(info.value)
    assert "'backbone.blocks.1.attn.qkv.bias'" in message
    assert "'aggregation.centroids' [5, 64]" in message
    assert "backbone.norm.weight" in message and "[65]" in message


def test_ghost_clusters_option_and_its_limits(checkpoint):
    _, spec = convert("supervlad", _state(checkpoint), options=SuperVLADConvertOptions(num_heads=4, ghost_clusters=2))
    assert (spec.architecture.num_clusters, spec.descriptor_dim) == (3, 192)
    with pytest.raises(ConversionError, match="none left after 5 ghost clusters"):
        convert("supervlad", _state(checkpoint), options=SuperVLADConvertOptions(num_heads=4, ghost_clusters=5))


def test_other_families_are_rejected_with_a_hint(checkpoint):
    state = dict(_state(checkpoint))
    state["encoder.layers.0.linear1.weight"] = np.zeros((4, 4), np.float32)
    del state["aggregation.conv.weight"]
    with pytest.raises(ConversionError, match="not a SuperVLAD checkpoint.*CrossImage"):
        convert("supervlad", state, options=SuperVLADConvertOptions(num_heads=4))


def test_spec_round_trips_through_json(converted):
    _, spec = converted
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    assert SuperVLADSpec.released().descriptor_dim == 3072
    assert SuperVLADSpec.released(ghost_clusters=2).descriptor_dim == 768


@pytest.mark.slow
def test_converter_script_writes_a_loadable_model(reference, inputs, tmp_path):
    """converters/supervlad.py on a safetensors copy with the release's module. keys, loaded without torch."""
    images, attention = inputs
    config, out = convert_and_load_without_torch(
        tmp_path, "supervlad", reference.upstream_state_dict(), images, attention, flags=("--num_heads=4",)
    )
    assert config["family"] == "supervlad" and config["architecture"]["num_clusters"] == 4
    with torch.no_grad():
        expected = np.stack([reference(images).numpy(), reference(images, attention, 0.5).numpy()])
    np.testing.assert_allclose(out, expected, atol=DESC_ATOL, rtol=0)


@pytest.mark.slow
def test_full_size_supervlad_matches_torch(tmp_path):
    """The released architecture (ViT-B/14, 37 x 37 stored grid, K = 4, G = 1) at 322 x 322, random weights."""
    reference = make_torch_supervlad(
        torch.Generator().manual_seed(5), embed_dim=768, depth=12, num_heads=12, image_size=518
    )
    path = tmp_path / "SuperVLAD.pth"
    torch.save({"model_state_dict": reference.upstream_state_dict()}, path)
    net, spec = convert_file("supervlad", path)
    assert spec.backbone == "dinov2_vitb14" and spec.descriptor_dim == 3072
    g = torch.Generator().manual_seed(6)
    images = torch.randn(1, 3, 322, 322, generator=g)
    attention = 2.0 * torch.rand(1, 16, 16, generator=g)
    with torch.no_grad():
        expected = reference(images).numpy()
        expected_att = reference(images, attention, 0.5).numpy()
    x = jnp.asarray(nhwc(images))
    np.testing.assert_allclose(_describe(net, x), expected, atol=DESC_ATOL, rtol=0)
    ours_att = _describe(net, x, jnp.asarray(attention.numpy()), jnp.asarray(0.5))
    np.testing.assert_allclose(ours_att, expected_att, atol=DESC_ATOL, rtol=0)
