"""``attllm-convert FAMILY --random_weights``: an upstream-shaped random state dict through the real conversion path,
so a newcomer can run convert -> load_model -> eval offline; the model says its weights are random."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from attllm_jax.convert import convert
from attllm_jax.convert.cosplace import CnnConvertOptions
from attllm_jax.convert.random_weights import random_architecture, upstream_state_dict

REPO = Path(__file__).resolve().parents[1]


def test_the_upstream_state_dict_converts_back_to_the_same_weights():
    arch, table = random_architecture("cosplace", "ResNet18", 64)
    net = arch.build(nnx.Rngs(3))
    state = upstream_state_dict(net, table)
    assert state["backbone.0.weight"].shape == (64, 3, 7, 7)  # PyTorch's layout and key names
    assert state["aggregation.3.weight"].shape == (64, 512) and state["aggregation.1.p"].shape == (1,)
    converted, spec = convert("cosplace", state, CnnConvertOptions(fc_output_dim=64))
    assert spec.describe() == "cosplace resnet18/64"
    ours = nnx.to_flat_state(nnx.state(net, nnx.Any(nnx.Param, nnx.BatchStat)))
    theirs = dict(nnx.to_flat_state(nnx.state(converted, nnx.Any(nnx.Param, nnx.BatchStat))))
    assert len(ours) == len(theirs)
    for path, variable in ours:
        np.testing.assert_array_equal(np.asarray(variable.get_value()), np.asarray(theirs[path].get_value()))


@pytest.mark.slow
def test_convert_random_weights_then_eval_labels_the_model_random(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    model = tmp_path / "M"
    converted = subprocess.run(
        [sys.executable, "-m", "converters.cli", "cosplace", "--random_weights", "--output", str(model)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert converted.returncode == 0, converted.stderr
    assert "not a published file" in converted.stdout and "random (seed 0" in converted.stdout
    names = {"db": ["@0551294.51@4177187.54@10@S@.jpg", "@0551394.51@4177187.54@10@S@.jpg"],
             "q": ["37.74054_-122.41781@q.jpg"]}  # fmt: skip
    for folder, files in names.items():
        (tmp_path / folder).mkdir()
        for i, name in enumerate(files):
            Image.new("RGB", (64, 48), (40 * i, 90, 140)).save(tmp_path / folder / name)
    out = tmp_path / "out"
    evaluated = subprocess.run(
        [sys.executable, "-m", "experiments.eval", "--checkpoint", str(model), "--database_folder",
         str(tmp_path / "db"), "--queries_folder", str(tmp_path / "q"), "--output_dir", str(out),
         "--recall_values", "1", "--alphas", "0"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr
    results = json.loads((out / "results.json").read_text())
    provenance = results["model"]["provenance"]
    assert provenance["published_file"] is None and provenance["weights"].startswith("random (seed 0")
    assert any(note.startswith("NOTE: the model's weights are random") for note in results["notes"])
    assert "NOTE: the model's weights are random" in evaluated.stdout
