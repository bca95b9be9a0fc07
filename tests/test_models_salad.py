"""DINOv2 + SALAD: parity with a PyTorch reference through the production converter, strictness, model directory.

The reference (:mod:`benchmarks.torch_baselines`) is transformers' DINOv2 with upstream's position-embedding
interpolation, its final norm, and a PyTorch SALAD head written from docs/DESIGN.md and serizba/salad (with the
query-side attention path). Its ``upstream_state_dict()`` has ``dino_salad.ckpt``'s keys (``backbone.model.*``,
``aggregator.*``) and is saved with ``torch.save`` and converted by :func:`attllm_jax.convert.salad.convert_salad`.
Tolerances (float32, highest matmul precision): descriptors max abs error <= 1e-6 and cosine >= 0.99999; tokens
``atol 1e-5 + rtol 1e-5``. Measured on the 2-core development CPU (every comparison here, the full-size ViT-B/14
included): descriptors <= 1e-7, tokens <= 2.1e-6 absolute; the bounds leave room for another CPU's kernels.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attllm_jax.convert.common import ConversionError

torch = pytest.importorskip("torch")

from torch_helpers import convert_and_load_without_torch, nhwc  # noqa: E402

from attllm_jax.convert import convert, convert_file  # noqa: E402
from attllm_jax.convert.salad import SaladConvertOptions  # noqa: E402
from attllm_jax.models.features import TokenFeatures  # noqa: E402
from benchmarks.torch_baselines import RELEASED_SALAD_ARCH, make_torch_dino_salad  # noqa: E402

pytestmark = pytest.mark.torch


def convert_salad(path, **options):
    return convert_file("salad", path, options=SaladConvertOptions(**options))


def convert_salad_state_dict(state_dict, **options):
    return convert("salad", state_dict, SaladConvertOptions(**options))


DESC_ATOL, MIN_COSINE = 1e-6, 0.99999  # measured <= 1e-7
TOKEN_ATOL, TOKEN_RTOL = 1e-5, 1e-5  # measured <= 2.1e-6 absolute


def _assert_descriptors_close(ours, expected):
    ours, expected = np.asarray(ours), np.asarray(expected)
    assert ours.shape == expected.shape
    assert np.max(np.abs(ours - expected)) <= DESC_ATOL
    cosine = np.sum(ours * expected, axis=1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(expected, axis=1))
    assert np.min(cosine) >= MIN_COSINE


@pytest.fixture(scope="module")
def reference():
    """A small seeded DINOv2 (width 64, depth 2, 4 heads, 4x4 stored grid) + SALAD (m=8, l=16, g=32) in PyTorch."""
    return make_torch_dino_salad(torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def checkpoint(reference, tmp_path_factory):
    path = tmp_path_factory.mktemp("salad") / "dino_salad_small.ckpt"
    torch.save(reference.upstream_state_dict(), path)
    return path


@pytest.fixture(scope="module")
def converted(checkpoint):
    return convert_salad(checkpoint, num_heads=4, image_size=(70, 98))


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, 70, 98, generator=g)  # 5x7 patch grid: position embeddings interpolated
    attention = 2.0 * torch.rand(3, 4, 6, generator=g)  # another size than the grid: resized inside
    return images, attention


def test_config_is_inferred_from_the_shapes(converted, checkpoint):
    import hashlib

    _, spec = converted
    arch = spec.architecture
    assert spec.family == "salad"
    assert spec.backbone == "dinov2_custom"
    assert arch.dinov2.embed_dim == 64 and arch.dinov2.depth == 2
    assert arch.dinov2.pos_embed_grid == 4 and arch.dinov2.num_register_tokens == 0
    assert (arch.num_clusters, arch.cluster_dim, arch.token_dim, arch.hidden_dim) == (8, 16, 32, 48)
    assert spec.descriptor_dim == 32 + 16 * 8
    assert spec.preprocess.resize == "exact" and spec.preprocess.size == (70, 98)
    assert spec.provenance.source_sha256 == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert spec.provenance.converter_version


def test_features_match_torch(reference, converted, inputs):
    net, _ = converted
    images, _ = inputs
    with torch.no_grad():
        cls, patches = reference.features(images)
    feats = nnx.jit(lambda n, x: n.features(x))(net, jnp.asarray(nhwc(images)))
    assert isinstance(feats, TokenFeatures) and feats.grid == (5, 7)
    np.testing.assert_allclose(feats.cls, cls.numpy(), rtol=TOKEN_RTOL, atol=TOKEN_ATOL)
    np.testing.assert_allclose(feats.patches, nhwc(patches), rtol=TOKEN_RTOL, atol=TOKEN_ATOL)


@pytest.mark.parametrize("alpha", [0.5, (0.0, 0.3, 1.0)])
def test_head_matches_torch_on_identical_tokens(reference, converted, inputs, alpha):
    """The SALAD head alone (same input tokens for both), with and without attention."""
    net, _ = converted
    images, attention = inputs
    with torch.no_grad():
        cls, patches = reference.features(images)
        expected = reference.aggregator(patches, cls, attention=attention, alpha=torch.tensor(alpha))
    feats = TokenFeatures(patches=jnp.asarray(nhwc(patches)), cls=jnp.asarray(cls.numpy()))
    aggregate = nnx.jit(lambda n, f, a, al: n.aggregate(f, a, al))
    ours = aggregate(net, feats, jnp.asarray(attention.numpy()), jnp.asarray(alpha))
    _assert_descriptors_close(ours, expected.numpy())


@nnx.jit
def _describe(net, images, attention=None, alpha=0.0):
    return net(images, attention, alpha)


def test_descriptors_match_torch(reference, converted, inputs):
    net, _ = converted
    images, _ = inputs
    with torch.no_grad():
        expected = reference(images).numpy()
    ours = _describe(net, jnp.asarray(nhwc(images)))
    _assert_descriptors_close(ours, expected)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-6)


@pytest.mark.parametrize("alpha", [0.5, (0.2, 0.0, 0.9)])
def test_descriptors_with_attention_match_torch(reference, converted, inputs, alpha):
    net, _ = converted
    images, attention = inputs
    with torch.no_grad():
        expected = reference(images, attention=attention, alpha=torch.tensor(alpha)).numpy()
    ours = _describe(net, jnp.asarray(nhwc(images)), jnp.asarray(attention.numpy()), jnp.asarray(alpha))
    _assert_descriptors_close(ours, expected)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-6)


def test_attention_changes_the_descriptor(converted, inputs):
    """The attention path is live (so the parity tests above would catch a broken one)."""
    net, _ = converted
    images, attention = inputs
    x, att = jnp.asarray(nhwc(images)), jnp.asarray(attention.numpy())
    plain = np.asarray(_describe(net, x))
    np.testing.assert_allclose(np.asarray(_describe(net, x, att, jnp.asarray(0.0))), plain, atol=1e-6)
    assert np.max(np.abs(np.asarray(_describe(net, x, att, jnp.asarray(0.5))) - plain)) > 1e-3


@pytest.mark.parametrize("variant", ["registers", "swiglu"])
def test_variants_match_torch(variant, tmp_path):
    """Register tokens (antialiased size-based interpolation, dropped before SALAD) and the SwiGLU feed-forward."""
    kwargs = {"registers": {"num_register_tokens": 2}, "swiglu": {"swiglu": True}}[variant]
    reference = make_torch_dino_salad(torch.Generator().manual_seed(2), **kwargs)
    path = tmp_path / "model.pth"
    torch.save({"state_dict": reference.upstream_state_dict(), "epoch": 3}, path)  # Lightning-style wrapper
    net, spec = convert_salad(path, num_heads=4)
    assert spec.architecture.dinov2.num_register_tokens == kwargs.get("num_register_tokens", 0)
    assert spec.architecture.dinov2.ffn_layer == ("swiglu" if variant == "swiglu" else "mlp")
    g = torch.Generator().manual_seed(3)
    images = torch.randn(2, 3, 42, 84, generator=g)
    attention = 2.0 * torch.rand(2, 3, 6, generator=g)
    alpha = torch.tensor([0.0, 0.7])  # image 0 is plain SALAD, image 1 attention-modulated
    with torch.no_grad():
        expected = reference(images, attention=attention, alpha=alpha).numpy()
    ours = _describe(net, jnp.asarray(nhwc(images)), jnp.asarray(attention.numpy()), jnp.asarray(alpha.numpy()))
    _assert_descriptors_close(ours, expected)


# --------------------------------------------------------------------------------------------------- strictness


def _state(reference):
    return {k: v.numpy().copy() for k, v in reference.upstream_state_dict().items()}


def test_missing_tensor_is_named(reference):
    state = _state(reference)
    del state["backbone.model.blocks.1.mlp.fc2.bias"]
    with pytest.raises(ConversionError, match=r"backbone\.model\.blocks\.1\.mlp\.fc2\.bias"):
        convert_salad_state_dict(state, num_heads=4)


def test_extra_tensor_is_named(reference):
    state = _state(reference)
    state["aggregator.extra.weight"] = np.zeros((3, 2), np.float32)
    with pytest.raises(ConversionError, match=r"aggregator\.extra\.weight.*\[3, 2\]"):
        convert_salad_state_dict(state, num_heads=4)


def test_wrong_shape_is_named(reference):
    state = _state(reference)
    state["aggregator.score.0.weight"] = np.zeros((48, 64, 3, 3), np.float32)  # a 3x3 conv instead of 1x1
    with pytest.raises(ConversionError, match=r"aggregator\.score\.0\.weight"):
        convert_salad_state_dict(state, num_heads=4)


def test_all_problems_in_one_error(reference):
    state = _state(reference)
    del state["backbone.model.norm.weight"]
    state["backbone.model.blocks.0.ls1.gamma"] = np.zeros((65,), np.float32)
    with pytest.raises(ConversionError) as info:
        convert_salad_state_dict(state, num_heads=4)
    message = str(info.value)
    assert "backbone.model.norm.weight" in message and "backbone.model.blocks.0.ls1.gamma" in message


def test_wrong_family_is_rejected(tmp_path):
    cosplace_like = {
        "backbone.0.weight": np.zeros((64, 3, 7, 7), np.float32),
        "aggregation.1.p": np.full((1,), 3.0, np.float32),
        "aggregation.3.weight": np.zeros((512, 2048), np.float32),
        "aggregation.3.bias": np.zeros((512,), np.float32),
    }
    with pytest.raises(ConversionError, match="not a complete SALAD checkpoint.*CosPlace"):
        convert_salad_state_dict(cosplace_like)


def test_truncated_file_is_rejected(checkpoint, tmp_path):
    path = tmp_path / "truncated.ckpt"
    data = checkpoint.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match="truncated.ckpt"):
        convert_salad(path, num_heads=4)


def test_backbone_flag_is_checked(checkpoint):
    with pytest.raises(ConversionError, match="dinov2_vitb14.*dinov2_custom"):
        convert_salad(checkpoint, backbone="dinov2_vitb14", num_heads=4)


def test_image_size_must_be_a_patch_multiple(checkpoint):
    with pytest.raises(ValueError, match="multiples of 14"):
        convert_salad(checkpoint, num_heads=4, image_size=(320, 320))


# ------------------------------------------------------------------------------------ model directory and script


# a converter subprocess (9 s); the converter script convention runs for CosPlace in the default suite
@pytest.mark.slow
def test_converter_script_and_load_without_torch(reference, inputs, tmp_path):
    """converters/salad.py on a .safetensors file, then aj.load_model, in one process where torch is blocked."""
    images, attention = inputs
    flags = ("--num_heads=4", "--image_size=70,98")
    config, ours = convert_and_load_without_torch(
        tmp_path, "salad", reference.upstream_state_dict(), images, attention, flags
    )
    assert config["format"] == 2 and config["family"] == "salad"
    assert config["architecture"]["num_clusters"] * config["architecture"]["cluster_dim"] == 128
    with torch.no_grad():
        expected = reference(images).numpy()
        expected_att = reference(images, attention=attention, alpha=0.5).numpy()
    _assert_descriptors_close(ours[0], expected)
    _assert_descriptors_close(ours[1], expected_att)


def test_vpr_model_does_not_recompile_and_sweeps(converted, inputs):
    from attllm_jax.models.vpr import VPRModel

    net, spec = converted
    model = VPRModel(net, spec)
    images, attention = inputs
    x, att = nhwc(images), attention.numpy()
    first = model(x)
    second = model(x + 0.0)
    np.testing.assert_array_equal(first, second)
    assert model.trace_counts["__call__"] == 1
    feats = model.features(x)
    assert model.feature_grid(feats) == (5, 7)
    alphas = [0.0, 0.25, 1.0]
    sweep = model.aggregate_sweep(feats, att, alphas)
    assert sweep.shape == (3, 3, spec.descriptor_dim)
    for k, a in enumerate(alphas):
        np.testing.assert_allclose(sweep[k], model.aggregate(feats, att, a), atol=1e-6)
    assert model.trace_counts["aggregate"] == 1
    with pytest.raises(ValueError, match="alpha"):
        model(x, att, 1.5)


def test_preprocess_matches_torchvision(converted, tmp_path):
    """SALAD's evaluation transform (resize to the configured size, bilinear) on real JPEG files."""
    from PIL import Image
    from torchvision import transforms as T

    from attllm_jax.models.vpr import VPRModel

    net, spec = converted
    model = VPRModel(net, spec.replace(preprocess=spec.preprocess.with_size((322, 322))))
    reference = T.Compose(
        [
            T.Resize((322, 322), interpolation=T.InterpolationMode.BILINEAR),
            T.ToTensor(),
            T.Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
        ]
    )
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(640, 480), (300, 500)]):
        path = tmp_path / f"img{i}.jpg"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, quality=90)
        with Image.open(path) as image:
            ours = model.preprocess(image)
            expected = reference(image).permute(1, 2, 0).numpy()
        assert ours.shape == (322, 322, 3)
        np.testing.assert_allclose(ours, expected, atol=1e-5)


@pytest.mark.slow
def test_full_size_vitb14_salad_matches_torch(tmp_path):
    """The released architecture (ViT-B/14, 37x37 stored grid, m=64, l=128, g=256) at 322x322, random weights."""
    reference = make_torch_dino_salad(torch.Generator().manual_seed(5), **RELEASED_SALAD_ARCH)
    path = tmp_path / "dino_salad.ckpt"
    torch.save(reference.upstream_state_dict(), path)
    net, spec = convert_salad(path)
    assert spec.backbone == "dinov2_vitb14" and spec.descriptor_dim == 8448
    assert spec.provenance.published_file is None  # random weights under the release's name are not the release
    g = torch.Generator().manual_seed(6)
    images = torch.randn(2, 3, 322, 322, generator=g)
    attention = 2.0 * torch.rand(2, 16, 16, generator=g)
    with torch.no_grad():
        expected = reference(images).numpy()
        expected_att = reference(images, attention=attention, alpha=0.5).numpy()
    x = jnp.asarray(nhwc(images))
    _assert_descriptors_close(_describe(net, x), expected)
    _assert_descriptors_close(_describe(net, x, jnp.asarray(attention.numpy()), jnp.asarray(0.5)), expected_att)
