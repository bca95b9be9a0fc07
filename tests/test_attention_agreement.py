"""Provider agreement on hand-made answers with known correlation and IoU: the statistics, the folder comparison,
what is skipped, and the compare_attention command's files."""

import json
import subprocess
import sys

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr

from attllm_jax.attention.agreement import compare_folders, compare_maps, pearson, region_iou, spearman

ROWS, COLS = "ABCD", "1234"


def _grid_record(weights: np.ndarray) -> dict:
    """A published-format file with a 4 x 4 grid answer (rows A..D top to bottom, columns 1..4)."""
    result = {f"{r}{c}": float(weights[i, j]) for i, r in enumerate(ROWS) for j, c in enumerate(COLS)}
    return {"image_path": "x.jpg", "model": "hand", "json_format_verified": True, "result": result}


def _dense(weights: np.ndarray) -> np.ndarray:
    """The 24 x 32 map a sharp 4 x 4 grid answer renders to: 6 x 8 cells of each weight."""
    return np.kron(weights, np.ones((6, 8)))


A = np.array([[1.8, 1.8, 1.8, 1.8], [1.0, 1.2, 0.9, 1.0], [0.2, 0.3, 0.1, 0.4], [0.1, 0.1, 0.1, 0.1]])
B = np.array([[1.9, 1.6, 1.0, 1.0], [1.6, 1.7, 1.0, 1.1], [1.0, 0.9, 0.8, 1.0], [0.2, 0.3, 0.1, 0.4]])


def test_statistics_match_scipy_and_known_values():
    rng = np.random.default_rng(0)
    x, y = rng.uniform(0, 2, (6, 7)), rng.uniform(0, 2, (6, 7))
    assert pearson(x, y) == pytest.approx(pearsonr(x.ravel(), y.ravel())[0], abs=1e-12)
    assert spearman(x, y) == pytest.approx(spearmanr(x.ravel(), y.ravel())[0], abs=1e-12)
    assert pearson(x, 2.0 - x) == pytest.approx(-1.0)
    assert spearman(x, x**3) == pytest.approx(1.0) and pearson(x, x**3) < 0.99  # monotone, not linear
    assert pearson(x, np.ones_like(x)) is None and spearman(np.ones_like(x), x) is None  # a neutral map
    a, b = _dense(A), _dense(B)
    # low (< 0.5): A has rows C and D (8 cells), B row D (4 cells) -> 4 / 8
    assert region_iou(a, b, "low") == pytest.approx(0.5)
    # high (> 1.5): A has A1..A4, B has A1, A2, B1, B2 -> 2 / 6
    assert region_iou(a, b, "high") == pytest.approx(1 / 3)
    assert region_iou(np.ones((3, 3)), np.ones((3, 3)), "high") is None
    with pytest.raises(ValueError, match="different shapes"):
        compare_maps(a, b[:, :5])


def _write(folder, name, record):
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))


@pytest.fixture
def folders(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _write(a, "street/x.json", _grid_record(A))
    _write(b, "street/x.json", _grid_record(B))
    _write(a, "y.json", _grid_record(A))
    _write(b, "y.json", _grid_record(2.0 - A))  # the exact opposite: r = -1
    _write(a, "none.json", {**_grid_record(A), "result": None, "no_weighting": True})
    _write(b, "none.json", _grid_record(A))
    _write(a, "only_a.json", _grid_record(A))
    return a, b


def test_folders_are_compared_on_the_rendered_maps(folders):
    agreement = compare_folders(*folders)
    assert [r["file"] for r in agreement.images] == ["street/x.json", "y.json"]
    np.testing.assert_allclose(agreement.maps_a[0], _dense(A), atol=1e-6)  # the rendering is the hand-made map
    np.testing.assert_allclose(agreement.maps_b[0], _dense(B), atol=1e-6)
    x = agreement.images[0]
    assert x["pearson"] == pytest.approx(np.corrcoef(_dense(A).ravel(), _dense(B).ravel())[0, 1], abs=1e-6)
    assert x["iou_low"] == pytest.approx(0.5) and x["iou_high"] == pytest.approx(1 / 3)
    assert agreement.images[1]["pearson"] == pytest.approx(-1.0, abs=1e-6)
    assert agreement.skipped == {"only_in_a": ["only_a.json"], "only_in_b": [], "without_attention": ["none.json"]}
    summary = agreement.summary()
    assert summary["compared"] == 2 and summary["skipped"] == {"only_in_a": 1, "only_in_b": 0, "without_attention": 1}
    assert summary["statistics"]["pearson"]["mean"] == pytest.approx((x["pearson"] - 1.0) / 2, abs=1e-6)
    assert agreement.least_agreeing(1) == [1]


def test_a_missing_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="--b '.*nowhere' is not a directory"):
        compare_folders(tmp_path, tmp_path / "nowhere")


def test_command_writes_summary_and_figure(folders, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "experiments.compare_attention", "--a", str(folders[0]), "--b", str(folders[1])]
    proc = subprocess.run([*cmd, "--output_dir", str(out)], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "agreement.json").read_text())
    assert result["compared"] == 2 and result["grid"] == [24, 32]
    assert result["images"][1]["pearson"] == pytest.approx(-1.0, abs=1e-6)
    assert result["skipped_files"]["without_attention"] == ["none.json"]
    assert (out / "agreement.png").stat().st_size > 10_000
    bad = subprocess.run([*cmd[:-1], str(tmp_path / "nowhere"), "--output_dir", str(out)], capture_output=True,
                         text=True, timeout=240)  # fmt: skip
    assert bad.returncode != 0 and "nowhere' is not a directory" in bad.stderr
