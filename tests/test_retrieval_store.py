"""The tensorstore descriptor store: keys, reuse, staleness, markers, lazy reads, sharing between runs."""

import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from attllm_jax.retrieval.store import DescriptorStore, IncompleteStoreError, StoreError, read_store

KEY = {"model": {"family": "cosplace", "backbone": "resnet18"}, "weights_sha256": "ab" * 32, "images": "cd" * 32}
REPO = Path(__file__).resolve().parents[1]


def _fill(store, seed=0):
    rng = np.random.default_rng(seed)
    written = np.zeros((store.num_items, store.dim), np.float32)
    for chunk in store.pending_chunks():
        start, stop = store.chunk_range(chunk)
        written[start:stop] = rng.normal(size=(stop - start, store.dim))
        store.write_chunk(chunk, written[start:stop], np.ones(stop - start, bool), [])
    return written


def test_create_fill_load_and_reuse(tmp_path):
    store = DescriptorStore.open(tmp_path / "s", KEY, num_items=10, chunk_size=4, dim=4)
    assert store.status == "created" and store.num_chunks == 3 and store.pending_chunks() == [0, 1, 2]
    assert [store.chunk_range(c) for c in range(3)] == [(0, 4), (4, 8), (8, 10)]
    written = _fill(store)
    contents = store.load()
    assert contents.descriptors.shape == (10, 4) and contents.valid.all()
    np.testing.assert_array_equal(np.asarray(contents.descriptors), written)
    np.testing.assert_array_equal(contents.descriptors[3:9], written[3:9])  # rows across chunk borders
    np.testing.assert_array_equal(contents.descriptors[-1], written[-1])
    store.close()
    again = DescriptorStore.open(tmp_path / "s", json.loads(json.dumps(KEY)), num_items=10, chunk_size=4, dim=4)
    assert again.status == "reused" and again.pending_chunks() == []
    np.testing.assert_array_equal(np.asarray(again.load().descriptors), written)
    again.close()


def test_float16_store_halves_the_bytes(tmp_path):
    full = DescriptorStore.open(tmp_path / "f32", KEY, num_items=64, chunk_size=64, dim=32)
    half = DescriptorStore.open(tmp_path / "f16", KEY, num_items=64, chunk_size=64, dim=32, dtype="float16")
    data = _fill(full)
    half.write_chunk(0, data, np.ones(64, bool), [])
    read = np.asarray(half.load().descriptors)
    assert read.dtype == np.float32 and half.load().descriptors.stored_dtype == np.float16
    np.testing.assert_allclose(read, data, rtol=2**-11, atol=2**-24)  # float16 has an 11-bit significand
    size = lambda p: sum(f.stat().st_size for f in (p / "descriptors").iterdir() if f.name != ".zarray")  # noqa: E731
    assert size(tmp_path / "f16") * 2 == size(tmp_path / "f32")


def test_partial_store_resumes_and_a_chunk_without_marker_is_pending(tmp_path):
    store = DescriptorStore.open(tmp_path, KEY, num_items=10, chunk_size=4, dim=2)
    store.write_chunk(0, np.ones((4, 2)), np.ones(4, bool), [])
    store.close()
    resumed = DescriptorStore.open(tmp_path, KEY, num_items=10, chunk_size=4, dim=2)
    assert resumed.status == "resumed" and resumed.pending_chunks() == [1, 2]
    (tmp_path / "done" / "chunk_000000.json").unlink()  # data written, marker not yet: killed in between
    assert resumed.pending_chunks() == [1, 2]  # markers are listed once per open...
    assert resumed.pending_chunks(refresh=True) == [0, 1, 2]  # ...and again on request
    with pytest.raises(IncompleteStoreError, match="incomplete: 3 of 3"):
        resumed.load()
    resumed.close()


def test_chunk_data_that_does_not_match_its_marker_is_never_returned(tmp_path):
    store = DescriptorStore.open(tmp_path, KEY, num_items=4, chunk_size=2, dim=2)
    _fill(store)
    other = np.asarray(store.load().descriptors)
    # another writer overwrote chunk 1's bytes without a marker of its own
    store._array("descriptors")[2:4].write(np.full((2, 2), 7, np.float32)).result()
    view = DescriptorStore.open(tmp_path, KEY, num_items=4, chunk_size=2, dim=2).load().descriptors
    np.testing.assert_array_equal(view[0:2], other[0:2])
    with pytest.raises(StoreError, match="chunk 1 .* does not match its marker"):
        view[1:3]


