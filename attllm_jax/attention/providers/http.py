"""The HTTP client every provider sends through: one origin only, a total deadline per request, a size cap.

:func:`guarded_client` builds the ``httpx.Client`` that the google-genai SDK, the ``openai`` client and the Gemini
image editor are given. Its transport refuses any request to an origin (scheme, host, port) other than the
configured one, before a byte is sent: a redirect to another host is an error, never followed, because the
clients would carry the API key there (httpx drops ``Authorization`` on such a redirect, but not Gemini's
``x-goog-api-key``). Redirects within the configured origin are followed.

The timeout is a total deadline for each HTTP request, from the first byte sent to the last byte of the answer
read: httpx's own timeouts bound each network operation, so a server that drips its answer a byte at a time
never trips them. Every connect, read and write here waits at most for what is left of the deadline, and fails
with ``httpx.ReadTimeout`` (or ``ConnectTimeout``/``WriteTimeout``) once it is spent.

An answer larger than the client's cap (:data:`MAX_ANSWER_BYTES` for annotation answers,
:data:`MAX_IMAGE_ANSWER_BYTES` for edited images) is refused: a ``Content-Length`` over it before the body is
read, a body without one as soon as it passes the cap. Either is a :class:`ProviderError` naming the size and
the cap, never retried (the run records it as a failed image). Answers are asked for uncompressed
(``Accept-Encoding: identity``), so that the cap bounds the memory they take; a compressed answer is refused.

A proxy set in the environment (``HTTPS_PROXY``, ``NO_PROXY``, ...) is used as the clients would use it.
"""

from __future__ import annotations

import threading
import time
import urllib.request
from typing import Any

import httpcore
import httpx

from attllm_jax.attention.request_policy import ProviderError

MAX_ANSWER_BYTES = 1 << 20  # 1 MiB: an annotation answer is a few KB of JSON
MAX_IMAGE_ANSWER_BYTES = 64 << 20  # 64 MiB: an edited photo, base64 in JSON


def origin(url: str | httpx.URL) -> tuple[str, str, int | None]:
    """``(scheme, host, port)`` of a URL, the port made explicit for http and https."""
    url = httpx.URL(url)
    port = url.port or {"http": 80, "https": 443}.get(url.scheme)
    return url.scheme, url.host, port


def _origin_text(parts: tuple[str, str, int | None]) -> str:
    scheme, host, port = parts
    return f"{scheme}://{host}" + (f":{port}" if port is not None else "")


class _Deadline(threading.local):
    """When the HTTP request the current thread is making must be done (``time.monotonic()``), or None."""

    at: float | None = None


_DEADLINE = _Deadline()


