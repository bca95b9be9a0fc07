"""Progress lines (items done, rate, ETA) for long jobs, and the run's log file."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from attllm_jax.logs import LogFileHandler

LOGGER_NAME = "attllm_jax"
_FORMAT = "%(asctime)s %(levelname)s %(message)s"


def setup_logging(log_file: str | Path | None, level: int = logging.INFO) -> logging.Logger:
    """Sends the package's log records to stderr and to ``log_file`` (replacing handlers of a previous run).

    Args:
        log_file: The log file (its folder is created), or None for stderr only.
        level: Logging level.

    Returns:
        The ``attllm_jax`` logger.
    """
    logger = logging.getLogger(LOGGER_NAME)
    for handler in list(logger.handlers):
        if getattr(handler, "_attllm_eval", False):
            logger.removeHandler(handler)
            handler.close()
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(LogFileHandler(log_file, mode="a", encoding="utf-8"))
    for handler in handlers:
        handler._attllm_eval = True
        handler.setFormatter(logging.Formatter(_FORMAT, "%H:%M:%S"))
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    return logger


def _clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60:02d}:{rest % 60:02d}"


class Progress:
    """Logs ``label: done/total (rate/s, ETA)`` at most every ``interval_s`` seconds, and once at the end.

    Used by the evaluation (images extracted) and by the annotation front end (images answered, with the
    outcome counts as the line's note).

    Args:
        label: What is counted.
        total: Items expected.
        logger: Where the lines go.
        interval_s: Minimum seconds between lines.
    """

    def __init__(self, label: str, total: int, logger: logging.Logger, interval_s: float = 5.0):
        self.label, self.total, self.logger, self.interval_s = label, int(total), logger, interval_s
        self.done = 0
        self.start = self._last = time.perf_counter()
        self._logged = -1
        self.note = ""

    def update(self, count: int = 1, note: str | None = None) -> None:
        """Adds ``count`` items done; ``note`` (when given) replaces the text shown after the counts."""
        self.done += count
        if note is not None:
            self.note = note
        now = time.perf_counter()
        if now - self._last >= self.interval_s:
            self._last = now
            self._logged = self.done
            self.logger.info(self.line(now))

    def line(self, now: float | None = None) -> str:
        elapsed = max(1e-9, (now or time.perf_counter()) - self.start)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta_text = _clock(eta) if eta != float("inf") else "?"
        line = f"{self.label}: {self.done}/{self.total} ({rate:.1f}/s, elapsed {_clock(elapsed)}, ETA {eta_text})"
        return f"{line} | {self.note}" if self.note else line

    def finish(self) -> float:
        """Logs the final line; returns the elapsed seconds."""
        now = time.perf_counter()
        if self._logged != self.done:
            self.logger.info(self.line(now))
        return now - self.start
