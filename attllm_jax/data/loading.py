"""Host-side image decoding and preprocessing in a thread pool, grouped into fixed-shape batches.

Why threads (and not grain or processes): PIL's decode and resize release the GIL, so a thread pool keeps
several cores busy without pickling images between processes, and the device computes while the pool decodes the
next images (a sliding window of submitted futures is the prefetch buffer). Images whose preprocessed shapes differ
(CosPlace keeps the aspect ratio) are grouped by shape into fixed-size batches; a partial batch is padded, so each
shape compiles once.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image

Preprocess = Callable[[Image.Image], np.ndarray]


@dataclass(frozen=True)
class LoadFailure:
    """An image that could not be read or preprocessed (skipped, listed and counted by the caller)."""

    index: int
    path: str
    error: str


@dataclass(frozen=True)
class Batch:
    """A fixed-size batch of preprocessed images of one shape.

    Attributes:
        images: ``[B, H, W, 3]`` float32; rows past ``num_valid`` are zero padding.
        indices: ``[B]`` int64 item indices; -1 marks padding.
    """

    images: np.ndarray
    indices: np.ndarray

    @property
    def num_valid(self) -> int:
        return int(np.count_nonzero(self.indices >= 0))


def read_image(path: str | os.PathLike, preprocess: Preprocess) -> np.ndarray:
    """Decodes one image as RGB and applies ``preprocess``.

    Args:
        path: The image file.
        preprocess: PIL image -> ``[H, W, 3]`` float32 array (e.g. ``VPRModel.preprocess``).

    Returns:
        ``[H, W, 3]`` float32.
    """
    with Image.open(path) as image:
        image = image.convert("RGB")
    array = np.asarray(preprocess(image), dtype=np.float32)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"preprocess returned shape {array.shape}, expected [H, W, 3]")
    return array


def default_num_workers() -> int:
    """Decode threads: the number of cores, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))


def decode_stream(
    items: Iterable[tuple[int, str]],
    preprocess: Preprocess,
    num_workers: int | None = None,
    prefetch: int | None = None,
) -> Iterator[tuple[int, np.ndarray | LoadFailure]]:
    """Decodes images in a thread pool, in input order, keeping ``prefetch`` images in flight.

    Args:
        items: ``(index, path)`` pairs.
        preprocess: PIL image -> ``[H, W, 3]`` float32.
        num_workers: Decode threads (default: cores, at most 8).
        prefetch: Images submitted ahead of the consumer (default: 4 per worker).

    Yields:
        ``(index, image)`` or ``(index, LoadFailure)``; a bad image never raises.
    """
    num_workers = num_workers or default_num_workers()
    prefetch = max(1, prefetch or 4 * num_workers)

    def load(index: int, path: str) -> np.ndarray | LoadFailure:
        try:
            return read_image(path, preprocess)
        except Exception as error:  # noqa: BLE001 -- any decoder error must skip the image, never abort a run
            return LoadFailure(index, str(path), f"{type(error).__name__}: {error}")

    iterator = iter(items)
    with ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="attllm-decode") as pool:
        window: deque = deque()
        for index, path in iterator:
            window.append((index, pool.submit(load, index, path)))
            if len(window) >= prefetch:
                break
        while window:
            index, future = window.popleft()
            for next_index, next_path in iterator:
                window.append((next_index, pool.submit(load, next_index, next_path)))
                break
            yield index, future.result()


def shape_batches(
    stream: Iterable[tuple[int, np.ndarray | LoadFailure]],
    batch_size: int,
    on_failure: Callable[[LoadFailure], None],
    group_of: Callable[[int], object] | None = None,
) -> Iterator[Batch]:
    """Groups decoded images by shape into fixed-size batches, padding partial ones.

    Args:
        stream: ``(index, image | LoadFailure)`` pairs, e.g. from :func:`decode_stream`.
        batch_size: Rows per batch.
        on_failure: Called with each failure (the image is skipped).
        group_of: Optional item index -> group key; when it changes, every partial batch is flushed, so a group
            (a store chunk) completes without waiting for later images.

    Yields:
        Batches of ``batch_size`` rows, each of a single image shape.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    buckets: dict[tuple[int, ...], list[tuple[int, np.ndarray]]] = {}
    current_group = object()
    for index, item in stream:
        if group_of is not None:
            group = group_of(index)
            if group != current_group:
                yield from _flush(buckets, batch_size)
                current_group = group
        if isinstance(item, LoadFailure):
            on_failure(item)
            continue
        bucket = buckets.setdefault(item.shape, [])
        bucket.append((index, item))
        if len(bucket) == batch_size:
            yield _stack(buckets.pop(item.shape), batch_size)
    yield from _flush(buckets, batch_size)


def _flush(buckets: dict, batch_size: int) -> Iterator[Batch]:
    for shape in list(buckets):
        yield _stack(buckets.pop(shape), batch_size)


def _stack(rows: list[tuple[int, np.ndarray]], batch_size: int) -> Batch:
    shape = rows[0][1].shape
    images = np.zeros((batch_size, *shape), dtype=np.float32)
    indices = np.full((batch_size,), -1, dtype=np.int64)
    for row, (index, image) in enumerate(rows):
        images[row] = image
        indices[row] = index
    return Batch(images=images, indices=indices)
