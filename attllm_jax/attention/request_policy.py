"""How every request to a remote model is sent: retries, a shared rate limit, server delays, key redaction.

Nothing here knows what is sent or what comes back: a provider (a text answer, an edited image, ...) gives
:meth:`RequestPolicy.send` one attempt as a function that raises :class:`ProviderError`, and gets back that
function's result and the number of attempts it took.

Retries: 408/429/500/502/503/504 (:meth:`ProviderError.from_status`; 401/403/404 are fatal: the run stops), timeouts and
dropped connections are retried with exponential backoff and jitter, waiting at least as long as the server asks
(RetryInfo ``retryDelay`` in a Google error body, or a ``Retry-After`` header: see :func:`parse_google_retry_delay`,
:func:`parse_retry_after`). Every attempt, retries included, first takes a slot from the :class:`RateLimiter` shared by
all worker threads, and is reported to the caller's ``on_attempt`` as it is made, so an interrupted run still counts it.

API keys come from the environment and are never printed, logged or written: every error message that leaves
:meth:`RequestPolicy.send` has been passed through the provider's :class:`Redactor` whole, and only then clipped to
:data:`MAX_ERROR_CHARS` (clipping first could leave part of a key), and providers pass their successful answers through
it as well (a server may echo the key inside an answer). The redactor hides any fragment of a key of
:data:`MIN_SECRET_FRAGMENT` characters or more, not only the whole key.
"""

from __future__ import annotations

import dataclasses
import email.utils
import os
import random
import re
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

RETRY_STATUS_CODES = frozenset({408, 429, 500, 502, 503, 504})
FATAL_STATUS_CODES = frozenset({401, 403, 404})
REDACTED = "[REDACTED]"
MIN_SECRET_FRAGMENT = 8  # any run of this many characters of a key is hidden (shorter keys: only whole)
MAX_ERROR_CHARS = 500  # error messages are clipped to this length, after redaction

T = TypeVar("T")


