"""The registry entries of MegaLoc, BoQ and CliqueMining, and the spec round trip of the new families."""

import pytest

from attllm_jax.data.preprocess import PreprocessSpec
from attllm_jax.models import registry
from attllm_jax.models.boq import BoQSpec
from attllm_jax.models.megaloc import MegaLocSpec
from attllm_jax.models.spec import ConfigError, ModelSpec, Provenance


def test_published_files_of_the_new_families():
    assert registry.find_published("megaloc").file_name == "model.safetensors"
    assert registry.find_published("boq", "dinov2_vitb14").descriptor_dim == 12288
    assert registry.find_published("boq", "resnet50").file_name == "resnet50_16384.pth"
    # Two SALAD-architecture files: the converter downloads dino_salad.ckpt; CliqueMining is fetched by hand.
    assert registry.find_published("salad").file_name == "dino_salad.ckpt"
    (clique,) = [e for e in registry.PUBLISHED if e.method == "cliquemining"]
    assert (clique.family, clique.descriptor_dim, clique.auto_download) == ("salad", 8448, False)
    with pytest.raises(ValueError, match="boq/resnet50/16384"):
        registry.find_published("boq")  # two backbones: one must be named


def test_a_published_file_is_found_by_its_content_not_its_name(monkeypatch):
    import dataclasses

    digest = "ab" * 32
    entries = [dataclasses.replace(e, sha256=digest) if e.method == "cliquemining" else e for e in registry.PUBLISHED]
    monkeypatch.setattr(registry, "PUBLISHED", tuple(entries))
    assert registry.published_by_sha256(digest.upper()).file_name == "cliquemining.ckpt"
    assert registry.published_by_sha256("cd" * 32) is None  # another content, whatever the file is called
    assert registry.published_by_sha256(None) is None


@pytest.mark.parametrize(
    "spec",
    [
        ModelSpec("megaloc", MegaLocSpec.released(), PreprocessSpec.tensor(None), Provenance(weights="random")),
        ModelSpec("boq", BoQSpec.released("dinov2"), BoQSpec.released("dinov2").default_preprocess()),
        ModelSpec("boq", BoQSpec.released("resnet50"), BoQSpec.released("resnet50").default_preprocess()),
    ],
)
def test_spec_round_trips_through_config_json(spec):
    data = spec.to_dict()
    assert ModelSpec.from_dict(data) == spec
    assert spec.descriptor_dim in (8448, 12288, 16384)
    with pytest.raises(ConfigError, match="config.json: architecture: unknown field 'extra'"):
        ModelSpec.from_dict({**data, "architecture": {**data["architecture"], "extra": 1}})


def test_released_architectures():
    boq = BoQSpec.released("resnet50")
    assert (boq.backbone, boq.in_channels, boq.num_heads, boq.descriptor_dim) == ("resnet50", 1024, 8, 16384)
    assert BoQSpec.released("dinov2").backbone == "dinov2_vitb14"
    assert BoQSpec.released("resnet50").default_preprocess().size == (384, 384)
    megaloc = MegaLocSpec.released()
    assert (megaloc.backbone, megaloc.salad_dim, megaloc.descriptor_dim) == ("dinov2_vitb14", 16640, 8448)
    with pytest.raises(ValueError, match="exactly one backbone"):
        BoQSpec(dinov2=None)
    with pytest.raises(ConfigError, match="format 2"):
        MegaLocSpec.from_format_1({}, "config.json")
