"""MixVPR: parity with PyTorch through the production converter, the attention formula, strictness, the script.

The reference (:mod:`benchmarks.torch_mixvpr`, shared with the benchmark) follows amaralibey/MixVPR and
VPR-methods-evaluation's ``MixVPRModel``: the input resize to S x S (antialiased), torchvision's ResNet cut after
``layer3``, the Feature-Mixer layers, ``channel_proj``, ``row_proj``, flatten, L2. Its state dict is saved with
``torch.save`` as a ``.ckpt`` and read by :func:`attllm_jax.convert.convert_file`. Small sizes in the default suite:
ResNet blocks (1, 1, 1), S = 64 (a 4 x 4 grid, 16 positions), 2 mixer layers of ratio 2, 32 channels x 3 rows (96-d),
images 60 x 90 (so the resize scales both ways). The attention path is checked against a NumPy transcription of the
formula applied to the reference's backbone map. Tolerances (float32, highest matmul precision): descriptors 1e-5 max
abs; maps ``atol 1e-4 * max(1, max |ref|)``.
"""

import numpy as np
import pytest

from attllm_jax.convert.mixvpr import MixVPRConvertOptions

torch = pytest.importorskip("torch")
F = torch.nn.functional

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from torch_helpers import convert_and_load_without_torch, nhwc  # noqa: E402

from attllm_jax.convert import convert_file  # noqa: E402
from attllm_jax.convert.common import ConversionError  # noqa: E402
from attllm_jax.convert.mixvpr import convert_state_dict  # noqa: E402
from attllm_jax.data.preprocess import PreprocessSpec  # noqa: E402
from attllm_jax.models import registry  # noqa: E402
from attllm_jax.models.features import CnnFeatures  # noqa: E402
from attllm_jax.models.mixvpr import MixVPRSpec  # noqa: E402
from benchmarks.torch_mixvpr import make_torch_mixvpr  # noqa: E402

pytestmark = pytest.mark.torch

DESC_ATOL = 1e-5
SMALL = dict(layers=(1, 1, 1), image_size=64, out_channels=32, mix_depth=2, mlp_ratio=2, out_rows=3)
_CACHE = {}


def _reference():
    if "small" not in _CACHE:
        _CACHE["small"] = make_torch_mixvpr(torch.Generator().manual_seed(3), **SMALL)
    return _CACHE["small"]


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """(reference, converted net, spec, images, attention); the checkpoint goes through torch.save and convert_file."""
    reference = _reference()
    path = tmp_path_factory.mktemp("mixvpr") / "resnet50_MixVPR_96_channels(32)_rows(3).ckpt"
    torch.save(reference.state_dict(), path)
    net, spec = convert_file("mixvpr", path)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 60, 90, generator=g)
    attention = 2.0 * torch.rand(2, 3, 5, generator=g)
    return reference, net, spec, images, attention


@nnx.jit
def _describe(net, images, attention=None, alpha=0.0):
    return net(images, attention, alpha)


@nnx.jit
def _features(net, images):
    return net.features(images)


