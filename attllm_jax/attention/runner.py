"""Annotates a folder of photos, one attention file per photo, resumably and in parallel.

A run lists the images, skips those that already have a usable attention file (valid or None; with
``retry_invalid=False`` also the invalid ones), and asks the provider about the rest from a few worker
threads that share the provider's rate limiter. Each answer is parsed by our parser and written
atomically, so a run killed at any point loses at most the answers in flight, and the next run picks
up exactly the images without a file. Failed requests write no file (they are retried next run) and
are listed in the summary.

Stopping: :func:`annotate_folder` catches ``KeyboardInterrupt`` (Ctrl-C; front ends map SIGTERM to
it): no new image is started, in-flight answers are still written, the summary is written with
``"interrupted": true``. A second interrupt stops waiting for the in-flight ones.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from attllm_jax.attention import overlay, store
from attllm_jax.attention.parse import parse_answer
from attllm_jax.attention.prompts import Prompt
from attllm_jax.attention.providers.base import AnnotationRequest, AnnotationResponse, AnswerSource
from attllm_jax.attention.request_policy import Interrupted, ProviderError
from attllm_jax.files import atomic_write_bytes, atomic_write_json, list_image_files

SUMMARY_FILE = store.SUMMARY_FILE
OUTPUT_HINT = "free space there or give another --output_dir"
MAX_LISTED = 200  # failures / invalid images named in the summary

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """How to ask.

    Attributes:
        city: the city named in the prompt.
        prompt: the prompt.
        grid_size: n of grid prompts.
        max_side: the photo's longest side in the visual prompt.
        ruler_step: tick spacing of the rulers (None: 0.2 for point prompts, 1/n for grid prompts).
        grid_lines: draw grid lines across the photo.
        jpeg_quality: JPEG quality of the visual prompt.
        workers: worker threads.
        retry_invalid: re-ask images whose file holds an invalid answer.
        save_sent_dir: if set, the exact JPEG sent for each image is saved there (debugging).
        max_consecutive_failures: stop the run after this many failed requests in a row (0: never).
    """

    city: str
    prompt: Prompt
    grid_size: int = 4
    max_side: int = overlay.DEFAULT_MAX_SIDE
    ruler_step: float | None = None
    grid_lines: bool = False
    jpeg_quality: int = 90
    workers: int = 4
    retry_invalid: bool = False
    save_sent_dir: str | None = None
    max_consecutive_failures: int = 20

    def __post_init__(self):
        if self.workers < 1:
            raise ValueError(f"workers must be at least 1, got {self.workers}")
        if self.max_consecutive_failures < 0:
            raise ValueError(f"max_consecutive_failures must be >= 0, got {self.max_consecutive_failures}")
        self.prompt.render(self.city, self.grid_size)  # validates city and grid size

    @property
    def step(self) -> float:
        if self.ruler_step is not None:
            return self.ruler_step
        return 1.0 / self.grid_size if self.prompt.answer == "grid" else 0.2


def list_images(images_dir: str | os.PathLike, exclude: str | os.PathLike | None = None) -> list[str]:
    """Image files under ``images_dir`` (recursive, extensions case-insensitive), as sorted POSIX paths
    relative to it. Hidden files and folders, and the folder ``exclude`` (e.g. the output), are skipped.

    Raises:
        FileNotFoundError: if ``images_dir`` is not a folder.
    """
    root = Path(images_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"images folder not found: {images_dir}")
    return list_image_files(root, exclude)


def _check_collisions(images: list[str]) -> None:
    seen: dict[Path, str] = {}
    for image in images:
        target = store.attention_file_name(image)
        if target in seen:
            raise ValueError(f"images {seen[target]} and {image} would share the attention file {target}; rename one")
        seen[target] = image


@dataclasses.dataclass
class Summary:
    """What a run did. Counts of this run's images add up:
    ``images == skipped_done + skipped_invalid + valid + none + invalid + failed + not_started``.

    ``requests`` counts every request as it is made (retries included), so a run interrupted while waiting
    to retry still counts the requests it made; ``retries`` counts those beyond the first of each image.
    ``dropped_entries`` and ``clamped_values`` add up the parser's counts over the answers recorded."""

    images: int = 0
    skipped_done: int = 0
    skipped_invalid: int = 0
    to_ask: int = 0
    valid: int = 0
    none: int = 0
    invalid: int = 0
    failed: int = 0
    not_started: int = 0
    requests: int = 0
    retries: int = 0
    dropped_entries: int = 0
    clamped_values: int = 0
    tokens: dict[str, int] = dataclasses.field(
        default_factory=lambda: {"prompt": 0, "output": 0, "thinking": 0, "total": 0}
    )
    wall_time_s: float = 0.0
    interrupted: bool = False
    aborted: str | None = None
    failures: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    invalid_images: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def done(self) -> int:
        return self.valid + self.none + self.invalid + self.failed

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["rate_per_s"] = round(self.done / self.wall_time_s, 4) if self.wall_time_s > 0 else 0.0
        data["wall_time_s"] = round(self.wall_time_s, 3)
        return data


