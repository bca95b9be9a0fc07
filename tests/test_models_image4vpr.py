"""ImAge: parity with a PyTorch reference through the release format and the real converter, attention, strictness.

The reference (:mod:`torch_image4vpr`) is transformers' DINOv2 with 4 registers and upstream's original
position-embedding resize, the aggregation tokens prepended before block ``P``, and (with attention) a functional
torch block for the biased self-attention. It is saved as the release is (``torch.save({"model_state_dict": sd})``,
``module.`` keys, the unused ``mask_token``). Small: width 64, 3 blocks, 4 heads, 3 tokens entering before block 2
(descriptor 192). Tolerance (float32, highest matmul precision): descriptors 1e-5 max abs.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attllm_jax.convert.image4vpr import ImAgeConvertOptions

torch = pytest.importorskip("torch")

from torch_helpers import convert_and_load_without_torch, nhwc  # noqa: E402
from torch_image4vpr import make_torch_image4vpr  # noqa: E402

from attllm_jax.convert import convert, convert_file  # noqa: E402
from attllm_jax.convert.common import ConversionError, read_state_dict  # noqa: E402
from attllm_jax.data.preprocess import PreprocessSpec  # noqa: E402
from attllm_jax.models.image4vpr import ImAgeFeatures, ImAgeSpec, biased_block  # noqa: E402
from attllm_jax.models.spec import ModelSpec  # noqa: E402

pytestmark = pytest.mark.torch

DESC_ATOL = 1e-5


@pytest.fixture(scope="module")
def reference():
    return make_torch_image4vpr(torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def checkpoint(reference, tmp_path_factory):
    path = tmp_path_factory.mktemp("image4vpr") / "ImAge_small.pth"
    torch.save({"model_state_dict": reference.upstream_state_dict(), "epoch_num": 1}, path)
    return path


@pytest.fixture(scope="module")
def converted(checkpoint):
    return convert_file("image4vpr", checkpoint, options=ImAgeConvertOptions(num_heads=4, insertion_block=2))


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
    assert spec.family == "image4vpr" and isinstance(arch, ImAgeSpec)
    assert (arch.dinov2.embed_dim, arch.dinov2.depth, arch.dinov2.num_register_tokens) == (64, 3, 4)
    assert arch.dinov2.interpolate_offset == 0.1 and not arch.dinov2.interpolate_antialias
    assert (arch.num_agg_tokens, arch.insertion_block, spec.descriptor_dim) == (3, 2, 192)
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


def test_reference_biased_block_at_alpha_zero_is_transformers_layer(reference, inputs):
    """The reference's functional block (attention path) reduces to transformers' own layers at alpha = 0."""
    images, attention = inputs
    with torch.no_grad():
        plain = reference(images).numpy()
        zero = reference(images, attention, torch.zeros(3)).numpy()
    np.testing.assert_allclose(zero, plain, atol=1e-6, rtol=0)


def _numpy_biased_block(block, x, num_agg, patch_start, attention, alpha, heads):
    """The block with the aggregation rows' logits biased, in NumPy float64 (the module docstring's formula)."""

    def p(v):
        return np.asarray(v[...], np.float64)

    def ln(y, norm):
        mu = y.mean(-1, keepdims=True)
        var = ((y - mu) ** 2).mean(-1, keepdims=True)
        return (y - mu) / np.sqrt(var + 1e-6) * p(norm.scale) + p(norm.bias)

    def softmax(z):
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    b, t, c = x.shape
    hd = c // heads
    qkv = (ln(x, block.norm1) @ p(block.attn.qkv.kernel) + p(block.attn.qkv.bias)).reshape(b, t, 3, heads, hd)
    q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
    logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd)
    mass = softmax(logits[:, :, :num_agg])[..., patch_start:].mean(axis=(1, 2))
    nu = mass / mass.mean(1, keepdims=True)
    w = nu + alpha[:, None] * (np.clip(attention, 0, 2) - nu)
    logits[:, :, :num_agg, patch_start:] += np.log(np.maximum(w, 1e-6))[:, None, None, :]
    out = (softmax(logits) @ v).transpose(0, 2, 1, 3).reshape(b, t, c)
    x = x + p(block.ls1.gamma) * (out @ p(block.attn.proj.kernel) + p(block.attn.proj.bias))
    h = ln(x, block.norm2) @ p(block.mlp.fc1.kernel) + p(block.mlp.fc1.bias)
    h = 0.5 * h * (1.0 + np.vectorize(__import__("math").erf)(h / np.sqrt(2.0)))
    return x + p(block.ls2.gamma) * (h @ p(block.mlp.fc2.kernel) + p(block.mlp.fc2.bias))


def test_attention_path_matches_a_numpy_transcription(converted):
    net, _ = converted
    rng = np.random.default_rng(2)
    num_agg, patch_start, n = 3, 3 + 5, 12
    x = rng.normal(size=(2, patch_start + n, 64)).astype(np.float32)
    attention = (2.2 * rng.random((2, n)) - 0.1).astype(np.float32)
    alpha = np.asarray([0.3, 0.9], np.float32)
    block = net.backbone.blocks[2]
    ours = nnx.jit(lambda blk, *a: biased_block(blk, a[0], num_agg, patch_start, a[1], a[2]))(
        block, jnp.asarray(x), jnp.asarray(attention), jnp.asarray(alpha)
    )
    expected = _numpy_biased_block(block, x.astype(np.float64), num_agg, patch_start, attention, alpha, 4)
    np.testing.assert_allclose(ours, expected, atol=2e-5, rtol=1e-5)


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
    assert isinstance(feats, ImAgeFeatures) and feats.grid == (5, 7) and feats.prefix.shape == (3, 5, 64)
    att, alphas = jnp.asarray(attention.numpy()), jnp.asarray([0.0, 0.4, 1.0])
    sweep = nnx.jit(lambda n, f, a, al: jax.vmap(lambda s: n.aggregate(f, a, s))(al))(net, feats, att, alphas)
    single = nnx.jit(lambda n, f, a, al: n.aggregate(f, a, al))
    for k in range(3):
        np.testing.assert_allclose(sweep[k], single(net, feats, att, alphas[k]), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------- strictness


def test_extra_missing_and_misshapen_tensors_are_listed_together(checkpoint):
    state = dict(read_state_dict(checkpoint))
    assert "backbone.mask_token" in state and "backbone.register_tokens" in state
    del state["backbone.blocks.2.ls1.gamma"]
    state["aggregator.extra"] = np.zeros((2, 3), np.float32)
    state["backbone.norm.bias"] = np.zeros((63,), np.float32)
    with pytest.raises(ConversionError) as info:
        convert("image4vpr", state, options=ImAgeConvertOptions(num_heads=4, insertion_block=2))
    message = str(info.value)
    assert "'backbone.blocks.2.ls1.gamma'" in message
    assert "'aggregator.extra' [2, 3]" in message
    assert "backbone.norm.bias" in message and "[63]" in message


def test_insertion_block_beyond_the_depth_and_other_families_are_named(checkpoint):
    state = read_state_dict(checkpoint)
    with pytest.raises(ConversionError, match="insertion_block 3 must be below the depth 3"):
        convert("image4vpr", state, options=ImAgeConvertOptions(num_heads=4, insertion_block=3))
    supervlad_like = {k: v for k, v in state.items() if k != "learnable_aggregation_tokens"}
    supervlad_like["aggregation.conv.weight"] = np.zeros((5, 64, 1, 1), np.float32)
    with pytest.raises(ConversionError, match="not an ImAge checkpoint.*SuperVLAD"):
        convert("image4vpr", supervlad_like, options=ImAgeConvertOptions(num_heads=4))


def test_spec_round_trips_through_json(converted):
    _, spec = converted
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    released = ImAgeSpec.released()
    assert released.descriptor_dim == 6144 and released.backbone == "dinov2_vitb14_reg"


@pytest.mark.slow
def test_converter_script_writes_a_loadable_model(reference, inputs, tmp_path):
    """converters/image4vpr.py on a safetensors copy with the release's module. keys, loaded without torch."""
    images, attention = inputs
    flags = ("--num_heads=4", "--insertion_block=2")
    config, out = convert_and_load_without_torch(
        tmp_path, "image4vpr", reference.upstream_state_dict(), images, attention, flags=flags
    )
    assert config["family"] == "image4vpr" and config["architecture"]["num_agg_tokens"] == 3
    with torch.no_grad():
        expected = np.stack([reference(images).numpy(), reference(images, attention, 0.5).numpy()])
    np.testing.assert_allclose(out, expected, atol=DESC_ATOL, rtol=0)


@pytest.mark.slow
def test_full_size_image4vpr_matches_torch(tmp_path):
    """The released architecture (ViT-B/14 + 4 registers, 8 tokens before block 8) at 322 x 322, random weights."""
    reference = make_torch_image4vpr(
        torch.Generator().manual_seed(5),
        embed_dim=768,
        depth=12,
        num_heads=12,
        image_size=518,
        num_tokens=8,
        insertion=8,
    )
    path = tmp_path / "ImAge_Merged_random.pth"
    torch.save({"model_state_dict": reference.upstream_state_dict()}, path)
    net, spec = convert_file("image4vpr", path)
    assert spec.backbone == "dinov2_vitb14_reg" and spec.descriptor_dim == 6144
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
