"""attllm-serve over real HTTP on a small synthetic benchmark: localize's answers, batching, metrics, bad input.

One server per module (a subprocess on 127.0.0.1, stopped in ``finally``); its answers are compared with the
per-photo files ``attllm-localize`` writes for the same photos and settings, run first as a subprocess.
"""

import concurrent.futures
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from attllm_jax.data.dataset import list_images
from attllm_jax.data.synthetic import SyntheticConfig
from attllm_jax.evaluation.demo import prepare_demo
from attllm_jax.serve.batcher import DynamicBatcher, QueueFullError, bucket_for, bucket_sizes, photos_to_run
from tests.serve_helpers import REPO, png_header_only, running_server

SMALL = SyntheticConfig(num_streets=2, street_length_m=60.0, db_spacing_m=10.0, num_queries=4, max_query_shift_m=12.0)
IMAGE_SIZE = "64"  # small inputs keep the forward passes cheap on a CPU; the same for localize and the service
SCORE_TOL = 1e-6


def compare_with_localize(answer: dict, reference: dict) -> None:
    """The service's answer holds localize's per-photo result: same matches, scores within 1e-6, same estimate."""
    assert [m["path"] for m in answer["matches"]] == [m["path"] for m in reference["matches"]]
    for ours, theirs in zip(answer["matches"], reference["matches"], strict=True):
        assert ours["score"] == pytest.approx(theirs["score"], abs=SCORE_TOL)
        assert (ours["lat"], ours["lon"]) == (theirs["lat"], theirs["lon"])
    assert (answer["lat"], answer["lon"]) == pytest.approx((reference["lat"], reference["lon"]), abs=1e-9)
    # not equal: XLA rounds a photo's descriptor differently at another padded batch size than localize's (scores
    # move by ~2e-7; at the same size they are bitwise equal), and the radius, computed in float64 by the same
    # photo_result on both sides, weighs candidates by score minus the lowest score (a spread of ~1e-3 on this
    # random model), which magnifies that ~1e3 times
    assert answer["radius_m"] == pytest.approx(reference["radius_m"], rel=1e-3)
    assert answer["attention"]["kind"] == reference["attention"]
    assert answer["confidence_kind"] == reference["confidence_kind"]


def localize_reference(photos: Path, database: Path, attention: Path, store: Path, out: Path, size: str) -> dict:
    """``attllm-localize`` on ``photos``; returns ``{photo: per-photo result}``."""
    args = ["--images", str(photos), "--database_folder", str(database), "--attention_dir", str(attention)]
    args += ["--store_dir", str(store), "--image_size", size, "--alpha", "0.5", "--output_dir", str(out)]
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.localize", *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {p.name.removesuffix(".json"): json.loads(p.read_text()) for p in (out / "photos").glob("*.json")}


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    benchmark, attention = prepare_demo(root / "cache", SMALL)
    photos = list_images(benchmark.queries)
    reference = localize_reference(
        benchmark.queries, benchmark.database, attention, root / "store", root / "localize", IMAGE_SIZE
    )
    return {"root": root, "benchmark": benchmark, "attention": attention, "photos": photos, "reference": reference}


@pytest.fixture(scope="module")
def server(bench):
    b = bench["benchmark"]
    args = ["--database_folder", str(b.database), "--store_dir", str(bench["root"] / "store")]
    args += ["--output_dir", str(bench["root"] / "serve_out"), "--image_size", IMAGE_SIZE, "--max_batch", "4"]
    args += ["--max_wait_ms", "50", "--max_upload_mb", "1", "--warmup", "384x288"]
    with running_server(args, bench["root"] / "server") as running:
        yield running


def post(server, files: dict, data: dict | None = None, headers: dict | None = None, timeout=120) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/localize", files=files, data=data or {}, headers=headers, timeout=timeout)


def photo_files(bench, name: str, with_attention: bool = True) -> dict:
    b = bench["benchmark"]
    files = {"image": (Path(name).name, (b.queries / name).read_bytes(), "image/jpeg")}
    if with_attention:
        answer = bench["attention"] / f"{Path(name).stem}.json"
        files["attention"] = (answer.name, answer.read_bytes(), "application/json")
    return files


