"""MegaLoc: parity with a PyTorch reference through the production converter, its input resize, attention, strictness.

The reference (:mod:`benchmarks.torch_zoo`) follows gmberton/MegaLoc at HEAD: torchvision's antialiased resize to
the nearest multiples of 14, transformers' DINOv2 with upstream's position-embedding interpolation (rows from the
image height, the argument order fixed upstream on 2026-01-21), the SALAD head, ``aggregator.linear`` and an L2
norm. Its ``upstream_state_dict()`` has ``model.safetensors``' keys or, with ``legacy=True``, ``megaloc.torch``'s.
Tolerances (float32, highest matmul precision; measured errors are ~2e-7): descriptors and the SALAD part max abs
error <= 1e-5; tokens ``atol 1e-4 + rtol 1e-5`` (values of order 10); resizes 1e-6 (measured 5e-7).
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from torch_helpers import convert_and_load_without_torch, nhwc  # noqa: E402

from attllm_jax.convert.common import ConversionError, read_state_dict  # noqa: E402
from attllm_jax.convert.megaloc import MegaLocConvertOptions, convert_state_dict  # noqa: E402
from attllm_jax.data.preprocess import PreprocessSpec  # noqa: E402
from attllm_jax.models.megaloc import patch_multiple_size  # noqa: E402
from attllm_jax.ops.resize import antialiased_bilinear_matrix, antialiased_bilinear_resize  # noqa: E402
from benchmarks.torch_zoo import RELEASED_MEGALOC_ARCH, make_torch_megaloc, megaloc_resize  # noqa: E402

pytestmark = pytest.mark.torch
HEADS_4 = MegaLocConvertOptions(num_heads=4)  # the tiny reference DINOv2 (width 64) has 4 heads

DESC_ATOL = 1e-5
TOKEN_ATOL, TOKEN_RTOL = 1e-4, 1e-5
RESIZE_ATOL = 1e-6
GRAD_RTOL = 1e-3


@pytest.fixture(scope="module")
def reference():
    """DINOv2 width 64, depth 2, 4 heads, 4x4 stored grid; SALAD m=8, l=16, g=32; linear 160 -> 40."""
    return make_torch_megaloc(torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def converted(reference, tmp_path_factory):
    """The reference saved as model.safetensors (HEAD's release format) and converted."""
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("megaloc") / "model.safetensors"
    save_file({k: v.contiguous() for k, v in reference.upstream_state_dict().items()}, str(path))
    return convert_state_dict(read_state_dict(path), "megaloc", str(path), HEADS_4)


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 75, 100, generator=g)  # not multiples of 14: resized to 70 x 98 (5 x 7 patches)
    attention = 2.0 * torch.rand(2, 4, 6, generator=g)  # another size than the grid: resized inside
    return images, attention


@nnx.jit
def _describe(net, images, attention=None, alpha=0.0):
    return net(images, attention, alpha)


# ------------------------------------------------------------------------------------------------- input resize


@pytest.mark.parametrize(
    "in_hw, out_hw", [((480, 640), (476, 644)), ((75, 100), (70, 98)), ((10, 12), (25, 31)), ((37, 50), (23, 17))]
)
def test_antialiased_bilinear_resize_matches_torch(in_hw, out_hw):
    """Down- and upsampling, float32 weights as torch evaluates them (a float64 evaluation is off by ~3e-4)."""
    x = np.random.default_rng(0).normal(size=(2, *in_hw, 3)).astype(np.float32)
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(x).permute(0, 3, 1, 2), size=out_hw, mode="bilinear", antialias=True, align_corners=False
    )
    np.testing.assert_allclose(antialiased_bilinear_matrix(in_hw[0], out_hw[0]).sum(1), 1.0, atol=1e-6)
    out = antialiased_bilinear_resize(jnp.asarray(x), *out_hw)
    np.testing.assert_allclose(out, nhwc(expected), atol=RESIZE_ATOL, rtol=0)


