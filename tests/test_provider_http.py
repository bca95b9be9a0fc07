"""What every provider's HTTP client guarantees, against real servers on 127.0.0.1 (tests/llm_server.py) and the
real google-genai / openai clients: the key never goes to another origin, and no part of it reaches an output; the
timeout is a total deadline; answers are capped in size."""

import json
import subprocess
import time

import pytest
from PIL import Image

from attllm_jax.attention import providers, runner
from attllm_jax.attention.providers.gemini_image_edit import GeminiImageEditor
from tests.llm_server import LLMServer, Reply, error_reply, text_reply
from tests.test_attention_providers import KEY, POINTS, make_provider, make_request

NO_RETRY = providers.RetryPolicy(max_attempts=1)
FAST_RETRY = providers.RetryPolicy(max_attempts=3, initial_delay_s=0.01, max_delay_s=0.05)
CLIENTS = ["gemini", "openai", "image_edit"]


def ask(client: str, server: LLMServer, **kwargs) -> float:
    """One request from ``client`` to ``server``: its seconds (the client's construction not counted); raises
    ProviderError as the provider does."""
    kwargs.setdefault("retry", NO_RETRY)
    if client == "image_edit":
        editor = GeminiImageEditor(base_url=server.url, api_key=KEY, **kwargs)
        photo = Image.new("RGB", (32, 24), (90, 90, 90))
        call, close = lambda: editor.edit(photo, 0.3), editor.close
    else:
        provider, request = make_provider(client, server, **kwargs), make_request()
        call, close = lambda: provider.generate(request), provider.close
    start = time.monotonic()
    try:
        call()
        return time.monotonic() - start
    finally:
        close()


def carries_key(seen) -> bool:
    return KEY in seen.headers.get("x-goog-api-key", "") + seen.headers.get("authorization", "")


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
@pytest.mark.parametrize("client", CLIENTS)
def test_redirect_to_another_origin_is_refused_and_the_key_stays_home(client, status):
    with LLMServer(lambda seen: text_reply(seen, POINTS)) as elsewhere:
        with LLMServer(lambda seen: Reply(status, {}, headers={"Location": elsewhere.url + seen.path})) as server:
            with pytest.raises(providers.ProviderError) as info:
                ask(client, server)
    assert len(server.seen) == 1 and carries_key(server.seen[0])
    assert elsewhere.seen == []  # not even a request without the key: the prompt and photo stay home too
    assert info.value.fatal and "redirected to " + elsewhere.url in str(info.value)


@pytest.mark.parametrize("client", ["gemini", "openai"])
def test_redirect_within_the_origin_is_followed(client):
    def responder(seen):
        if seen.path.startswith("/moved"):
            return text_reply(seen, POINTS)
        return Reply(307, {}, headers={"Location": "/moved" + seen.path})

    with LLMServer(responder) as server:
        provider = make_provider(client, server, retry=NO_RETRY)
        try:
            response = provider.generate(make_request())
        finally:
            provider.close()
    assert response.text == POINTS and [s.path.startswith("/moved") for s in server.seen] == [False, True]
    assert all(carries_key(s) for s in server.seen)


# A partly redacted key: the error body holds the key where the message used to be cut


LONG_KEY = "sk-TEST-0123456789abcdefghijklmn"  # 32 characters
GEMINI_PREFIX = "Gemini API error 400 INVALID_ARGUMENT: "  # how the Gemini provider words an error
OPENAI_BODY_PREFIX = '{"error": {"message": "'  # how tests/llm_server.py writes an OpenAI error body


def key_cut_messages(api: str) -> list[str]:
    """Error messages that put the key across the old cut (500 characters of the Gemini message, 300 of the
    OpenAI body) with 31, 20 and 8 of its characters before it, and one in the middle of a long message."""
    cut, prefix = (500, GEMINI_PREFIX) if api == "gemini" else (300, OPENAI_BODY_PREFIX)
    before = [cut - len(prefix) - kept for kept in (31, 20, 8)]
    return ["x" * n + LONG_KEY + " trailing" for n in before] + ["y" * 2000 + LONG_KEY + "z" * 2000]


def key_pieces(text: str, length: int = 8) -> list[str]:
    """Every run of ``length`` characters of LONG_KEY found in ``text``."""
    return [LONG_KEY[i : i + length] for i in range(len(LONG_KEY) - length + 1) if LONG_KEY[i : i + length] in text]


