"""Gemini through the google-genai SDK (``generateContent``).

JSON output is requested with ``response_mime_type`` and the prompt's response schema; the text is always
validated by our own parser. The SDK's own retries are off: the request policy retries, honouring RetryInfo
``retryDelay`` and ``Retry-After``. A prompt the API refuses (``promptFeedback.blockReason``) comes back as an
empty answer that carries the block reason.
"""

from __future__ import annotations

import json
from typing import Any

import httpx

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

GEMINI_KEY_VARIABLES = ("GEMINI_API_KEY", "GOOGLE_API_KEY")
GEMINI_BASE_URL = "https://generativelanguage.googleapis.com"


def _httpx_classes(name: str) -> tuple[type[Exception], ...]:
    """``httpx.<name>``, and ``httpx2.<name>`` where installed (google-genai prefers that fork of httpx)."""
    classes = [getattr(httpx, name)]
    try:
        import httpx2

        classes.append(getattr(httpx2, name))
    except (ImportError, AttributeError):
        pass
    return tuple(classes)


def _enum_text(value: Any) -> str | None:
    """The name of an SDK enum value (``FinishReason.STOP`` -> "STOP"), or None."""
    if value is None:
        return None
    return getattr(value, "value", None) or str(value)


class GeminiProvider(Provider):
    """Gemini through the google-genai SDK.

    Args:
        model: e.g. "gemini-2.5-flash".
        api_key: the key; default GEMINI_API_KEY, else GOOGLE_API_KEY.
        base_url: another endpoint (a proxy, a local test server); default Google's.
        api_version: the REST API version in the path (``/v1beta/models/...:generateContent``).
        timeout_s: the total deadline of each attempt, seconds (connect to last byte: see :mod:`.http`).
        temperature: sampling temperature (None: the model's default).
        top_p: nucleus sampling (None: the model's default).
        thinking_budget: thinking tokens (0 turns thinking off on 2.5 Flash; None: the model's default).
        json_mode: request ``application/json`` output and the prompt's response schema.
        max_output_tokens: cap on the answer length (None: the model's default).
        retry: the retry policy.
        limiter: the rate limiter shared by all threads.

    Raises:
        ValueError: if no key is given or found in the environment, or the timeout is not positive.
    """

    name = "gemini"

    def __init__(
        self,
        model: str = "gemini-2.5-flash",
        api_key: str | None = None,
        base_url: str | None = None,
        api_version: str = "v1beta",
        timeout_s: float = 60.0,
        temperature: float | None = None,
        top_p: float | None = None,
        thinking_budget: int | None = None,
        json_mode: bool = True,
        max_output_tokens: int | None = None,
        retry: RetryPolicy | None = None,
        limiter: RateLimiter | None = None,
    ):
        from google import genai
        from google.genai import types

        super().__init__(model, retry, limiter)
        self._api_key = api_key or api_key_from_env(GEMINI_KEY_VARIABLES)
        if not self._api_key:
            raise ValueError(f"no Gemini API key: set {' or '.join(GEMINI_KEY_VARIABLES)} in the environment")
        self.timeout_s = check_timeout(timeout_s)
        self._types = types
        self._transport_errors = _httpx_classes("TransportError")
        self._timeout_errors = _httpx_classes("TimeoutException")
        # retry_options=None: the SDK makes exactly one attempt; retries are ours (they honour RetryInfo).
        # Our HTTP client sends only to the configured origin (never the key to a host that redirects elsewhere).
        http_options = types.HttpOptions(
            base_url=base_url,
            api_version=api_version,
            timeout=int(round(timeout_s * 1000)),
            httpx_client=guarded_client(base_url or GEMINI_BASE_URL, timeout_s),
        )
        self._client = genai.Client(api_key=self._api_key, http_options=http_options)
        self._sampling = {
            "temperature": temperature,
            "top_p": top_p,
            "max_output_tokens": max_output_tokens,
        }
        self._thinking_budget = thinking_budget
        self.json_mode = json_mode

    def secrets(self) -> tuple[str | None, ...]:
        return (self._api_key,)

    def _config(self, request: AnnotationRequest):
        types = self._types
        kwargs: dict[str, Any] = {k: v for k, v in self._sampling.items() if v is not None}
        if self._thinking_budget is not None:
            kwargs["thinking_config"] = types.ThinkingConfig(thinking_budget=self._thinking_budget)
        if self.json_mode:
            kwargs["response_mime_type"] = "application/json"
            if request.response_schema is not None:
                kwargs["response_schema"] = types.Schema.model_validate(request.response_schema)
        return types.GenerateContentConfig(**kwargs)

    def _call_once(self, request: AnnotationRequest) -> ModelReply:
        from google.genai import errors

        contents = [self._types.Part.from_bytes(data=request_image(request), mime_type="image/jpeg"), request.prompt]
        try:
            response = self._client.models.generate_content(
                model=self.model, contents=contents, config=self._config(request)
            )
        except errors.APIError as e:
            raise self._api_error(e) from None
        except self._timeout_errors as e:
            message = f"request timed out after {self.timeout_s:g} s ({type(e).__name__})"
            raise ProviderError(message, retriable=True) from None
        except self._transport_errors as e:
            raise ProviderError(f"connection failed: {type(e).__name__}: {e}", retriable=True) from None
        finish = _enum_text(response.candidates[0].finish_reason) if response.candidates else None
        usage = response.usage_metadata
        tokens = {
            "prompt": int(getattr(usage, "prompt_token_count", None) or 0),
            "output": int(getattr(usage, "candidates_token_count", None) or 0),
            "thinking": int(getattr(usage, "thoughts_token_count", None) or 0),
            "total": int(getattr(usage, "total_token_count", None) or 0),
        }
        return ModelReply(
            response.text or "", response.model_version or self.model, tokens, finish, _block_reason(response)
        )

    def _api_error(self, e: Exception) -> ProviderError:
        code = getattr(e, "code", None)
        response = getattr(e, "response", None)
        headers = getattr(response, "headers", None) or {}
        delay = server_delay(
            parse_google_retry_delay(getattr(e, "details", None)), parse_retry_after(headers.get("retry-after"))
        )
        message = getattr(e, "message", None) or str(e)
        status = getattr(e, "status", None)
        text = f"Gemini API error {code} {status or ''}: {message}".replace("  ", " ")
        key_invalid = code == 400 and "API_KEY_INVALID" in json.dumps(getattr(e, "details", None), default=str)
        # The whole text: the request policy redacts it, then clips it (a cut before redaction can leave part of a key).
        return ProviderError.from_status(text, code, delay, fatal=key_invalid)

    def close(self) -> None:
        try:
            self._client.close()
        except Exception:  # noqa: BLE001 - best effort at shutdown
            pass


def _block_reason(response: Any) -> str | None:
    """``promptFeedback.blockReason`` (with its message when there is one), or None."""
    feedback = getattr(response, "prompt_feedback", None)
    reason = _enum_text(getattr(feedback, "block_reason", None))
    if reason is None:
        return None
    message = getattr(feedback, "block_reason_message", None)
    return f"{reason}: {message}" if message else reason