def localize_count(server) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    found = re.search(r'attllm_serve_requests_total\{path="/v1/localize",status="200"\} (\S+)', text)
    return float(found.group(1)) if found else 0.0


def batch_counts(server) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return {le: float(v) for le, v in re.findall(r'attllm_serve_batch_size_bucket\{le="([^"]+)"\} (\S+)', text)}


def test_buckets_are_powers_of_two_up_to_the_batch_and_multiples_of_the_devices():
    assert bucket_sizes(12) == (1, 2, 4, 8, 12)
    assert bucket_sizes(16, 8) == (8, 16)
    assert bucket_sizes(1) == (1,)
    assert [bucket_for(n, bucket_sizes(12)) for n in (1, 3, 5, 9, 12)] == [1, 4, 8, 12, 12]


def test_batcher_groups_by_key_pads_to_buckets_and_refuses_when_full():
    calls, release = [], threading.Event()

    def run(payloads, rows):
        release.wait(10)
        calls.append((list(payloads), rows))
        return [p * 10 for p in payloads]

    batcher = DynamicBatcher(run, max_batch=4, max_wait_s=0.3, max_queue=6)
    try:
        jobs = [batcher.submit(i, key=i % 2) for i in range(6)]  # one take of 4, then the other 2
        with pytest.raises(QueueFullError):
            for i in range(6, 20):
                batcher.submit(i, key=0)
        release.set()
        assert [job.future.result(10) for job in jobs] == [0, 10, 20, 30, 40, 50]
    finally:
        release.set()
        batcher.close(10)
    for payloads, rows in calls:
        assert len({p % 2 for p in payloads}) == 1  # one key per forward pass
        assert rows == bucket_for(len(payloads), (1, 2, 4)) and len(payloads) <= 4


def test_a_group_runs_the_count_that_clears_it_soonest():
    buckets = (1, 2, 4, 8, 16)
    cpu = {1: 0.13, 2: 0.27, 4: 0.32, 8: 0.59, 16: 1.14}  # seconds per pass, as measured at 96 px on 2 cores
    assert photos_to_run(9, buckets, cpu) == 8  # 8 then 1: 0.72 s; 9 padded to 16: 1.14 s
    assert photos_to_run(11, buckets, cpu) == 8  # 8 then 3 (in 4): 0.91 s
    assert photos_to_run(15, buckets, cpu) == 15  # 16 rows: 1.14 s; 8 then 7 (in 8): 1.18 s
    accelerator = {1: 0.010, 2: 0.010, 4: 0.011, 8: 0.012, 16: 0.014}
    assert photos_to_run(9, buckets, accelerator) == 9  # padding is nearly free
    assert photos_to_run(9, buckets, {8: 0.5}) == 9  # the padded bucket's time is unknown: pad
    assert photos_to_run(3, buckets, cpu) == 3


def test_the_batcher_splits_a_group_by_its_timed_buckets_and_runs_the_rest_next():
    calls, release = [], threading.Event()

    def run(payloads, rows):
        if payloads == ["blocker"]:
            release.wait(10)
        calls.append((list(payloads), rows))
        return list(payloads)

    batcher = DynamicBatcher(run, max_batch=16, max_wait_s=0.0, max_queue=32, arriving=lambda: 0)
    for rows, seconds in {1: 0.13, 2: 0.27, 4: 0.32, 8: 0.59, 16: 1.14}.items():
        batcher.record_seconds("k", rows, seconds)
    try:
        blocker = batcher.submit("blocker", key="other")
        deadline = time.monotonic() + 10
        while batcher.depth and time.monotonic() < deadline:  # the worker holds the blocker
            time.sleep(0.01)
        jobs = [batcher.submit(i, key="k") for i in range(9)]
        release.set()
        assert [job.future.result(10) for job in jobs] == list(range(9))
        assert blocker.future.result(10) == "blocker"
    finally:
        release.set()
        batcher.close(10)
    assert calls[1:] == [(list(range(8)), 8), ([8], 1)]


