"""Small things a new user meets: scores that tell neighbours apart, heatmap cells written as the table writes them,
titles that fit the figure, error messages with real example names, and a failed run that leaves nothing behind."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from attllm_jax.attention.visualize import wrap_title
from attllm_jax.data import coordinates
from attllm_jax.evaluation.figures import score_labels
from attllm_jax.evaluation.severity import cell_label, severity_table

REPO = Path(__file__).resolve().parents[1]


def test_scores_get_the_digits_that_separate_neighbours():
    assert score_labels([0.99712, 0.99709, 0.99701]) == ["0.99712", "0.99709", "0.99701"]  # 0.997 three times before
    assert score_labels([0.91, 0.85, 0.2]) == ["0.910", "0.850", "0.200"]  # three decimals when they suffice
    assert score_labels([0.5, 0.5]) == ["0.500", "0.500"]  # equal scores stay equal
    assert score_labels([0.123456789, 0.123456788]) == ["0.12345679", "0.12345679"]  # capped at 8 decimals


def test_a_heatmap_cell_says_what_the_table_says():
    per_level = [
        {"level": 0.0, "r1_alpha0": 57.5, "best_alpha": 0.5, "best_r1": 62.5, "gain_r1": 5.0,
         "gain_r1_interval": [0.0, 10.0]},
    ]  # fmt: skip
    breaking = dict.fromkeys(
        ("r1_below_half_dry_alpha0", "r1_below_half_dry_best_alpha", "gain_not_above_zero",
         "gain_interval_not_above_zero"),
    )  # fmt: skip
    table = severity_table({"per_level": per_level, "breaking_points": breaking, "dry_r1": 57.5})
    assert cell_label(57.5) == "57.5" and cell_label(62.5) == "62.5"  # not 58 / 62 (round half to even)
    assert re.search(r"\b57\.5\b", table) and re.search(r"\b62\.5\b", table)


def test_a_long_title_is_wrapped_to_the_figure_width():
    name = "crowdsourced_flood_report_hurricane_ida_queens_street%40.74000_-73.87000@flooded_basement_2021_09_02.jpg"
    lines = [f"{name}  (gemini-2.5-flash, grid)", "grid answer"]
    wrapped = wrap_title(lines, 10.0)
    assert max(len(line) for line in wrapped.splitlines()) <= 10.0 * 72 / (0.6 * 11)
    assert name in wrapped.replace("\n", "") and wrapped.count("\n") >= 2  # nothing lost, the name broken
    assert wrap_title(["short"], 10.0) == "short"


@pytest.mark.parametrize("convention", ["sfxl", "flood"])
def test_a_name_error_shows_a_real_example_that_parses(convention):
    with pytest.raises(coordinates.CoordinateError) as error:
        coordinates.parse_location("IMG_1234.jpg", convention)
    message = str(error.value)
    assert "IMG_1234.jpg" in message and "[name%]" not in message and "...." not in message
    examples = re.findall(r"[\w%.@-]*@[\w%.@-]*\.jpg", coordinates.NAME_EXAMPLES[convention])
    assert examples and all(coordinates.parse_location(e, convention) is not None for e in examples), examples
    assert examples[0] in message


def test_a_failed_eval_leaves_no_output_folder_and_no_log(tmp_path):
    for folder, name in (("db", "IMG_1234.jpg"), ("q", "37.74054_-122.41781@q.jpg")):
        (tmp_path / folder).mkdir()
        Image.new("RGB", (32, 24)).save(tmp_path / folder / name)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.eval", "--database_folder", str(tmp_path / "db"),
         "--queries_folder", str(tmp_path / "q"), "--output_dir", str(out)],
        cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith("eval: error: "), proc.stderr
    assert "IMG_1234.jpg" in proc.stderr and not out.exists()
    out.mkdir()  # a folder the user made stays, without the failed run's log
    (out / "notes.txt").write_text("mine")
    again = subprocess.run(proc.args, cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True,
                           text=True, timeout=300)  # fmt: skip
    assert again.returncode == 1 and sorted(p.name for p in out.iterdir()) == ["notes.txt"]
