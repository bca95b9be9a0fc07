"""attllm-localize end to end on a small synthetic benchmark: the same stages as eval, the same answers."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from attllm_jax.data.dataset import list_images
from attllm_jax.data.synthetic import SyntheticConfig
from attllm_jax.evaluation.config import EvalConfig
from attllm_jax.evaluation.demo import DEMO_IMAGE_SIZE, prepare_demo
from attllm_jax.evaluation.pipeline import run_evaluation
from attllm_jax.localization import LocalizeSettings, localize
from attllm_jax.localization.writers import summary_dict

REPO = Path(__file__).resolve().parents[1]
SMALL = SyntheticConfig(num_streets=2, street_length_m=60.0, db_spacing_m=10.0, num_queries=4, max_query_shift_m=12.0)
ALPHA = 0.5


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """A small benchmark, its eval run at alpha 0 and 0.5, and the photos renamed without coordinates."""
    return make_bench(tmp_path_factory.mktemp("localize"))


def make_bench(root: Path) -> dict:
    """The content of the ``bench`` fixture, built under ``root``."""
    benchmark, attention = prepare_demo(root / "cache", SMALL)
    store = root / "store"
    config = EvalConfig(
        database_folder=str(benchmark.database),
        queries_folder=str(benchmark.queries),
        output_dir=str(root / "eval"),
        attention_dir=str(attention),
        alphas=(0.0, ALPHA),
        recall_values=(1, 5),
        image_size=DEMO_IMAGE_SIZE,
        store_dir=str(store),
    )
    evaluation = run_evaluation(config)
    photos, answers = root / "photos", root / "answers"
    (photos / "nested").mkdir(parents=True)
    answers.mkdir()
    names = {}
    for i, rel in enumerate(list_images(benchmark.queries)):
        new = f"nested/p{i}.jpg" if i % 2 else f"p{i}.jpg"
        shutil.copyfile(benchmark.queries / rel, photos / new)
        (answers / Path(new).parent).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(attention / f"{Path(rel).stem}.json", answers / Path(new).with_suffix(".json"))
        names[new] = i
    db_paths = list_images(benchmark.database)
    shutil.copyfile(benchmark.database / db_paths[3], photos / "copy_of_db.jpg")
    (photos / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return {
        "root": root,
        "benchmark": benchmark,
        "eval": evaluation,
        "photos": photos,
        "answers": answers,
        "names": names,
        "store": store,
        "db_copy": db_paths[3],
        "model": evaluation.model,
    }


def _settings(bench, out: Path, **extra) -> LocalizeSettings:
    extra = {"alpha": ALPHA, **extra}
    return LocalizeSettings(
        images=str(bench["photos"]),
        output_dir=str(out),
        database_folder=str(bench["benchmark"].database),
        store_dir=str(bench["store"]),
        attention_dir=str(bench["answers"]),
        top_k=5,
        image_size=DEMO_IMAGE_SIZE,
        **extra,
    )


@pytest.mark.slow
def test_localize_matches_eval_and_places_a_database_copy_at_its_position(bench, tmp_path):
    run = localize(_settings(bench, tmp_path / "out"), model=bench["model"])
    by_photo = {p.photo: p for p in run.photos}
    # the unreadable file is skipped and counted, never localized
    assert [s["photo"] for s in run.skipped] == ["broken.jpg"] and "broken.jpg" not in by_photo
    # a byte copy of a database image: that image is top-1 and the estimate is within 1 m of its position
    copy = by_photo["copy_of_db.jpg"]
    assert copy.matches[0].path == bench["db_copy"]
    lat, lon = (float(v) for v in bench["db_copy"].split("@")[5:7])
    from attllm_jax.retrieval.positives import haversine_m

    assert haversine_m(copy.lat, copy.lon, lat, lon) < 1.0
    # every renamed query: eval's top-1 and score for the same photo under its labelled name, same alpha
    retrieval = bench["eval"].retrieval
    k = retrieval.alphas.index(ALPHA)
    db_paths = list_images(bench["benchmark"].database)
    for photo, qi in bench["names"].items():
        result = by_photo[photo]
        assert result.matches[0].path == db_paths[retrieval.predictions[k, qi, 0]], photo
        assert result.matches[0].score == pytest.approx(float(retrieval.scores[k, qi, 0]), abs=1e-5)
        assert result.attention in ("points", "grid")
        assert result.confidence is None and result.confidence_kind == "uncalibrated"
    # a rerun with the same settings recomputes nothing; another alpha recomputes everything
    again = localize(_settings(bench, tmp_path / "out"), model=bench["model"])
    assert again.computed == 0 and again.reused == len(run.photos)
    assert [p.to_dict() for p in again.photos] == [p.to_dict() for p in run.photos]
    other = localize(_settings(bench, tmp_path / "out", alpha=0.0), model=bench["model"])
    assert other.computed == len(run.photos) and other.settings_key != run.settings_key
    summary = summary_dict(other, _settings(bench, tmp_path / "out", alpha=0.0))
    assert summary["counts"] == {"localized": len(run.photos), "computed": len(run.photos), "reused": 0, "skipped": 1}


@pytest.mark.slow
def test_calibrate_with_an_eval_run_gives_a_calibrated_confidence(bench, tmp_path):
    from attllm_jax.localization.calibrate_eval import calibration_features

    features, correct = calibration_features(bench["eval"].output_dir, 25.0, "top1", 25.0, alpha=ALPHA)
    assert features.shape == (SMALL.num_queries, 3)
    # correctness from names agrees with eval's own recall@1 (positives within 25 m, top-1 estimate)
    k = bench["eval"].retrieval.alphas.index(ALPHA)
    assert correct.mean() == pytest.approx(bench["eval"].retrieval.recalls[k, 0] / 100.0)


def _cli(*args, env_extra=None, **popen):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO), **(env_extra or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "experiments.localize", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


@pytest.mark.slow
def test_a_kill_loses_nothing_written_and_the_rerun_completes_without_recomputing(bench, tmp_path):
    out = tmp_path / "out"
    args = [
        "--images",
        str(bench["photos"]),
        "--database_folder",
        str(bench["benchmark"].database),
        "--store_dir",
        str(bench["store"]),
        "--attention_dir",
        str(bench["answers"]),
        "--alpha",
        str(ALPHA),
        "--top_k",
        "5",
        "--image_size",
        str(DEMO_IMAGE_SIZE),
        "--output_dir",
        str(out),
        "--chunk_photos",
        "1",
    ]
    proc = _cli(*args, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and len(list((out / "photos").rglob("*.json"))) < 2:
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    written = {p: p.read_bytes() for p in (out / "photos").rglob("*.json")}
    assert len(written) >= 2
    for data in written.values():
        json.loads(data)  # whole files only (atomic writes)
    proc = _cli(*args)
    try:
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    for path, data in written.items():
        assert path.read_bytes() == data  # not recomputed
    summary = json.loads((out / "localize_summary.json").read_text())
    assert summary["counts"]["reused"] >= len(written) and summary["counts"]["localized"] == len(bench["names"]) + 1
    assert summary["counts"]["computed"] == summary["counts"]["localized"] - summary["counts"]["reused"]


def _one_error(proc) -> str:
    stdout, stderr = proc.communicate(timeout=120)
    lines = stderr.strip().splitlines()
    assert proc.returncode != 0 and "Traceback" not in stderr, stderr
    assert len(lines) == 1 and lines[0].startswith("localize: error: "), stderr
    return lines[0]


def _bad_input_folders(tmp_path: Path) -> tuple[Path, Path, list[str]]:
    """A database named without a UTM zone, a folder of one (empty) photo, an empty folder, and the base flags."""
    db = tmp_path / "db"
    db.mkdir()
    (db / "@551000.00@4180000.00@.jpg").write_bytes(b"")
    photos, empty = tmp_path / "photos", tmp_path / "empty"
    photos.mkdir()
    empty.mkdir()
    (photos / "a.jpg").write_bytes(b"")
    return photos, empty, ["--database_folder", str(db), "--output_dir", str(tmp_path / "out")]


def test_bad_inputs_are_one_clear_line_before_any_work(tmp_path):
    photos, empty, base = _bad_input_folders(tmp_path)
    line = _one_error(_cli("--images", str(photos), *base))
    assert "without a zone" in line and "--utm_zone" in line
    assert "no .jpg" in _one_error(_cli("--images", str(empty), *base, "--utm_zone", "10S"))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_bad_alpha_and_zone_are_one_clear_line_before_any_work(tmp_path):
    photos, _, base = _bad_input_folders(tmp_path)
    assert "--alpha must lie in [0, 1]" in _one_error(_cli("--images", str(photos), *base, "--alpha", "1.5"))
    assert "--utm_zone '99Q'" in _one_error(_cli("--images", str(photos), *base, "--utm_zone", "99Q"))
    assert not (tmp_path / "out").exists()


def test_bad_rerank_specs_are_one_line_before_any_work(tmp_path):
    photos, _, base = _bad_input_folders(tmp_path)
    base = ["--images", str(photos), *base, "--utm_zone", "10S"]
    assert "--rerank 'aqe:k=5': missing w" in _one_error(_cli(*base, "--rerank", "aqe:k=5"))
    line = _one_error(_cli(*base, "--rerank", "alpha_qe:k=20,alpha=3"))
    assert "k = 20 exceeds --top_k 10" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_two_rerank_stages_and_a_calibration_of_another_stage_are_one_line_before_any_work(tmp_path):
    from attllm_jax.localization.calibration import Calibration

    photos, _, base = _bad_input_folders(tmp_path)
    base = ["--images", str(photos), *base, "--utm_zone", "10S"]
    two = _one_error(_cli(*base, "--rerank", "aqe:k=5,w=0.8", "--rerank", "alpha_qe:k=5,alpha=3"))
    assert "localize runs one stage, got 2" in two
    Calibration((0.0,) * 3, (1.0,) * 3, (1.0,) * 3, 0.0, 25.0, "top1", {}).save(tmp_path / "plain.json")
    line = _one_error(_cli(*base, "--rerank", "aqe:k=5,w=0.8", "--calibration", str(tmp_path / "plain.json")))
    assert "fitted with rerank none, this run uses aqe:k=5,w=0.8" in line
    assert "cannot calibrate --rerank" in _one_error(_cli(*base, "--rerank", "aqe:k=5,w=0.8", "--calibrate_with", "x"))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_rerank_records_its_stage_and_time_and_reruns_only_when_it_changes(bench, tmp_path):
    plain = localize(_settings(bench, tmp_path / "out"), model=bench["model"])
    run = localize(_settings(bench, tmp_path / "out", rerank="aqe:k=3,w=0.5"), model=bench["model"])
    assert run.computed == len(plain.photos) and run.settings_key != plain.settings_key
    for photo in run.photos:
        record = json.loads((tmp_path / "out" / "photos" / f"{photo.photo}.json").read_text())
        assert record["rerank"] == {"spec": "aqe:k=3,w=0.5"} and record["settings_key"] == run.settings_key
        assert 0.0 <= record["latency_s"]["rerank"] <= record["latency_s"]["search"]
        assert [m.rank for m in photo.matches] == list(range(1, 6))
    assert all(p.rerank is None and "rerank" not in p.latency_s for p in plain.photos)
    # a byte copy of a database image: its own image is its top-1 in the first search and stays so after AQE
    assert {p.photo: p for p in run.photos}["copy_of_db.jpg"].matches[0].path == bench["db_copy"]
    summary = summary_dict(run, _settings(bench, tmp_path / "out", rerank="aqe:k=3,w=0.5"))
    assert summary["settings"]["rerank"] == "aqe:k=3,w=0.5" and "rerank" in summary["latency_per_photo"]
    again = localize(_settings(bench, tmp_path / "out", rerank="aqe:w=0.5,k=3"), model=bench["model"])
    assert again.computed == 0 and [p.to_dict() for p in again.photos] == [p.to_dict() for p in run.photos]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/usr/bin/chromium").is_file(), reason="Debian chromium is not installed (.ci/run does)")
def test_report_opens_offline_in_headless_chromium_with_one_marker_per_photo(bench, tmp_path):
    from attllm_jax.localization.report import write_report
    from tests.browser import open_page

    settings = _settings(bench, tmp_path / "out")
    run = localize(settings, model=bench["model"])
    page = write_report(tmp_path / "out", run, settings)
    with_attention = [p.photo for p in run.photos].index("p0.jpg")  # copy_of_db.jpg (first) has no attention file
    report = open_page(
        page,
        {
            "markers": "document.querySelectorAll('#estimates .marker').length",
            "database": "document.querySelectorAll('#database circle').length",
            "ready": "document.body.getAttribute('data-ready')",
            "rows": "document.querySelectorAll('#list-body tr').length",
            "detail": f"(document.querySelector('.marker[data-index=\"{with_attention}\"]')"
            ".dispatchEvent(new MouseEvent('click')),"
            " [document.querySelectorAll('#detail tr').length, !!document.querySelector('#detail .overlay')])",
            "scale": "document.querySelector('#scalebar text').textContent",
            "north": "document.querySelectorAll('#north path').length",
        },
    )
    assert report.errors == [] and report.requests == [], report
    assert report.values["ready"] == "1"
    assert report.values["markers"] == len(run.photos) == report.values["rows"]
    assert report.values["database"] == len(list_images(bench["benchmark"].database))
    assert report.values["detail"] == [1 + 5, True]  # header + top-5 matches, attention overlay shown
    assert report.values["scale"].endswith(" m") and report.values["north"] == 1


def _features(out: Path) -> list[str]:
    try:
        data = json.loads((out / "localizations.geojson").read_text())
    except (OSError, ValueError):
        return []
    return sorted(f["properties"]["photo"] for f in data["features"])


def _wait_for(condition, seconds: float, proc) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not condition():
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.3)
    assert condition()


@pytest.mark.slow
def test_watch_picks_up_a_new_photo_and_ignores_a_half_written_file(bench, tmp_path):
    photos, out = tmp_path / "watched", tmp_path / "out"
    photos.mkdir()
    shutil.copyfile(bench["photos"] / "p0.jpg", photos / "first.jpg")
    args = [
        "--images",
        str(photos),
        "--database_folder",
        str(bench["benchmark"].database),
        "--store_dir",
        str(bench["store"]),
        "--image_size",
        str(DEMO_IMAGE_SIZE),
        "--top_k",
        "5",
        "--output_dir",
        str(out),
        "--watch",
        "--poll",
        "0.3",
        "--settle",
        "1",
    ]
    proc = _cli(*args, start_new_session=True)
    try:
        _wait_for(lambda: _features(out) == ["first.jpg"], 300, proc)
        data = (bench["photos"] / "p2.jpg").read_bytes()
        partial = photos / "partial.jpg"
        partial.write_bytes(data[: len(data) // 2])  # still being copied: grows, so its size/time keep changing
        shutil.copyfile(bench["photos"] / "p2.jpg", photos / "second.jpg")
        deadline = time.monotonic() + 120
        grown = len(data) // 2
        while time.monotonic() < deadline and "second.jpg" not in _features(out):
            grown = min(len(data) - 1, grown + 64)
            with open(partial, "ab") as f:
                f.write(data[grown - 64 : grown])
            time.sleep(0.25)
        assert _features(out) == ["first.jpg", "second.jpg"]
        summary = json.loads((out / "localize_summary.json").read_text())
        assert summary["skipped"] == []  # the half-written file was not read (so not counted as unreadable)
        # a second run on the folder the watcher holds is refused with one line naming the watcher
        line = _one_error(_cli(*[a for a in args if a != "--watch"]))
        assert f"output folder {out} is in use by localize pid {proc.pid}" in line
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
