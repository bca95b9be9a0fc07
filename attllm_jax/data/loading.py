"""Host-side image decoding and preprocessing in a thread pool, grouped into fixed-shape batches.

Why threads (and not grain or processes): PIL's decode and resize release the GIL, so a thread pool keeps
several cores busy without pickling images between processes, and the device computes while the pool decodes the
next images (a sliding window of submitted futures is the prefetch buffer). Images whose preprocessed shapes differ
(CosPlace keeps the aspect ratio) are grouped by shape into fixed-size batches; a partial batch is padded, so each
shape compiles once.

Memory is bounded by pixels, not by images: a batch of one shape holds at most ``max_batch_pixels`` pixels (fewer
rows for larger shapes, at least one row per device), and an image whose preprocessed size alone exceeds what one
batch may hold (a 20000 x 200 panorama resized to a 512-pixel shorter side is 51200 x 512) is skipped and counted
as a failure, like an unreadable file, instead of being padded to a full batch. Given the model's ``output_size``,
that size is predicted from the file's header and the image is refused before it is decoded or resized, so such
an image never allocates more than the budget.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image

from attllm_jax.data.images import ImageTooLargeError, open_image

Preprocess = Callable[[Image.Image], np.ndarray]
OutputSize = Callable[[int, int], tuple[int, int]]

DEFAULT_PIXELS_PER_ROW = 1 << 20  # the default batch budget is batch_size megapixels


def batch_pixel_budget(batch_size: int, max_batch_pixels: int | None = None) -> int:
    """The pixel budget of one batch: ``max_batch_pixels``, or ``batch_size`` megapixels when it is None."""
    budget = int(batch_size) * DEFAULT_PIXELS_PER_ROW if max_batch_pixels is None else int(max_batch_pixels)
    if budget < 1:
        raise ValueError(f"max_batch_pixels must be >= 1, got {max_batch_pixels}")
    return budget


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


def read_image(
    path: str | os.PathLike,
    preprocess: Preprocess,
    max_pixels: int | None = None,
    output_size: OutputSize | None = None,
    root: str | os.PathLike | None = None,
) -> np.ndarray:
    """Decodes one image (through :func:`~attllm_jax.data.images.open_image`) and applies ``preprocess``.

    The entry point for anything that turns an image file into model input (evaluation, localize, serve). With
    ``output_size``, an image whose preprocessed size exceeds ``max_pixels`` is refused from its header, before
    anything is decoded or resized (a 20 x 100000 PNG would otherwise become a 512 x 2,560,000 float image);
    without it, only after preprocessing. Either way the stored image may not exceed
    :data:`~attllm_jax.data.images.MAX_SOURCE_PIXELS`.

    Args:
        path: The image file.
        preprocess: PIL image -> ``[H, W, 3]`` float32 array (e.g. ``VPRModel.preprocess``).
        max_pixels: Largest ``H * W`` accepted after preprocessing (None = no limit).
        output_size: ``(width, height)`` of the source -> ``(width, height)`` after ``preprocess``
            (e.g. ``VPRModel.output_size``).
        root: The folder the image was listed from: a path that resolves outside it (a symlink) is refused.

    Returns:
        ``[H, W, 3]`` float32.

    Raises:
        ImageTooLargeError: when the preprocessed image has more than ``max_pixels`` pixels (or the stored image
            more than ``MAX_SOURCE_PIXELS``).
        OSError: an unreadable file.
    """

    def check_size(width: int, height: int) -> None:
        if max_pixels is not None and output_size is not None:
            out_width, out_height = output_size(width, height)
            check_pixels((out_height, out_width), max_pixels, (width, height))

    image = open_image(path, check_size=check_size, root=root)
    array = np.asarray(preprocess(image), dtype=np.float32)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"preprocess returned shape {array.shape}, expected [H, W, 3]")
    if max_pixels is not None:
        check_pixels(array.shape, max_pixels, image.size)
    return array


MAX_INPUT_PIXELS = 1 << 24  # one model input of at most ~16.8 Mpx: 192 MiB as float32 [H, W, 3]


def read_model_input(
    path: str | os.PathLike,
    model,
    image_size: int | tuple[int, int] | None = None,
    max_pixels: int = MAX_INPUT_PIXELS,
    root: str | os.PathLike | None = None,
) -> np.ndarray:
    """One image file as a model's input, the way the evaluation reads it (for localize and serve).

    Args:
        path: The image file.
        model: A :class:`~attllm_jax.models.vpr.VPRModel` (``preprocess`` and ``output_size``).
        image_size: Optional resize override (int: shorter side; ``(height, width)``: exact).
        max_pixels: Most pixels of the preprocessed image; a larger one is refused from the file's header.
        root: When given, the file (symlinks resolved) must lie inside this folder.

    Returns:
        ``[H, W, 3]`` float32, upright, normalized.

    Raises:
        ValueError: a refused image (too large, not a regular file, outside ``root``, unsupported pixel mode), its
            message naming the file. OSError: an unreadable one.
    """
    return read_image(
        path,
        lambda image: model.preprocess(image, image_size=image_size),
        max_pixels,
        lambda width, height: model.output_size(width, height, image_size),
        root,
    )


def check_pixels(shape: tuple[int, ...], max_pixels: int, source_size: tuple[int, int] | None = None) -> None:
    """Raises :class:`ImageTooLargeError` when an ``[H, W, ...]`` image has more than ``max_pixels`` pixels."""
    pixels = int(shape[0]) * int(shape[1])
    if pixels > max_pixels:
        source = f" from {source_size[0]}x{source_size[1]}" if source_size else ""
        raise ImageTooLargeError(
            f"preprocessed to {shape[1]}x{shape[0]} pixels{source} ({pixels:,} pixels), more than one batch may "
            f"hold ({max_pixels:,}; raise --max_batch_pixels or crop the image)"
        )


def default_num_workers() -> int:
    """Decode threads: the number of cores, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))