def test_redactor_hides_every_long_fragment_and_nothing_else():
    redactor = providers.Redactor([LONG_KEY])
    assert redactor(f"a {LONG_KEY} b") == "a [REDACTED] b"
    assert redactor(f"cut here: {LONG_KEY[:31]}") == "cut here: [REDACTED]"
    assert redactor(f"tail {LONG_KEY[-12:]}, head {LONG_KEY[:8]}.") == "tail [REDACTED], head [REDACTED]."
    assert redactor(f"{LONG_KEY[:20]}{LONG_KEY[10:]}") == "[REDACTED]"  # two overlapping pieces, one span
    assert redactor(f"short {LONG_KEY[:7]} stays") == f"short {LONG_KEY[:7]} stays"  # 7 < 8 characters
    assert redactor("0123456789 counts") == "[REDACTED] counts"  # a run of the key, wherever it comes from
    assert providers.Redactor(["abc"])("xabcx ab") == "x[REDACTED]x ab"  # short keys: only whole
    assert providers.Redactor(["a/b+c=d&e?f"])("q=a%2Fb%2Bc%3Dd%26e%3Ff") == "q=[REDACTED]"  # URL-encoded


@pytest.mark.parametrize("api", ["gemini", "openai"])
def test_key_near_the_cut_is_hidden_in_every_output_of_the_command(tmp_path, api):
    from tests.test_attention_annotate import REPO, annotate_command, make_images, run_env

    messages = key_cut_messages(api)
    images = make_images(tmp_path / "images", range(len(messages)))
    out = tmp_path / "out"
    env = run_env()
    with LLMServer(lambda seen: error_reply(seen, 400, messages[seen.image_id()])) as server:
        command = annotate_command(images, out, server, "--workers=1")
        if api == "openai":
            command = [c for c in command if not c.startswith(("--provider", "--base_url"))]
            command += ["--provider=openai", f"--base_url={server.url}/v1", "--model=qwen-vl"]
            env["OPENAI_API_KEY"] = LONG_KEY
        else:
            env["GEMINI_API_KEY"] = LONG_KEY
        result = subprocess.run(command, cwd=REPO, env=env, text=True, capture_output=True, timeout=120)
    assert len(server.seen) == len(messages)
    summary = json.loads((out / runner.SUMMARY_FILE).read_text())
    assert summary["failed"] == len(messages) and json.loads(result.stdout)["failed"] == len(messages)
    outputs = {"stdout": result.stdout, "stderr": result.stderr, "log": (out / "annotate.log").read_text()}
    outputs.update({p.name: p.read_text() for p in out.rglob("*.json")})
    for name, text in outputs.items():
        assert key_pieces(text) == [], name
    errors = {failure["image"]: failure["error"] for failure in summary["failures"]}
    # The marker itself may be clipped (q2, q3: the key lies past 500 characters once redacted), never the key.
    assert all("[REDACTED]" in errors[f"q{i}.jpg"] for i in range(2))


# A server that drips its answer: the timeout is a total deadline


@pytest.mark.parametrize("client", CLIENTS)
def test_a_dripping_server_is_cut_off_at_the_timeout(client):
    """The answer comes a byte every 20 ms (about 10 s for the status line and headers alone, each read quick):
    with ``timeout_s=1`` the request fails as a timeout within the second, not when the answer ends."""
    start = [0.0]

    def drip(seen):
        start[0] = seen.time
        return text_reply(seen, POINTS, drip_s=0.02)

    with LLMServer(drip) as server:
        with pytest.raises(providers.ProviderError, match="timed out after 1 s") as info:
            ask(client, server, timeout_s=1.0)
        elapsed = time.monotonic() - start[0]  # from the request's arrival
    assert info.value.retriable and len(server.seen) == 1
    assert elapsed < 2.5, elapsed  # one deadline and some slack for a loaded machine, not the ~10 s of the answer


