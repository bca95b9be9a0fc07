"""Providers against a real HTTP server on 127.0.0.1 (tests/llm_server.py): the real google-genai client and
our OpenAI-compatible client, with scripted answers, errors, delays and dropped connections."""

import email.utils
import io
import json
import logging
import random
import threading
import time

import pytest
from PIL import Image

from attllm_jax.attention import overlay, parse, prompts, providers
from tests.llm_server import LLMServer, Reply, error_reply, id_photo, text_reply

KEY = "AIzaTEST-very-secret-0123456789"
POINTS = '[{"center": [0.3, 0.6], "weight": 1.8, "reasoning": "clock tower"}]'
FAST_RETRY = providers.RetryPolicy(max_attempts=3, initial_delay_s=0.01, max_delay_s=0.05, jitter=0.1)


def make_request(image_id: int = 5, prompt_id: str = "axis_focus") -> providers.AnnotationRequest:
    prompt = prompts.get_prompt(prompt_id)
    jpeg = overlay.encode_jpeg(overlay.draw_axis_overlay(id_photo(image_id)).image)
    return providers.AnnotationRequest(
        f"q{image_id}.jpg", jpeg, prompt.render("San Francisco"), prompt.response_schema()
    )


def make_provider(api: str, server: LLMServer, **kwargs) -> providers.Provider:
    kwargs.setdefault("retry", FAST_RETRY)
    kwargs.setdefault("timeout_s", 5.0)
    if api == "gemini":
        return providers.GeminiProvider(api_key=KEY, base_url=server.url, **kwargs)
    return providers.OpenAIProvider(model="qwen-vl", api_key=KEY, base_url=server.url + "/v1", **kwargs)


def scripted(*steps):
    """A responder that plays ``steps`` (functions of the request) in order, repeating the last one."""
    calls = []
    lock = threading.Lock()

    def responder(seen):
        with lock:
            calls.append(seen)
            step = steps[min(len(calls), len(steps)) - 1]
        return step(seen)

    return responder


def ok(seen):
    return text_reply(seen, POINTS)


def test_gemini_request_carries_image_and_prompt():
    request = make_request(image_id=5)
    with LLMServer(scripted(ok)) as server:
        provider = make_provider("gemini", server, temperature=0.3, top_p=0.9, thinking_budget=0)
        response = provider.generate(request)
    (seen,) = server.seen
    assert seen.path == "/v1beta/models/gemini-2.5-flash:generateContent"
    assert seen.headers["x-goog-api-key"] == KEY
    assert seen.prompt == request.prompt and "San Francisco" in seen.prompt
    assert seen.image_bytes == request.image_jpeg and seen.image_id() == 5
    assert Image.open(io.BytesIO(seen.image_bytes)).format == "JPEG"
    config = seen.body["generationConfig"]
    assert config["responseMimeType"] == "application/json"
    assert config["responseSchema"]["type"] == "ARRAY" and config["responseSchema"]["nullable"] is True
    assert config["temperature"] == 0.3 and config["topP"] == 0.9
    # The SDK writes nested fields in snake_case, which the API's proto-JSON parser also accepts.
    assert config["thinkingConfig"] in ({"thinkingBudget": 0}, {"thinking_budget": 0})
    assert response.text == POINTS and response.attempts == 1 and response.model == "fake-model"
    assert response.tokens == {"prompt": 1000, "output": 50, "thinking": 7, "total": 1057}
    assert response.finish_reason == "STOP"
    assert parse.parse_answer(response.text).num_points == 1


def test_gemini_json_mode_off_sends_no_schema():
    with LLMServer(scripted(ok)) as server:
        make_provider("gemini", server, json_mode=False).generate(make_request())
    config = server.seen[0].body.get("generationConfig", {})
    assert "responseMimeType" not in config and "responseSchema" not in config


