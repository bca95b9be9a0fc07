"""Tests for attllm_jax.checkpoint (orbax save/restore + config.json) and the CNN converter scripts."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

import attllm_jax as aj
from attllm_jax.checkpoint import load_model, read_config, save_model
from attllm_jax.models import registry
from attllm_jax.models.vpr import VPRModel

REPO = Path(__file__).resolve().parents[1]
CONFIG = {"family": "cosplace", "backbone": "resnet18", "descriptor_dim": 16, "image_size": 512}


def flat_values(net: nnx.Module) -> dict:
    return {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(net))}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    net = random_net(seed=3)
    directory = tmp_path_factory.mktemp("model") / "r18"
    save_model(directory, net, CONFIG)
    return net, directory


def random_net(seed: int) -> nnx.Module:
    """The config's network with seeded random values everywhere (batch statistics included).

    Filling an abstract net from NumPy is much faster than running the initializers op by op.
    """
    net = nnx.eval_shape(lambda: registry.build_net(CONFIG))
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
    assert model.config == CONFIG
    before, after = flat_values(net), flat_values(model.net)
    assert before.keys() == after.keys()
    for key in before:
        np.testing.assert_array_equal(before[key], after[key], err_msg=str(key))
    assert json.loads((directory / "config.json").read_text()) == CONFIG


def test_save_overwrites_existing_model(saved, tmp_path):
    net, _ = saved
    save_model(tmp_path / "m", net, CONFIG)
    other = random_net(seed=9)
    save_model(tmp_path / "m", other, {**CONFIG, "note": "second"})
    model = load_model(tmp_path / "m")
    assert model.config["note"] == "second"
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
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_DEFAULT_MATMUL_PRECISION": "highest"}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=tmp_path, timeout=300)
    expected = np.asarray(VPRModel(net, CONFIG)(x))
    np.testing.assert_allclose(np.load(tmp_path / "d.npy"), expected, atol=1e-6)


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="model directory not found: .*nowhere"):
        load_model(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        load_model(tmp_path)


@pytest.mark.parametrize(
    "text, message",
    [("{broken", "is not valid JSON"), ('{"family": "netvlad"}', "'family' must be one of"), ("[1, 2]", "'family'")],
)
def test_malformed_config(tmp_path, text, message):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ValueError, match=message):
        read_config(tmp_path)


def test_missing_or_mismatched_state(saved, tmp_path):
    _, directory = saved
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    with pytest.raises(FileNotFoundError, match="state of .* is missing"):
        load_model(tmp_path)
    edited = tmp_path / "edited"
    edited.mkdir()
    os.symlink(directory / "state", edited / "state")
    (edited / "config.json").write_text(json.dumps({**CONFIG, "descriptor_dim": 32}))
    with pytest.raises(
        ValueError,
        match=r"cannot restore .* into the cosplace / resnet18 network .*"
        r"aggregation/fc/kernel: saved \[512, 16\], expected \[512, 32\]",
    ):
        load_model(edited)


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
    with pytest.raises(ValueError, match=message):
        load_model(tmp_path / "copy")


def test_save_rejects_bad_configs(saved, tmp_path):
    net, _ = saved
    with pytest.raises(ValueError, match="must name the model 'family'"):
        save_model(tmp_path / "a", net, {"backbone": "resnet18"})
    with pytest.raises(ValueError, match="not JSON-serializable"):
        save_model(tmp_path / "b", net, {**CONFIG, "bad": object()})


# ------------------------------------------------------------------------------------------------ converter scripts


def _run_converter(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, f"converters/{script}", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.torch
def test_eigenplaces_converter_script_end_to_end(tmp_path):
    import torch

    from experiments.torch_baselines import TorchCosPlace

    torch.manual_seed(0)
    ckpt = tmp_path / "ResNet18_512_eigenplaces.pth"
    torch.save(TorchCosPlace("ResNet18", 512, gem_p=3.2).state_dict(), ckpt)
    out = tmp_path / "converted"
    result = _run_converter("eigenplaces.py", "--checkpoint", str(ckpt), "--output", str(out), "--backbone", "ResNet18")
    assert result.returncode == 0, result.stderr
    config = read_config(out)
    assert (config["family"], config["backbone"], config["descriptor_dim"]) == ("eigenplaces", "resnet18", 512)
    assert config["published_file"] == "ResNet18_512_eigenplaces.pth"
    assert config["gem_p"] == pytest.approx(3.2)
    assert config["preprocess"]["resize"] == "shorter_side" and config["preprocess"]["size"] == 512
    import hashlib

    assert config["source_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()


def test_converter_script_reports_bad_input_in_one_line(tmp_path):
    result = _run_converter(
        "cosplace.py", "--checkpoint", str(tmp_path / "absent.pth"), "--output", str(tmp_path / "o")
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == f"error: checkpoint file not found: {tmp_path / 'absent.pth'}"
    assert not (tmp_path / "o").exists()
    result = _run_converter("cosplace.py", "--output", str(tmp_path / "o"), "--backbone", "ResNet18")
    assert result.returncode == 1 and "valid (family/backbone/dim): cosplace/vgg16/64" in result.stderr
