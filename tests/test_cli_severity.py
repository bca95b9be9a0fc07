"""The severity command line: eval's --alphas forms, the shared --image_size / --recall_values (one usage line, no
traceback), checked before any work."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SFXL_DB = "@0551294.51@4177187.54@10@S@037.74054@-122.41781@6ndRH0-kf_BJq0ZASDu5ZQ@@300@@@@201311@@.jpg"
QUERY = "37.74054_-122.41781@q.jpg"
# prints the parsed sweep settings without running it (the flags of experiments.severity, parsed in a child process:
# severity and eval define flags of the same names, so they cannot share one)
SHOW_CONFIG = (
    "import json, sys; from absl import flags; from experiments import severity; flags.FLAGS(sys.argv); "
    "c = severity._config(); print(json.dumps({'alphas': c.eval.alphas, 'image_size': c.eval.image_size, "
    "'recall_values': c.eval.recall_values, 'levels': c.levels}))"
)


@pytest.fixture()
def folders(tmp_path):
    for path in (tmp_path / "db" / SFXL_DB, tmp_path / "q" / QUERY):
        path.parent.mkdir(parents=True)
        Image.new("RGB", (32, 24), (120, 130, 140)).save(path, format="JPEG")
    return ["--database_folder", str(tmp_path / "db"), "--queries_folder", str(tmp_path / "q"),
            "--output_dir", str(tmp_path / "out")]  # fmt: skip


def _child(args: list[str], code: str | None = None) -> subprocess.CompletedProcess:
    command = ["-c", code, "severity"] if code else ["-m", "experiments.severity"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, *command, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=240)  # fmt: skip


@pytest.mark.parametrize(
    "alphas, expected",
    [
        ("0:1:11", [round(0.1 * k, 10) for k in range(11)]),
        ("0,0.25,0.5", [0.0, 0.25, 0.5]),
        ("0.5:1:3", [0.0, 0.5, 0.75, 1.0]),  # 0 is always added
    ],
)
def test_alphas_take_evals_forms(folders, alphas, expected):
    proc = _child([*folders, "--alphas", alphas, "--image_size", "200,300", "--recall_values", "1,3"], SHOW_CONFIG)
    assert proc.returncode == 0, proc.stderr
    config = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [round(a, 10) for a in config["alphas"]] == expected
    assert config["image_size"] == [200, 300] and config["recall_values"] == [1, 3]


def test_the_default_alphas_are_a_tenth_apart(folders):
    proc = _child(folders, SHOW_CONFIG)
    assert proc.returncode == 0, proc.stderr
    assert [round(a, 10) for a in json.loads(proc.stdout.strip().splitlines()[-1])["alphas"]] == [
        round(0.1 * k, 10) for k in range(11)
    ]


@pytest.mark.parametrize(
    "bad, expected",
    [
        (["--alphas", "0,0.1,...,1"], "start:stop:count"),
        (["--recall_values", "1,x"], "--recall_values must be distinct integers"),
        (["--image_size", "abc"], "--image_size must be one or two integers"),
        (["--levels", "0.2,deep"], "--levels must be numbers"),
    ],
)
def test_a_bad_value_is_one_usage_line(folders, bad, expected):
    proc = _child([*folders, *bad])
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("severity: error: ") and expected in lines[0], lines[0]


def test_help_shows_the_alpha_forms():
    proc = _child(["--help"])
    assert proc.returncode == 0 and "0:1:11" in proc.stdout and "start:stop:count" in proc.stdout
    assert "0,0.1,...,1" not in proc.stdout