@pytest.mark.parametrize(
    "change",
    [{"weights_sha256": "ff" * 32}, {"images": "00" * 32}, {"model": {"family": "cosplace", "backbone": "resnet50"}}],
)
def test_a_changed_key_rebuilds_the_store(tmp_path, change, caplog):
    with DescriptorStore.open(tmp_path, KEY, num_items=6, chunk_size=3, dim=2) as store:
        _fill(store)
    (tmp_path / "keep_me.txt").write_text("not ours")
    with caplog.at_level(logging.WARNING):
        rebuilt = DescriptorStore.open(tmp_path, {**KEY, **change}, num_items=6, chunk_size=3, dim=2)
    assert rebuilt.status == "rebuilt" and rebuilt.pending_chunks() == [0, 1]
    assert "stale (changed: key." in caplog.text
    assert (tmp_path / "keep_me.txt").exists()
    rebuilt.close()


def test_layout_changes_rebuild_too(tmp_path):
    def reopen(**layout):
        store = DescriptorStore.open(tmp_path, KEY, **{"num_items": 6, "chunk_size": 3, "dim": 2, **layout})
        status = store.status
        _fill(store)
        store.close()
        return status

    assert reopen() == "created"
    assert reopen(num_items=7) == "rebuilt"
    assert reopen(num_items=7, chunk_size=2) == "rebuilt"
    assert reopen(num_items=7, chunk_size=2, dim=3) == "rebuilt"
    assert reopen(num_items=7, chunk_size=2, dim=3, dtype="float16") == "rebuilt"
    assert reopen(num_items=7, chunk_size=2, dim=3, dtype="float16") == "reused"


def test_an_old_npz_store_is_detected_and_rebuilt(tmp_path, caplog):
    (tmp_path / "manifest.json").write_text(json.dumps({"format": 1, "key_sha256": "0" * 64, "key": {}}))
    np.savez(tmp_path / "chunk_000000.npz", descriptors=np.zeros((3, 2)), valid=np.ones(3, bool))
    (tmp_path / "notes.txt").write_text("user file")
    with caplog.at_level(logging.WARNING):
        store = DescriptorStore.open(tmp_path, KEY, num_items=3, chunk_size=3, dim=2)
    assert store.status == "rebuilt" and "old format 1 (npz chunks)" in caplog.text
    assert not (tmp_path / "chunk_000000.npz").exists() and (tmp_path / "notes.txt").exists()
    store.close()


def test_failures_and_validity_round_trip(tmp_path):
    store = DescriptorStore.open(tmp_path, KEY, num_items=3, chunk_size=3, dim=2)
    failure = {"index": 1, "path": "/db/bad.jpg", "error": "OSError: truncated"}
    store.write_chunk(0, np.arange(6).reshape(3, 2), np.array([True, False, True]), [failure])
    contents = store.load()
    assert contents.valid.tolist() == [True, False, True] and contents.failures == [failure]
    assert contents.descriptors.dtype == np.float32
    assert store.read_chunk(0).failures == [failure]


