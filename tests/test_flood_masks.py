"""Water masks -> attention files: the oracle grid (as the demo's), the masks provider through the annotation
runner and the CLI, missing and unreadable masks counted."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from attllm_jax.attention.masks import MASKS_PROMPT, MasksProvider, find_mask_file, oracle_grid, parsed_from_masks
from attllm_jax.attention.runner import RunConfig, annotate_folder
from attllm_jax.attention.store import read_attention_file
from attllm_jax.data.flood import flood_folder, procedural_method
from attllm_jax.data.synthetic import SyntheticConfig
from attllm_jax.evaluation.demo import prepare_demo

REPO = Path(__file__).resolve().parents[1]


def test_oracle_grid_by_hand():
    mask = np.zeros((8, 8), bool)
    mask[6:] = True  # the bottom quarter
    mask[4, :4] = True  # half of the left cells of row C's upper half
    grid = oracle_grid(mask, n=4, water_weight=0.1)
    assert grid["D1"] == grid["D4"] == 0.1  # all water
    assert grid["A1"] == grid["B3"] == grid["C3"] == 1.0  # dry
    assert grid["C1"] == pytest.approx(1.0 - 0.9 * 2 / 4)  # rows 4-5 x cols 0-1: 2 of 4 pixels are water


def _images_and_masks(tmp_path: Path):
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for rel in ("a.jpg", "sub/b.jpg", "c.jpg", "d.jpg"):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(images / rel)
    masks = tmp_path / "masks"
    (masks / "sub").mkdir(parents=True)
    bottom = np.zeros((48, 64), np.uint8)
    bottom[36:] = 255
    Image.fromarray(bottom).save(masks / "a.png")
    Image.fromarray(bottom).save(masks / "sub" / "b.png")  # nested like the images
    (masks / "d.png").write_bytes(b"not a png")  # unreadable; c.jpg has no mask at all
    return images, masks


def test_masks_provider_through_the_runner(tmp_path):
    images, masks = _images_and_masks(tmp_path)
    out = tmp_path / "attention"
    config = RunConfig(city="unknown", prompt=MASKS_PROMPT, workers=2)
    summary = annotate_folder(images, out, MasksProvider(masks), config)
    assert (summary.valid, summary.failed) == (2, 2)
    errors = " ".join(f["error"] for f in summary.failures)
    assert "no water mask for c.jpg" in errors and "cannot read water mask" in errors and "d.png" in errors
    record = json.loads((out / "sub" / "b.json").read_text())
    assert record["provider"] == "masks" and record["prompt_id"] == "water_mask_oracle"
    assert record["result"]["H1"] == 0.1 and record["result"]["A1"] == 1.0  # rows 42-48 of 48: water
    parsed = read_attention_file(out / "a.json")
    assert parsed.kind == "grid"
    # rerun: the two valid files are kept, the two failures are asked again (and fail again)
    again = annotate_folder(images, out, MasksProvider(masks), config)
    assert (again.skipped_done, again.valid, again.failed) == (2, 0, 2)


def test_same_answers_as_the_demo_oracle(tmp_path):
    small = SyntheticConfig(num_streets=2, street_length_m=60.0, num_queries=3, image_height=72, image_width=96, seed=7)
    bench, oracle_dir = prepare_demo(tmp_path / "cache", small)
    out = tmp_path / "attention"
    summary = annotate_folder(bench.queries, out, MasksProvider(bench.masks), RunConfig("x", MASKS_PROMPT))
    assert summary.valid == 3
    for path in sorted(oracle_dir.glob("*.json")):
        assert json.loads((out / path.name).read_text())["result"] == json.loads(path.read_text())["result"]


def test_parsed_from_flood_masks(tmp_path):
    images, _ = _images_and_masks(tmp_path)
    flood_folder(images, tmp_path / "fl", [0.5], procedural_method(0), method_name="procedural", seed=0)
    rels = ["a.jpg", "sub/b.jpg", "c.jpg", "missing.jpg"]
    assert find_mask_file(tmp_path / "fl" / "masks" / "level_0.5", "sub/b.jpg").name == "b.png"
    parsed, missing = parsed_from_masks(tmp_path / "fl" / "masks" / "level_0.5", rels)
    assert missing == ["missing.jpg"] and parsed[3] is None
    grid = parsed[0].grid
    assert parsed[0].kind == "grid" and grid.shape == (8, 8)
    assert (grid[:3] == 1.0).all() and np.allclose(grid[-3:], 0.1)  # dry top, water bottom half


def test_bad_provider_settings(tmp_path):
    with pytest.raises(ValueError, match="--masks"):
        MasksProvider(tmp_path / "nope")
    with pytest.raises(ValueError, match="grid size"):
        MasksProvider(tmp_path, grid_size=1)


def test_annotate_cli_with_masks(tmp_path):
    images, masks = _images_and_masks(tmp_path)
    out = tmp_path / "attention"
    cmd = [sys.executable, "-m", "experiments.annotate", f"--images={images}", f"--output_dir={out}"]
    proc = subprocess.run([*cmd, "--provider=masks", f"--masks={masks}"], cwd=REPO, capture_output=True, timeout=120)
    assert proc.returncode == 3  # two images without a usable mask: counted as failed
    summary = json.loads((out / "annotate_summary.json").read_text())
    assert summary["valid"] == 2 and summary["failed"] == 2
    missing = subprocess.run([*cmd, "--provider=masks"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert missing.returncode != 0 and "--masks" in missing.stderr
