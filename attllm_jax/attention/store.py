"""Per-image attention files: naming, reading (ours and the published code's format), atomic writing.

File format (one JSON object per image). The published code's per-image fields come first:

    image_path             str, the image's path (ours: relative to the images folder)
    model                  str, the model that answered
    json_format_verified   bool, the answer parsed
    json_content_verified  bool, the answer is usable (points, grid or None)
    no_weighting           bool, the model answered None (single landmark): no attention
    result                 the cleaned answer (point list or grid dict), null when no_weighting,
                           or the raw text when the answer was not usable (as the published code does)

and ours after them: ``format`` ("attllm_jax.attention/1"), ``status`` ("valid" / "none" /
"invalid"), ``provider``, ``prompt_id``, ``prompt_version``, ``city``, ``latency_s``, ``attempts``,
``tokens`` ({"prompt", "output", "thinking", "total"}), ``num_dropped``, ``num_clamped``,
``created`` (UTC ISO time), and ``raw_text`` and ``error`` when the answer was invalid.

Naming: the attention file of the image ``<images>/<rel_dir>/<stem>.<ext>`` is
``<annotation_dir>/<rel_dir>/<stem>.json``. For a flat images folder this is exactly the published
code's ``<annotation_dir>/<stem>.json``; :func:`find_attention_file` also falls back to that flat
name for nested images, so published annotation folders work as they are.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path
from typing import Any

from attllm_jax.attention.parse import DEFAULT_MAX_POINTS, ParsedAttention, invalid_attention, parse_answer
from attllm_jax.files import atomic_write_json

FORMAT = "attllm_jax.attention/1"
_STATUS_OF_KIND = {"points": "valid", "grid": "valid", "none": "none", "invalid": "invalid"}


def attention_file_name(image_path: str | os.PathLike) -> Path:
    """The attention file's path relative to the annotation folder, for an image path relative to
    the images folder: ``a/b/x.jpg -> a/b/x.json``.

    Raises:
        ValueError: if ``image_path`` is absolute or leaves its folder (``..``).
    """
    rel = Path(image_path)
    if rel.is_absolute() or ".." in rel.parts:
        raise ValueError(f"image path must be relative to the images folder and stay inside it: {image_path}")
    return rel.with_suffix(".json")


def find_attention_file(
    annotation_dir: str | os.PathLike, image_path: str | os.PathLike, images_root: str | os.PathLike | None = None
) -> Path | None:
    """Finds the attention file of an image, or None when it has none.

    Looks for ``<annotation_dir>/<rel_dir>/<stem>.json`` (rel_dir: the image's folder relative to
    ``images_root``, or ``image_path`` itself when it is relative), then for the flat
    ``<annotation_dir>/<stem>.json`` of the published code.

    Args:
        annotation_dir: the folder holding the attention files.
        image_path: the image, relative to the images folder, or absolute.
        images_root: the images folder, to make an absolute ``image_path`` relative.

    Returns:
        The path of the first candidate that exists, or None.
    """
    annotation_dir = Path(annotation_dir)
    image = Path(image_path)
    candidates = []
    rel: Path | None = None
    if images_root is not None and image.is_absolute():
        try:
            rel = image.relative_to(Path(images_root))
        except ValueError:
            rel = None
    elif not image.is_absolute():
        rel = image
    if rel is not None and ".." not in rel.parts:
        candidates.append(annotation_dir / rel.with_suffix(".json"))
    candidates.append(annotation_dir / (image.stem + ".json"))
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    return None


def load_record(path: str | os.PathLike) -> dict[str, Any]:
    """Loads one attention file as a dict.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: if it is not JSON (message names the file).
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        return json.loads(text)
    except ValueError as e:
        raise ValueError(f"attention file {path} is not valid JSON: {e}") from None


def parse_record(record: Any, max_points: int = DEFAULT_MAX_POINTS) -> ParsedAttention:
    """Interprets a loaded attention file, ours or the published code's, or a bare answer."""
    if isinstance(record, dict) and ("result" in record or "no_weighting" in record):
        if record.get("no_weighting") is True:
            return parse_answer(None, max_points)
        return parse_answer(record.get("result"), max_points)
    return parse_answer(record, max_points)


def read_attention_file(path: str | os.PathLike, max_points: int = DEFAULT_MAX_POINTS) -> ParsedAttention:
    """Reads an attention file (ours or the published code's per-image format).

    The ``result`` field is parsed again with :func:`parse_answer` whatever the verification flags
    say, so a published file that kept the raw text of an unverified answer is still recovered when
    our parser can read it. A file that is not JSON comes back as ``kind == "invalid"`` with an
    ``error`` naming it.

    Args:
        path: the JSON file.
        max_points: N_max, the number of point slots.

    Returns:
        A ParsedAttention.

    Raises:
        FileNotFoundError: if the file does not exist.
    """
    try:
        record = load_record(path)
    except ValueError as e:
        return invalid_attention(str(e), max_points)
    except UnicodeDecodeError:
        return invalid_attention(f"attention file {path} is not UTF-8 text", max_points)
    return parse_record(record, max_points)


def status_of(parsed: ParsedAttention) -> str:
    """ "valid" (points or grid), "none" or "invalid"."""
    return _STATUS_OF_KIND[parsed.kind]


def record_status(record: Any) -> str:
    """The status of a loaded attention file: ours carries it, published ones are re-parsed."""
    if isinstance(record, dict) and record.get("format") == FORMAT and record.get("status") in ("valid", "none"):
        return record["status"]
    return status_of(parse_record(record))


def make_record(
    *,
    image_path: str,
    model: str,
    raw_text: str,
    parsed: ParsedAttention,
    provider: str,
    prompt_id: str,
    prompt_version: str,
    city: str,
    latency_s: float | None = None,
    attempts: int | None = None,
    tokens: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Builds the JSON record of one answer (see the module docstring for the fields)."""
    status = status_of(parsed)
    record: dict[str, Any] = {
        "image_path": image_path,
        "model": model,
        "json_format_verified": status != "invalid",
        "json_content_verified": status != "invalid",
        "no_weighting": status == "none",
        "result": raw_text if status == "invalid" else parsed.to_result(),
        "format": FORMAT,
        "status": status,
        "provider": provider,
        "prompt_id": prompt_id,
        "prompt_version": prompt_version,
        "city": city,
        "latency_s": None if latency_s is None else round(float(latency_s), 4),
        "attempts": attempts,
        "tokens": dict(tokens or {}),
        "num_dropped": parsed.num_dropped,
        "num_clamped": parsed.num_clamped,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    if status == "invalid":
        record["raw_text"] = raw_text
        record["error"] = parsed.error
    return record


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Writes JSON atomically (see :func:`attllm_jax.files.atomic_write_json`), so a reader (or a resumed
    run after a kill) sees either the old file or the complete new one."""
    atomic_write_json(path, data)
