"""LLM providers behind one small interface, with retries and a shared requests-per-minute limiter.

* :class:`GeminiProvider`: the google-genai SDK (``generateContent``), JSON output requested with
  ``response_mime_type`` and a response schema; the text is always validated by our own parser.
* :class:`OpenAIProvider`: an OpenAI-compatible ``/chat/completions`` endpoint (vLLM, Ollama, ...)
  over httpx, the image sent as a data URL.
* :class:`FilesProvider`: answers from existing attention files (ours or the published code's).

Retries (ours; the SDK's own are off): 408/429/500/502/503/504, timeouts and dropped connections are
retried with exponential backoff and jitter, waiting at least as long as the server asks (RetryInfo
``retryDelay`` in a Google error body, or a ``Retry-After`` header). Every HTTP attempt, retries
included, first takes a slot from the :class:`RateLimiter` shared by all worker threads.

API keys come from the environment and are never printed, logged or written: every error message
that leaves this module is passed through :func:`redact`.
"""

from __future__ import annotations

import abc
import base64
import dataclasses
import email.utils
import json
import os
import random
import re
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import httpx

from attllm_jax.attention import store

RETRY_STATUS_CODES = frozenset({408, 429, 500, 502, 503, 504})
FATAL_STATUS_CODES = frozenset({401, 403, 404})
GEMINI_KEY_VARIABLES = ("GEMINI_API_KEY", "GOOGLE_API_KEY")
OPENAI_KEY_VARIABLE = "OPENAI_API_KEY"
_REDACTED = "[REDACTED]"


def redact(text: str, secrets: Iterable[str | None]) -> str:
    """``text`` with every secret (and its URL-encoded form) replaced by ``[REDACTED]``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, _REDACTED).replace(urllib.parse.quote(secret, safe=""), _REDACTED)
    return text


class ProviderError(Exception):
    """A request that did not produce an answer.

    Attributes:
        retriable: a later attempt may succeed (rate limits, server errors, timeouts, dropped connections).
        fatal: no later request can succeed (bad key, unknown model): the run should stop.
        status: the HTTP status, when there was one.
        retry_after: the delay the server asked for, in seconds.
        attempts: how many attempts were made before giving up.
    """

    def __init__(
        self,
        message: str,
        *,
        retriable: bool = False,
        fatal: bool = False,
        status: int | None = None,
        retry_after: float | None = None,
    ):
        super().__init__(message)
        self.retriable = retriable
        self.fatal = fatal
        self.status = status
        self.retry_after = retry_after
        self.attempts = 1


class Interrupted(Exception):
    """The run was asked to stop while this request was waiting."""


@dataclasses.dataclass(frozen=True)
class AnnotationRequest:
    """What one image asks.

    Attributes:
        image_path: the image, relative to the images folder (POSIX separators).
        image_jpeg: the visual prompt as JPEG bytes (None for providers that need no image).
        prompt: the prompt text.
        response_schema: the answer's schema for providers with structured output, or None.
    """

    image_path: str
    image_jpeg: bytes | None
    prompt: str
    response_schema: dict[str, Any] | None = None


@dataclasses.dataclass(frozen=True)
class AnnotationResponse:
    """The model's answer to one request.

    Attributes:
        text: the raw answer text (validated later by our parser).
        model: the model that answered (as reported by the server when it says).
        latency_s: wall time from the first attempt to the answer, waits included.
        attempts: HTTP attempts made (1 = no retry).
        tokens: {"prompt", "output", "thinking", "total"} token counts (0 when unknown).
        finish_reason: why generation stopped, when the server says.
    """

    text: str
    model: str
    latency_s: float
    attempts: int
    tokens: dict[str, int]
    finish_reason: str | None = None


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter that honours the server's retry delay.

    The wait before attempt ``k + 1`` (``k`` >= 1 attempts made) is
    ``max(server_delay, min(max_delay_s, initial_delay_s * multiplier ** (k - 1)))`` times a random
    factor in ``[1, 1 + jitter]``, capped at ``max_server_delay_s``.
    """

    max_attempts: int = 5
    initial_delay_s: float = 1.0
    max_delay_s: float = 60.0
    multiplier: float = 2.0
    jitter: float = 0.25
    max_server_delay_s: float = 600.0

    def __post_init__(self):
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")
        if self.initial_delay_s < 0 or self.max_delay_s < 0 or self.multiplier < 1 or self.jitter < 0:
            raise ValueError(f"invalid retry policy {self}")

    def delay(self, attempts_made: int, server_delay: float | None = None, rng: random.Random | None = None) -> float:
        backoff = min(self.max_delay_s, self.initial_delay_s * self.multiplier ** (attempts_made - 1))
        base = max(backoff, server_delay or 0.0)
        factor = 1.0 + self.jitter * (rng or random).random()
        return min(base * factor, self.max_server_delay_s)


