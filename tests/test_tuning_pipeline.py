"""The cached tuning path end to end on a tiny synthetic dataset: exact parity with experiments.eval, the feature
cache, the blend switch and tuning.json."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attllm_jax import ops
from attllm_jax.data.synthetic import SyntheticConfig, generate_benchmark
from attllm_jax.evaluation import EvalConfig, random_cosplace_model, run_evaluation
from attllm_jax.evaluation.demo import write_oracle_attention
from attllm_jax.evaluation.extract import database_store_key
from attllm_jax.evaluation.pipeline import prepare_inputs
from attllm_jax.models.features import CnnFeatures
from attllm_jax.tuning import CachedRetrieval, TuneSettings, run_tuning, with_blend
from attllm_jax.tuning.cache import CacheError, cached_query_features

TINY = SyntheticConfig(num_streets=3, street_length_m=60.0, num_queries=12, image_height=72, image_width=96, seed=7)
IMAGE_SIZE = 96
PARITY_ALPHAS = (0.0, 0.3, 0.65, 1.0)


def _published(result):
    return {"image_path": "x.jpg", "model": "test", "json_format_verified": True, "result": result}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Oracle grid answers for most queries, point answers for three (so sigma matters), one None, one missing."""
    root = tmp_path_factory.mktemp("tune")
    bench = generate_benchmark(root / "cache", TINY)
    attention = write_oracle_attention(bench, root / "attention")
    stems = sorted(p.stem for p in bench.queries.glob("*.jpg"))
    points = [
        {"center": [0.5, 0.85], "weight": 0.05, "reasoning": "water"},
        {"center": [0.3, 0.3], "weight": 1.8, "reasoning": "facade"},
        {"center": [0.8, 0.2], "weight": 1.2, "reasoning": "windows"},
    ]
    for stem in stems[:3]:
        (attention / f"{stem}.json").write_text(json.dumps(_published(points)))
    (attention / f"{stems[3]}.json").write_text(json.dumps(_published(None)))
    (attention / f"{stems[4]}.json").unlink()
    return bench, attention, root


@pytest.fixture(scope="module")
def model():
    return random_cosplace_model(0)


def _config(dataset, out, **kw):
    bench, attention, _ = dataset
    return EvalConfig(
        database_folder=str(bench.database),
        queries_folder=str(bench.queries),
        output_dir=str(out),
        attention_dir=str(attention),
        image_size=IMAGE_SIZE,
        recall_values=(1, 5, 10),
        batch_size=4,
        **kw,
    )


def test_cached_tuning_gives_exactly_the_recalls_of_a_fresh_eval_run(dataset, model, tmp_path):
    fresh = {
        sigma: run_evaluation(_config(dataset, tmp_path / f"eval_{sigma}", alphas=PARITY_ALPHAS, sigma=sigma), model)
        for sigma in (0.1, 0.3)
    }
    first, expected = fresh[0.1].results["recalls"], fresh[0.3].results["recalls"]
    assert set(expected) == {str(a) for a in PARITY_ALPHAS}

    settings = TuneSettings(
        alphas=(0.0, 0.3, 0.5, 0.65, 1.0),
        sigmas=(0.1, 0.3),
        blends=("native", "uniform"),
        folds=2,
        refine_iterations=2,
        bootstrap_samples=200,
    )
    result = run_tuning(_config(dataset, tmp_path / "tune"), settings, model)
    for sigma, recalls in ((0.1, first), (0.3, expected)):
        for alpha in PARITY_ALPHAS:
            (row,) = [
                g for g in result["grid"] if g["alpha"] == alpha and g["sigma"] == sigma and g["blend"] == "native"
            ]
            assert row["recalls"] == recalls[str(alpha)], (alpha, sigma)
    # alpha = 0 is plain pooling in both blends and at every sigma
    assert all(g["recalls"] == first["0.0"] for g in result["grid"] if g["alpha"] == 0.0)
    assert result["cv"]["alpha0_recalls"] == first["0.0"]
    assert result["query_feature_cache"]["status"] == "created"

    # a second run reads the cached features: no backbone pass, identical numbers
    concrete = []
    original = model.features
    model.features = lambda images: concrete.append(not isinstance(images, jax.core.Tracer)) or original(images)
    try:
        again = run_tuning(_config(dataset, tmp_path / "tune"), settings, model)
    finally:
        del model.features
    assert again["query_feature_cache"]["status"] == "reused"
    assert not any(concrete)  # only abstract traces (the feature structure), never a backbone pass
    assert again["grid"] == result["grid"] and again["cv"] == result["cv"]
    assert again["timings_s"]["query_features"] == 0.0

    # the cached path's descriptors are the evaluation's, at both sigmas (which do change them)
    inputs = prepare_inputs(_config(dataset, tmp_path / "eval_0.1").validated(), model)
    key = database_store_key(model, inputs.queries, IMAGE_SIZE, inputs.digest)
    features = cached_query_features(model, inputs.queries, tmp_path / "tune" / "query_features", key, batch_size=4,
                                     image_size=IMAGE_SIZE)  # fmt: skip
    assert features.status == "reused"
    contents = inputs.store.load()
    positives = [p[contents.valid[p]] for p in inputs.positives_all]
    source = CachedRetrieval(model, features, inputs.attention.parsed, np.asarray(contents.descriptors, np.float32),
                             contents.valid, positives, (1, 5, 10))  # fmt: skip
    inputs.store.close()
    for sigma, run in fresh.items():
        np.testing.assert_allclose(source.descriptors(PARITY_ALPHAS, sigma, "native"), run.query_descriptors,
                                   rtol=0, atol=1e-6)  # fmt: skip
    delta = np.abs(fresh[0.1].query_descriptors[1:] - fresh[0.3].query_descriptors[1:]).max()
    assert delta > 1e-4


