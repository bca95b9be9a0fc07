"""The demo's random-weight models (--random_model): validation, notes, evaluation size, the model itself."""

import pytest

from attllm_jax.evaluation.config import EvalConfig
from attllm_jax.evaluation.demo import DEMO_IMAGE_SIZE, DEMO_NOTES, demo_config, random_model
from attllm_jax.evaluation.pipeline import run_evaluation


def test_an_unknown_random_model_is_an_error_naming_the_flag(tmp_path):
    config = EvalConfig(str(tmp_path), str(tmp_path), str(tmp_path / "out"), random_model="vlad9")
    names = "cosplace, megaloc, boq_dinov2, boq_resnet50, mixvpr, netvlad, supervlad, image4vpr"
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
    with pytest.raises(ValueError, match="unknown random model 'vlad9'"):
        random_model("vlad9")


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_oracle_attention_beats_alpha_0_on_the_synthetic_streets(seed, tmp_path):
    """The method's end-to-end property: down-weighting the water (the mask oracle) raises R@1 over plain pooling.

    Two random-weight CosPlace networks (model seeds 0 and 1) on the demo's streets: the best alpha > 0 gains at
    least 10 points of R@1 (4 of the 40 queries) over alpha 0 with each.
    """
    config = demo_config(tmp_path / "cache", tmp_path / "out", alphas=(0.0, 0.5, 0.75, 1.0), model_seed=seed)
    r1 = run_evaluation(config).retrieval.recalls[:, 0]  # [K] R@1 per alpha
    assert r1[1:].max() >= r1[0] + 10.0, r1


def test_the_random_model_flag_offers_every_random_model():
    from attllm_jax.evaluation.config import RANDOM_MODELS
    from attllm_jax.evaluation.demo import RANDOM_MODEL_NAMES
    from experiments.flagdefs import RANDOM_MODEL_CHOICES

    assert RANDOM_MODEL_CHOICES == RANDOM_MODELS and set(RANDOM_MODEL_NAMES) == set(RANDOM_MODELS)


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
