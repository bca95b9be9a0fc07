"""Tests for attllm_jax.checkpoint (orbax save/restore + config.json) and the CNN converter scripts."""

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

import attllm_jax as aj
from attllm_jax.checkpoint import load_model, read_spec, save_model
from attllm_jax.convert.common import sha256_file
from attllm_jax.models.spec import ConfigError, ModelSpec
from attllm_jax.models.vpr import VPRModel
from tests.marks import slow_after

REPO = Path(__file__).resolve().parents[1]
SPEC = ModelSpec.cosplace("resnet18", 16, weights="random (test)")
CONFIG = SPEC.to_dict()


def flat_values(net: nnx.Module) -> dict:
    return {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(net))}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    net = random_net(seed=3)
    directory = tmp_path_factory.mktemp("model") / "r18"
    save_model(directory, net, SPEC)
    return net, directory


def random_net(seed: int) -> nnx.Module:
    """The config's network with seeded random values everywhere (batch statistics included).

    Filling an abstract net from NumPy is much faster than running the initializers op by op.
    """
    net = nnx.eval_shape(lambda: SPEC.build())
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(nnx.state(net)):
        shape = var.get_value().shape
        value = rng.uniform(0.5, 1.5, shape) if path[-1] == "var" else rng.normal(0.0, 0.1, shape)
        var.set_value(np.asarray(value, np.float32))
    return net


def test_roundtrip_restores_every_variable_and_config(saved):
    net, directory = saved
    model = aj.load_model(directory)
    assert isinstance(model, VPRModel)
    assert model.spec == SPEC
    before, after = flat_values(net), flat_values(model.net)
    assert before.keys() == after.keys()
    for key in before:
        np.testing.assert_array_equal(before[key], after[key], err_msg=str(key))
    assert json.loads((directory / "config.json").read_text()) == CONFIG


def test_save_overwrites_existing_model(saved, tmp_path):
    net, _ = saved
    save_model(tmp_path / "m", net, SPEC)
    other = random_net(seed=9)
    second = SPEC.replace(provenance=SPEC.provenance.__class__(weights="second"))
    save_model(tmp_path / "m", other, second)
    model = load_model(tmp_path / "m")
    assert model.spec.provenance.weights == "second"
    np.testing.assert_array_equal(model.net.aggregation.fc.kernel[...], other.aggregation.fc.kernel[...])


def test_load_without_torch_in_subprocess(saved, tmp_path):
    """Restoring and running a model never imports torch (torch is made unimportable)."""
    net, directory = saved
    x = np.random.default_rng(1).normal(size=(1, 32, 32, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    script = f"""
import sys
sys.modules["torch"] = None  # any 'import torch' now raises ImportError
import numpy as np, attllm_jax as aj
model = aj.load_model({str(directory)!r})
np.save({str(tmp_path / "d.npy")!r}, np.asarray(model(np.load({str(tmp_path / "x.npy")!r}))))
assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules if sys.modules[m] is not None)
"""
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "JAX_DEFAULT_MATMUL_PRECISION": "highest"}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=tmp_path, timeout=300)
    expected = np.asarray(VPRModel(net, SPEC)(x))
    np.testing.assert_allclose(np.load(tmp_path / "d.npy"), expected, atol=1e-6)


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="model directory not found: .*nowhere"):
        load_model(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        load_model(tmp_path)


@pytest.mark.parametrize(
    "text, message",
    [
        ("{broken", "config.json is not valid JSON"),
        ('{"family": "vlad9"}', "config.json: field 'family' must be one of cosplace, eigenplaces, salad"),
        ("[1, 2]", "config.json must hold a JSON object, got list"),
        (json.dumps({**CONFIG, "format": 7}), "config.json: field 'format' is 7"),
        (json.dumps({**CONFIG, "extra": 1}), "config.json: unknown field 'extra'"),
        (json.dumps({k: v for k, v in CONFIG.items() if k != "provenance"}), "config.json: missing field 'provenance'"),
        (
            json.dumps({**CONFIG, "architecture": {"backbone": "resnet18", "descriptor_dim": 16}}),
            "config.json: architecture: missing field 'blend'",
        ),
        (
            json.dumps({**CONFIG, "architecture": {**CONFIG["architecture"], "descriptor_dim": "16"}}),
            r"config.json: architecture.descriptor_dim must be int, got '16'",
        ),
        (
            json.dumps({**CONFIG, "architecture": {**CONFIG["architecture"], "backbone": "resnet34"}}),
            "config.json: architecture: unknown CNN backbone 'resnet34'",
        ),
        (
            json.dumps({**CONFIG, "preprocess": {**CONFIG["preprocess"], "resize": "crop"}}),
            "config.json: preprocess: resize must be one of",
        ),
        (json.dumps({"family": "cosplace", "backbone": "resnet18", "gem": 3}), "config.json: unknown field 'gem'"),
        (json.dumps({"backbone": "resnet18"}), "config.json: missing field 'family'"),
    ],
)
def test_malformed_config_names_file_and_field(tmp_path, text, message):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ConfigError, match=message):
        read_spec(tmp_path)


