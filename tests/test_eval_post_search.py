"""eval's optional stages after its search on a tiny synthetic benchmark of real JPEGs: --save_descriptors (the
files are what eval searched with), --rerank (results keyed like the top-level recalls, equal to the formulas
applied to the saved files and the store) and --alpha_policy margin (label-free)."""

import json
from dataclasses import replace

import numpy as np
import pytest

from attllm_jax.data.synthetic import SyntheticConfig, generate_benchmark
from attllm_jax.evaluation import EvalConfig, random_cosplace_model, run_evaluation
from attllm_jax.evaluation.demo import write_oracle_attention
from attllm_jax.evaluation.post_search import policy_entry
from attllm_jax.retrieval import adaptive
from attllm_jax.retrieval.recall import first_hit_ranks, recall_from_ranks
from attllm_jax.retrieval.retrieve import Retrieval
from attllm_jax.retrieval.store import read_store

TINY = SyntheticConfig(num_streets=3, street_length_m=60.0, num_queries=10, image_height=72, image_width=96, seed=5)
ALPHAS = (0.0, 0.5, 1.0)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("post")
    bench = generate_benchmark(root / "cache", TINY)
    attention = write_oracle_attention(bench, root / "attention")
    config = EvalConfig(
        database_folder=str(bench.database),
        queries_folder=str(bench.queries),
        output_dir=str(root / "out"),
        attention_dir=str(attention),
        alphas=ALPHAS,
        recall_values=(1, 5, 10),
        image_size=64,
        save_descriptors=True,
        rerank=("aqe:k=3,w=0.6", "alpha_qe:k=4,alpha=3"),
        alpha_policy="margin",
    )
    result = run_evaluation(config, model=random_cosplace_model(0))
    return config, result, json.loads((root / "out" / "results.json").read_text())


def test_saved_descriptors_are_the_ones_eval_searched_with(run):
    config, result, res = run
    out = result.output_dir / "descriptors"
    names = (out / "queries.txt").read_text().splitlines()
    assert len(names) == res["num_queries"] and names == sorted(names)
    database, valid, _ = read_store(res["store"]["directory"])
    database = np.asarray(database)
    for k, alpha in enumerate(ALPHAS):
        saved = np.load(out / f"queries_alpha_{alpha}.npy")
        assert saved.dtype == np.float32 and saved.shape == (res["num_queries"], 512)
        np.testing.assert_array_equal(saved, result.query_descriptors[k])
        # searching the saved files against the store gives eval's predictions
        scores = saved @ database.T
        scores[:, ~valid] = -np.inf
        order = np.argsort(-scores, axis=1, kind="stable")[:, :10]
        np.testing.assert_array_equal(order, result.retrieval.predictions[k])
    assert {f"descriptors/queries_alpha_{a}.npy" for a in ALPHAS} <= set(res["outputs"])
    assert res["saved_descriptors"]["files"][-1] == "queries.txt"


def _expand_numpy(kind, params, q, db, preds):
    top = db[preds[:, : params["k"]]]
    if kind == "aqe":
        return params["w"] * q + (1 - params["w"]) * top.mean(1)
    weights = np.maximum(np.einsum("qd,qkd->qk", q, top), 0) ** params["alpha"]
    y = q + np.einsum("qk,qkd->qd", weights, top)
    return y / np.linalg.norm(y, axis=1, keepdims=True)


def test_rerank_recalls_are_keyed_like_the_top_level_and_follow_the_formulas(run):
    config, result, res = run
    assert set(res["rerank"]) == {"aqe", "alpha_qe"}
    assert res["rerank"]["aqe"]["params"] == {"k": 3, "w": 0.6}
    assert res["rerank"]["alpha_qe"]["params"] == {"k": 4, "alpha": 3.0}
    database, valid, _ = read_store(res["store"]["directory"])
    database = np.asarray(database, np.float64)
    for kind, stage in res["rerank"].items():
        assert list(stage["recalls"]) == list(res["recalls"])
        assert all(list(stage["recalls"][a]) == list(res["recalls"][a]) for a in res["recalls"])
        assert stage["recalls_before"] == res["recalls"]
        for k, alpha in enumerate(ALPHAS):
            saved = np.load(result.output_dir / "descriptors" / f"queries_alpha_{alpha}.npy").astype(np.float64)
            expanded = _expand_numpy(kind, stage["params"], saved, database, result.retrieval.predictions[k])
            scores = expanded @ database.T
            scores[:, ~valid] = -np.inf
            order = np.argsort(-scores, axis=1, kind="stable")[:, :10]
            want = recall_from_ranks(first_hit_ranks(order, result.positives), (1, 5, 10))
            assert [stage["recalls"][str(alpha)][n] for n in ("1", "5", "10")] == pytest.approx(list(want))
    assert (
        res["timings_s"]["rerank_aqe"] >= 0
        and "re-ranking aqe:k=3,w=0.6" in (result.output_dir / "eval.log").read_text()
    )


