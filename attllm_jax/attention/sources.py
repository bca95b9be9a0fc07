"""Which answer source a front end asks for, built from plain settings (annotate's flags, localize's flags).

One place builds the :class:`~attllm_jax.attention.providers.base.AnswerSource` of a name, so that annotate and
localize ask with the same request policy (retries, backoff, rate limit) and the same defaults.
"""

from __future__ import annotations

from dataclasses import dataclass

from attllm_jax.attention import masks, providers

SOURCES = ("gemini", "openai", "files", "masks")
DEFAULT_GEMINI_MODEL = "gemini-2.5-flash"


@dataclass(frozen=True)
class SourceSettings:
    """Who answers and how requests are sent.

    Attributes:
        provider: One of :data:`SOURCES`.
        model: Model name (default :data:`DEFAULT_GEMINI_MODEL` for gemini; required for openai).
        base_url: Endpoint instead of the provider's default (proxy, local server).
        api_version: Gemini REST API version.
        timeout_s: Total deadline of each request, seconds.
        qpm: Requests per minute, all workers and retries together (0: no limit).
        max_attempts / initial_backoff_s / max_backoff_s: the retry policy.
        temperature / top_p / max_output_tokens / thinking_budget / json_mode: sampling settings (None: the model's).
        masks: Water-mask folder of the ``masks`` source.
        source_dir: Attention files of the ``files`` source.
    """

    provider: str
    model: str | None = None
    base_url: str | None = None
    api_version: str = "v1beta"
    timeout_s: float = 60.0
    qpm: float = 60.0
    max_attempts: int = 5
    initial_backoff_s: float = 1.0
    max_backoff_s: float = 60.0
    temperature: float | None = None
    top_p: float | None = None
    max_output_tokens: int | None = None
    thinking_budget: int | None = None
    json_mode: bool = True
    masks: str | None = None
    source_dir: str | None = None

    @property
    def model_name(self) -> str | None:
        """The model asked (the gemini default filled in)."""
        return self.model or (DEFAULT_GEMINI_MODEL if self.provider == "gemini" else None)


def make_answer_source(settings: SourceSettings) -> providers.AnswerSource:
    """The answer source of ``settings``.

    Raises:
        ValueError: one line naming the missing or bad setting (unknown source, openai without a model, masks
            without a folder, files without a source folder, a missing API key).
    """
    name = settings.provider
    if name not in SOURCES:
        raise ValueError(f"unknown attention provider {name!r}; valid: {', '.join(SOURCES)}")
    if name in ("gemini", "openai"):
        return _llm_provider(settings)
    if name == "masks":
        if not settings.masks:
            raise ValueError("--provider masks needs --masks (the folder of water masks, e.g. O/masks/level_0.4)")
        return masks.MasksProvider(settings.masks)
    if not settings.source_dir:
        raise ValueError("--provider files needs --source_dir (the folder of attention files to read)")
    return providers.ExistingAnswers(settings.source_dir)


def _llm_provider(settings: SourceSettings) -> providers.Provider:
    retry = providers.RetryPolicy(
        max_attempts=settings.max_attempts,
        initial_delay_s=settings.initial_backoff_s,
        max_delay_s=settings.max_backoff_s,
    )
    limiter = providers.RateLimiter(settings.qpm, 60.0)
    sampling = {
        "temperature": settings.temperature,
        "top_p": settings.top_p,
        "max_output_tokens": settings.max_output_tokens,
    }
    if settings.provider == "gemini":
        return providers.GeminiProvider(
            model=settings.model_name,
            base_url=settings.base_url,
            api_version=settings.api_version,
            timeout_s=settings.timeout_s,
            thinking_budget=settings.thinking_budget,
            json_mode=settings.json_mode,
            retry=retry,
            limiter=limiter,
            **sampling,
        )
    if not settings.model:
        raise ValueError("--provider openai needs --model (the served model's name)")
    return providers.OpenAIProvider(
        model=settings.model,
        base_url=settings.base_url,
        timeout_s=settings.timeout_s,
        retry=retry,
        limiter=limiter,
        **sampling,
    )
