"""tune --rerank / --symmetric_k / --chain_stages: each stage on the grid's spatial folds, at the alpha each fold's
training chose, with its held-out interval and a paired comparison with the plain held-out ranking (query expansion
recomputed here in NumPy; the symmetric stage and the chain recomputed fold by fold with eval's own stage, whose
parity with eval is tested in test_eval_symmetric.py)."""

import json

import numpy as np
import pytest

from attllm_jax.attention.masks import MASKS_PROMPT, MasksProvider
from attllm_jax.attention.runner import RunConfig
from attllm_jax.data.synthetic import SyntheticConfig, generate_benchmark
from attllm_jax.evaluation import EvalConfig, random_cosplace_model
from attllm_jax.evaluation.demo import write_oracle_attention
from attllm_jax.evaluation.extract import database_store_key
from attllm_jax.evaluation.pipeline import prepare_inputs
from attllm_jax.evaluation.symmetric import SymmetricSpec, run_symmetric, shortlist_rows
from attllm_jax.retrieval.rerank import parse_reranks, rerank
from attllm_jax.tuning import CachedRetrieval, TuneSettings, run_tuning
from attllm_jax.tuning.cache import cached_query_features
from attllm_jax.tuning.cv import blocked_folds, bootstrap_mean_ci, location_groups, mcnemar_exact

TINY = SyntheticConfig(
    num_streets=3, street_length_m=60.0, num_queries=12, image_height=72, image_width=96, seed=7, database_clutter=3
)
ALPHAS = tuple(i / 5 for i in range(6))


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    root = tmp_path_factory.mktemp("tune_rerank")
    bench = generate_benchmark(root / "cache", TINY)
    config = EvalConfig(
        database_folder=str(bench.database), queries_folder=str(bench.queries), output_dir=str(root / "tune"),
        attention_dir=str(write_oracle_attention(bench, root / "attention")), image_size=96, recall_values=(1, 5, 10),
        batch_size=4, rerank=("aqe:k=3,w=0.6",), symmetric_k=3, alpha_db=0.7, chain_stages=True,
        db_masks=str(bench.database_masks),
    )  # fmt: skip
    settings = TuneSettings(alphas=ALPHAS, folds=2, refine_iterations=0, bootstrap_samples=200, seed=1)
    model = random_cosplace_model(0)
    run_tuning(config, settings, model)
    return config, settings, model, json.loads((root / "tune" / "tuning.json").read_text()), root, bench


def _first_hits(queries, database, valid, positives):
    scores = queries @ database.T
    scores[:, ~valid] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")
    ranks = np.full(len(queries), -1)
    for q, row in enumerate(order):
        hit = np.flatnonzero(np.isin(row, positives[q]))
        ranks[q] = hit[0] if len(hit) and hit[0] < 10 else -1
    return ranks, order


