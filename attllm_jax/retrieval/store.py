"""An on-disk, chunked, resumable store of database descriptors on tensorstore (zarr), read lazily.

Layout of a store (a local directory, or a tensorstore kvstore URL such as ``gs://bucket/store/``)::

    manifest.json        {"format": 2, "key", "key_sha256", "num_items", "chunk_size", "dim", "dtype"}
    descriptors/         zarr array [N, D] float32 or float16, chunked [chunk_size, D] along the items
    valid/               zarr array [N] bool, chunked [chunk_size]
    done/chunk_NNNNNN.json   one marker per complete chunk: the key digest, sha256 of the chunk's stored bytes,
                             the chunk's failure records
    paths.json           the image list (written by the evaluation, for :func:`read_store`)
    .lock                the local lock file (local stores only)

The key describes everything the descriptors depend on (model, weights digest, preprocessing, the image list, the
layout); a chunk counts as written only when its marker exists, carries this store's key digest and the chunk's
bytes hash to the marker's checksum. A marker is written (atomically, under a unique temporary name) after the
chunk's data, so a killed extraction resumes from its complete chunks and never trusts a half-written one.

Runs sharing one store (issue 13): every process that opens a local store holds a shared ``flock`` on ``.lock``
for as long as it has the store open. A store of another key is wiped and rebuilt only under the exclusive lock,
so a stale store that another run is using is never wiped: the second run waits up to ``wait_s`` and then
refuses, naming the store. Runs of the same key share the store (chunks are deterministic, so two runs writing
one chunk write the same bytes). A store at a URL has no lock: a stale one is never wiped automatically.
An old npz store (format 1) is detected and rebuilt, with a log line saying so.

A store URL is checked when the store is opened: a scheme tensorstore does not know (``foo://``) is a
:class:`StoreError` naming the URL, and every small-file operation at a URL (manifest, markers, image list, array
metadata) that gets no answer within :data:`URL_TIMEOUT_S` seconds is one too (an unreachable bucket otherwise
retries for minutes). Reads and writes of the descriptor chunks themselves are not bounded (a large store over a
slow link may take long).

Metadata is checked before it is used: a manifest of this key whose fields have the wrong type or value, or no
longer match the key they were hashed from (an edited manifest), a marker of this key that is malformed, a zarr
array whose shape is not the manifest's, or a malformed ``paths.json`` is a :class:`StoreError` naming the file
(delete it, or the store, to recompute), never a traceback or a silently wrong layout.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from attllm_jax.files import atomic_write_bytes

STORE_FORMAT = 2
MANIFEST = "manifest.json"
PATHS = "paths.json"
LOCK = ".lock"
DESCRIPTORS = "descriptors"
VALID = "valid"
DONE = "done"
STORE_DTYPES = ("float32", "float16")
_OUR_NAMES = {MANIFEST, PATHS, LOCK, DESCRIPTORS, VALID, DONE}
_OLD_CHUNK_PREFIX = "chunk_"  # format 1: chunk_NNNNNN.npz
URL_TIMEOUT_S = 30.0  # a store URL that does not answer a small-file operation within this is an error

log = logging.getLogger(__name__)


class StoreError(RuntimeError):
    """The store cannot be used (foreign files, unreadable manifest, in use with another key, corrupt chunks)."""


class IncompleteStoreError(StoreError):
    """The store has chunks that are not written yet (an extraction is running or was interrupted)."""


def key_digest(key: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of a store key."""
    return hashlib.sha256(json.dumps(key, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def _is_url(location: str | os.PathLike) -> bool:
    return isinstance(location, str) and "://" in location


class _Root:
    """Small-file I/O at the store's root: a local directory (atomic writes) or a tensorstore kvstore URL."""

    def __init__(self, location: str | os.PathLike):
        self.url = str(location).rstrip("/") + "/" if _is_url(location) else None
        self.path = None if self.url else Path(location)
        self._kv = None
        self.listings = 0  # how many times a folder was listed (a test counts them; each costs a round trip at a URL)
        if self.url:
            import tensorstore as ts

            try:
                self._kv = ts.KvStore.open(self.url).result(timeout=URL_TIMEOUT_S)
            except ValueError as error:  # tensorstore: an unknown scheme or a malformed URL
                raise StoreError(
                    f"store URL {self.url} cannot be used ({str(error).splitlines()[0][:200]}); give a local "
                    "directory or a tensorstore kvstore URL such as gs://bucket/path/"
                ) from None

    def __str__(self) -> str:
        return self.url or str(self.path)

    def answer(self, future: Any, what: str) -> Any:
        """The result of a tensorstore operation on the store URL, within :data:`URL_TIMEOUT_S` seconds.

        Raises:
            StoreError: naming the URL, when it does not answer in time or refuses (no access, no bucket).
        """
        try:
            return future.result(timeout=URL_TIMEOUT_S)
        except TimeoutError:
            raise StoreError(
                f"store URL {self.url} did not answer within {URL_TIMEOUT_S:g} s ({what}): unreachable, or no "
                "access? Check the URL, the network and the credentials"
            ) from None
        except ValueError as error:  # tensorstore reports refusals (permissions, missing bucket) as ValueError
            raise StoreError(f"store URL {self.url}: {what} failed ({str(error).splitlines()[0][:200]})") from None

    def array_kvstore(self, name: str):
        return self.url + name + "/" if self.url else {"driver": "file", "path": str(self.path / name)}

    def read(self, name: str) -> bytes | None:
        if self.url:
            result = self.answer(self._kv.read(name), f"reading {name}")
            return None if result.state == "missing" else bytes(result.value)
        try:
            return (self.path / name).read_bytes()
        except FileNotFoundError:
            return None

    def write(self, name: str, data: bytes) -> None:
        if self.url:
            self.answer(self._kv.write(name, data), f"writing {name}")
            return
        try:
            atomic_write_bytes(self.path / name, data)
        except OSError as error:
            raise StoreError(_write_failure(self.path / name, error.strerror or str(error))) from None

    def list(self, prefix: str) -> list[str]:
        self.listings += 1
        if self.url:
            import tensorstore as ts

            keys = self.answer(self._kv.list(ts.KvStore.KeyRange(prefix, prefix + "\xff")), f"listing {prefix}")
            return sorted(k.decode() if isinstance(k, bytes) else k for k in keys)
        folder = self.path / prefix.rstrip("/")
        return sorted(f"{prefix}{p.name}" for p in folder.iterdir()) if folder.is_dir() else []


@dataclass(frozen=True)
class StoreContents:
    """A complete store, its descriptors read lazily.

    Attributes:
        descriptors: ``[N, D]`` float32 array-like (:class:`StoreArray`); rows of failed items are zeros.
        valid: ``[N]`` bool, False for items that could not be read.
        failures: ``{"index", "path", "error"}`` records of the failed items.
    """

    descriptors: Any
    valid: np.ndarray
    failures: list[dict[str, Any]]


class StoreArray:
    """``[N, D]`` float32 view of a store's descriptors, read chunk by chunk on indexing.

    Every chunk is checked against its marker's sha256 the first time it is read, so data written under another
    key (or half-written) is never returned. ``np.asarray(view)`` reads everything; ``view[a:b]`` reads the chunks
    covering rows a..b.
    """

    def __init__(self, array, chunk_size: int, checksums: dict[int, str], location: str):
        self._array = array
        self.chunk_size = chunk_size
        self._checksums = checksums
        self._verified: set[int] = set()
        self._location = location
        self.shape = tuple(int(s) for s in array.shape)
        self.dtype = np.dtype(np.float32)
        self.stored_dtype = np.dtype(array.dtype.numpy_dtype)

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def ndim(self) -> int:
        return 2

    def _read_rows(self, start: int, stop: int) -> np.ndarray:
        if stop <= start:
            return np.zeros((0, self.shape[1]), np.float32)
        first, last = start // self.chunk_size, (stop - 1) // self.chunk_size
        lo, hi = first * self.chunk_size, min((last + 1) * self.chunk_size, self.shape[0])
        try:
            data = np.asarray(self._array[lo:hi].read().result())
        except ValueError as error:  # tensorstore: a truncated or unreadable chunk file
            chunks = f"chunk {first}" if first == last else f"chunks {first}-{last}"
            raise StoreError(
                f"store {chunks} of {self._location} cannot be read ({str(error)[:200]}); delete the store's done/ "
                "marker of that chunk to recompute it"
            ) from None
        for chunk in range(first, last + 1):
            if chunk in self._verified:
                continue
            a, b = chunk * self.chunk_size - lo, min((chunk + 1) * self.chunk_size, self.shape[0]) - lo
            if _sha256(data[a:b]) != self._checksums.get(chunk):
                raise StoreError(
                    f"store chunk {chunk} of {self._location} does not match its marker (changed or half-written); "
                    "delete the store's done/ marker of that chunk to recompute it"
                )
            self._verified.add(chunk)
        return data[start - lo : stop - lo].astype(np.float32)

    def __getitem__(self, index):
        if isinstance(index, tuple):
            rows, rest = index[0], index[1:]
            return self[rows][(slice(None), *rest)]
        if isinstance(index, slice):
            start, stop, step = index.indices(self.shape[0])
            if step != 1:
                return self._read_rows(0, self.shape[0])[index]
            return self._read_rows(start, stop)
        if isinstance(index, (int, np.integer)):
            i = int(index) + (self.shape[0] if index < 0 else 0)
            return self._read_rows(i, i + 1)[0]
        return self._read_rows(0, self.shape[0])[index]

    def __array__(self, dtype=None, copy=None):
        out = self._read_rows(0, self.shape[0])
        return out if dtype is None else out.astype(dtype)


def _write_failure(where: str | os.PathLike, reason: str) -> str:
    """The one line of a failed store write: where, why, and the flag to change."""
    return f"cannot write the descriptor store at {where} ({reason}): free space there or give another --store_dir"


def _ts_reason(error: Exception) -> str:
    """The gist of a tensorstore error: the OS reason when it names one (``No space left on device``)."""
    text = str(error).splitlines()[0]
    for reason in ("No space left on device", "Permission denied", "Read-only file system", "Disk quota exceeded"):
        if reason in text:
            return reason
    return text[:200]


def _sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _marker(chunk: int) -> str:
    return f"{DONE}/chunk_{chunk:06d}.json"


def _marker_number(name: str) -> int | None:
    """The chunk number of a marker file name ``done/chunk_NNNNNN.json``, or None for any other file."""
    base = name.rsplit("/", 1)[-1]
    number = base[len("chunk_") : -len(".json")]
    if not (base.startswith("chunk_") and base.endswith(".json") and number.isdigit()):
        return None
    return int(number)


class DescriptorStore:
    """A store opened for one key; create it with :meth:`open`, release it with :meth:`close` (or ``with``).

    Attributes:
        location: The store directory or URL (as given).
        num_items: Items (database images) covered.
        chunk_size: Items per chunk.
        dtype: Stored descriptor dtype ("float32" or "float16").
        status: How it was opened: "created", "reused" (complete), "resumed" (some chunks present) or "rebuilt"
            (a stale or old-format store was wiped).
    """

    def __init__(self, root: _Root, manifest: dict, status: str, lock_fd: int | None):
        self._root = root
        self._manifest = manifest
        self.num_items = int(manifest["num_items"])
        self.chunk_size = int(manifest["chunk_size"])
        self.dtype = manifest["dtype"]
        self.dim = int(manifest["dim"])
        self.status = status
        self._lock_fd = lock_fd
        self._digest = manifest["key_sha256"]
        self._arrays: dict[str, Any] = {}
        self._known: dict[int, dict] | None = None  # markers of this key seen so far (None: not listed yet)
        self._names_read: set[str] = set()  # marker files already read (a marker is immutable once written)

    @property
    def listings(self) -> int:
        """How many times this store listed its ``done/`` markers (once per open; again only on refresh)."""
        return self._root.listings

    @property
    def directory(self):
        """The store's local directory (a Path), or its URL."""
        return self._root.path if self._root.path is not None else self._root.url

    @classmethod
    def open(
        cls,
        location: str | os.PathLike,
        key: dict[str, Any],
        num_items: int,
        chunk_size: int = 256,
        *,
        dim: int,
        dtype: str = "float32",
        wait_s: float = 30.0,
    ) -> DescriptorStore:
        """Opens (or creates, or rebuilds) the store for ``key``.

        Args:
            location: A local directory (created when missing) or a tensorstore kvstore URL.
            key: JSON-able description of what the descriptors depend on.
            num_items: Number of items (must be > 0).
            chunk_size: Items per chunk (part of the layout: a different value rebuilds the store).
            dim: Descriptor dimension D (part of the layout).
            dtype: Stored dtype, "float32" or "float16" (part of the layout).
            wait_s: How long to wait for another run that uses the store with another key before refusing.

        Returns:
            The opened store, holding a shared lock until :meth:`close`.

        Raises:
            StoreError: the directory holds files that are not a store's, or another run uses the store with
                another key (nothing is deleted then).
        """
        if num_items < 1 or chunk_size < 1 or dim < 1:
            raise ValueError(f"num_items, chunk_size and dim must be >= 1, got {num_items}, {chunk_size}, {dim}")
        if dtype not in STORE_DTYPES:
            raise ValueError(f"--store_dtype must be one of {STORE_DTYPES}, got {dtype!r}")
        root = _Root(location)
        layout = {
            "num_items": int(num_items),
            "chunk_size": int(chunk_size),
            "dim": int(dim),
            "dtype": dtype,
            "format": STORE_FORMAT,
        }
        full_key = {"key": key, **layout}
        digest = key_digest(full_key)
        if root.path is not None:
            root.path.mkdir(parents=True, exist_ok=True)
            if root.read(MANIFEST) is None:
                foreign = [p.name for p in root.path.iterdir() if p.name not in _OUR_NAMES]
                if foreign and not all(_old_store_file(n) for n in foreign):
                    raise StoreError(
                        f"{root} is not empty and is not a descriptor store (found {sorted(foreign)[:3]}); "
                        "choose another --store_dir or empty it"
                    )
        lock_fd = _lock_shared(root)
        try:
            store = cls._open_locked(root, full_key, digest, lock_fd, wait_s)
        except BaseException:
            _unlock(lock_fd)
            raise
        return store

    @classmethod
    def _open_locked(cls, root: _Root, full_key: dict, digest: str, lock_fd: int | None, wait_s: float):
        deadline = time.monotonic() + wait_s
        while True:
            manifest = _read_manifest(root)
            if manifest is not None and manifest.get("key_sha256") == digest:
                store = cls(root, _check_manifest(root, manifest), "resumed", lock_fd)
                store.status = "reused" if not store.pending_chunks() else "resumed"
                return store
            reason = _stale_reason(manifest, full_key)
            if root.url is not None and manifest is not None:
                raise StoreError(
                    f"store {root} holds descriptors of another key ({reason}); a store at a URL is never wiped "
                    "automatically: delete it or choose another --store_dir"
                )
            if _try_exclusive(lock_fd):
                # nobody else has the store open: (re)build it, then go back to sharing it
                try:
                    manifest = _read_manifest(root)
                    if manifest is not None and manifest.get("key_sha256") == digest:
                        continue  # another process of this run created it meanwhile
                    status = "created"
                    if manifest is not None or _has_old_files(root):
                        log.warning("descriptor store %s is %s; rebuilding it", root, reason)
                        _wipe(root)
                        status = "rebuilt"
                    layout = {name: value for name, value in full_key.items() if name != "key"}
                    manifest = {**layout, "key_sha256": digest, "key": full_key}
                    store = cls(root, manifest, status, lock_fd)
                    store._known = {}  # a new store has no markers: no listing needed
                    store._create_arrays()
                    root.write(MANIFEST, json.dumps(manifest, indent=1, default=str).encode())
                    return store
                finally:
                    _downgrade(lock_fd)
            if time.monotonic() > deadline:
                raise StoreError(
                    f"store {root} is in use by another run with another key ({reason}); it is not wiped while in "
                    "use: wait for that run to finish, or choose another --store_dir"
                )
            time.sleep(0.05 + 0.2 * random.random())

    def close(self) -> None:
        """Releases the shared lock (the store stays on disk)."""
        _unlock(self._lock_fd)
        self._lock_fd = None

    def __enter__(self) -> DescriptorStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # layout -----------------------------------------------------------------------------------------------------

    @property
    def num_chunks(self) -> int:
        return -(-self.num_items // self.chunk_size)

    def chunk_range(self, chunk: int) -> tuple[int, int]:
        """Item range ``[start, stop)`` of a chunk."""
        start = chunk * self.chunk_size
        return start, min(start + self.chunk_size, self.num_items)

    def chunk_of(self, index: int) -> int:
        """The chunk holding item ``index``."""
        return index // self.chunk_size

    def _markers(self, refresh: bool = False) -> dict[int, dict]:
        """The markers of this key, by chunk (markers of another key are ignored).

        The ``done/`` folder is listed once per opened store; later calls answer from what was seen, plus the
        markers this store wrote itself. ``refresh`` lists again (other processes may have written chunks since)
        and reads only the marker files not read before: on object storage with ~11k chunks each listing and
        each marker read is a round trip.
        """
        if self._known is not None and not refresh:
            return self._known
        listed = self._root.list(f"{DONE}/")
        self._names_read &= set(listed)  # a deleted marker: its chunk is pending again
        known = {c: m for c, m in (self._known or {}).items() if _marker(c) in self._names_read}
        for name in listed:
            if name in self._names_read:
                continue
            number = _marker_number(name)
            if number is None:
                continue
            marker = self._read_marker(name, number)
            self._names_read.add(name)
            if marker is not None:
                known[number] = marker
        self._known = known
        return known

    def _read_marker(self, name: str, number: int) -> dict | None:
        """The marker in file ``name`` when it is of this key (checked), else None."""
        data = self._root.read(name)
        try:
            marker = json.loads(data) if data is not None else None
        except ValueError:
            return None  # a marker is written atomically; an unparsable one is not ours
        if not (isinstance(marker, dict) and marker.get("key_sha256") == self._digest):
            return None
        problem = _marker_problem(marker, number)
        if problem is not None:
            raise StoreError(
                f"store marker {self._root}/{name} is malformed: {problem}; delete it to recompute that chunk"
            )
        return marker

    def pending_chunks(self, refresh: bool = False) -> list[int]:
        """Chunks not yet written under this key, in order.

        Args:
            refresh: List the markers again (after other processes wrote chunks); else the markers seen when the
                store was opened plus those this store wrote.
        """
        done = self._markers(refresh)
        return [c for c in range(self.num_chunks) if c not in done]

    # data -------------------------------------------------------------------------------------------------------

    def _array(self, name: str, create: bool = False):
        if name in self._arrays:
            return self._arrays[name]
        import tensorstore as ts

        spec: dict[str, Any] = {"driver": "zarr", "kvstore": self._root.array_kvstore(name)}
        if create:
            shape, chunks = [self.num_items], [self.chunk_size]
            if name == DESCRIPTORS:
                shape, chunks = [self.num_items, self.dim], [self.chunk_size, self.dim]
            dtype = {"float32": "<f4", "float16": "<f2"}[self.dtype] if name == DESCRIPTORS else "|b1"
            spec.update(
                metadata={"shape": shape, "chunks": chunks, "dtype": dtype, "compressor": None},
                create=True,
                delete_existing=True,
            )
        else:
            spec["open"] = True
        try:
            future = ts.open(spec)
            array = self._root.answer(future, f"opening {name}") if self._root.url else future.result()
        except ValueError as error:
            raise StoreError(f"cannot open the {name} array of store {self._root}: {error}") from error
        expected = (self.num_items, self.dim) if name == DESCRIPTORS else (self.num_items,)
        if tuple(array.shape) != expected:
            raise StoreError(
                f"store array {self._root}/{name}/.zarray has shape {tuple(array.shape)}, but {MANIFEST} says "
                f"{expected}; delete the store to recompute it"
            )
        self._arrays[name] = array
        return array

    def _create_arrays(self) -> None:
        self._array(DESCRIPTORS, create=True)
        self._array(VALID, create=True)

    def write_chunk(
        self, chunk: int, descriptors: np.ndarray, valid: np.ndarray, failures: list[dict[str, Any]]
    ) -> None:
        """Writes one complete chunk, then its marker.

        Args:
            chunk: Chunk number.
            descriptors: ``[n, D]`` float32, n = the chunk's item count.
            valid: ``[n]`` bool.
            failures: Records of the chunk's failed items.
        """
        start, stop = self.chunk_range(chunk)
        descriptors = np.asarray(descriptors, dtype=np.float32)
        valid = np.asarray(valid, dtype=bool)
        if descriptors.ndim != 2 or len(descriptors) != stop - start or valid.shape != (stop - start,):
            raise ValueError(f"chunk {chunk} needs {stop - start} rows, got {descriptors.shape} and {valid.shape}")
        if descriptors.shape[1] != self.dim:
            raise ValueError(
                f"store {self._root} holds {self.dim}-d descriptors, chunk {chunk} has {descriptors.shape[1]}"
            )
        array = self._array(DESCRIPTORS)
        stored = descriptors.astype(array.dtype.numpy_dtype)
        try:
            array[start:stop].write(stored).result()
            self._array(VALID)[start:stop].write(valid).result()
        except ValueError as error:  # tensorstore: a full disk, a read-only folder, a failing bucket
            raise StoreError(_write_failure(f"{self._root} (chunk {chunk})", _ts_reason(error))) from None
        marker = {
            "chunk": int(chunk),
            "key_sha256": self._digest,
            "sha256": _sha256(stored),
            "valid_sha256": _sha256(valid),
            "failures": failures,
        }
        self._root.write(_marker(chunk), json.dumps(marker, default=str).encode())
        if self._known is not None:
            self._known[int(chunk)] = marker
            self._names_read.add(_marker(chunk))

    def load(self) -> StoreContents:
        """The complete store: descriptors read lazily, validity and failures read now.

        Raises:
            IncompleteStoreError: chunks are missing.
            StoreError: a chunk does not match its marker.
        """
        markers = self._markers()
        if len(markers) < self.num_chunks:  # other processes may have written the rest since the last listing
            markers = self._markers(refresh=True)
        missing = [c for c in range(self.num_chunks) if c not in markers]
        if missing:
            raise IncompleteStoreError(
                f"store {self._root} is incomplete: {len(missing)} of {self.num_chunks} chunk(s) not written yet "
                "(an extraction is running or was interrupted; rerun it to finish)"
            )
        try:
            valid = np.asarray(self._array(VALID).read().result(), dtype=bool)
        except ValueError as error:  # tensorstore: a truncated or unreadable chunk file
            raise StoreError(
                f"the valid mask of store {self._root} cannot be read ({str(error)[:200]}); delete the store to "
                "recompute it"
            ) from None
        for chunk in range(self.num_chunks):
            start, stop = self.chunk_range(chunk)
            if _sha256(valid[start:stop]) != markers[chunk]["valid_sha256"]:
                raise StoreError(f"store chunk {chunk} of {self._root} does not match its marker (valid mask)")
        checksums = {c: m["sha256"] for c, m in markers.items()}
        view = StoreArray(self._array(DESCRIPTORS), self.chunk_size, checksums, str(self._root))
        failures = [f for c in range(self.num_chunks) for f in markers[c]["failures"]]
        return StoreContents(view, valid, failures)

    def read_chunk(self, chunk: int) -> StoreContents:
        """Reads one written chunk (descriptors as float32 in memory)."""
        marker = self._markers().get(chunk) or self._markers(refresh=True).get(chunk)
        if marker is None:
            raise IncompleteStoreError(f"store {self._root}: chunk {chunk} is not written yet")
        start, stop = self.chunk_range(chunk)
        view = StoreArray(self._array(DESCRIPTORS), self.chunk_size, {chunk: marker["sha256"]}, str(self._root))
        valid = np.asarray(self._array(VALID)[start:stop].read().result(), dtype=bool)
        return StoreContents(view[start:stop], valid, marker["failures"])

    def write_paths(self, paths: list[str]) -> None:
        """Records the image list (one path per item) for :func:`read_store`."""
        if len(paths) != self.num_items:
            raise ValueError(f"{len(paths)} paths for a store of {self.num_items} items")
        self._root.write(PATHS, json.dumps({"key_sha256": self._digest, "paths": list(paths)}).encode())


def read_store(location: str | os.PathLike) -> tuple[StoreArray, np.ndarray, list[str]]:
    """Opens a complete store for reading, whatever its key.

    Args:
        location: The store directory or kvstore URL.

    Returns:
        ``(descriptors [N, D] float32 array-like read lazily, valid [N] bool, paths list[str])``; ``paths`` is empty
        when the store was written without an image list.

    Raises:
        IncompleteStoreError: the store is being written (or the extraction was interrupted).
        StoreError: no store there, or an old-format or corrupt one.
    """
    root = _Root(location)
    manifest = _read_manifest(root)
    if manifest is None:
        raise StoreError(f"{root} holds no descriptor store (no {MANIFEST})")
    if manifest.get("format") != STORE_FORMAT:
        raise StoreError(f"{root} is a format-{manifest.get('format')} store; rerun the extraction to rebuild it")
    _check_manifest(root, manifest)
    lock_fd = _lock_shared(root)
    try:
        store = DescriptorStore(root, manifest, "reused", None)
        contents = store.load()
        paths_data = root.read(PATHS)
    finally:
        _unlock(lock_fd)
    return contents.descriptors, contents.valid, _paths_of(root, paths_data, manifest)


def _paths_of(root: _Root, data: bytes | None, manifest: dict) -> list[str]:
    """The image list of ``paths.json`` when it belongs to this key, else []; StoreError when malformed."""
    if data is None:
        return []
    try:
        record = json.loads(data)
    except ValueError as error:
        raise StoreError(f"store image list {root}/{PATHS} is not JSON ({error}); delete it") from None
    if not isinstance(record, dict) or record.get("key_sha256") != manifest["key_sha256"]:
        return []
    paths = record.get("paths")
    if not isinstance(paths, list) or len(paths) != manifest["num_items"] or not all(isinstance(p, str) for p in paths):
        raise StoreError(
            f"store image list {root}/{PATHS} is malformed: expected {manifest['num_items']} path strings; delete it"
        )
    return paths


# helpers --------------------------------------------------------------------------------------------------------


def _read_manifest(root: _Root) -> dict | None:
    data = root.read(MANIFEST)
    if data is None:
        return None
    try:
        manifest = json.loads(data)
    except ValueError as error:
        raise StoreError(f"unreadable store manifest {root}/{MANIFEST}: {error}") from error
    if not isinstance(manifest, dict):
        raise StoreError(f"unreadable store manifest {root}/{MANIFEST}: not a JSON object")
    return manifest


_LAYOUT_INTS = ("num_items", "chunk_size", "dim")


def _manifest_problem(manifest: dict) -> str | None:
    """What is wrong with a manifest of this format (wrong types or values, edited fields), or None."""
    for name in _LAYOUT_INTS:
        value = manifest.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            return f"{name} is {value!r}, expected an integer >= 1"
    if manifest.get("dtype") not in STORE_DTYPES:
        return f"dtype is {manifest.get('dtype')!r}, expected one of {STORE_DTYPES}"
    key = manifest.get("key")
    if not isinstance(key, dict) or not isinstance(manifest.get("key_sha256"), str):
        return "key or key_sha256 is missing or of the wrong type"
    if key_digest(key) != manifest["key_sha256"]:
        return "key_sha256 does not match its key (edited?)"
    changed = [name for name in (*_LAYOUT_INTS, "dtype", "format") if key.get(name) != manifest.get(name)]
    if changed:
        return f"{', '.join(changed)} differ from the key they were hashed with (edited?)"
    return None


def _check_manifest(root: _Root, manifest: dict) -> dict:
    """``manifest``, or a StoreError naming the file when :func:`_manifest_problem` finds something wrong."""
    problem = _manifest_problem(manifest)
    if problem is not None:
        raise StoreError(f"store manifest {root}/{MANIFEST} is invalid: {problem}; delete the store to recompute it")
    return manifest


def _marker_problem(marker: dict, chunk: int) -> str | None:
    """What is wrong with a marker of this key read from ``done/chunk_<chunk>.json``, or None."""
    number = marker.get("chunk")
    if not isinstance(number, int) or isinstance(number, bool) or number != chunk:
        return f"chunk is {number!r}, expected {chunk} (its file name)"
    for name in ("sha256", "valid_sha256"):
        if not isinstance(marker.get(name), str):
            return f"{name} is {marker.get(name)!r}, expected a hex digest"
    failures = marker.get("failures")
    if not isinstance(failures, list) or not all(isinstance(f, dict) for f in failures):
        return "failures is not a list of records"
    return None


def _stale_reason(manifest: dict | None, full_key: dict) -> str:
    if manifest is None:
        return "new"
    if manifest.get("format") != STORE_FORMAT:
        return f"in the old format {manifest.get('format')} (npz chunks), not the tensorstore format {STORE_FORMAT}"
    normalized = json.loads(json.dumps(full_key, default=str))
    old_key = manifest.get("key")
    changed = sorted(_changed_fields(old_key if isinstance(old_key, dict) else {}, normalized))
    return f"stale (changed: {', '.join(changed)})"


def _changed_fields(old: dict, new: dict, prefix: str = "") -> set[str]:
    changed = set()
    for name in set(old) | set(new):
        a, b = old.get(name), new.get(name)
        if isinstance(a, dict) and isinstance(b, dict):
            changed |= _changed_fields(a, b, f"{prefix}{name}.")
        elif a != b:
            changed.add(prefix + name)
    return changed


def _old_store_file(name: str) -> bool:
    return (name.startswith(_OLD_CHUNK_PREFIX) and name.endswith(".npz")) or name.endswith(".tmp")


def _has_old_files(root: _Root) -> bool:
    return root.path is not None and any(_old_store_file(p.name) for p in root.path.iterdir())


def _wipe(root: _Root) -> None:
    """Deletes the store's own files only (local stores; called under the exclusive lock)."""
    for path in root.path.iterdir():
        if path.name in (DESCRIPTORS, VALID, DONE) and path.is_dir():
            shutil.rmtree(path)
        elif path.name in (MANIFEST, PATHS) or _old_store_file(path.name):
            path.unlink()


def _lock_shared(root: _Root) -> int | None:
    if root.path is None:
        return None
    fd = os.open(root.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd


def _try_exclusive(fd: int | None) -> bool:
    """Trades the shared lock for the exclusive one, if nobody else holds the store; else keeps the shared one."""
    if fd is None:
        return True
    fcntl.flock(fd, fcntl.LOCK_UN)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        fcntl.flock(fd, fcntl.LOCK_SH)
        return False


def _downgrade(fd: int | None) -> None:
    if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_SH)


def _unlock(fd: int | None) -> None:
    if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