def test_refuses_a_foreign_directory_and_bad_chunks(tmp_path):
    (tmp_path / "photo.jpg").write_bytes(b"x")
    with pytest.raises(StoreError, match="not a descriptor store"):
        DescriptorStore.open(tmp_path, KEY, num_items=3, dim=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photo.jpg"]
    store = DescriptorStore.open(tmp_path / "s", KEY, num_items=3, chunk_size=3, dim=4)
    with pytest.raises(ValueError, match="needs 3 rows"):
        store.write_chunk(0, np.zeros((2, 4)), np.ones(2, bool), [])
    with pytest.raises(ValueError, match="holds 4-d descriptors"):
        store.write_chunk(0, np.zeros((3, 5)), np.ones(3, bool), [])
    (tmp_path / "s" / "manifest.json").write_text("{not json")
    with pytest.raises(StoreError, match="unreadable store manifest"):
        DescriptorStore.open(tmp_path / "s", KEY, num_items=3, dim=4)


def test_read_store_public_reader(tmp_path):
    store = DescriptorStore.open(tmp_path, KEY, num_items=5, chunk_size=2, dim=3)
    written = np.zeros((5, 3), np.float32)
    written[:2] = 1.0
    store.write_chunk(0, written[:2], np.ones(2, bool), [])
    with pytest.raises(IncompleteStoreError, match="incomplete: 2 of 3 chunk"):
        read_store(tmp_path)
    rest = _fill(store, seed=3)
    store.write_paths([f"img{i}.jpg" for i in range(5)])
    descriptors, valid, paths = read_store(tmp_path)
    np.testing.assert_array_equal(np.asarray(descriptors)[2:], rest[2:])
    assert valid.tolist() == [True] * 5 and paths == [f"img{i}.jpg" for i in range(5)]
    with pytest.raises(StoreError, match="holds no descriptor store"):
        read_store(tmp_path / "nothing")
    store.close()


def test_a_kvstore_url_store(tmp_path):
    url = f"file://{tmp_path}/remote/"
    store = DescriptorStore.open(url, KEY, num_items=4, chunk_size=2, dim=2)
    written = _fill(store)
    descriptors, valid, _ = read_store(url)
    np.testing.assert_array_equal(np.asarray(descriptors), written)
    assert DescriptorStore.open(url, KEY, num_items=4, chunk_size=2, dim=2).status == "reused"
    with pytest.raises(StoreError, match="never wiped automatically"):
        DescriptorStore.open(url, {**KEY, "images": "11" * 32}, num_items=4, chunk_size=2, dim=2)


def test_a_store_in_use_with_another_key_is_not_wiped(tmp_path):
    holder = DescriptorStore.open(tmp_path, KEY, num_items=4, chunk_size=2, dim=2)
    written = _fill(holder)
    other = {**KEY, "weights_sha256": "ee" * 32}
    t0 = time.monotonic()
    with pytest.raises(StoreError, match="in use by another run with another key"):
        DescriptorStore.open(tmp_path, other, num_items=4, chunk_size=2, dim=2, wait_s=0.5)
    assert time.monotonic() - t0 >= 0.5
    np.testing.assert_array_equal(np.asarray(holder.load().descriptors), written)  # untouched
    same = DescriptorStore.open(tmp_path, KEY, num_items=4, chunk_size=2, dim=2, wait_s=0.5)  # same key: shares it
    assert same.status == "reused"
    same.close()
    holder.close()
    rebuilt = DescriptorStore.open(tmp_path, other, num_items=4, chunk_size=2, dim=2, wait_s=0.5)
    assert rebuilt.status == "rebuilt"
    rebuilt.close()


DRIVER = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    import numpy as np
    sys.path.insert(0, sys.argv[1])
    from attllm_jax.retrieval.store import DescriptorStore, StoreError
    store_dir, key_name, hold_file = sys.argv[2], sys.argv[3], Path(sys.argv[4])
    key = {"model": key_name}
    try:
        store = DescriptorStore.open(store_dir, key, num_items=40, chunk_size=4, dim=8, wait_s=float(sys.argv[6]))
    except StoreError as error:
        print("REFUSED", error)
        sys.exit(3)
    for chunk in range(store.num_chunks):
        start, stop = store.chunk_range(chunk)
        rows = np.tile(np.arange(start, stop, dtype=np.float32)[:, None], (1, 8)) * (1 if key_name == "a" else -1)
        store.write_chunk(chunk, rows, np.ones(stop - start, bool), [])
    Path(str(hold_file) + ".ready").write_text("1")
    while hold_file.exists():  # keep the store open until told
        time.sleep(0.05)
    contents = store.load()
    print("SUM", float(np.asarray(contents.descriptors).sum()))
    store.close()
    """
)


def _spawn(tmp_path, store, key, hold, wait_s=0.5):
    return subprocess.Popen(
        [sys.executable, str(tmp_path / "driver.py"), str(REPO), str(store), key, str(hold), "0", str(wait_s)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_ready(hold: Path, proc, timeout=60):
    deadline = time.monotonic() + timeout
    while not Path(str(hold) + ".ready").exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_two_processes_sharing_a_store(tmp_path):
    """Issue 13 item 1: run B (another key) never wipes run A's store under it; two same-key runs share it."""
    (tmp_path / "driver.py").write_text(DRIVER)
    store = tmp_path / "store"
    procs = []
    try:
        hold_a = tmp_path / "hold_a"
        hold_a.write_text("1")
        a = _spawn(tmp_path, store, "a", hold_a)
        procs.append(a)
        _wait_ready(hold_a, a)
        b = _spawn(tmp_path, store, "b", tmp_path / "hold_b")
        procs.append(b)
        out_b, _ = b.communicate(timeout=60)
        assert b.returncode == 3 and "in use by another run with another key" in out_b, out_b
        # a same-key run shares the store while A holds it, and both see the same data
        hold_c = tmp_path / "hold_c"
        c = _spawn(tmp_path, store, "a", hold_c)
        procs.append(c)
        out_c, _ = c.communicate(timeout=60)
        hold_a.unlink()
        out_a, _ = a.communicate(timeout=60)
        want = f"SUM {float(8 * sum(range(40)))}"
        assert a.returncode == 0 and want in out_a, out_a
        assert c.returncode == 0 and want in out_c, out_c
        # once A is gone, B may rebuild the store for its key
        b2 = _spawn(tmp_path, store, "b", tmp_path / "hold_b2")
        procs.append(b2)
        out_b2, _ = b2.communicate(timeout=60)
        assert b2.returncode == 0 and f"SUM {-float(8 * sum(range(40)))}" in out_b2, out_b2
        assert not list(store.glob("**/*.tmp"))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_two_identical_writers_at_once_give_one_correct_store(tmp_path):
    (tmp_path / "driver.py").write_text(DRIVER)
    store = tmp_path / "store"
    procs = [_spawn(tmp_path, store, "a", tmp_path / f"absent_{i}", wait_s=30) for i in range(2)]
    try:
        outs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert all(p.returncode == 0 for p in procs), outs
    descriptors, valid, _ = read_store(store)
    np.testing.assert_array_equal(np.asarray(descriptors), np.tile(np.arange(40, dtype=np.float32)[:, None], (1, 8)))
    assert valid.all() and len(os.listdir(store / "done")) == 10


# Edited metadata: one StoreError naming the file, never a traceback or a wrong layout

MANIFEST_EDITS = {
    "num_items_text": ("num_items", "10"),
    "num_items_zero": ("num_items", 0),
    "chunk_size_zero": ("chunk_size", 0),  # was a ZeroDivisionError
    "chunk_size_float": ("chunk_size", 4.5),
    "chunk_size_other": ("chunk_size", 5),  # a valid number that is not the one the store was built with
    "dim_missing": ("dim", None),
    "dtype_unknown": ("dtype", "int8"),
    "key_list": ("key", [1, 2]),
    "digest_number": ("key_sha256", 7),
}


def _complete_store(path, num_items=10):
    store = DescriptorStore.open(path, KEY, num_items=num_items, chunk_size=4, dim=4)
    _fill(store)
    store.write_paths([f"img{i}.jpg" for i in range(num_items)])
    store.close()


def _edit_json(path, **fields):
    record = json.loads(path.read_text())
    for name, value in fields.items():
        if value is None:
            record.pop(name, None)
        else:
            record[name] = value
    path.write_text(json.dumps(record))


@pytest.mark.parametrize("edit", list(MANIFEST_EDITS), ids=list(MANIFEST_EDITS))
def test_an_edited_manifest_is_one_error_naming_the_file(tmp_path, edit):
    field, value = MANIFEST_EDITS[edit]
    _complete_store(tmp_path / "s")
    manifest = tmp_path / "s" / "manifest.json"
    _edit_json(manifest, **{field: value})
    with pytest.raises(StoreError, match=f"store manifest {manifest} is invalid") as info:
        read_store(tmp_path / "s")
    assert "\n" not in str(info.value)
    if field != "key_sha256":  # the run's own key: opened as this store, then refused (nothing wiped)
        edited = manifest.read_text()
        with pytest.raises(StoreError, match=f"store manifest {manifest} is invalid"):
            DescriptorStore.open(tmp_path / "s", KEY, num_items=10, chunk_size=4, dim=4)
        assert manifest.read_text() == edited and len(list((tmp_path / "s" / "done").iterdir())) == 3


MARKER_EDITS = {
    "chunk_text": {"chunk": "1"},
    "chunk_other": {"chunk": 0},  # the marker of chunk 1 claiming chunk 0
    "chunk_missing": {"chunk": None},
    "sha_missing": {"sha256": None},
    "valid_sha_number": {"valid_sha256": 3},
    "failures_text": {"failures": "none"},
}


@pytest.mark.parametrize("edit", list(MARKER_EDITS), ids=list(MARKER_EDITS))
def test_an_edited_chunk_marker_is_one_error_naming_the_file(tmp_path, edit):
    _complete_store(tmp_path / "s")
    marker = tmp_path / "s" / "done" / "chunk_000001.json"
    _edit_json(marker, **MARKER_EDITS[edit])
    with pytest.raises(StoreError, match=f"store marker {marker} is malformed") as info:
        read_store(tmp_path / "s")
    assert "\n" not in str(info.value) and "delete it to recompute that chunk" in str(info.value)
    with pytest.raises(StoreError, match=f"store marker {marker} is malformed"):
        DescriptorStore.open(tmp_path / "s", KEY, num_items=10, chunk_size=4, dim=4)


def test_an_edited_array_shape_or_image_list_is_one_error_naming_the_file(tmp_path):
    _complete_store(tmp_path / "s")
    paths = tmp_path / "s" / "paths.json"
    _edit_json(paths, paths=["only-one.jpg"])
    with pytest.raises(StoreError, match=f"store image list {paths} is malformed"):
        read_store(tmp_path / "s")
    paths.write_text("{broken")
    with pytest.raises(StoreError, match=f"store image list {paths} is not JSON"):
        read_store(tmp_path / "s")
    paths.unlink()
    zarray = tmp_path / "s" / "descriptors" / ".zarray"
    _edit_json(zarray, shape=[12, 4])
    with pytest.raises(StoreError, match=f"store array {tmp_path / 's'}/descriptors/.zarray has shape"):
        read_store(tmp_path / "s")


# Store URLs: an unknown scheme, an unreachable bucket


def test_an_unknown_url_scheme_is_one_error_naming_the_url():
    with pytest.raises(StoreError, match=r"store URL foo://bucket/store/ cannot be used \(.*unsupported URL scheme"):
        DescriptorStore.open("foo://bucket/store", KEY, num_items=3, dim=2)
    with pytest.raises(StoreError, match="store URL foo://x/ cannot be used"):
        read_store("foo://x")


UNREACHABLE_SCRIPT = """
import sys, time
from attllm_jax.retrieval import store
store.URL_TIMEOUT_S = 2.0
for name, call in (("open", lambda: store.DescriptorStore.open("gs://flood-bucket/db", {}, 3, dim=2)),
                   ("read", lambda: store.read_store("gs://flood-bucket/db"))):
    start = time.monotonic()
    try:
        call()
        print(name, "no error")
    except store.StoreError as error:
        print(name, round(time.monotonic() - start, 1), error)
"""


def test_an_unreachable_bucket_fails_within_the_stated_time(tmp_path):
    """The GCS endpoint is a closed port on 127.0.0.1 (tensorstore's TENSORSTORE_GCS_HTTP_URL) and a fixed test
    token stands in for credentials: no request leaves the machine. URL_TIMEOUT_S is shortened to 2 s; tensorstore
    alone keeps retrying for minutes."""
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO), "TENSORSTORE_GCS_HTTP_URL": f"http://127.0.0.1:{port}"}
    env.update(GOOGLE_AUTH_TOKEN_FOR_TESTING="test-token", GCE_METADATA_ROOT=f"127.0.0.1:{port}")
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", UNREACHABLE_SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    elapsed = time.monotonic() - start
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["open", "read"], result.stdout
    for line in lines:
        seconds = float(line.split()[1])
        assert 1.9 <= seconds < 10, line  # the 2 s bound, plus slack for a loaded machine
        assert "store URL gs://flood-bucket/db/ did not answer within 2 s (reading manifest.json)" in line
    assert elapsed < 100  # and the process exits although tensorstore may still be retrying


