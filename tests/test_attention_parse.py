"""Tests for attllm_jax.attention.parse (LLM answers -> fixed-size arrays) and the corpus of answers."""

import json

import numpy as np
import pytest

from attllm_jax.attention import parse, store
from tests.data.llm_answers import CASES, PUBLISHED_FILES


def check_expected(parsed: parse.ParsedAttention, expected: dict, max_points: int = 8) -> None:
    assert parsed.kind == expected["kind"], parsed.error
    assert parsed.centers.shape == (max_points, 2) and parsed.centers.dtype == np.float32
    assert parsed.weights.shape == (max_points,) and parsed.weights.dtype == np.float32
    assert parsed.valid.shape == (max_points,) and parsed.valid.dtype == bool
    assert len(parsed.reasoning) == max_points
    if "n" in expected:
        assert parsed.num_points == expected["n"]
    if "dropped" in expected:
        assert parsed.num_dropped == expected["dropped"]
    if "clamped" in expected:
        assert parsed.num_clamped == expected["clamped"]
    n = parsed.num_points
    assert parsed.valid[:n].all() and not parsed.valid[n:].any(), "valid slots must come first"
    assert np.all(parsed.centers[n:] == 0) and np.all(parsed.weights[n:] == 0)
    if "centers" in expected:
        np.testing.assert_allclose(parsed.centers[:n], expected["centers"], atol=1e-6)
    if "weights" in expected:
        np.testing.assert_allclose(parsed.weights[:n], expected["weights"], atol=1e-6)
    if "grid" in expected:
        assert parsed.grid is not None and parsed.grid.dtype == np.float32
        np.testing.assert_allclose(parsed.grid, expected["grid"], atol=1e-6)
    else:
        assert parsed.grid is None
    if parsed.kind == "invalid":
        assert isinstance(parsed.error, str) and parsed.error
    else:
        assert parsed.error is None
    assert np.all((parsed.centers >= 0) & (parsed.centers <= 1))
    assert np.all((parsed.weights >= 0) & (parsed.weights <= 2))


@pytest.mark.parametrize("case_id, raw, expected", CASES, ids=[c[0] for c in CASES])
def test_corpus(case_id, raw, expected):
    check_expected(parse.parse_answer(raw), expected)


@pytest.mark.parametrize("case_id, record, expected", PUBLISHED_FILES, ids=[c[0] for c in PUBLISHED_FILES])
def test_published_files(case_id, record, expected, tmp_path):
    path = tmp_path / "q.json"
    path.write_text(json.dumps(record, indent=2))
    check_expected(store.read_attention_file(path), expected)
    check_expected(parse.parse_answer(record), expected)  # the wrapper is also accepted as a decoded answer


def test_max_points_configurable():
    text = json.dumps([{"center": [0.1 * i, 0.5], "weight": 1.0, "reasoning": str(i)} for i in range(5)])
    parsed = parse.parse_answer(text, max_points=3)
    assert parsed.centers.shape == (3, 2) and parsed.num_points == 3 and parsed.num_dropped == 2
    assert parsed.reasoning == ("0", "1", "2")
    parsed = parse.parse_answer(text, max_points=12)
    assert parsed.centers.shape == (12, 2) and parsed.num_points == 5 and parsed.num_dropped == 0


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "8"])
def test_bad_max_points_raises(bad):
    with pytest.raises(ValueError, match="max_points"):
        parse.parse_answer("None", max_points=bad)


def test_reasoning_kept_in_slots():
    parsed = parse.parse_answer('[{"center": [0.5, 0.5], "weight": 1.0, "reasoning": "  dome  "}]')
    assert parsed.reasoning[0] == "dome" and parsed.reasoning[1:] == ("",) * 7


def test_arrays_are_read_only():
    parsed = parse.parse_answer('[{"center": [0.5, 0.5], "weight": 1.0}]')
    with pytest.raises(ValueError):
        parsed.weights[0] = 2.0


def test_to_result_round_trip():
    for raw in [CASES[0][1], '{"A1": 0.5, "B2": 1.5}', "None"]:
        parsed = parse.parse_answer(raw)
        again = parse.parse_answer(parsed.to_result())
        assert again.kind == parsed.kind
        np.testing.assert_array_equal(again.centers, parsed.centers)
        np.testing.assert_array_equal(again.weights, parsed.weights)
        if parsed.grid is not None:
            np.testing.assert_array_equal(again.grid, parsed.grid)
    with pytest.raises(ValueError, match="invalid"):
        parse.parse_answer("garbage").to_result()


def test_grid_labels():
    assert parse.grid_labels(3) == ["A1", "A2", "A3", "B1", "B2", "B3", "C1", "C2", "C3"]
    assert parse.grid_label(3, 3) == "D4"


def test_never_raises_on_random_text():
    rng = np.random.default_rng(0)
    alphabet = list("[]{}(),:\"'0123456789.-eENnoulatrsfcwgh \n`")
    for _ in range(300):
        text = "".join(rng.choice(alphabet, size=rng.integers(0, 60)))
        parsed = parse.parse_answer(text)
        assert parsed.kind in ("points", "grid", "none", "invalid")


