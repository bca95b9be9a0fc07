"""The eval's --search methods: exact paths agree, approximate ones report recall vs exact, the memory plan."""

import json

import numpy as np
import pytest

from attllm_jax.evaluation import EvalConfig, random_cosplace_model, run_evaluation
from attllm_jax.retrieval.index import FaissParams
from attllm_jax.retrieval.search import SearchMemoryError, SearchSpec
from tests.test_eval_resume import _dataset


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    database, queries = _dataset(root / "data")
    base = dict(
        database_folder=str(database),
        queries_folder=str(queries),
        alphas=(0.0, 1.0),
        recall_values=(1, 3, 5),
        image_size=64,
        batch_size=4,
        store_dir=str(root / "store"),
    )
    return root, base, random_cosplace_model(seed=0)


def _run(setup, name, spec):
    root, base, model = setup
    return run_evaluation(EvalConfig(output_dir=str(root / name), search=spec, **base), model=model)


def test_exact_methods_agree_and_are_written(setup):
    flat = _run(setup, "flat", SearchSpec(method="faiss_flat"))
    jax_run = _run(setup, "jax", SearchSpec(method="exact_jax", block_size=3))
    # a 56 KiB budget holds the query sweep but not the database and its index: searched chunk by chunk
    chunked = _run(setup, "chunked", SearchSpec(method="exact_jax", memory_gb=2**-20 * 56))
    assert chunked.results["search"]["chunk_rows"] is not None and chunked.results["search"]["chunk_rows"] < 13
    for run in (jax_run, chunked):
        np.testing.assert_array_equal(run.retrieval.predictions, flat.retrieval.predictions)
        np.testing.assert_allclose(run.retrieval.scores, flat.retrieval.scores, rtol=0, atol=2e-6)
        assert run.results["recalls"] == flat.results["recalls"]
    written = json.loads((setup[0] / "jax" / "results.json").read_text())
    assert written["search"]["method"] == "exact_jax" and written["search"]["exact"] is True
    assert written["hosts"] == {
        "process_count": 1,
        "device_count": 1,
        "local_device_count": 1,
        "devices_per_process": [1],
        "platform": "cpu",
        "device_kind": "cpu",
    }
    assert flat.results["store"]["status"] in ("created", "reused") and jax_run.results["store"]["status"] == "reused"


def test_approximate_index_reports_recall_vs_exact(setup):
    flat = _run(setup, "flat2", SearchSpec(method="faiss_flat"))
    hnsw = _run(setup, "hnsw", SearchSpec(method="faiss_hnsw", faiss=FaissParams(hnsw_m=4, ef_search=2)))
    info = hnsw.results["search"]
    assert info["exact"] is False and set(info["recall_vs_exact"]) == {"1", "3", "5"}
    flat_top = flat.retrieval.predictions.reshape(-1, flat.retrieval.predictions.shape[-1])
    hnsw_top = hnsw.retrieval.predictions.reshape(flat_top.shape)
    for n in (1, 3, 5):
        overlap = np.mean([len(set(a[:n]) & set(b[:n])) / n for a, b in zip(hnsw_top, flat_top, strict=True)])
        assert info["recall_vs_exact"][str(n)] == pytest.approx(100 * overlap)


def test_an_index_that_cannot_fit_is_refused_before_any_work(setup):
    root, base, model = setup
    config = EvalConfig(
        output_dir=str(root / "refused"), search=SearchSpec("faiss_hnsw", memory_gb=2**-20 * 16), **base
    )
    with pytest.raises(SearchMemoryError, match="--pq_m"):
        run_evaluation(config, model=model)
    assert not (root / "refused" / "results.json").exists()
