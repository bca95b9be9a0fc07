"""Dynamic batching: concurrent requests grouped into one forward pass of one compiled shape per size bucket.

Requests wait in one bounded queue. A single worker thread (the only one that runs the model) takes the oldest
request, waits until ``max_batch`` requests are queued or ``max_wait_s`` has passed since that request arrived,
then takes up to ``max_batch`` of them; it stops waiting early when no other request is being received or decoded
(nothing could join, so a lone request is not delayed). They are grouped by what must be equal within a forward pass
(the preprocessed image shape and the blend factor, the :func:`group_key` of a job), and each group is padded with
zero rows up to the smallest size bucket that holds it (powers of two up to ``max_batch``, each a multiple of the
device count: :func:`bucket_sizes`), so load raises throughput without compiling a new shape: the model sees at
most ``len(buckets)`` batch shapes per image shape. Padding rows cost as much as real ones, so once the time of a
forward pass of each bucket is known (:meth:`DynamicBatcher.record_seconds`, measured at warm-up and then followed
as batches run) a group may run only part of its photos now (:func:`photos_to_run`: all of them done soonest): on
a CPU, 9 photos run as 8 then 1 rather than as 16 rows, while an accelerator, whose 16 rows cost barely more than
8, still pads. A full queue refuses new requests at once (:class:`QueueFullError`, answered 503 with Retry-After)
rather than letting latency grow without bound.
"""

from __future__ import annotations

import collections
import functools
import logging
import math
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("attllm_jax.serve")


class QueueFullError(RuntimeError):
    """The batching queue holds ``max_queue`` requests already."""


class ShuttingDownError(RuntimeError):
    """The batcher is stopping and takes no new request."""


