"""ModelSpec: presets, config.json round trip, the format-1 (release 0.1.0) directories under tests/data, and the
store-key / results identity it feeds.

The fixtures in ``tests/data/legacy_v0_1`` were written by release 0.1.0's converters and ``save_model`` (see its
README). Loading them must give the 0.1.0 descriptors to float32 round-off. The fixtures' expected arrays were
computed on the machine that wrote them, and XLA:CPU picks its convolution and matmul kernels (so their summation
order) by the CPU's features: on the machine that wrote them CosPlace matched bit for bit and SALAD to 3.0e-8 (one
L2-normalize formula replacing SALAD's former ``x * rsqrt(...)``), while an AMD EPYC with AVX-512 gives up to 2.5e-7
on these unit-norm descriptors (``tests/round_off.py``). Hence ``CROSS_MACHINE_ATOL``; within one machine, re-saved
and re-loaded models are compared bit for bit.
"""

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from round_off import CROSS_CPU_ATOL

import attllm_jax as aj
from attllm_jax.checkpoint import read_spec, save_model
from attllm_jax.data.preprocess import PreprocessSpec
from attllm_jax.models import registry
from attllm_jax.models.heads import CnnSpec
from attllm_jax.models.salad import SaladSpec
from attllm_jax.models.spec import FORMAT_VERSION, ConfigError, ModelSpec
from attllm_jax.models.vpr import VPRModel

LEGACY = Path(__file__).parent / "data" / "legacy_v0_1"
CROSS_MACHINE_ATOL = CROSS_CPU_ATOL  # see tests/round_off.py


def fill_like_0_1_fixture(net: nnx.Module, seed: int, gem_p: float) -> nnx.Module:
    """The weights ``make_fixtures_v0_1.py.txt`` drew: N(0, 0.05) per leaf in state order (+1 for BatchNorm
    variances and scales), GeM p from the config."""
    graphdef, state = nnx.split(net)
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        offset = 1.0 if "var" in name or "scale" in name else 0.0
        return jax.device_put(rng.normal(0.0, 0.05, leaf.shape).astype(np.float32) + offset)

    net = nnx.merge(graphdef, jax.tree_util.tree_map_with_path(draw, state))
    net.aggregation.p.set_value(jax.numpy.full((1,), gem_p, jax.numpy.float32))
    return net


def test_format_1_cosplace_config_reads_and_gives_the_0_1_descriptors():
    spec = read_spec(LEGACY / "cosplace_resnet18_64")
    assert spec == ModelSpec(
        "cosplace",
        CnnSpec("resnet18", 64, "native"),
        PreprocessSpec.shorter_side(512),
        spec.provenance,
    )
    assert spec.provenance.source_file == "ResNet18_64_cosplace.pth" and spec.provenance.converter_version == "1.0"
    # 0.1.0 wrote published_file from the name; the weights are random, so the content names no release
    assert spec.provenance.published_file is None and len(spec.provenance.source_sha256) == 64
    legacy = json.loads((LEGACY / "cosplace_resnet18_64" / "config.json").read_text())
    model = VPRModel(fill_like_0_1_fixture(nnx.eval_shape(spec.build), 0, legacy["gem_p"]), spec)
    expected = np.load(LEGACY / "cosplace_resnet18_64" / "expected.npz")
    np.testing.assert_allclose(model(expected["images"]), expected["plain"], atol=CROSS_MACHINE_ATOL, rtol=0)
    np.testing.assert_allclose(
        model(expected["images"], expected["attention"], 0.5), expected["att05"], atol=CROSS_MACHINE_ATOL, rtol=0
    )


