"""A reader of existing answers: attention files already on disk (ours or the published code's per-image format).

It stands in for a provider in the annotation run (``--provider files``), to bring a folder of published
attention files into our format: each file is read once by :mod:`attllm_jax.attention.store` and its answer
handed over already parsed. No request is made, so nothing is rate-limited, retried or counted as a request.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

from attllm_jax.attention import store
from attllm_jax.attention.providers.base import AnnotationRequest, AnnotationResponse
from attllm_jax.attention.request_policy import ProviderError


class ExistingAnswers:
    """Answers from the attention files of ``source_dir``.

    The answer of image ``rel/x.jpg`` is the file ``<source_dir>/rel/x.json`` (or the flat
    ``<source_dir>/x.json`` of the published code), as :func:`~attllm_jax.attention.store.find_attention_file`
    finds it; ``no_weighting`` files answer None.

    Args:
        source_dir: the folder of attention files.
        max_points: points kept from each answer.

    Raises:
        ValueError: if ``source_dir`` is not a folder.
    """

    name = "files"
    needs_image = False

    def __init__(self, source_dir: str | os.PathLike, max_points: int = store.STORE_MAX_POINTS):
        self.source_dir = Path(source_dir)
        if not self.source_dir.is_dir():
            raise ValueError(f"the files provider needs an existing folder, got {source_dir}")
        self.max_points = max_points

    def generate(
        self,
        request: AnnotationRequest,
        stop: threading.Event | None = None,
        on_attempt: Callable[[int], None] | None = None,
    ) -> AnnotationResponse:
        """The stored answer of ``request.image_path``, already parsed (``text`` holds the raw answer only when
        it is unusable: that is all an annotation file keeps of it).

        Raises:
            ProviderError: if the image has no attention file in ``source_dir``, or it cannot be read.
        """
        del stop, on_attempt  # nothing to wait for, no request made
        path = store.find_attention_file(self.source_dir, request.image_path)
        if path is None:
            raise ProviderError(f"no attention file for {request.image_path} in {self.source_dir}")
        try:
            read = store.read_attention(path, self.max_points)
        except OSError as e:
            raise ProviderError(f"cannot read {path}: {type(e).__name__}: {e}") from None
        record = read.record if isinstance(read.record, dict) else {}
        tokens = {k: int(v) for k, v in (record.get("tokens") or {}).items() if isinstance(v, int | float)}
        return AnnotationResponse(
            # Only an unusable answer is recorded as raw text; a usable one is recorded from ``parsed``.
            text=read.raw_text() if read.record is not None and read.parsed.kind == "invalid" else "",
            model=read.field("model") or "unknown",
            latency_s=0.0,
            attempts=0,
            tokens=tokens,
            parsed=read.parsed,
        )

    def close(self) -> None:
        """Nothing to release."""
