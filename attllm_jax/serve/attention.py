"""The attention of one request: an uploaded answer, or one asked from the configured LLM within a deadline.

An uploaded ``attention`` part is read like an attention file on disk (:func:`attllm_jax.attention.store.
record_from_bytes` and :func:`~attllm_jax.attention.store.parse_record`: the same limits, annotate's per-image
format or a bare point list). ``attention=auto`` asks the provider as ``attllm-annotate`` does (the photo framed
with rulers, the prompt and its schema), with one attempt bounded by the provider's own total deadline; the caller
bounds the wait again (``asyncio.wait_for``) and answers without attention when either runs out.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from PIL import Image

from attllm_jax.attention import overlay, prompts, providers
from attllm_jax.attention.parse import DEFAULT_MAX_POINTS, ParsedAttention, parse_answer
from attllm_jax.attention.providers.base import AnnotationRequest
from attllm_jax.attention.runner import RunConfig
from attllm_jax.attention.sources import SourceSettings, make_answer_source
from attllm_jax.attention.store import parse_record, record_from_bytes

PROVIDERS = ("none", "gemini", "openai")


def parse_upload(data: bytes, name: str, max_points: int = DEFAULT_MAX_POINTS) -> ParsedAttention:
    """The answer of an uploaded attention file (annotate's format or a bare point list / grid).

    Raises:
        AttentionFileError: (a ValueError) not UTF-8 JSON, too large, too deep, or a known field of the wrong type;
            the message names ``name``.
    """
    return parse_record(record_from_bytes(data, name), max_points)


def points_of(parsed: ParsedAttention | None) -> list | dict | None:
    """The answer's cleaned points (a point list, a grid dict), None without attention."""
    return parsed.to_result() if parsed is not None and parsed.has_attention else None


@dataclass(frozen=True)
class ProviderSettings:
    """Which LLM ``attention=auto`` asks.

    Attributes:
        provider: One of :data:`PROVIDERS` ("none": ``auto`` is refused).
        model: Model name (default gemini-2.5-flash for gemini; required for openai).
        base_url: Endpoint instead of the provider's default (a proxy, a local server).
        timeout_s: Total deadline of the request, seconds; past it the answer is given without attention.
        city: The city named in the prompt.
        prompt: Prompt id.
        grid_size: n of grid prompts.
        max_side: Longest side of the photo sent.
    """

    provider: str = "none"
    model: str | None = None
    base_url: str | None = None
    timeout_s: float = 10.0
    city: str = "unknown"
    prompt: str = "axis_focus"
    grid_size: int = 4
    max_side: int = overlay.DEFAULT_MAX_SIDE


def make_provider(settings: ProviderSettings) -> providers.Provider:
    """The provider of ``settings``: one attempt per request (a request is bounded by ``timeout_s`` in all).

    Raises:
        ValueError: one line naming the missing setting (the API key, openai's model or base URL).
    """
    if settings.provider not in ("gemini", "openai"):
        raise ValueError(f"unknown attention provider {settings.provider!r}; valid: {', '.join(PROVIDERS)}")
    if settings.provider == "openai" and not settings.model:
        raise ValueError("--provider openai needs --llm_model (the served model's name)")
    one_attempt = SourceSettings(
        settings.provider, settings.model, settings.base_url, timeout_s=settings.timeout_s, qpm=0, max_attempts=1
    )
    return make_answer_source(one_attempt)


class AttentionAsker:
    """Asks one provider about uploaded photos (thread-safe: the provider's client is shared).

    Args:
        provider: The LLM.
        settings: The prompt and deadline.
    """

    def __init__(self, provider: providers.Provider, settings: ProviderSettings):
        self.provider = provider
        self.settings = settings
        self.config = RunConfig(
            city=settings.city, prompt=prompts.get_prompt(settings.prompt), grid_size=settings.grid_size
        )
        self.prompt_text = self.config.prompt.render(settings.city, settings.grid_size)
        self.schema = self.config.prompt.response_schema(settings.grid_size)
        self.stop = threading.Event()

    def ask(self, image: Image.Image, name: str) -> ParsedAttention:
        """The provider's answer for one upright photo (blocking).

        Raises:
            ProviderError: the request failed or timed out (its message holds no key).
        """
        framed = overlay.draw_axis_overlay(image, self.settings.max_side, self.config.step, self.config.grid_lines)
        jpeg = overlay.encode_jpeg(framed.image, self.config.jpeg_quality)
        response = self.provider.generate(AnnotationRequest(name, jpeg, self.prompt_text, self.schema), self.stop)
        return parse_answer(response.text, DEFAULT_MAX_POINTS)

    def redact(self, text: str) -> str:
        """``text`` with the provider's secrets removed."""
        return self.provider.redactor(text)

    def close(self) -> None:
        """Stops waits in flight and releases the client."""
        self.stop.set()
        self.provider.close()
