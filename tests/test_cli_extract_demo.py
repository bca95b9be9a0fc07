"""Extract once, evaluate many times, on the demo: ``attllm-extract --store_dir S`` with no dataset flags builds
the store the demo's ``attllm-eval --store_dir S`` reads (same database, image size, model and precision)."""

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
from absl import flags

REPO = Path(__file__).resolve().parents[1]
# the fields of EvalConfig that enter the store's key (attllm_jax.evaluation.extract.database_store_key) or decide
# the model whose spec and weights enter it
KEY_FIELDS = ("database_folder", "database_csv", "image_size", "checkpoint", "random_model", "model_seed", "precision")


@pytest.fixture()
def parsed_flags():
    """Parses command lines in-process with eval's and extract's flags, restoring FLAGS afterwards."""
    from experiments import eval as eval_cli  # noqa: F401  (defines its flags)
    from experiments import extract as extract_cli  # noqa: F401

    saved = flags.FLAGS.flag_values_dict()

    def parse(*args: str) -> None:
        flags.FLAGS.unparse_flags()
        flags.FLAGS(["prog", *args])

    yield parse
    flags.FLAGS.unparse_flags()
    for name, value in saved.items():
        flags.FLAGS[name].value = value


@pytest.mark.parametrize("extra", [[], ["--random_model", "boq_resnet50"], ["--image_size", "200"]])
def test_extract_without_dataset_flags_uses_the_demos_store_key(parsed_flags, tmp_path, extra):
    from experiments import eval as eval_cli
    from experiments import extract as extract_cli

    common = ["--cache_dir", str(tmp_path / "cache"), "--store_dir", str(tmp_path / "S"), *extra]
    parsed_flags(*common)
    extracted = asdict(extract_cli._config())
    parsed_flags(*common, "--output_dir", str(tmp_path / "out"))
    evaluated = asdict(eval_cli.config_from_flags())
    assert {k: extracted[k] for k in KEY_FIELDS} == {k: evaluated[k] for k in KEY_FIELDS}
    assert extracted["store_dir"] == evaluated["store_dir"] == str(tmp_path / "S")
    expected_size = {"": 288, "boq_resnet50": None, "200": 200}[extra[-1] if extra else ""]
    assert evaluated["image_size"] == expected_size  # the demo's own size unless asked otherwise


@pytest.mark.slow
def test_extract_then_eval_on_the_demo_reuses_the_store(tmp_path):
    """The README's flow, as written, on the demo: the eval does no backbone pass over the database."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "ATTLLM_JAX_CACHE": str(tmp_path / "user_cache")}
    store = tmp_path / "S"

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
        )

    extracted = run("experiments.extract", "--store_dir", str(store))
    assert extracted.returncode == 0, extracted.stderr
    assert "created" in extracted.stdout and "124 images" in extracted.stdout, extracted.stdout
    evaluated = run("experiments.eval", "--store_dir", str(store), "--output_dir", str(tmp_path / "out"))
    assert evaluated.returncode == 0, evaluated.stderr
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["store"]["status"] == "reused" and results["store"]["images_computed"] == 0, results["store"]
    # the benchmark went to the user cache, not into the current directory
    assert any((tmp_path / "user_cache").glob("synthetic_flood_*")) and not (tmp_path / "cache").exists()
