"""Thread-pool decoding and shape-grouped, padded batches."""

import numpy as np
import pytest
from PIL import Image

from attllm_jax.data.loading import LoadFailure, decode_stream, read_image, shape_batches


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
