"""The HTTP client every provider sends through: one origin only.

:func:`guarded_client` builds the ``httpx.Client`` that the google-genai SDK, the ``openai`` client and the Gemini
image editor are given. Its transport refuses any request to an origin (scheme, host, port) other than the
configured one, before a byte is sent: a redirect to another host is an error, never followed, because the
clients would carry the API key there (httpx drops ``Authorization`` on such a redirect, but not Gemini's
``x-goog-api-key``). Redirects within the configured origin are followed. A proxy set in the environment
(``HTTPS_PROXY``, ``NO_PROXY``, ...) is used as the clients would use it.
"""

from __future__ import annotations

import urllib.request

import httpx

from attllm_jax.attention.request_policy import ProviderError


def origin(url: str | httpx.URL) -> tuple[str, str, int | None]:
    """``(scheme, host, port)`` of a URL, the port made explicit for http and https."""
    url = httpx.URL(url)
    port = url.port or {"http": 80, "https": 443}.get(url.scheme)
    return url.scheme, url.host, port


def _origin_text(parts: tuple[str, str, int | None]) -> str:
    scheme, host, port = parts
    return f"{scheme}://{host}" + (f":{port}" if port is not None else "")


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
        inner: the transport that sends (default ``httpx.HTTPTransport``).
    """

    def __init__(self, base_url: str, inner: httpx.BaseTransport | None = None):
        self.origin = origin(base_url)
        self._inner = inner or httpx.HTTPTransport(proxy=environment_proxy(base_url))

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        """Sends ``request``; raises a fatal :class:`ProviderError` (nothing sent) if it goes to another origin."""
        target = origin(request.url)
        if target != self.origin:
            raise ProviderError(
                f"the server at {_origin_text(self.origin)} redirected to {_origin_text(target)}: refused (the API "
                "key is only sent to the configured address; give the final address as --base_url)",
                fatal=True,
            )
        return self._inner.handle_request(request)

    def close(self) -> None:
        self._inner.close()


def guarded_client(base_url: str, timeout_s: float) -> httpx.Client:
    """An ``httpx.Client`` that sends only to the origin of ``base_url``, following redirects within it.

    Args:
        base_url: the API root the provider is configured with.
        timeout_s: the client's per-operation timeout (connect, each read, each write), seconds.
    """
    # trust_env=False: the environment's proxy is already in the transport; httpx would otherwise mount its own
    # proxy transports, which would bypass the origin check.
    return httpx.Client(transport=GuardedTransport(base_url), timeout=timeout_s, follow_redirects=True, trust_env=False)
