"""Query expansion (AQE, alphaQE) against a NumPy transcription of the formulas: expanded queries, top-k and
scores; the alpha sweep in one call equals one alpha at a time; --rerank parsing and its errors."""

import numpy as np
import pytest

from attllm_jax.retrieval.rerank import (
    RerankSpec,
    RerankSpecError,
    expand_queries,
    gather_rows,
    parse_rerank,
    parse_reranks,
    rerank,
)
from attllm_jax.retrieval.retrieve import retrieve
from attllm_jax.retrieval.store import DescriptorStore

N, D, Q, K_ALPHAS, TOP_M = 40, 16, 9, 3, 8


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def data():
    """Unit descriptors; two unreadable database rows (zeros, invalid) and one unreadable query."""
    rng = np.random.default_rng(3)
    database = _unit(rng.normal(size=(N, D))).astype(np.float32)
    valid = np.ones(N, bool)
    valid[[4, 17]] = False
    database[~valid] = 0.0
    queries = _unit(rng.normal(size=(K_ALPHAS, Q, D)) + database[rng.integers(0, N, Q)]).astype(np.float32)
    q_valid = np.ones(Q, bool)
    q_valid[5] = False
    queries[:, 5] = 0.0
    positives = [rng.choice(np.flatnonzero(valid), 2, replace=False) for _ in range(Q)]
    first = retrieve(database, valid, queries, q_valid, positives, (0.0, 0.5, 1.0), (1, 5), TOP_M)
    return database, valid, queries, q_valid, positives, first


def _numpy_expand(spec, q, db, preds):
    """The formulas, one query at a time in float64 (the reference)."""
    out = np.zeros_like(q, dtype=np.float64)
    for a in range(q.shape[0]):
        for i in range(q.shape[1]):
            top = [int(j) for j in preds[a, i, : spec.k] if j >= 0]
            x, d = q[a, i].astype(np.float64), db[top].astype(np.float64)
            if spec.kind == "aqe":
                out[a, i] = spec.w * x + (1 - spec.w) * d.mean(0) if top else x
            else:
                weights = np.maximum(d @ x, 0.0) ** spec.alpha if top else np.zeros(0)
                y = x + weights @ d if top else x
                out[a, i] = y / max(np.linalg.norm(y), 1e-12)
    return out


def _numpy_top(expanded, db, valid, m):
    scores = expanded @ db.astype(np.float64).T
    scores[..., ~valid] = -np.inf
    order = np.argsort(-scores, axis=-1, kind="stable")[..., :m]
    return order, np.take_along_axis(scores, order, -1)


@pytest.mark.parametrize("text", ["aqe:k=5,w=0.8", "aqe:k=1,w=0", "alpha_qe:k=5,alpha=3", "alpha_qe:k=8,alpha=0.5"])
def test_expansion_matches_the_numpy_formulas(data, text):
    database, valid, queries, q_valid, positives, first = data
    spec = parse_rerank(text)
    got, expanded = rerank(spec, database, valid, queries, q_valid, first, positives)
    want = _numpy_expand(spec, queries, database, first.predictions)
    np.testing.assert_allclose(expanded, want, atol=1e-6)
    order, scores = _numpy_top(want, database, valid, TOP_M)
    readable = np.flatnonzero(q_valid)
    np.testing.assert_array_equal(got.predictions[:, readable], order[:, readable])
    np.testing.assert_allclose(got.scores[:, readable], scores[:, readable], atol=1e-6)
    assert (got.predictions[:, ~q_valid] == -1).all()  # an unreadable query stays a miss
    assert not np.isin(got.predictions, [4, 17]).any()
    assert got.alphas == first.alphas and got.recall_values == first.recall_values
    # the expansion changed the rankings (else the test would not tell the stages from the first search)
    assert not np.array_equal(got.predictions, first.predictions)


def test_the_sweep_in_one_call_equals_one_alpha_at_a_time(data):
    database, valid, queries, q_valid, positives, first = data
    spec = parse_rerank("alpha_qe:k=4,alpha=2")
    together, _ = rerank(spec, database, valid, queries, q_valid, first, positives)
    for a in range(K_ALPHAS):
        one = retrieve(database, valid, queries[a : a + 1], q_valid, positives, (first.alphas[a],), (1, 5), TOP_M)
        alone, _ = rerank(spec, database, valid, queries[a : a + 1], q_valid, one, positives)
        np.testing.assert_array_equal(alone.predictions[0], together.predictions[a])
        np.testing.assert_array_equal(alone.recalls[0], together.recalls[a])


