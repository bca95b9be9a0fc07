"""Tests for attllm_jax.attention.maps against a NumPy transcription of docs/DESIGN.md "Attention maps"."""

import numpy as np
import pytest

from attllm_jax.attention import maps, parse, store
from attllm_jax.files import atomic_write_json
from tests.compile_log import logged_compiles
from tests.data.llm_answers import CASES, PUBLISHED_FILES


def rbf_reference(centers, weights, height, width, sigma):
    """A(y, x) = sum_i softmax_i(-|(x, y) - c_i|^2 / (2 sigma^2)) w_i, clamped to [0, 2]; ones if no point."""
    if len(centers) == 0:
        return np.ones((height, width))
    centers = np.clip(np.asarray(centers, np.float64), 0, 1)
    weights = np.clip(np.asarray(weights, np.float64), 0, 2)
    ys, xs = np.linspace(0, 1, height), np.linspace(0, 1, width)
    out = np.zeros((height, width))
    for i, y in enumerate(ys):
        for j, x in enumerate(xs):
            logits = -((x - centers[:, 0]) ** 2 + (y - centers[:, 1]) ** 2) / (2 * sigma**2)
            soft = np.exp(logits - logits.max())
            out[i, j] = np.clip((soft / soft.sum()) @ weights, 0, 2)
    return out


def grid_reference(grid, height, width):
    """Sharp cells: cell k spans round(k*h/n) .. round((k+1)*h/n) (half to even), the last to the edge."""
    grid = np.asarray(grid)
    n = grid.shape[0]

    def index(size):
        idx = np.full(size, n - 1)
        for k in range(n - 1):
            idx[round(k * size / n) : round((k + 1) * size / n)] = k
        return idx

    return grid[index(height)][:, index(width)]


def test_maps_match_reference():
    answers = [
        parse.parse_answer(CASES[0][1]),
        None,
        parse.parse_answer("None"),
        parse.parse_answer('{"A1": 0.5, "B2": 1.5, "C3": 2.0}'),
        parse.parse_answer("garbage"),
        parse.parse_answer('[{"center": [1.4, -0.2], "weight": 5, "reasoning": "clamped"}]'),
    ]
    h, w = 7, 10
    out = np.asarray(maps.attention_maps(answers, h, w, sigma=0.2))
    assert out.shape == (6, h, w) and out.dtype == np.float32
    np.testing.assert_allclose(
        out[0], rbf_reference([[0.25, 0.4], [0.7, 0.55], [0.5, 0.9]], [1.8, 1.2, 0.1], h, w, 0.2), atol=1e-5
    )
    for b in (1, 2, 4):
        np.testing.assert_array_equal(out[b], np.ones((h, w)))
    np.testing.assert_allclose(out[3], grid_reference([[0.5, 1, 1], [1, 1.5, 1], [1, 1, 2]], h, w), atol=1e-6)
    np.testing.assert_allclose(out[5], np.full((h, w), 2.0), atol=1e-6)  # one point: constant = its weight
    np.testing.assert_array_equal(maps.attention_mask(answers), [True, False, False, True, False, True])


def test_sigma_and_grid_interpolate():
    points = parse.parse_answer("[[0.1, 0.1, 2.0], [0.9, 0.9, 0.0]]")
    grid = parse.parse_answer('{"A1": 0.0, "A2": 2.0, "B1": 2.0, "B2": 0.0}')
    sharp = np.asarray(maps.attention_maps([points, grid], 6, 6, sigma=0.1))
    smooth = np.asarray(maps.attention_maps([points, grid], 6, 6, sigma=0.1, grid_interpolate=True))
    np.testing.assert_allclose(sharp[0], rbf_reference([[0.1, 0.1], [0.9, 0.9]], [2.0, 0.0], 6, 6, 0.1), atol=1e-5)
    np.testing.assert_allclose(sharp[1], grid_reference([[0, 2], [2, 0]], 6, 6))
    # align_corners=False bilinear from 2 to 6: edge pixels copy the cell; pixel 2 samples source 1/3.
    assert smooth[1, 0, 0] == 0.0 and smooth[1, 0, 5] == 2.0
    np.testing.assert_allclose(smooth[1, 2, 2], 2.0 * (2 / 3 * 1 / 3 + 1 / 3 * 2 / 3), atol=1e-6)


def test_no_recompile_for_new_answers():
    first = [parse.parse_answer(CASES[0][1]), parse.parse_answer('{"A1": 0.5, "B2": 1.5}'), None]
    second = [None, parse.parse_answer("[[0.2, 0.2, 0.3]]"), parse.parse_answer('{"A1": 1.5, "B1": 0.1}')]
    maps.attention_maps(first, 5, 5)
    with logged_compiles() as compiles:
        maps.attention_maps(second, 5, 5)
    assert not compiles, [m[:120] for m in compiles]
    # positive control: the same check sees the compile of a new grid shape
    with logged_compiles() as compiles:
        maps.attention_maps(second, 5, 7)
    assert compiles


def test_empty_batch_raises():
    with pytest.raises(ValueError, match="at least one"):
        maps.attention_maps([], 4, 4)
    with pytest.raises(ValueError, match="positive"):
        maps.attention_maps([None], 0, 4)


def test_published_file_and_ours_give_same_map(tmp_path):
    """The files provider's reader yields the same map for the published format and for ours."""
    _, published, _ = PUBLISHED_FILES[0]
    (tmp_path / "published.json").write_text(__import__("json").dumps(published))
    parsed = store.read_attention_file(tmp_path / "published.json")
    ours = store.make_record(
        image_path="q.jpg",
        model="gemini-2.5-flash",
        raw_text=__import__("json").dumps(published["result"]),
        parsed=parsed,
        provider="gemini",
        prompt_id="axis_focus",
        prompt_version="1",
        city="San Francisco",
    )
    atomic_write_json(tmp_path / "ours.json", ours)
    a = maps.attention_maps([store.read_attention_file(tmp_path / "published.json")], 8, 8)
    b = maps.attention_maps([store.read_attention_file(tmp_path / "ours.json")], 8, 8)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(a), 1.0)