class _Run:
    """The state shared by the worker threads of one run."""

    def __init__(self, images_dir: Path, output_dir: Path, provider: AnswerSource, config: RunConfig, summary: Summary):
        self.images_dir = images_dir
        self.output_dir = output_dir
        self.provider = provider
        self.config = config
        self.summary = summary
        self.prompt_text = config.prompt.render(config.city, config.grid_size)
        self.schema = config.prompt.response_schema(config.grid_size)
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.consecutive_failures = 0

    def request(self, image: str) -> AnnotationRequest:
        jpeg = None
        if self.provider.needs_image:
            photo = overlay.load_photo(self.images_dir / image, root=self.images_dir)
            framed = overlay.draw_axis_overlay(photo, self.config.max_side, self.config.step, self.config.grid_lines)
            jpeg = overlay.encode_jpeg(framed.image, self.config.jpeg_quality)
            if self.config.save_sent_dir:
                atomic_write_bytes(Path(self.config.save_sent_dir) / Path(image).with_suffix(".sent.jpg"), jpeg)
        return AnnotationRequest(image, jpeg, self.prompt_text, self.schema)

    def count_attempt(self, attempt: int) -> None:
        """Counts one request as it is made (``attempt`` 1 is the first for its image)."""
        with self.lock:
            self.summary.requests += 1
            self.summary.retries += attempt > 1

    def record_answer(self, image: str, response: AnnotationResponse) -> None:
        parsed = response.parsed
        if parsed is None:
            parsed = parse_answer(response.text, max_points=store.STORE_MAX_POINTS)
        if not response.text.strip() and response.parsed is None:
            reasons = [f"blocked: {response.block_reason}"] if response.block_reason else []
            reasons += [f"finish reason {response.finish_reason}"] if response.finish_reason else []
            if reasons:
                parsed = dataclasses.replace(parsed, error=f"empty answer ({'; '.join(reasons)})")
        record = store.make_record(
            image_path=image,
            model=response.model,
            raw_text=response.text,
            parsed=parsed,
            provider=self.provider.name,
            prompt_id=self.config.prompt.id,
            prompt_version=self.config.prompt.version,
            city=self.config.city,
            latency_s=response.latency_s,
            attempts=response.attempts,
            tokens=response.tokens,
            finish_reason=response.finish_reason,
            block_reason=response.block_reason,
        )
        atomic_write_json(self.output_dir / store.attention_file_name(image), record)
        status = record["status"]
        with self.lock:
            s = self.summary
            setattr(s, status, getattr(s, status) + 1)
            s.dropped_entries += parsed.num_dropped
            s.clamped_values += parsed.num_clamped
            for key in s.tokens:
                s.tokens[key] += int(response.tokens.get(key, 0))
            if status == "invalid" and len(s.invalid_images) < MAX_LISTED:
                s.invalid_images.append({"image": image, "error": parsed.error})
            self.consecutive_failures = 0

    def record_failure(self, image: str, error: Exception) -> None:
        attempts = getattr(error, "attempts", 0)
        with self.lock:
            s = self.summary
            s.failed += 1
            if len(s.failures) < MAX_LISTED:
                s.failures.append({"image": image, "error": str(error), "attempts": attempts})
            self.consecutive_failures += 1
            limit = self.config.max_consecutive_failures
            if isinstance(error, ProviderError) and error.fatal:
                self.abort(f"fatal provider error: {error}")
            elif limit and self.consecutive_failures >= limit:
                self.abort(f"{limit} requests failed in a row; last error: {error}")
        log.warning("failed %s: %s", image, error)

    def abort(self, reason: str) -> None:
        if self.summary.aborted is None:
            self.summary.aborted = reason
            log.error("stopping the run: %s", reason)
        self.stop.set()

    def work(self, todo: queue.Queue, on_done: Callable[[str, str | None], None]) -> None:
        """Asks about images from ``todo`` until it is empty or the run stops; ``on_done(image, error)`` after each
        image whose outcome is recorded (``error`` None when its attention file was written)."""
        while not self.stop.is_set():
            try:
                image = todo.get_nowait()
            except queue.Empty:
                return
            error = None
            try:
                request = self.request(image)
                response = self.provider.generate(request, self.stop, self.count_attempt)
            except Interrupted:
                return  # counted as not started
            except (ProviderError, ValueError, OSError) as e:
                self.record_failure(image, e)
                error = str(e)
            except Exception as e:  # noqa: BLE001 - one bad image must not kill the run
                self.record_failure(image, ProviderError(f"{type(e).__name__}: {e}"))
                error = f"{type(e).__name__}: {e}"
            else:
                try:
                    self.record_answer(image, response)
                except OSError as e:  # the output folder cannot take the file: a full disk, a read-only folder
                    self.abort(f"cannot write {e.filename or self.output_dir} ({e.strerror or e}): {OUTPUT_HINT}")
                    error = f"cannot write its attention file: {e.strerror or e}"
            on_done(image, error)