def test_format_1_salad_directory_loads_and_gives_the_0_1_descriptors(tmp_path):
    model = aj.load_model(LEGACY / "salad_tiny")
    spec = model.spec
    assert (spec.family, spec.backbone, spec.descriptor_dim) == ("salad", "dinov2_custom", 40)
    assert spec.architecture.dinov2.embed_dim == 32 and spec.preprocess == PreprocessSpec.exact((28, 42))
    expected = np.load(LEGACY / "salad_tiny_expected.npz")
    np.testing.assert_allclose(model(expected["images"]), expected["plain"], atol=CROSS_MACHINE_ATOL, rtol=0)
    np.testing.assert_allclose(
        model(expected["images"], expected["attention"], 0.5), expected["att05"], atol=CROSS_MACHINE_ATOL, rtol=0
    )
    # saved again, it is a format-2 directory with the same spec and weights
    save_model(tmp_path / "again", model.net, spec)
    again = aj.load_model(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["format"] == FORMAT_VERSION
    assert again.spec == spec
    np.testing.assert_array_equal(again(expected["images"]), model(expected["images"]))


def test_random_demo_model_keeps_its_0_1_descriptors():
    from attllm_jax.evaluation.demo import random_cosplace_model

    model = random_cosplace_model(0)
    x = np.random.default_rng(5).normal(size=(2, 64, 96, 3)).astype(np.float32)
    att = np.random.default_rng(6).uniform(0, 2, size=(2, 3, 4)).astype(np.float32)
    expected = np.load(LEGACY / "random_cosplace_seed0_expected.npz")
    np.testing.assert_allclose(model(x), expected["plain"], atol=CROSS_MACHINE_ATOL, rtol=0)
    sweep = model.aggregate_sweep(model.features(x), att, np.array([0.0, 0.5, 1.0], np.float32))
    np.testing.assert_allclose(sweep, expected["att05"], atol=CROSS_MACHINE_ATOL, rtol=0)
    assert model.spec.provenance.weights == "random (seed 0)"


@pytest.mark.parametrize(
    "spec",
    [
        ModelSpec.cosplace(),
        ModelSpec.eigenplaces("vgg16", 512, source_file="VGG16_512_eigenplaces.pth"),
        ModelSpec.salad(),
        ModelSpec.salad("dinov2_vits14_reg", image_size=(224, 308)),
    ],
)
def test_round_trip_through_json(spec):
    data = json.loads(json.dumps(spec.to_dict()))
    assert ModelSpec.from_dict(data) == spec
    assert set(data) == {"format", "family", "architecture", "preprocess", "provenance"}


def test_presets_and_derived_fields():
    assert ModelSpec.cosplace().describe() == "cosplace resnet50/2048"
    assert ModelSpec.salad().descriptor_dim == 8448 and ModelSpec.salad().backbone == "dinov2_vitb14"
    assert SaladSpec.released() == ModelSpec.salad().architecture
    assert CnnSpec("ResNet-101", 128).backbone == "resnet101"
    assert ModelSpec.cosplace().preprocess == CnnSpec.default_preprocess() == PreprocessSpec.shorter_side(512)
    with pytest.raises(ValueError, match="a salad model needs a SaladSpec architecture, got CnnSpec"):
        ModelSpec("salad", CnnSpec("resnet18", 8), PreprocessSpec.exact())


def test_store_key_identity_changes_with_the_spec():
    """Anything that changes descriptors changes ``spec.to_dict()`` (the store key's model entry)."""
    base = ModelSpec.cosplace("resnet18", 512)
    variants = [
        base.replace(architecture=CnnSpec("resnet18", 512, "uniform")),
        base.replace(preprocess=base.preprocess.with_size(480)),
        base.replace(family="eigenplaces"),
        base.replace(provenance=base.provenance.__class__(source_sha256="0" * 64)),
    ]
    keys = {json.dumps(s.to_dict(), sort_keys=True) for s in [base, *variants]}
    assert len(keys) == 1 + len(variants)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.update(features_dim=2048), "field 'features_dim' is 2048, a resnet18 has 512"),
        (lambda d: d.update(colour="red"), "unknown field 'colour' for a cosplace model"),
        (lambda d: d.update(descriptor_dim=None), "descriptor_dim must not be null"),
        (lambda d: d["preprocess"].update(resize="crop"), "preprocess: resize must be one of"),
    ],
)
def test_format_1_errors_name_the_field(edit, message):
    data = json.loads((LEGACY / "cosplace_resnet18_64" / "config.json").read_text())
    edit(data)
    with pytest.raises(ConfigError, match=message):
        ModelSpec.from_dict(data, "legacy/config.json")


def test_format_1_salad_descriptor_dim_is_checked():
    data = json.loads((LEGACY / "salad_tiny" / "config.json").read_text())
    with pytest.raises(ConfigError, match="'descriptor_dim' is 41, but token_dim"):
        ModelSpec.from_dict({**data, "descriptor_dim": 41})
    preset = {k: v for k, v in data.items() if k != "dinov2"}
    preset["backbone"], preset["descriptor_dim"] = "dinov2_vits14", 40
    assert ModelSpec.from_dict(preset).architecture.dinov2 == ModelSpec.salad("dinov2_vits14").architecture.dinov2


def test_every_family_has_a_spec_class_and_a_conversion_module():
    for name, entry in registry.FAMILY_ENTRIES.items():
        assert entry.name == name
        module = entry.conversion_module()
        assert callable(module.convert_state_dict) and module.KEYS.rules
        for method in ("from_dict", "from_format_1", "default_preprocess", "build", "to_dict"):
            assert callable(getattr(entry.architecture, method))


def test_format_1_published_file_comes_from_the_content(monkeypatch):
    """A 0.1.0 config keeps a release label only when its source_sha256 is that release's published SHA-256."""
    data = json.loads((LEGACY / "cosplace_resnet18_64" / "config.json").read_text())
    assert data["published_file"] == "ResNet18_64_cosplace.pth"  # what 0.1.0 wrote, from the file's name
    assert ModelSpec.from_dict(dict(data)).provenance.published_file is None
    release = registry.lookup("cosplace", "resnet18", 64)
    entries = [dataclasses.replace(e, sha256=data["source_sha256"]) if e == release else e for e in registry.PUBLISHED]
    monkeypatch.setattr(registry, "PUBLISHED", tuple(entries))
    assert ModelSpec.from_dict(dict(data)).provenance.published_file == "ResNet18_64_cosplace.pth"
