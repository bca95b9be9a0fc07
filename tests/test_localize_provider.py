"""attllm-localize asking attention on the fly (--provider), the blend from tune (--tuning), the output-folder lock,
EXIF positions reported as claimed.

The LLM is tests/llm_server.py, reached through the real google-genai and openai clients; it answers after a fixed
delay, so concurrency shows in its request log."""

import csv
import io
import json
import os
import time
from pathlib import Path

import pytest
from PIL import Image

from attllm_jax.attention import store
from attllm_jax.attention.sources import SourceSettings
from attllm_jax.evaluation.demo import DEMO_IMAGE_SIZE
from attllm_jax.localization import LocalizeSettings, localize
from attllm_jax.localization.ask import AskSettings
from attllm_jax.localization.writers import CSV_FILE, LATENCY_STAGES, csv_text
from attllm_jax.outputs import OutputLockError
from attllm_jax.retrieval.positives import haversine_m
from attllm_jax.tuning.search import Choice, Setting
from tests.llm_server import LLMServer, error_reply, text_reply
from tests.test_localize import _cli, _one_error, _settings, make_bench

KEY = "AIzaTEST-localize-secret-123456"
POINTS = '[{"center": [0.3, 0.6], "weight": 1.8, "reasoning": "church tower"}, [0.7, 0.2, 0.1]]'
DELAY_S = 2.5  # long enough that a chunk is localized before the last wave of requests


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """test_localize's small benchmark (its eval run included) and photos without coordinates."""
    return make_bench(tmp_path_factory.mktemp("localize_provider"))


def _max_in_flight(seen, delay_s: float) -> int:
    """The most requests the server held at once (each is held ``delay_s`` from its arrival)."""
    times = sorted(s.time for s in seen)
    return max((sum(1 for u in times if t <= u < t + delay_s) for t in times), default=0)


def _asking(bench, out: Path, server: LLMServer, workers: int, **extra) -> LocalizeSettings:
    source = SourceSettings("gemini", base_url=server.url, qpm=0, timeout_s=30.0, max_attempts=1)
    settings = _settings(bench, out, batch_size=2, chunk_photos=2, **extra)
    return LocalizeSettings(
        **{**vars(settings), "attention_dir": None, "ask": AskSettings(source, "Lisbon", workers=workers)}
    )


@pytest.mark.slow
def test_provider_asks_concurrently_while_the_backbone_works_and_a_rerun_does_not_ask_again(
    bench, tmp_path, monkeypatch
):
    monkeypatch.setenv("GEMINI_API_KEY", KEY)
    with LLMServer(lambda seen: text_reply(seen, POINTS)) as server:  # compiles the shapes: the timing below is
        localize(_asking(bench, tmp_path / "warm", server, workers=2), model=bench["model"])  # the pipeline's
    answered = []

    def responder(seen):
        answered.append(seen)
        if len(answered) == readable + 1:  # the rerun's one request fails for good: that photo is skipped
            return error_reply(seen, 400, "bad request")
        return text_reply(seen, POINTS, delay_s=DELAY_S)

    out = tmp_path / "out"
    readable = len(bench["names"]) + 1  # the renamed queries and the database copy; broken.jpg is not
    offset = time.time() - time.monotonic()
    with LLMServer(responder) as server:
        run = localize(_asking(bench, out, server, workers=2), model=bench["model"])
        first = list(server.seen)
        assert len(first) == readable  # one request per readable photo (broken.jpg fails before any request)
        assert _max_in_flight(first, DELAY_S) == 2  # two requests in flight at once, never more
        assert [s["photo"] for s in run.skipped] == ["broken.jpg"] and len(run.photos) == readable
        # the backbone localized photos while requests were still in flight (3 waves of requests: 2, 2, 1)
        written = min((out / "photos" / f"{p.photo}.json").stat().st_mtime for p in run.photos)
        assert written < max(s.time for s in first) + offset
        # answers are stored as annotate stores them, with the LLM call measured
        for photo in run.photos:
            record = json.loads((out / "attention" / store.attention_file_name(photo.photo)).read_text())
            assert record["provider"] == "gemini" and record["status"] == "valid" and record["city"] == "Lisbon"
            assert photo.attention == "points"
            assert photo.latency_s["llm_call"] == pytest.approx(record["latency_s"], abs=1e-3)
            assert photo.latency_s["llm_call"] >= DELAY_S
        assert json.loads((out / "attention" / store.SUMMARY_FILE).read_text())["valid"] == readable
        assert run.attention["valid"] == readable and run.attention["failed"] == 1  # broken.jpg
        # another alpha, one answer lost: every photo recomputed, only that photo asked again (and it fails)
        lost = run.photos[1].photo
        (out / "attention" / store.attention_file_name(lost)).unlink()
        again = localize(_asking(bench, out, server, workers=2, alpha=0.0), model=bench["model"])
        assert len(server.seen) == readable + 1
        reasons = {s["photo"]: s["reason"] for s in again.skipped}
        assert set(reasons) == {"broken.jpg", lost} and "bad request" in reasons[lost]
        assert reasons[lost].startswith("attention: ") and again.computed == readable - 1
    # the stored answers read back as --attention_dir give the same ranking (the lost one is not stored)
    stored = LocalizeSettings(**{**vars(_settings(bench, tmp_path / "o2")), "attention_dir": str(out / "attention")})
    by_photo = {p.photo: p for p in localize(stored, model=bench["model"]).photos}
    for photo in (p for p in run.photos if p.photo != lost):
        assert [m.path for m in photo.matches] == [m.path for m in by_photo[photo.photo].matches]
        assert photo.matches[0].score == pytest.approx(by_photo[photo.photo].matches[0].score, abs=1e-5)