def test_a_lone_request_does_not_wait_for_a_batch_when_nothing_else_is_arriving():
    arriving = {"n": 1}
    batcher = DynamicBatcher(
        lambda p, rows: list(p), max_batch=4, max_wait_s=30, max_queue=4, arriving=lambda: arriving["n"]
    )
    try:
        t0 = time.monotonic()
        job = batcher.submit("a", key=0)
        time.sleep(0.3)
        assert not job.future.done()  # one more request is being decoded: the batch waits for it
        arriving["n"] = 0
        batcher.wake()
        assert job.future.result(5) == "a" and time.monotonic() - t0 < 5
    finally:
        batcher.close(10)


def test_concurrent_answers_equal_localize_and_batch(server, bench):
    before, batches_before = localize_count(server), batch_counts(server)
    names = bench["photos"] * 6

    def ask(name):
        return name, post(server, photo_files(bench, name))

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, names))
    for name, response in answers:
        assert response.status_code == 200, response.text
        body = response.json()
        compare_with_localize(body, bench["reference"][name])
        assert body["alpha"] == 0.5 and body["request_id"] == response.headers["x-request-id"]
        assert set(body["timings_ms"]) >= {"decode", "queue", "extract", "search", "total"}
    assert localize_count(server) - before == len(names)
    after = batch_counts(server)
    single = after["1.0"] - batches_before.get("1.0", 0)
    total = after["+Inf"] - batches_before.get("+Inf", 0)
    assert total > single, f"no batch of more than one photo: {after}"


def test_without_attention_the_answer_is_the_plain_one(server, bench):
    name = bench["photos"][0]
    body = post(server, photo_files(bench, name, with_attention=False)).json()
    assert body["attention"] == {"kind": "missing", "points": None} and body["alpha"] == 0.0
    plain = post(server, photo_files(bench, name), data={"alpha": "0"}).json()
    assert plain["alpha"] == 0.0 and plain["attention"]["kind"] == "grid"


