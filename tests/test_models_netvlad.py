"""NetVLAD: a random release file in hloc's MATLAB struct format, converted by the production converter, against
the harness's PyTorch NetVLAD loaded from the same file; the attention formula; strictness; the script.

:mod:`benchmarks.torch_netvlad` (shared with the benchmark) writes the file with ``scipy.io.savemat`` and loads it as
hloc does. Default suite: the real VGG-16 with 8 clusters and a 4096 -> 64 whitening (and the 4096-d unwhitened
variant), images 64 x 80 (a 4 x 5 conv5_3 grid) whose normalized values run slightly outside [0, 1] so that the
harness's clamps act. The attention path is checked against a NumPy transcription of the formula applied in the
reference's residual sum. Tolerances (float32, highest matmul precision): descriptors 1e-5 max abs; the conv5_3 map
``atol 1e-4 * max(1, max |ref|)``.
"""

import numpy as np
import pytest

from attllm_jax.convert.netvlad import NetVLADConvertOptions

torch = pytest.importorskip("torch")
F = torch.nn.functional

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from torch_helpers import REPO, nhwc  # noqa: E402

from attllm_jax.convert import convert_file  # noqa: E402
from attllm_jax.convert.common import ConversionError  # noqa: E402
from attllm_jax.convert.netvlad import convert_state_dict, read_checkpoint  # noqa: E402
from attllm_jax.data.preprocess import PreprocessSpec  # noqa: E402
from attllm_jax.models import registry  # noqa: E402
from attllm_jax.models.features import CnnFeatures  # noqa: E402
from attllm_jax.models.netvlad import NetVLADSpec  # noqa: E402
from benchmarks.torch_netvlad import (  # noqa: E402
    IMAGENET_MEAN,
    IMAGENET_STD,
    TorchNetVLAD,
    random_netvlad_weights,
    write_netvlad_struct,
)

pytestmark = pytest.mark.torch

DESC_ATOL = 1e-5
SMALL = dict(num_clusters=8, whiten_dim=64)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """(path of a random small struct file, its weights)."""
    weights = random_netvlad_weights(np.random.default_rng(0), **SMALL)
    path = tmp_path_factory.mktemp("netvlad") / "Small_struct.mat"
    write_netvlad_struct(path, weights)
    return path, weights


