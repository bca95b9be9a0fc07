"""Procedural flooding of any photo: determinism, the mask's extent, untouched pixels above the water, the folder
layout (names, masks, summary, resume, bad images) and an evaluation on a flooded folder."""

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from attllm_jax.data.flood import (
    FloodStyle,
    draw_water,
    flood_folder,
    flood_pixels,
    level_name,
    procedural_method,
    style_dict,
    validate_levels,
)
from attllm_jax.data.synthetic import SyntheticConfig, generate_benchmark

TINY = SyntheticConfig(num_streets=2, street_length_m=60.0, num_queries=3, image_height=72, image_width=96, seed=7)
REPO = Path(__file__).resolve().parents[1]


def _photo(h=120, w=160, seed=0) -> np.ndarray:
    """A textured test photo: smooth gradients plus blocks (so a reflection and JPEG have something to do)."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:h, 0:w]
    base = np.stack([xs * 255 / w, ys * 255 / h, (xs + ys) % 64 * 4], -1).astype(np.float32)
    for _ in range(12):
        y0, x0 = rng.integers(0, h - 10), rng.integers(0, w - 10)
        base[y0 : y0 + 10, x0 : x0 + 10] = rng.integers(0, 255, 3)
    return base.clip(0, 255).astype(np.uint8)


def _waterline_rows(mask: np.ndarray) -> np.ndarray:
    """Per column, the first water row (H where there is no water)."""
    h = mask.shape[0]
    return np.where(mask.any(0), mask.argmax(0), h)


def test_deterministic_in_seed_and_image():
    photo = _photo()
    a, ma = flood_pixels(photo, 0.4, seed=0)
    b, mb = flood_pixels(photo.copy(), 0.4, seed=0)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ma, mb)
    c, _ = flood_pixels(photo, 0.4, seed=1)
    assert np.abs(c.astype(int) - a.astype(int)).sum() > 0
    other = photo.copy()
    other[0, 0] ^= 1  # one bit of another image changes the draws
    d, _ = flood_pixels(other, 0.4, seed=0)
    assert np.abs(d[ma].astype(int) - a[ma].astype(int)).mean() > 1.0


@pytest.mark.parametrize("level", [0.1, 0.35, 0.6, 0.9])
def test_mask_covers_the_requested_fraction_of_the_bottom(level):
    h, w = 120, 160
    _, mask = flood_pixels(_photo(h, w), level, seed=3)
    rows = _waterline_rows(mask)
    # every column is water from its waterline down to the bottom edge, and dry above it
    for x in range(w):
        assert mask[rows[x] :, x].all() and not mask[: rows[x], x].any()
    deepest = (h - rows.min()) / h
    assert deepest == pytest.approx(level, abs=1.0 / h + 1e-9)  # at its deepest the water covers `level`
    amplitude = 1.5 * h / 288
    assert mask.mean() == pytest.approx(level - amplitude / h, abs=1.5 / h)  # mean depth: one amplitude less
    assert rows.max() - rows.min() <= 2 * amplitude + 1  # "slightly uneven" waterline


def test_levels_of_one_image_share_the_waterline_shape():
    photo = _photo()
    masks = [flood_pixels(photo, level, seed=0)[1] for level in (0.2, 0.4, 0.6)]
    for shallow, deep in zip(masks, masks[1:], strict=False):
        assert (deep | shallow).sum() == deep.sum()  # deeper water contains the shallower one
    r1, r2 = _waterline_rows(masks[0]), _waterline_rows(masks[1])
    assert np.ptp(r1 - r2) <= 1  # the same sinusoid, shifted by 0.2 H (up to rounding)


def test_pixels_above_the_waterline_are_the_input():
    photo = _photo()
    flooded, mask = flood_pixels(photo, 0.5, seed=0)
    np.testing.assert_array_equal(flooded[~mask], photo[~mask])
    assert np.abs(flooded[mask].astype(int) - photo[mask].astype(int)).mean() > 10  # the water is drawn
    water = flooded[mask].astype(np.float32)
    assert water.mean() < photo[mask].astype(np.float32).mean() + 30  # darkened, not washed out


def test_rain_and_droplets_change_the_sky_but_not_the_water_mask():
    photo = _photo()
    plain, mask = flood_pixels(photo, 0.3, seed=0)
    wet, wet_mask = flood_pixels(photo, 0.3, seed=0, style=FloodStyle(rain=0.5, droplets=4))
    np.testing.assert_array_equal(mask, wet_mask)
    assert (wet[~mask] != photo[~mask]).any(axis=-1).mean() > 0.02
    assert np.abs(wet.astype(int) - plain.astype(int)).max() > 20


def test_bad_levels_and_pixels():
    with pytest.raises(ValueError, match="level"):
        flood_pixels(_photo(), 1.5)
    with pytest.raises(ValueError, match="uint8"):
        flood_pixels(_photo().astype(np.float32), 0.3)
    with pytest.raises(ValueError, match="levels"):
        validate_levels([0.2, 0.0])
    with pytest.raises(ValueError, match="distinct"):
        validate_levels([0.2, 0.20])
    assert validate_levels([0.0, 0.5], allow_zero=True) == (0.0, 0.5)
    with pytest.raises(ValueError, match="rain"):
        FloodStyle(rain=2.0)


def test_draw_water_at_unit_scale_is_the_synthetic_benchmarks_water():
    """The synthetic generator calls draw_water with its defaults; widths that are not a multiple of 8 work too."""
    view = _photo(72, 100).astype(np.float32) / 255.0
    a, ma = draw_water(view, 0.4, np.random.default_rng(0))
    b, mb = draw_water(view, 0.4, np.random.default_rng(0))
    np.testing.assert_array_equal(a, b)
    assert ma.mean() == pytest.approx(0.4, abs=0.03)
    np.testing.assert_array_equal(a[~ma], view[~ma])


def _jpeg_folder(root: Path, n=3) -> Path:
    folder = root / "dry"
    (folder / "sub").mkdir(parents=True)
    for k in range(n):
        sub = "sub/" if k == 0 else ""
        name = f"{folder}/{sub}37.77{k}_-122.41{k}@street{k}.jpg"
        Image.fromarray(_photo(seed=k)).save(name, quality=95)
    Image.fromarray(_photo(seed=9)).save(folder / "37.1_-122.1@lossless.png")
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    return folder


def test_flood_folder_layout_names_masks_summary_and_resume(tmp_path):
    dry = _jpeg_folder(tmp_path)
    out = tmp_path / "flooded"
    levels = [0.2, 0.5]
    summary = flood_folder(dry, out, levels, procedural_method(0), method_name="procedural", seed=0)
    inputs = sorted(p.relative_to(dry).as_posix() for p in dry.rglob("*") if p.is_file() and p.name != "broken.jpg")
    for level in levels:
        folder = out / level_name(level)
        written = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        assert written == inputs  # same relative paths, so the same names and coordinates
        for rel in inputs:
            mask_image = Image.open(out / "masks" / level_name(level) / Path(rel).with_suffix(".png"))
            assert mask_image.mode == "L" and set(np.unique(np.asarray(mask_image))) <= {0, 255}
            mask = np.asarray(mask_image) > 127
            dry_pixels = np.asarray(Image.open(dry / rel).convert("RGB")).astype(int)
            wet_pixels = np.asarray(Image.open(folder / rel).convert("RGB")).astype(int)
            top = _waterline_rows(mask).min()
            if rel.endswith(".png"):  # lossless: every dry pixel is the input's
                np.testing.assert_array_equal(wet_pixels[~mask], dry_pixels[~mask])
                continue
            # JPEG: above the last 16-row block that holds water (and one block of chroma upsampling context)
            # the flooded file decodes exactly as the dry image re-encoded at the same quality
            reencoded = io.BytesIO()
            Image.open(dry / rel).convert("RGB").save(reencoded, format="JPEG", quality=95)
            reference = np.asarray(Image.open(reencoded).convert("RGB")).astype(int)
            above = slice(0, (top // 16) * 16 - 16)
            assert above.stop >= 16
            np.testing.assert_array_equal(wet_pixels[above], reference[above])
            assert np.abs(wet_pixels[:top] - dry_pixels[:top]).mean() < 3.0  # round-off only, up to the water
    assert summary["counts"] == {level_name(v): {"written": 4, "existing": 0, "failed": 1} for v in levels}
    assert summary["num_unreadable_images"] == 1 and summary["num_failed"] == 2
    assert {f["image"] for f in summary["failures"]} == {"broken.jpg"}
    on_disk = json.loads((out / "flood_summary.json").read_text())
    assert on_disk["method"] == "procedural" and on_disk["levels"] == levels and on_disk["seed"] == 0

    # resume: everything present is skipped; a removed image (or mask) is made again, identical
    victim = out / level_name(0.5) / inputs[1]
    before = victim.read_bytes()
    victim.unlink()
    (out / "masks" / level_name(0.2) / Path(inputs[2]).with_suffix(".png")).unlink()
    again = flood_folder(dry, out, levels, procedural_method(0), method_name="procedural", seed=0)
    assert again["counts"][level_name(0.5)] == {"written": 1, "existing": 3, "failed": 1}
    assert again["counts"][level_name(0.2)] == {"written": 1, "existing": 3, "failed": 1}
    assert victim.read_bytes() == before


@pytest.mark.parametrize("inside", ["", "flooded", "a/b"])
def test_an_output_folder_equal_to_or_inside_the_images_is_refused(tmp_path, inside):
    dry = _jpeg_folder(tmp_path)
    out = dry / inside if inside else dry
    before = sorted(p.relative_to(dry).as_posix() for p in dry.rglob("*"))
    with pytest.raises(ValueError, match=r"--output_dir .* is (inside )?--images .*: a later run would read"):
        flood_folder(dry, out, [0.3], procedural_method(0), method_name="procedural", seed=0)
    assert sorted(p.relative_to(dry).as_posix() for p in dry.rglob("*")) == before  # nothing written


def _images_of(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in out.glob("level_*/**/*") if p.is_file()}


def test_a_rerun_with_other_settings_keeps_no_image_of_the_previous_settings(tmp_path):
    dry = _jpeg_folder(tmp_path)
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    rainy = FloodStyle(rain=0.5)
    flood_folder(dry, out, [0.3, 0.6], procedural_method(0), method_name="procedural", seed=0)
    (out / "my_notes.txt").write_text("mine")
    again = flood_folder(
        dry, out, [0.3], procedural_method(1, rainy), method_name="procedural", seed=1, settings=style_dict(rainy)
    )
    flood_folder(dry, fresh, [0.3], procedural_method(1, rainy), method_name="procedural", seed=1)
    assert again["counts"]["level_0.3"] == {"written": 4, "existing": 0, "failed": 1}
    assert _images_of(out) == _images_of(fresh)  # no seed-0 image left, no level_0.6 left
    assert not (out / "masks" / "level_0.6").exists()
    assert (out / "my_notes.txt").read_text() == "mine"
    assert json.loads((out / "flood_summary.json").read_text())["seed"] == 1
    # the same settings again: everything is reused
    third = flood_folder(
        dry, out, [0.3], procedural_method(1, rainy), method_name="procedural", seed=1, settings=style_dict(rainy)
    )
    assert third["counts"]["level_0.3"] == {"written": 0, "existing": 4, "failed": 1}


def test_images_of_a_killed_run_are_not_resumed_under_other_settings(tmp_path):
    dry = _jpeg_folder(tmp_path)
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    seed0 = procedural_method(0)
    calls = []

    def dies_on_the_second_image(image, rel, level):
        calls.append(rel)
        if len(calls) == 2:
            raise KeyboardInterrupt  # stands for the kill: not caught as a per-image failure
        return seed0(image, rel, level)

    with pytest.raises(KeyboardInterrupt):
        flood_folder(dry, out, [0.3], dies_on_the_second_image, method_name="procedural", seed=0)
    assert len(_images_of(out)) == 1 and json.loads((out / "flood_summary.json").read_text())["status"] == "running"
    flood_folder(dry, out, [0.3], procedural_method(1), method_name="procedural", seed=1)
    flood_folder(dry, fresh, [0.3], procedural_method(1), method_name="procedural", seed=1)
    assert _images_of(out) == _images_of(fresh)


def test_mask_name_collision_is_an_error(tmp_path):
    folder = tmp_path / "dry"
    folder.mkdir()
    Image.fromarray(_photo()).save(folder / "a.jpg")
    Image.fromarray(_photo()).save(folder / "a.png")
    with pytest.raises(ValueError, match="share the mask"):
        flood_folder(folder, tmp_path / "o", [0.3], procedural_method(0), method_name="procedural", seed=0)


def test_cli_writes_the_documented_outputs_and_exit_status(tmp_path):
    dry = _jpeg_folder(tmp_path)
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "experiments.flood", f"--images={dry}", f"--output_dir={out}", "--levels=0.25,0.5"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr  # the broken image is counted, and the status says so
    summary = json.loads((out / "flood_summary.json").read_text())
    assert summary["counts"]["level_0.25"]["written"] == 4 and (out / "flood.log").is_file()
    assert (out / "masks" / "level_0.5" / "sub").is_dir()
    bad = subprocess.run([*cmd[:-1], "--levels=0.25,1.5"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "--levels" in bad.stderr


def test_eval_runs_on_a_flooded_folder(tmp_path):
    from attllm_jax.evaluation import EvalConfig, run_evaluation

    bench = generate_benchmark(tmp_path / "cache", TINY)
    dry = tmp_path / "dry_queries"
    dry.mkdir()
    for path in sorted(bench.database.glob("*.jpg"))[::3]:  # dry views at database positions as queries
        shutil.copy(path, dry / path.name)
    out = tmp_path / "flooded"
    flood_folder(dry, out, [0.4], procedural_method(0), method_name="procedural", seed=0)
    config = EvalConfig(
        database_folder=str(bench.database),
        queries_folder=str(out / "level_0.4"),
        output_dir=str(tmp_path / "eval"),
        alphas=(0.0,),
        recall_values=(1, 5),
        image_size=72,
    )
    result = run_evaluation(config).results
    assert result["num_queries"] == len(list(dry.glob("*.jpg")))
    assert result["queries_without_positives"]["count"] == 0  # the coordinates in the names carried over
    assert result["num_skipped"] == {"database": 0, "queries": 0}


def test_method_failures_totals_and_fatal_abort(tmp_path):
    """A failing pair is counted and the rest go on; a fatal failure stops the run; info numbers are summed."""
    from attllm_jax.data.flood import FloodOutput

    dry = _jpeg_folder(tmp_path)
    calls = []

    class Fatal(Exception):
        fatal = True

    def flaky(image, rel, level):
        calls.append(rel)
        if "street1" in rel:
            raise RuntimeError("server said no")
        return FloodOutput(np.asarray(image), None, {"requests": 2, "note": "text is not summed"})

    summary = flood_folder(dry, tmp_path / "a", [0.3], flaky, method_name="fake", seed=0, writes_masks=False)
    assert summary["counts"]["level_0.3"] == {"written": 3, "existing": 0, "failed": 2}  # street1 + broken.jpg
    assert summary["method_totals"] == {"requests": 6} and summary["masks"] is None and summary["aborted"] is None
    assert not (tmp_path / "a" / "masks").exists()
    again = flood_folder(dry, tmp_path / "a", [0.3], flaky, method_name="fake", seed=0, writes_masks=False)
    assert again["counts"]["level_0.3"]["existing"] == 3  # done without masks when the method has none

    def rejected(image, rel, level):
        raise Fatal("HTTP 403: API key not valid")

    stopped = flood_folder(dry, tmp_path / "b", [0.3, 0.6], rejected, method_name="fake", seed=0)
    assert "403" in stopped["aborted"] and stopped["num_failed"] == 1  # no further image was started
    no_mask = flood_folder(dry, tmp_path / "c", [0.3], flaky, method_name="fake", seed=0)  # masks expected
    assert no_mask["counts"]["level_0.3"]["written"] == 0
    assert sum("returned no mask" in f["error"] for f in no_mask["failures"]) == 3