def test_rerank_stage_is_cross_validated_against_the_plain_ranking_of_the_same_folds(tuned):
    config, settings, model, written, root, _ = tuned
    inputs = prepare_inputs(config.validated(), model)
    key = database_store_key(model, inputs.queries, 96, inputs.digest)
    features = cached_query_features(model, inputs.queries, root / "tune" / "query_features", key, batch_size=4,
                                     image_size=96)  # fmt: skip
    contents = inputs.store.load()
    database, valid = np.asarray(contents.descriptors, np.float64), contents.valid
    positives = [p[valid[p]] for p in inputs.positives_all]
    groups = location_groups(inputs.geo.queries, 2 * config.positive_dist_threshold, "utm", inputs.positives_all)
    source = CachedRetrieval(model, features, inputs.attention.parsed, np.asarray(database, np.float32), valid,
                             positives, (1, 5, 10))  # fmt: skip
    inputs.store.close()
    fold_of = blocked_folds(groups, settings.folds, settings.seed)
    plain, expanded = np.full(12, -1), np.full(12, -1)
    for f, fold in enumerate(written["folds"]):
        best, held = fold["train_best"], np.flatnonzero(fold_of == f)
        q = source.descriptors([best["alpha"]], best["sigma"], best["blend"])[0].astype(np.float64)
        ranks, order = _first_hits(q, database, valid, positives)
        q2 = 0.6 * q + 0.4 * database[order[:, :3]].mean(1)  # AQE, the paper code's formula
        ranks2, _ = _first_hits(q2, database, valid, positives)
        plain[held], expanded[held] = ranks[held], ranks2[held]
    stage = written["rerank"]["aqe"]
    assert stage["params"] == {"k": 3, "w": 0.6}
    hits_e, hits_p = (expanded >= 0) & (expanded < 1), (plain >= 0) & (plain < 1)
    assert written["cv"]["heldout"]["1"]["mean"] == pytest.approx(100.0 * hits_p.mean())  # the same folds
    assert stage["heldout"]["1"]["mean"] == pytest.approx(100.0 * hits_e.mean())
    for n in (5, 10):
        assert stage["heldout"][str(n)]["mean"] == pytest.approx(100.0 * ((expanded >= 0) & (expanded < n)).mean())
    assert stage["vs_plain"]["gain"]["1"]["mean"] == pytest.approx(100.0 * (hits_e.mean() - hits_p.mean()))
    assert stage["vs_plain"]["mcnemar"]["1"] == mcnemar_exact(hits_e, hits_p)
    _, lo, hi = bootstrap_mean_ci(100.0 * (hits_e.astype(float) - hits_p), groups, 200, settings.seed)
    assert stage["vs_plain"]["gain"]["1"]["ci95"] == pytest.approx([float(lo), float(hi)])
    _, lo, hi = bootstrap_mean_ci(100.0 * hits_e.astype(float), groups, 200, settings.seed)
    assert stage["heldout"]["1"]["ci95"] == pytest.approx([float(lo), float(hi)])
    assert "rerank_aqe_heldout_recalls" in written["folds"][0]


def _source(config, model, root):
    inputs = prepare_inputs(config.validated(), model)
    key = database_store_key(model, inputs.queries, 96, inputs.digest)
    features = cached_query_features(model, inputs.queries, root / "tune" / "query_features", key, batch_size=4,
                                     image_size=96)  # fmt: skip
    contents = inputs.store.load()
    valid = contents.valid
    positives = [p[valid[p]] for p in inputs.positives_all]
    source = CachedRetrieval(model, features, inputs.attention.parsed, np.asarray(contents.descriptors, np.float32),
                             valid, positives, (1, 5, 10))  # fmt: skip
    groups = location_groups(inputs.geo.queries, 2 * config.positive_dist_threshold, "utm", inputs.positives_all)
    database = inputs.database
    inputs.store.close()
    return source, groups, database