def test_stack_attention():
    answers = [
        parse.parse_answer(CASES[0][1]),
        None,
        parse.parse_answer("None"),
        parse.parse_answer('{"A1": 0.5, "B2": 1.5}'),
        parse.parse_answer("garbage"),
        parse.parse_answer('{"A1": 0.5, "C3": 1.5}'),
    ]
    batch = parse.stack_attention(answers)
    assert batch.centers.shape == (6, 8, 2) and batch.weights.shape == (6, 8) and batch.valid.shape == (6, 8)
    np.testing.assert_array_equal(batch.has_attention, [True, False, False, True, False, True])
    np.testing.assert_array_equal(batch.valid.sum(1), [3, 0, 0, 0, 0, 0])
    np.testing.assert_allclose(batch.centers[0, :3], [[0.25, 0.4], [0.7, 0.55], [0.5, 0.9]])
    assert batch.kinds == ("points", "none", "none", "grid", "invalid", "grid")
    assert sorted(batch.grids) == [2, 3]
    rows2, grids2 = batch.grids[2]
    np.testing.assert_array_equal(rows2, [False, False, False, True, False, False])
    np.testing.assert_allclose(grids2[3], [[0.5, 1.0], [1.0, 1.5]])
    np.testing.assert_allclose(grids2[0], np.ones((2, 2)))
    assert batch.grids[3][1].shape == (6, 3, 3)


def test_stack_attention_pads_and_rejects_overflow():
    small = parse.parse_answer('[{"center": [0.5, 0.5], "weight": 1.0}]', max_points=2)
    batch = parse.stack_attention([small, None], max_points=8)
    assert batch.centers.shape == (2, 8, 2) and batch.valid[0].sum() == 1
    many = parse.parse_answer(json.dumps([[0.1, 0.1, 1.0]] * 5), max_points=8)
    with pytest.raises(ValueError, match="max_points=4"):
        parse.stack_attention([many], max_points=4)
    empty = parse.stack_attention([None, None])
    assert empty.centers.shape == (2, 8, 2) and not empty.has_attention.any()


# Hostile answers: parsing is linear and bounded

HOSTILE = {
    "quote_brace": '"{' * 20_000,
    "brace_quote": '{"' * 20_000,
    "brace_apostrophe": "{'" * 20_000,
    "fenced_quote_brace": "```json\n" + '"{' * 20_000,
    "open_lists": "[" * 20_000 + "1",
    "unclosed_objects": '{"a": [1, 2], "b": "x' * 2_000,
}
HOSTILE_SCRIPT = """
import json, sys, time
from attllm_jax.attention import parse
from tests.test_attention_parse import HOSTILE
times = {}
for name, text in HOSTILE.items():
    start = time.monotonic()
    kind = parse.parse_answer(text).kind
    times[name] = (time.monotonic() - start, kind)
print(json.dumps(times))
"""


def test_hostile_answers_parse_in_linear_time():
    """Each answer of ~40 KB parses in well under 2 s (it took 30 s per 10 KB when the bracket scan restarted at
    every bracket). In a subprocess, killed at 60 s, so that a quadratic parser fails instead of hanging."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    result = subprocess.run(
        [sys.executable, "-c", HOSTILE_SCRIPT], cwd=repo, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr[-2000:]
    times = json.loads(result.stdout)
    assert set(times) == set(HOSTILE)
    for name, (seconds, kind) in times.items():
        assert kind == "invalid" and seconds < 2.0, (name, seconds)


def test_truncated_list_offers_its_complete_entries_and_strings_stay_strings():
    truncated = '[{"center": [0.2, 0.3], "weight": 1.8, "reasoning": "tower"}, {"center": [0.5, 0.'
    parsed = parse.parse_answer(truncated)
    assert parsed.kind == "points" and parsed.num_points == 1 and parsed.reasoning[0] == "tower"
    # A triple inside a string of a value that never closes is prose, not a point.
    assert parse.parse_answer('{"note": "see [0.1, 0.2, 1.5] for the tower", "more": ').kind == "invalid"
    assert parse._bracket_spans('x {"a": [1]} y [2, {3: 4}] ] {5}') == [(2, 12), (15, 26), (29, 32)]


def test_answers_over_the_size_cap_are_invalid_unread():
    points = '[{"center": [0.2, 0.3], "weight": 1.8, "reasoning": "tower"}]'
    padding = "Let me think. " * ((parse.MAX_ANSWER_CHARS - len(points) - 1) // 14)
    assert parse.parse_answer(padding + points).num_points == 1  # just under the cap: read
    over = parse.parse_answer(padding + "x" * 20 + points)
    assert over.kind == "invalid" and "MAX_ANSWER_CHARS" in over.error
    assert parse.parse_answer({"result": "y" * (parse.MAX_ANSWER_CHARS + 1)}).kind == "invalid"