@pytest.mark.parametrize(
    "hw, expected",
    [((480, 640), (476, 644)), ((322, 322), (322, 322)), ((21, 35), (28, 28)), ((28, 100), (28, 98)), ((7, 7), (0, 0))],
)
def test_patch_multiple_size_rounds_half_to_even_as_upstream(hw, expected):
    """Python's round: 21 / 14 = 1.5 -> 2 and 35 / 14 = 2.5 -> 2; an image rounding to no patch is an error."""
    if expected == (0, 0):
        with pytest.raises(ValueError, match="7x7"):
            patch_multiple_size(*hw)
        return
    assert patch_multiple_size(*hw) == expected
    x = torch.zeros(1, 3, *hw)
    assert tuple(megaloc_resize(x).shape[-2:]) == expected


def test_model_resizes_like_upstream_forward(converted, inputs):
    net, _ = converted
    images, _ = inputs
    ours = net.resize_input(jnp.asarray(nhwc(images)))
    np.testing.assert_allclose(ours, nhwc(megaloc_resize(images)), atol=RESIZE_ATOL, rtol=0)


# ------------------------------------------------------------------------------------------------------- parity


def test_config_is_inferred_from_the_shapes(converted):
    _, spec = converted
    config = spec.architecture
    assert spec.family == "megaloc" and spec.backbone == "dinov2_custom" and spec.descriptor_dim == 40
    assert spec.preprocess == PreprocessSpec("none", None, stage="tensor")  # the image's own size
    assert (config.dinov2.embed_dim, config.dinov2.depth, config.dinov2.num_heads) == (64, 2, 4)
    assert config.dinov2.pos_embed_grid == 4 and config.dinov2.interpolate_offset == 0.1
    assert (config.num_clusters, config.cluster_dim, config.token_dim, config.hidden_dim) == (8, 16, 32, 48)
    assert (config.salad_dim, config.descriptor_dim) == (32 + 16 * 8, 40)


def test_tokens_match_torch_on_a_non_square_image(reference, converted, inputs):
    net, _ = converted
    images, _ = inputs
    with torch.no_grad():
        cls, patches = reference.features(images)
    feats = nnx.jit(lambda n, x: n.features(x))(net, jnp.asarray(nhwc(images)))
    assert feats.patches.shape == (2, 5, 7, 64) and feats.grid == (5, 7)
    np.testing.assert_allclose(feats.cls, cls.numpy(), rtol=TOKEN_RTOL, atol=TOKEN_ATOL)
    np.testing.assert_allclose(feats.patches, nhwc(patches), rtol=TOKEN_RTOL, atol=TOKEN_ATOL)


