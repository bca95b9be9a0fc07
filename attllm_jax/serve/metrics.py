"""The service's Prometheus metrics, in a registry of their own (``GET /metrics`` serves it in the text format).

Names (all prefixed ``attllm_serve_``):

* ``requests_total{path, status}``: answered requests by route and HTTP status.
* ``request_seconds{path}``: wall time of each request, from its first byte read to its answer.
* ``stage_seconds{stage}``: per-request time of each stage of ``/v1/localize``: ``receive`` (reading and parsing
  the multipart form), ``decode`` (decode and preprocess, in the decode threads), ``attention`` (reading the
  uploaded answer or asking the provider), ``queue`` (waiting for a batch), ``extract`` (the batch's forward pass),
  ``search`` and ``result`` (the per-photo estimate), ``handoff`` (from the batch's end until the request's
  coroutine runs again on the event loop).
* ``batch_size``: photos per forward pass (real rows; a batch is padded up to its size bucket).
* ``batch_rows``: rows per forward pass after padding (the compiled bucket sizes).
* ``queue_depth``: photos waiting for a batch now.
* ``attention_total{kind}``: answers by the attention they carry (points, grid, none, invalid, missing,
  unavailable).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

PREFIX = "attllm_serve"
STAGES = ("receive", "decode", "attention", "queue", "extract", "search", "result", "handoff")
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServiceMetrics:
    """The metrics of one service instance (a fresh registry, so two apps in one process never collide)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(f"{PREFIX}_requests", "Answered requests.", ["path", "status"], registry=r)
        self.request_seconds = Histogram(
            f"{PREFIX}_request_seconds", "Request wall time, seconds.", ["path"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.stage_seconds = Histogram(
            f"{PREFIX}_stage_seconds",
            "Per-request stage time, seconds.",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            f"{PREFIX}_batch_size", "Photos per forward pass.", buckets=_BATCH_BUCKETS, registry=r
        )
        self.batch_rows = Histogram(
            f"{PREFIX}_batch_rows",
            "Rows per forward pass, padded.",
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(f"{PREFIX}_queue_depth", "Photos waiting for a batch.", registry=r)
        self.attention = Counter(f"{PREFIX}_attention", "Answers by attention kind.", ["kind"], registry=r)

    def observe_request(self, path: str, status: int, seconds: float) -> None:
        """Counts one answered request."""
        self.requests.labels(path=path, status=str(status)).inc()
        self.request_seconds.labels(path=path).observe(seconds)

    def observe_stages(self, seconds: dict[str, float]) -> None:
        """Records one request's stage times (``{stage: seconds}``, stages of :data:`STAGES`)."""
        for stage, value in seconds.items():
            if stage in STAGES:
                self.stage_seconds.labels(stage=stage).observe(value)

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