def _tuning_file(path: Path, alpha: float, sigma: float, blend: str) -> Path:
    """A tuning.json whose "best" entry is written by the code attllm-tune writes it with (Choice.to_dict)."""
    best = Choice(Setting(alpha, sigma, blend), 50.0, {"1": 50.0}, (alpha, alpha)).to_dict()
    path.write_text(json.dumps({"best": {**best, "objective_name": "recall@1"}, "model": {"family": "cosplace"}}))
    return path


@pytest.mark.slow
def test_cli_openai_provider_with_tuning_writes_stage_latencies(bench, tmp_path):
    tuning = _tuning_file(tmp_path / "tuning.json", 0.3, 0.25, "uniform")
    out = tmp_path / "out"
    with LLMServer(lambda seen: text_reply(seen, POINTS, delay_s=0.5)) as server:
        args = [
            "--images", str(bench["photos"]), "--database_folder", str(bench["benchmark"].database),
            "--store_dir", str(bench["store"]), "--image_size", str(DEMO_IMAGE_SIZE), "--top_k", "5",
            "--output_dir", str(out),
            "--provider", "openai", "--llm_model", "qwen-vl", "--base_url", f"{server.url}/v1", "--city", "Lisbon",
            "--qpm", "300", "--workers", "3", "--tuning", str(tuning),
        ]  # fmt: skip
        proc = _cli(*args, env_extra={"OPENAI_API_KEY": "sk-test-local"})
        try:
            stdout, stderr = proc.communicate(timeout=600)
        finally:
            proc.kill()
        assert proc.returncode == 0, stderr
        assert len(server.seen) == len(bench["names"]) + 1 and all(s.api == "openai" for s in server.seen)
        arrivals = sorted(s.time for s in server.seen)  # --qpm 300: one slot per 0.2 s for all workers together
        assert arrivals[-1] - arrivals[0] >= 0.2 * (len(arrivals) - 1) - 0.1
        assert _max_in_flight(server.seen, 0.5) >= 2  # yet several requests in flight (each takes 0.5 s)
    summary = json.loads((out / "localize_summary.json").read_text())
    assert (summary["settings"]["alpha"], summary["settings"]["sigma"], summary["settings"]["blend"]) == (
        0.3,
        0.25,
        "uniform",
    )
    assert summary["settings"]["ask"]["source"]["provider"] == "openai"
    assert set(summary["latency_per_photo"]) == set(LATENCY_STAGES)
    assert summary["latency_per_photo"]["llm_call"]["p50_s"] >= 0.5
    rows = list(csv.DictReader((out / CSV_FILE).open()))
    assert len(rows) == summary["counts"]["localized"] == len(bench["names"]) + 1
    for row in rows:
        assert float(row["latency_llm_call_s"]) >= 0.5 and float(row["latency_backbone_s"]) > 0
        assert row["attention"] == "points"


def _zone_db(tmp_path: Path) -> tuple[Path, Path]:
    db, photos = tmp_path / "db", tmp_path / "photos"
    db.mkdir()
    photos.mkdir()
    (db / "@551000.00@4180000.00@10@S@.jpg").write_bytes(b"")
    (photos / "a.jpg").write_bytes(b"")
    return db, photos


