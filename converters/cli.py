"""``attllm-convert FAMILY [flags]``: runs ``converters/FAMILY.py``, as ``python converters/FAMILY.py`` does.

    attllm-convert cosplace --checkpoint ResNet50_2048_cosplace.pth --output models/cosplace_r50
    attllm-convert --help          # lists the families

Each converter is an absl script with its own flags, so the dispatcher runs exactly one of them as ``__main__``
(importing two would define the same flags twice). The families are the scripts beside this file.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def families() -> list[str]:
    """The converter scripts available: ``converters/<family>.py`` (not private modules, not this dispatcher)."""
    return sorted(p.stem for p in HERE.glob("*.py") if not p.stem.startswith("_") and p.stem != "cli")


def usage() -> str:
    return (
        "usage: attllm-convert FAMILY [--checkpoint FILE] --output DIR [flags]\n"
        f"families: {', '.join(families())}\n"
        'flags of one family: attllm-convert FAMILY --help (needs PyTorch: pip install -e ".[convert]")'
    )


def run(argv: list[str] | None = None) -> None:
    """Console-script entry point: picks ``converters/<argv[1]>.py`` and runs it with the remaining arguments."""
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(usage())
        sys.exit(0 if len(argv) >= 2 else 2)
    family = argv[1].lower()
    if family not in families():
        print(f"convert: error: unknown family {argv[1]!r}; expected one of {', '.join(families())}", file=sys.stderr)
        sys.exit(2)
    script = HERE / f"{family}.py"
    sys.argv = [str(script), *argv[2:]]
    sys.path.insert(0, str(HERE))  # the scripts import their shared front end (e.g. _cnn) as a sibling module
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    run()
