"""Search methods, the memory plan, chunked exact search with a running top-k, and recall vs exact."""

import numpy as np
import pytest

from attllm_jax.retrieval.index import ApproximateIndex, ExactIndex, FaissParams, ivf_nlist, recall_vs_exact
from attllm_jax.retrieval.search import (
    GIB,
    SearchMemoryError,
    SearchSpec,
    exact_search,
    merge_top_k,
    plan_memory,
    search_database,
)
from tests.test_retrieval_jax_search import _ties, _unit, brute_force


def _clustered(rng, n, d, centers=20):
    c = _unit(rng, centers, d)
    x = c[rng.integers(0, centers, n)] + 0.3 * rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("method", ["exact_jax", "faiss_flat"])
def test_chunked_exact_search_equals_whole(method):
    rng = np.random.default_rng(0)
    database, queries = _unit(rng, 997, 16), _unit(rng, 30, 16)
    valid = rng.random(997) < 0.8
    spec = SearchSpec(method=method)
    whole_s, whole_i = exact_search(method, database, valid, queries, 15, spec, None)
    chunk_s, chunk_i = exact_search(method, database, valid, queries, 15, spec, 100)
    want_s, want_i = brute_force(database, queries, 15, valid)
    np.testing.assert_array_equal(whole_i, want_i)
    np.testing.assert_array_equal(chunk_i, want_i)
    np.testing.assert_allclose(chunk_s, want_s, rtol=0, atol=2e-6)


def test_chunked_jax_search_keeps_ties_by_lower_index():
    rng = np.random.default_rng(1)
    database, queries = _ties(rng, 500, 5), _ties(rng, 12, 5)
    valid = np.ones(500, bool)
    scores, indices = exact_search("exact_jax", database, valid, queries, 25, SearchSpec(), 64)
    want_s, want_i = brute_force(database, queries, 25)
    np.testing.assert_array_equal(indices, want_i)
    np.testing.assert_array_equal(scores, want_s)


def test_merge_top_k_prefers_the_earlier_result_on_ties():
    first = np.array([[3.0, 1.0]], np.float32), np.array([[4, 7]])
    second = np.array([[3.0, 2.0]], np.float32), np.array([[2, 9]])
    s, i = merge_top_k(*first, *second, 3)
    assert s.tolist() == [[3.0, 3.0, 2.0]] and i.tolist() == [[4, 2, 9]]


def test_ivf_probing_every_cell_is_exact_and_reports_full_recall():
    rng = np.random.default_rng(2)
    database, queries = _clustered(rng, 2000, 32), _clustered(rng, 50, 32)
    nlist = ivf_nlist(2000)
    assert nlist == 2000 // 39 and ivf_nlist(10**6) == 4000  # capped by 39 points per cell, else 4 sqrt(N)
    spec = SearchSpec(method="faiss_ivf", faiss=FaissParams(nprobe=nlist))
    plan = plan_memory(spec, 2000, 32, 50, 10, budget_bytes=GIB)
    result = search_database(database, np.ones(2000, bool), queries, 10, spec, plan, recall_values=(1, 5, 10))
    _, want = ExactIndex(database).search(queries, 10)
    np.testing.assert_array_equal(result.indices, want)
    assert result.info["exact"] is False and result.info["recall_vs_exact"] == {"1": 100.0, "5": 100.0, "10": 100.0}
    assert result.info["params"]["nprobe"] == nlist


@pytest.mark.parametrize(
    ("method", "params"),
    [("faiss_ivf", FaissParams(nprobe=2)), ("faiss_ivf", FaissParams(nprobe=4, pq_m=8)), ("faiss_hnsw", FaissParams())],
)
def test_approximate_recall_is_measured_against_exact(method, params):
    rng = np.random.default_rng(3)
    database, queries = _clustered(rng, 3000, 32), _clustered(rng, 80, 32)
    valid = np.ones(3000, bool)
    valid[::7] = False
    spec = SearchSpec(method=method, faiss=params)
    plan = plan_memory(spec, 3000, 32, 80, 10, budget_bytes=GIB)
    result = search_database(database, valid, queries, 10, spec, plan, recall_values=(1, 10))
    _, truth = brute_force(database, queries, 10, valid)
    assert result.info["recall_vs_exact"] == recall_vs_exact(result.indices, truth, (1, 10))
    assert not np.isin(result.indices, np.flatnonzero(~valid)).any()
    # the measured number is the overlap with the exact top-N (here computed by hand for N = 10)
    overlap = np.mean([len(set(a) & set(t)) / 10 for a, t in zip(result.indices, truth, strict=True)])
    assert result.info["recall_vs_exact"]["10"] == pytest.approx(100 * overlap)
    if method == "faiss_ivf" and params.pq_m:
        assert result.info["recall_vs_exact"]["10"] < 100.0  # 8-byte codes of 32-d vectors lose neighbours