@pytest.mark.parametrize("alpha", [None, (0.5, 0.0)])
def test_salad_part_and_descriptor_match_torch(reference, converted, inputs, alpha):
    """The L2-normalized SALAD part (the input of aggregator.linear) and the final descriptor, +- attention."""
    net, _ = converted
    images, attention = inputs
    att = None if alpha is None else attention
    a = 0.0 if alpha is None else torch.tensor(alpha)
    with torch.no_grad():
        salad = reference.salad(images, att, a).numpy()
        expected = reference(images, att, a).numpy()
    x = jnp.asarray(nhwc(images))
    att_j = None if att is None else jnp.asarray(att.numpy())
    a_j = jnp.asarray(np.asarray(a, np.float32))
    feats = nnx.jit(lambda n, x: n.features(x))(net, x)
    ours_salad = nnx.jit(lambda n, f, at, al: n.salad_descriptor(f, at, al))(net, feats, att_j, a_j)
    np.testing.assert_allclose(np.linalg.norm(ours_salad, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(ours_salad, salad, atol=DESC_ATOL, rtol=0)
    ours = _describe(net, x, att_j, a_j)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(ours, expected, atol=DESC_ATOL, rtol=0)


def test_legacy_release_converts_to_the_same_network(reference, converted, inputs, tmp_path):
    """megaloc.torch (torch.hub DINOv2 under backbone.model., with mask_token) gives the same descriptors."""
    path = tmp_path / "megaloc.torch"
    torch.save(reference.upstream_state_dict(legacy=True), path)
    state = read_state_dict(path)
    assert "backbone.model.mask_token" in state
    legacy, spec = convert_state_dict(state, "megaloc", options=HEADS_4)
    assert spec == converted[1]
    x = jnp.asarray(nhwc(inputs[0]))
    np.testing.assert_array_equal(_describe(legacy, x), _describe(converted[0], x))


# ---------------------------------------------------------------------------------------------------- attention


def test_attention_is_live_and_alpha_zero_is_plain(converted, inputs):
    net, _ = converted
    images, attention = inputs
    x, att = jnp.asarray(nhwc(images)), jnp.asarray(attention.numpy())
    plain = np.asarray(_describe(net, x))
    # Another compiled graph (with the attention inputs) than the plain call, hence round-off rather than bit equality.
    np.testing.assert_allclose(np.asarray(_describe(net, x, att, jnp.asarray(1e-7))), plain, atol=1e-6, rtol=0)
    assert np.max(np.abs(np.asarray(_describe(net, x, att, jnp.asarray(0.5))) - plain)) > 1e-3


def test_alpha_sweep_equals_one_alpha_calls(converted, inputs):
    net, _ = converted
    images, attention = inputs
    feats = nnx.jit(lambda n, x: n.features(x))(net, jnp.asarray(nhwc(images)))
    att = jnp.asarray(attention.numpy())
    alphas = jnp.asarray([0.0, 0.3, 1.0])
    sweep = nnx.jit(lambda n, f, a, al: jax.vmap(lambda x: n.aggregate(f, a, x))(al))(net, feats, att, alphas)
    single = nnx.jit(lambda n, f, a, al: n.aggregate(f, a, al))
    for k in range(3):
        np.testing.assert_allclose(sweep[k], single(net, feats, att, alphas[k]), atol=1e-6, rtol=0)


def test_gradient_in_alpha_matches_float64_central_differences(reference, converted, inputs):
    """d/d alpha of <descriptor, r>: jax.grad (float32) against torch float64 central differences."""
    net, _ = converted
    images, attention = inputs
    r = np.random.default_rng(3).normal(size=(2, 40))
    ref64 = make_torch_megaloc(torch.Generator().manual_seed(0)).double()

    def torch_score(alpha: float) -> float:
        with torch.no_grad():
            d = ref64(images.double(), attention.double(), torch.tensor(alpha, dtype=torch.float64))
        return float((d.numpy() * r).sum())

    feats = nnx.jit(lambda n, x: n.features(x))(net, jnp.asarray(nhwc(images)))
    att = jnp.asarray(attention.numpy())
    grad = nnx.jit(lambda n, a: jax.grad(lambda al: jnp.sum(n.aggregate(feats, att, al) * r))(a))
    for alpha in (0.3, 0.8):
        h = 1e-5
        expected = (torch_score(alpha + h) - torch_score(alpha - h)) / (2 * h)
        np.testing.assert_allclose(float(grad(net, jnp.asarray(alpha))), expected, rtol=GRAD_RTOL, atol=1e-6)


# ------------------------------------------------------------------------------------ model directory and script


@pytest.mark.slow
def test_converter_script_and_load_without_torch(reference, inputs, tmp_path):
    """converters/megaloc.py on a .safetensors file, then aj.load_model, in one process where torch is blocked."""
    images, attention = inputs
    config, ours = convert_and_load_without_torch(
        tmp_path, "megaloc", reference.upstream_state_dict(), images, attention, ("--num_heads=4",)
    )
    assert config["family"] == "megaloc" and config["architecture"]["descriptor_dim"] == 40
    assert config["preprocess"]["resize"] == "none"
    with torch.no_grad():
        expected = reference(images).numpy()
        expected_att = reference(images, attention, 0.5).numpy()
    np.testing.assert_allclose(ours[0], expected, atol=DESC_ATOL, rtol=0)
    np.testing.assert_allclose(ours[1], expected_att, atol=DESC_ATOL, rtol=0)


def test_vpr_model_preprocess_sweep_and_compiles(converted, tmp_path):
    """The evaluation transform is ToTensor + Normalize at the photo's own size (no resize before the model)."""
    from PIL import Image
    from torchvision import transforms as T

    from attllm_jax.models.vpr import VPRModel

    net, spec = converted
    model = VPRModel(net, spec)
    reference = T.Compose([T.ToTensor(), T.Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))])
    path = tmp_path / "photo.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (75, 100, 3), dtype=np.uint8)).save(path, quality=90)
    with Image.open(path) as image:
        x = model.preprocess(image)
        expected = reference(image).permute(1, 2, 0).numpy()
    assert x.shape == (75, 100, 3)
    np.testing.assert_allclose(x, expected, atol=1e-6, rtol=0)
    batch = np.stack([x, x[:, ::-1]])
    feats = model.features(batch)
    assert model.feature_grid(feats) == (5, 7)
    att = np.random.default_rng(1).uniform(0.0, 2.0, (2, 4, 6)).astype(np.float32)
    alphas = [0.0, 0.25, 1.0]
    sweep = model.aggregate_sweep(feats, att, alphas)
    assert sweep.shape == (3, 2, 40)
    for k, a in enumerate(alphas):
        np.testing.assert_allclose(sweep[k], model.aggregate(feats, att, a), atol=1e-6, rtol=0)
    model(batch)
    model(batch + 0.0)
    assert model.trace_counts["__call__"] == 1 and model.trace_counts["aggregate"] == 1
    with pytest.raises(ValueError, match="alpha"):
        model(batch, att, 1.5)


