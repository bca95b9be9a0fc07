"""The field's short file names ``@east@north@<free text>@.jpg`` through every command that reads names."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}

# free text of several kinds where the full form has the zone: a stem, a number, words, a date, nothing
DATABASE = [
    "@551294.51@4177187.54@db7@.jpg",
    "@551344.51@4177187.54@0001@.jpg",
    "@551394.51@4177187.54@street view 3@.jpg",
    "@551444.51@4177187.54@2023-07-01@10h32@.jpg",
    "@551494.51@4177187.54@.jpg",
    "@0551544.51@4177187.54@10@S@037.74054@-122.41781@pano@@300@@@@201311@@.jpg",  # the full 15-field form
]
QUERIES = ["@551295.00@4177187.54@q db7@.jpg", "@551393.00@4177187.54@IMG_0042@.jpg", "@551540.00@4177187.54@@.jpg"]


def _jpeg(path: Path, shade: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = [((x * 7 + shade) % 256, (y * 5 + shade) % 256, shade) for y in range(48) for x in range(64)]
    image = Image.new("RGB", (64, 48))
    image.putdata(pixels)
    image.save(path, format="JPEG")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("names")
    for k, name in enumerate(DATABASE):
        _jpeg(root / "db" / name, 30 * k)
    for k, name in enumerate(QUERIES):
        _jpeg(root / "q" / name, 30 * k + 3)
    return root


def _run(command: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", f"experiments.{command}", *args],
        env=ENV,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _data(root: Path) -> list[str]:
    return ["--database_folder", str(root / "db"), "--queries_folder", str(root / "q"), "--image_size", "48"]


def test_eval_reads_every_name(dataset, tmp_path):
    _run("eval", *_data(dataset), "--output_dir", str(tmp_path / "out"), "--alphas", "0", "--recall_values", "1,5")
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["num_database"] == len(DATABASE) and results["num_queries"] == len(QUERIES)
    assert results["queries_without_positives"]["count"] == 0  # every query's 25 m neighbour was found by name
    assert results["utm_zone"] == [10, "S"]  # the full-form name's zone; the free text claimed none


@pytest.mark.slow
def test_extract_reads_every_name(dataset, tmp_path):
    args = ["--database_folder", str(dataset / "db"), "--store_dir", str(tmp_path / "store"), "--image_size", "48"]
    proc = _run("extract", *args)
    assert f"{len(DATABASE)} images" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_tune_reads_every_name(dataset, tmp_path):
    args = ["--output_dir", str(tmp_path / "out"), "--alphas", "0,0.5,1", "--folds", "2", "--recall_values", "1,5"]
    _run("tune", *_data(dataset), *args, "--bootstrap_samples", "50", "--refine_iterations", "0")
    tuning = json.loads((tmp_path / "out" / "tuning.json").read_text())
    assert tuning["num_database"] == len(DATABASE) and tuning["num_queries"] == len(QUERIES)


def test_flood_keeps_the_names(dataset, tmp_path):
    _run("flood", "--images", str(dataset / "q"), "--output_dir", str(tmp_path / "out"), "--levels", "0.3")
    assert sorted(p.name for p in (tmp_path / "out" / "level_0.3").iterdir()) == sorted(QUERIES)


@pytest.mark.slow
def test_severity_reads_every_name(dataset, tmp_path):
    args = ["--output_dir", str(tmp_path / "out"), "--levels", "0,0.3", "--alphas", "0,1", "--recall_values", "1,5"]
    _run("severity", *_data(dataset), *args, "--bootstrap", "20")
    out = tmp_path / "out"
    severity = json.loads((out / "severity.json").read_text())
    assert severity["num_database"] == len(DATABASE)
    assert severity["num_queries"] == {"level_0": len(QUERIES), "level_0.3": len(QUERIES)}
    # a rerun with other levels and alphas leaves no file of level 0.3 or alpha 1 (beside the user's)
    (out / "levels" / "level_0.3" / "mine.txt").write_text("user")
    args = ["--output_dir", str(out), "--levels", "0,0.5", "--alphas", "0,0.5", "--recall_values", "1,5"]
    _run("severity", *_data(dataset), *args, "--bootstrap", "20")
    severity = json.loads((out / "severity.json").read_text())
    assert severity["levels"] == [0.0, 0.5] and severity["alphas"] == [0.0, 0.5]
    assert [p.name for p in (out / "levels" / "level_0.3").rglob("*")] == ["mine.txt"]
    assert not (out / "attention_masks" / "level_0.3").exists() and not (out / "flooded" / "level_0.3").exists()
    assert not list(out.glob("levels/*/csv_results/alpha_1.0"))
    assert all((out / rel).is_file() for rel in severity["outputs"])
