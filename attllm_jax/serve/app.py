"""The FastAPI application of ``attllm-serve``: routes, the request middleware, error answers, the lifespan.

Routes (all JSON but ``/metrics``):

* ``POST /v1/localize`` (multipart: ``image``, optional ``attention``, ``alpha``, ``top_k``): localize's per-photo
  result for the upload (:mod:`attllm_jax.serve.service`), with ``timings_ms``, ``model`` and ``request_id``.
* ``GET /v1/health``: ``{"status": "ready" | "loading" | "failed"}`` (200 when ready, else 503).
* ``GET /v1/info``: model, precision, database size and store key, calibration, limits, version.
* ``GET /metrics``: Prometheus text (:mod:`attllm_jax.serve.metrics`).

The bearer token, when configured, guards ``/v1/localize`` and ``/v1/info``; health and metrics stay open for the
orchestrator and the scraper (keep them off the public side of the reverse proxy).

The middleware gives every request an id (``X-Request-ID`` in the answer), refuses a body over the upload limit
(413: from ``Content-Length`` before reading, else while reading), and writes one JSON log line per request
(``attllm_jax.serve.access``: id, method, path, status, milliseconds, stage timings, error code).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
import time
import uuid
from contextlib import asynccontextmanager
from importlib import metadata
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from attllm_jax.logs import LogFileHandler
from attllm_jax.serve.errors import BodyTooLargeError, ServiceError, field_error
from attllm_jax.serve.metrics import STAGES
from attllm_jax.serve.service import Fields, Service, start_loading

access_log = logging.getLogger("attllm_jax.serve.access")
ROUTES = ("/v1/localize", "/v1/health", "/v1/info", "/metrics", "/docs", "/openapi.json")
_FORM_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {
                        "image": {"type": "string", "format": "binary", "description": "The photo (JPEG, PNG)."},
                        "attention": {
                            "type": "string",
                            "description": "An attention file as annotate writes it, a bare point list, or 'auto'.",
                        },
                        "alpha": {"type": "number", "minimum": 0, "maximum": 1},
                        "top_k": {"type": "integer", "minimum": 1},
                    },
                }
            }
        },
    }
}


def create_app(service: Service, on_load_failure=None, load: bool = True) -> FastAPI:
    """The application of ``service``; its lifespan loads the engine in the background and drains it at shutdown.

    Args:
        service: The service state.
        on_load_failure: Called with the error line if loading fails (the front end stops the server).
        load: Start loading at startup (False: the caller loads ``service`` itself).
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if load:
            start_loading(service, on_load_failure)
        yield
        service.close()

    app = FastAPI(title="attllm-serve", version=_version(), lifespan=lifespan)
    app.state.service = service

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, error: ServiceError) -> JSONResponse:
        request.state.error_code = error.code
        return JSONResponse(error.body(request.state.request_id), error.status, headers=error.headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> JSONResponse:
        logging.getLogger("attllm_jax.serve").error("request failed: %s: %s", type(error).__name__, error)
        body = {"error": {"code": "internal_error", "message": f"{type(error).__name__}"}}
        return JSONResponse({**body, "request_id": request.state.request_id}, 500)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "bad_request")
        answer = ServiceError(error.status_code, code, str(error.detail), dict(error.headers or {}))
        return await service_error(request, answer)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return await service_error(request, field_error(f"bad request: {error.errors()}"))

    @app.post("/v1/localize", openapi_extra=_FORM_SCHEMA)
    async def localize(request: Request) -> JSONResponse:
        service.authorize(request.headers.get("authorization"))
        service.ready_engine()
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        with service.arriving_request() as queued:
            async with request.form(max_files=2, max_fields=8) as form:
                fields = await read_fields(form, service)
            timings["receive"] = time.perf_counter() - t0
            answer = await service.localize(fields, timings, queued)
        timings["total"] = time.perf_counter() - t0
        service.metrics.observe_stages(timings)
        request.state.timings = timings
        answer["timings_ms"] = {k: round(v * 1000, 3) for k, v in timings.items()}
        answer["request_id"] = request.state.request_id
        return JSONResponse(answer)

    @app.get("/v1/health")
    async def health() -> JSONResponse:
        body: dict[str, Any] = {"status": service.status}
        if service.load_error:
            body["error"] = service.load_error
        return JSONResponse(body, 200 if service.status == "ready" else 503)

    @app.get("/v1/info")
    async def info(request: Request) -> JSONResponse:
        service.authorize(request.headers.get("authorization"))
        return JSONResponse(service_info(service))

    @app.get("/metrics")
    async def metrics() -> Response:
        body, content_type = service.metrics.render()
        return Response(body, media_type=content_type)

    app.add_middleware(RequestMiddleware, service=service)
    return app


