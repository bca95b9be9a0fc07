"""Tests for the visual prompt (attllm_jax.attention.overlay) with synthetic photos."""

import io

import numpy as np
import pytest
from PIL import Image

from attllm_jax.attention import overlay


def synthetic_photo(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(40, 216, size=(height, width, 3), dtype=np.uint8))


def inside(box, photo_box) -> bool:
    """Whether a label box (x0, y0, x1, y1) overlaps the photo (left, top, width, height)."""
    x0, y0, x1, y1 = box
    left, top, width, height = photo_box
    return x0 < left + width and x1 > left and y0 < top + height and y1 > top


def tick_columns(canvas: np.ndarray, row: int, start: int, stop: int) -> list[int]:
    """Centres of the runs of black pixels along one canvas row, between columns start and stop."""
    dark = start + np.flatnonzero(canvas[row, start:stop].max(axis=1) < 60)
    runs = np.split(dark, np.flatnonzero(np.diff(dark) > 1) + 1) if dark.size else []
    return [int(round(run.mean())) for run in runs]


@pytest.mark.parametrize("size, step", [((300, 200), 0.2), ((151, 233), 0.25), ((1500, 900), 0.2)])
def test_photo_untouched_and_labels_outside(size, step):
    photo = synthetic_photo(*size)
    framed = overlay.draw_axis_overlay(photo, max_side=1024, step=step)
    left, top, width, height = framed.photo_box
    expected = overlay.resize_longest_side(photo, 1024)
    assert (width, height) == expected.size and max(width, height) <= 1024
    canvas = np.asarray(framed.image)
    np.testing.assert_array_equal(canvas[top : top + height, left : left + width], np.asarray(expected))
    assert len(framed.label_boxes) == 4 * len(framed.ticks)
    for box in framed.label_boxes:
        assert not inside(box, framed.photo_box), box
        assert box[0] >= 0 and box[1] >= 0 and box[2] <= canvas.shape[1] and box[3] <= canvas.shape[0], box
    # Labels were drawn: the margins hold dark pixels, on every side.
    assert (canvas[: top - 1] < 60).any() and (canvas[top + height + 1 :] < 60).any()
    assert (canvas[:, : left - 1] < 60).any() and (canvas[:, left + width + 1 :] < 60).any()


def test_ticks_and_point_round_trip():
    """A point read off the rulers maps back to the same photo pixel."""
    width, height = 301, 201
    photo = Image.new("RGB", (width, height), (128, 128, 128))
    px, py = 180, 48  # the marked pixel
    photo.putpixel((px, py), (255, 0, 0))
    framed = overlay.draw_axis_overlay(photo, step=0.2)
    canvas = np.asarray(framed.image)
    left, top, w, h = framed.photo_box
    assert (w, h) == (width, height)
    # Ticks in the band just above and just below the photo frame, and left / right of it.
    expected_cols = [left + round(v * (width - 1)) for v in framed.ticks]
    expected_rows = [top + round(v * (height - 1)) for v in framed.ticks]
    across, down = (left - 1, left + width + 1), (top - 1, top + height + 1)  # the photo's span, frame included
    columns = tick_columns(canvas, top - 4, *across)
    rows = tick_columns(canvas.transpose(1, 0, 2), left - 4, *down)
    assert columns == expected_cols and rows == expected_rows
    assert tick_columns(canvas, top + height + 3, *across) == expected_cols
    assert tick_columns(canvas.transpose(1, 0, 2), left + width + 3, *down) == expected_rows
    # Read the red pixel's position off the measured rulers, as the model would.
    red = np.argwhere((canvas[..., 0] > 200) & (canvas[..., 1] < 60) & (canvas[..., 2] < 60))
    ((row, col),) = red
    x = (col - columns[0]) / (columns[-1] - columns[0])
    y = (row - rows[0]) / (rows[-1] - rows[0])
    assert overlay.normalized_to_pixel(x, y, width, height) == (px, py)
    assert framed.canvas_to_photo(col, row) == pytest.approx((x, y))
    assert framed.photo_to_canvas(x, y) == (col, row)


def test_grid_lines_and_resize():
    photo = synthetic_photo(2048, 1024)
    framed = overlay.draw_axis_overlay(photo, max_side=512, step=0.25, grid_lines=True)
    left, top, width, height = framed.photo_box
    assert (width, height) == (512, 256)
    canvas = np.asarray(framed.image)
    assert framed.ticks == (0.0, 0.25, 0.5, 0.75, 1.0)
    col = left + round(0.5 * (width - 1))
    assert (canvas[top : top + height, col] == 255).all()  # a white grid line through the photo
    small = synthetic_photo(100, 80)
    assert overlay.resize_longest_side(small, 1024) is small  # never enlarged


def test_ruler_ticks():
    assert overlay.ruler_ticks(0.2) == (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    assert overlay.ruler_ticks(1 / 3) == (0.0, 0.333333, 0.666667, 1.0)
    assert overlay.ruler_ticks(0.3) == (0.0, 0.3, 0.6, 0.9, 1.0)
    with pytest.raises(ValueError, match="step"):
        overlay.ruler_ticks(0.0)


def test_jpeg_and_load_errors(tmp_path):
    framed = overlay.draw_axis_overlay(synthetic_photo(64, 48))
    data = overlay.encode_jpeg(framed.image)
    decoded = Image.open(io.BytesIO(data))
    assert decoded.format == "JPEG" and decoded.size == framed.image.size
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.jpg"):
        overlay.load_photo(bad)
    with pytest.raises(ValueError, match="quality"):
        overlay.encode_jpeg(framed.image, quality=0)
    with pytest.raises(ValueError, match="max_side"):
        overlay.resize_longest_side(framed.image, 0)
