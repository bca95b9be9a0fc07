"""The per-image attention file format (attllm_jax.attention.store): every file is untrusted input, read once,
and the dropped / clamped counts survive the round trip through our files."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from attllm_jax.attention import parse, providers, store
from tests.data.llm_answers import PUBLISHED_FILES


def _write(path, text: str | bytes):
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def _points(n: int) -> list[dict]:
    return [{"center": [(i % 10) / 10, (i // 10 % 10) / 10], "weight": 1.5, "reasoning": f"r{i}"} for i in range(n)]


@pytest.mark.parametrize("depth", [5000, 200, store.MAX_DEPTH + 1])
def test_deeply_nested_file_is_invalid_not_fatal(tmp_path, depth):
    """5000 levels exceed Python's recursion limit inside json.loads; 200 and 33 load but exceed ours."""
    path = _write(tmp_path / "deep.json", "[" * depth + "]" * depth)
    parsed = store.read_attention_file(path)
    assert parsed.kind == "invalid" and str(path) in parsed.error and "nested deeper" in parsed.error
    as_record = _write(tmp_path / "deep_record.json", '{"result": ' + "[" * depth + "]" * depth + "}")
    assert store.read_attention_file(as_record).kind == "invalid"


def test_depth_at_the_limit_is_read(tmp_path):
    # A point answer is 4 levels deep (list, point, center); MAX_DEPTH levels of lists are still read (and the
    # parser, not the reader, rejects this one).
    depth = store.MAX_DEPTH
    parsed = store.read_attention_file(_write(tmp_path / "ok.json", "[" * depth + "]" * depth))
    assert parsed.kind == "invalid" and "nested deeper" not in parsed.error


def test_size_and_value_count_limits(tmp_path):
    big = json.dumps({"result": _points(3), "padding": "x" * store.MAX_FILE_BYTES})
    parsed = store.read_attention_file(_write(tmp_path / "big.json", big))
    assert parsed.kind == "invalid" and "larger than" in parsed.error and "big.json" in parsed.error
    many = json.dumps([0] * (store.MAX_VALUES + 1))
    assert len(many) < store.MAX_FILE_BYTES
    parsed = store.read_attention_file(_write(tmp_path / "many.json", many))
    assert parsed.kind == "invalid" and f"more than {store.MAX_VALUES} values" in parsed.error


@pytest.mark.parametrize(
    "content, message",
    [
        ("3.5", "holds a JSON float"),
        ('"None"', "holds a JSON str"),
        ("null", "holds a JSON NoneType"),
        ('{"no_weighting": "yes", "result": null}', "no_weighting must be true or false"),
        ('{"format": "attllm_jax.attention/1", "status": "great", "result": []}', "status must be one of"),
        (
            '{"format": "attllm_jax.attention/1", "status": "valid", "num_dropped": -1, "result": [[0.1, 0.2, 1.0]]}',
            "num_dropped must be a non-negative integer",
        ),
        (
            '{"format": "attllm_jax.attention/1", "status": "valid", "num_clamped": "2", "result": [[0.1, 0.2, 1.0]]}',
            "num_clamped must be a non-negative integer",
        ),
        (b"\xff\xfe[1, 2]", "is not UTF-8 text"),
        ('{"result": [1, 2', "is not valid JSON"),
    ],
)
def test_type_limits(tmp_path, content, message):
    path = _write(tmp_path / "bad.json", content)
    parsed = store.read_attention_file(path)
    assert parsed.kind == "invalid" and message in parsed.error and str(path) in parsed.error
    read = store.read_attention(path)
    assert read.record is None and read.parsed.error == parsed.error
    assert store.file_status(path) == "invalid"
    with pytest.raises(store.AttentionFileError, match=message):
        store.load_record(path)


def test_published_files_still_read(tmp_path):
    for i, (_, record, expected) in enumerate(PUBLISHED_FILES):
        parsed = store.read_attention_file(_write(tmp_path / f"p{i}.json", json.dumps(record)))
        assert parsed.kind == expected["kind"], record


