"""The chunked, resumable descriptor store: keys, reuse, staleness, atomic chunks."""

import json

import numpy as np
import pytest

from attllm_jax.retrieval.store import DescriptorStore, StoreError

KEY = {"model": {"family": "cosplace", "backbone": "resnet18"}, "weights_sha256": "ab" * 32, "images": "cd" * 32}


def _fill(store, dim=4, seed=0):
    rng = np.random.default_rng(seed)
    for chunk in store.pending_chunks():
        start, stop = store.chunk_range(chunk)
        valid = np.ones(stop - start, bool)
        store.write_chunk(chunk, rng.normal(size=(stop - start, dim)), valid, [])


def test_create_fill_load_and_reuse(tmp_path):
    store = DescriptorStore.open(tmp_path / "s", KEY, num_items=10, chunk_size=4)
    assert store.status == "created" and store.num_chunks == 3 and store.pending_chunks() == [0, 1, 2]
    assert [store.chunk_range(c) for c in range(3)] == [(0, 4), (4, 8), (8, 10)]
    _fill(store)
    contents = store.load()
    assert contents.descriptors.shape == (10, 4) and contents.valid.all()
    again = DescriptorStore.open(tmp_path / "s", json.loads(json.dumps(KEY)), num_items=10, chunk_size=4)
    assert again.status == "reused" and again.pending_chunks() == []
    np.testing.assert_array_equal(again.load().descriptors, contents.descriptors)


def test_partial_store_resumes_and_ignores_temporaries(tmp_path):
    store = DescriptorStore.open(tmp_path, KEY, num_items=10, chunk_size=4)
    store.write_chunk(0, np.ones((4, 2)), np.ones(4, bool), [])
    (tmp_path / "chunk_000001.npz.tmp").write_bytes(b"half a chunk")
    resumed = DescriptorStore.open(tmp_path, KEY, num_items=10, chunk_size=4)
    assert resumed.status == "resumed" and resumed.pending_chunks() == [1, 2]
    assert not (tmp_path / "chunk_000001.npz.tmp").exists()
    with pytest.raises(StoreError, match="incomplete"):
        resumed.load()


@pytest.mark.parametrize(
    "change",
    [
        {"weights_sha256": "ff" * 32},
        {"images": "00" * 32},
        {"model": {"family": "cosplace", "backbone": "resnet50"}},
    ],
)
def test_a_changed_key_rebuilds_the_store(tmp_path, change):
    store = DescriptorStore.open(tmp_path, KEY, num_items=6, chunk_size=3)
    _fill(store)
    (tmp_path / "keep_me.txt").write_text("not ours")
    rebuilt = DescriptorStore.open(tmp_path, {**KEY, **change}, num_items=6, chunk_size=3)
    assert rebuilt.status == "rebuilt" and rebuilt.pending_chunks() == [0, 1]
    assert (tmp_path / "keep_me.txt").exists()


def test_layout_changes_rebuild_too(tmp_path):
    _fill(DescriptorStore.open(tmp_path, KEY, num_items=6, chunk_size=3))
    assert DescriptorStore.open(tmp_path, KEY, num_items=7, chunk_size=3).status == "rebuilt"
    _fill(DescriptorStore.open(tmp_path, KEY, num_items=7, chunk_size=3))
    assert DescriptorStore.open(tmp_path, KEY, num_items=7, chunk_size=2).status == "rebuilt"


def test_failures_and_validity_round_trip(tmp_path):
    store = DescriptorStore.open(tmp_path, KEY, num_items=3, chunk_size=3)
    failure = {"index": 1, "path": "/db/bad.jpg", "error": "OSError: truncated"}
    store.write_chunk(0, np.arange(6).reshape(3, 2), np.array([True, False, True]), [failure])
    contents = store.load()
    assert contents.valid.tolist() == [True, False, True] and contents.failures == [failure]
    assert contents.descriptors.dtype == np.float32


def test_refuses_a_foreign_directory_and_bad_chunks(tmp_path):
    (tmp_path / "photo.jpg").write_bytes(b"x")
    with pytest.raises(StoreError, match="not a descriptor store"):
        DescriptorStore.open(tmp_path, KEY, num_items=3)
    assert (tmp_path / "photo.jpg").exists()
    store = DescriptorStore.open(tmp_path / "s", KEY, num_items=3, chunk_size=3)
    with pytest.raises(ValueError, match="needs 3 rows"):
        store.write_chunk(0, np.zeros((2, 4)), np.ones(2, bool), [])
    (tmp_path / "s" / "chunk_000000.npz").write_bytes(b"garbage")
    with pytest.raises(StoreError, match="corrupt store chunk"):
        store.load()