def test_fewer_valid_neighbours_than_k_use_only_those_that_exist():
    rng = np.random.default_rng(0)
    database = _unit(rng.normal(size=(6, 4))).astype(np.float32)
    valid = np.array([True, False, True, False, False, True])
    queries = _unit(rng.normal(size=(1, 2, 4))).astype(np.float32)
    first = retrieve(database, valid, queries, np.ones(2, bool), [np.array([0])] * 2, (0.0,), (1,), 5)
    assert (first.predictions[0, :, 3:] == -1).all()  # only three rows can be predicted
    spec = parse_rerank("aqe:k=5,w=0.5")
    got = expand_queries(spec, queries, first.predictions, database)
    mean = database[[0, 2, 5]].mean(0)
    np.testing.assert_allclose(got[0], 0.5 * queries[0] + 0.5 * mean[None], atol=1e-6)


def test_neighbours_come_from_a_lazily_read_store_row_by_row(tmp_path, data):
    database, valid, queries, q_valid, positives, first = data
    store = DescriptorStore.open(tmp_path / "s", {"test": 1}, num_items=N, chunk_size=7, dim=D)
    for chunk in store.pending_chunks():
        start, stop = store.chunk_range(chunk)
        store.write_chunk(chunk, database[start:stop], valid[start:stop], [])
    view = store.load().descriptors
    rows = np.array([39, 0, 8, 8, 13, 6])
    np.testing.assert_array_equal(gather_rows(view, rows), database[rows])
    spec = parse_rerank("aqe:k=3,w=0.7")
    from_store = expand_queries(spec, queries, first.predictions, view)
    np.testing.assert_array_equal(from_store, expand_queries(spec, queries, first.predictions, database))
    store.close()


def test_k_beyond_the_kept_predictions_is_an_error(data):
    database, _, queries, _, _, first = data
    with pytest.raises(ValueError, match="k = 9 exceeds the 8 predictions"):
        expand_queries(parse_rerank("aqe:k=9,w=0.5"), queries, first.predictions, database)


def test_parsing_and_labels():
    assert parse_rerank("aqe:k=5,w=0.8") == RerankSpec("aqe", 5, w=0.8)
    assert parse_rerank(" alpha_qe:alpha=3,k=10") == RerankSpec("alpha_qe", 10, alpha=3.0)
    assert parse_rerank("aqe:k=5,w=0.8").params() == {"k": 5, "w": 0.8}
    assert parse_rerank("alpha_qe:k=5,alpha=3").label() == "alpha_qe:k=5,alpha=3"
    assert [s.kind for s in parse_reranks(["aqe:k=5,w=0.8", "alpha_qe:k=5,alpha=3"])] == ["aqe", "alpha_qe"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("dqe:k=5", "unknown stage 'dqe'"),
        ("aqe", "missing k, w"),
        ("aqe:k=5", "missing w"),
        ("aqe:k=5,w=0.8,alpha=3", "'alpha=3' is not one of k=, w="),
        ("aqe:k=5,k=6,w=1", "k given twice"),
        ("aqe:k=five,w=0.8", "k='five' is not a number"),
        ("aqe:k=2.5,w=0.8", "k must be an integer >= 1, got 2.5"),
        ("aqe:k=0,w=0.8", "k must be an integer >= 1"),
        ("aqe:k=5,w=1.5", r"w must lie in \[0, 1\], got 1.5"),
        ("alpha_qe:k=5,alpha=-1", "alpha must be a number >= 0"),
        ("alpha_qe:k=5,alpha=nan", "alpha must be a number >= 0, got nan"),
        ("alpha_qe:k=5 alpha=3", "k='5 alpha=3' is not a number"),
    ],
)
def test_bad_specs_are_one_clear_error_naming_the_value(text, message):
    with pytest.raises(RerankSpecError, match=message) as error:
        parse_rerank(text)
    assert str(error.value).startswith(f"--rerank {text!r}: ")


def test_two_stages_of_one_kind_are_refused():
    with pytest.raises(RerankSpecError, match="one stage per kind, got 2 of 'aqe'"):
        parse_reranks(["aqe:k=5,w=0.8", "aqe:k=10,w=0.5"])