def test_counts_of_dropped_and_clamped_points(tmp_path):
    """A 500-point answer uses 8, a NaN point is dropped, a weight of 1e6 is clamped: in the parsed answer, and
    still after our annotation file kept 32 points of it and the evaluation reads it with 8 slots."""
    answer = _points(498) + [{"center": [math.nan, 0.5], "weight": 1.0}, {"center": [0.5, 0.5], "weight": 1e6}]
    raw = json.dumps(answer)  # NaN is written as the bare token NaN, as a model in JSON mode can
    direct = parse.parse_answer(raw, max_points=8)
    assert (direct.num_points, direct.num_dropped, direct.num_clamped) == (8, 492, 0)
    # The clamped and the NaN point are beyond the first 8; put them first to see them counted.
    reordered = answer[-2:] + answer[:-2]
    direct = parse.parse_answer(json.dumps(reordered), max_points=8)
    assert (direct.num_points, direct.num_dropped, direct.num_clamped) == (8, 492, 1)
    assert direct.weights[0] == 2.0

    kept = parse.parse_answer(json.dumps(reordered), max_points=store.STORE_MAX_POINTS)
    assert (kept.num_points, kept.num_dropped, kept.num_clamped) == (32, 468, 1)
    record = store.make_record(
        image_path="q.jpg",
        model="m",
        raw_text=json.dumps(reordered),
        parsed=kept,
        provider="gemini",
        prompt_id="axis_focus",
        prompt_version="1",
        city="c",
    )
    ours = _write(tmp_path / "ours.json", json.dumps(record))
    read = store.read_attention_file(ours, max_points=8)
    assert (read.num_points, read.num_dropped, read.num_clamped) == (8, 492, 1)
    np.testing.assert_array_equal(read.centers, direct.centers)
    np.testing.assert_array_equal(read.weights, direct.weights)
    published = _write(tmp_path / "published.json", json.dumps({**PUBLISHED_FILES[0][1], "result": reordered}))
    read = store.read_attention_file(published, max_points=8)
    assert (read.num_points, read.num_dropped, read.num_clamped) == (8, 492, 1)


def test_invalid_counts_are_not_doubled(tmp_path):
    """Our invalid files keep the raw text; its counts come from reading it again, not added twice."""
    bad = parse.parse_answer('[{"center": [0.1], "weight": 1}, {"weight": 2}]')
    assert bad.kind == "invalid" and bad.num_dropped == 2
    record = store.make_record(
        image_path="q.jpg",
        model="m",
        raw_text='[{"center": [0.1], "weight": 1}, {"weight": 2}]',
        parsed=bad,
        provider="gemini",
        prompt_id="axis_focus",
        prompt_version="1",
        city="c",
    )
    assert store.read_attention_file(_write(tmp_path / "q.json", json.dumps(record))).num_dropped == 2


def test_existing_answers_read_each_file_once(tmp_path, monkeypatch):
    """The files provider hands over the answer parsed from the record, without re-serializing it."""
    source = tmp_path / "source"
    source.mkdir()
    _write(source / "q0.json", json.dumps(PUBLISHED_FILES[0][1]))
    _write(source / "q1.json", "[" * 5000 + "]" * 5000)
    loads = []
    real = store.load_record
    monkeypatch.setattr(store, "load_record", lambda path: loads.append(path) or real(path))
    dumps = []
    real_dumps = json.dumps
    monkeypatch.setattr(json, "dumps", lambda *a, **k: dumps.append(a) or real_dumps(*a, **k))
    reader = providers.ExistingAnswers(source)
    response = reader.generate(providers.AnnotationRequest("q0.jpg", None, "prompt"))
    assert loads == [source / "q0.json"] and dumps == []
    assert response.attempts == 0 and response.model == "gemini-2.5-flash"
    want = store.read_attention_file(source / "q0.json", store.STORE_MAX_POINTS)
    np.testing.assert_array_equal(response.parsed.centers, want.centers)
    assert response.parsed.kind == "points" and response.parsed.num_points == 3
    deep = reader.generate(providers.AnnotationRequest("q1.jpg", None, "prompt"))
    assert deep.parsed.kind == "invalid" and "nested deeper" in deep.parsed.error
    with pytest.raises(providers.ProviderError, match="no attention file for q2.jpg"):
        reader.generate(providers.AnnotationRequest("q2.jpg", None, "prompt"))


def test_list_attention_files(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / ".hidden").mkdir()
    for name in ("a.json", "sub/b.json", store.SUMMARY_FILE, ".a.json.x1.tmp", ".hidden/c.json", "notes.txt"):
        _write(tmp_path / name, "{}")
    _write(tmp_path / "sub" / store.SUMMARY_FILE, "{}")  # only the top-level summary is the run's
    assert store.list_attention_files(tmp_path) == ["a.json", f"sub/{store.SUMMARY_FILE}", "sub/b.json"]


def test_readme_example_file_reads_as_documented(tmp_path):
    """The example attention file of the README is a valid file of our format, with the answer it shows."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Attention files", 1)[1]
    example = section.split("```json\n", 1)[1].split("```", 1)[0]
    path = _write(tmp_path / "example.json", example)
    read = store.read_attention(path)
    assert read.record["format"] == store.FORMAT and read.record["status"] == "valid"
    assert read.parsed.kind == "points" and read.parsed.num_points == 2
    np.testing.assert_allclose(read.parsed.centers[:2], [[0.25, 0.4], [0.5, 0.9]])
    np.testing.assert_allclose(read.parsed.weights[:2], [1.8, 0.1])
    grid = section.split('`"result": ', 1)[1].split("}`", 1)[0] + "}"
    parsed = store.parse_record({"result": json.loads(grid)})
    np.testing.assert_allclose(parsed.grid, [[0.1, 1.8], [1.0, 0.2]])
    assert store.parse_record({"no_weighting": True, "result": None}).kind == "none"