@pytest.fixture(scope="module")
def case(release):
    """(reference, converted net, spec, images, attention)."""
    path, _ = release
    net, spec = convert_file("netvlad", path)
    g = torch.Generator().manual_seed(1)
    rgb = -0.05 + 1.1 * torch.rand(2, 3, 64, 80, generator=g)
    images = (rgb - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    attention = 2.0 * torch.rand(2, 3, 5, generator=g)
    return TorchNetVLAD(path), net, spec, images, attention


@nnx.jit
def _describe(net, images, attention=None, alpha=0.0):
    return net(images, attention, alpha)


@nnx.jit
def _features(net, images):
    return net.features(images)


def numpy_location_weights(grid: tuple[int, int], attention: np.ndarray, alpha) -> np.ndarray:
    """The formula: ``w_i = 1 + alpha (A_i - 1)`` (uniform native weight), ``alpha <= 1e-6``: 1; ``[B, h * w]``.

    ``attention`` [B, h', w'] is resized with torch's bilinear ``interpolate`` (align_corners=False), clamped to
    [0, 2] and flattened row-major as the reference's ``view`` flattens the map.
    """
    b = attention.shape[0]
    resized = F.interpolate(torch.as_tensor(attention)[:, None], size=grid, mode="bilinear", align_corners=False)
    target = np.clip(resized[:, 0].double().numpy(), 0.0, 2.0).reshape(b, -1)
    alpha = np.broadcast_to(np.asarray(alpha, np.float64), (b,))[:, None]
    return np.where(alpha <= 1e-6, 1.0, 1.0 + alpha * (target - 1.0))


def test_architecture_provenance_and_preprocessing(case, release):
    _, net, spec, _, _ = case
    path, weights = release
    assert spec.family == "netvlad" and spec.backbone == "vgg16" and spec.descriptor_dim == 64
    assert spec.architecture == NetVLADSpec(num_clusters=8, whiten_dim=64)
    assert spec.preprocess == PreprocessSpec("none", None, stage="tensor")
    assert spec.provenance.source_file == path.name and spec.provenance.published_file is None
    # the mean pixel is the file's (not ImageNet's 123.68, ...), and the centres are the file's negated back
    np.testing.assert_array_equal(np.asarray(net.pixel_mean[...]), weights["average_image"][0, 0])
    np.testing.assert_array_equal(np.asarray(net.netvlad.centers[...]), weights["centers"])


def test_conv5_3_map_matches_torch(case):
    """0-255 input minus the mean pixel, VGG-16 to conv5_3 without its ReLU (negative values survive)."""
    reference, net, _, images, _ = case
    with torch.no_grad():
        expected = nhwc(reference.features(images))
    feats = _features(net, jnp.asarray(nhwc(images)))
    assert isinstance(feats, CnnFeatures) and feats.grid == (4, 5) and expected.min() < 0
    np.testing.assert_allclose(feats.maps, expected, rtol=0, atol=1e-4 * max(1.0, np.abs(expected).max()))


def test_descriptors_match_torch(case):
    reference, net, _, images, _ = case
    with torch.no_grad():
        expected = reference(images).numpy()
    ours = np.asarray(_describe(net, jnp.asarray(nhwc(images))))
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(ours, expected, atol=DESC_ATOL, rtol=0)


@pytest.mark.parametrize("alpha", [0.6, (0.3, 1.0), (0.0, 0.8)])
def test_attention_matches_the_numpy_formula_in_the_torch_residual_sum(case, alpha):
    reference, net, _, images, attention = case
    weights = numpy_location_weights((4, 5), attention.numpy(), alpha)
    with torch.no_grad():
        expected = reference(images, torch.as_tensor(weights, dtype=torch.float32)).numpy()
    ours = _describe(net, jnp.asarray(nhwc(images)), jnp.asarray(attention.numpy()), jnp.asarray(alpha, jnp.float32))
    np.testing.assert_allclose(ours, expected, atol=DESC_ATOL, rtol=0)


def test_alpha_zero_is_the_plain_model_and_attention_is_live(case):
    _, net, _, images, attention = case
    x, att = jnp.asarray(nhwc(images)), jnp.asarray(attention.numpy())
    plain = np.asarray(_describe(net, x))
    for alpha in (0.0, 1e-7):
        np.testing.assert_allclose(_describe(net, x, att, jnp.asarray(alpha)), plain, atol=1e-6, rtol=0)
    assert np.max(np.abs(np.asarray(_describe(net, x, att, jnp.asarray(0.5))) - plain)) > 1e-3
    ones = jnp.ones_like(att)  # A = 1 gives w = 1 at any alpha
    np.testing.assert_allclose(_describe(net, x, ones, jnp.asarray(0.7)), plain, atol=1e-6, rtol=0)


def test_alpha_sweep_equals_one_alpha_calls(case):
    _, net, _, images, attention = case
    feats = _features(net, jnp.asarray(nhwc(images)))
    att = jnp.asarray(attention.numpy())
    alphas = jnp.asarray([0.0, 0.4, 1.0])
    sweep = nnx.jit(lambda n, f, a, al: jax.vmap(lambda x: n.aggregate(f, a, x))(al))(net, feats, att, alphas)
    single = nnx.jit(lambda n, f, a, al: n.aggregate(f, a, al))
    for k in range(3):
        np.testing.assert_allclose(sweep[k], single(net, feats, att, alphas[k]), atol=1e-6, rtol=0)


def test_the_unwhitened_variant_matches_torch(release, case):
    """--descriptor_dim 512 * K: the VLAD vector; the file's whitening layer is left out explicitly."""
    path, _ = release
    _, _, _, images, _ = case
    net, spec = convert_file("netvlad", path, options=NetVLADConvertOptions(descriptor_dim=512 * 8))
    assert spec.architecture.whiten_dim is None and spec.descriptor_dim == 4096 and net.whiten is None
    with torch.no_grad():
        expected = TorchNetVLAD(path, whiten=False)(images).numpy()
    np.testing.assert_allclose(_describe(net, jnp.asarray(nhwc(images))), expected, atol=DESC_ATOL, rtol=0)


# ------------------------------------------------------------------------------------ script and registry


# a converter subprocess (10 s); the converter script convention runs for CosPlace in the default suite
@pytest.mark.slow
def test_converter_script_and_load_without_torch(release, case, tmp_path):
    """attllm-convert netvlad on the .mat file, then aj.load_model, in a subprocess where torch cannot be imported."""
    import json
    import os
    import subprocess
    import sys

    path, _ = release
    reference, _, _, images, attention = case
    np.save(tmp_path / "x.npy", nhwc(images))
    np.save(tmp_path / "a.npy", attention.numpy())
    out = tmp_path / "model"
    script = (
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "from converters.cli import run\n"
        "try:\n"
        f"    run(['attllm-convert', 'netvlad', '--checkpoint={path}', '--output={out}'])\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "import numpy as np, jax\n"
        "jax.config.update('jax_default_matmul_precision', 'highest')\n"
        "import attllm_jax as aj\n"
        f"m = aj.load_model({str(out)!r})\n"
        f"x, a = np.load({str(tmp_path / 'x.npy')!r}), np.load({str(tmp_path / 'a.npy')!r})\n"
        f"np.save({str(tmp_path / 'd.npy')!r}, np.concatenate([m(x)[None], m.aggregate_sweep(m.features(x), a, "
        "[0.0, 0.5])]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert config["family"] == "netvlad" and config["architecture"] == {"num_clusters": 8, "whiten_dim": 64}
    assert config["preprocess"]["resize"] == "none" and config["provenance"]["source_file"] == path.name
    ours = np.load(tmp_path / "d.npy")
    with torch.no_grad():
        expected = reference(images).numpy()
        weights = numpy_location_weights((4, 5), attention.numpy(), 0.5)
        expected_att = reference(images, torch.as_tensor(weights, dtype=torch.float32)).numpy()
    np.testing.assert_allclose(ours[0], expected, atol=DESC_ATOL, rtol=0)
    np.testing.assert_allclose(ours[1], expected, atol=DESC_ATOL, rtol=0)
    np.testing.assert_allclose(ours[2], expected_att, atol=DESC_ATOL, rtol=0)


def test_published_files_are_listed():
    entry = registry.find_published("netvlad", None, 4096)
    assert entry.file_name == "Pitts30K_struct.mat"
    assert entry.url == "https://cvg-data.inf.ethz.ch/hloc/netvlad/Pitts30K_struct.mat"
    assert registry.find_published("netvlad", "vgg16", 32768).file_name == "Pitts30K_struct.mat"
    assert NetVLADSpec.released(32768).descriptor_dim == 32768 and NetVLADSpec.released().descriptor_dim == 4096


# --------------------------------------------------------------------------------------------------- strictness


def test_missing_extra_and_misshapen_arrays_are_all_named_in_one_error(release):
    path, _ = release
    state = read_checkpoint(path)
    del state["layers.28.weights.1"]  # conv5_3's bias
    state["layers.31.weights.0"] = np.zeros((3, 2), np.float32)  # the intra-normalization has no weights
    state["layers.30.weights.1"] = np.zeros((512, 9), np.float32)  # centres for 9 clusters, assignment for 8
    with pytest.raises(ConversionError) as info:
        convert_state_dict(state, "netvlad")
    message = str(info.value)
    assert "3 problem(s)" in message
    assert "missing source tensor 'layers.28.weights.1'" in message
    assert "unused source tensor 'layers.31.weights.0' [3, 2]" in message
    assert "netvlad/centers" in message and "[512, 9]" in message


def test_bad_files_and_dimensions_are_named(release, tmp_path):
    path, _ = release
    with pytest.raises(ConversionError, match="--descriptor_dim=2048 but the file gives 4096 \\(VLAD\\) or 64"):
        convert_file("netvlad", path, options=NetVLADConvertOptions(descriptor_dim=2048))
    not_mat = tmp_path / "Pitts30K_struct.mat"
    not_mat.write_bytes(b"not a MATLAB file at all")
    with pytest.raises(ConversionError, match="cannot read .*Pitts30K_struct.mat as a MATLAB struct"):
        convert_file("netvlad", not_mat)
    from scipy.io import savemat

    other = tmp_path / "other.mat"
    savemat(str(other), {"weights": np.zeros(3)})
    with pytest.raises(ConversionError, match="has no 'net' struct with 'layers'.*'weights'"):
        convert_file("netvlad", other)


def test_a_squeezed_one_pixel_average_image_is_the_mean_pixel(release, tmp_path):
    path, weights = release
    one_pixel = dict(weights, average_image=np.array([[[120.0, 110.0, 100.0]]], np.float32))
    write_netvlad_struct(tmp_path / "p.mat", one_pixel)
    net, _ = convert_file("netvlad", tmp_path / "p.mat")
    np.testing.assert_array_equal(np.asarray(net.pixel_mean[...]), [120.0, 110.0, 100.0])


@pytest.mark.slow
def test_full_size_netvlad_matches_torch(tmp_path):
    """The released architecture (64 clusters, 32768 -> 4096 whitening), random weights, a 240 x 320 image."""
    weights = random_netvlad_weights(np.random.default_rng(5))
    path = tmp_path / "Pitts30K_struct.mat"
    write_netvlad_struct(path, weights)
    del weights
    net, spec = convert_file("netvlad", path)
    assert spec.architecture == NetVLADSpec.released(4096)
    g = torch.Generator().manual_seed(6)
    rgb = torch.rand(1, 3, 240, 320, generator=g)
    images = (rgb - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    attention = 2.0 * torch.rand(1, 16, 16, generator=g)
    reference = TorchNetVLAD(path)
    with torch.no_grad():
        expected = reference(images).numpy()
        location = numpy_location_weights((15, 20), attention.numpy(), 0.5)
        expected_att = reference(images, torch.as_tensor(location, dtype=torch.float32)).numpy()
    x = jnp.asarray(nhwc(images))
    np.testing.assert_allclose(_describe(net, x), expected, atol=DESC_ATOL, rtol=0)
    ours_att = _describe(net, x, jnp.asarray(attention.numpy()), jnp.asarray(0.5))
    np.testing.assert_allclose(ours_att, expected_att, atol=DESC_ATOL, rtol=0)
