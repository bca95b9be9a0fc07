"""What every provider's HTTP client guarantees, against real servers on 127.0.0.1 (tests/llm_server.py) and the
real google-genai / openai clients: the key never goes to another origin."""

import pytest
from PIL import Image

from attllm_jax.attention import providers
from attllm_jax.attention.providers.gemini_image_edit import GeminiImageEditor
from tests.llm_server import LLMServer, Reply, text_reply
from tests.test_attention_providers import KEY, POINTS, make_provider, make_request

NO_RETRY = providers.RetryPolicy(max_attempts=1)
CLIENTS = ["gemini", "openai", "image_edit"]


def ask(client: str, server: LLMServer, **kwargs) -> None:
    """One request from ``client`` to ``server``; raises ProviderError as the provider does."""
    kwargs.setdefault("retry", NO_RETRY)
    if client == "image_edit":
        editor = GeminiImageEditor(base_url=server.url, api_key=KEY, **kwargs)
        try:
            editor.edit(Image.new("RGB", (32, 24), (90, 90, 90)), 0.3)
        finally:
            editor.close()
        return
    provider = make_provider(client, server, **kwargs)
    try:
        provider.generate(make_request())
    finally:
        provider.close()


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
