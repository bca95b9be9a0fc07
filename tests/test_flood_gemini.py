"""The Gemini image-editing flood against a local server: an image part, 429s with Retry-After, errors, a text
answer instead of an image, a rejected key; outputs, retries, resume, the mask estimate, and no key on disk."""

import base64
import io
import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from attllm_jax.attention.providers.gemini_image_edit import (
    FLOOD_EDIT_PROMPT,
    GeminiImageEditor,
    estimate_water_mask,
    gemini_method,
)
from attllm_jax.attention.request_policy import ProviderError, RetryPolicy
from attllm_jax.data.flood import flood_folder, flood_pixels
from tests.llm_server import LLMServer, Reply, error_reply, text_reply

REPO = Path(__file__).resolve().parents[1]
SECRET = "AIza-test-key-never-on-disk-0123456789"
FAST = RetryPolicy(max_attempts=4, initial_delay_s=0.01, max_delay_s=0.05, jitter=0.0)


def _photo(seed: int, h=96, w=128) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:h, 0:w]
    base = np.stack([xs * 2 % 255, ys * 2 % 255, (xs + ys) % 200], -1).astype(np.uint8)
    base[10:30, 20 + seed * 5 : 50 + seed * 5] = rng.integers(0, 255, 3)
    return base


def _edited(seen, level: float, size=None) -> np.ndarray:
    """What a well-behaved edit server returns: the input, relit (overcast), with procedural water below."""
    image = np.asarray(seen.image.convert("RGB"))
    flooded, _ = flood_pixels(image, level, seed=1)
    overcast = np.clip(flooded.astype(np.float32) * 0.85 + 10, 0, 255).astype(np.uint8)
    out = Image.fromarray(overcast)
    return out.resize(size) if size else out


def image_reply(image: Image.Image, text: str | None = None, key: str = "inlineData") -> Reply:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    parts = ([{"text": text}] if text else []) + [
        {key: {"mimeType": "image/png", "data": base64.b64encode(buffer.getvalue()).decode()}}
    ]
    body = {"candidates": [{"content": {"parts": parts, "role": "model"}, "finishReason": "STOP"}], "modelVersion": "x"}
    return Reply(200, body)


def _folder(tmp_path: Path, n: int = 3) -> Path:
    folder = tmp_path / "dry"
    folder.mkdir()
    for k in range(n):
        Image.fromarray(_photo(k)).save(folder / f"37.77{k}_-122.41{k}@q{k}.jpg", quality=95)
    return folder


def test_prompt_is_versioned_and_says_the_depth():
    text = FLOOD_EDIT_PROMPT.render(0.4)
    assert FLOOD_EDIT_PROMPT.version == "1" and "40%" in text and "moderate" in text
    assert "preserve all original buildings" in text and "overcast" in text and "droplets on the lens" in text
    assert "slight" in FLOOD_EDIT_PROMPT.render(0.2) and "severe" in FLOOD_EDIT_PROMPT.render(0.8)


def test_mask_estimate_finds_the_added_water():
    photo = _photo(0, 120, 160)
    flooded, truth = flood_pixels(photo, 0.4, seed=2)
    relit = np.clip(flooded.astype(np.float32) * 0.8 + 12, 0, 255).astype(np.uint8)  # overcast: global relighting
    estimate = estimate_water_mask(photo, relit)
    iou = (estimate & truth).sum() / (estimate | truth).sum()
    assert iou > 0.85
    assert not estimate[: int(120 * 0.45)].any()  # nothing well above the real waterline


