"""What a tuning run chose, read back from its ``tuning.json`` for the commands that apply it (localize)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from attllm_jax.ops.gem import BLENDS
from attllm_jax.tuning.search import Setting


def read_tuned_setting(path: str | os.PathLike) -> tuple[Setting, dict]:
    """The ``best`` (alpha, sigma, blend) of a ``tuning.json`` written by ``attllm-tune``, and its model spec.

    Args:
        path: The tuning file (``OUT/tuning.json``).

    Returns:
        The chosen setting and the ``model`` entry of the file (``{}`` when absent).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: one line naming the file: not JSON, no ``best`` entry, alpha outside [0, 1], sigma not a positive
            number, or an unknown blend.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--tuning {path}: no such file (give the tuning.json written by attllm-tune)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ValueError(f"--tuning {path}: not a readable JSON file ({error})") from None
    best = data.get("best") if isinstance(data, dict) else None
    if not isinstance(best, dict) or not {"alpha", "sigma", "blend"} <= set(best):
        raise ValueError(f"--tuning {path}: no 'best' entry with alpha, sigma and blend (not written by attllm-tune)")
    alpha, sigma, blend = best["alpha"], best["sigma"], best["blend"]
    if not _number(alpha) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"--tuning {path}: best alpha {alpha!r} is not in [0, 1]")
    if not _number(sigma) or sigma <= 0:
        raise ValueError(f"--tuning {path}: best sigma {sigma!r} is not a positive number")
    if blend not in BLENDS:
        raise ValueError(f"--tuning {path}: best blend {blend!r} is not one of {', '.join(BLENDS)}")
    model = data.get("model") if isinstance(data.get("model"), dict) else {}
    return Setting(float(alpha), float(sigma), str(blend)), model


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
