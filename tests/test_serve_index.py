"""The service's database index, built once, finds what localize's per-call retrieve finds (same rows, same scores)."""

import numpy as np
import pytest

from attllm_jax.retrieval.retrieve import retrieve
from attllm_jax.retrieval.search import GIB, SearchSpec
from attllm_jax.serve.index import ResidentIndex
from tests.test_retrieval_jax_search import _unit


def _reference(database, valid, queries, k, spec):
    found = retrieve(
        database, valid, queries[None], np.ones(len(queries), bool),
        [np.zeros(0, np.int64)] * len(queries), (0.5,), (1,), k, spec=spec,
    )  # fmt: skip
    return found.predictions[0], found.scores[0]


@pytest.mark.parametrize("method", ["faiss_flat", "faiss_hnsw", "faiss_ivf", "exact_jax"])
def test_the_resident_index_equals_retrieve(method):
    rng = np.random.default_rng(0)
    database, valid = _unit(rng, 500, 16), rng.random(500) < 0.8
    spec = SearchSpec(method=method)
    index = ResidentIndex(database, valid, spec, max_queries=16, top_k=20)
    assert index.resident
    for n in (1, 5, 16):  # every batch size the service searches
        queries = _unit(rng, n, 16)
        want_i, want_s = _reference(database, valid, queries, 12, spec)
        got_i, got_s = index.search(queries, 12)
        np.testing.assert_array_equal(got_i, want_i)
        np.testing.assert_array_equal(got_s, want_s)
        assert valid[got_i].all()


def test_a_database_over_the_memory_budget_is_searched_per_batch_as_retrieve_does():
    rng = np.random.default_rng(1)
    database, valid = _unit(rng, 400, 16), np.ones(400, bool)
    spec = SearchSpec(method="faiss_flat", memory_gb=8000 * 4 / GIB)  # room for ~100 rows: the chunked plan
    index = ResidentIndex(database, valid, spec, max_queries=4, top_k=10)
    assert not index.resident
    queries = _unit(rng, 4, 16)
    got_i, got_s = index.search(queries, 10)
    want_i, want_s = _reference(database, valid, queries, 10, spec)
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_array_equal(got_s, want_s)