def _plan(images: list[str], output_dir: Path, retry_invalid: bool, summary: Summary) -> list[str]:
    todo = []
    for image in images:
        path = output_dir / store.attention_file_name(image)
        if not path.is_file():
            todo.append(image)
            continue
        try:
            status = store.file_status(path)
        except OSError:
            status = "invalid"
        if status in ("valid", "none"):
            summary.skipped_done += 1
        elif retry_invalid:
            todo.append(image)
        else:
            summary.skipped_invalid += 1
    return todo


def annotate_folder(
    images_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    provider: AnswerSource,
    config: RunConfig,
    progress: Callable[[Summary, float, bool], None] | None = None,
    images: list[str] | None = None,
    on_image: Callable[[str, str | None], None] | None = None,
    stop: threading.Event | None = None,
) -> Summary:
    """Asks ``provider`` about every image of ``images_dir`` that has no usable attention file yet.

    Args:
        images_dir: the photos (searched recursively).
        output_dir: where the attention files and ``annotate_summary.json`` go (created).
        provider: who answers (an LLM provider, whose rate limiter the workers share, or a reader of stored
            answers).
        config: prompt, city, overlay and run settings.
        progress: called as ``progress(summary, elapsed_s, final)`` once before the first request, after each
            image, and once at the end (``final=True``).
        images: the images to consider, relative to ``images_dir`` (default: all of them).
        on_image: called from a worker thread as ``on_image(image, error)`` when an asked image's outcome is
            recorded: ``error`` is None when its attention file was written, else why not (the image is then
            asked again by the next run). Lets a consumer (localize) use each answer as soon as it is stored.
        stop: set by another thread to stop the run as an interrupt does (no new image is started, the answers
            in flight are written); the caller of a run in a background thread, which receives no Ctrl-C.

    Returns:
        The :class:`Summary`, also written to ``output_dir/annotate_summary.json``.

    Raises:
        FileNotFoundError: if ``images_dir`` is not a folder.
        ValueError: if two images would share an attention file.
    """
    start = time.monotonic()
    images_dir, output_dir = Path(images_dir), Path(output_dir)
    summary, todo_list = _prepare(images_dir, output_dir, config, images)
    if progress is not None:
        progress(summary, time.monotonic() - start, False)
    run = _Run(images_dir, output_dir, provider, config, summary)
    if stop is not None:
        run.stop = stop
    _ask_in_threads(run, todo_list, progress, on_image, start)
    if stop is not None and stop.is_set() and summary.aborted is None:
        summary.interrupted = True
    with run.lock:
        summary.not_started = summary.images - summary.skipped_done - summary.skipped_invalid - summary.done
        summary.wall_time_s = time.monotonic() - start
        if progress is not None:
            progress(summary, summary.wall_time_s, True)
        atomic_write_json(output_dir / SUMMARY_FILE, summary.to_dict())
    return summary


