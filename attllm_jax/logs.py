"""Quiet third-party log lines by default (the command-line front ends call this before importing the libraries).

faiss logs four INFO lines on import ("Loading faiss with AVX2 support", "Could not load library with AVX2 support
due to ..."), JAX one on its first backend probe ("Unable to initialize backend 'tpu'"), and libraries that log with
absl (orbax) several per checkpoint load. They say nothing about the run, so the commands hide them unless
``--verbosity`` is 1 or more; warnings and errors always show. Our own progress lines use the ``attllm_jax`` logger
and are not affected. This module imports nothing heavy, so calling it does not itself trigger those imports.
"""

from __future__ import annotations

import logging
import sys

NOISY_LOGGERS = ("faiss", "faiss.loader", "jax._src.xla_bridge", "absl")


def quiet_library_logs(verbosity: int = 0) -> None:
    """Raises the noisy libraries' loggers to WARNING unless ``verbosity >= 1`` (absl's ``--verbosity`` flag).

    Args:
        verbosity: absl's verbosity (0 by default; 1 or more shows the libraries' INFO lines again).
    """
    level = logging.NOTSET if verbosity >= 1 else logging.WARNING
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(level)


class LogFileHandler(logging.FileHandler):
    """A run's log file that, when it cannot be written (a full disk), says so in one line on stderr and stops
    writing, instead of printing logging's traceback for every record; the run's own error line follows."""

    _failed = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self._failed:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's naming
        if not self._failed:
            self._failed = True
            error = sys.exc_info()[1]
            reason = getattr(error, "strerror", None) or error
            print(f"cannot write the log file {self.baseFilename} ({reason}); logging to stderr only", file=sys.stderr)
