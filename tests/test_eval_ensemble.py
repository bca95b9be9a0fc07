"""``--attention_dir A,B``: each source and their mean map evaluated in one run, on a tiny synthetic benchmark of
real JPEGs with two hand-made attention folders (oracle grids, and points written here, one query left out)."""

import json
import subprocess
import sys
from dataclasses import replace

import jax.numpy as jnp
import numpy as np
import pytest

from attllm_jax.attention.maps import MeanAttention, attention_maps
from attllm_jax.attention.parse import parse_answer
from attllm_jax.attention.store import make_record
from attllm_jax.data.dataset import load_image_set
from attllm_jax.data.loading import read_model_input
from attllm_jax.data.synthetic import SyntheticConfig, generate_benchmark
from attllm_jax.evaluation import EvalConfig, random_cosplace_model, run_evaluation
from attllm_jax.evaluation.attention_source import load_query_attention
from attllm_jax.evaluation.demo import write_oracle_attention
from attllm_jax.evaluation.ensemble import ensemble_answers
from attllm_jax.evaluation.extract import extract_queries
from attllm_jax.files import atomic_write_json
from tests.marks import slow_after

TINY = SyntheticConfig(num_streets=3, street_length_m=60.0, num_queries=10, image_height=72, image_width=96, seed=5)
ALPHAS = (0.0, 0.5, 1.0)


def _points_folder(queries, directory, skip: str):
    """Two-point answers for every query but ``skip`` (its file is missing: the ensemble uses the other source)."""
    directory.mkdir()
    for i, rel in enumerate(queries.paths):
        if rel == skip:
            continue
        answer = [{"center": [0.2 + 0.05 * i, 0.7], "weight": 2.0}, {"center": [0.8, 0.2], "weight": 0.1}]
        record = make_record(
            image_path=rel, model="hand", raw_text=json.dumps(answer), parsed=parse_answer(answer),
            provider="hand", prompt_id="hand", prompt_version="1", city="synthetic",
        )  # fmt: skip
        atomic_write_json(directory / f"{rel[:-4]}.json", record)
    return directory


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ensemble")
    bench = generate_benchmark(root / "cache", TINY)
    queries = load_image_set(bench.queries)
    a = write_oracle_attention(bench, root / "att_a")
    b = _points_folder(queries, root / "att_b", skip=queries.paths[0])
    config = EvalConfig(
        database_folder=str(bench.database), queries_folder=str(bench.queries), output_dir=str(root / "one"),
        attention_dir=str(a), alphas=ALPHAS, recall_values=(1, 5, 10), image_size=64,
    )  # fmt: skip
    model = random_cosplace_model(0)
    single = run_evaluation(config, model=model)
    both = run_evaluation(replace(config, output_dir=str(root / "two"), attention_dirs=(str(a), str(b))), model=model)
    return bench, queries, config, model, single, both, (a, b), root


def test_one_source_is_unchanged_and_each_source_and_the_ensemble_are_reported(setup):
    _, queries, config, model, single, both, (a, b), _ = setup
    assert "attention_sources" not in single.results
    np.testing.assert_array_equal(both.query_descriptors, single.query_descriptors)  # the top level is A's
    np.testing.assert_array_equal(both.retrieval.predictions, single.retrieval.predictions)
    assert both.results["recalls"] == single.results["recalls"]
    entry = both.results["attention_sources"]
    assert entry["sources"] == [str(a), str(b)]
    assert entry["per_source"][0]["recalls"] == single.results["recalls"]
    only_b = run_evaluation(replace(config, output_dir=str(setup[-1] / "b"), attention_dir=str(b)), model=model)
    assert entry["per_source"][1]["recalls"] == only_b.results["recalls"]
    assert entry["per_source"][1]["counts"]["missing"] == 1
    for part in (*entry["per_source"], entry["ensemble"]):
        assert list(part["recalls"]) == list(single.results["recalls"])
        assert all(list(row) == ["1", "5", "10"] for row in part["recalls"].values())
    with_a = int(single.results["attention"]["queries_with_attention"])
    # query 0 has only A's answer (B's file is missing); every other query has both (or only B where A says none)
    assert entry["ensemble"]["sources_per_query"]["2"] == with_a - 1
    assert sum(entry["ensemble"]["sources_per_query"].values()) == len(queries)
    assert entry["ensemble"]["recalls"] != entry["per_source"][0]["recalls"]  # B changed something


def test_ensemble_descriptors_equal_the_explicitly_averaged_map(setup):
    bench, queries, config, model, *_ = setup
    a, b = setup[6]
    sources = [load_query_attention(queries, d) for d in (a, b)]
    answers = ensemble_answers(sources)
    assert len(answers[0].parts) == 1  # B has no file for query 0: A's map alone
    got = extract_queries(model, queries, answers, ALPHAS, batch_size=4, image_size=64)
    for q in (0, 1, 2):
        image = read_model_input(queries.absolute(q), model, 64)
        feats = model.features(image[None])
        height, width = model.feature_grid(feats)
        answered = [s.parsed[q] for s in sources if s.parsed[q] is not None and s.parsed[q].has_attention]
        maps = [np.asarray(attention_maps([answer], height, width))[0] for answer in answered]
        mean = np.mean(maps, axis=0)  # the explicit per-location mean
        want = np.asarray(model.aggregate_sweep(feats, jnp.asarray(mean[None]), ALPHAS))[:, 0]
        np.testing.assert_allclose(got.descriptors[:, q], want, atol=2e-6, rtol=0)  # float32 round-off only


def test_mean_attention_renders_the_mean_of_its_parts():
    p = parse_answer([{"center": [0.3, 0.3], "weight": 2.0}])
    g = parse_answer({"A1": 0.1, "B2": 1.8})
    maps = np.asarray(attention_maps([MeanAttention((p, g)), MeanAttention((g,)), MeanAttention(()), None], 6, 8))
    want = (np.asarray(attention_maps([p], 6, 8))[0] + np.asarray(attention_maps([g], 6, 8))[0]) / 2
    np.testing.assert_allclose(maps[0], want, atol=1e-7)
    np.testing.assert_array_equal(maps[1], np.asarray(attention_maps([g], 6, 8))[0])
    np.testing.assert_array_equal(maps[2:], 1.0)


@pytest.mark.parametrize(
    ("value", "message"),
    slow_after([("{a},{missing}", "entry 2 '{missing}' is not a directory"), ("{a},,{b}", "entry 2 is empty")]),
)
def test_bad_attention_dir_lists_are_one_error_line_before_any_work(setup, tmp_path, value, message):
    bench, *_ = setup
    a, b = setup[6]
    fill = {"a": a, "b": b, "missing": tmp_path / "nope"}
    cmd = [
        sys.executable, "-m", "experiments.eval", "--database_folder", str(bench.database),
        "--queries_folder", str(bench.queries), "--attention_dir", value.format(**fill),
        "--output_dir", str(tmp_path / "out"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("eval: error:")]
    assert proc.returncode != 0 and len(errors) == 1, proc.stderr
    assert message.format(**fill) in errors[0]
    assert not (tmp_path / "out").exists()  # before any work