def test_the_alpha_policy_reads_no_labels(run):
    _, result, res = run
    entry = res["alpha_policy"]
    assert entry["policy"] == "margin" and sum(entry["alphas_chosen"].values()) == res["num_queries"]
    choice = adaptive.choose_alphas(result.retrieval.scores)
    margins = result.retrieval.scores[..., 0] - result.retrieval.scores[..., 1]
    np.testing.assert_array_equal(choice, np.argmax(margins, axis=0))
    ranks = result.retrieval.first_hit[choice, np.arange(len(choice))]
    assert list(entry["recalls"].values()) == pytest.approx(list(recall_from_ranks(ranks, (1, 5, 10))))
    # shuffled ground truth: other first hits and recalls, the same choices
    rng = np.random.default_rng(0)
    shuffled = [result.positives[i] for i in rng.permutation(len(result.positives))]
    preds = result.retrieval.predictions
    first_hit = np.stack([first_hit_ranks(preds[k], shuffled) for k in range(len(ALPHAS))])
    other = Retrieval(ALPHAS, preds, result.retrieval.scores, first_hit, result.retrieval.recalls, (1, 5, 10))
    assert not np.array_equal(first_hit, result.retrieval.first_hit)
    assert policy_entry(other, "margin")["alphas_chosen"] == entry["alphas_chosen"]
    np.testing.assert_array_equal(adaptive.choose_alphas(other.scores), choice)


def test_ties_go_to_the_smallest_alpha_and_missing_predictions_rank_last():
    scores = np.array(
        [
            [[0.9, 0.5], [0.5, -np.inf], [-np.inf, -np.inf]],
            [[0.8, 0.4], [0.9, 0.1], [0.3, 0.2]],
        ]
    )
    np.testing.assert_array_equal(adaptive.choose_alphas(scores), [0, 0, 1])  # a tie, +inf margin, -inf margin
    with pytest.raises(ValueError, match="at least 2 predictions"):
        adaptive.choose_alphas(scores[..., :1])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"rerank": ("aqe:k=20,w=0.5",)}, "k = 20 exceeds the 10 predictions kept"),
        ({"rerank": ("aqe:k=2",)}, "missing w"),
        ({"alpha_policy": "entropy"}, "--alpha_policy must be one of"),
        ({"alpha_policy": "margin", "recall_values": (1,), "rerank": ()}, "needs 2 predictions per query"),
    ],
)
def test_bad_post_search_settings_fail_before_any_work(run, tmp_path, change, message):
    config = replace(run[0], output_dir=str(tmp_path / "o"), **{"recall_values": (1, 5, 10), **change})
    with pytest.raises(ValueError, match=message):
        run_evaluation(config, model=object())
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rerank", "aqe:k=5"], "--rerank 'aqe:k=5': missing w (e.g. aqe:k=5,w=0.8)"),
        (["--rerank", "aqe:k=5,w=0.8", "--rerank", "aqe:k=3,w=0.5"], "one stage per kind, got 2 of 'aqe'"),
        (["--alpha_db", "2"], "--alpha_db must lie in [0, 1]"),
        (["--alpha_policy", "entropy"], "--alpha_policy"),
        (["--demo_clutter", "2"], "--demo_clutter is for the demo"),
        (["--symmetric_k", "50", "--recall_values", "1,5"], "--symmetric_k must be in [0, 5]"),
    ],
)
def test_bad_stage_flags_are_one_error_line_before_any_work(tmp_path, args, message):
    from tests.test_cli_eval import QUERY, SFXL_DB, _jpeg, one_error_line, run_eval

    _jpeg(tmp_path / "db" / SFXL_DB)
    _jpeg(tmp_path / "q" / QUERY)
    dataset = ["--database_folder", str(tmp_path / "db"), "--queries_folder", str(tmp_path / "q")]
    proc = run_eval(*dataset, "--output_dir", str(tmp_path / "out"), *args)
    assert message in one_error_line(proc)
    assert not (tmp_path / "out").exists()