class Redactor:
    """Replaces every secret, its URL-encoded form, and any fragment of them of :data:`MIN_SECRET_FRAGMENT`
    characters or more (a key cut by someone else's truncation, a key split over two lines) by ``[REDACTED]``.

    Args:
        secrets: The strings to hide; empty and None entries are ignored.
    """

    def __init__(self, secrets: Iterable[str | None] = ()):
        forms = set()
        for secret in secrets:
            if secret:
                forms.add(secret)
                forms.add(urllib.parse.quote(secret, safe=""))
        self._forms = sorted(forms, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        """``text`` with every secret, and every long fragment of one, replaced."""
        spans = sorted(span for form in self._forms for span in _fragment_spans(text, form))
        if not spans:
            return text
        pieces, end = [], 0
        for start, stop in spans:
            if start > end:
                pieces.extend((text[end:start], REDACTED))
            elif not pieces:
                pieces.append(REDACTED)
            end = max(end, stop)
        pieces.append(text[end:])
        return "".join(pieces)

    def json(self, value: Any) -> Any:
        """A copy of a JSON-like value (dicts, lists, strings, numbers) with every string, keys included, redacted."""
        if not self._forms:
            return value
        if isinstance(value, str):
            return self(value)
        if isinstance(value, dict):
            return {self(k) if isinstance(k, str) else k: self.json(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(self.json(v) for v in value)
        return value


def _fragment_spans(text: str, secret: str) -> list[tuple[int, int]]:
    """``[start, stop)`` of every maximal run of ``text`` that is a substring of ``secret`` and at least
    ``min(MIN_SECRET_FRAGMENT, len(secret))`` characters long.

    Every such run begins with one of the secret's n-grams (n = that length), so the runs are found from the
    n-grams' occurrences (``str.find``) and extended to the right while they stay inside the secret.
    """
    n = min(MIN_SECRET_FRAGMENT, len(secret))
    starts = set()
    for k in range(len(secret) - n + 1):
        i = text.find(secret[k : k + n])
        while i >= 0:
            starts.add(i)
            i = text.find(secret[k : k + n], i + 1)
    spans, covered = [], -1
    for start in sorted(starts):
        stop = start + n
        if start < covered:  # inside a run found: look only for one that reaches past it
            if covered >= len(text) or text[start : covered + 1] not in secret:
                continue
            stop = covered + 1
        while stop < len(text) and text[start : stop + 1] in secret:
            stop += 1
        spans.append((start, stop))
        covered = stop
    return spans


def clip(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """``text`` cut to ``limit`` characters, with an ellipsis when cut. Redact first: see the module docstring."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def redact(text: str, secrets: Iterable[str | None]) -> str:
    """``text`` with every secret (and its URL-encoded form) replaced by ``[REDACTED]``."""
    return Redactor(secrets)(text)


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

    @classmethod
    def from_status(
        cls, message: str, status: int, retry_after: float | None = None, fatal: bool = False
    ) -> ProviderError:
        """An HTTP error answer: retriable for 408/429/5xx, fatal for 401/403/404 (or when ``fatal``)."""
        return cls(
            message,
            retriable=status in RETRY_STATUS_CODES,
            fatal=fatal or status in FATAL_STATUS_CODES,
            status=status,
            retry_after=retry_after,
        )


class Interrupted(Exception):
    """The run was asked to stop while this request was waiting.

    Attributes:
        attempts: attempts made before the stop (0 when it came while waiting for the first slot).
    """

    def __init__(self, message: str, attempts: int = 0):
        super().__init__(message)
        self.attempts = attempts


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter that honours the server's retry delay.

    The wait before attempt ``k + 1`` (``k`` >= 1 attempts made) is
    ``max(server_delay, min(max_delay_s, initial_delay_s * multiplier ** (k - 1)))`` times a random
    factor in ``[1, 1 + jitter]``, capped at ``max_server_delay_s``.

    Raises:
        ValueError: for fewer than one attempt, negative delays or jitter, or a multiplier below 1.
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
        """Seconds to wait after ``attempts_made`` failed attempts."""
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
        if wait > 0 and _wait(stop, wait):
            raise Interrupted("stopped while waiting for a rate-limiter slot")
        return max(wait, 0.0)


def _wait(stop: threading.Event | None, seconds: float) -> bool:
    """Sleeps ``seconds``; True if ``stop`` was set meanwhile."""
    if stop is None:
        time.sleep(seconds)
        return False
    return stop.wait(seconds)


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


def server_delay(*values: float | None) -> float | None:
    """The longest of the delays a server asked for (by several means), or None when it asked none."""
    present = [v for v in values if v is not None]
    return max(present) if present else None


def api_key_from_env(variables: Iterable[str]) -> str | None:
    """The first non-empty environment variable of ``variables``, or None."""
    for variable in variables:
        value = os.environ.get(variable)
        if value:
            return value
    return None


class RequestPolicy:
    """Sends one logical request as attempts: rate limit, retries, backoff, redaction of errors.

    Args:
        retry: The retry policy (default :class:`RetryPolicy`).
        limiter: The rate limiter shared by all threads (default: none).
    """

    def __init__(self, retry: RetryPolicy | None = None, limiter: RateLimiter | None = None):
        self.retry = retry or RetryPolicy()
        self.limiter = limiter or RateLimiter(0)
        self._rng = random.Random()
        self._rng_lock = threading.Lock()

    def send(
        self,
        attempt: Callable[[], T],
        *,
        redactor: Redactor,
        label: str,
        stop: threading.Event | None = None,
        on_attempt: Callable[[int], None] | None = None,
    ) -> tuple[T, int]:
        """Calls ``attempt`` until it succeeds, fails for good, or the attempts are used up.

        Args:
            attempt: One try; raises :class:`ProviderError` (any other exception is wrapped in one).
            redactor: Applied to every error message that leaves this method.
            label: What is being sent, for messages (e.g. the image path).
            stop: Set to give up while waiting (for a slot or before a retry).
            on_attempt: Called with the attempt number (1, 2, ...) just before each attempt is made.

        Returns:
            ``(result, attempts)``.

        Raises:
            ProviderError: when the failure is not transient or the attempts are used up; its ``attempts``
                says how many were made. Its message holds no secret.
            Interrupted: if ``stop`` is set while waiting; its ``attempts`` says how many were made.
        """
        attempts = 0
        while True:
            try:
                self.limiter.acquire(stop)
            except Interrupted:
                raise Interrupted(f"stopped while waiting to send {label}", attempts) from None
            attempts += 1
            if on_attempt is not None:
                on_attempt(attempts)
            try:
                return attempt(), attempts
            except ProviderError as e:
                error = e
            except Exception as e:  # noqa: BLE001 - client-library internals: wrap, never leak the key
                error = ProviderError(f"{type(e).__name__}: {e}")
            error = ProviderError(
                clip(redactor(str(error))),
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
            if _wait(stop, delay):
                raise Interrupted(f"stopped while waiting to retry {label}", attempts)
