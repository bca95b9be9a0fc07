"""Tests for the attention picture (attllm_jax.attention.visualize)."""

import numpy as np
import pytest
from PIL import Image

from attllm_jax.attention import maps, parse, visualize
from tests.data.llm_answers import POINTS_3


@pytest.mark.parametrize(
    "answer, kind",
    [(POINTS_3, "points"), ('{"A1": 0.1, "B2": 1.9, "C3": 0.5}', "grid"), ("None", "none"), ("garbage", "invalid")],
)
def test_render_attention_writes_the_map_it_draws(tmp_path, answer, kind):
    photo = Image.new("RGB", (160, 120), (90, 120, 150))
    parsed = parse.parse_answer(answer)
    assert parsed.kind == kind
    out = tmp_path / "q.png"
    heat = visualize.render_attention(photo, parsed, out, title="q.jpg", map_resolution=40)
    assert heat.shape == (30, 40)
    np.testing.assert_allclose(heat, np.asarray(maps.attention_maps([parsed], 30, 40))[0])
    image = Image.open(out)
    assert image.format == "PNG" and image.width >= 600
    pixels = np.asarray(image.convert("RGB")).astype(int)
    # A heat overlay tints the flat photo: warm where the map is high, cool where it is low.
    if kind == "points":
        assert heat.max() > 1.5 and heat.min() < 0.5
    if kind in ("none", "invalid"):
        np.testing.assert_array_equal(heat, 1.0)
    assert pixels.std() > 5
