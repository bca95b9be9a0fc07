"""One run per output folder, and nothing stale in it.

Every command that writes a result folder (eval, tune, severity, flood, and localize) does two things here before
it writes anything:

1. :class:`OutputLock` takes the folder for the run: a hidden file ``.attllm_jax.lock`` holding the run's pid, host,
   start time and command, under an exclusive ``flock`` held until the run ends. A second run on the folder is
   refused with one line naming the folder and the holder. The kernel releases the ``flock`` when its process dies,
   so the lock of a killed run (``kill -9``, power loss of a local disk aside) is recognized as stale and taken over,
   with a log line naming the dead holder. A lock written by a process on ANOTHER host is never taken over (its
   process cannot be checked from here; ``flock`` is not reliable across NFS clients): delete the file if that
   run is gone.
2. :func:`remove_previous_outputs` removes what the previous run wrote, as listed in its summary file (the
   ``"outputs"`` entry of results.json, tuning.json, severity.json, flood_summary.json): relative paths inside
   the folder, never anything else. Folders emptied by that are removed too; a file the user added keeps its
   folder. Resumable caches (the database store, the query-feature cache) are not listed, so they stay.

Usage::

    with OutputLock(out, "eval"):
        removed = remove_previous_outputs(out, "results.json")
        ...  # write the outputs, then the summary with "outputs": relative_outputs(out, written)
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger("attllm_jax.outputs")

LOCK_FILE = ".attllm_jax.lock"
OUTPUTS_KEY = "outputs"


class OutputLockError(RuntimeError):
    """The output folder is held by another run (the message names the folder and the holder)."""


@dataclass(frozen=True)
class LockHolder:
    """Who holds an output folder.

    Attributes:
        pid: Process id on ``host``.
        host: ``socket.gethostname()`` of the holder.
        started: Start time, ISO 8601 UTC.
        command: The command that took the folder (``eval``, ``tune``, ...).
    """

    pid: int
    host: str
    started: str
    command: str

    def describe(self) -> str:
        return f"{self.command} pid {self.pid} on host {self.host}, started {self.started}"

    @classmethod
    def current(cls, command: str) -> LockHolder:
        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        return cls(os.getpid(), socket.gethostname(), started, command)

    @classmethod
    def parse(cls, text: str) -> LockHolder | None:
        """The holder written in a lock file, or None when the text is not one (empty, truncated, edited)."""
        try:
            data = json.loads(text)
            return cls(int(data["pid"]), str(data["host"]), str(data["started"]), str(data["command"]))
        except (ValueError, KeyError, TypeError):
            return None


class OutputLock:
    """An exclusive lock of an output folder for one run (see the module docstring); a context manager.

    Args:
        directory: The output folder (created if missing).
        command: The command name written into the lock and the refusal message.
    """

    def __init__(self, directory: str | os.PathLike, command: str):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE
        self.command = command
        self._fd: int | None = None
        self.took_over: LockHolder | None = None

    def acquire(self) -> OutputLock:
        """Takes the folder, or raises :class:`OutputLockError` naming the folder and the live holder."""
        if self._fd is not None:
            return self
        self.directory.mkdir(parents=True, exist_ok=True)
        me = LockHolder.current(self.command)
        for _ in range(10):  # retries only when the file was replaced between open and flock
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                os.close(fd)
                if error.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                raise OutputLockError(self._refusal(self._read_holder())) from None
            if not _same_file(fd, self.path):  # the holder released (unlinked) it meanwhile: lock the new file
                os.close(fd)
                continue
            previous = LockHolder.parse(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
            if previous is not None and previous.host != me.host:
                os.close(fd)
                raise OutputLockError(self._refusal(previous) + self._foreign_note())
            self.took_over = previous
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(asdict(me)).encode("utf-8"), 0)
            os.fsync(fd)
            self._fd = fd
            return self
        raise OutputLockError(f"output folder {self.directory}: its lock file {self.path} keeps changing; retry")

    def log_takeover(self) -> None:
        """One warning line when :meth:`acquire` took over the stale lock of a dead run (call once logging is set)."""
        if self.took_over is not None:
            log.warning(
                "output folder %s: took over the stale lock of %s (that process is no longer running)",
                self.directory,
                self.took_over.describe(),
            )

    def release(self) -> None:
        """Gives the folder back (removes the lock file). Safe to call twice."""
        if self._fd is None:
            return
        try:
            if _same_file(self._fd, self.path):
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        finally:
            os.close(self._fd)
            self._fd = None

    def _read_holder(self) -> LockHolder | None:
        try:
            return LockHolder.parse(self.path.read_text(encoding="utf-8", errors="replace"))
        except OSError:
            return None

    def _refusal(self, holder: LockHolder | None) -> str:
        who = holder.describe() if holder is not None else "another run (its lock file is being written)"
        return f"output folder {self.directory} is in use by {who}: wait for it or give another --output_dir"

    def _foreign_note(self) -> str:
        return f" (a lock written on another host is never taken over: if that run is gone, delete {self.path})"

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def check_free(directory: str | os.PathLike, command: str) -> None:
    """Raises :class:`OutputLockError` when another live run holds ``directory``; takes nothing.

    A command calls it with its other up-front checks, so a refused run prints its one error line before any other
    output; the run itself still takes the folder with :class:`OutputLock` (which may refuse it, if a run started
    in between).
    """
    lock = OutputLock(directory, command)
    try:
        fd = os.open(lock.path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise OutputLockError(lock._refusal(lock._read_holder())) from None
        previous = LockHolder.parse(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
        if previous is not None and previous.host != socket.gethostname():
            raise OutputLockError(lock._refusal(previous) + lock._foreign_note())
    finally:
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def relative_outputs(directory: str | os.PathLike, paths: Iterable[str | os.PathLike]) -> list[str]:
    """Sorted POSIX paths of ``paths`` relative to ``directory`` (the summary's ``"outputs"`` entry).

    Raises:
        ValueError: for a path outside ``directory`` (a run lists only what it wrote into its folder).
    """
    root = Path(directory).resolve()
    out = set()
    for path in paths:
        resolved = Path(path).resolve() if Path(path).is_absolute() else (root / path).resolve()
        out.add(resolved.relative_to(root).as_posix())
    return sorted(out)


def previous_outputs(directory: str | os.PathLike, summary_name: str) -> list[str] | None:
    """The ``"outputs"`` list of the previous run's summary file, or None when there is none (or it is unreadable)."""
    path = Path(directory) / summary_name
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    listed = data.get(OUTPUTS_KEY) if isinstance(data, dict) else None
    if not isinstance(listed, list) or not all(isinstance(p, str) for p in listed):
        return None
    return listed


def remove_previous_outputs(directory: str | os.PathLike, summary_name: str, also: Iterable[str] = ()) -> list[str]:
    """Removes the files the previous run listed in ``directory/summary_name``, then that summary.

    Only regular files (or symlinks) at listed relative paths that stay inside ``directory`` are removed; folders
    left empty by a removal are removed up to ``directory``. A summary without an ``"outputs"`` list (a run of an
    older version) removes ``also`` (relative paths the caller knows that version wrote) and the summary.

    Args:
        directory: The output folder.
        summary_name: The summary file's name in it (``results.json``, ...).
        also: Fallback relative paths for a summary without the list.

    Returns:
        The relative paths removed (logged as one line when any).
    """
    root = Path(directory)
    if not (root / summary_name).is_file():
        return []
    listed = previous_outputs(root, summary_name)
    candidates = list(also) if listed is None else list(listed)
    return remove_outputs(root, [*candidates, summary_name], f"listed in its {summary_name}")


def remove_outputs(directory: str | os.PathLike, relative_paths: Iterable[str], why: str) -> list[str]:
    """Removes files a previous run wrote: relative paths inside ``directory`` only, then folders left empty.

    A path that is absolute, climbs out with ``..``, leads out through a symlinked folder, or is not a file, is
    left alone.

    Args:
        directory: The output folder.
        relative_paths: POSIX paths relative to it.
        why: Said in the log line (e.g. "listed in its results.json").

    Returns:
        The relative paths removed.
    """
    root = Path(directory)
    removed = []
    resolved_root = root.resolve()
    for rel in dict.fromkeys(relative_paths):
        path = root / rel
        try:
            inside = path.parent.resolve().is_relative_to(resolved_root) and not Path(rel).is_absolute()
        except OSError:
            inside = False
        if not inside or ".." in Path(rel).parts or not (path.is_symlink() or path.is_file()):
            continue
        path.unlink()
        removed.append(rel)
        _prune_empty_parents(path.parent, resolved_root)
    if removed:
        log.info(
            "output folder %s: removed %d files of the previous run (%s), e.g. %s",
            root,
            len(removed),
            why,
            ", ".join(removed[:3]),
        )
    return removed


def refuse_output_inside(output: str | os.PathLike, inputs: dict[str, str | os.PathLike | None]) -> None:
    """Raises ValueError when ``output`` is one of the input folders or inside one (a later run would read it).

    Args:
        output: The output folder (``--output_dir``).
        inputs: Flag name -> input folder (None entries are skipped), e.g. ``{"--images": images}``.
    """
    target = Path(output).resolve()
    for flag, folder in inputs.items():
        if folder is None:
            continue
        source = Path(folder).resolve()
        if target == source or target.is_relative_to(source):
            where = "is" if target == source else "is inside"
            raise ValueError(
                f"--output_dir {output} {where} {flag} {folder}: a later run would read the outputs as inputs; "
                "give an output folder outside it"
            )


def _prune_empty_parents(folder: Path, root: Path) -> None:
    folder = folder.resolve()
    while folder != root and folder.is_relative_to(root):
        try:
            folder.rmdir()
        except OSError:  # not empty (a user file, another run's output) or already gone
            return
        folder = folder.parent
