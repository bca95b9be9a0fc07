"""The demo's random-weight models (--random_model): validation, notes, evaluation size, the model itself."""

import pytest

from attllm_jax.evaluation.config import EvalConfig
from attllm_jax.evaluation.demo import DEMO_IMAGE_SIZE, DEMO_NOTES, demo_config, random_model


def test_an_unknown_random_model_is_an_error_naming_the_flag(tmp_path):
    config = EvalConfig(str(tmp_path), str(tmp_path), str(tmp_path / "out"), random_model="netvlad")
    names = "cosplace, megaloc, boq_dinov2, boq_resnet50, supervlad, image4vpr"
    with pytest.raises(ValueError, match=f"--random_model must be one of {names}"):
        config.validated()


def test_the_demo_names_the_random_model_and_keeps_each_family_at_its_own_size(tmp_path):
    default = demo_config(tmp_path / "cache", tmp_path / "out")
    assert default.notes == DEMO_NOTES and default.image_size == DEMO_IMAGE_SIZE  # the CosPlace demo as it was
    boq = demo_config(tmp_path / "cache", tmp_path / "out", random_model="boq_resnet50")
    assert "RANDOM (BoQ ResNet-50 16384-d built in JAX)" in boq.notes[1] and boq.image_size is None
    converted = demo_config(tmp_path / "cache", tmp_path / "out", checkpoint="DIR", random_model="megaloc")
    assert not any("RANDOM" in note for note in converted.notes)


@pytest.mark.slow
def test_random_boq_resnet50_is_the_released_architecture_with_random_weights():
    model = random_model("boq_resnet50", seed=1)
    spec = model.spec
    assert (spec.family, spec.backbone, spec.descriptor_dim) == ("boq", "resnet50", 16384)
    assert spec.preprocess.size == (384, 384) and spec.provenance.weights == "random (seed 1)"
    with pytest.raises(ValueError, match="unknown random model 'netvlad'"):
        random_model("netvlad")


@pytest.mark.slow
def test_random_supervlad_is_the_released_architecture_with_random_weights():
    model = random_model("supervlad", seed=1)
    spec = model.spec
    assert (spec.family, spec.backbone, spec.descriptor_dim) == ("supervlad", "dinov2_vitb14", 3072)
    assert spec.preprocess.size == (322, 322) and spec.provenance.weights == "random (seed 1)"


@pytest.mark.slow
def test_random_image4vpr_is_the_released_architecture_with_random_weights():
    model = random_model("image4vpr", seed=1)
    spec = model.spec
    assert (spec.family, spec.backbone, spec.descriptor_dim) == ("image4vpr", "dinov2_vitb14_reg", 6144)
    assert spec.preprocess.size == (322, 322) and spec.provenance.weights == "random (seed 1)"