def test_openai_request_carries_image_and_prompt():
    request = make_request(image_id=7)
    with LLMServer(scripted(ok)) as server:
        response = make_provider("openai", server, temperature=0.0, max_output_tokens=512).generate(request)
    (seen,) = server.seen
    assert seen.path == "/v1/chat/completions" and seen.headers["authorization"] == f"Bearer {KEY}"
    assert seen.body["model"] == "qwen-vl" and seen.body["temperature"] == 0.0 and seen.body["max_tokens"] == 512
    image_part = seen.body["messages"][0]["content"][1]
    assert image_part["image_url"]["url"].startswith("data:image/jpeg;base64,")
    assert seen.image_bytes == request.image_jpeg and seen.image_id() == 7 and seen.prompt == request.prompt
    assert response.text == POINTS and response.tokens["total"] == 940 and response.finish_reason == "stop"


@pytest.mark.parametrize("api", ["gemini", "openai"])
def test_retries_honour_server_delay(api):
    steps = (
        lambda s: error_reply(s, 429, "quota", retry_delay="0.5s"),
        lambda s: error_reply(s, 503, "overloaded", retry_after="0.3"),
        ok,
    )
    with LLMServer(scripted(*steps)) as server:
        response = make_provider(api, server).generate(make_request())
    times = [s.time for s in server.seen]
    assert len(times) == 3 and response.attempts == 3 and response.text == POINTS
    if api == "gemini":  # RetryInfo lives in the Google error body; Retry-After works for both
        assert times[1] - times[0] >= 0.5
    assert times[2] - times[1] >= 0.3


@pytest.mark.parametrize("api", ["gemini", "openai"])
def test_retries_stop_after_the_limit(api):
    with LLMServer(scripted(lambda s: error_reply(s, 500, "internal"))) as server:
        with pytest.raises(providers.ProviderError) as info:
            make_provider(api, server).generate(make_request())
    assert len(server.seen) == 3 and info.value.attempts == 3
    assert info.value.retriable and not info.value.fatal and info.value.status == 500


@pytest.mark.parametrize("api", ["gemini", "openai"])
def test_timeout_and_dropped_connection_are_retried(api):
    steps = (lambda s: Reply(delay_s=3.0), lambda s: Reply(drop=True), ok)
    with LLMServer(scripted(*steps)) as server:
        start = time.monotonic()
        response = make_provider(api, server, timeout_s=0.4).generate(make_request())
        elapsed = time.monotonic() - start
    assert response.attempts == 3 and len(server.seen) == 3 and response.text == POINTS
    assert elapsed < 2.5  # the slow answer (3 s) was abandoned at the timeout


def test_timeouts_exhaust_attempts():
    with LLMServer(scripted(lambda s: Reply(delay_s=1.0))) as server:
        provider = make_provider("gemini", server, timeout_s=0.3, retry=providers.RetryPolicy(2, 0.01))
        with pytest.raises(providers.ProviderError, match="timed out") as info:
            provider.generate(make_request())
    assert info.value.attempts == 2 and len(server.seen) == 2


@pytest.mark.parametrize("api", ["gemini", "openai"])
@pytest.mark.parametrize("code, fatal", [(401, True), (403, True), (404, True), (400, False)])
def test_client_errors_are_not_retried(api, code, fatal):
    with LLMServer(scripted(lambda s: error_reply(s, code, "no"))) as server:
        with pytest.raises(providers.ProviderError) as info:
            make_provider(api, server).generate(make_request())
    assert len(server.seen) == 1 and not info.value.retriable and info.value.fatal == fatal


