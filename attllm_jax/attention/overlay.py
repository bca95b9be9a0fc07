"""The visual prompt: the photo framed by rulers drawn OUTSIDE it, so coordinates read off the rulers
are relative to the photo itself.

Coordinate convention (the same as the RBF maps' ``linspace(0, 1, n)``): normalized ``x`` in [0, 1]
is photo column ``x * (W - 1)``, so 0.0 is the centre of the first column and 1.0 the centre of the
last one; likewise for ``y`` and rows. A tick for value ``v`` is drawn at canvas column
``left + round(v * (W - 1))``. The photo's pixels are copied unchanged into the canvas (unless grid
lines are requested); ticks, labels and the frame lie in the margins.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os

from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

from attllm_jax.data.images import open_image

DEFAULT_MAX_SIDE = 1024
_BACKGROUND = (255, 255, 255)
_INK = (0, 0, 0)
_FRAME = (64, 64, 64)
_GRID_LINE = (255, 255, 255)


@dataclasses.dataclass(frozen=True)
class Overlay:
    """A photo framed by rulers.

    Attributes:
        image: the canvas, RGB.
        photo_box: (left, top, width, height) of the (resized) photo inside the canvas.
        ticks: the ruler values, 0.0 ... 1.0.
        label_boxes: (x0, y0, x1, y1) of every tick label drawn (exclusive right/bottom edges).
    """

    image: Image.Image
    photo_box: tuple[int, int, int, int]
    ticks: tuple[float, ...]
    label_boxes: tuple[tuple[int, int, int, int], ...]

    def photo_to_canvas(self, x: float, y: float) -> tuple[int, int]:
        """Canvas pixel (column, row) of normalized photo coordinates (x, y)."""
        left, top, width, height = self.photo_box
        col, row = normalized_to_pixel(x, y, width, height)
        return left + col, top + row

    def canvas_to_photo(self, col: float, row: float) -> tuple[float, float]:
        """Normalized photo coordinates (x, y) of a canvas pixel (column, row)."""
        left, top, width, height = self.photo_box
        return (col - left) / max(width - 1, 1), (row - top) / max(height - 1, 1)


def normalized_to_pixel(x: float, y: float, width: int, height: int) -> tuple[int, int]:
    """Photo pixel (column, row) of normalized coordinates: ``(round(x * (W - 1)), round(y * (H - 1)))``."""
    x, y = min(max(float(x), 0.0), 1.0), min(max(float(y), 0.0), 1.0)
    return round(x * (width - 1)), round(y * (height - 1))


def resize_longest_side(image: Image.Image, max_side: int = DEFAULT_MAX_SIDE) -> Image.Image:
    """Shrinks ``image`` (Lanczos) so its longest side is at most ``max_side``; never enlarges.

    Raises:
        ValueError: if ``max_side`` is not a positive integer.
    """
    if not isinstance(max_side, int) or max_side < 1:
        raise ValueError(f"max_side must be a positive integer, got {max_side!r}")
    width, height = image.size
    scale = max_side / max(width, height)
    if scale >= 1.0:
        return image
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def ruler_ticks(step: float) -> tuple[float, ...]:
    """0.0, step, 2*step, ..., 1.0 (the last tick is always 1.0).

    Raises:
        ValueError: if ``step`` is not in (0, 1].
    """
    if not 0.0 < step <= 1.0:
        raise ValueError(f"ruler step must be in (0, 1], got {step!r}")
    count = math.ceil(1.0 / step - 1e-9)
    return tuple(round(min(k * step, 1.0), 6) for k in range(count)) + (1.0,)


def _label(value: float, decimals: int) -> str:
    return f"{value:.{decimals}f}"


def draw_axis_overlay(
    image: Image.Image,
    max_side: int = DEFAULT_MAX_SIDE,
    step: float = 0.2,
    grid_lines: bool = False,
) -> Overlay:
    """Frames a photo with rulers on all four sides, outside the photo.

    Args:
        image: the photo (any PIL mode; converted to RGB).
        max_side: the photo's longest side is shrunk to at most this.
        step: distance between ticks, in photo units (0.2 -> 0.0, 0.2, ..., 1.0).
        grid_lines: also draw thin white lines across the photo at the ticks.

    Returns:
        An :class:`Overlay`.
    """
    photo = resize_longest_side(image.convert("RGB"), max_side)
    width, height = photo.size
    ticks = ruler_ticks(step)
    decimals = 1 if all(abs(t * 10 - round(t * 10)) < 1e-6 for t in ticks) else 2
    labels = [_label(t, decimals) for t in ticks]

    longest = max(width, height)
    font_px = max(10, round(10 + 10 * longest / 1024))
    font = ImageFont.load_default(size=font_px)
    tick_len = max(3, font_px // 3)
    tick_w = 1 + 2 * (font_px // 18)  # odd, so the tick is centred on its pixel
    gap = max(2, font_px // 5)
    text_w = max(math.ceil(font.getlength(text)) for text in labels)
    text_h = font_px
    side = 1 + gap + tick_len + gap + text_w + gap  # frame, gap, tick, gap, label, border
    band = 1 + gap + tick_len + gap + text_h + gap
    left, top = side, band
    canvas = Image.new("RGB", (width + 2 * side, height + 2 * band), _BACKGROUND)
    canvas.paste(photo, (left, top))
    draw = ImageDraw.Draw(canvas)
    right, bottom = left + width - 1, top + height - 1  # last photo column / row

    draw.rectangle((left - 1, top - 1, right + 1, bottom + 1), outline=_FRAME, width=1)
    label_boxes = []
    half = tick_w // 2
    for value, text in zip(ticks, labels, strict=True):
        col, row = normalized_to_pixel(value, value, width, height)
        col, row = left + col, top + row
        # x rulers: ticks above and below the frame, labels beyond them.
        for y0, y1, label_y, anchor in (
            (top - 2 - tick_len, top - 2, top - 2 - tick_len - gap, "md"),
            (bottom + 2, bottom + 2 + tick_len, bottom + 2 + tick_len + gap, "ma"),
        ):
            draw.rectangle((col - half, y0, col + half, y1), fill=_INK)
            draw.text((col, label_y), text, font=font, fill=_INK, anchor=anchor)
            label_boxes.append(draw.textbbox((col, label_y), text, font=font, anchor=anchor))
        # y rulers: ticks left and right of the frame, labels beyond them.
        for x0, x1, label_x, anchor in (
            (left - 2 - tick_len, left - 2, left - 2 - tick_len - gap, "rm"),
            (right + 2, right + 2 + tick_len, right + 2 + tick_len + gap, "lm"),
        ):
            draw.rectangle((x0, row - half, x1, row + half), fill=_INK)
            draw.text((label_x, row), text, font=font, fill=_INK, anchor=anchor)
            label_boxes.append(draw.textbbox((label_x, row), text, font=font, anchor=anchor))
        if grid_lines and 0.0 < value < 1.0:
            draw.line((col, top, col, bottom), fill=_GRID_LINE, width=1)
            draw.line((left, row, right, row), fill=_GRID_LINE, width=1)
    return Overlay(canvas, (left, top, width, height), ticks, tuple(tuple(map(int, b)) for b in label_boxes))


def encode_jpeg(image: Image.Image, quality: int = 90) -> bytes:
    """JPEG bytes of an RGB image.

    Raises:
        ValueError: if ``quality`` is not in [1, 95].
    """
    if not 1 <= quality <= 95:
        raise ValueError(f"JPEG quality must be in [1, 95], got {quality}")
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def load_photo(path: str | os.PathLike, root: str | os.PathLike | None = None) -> Image.Image:
    """Opens an image file fully, as RGB, so that errors surface here.

    Read as the model reads it (:func:`~attllm_jax.data.images.open_image`): the coordinates the LLM reads must
    refer to the pixels the model sees. With ``root``, a file that resolves outside that folder is refused.

    Raises:
        ValueError: naming the file when it cannot be read as an image, or is refused (too large, not a regular
            file, outside ``root``).
    """
    try:
        return open_image(path, root=root)
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None
