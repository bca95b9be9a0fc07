"""Tests for the prompts registry (attllm_jax.attention.prompts)."""

import pytest
from google.genai import types

from attllm_jax.attention import parse, prompts


def test_registry_and_versions():
    assert {"axis_focus", "axis_minimal", "grid"} <= set(prompts.PROMPTS)
    for prompt in prompts.PROMPTS.values():
        assert prompt.version and prompt.answer in ("points", "grid") and prompt.description
    with pytest.raises(KeyError, match="known prompts: axis_focus"):
        prompts.get_prompt("nope")


def test_axis_prompt_contract():
    text = prompts.get_prompt("axis_focus").render("  Hong Kong ")
    assert "Hong Kong" in text and "{" not in text.replace('{"center"', "").replace("}, ...]", "")
    for needle in ("None", "3 to 8", "1.6 to 2.0", "1.0 to 1.5", "0.3 to 0.9", "0.0 to 0.2", "floodwater", "rulers"):
        assert needle in text, needle
    assert '"center": [x, y], "weight": w, "reasoning"' in text
    minimal = prompts.get_prompt("axis_minimal").render("Hong Kong")
    assert len(minimal) < len(text) / 2 and "None" in minimal and "Hong Kong" in minimal


@pytest.mark.parametrize("n", [3, 4])
def test_grid_prompt_and_schema(n):
    prompt = prompts.get_prompt("grid")
    text = prompt.render("Paris", grid_size=n)
    last = parse.grid_labels(n)[-1]
    assert f"{n} x {n}" in text and f'"{last}": w' in text and f"all {n * n} cells" in text
    schema = prompt.response_schema(n)
    assert schema["required"] == parse.grid_labels(n)
    types.Schema.model_validate(schema)  # a schema the SDK accepts


def test_points_schema_accepted_by_sdk():
    schema = types.Schema.model_validate(prompts.get_prompt("axis_focus").response_schema())
    assert schema.nullable and schema.items.required == ["center", "weight", "reasoning"]


@pytest.mark.parametrize("city, n", [("", 4), ("   ", 4), ("Paris", 1), ("Paris", 27)])
def test_bad_render_arguments(city, n):
    with pytest.raises(ValueError):
        prompts.get_prompt("grid").render(city, grid_size=n)
