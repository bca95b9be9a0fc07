"""Attention from water masks: the upper bound a perfect flood detector would give.

A water mask (8-bit PNG, 255 = water, as ``experiments.flood`` and the synthetic benchmark write them) becomes a
grid answer: weight 1 on dry cells, falling linearly with the cell's water fraction to ``water_weight`` on an
all-water cell, which is what the demo's oracle attention does. :class:`MasksProvider` serves those answers to the
annotation runner (``experiments.annotate --provider masks --masks DIR``), so the files are written, named and
resumed like any LLM annotation, next to which they can be evaluated.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from attllm_jax.attention.parse import ParsedAttention, grid_label, parse_answer
from attllm_jax.attention.prompts import Prompt
from attllm_jax.attention.providers.base import AnnotationRequest, AnnotationResponse
from attllm_jax.attention.request_policy import ProviderError
from attllm_jax.data.images import open_image
from attllm_jax.ops.attention_maps import grid_cell_means

ORACLE_GRID = 8
ORACLE_WATER_WEIGHT = 0.1
MASK_SUFFIX = ".png"

MASKS_PROMPT = Prompt(
    id="water_mask_oracle",
    version="1",
    answer="grid",
    template="(no prompt: the grid answer is computed from the image's water mask)",
    description="Oracle attention from water masks (weight 1 dry, down to the water weight on water).",
)


def oracle_grid(mask: np.ndarray, n: int = ORACLE_GRID, water_weight: float = ORACLE_WATER_WEIGHT) -> dict[str, float]:
    """A grid answer from a flood mask: weight 1 on dry cells, down to ``water_weight`` on water (linear).

    Args:
        mask: ``[H, W]`` bool, True = water.
        n: Grid size (labels A1 .. <n-th letter><n>); cells follow docs/DESIGN.md's Python-round convention.
        water_weight: Weight of an all-water cell, in [0, 2].

    Returns:
        ``{"A1": w, ...}`` as an LLM grid answer, weights rounded to 3 decimals.
    """
    fraction = grid_cell_means(mask, n)  # water fraction per cell
    weights = 1.0 - (1.0 - water_weight) * fraction
    return {grid_label(r, c): round(float(weights[r, c]), 3) for r in range(n) for c in range(n)}


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """A water mask as ``[H, W]`` bool (pixels above 127 are water; colour images are converted to grey).

    Raises:
        ValueError: naming the file when it cannot be read as an image.
    """
    try:
        return np.asarray(open_image(path).convert("L")) > 127
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read water mask {path}: {e}") from None


def find_mask_file(masks_dir: str | os.PathLike, image_path: str) -> Path | None:
    """The mask of an image: ``<masks_dir>/<rel_dir>/<stem>.png``, else the flat ``<masks_dir>/<stem>.png``."""
    root, rel = Path(masks_dir), Path(image_path)
    for candidate in (root / rel.with_suffix(MASK_SUFFIX), root / (rel.stem + MASK_SUFFIX)):
        if candidate.is_file():
            return candidate
    return None


def mask_attention(mask: np.ndarray, n: int = ORACLE_GRID, water_weight: float = ORACLE_WATER_WEIGHT):
    """The parsed attention of a mask's oracle grid (a ``ParsedAttention`` of kind "grid")."""
    return parse_answer(oracle_grid(mask, n, water_weight))


class MasksProvider:
    """Answers each image with the oracle grid of its water mask: an answer source that makes no request.

    Like the reader of existing answers, it stands in for a provider in the annotation run: no network, no rate
    limit, no retry, nothing counted as a request.

    Raises:
        ValueError: if ``masks_dir`` is not a folder, or a bad grid size or water weight.
    """

    name = "masks"
    needs_image = False

    def __init__(
        self, masks_dir: str | os.PathLike, grid_size: int = ORACLE_GRID, water_weight: float = ORACLE_WATER_WEIGHT
    ):
        if not (2 <= int(grid_size) <= 26):
            raise ValueError(f"the mask grid size must be in [2, 26], got {grid_size}")
        if not (0.0 <= float(water_weight) <= 2.0):
            raise ValueError(f"the water weight must be in [0, 2], got {water_weight}")
        self.masks_dir = Path(masks_dir)
        if not self.masks_dir.is_dir():
            raise ValueError(f"--masks must be an existing folder of water masks, got {masks_dir}")
        self.grid_size = int(grid_size)
        self.water_weight = float(water_weight)
        self.model = f"water-mask-oracle-grid{self.grid_size}-w{self.water_weight:g}"

    def generate(
        self,
        request: AnnotationRequest,
        stop: threading.Event | None = None,
        on_attempt: Callable[[int], None] | None = None,
    ) -> AnnotationResponse:
        """The oracle grid of ``request.image_path``'s mask.

        Raises:
            ProviderError: if the image has no mask in ``masks_dir``, or it cannot be read.
        """
        del stop, on_attempt  # nothing to wait for, no request made
        path = find_mask_file(self.masks_dir, request.image_path)
        if path is None:
            raise ProviderError(f"no water mask for {request.image_path} in {self.masks_dir} (<stem>.png)")
        try:
            mask = read_mask(path)
        except ValueError as e:
            raise ProviderError(str(e)) from None
        text = json.dumps(oracle_grid(mask, self.grid_size, self.water_weight))
        return AnnotationResponse(text=text, model=self.model, latency_s=0.0, attempts=0, tokens={})

    def close(self) -> None:
        """Nothing to release."""


def parsed_from_masks(masks_dir: str | os.PathLike, image_paths: list[str]) -> tuple[list, list[str]]:
    """The oracle attention of every image whose mask exists (None where it is missing or unreadable).

    Returns:
        One ``ParsedAttention`` or None per image, and the images without a usable mask.
    """
    parsed: list[ParsedAttention | None] = []
    missing: list[str] = []
    for rel in image_paths:
        path = find_mask_file(masks_dir, rel)
        try:
            parsed.append(None if path is None else mask_attention(read_mask(path)))
        except ValueError:
            parsed.append(None)
        if parsed[-1] is None:
            missing.append(rel)
    return parsed, missing
