"""Who answers an annotation request, one module each, behind :class:`~.base.AnswerSource`.

* :mod:`.base`: the request/response types, :class:`Provider` (a remote model: subclasses write one attempt,
  ``_call_once``, and say which ``secrets`` to redact; ``generate`` sends it through the request policy and redacts
  the answer) and the checks every provider shares (``check_timeout``, ``request_image``).
* :mod:`.gemini`: :class:`GeminiProvider` (google-genai SDK).
* :mod:`.openai_compatible`: :class:`OpenAIProvider` (the ``openai`` client; vLLM, Ollama, LM Studio, ...).
* :mod:`.http`: the HTTP client all of them send through (only to the configured origin: a redirect elsewhere is
  refused, so the key never leaves).
* :mod:`.files`: :class:`ExistingAnswers`, a reader of attention files already on disk (no request made).
* :mod:`.gemini_image_edit`: the image-editing model that floods dry photos (``experiments.flood``); not an
  annotation source, but sent through the same policy. The water-mask oracle is
  :class:`attllm_jax.attention.masks.MasksProvider`.

How requests are sent (retries, rate limit, redaction, and which HTTP statuses are retriable or fatal:
``ProviderError.from_status``) lives in :mod:`attllm_jax.attention.request_policy`, shared by every provider; its
public names are re-exported here for the front ends. Adding a provider means: a module here with a
:class:`Provider` subclass, and its name in ``experiments.annotate``.
"""

from attllm_jax.attention.providers.base import (
    AnnotationRequest,
    AnnotationResponse,
    AnswerSource,
    ModelReply,
    Provider,
)
from attllm_jax.attention.providers.files import ExistingAnswers
from attllm_jax.attention.providers.gemini import GEMINI_KEY_VARIABLES, GeminiProvider
from attllm_jax.attention.providers.openai_compatible import OPENAI_KEY_VARIABLE, OpenAIProvider
from attllm_jax.attention.request_policy import (
    Interrupted,
    ProviderError,
    RateLimiter,
    Redactor,
    RetryPolicy,
    parse_google_retry_delay,
    parse_retry_after,
    redact,
)

__all__ = [
    "GEMINI_KEY_VARIABLES",
    "OPENAI_KEY_VARIABLE",
    "AnnotationRequest",
    "AnnotationResponse",
    "AnswerSource",
    "ExistingAnswers",
    "GeminiProvider",
    "Interrupted",
    "ModelReply",
    "OpenAIProvider",
    "Provider",
    "ProviderError",
    "RateLimiter",
    "Redactor",
    "RetryPolicy",
    "parse_google_retry_delay",
    "parse_retry_after",
    "redact",
]
