"""Downloads a published checkpoint into a cache directory (converters only; the library never downloads).

The file is streamed to ``<name>.part`` with a progress line on stderr, renamed into place when complete, and its
SHA-256 is written beside it as ``<name>.sha256``. A cached file whose recorded digest still matches is reused.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import TextIO

import httpx

from attllm_jax.convert.common import sha256_file
from attllm_jax.files import default_cache_dir
from attllm_jax.models.registry import PublishedCheckpoint

DEFAULT_CACHE_DIR = default_cache_dir()
_CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A published checkpoint could not be downloaded; the message is one line naming the URL and the cause."""


def _progress(stream: TextIO, name: str, done: int, total: int | None, started: float) -> None:
    mib = done / 2**20
    rate = mib / max(time.monotonic() - started, 1e-9)
    if total:
        line = f"\rdownloading {name}: {mib:.1f}/{total / 2**20:.1f} MiB ({100 * done / total:.0f}%) {rate:.1f} MiB/s"
    else:
        line = f"\rdownloading {name}: {mib:.1f} MiB {rate:.1f} MiB/s"
    stream.write(line)
    stream.flush()


def _cached(path: Path, digest_path: Path) -> bool:
    if not (path.is_file() and digest_path.is_file()):
        return False
    return digest_path.read_text().split()[0] == sha256_file(path)


def fetch_published(
    entry: PublishedCheckpoint,
    cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR,
    timeout: float = 30.0,
    progress: TextIO | None = sys.stderr,
) -> Path:
    """Returns the local path of a published checkpoint, downloading it into ``cache_dir`` if needed.

    Args:
        entry: the release, e.g. ``registry.lookup("cosplace", "ResNet50", 2048)``.
        cache_dir: where checkpoints are kept.
        timeout: seconds to wait for the connection and for each read.
        progress: stream for the progress line (None: silent).

    Returns:
        ``cache_dir / entry.file_name``, complete, with its SHA-256 recorded in ``<file>.sha256``.

    Raises:
        DownloadError: offline, HTTP error, or an incomplete transfer (the partial file is removed).
    """
    cache_dir = Path(cache_dir)
    path = cache_dir / entry.file_name
    digest_path = path.with_name(path.name + ".sha256")
    if _cached(path, digest_path):
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    try:
        _stream_to(entry.url, part, entry.file_name, timeout, progress)
    except httpx.HTTPError as e:
        part.unlink(missing_ok=True)
        raise DownloadError(
            f"cannot download {entry.url}: {type(e).__name__}: {e} (offline? download it by hand and pass --checkpoint)"
        ) from e
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    part.replace(path)
    digest_path.write_text(f"{sha256_file(path)}  {entry.file_name}\n")
    return path


def _stream_to(url: str, dest: Path, name: str, timeout: float, progress: TextIO | None) -> None:
    started = time.monotonic()
    with httpx.stream("GET", url, follow_redirects=True, timeout=timeout) as response:
        if response.status_code != 200:
            raise DownloadError(f"cannot download {url}: HTTP {response.status_code} {response.reason_phrase}")
        total = int(response.headers["content-length"]) if "content-length" in response.headers else None
        done = 0
        with open(dest, "wb") as f:
            for chunk in response.iter_raw(_CHUNK):  # raw: the file's own bytes, never content-decoded
                f.write(chunk)
                done += len(chunk)
                if progress is not None:
                    _progress(progress, name, done, total, started)
        if progress is not None:
            progress.write("\n")
        if total is not None and done != total:
            raise DownloadError(f"cannot download {url}: transfer incomplete ({done} of {total} bytes)")
