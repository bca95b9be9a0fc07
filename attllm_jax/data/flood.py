"""Procedural floodwater drawn over any photo, and flooding a whole folder at several depths.

The water is the one the built-in synthetic benchmark draws (:func:`draw_water`, shared with
:mod:`attllm_jax.data.synthetic`): a surface over the lower part of the frame below a slightly uneven (sinusoidal)
waterline, holding a rippled, blurred, darkened reflection of what is above it, tinted towards a muddy water colour
and more turbid (less reflective) with depth, with short specular glints and sensor noise. Optional rain streaks
and water droplets on the lens are drawn over the whole frame; without them nothing above the waterline changes.

The flood of an image is deterministic in the seed and the image's pixels: the random draws (waterline phase and
wavelength, ripples, water colour, glints, noise) come from a generator seeded with the seed and a digest of the
pixels, and are the same at every level, so the levels of one image differ only in the water's depth.

:func:`flood_folder` writes, per level ``l``, ``OUT/level_<l>/<same relative path>`` (so the coordinates in the
name carry over and ``experiments.eval`` runs on the folder unchanged) and ``OUT/masks/level_<l>/<stem>.png``
(8-bit, 255 = water), resumably; unreadable images are skipped, listed and counted.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, UnidentifiedImageError

from attllm_jax.data.images import open_image
from attllm_jax.files import atomic_write, atomic_write_json, list_image_files
from attllm_jax.outputs import OUTPUTS_KEY, OutputLock, refuse_output_inside, remove_outputs

log = logging.getLogger("attllm_jax.flood")

REFERENCE_HEIGHT = 288  # pixel sizes of the water (ripples, glints, blur) are given for a view this tall
SUMMARY_FILE = "flood_summary.json"
MASKS_DIR = "masks"
_WATER_COLORS = [[0.42, 0.36, 0.25], [0.35, 0.38, 0.36], [0.30, 0.33, 0.38]]  # muddy, grey-green, grey-blue


def draw_water(
    view: np.ndarray, level: float, rng: np.random.Generator, scale: float = 1.0, crest_at_level: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Draws floodwater over the lower part of a view.

    The waterline of column ``x`` is row ``H (1 - level) + a sin(2 pi x / lambda + phi)`` (``a = 1.5 scale`` px,
    ``lambda`` uniform in ``[25, 60] scale`` px), shifted down by ``a`` with ``crest_at_level`` so that the water
    reaches exactly ``level`` of the height at its deepest column (else ``level`` is its mean depth). Below it, with
    ``d`` the depth below the waterline as a fraction of ``H level``: the view mirrored about the waterline, shifted
    sideways by ripples growing with depth and blurred (Gaussian, ``1.2 scale`` px), darkened to 75 % and mixed with
    a water colour with weight ``0.45 + 0.25 d`` (turbidity); glints (8 ``scale`` px streaks, rarer with depth) and
    Gaussian noise (std 0.025). Above the waterline the view is returned unchanged.

    The random draws are made in a fixed order; the synthetic benchmark's pixels depend on it.

    Args:
        view: ``[H, W, 3]`` float32 in [0, 1].
        level: Fraction of the height under water, in [0, 1].
        rng: The generator the draws come from.
        scale: Pixel sizes relative to a ``REFERENCE_HEIGHT``-pixel view (a Python float).
        crest_at_level: Make ``level`` the depth of the deepest column instead of the mean depth.

    Returns:
        The flooded view ``[H, W, 3]`` float32 in [0, 1] and the water mask ``[H, W]`` bool (True = water).
    """
    h, w, _ = view.shape
    scale = float(scale)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    phase, wavelength = rng.uniform(0, 2 * np.pi), rng.uniform(25, 60) * scale
    amplitude = 1.5 * scale
    top = h * (1.0 - level) + (amplitude if crest_at_level else 0.0)
    waterline = top + amplitude * np.sin(2 * np.pi * xs[0] / wavelength + phase)
    mask = ys > waterline[None, :]
    depth = np.clip((ys - waterline[None, :]) / max(1.0, h * level), 0.0, 1.0)
    ripple = (
        rng.uniform(1.5, 4.0) * scale * np.sin(ys * (rng.uniform(0.4, 0.9) / scale) + rng.uniform(0, 2 * np.pi))
    ) * (0.3 + depth)
    src_y = np.clip(2 * waterline[None, :] - ys, 0, h - 1).astype(np.int64)
    src_x = np.clip(xs + ripple, 0, w - 1).astype(np.int64)
    reflection = (
        np.asarray(
            Image.fromarray((view[src_y, src_x] * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.2 * scale)),
            dtype=np.float32,
        )
        / 255.0
    )
    water_color = np.array(rng.choice(_WATER_COLORS), np.float32)
    mix = 0.45 + 0.25 * depth[..., None]
    water = (1 - mix) * 0.75 * reflection + mix * water_color
    # specular streaks: short horizontal glints, denser near the surface
    block = max(1, round(8 * scale))
    glints = rng.random((h, max(1, w // block))) < 0.04 * (1.0 - depth[:, ::block][:, : max(1, w // block)])
    streaks = np.repeat(glints, block, axis=1)[:, :w]
    if streaks.shape[1] < w:  # w not a multiple of the block: the last columns carry no glint
        streaks = np.pad(streaks, ((0, 0), (0, w - streaks.shape[1])))
    streaks &= mask
    water = np.where(streaks[..., None], np.minimum(water + 0.3, 1.0), water)
    water += rng.normal(0.0, 0.025, water.shape).astype(np.float32)
    out = np.where(mask[..., None], water, view)
    return np.clip(out, 0.0, 1.0), mask


@dataclass(frozen=True)
class FloodStyle:
    """Weather drawn over the whole frame, on top of the water (both off by default).

    Attributes:
        rain: Rain-streak density in [0, 1] (0 = none; 1 is a downpour, about 1 streak per 400 px^2).
        droplets: Water droplets on the lens (0 = none): round, blurred, slightly brighter patches.
    """

    rain: float = 0.0
    droplets: int = 0

    def __post_init__(self):
        if not (math.isfinite(self.rain) and 0.0 <= self.rain <= 1.0):
            raise ValueError(f"rain density must be in [0, 1], got {self.rain}")
        if self.droplets < 0:
            raise ValueError(f"droplets must be >= 0, got {self.droplets}")


def image_seed(pixels: np.ndarray, seed: int) -> list[int]:
    """The generator seed of one image: ``seed`` and the first 8 bytes of the sha256 of its pixels and shape."""
    digest = hashlib.sha256(f"{pixels.shape}".encode() + np.ascontiguousarray(pixels).tobytes()).digest()
    return [int(seed), int.from_bytes(digest[:8], "little")]


def draw_rain(view: np.ndarray, density: float, rng: np.random.Generator) -> np.ndarray:
    """Slanted, thin, semi-transparent light streaks over ``view`` ``[H, W, 3]`` float32 in [0, 1]."""
    h, w, _ = view.shape
    scale = h / REFERENCE_HEIGHT
    count = int(round(density * h * w / 400.0))
    if count == 0:
        return view
    layer = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(layer)
    angle = rng.uniform(-0.35, 0.35)  # radians from vertical, one wind direction per image
    starts = rng.uniform([0, -0.1 * h], [w, h], size=(count, 2))
    lengths = rng.uniform(8, 24, size=count) * scale
    strengths = rng.integers(40, 110, size=count)
    for (x, y), length, strength in zip(starts, lengths, strengths, strict=True):
        dx, dy = length * math.sin(angle), length * math.cos(angle)
        draw.line([(float(x), float(y)), (float(x + dx), float(y + dy))], fill=int(strength), width=1)
    alpha = np.asarray(layer.filter(ImageFilter.GaussianBlur(0.5 * scale)), np.float32)[..., None] / 255.0
    return np.clip(view * (1 - alpha) + 0.85 * alpha, 0.0, 1.0)


def draw_droplets(view: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Round droplets on the lens: the blurred view, slightly brighter, in soft-edged discs."""
    if count == 0:
        return view
    h, w, _ = view.shape
    blurred = np.asarray(
        Image.fromarray((view * 255 + 0.5).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.012 * min(h, w) + 1)),
        np.float32,
    )
    blurred = np.clip(blurred / 255.0 * 1.08 + 0.03, 0.0, 1.0)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    alpha = np.zeros((h, w), np.float32)
    for _ in range(count):
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        radius = rng.uniform(0.02, 0.07) * min(h, w)
        r = np.sqrt((xs - cx) ** 2 + (ys - cy) ** 2) / radius
        alpha = np.maximum(alpha, np.clip((1.0 - r) * 4.0, 0.0, 1.0) * 0.9)
    return view * (1 - alpha[..., None]) + blurred * alpha[..., None]


def flood_pixels(
    pixels: np.ndarray, level: float, seed: int = 0, style: FloodStyle | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Floods one image procedurally (see the module docstring).

    Args:
        pixels: ``[H, W, 3]`` uint8 RGB.
        level: Fraction of the height under water at its deepest column, in [0, 1].
        seed: Random seed (with the pixels, it fixes every draw).
        style: Optional rain and lens droplets.

    Returns:
        The flooded image ``[H, W, 3]`` uint8 and the water mask ``[H, W]`` bool. Without rain or droplets every
        pixel outside the mask equals the input.

    Raises:
        ValueError: for a level outside [0, 1] or an array that is not ``[H, W, 3]`` uint8.
    """
    if pixels.ndim != 3 or pixels.shape[-1] != 3 or pixels.dtype != np.uint8:
        raise ValueError(f"expected [H, W, 3] uint8 pixels, got {pixels.shape} {pixels.dtype}")
    if not (math.isfinite(level) and 0.0 <= level <= 1.0):
        raise ValueError(f"flood level must be in [0, 1], got {level}")
    style = style or FloodStyle()
    key = image_seed(pixels, seed)
    view = pixels.astype(np.float32) / 255.0
    flooded, mask = draw_water(
        view, float(level), np.random.default_rng(key), pixels.shape[0] / REFERENCE_HEIGHT, crest_at_level=True
    )
    weather = np.random.default_rng([*key, 1])  # its own stream: the water is the same with or without weather
    flooded = draw_droplets(draw_rain(flooded, style.rain, weather), style.droplets, weather)
    out = (flooded * 255 + 0.5).astype(np.uint8)
    if style.rain == 0 and style.droplets == 0:
        out[~mask] = pixels[~mask]  # exact: no round trip through float above the waterline
    return out, mask


# ----------------------------------------------------------------------------------------------------------------
# Flooding a folder


@dataclass(frozen=True)
class FloodOutput:
    """What a flood method made of one image at one level.

    Attributes:
        image: ``[H, W, 3]`` uint8, the flooded image (written under the input's file name).
        mask: ``[H, W]`` bool water mask, or None when the method has none.
        info: Method-specific facts recorded in the summary (e.g. how the mask was estimated).
    """

    image: np.ndarray
    mask: np.ndarray | None
    info: dict[str, Any] = field(default_factory=dict)


FloodMethod = Callable[[Image.Image, str, float], FloodOutput]
"""``(RGB image, relative path, level) -> FloodOutput``; raises to mark the (image, level) as failed."""


def procedural_method(seed: int = 0, style: FloodStyle | None = None) -> FloodMethod:
    """The procedural flood as a :data:`FloodMethod`."""

    def method(image: Image.Image, rel: str, level: float) -> FloodOutput:
        del rel
        out, mask = flood_pixels(np.asarray(image, dtype=np.uint8), level, seed, style)
        return FloodOutput(out, mask)

    return method


def level_name(level: float) -> str:
    """The folder of a level: ``level_0.2``, ``level_0.45``, ``level_1``."""
    return f"level_{float(level):g}"


def validate_levels(levels: Sequence[float], allow_zero: bool = False) -> tuple[float, ...]:
    """Levels as distinct floats in (0, 1] (or [0, 1] with ``allow_zero``), in the given order.

    Raises:
        ValueError: naming the bad levels.
    """
    values = tuple(float(v) for v in levels)
    low_ok = (lambda v: v >= 0.0) if allow_zero else (lambda v: v > 0.0)
    bad = [v for v in values if not (math.isfinite(v) and low_ok(v) and v <= 1.0)]
    if not values or bad:
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        raise ValueError(f"--levels must be fractions of the frame height in {interval}, got {list(levels)}")
    if len({level_name(v) for v in values}) != len(values):
        raise ValueError(f"--levels must be distinct, got {list(levels)}")
    return values


def _encode(image: np.ndarray, suffix: str, jpeg_quality: int) -> bytes:
    buffer = io.BytesIO()
    pil = Image.fromarray(image)
    fmt = Image.registered_extensions().get(suffix.lower(), "PNG")
    if fmt == "JPEG":
        pil.save(buffer, format="JPEG", quality=jpeg_quality)
    else:
        pil.save(buffer, format=fmt)
    return buffer.getvalue()


def encode_mask(mask: np.ndarray) -> bytes:
    """PNG bytes of a mask: 8-bit grey, 255 = water."""
    buffer = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buffer, format="PNG")
    return buffer.getvalue()


def read_rgb(path: str | os.PathLike, root: str | os.PathLike | None = None) -> Image.Image:
    """The image as RGB, fully decoded, as the evaluation reads it (:func:`~attllm_jax.data.images.open_image`).

    Raises:
        ValueError: naming the file when it cannot be read, or is refused (too large, not a regular file, outside
            ``root`` once symlinks are resolved).
    """
    try:
        return open_image(path, root=root)
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None


def _check_mask_collisions(images: list[str]) -> None:
    seen: dict[str, str] = {}
    for rel in images:
        stem = Path(rel).with_suffix("").as_posix()
        if stem in seen:
            raise ValueError(f"images {seen[stem]} and {rel} would share the mask {stem}.png; rename one")
        seen[stem] = rel


@dataclass
class _Tally:
    levels: tuple[float, ...]
    lock: threading.Lock = field(default_factory=threading.Lock)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    failures: list[dict[str, Any]] = field(default_factory=list)
    water_fraction: dict[str, list[float]] = field(default_factory=dict)
    totals: dict[str, float] = field(default_factory=dict)
    aborted: str | None = None
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self):
        for level in self.levels:
            self.counts[level_name(level)] = {"written": 0, "existing": 0, "failed": 0}
            self.water_fraction[level_name(level)] = []

    def add(self, level: float, status: str, fraction: float | None = None) -> None:
        with self.lock:
            self.counts[level_name(level)][status] += 1
            if fraction is not None:
                self.water_fraction[level_name(level)].append(fraction)


def flood_folder(
    images_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    levels: Sequence[float],
    method: FloodMethod,
    *,
    method_name: str,
    seed: int,
    settings: dict[str, Any] | None = None,
    workers: int = 1,
    jpeg_quality: int = 95,
    max_listed_failures: int = 100,
    writes_masks: bool = True,
) -> dict[str, Any]:
    """Floods every image of a folder at every level, skipping what a previous run already wrote.

    An (image, level) pair is done when its image and (with ``writes_masks``) its mask exist; both are written
    atomically, the mask first, so an interrupted run never leaves a flooded image without its mask. An image
    that cannot be read, or a method failure, marks the pair failed (listed, counted, retried by the next run);
    the other pairs go on, unless the failure is fatal (an exception with a true ``fatal`` attribute, e.g. a
    rejected API key): then no further image is started and ``aborted`` says why.
    Numeric values of the methods' ``info`` are summed into ``method_totals`` (e.g. requests made).

    Args:
        images_dir: The dry images (searched recursively; the output folder is excluded if inside it).
        output_dir: Where ``level_<l>/``, ``masks/level_<l>/`` and ``flood_summary.json`` go.
        levels: Fractions of the frame height under water.
        method: The flood method.
        method_name: Its name, recorded in the summary.
        seed: The seed, recorded in the summary (the method already holds it).
        settings: Further settings recorded in the summary.
        workers: Threads (for methods that wait on a server; the procedural method is CPU-bound).
        jpeg_quality: Quality of flooded JPEGs (other formats are written losslessly).
        max_listed_failures: Failures listed in the summary (all are counted).
        writes_masks: Whether the method gives masks (else none are written or expected).

    Returns:
        The summary, also written to ``OUT/flood_summary.json``.

    Raises:
        FileNotFoundError: if ``images_dir`` is not a folder. ValueError: bad levels, or two images that would
            share a mask file.
    """
    start = time.monotonic()
    levels = validate_levels(levels)
    root, out = Path(images_dir), Path(output_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"--images {images_dir} is not a folder")
    refuse_output_inside(out, {"--images": root})
    images = list_image_files(root)
    _check_mask_collisions(images)
    key = _run_key(method_name, seed, settings, root, writes_masks, jpeg_quality)
    with OutputLock(out, "flood") as lock:
        lock.log_takeover()
        planned = _start_keyed_run(out, key, images, levels, writes_masks)
        run = _FloodRun(root, out, levels, method, jpeg_quality, max_listed_failures, writes_masks, _Tally(levels))
        counts = run.flood_all(images, workers)
        summary = {
            "method": method_name,
            "levels": list(levels),
            "level_folders": [level_name(v) for v in levels],
            "seed": int(seed),
            "settings": dict(settings or {}),
            "masks": MASKS_DIR if writes_masks else None,
            "images_dir": str(root),
            "num_images": len(images),
            **counts,
            "wall_s": round(time.monotonic() - start, 3),
            "key": key,
            "status": "complete",
            OUTPUTS_KEY: [rel for rel in planned if (out / rel).is_file()],
        }
        atomic_write_json(out / SUMMARY_FILE, summary)
    return summary


def _run_key(
    method_name: str, seed: int, settings: dict[str, Any] | None, root: Path, writes_masks: bool, jpeg_quality: int
) -> dict[str, Any]:
    """What the flooded files depend on: a previous run's files are reused only under the same key."""
    return {
        "method": method_name,
        "seed": int(seed),
        "settings": dict(settings or {}),
        "images_dir": str(root.resolve()),
        "writes_masks": writes_masks,
        "jpeg_quality": jpeg_quality,
    }


def _targets(rel: str, level: float, writes_masks: bool) -> list[str]:
    """The files one (image, level) pair writes, relative to the output folder."""
    image = f"{level_name(level)}/{rel}"
    mask = f"{MASKS_DIR}/{level_name(level)}/{Path(rel).with_suffix('.png').as_posix()}"
    return [image, mask] if writes_masks else [image]


def _start_keyed_run(out: Path, key: dict[str, Any], images: list[str], levels, writes_masks: bool) -> list[str]:
    """Keys the folder's outputs by the run's settings, before any image is written.

    Files a previous run wrote (listed in its flood_summary.json, which a run writes at its start too, so a killed
    run's files are listed) are kept for resuming only when that run had the same settings and the pair is still
    wanted; every other one is removed. Then the summary is written with this run's key and planned files.

    Returns:
        The relative paths this run may write.
    """
    planned = [t for rel in images for level in levels for t in _targets(rel, level, writes_masks)]
    previous = _read_summary(out / SUMMARY_FILE)
    if previous is not None:
        listed = previous.get(OUTPUTS_KEY)
        if not isinstance(listed, list):  # a summary of an older version: its levels' pairs of these images
            old_levels = [float(v) for v in previous.get("levels", []) if isinstance(v, int | float)]
            listed = [t for rel in images for level in old_levels for t in _targets(rel, level, True)]
        keep = set(planned) if previous.get("key") == key else set()
        stale = [rel for rel in listed if isinstance(rel, str) and rel not in keep]
        why = "same settings, levels no longer wanted" if keep else "its flood settings differ from this run's"
        remove_outputs(out, stale, why)
    atomic_write_json(out / SUMMARY_FILE, {"key": key, "status": "running", OUTPUTS_KEY: planned})
    return planned


def _read_summary(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        log.warning("flood: cannot read the previous %s; its files are not reused", path)
        return {}
    return data if isinstance(data, dict) else {}


@dataclass
class _FloodRun:
    """One flood run: every (image, level) pair not already on disk, written atomically (mask first)."""

    root: Path
    out: Path
    levels: tuple[float, ...]
    method: FloodMethod
    jpeg_quality: int
    max_listed_failures: int
    writes_masks: bool
    tally: _Tally
    unreadable: set[str] = field(default_factory=set)

    def flood_all(self, images: list[str], workers: int) -> dict[str, Any]:
        """Floods every image (on ``workers`` threads when more than one); returns the summary's counts and
        failures."""
        if workers <= 1:
            for rel in images:
                self.process(rel)
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                list(pool.map(self.process, images))
        tally = self.tally
        return {
            "counts": tally.counts,
            "num_failed": sum(c["failed"] for c in tally.counts.values()),
            "num_unreadable_images": len(self.unreadable),
            "failures": tally.failures,
            "aborted": tally.aborted,
            "method_totals": tally.totals,
            "mean_water_fraction_written": {
                k: (round(float(np.mean(v)), 4) if v else None) for k, v in tally.water_fraction.items()
            },
        }

    def targets(self, rel: str, level: float) -> tuple[Path, Path]:
        """The flooded image and its mask."""
        return self.out / level_name(level) / rel, self.out / MASKS_DIR / level_name(level) / Path(rel).with_suffix(
            ".png"
        )

    def process(self, rel: str) -> None:
        """Floods one image at every level it still lacks."""
        if self.tally.stop.is_set():
            return
        todo = []
        for level in self.levels:
            image_path, mask_path = self.targets(rel, level)
            if image_path.is_file() and (mask_path.is_file() or not self.writes_masks):
                self.tally.add(level, "existing")
            else:
                todo.append(level)
        if not todo:
            return
        try:
            image = read_rgb(self.root / rel, root=self.root)
        except ValueError as e:
            with self.tally.lock:
                self.unreadable.add(rel)
            for level in todo:
                _fail(self.tally, rel, level, str(e), self.max_listed_failures)
            return
        for level in todo:
            if not self.flood_pair(image, rel, level):
                return

    def flood_pair(self, image: Image.Image, rel: str, level: float) -> bool:
        """Floods one (image, level) pair and writes it; False when a fatal error stops the run."""
        image_path, mask_path = self.targets(rel, level)
        try:
            result = self.method(image, rel, level)
            if result.image.shape[:2] != (image.height, image.width) or result.image.dtype != np.uint8:
                raise ValueError(f"flooded image has shape {result.image.shape} {result.image.dtype}")
            if self.writes_masks and result.mask is None:
                raise ValueError("the flood method returned no mask")
            encoded = _encode(result.image, image_path.suffix, self.jpeg_quality)
            if self.writes_masks:
                atomic_write(mask_path, lambda f, m=result.mask: f.write(encode_mask(m)))
            atomic_write(image_path, lambda f, b=encoded: f.write(b))
        except Exception as e:  # noqa: BLE001 - one bad pair must not stop the others; counted and listed
            _fail(self.tally, rel, level, f"{type(e).__name__}: {e}", self.max_listed_failures)
            if getattr(e, "fatal", False):  # e.g. a rejected API key: no later request can succeed
                with self.tally.lock:
                    self.tally.aborted = self.tally.aborted or f"fatal error on {rel}: {e}"
                self.tally.stop.set()
                return False
            return True
        self.tally.add(level, "written", float(result.mask.mean()) if result.mask is not None else None)
        with self.tally.lock:
            for key, value in result.info.items():
                if isinstance(value, int | float):
                    self.tally.totals[key] = self.tally.totals.get(key, 0) + value
        return True


def _fail(tally: _Tally, rel: str, level: float, error: str, max_listed: int) -> None:
    log.warning("flood failed for %s at level %g: %s", rel, level, error)
    tally.add(level, "failed")
    with tally.lock:
        if len(tally.failures) < max_listed:
            tally.failures.append({"image": rel, "level": level, "error": error})


def style_dict(style: FloodStyle) -> dict[str, Any]:
    """The style as plain JSON values."""
    return asdict(style)