def decode_stream(
    items: Iterable[tuple[int, str]],
    preprocess: Preprocess,
    num_workers: int | None = None,
    prefetch: int | None = None,
    max_pixels: int | None = None,
    output_size: OutputSize | None = None,
    root: str | os.PathLike | None = None,
) -> Iterator[tuple[int, np.ndarray | LoadFailure]]:
    """Decodes images in a thread pool, in input order, keeping ``prefetch`` images in flight.

    Args:
        items: ``(index, path)`` pairs.
        preprocess: PIL image -> ``[H, W, 3]`` float32.
        num_workers: Decode threads (default: cores, at most 8).
        prefetch: Images submitted ahead of the consumer (default: 4 per worker).
        max_pixels: Images with more preprocessed pixels become failures at once (their array is not kept).
        output_size: Predicts the preprocessed size from the header, so that such images are refused before
            decoding (see :func:`read_image`).
        root: The folder the items were listed from; files resolving outside it are failures.

    Yields:
        ``(index, image)`` or ``(index, LoadFailure)``; a bad image never raises.
    """
    num_workers = num_workers or default_num_workers()
    prefetch = max(1, prefetch or 4 * num_workers)

    def load(index: int, path: str) -> np.ndarray | LoadFailure:
        try:
            return read_image(path, preprocess, max_pixels, output_size, root)
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
    max_batch_pixels: int | None = None,
    row_multiple: int = 1,
) -> Iterator[Batch]:
    """Groups decoded images by shape into fixed-size batches, padding partial ones.

    Args:
        stream: ``(index, image | LoadFailure)`` pairs, e.g. from :func:`decode_stream`.
        batch_size: Most rows per batch (a multiple of ``row_multiple``).
        on_failure: Called with each failure (the image is skipped), including images too large for one batch.
        group_of: Optional item index -> group key; when it changes, every partial batch is flushed, so a group
            (a store chunk) completes without waiting for later images.
        max_batch_pixels: Pixel budget of a batch (None = no bound): a shape of ``H x W`` gets
            ``min(batch_size, max_batch_pixels // (H W))`` rows, rounded down to a multiple of ``row_multiple``;
            an image for which that is below ``row_multiple`` is a failure.
        row_multiple: Rows must be a multiple of this (the number of devices the batch is sharded over).

    Yields:
        Batches of a single image shape, each with the same number of rows for the same shape.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if row_multiple < 1 or batch_size % row_multiple:
        raise ValueError(f"batch_size {batch_size} must be a positive multiple of row_multiple {row_multiple}")
    buckets: dict[tuple[int, ...], list[tuple[int, np.ndarray]]] = {}
    rows_of: dict[tuple[int, ...], int] = {}
    current_group = object()
    for index, item in stream:
        if group_of is not None:
            group = group_of(index)
            if group != current_group:
                yield from _flush(buckets, rows_of)
                current_group = group
        if not isinstance(item, LoadFailure) and max_batch_pixels is not None:
            try:
                check_pixels(item.shape, max_batch_pixels // row_multiple)
            except ImageTooLargeError as error:
                item = LoadFailure(index, f"<item {index}>", f"{type(error).__name__}: {error}")
        if isinstance(item, LoadFailure):
            on_failure(item)
            continue
        if item.shape not in rows_of:
            rows_of[item.shape] = _rows_for(item.shape, batch_size, max_batch_pixels, row_multiple)
        bucket = buckets.setdefault(item.shape, [])
        bucket.append((index, item))
        if len(bucket) == rows_of[item.shape]:
            yield _stack(buckets.pop(item.shape), rows_of[item.shape])
    yield from _flush(buckets, rows_of)


def load_batches(
    items: Iterable[tuple[int, str]],
    preprocess: Preprocess,
    batch_size: int,
    on_failure: Callable[[LoadFailure], None],
    *,
    group_of: Callable[[int], object] | None = None,
    num_workers: int | None = None,
    max_batch_pixels: int | None = None,
    row_multiple: int = 1,
    output_size: OutputSize | None = None,
    root: str | os.PathLike | None = None,
) -> Iterator[Batch]:
    """Decodes ``(index, path)`` items in threads and groups them into pixel-bounded, shape-uniform batches.

    :func:`decode_stream` followed by :func:`shape_batches` with one pixel budget: images too large for a batch are
    reported (with their path) as soon as they are decoded, and not kept in the prefetch window.

    Args:
        items: ``(index, path)`` pairs.
        preprocess: PIL image -> ``[H, W, 3]`` float32.
        batch_size: Most rows per batch (a multiple of ``row_multiple``).
        on_failure: Called with each unreadable or too large image.
        group_of: See :func:`shape_batches`.
        num_workers: Decode threads.
        max_batch_pixels: Pixel budget of a batch; None = ``batch_size`` megapixels (:func:`batch_pixel_budget`).
        row_multiple: Rows must be a multiple of this (the device count).
        output_size: Source ``(width, height)`` -> preprocessed ``(width, height)``: images too large for a batch
            are then refused from their header, before decoding.
        root: The folder the items were listed from; files resolving outside it (symlinks) are failures.

    Yields:
        :class:`Batch` es.
    """
    budget = batch_pixel_budget(batch_size, max_batch_pixels)
    stream = decode_stream(
        items, preprocess, num_workers, max_pixels=budget // row_multiple, output_size=output_size, root=root
    )
    yield from shape_batches(stream, batch_size, on_failure, group_of, budget, row_multiple)


def _rows_for(shape: tuple[int, ...], batch_size: int, max_batch_pixels: int | None, row_multiple: int) -> int:
    if max_batch_pixels is None:
        return batch_size
    fit = max_batch_pixels // (int(shape[0]) * int(shape[1]))
    return max(row_multiple, min(batch_size, fit // row_multiple * row_multiple))


def _flush(buckets: dict, rows_of: dict) -> Iterator[Batch]:
    for shape in list(buckets):
        yield _stack(buckets.pop(shape), rows_of[shape])


def _stack(rows: list[tuple[int, np.ndarray]], batch_size: int) -> Batch:
    shape = rows[0][1].shape
    images = np.zeros((batch_size, *shape), dtype=np.float32)
    indices = np.full((batch_size,), -1, dtype=np.int64)
    for row, (index, image) in enumerate(rows):
        images[row] = image
        indices[row] = index
    return Batch(images=images, indices=indices)