# --------------------------------------------------------------------------------------------------- strictness


def _state(reference, legacy=False):
    return {k: v.numpy().copy() for k, v in reference.upstream_state_dict(legacy).items()}


def test_missing_extra_and_misshapen_tensors_are_all_named(reference):
    state = _state(reference)
    del state["aggregator.linear.bias"]
    state["aggregator.agg.extra"] = np.zeros((3, 2), np.float32)
    state["backbone.blocks.1.ls2.gamma"] = np.zeros((65,), np.float32)
    with pytest.raises(ConversionError) as info:
        convert_state_dict(state, "megaloc", options=HEADS_4)
    message = str(info.value)
    assert "'aggregator.linear.bias'" in message
    assert "'aggregator.agg.extra' [3, 2]" in message
    assert "backbone.blocks.1.ls2.gamma" in message and "[65]" in message


def test_mask_token_is_an_error_in_the_safetensors_layout(reference):
    """HEAD's model has no mask_token: a stray one is an unused tensor, not silently dropped."""
    state = _state(reference)
    state["backbone.mask_token"] = np.zeros((1, 64), np.float32)
    with pytest.raises(ConversionError, match=r"unused source tensor 'backbone\.mask_token'"):
        convert_state_dict(state, "megaloc", options=HEADS_4)


def test_other_families_are_rejected_with_a_hint(reference):
    salad_like = {k.replace("aggregator.agg.", "aggregator."): v for k, v in _state(reference, legacy=True).items()}
    with pytest.raises(ConversionError, match="not a MegaLoc checkpoint.*SALAD"):
        convert_state_dict(salad_like, "megaloc", options=HEADS_4)


def test_truncated_file_is_rejected(reference, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in reference.upstream_state_dict().items()}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match="model.safetensors"):
        read_state_dict(path)


@pytest.mark.slow
def test_full_size_megaloc_matches_torch():
    """The released architecture (ViT-B/14, m=64, l=256, g=256, 16640 -> 8448) on a 480x640 photo, random weights."""
    reference = make_torch_megaloc(torch.Generator().manual_seed(5), **RELEASED_MEGALOC_ARCH)
    net, spec = convert_state_dict({k: v.numpy() for k, v in reference.upstream_state_dict().items()}, "megaloc")
    config = spec.architecture
    assert (config.salad_dim, config.descriptor_dim, config.dinov2.num_heads) == (16640, 8448, 12)
    assert spec.backbone == "dinov2_vitb14"
    g = torch.Generator().manual_seed(6)
    images = torch.randn(1, 3, 480, 640, generator=g)
    attention = 2.0 * torch.rand(1, 16, 16, generator=g)
    with torch.no_grad():
        expected = reference(images).numpy()
        expected_att = reference(images, attention, 0.5).numpy()
    x = jnp.asarray(nhwc(images))
    np.testing.assert_allclose(_describe(net, x), expected, atol=DESC_ATOL, rtol=0)
    ours_att = _describe(net, x, jnp.asarray(attention.numpy()), jnp.asarray(0.5))
    np.testing.assert_allclose(ours_att, expected_att, atol=DESC_ATOL, rtol=0)