def _bad_requests(bench) -> list[tuple[str, dict, dict, int, str]]:
    jpeg = (bench["benchmark"].queries / bench["photos"][0]).read_bytes()
    good = photo_files(bench, bench["photos"][0])
    return [
        (
            "not an image",
            {"image": ("notes.jpg", b"just some text, not a photo", "image/jpeg")},
            {},
            400,
            "not_an_image",
        ),
        ("truncated", {"image": ("half.jpg", jpeg[: len(jpeg) // 2], "image/jpeg")}, {}, 400, "unreadable_image"),
        ("bomb", {"image": ("bomb.png", png_header_only(9000, 9000), "image/png")}, {}, 422, "too_many_pixels"),
        ("huge bomb", {"image": ("b.png", png_header_only(30000, 30000), "image/png")}, {}, 422, "too_many_pixels"),
        ("no image", {"attention": good["attention"]}, {}, 422, "bad_field"),
        ("alpha", good, {"alpha": "1.5"}, 422, "bad_field"),
        ("top_k", good, {"top_k": "zero"}, 422, "bad_field"),
        ("attention", {**good, "attention": ("a.json", b"{not json", "application/json")}, {}, 422, "bad_attention"),
        ("three files", {**good, "x": ("x.bin", b"x"), "y": ("y.bin", b"y")}, {}, 400, "bad_request"),
        ("auto without provider", {"image": good["image"]}, {"attention": "auto"}, 422, "bad_field"),
    ]


def test_every_bad_input_gets_its_status_and_a_json_error_and_the_service_answers_after(server, bench):
    good_name = bench["photos"][1]
    for label, files, data, status, code in _bad_requests(bench):
        response = post(server, files, data)
        assert response.status_code == status, (label, response.text)
        error = response.json()["error"]
        assert error["code"] == code and error["message"], label
        after = post(server, photo_files(bench, good_name))
        assert after.status_code == 200, (label, after.text)
        compare_with_localize(after.json(), bench["reference"][good_name])


def test_uploads_over_the_limit_get_413_with_or_without_a_length(server, bench):
    big = b"\xff\xd8" + b"\0" * (3 * 2**20 // 2)
    response = post(server, {"image": ("big.jpg", big, "image/jpeg")})
    assert response.status_code == 413 and response.json()["error"]["code"] == "upload_too_large"

    def chunks():  # no Content-Length: counted while read
        yield b'--b\r\nContent-Disposition: form-data; name="image"; filename="x.jpg"\r\n\r\n'
        for _ in range(24):
            yield b"\0" * 65536
        yield b"\r\n--b--\r\n"

    response = httpx.post(
        f"{server.url}/v1/localize",
        content=chunks(),
        headers={"Content-Type": "multipart/form-data; boundary=b"},
        timeout=60,
    )
    assert response.status_code == 413 and response.json()["error"]["code"] == "upload_too_large"
    assert post(server, photo_files(bench, bench["photos"][2])).status_code == 200


def test_health_info_and_no_token_needed_when_none_is_configured(server, bench):
    assert httpx.get(f"{server.url}/v1/health", timeout=10).json() == {"status": "ready"}
    info = httpx.get(f"{server.url}/v1/info", timeout=10).json()
    assert info["database_searchable"] == len(list_images(bench["benchmark"].database))
    assert info["precision"] == "float32" and info["buckets"] == [1, 2, 4]
    assert "cosplace" in info["model"] and info["limits"]["max_upload_mb"] == 1.0
    assert httpx.get(f"{server.url}/docs", timeout=10).status_code == 200
    missing = httpx.get(f"{server.url}/v2/nothing", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_one_json_log_line_per_request_names_its_id_and_status(server, bench):
    response = post(server, photo_files(bench, bench["photos"][3]))
    request_id = response.json()["request_id"]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and request_id not in server.log():
        time.sleep(0.2)
    lines = [json.loads(line) for line in server.log().splitlines() if request_id in line and line.startswith("{")]
    assert len(lines) == 1
    assert lines[0]["status"] == 200 and lines[0]["path"] == "/v1/localize"
    assert lines[0]["timings_ms"]["total"] > 0


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, "-m", "experiments.serve", *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_help_and_bad_flags_are_one_line_before_any_work(tmp_path):
    shown = _cli("--help")
    assert shown.returncode == 0
    for flag in ("--max_batch", "--max_wait_ms", "--max_queue", "--max_upload_mb", "--token_file", "--alpha"):
        assert flag in shown.stdout
    bad = _cli("--max_batch", "0")
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "max_batch" in bad.stderr
    missing = _cli("--token_file", str(tmp_path / "none"), "--database_folder", str(tmp_path))
    assert missing.returncode == 1 and missing.stderr.startswith("serve: error: --token_file")


def test_rerank_is_localize_only_and_refused_in_one_line():
    """The service searches once per request: --rerank (localize's query expansion) is not one of its flags."""
    bad = _cli("--rerank", "aqe:k=5,w=0.8")
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "rerank" in bad.stderr


def test_the_blend_comes_from_tune_or_the_flags_never_both(tmp_path):
    """--tuning sets the service's default alpha, sigma and blend from tune's best entry (read as localize reads it);
    with --alpha, --sigma or --blend as well, or a tuning file that is not tune's, it is one error line."""
    from attllm_jax.tuning.search import Choice, Setting

    best = Choice(Setting(0.35, 0.15, "uniform"), 50.0, {"1": 50.0}, (0.3, 0.4)).to_dict()
    tuning = tmp_path / "tuning.json"
    tuning.write_text(json.dumps({"best": {**best, "objective_name": "recall@1"}, "model": {"family": "cosplace"}}))
    probe = (
        "import sys; from absl import flags; from experiments import serve; flags.FLAGS(sys.argv); "
        "s = serve.localize_settings(); print(s.alpha, s.sigma, s.blend)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    common = ["--database_folder", str(tmp_path), "--output_dir", str(tmp_path / "out")]
    read = subprocess.run(
        [sys.executable, "-c", probe, "--tuning", str(tuning), *common],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert read.returncode == 0, read.stderr
    assert read.stdout.split() == ["0.35", "0.15", "uniform"]
    both = _cli("--tuning", str(tuning), "--sigma", "0.3", *common)
    assert both.returncode == 2 and both.stderr.startswith("serve: error: --tuning sets alpha, sigma and blend")
    (tmp_path / "other.json").write_text(json.dumps({"recalls": {}}))
    other = _cli("--tuning", str(tmp_path / "other.json"), *common)
    assert other.returncode == 1 and other.stderr.startswith("serve: error: --tuning ") and "'best'" in other.stderr