def test_missing_or_mismatched_state(saved, tmp_path):
    _, directory = saved
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    with pytest.raises(FileNotFoundError, match="state of .* is missing"):
        load_model(tmp_path)
    edited = tmp_path / "edited"
    edited.mkdir()
    os.symlink(directory / "state", edited / "state")
    (edited / "config.json").write_text(
        json.dumps({**CONFIG, "architecture": {**CONFIG["architecture"], "descriptor_dim": 32}})
    )
    with pytest.raises(
        ValueError,
        match=r"cannot restore .* into the cosplace / resnet18 network .*"
        r"aggregation/fc/kernel: saved \[512, 16\], expected \[512, 32\]",
    ):
        load_model(edited)


# orbax reads every array of a restore in one asyncio gather; when one read fails it raises and leaves the others
# suspended on a loop it closes. The garbage collector finalizes them later, each with a ~70-line "Exception ignored
# in <coroutine _read_array_index_and_device_put>" report (95 warnings in a full run, attributed to whichever test
# happened to be running). A CLI run ends first and prints none of them (checked). The test collects them itself and
# ignores exactly that warning class.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize(
    "part, message", [("ocdbt.process_0", "corrupt checkpoint data"), ("_METADATA", "unreadable checkpoint metadata")]
)
def test_corrupt_state(saved, tmp_path, part, message):
    import shutil

    _, directory = saved
    shutil.copytree(directory, tmp_path / "copy")
    target = tmp_path / "copy" / "state" / part
    for data in [target] if target.is_file() else [p for p in target.rglob("*") if p.is_file()]:
        data.write_bytes(b"garbage")
    with pytest.raises(ValueError, match=message) as raised:
        load_model(tmp_path / "copy")
    assert "TensorStore details" not in str(raised.value) and len(str(raised.value)) < 400, str(raised.value)
    del raised
    gc.collect()  # the suspended orbax reads, finalized here (see above)


def test_save_needs_a_spec(saved, tmp_path):
    net, _ = saved
    with pytest.raises(TypeError, match="spec must be a ModelSpec, got dict"):
        save_model(tmp_path / "a", net, {"family": "cosplace", "backbone": "resnet18"})
    assert not (tmp_path / "a").exists()


# ------------------------------------------------------------------------------------------------ converter scripts


