"""The evaluation's view of an attention folder (attllm_jax.evaluation.attention_source) and what the eval writes
about it: hostile files are counted as invalid, never fatal; dropped and clamped points are counted per query in
per_query.csv and results.json; files of images outside the query set are listed as unused."""

import csv
import json
import math
import shutil
from pathlib import Path

import pytest

from attllm_jax.attention import store
from attllm_jax.data.synthetic import SyntheticConfig, generate_benchmark
from attllm_jax.evaluation import EvalConfig, run_evaluation
from attllm_jax.evaluation.attention_source import load_query_attention
from tests.data.llm_answers import PUBLISHED_FILES

TINY = SyntheticConfig(num_streets=2, street_length_m=60.0, num_queries=5, image_height=72, image_width=96, seed=7)


class _Queries:
    def __init__(self, paths):
        self.paths = list(paths)

    def __len__(self):
        return len(self.paths)


def _crowded_answer() -> list[dict]:
    """502 entries: a NaN point (dropped), a point of weight 1e6 (clamped to 2), then 500 ordinary points."""
    ordinary = [{"center": [(i % 10) / 10, (i // 10 % 10) / 10], "weight": 1.2, "reasoning": "x"} for i in range(500)]
    return [{"center": [math.nan, 0.5], "weight": 1.0}, {"center": [0.5, 0.5], "weight": 1e6}] + ordinary


def _published(result) -> str:
    return json.dumps({**PUBLISHED_FILES[0][1], "no_weighting": result is None, "result": result})


def write_attention(folder: Path, stems: list[str]) -> Path:
    """stems[0]: 502 entries; stems[1]: 5000-deep arrays; stems[2]: 3 points; stems[3]: no file; stems[4]: None.
    Plus two files for images that are not queries, the run summary and a temporary file of a killed write."""
    folder.mkdir(parents=True)
    (folder / f"{stems[0]}.json").write_text(_published(_crowded_answer()))
    (folder / f"{stems[1]}.json").write_text('{"result": ' + "[" * 5000 + "]" * 5000 + "}")
    (folder / f"{stems[2]}.json").write_text(_published(PUBLISHED_FILES[0][1]["result"]))
    (folder / f"{stems[4]}.json").write_text(_published(None))
    (folder / "not_a_query.json").write_text(_published(None))
    (folder / "old").mkdir()
    (folder / "old" / "elsewhere.json").write_text(_published(None))
    (folder / store.SUMMARY_FILE).write_text("{}")
    (folder / f".{stems[2]}.json.abc123.tmp").write_text("{")
    return folder


def test_hostile_files_counted_and_unused_files_listed(tmp_path):
    stems = [f"q{i}" for i in range(5)]
    folder = write_attention(tmp_path / "attention", stems)
    attention = load_query_attention(_Queries(f"{s}.jpg" for s in stems), folder, max_points=8)
    assert attention.counts == {"points": 2, "grid": 0, "none": 1, "invalid": 1, "missing": 1}
    ((invalid),) = attention.invalid
    assert invalid["query"] == "q1.jpg" and "nested deeper" in invalid["error"] and "q1.json" in invalid["error"]
    assert attention.missing == ["q3.jpg"]
    assert attention.unused == ["not_a_query.json", "old/elsewhere.json"]
    assert attention.point_counts() == [(8, 494, 1), (0, 0, 0), (3, 0, 0), (0, 0, 0), (0, 0, 0)]
    assert attention.adjusted([f"{s}.jpg" for s in stems]) == [
        {"query": "q0.jpg", "points": 8, "dropped": 494, "clamped": 1}
    ]


def test_unreadable_file_is_counted_not_fatal(tmp_path):
    folder = tmp_path / "attention"
    folder.mkdir()
    (folder / "q0.json").write_text(_published(None))
    (folder / "q1.json").symlink_to(folder / "missing_target.json")  # is_file() is False: no file for q1
    (folder / "q2.json").write_bytes(b"\x00" * (store.MAX_FILE_BYTES + 10))
    attention = load_query_attention(_Queries(["q0.jpg", "q1.jpg", "q2.jpg"]), folder)
    assert attention.counts["none"] == 1 and attention.counts["missing"] == 1 and attention.counts["invalid"] == 1
    assert "larger than" in attention.invalid[0]["error"]


def test_eval_counts_dropped_clamped_invalid_and_unused(tmp_path):
    """The whole evaluation runs through a 5000-deep file and reports the per-query counts."""
    bench = generate_benchmark(tmp_path / "cache", TINY)
    database, queries = tmp_path / "database", tmp_path / "queries"
    shutil.copytree(bench.database, database)
    shutil.copytree(bench.queries, queries)
    stems = sorted(p.stem for p in queries.glob("*.jpg"))
    att = write_attention(tmp_path / "attention", stems)
    out = tmp_path / "out"
    config = EvalConfig(
        database_folder=str(database),
        queries_folder=str(queries),
        output_dir=str(out),
        attention_dir=str(att),
        alphas=(0.0, 0.5),
        recall_values=(1, 5),
        positive_dist_threshold=25,
        image_size=64,
        batch_size=8,
        store_dir=str(tmp_path / "store"),
    )
    run_evaluation(config)
    res = json.loads((out / "results.json").read_text())["attention"]
    assert res["counts"] == {"points": 2, "grid": 0, "none": 1, "invalid": 1, "missing": 1}
    (unusable,) = res["unusable_files"]
    assert unusable["query"] == f"{stems[1]}.jpg" and "nested deeper" in unusable["error"]
    assert res["unused_files"] == ["not_a_query.json", "old/elsewhere.json"]
    assert res["dropped_entries"] == 494 and res["clamped_values"] == 1
    assert res["adjusted_answers"] == [{"query": f"{stems[0]}.jpg", "points": 8, "dropped": 494, "clamped": 1}]
    with open(out / "per_query.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * len(stems)
    by_query = {(r["alpha"], r["query"]): r for r in rows}
    for alpha in ("0.0", "0.5"):
        crowded = by_query[(alpha, f"{stems[0]}.jpg")]
        assert (crowded["attention"], crowded["attention_points"]) == ("points", "8")
        assert (crowded["attention_dropped"], crowded["attention_clamped"]) == ("494", "1")
        plain = by_query[(alpha, f"{stems[2]}.jpg")]
        assert (plain["attention_points"], plain["attention_dropped"], plain["attention_clamped"]) == ("3", "0", "0")
        deep = by_query[(alpha, f"{stems[1]}.jpg")]
        assert deep["attention"] == "invalid" and deep["attention_points"] == "0"


@pytest.mark.parametrize("bad", ["[" * 5000 + "]" * 5000, "\ufeff{"])
def test_one_bad_file_among_good_ones(tmp_path, bad):
    folder = tmp_path / "attention"
    folder.mkdir()
    for i in range(3):
        (folder / f"q{i}.json").write_text(_published(PUBLISHED_FILES[0][1]["result"]))
    (folder / "q3.json").write_text(bad)
    attention = load_query_attention(_Queries([f"q{i}.jpg" for i in range(4)]), folder)
    assert attention.counts["points"] == 3 and attention.counts["invalid"] == 1
    assert [p.kind for p in attention.parsed] == ["points", "points", "points", "invalid"]
