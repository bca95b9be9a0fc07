"""The annotation run (attllm_jax.attention.runner, experiments/annotate.py, experiments/show_attention.py)
against the fake LLM server: outcomes and summary counts, resuming, interrupting, killing, key hygiene."""

import _thread
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from attllm_jax.attention import maps, prompts, providers, runner, store
from tests.data.llm_answers import PUBLISHED_FILES
from tests.llm_server import LLMServer, Reply, blocked_reply, error_reply, id_photo, text_reply

KEY = "AIzaTEST-run-secret-9876543210"
REPO = Path(__file__).resolve().parents[1]
POINTS = '[{"center": [0.3, 0.6], "weight": 1.8, "reasoning": "clock tower"}, [0.7, 0.2, 0.1]]'
FAST_RETRY = providers.RetryPolicy(max_attempts=2, initial_delay_s=0.01, max_delay_s=0.05, jitter=0.1)


def make_images(folder: Path, ids, nested: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in ids:
        path = folder / (f"sub/q{i}.jpg" if nested and i % 2 else f"q{i}.jpg")
        path.parent.mkdir(parents=True, exist_ok=True)
        id_photo(i).save(path)
    return folder


def gemini(server: LLMServer, **kwargs) -> providers.GeminiProvider:
    kwargs.setdefault("retry", FAST_RETRY)
    return providers.GeminiProvider(api_key=KEY, base_url=server.url, timeout_s=kwargs.pop("timeout_s", 5.0), **kwargs)


def config(**kwargs) -> runner.RunConfig:
    kwargs.setdefault("workers", 3)
    return runner.RunConfig(
        city="San Francisco", prompt=prompts.get_prompt(kwargs.pop("prompt", "axis_focus")), **kwargs
    )


def outcome_responder(seen):
    """Image id -> behaviour; retries of the same image see the next step."""
    image_id = seen.image_id()
    attempt = sum(1 for s in SEEN_LOG if s.image_id() == image_id)
    SEEN_LOG.append(seen)
    if image_id == 0:
        return text_reply(seen, POINTS)
    if image_id == 1:
        return text_reply(seen, "None")
    if image_id == 2:
        return text_reply(seen, "Step 2 done:\n```json\n" + POINTS + "\n```")
    if image_id == 3:
        return text_reply(seen, "[{'center': [0.2, 0.3], 'weight': 1.8, 'reasoning': 'tow")  # truncated
    if image_id == 4:
        return error_reply(seen, 500, "internal")
    if image_id == 5:
        return error_reply(seen, 429, "quota", retry_delay="0.2s") if attempt == 0 else text_reply(seen, POINTS)
    if image_id == 6:
        return Reply(drop=True) if attempt == 0 else text_reply(seen, '{"A1": 0.2, "B2": 1.9}')
    raise AssertionError(f"unexpected image {image_id}")


SEEN_LOG: list = []


def test_every_outcome_lands_in_the_summary(tmp_path):
    SEEN_LOG.clear()
    images = make_images(tmp_path / "images", range(7), nested=True)
    out = tmp_path / "out"
    with LLMServer(outcome_responder) as server:
        summary = runner.annotate_folder(images, out, gemini(server), config())
    assert (summary.valid, summary.none, summary.invalid, summary.failed) == (4, 1, 1, 1)
    assert summary.images == summary.to_ask == 7 and summary.not_started == 0
    assert summary.requests == len(server.seen) == 10 and summary.retries == 3
    assert summary.tokens == {"prompt": 6000, "output": 300, "thinking": 42, "total": 6342}
    assert [f["image"] for f in summary.failures] == ["q4.jpg"] and summary.failures[0]["attempts"] == 2
    assert [f["image"] for f in summary.invalid_images] == ["sub/q3.jpg"]
    on_disk = json.loads((out / runner.SUMMARY_FILE).read_text())
    assert on_disk["valid"] == 4 and on_disk["failed"] == 1 and on_disk["wall_time_s"] > 0

    kinds = {
        i: store.read_attention_file(out / store.attention_file_name(p)).kind
        for i, p in enumerate(["q0.jpg", "sub/q1.jpg", "q2.jpg", "sub/q3.jpg", None, "sub/q5.jpg", "q6.jpg"])
        if p
    }
    assert kinds == {0: "points", 1: "none", 2: "points", 3: "invalid", 5: "points", 6: "grid"}
    assert not (out / "q4.json").exists()  # failures write nothing: the next run asks again
    record = json.loads((out / "q0.json").read_text())
    for field in ("image_path", "model", "json_format_verified", "json_content_verified", "no_weighting", "result"):
        assert field in record
    assert record["image_path"] == "q0.jpg" and record["provider"] == "gemini" and record["city"] == "San Francisco"
    assert (record["prompt_id"], record["prompt_version"]) == ("axis_focus", prompts.get_prompt("axis_focus").version)
    assert record["tokens"]["total"] == 1057 and record["latency_s"] > 0 and record["attempts"] == 1
    assert record["result"][0] == {"center": [0.3, 0.6], "weight": 1.8, "reasoning": "clock tower"}
    invalid = json.loads((out / "sub/q3.json").read_text())
    assert invalid["status"] == "invalid" and not invalid["json_content_verified"]
    assert invalid["raw_text"].startswith("[{'center'") and invalid["error"]
    none = json.loads((out / "sub/q1.json").read_text())
    assert none["no_weighting"] is True and none["result"] is None

    # Resume: only the failed image is asked again; --retry_invalid also re-asks the invalid one.
    with LLMServer(lambda seen: text_reply(seen, POINTS)) as server:
        again = runner.annotate_folder(images, out, gemini(server), config())
        assert sorted(s.image_id() for s in server.seen) == [4]
        assert (again.skipped_done, again.skipped_invalid, again.valid) == (5, 1, 1)
        again = runner.annotate_folder(images, out, gemini(server), config(retry_invalid=True))
        assert sorted(s.image_id() for s in server.seen) == [3, 4]
        assert (again.skipped_done, again.valid, again.to_ask) == (6, 1, 1)


def test_fatal_error_stops_the_run(tmp_path):
    images = make_images(tmp_path / "images", range(8))
    with LLMServer(lambda seen: error_reply(seen, 401, "bad credentials")) as server:
        summary = runner.annotate_folder(images, tmp_path / "out", gemini(server), config(workers=2))
    assert summary.aborted and "401" in summary.aborted
    assert len(server.seen) <= 2 and summary.failed == len(server.seen)
    assert summary.failed + summary.not_started == 8


def test_consecutive_failures_stop_the_run(tmp_path):
    images = make_images(tmp_path / "images", range(8))
    with LLMServer(lambda seen: error_reply(seen, 500, "down")) as server:
        summary = runner.annotate_folder(
            images, tmp_path / "out", gemini(server), config(workers=1, max_consecutive_failures=3)
        )
    assert summary.failed == 3 and summary.not_started == 5 and "3 requests failed in a row" in summary.aborted


def test_key_never_in_outputs_or_logs(tmp_path, caplog):
    images = make_images(tmp_path / "images", range(3))
    out = tmp_path / "out"

    def echo_key(seen):
        if seen.image_id() == 0:
            return error_reply(seen, 400, f"key {KEY} is not allowed")
        if seen.image_id() == 1:
            return error_reply(seen, 503, f"backend refused {KEY}")
        return text_reply(seen, "None")

    with caplog.at_level("DEBUG"), LLMServer(echo_key) as server:
        summary = runner.annotate_folder(images, out, gemini(server), config())
    assert summary.failed == 2 and summary.none == 1
    assert all(s.headers["x-goog-api-key"] == KEY for s in server.seen)  # the key was used...
    for path in out.rglob("*"):
        assert KEY not in path.read_text(), path  # ...but never written
    assert "[REDACTED]" in (out / runner.SUMMARY_FILE).read_text()
    assert KEY not in caplog.text


def test_grid_prompt_and_saved_images(tmp_path):
    images = make_images(tmp_path / "images", [2])
    sent = tmp_path / "sent"
    grid = '{"A1": 0.1, "A2": 0.2, "A3": 0.3, "B1": 1.0, "B2": 1.9, "B3": 1.0, "C1": 0.0, "C2": 0.0, "C3": 0.0}'
    with LLMServer(lambda seen: text_reply(seen, grid)) as server:
        summary = runner.annotate_folder(
            images, tmp_path / "out", gemini(server), config(prompt="grid", grid_size=3, save_sent_dir=str(sent))
        )
    assert summary.valid == 1
    parsed = store.read_attention_file(tmp_path / "out/q2.json")
    assert parsed.kind == "grid" and parsed.grid.shape == (3, 3) and parsed.grid[1, 1] == pytest.approx(1.9)
    (seen,) = server.seen
    assert (sent / "q2.sent.jpg").read_bytes() == seen.image_bytes  # the exact image sent
    assert "3 x 3" in seen.prompt and seen.body["generationConfig"]["responseSchema"]["type"] == "OBJECT"


def test_files_provider_matches_published_maps(tmp_path):
    """Published per-image files read by the files provider give the same maps as our files written from them."""
    published = tmp_path / "published"
    published.mkdir()
    for i, (_, record, _) in enumerate(PUBLISHED_FILES):
        (published / f"q{i}.json").write_text(json.dumps(record))
    images = make_images(tmp_path / "images", range(len(PUBLISHED_FILES) + 1))  # the last has no file
    out = tmp_path / "ours"
    summary = runner.annotate_folder(images, out, providers.ExistingAnswers(published), config(workers=1))
    expected = [e["kind"] for _, _, e in PUBLISHED_FILES]
    assert summary.valid == sum(k in ("points", "grid") for k in expected)
    assert summary.none == expected.count("none") and summary.invalid == expected.count("invalid")
    assert summary.failed == 1 and "no attention file" in summary.failures[0]["error"]
    for i in range(len(PUBLISHED_FILES)):
        theirs = store.read_attention_file(published / f"q{i}.json")
        ours_path = store.find_attention_file(out, f"q{i}.jpg")
        ours = store.read_attention_file(ours_path)
        assert ours.kind == theirs.kind
        a = np.asarray(maps.attention_maps([theirs], 6, 8))
        b = np.asarray(maps.attention_maps([ours], 6, 8))
        np.testing.assert_array_equal(a, b)
        assert json.loads(ours_path.read_text())["model"] == PUBLISHED_FILES[i][1]["model"]


def test_list_images_and_naming(tmp_path):
    root = tmp_path / "images"
    make_images(root, [0, 1, 2, 3], nested=True)
    (root / "UPPER.JPG").write_bytes((root / "q0.jpg").read_bytes())
    (root / ".hidden.jpg").write_bytes(b"x")
    (root / "notes.txt").write_text("x")
    (root / "out").mkdir()
    (root / "out/q9.jpg").write_bytes(b"x")
    assert runner.list_images(root, exclude=root / "out") == [
        "UPPER.JPG",
        "q0.jpg",
        "q2.jpg",
        "sub/q1.jpg",
        "sub/q3.jpg",
    ]
    (root / "q0.png").write_bytes(b"x")
    with pytest.raises(ValueError, match="q0.jpg and q0.png"):
        runner.annotate_folder(root, tmp_path / "o", providers.ExistingAnswers(tmp_path), config())
    with pytest.raises(FileNotFoundError):
        runner.list_images(tmp_path / "missing")
    assert store.attention_file_name("a/b/x.jpeg") == Path("a/b/x.json")
    with pytest.raises(ValueError):
        store.attention_file_name("../x.jpg")
    # find_attention_file: nested name first, then the published flat name.
    ann = tmp_path / "ann"
    (ann / "sub").mkdir(parents=True)
    (ann / "x.json").write_text("{}")
    assert store.find_attention_file(ann, "sub/x.jpg") == ann / "x.json"
    (ann / "sub/x.json").write_text("{}")
    assert store.find_attention_file(ann, "sub/x.jpg") == ann / "sub/x.json"
    assert (
        store.find_attention_file(ann, tmp_path / "imgs/sub/x.jpg", images_root=tmp_path / "imgs") == ann / "sub/x.json"
    )
    assert store.find_attention_file(ann, "/elsewhere/x.jpg") == ann / "x.json"
    assert store.find_attention_file(ann, "y.jpg") is None


def test_read_attention_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        store.read_attention_file(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    parsed = store.read_attention_file(tmp_path / "bad.json")
    assert parsed.kind == "invalid" and "bad.json" in parsed.error


# ---------------------------------------------------------------------------------------------
# The command line, in subprocesses


def annotate_command(images: Path, out: Path, server: LLMServer, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "experiments.annotate", f"--images={images}", f"--output_dir={out}",
        "--city=San Francisco", "--provider=gemini", f"--base_url={server.url}", "--qpm=0",
        "--initial_backoff_s=0.01", *extra,
    ]  # fmt: skip


def run_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in providers.GEMINI_KEY_VARIABLES}
    env["GEMINI_API_KEY"] = KEY
    env["PYTHONPATH"] = str(REPO)
    env["JAX_PLATFORMS"] = "cpu"
    return env


def answer_files(out: Path) -> set[str]:
    return {p.relative_to(out).as_posix() for p in out.rglob("*.json") if p.name != runner.SUMMARY_FILE}


def wait_for_files(out: Path, count: int, process: subprocess.Popen, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while len(answer_files(out)) < count:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "annotate produced no files in time"
        time.sleep(0.05)


def slow_answers(seen):
    return text_reply(seen, POINTS, delay_s=0.3)


def test_ctrl_c_stops_cleanly(tmp_path):
    images = make_images(tmp_path / "images", range(8))
    out = tmp_path / "out"
    with LLMServer(slow_answers) as server:
        process = subprocess.Popen(
            annotate_command(images, out, server, "--workers=1"), cwd=REPO, env=run_env(), text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        wait_for_files(out, 2, process)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=30)
    assert process.returncode == 130, stderr[-2000:]
    summary = json.loads((out / runner.SUMMARY_FILE).read_text())
    assert summary["interrupted"] is True and json.loads(stdout)["interrupted"] is True
    done = answer_files(out)
    assert summary["valid"] == len(done) and 2 <= len(done) < 8
    assert summary["valid"] + summary["not_started"] == 8
    assert len(server.seen) == len(done)  # the answer in flight was waited for and written
    for text in (stdout, stderr, (out / "annotate.log").read_text(), *(p.read_text() for p in out.rglob("*.json"))):
        assert KEY not in text


def test_killed_run_resumes_without_reasking(tmp_path):
    images = make_images(tmp_path / "images", range(10))
    out = tmp_path / "out"
    with LLMServer(slow_answers) as server:
        process = subprocess.Popen(
            annotate_command(images, out, server, "--workers=2"), cwd=REPO, env=run_env(), text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        wait_for_files(out, 3, process)
        process.kill()  # SIGKILL: no chance to clean up
        process.communicate(timeout=30)
        done_at_kill = answer_files(out)
        asked_before = len(server.seen)
        for name in done_at_kill:  # atomic writes: every file present is complete
            assert store.read_attention_file(out / name).kind == "points"
        assert 3 <= len(done_at_kill) < 10

        resumed = subprocess.run(
            annotate_command(images, out, server, "--workers=2"), cwd=REPO, env=run_env(), text=True,
            capture_output=True, timeout=120,
        )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = json.loads(resumed.stdout)
    assert summary["skipped_done"] == len(done_at_kill) and summary["valid"] == 10 - len(done_at_kill)
    assert answer_files(out) == {f"q{i}.json" for i in range(10)}
    asked_again = [s.image_id() for s in server.seen[asked_before:]]
    assert sorted(asked_again) == sorted(i for i in range(10) if f"q{i}.json" not in done_at_kill)
    for text in (resumed.stdout, resumed.stderr, *(p.read_text() for p in out.rglob("*") if p.is_file())):
        assert KEY not in text


def test_show_attention_command(tmp_path):
    photo = tmp_path / "q.jpg"
    Image.new("RGB", (160, 120), (90, 120, 150)).save(photo)
    attention = tmp_path / "q.json"
    attention.write_text(json.dumps(PUBLISHED_FILES[0][1]))
    output = tmp_path / "q.png"
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-m", "experiments.show_attention", f"--image={photo}", f"--attention={attention}",
         f"--output={output}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    image = np.asarray(Image.open(output).convert("RGB"))
    assert image.shape[0] > 200 and image.shape[1] > 200 and image.std() > 10


# ---------------------------------------------------------------------------------------------
# Hostile servers and interruptions (issue 13 items 7 and 8)


def echo_key_answers(seen):
    """Successful answers that carry the key: in a point's reasoning, in an unusable answer, in the model name."""
    image_id = seen.image_id()
    if image_id == 0:
        text = json.dumps([{"center": [0.3, 0.6], "weight": 1.8, "reasoning": f"sign reads {KEY}"}])
        return text_reply(seen, text, model=f"model-{KEY}")
    if image_id == 1:
        return text_reply(seen, f"I cannot do that with key {KEY}")
    return text_reply(seen, "None")


def test_key_echoed_in_successful_answers_is_redacted(tmp_path, caplog):
    images = make_images(tmp_path / "images", range(3))
    out = tmp_path / "out"
    with caplog.at_level("DEBUG"), LLMServer(echo_key_answers) as server:
        summary = runner.annotate_folder(images, out, gemini(server), config())
    assert (summary.valid, summary.invalid, summary.none) == (1, 1, 1)
    assert all(s.headers["x-goog-api-key"] == KEY for s in server.seen)
    written = {p.name: p.read_text() for p in out.rglob("*") if p.is_file()}
    for name, text in written.items():
        assert KEY not in text, name
    record = json.loads(written["q0.json"])
    assert record["result"][0]["reasoning"] == "sign reads [REDACTED]" and record["model"] == "model-[REDACTED]"
    assert "[REDACTED]" in json.loads(written["q1.json"])["raw_text"]
    assert KEY not in json.dumps(summary.to_dict()) and KEY not in runner.summarize_counts(summary)
    assert KEY not in caplog.text


@pytest.mark.parametrize("api", ["gemini", pytest.param("openai", marks=pytest.mark.slow)])
def test_key_echoed_by_the_server_never_reaches_the_command_output(tmp_path, api):
    images = make_images(tmp_path / "images", range(3))
    out = tmp_path / "out"
    env = run_env()
    with LLMServer(echo_key_answers) as server:
        command = annotate_command(images, out, server, "--workers=1")
        if api == "openai":
            command = [c for c in command if not c.startswith(("--provider", "--base_url"))]
            command += ["--provider=openai", f"--base_url={server.url}/v1", "--model=qwen-vl"]
            env["OPENAI_API_KEY"] = KEY
        result = subprocess.run(command, cwd=REPO, env=env, text=True, capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert all(KEY in (s.headers.get("x-goog-api-key", "") + s.headers.get("authorization", "")) for s in server.seen)
    summary = json.loads(result.stdout)
    assert (summary["valid"], summary["invalid"], summary["none"]) == (1, 1, 1)
    assert "annotate: 3/3" in result.stderr and "valid 1 none 1 invalid 1 failed 0" in result.stderr  # progress
    for text in (result.stdout, result.stderr, *(p.read_text() for p in out.rglob("*") if p.is_file())):
        assert KEY not in text
    assert "[REDACTED]" in (out / "q0.json").read_text()


def test_requests_are_counted_as_they_are_made(tmp_path):
    """Interrupted during a retry wait after 2 requests, the summary says 2 requests and 1 retry."""
    images = make_images(tmp_path / "images", [0])
    SEEN_LOG.clear()

    def busy(seen):  # the first 503 is retried after the backoff (0.05 s), the second asks for 30 s
        SEEN_LOG.append(seen)
        return error_reply(seen, 503, "overloaded", retry_after="30" if len(SEEN_LOG) > 1 else None)

    retry = providers.RetryPolicy(max_attempts=5, initial_delay_s=0.05, max_delay_s=0.05, jitter=0.0)
    with LLMServer(busy) as server:
        provider = gemini(server, retry=retry)

        def interrupt_after_two_requests():
            deadline = time.monotonic() + 30
            while len(server.seen) < 2 and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(0.2)  # the client has the second 503 and is waiting (30 s) to retry
            _thread.interrupt_main()

        threading.Thread(target=interrupt_after_two_requests, daemon=True).start()
        start = time.monotonic()
        summary = runner.annotate_folder(images, tmp_path / "out", provider, config(workers=1))
        elapsed = time.monotonic() - start
    assert summary.interrupted and elapsed < 20
    assert len(server.seen) == 2
    assert (summary.requests, summary.retries, summary.not_started, summary.failed) == (2, 1, 1, 0)
    assert json.loads((tmp_path / "out" / runner.SUMMARY_FILE).read_text())["requests"] == 2


@pytest.mark.parametrize("api", ["gemini", "openai"])
def test_block_reason_is_recorded(tmp_path, api):
    images = make_images(tmp_path / "images", [0])
    out = tmp_path / "out"
    with LLMServer(lambda seen: blocked_reply(seen, "PROHIBITED_CONTENT")) as server:
        if api == "gemini":
            provider = gemini(server)
        else:
            provider = providers.OpenAIProvider(model="qwen-vl", api_key=KEY, base_url=server.url + "/v1")
        summary = runner.annotate_folder(images, out, provider, config(workers=1))
    assert summary.invalid == 1 and summary.requests == 1
    record = json.loads((out / "q0.json").read_text())
    want = "PROHIBITED_CONTENT" if api == "gemini" else "refusal: I can't help with that."
    assert record["status"] == "invalid" and record["block_reason"] == want
    assert record["error"].startswith("empty answer (blocked: " + want)
    assert summary.invalid_images[0]["error"] == record["error"]
