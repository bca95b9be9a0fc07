"""An OpenAI-compatible chat-completions endpoint (vLLM, Ollama, LM Studio, ...) through the ``openai`` client.

The photo goes as a ``data:image/jpeg;base64`` URL in an ``image_url`` content part. The client's own
retries are off: the request policy retries, honouring ``Retry-After`` (and RetryInfo in a Google error body,
for Gemini's OpenAI-compatible endpoint). A refusal (``message.refusal``) comes back as an empty answer that
carries it as the block reason.
"""

from __future__ import annotations

import base64
from typing import Any

from attllm_jax.attention.providers.base import AnnotationRequest, ModelReply, Provider, check_timeout, request_image
from attllm_jax.attention.providers.http import guarded_client
from attllm_jax.attention.request_policy import (
    ProviderError,
    RateLimiter,
    RetryPolicy,
    api_key_from_env,
    parse_google_retry_delay,
    parse_retry_after,
    server_delay,
)

OPENAI_KEY_VARIABLE = "OPENAI_API_KEY"
NO_KEY = "EMPTY"  # what local servers without authentication are given (the client requires some key)


class OpenAIProvider(Provider):
    """An OpenAI-compatible chat-completions endpoint, through the maintained ``openai`` client library.

    Args:
        model: the served model's name, e.g. "Qwen/Qwen2.5-VL-7B-Instruct".
        base_url: the API root, e.g. "http://127.0.0.1:8000/v1" (``/chat/completions`` is appended).
        api_key: sent as a bearer token; default OPENAI_API_KEY, else the placeholder "EMPTY".
        timeout_s: the total deadline of each attempt, seconds (connect to last byte: see :mod:`.http`).
        temperature, top_p, max_output_tokens: sampling (None: the server's default).
        retry: the retry policy.
        limiter: the rate limiter shared by all threads.

    Raises:
        ValueError: without ``base_url``, or with a timeout that is not positive.
    """

    name = "openai"

    def __init__(
        self,
        model: str,
        base_url: str,
        api_key: str | None = None,
        timeout_s: float = 60.0,
        temperature: float | None = None,
        top_p: float | None = None,
        max_output_tokens: int | None = None,
        retry: RetryPolicy | None = None,
        limiter: RateLimiter | None = None,
    ):
        super().__init__(model, retry, limiter)
        if not base_url:
            raise ValueError("the openai provider needs --base_url (e.g. http://127.0.0.1:8000/v1)")
        check_timeout(timeout_s)
        import openai

        self._openai = openai
        self._api_key = api_key or api_key_from_env((OPENAI_KEY_VARIABLE,))
        self.timeout_s = timeout_s
        self._client = openai.OpenAI(
            api_key=self._api_key or NO_KEY,
            base_url=base_url.rstrip("/"),
            timeout=timeout_s,
            max_retries=0,
            http_client=guarded_client(base_url, timeout_s),  # sends only to base_url's origin
        )
        self._sampling = {"temperature": temperature, "top_p": top_p, "max_tokens": max_output_tokens}

    def secrets(self) -> tuple[str | None, ...]:
        return (self._api_key,)

    def _call_once(self, request: AnnotationRequest) -> ModelReply:
        data_url = "data:image/jpeg;base64," + base64.b64encode(request_image(request)).decode("ascii")
        messages = [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": request.prompt},
                    {"type": "image_url", "image_url": {"url": data_url}},
                ],
            }
        ]
        sampling = {k: v for k, v in self._sampling.items() if v is not None}
        openai = self._openai
        try:
            completion = self._client.chat.completions.create(model=self.model, messages=messages, **sampling)
        except openai.APITimeoutError:
            raise ProviderError(f"request timed out after {self.timeout_s:g} s", retriable=True) from None
        except openai.APIConnectionError as e:
            cause = e.__cause__ or e
            raise ProviderError(f"connection failed: {type(cause).__name__}: {cause}", retriable=True) from None
        except openai.APIStatusError as e:
            raise _status_error(e) from None
        return _reply(completion, self.model)

    def close(self) -> None:
        try:
            self._client.close()
        except Exception:  # noqa: BLE001 - best effort at shutdown
            pass


def _status_error(e: Any) -> ProviderError:
    """The whole error body: the request policy redacts it, then clips it (never the other way round)."""
    response = e.response
    delay = server_delay(parse_retry_after(response.headers.get("retry-after")), parse_google_retry_delay(e.body))
    return ProviderError.from_status(
        f"HTTP {e.status_code} from {response.request.url.path}: {response.text}", e.status_code, delay
    )


def _reply(completion: Any, default_model: str) -> ModelReply:
    """The answer of a ``ChatCompletion``; raises ProviderError when it holds no choice."""
    choices = getattr(completion, "choices", None)
    if not choices:
        raise ProviderError(f"unexpected chat-completions response without choices: {completion}")
    choice = choices[0]
    message = choice.message
    content = message.content if message is not None else None
    if isinstance(content, list):  # content parts, as some servers send
        content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
    refusal = getattr(message, "refusal", None)
    usage = completion.usage
    details = getattr(usage, "completion_tokens_details", None)
    tokens = {
        "prompt": int(getattr(usage, "prompt_tokens", None) or 0),
        "output": int(getattr(usage, "completion_tokens", None) or 0),
        "thinking": int(getattr(details, "reasoning_tokens", None) or 0),
        "total": int(getattr(usage, "total_tokens", None) or 0),
    }
    block = f"refusal: {refusal}" if refusal else None
    return ModelReply(content or "", completion.model or default_model, tokens, choice.finish_reason, block)