def _run_converter(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, f"converters/{script}", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.torch
@pytest.mark.slow
def test_eigenplaces_converter_script_end_to_end(tmp_path):
    import torch

    from benchmarks.torch_baselines import TorchCosPlace

    torch.manual_seed(0)
    ckpt = tmp_path / "ResNet18_512_eigenplaces.pth"
    torch.save(TorchCosPlace("ResNet18", 512, gem_p=3.2).state_dict(), ckpt)
    out = tmp_path / "converted"
    result = _run_converter("eigenplaces.py", "--checkpoint", str(ckpt), "--output", str(out), "--backbone", "ResNet18")
    assert result.returncode == 0, result.stderr
    spec = read_spec(out)
    assert (spec.family, spec.backbone, spec.descriptor_dim) == ("eigenplaces", "resnet18", 512)
    assert spec.provenance.published_file is None  # random weights named like the release are not the release
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert len(lines) <= 2 and lines[0] == f"wrote {out}: eigenplaces resnet18/512", lines  # quiet by default
    assert "not a published file" in lines[1]
    assert (spec.preprocess.resize, spec.preprocess.size) == ("shorter_side", 512)
    import hashlib

    assert spec.provenance.source_sha256 == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    model = load_model(out)
    assert float(model.net.aggregation.p[...][0]) == pytest.approx(3.2)  # GeM p lives in the weights only


@pytest.mark.torch
def test_converter_labels_the_file_it_downloaded_as_published_and_verbosity_shows_more(tmp_path):
    import torch

    from benchmarks.torch_baselines import TorchCosPlace

    cache = tmp_path / "cache"
    cache.mkdir()
    ckpt = cache / "ResNet18_512_eigenplaces.pth"  # as fetch_published leaves a download: the file + its digest
    torch.save(TorchCosPlace("ResNet18", 512).state_dict(), ckpt)
    (cache / (ckpt.name + ".sha256")).write_text(f"{sha256_file(ckpt)}  {ckpt.name}\n")
    out = tmp_path / "converted"
    args = ("--output", str(out), "--backbone", "ResNet18", "--fc_output_dim", "512", "--cache_dir", str(cache))
    result = _run_converter("eigenplaces.py", *args, "--verbosity", "1")
    assert result.returncode == 0, result.stderr
    assert read_spec(out).provenance.published_file == "ResNet18_512_eigenplaces.pth"
    assert "published file ResNet18_512_eigenplaces.pth" in result.stdout
    assert "flags: {" in result.stderr  # --verbosity 1 shows the INFO lines


def test_converter_script_reports_bad_input_in_one_line(tmp_path):
    result = _run_converter(
        "cosplace.py", "--checkpoint", str(tmp_path / "absent.pth"), "--output", str(tmp_path / "o")
    )
    assert result.returncode == 1
    assert (
        result.stderr.strip().splitlines()[-1]
        == f"convert: error: checkpoint file not found: {tmp_path / 'absent.pth'}"
    )
    assert not (tmp_path / "o").exists()
    result = _run_converter("cosplace.py", "--output", str(tmp_path / "o"), "--backbone", "ResNet18")
    assert result.returncode == 1 and "valid (family/backbone/dim): cosplace/vgg16/64" in result.stderr


@pytest.mark.parametrize(
    "script, own_flags",
    slow_after(
        [
            ("cosplace.py", ("--checkpoint", "--output", "--backbone", "--fc_output_dim", "--cache_dir")),
            ("eigenplaces.py", ("--checkpoint", "--output", "--backbone", "--fc_output_dim", "--cache_dir")),
            ("salad.py", ("--checkpoint", "--output", "--backbone", "--num_heads", "--image_size", "--cache_dir")),
        ]
    ),
)
def test_converter_help_lists_its_own_flags(script, own_flags):
    result = _run_converter(script, "--help")
    assert result.returncode in (0, 1), result.stderr  # absl exits 1 after --help
    listed = result.stdout + result.stderr
    assert all(f"{flag}:" in listed for flag in own_flags), listed
    assert "--helpfull" in listed and "--jax_" not in listed  # only its own flags, not every library's


def test_converter_without_torch_says_how_to_install_it(tmp_path):
    (tmp_path / "model.pth").write_bytes(b"not read: torch is missing first")
    script = (
        "import runpy, sys\n"
        "sys.modules['torch'] = None\n"
        f"sys.path.insert(0, {str(REPO / 'converters')!r})\n"
        f"sys.argv = ['cosplace.py', '--checkpoint', {str(tmp_path / 'model.pth')!r}, '--output', "
        f"{str(tmp_path / 'o')!r}]\n"
        f"runpy.run_path({str(REPO / 'converters' / 'cosplace.py')!r}, run_name='__main__')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert (
        last.startswith("convert: error: reading model.pth needs PyTorch") and 'pip install -e ".[convert]"' in last
    ), last


def test_load_is_quiet_and_closes_orbax_cleanly(saved, recwarn, caplog):
    """No orbax/absl INFO lines on load by default, and no un-awaited coroutine or unclosed-resource warnings."""
    import gc
    import logging
    import warnings

    from absl import logging as absl_logging

    _, directory = saved
    gc.collect()  # another test's leftovers (a socket of a local server) are not this load's: collected, then dropped
    recwarn.clear()
    warnings.simplefilter("always")
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.INFO)  # as under absl's app.run, where orbax's INFO lines would show
    try:

        def orbax_info_lines(**kwargs) -> list[str]:
            caplog.clear()
            with caplog.at_level(logging.INFO):
                load_model(directory, **kwargs)
                gc.collect()
            return [r.getMessage() for r in caplog.records if r.levelno < logging.WARNING and r.name == "absl"]

        assert orbax_info_lines() == []
        assert any("Restoring checkpoint" in line for line in orbax_info_lines(verbose=True))
        assert absl_logging.get_verbosity() == absl_logging.INFO  # restored after the load
    finally:
        absl_logging.set_verbosity(verbosity)
    bad = [w for w in recwarn if issubclass(w.category, (RuntimeWarning, ResourceWarning))]
    assert not bad, [str(w.message) for w in bad]
