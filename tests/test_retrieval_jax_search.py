"""Sharded exact search in JAX against faiss IndexFlatIP and a NumPy brute-force top-k.

The 8-device cases run in a subprocess with ``--xla_force_host_platform_device_count=8`` (the flag must be set
before JAX starts); it writes its results to an npz file and the comparisons are made here.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import faiss
import numpy as np
import pytest

from attllm_jax.retrieval.jax_search import ShardedExactIndex, jax_exact_search
from tests.compile_log import logged_compiles

REPO = Path(__file__).resolve().parents[1]


def brute_force(database, queries, k, valid=None):
    """Exact top-k by inner product in float64; ties by the lower index (stable sort); -1 / -inf beyond N."""
    scores = queries.astype(np.float64) @ database.astype(np.float64).T
    if valid is not None:
        scores[:, ~valid] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(scores, order, axis=1)
    order = np.where(np.isfinite(top), order, -1)
    pad = k - order.shape[1]
    if pad > 0:
        order = np.pad(order, ((0, 0), (0, pad)), constant_values=-1)
        top = np.pad(top, ((0, 0), (0, pad)), constant_values=-np.inf)
    return top.astype(np.float32), order.astype(np.int64)


def _unit(rng, n, d):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _ties(rng, n, d):
    """Small integer entries: every inner product is exact in float32, and repeated rows tie exactly."""
    base = rng.integers(-2, 3, size=(n // 3, d)).astype(np.float32)
    return base[rng.integers(0, len(base), size=n)]


def cases():
    rng = np.random.default_rng(0)
    return {
        # N not divisible by 8, several query blocks with a padded last block
        "uneven": dict(database=_unit(rng, 1001, 16), queries=_unit(rng, 37, 16), k=5, block_size=8),
        # k larger than a shard (50 rows -> 7 per device) and larger than N
        "k_over_shard": dict(database=_unit(rng, 50, 8), queries=_unit(rng, 6, 8), k=20, block_size=None),
        "k_over_n": dict(database=_unit(rng, 13, 8), queries=_unit(rng, 4, 8), k=20, block_size=3),
        # exact ties everywhere
        "ties": dict(database=_ties(rng, 301, 6), queries=_ties(rng, 40, 6), k=12, block_size=16),
        # one query block holding every query, and a valid mask
        "one_block_masked": dict(
            database=_unit(rng, 203, 8), queries=_unit(rng, 9, 8), k=10, block_size=64, valid=rng.random(203) < 0.7
        ),
        # shards of >= 1024 rows take the grouped local top-k
        "grouped": dict(database=_unit(rng, 8 * 1800 + 3, 8), queries=_unit(rng, 20, 8), k=7, block_size=None),
        "grouped_ties": dict(database=_ties(rng, 8 * 2400, 4), queries=_ties(rng, 10, 4), k=9, block_size=None),
    }


DRIVER = textwrap.dedent(
    """
    import sys
    import numpy as np
    import jax
    sys.path.insert(0, sys.argv[2])
    from tests.test_retrieval_jax_search import cases
    from attllm_jax.retrieval.jax_search import ShardedExactIndex, jax_exact_search
    assert jax.device_count() == 8, jax.devices()
    out = {}
    for name, case in cases().items():
        s, i = jax_exact_search(case["database"], case["queries"], case["k"], block_size=case["block_size"],
                                valid=case.get("valid"))
        out[name + "/scores"], out[name + "/indices"] = s, i
        index = ShardedExactIndex(case["database"])
        out[name + "/grouped"] = np.array(index.grouped_top_k(min(case["k"], index.shard_rows)))
        s, i = jax_exact_search(case["database"], case["queries"], case["k"], block_size=case["block_size"],
                                valid=case.get("valid"), shortlist_dtype="bfloat16")
        out[name + "/bf16_scores"], out[name + "/bf16_indices"] = s, i
    np.savez(sys.argv[1], **out)
    """
)


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("jax8")
    (tmp / "driver.py").write_text(DRIVER)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, str(tmp / "driver.py"), str(tmp / "out.npz"), str(REPO)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with np.load(tmp / "out.npz") as data:
        return dict(data)


@pytest.mark.parametrize("name", list(cases()))
def test_eight_devices_equal_brute_force(eight_devices, name):
    case = cases()[name]
    want_scores, want_indices = brute_force(case["database"], case["queries"], case["k"], case.get("valid"))
    np.testing.assert_array_equal(eight_devices[name + "/indices"], want_indices)
    np.testing.assert_allclose(eight_devices[name + "/scores"], want_scores, rtol=0, atol=2e-6)
    assert bool(eight_devices[name + "/grouped"]) == name.startswith("grouped")


@pytest.mark.parametrize("name", ["uneven", "k_over_shard", "one_block_masked", "grouped"])
def test_eight_devices_equal_faiss_flat(eight_devices, name):
    case = cases()[name]
    database, valid = case["database"], case.get("valid")
    rows = np.flatnonzero(valid) if valid is not None else np.arange(len(database))
    index = faiss.IndexFlatIP(database.shape[1])
    index.add(database[rows])
    k = min(case["k"], len(rows))
    scores, indices = index.search(case["queries"], k)
    np.testing.assert_array_equal(eight_devices[name + "/indices"][:, :k], rows[indices])
    np.testing.assert_allclose(eight_devices[name + "/scores"][:, :k], scores, rtol=0, atol=2e-6)


@pytest.mark.parametrize("name", list(cases()))
def test_bfloat16_shortlist_reranks_exactly(eight_devices, name):
    # the shortlist (>= k + 64 rows per device) holds every true neighbour on these sizes, and its re-rank is exact
    case = cases()[name]
    want_scores, want_indices = brute_force(case["database"], case["queries"], case["k"], case.get("valid"))
    np.testing.assert_array_equal(eight_devices[name + "/bf16_indices"], want_indices)
    np.testing.assert_allclose(eight_devices[name + "/bf16_scores"], want_scores, rtol=0, atol=2e-6)


@pytest.mark.parametrize("name", ["uneven", "ties", "one_block_masked", "grouped_ties"])
def test_one_device_equals_brute_force(name):
    case = cases()[name]
    scores, indices = jax_exact_search(
        case["database"], case["queries"], case["k"], block_size=case["block_size"], valid=case.get("valid")
    )
    want_scores, want_indices = brute_force(case["database"], case["queries"], case["k"], case.get("valid"))
    np.testing.assert_array_equal(indices, want_indices)
    np.testing.assert_allclose(scores, want_scores, rtol=0, atol=2e-6)
    assert scores.dtype == np.float32 and indices.dtype == np.int64


def test_the_index_reuses_one_compiled_program_per_block_shape():
    rng = np.random.default_rng(1)
    index = ShardedExactIndex(_unit(rng, 300, 8))
    index.search(_unit(rng, 10, 8), 5, block_size=4)
    with logged_compiles() as compiled:
        index.search(_unit(rng, 7, 8), 5, block_size=4)  # same block shape, another query count
    assert compiled == []
    with logged_compiles() as compiled:  # positive control: a new block shape compiles, and the check sees it
        index.search(_unit(rng, 7, 8), 5, block_size=6)
    assert compiled


def test_bad_inputs_are_named():
    rng = np.random.default_rng(2)
    database = _unit(rng, 20, 4)
    with pytest.raises(ValueError, match="query descriptors has dimension 3"):
        jax_exact_search(database, _unit(rng, 2, 3), 2)
    with pytest.raises(ValueError, match="k must be >= 1"):
        jax_exact_search(database, _unit(rng, 2, 4), 0)
    bad = database.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="database descriptors rows"):
        jax_exact_search(bad, _unit(rng, 2, 4), 2)
    with pytest.raises(ValueError, match="valid must have shape"):
        jax_exact_search(database, _unit(rng, 2, 4), 2, valid=np.ones(3, bool))


def test_public_name():
    import attllm_jax as aj

    rng = np.random.default_rng(3)
    database, queries = _unit(rng, 30, 4), _unit(rng, 3, 4)
    scores, indices = aj.retrieval.jax_exact_search(database, queries, 4)
    np.testing.assert_array_equal(indices, brute_force(database, queries, 4)[1])