class RateLimiter:
    """Spaces requests at least ``period_s / max_requests`` apart, across all threads that share it.

    Slots are handed out in call order, so no window of ``period_s`` holds more than ``max_requests``
    requests and there are no bursts. ``max_requests <= 0`` disables the limiter.
    """

    def __init__(
        self,
        max_requests: float,
        period_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        if period_s <= 0:
            raise ValueError(f"period_s must be positive, got {period_s}")
        self.interval = period_s / max_requests if max_requests > 0 else 0.0
        self._clock = clock
        self._next = -float("inf")
        self._lock = threading.Lock()

    def acquire(self, stop: threading.Event | None = None) -> float:
        """Waits for the next slot; returns the seconds waited.

        Raises:
            Interrupted: if ``stop`` is set while waiting (the slot is then wasted, which only slows others).
        """
        if self.interval == 0.0:
            return 0.0
        with self._lock:
            now = self._clock()
            slot = max(now, self._next)
            self._next = slot + self.interval
        wait = slot - now
        if wait > 0:
            if stop is not None:
                if stop.wait(wait):
                    raise Interrupted("stopped while waiting for a rate-limiter slot")
            else:
                time.sleep(wait)
        return max(wait, 0.0)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def parse_google_retry_delay(body: Any) -> float | None:
    """Seconds from a ``google.rpc.RetryInfo`` ``retryDelay`` ("12s", "1.5s") in an error body, or None."""
    error = body.get("error", body) if isinstance(body, dict) else None
    details = error.get("details") if isinstance(error, dict) else None
    if not isinstance(details, list):
        return None
    for detail in details:
        if isinstance(detail, dict) and str(detail.get("@type", "")).endswith("google.rpc.RetryInfo"):
            delay = detail.get("retryDelay")
            if isinstance(delay, dict):  # {"seconds": 12, "nanos": 0}
                return float(delay.get("seconds", 0)) + float(delay.get("nanos", 0)) / 1e9
            match = re.fullmatch(r"\s*([0-9.]+)\s*s\s*", str(delay))
            if match:
                return float(match.group(1))
    return None


def _max_or_none(*values: float | None) -> float | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def _httpx_classes(name: str) -> tuple[type[Exception], ...]:
    """``httpx.<name>``, and ``httpx2.<name>`` where installed (google-genai prefers that fork of httpx)."""
    classes = [getattr(httpx, name)]
    try:
        import httpx2

        classes.append(getattr(httpx2, name))
    except (ImportError, AttributeError):
        pass
    return tuple(classes)


def _transport_error(e: Exception, timeout_s: float) -> ProviderError:
    if isinstance(e, _httpx_classes("TimeoutException")):
        return ProviderError(f"request timed out after {timeout_s:g} s ({type(e).__name__})", retriable=True)
    return ProviderError(f"connection failed: {type(e).__name__}: {e}", retriable=True)


class Provider(abc.ABC):
    """Answers :class:`AnnotationRequest` s; subclasses implement :meth:`_call_once`.

    Attributes:
        name: the provider's name, recorded in every output file.
        model: the model asked.
        needs_image: whether requests must carry the visual prompt.
    """

    name: str = "provider"
    needs_image: bool = True

    def __init__(self, model: str, retry: RetryPolicy | None = None, limiter: RateLimiter | None = None):
        self.model = model
        self.retry = retry or RetryPolicy()
        self.limiter = limiter or RateLimiter(0)
        self._rng = random.Random()
        self._rng_lock = threading.Lock()

    def _secrets(self) -> tuple[str | None, ...]:
        return ()

    @abc.abstractmethod
    def _call_once(self, request: AnnotationRequest) -> tuple[str, str, dict[str, int], str | None]:
        """One attempt: (text, model, tokens, finish_reason); raises ProviderError."""

    def generate(self, request: AnnotationRequest, stop: threading.Event | None = None) -> AnnotationResponse:
        """Asks the model, retrying transient failures.

        Raises:
            ProviderError: when the attempts are used up or the failure is not transient; its
                ``attempts`` says how many were made. The message never holds an API key.
            Interrupted: if ``stop`` is set while waiting.
        """
        start = time.monotonic()
        attempts = 0
        while True:
            self.limiter.acquire(stop)
            attempts += 1
            try:
                text, model, tokens, finish = self._call_once(request)
            except ProviderError as e:
                error = e
            except Exception as e:  # noqa: BLE001 - SDK internals: wrap, never leak the key
                error = ProviderError(f"{type(e).__name__}: {e}")
            else:
                return AnnotationResponse(text, model, time.monotonic() - start, attempts, tokens, finish)
            error = ProviderError(
                redact(str(error), self._secrets()),
                retriable=error.retriable,
                fatal=error.fatal,
                status=error.status,
                retry_after=error.retry_after,
            )
            error.attempts = attempts
            if not error.retriable or attempts >= self.retry.max_attempts:
                raise error from None
            with self._rng_lock:
                delay = self.retry.delay(attempts, error.retry_after, self._rng)
            if stop is not None:
                if stop.wait(delay):
                    raise Interrupted(f"stopped while waiting to retry {request.image_path}")
            else:
                time.sleep(delay)

    def close(self) -> None:  # noqa: B027 - optional hook: most providers hold nothing to release
        """Releases connections."""


def _api_key_from_env(variables: Iterable[str]) -> str | None:
    for variable in variables:
        value = os.environ.get(variable)
        if value:
            return value
    return None


class GeminiProvider(Provider):
    """Gemini through the google-genai SDK.

    Args:
        model: e.g. "gemini-2.5-flash".
        api_key: the key; default GEMINI_API_KEY, else GOOGLE_API_KEY.
        base_url: another endpoint (a proxy, a local test server); default Google's.
        api_version: the REST API version in the path (``/v1beta/models/...:generateContent``).
        timeout_s: per-attempt timeout.
        temperature: sampling temperature (None: the model's default).
        top_p: nucleus sampling (None: the model's default).
        thinking_budget: thinking tokens (0 turns thinking off on 2.5 Flash; None: the model's default).
        json_mode: request ``application/json`` output and the prompt's response schema.
        max_output_tokens: cap on the answer length (None: the model's default).
        retry: the retry policy.
        limiter: the rate limiter shared by all threads.

    Raises:
        ValueError: if no key is given or found in the environment.
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
        self._api_key = api_key or _api_key_from_env(GEMINI_KEY_VARIABLES)
        if not self._api_key:
            raise ValueError(f"no Gemini API key: set {' or '.join(GEMINI_KEY_VARIABLES)} in the environment")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self.timeout_s = timeout_s
        self._types = types
        self._transport_errors = _httpx_classes("TransportError")
        # retry_options=None: the SDK makes exactly one attempt; retries are ours (they honour RetryInfo).
        http_options = types.HttpOptions(
            base_url=base_url, api_version=api_version, timeout=int(round(timeout_s * 1000))
        )
        self._client = genai.Client(api_key=self._api_key, http_options=http_options)
        self._sampling = {
            "temperature": temperature,
            "top_p": top_p,
            "max_output_tokens": max_output_tokens,
        }
        self._thinking_budget = thinking_budget
        self.json_mode = json_mode

    def _secrets(self) -> tuple[str | None, ...]:
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

    def _call_once(self, request: AnnotationRequest) -> tuple[str, str, dict[str, int], str | None]:
        from google.genai import errors

        if request.image_jpeg is None:
            raise ProviderError(f"request for {request.image_path} carries no image")
        contents = [self._types.Part.from_bytes(data=request.image_jpeg, mime_type="image/jpeg"), request.prompt]
        try:
            response = self._client.models.generate_content(
                model=self.model, contents=contents, config=self._config(request)
            )
        except errors.APIError as e:
            raise self._api_error(e) from None
        except self._transport_errors as e:
            raise _transport_error(e, self.timeout_s) from None
        text = response.text or ""
        finish = None
        if response.candidates:
            reason = response.candidates[0].finish_reason
            finish = getattr(reason, "value", None) or (str(reason) if reason is not None else None)
        usage = response.usage_metadata
        tokens = {
            "prompt": int(getattr(usage, "prompt_token_count", None) or 0),
            "output": int(getattr(usage, "candidates_token_count", None) or 0),
            "thinking": int(getattr(usage, "thoughts_token_count", None) or 0),
            "total": int(getattr(usage, "total_token_count", None) or 0),
        }
        return text, response.model_version or self.model, tokens, finish

    def _api_error(self, e: Exception) -> ProviderError:
        code = getattr(e, "code", None)
        response = getattr(e, "response", None)
        headers = getattr(response, "headers", None) or {}
        delay = _max_or_none(
            parse_google_retry_delay(getattr(e, "details", None)), parse_retry_after(headers.get("retry-after"))
        )
        message = getattr(e, "message", None) or str(e)
        status = getattr(e, "status", None)
        text = f"Gemini API error {code} {status or ''}: {message}".replace("  ", " ")
        key_invalid = code == 400 and "API_KEY_INVALID" in json.dumps(getattr(e, "details", None), default=str)
        return ProviderError(
            text[:500],
            retriable=code in RETRY_STATUS_CODES,
            fatal=code in FATAL_STATUS_CODES or key_invalid,
            status=code,
            retry_after=delay,
        )

    def close(self) -> None:
        try:
            self._client.close()
        except Exception:  # noqa: BLE001 - best effort at shutdown
            pass


class OpenAIProvider(Provider):
    """An OpenAI-compatible chat-completions endpoint (vLLM, Ollama, LM Studio, ...), over httpx.

    Args:
        model: the served model's name, e.g. "Qwen/Qwen2.5-VL-7B-Instruct".
        base_url: the API root, e.g. "http://127.0.0.1:8000/v1" (``/chat/completions`` is appended).
        api_key: sent as a bearer token; default OPENAI_API_KEY, else none.
        timeout_s: per-attempt timeout.
        temperature, top_p, max_output_tokens: sampling (None: the server's default).
        retry: the retry policy.
        limiter: the rate limiter shared by all threads.
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
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self._api_key = api_key or _api_key_from_env((OPENAI_KEY_VARIABLE,))
        self.timeout_s = timeout_s
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        self._client = httpx.Client(base_url=base_url.rstrip("/") + "/", headers=headers, timeout=timeout_s)
        self._sampling = {"temperature": temperature, "top_p": top_p, "max_tokens": max_output_tokens}

    def _secrets(self) -> tuple[str | None, ...]:
        return (self._api_key,)

    def _call_once(self, request: AnnotationRequest) -> tuple[str, str, dict[str, int], str | None]:
        if request.image_jpeg is None:
            raise ProviderError(f"request for {request.image_path} carries no image")
        data_url = "data:image/jpeg;base64," + base64.b64encode(request.image_jpeg).decode("ascii")
        body = {
            "model": self.model,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": request.prompt},
                        {"type": "image_url", "image_url": {"url": data_url}},
                    ],
                }
            ],
            **{k: v for k, v in self._sampling.items() if v is not None},
        }
        try:
            response = self._client.post("chat/completions", json=body)
        except httpx.TransportError as e:
            raise _transport_error(e, self.timeout_s) from None
        if response.status_code != 200:
            delay = _max_or_none(parse_retry_after(response.headers.get("retry-after")), _google_delay(response))
            raise ProviderError(
                f"HTTP {response.status_code} from {response.request.url.path}: {response.text[:300]}",
                retriable=response.status_code in RETRY_STATUS_CODES,
                fatal=response.status_code in FATAL_STATUS_CODES,
                status=response.status_code,
                retry_after=delay,
            )
        try:
            payload = response.json()
            choice = payload["choices"][0]
            content = choice["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise ProviderError(
                f"unexpected chat-completions response ({type(e).__name__}): {response.text[:300]}"
            ) from None
        if isinstance(content, list):  # content parts
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        usage = payload.get("usage") or {}
        details = usage.get("completion_tokens_details") or {}
        tokens = {
            "prompt": int(usage.get("prompt_tokens") or 0),
            "output": int(usage.get("completion_tokens") or 0),
            "thinking": int(details.get("reasoning_tokens") or 0),
            "total": int(usage.get("total_tokens") or 0),
        }
        return content or "", payload.get("model") or self.model, tokens, choice.get("finish_reason")

    def close(self) -> None:
        self._client.close()


