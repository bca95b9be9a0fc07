"""A scripted fake LLM server on 127.0.0.1 for the provider and annotation tests.

It speaks the parts of two REST APIs that our providers use:

* Gemini: ``POST /v1beta/models/{model}:generateContent`` (what the google-genai SDK sends), JSON
  body with ``contents[].parts[]`` holding ``inlineData``/``inline_data`` (base64 image) and ``text``,
  and ``generationConfig``; answers ``{"candidates": [...], "usageMetadata": {...}}`` or a Google
  error body ``{"error": {"code", "message", "status", "details"}}``.
* OpenAI chat completions: ``POST .../chat/completions`` with ``messages[].content[]`` parts of type
  ``text`` and ``image_url`` (a ``data:`` URL); answers ``{"choices": [...], "usage": {...}}``.

Behaviour is scripted by a ``responder(seen) -> Reply`` function; a reply can be delayed (to exceed a
client timeout), dripped (the whole response, status line included, sent a byte at a time: each read is quick, the
answer never ends) or dropped (the connection closed without a response). Every request is recorded
with the server-side arrival time, so tests can measure retries and request rates.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from PIL import Image


@dataclasses.dataclass
class Reply:
    """What the server does with one request."""

    status: int = 200
    body: Any = None  # JSON-encoded when not None
    raw: bytes | None = None  # sent as is (overrides body)
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    delay_s: float = 0.0  # wait before answering
    drop: bool = False  # close the connection without answering
    drip_s: float = 0.0  # when > 0: send the response a byte at a time, this many seconds apart
    no_length: bool = False  # send no Content-Length: the body ends when the connection closes


@dataclasses.dataclass
class Seen:
    """One request as the server saw it."""

    time: float  # time.monotonic() at arrival (after the body was read)
    path: str
    headers: dict[str, str]  # lower-case names
    body: Any
    api: str  # "gemini" or "openai"
    prompt: str
    image_bytes: bytes | None

    @property
    def image(self) -> Image.Image | None:
        return None if self.image_bytes is None else Image.open(io.BytesIO(self.image_bytes))

    def image_id(self) -> int | None:
        """The id that :func:`id_photo` encoded in the photo's colour (read at the canvas centre)."""
        image = self.image
        if image is None:
            return None
        r, _, _ = image.convert("RGB").getpixel((image.width // 2, image.height // 2))
        return round((r - 10) / 20)


def id_photo(image_id: int, size: tuple[int, int] = (64, 48)) -> Image.Image:
    """A flat photo whose red channel encodes ``image_id`` (0..11), so the server knows which image it got."""
    if not 0 <= image_id <= 11:
        raise ValueError("image_id must be in 0..11")
    return Image.new("RGB", size, (20 * image_id + 10, 128, 64))


def _gemini_parts(body: Any) -> tuple[str, bytes | None]:
    texts, image = [], None
    for content in body.get("contents", []):
        for part in content.get("parts", []):
            inline = part.get("inlineData") or part.get("inline_data")
            if inline:  # the SDK sends URL-safe base64
                image = base64.urlsafe_b64decode(inline["data"] + "=" * (-len(inline["data"]) % 4))
            if "text" in part:
                texts.append(part["text"])
    return "\n".join(texts), image


def _openai_parts(body: Any) -> tuple[str, bytes | None]:
    texts, image = [], None
    for message in body.get("messages", []):
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
            continue
        for part in content or []:
            if part.get("type") == "text":
                texts.append(part["text"])
            elif part.get("type") == "image_url":
                url = part["image_url"]["url"]
                image = base64.b64decode(url.split(",", 1)[1])
    return "\n".join(texts), image


def text_reply(seen: Seen, text: str, model: str = "fake-model", **reply: Any) -> Reply:
    """A successful answer holding ``text`` in the API of ``seen``."""
    if seen.api == "gemini":
        body = {
            "candidates": [
                {"content": {"parts": [{"text": text}], "role": "model"}, "finishReason": "STOP", "index": 0}
            ],
            "usageMetadata": {
                "promptTokenCount": 1000,
                "candidatesTokenCount": 50,
                "thoughtsTokenCount": 7,
                "totalTokenCount": 1057,
            },
            "modelVersion": model,
        }
    else:
        body = {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 900, "completion_tokens": 40, "total_tokens": 940},
        }
    return Reply(200, body, **reply)


def blocked_reply(seen: Seen, reason: str = "SAFETY", refusal: str = "I can't help with that.") -> Reply:
    """A refusal in the API of ``seen``: Gemini's ``promptFeedback.blockReason`` without candidates, or an
    OpenAI message whose ``content`` is null and whose ``refusal`` says why."""
    if seen.api == "gemini":
        body = {
            "promptFeedback": {"blockReason": reason},
            "usageMetadata": {"promptTokenCount": 1000, "totalTokenCount": 1000},
            "modelVersion": "fake-model",
        }
    else:
        message = {"role": "assistant", "content": None, "refusal": refusal}
        body = {
            "id": "chatcmpl-2",
            "object": "chat.completion",
            "model": "fake-model",
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 900, "completion_tokens": 8, "total_tokens": 908},
        }
    return Reply(200, body)


_STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}


def error_reply(
    seen: Seen, code: int, message: str = "error", retry_delay: str | None = None, retry_after: str | None = None
) -> Reply:
    """An error in the API of ``seen``: a Google error body (with RetryInfo when ``retry_delay`` is given)
    or an OpenAI one; ``retry_after`` sets the Retry-After header."""
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    if seen.api == "gemini":
        error: dict[str, Any] = {"code": code, "message": message, "status": _STATUS_NAMES.get(code, "UNKNOWN")}
        if retry_delay is not None:
            error["details"] = [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": retry_delay}]
        return Reply(code, {"error": error}, headers=headers)
    return Reply(code, {"error": {"message": message, "type": "error", "code": code}}, headers=headers)


class LLMServer:
    """A ThreadingHTTPServer on 127.0.0.1 (a free port) answering with ``responder``.

    Use as a context manager; ``url`` is the base URL; ``seen`` the recorded requests.
    """

    def __init__(self, responder: Callable[[Seen], Reply]):
        self.responder = responder
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> LLMServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()

    def requests_for(self, image_id: int) -> list[Seen]:
        with self._lock:
            return [s for s in self.seen if s.image_id() == image_id]

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                length = int(self.headers.get("Content-Length", 0))
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw or b"{}")
                except ValueError:
                    body = None
                api = "gemini" if ":generateContent" in self.path else "openai"
                prompt, image = (_gemini_parts if api == "gemini" else _openai_parts)(body or {})
                seen = Seen(
                    time.monotonic(),
                    self.path,
                    {k.lower(): v for k, v in self.headers.items()},
                    body,
                    api,
                    prompt,
                    image,
                )
                with server._lock:
                    server.seen.append(seen)
                reply = server.responder(seen)
                if reply.delay_s and server._closing.wait(reply.delay_s):
                    return
                if reply.drop:
                    self.close_connection = True
                    try:
                        self.connection.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    return
                payload = reply.raw if reply.raw is not None else json.dumps(reply.body).encode()
                if reply.drip_s:
                    self._drip(reply, payload)
                    return
                try:
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "application/json")
                    if reply.no_length:
                        self.send_header("Connection", "close")
                        self.close_connection = True
                    else:
                        self.send_header("Content-Length", str(len(payload)))
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout, or an answer over its size cap)

            def _drip(self, reply: Reply, payload: bytes) -> None:
                """The response a byte at a time, ``reply.drip_s`` apart, until sent, the client leaves or the
                server closes."""
                head = [f"HTTP/1.1 {reply.status} OK", "Content-Type: application/json"]
                head += [f"Content-Length: {len(payload)}", *(f"{k}: {v}" for k, v in reply.headers.items())]
                data = ("\r\n".join(head) + "\r\n\r\n").encode() + payload
                self.close_connection = True
                try:
                    for i in range(len(data)):
                        self.wfile.write(data[i : i + 1])
                        if server._closing.wait(reply.drip_s):
                            return
                except OSError:
                    pass  # the client gave up (its deadline)

        return Handler
