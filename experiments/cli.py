"""The command-line conventions every ``experiments`` command and converter shares.

- a usage error (a bad flag value, a missing required flag, an extra argument, inconsistent flags) is ONE line
  ``<command>: error: <what> (see --help for the flags)`` on stderr and exit status 2, before any work and before
  the log records the flags; never absl's usage text or its ``FATAL Flags parsing error``;
- an error of the input found while working is one ``<command>: error: ...`` line and exit status 1;
- a JAX backend that cannot start (``JAX_PLATFORMS=tpu`` without a TPU) is one line saying so (exit status 1);
- ``--help`` prints the command's docstring, its own flags and the shared flags it uses, and exits 0
  (``--helpfull``: every flag);
- the libraries' INFO lines (faiss, JAX, orbax) are hidden unless ``--verbosity 1``.

The shared flags themselves are defined once, in :mod:`experiments.flagdefs`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import NoReturn

from absl import app, flags

from experiments import flagdefs
from experiments.flagdefs import module_key

FLAGS = flags.FLAGS
HELP_FLAGS = ("-h", "--help", "-?", "--helpshort")


def fail(command: str, message: str, usage: bool = False) -> NoReturn:
    """Ends the run with one ``<command>: error: ...`` line (with a pointer to --help for a usage error)."""
    print(f"{command}: error: {message}" + (" (see --help for the flags)" if usage else ""), file=sys.stderr)
    sys.exit(2 if usage else 1)


def help_text(doc: str, *modules: str) -> str:
    """A command's ``--help``: its docstring and the key flags of ``modules`` (each module's own flags and the shared
    ones it declared with :func:`experiments.flagdefs.define`); pass module names through
    :func:`~experiments.flagdefs.module_key`."""
    more = "--verbosity 1 also shows the libraries' INFO lines; all flags: --helpfull"
    listed = "\n".join(FLAGS.module_help(m) for m in modules)
    return f"{doc.strip()}\n\nflags:\n{listed}\n\n{more}"


def module_help(doc: str, name: str, *more: str) -> Callable[[], str]:
    """The ``help`` argument of :func:`run_command` for the module ``name`` (its ``__name__``) and ``more``."""
    return lambda: help_text(doc, module_key(name), *more)


def flag_values(name: str) -> str:
    """The key flags of module ``name`` (its ``__name__``) and their values, as JSON for a log line."""
    return json.dumps({f.name: f.value for f in FLAGS.get_key_flags_for_module(module_key(name))})


def backend_error() -> str | None:
    """None when JAX's default backend starts, else one line: what ``JAX_PLATFORMS`` asked for and what to do."""
    from attllm_jax.models.precision import backend_problem

    return backend_problem()


def print_runtime(command: str, precision: str) -> None:
    """One stderr line at the start of a command: backend, devices and precision (is the accelerator used?).

    A backend that cannot start ends the run with one ``<command>: error:`` line instead.
    """
    from attllm_jax.models.precision import runtime_summary

    problem = backend_error()
    if problem:
        fail(command, problem)
    print(f"{command}: {runtime_summary(precision)}", file=sys.stderr, flush=True)


def run_command(command: str, main: Callable[[list[str]], int | None], help: Callable[[], str], argv=None) -> None:
    """``absl.app.run(main)`` with the conventions above.

    Args:
        command: the name in error lines (``"tune"``).
        main: the absl main function; an ``app.UsageError`` it raises becomes one usage line; its return value is
            the exit status.
        help: returns the ``--help`` text.
        argv: the command line (default ``sys.argv``).
    """
    argv = list(sys.argv if argv is None else argv)
    if any(arg in HELP_FLAGS for arg in argv[1:]):
        print(help())
        sys.exit(0)

    def parse(args: list[str]) -> list[str]:
        try:
            return FLAGS(args)
        except flags.Error as error:
            fail(command, "; ".join(str(error).splitlines()), usage=True)

    def guarded(args: list[str]) -> int | None:
        from attllm_jax.logs import quiet_library_logs

        quiet_library_logs(FLAGS.verbosity)  # before main imports faiss / JAX
        try:
            return main(args)
        except app.UsageError as error:
            fail(command, str(error), usage=True)
        except (RuntimeError, AssertionError):
            problem = _backend_error_if_jax_loaded()
            if problem:  # e.g. JAX_PLATFORMS=cuda without a GPU: JAX's own error is an AssertionError
                fail(command, problem)
            raise

    try:
        app.run(guarded, argv=argv, flags_parser=parse)
    except SystemExit as done:
        if done.code == 1 and "--helpfull" in argv[1:]:
            raise SystemExit(0) from None
        raise


def _backend_error_if_jax_loaded() -> str | None:
    return backend_error() if "jax" in sys.modules else None


def blend_from_flags(command: str, default_alpha: float) -> tuple[float, float, str]:
    """``(alpha, sigma, blend)`` of --tuning or --alpha/--sigma/--blend (:func:`flagdefs.blend_setting`); a misuse or a
    bad tuning file ends the run with one ``<command>: error:`` line."""
    try:
        return flagdefs.blend_setting(default_alpha)
    except flagdefs.TuningConflict as error:
        fail(command, str(error), usage=True)
    except (ValueError, FileNotFoundError) as error:
        fail(command, str(error))