def numpy_location_weights(feature_map: np.ndarray, attention: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """The formula: ``nu_i = ||x_i|| / mean_i ||x_i||``, ``w_i = nu_i + alpha (A_i - nu_i)``, ``alpha <= 1e-6``: 1.

    ``feature_map`` [B, C, h, w] (NumPy, float64), ``attention`` [B, h', w'], resized with torch's bilinear
    ``interpolate`` (align_corners=False) and clamped to [0, 2]; returns [B, h, w].
    """
    b, _, h, w = feature_map.shape
    resized = F.interpolate(torch.as_tensor(attention)[:, None], size=(h, w), mode="bilinear", align_corners=False)
    target = np.clip(resized[:, 0].double().numpy(), 0.0, 2.0)
    norms = np.sqrt(np.sum(feature_map.astype(np.float64) ** 2, axis=1))
    nu = norms / norms.mean(axis=(1, 2), keepdims=True)
    alpha = np.broadcast_to(np.asarray(alpha, np.float64), (b,))[:, None, None]
    return np.where(alpha <= 1e-6, 1.0, nu + alpha * (target - nu))


def test_architecture_and_preprocessing_are_inferred_from_the_shapes(case):
    _, _, spec, _, _ = case
    arch = spec.architecture
    assert spec.family == "mixvpr" and spec.backbone == "resnet_custom" and spec.descriptor_dim == 96
    assert (arch.resnet_layers, arch.image_size, arch.mix_depth, arch.mlp_ratio) == ((1, 1, 1), 64, 2, 2)
    assert (arch.out_channels, arch.out_rows, arch.grid, arch.in_channels) == (32, 3, 4, 1024)
    assert spec.preprocess == PreprocessSpec("exact", (64, 64), stage="tensor")
    assert spec.provenance.source_file == "resnet50_MixVPR_96_channels(32)_rows(3).ckpt"
    assert spec.provenance.published_file is None


def test_backbone_map_matches_torch(case):
    """The resized input's layer3 map (the model resizes 60 x 90 to 64 x 64 itself)."""
    reference, net, _, images, _ = case
    with torch.no_grad():
        expected = nhwc(reference.features(images))
    feats = _features(net, jnp.asarray(nhwc(images)))
    assert isinstance(feats, CnnFeatures) and feats.grid == (4, 4)
    np.testing.assert_allclose(feats.maps, expected, rtol=0, atol=1e-4 * max(1.0, np.abs(expected).max()))


def test_descriptors_match_torch(case):
    reference, net, _, images, _ = case
    with torch.no_grad():
        expected = reference(images).numpy()
    ours = np.asarray(_describe(net, jnp.asarray(nhwc(images))))
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(ours, expected, atol=DESC_ATOL, rtol=0)


def test_row_major_positions_and_channel_major_output_matter(case):
    """Transposing the grid (column-major positions) moves the descriptor far beyond the tolerance."""
    _, net, _, images, _ = case
    feats = _features(net, jnp.asarray(nhwc(images)))
    plain = nnx.jit(lambda n, f: n.aggregate(f))(net, feats)
    transposed = nnx.jit(lambda n, f: n.aggregate(f))(net, CnnFeatures(maps=feats.maps.swapaxes(1, 2)))
    assert np.max(np.abs(np.asarray(plain) - np.asarray(transposed))) > 100 * DESC_ATOL


@pytest.mark.parametrize("alpha", [0.6, (0.3, 1.0), (0.0, 0.8)])
def test_attention_matches_the_numpy_formula_on_the_torch_head(case, alpha):
    reference, net, _, images, attention = case
    with torch.no_grad():
        feature_map = reference.features(images)
        weights = numpy_location_weights(feature_map.double().numpy(), attention.numpy(), np.asarray(alpha))
        expected = reference.aggregator(feature_map * torch.as_tensor(weights, dtype=torch.float32)[:, None]).numpy()
    ours = _describe(net, jnp.asarray(nhwc(images)), jnp.asarray(attention.numpy()), jnp.asarray(alpha, jnp.float32))
    np.testing.assert_allclose(ours, expected, atol=DESC_ATOL, rtol=0)


def test_alpha_zero_is_the_plain_model_and_attention_is_live(case):
    _, net, _, images, attention = case
    x, att = jnp.asarray(nhwc(images)), jnp.asarray(attention.numpy())
    plain = np.asarray(_describe(net, x))
    for alpha in (0.0, 1e-7):
        np.testing.assert_allclose(_describe(net, x, att, jnp.asarray(alpha)), plain, atol=1e-6, rtol=0)
    assert np.max(np.abs(np.asarray(_describe(net, x, att, jnp.asarray(0.5))) - plain)) > 1e-3


def test_alpha_sweep_reuses_the_backbone_and_equals_one_alpha_calls(case):
    _, net, _, images, attention = case
    feats = _features(net, jnp.asarray(nhwc(images)))
    att = jnp.asarray(attention.numpy())
    alphas = jnp.asarray([0.0, 0.4, 1.0])
    sweep = nnx.jit(lambda n, f, a, al: jax.vmap(lambda x: n.aggregate(f, a, x))(al))(net, feats, att, alphas)
    single = nnx.jit(lambda n, f, a, al: n.aggregate(f, a, al))
    for k in range(3):
        np.testing.assert_allclose(sweep[k], single(net, feats, att, alphas[k]), atol=1e-6, rtol=0)


def test_preprocess_matches_vpr_methods_evaluation(tmp_path):
    """The harness: ToTensor, Normalize at the image's own size, then the model's Resize([320, 320], antialias=True)
    of the float tensor; our preprocessing does that resize, on real JPEG files."""
    from PIL import Image
    from torchvision import transforms as T

    from attllm_jax.data.preprocess import preprocess_image

    harness = T.Compose([T.ToTensor(), T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])])
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(640, 480), (200, 150)]):
        path = tmp_path / f"img{i}.jpg"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, quality=90)
        with Image.open(path) as image:
            ours = preprocess_image(image, MixVPRSpec.released().default_preprocess())
            expected = T.Resize([320, 320], antialias=True)(harness(image)[None])[0].permute(1, 2, 0).numpy()
        assert ours.shape == (320, 320, 3)
        np.testing.assert_allclose(ours, expected, atol=2e-5, rtol=0)  # float32 sums in another order


# ------------------------------------------------------------------------------------ script and registry