def test_every_attempt_gets_its_own_deadline():
    retry = providers.RetryPolicy(max_attempts=3, initial_delay_s=0.01, max_delay_s=0.01, jitter=0.0)
    with LLMServer(lambda seen: text_reply(seen, POINTS, drip_s=0.02)) as server:
        with pytest.raises(providers.ProviderError, match="timed out"):
            ask("openai", server, timeout_s=0.5, retry=retry)
    times = [s.time for s in server.seen]
    assert len(times) == 3 and all(0.45 <= b - a < 2.0 for a, b in zip(times, times[1:], strict=False)), times


# Oversized answers: refused at the cap


def huge_answer(seen, no_length: bool = False) -> Reply:
    """A valid answer whose text is 3 MB of prose before the points (over the 1 MiB cap)."""
    return text_reply(seen, "words " * 500_000 + POINTS, no_length=no_length)


@pytest.mark.parametrize("no_length", [False, True], ids=["content_length", "until_close"])
@pytest.mark.parametrize("api", ["gemini", "openai"])
def test_an_answer_over_the_cap_is_refused(api, no_length):
    with LLMServer(lambda seen: huge_answer(seen, no_length)) as server:
        with pytest.raises(providers.ProviderError, match="over the cap of 1048576 bytes") as info:
            ask(api, server, retry=FAST_RETRY)
    assert len(server.seen) == 1 and not info.value.retriable  # not asked again
    assert ("more than 1048576" in str(info.value)) == no_length


def test_an_edited_image_over_the_cap_is_refused():
    with LLMServer(lambda seen: text_reply(seen, "x" * 300_000)) as server:
        with pytest.raises(providers.ProviderError, match="over the cap of 100000 bytes"):
            ask("image_edit", server, max_response_bytes=100_000)


def test_an_answer_under_the_cap_is_read_whole():
    text = "words " * 100_000 + POINTS  # 600 kB
    with LLMServer(lambda seen: text_reply(seen, text, no_length=True)) as server:
        provider = make_provider("openai", server)
        try:
            assert provider.generate(make_request()).text == text
        finally:
            provider.close()


def test_an_oversized_answer_is_a_recorded_failure_not_a_file(tmp_path):
    from tests.test_attention_annotate import REPO, annotate_command, make_images, run_env

    images = make_images(tmp_path / "images", range(2))
    out = tmp_path / "out"
    with LLMServer(lambda seen: huge_answer(seen) if seen.image_id() == 0 else text_reply(seen, POINTS)) as server:
        command = annotate_command(images, out, server, "--workers=1")
        result = subprocess.run(command, cwd=REPO, env=run_env(), text=True, capture_output=True, timeout=120)
    assert result.returncode == 3, result.stderr[-2000:]  # the exit status of a run with failed images
    summary = json.loads((out / runner.SUMMARY_FILE).read_text())
    assert (summary["valid"], summary["failed"]) == (1, 1)
    (failure,) = summary["failures"]
    assert failure["image"] == "q0.jpg" and "over the cap of 1048576 bytes" in failure["error"]
    assert "over the cap" in (out / "annotate.log").read_text()
    assert max(p.stat().st_size for p in out.rglob("*") if p.is_file()) < 100_000


def test_a_compressed_answer_is_refused():
    """Answers are asked uncompressed (so the cap bounds their memory); a server that compresses anyway is refused."""
    with LLMServer(lambda seen: text_reply(seen, POINTS, headers={"Content-Encoding": "gzip"})) as server:
        with pytest.raises(providers.ProviderError, match=r"compressed \(gzip\)"):
            ask("gemini", server)
    assert server.seen[0].headers["accept-encoding"] == "identity"


# Closed clients: no socket left open


@pytest.mark.parametrize("client", CLIENTS)
def test_clients_used_in_a_with_block_leave_no_socket_open(client):
    import gc
    import warnings

    gc.collect()  # other tests' garbage first: only this test's sockets are counted
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with LLMServer(lambda seen: text_reply(seen, POINTS)) as server:
            if client == "image_edit":
                with GeminiImageEditor(base_url=server.url, api_key=KEY, retry=NO_RETRY) as editor:
                    with pytest.raises(providers.ProviderError, match="text instead of an image"):
                        editor.edit(Image.new("RGB", (32, 24), (90, 90, 90)), 0.3)
            else:
                with make_provider(client, server, retry=NO_RETRY) as provider:
                    assert provider.generate(make_request()).text == POINTS
        gc.collect()
    port = server.url.rsplit(":", 1)[1]
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning) and port in str(w.message)] == []
