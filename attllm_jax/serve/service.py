"""One request of ``POST /v1/localize``, from the parsed form to the JSON answer, and the state it runs on.

A request goes: fields checked (422) -> photo decoded in the decode threads (400 / 422) -> attention read from the
upload (422 when unreadable) or asked from the provider within ``timeout_s`` (on any failure: no attention,
flagged ``"unavailable"``) -> queued for the batcher (503 when full) -> the batch's forward pass, search and
per-photo result (:mod:`attllm_jax.serve.engine`) -> the answer, whose content is localize's per-photo result.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from attllm_jax.attention.parse import ParsedAttention, parse_answer
from attllm_jax.attention.store import AttentionFileError
from attllm_jax.localization.api import LocalizeSettings
from attllm_jax.serve.attention import AttentionAsker, ProviderSettings, parse_upload, points_of
from attllm_jax.serve.batcher import DynamicBatcher, QueueFullError, ShuttingDownError
from attllm_jax.serve.engine import Engine, Localized, NonFiniteError, Photo
from attllm_jax.serve.errors import ServiceError, field_error, image_error, retry_later
from attllm_jax.serve.metrics import ServiceMetrics

log = logging.getLogger("attllm_jax.serve")


@dataclass(frozen=True)
class ServeSettings:
    """The service's settings.

    Attributes:
        localize: The model, database and result settings (localize's).
        max_batch: Most photos per forward pass (1: no batching).
        max_wait_ms: Longest a photo waits for others to join its batch, milliseconds.
        max_queue: Most photos waiting for a batch; more are answered 503.
        max_upload_mb: Largest request body, MiB (413 above).
        token: Bearer token required on /v1/localize and /v1/info, or None.
        decode_threads: Threads decoding uploads.
        default_alpha: Blend factor where a request gives attention but no ``alpha``.
        max_top_k: Largest ``top_k`` a request may ask.
        provider: The LLM of ``attention=auto``.
        warmup_sizes: Photo ``(width, height)`` s whose shapes are compiled for every bucket before the service
            says ready.
        retry_after_s: The ``Retry-After`` of 503 answers, seconds.
    """

    localize: LocalizeSettings
    max_batch: int = 16
    max_wait_ms: float = 5.0
    max_queue: int = 64
    max_upload_mb: float = 20.0
    token: str | None = None
    decode_threads: int = 4
    default_alpha: float = 0.5
    max_top_k: int = 100
    provider: ProviderSettings = field(default_factory=ProviderSettings)
    warmup_sizes: tuple[tuple[int, int], ...] = ()
    retry_after_s: int = 1

    def validated(self) -> ServeSettings:
        """Checks the service's own settings (one-line ValueError naming the flag)."""
        for name in ("max_batch", "max_queue", "decode_threads", "max_top_k", "retry_after_s"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_wait_ms", "max_upload_mb"):
            value = float(getattr(self, name))
            if not (math.isfinite(value) and value >= 0 and (name == "max_wait_ms" or value > 0)):
                raise ValueError(f"--{name} must be a finite number >= 0 (> 0 for the upload limit), got {value}")
        if not (math.isfinite(self.default_alpha) and 0 <= self.default_alpha <= 1):
            raise ValueError(f"--alpha must lie in [0, 1], got {self.default_alpha}")
        if not self.provider.timeout_s > 0:
            raise ValueError(f"--attention_timeout must be > 0 seconds, got {self.provider.timeout_s}")
        return self

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)


@dataclass
class Fields:
    """A request's checked form fields."""

    name: str
    image: bytes
    attention: bytes | str | None
    attention_name: str
    alpha: float
    top_k: int
    unavailable: str | None = None  # why the provider gave no attention (attention=auto)


class Service:
    """The state of one service: settings, the engine (loaded in the background), the batcher, the pools.

    Args:
        settings: Validated settings.
        asker: The LLM asker of ``attention=auto``, or None.
    """

    def __init__(self, settings: ServeSettings, asker: AttentionAsker | None = None):
        self.settings = settings
        self.asker = asker
        self.metrics = ServiceMetrics()
        self.engine: Engine | None = None
        self.batcher: DynamicBatcher | None = None
        self.load_error: str | None = None
        self.decode_pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="attllm-decode")
        self.llm_pool = ThreadPoolExecutor(max(4, settings.max_queue // 4), thread_name_prefix="attllm-llm")
        self.started = time.time()
        self.arriving = 0  # requests being read, decoded or given attention, not yet queued (read by the batcher)
        self._arriving_lock = threading.Lock()

    @property
    def status(self) -> str:
        """ "ready", "loading" or "failed"."""
        return "ready" if self.batcher is not None else "failed" if self.load_error else "loading"

    def load(self, model=None) -> None:
        """Loads the engine, compiles the warm-up shapes and starts the batcher (run in a background thread)."""
        engine = Engine(self.settings.localize, model, self.settings.max_batch, self.settings.max_top_k)
        batcher = DynamicBatcher(
            engine.localize_batch,
            max_batch=self.settings.max_batch,
            max_wait_s=self.settings.max_wait_ms / 1000.0,
            max_queue=self.settings.max_queue,
            multiple=engine.sharding.mesh.size,
            on_batch=self._observe_batch,
            on_depth=self.metrics.queue_depth.set,
            arriving=lambda: self.arriving,
        )
        warm_up(engine, batcher, self.settings.warmup_sizes, self.settings.default_alpha)
        self.engine = engine
        self.batcher = batcher
        log.info("ready: %s, %d database images, buckets %s", engine.label, engine.database_size, batcher.buckets)

    def _observe_batch(self, jobs, rows: int) -> None:
        self.metrics.batch_size.observe(len(jobs))
        self.metrics.batch_rows.observe(rows)

    def close(self) -> None:
        """Runs the queued photos, then stops the threads."""
        if self.batcher is not None:
            self.batcher.close()
        if self.asker is not None:
            self.asker.close()
        self.decode_pool.shutdown(wait=True)
        self.llm_pool.shutdown(wait=False, cancel_futures=True)

    def authorize(self, header: str | None) -> None:
        """Raises 401 unless the token is off or ``header`` is ``Bearer <token>``."""
        token = self.settings.token
        if token is None:
            return
        given = (header or "").removeprefix("Bearer ").strip() if (header or "").startswith("Bearer ") else ""
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise ServiceError(
                401, "unauthorized", "missing or wrong bearer token", {"WWW-Authenticate": 'Bearer realm="attllm"'}
            )

    def ready_engine(self) -> Engine:
        """The engine, or 503 while it loads."""
        if self.batcher is None or self.engine is None:
            if self.load_error:
                raise ServiceError(503, "load_failed", f"the model or database failed to load: {self.load_error}")
            raise retry_later("loading", "the model and database are still loading", self.settings.retry_after_s)
        return self.engine

    @contextlib.contextmanager
    def arriving_request(self) -> Iterator[Callable[[], None]]:
        """Counts one request as on its way to the batcher, from the start of its route (before its body is read)
        until it is queued.

        A batch waits (up to ``max_wait_ms``) only while some request is on its way; counting a request from its
        route, not from after its upload was parsed, lets the batcher see the requests of a burst that are
        still being received. Yields ``queued()``, called once the job is submitted (or refused); leaving the
        block calls it too.
        """
        self._count_arriving(+1)
        done = False

        def queued() -> None:
            nonlocal done
            if not done:
                done = True
                self._count_arriving(-1)

        try:
            yield queued
        finally:
            queued()

    async def localize(
        self, fields: Fields, timings: dict[str, float], queued: Callable[[], None] = lambda: None
    ) -> dict[str, Any]:
        """Answers one checked request; fills ``timings`` (seconds per stage).

        Args:
            fields: The checked form.
            timings: Filled with ``{stage: seconds}``.
            queued: Called once the photo is queued or refused (:meth:`arriving_request`).

        Raises:
            ServiceError: for a refused photo or attention upload, a full queue, a shutdown.
        """
        engine = self.ready_engine()
        try:
            photo = await self._prepare(engine, fields, timings)
            job = self.batcher.submit(photo, photo.group_key)
        except QueueFullError as error:
            raise retry_later("queue_full", f"the service is busy: {error}", self.settings.retry_after_s) from None
        except ShuttingDownError as error:
            raise retry_later("shutting_down", str(error), self.settings.retry_after_s) from None
        finally:
            queued()
        try:
            localized: Localized = await asyncio.wrap_future(job.future)
        except NonFiniteError as error:
            raise ServiceError(500, "non_finite_descriptor", str(error)) from None
        timings["queue"] = job.started - job.enqueued
        timings.update(localized.seconds)
        timings["handoff"] = time.perf_counter() - job.finished
        return self._answer(engine, localized, photo.attention, fields.unavailable)

    async def _prepare(self, engine: Engine, fields: Fields, timings: dict[str, float]) -> Photo:
        """The decoded photo with its attention (400 / 422 for a refused upload)."""
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        try:
            decoded = await loop.run_in_executor(self.decode_pool, engine.decode, fields.name, fields.image)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
            raise image_error(fields.name, error) from None
        t1 = time.perf_counter()
        timings["decode"] = t1 - t0
        parsed, unavailable = await self._attention(fields, decoded.image)
        timings["attention"] = time.perf_counter() - t1
        fields.unavailable = unavailable
        return Photo(fields.name, fields.image, decoded.pixels, parsed, fields.alpha, fields.top_k)

    def _count_arriving(self, step: int) -> None:
        with self._arriving_lock:
            self.arriving += step
        if step < 0 and self.batcher is not None:
            self.batcher.wake()

    async def _attention(self, fields: Fields, image: Image.Image) -> tuple[ParsedAttention | None, str | None]:
        """The request's parsed answer, and why the provider gave none (``attention=auto`` only)."""
        if fields.attention is None:
            return None, None
        if isinstance(fields.attention, str) and fields.attention.strip() == "auto":
            return await self._ask(image, fields.name)
        data = fields.attention.encode() if isinstance(fields.attention, str) else fields.attention
        try:
            return parse_upload(data, fields.attention_name), None
        except AttentionFileError as error:
            raise ServiceError(422, "bad_attention", str(error)) from None

    async def _ask(self, image: Image.Image, name: str) -> tuple[ParsedAttention | None, str | None]:
        if self.asker is None:
            raise field_error("attention=auto needs a provider: start the service with --provider")
        loop = asyncio.get_running_loop()
        timeout = self.settings.provider.timeout_s
        try:
            ask = loop.run_in_executor(self.llm_pool, self.asker.ask, image, name)
            return await asyncio.wait_for(ask, timeout), None
        except TimeoutError:
            return None, f"the attention provider gave no answer within {timeout:g} s"
        except Exception as error:  # noqa: BLE001 -- any provider failure means the plain answer, never a 500
            return None, self.asker.redact(f"the attention provider failed: {type(error).__name__}: {error}")

    def _answer(self, engine: Engine, localized: Localized, parsed, unavailable: str | None) -> dict[str, Any]:
        r = localized.result
        applied = r.attention in ("points", "grid")
        attention: dict[str, Any] = {"kind": r.attention, "points": points_of(parsed) if applied else None}
        if unavailable is not None:
            attention = {"kind": "unavailable", "points": None, "error": unavailable}
        self.metrics.attention.labels(kind=attention["kind"]).inc()
        return {
            "photo": r.photo,
            "lat": r.lat,
            "lon": r.lon,
            "confidence": r.confidence,
            "confidence_kind": r.confidence_kind,
            "confidence_radius_m": r.confidence_radius_m,
            "radius_m": r.radius_m,
            "features": r.features,
            "matches": [asdict(m) for m in r.matches],
            "claimed": r.claimed,
            "claimed_distance_m": r.claimed_distance_m,
            "attention": attention,
            "alpha": localized.applied_alpha,
            "model": engine.label,
        }


def warm_up(engine: Engine, batcher: DynamicBatcher, sizes, alpha: float) -> None:
    """Compiles every bucket for photos of each ``(width, height)`` in ``sizes``, with and without attention, then
    times each (the faster of two passes, less disturbed by other work: the batcher's
    :meth:`~DynamicBatcher.record_seconds`). Other photo sizes compile when they first come."""
    point = parse_answer([{"center": [0.5, 0.5], "weight": 1.0}])
    for width, height in sizes:
        t0 = time.perf_counter()
        image = Image.fromarray(np.full((int(height), int(width), 3), 128, np.uint8))
        pixels = engine.ctx.model.preprocess(image, image_size=engine.settings.image_size)
        for rows in batcher.buckets:
            for answer in (None, point):
                photo = Photo("warmup.jpg", b"", np.asarray(pixels, np.float32), answer, alpha, 1)
                engine.localize_batch([photo] * rows, rows)  # compiles
                batcher.record_seconds(photo.group_key, rows, min(_seconds(engine, photo, rows) for _ in range(2)))
        timed = {rows: round(batcher.seconds(photo.group_key)[rows], 4) for rows in batcher.buckets}
        log.info(
            "compiled and timed %d buckets for %dx%d photos in %.1f s; seconds per batch with attention: %s",
            len(batcher.buckets), width, height, time.perf_counter() - t0, timed,
        )  # fmt: skip


def _seconds(engine: Engine, photo: Photo, rows: int) -> float:
    t0 = time.perf_counter()
    engine.localize_batch([photo] * rows, rows)
    return time.perf_counter() - t0


def start_loading(service: Service, on_failure=None) -> threading.Thread:
    """Loads the service's engine in a daemon thread; a failure is recorded (health says "failed") and reported."""

    def load() -> None:
        try:
            service.load()
        except Exception as error:  # noqa: BLE001 -- reported through health and the front end's exit status
            service.load_error = f"{type(error).__name__}: {error}"
            log.error("loading failed: %s", service.load_error)
            if on_failure is not None:
                on_failure(service.load_error)

    thread = threading.Thread(target=load, name="attllm-load", daemon=True)
    thread.start()
    return thread
