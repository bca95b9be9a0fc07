"""What every answer source shares: the request, the answer, and the LLM provider base class.

A :class:`Provider` asks a remote model: it implements one attempt (:meth:`Provider._call_once`) and leaves
retries, the rate limit and key redaction to its :class:`~attllm_jax.attention.request_policy.RequestPolicy`.
Anything with the :class:`AnswerSource` shape can stand in for a provider in the annotation run (e.g. the
reader of existing attention files, which makes no request at all).
"""

from __future__ import annotations

import abc
import dataclasses
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from attllm_jax.attention.parse import ParsedAttention
from attllm_jax.attention.request_policy import ProviderError, RateLimiter, Redactor, RequestPolicy, RetryPolicy


@dataclasses.dataclass(frozen=True)
class AnnotationRequest:
    """What one image asks.

    Attributes:
        image_path: the image, relative to the images folder (POSIX separators).
        image_jpeg: the visual prompt as JPEG bytes (None for sources that need no image).
        prompt: the prompt text.
        response_schema: the answer's schema for providers with structured output, or None.
    """

    image_path: str
    image_jpeg: bytes | None
    prompt: str
    response_schema: dict[str, Any] | None = None


@dataclasses.dataclass(frozen=True)
class ModelReply:
    """What one successful attempt returned.

    Attributes:
        text: the raw answer text ("" when the model gave none).
        model: the model that answered, as the server reports it.
        tokens: {"prompt", "output", "thinking", "total"} token counts (0 when unknown).
        finish_reason: why generation stopped, when the server says.
        block_reason: why the server refused to answer (Gemini ``promptFeedback.blockReason``, an OpenAI
            ``refusal``), when it says.
    """

    text: str
    model: str
    tokens: dict[str, int]
    finish_reason: str | None = None
    block_reason: str | None = None


@dataclasses.dataclass(frozen=True)
class AnnotationResponse:
    """The answer to one request.

    Attributes:
        text: the raw answer text (validated later by our parser), secrets redacted.
        model: the model that answered (as reported by the server when it says).
        latency_s: wall time from the first attempt to the answer, waits included.
        attempts: requests made (1 = no retry; 0 for sources that make none).
        tokens: {"prompt", "output", "thinking", "total"} token counts (0 when unknown).
        finish_reason: why generation stopped, when the server says.
        block_reason: why the server refused to answer, when it says.
        parsed: the answer already interpreted (sources that read stored answers), else None.
    """

    text: str
    model: str
    latency_s: float
    attempts: int
    tokens: dict[str, int]
    finish_reason: str | None = None
    block_reason: str | None = None
    parsed: ParsedAttention | None = None


class AnswerSource(Protocol):
    """Anything the annotation run can ask: an LLM :class:`Provider` or a reader of stored answers.

    Attributes:
        name: recorded in every output file as ``provider``.
        needs_image: whether requests must carry the visual prompt.
    """

    name: str
    needs_image: bool

    def generate(
        self,
        request: AnnotationRequest,
        stop: threading.Event | None = None,
        on_attempt: Callable[[int], None] | None = None,
    ) -> AnnotationResponse: ...

    def close(self) -> None: ...


def check_timeout(timeout_s: float) -> float:
    """A provider's timeout, the total deadline of each attempt in seconds; raises ValueError unless it is positive."""
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    return timeout_s


def request_image(request: AnnotationRequest) -> bytes:
    """The JPEG a request carries; a request without one is a (non-retriable) ProviderError."""
    if request.image_jpeg is None:
        raise ProviderError(f"request for {request.image_path} carries no image")
    return request.image_jpeg


class Provider(abc.ABC):
    """An LLM behind the request policy; subclasses implement :meth:`_call_once` and :meth:`secrets`.

    Args:
        model: the model asked.
        retry: the retry policy.
        limiter: the rate limiter shared by all threads.

    Attributes:
        name: the provider's name, recorded in every output file.
        model: the model asked.
        needs_image: whether requests must carry the visual prompt.
        policy: how requests are sent.
    """

    name: str = "provider"
    needs_image: bool = True

    def __init__(self, model: str, retry: RetryPolicy | None = None, limiter: RateLimiter | None = None):
        self.model = model
        self.policy = RequestPolicy(retry, limiter)

    @property
    def retry(self) -> RetryPolicy:
        return self.policy.retry

    @property
    def limiter(self) -> RateLimiter:
        return self.policy.limiter

    def secrets(self) -> tuple[str | None, ...]:
        """The strings (API keys) that must never leave the provider."""
        return ()

    @property
    def redactor(self) -> Redactor:
        return Redactor(self.secrets())

    @abc.abstractmethod
    def _call_once(self, request: AnnotationRequest) -> ModelReply:
        """One attempt; raises :class:`~attllm_jax.attention.request_policy.ProviderError`."""

    def generate(
        self,
        request: AnnotationRequest,
        stop: threading.Event | None = None,
        on_attempt: Callable[[int], None] | None = None,
    ) -> AnnotationResponse:
        """Asks the model, retrying transient failures; every string of the answer has its secrets redacted.

        Args:
            request: what to ask.
            stop: set to give up while waiting.
            on_attempt: called with the attempt number just before each attempt (to count requests as made).

        Raises:
            ProviderError: when the attempts are used up or the failure is not transient; its
                ``attempts`` says how many were made. The message never holds an API key.
            Interrupted: if ``stop`` is set while waiting.
        """
        start = time.monotonic()
        redactor = self.redactor
        reply, attempts = self.policy.send(
            lambda: self._call_once(request),
            redactor=redactor,
            label=request.image_path,
            stop=stop,
            on_attempt=on_attempt,
        )
        return AnnotationResponse(
            text=redactor(reply.text),
            model=redactor(reply.model),
            latency_s=time.monotonic() - start,
            attempts=attempts,
            tokens=dict(reply.tokens),
            finish_reason=None if reply.finish_reason is None else redactor(reply.finish_reason),
            block_reason=None if reply.block_reason is None else redactor(reply.block_reason),
        )

    def close(self) -> None:  # noqa: B027 - optional hook: most providers hold nothing to release
        """Releases connections (also on leaving a ``with`` block)."""

    def __enter__(self) -> Provider:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
