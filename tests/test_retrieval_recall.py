"""Recall@N against hand-computed cases and VPR-methods-evaluation's procedure; exact faiss search."""

import faiss
import numpy as np
import pytest

from attllm_jax.retrieval.index import ExactIndex, search_inner_product
from attllm_jax.retrieval.recall import first_hit_ranks, recall_at_n, recall_from_ranks, validate_recall_values


def _vpr_methods_evaluation_recalls(predictions, positives_per_query, recall_values, num_queries):
    """VPR-methods-evaluation's loop (main.py), transcribed: first N hit counts for it and every larger N."""
    recalls = np.zeros(len(recall_values))
    for query_index, preds in enumerate(predictions):
        for i, n in enumerate(recall_values):
            if np.any(np.isin(preds[:n], positives_per_query[query_index])):
                recalls[i:] += 1
                break
    return recalls / num_queries * 100


def test_hand_computed_recalls():
    predictions = np.array(
        [
            [4, 1, 2, 3, 0],  # first positive (1) at rank 2
            [0, 1, 2, 3, 4],  # first positive (0) at rank 1
            [3, 4, 2, 1, 0],  # first positive (0) at rank 5
            [1, 2, 3, 4, 0],  # no positive at all: a miss that still counts in the denominator
        ]
    )
    positives = [np.array([1, 7]), np.array([0]), np.array([0]), np.array([], dtype=np.int64)]
    np.testing.assert_array_equal(first_hit_ranks(predictions, positives), [1, 0, 4, -1])
    np.testing.assert_allclose(recall_at_n(predictions, positives, [1, 2, 5]), [25.0, 50.0, 75.0])


def test_matches_vpr_methods_evaluation_on_random_cases():
    rng = np.random.default_rng(0)
    num_queries, num_db, recall_values = 200, 60, [1, 5, 10, 20]
    predictions = np.stack([rng.permutation(num_db)[:20] for _ in range(num_queries)])
    positives = [rng.choice(num_db, size=rng.integers(0, 4), replace=False) for _ in range(num_queries)]
    want = _vpr_methods_evaluation_recalls(predictions, positives, recall_values, num_queries)
    np.testing.assert_allclose(recall_at_n(predictions, positives, recall_values), want)
    assert 0 < want[0] < want[-1] < 100


def test_missing_predictions_never_count():
    predictions = np.array([[-1, -1], [2, -1]])
    np.testing.assert_allclose(recall_at_n(predictions, [np.array([0]), np.array([2])], [1, 2]), [50.0, 50.0])


def test_validate_recall_values():
    assert validate_recall_values([10, 1, 5]) == [1, 5, 10]
    for bad in ([], [0], [1, 1], [2.5], [True]):
        with pytest.raises(ValueError):
            validate_recall_values(bad)


def test_exact_index_matches_numpy_and_faiss_l2_ranking():
    rng = np.random.default_rng(0)
    database = rng.normal(size=(300, 16)).astype(np.float32)
    database /= np.linalg.norm(database, axis=1, keepdims=True)
    queries = rng.normal(size=(20, 16)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    scores, indices = search_inner_product(database, queries, 10)
    sims = queries @ database.T
    np.testing.assert_array_equal(indices, np.argsort(-sims, axis=1, kind="stable")[:, :10])
    np.testing.assert_allclose(scores, np.take_along_axis(sims, indices, 1), atol=1e-6)
    l2 = faiss.IndexFlatL2(16)  # what VPR-methods-evaluation uses: same ranking for unit descriptors
    l2.add(database)
    np.testing.assert_array_equal(l2.search(queries, 10)[1], indices)


def test_exact_index_with_k_beyond_the_database_and_bad_inputs():
    index = ExactIndex(np.eye(3, dtype=np.float32))
    scores, indices = index.search(np.eye(3, dtype=np.float32)[:1], 5)
    assert indices[0, 0] == 0 and sorted(indices[0, :3]) == [0, 1, 2]
    assert list(indices[0, 3:]) == [-1, -1] and np.all(np.isneginf(scores[0, 3:]))
    with pytest.raises(ValueError, match="dimension 4"):
        index.search(np.zeros((1, 4), np.float32), 1)
    with pytest.raises(ValueError, match="non-finite"):
        ExactIndex(np.full((2, 3), np.nan))


def test_percentages_are_correctly_rounded():
    # 11 of 20 queries: count / total * 100 gives 55.00000000000001; results.json must say 55.0.
    ranks = np.array([0] * 11 + [-1] * 9)
    assert recall_from_ranks(ranks, [1]).tolist() == [55.0]