def test_invalid_key_is_fatal():
    def bad_key(seen):
        reply = error_reply(seen, 400, "API key not valid. Please pass a valid API key.")
        reply.body["error"]["details"] = [
            {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"}
        ]
        return reply

    with LLMServer(scripted(bad_key)) as server:
        with pytest.raises(providers.ProviderError) as info:
            make_provider("gemini", server).generate(make_request())
    assert info.value.fatal and len(server.seen) == 1


@pytest.mark.parametrize("api", ["gemini", "openai"])
def test_api_key_never_in_errors_or_logs(api, caplog):
    """The server echoes the key back (in errors and in the retry path); it must not come out of the provider."""
    steps = (lambda s: error_reply(s, 500, f"upstream rejected key={KEY}"), lambda s: error_reply(s, 400, f"bad {KEY}"))
    with caplog.at_level(logging.DEBUG):
        with LLMServer(scripted(*steps)) as server:
            with pytest.raises(providers.ProviderError) as info:
                make_provider(api, server).generate(make_request())
    assert len(server.seen) == 2
    message = str(info.value)
    assert KEY not in message and "[REDACTED]" in message
    assert KEY not in repr(info.value.args) and KEY not in caplog.text


def test_rate_limiter_keeps_the_server_under_the_set_rate():
    """16 requests from 4 threads through a limiter of 8 per second: the server never sees more than 8 in a second."""
    limiter = providers.RateLimiter(max_requests=8, period_s=1.0)
    with LLMServer(scripted(ok)) as server:
        provider = make_provider("gemini", server, limiter=limiter)
        request = make_request()
        threads = [threading.Thread(target=lambda: [provider.generate(request) for _ in range(4)]) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
    times = sorted(s.time for s in server.seen)
    assert len(times) == 16
    # 15 intervals of 1/8 s take about 1.9 s. Server-side arrival times carry some scheduling jitter, so the
    # window is a little shorter than the limiter's period (an unlimited client puts all 16 in a fraction of it).
    assert times[-1] - times[0] >= 15 / 8 * 0.85
    window = 0.8
    worst = max(sum(1 for t in times if start <= t < start + window) for start in times)
    assert worst <= 8, worst


def test_rate_limiter_can_be_interrupted():
    limiter = providers.RateLimiter(max_requests=1, period_s=60.0)
    stop = threading.Event()
    assert limiter.acquire(stop) == 0.0
    threading.Timer(0.1, stop.set).start()
    start = time.monotonic()
    with pytest.raises(providers.Interrupted):
        limiter.acquire(stop)
    assert time.monotonic() - start < 5
    assert providers.RateLimiter(0).acquire() == 0.0  # disabled


def test_retry_delay_parsing_and_policy():
    assert (
        providers.parse_google_retry_delay(
            {"error": {"details": [{"@type": "x/google.rpc.RetryInfo", "retryDelay": "12s"}]}}
        )
        == 12
    )
    body = {
        "error": {
            "details": [
                {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": {"seconds": 3, "nanos": 500000000}}
            ]
        }
    }
    assert providers.parse_google_retry_delay(body) == 3.5
    assert providers.parse_google_retry_delay({"error": {"message": "x"}}) is None
    assert providers.parse_retry_after("7") == 7.0
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 < providers.parse_retry_after(when) <= 31
    assert providers.parse_retry_after("soon") is None and providers.parse_retry_after(None) is None
    policy = providers.RetryPolicy(initial_delay_s=1.0, max_delay_s=10.0, multiplier=2.0, jitter=0.0)
    assert [policy.delay(k) for k in (1, 2, 3, 4, 5, 6)] == [1, 2, 4, 8, 10, 10]
    assert policy.delay(1, server_delay=30.0) == 30.0  # the server's delay wins over a shorter backoff
    jittered = providers.RetryPolicy(initial_delay_s=1.0, jitter=0.5)
    delays = [jittered.delay(1, rng=random.Random(i)) for i in range(20)]
    assert all(1.0 <= d <= 1.5 for d in delays) and len(set(delays)) > 1
    with pytest.raises(ValueError):
        providers.RetryPolicy(max_attempts=0)


def test_missing_keys_and_settings(monkeypatch):
    for variable in providers.GEMINI_KEY_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    with pytest.raises(ValueError, match="GEMINI_API_KEY"):
        providers.GeminiProvider()
    monkeypatch.setenv("GOOGLE_API_KEY", KEY)
    assert providers.GeminiProvider(base_url="http://127.0.0.1:9")._api_key == KEY
    with pytest.raises(ValueError, match="base_url"):
        providers.OpenAIProvider(model="m", base_url="")


def test_redact():
    assert providers.redact(f"a {KEY} b", [KEY, None]) == "a [REDACTED] b"
    assert providers.redact("key=a%2Bb%2F", ["a+b/"]) == "key=[REDACTED]"
    assert json.loads(json.dumps(providers.redact("x", []))) == "x"
