"""Every command is quiet by default (no faiss loader or JAX backend-probe lines; --verbosity 1 shows them), a
backend that cannot start is diagnosed by the doctor and is one error line in the other commands, and tune refuses
settings that would fail only after its grid search before any work."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.marks import slow_after

REPO = Path(__file__).resolve().parents[1]
NOISE = ("Unable to initialize backend", "swigfaiss", "Loading faiss", "xla_bridge")


def _run(module: str, *args: str, env: dict | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
    env = {k: v for k, v in env.items() if v is not None}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip


def _quiet(stderr: str) -> bool:
    return not any(noise in stderr for noise in NOISE)


@pytest.mark.slow
def test_doctor_is_quiet_by_default_and_verbose_on_request():
    proc = _run("experiments.doctor", env={"JAX_PLATFORMS": None})
    assert proc.returncode == 0 and "backend:" in proc.stdout, proc.stderr
    assert proc.stderr.strip() == "", proc.stderr
    verbose = _run("experiments.doctor", "--verbosity", "1", env={"JAX_PLATFORMS": None})
    assert "Initializing backend" in verbose.stderr  # the positive control: the lines exist, and are hidden


@pytest.mark.slow
def test_show_attention_is_quiet(tmp_path):
    Image.new("RGB", (96, 72), (100, 120, 140)).save(tmp_path / "x.jpg")
    points = [{"center": [0.3, 0.4], "weight": 1.8, "reasoning": "tower"}]
    (tmp_path / "x.json").write_text(json.dumps({"result": points}))
    args = ["--image", str(tmp_path / "x.jpg"), "--attention", str(tmp_path / "x.json"), "--output"]
    proc = _run("experiments.show_attention", *args, str(tmp_path / "x.png"))
    assert proc.returncode == 0 and (tmp_path / "x.png").is_file() and proc.stderr.strip() == "", proc.stderr
    verbose = _run("experiments.show_attention", *args, str(tmp_path / "y.png"), "--verbosity", "1")
    assert "Initializing backend" in verbose.stderr


@pytest.mark.slow
def test_severity_is_quiet_up_to_its_error_line(tmp_path):
    """A run that gets past the model's backend and fails on an input prints the runtime line and the error only."""
    for folder, name in (("db", "no_coordinates.jpg"), ("q", "37.74054_-122.41781@q.jpg")):
        (tmp_path / folder).mkdir()
        Image.new("RGB", (32, 24)).save(tmp_path / folder / name)
    proc = _run("experiments.severity", "--database_folder", str(tmp_path / "db"), "--queries_folder",
                str(tmp_path / "q"), "--output_dir", str(tmp_path / "out"), env={"JAX_PLATFORMS": None})  # fmt: skip
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and _quiet(proc.stderr), proc.stderr
    assert lines[0].startswith("severity: backend ") and lines[-1].startswith("severity: error: "), proc.stderr
    assert "no_coordinates.jpg" in lines[-1]


@pytest.mark.parametrize("platform", slow_after(["tpu", "cuda"]))
def test_the_doctor_diagnoses_a_backend_that_cannot_start(platform):
    proc = _run("experiments.doctor", env={"JAX_PLATFORMS": platform})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    report = dict(line.split(":", 1) for line in proc.stdout.splitlines())
    assert report["backend"].strip().startswith(f"CANNOT START: JAX_PLATFORMS={platform}"), proc.stdout
    assert report["without JAX_PLATFORMS"].strip().startswith("backend "), proc.stdout  # what would run instead
    assert report["JAX_PLATFORMS"].strip() == platform and report["jax"].strip()[0].isdigit()


@pytest.mark.parametrize("platform", slow_after(["tpu", "cuda"]))
def test_eval_says_in_one_line_that_the_backend_cannot_start(tmp_path, platform):
    for folder, name in (("db", "@0551294.51@4177187.54@10@S@.jpg"), ("q", "37.74054_-122.41781@q.jpg")):
        (tmp_path / folder).mkdir()
        Image.new("RGB", (32, 24)).save(tmp_path / folder / name)
    out = tmp_path / "out"
    proc = _run("experiments.eval", "--database_folder", str(tmp_path / "db"), "--queries_folder", str(tmp_path / "q"),
                "--output_dir", str(out), env={"JAX_PLATFORMS": platform})  # fmt: skip
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"eval: error: JAX_PLATFORMS={platform}: the backend cannot start"), lines[0]
    assert "doctor" in lines[0] and not out.exists()  # nothing left behind


def test_tune_refuses_sigmas_too_small_for_optax_before_any_work(tmp_path):
    proc = _run("experiments.tune", "--sigmas", "1e-9", "--method", "both", "--cache_dir", str(tmp_path / "c"),
                "--output_dir", str(tmp_path / "out"))  # fmt: skip
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("tune: error: "), proc.stderr
    assert "--sigmas" in lines[0] and "--method both" in lines[0], lines[0]
    assert not (tmp_path / "c").exists() and not (tmp_path / "out").exists()  # no benchmark, no grid search