@pytest.mark.slow
def test_converter_script_and_load_without_torch(tmp_path):
    """converters/mixvpr.py on a .safetensors copy, then aj.load_model, with torch blocked."""
    from converters.cli import families

    assert "mixvpr" in families()
    reference = _reference()
    g = torch.Generator().manual_seed(4)
    images, attention = torch.randn(2, 3, 64, 64, generator=g), 2.0 * torch.rand(2, 4, 4, generator=g)
    config, ours = convert_and_load_without_torch(
        tmp_path,
        "mixvpr",
        reference.state_dict(),
        images,
        attention,
        source_name="mixvpr.safetensors",
        outputs="np.concatenate([m(x)[None], m.aggregate_sweep(m.features(x), a, [0.0, 0.5])])",
    )
    assert config["family"] == "mixvpr" and config["architecture"]["image_size"] == 64
    assert config["preprocess"]["size"] == [64, 64] and config["preprocess"]["stage"] == "tensor"
    with torch.no_grad():
        expected = reference(images).numpy()
        weights = numpy_location_weights(reference.features(images).double().numpy(), attention.numpy(), 0.5)
        expected_att = reference(images, torch.as_tensor(weights, dtype=torch.float32)).numpy()
    np.testing.assert_allclose(ours[0], expected, atol=DESC_ATOL, rtol=0)
    np.testing.assert_allclose(ours[1], expected, atol=DESC_ATOL, rtol=0)
    np.testing.assert_allclose(ours[2], expected_att, atol=DESC_ATOL, rtol=0)


def test_published_files_are_listed():
    names = {e.descriptor_dim: e.file_name for e in registry.PUBLISHED if e.family == "mixvpr"}
    assert names[4096] == "resnet50_MixVPR_4096_channels(1024)_rows(4).ckpt"
    assert set(names) == {128, 512, 4096}
    for dim in names:
        assert MixVPRSpec.released(dim).descriptor_dim == dim
    with pytest.raises(ValueError, match="give --checkpoint"):
        registry.find_published("mixvpr", None, 4096)
    with pytest.raises(ValueError, match=r"_rows\(4\)\.ckpt is not downloaded automatically: .*drive\.google\.com"):
        registry.find_published("mixvpr", "resnet50", 4096)


# --------------------------------------------------------------------------------------------------- strictness


def _state():
    return {k: v.numpy().copy() for k, v in _reference().state_dict().items()}


def test_missing_extra_and_misshapen_tensors_are_all_named_in_one_error():
    state = _state()
    del state["aggregator.mix.1.mix.3.bias"]
    state["aggregator.mix.0.extra"] = np.zeros((3, 2), np.float32)
    state["aggregator.row_proj.bias"] = np.zeros((5,), np.float32)
    with pytest.raises(ConversionError) as info:
        convert_state_dict(state, "mixvpr")
    message = str(info.value)
    assert "3 problem(s)" in message
    assert "missing source tensor 'aggregator.mix.1.mix.3.bias'" in message
    assert "unused source tensor 'aggregator.mix.0.extra' [3, 2]" in message
    assert "aggregator/row_proj/bias" in message and "[5]" in message


def test_layer4_is_not_silently_dropped():
    state = _state()
    state["backbone.model.layer4.0.conv1.weight"] = np.zeros((512, 1024, 1, 1), np.float32)
    with pytest.raises(ConversionError, match=r"unused source tensor 'backbone\.model\.layer4\.0\.conv1\.weight'"):
        convert_state_dict(state, "mixvpr")


def test_a_contradicting_descriptor_dim_and_other_families_are_rejected():
    with pytest.raises(ConversionError, match=r"--descriptor_dim=4096 but .* 32 channels x 3 rows = 96"):
        convert_state_dict(_state(), "mixvpr", options=MixVPRConvertOptions(descriptor_dim=4096))
    with pytest.raises(ConversionError, match="not a MixVPR checkpoint.*BoQ"):
        convert_state_dict({"aggregator.boqs.0.queries": np.zeros((1, 2, 3))}, "mixvpr")


@pytest.mark.slow
def test_full_size_mixvpr_matches_torch():
    """The released 4096-d architecture (ResNet-50, 320 x 320, 4 mixers over 400 positions), random weights."""
    reference = make_torch_mixvpr(torch.Generator().manual_seed(5))
    net, spec = convert_state_dict({k: v.numpy() for k, v in reference.state_dict().items()}, "mixvpr")
    assert spec.architecture == MixVPRSpec.released(4096) and spec.backbone == "resnet50"
    g = torch.Generator().manual_seed(6)
    images = torch.randn(1, 3, 480, 640, generator=g)
    attention = 2.0 * torch.rand(1, 16, 16, generator=g)
    with torch.no_grad():
        expected = reference(images).numpy()
        weights = numpy_location_weights(reference.features(images).double().numpy(), attention.numpy(), 0.5)
        expected_att = reference(images, torch.as_tensor(weights, dtype=torch.float32)).numpy()
    x = jnp.asarray(nhwc(images))
    np.testing.assert_allclose(_describe(net, x), expected, atol=DESC_ATOL, rtol=0)
    ours_att = _describe(net, x, jnp.asarray(attention.numpy()), jnp.asarray(0.5))
    np.testing.assert_allclose(ours_att, expected_att, atol=DESC_ATOL, rtol=0)
