"""File helpers shared by every writer and lister in the package: atomic writes and the image-file rule.

One atomic writer (unique temporary name in the target's folder, fsync, rename) is used by everything that
writes results, stores and annotations, so a reader, or a run resumed after a kill, sees either the old file
or the complete new one, and two writers of one folder never collide on a temporary name.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np

# Every image suffix the package reads, compared case-insensitively; annotation and evaluation use this list.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


def default_cache_dir() -> Path:
    """The package's cache folder (downloaded checkpoints, the demo's synthetic benchmark): ``$ATTLLM_JAX_CACHE``,
    else ``~/.cache/attllm_jax``."""
    return Path(os.environ.get("ATTLLM_JAX_CACHE") or Path.home() / ".cache" / "attllm_jax")


def is_image_name(name: str) -> bool:
    """Whether a base name is an image the package lists: a known suffix (any case), not a hidden file."""
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Writes a file through a uniquely named temporary file in the same folder, fsync and a rename.

    Args:
        path: the destination; its folder is created if missing.
        write: called with the open binary temporary file; writes the whole content.

    Returns:
        The destination path.

    Raises:
        OSError: from the write; one without a file name (``ENOSPC`` from ``write`` or ``fsync``) is raised again
            with ``filename`` set to ``path``, so that the error line names the file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(error, OSError) and error.filename is None and error.errno is not None:
            # a full disk or a failing write says only "No space left on device": name the file it was writing
            raise type(error)(error.errno, error.strerror, str(path)) from error
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Atomically writes ``data`` to ``path`` (see :func:`atomic_write`)."""
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Atomically writes UTF-8 ``text`` to ``path`` (see :func:`atomic_write`)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, data: Any) -> Path:
    """Atomically writes ``data`` as indented UTF-8 JSON with a final newline.

    NumPy scalars and arrays and paths are written as their plain values.
    """
    text = json.dumps(data, indent=2, ensure_ascii=False, default=_json_default) + "\n"
    return atomic_write_text(path, text)


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serializable: {type(value).__name__}")


def list_image_files(root: str | os.PathLike, exclude: str | os.PathLike | None = None) -> list[str]:
    """Every image under ``root`` (see :func:`is_image_name`), as sorted POSIX paths relative to ``root``.

    Hidden files and folders are skipped, and so is the folder ``exclude`` (e.g. an output folder inside the
    image folder).
    """
    root = Path(root)
    excluded = Path(exclude).resolve() if exclude is not None else None
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(
            d for d in dirnames if not d.startswith(".") and (excluded is None or (here / d).resolve() != excluded)
        )
        found.extend((here / name).relative_to(root).as_posix() for name in filenames if is_image_name(name))
    return sorted(found)