def bucket_sizes(max_batch: int, multiple: int = 1) -> tuple[int, ...]:
    """The padded batch sizes: powers of two below ``max_batch``, then ``max_batch``, each rounded up to ``multiple``.

    ``bucket_sizes(12) == (1, 2, 4, 8, 12)``; ``bucket_sizes(16, 8) == (8, 16)``.
    """
    if max_batch < 1 or multiple < 1:
        raise ValueError(f"max_batch and multiple must be >= 1, got {max_batch}, {multiple}")
    sizes, size = [], 1
    while size < max_batch:
        sizes.append(size)
        size *= 2
    sizes.append(max_batch)
    return tuple(sorted({-(-s // multiple) * multiple for s in sizes}))


def bucket_for(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket holding ``n`` rows (``n`` is at most the largest bucket)."""
    return next(b for b in buckets if b >= n)


def photos_to_run(n: int, buckets: Sequence[int], seconds: dict[int, float]) -> int:
    """How many of ``n`` waiting photos of one group to run now, so that all ``n`` are done soonest.

    The time to clear ``m`` photos is ``T(m) = min(s[bucket_for(m)], min_{b < m} s[b] + T(m - b))`` over the timed
    buckets ``b``: run them all in one padded pass, or a full smaller bucket first and the rest after (photos that
    arrive meanwhile only join those later passes).

    Args:
        n: Photos of one group (at most the largest bucket).
        buckets: The padded sizes (:func:`bucket_sizes`).
        seconds: Seconds of one batch per bucket (buckets not timed yet are never chosen).

    Returns:
        ``n`` (one pass padded to :func:`bucket_for` ``n``; also while that bucket's time is unknown), or the
        full smaller bucket to run first.
    """
    if bucket_for(n, buckets) not in seconds:
        return n

    @functools.cache
    def clear(m: int) -> float:
        if m == 0:
            return 0.0
        whole = seconds.get(bucket_for(m, buckets), math.inf)
        return min([whole] + [seconds[b] + clear(m - b) for b in buckets if b < m and b in seconds])

    best, best_seconds = n, seconds[bucket_for(n, buckets)]
    for rows in sorted(buckets, reverse=True):  # ties: the larger first pass
        if rows < n and rows in seconds and seconds[rows] + clear(n - rows) < best_seconds:
            best, best_seconds = rows, seconds[rows] + clear(n - rows)
    return best


@dataclass
class Job:
    """One queued request.

    Attributes:
        payload: What the batch function needs of the request.
        key: Jobs with equal keys may share a forward pass.
        future: Set to the batch function's result for this job (or its exception).
        enqueued: ``time.perf_counter()`` at submission.
        started: ``time.perf_counter()`` when its batch began.
        finished: ``time.perf_counter()`` when its batch ended (its future is set just after).
    """

    payload: Any
    key: Hashable
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.perf_counter)
    started: float = 0.0
    finished: float = 0.0


# run(payloads, rows) -> one result (or exception instance) per payload; rows >= len(payloads) is the padded size
BatchFunction = Callable[[list[Any], int], list[Any]]


class DynamicBatcher:
    """Groups submitted jobs into padded batches run by one worker thread.

    Args:
        run: The batch function (runs in the worker thread only).
        max_batch: Most jobs per forward pass.
        max_wait_s: Longest a job waits for others to join its batch.
        max_queue: Most jobs waiting; more are refused.
        multiple: Rows must be a multiple of this (the device count).
        on_batch: Called with ``(jobs, rows)`` after each forward pass (metrics).
        on_depth: Called with the queue depth whenever it changes (metrics).
        arriving: Returns how many requests are on their way to :meth:`submit` (being decoded); while none are,
            a batch does not wait for more (a lone request is not delayed by ``max_wait_s``). Default: always wait.
    """

    def __init__(
        self,
        run: BatchFunction,
        *,
        max_batch: int,
        max_wait_s: float,
        max_queue: int,
        multiple: int = 1,
        on_batch: Callable[[list[Job], int], None] | None = None,
        on_depth: Callable[[int], None] | None = None,
        arriving: Callable[[], int] | None = None,
    ):
        if max_queue < 1 or max_wait_s < 0:
            raise ValueError(f"max_queue must be >= 1 and max_wait_s >= 0, got {max_queue}, {max_wait_s}")
        self.run = run
        self.max_batch = int(max_batch)
        self.max_wait_s = float(max_wait_s)
        self.max_queue = int(max_queue)
        self.buckets = bucket_sizes(self.max_batch, multiple)
        self.on_batch = on_batch or (lambda jobs, rows: None)
        self.on_depth = on_depth or (lambda depth: None)
        self.arriving = arriving or (lambda: self.max_batch)
        self._pending: collections.deque[Job] = collections.deque()
        self._seconds: dict[Hashable, dict[int, float]] = {}  # group key -> rows -> seconds of a batch
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="attllm-batcher", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        """Jobs waiting now."""
        return len(self._pending)

    def submit(self, payload: Any, key: Hashable) -> Job:
        """Queues one job; its ``future`` completes when its batch has run.

        Raises:
            QueueFullError: when ``max_queue`` jobs wait already.
            ShuttingDownError: after :meth:`close`.
        """
        job = Job(payload, key)
        with self._cond:
            if self._stopping:
                raise ShuttingDownError("the service is shutting down")
            if len(self._pending) >= self.max_queue:
                raise QueueFullError(f"{len(self._pending)} photos are waiting already (--max_queue {self.max_queue})")
            self._pending.append(job)
            self.on_depth(len(self._pending))
            self._cond.notify()
        return job

    def wake(self) -> None:
        """Re-checks :attr:`arriving` now (a request stopped arriving without submitting)."""
        with self._cond:
            self._cond.notify()

    def record_seconds(self, key: Hashable, rows: int, seconds: float) -> None:
        """Records how long a batch of ``rows`` rows of group ``key`` takes (forward pass, search and results; the
        warm-up's timed passes).

        Later batches of a recorded size update it (an exponential average, so a change of the machine's load is
        followed); sizes never recorded are not timed from live batches, whose first run may include a compile.
        """
        times = self._seconds.setdefault(key, {})
        times[rows] = seconds if rows not in times else 0.8 * times[rows] + 0.2 * seconds

    def seconds(self, key: Hashable) -> dict[int, float]:
        """The recorded seconds of a batch of group ``key`` per rows (a copy)."""
        return dict(self._seconds.get(key, {}))

    def close(self, timeout_s: float | None = None) -> None:
        """Stops taking jobs, runs those queued, and joins the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout_s)

    def _take(self) -> list[Job] | None:
        """Waits for the next batch's jobs (None when stopping with nothing queued)."""
        with self._cond:
            while not self._pending and not self._stopping:
                self._cond.wait()
            if not self._pending:
                return None
            deadline = self._pending[0].enqueued + self.max_wait_s
            while len(self._pending) < self.max_batch and not self._stopping and self.arriving() > 0:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                self._cond.wait(left)
            jobs = [self._pending.popleft() for _ in range(min(self.max_batch, len(self._pending)))]
            self.on_depth(len(self._pending))
            return jobs

    def _loop(self) -> None:
        while (jobs := self._take()) is not None:
            groups: dict[Hashable, list[Job]] = {}
            for job in jobs:
                groups.setdefault(job.key, []).append(job)
            leftover = []
            for key, group in groups.items():
                count = photos_to_run(len(group), self.buckets, self._seconds.get(key, {}))
                self._run_group(key, group[:count])
                leftover += group[count:]
            if leftover:  # back to the front of the queue, in order: the next batch takes them first
                with self._cond:
                    self._pending.extendleft(sorted(leftover, key=lambda job: job.enqueued, reverse=True))
                    self.on_depth(len(self._pending))

    def _run_group(self, key: Hashable, jobs: list[Job]) -> None:
        rows = bucket_for(len(jobs), self.buckets)
        started = time.perf_counter()
        for job in jobs:
            job.started = started
        try:
            results = self.run([job.payload for job in jobs], rows)
        except Exception as error:  # noqa: BLE001 -- a failing batch answers its requests, never kills the worker
            log.exception("batch of %d failed", len(jobs))
            results = [error] * len(jobs)
        finished = time.perf_counter()
        if rows in self._seconds.get(key, {}):
            self.record_seconds(key, rows, finished - started)
        self.on_batch(jobs, rows)
        for job, result in zip(jobs, results, strict=True):
            job.finished = finished
            if isinstance(result, BaseException):
                job.future.set_exception(result)
            else:
                job.future.set_result(result)