def test_a_second_run_on_a_held_output_folder_is_refused_naming_the_holder(tmp_path):
    from attllm_jax.localization.api import claim_output_dir

    db, photos = _zone_db(tmp_path)
    out = tmp_path / "out"
    lock = claim_output_dir(out)  # what a running attllm-localize holds
    try:
        line = _one_error(_cli("--images", str(photos), "--database_folder", str(db), "--output_dir", str(out)))
        assert f"output folder {out} is in use by localize pid {os.getpid()}" in line
        settings = LocalizeSettings(images=str(photos), output_dir=str(out), database_folder=str(db))
        with pytest.raises(OutputLockError, match=f"localize pid {os.getpid()}"):
            localize(settings)
    finally:
        lock.release()
    assert not (out / ".attllm_jax.lock").exists()


def test_tuning_and_blend_are_validated_with_one_clear_line(tmp_path):
    db, photos = _zone_db(tmp_path)
    base = ["--images", str(photos), "--database_folder", str(db), "--output_dir", str(tmp_path / "out")]
    good = _tuning_file(tmp_path / "tuning.json", 0.4, 0.2, "native")
    line = _one_error(_cli(*base, "--tuning", str(good), "--alpha", "0.2"))
    assert "--tuning" in line and "--alpha" in line and "not both" in line
    assert "no such file" in _one_error(_cli(*base, "--tuning", str(tmp_path / "missing.json")))
    (tmp_path / "bad.json").write_text('{"best": {"alpha": 1.7, "sigma": 0.2, "blend": "native"}}')
    assert "best alpha 1.7 is not in [0, 1]" in _one_error(_cli(*base, "--tuning", str(tmp_path / "bad.json")))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_other_tuning_blend_and_provider_flags_are_one_clear_line(tmp_path):
    db, photos = _zone_db(tmp_path)
    base = ["--images", str(photos), "--database_folder", str(db), "--output_dir", str(tmp_path / "out")]
    (tmp_path / "other.json").write_text('{"grid": []}')
    assert "no 'best' entry" in _one_error(_cli(*base, "--tuning", str(tmp_path / "other.json")))
    assert "--blend" in _one_error(_cli(*base, "--blend", "sideways"))
    assert "--provider gemini needs --city" in _one_error(_cli(*base, "--provider", "gemini"))
    assert "needs --llm_model" in _one_error(_cli(*base, "--provider", "openai", "--city", "Porto"))
    assert "needs --masks" in _one_error(_cli(*base, "--provider", "masks"))
    line = _one_error(_cli(*base, "--provider", "none", "--attention_dir", str(tmp_path)))
    assert "--attention_dir" in line and "--provider" in line and "not both" in line
    assert not (tmp_path / "out").exists()


def _with_gps(jpeg: bytes, lat: float, lon: float) -> bytes:
    """``jpeg`` with a GPS EXIF segment inserted after its start marker: the same compressed pixels."""
    from tests.test_localize_units import _rational

    exif = Image.Exif()
    gps = exif.get_ifd(0x8825)
    gps.update({1: "S" if lat < 0 else "N", 2: _rational(abs(lat)), 3: "W" if lon < 0 else "E", 4: _rational(abs(lon))})
    payload = exif.tobytes()  # starts with b"Exif\0\0"
    return jpeg[:2] + b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload + jpeg[2:]


@pytest.mark.slow
def test_exif_gps_is_reported_as_claimed_and_never_moves_the_estimate(bench, tmp_path):
    rio = (-22.906847, -43.172897)  # far from the database's city: wrong metadata, as in a reposted photo
    photos = tmp_path / "photos"
    photos.mkdir()
    data = (bench["photos"] / "p0.jpg").read_bytes()
    (photos / "plain.jpg").write_bytes(data)
    (photos / "tagged.jpg").write_bytes(_with_gps(data, *rio))
    settings = LocalizeSettings(**{**vars(_settings(bench, tmp_path / "out")), "images": str(photos)})
    run = localize(settings, model=bench["model"])
    plain, tagged = run.photos
    assert plain.claimed is None and plain.claimed_distance_m is None
    assert tagged.claimed == pytest.approx(rio, abs=1e-6)
    assert (tagged.lat, tagged.lon, tagged.matches) == (plain.lat, plain.lon, plain.matches)
    expected = haversine_m(rio[0], rio[1], tagged.lat, tagged.lon)
    assert tagged.claimed_distance_m == pytest.approx(expected, rel=1e-9) and expected > 5e6
    row = next(r for r in csv.DictReader(io.StringIO(csv_text(run.photos))) if r["photo"] == "tagged.jpg")
    assert (float(row["claimed_lat"]), float(row["claimed_lon"])) == pytest.approx(rio, abs=1e-6)