def _left(timeout: float | None, error: type[Exception]) -> float | None:
    """The per-operation ``timeout`` shortened to what is left of this thread's deadline; raises ``error`` when
    nothing is left."""
    if _DEADLINE.at is None:
        return timeout
    left = _DEADLINE.at - time.monotonic()
    if left <= 0:
        raise error("the request's total deadline has passed")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    """A connection whose every read and write waits at most for what is left of the deadline."""

    def __init__(self, stream: httpcore.NetworkStream):
        self._stream = stream

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, _left(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, _left(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(self, ssl_context: Any, server_hostname: str | None = None, timeout: float | None = None):
        tls = self._stream.start_tls(ssl_context, server_hostname, _left(timeout, httpcore.ConnectTimeout))
        return _DeadlineStream(tls)

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class _DeadlineBackend(httpcore.NetworkBackend):
    """Opens :class:`_DeadlineStream` connections (the connect itself bounded by the deadline too)."""

    def __init__(self, backend: httpcore.NetworkBackend):
        self._backend = backend

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, **kwargs: Any) -> _DeadlineStream:
        return _DeadlineStream(self._backend.connect_tcp(host, port, _left(timeout, httpcore.ConnectTimeout), **kwargs))

    def connect_unix_socket(self, path: str, timeout: float | None = None, **kwargs: Any) -> _DeadlineStream:
        stream = self._backend.connect_unix_socket(path, _left(timeout, httpcore.ConnectTimeout), **kwargs)
        return _DeadlineStream(stream)

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


def _deadline_transport(proxy: str | None) -> httpx.HTTPTransport:
    """httpx's transport, its connections opened through :class:`_DeadlineBackend`."""
    transport = httpx.HTTPTransport(proxy=proxy)
    pool = transport._pool  # noqa: SLF001 - httpx exposes no other way to give its pool a network backend
    pool._network_backend = _DeadlineBackend(pool._network_backend)  # noqa: SLF001
    return transport


def environment_proxy(url: str) -> str | None:
    """The proxy the environment sets for ``url`` (``HTTPS_PROXY``/``HTTP_PROXY``, unless ``NO_PROXY`` exempts
    its host), or None."""
    parsed = httpx.URL(url)
    if urllib.request.proxy_bypass(parsed.host):
        return None
    return urllib.request.getproxies().get(parsed.scheme)


class GuardedTransport(httpx.BaseTransport):
    """Sends only to one origin (see the module docstring).

    Args:
        base_url: the configured address; its origin is the only one requests may go to.
        total_timeout_s: the deadline of each HTTP request, seconds (None: none).
        max_response_bytes: the largest answer body accepted.
    """

    def __init__(self, base_url: str, total_timeout_s: float | None, max_response_bytes: int = MAX_ANSWER_BYTES):
        self.origin = origin(base_url)
        self.total_timeout_s = total_timeout_s
        self.max_response_bytes = max_response_bytes
        self._inner = _deadline_transport(environment_proxy(base_url))

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        """Sends ``request``; raises a fatal :class:`ProviderError` (nothing sent) if it goes to another origin, and
        a :class:`ProviderError` for an answer over the size cap (see the module docstring)."""
        target = origin(request.url)
        if target != self.origin:
            raise ProviderError(
                f"the server at {_origin_text(self.origin)} redirected to {_origin_text(target)}: refused (the API "
                "key is only sent to the configured address; give the final address as --base_url)",
                fatal=True,
            )
        # The deadline holds until the next request of this thread: the answer's body is read after this returns.
        _DEADLINE.at = None if self.total_timeout_s is None else time.monotonic() + self.total_timeout_s
        request.headers["Accept-Encoding"] = "identity"
        response = self._inner.handle_request(request)
        try:
            self._check_head(response)
        except ProviderError:
            response.close()
            raise
        stream = _CappedStream(response.stream, self.max_response_bytes, self._too_large)
        return httpx.Response(
            response.status_code, headers=response.headers, stream=stream, extensions=response.extensions
        )

    def _too_large(self, size: str) -> ProviderError:
        return ProviderError(
            f"the answer from {_origin_text(self.origin)} is {size} bytes, over the cap of {self.max_response_bytes} "
            "bytes: refused (the caps are in attllm_jax.attention.providers.http)"
        )

    def _check_head(self, response: httpx.Response) -> None:
        encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise ProviderError(f"the answer is compressed ({encoding}) although it was asked uncompressed: refused")
        length = response.headers.get("Content-Length", "")
        if length.strip().isdigit() and int(length) > self.max_response_bytes:
            raise self._too_large(length.strip())

    def close(self) -> None:
        self._inner.close()


class _CappedStream(httpx.SyncByteStream):
    """An answer body that raises ``too_large("more than N")`` as soon as it passes ``cap`` bytes."""

    def __init__(self, stream: Any, cap: int, too_large: Any):
        self._stream, self._cap, self._too_large = stream, cap, too_large

    def __iter__(self):
        total = 0
        for chunk in self._stream:
            total += len(chunk)
            if total > self._cap:
                raise self._too_large(f"more than {self._cap}")
            yield chunk

    def close(self) -> None:
        self._stream.close()


def guarded_client(base_url: str, timeout_s: float, max_response_bytes: int = MAX_ANSWER_BYTES) -> httpx.Client:
    """An ``httpx.Client`` that sends only to the origin of ``base_url``, following redirects within it, each
    HTTP request bounded by a total deadline of ``timeout_s``, each answer by ``max_response_bytes``.

    Args:
        base_url: the API root the provider is configured with.
        timeout_s: the total deadline of each request, seconds (also httpx's per-operation timeout).
        max_response_bytes: the largest answer body accepted.
    """
    # trust_env=False: the environment's proxy is already in the transport; httpx would otherwise mount its own
    # proxy transports, which would bypass the origin check.
    return httpx.Client(
        transport=GuardedTransport(base_url, timeout_s, max_response_bytes),
        timeout=timeout_s,
        follow_redirects=True,
        trust_env=False,
    )
