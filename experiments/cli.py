"""The command-line conventions every ``experiments`` command shares (eval, tune, extract).

- a usage error (a bad flag value, a missing required flag, an extra argument, inconsistent flags) is ONE line
  ``<command>: error: <what> (see --help for the flags)`` on stderr and exit status 2, not absl's usage text;
- an error of the input found while working is one ``<command>: error: ...`` line and exit status 1;
- ``--help`` prints the command's docstring and its own flags and exits 0 (``--helpfull``: every flag);
- the libraries' INFO lines (faiss, JAX, orbax) are hidden unless ``--verbosity 1``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import NoReturn

from absl import app, flags

FLAGS = flags.FLAGS
HELP_FLAGS = ("-h", "--help", "-?", "--helpshort")
# attllm_jax.models.precision.PRECISIONS, spelled out so that defining flags does not import JAX (fast --help)
PRECISIONS = ("float32", "tf32", "bfloat16")


def define_image_size_flag() -> None:
    """``--image_size N`` (shorter side) or ``--image_size H,W``, validated (one usage line when malformed)."""
    flags.DEFINE_list("image_size", None, "Resize override: shorter side (one int) or height,width.")
    flags.register_validator("image_size", _valid_image_size, "--image_size must be one or two integers >= 1")


def _valid_image_size(values) -> bool:
    if values is None:
        return True
    try:
        ints = [int(v) for v in values]
    except ValueError:
        return False
    return len(ints) in (1, 2) and all(v >= 1 for v in ints)


def image_size_from_flag() -> int | tuple[int, int] | None:
    """The parsed ``--image_size``: None, the shorter side, or ``(height, width)``."""
    if not FLAGS.image_size:
        return None
    sizes = [int(v) for v in FLAGS.image_size]
    return sizes[0] if len(sizes) == 1 else (sizes[0], sizes[1])


def define_precision_flag() -> None:
    """``--precision float32|tf32|bfloat16`` for a command that runs a model (README, Precision)."""
    flags.DEFINE_enum(
        "precision",
        "float32",
        list(PRECISIONS),
        "float32: highest matmul precision on every backend; tf32: the backend's fast float32 products; "
        "bfloat16: bfloat16 backbone, float32 norms and aggregation (see README, Precision). Part of the descriptor "
        "store's key.",
    )


def fail(command: str, message: str, usage: bool = False) -> NoReturn:
    """Ends the run with one ``<command>: error: ...`` line (with a pointer to --help for a usage error)."""
    print(f"{command}: error: {message}" + (" (see --help for the flags)" if usage else ""), file=sys.stderr)
    sys.exit(2 if usage else 1)


def help_text(doc: str, *modules: str) -> str:
    """A command's ``--help``: its docstring and the flags ``modules`` define (absl keys them by module name, or
    by the script path under ``python -m``)."""
    more = "--verbosity 1 also shows the libraries' INFO lines; all flags: --helpfull"
    listed = "\n".join(FLAGS.module_help(m) for m in modules)
    return f"{doc.strip()}\n\nflags:\n{listed}\n\n{more}"


def run_command(command: str, main: Callable[[list[str]], None], help: Callable[[], str], argv=None) -> None:
    """``absl.app.run(main)`` with the conventions above.

    Args:
        command: the name in error lines (``"tune"``).
        main: the absl main function; an ``app.UsageError`` it raises becomes one usage line.
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

    def guarded(args: list[str]) -> None:
        from attllm_jax.logs import quiet_library_logs

        quiet_library_logs(FLAGS.verbosity)  # before main imports faiss / JAX
        try:
            main(args)
        except app.UsageError as error:
            fail(command, str(error), usage=True)

    try:
        app.run(guarded, argv=argv, flags_parser=parse)
    except SystemExit as done:
        if done.code == 1 and "--helpfull" in argv[1:]:
            raise SystemExit(0) from None
        raise
