"""An on-disk, chunked, resumable store of database descriptors.

Layout of a store directory::

    manifest.json        {"format", "key", "key_sha256", "num_items", "chunk_size"}
    chunk_000000.npz     descriptors [n, D] float32, valid [n] bool, failures (JSON text)
    ...

The key describes everything the descriptors depend on (model config, weights digest, preprocessing, the image
list); a store is reused only when the key matches exactly, and a stale store is wiped (only its own files) and
rebuilt. Chunks cover consecutive item ranges and are written atomically (temporary file + rename), so a killed
extraction resumes from the last complete chunk and never trusts a half-written one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from attllm_jax.files import atomic_write

STORE_FORMAT = 1
MANIFEST = "manifest.json"
_CHUNK_PREFIX = "chunk_"

log = logging.getLogger(__name__)


class StoreError(RuntimeError):
    """The store directory cannot be used (foreign files, unreadable manifest, inconsistent chunks)."""


def key_digest(key: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of a store key."""
    return hashlib.sha256(json.dumps(key, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


@dataclass(frozen=True)
class StoreContents:
    """Everything a complete store holds.

    Attributes:
        descriptors: ``[N, D]`` float32; rows of failed items are zeros.
        valid: ``[N]`` bool, False for items that could not be read.
        failures: ``{"index", "path", "error"}`` records of the failed items.
    """

    descriptors: np.ndarray
    valid: np.ndarray
    failures: list[dict[str, Any]]


class DescriptorStore:
    """A store directory opened for one key; create it with :meth:`open`.

    Attributes:
        directory: The store directory.
        num_items: Items (database images) covered.
        chunk_size: Items per chunk.
        status: How it was opened: "created", "reused" (complete), "resumed" (some chunks present) or "rebuilt"
            (a stale store was wiped).
    """

    def __init__(self, directory: Path, num_items: int, chunk_size: int, status: str):
        self.directory = directory
        self.num_items = num_items
        self.chunk_size = chunk_size
        self.status = status

    @classmethod
    def open(cls, directory: str | os.PathLike, key: dict[str, Any], num_items: int, chunk_size: int = 1024):
        """Opens (or creates, or rebuilds) the store for ``key``.

        Args:
            directory: The store directory; created when missing.
            key: JSON-able description of what the descriptors depend on.
            num_items: Number of items (must be > 0).
            chunk_size: Items per chunk (part of the layout: a different value rebuilds the store).

        Returns:
            The opened store.

        Raises:
            StoreError: when the directory holds files that are not a store's (nothing is deleted then).
        """
        if num_items < 1 or chunk_size < 1:
            raise ValueError(f"num_items and chunk_size must be >= 1, got {num_items}, {chunk_size}")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        full_key = {"key": key, "num_items": int(num_items), "chunk_size": int(chunk_size), "format": STORE_FORMAT}
        digest = key_digest(full_key)
        manifest_path = directory / MANIFEST
        status = "created"
        if manifest_path.exists():
            try:
                manifest = json.loads(manifest_path.read_text())
            except (OSError, ValueError) as error:
                raise StoreError(f"unreadable store manifest {manifest_path}: {error}") from error
            if manifest.get("key_sha256") == digest:
                store = cls(directory, num_items, chunk_size, "resumed")
                store._remove_temporaries()
                store.status = "reused" if not store.pending_chunks() else "resumed"
                return store
            normalized = json.loads(json.dumps(full_key, default=str))
            changed = sorted(_changed_fields(manifest.get("key", {}), normalized))
            log.warning("descriptor store %s is stale (changed: %s); rebuilding it", directory, ", ".join(changed))
            _wipe(directory)
            status = "rebuilt"
        else:
            foreign = [p.name for p in directory.iterdir()]
            if foreign:
                raise StoreError(
                    f"{directory} is not empty and is not a descriptor store (found {foreign[:3]}); "
                    "choose another --store_dir or empty it"
                )
        manifest = {"format": STORE_FORMAT, "key_sha256": digest, "key": full_key}
        atomic_write(manifest_path, lambda f: f.write(json.dumps(manifest, indent=1, default=str).encode()))
        return cls(directory, num_items, chunk_size, status)

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

    def _chunk_path(self, chunk: int) -> Path:
        return self.directory / f"{_CHUNK_PREFIX}{chunk:06d}.npz"

    def pending_chunks(self) -> list[int]:
        """Chunks not yet written, in order."""
        return [c for c in range(self.num_chunks) if not self._chunk_path(c).exists()]

    def write_chunk(
        self, chunk: int, descriptors: np.ndarray, valid: np.ndarray, failures: list[dict[str, Any]]
    ) -> None:
        """Writes one complete chunk atomically.

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
        text = np.array(json.dumps(failures))

        def write(f):
            np.savez(f, descriptors=descriptors, valid=valid, failures=text)

        atomic_write(self._chunk_path(chunk), write)

    def read_chunk(self, chunk: int) -> StoreContents:
        """Reads one written chunk."""
        path = self._chunk_path(chunk)
        start, stop = self.chunk_range(chunk)
        try:
            with np.load(path, allow_pickle=False) as data:
                contents = StoreContents(data["descriptors"], data["valid"], json.loads(str(data["failures"])))
        except (OSError, ValueError, KeyError) as error:
            raise StoreError(f"corrupt store chunk {path}: {error}; delete it to recompute") from error
        if len(contents.descriptors) != stop - start or len(contents.valid) != stop - start:
            raise StoreError(f"store chunk {path} has {len(contents.descriptors)} rows, expected {stop - start}")
        return contents

    def load(self) -> StoreContents:
        """Reads the whole (complete) store.

        Raises:
            StoreError: when chunks are missing, corrupt, or of different dimensions.
        """
        pending = self.pending_chunks()
        if pending:
            raise StoreError(f"store {self.directory} is incomplete: {len(pending)} chunk(s) missing")
        parts = [self.read_chunk(c) for c in range(self.num_chunks)]
        dims = {p.descriptors.shape[1] for p in parts}
        if len(dims) != 1:
            raise StoreError(f"store {self.directory} mixes descriptor dimensions {sorted(dims)}")
        return StoreContents(
            np.concatenate([p.descriptors for p in parts]),
            np.concatenate([p.valid for p in parts]),
            [f for p in parts for f in p.failures],
        )

    def _remove_temporaries(self) -> None:
        for path in self.directory.glob("*.tmp"):
            path.unlink()


def _changed_fields(old: dict, new: dict, prefix: str = "") -> set[str]:
    changed = set()
    for name in set(old) | set(new):
        a, b = old.get(name), new.get(name)
        if isinstance(a, dict) and isinstance(b, dict):
            changed |= _changed_fields(a, b, f"{prefix}{name}.")
        elif a != b:
            changed.add(prefix + name)
    return changed


def _wipe(directory: Path) -> None:
    for path in directory.iterdir():
        if path.name == MANIFEST or path.name.startswith(_CHUNK_PREFIX) or path.suffix == ".tmp":
            path.unlink()
