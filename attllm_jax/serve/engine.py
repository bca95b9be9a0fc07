"""The loaded model and database, and what the service does with them: decode an upload, localize a batch.

Everything that makes an answer is localize's own code, so an uploaded photo gets the same result as
``attllm-localize`` gives the same file with the same settings: the context (model, database descriptors,
positions, calibration) is :func:`attllm_jax.localization.api.open_context`; decoding is
:func:`attllm_jax.data.loading.read_image` through :func:`attllm_jax.data.images.open_image` (the pixel limits
apply before decoding); descriptors are the eval's :func:`~attllm_jax.evaluation.extract.aggregate_query_batch`
and :func:`~attllm_jax.evaluation.extract.combine_query_batch`; the search finds what
:func:`~attllm_jax.evaluation.pipeline.retrieve` finds with the run's search settings, in an index built once
(:class:`~attllm_jax.serve.index.ResidentIndex`); the per-photo result (estimate,
radius, confidence, matches) is localize's ``photo_result``. Only the batching differs: a batch is the photos the
:class:`~attllm_jax.serve.batcher.DynamicBatcher` grouped, padded to a size bucket.
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass

import jax
import numpy as np
from PIL import Image

from attllm_jax.attention.parse import ParsedAttention
from attllm_jax.data.images import ImageBytes
from attllm_jax.data.loading import MAX_INPUT_PIXELS, read_image
from attllm_jax.evaluation.extract import (
    aggregate_query_batch,
    combine_query_batch,
    data_sharding,
    model_label,
)
from attllm_jax.evaluation.strips import applied_kind
from attllm_jax.localization import api
from attllm_jax.localization.results import PhotoResult
from attllm_jax.serve.index import ResidentIndex

log = logging.getLogger("attllm_jax.serve")


@dataclass(frozen=True)
class Decoded:
    """An uploaded photo, decoded.

    Attributes:
        pixels: ``[H, W, 3]`` float32, the model's input (upright, resized, normalized).
        image: The upright 8-bit RGB photo (what the LLM is shown when attention is asked).
    """

    pixels: np.ndarray
    image: Image.Image


@dataclass(frozen=True)
class Photo:
    """One photo ready for a batch.

    Attributes:
        name: The upload's file name (the result's ``photo``).
        data: The uploaded bytes (its EXIF GPS is read from them).
        pixels: ``[H, W, 3]`` float32 model input.
        attention: The parsed answer, or None for none.
        alpha: Blend factor applied where the answer has attention.
        top_k: Matches returned.
    """

    name: str
    data: bytes
    pixels: np.ndarray
    attention: ParsedAttention | None
    alpha: float
    top_k: int

    @property
    def group_key(self) -> tuple:
        """Photos with equal keys share a forward pass: same input shape, same blend (none without attention)."""
        blend = self.alpha if self.attention is not None and self.attention.has_attention else None
        return (self.pixels.shape, blend)


@dataclass(frozen=True)
class Localized:
    """A photo's answer and the batch's stage times.

    Attributes:
        result: localize's per-photo result.
        applied_alpha: The blend factor applied (0 when no attention was applied).
        seconds: ``{"extract", "search", "result"}`` seconds of its batch (extract and search are shared by the
            batch's photos).
    """

    result: PhotoResult
    applied_alpha: float
    seconds: dict[str, float]


class NonFiniteError(RuntimeError):
    """The model gave a NaN or infinite descriptor for a photo."""


class Engine:
    """The model and database of a service, loaded once.

    Args:
        settings: localize's settings (``images`` is any existing folder: it is not read).
        model: Optional already loaded model.
        max_batch: Most photos of one batch (sizes the search's memory plan).
        max_top_k: Most matches one photo asks.

    Raises:
        ValueError: ``settings.rerank`` set: the service searches its resident index once per request and has no
            query-expansion stage (attllm-serve defines no ``--rerank``; attllm-localize has it).
    """

    def __init__(self, settings: api.LocalizeSettings, model=None, max_batch: int = 16, max_top_k: int = 100):
        if settings.rerank is not None:
            raise ValueError(f"--rerank {settings.rerank}: the service has no re-ranking stage (attllm-localize has)")
        self.ctx = api.open_context(settings, model)
        self.settings = self.ctx.settings
        self.sharding = data_sharding()
        self.ctx.model.replicate(self.sharding.mesh)
        self.label = model_label(self.ctx.model)
        ctx = self.ctx
        self.index = ResidentIndex(ctx.descriptors, ctx.valid, ctx.config.search, max_batch, max_top_k)

    @property
    def database_size(self) -> int:
        """Searchable database images (readable ones)."""
        return int(self.ctx.valid.sum())

    def decode(self, name: str, data: bytes) -> Decoded:
        """Decodes and preprocesses one upload, refusing from its header what is too large.

        Raises:
            ValueError: refused (too many pixels, unsupported pixel mode), naming the upload.
            OSError: not an image, or a truncated one (PIL's errors).
        """
        seen: list[Image.Image] = []
        model, size = self.ctx.model, self.settings.image_size

        def preprocess(image: Image.Image) -> np.ndarray:
            seen.append(image)
            return model.preprocess(image, image_size=size)

        pixels = read_image(
            ImageBytes(name, data), preprocess, MAX_INPUT_PIXELS, lambda w, h: model.output_size(w, h, size)
        )
        return Decoded(pixels, seen[0])

    def localize_batch(self, photos: list[Photo], rows: int) -> list[Localized | Exception]:
        """Localizes photos of one :attr:`Photo.group_key` in one forward pass of ``rows`` rows (zero padded).

        Returns:
            One :class:`Localized` (or a :class:`NonFiniteError`) per photo, in order.
        """
        t0 = time.perf_counter()
        model = self.ctx.model
        batch = np.zeros((rows, *photos[0].pixels.shape), np.float32)  # [rows, H, W, 3]
        for i, photo in enumerate(photos):
            batch[i] = photo.pixels
        real = np.arange(rows) < len(photos)
        answers = [p.attention for p in photos] + [None] * (rows - len(photos))
        alpha = photos[0].group_key[1]
        alphas = np.array([0.0 if alpha is None else alpha], np.float32)
        feats = model.features(jax.device_put(batch, self.sharding))
        mask, sweep, plain = aggregate_query_batch(model, feats, answers, real, alphas, self.settings.sigma, False)
        descriptors = combine_query_batch(mask, sweep, plain, 1)  # [1, rows, D]
        finite = np.isfinite(descriptors[0]).all(axis=-1)
        t1 = time.perf_counter()
        out: list[Localized | Exception] = [
            NonFiniteError(f"model {self.label} gave a NaN or infinite descriptor for {p.name}") for p in photos
        ]
        for top_k in sorted({p.top_k for p in photos}):
            rows_k = [i for i, p in enumerate(photos) if p.top_k == top_k and finite[i]]
            if rows_k:
                self._search(photos, rows_k, descriptors, mask, float(alphas[0]), top_k, out, t1 - t0)
        return out

    def _search(self, photos, rows_k, descriptors, mask, alpha, top_k, out, extract_s) -> None:
        """Searches the rows ``rows_k`` (all asking ``top_k`` matches) and fills their answers in ``out``."""
        ctx = self.ctx
        t0 = time.perf_counter()
        k = min(top_k, self.database_size)
        predictions, scores = self.index.search(descriptors[0, rows_k], k)
        t1 = time.perf_counter()
        for j, i in enumerate(rows_k):
            photo = photos[i]
            t2 = time.perf_counter()
            kind = applied_kind(photo.attention, bool(mask[i]))
            result = api.photo_result(
                ctx, photo.name, predictions[j], scores[j], kind, {}, source=io.BytesIO(photo.data)
            )
            seconds = {"extract": extract_s, "search": t1 - t0, "result": time.perf_counter() - t2}
            out[i] = Localized(result, alpha if mask[i] else 0.0, seconds)