def _prepare(
    images_dir: Path, output_dir: Path, config: RunConfig, images: list[str] | None
) -> tuple[Summary, list[str]]:
    """Lists the images (or checks the given ones), creates the output folder, removes a killed run's temporary
    files and plans which images to ask about. Returns the summary so far and the images to ask about."""
    if images is None:
        images = list_images(images_dir, exclude=output_dir)
    _check_collisions(images)
    output_dir.mkdir(parents=True, exist_ok=True)
    for stale in output_dir.rglob(".*.json.*.tmp"):  # left by a killed run's unfinished atomic write
        stale.unlink(missing_ok=True)
    summary = Summary(images=len(images))
    todo_list = _plan(images, output_dir, config.retry_invalid, summary)
    summary.to_ask = len(todo_list)
    log.info(
        "%d images: %d already annotated, %d invalid kept, %d to ask",
        len(images),
        summary.skipped_done,
        summary.skipped_invalid,
        len(todo_list),
    )
    return summary, todo_list


def _ask_in_threads(
    run: _Run,
    todo_list: list[str],
    progress: Callable[[Summary, float, bool], None] | None,
    on_image: Callable[[str, str | None], None] | None,
    start: float,
) -> None:
    """Asks about every image of ``todo_list`` from ``config.workers`` threads; returns when they are done, or at
    once on a second interrupt (the first stops new requests and waits for the ones in flight). ``on_image`` as
    :func:`annotate_folder` says."""
    todo: queue.Queue = queue.Queue()
    for image in todo_list:
        todo.put(image)

    def on_done(image: str, error: str | None) -> None:
        if on_image is not None:
            on_image(image, error)
        if progress is not None:
            with run.lock:
                progress(run.summary, time.monotonic() - start, False)

    # Thread.join is not used to wait: a KeyboardInterrupt landing inside it can mark a live thread as
    # finished (CPython 3.11, bpo-45274), and the answers in flight would be dropped. Events are safe.
    workers = min(run.config.workers, max(len(todo_list), 1))
    remaining = [workers]
    all_done = threading.Event()

    def work() -> None:
        try:
            run.work(todo, on_done)
        finally:
            with run.lock:
                remaining[0] -= 1
                if remaining[0] == 0:
                    all_done.set()

    for i in range(workers):
        threading.Thread(target=work, name=f"annotate-{i}", daemon=True).start()
    _wait(run, all_done)


def _wait(run: _Run, all_done: threading.Event) -> None:
    """Waits for the workers; the first KeyboardInterrupt stops new requests, a second stops waiting."""
    interrupts = 0
    while True:
        try:
            if all_done.wait(timeout=0.2):
                return
        except KeyboardInterrupt:
            interrupts += 1
            run.summary.interrupted = True
            run.stop.set()
            if interrupts == 1:
                log.warning("interrupted: finishing the requests in flight (interrupt again to stop at once)")
            else:
                log.warning("interrupted again: not waiting for the requests in flight")
                return


def summarize_counts(summary: Summary) -> str:
    """One line for the log."""
    counts = collections.OrderedDict(
        images=summary.images,
        skipped=summary.skipped_done + summary.skipped_invalid,
        valid=summary.valid,
        none=summary.none,
        invalid=summary.invalid,
        failed=summary.failed,
        not_started=summary.not_started,
        requests=summary.requests,
        tokens=summary.tokens["total"],
    )
    text = " ".join(f"{k}={v}" for k, v in counts.items()) + f" wall={summary.wall_time_s:.1f}s"
    if summary.interrupted:
        text += " (interrupted)"
    if summary.aborted:
        text += f" (aborted: {summary.aborted})"
    return text
