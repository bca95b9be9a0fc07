"""Catching JAX's "Compiling ..." log lines, for the no-recompile tests and their positive controls."""

import contextlib
import logging
from collections.abc import Iterator

import jax


class _Catch(logging.Handler):
    def __init__(self, messages: list[str]):
        super().__init__(level=logging.DEBUG)
        self.messages = messages

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "Compiling" in message:
            self.messages.append(message)


@contextlib.contextmanager
def logged_compiles() -> Iterator[list[str]]:
    """Yields a list that collects the compile messages JAX logs while the block runs (``jax_log_compiles``)."""
    messages: list[str] = []
    handler = _Catch(messages)
    logger = logging.getLogger("jax")
    before = jax.config.jax_log_compiles
    logger.addHandler(handler)
    jax.config.update("jax_log_compiles", True)
    try:
        yield messages
    finally:
        jax.config.update("jax_log_compiles", before)
        logger.removeHandler(handler)