def test_edits_through_the_server_with_retries_and_no_key_in_the_outputs(tmp_path, monkeypatch):
    monkeypatch.setenv("GEMINI_API_KEY", SECRET)
    dry = _folder(tmp_path)
    count = {"n": 0}
    lock = threading.Lock()

    def responder(seen):
        with lock:
            count["n"] += 1
            n = count["n"]
        if n == 1:
            return error_reply(seen, 429, f"quota for key {SECRET}", retry_after="0.05")
        if n == 2:
            return error_reply(seen, 503, "overloaded", retry_delay="0.02s")
        level = 0.3 if "30%" in seen.prompt else 0.6
        return image_reply(_edited(seen, level, size=(256, 192)), text="here you go")

    out = tmp_path / "flooded"
    with LLMServer(responder) as server:
        with GeminiImageEditor(base_url=server.url, retry=FAST) as editor:
            summary = flood_folder(dry, out, [0.3, 0.6], gemini_method(editor), method_name="gemini", seed=0)
        seen = list(server.seen)
    assert summary["counts"]["level_0.3"] == {"written": 3, "existing": 0, "failed": 0}
    assert summary["method_totals"]["requests"] == len(seen) == 6 + 2  # two retries
    assert all(s.headers.get("x-goog-api-key") == SECRET and SECRET not in s.path for s in seen)
    assert all(s.body["generationConfig"]["responseModalities"] == ["TEXT", "IMAGE"] for s in seen)
    for name in (p.name for p in dry.iterdir()):
        with Image.open(out / "level_0.6" / name) as edited:
            size = edited.size
        assert size == (128, 96)  # resized back to the input's size; the same name
        mask = np.asarray(Image.open(out / "masks" / "level_0.6" / name.replace(".jpg", ".png"))) > 127
        assert 0.4 < mask.mean() < 0.75 and not mask[:20].any()  # an estimate near the requested 0.6
    for path in out.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    # resume: nothing is asked again
    with LLMServer(responder) as server:
        with GeminiImageEditor(base_url=server.url, retry=FAST) as editor:
            again = flood_folder(dry, out, [0.3, 0.6], gemini_method(editor), method_name="gemini", seed=0)
        assert not server.seen and again["counts"]["level_0.6"]["existing"] == 3


def test_text_answers_errors_and_a_rejected_key(tmp_path, monkeypatch):
    monkeypatch.setenv("GEMINI_API_KEY", SECRET)
    dry = _folder(tmp_path)

    def responder(seen):
        return text_reply(seen, f"I cannot edit photos of people. ({SECRET})")  # the key echoed back

    with LLMServer(responder) as server:
        with GeminiImageEditor(base_url=server.url, retry=FAST) as editor:
            summary = flood_folder(dry, tmp_path / "o", [0.3], gemini_method(editor), method_name="gemini", seed=0)
        assert len(server.seen) == 3  # a text answer is not retried
    assert summary["num_failed"] == 3 and summary["counts"]["level_0.3"]["written"] == 0
    error = summary["failures"][0]["error"]
    assert "text instead of an image" in error and SECRET not in error and "[REDACTED]" in error
    assert SECRET not in (tmp_path / "o" / "flood_summary.json").read_text()

    with LLMServer(lambda seen: error_reply(seen, 500, "boom")) as server:
        with GeminiImageEditor(base_url=server.url, retry=FAST) as editor:
            with pytest.raises(ProviderError, match="HTTP 500") as info:
                editor.edit(Image.fromarray(_photo(0)), 0.3)
        assert info.value.attempts == 4 and len(server.seen) == 4  # retried up to the policy's attempts

    with LLMServer(lambda seen: error_reply(seen, 403, f"API key not valid: {SECRET}")) as server:
        with GeminiImageEditor(base_url=server.url, retry=FAST) as editor:
            stopped = flood_folder(dry, tmp_path / "p", [0.3, 0.6], gemini_method(editor), method_name="gemini", seed=0)
        assert len(server.seen) == 1  # fatal: the run stops at once
    assert stopped["aborted"] and SECRET not in stopped["aborted"]


def test_no_key_without_a_local_server(monkeypatch):
    for name in ("GEMINI_API_KEY", "GOOGLE_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="GEMINI_API_KEY"):
        GeminiImageEditor()


def test_cli_gemini_against_the_local_server(tmp_path):
    dry = _folder(tmp_path, 2)
    out = tmp_path / "o"
    with LLMServer(lambda seen: image_reply(_edited(seen, 0.5))) as server:
        env = {"PATH": "/usr/bin:/bin", "GEMINI_API_KEY": SECRET}
        cmd = [sys.executable, "-m", "experiments.flood", f"--images={dry}", f"--output_dir={out}", "--method=gemini",
               f"--base_url={server.url}", "--levels=0.5", "--qpm=0"]  # fmt: skip
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "flood_summary.json").read_text())
    assert summary["method"] == "gemini" and summary["counts"]["level_0.5"]["written"] == 2
    assert summary["settings"]["prompt_id"] == "gemini_flood_edit" and "ESTIMATED" in summary["settings"]["mask"]
    assert SECRET not in proc.stdout + proc.stderr
    for path in out.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