def test_symmetric_stage_and_chain_are_cross_validated_fold_by_fold_with_evals_stage(tuned, tmp_path):
    config, settings, model, written, root, bench = tuned
    source, groups, database = _source(config, model, root)
    fold_of = blocked_folds(groups, settings.folds, settings.seed)
    aqe = parse_reranks(config.rerank)[0]
    spec = SymmetricSpec(3, 0.7, str(tmp_path / "att"))
    run_config = RunConfig(city="unknown", prompt=MASKS_PROMPT)
    plain, symmetric, chained = np.full(12, -1), np.full(12, -1), np.full(12, -1)
    held_shortlists = []
    for f, fold in enumerate(written["folds"]):
        best, held = fold["train_best"], np.flatnonzero(fold_of == f)
        q, first = source.retrieval(best["alpha"], best["sigma"], best["blend"], 10)
        held_shortlists.append(shortlist_rows(first.predictions[:, held], 3))
        plain[held] = first.first_hit[0, held]
        extract = {"batch_size": 4, "image_size": 96}
        found, _ = run_symmetric(spec, model, database, source.database, q, first, source.positives,
                                 MasksProvider(bench.database_masks), run_config, **extract)  # fmt: skip
        symmetric[held] = found.first_hit[0, held]
        expanded_found, expanded = rerank(aqe, source.database, source.database_valid, q, source.features.valid, first,
                                          source.positives)  # fmt: skip
        found2, _ = run_symmetric(spec, model, database, source.database, expanded, expanded_found, source.positives,
                                  MasksProvider(bench.database_masks), run_config, **extract)  # fmt: skip
        chained[held] = found2.first_hit[0, held]
    assert (symmetric != plain).any() and (chained != symmetric).any()  # the parity below is not vacuous
    stage, chain = written["rerank"]["symmetric"], written["rerank"]["chained"]["aqe"]
    assert stage["params"] == {"k": 3, "alpha_db": 0.7}
    assert chain["stages"] == ["aqe:k=3,w=0.6", "symmetric:k=3,alpha_db=0.7"]
    for entry, ranks in ((stage, symmetric), (chain, chained)):
        for n in (1, 5, 10):
            assert entry["heldout"][str(n)]["mean"] == pytest.approx(100.0 * ((ranks >= 0) & (ranks < n)).mean())
        _, lo, hi = bootstrap_mean_ci(100.0 * ((ranks >= 0) & (ranks < 1)).astype(float), groups, 200, settings.seed)
        assert entry["heldout"]["1"]["ci95"] == pytest.approx([float(lo), float(hi)])
        hits, hits_p = (ranks >= 0) & (ranks < 1), (plain >= 0) & (plain < 1)
        assert entry["vs_plain"]["gain"]["1"]["mean"] == pytest.approx(100.0 * (hits.mean() - hits_p.mean()))
        assert entry["vs_plain"]["mcnemar"]["1"] == mcnemar_exact(hits, hits_p)
    # only held-out shortlists are annotated, each database image once (the chain reuses the stage's cache)
    union = np.unique(np.concatenate(held_shortlists))
    assert stage["cost"]["unique_database_images_annotated"] == len(union) == stage["cost"]["llm_calls"]
    assert stage["cost"]["with_attention"] == len(union) and stage["cost"]["shortlist_entries"] == 12 * 3
    assert (
        chain["cost"]["llm_calls"] + chain["cost"]["reused_from_cache"]
        == chain["cost"]["unique_database_images_annotated"]
    )
    assert chain["cost"]["reused_from_cache"] > 0
    # the chain describes only the images it adds: the stage's database-side descriptors are reused
    assert (
        chain["cost"]["descriptors_reused"] + chain["cost"]["extra_backbone_passes"]
        == chain["cost"]["unique_database_images_annotated"]
    )
    assert chain["cost"]["descriptors_reused"] > 0 and stage["cost"]["descriptors_reused"] == 0
    cached = list((root / "tune" / "database_attention").glob("@*.json"))
    assert len(cached) == len(union) + chain["cost"]["llm_calls"]
    assert "rerank_symmetric_heldout_recalls" in written["folds"][0]
    assert "rerank_aqe+symmetric_heldout_recalls" in written["folds"][0]


def test_tune_prints_one_line_per_stage_with_its_held_out_recall_and_paired_gain(tuned, capsys):
    from experiments.tune import print_comparisons

    written = tuned[3]
    print_comparisons(written)
    lines = capsys.readouterr().out.splitlines()
    stages = written["rerank"]
    expected = {
        "re-ranking aqe:k=3,w=0.6": stages["aqe"],
        "re-ranking symmetric:k=3,alpha_db=0.7": stages["symmetric"],
        "chain aqe:k=3,w=0.6 -> symmetric:k=3,alpha_db=0.7": stages["chained"]["aqe"],
    }
    assert len(lines) == len(expected)
    for line, (label, entry) in zip(lines, expected.items(), strict=True):
        gain = entry["vs_plain"]["gain"]["1"]
        assert line.startswith(f"{label} held-out R@1: {entry['heldout']['1']['mean']:.1f}; vs plain: ")
        assert f"{gain['mean']:+.1f} ({gain['ci95'][0]:+.1f}..{gain['ci95'][1]:+.1f})" in line