def test_recall_vs_exact_by_hand():
    approximate = np.array([[1, 2, 3], [4, 5, -1]])
    exact = np.array([[1, 3, 9], [5, 4, 6]])
    assert recall_vs_exact(approximate, exact, (1, 3)) == {"1": 50.0, "3": pytest.approx(100 * 4 / 6)}


def test_bf16_shortlist_is_reported_as_approximate_with_its_recall():
    rng = np.random.default_rng(4)
    database, queries = _unit(rng, 400, 16), _unit(rng, 10, 16)
    spec = SearchSpec(method="exact_jax", shortlist_dtype="bfloat16")
    plan = plan_memory(spec, 400, 16, 10, 5, budget_bytes=GIB)
    result = search_database(database, np.ones(400, bool), queries, 5, spec, plan, recall_values=(1, 5))
    assert result.info["exact"] is False and result.info["recall_vs_exact"] == {"1": 100.0, "5": 100.0}


def test_memory_plan_goes_chunked_or_refuses_naming_the_flag():
    spec = SearchSpec(method="faiss_flat")
    whole = plan_memory(spec, 1000, 512, 100, 20, budget_bytes=GIB)
    assert whole.chunk_rows is None and whole.total_bytes == 2 * 4 * 1000 * 512 + 4 * 100 * 512 + 12 * 100 * 20
    assert "whole database in memory" in whole.describe()
    small = plan_memory(spec, 1_000_000, 512, 100, 20, budget_bytes=GIB)  # 4 GiB of float32 in 1 GiB
    assert small.chunk_rows is not None and 0 < small.chunk_rows < 1_000_000
    assert 2 * small.chunk_rows * 2 * 4 * 512 + small.queries_bytes <= GIB
    with pytest.raises(SearchMemoryError, match="--pq_m"):
        plan_memory(SearchSpec(method="faiss_hnsw"), 1_000_000, 512, 100, 20, budget_bytes=GIB)
    with pytest.raises(SearchMemoryError, match="--alphas"):
        plan_memory(spec, 1000, 512, 10_000_000, 20, budget_bytes=GIB)
    ivf_pq = SearchSpec(method="faiss_ivf", faiss=FaissParams(pq_m=64))
    compressed = plan_memory(ivf_pq, 1_000_000, 512, 100, 20, budget_bytes=5 * GIB)
    assert compressed.chunk_rows is None


def test_spec_validation_names_the_flag():
    with pytest.raises(ValueError, match="--search must be one of"):
        SearchSpec(method="annoy").validated()
    with pytest.raises(ValueError, match="--nprobe"):
        SearchSpec(method="faiss_ivf", faiss=FaissParams(nprobe=0)).validated()
    with pytest.raises(ValueError, match="--pq_m 7 must divide"):
        ApproximateIndex("faiss_ivf", _unit(np.random.default_rng(0), 100, 16), FaissParams(pq_m=7))
    assert SearchSpec(method="auto").resolved_method() == "faiss_flat"  # the test process runs on the CPU


def test_approx_tpu_on_cpu_runs_exact_and_reports_its_recall(caplog):
    rng = np.random.default_rng(5)
    database, queries = _unit(rng, 301, 16), _unit(rng, 12, 16)
    valid = rng.random(301) < 0.9
    spec = SearchSpec(method="approx_tpu", recall_target=0.8).validated()
    plan = plan_memory(spec, 301, 16, 12, 10)
    with caplog.at_level("INFO", logger="attllm_jax.retrieval"):
        found = search_database(database, valid, queries, 10, spec, plan, (1, 5, 10))
    want_s, want_i = brute_force(database, queries, 10, valid)
    np.testing.assert_array_equal(found.indices, want_i)  # off TPU, approx_max_k is an exact top-k
    np.testing.assert_allclose(found.scores, want_s, rtol=0, atol=2e-6)
    assert found.info["exact"] is False and found.info["recall_target"] == 0.8
    assert found.info["recall_vs_exact"] == {"1": 100.0, "5": 100.0, "10": 100.0}
    assert "falls back to an exact top-k off TPU" in caplog.text
    assert (
        not SearchSpec(method="approx_tpu").is_exact()
        and SearchSpec(method="approx_tpu").approx_recall_target() == 0.95
    )


def test_approx_tpu_flags_are_validated():
    with pytest.raises(ValueError, match="--search_recall_target applies to --search approx_tpu only"):
        SearchSpec(method="exact_jax", recall_target=0.9).validated()
    for bad in (0.0, 1.2):
        with pytest.raises(ValueError, match=r"--search_recall_target must lie in \(0, 1\]"):
            SearchSpec(method="approx_tpu", recall_target=bad).validated()
    with pytest.raises(ValueError, match="cannot take --search_shortlist_dtype"):
        SearchSpec(method="approx_tpu", shortlist_dtype="bfloat16").validated()