def test_tuning_json_contract_and_folds(dataset, model, tmp_path):
    settings = TuneSettings(
        alphas=tuple(i / 10 for i in range(11)),
        sigmas=(0.2,),
        folds=2,
        method="both",
        optax_steps=4,
        refine_iterations=3,
        bootstrap_samples=200,
        objective="mean",
    )
    result = run_tuning(_config(dataset, tmp_path), settings, model)
    written = json.loads((tmp_path / "tuning.json").read_text())
    assert written == json.loads(json.dumps(result))
    assert {"best", "grid", "folds", "cv", "optax"} <= set(written)
    best = written["best"]
    assert {"alpha", "sigma", "blend", "objective", "recalls"} <= set(best)
    assert best["objective"] == pytest.approx(np.mean(list(best["recalls"].values())))
    assert len(written["grid"]) == 11
    assert sum(f["query_count"] for f in written["folds"]) == 12
    for fold in written["folds"]:
        assert {"train_best", "heldout_recalls", "query_count"} <= set(fold)
    cv = written["cv"]
    for n in ("1", "5", "10"):
        lo, hi = cv["heldout"][n]["ci95"]
        assert lo <= cv["heldout"][n]["mean"] <= hi
        assert set(cv["gain_vs_alpha0"][n]) == {"mean", "ci95"}
    assert 0.0 <= cv["mcnemar_p"] <= 1.0
    optax = written["optax"]
    assert 0.0 <= optax["best"]["alpha"] <= 1.0 and optax["best"]["sigma"] > 0
    assert len(optax["folds"]) == 2 and "vs_grid" in optax
    assert (tmp_path / "recall_vs_alpha_folds.png").stat().st_size > 10_000
    assert "best (all queries)" in (tmp_path / "tune.log").read_text()


def test_uniform_blend_switch_matches_the_formula(model):
    rng = np.random.default_rng(0)
    feats = jnp.asarray(rng.uniform(0.0, 1.0, (2, 3, 4, 512)), jnp.float32)
    att = jnp.asarray(rng.uniform(0.0, 2.0, (2, 3, 4)), jnp.float32)
    uniform = with_blend(model, "uniform")
    assert with_blend(model, "native") is model and model.spec.architecture.blend == "native"
    head = model.net.aggregation
    x = feats / jnp.linalg.norm(feats, axis=-1, keepdims=True)
    pooled = ops.modulated_gem(x, att, 0.4, p=head.p[...][0], eps=1e-6, blend="uniform")
    y = head.fc(pooled)
    expected = y / jnp.linalg.norm(y, axis=-1, keepdims=True)
    maps = CnnFeatures(feats)
    np.testing.assert_allclose(uniform.aggregate(maps, att, 0.4), expected, rtol=0, atol=2e-6)
    native = model.aggregate(maps, att, 0.4)
    assert float(jnp.max(jnp.abs(native - expected))) > 10 * 2e-6  # the switch changed something
    np.testing.assert_array_equal(uniform.aggregate(maps, att, 0.0), model.aggregate(maps, att, 0.0))


def test_feature_cache_key_and_foreign_directory(dataset, model, tmp_path):
    bench, _, _ = dataset
    from attllm_jax.data.dataset import load_image_set
    from attllm_jax.evaluation.extract import weights_digest

    queries = load_image_set(bench.queries)
    key = database_store_key(model, queries, IMAGE_SIZE, weights_digest(model))
    first = cached_query_features(model, queries, tmp_path / "c", key, batch_size=4, image_size=IMAGE_SIZE)
    assert first.status == "created" and first.valid.all()
    assert sorted(int(i) for b in first.batches for i in b.indices if i >= 0) == list(range(len(queries)))
    again = cached_query_features(model, queries, tmp_path / "c", key, batch_size=4, image_size=IMAGE_SIZE)
    assert again.status == "reused"
    for a, b in zip(first.batches, again.batches, strict=True):
        np.testing.assert_array_equal(a.indices, b.indices)
        np.testing.assert_array_equal(a.leaves[0], b.leaves[0])
    other = {**key, "image_size": 64}
    rebuilt = cached_query_features(model, queries, tmp_path / "c", other, batch_size=4, image_size=64)
    assert rebuilt.status == "rebuilt" and rebuilt.batches[0].leaves[0].shape[1:3] == (2, 3)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(CacheError, match="not a query-feature cache"):
        cached_query_features(model, queries, tmp_path / "foreign", key, batch_size=4, image_size=IMAGE_SIZE)


def test_unavailable_blend_and_bad_settings_fail_before_work(dataset, model, tmp_path):
    with pytest.raises(ValueError, match="--objective r@5 needs 5"):
        TuneSettings(objective="r@5").validated((1, 10))
    with pytest.raises(ValueError, match="--sigmas"):
        TuneSettings(sigmas=(0.0,)).validated((1,))
    with pytest.raises(ValueError, match="unknown blend"):
        with_blend(model, "softmax")
