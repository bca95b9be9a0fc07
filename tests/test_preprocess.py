"""``VPRModel.preprocess`` (:mod:`attllm_jax.data.preprocess`) against torchvision's evaluation transforms on real
JPEG files.

CosPlace / EigenPlaces: ``Resize(512)`` (shorter side, PIL bilinear with antialias) -> ``ToTensor`` ->
``Normalize(ImageNet)``; SALAD: ``Resize((322, 322))``. Both apply the same PIL resampling to the same decoded
pixels, so the tolerance is float32 round-off of the normalization (1e-6).
"""

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from attllm_jax.data.preprocess import PreprocessSpec, preprocess_image, shorter_side_size
from attllm_jax.models.spec import ModelSpec
from attllm_jax.models.vpr import VPRModel

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
SIZES = [(640, 480), (480, 640), (333, 500), (300, 200), (700, 512), (1000, 1000)]  # (width, height)


class Identity(nnx.Module):
    """A stand-in network: preprocessing does not depend on it."""

    def __call__(self, images, attention=None, alpha=0.0):
        return images


def make_jpeg(path, width: int, height: int, mode: str = "RGB", seed: int = 0):
    """A smooth random image with edges (so that resampling differences would show), saved as JPEG."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(width, height)
    channels = [
        127 + 120 * np.sin(2 * np.pi * (f * xx + g * yy) + phase) for f, g, phase in rng.uniform(0.5, 8.0, (3, 3))
    ]
    img = np.stack(channels, -1) + rng.normal(0, 10, (height, width, 3))
    img[height // 3 : height // 2, width // 4 : width // 2] = [250, 10, 30]  # a sharp block
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).convert(mode).save(path, quality=90)
    return Image.open(path)


def torchvision_transform(size):
    pytest.importorskip("torch")
    from torchvision import transforms

    return transforms.Compose(
        [
            transforms.Resize(size, interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ]
    )


def cnn_model() -> VPRModel:
    return VPRModel(Identity(), ModelSpec.cosplace("resnet18", 512))


@pytest.mark.torch
@pytest.mark.parametrize("size", SIZES)
def test_cnn_preprocess_matches_torchvision(tmp_path, size):
    image = make_jpeg(tmp_path / "img.jpg", *size)
    ours = cnn_model().preprocess(image)
    ref = torchvision_transform(512)(image).numpy().transpose(1, 2, 0)
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    assert min(ours.shape[:2]) == 512
    np.testing.assert_allclose(ours, ref, atol=1e-6, rtol=0)


@pytest.mark.torch
@pytest.mark.parametrize("size", SIZES[:3])
def test_salad_preprocess_matches_torchvision(tmp_path, size):
    image = make_jpeg(tmp_path / "img.jpg", *size, seed=1)
    model = VPRModel(Identity(), ModelSpec.salad())  # the family preset: 322 x 322
    ours = model.preprocess(image)
    ref = torchvision_transform((322, 322))(image).numpy().transpose(1, 2, 0)
    assert ours.shape == (322, 322, 3)
    np.testing.assert_allclose(ours, ref, atol=1e-6, rtol=0)


@pytest.mark.torch
@pytest.mark.parametrize("override", [256, (200, 300)])
def test_image_size_override(tmp_path, override):
    image = make_jpeg(tmp_path / "img.jpg", 640, 480, seed=2)
    ours = cnn_model().preprocess(image, image_size=override)
    ref = torchvision_transform(override)(image).numpy().transpose(1, 2, 0)
    np.testing.assert_allclose(ours, ref, atol=1e-6, rtol=0)


@pytest.mark.torch
def test_grayscale_and_rgba_become_rgb(tmp_path):
    gray = make_jpeg(tmp_path / "gray.jpg", 400, 300, mode="L", seed=3)
    ours = cnn_model().preprocess(gray)
    ref = torchvision_transform(512)(gray.convert("RGB")).numpy().transpose(1, 2, 0)
    assert ours.shape == (512, 682, 3)
    np.testing.assert_allclose(ours, ref, atol=1e-6, rtol=0)
    rgba = Image.new("RGBA", (64, 48), (10, 200, 30, 128))
    assert cnn_model().preprocess(rgba).shape == (512, 682, 3)


def test_shorter_side_size_floors_like_torchvision():
    assert shorter_side_size(640, 480, 512) == (682, 512)  # 682.67 floored
    assert shorter_side_size(333, 500, 512) == (512, 768)  # 768.77 floored
    assert shorter_side_size(512, 512, 512) == (512, 512)


def test_no_resize_when_already_at_size_is_exact_scaling():
    image = Image.fromarray(np.full((512, 600, 3), 255, np.uint8))
    ours = cnn_model().preprocess(image)
    np.testing.assert_allclose(ours[0, 0], (1.0 - np.asarray(MEAN)) / np.asarray(STD), rtol=1e-6)


def test_bad_inputs_are_named():
    model = cnn_model()
    with pytest.raises(ValueError, match="expects a PIL image, got ndarray"):
        model.preprocess(np.zeros((4, 4, 3)))
    image = Image.new("RGB", (8, 8))
    with pytest.raises(ValueError, match="image_size must be positive"):
        model.preprocess(image, image_size=0)
    with pytest.raises(ValueError, match=r"image_size must be an int or a positive \(height, width\) pair"):
        model.preprocess(image, image_size=(1, 2, 3))
    with pytest.raises(ValueError, match="resize must be one of"):
        preprocess_image(image, PreprocessSpec("crop", 8))
    with pytest.raises(ValueError, match="antialias must be true"):
        PreprocessSpec("exact", (8, 8), antialias=False)
    with pytest.raises(ValueError, match="std must be 3 numbers > 0"):
        PreprocessSpec("exact", (8, 8), std=(1.0, 0.0, 1.0))


def test_spec_round_trips_and_overrides():
    spec = PreprocessSpec.exact((322, 322))
    assert PreprocessSpec(**{**spec.to_dict(), "size": tuple(spec.to_dict()["size"])}) == spec
    assert spec.with_size(256) == PreprocessSpec.shorter_side(256)
    assert spec.with_size(None) is spec