async def read_fields(form, service: Service) -> Fields:
    """The checked fields of a ``/v1/localize`` form.

    Raises:
        ServiceError: 422 naming a missing or malformed field.
    """
    image = form.get("image")
    if not isinstance(image, UploadFile):
        raise field_error("the form has no file field 'image' (send the photo as multipart field 'image')")
    name = image.filename or "image"
    attention = form.get("attention")
    attention_name = "attention field"
    if isinstance(attention, UploadFile):
        attention_name = f"attention upload {attention.filename or ''}".strip()
        attention = await attention.read()
    settings = service.settings
    alpha = _number(form.get("alpha"), "alpha", float, settings.default_alpha)
    if not 0.0 <= alpha <= 1.0:
        raise field_error(f"alpha must lie in [0, 1], got {alpha}")
    top_k = _number(form.get("top_k"), "top_k", int, settings.localize.top_k)
    if not 1 <= top_k <= settings.max_top_k:
        raise field_error(f"top_k must lie in [1, {settings.max_top_k}], got {top_k}")
    return Fields(name, await image.read(), attention, attention_name, alpha, top_k)


def _number(value, name: str, kind: type, default):
    if value is None or (isinstance(value, str) and not value.strip()):
        return default
    if not isinstance(value, str):
        raise field_error(f"{name} must be a form field, not a file")
    try:
        number = kind(value)
    except ValueError:
        raise field_error(f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}") from None
    if kind is float and number != number:
        raise field_error(f"{name} must be a number, got {value!r}")
    return number


def service_info(service: Service) -> dict[str, Any]:
    """``GET /v1/info``: what answers and with what settings."""
    s = service.settings
    body: dict[str, Any] = {"status": service.status, "version": _version(), "started": _iso(service.started)}
    limits = {
        "max_batch": s.max_batch,
        "max_wait_ms": s.max_wait_ms,
        "max_queue": s.max_queue,
        "max_upload_mb": s.max_upload_mb,
        "max_top_k": s.max_top_k,
    }
    body["limits"] = limits
    body["attention_provider"] = s.provider.provider
    engine = service.engine
    if engine is not None:
        ctx = engine.ctx
        body.update(
            model=engine.label,
            model_spec=ctx.model.spec.to_dict(),
            precision=ctx.model.precision,
            database_images=len(ctx.database),
            database_searchable=engine.database_size,
            settings_key=ctx.key,
            store=str(ctx.config.resolved_store_dir),
            calibration=s.localize.calibration,
            estimator=s.localize.estimator,
            default_alpha=s.default_alpha,
            buckets=list(service.batcher.buckets),
        )
    return body


class RequestMiddleware:
    """ASGI middleware: request id, upload limit, one JSON log line and the request metrics per request."""

    def __init__(self, app: FastAPI, service: Service):
        self.app = app
        self.service = service

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex[:16]
        state = scope.setdefault("state", {})
        state.update(request_id=request_id, timings={}, error_code=None)
        start, status = time.perf_counter(), [500]
        limit = self.service.settings.max_upload_bytes

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        received = 0

        async def counted_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise BodyTooLargeError(limit)
            return message

        try:
            length = dict(scope["headers"]).get(b"content-length")
            if length is not None and length.isdigit() and int(length) > limit:
                error = BodyTooLargeError(limit)
                state["error_code"] = error.code
                await JSONResponse(error.body(request_id), error.status)(scope, receive, send_with_id)
            else:
                await self.app(scope, counted_receive, send_with_id)
        finally:
            self._record(scope, request_id, status[0], time.perf_counter() - start)

    def _record(self, scope, request_id: str, status: int, seconds: float) -> None:
        path = scope["path"] if scope["path"] in ROUTES else "other"
        self.service.metrics.observe_request(path, status, seconds)
        state = scope.get("state", {})
        line = {
            "time": _iso(time.time()),
            "request_id": request_id,
            "method": scope["method"],
            "path": scope["path"],
            "status": status,
            "ms": round(seconds * 1000, 3),
        }
        if state.get("timings"):
            line["timings_ms"] = {k: round(v * 1000, 3) for k, v in state["timings"].items() if k in (*STAGES, "total")}
        if state.get("error_code"):
            line["error"] = state["error_code"]
        access_log.info(json.dumps(line))


def configure_access_log(log_file: str | os.PathLike | None = None) -> None:
    """Writes the per-request JSON lines bare (no time or level prefix) to stderr and ``log_file``."""
    access_log.propagate = False
    for handler in list(access_log.handlers):
        access_log.removeHandler(handler)
        handler.close()
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        handlers.append(LogFileHandler(log_file, mode="a", encoding="utf-8"))
    for handler in handlers:
        handler.setFormatter(logging.Formatter("%(message)s"))
        access_log.addHandler(handler)
    access_log.setLevel(logging.INFO)


def _iso(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).isoformat(timespec="milliseconds")


def _version() -> str:
    try:
        return metadata.version("attllm-jax")
    except metadata.PackageNotFoundError:
        return "0+unknown"
