"""Thread-pool decoding and shape-grouped, padded batches."""

import numpy as np
import pytest
from PIL import Image

from attllm_jax.data.loading import (
    ImageTooLargeError,
    LoadFailure,
    batch_pixel_budget,
    check_pixels,
    decode_stream,
    load_batches,
    read_image,
    shape_batches,
)


def _identity(image):
    return np.asarray(image, np.float32) / 255.0


def _write(path, size, value):
    Image.new("RGB", size, (value, value, value)).save(path, format="PNG")


def test_decode_stream_keeps_order_and_reports_corrupt_images(tmp_path):
    paths = []
    for i in range(7):
        path = tmp_path / f"{i}.png"
        _write(path, (4 + i % 2, 3), 10 * i)
        paths.append(path)
    (tmp_path / "3.png").write_bytes(b"\x89PNG not really")
    items = list(decode_stream([(i, str(p)) for i, p in enumerate(paths)], _identity, num_workers=3, prefetch=2))
    assert [i for i, _ in items] == list(range(7))
    failure = items[3][1]
    assert isinstance(failure, LoadFailure) and failure.path.endswith("3.png") and "Error" in failure.error
    assert items[6][1].shape == (3, 4, 3) and items[6][1][0, 0, 0] == pytest.approx(60 / 255)


def test_truncated_jpeg_is_a_failure_not_an_exception(tmp_path):
    path = tmp_path / "t.jpg"
    Image.new("RGB", (64, 48), (200, 10, 10)).save(path, format="JPEG")
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(OSError):
        read_image(path, _identity)
    [(index, item)] = list(decode_stream([(5, str(path))], _identity))
    assert index == 5 and isinstance(item, LoadFailure)


def test_shape_batches_group_by_shape_and_pad():
    a, b = np.ones((2, 3, 3), np.float32), np.zeros((3, 2, 3), np.float32)
    stream = [(0, a), (1, b), (2, a), (3, LoadFailure(3, "x", "bad")), (4, a), (5, b)]
    failures = []
    batches = list(shape_batches(stream, 2, failures.append))
    assert [f.index for f in failures] == [3]
    shapes = [(bt.images.shape, bt.indices.tolist()) for bt in batches]
    assert ((2, 2, 3, 3), [0, 2]) in shapes
    assert ((2, 3, 2, 3), [1, 5]) in shapes
    assert ((2, 2, 3, 3), [4, -1]) in shapes  # padded
    padded = next(bt for bt in batches if bt.indices[1] == -1)
    assert padded.num_valid == 1 and not padded.images[1].any()
    assert sorted(i for bt in batches for i in bt.indices if i >= 0) == [0, 1, 2, 4, 5]


def test_groups_flush_partial_batches():
    a = np.ones((2, 2, 3), np.float32)
    stream = [(i, a) for i in range(5)]
    batches = list(shape_batches(stream, 4, lambda f: None, group_of=lambda i: i // 2))
    assert [bt.indices.tolist() for bt in batches] == [[0, 1, -1, -1], [2, 3, -1, -1], [4, -1, -1, -1]]
    with pytest.raises(ValueError, match="batch_size"):
        list(shape_batches(stream, 0, lambda f: None))


def _shorter_side_512(image):
    """CosPlace's evaluation resize (shorter side 512, aspect kept), without normalization."""
    scale = 512 / min(image.size)
    size = (int(image.width * scale), int(image.height * scale))
    return np.asarray(image.resize(size, Image.Resampling.BILINEAR), np.float32) / 255.0


def test_a_huge_image_is_skipped_naming_it_and_batches_stay_within_the_pixel_budget(tmp_path):
    normal, huge = tmp_path / "normal.png", tmp_path / "huge.png"
    _write(normal, (640, 480), 100)  # -> 682 x 512
    _write(huge, (20000, 200), 50)  # -> 51200 x 512: 26 Mpx, 315 MB as float32
    items = [(0, str(normal)), (1, str(huge)), (2, str(normal))]
    failures = []
    batches = list(load_batches(items, _shorter_side_512, 8, failures.append, num_workers=2))
    assert [f.index for f in failures] == [1]
    assert failures[0].path == str(huge) and "ImageTooLargeError" in failures[0].error
    assert "51200x512" in failures[0].error and "20000x200" in failures[0].error
    budget = batch_pixel_budget(8)
    assert budget == 8 * 2**20
    assert [bt.indices.tolist() for bt in batches] == [[0, 2, -1, -1, -1, -1, -1, -1]]
    assert all(bt.images.shape[0] * bt.images.shape[1] * bt.images.shape[2] <= budget for bt in batches)


def test_pixel_budget_gives_large_shapes_fewer_rows_in_device_multiples():
    small, large = np.ones((2, 3, 3), np.float32), np.ones((4, 6, 3), np.float32)  # 6 and 24 pixels
    stream = [(i, small if i % 2 else large) for i in range(8)]
    batches = list(shape_batches(stream, 4, lambda f: None, max_batch_pixels=48, row_multiple=2))
    rows = {bt.images.shape[1:3]: bt.images.shape[0] for bt in batches}
    assert rows == {(2, 3): 4, (4, 6): 2}  # 48 // 6 = 8 -> capped at 4; 48 // 24 = 2
    assert sorted(i for bt in batches for i in bt.indices if i >= 0) == list(range(8))
    failures = []
    list(shape_batches([(0, large)], 4, failures.append, max_batch_pixels=47, row_multiple=2))
    assert len(failures) == 1 and "ImageTooLargeError" in failures[0].error  # 2 rows of 24 px > 47
    with pytest.raises(ValueError, match="multiple of row_multiple"):
        list(shape_batches(stream, 3, lambda f: None, row_multiple=2))
    with pytest.raises(ImageTooLargeError, match="more than one batch may hold"):
        check_pixels((10, 10, 3), 99)