def _google_delay(response: httpx.Response) -> float | None:
    try:
        return parse_google_retry_delay(response.json())
    except ValueError:
        return None


class FilesProvider(Provider):
    """Answers from existing attention files (ours or the published code's per-image format).

    The answer of image ``rel/x.jpg`` is the ``result`` of ``<source_dir>/rel/x.json`` (or the flat
    ``<source_dir>/x.json``); ``no_weighting`` files answer "None". No network, no rate limit.

    Raises:
        ValueError: if ``source_dir`` is not a folder.
    """

    name = "files"
    needs_image = False

    def __init__(self, source_dir: str | os.PathLike):
        super().__init__("files", RetryPolicy(max_attempts=1))
        self.source_dir = Path(source_dir)
        if not self.source_dir.is_dir():
            raise ValueError(f"the files provider needs an existing folder, got {source_dir}")

    def _call_once(self, request: AnnotationRequest) -> tuple[str, str, dict[str, int], str | None]:
        path = store.find_attention_file(self.source_dir, request.image_path)
        if path is None:
            raise ProviderError(f"no attention file for {request.image_path} in {self.source_dir}")
        try:
            record = store.load_record(path)
        except ValueError as e:
            raise ProviderError(str(e)) from None
        if not isinstance(record, dict) or not ("result" in record or "no_weighting" in record):
            record = {"result": record}
        result = None if record.get("no_weighting") is True else record.get("result")
        if result is None:
            text = "None"
        elif isinstance(result, str):
            text = result
        else:
            text = json.dumps(result)
        tokens = {k: int(v) for k, v in (record.get("tokens") or {}).items() if isinstance(v, int | float)}
        return text, str(record.get("model") or "unknown"), tokens, None
