"""The query-adaptive alpha in tune: compared with the best global alpha on the same spatial folds, and chosen
without labels (shuffling the ground truth changes recalls, never the choices)."""

import json

import numpy as np
import pytest

from attllm_jax.data.synthetic import SyntheticConfig, generate_benchmark
from attllm_jax.evaluation import EvalConfig, random_cosplace_model
from attllm_jax.evaluation.demo import write_oracle_attention
from attllm_jax.evaluation.extract import database_store_key
from attllm_jax.evaluation.pipeline import prepare_inputs
from attllm_jax.retrieval.adaptive import choose_from_margins
from attllm_jax.tuning import CachedRetrieval, TuneSettings, run_tuning
from attllm_jax.tuning.cache import cached_query_features
from attllm_jax.tuning.cv import blocked_folds, bootstrap_mean_ci, location_groups, mcnemar_exact

TINY = SyntheticConfig(num_streets=3, street_length_m=60.0, num_queries=12, image_height=72, image_width=96, seed=7)
ALPHAS = tuple(i / 5 for i in range(6))
POINT = (ALPHAS, 0.2, "native")


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    root = tmp_path_factory.mktemp("policy")
    bench = generate_benchmark(root / "cache", TINY)
    config = EvalConfig(
        database_folder=str(bench.database),
        queries_folder=str(bench.queries),
        output_dir=str(root / "tune"),
        attention_dir=str(write_oracle_attention(bench, root / "attention")),
        image_size=96,
        recall_values=(1, 5, 10),
        batch_size=4,
    )
    settings = TuneSettings(
        alphas=ALPHAS, folds=2, refine_iterations=0, bootstrap_samples=200, alpha_policy="margin", seed=1
    )
    model = random_cosplace_model(0)
    return config, settings, model, run_tuning(config, settings, model), root


def _source(config, model, root, shuffle_seed=None):
    """The tuning's rank source (cached features, the store), and each query's fold as the tuning made them."""
    inputs = prepare_inputs(config.validated(), model)
    key = database_store_key(model, inputs.queries, 96, inputs.digest)
    features = cached_query_features(model, inputs.queries, root / "tune" / "query_features", key, batch_size=4,
                                     image_size=96)  # fmt: skip
    contents = inputs.store.load()
    positives = [p[contents.valid[p]] for p in inputs.positives_all]
    groups = location_groups(inputs.geo.queries, 2 * config.positive_dist_threshold, "utm", inputs.positives_all)
    if shuffle_seed is not None:
        positives = [positives[i] for i in np.random.default_rng(shuffle_seed).permutation(len(positives))]
    source = CachedRetrieval(model, features, inputs.attention.parsed, np.asarray(contents.descriptors, np.float32),
                             contents.valid, positives, (1, 5, 10))  # fmt: skip
    inputs.store.close()
    return source, groups


def test_policy_is_compared_with_the_global_alpha_on_the_same_folds(tuned):
    config, settings, model, result, root = tuned
    written = json.loads((root / "tune" / "tuning.json").read_text())
    policy = written["alpha_policy"]
    assert policy["policy"] == "margin" and sum(policy["alphas_chosen"].values()) == 12
    assert all(float(a) in ALPHAS for a in policy["alphas_chosen"])
    # recompute: each held-out query at its own margin choice, at its fold's trained sigma and blend
    source, groups = _source(config, model, root)
    fold_of = blocked_folds(groups, settings.folds, settings.seed)
    ranks, global_ranks = np.full(12, -1), np.full(12, -1)
    for f, fold in enumerate(written["folds"]):
        best, held = fold["train_best"], np.flatnonzero(fold_of == f)
        assert len(held) == fold["query_count"]
        hits = source.first_hits(ALPHAS, best["sigma"], best["blend"])
        margins = source.margins(ALPHAS, best["sigma"], best["blend"])
        choice = np.argmax(margins[:, held], axis=0)
        ranks[held] = hits[choice, held]
        global_ranks[held] = source.first_hits([best["alpha"]], best["sigma"], best["blend"])[0][held]
    hits_a, hits_g = (ranks >= 0) & (ranks < 1), (global_ranks >= 0) & (global_ranks < 1)
    assert policy["heldout"]["1"]["mean"] == pytest.approx(100.0 * hits_a.mean())
    assert policy["vs_global"]["gain"]["1"]["mean"] == pytest.approx(100.0 * (hits_a.mean() - hits_g.mean()))
    assert policy["vs_global"]["mcnemar"]["1"] == mcnemar_exact(hits_a, hits_g)
    _, lo, hi = bootstrap_mean_ci(100.0 * (hits_a.astype(float) - hits_g), groups, 200, settings.seed)
    assert policy["vs_global"]["gain"]["1"]["ci95"] == pytest.approx([float(lo), float(hi)])
    assert written["cv"]["heldout"]["1"]["mean"] == pytest.approx(100.0 * hits_g.mean())  # the same folds
    assert "alpha_policy_heldout_recalls" in written["folds"][0]


def test_shuffled_ground_truth_changes_recalls_not_choices(tuned):
    config, _, model, _, root = tuned
    (plain, _), (shuffled, _) = _source(config, model, root), _source(config, model, root, shuffle_seed=3)
    assert not np.array_equal(plain.first_hits(*POINT), shuffled.first_hits(*POINT))
    margins = plain.margins(*POINT)
    np.testing.assert_array_equal(margins, shuffled.margins(*POINT))
    np.testing.assert_array_equal(choose_from_margins(margins), choose_from_margins(shuffled.margins(*POINT)))
    assert len(set(choose_from_margins(margins).tolist())) > 1  # the policy does pick different alphas