def test_markers_are_listed_and_read_once_per_run_of_many_chunks(tmp_path, monkeypatch):
    """A run asks for the pending chunks 3-4 times and loads the store once: one listing, one read per marker."""
    from attllm_jax.retrieval import store as store_module

    reads = []
    plain_read = store_module._Root.read
    monkeypatch.setattr(store_module._Root, "read", lambda self, name: reads.append(name) or plain_read(self, name))
    with DescriptorStore.open(tmp_path, KEY, num_items=600, chunk_size=2, dim=2) as first:
        assert first.listings == 0  # a new store has no markers to list
        for chunk in range(0, 300, 2):  # half the chunks: the run below resumes
            first.write_chunk(chunk, np.ones((2, 2)), np.ones(2, bool), [])
    reads.clear()
    store = DescriptorStore.open(tmp_path, KEY, num_items=600, chunk_size=2, dim=2)
    pending = store.pending_chunks()
    assert store.status == "resumed" and pending == list(range(1, 300, 2))
    for chunk in pending:
        store.write_chunk(chunk, np.ones((2, 2)), np.ones(2, bool), [])
    assert store.pending_chunks() == [] and store.pending_chunks() == []
    contents = store.load()
    assert contents.valid.all() and len(contents.failures) == 0
    assert store.listings == 1
    assert len([n for n in reads if n.startswith("done/")]) == 150  # the markers found at open, each read once
    assert store.pending_chunks(refresh=True) == [] and store.listings == 2
    assert len([n for n in reads if n.startswith("done/")]) == 150  # a refresh reads only new marker files
    store.close()
