"""Per-image attention files, the one module that reads and writes them: naming, limits, reading, records.

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
``created`` (UTC ISO time), ``raw_text`` and ``error`` when the answer was invalid, and ``finish_reason``
and ``block_reason`` when the server gave them (a refused prompt: Gemini ``promptFeedback.blockReason``).

Every file is untrusted input. A file larger than ``MAX_FILE_BYTES``, not UTF-8, not JSON, nested deeper
than ``MAX_DEPTH`` or holding more than ``MAX_VALUES`` values, whose top level is not an object or a list, or
whose known fields have the wrong type is an invalid answer (:func:`read_attention_file` returns it as
``kind == "invalid"`` with an ``error`` naming the file), never an exception.

Counts: the points dropped (beyond N_max, malformed, non-finite) and the values clamped are counted by
the parser; for our own files the counts recorded at annotation time are added to those of the re-read, so
a 500-point answer read with N_max = 8 reports 492 dropped whichever N_max the annotation kept.

Naming: the attention file of the image ``<images>/<rel_dir>/<stem>.<ext>`` is
``<annotation_dir>/<rel_dir>/<stem>.json``. For a flat images folder this is exactly the published
code's ``<annotation_dir>/<stem>.json``; :func:`find_attention_file` also falls back to that flat
name for nested images, so published annotation folders work as they are.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from pathlib import Path
from typing import Any

from attllm_jax.attention.parse import DEFAULT_MAX_POINTS, ParsedAttention, invalid_attention, parse_answer

FORMAT = "attllm_jax.attention/1"
SUMMARY_FILE = "annotate_summary.json"  # written by the annotation run beside the attention files
STORE_MAX_POINTS = 32  # points an annotation run keeps in a file; readers truncate to their own N_max
MAX_FILE_BYTES = 4 * 1024 * 1024
MAX_DEPTH = 32
MAX_VALUES = 200_000
STATUSES = ("valid", "none", "invalid")
_STATUS_OF_KIND = {"points": "valid", "grid": "valid", "none": "none", "invalid": "invalid"}


class AttentionFileError(ValueError):
    """An attention file that cannot be used; the message names the file and what is wrong."""


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


def load_record(path: str | os.PathLike) -> dict[str, Any] | list[Any]:
    """Loads one attention file as a dict (a per-image record) or a list (a bare point answer), within limits.

    Raises:
        FileNotFoundError: if the file does not exist.
        AttentionFileError: (a ValueError) if the file is too large, not UTF-8 JSON, too deep or too large in
            values, not an object or a list, or a known field has the wrong type; the message names the file.
    """
    path = Path(path)
    with open(path, "rb") as f:
        data = f.read(MAX_FILE_BYTES + 1)
    return record_from_bytes(data, path)


def record_from_bytes(data: bytes, path: str | os.PathLike) -> dict[str, Any] | list[Any]:
    """:func:`load_record` of a file's content already read (an HTTP upload); ``path`` names it in errors.

    Raises:
        AttentionFileError: as :func:`load_record`.
    """
    path = Path(path)
    if len(data) > MAX_FILE_BYTES:
        raise AttentionFileError(f"attention file {path} is larger than {MAX_FILE_BYTES} bytes")
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark (Windows editors) is not part of the JSON
    except UnicodeDecodeError:
        raise AttentionFileError(f"attention file {path} is not UTF-8 text") from None
    try:
        record = json.loads(text)
    except RecursionError:
        raise AttentionFileError(f"attention file {path} is nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as e:
        raise AttentionFileError(f"attention file {path} is not valid JSON: {e}") from None
    _check_shape(record, path)
    _check_fields(record, path)
    return record


def _check_shape(value: Any, path: Path) -> None:
    """Depth and size limits, checked without recursion."""
    stack = [(value, 1)]
    count = 0
    while stack:
        item, depth = stack.pop()
        count += 1
        if count > MAX_VALUES:
            raise AttentionFileError(f"attention file {path} holds more than {MAX_VALUES} values")
        if isinstance(item, dict | list):
            if depth > MAX_DEPTH:
                raise AttentionFileError(f"attention file {path} is nested deeper than {MAX_DEPTH} levels")
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_fields(record: Any, path: Path) -> None:
    """Type limits: the top level and the fields that decide how the file is read."""
    if not isinstance(record, dict | list):
        raise AttentionFileError(f"attention file {path} holds a JSON {type(record).__name__}, not an object or a list")
    if not isinstance(record, dict):
        return
    if record.get("no_weighting") not in (None, True, False):
        raise AttentionFileError(f"attention file {path}: no_weighting must be true or false")
    if record.get("format") != FORMAT:
        return
    if record.get("status") not in STATUSES:
        raise AttentionFileError(f"attention file {path}: status must be one of {', '.join(STATUSES)}")
    for field in ("num_dropped", "num_clamped"):
        if field in record and not _is_count(record[field]):
            raise AttentionFileError(f"attention file {path}: {field} must be a non-negative integer")


def parse_record(record: Any, max_points: int = DEFAULT_MAX_POINTS) -> ParsedAttention:
    """Interprets a loaded attention file, ours or the published code's, or a bare answer.

    For our own valid files the dropped / clamped counts recorded at annotation time are added to those of
    this reading (the file keeps the cleaned answer, so this reading cannot see them).
    """
    if not (isinstance(record, dict) and ("result" in record or "no_weighting" in record)):
        return parse_answer(record, max_points)
    if record.get("no_weighting") is True:
        return parse_answer(None, max_points)
    parsed = parse_answer(record.get("result"), max_points)
    if record.get("format") == FORMAT and parsed.kind != "invalid":
        parsed = dataclasses.replace(
            parsed,
            num_dropped=parsed.num_dropped + int(record.get("num_dropped") or 0),
            num_clamped=parsed.num_clamped + int(record.get("num_clamped") or 0),
        )
    return parsed


@dataclasses.dataclass(frozen=True)
class AttentionFile:
    """One attention file, read once.

    Attributes:
        path: the file.
        record: the loaded JSON (a dict or a list), or None when the file could not be used.
        parsed: its answer (``kind == "invalid"`` with an ``error`` naming the file when it could not be used).
    """

    path: Path
    record: dict[str, Any] | list[Any] | None
    parsed: ParsedAttention

    def field(self, name: str) -> str | None:
        """A metadata field of the record (``model``, ``prompt_id``, ...) as text, or None."""
        if not isinstance(self.record, dict) or self.record.get(name) is None:
            return None
        return str(self.record[name])

    def raw_text(self) -> str:
        """The answer as text, for keeping an unusable answer: our ``raw_text``, or the ``result`` as it is."""
        record = self.record
        if isinstance(record, dict):
            if isinstance(record.get("raw_text"), str):
                return record["raw_text"]
            record = None if record.get("no_weighting") is True else record.get("result")
        if record is None:
            return "None"
        return record if isinstance(record, str) else json.dumps(record, ensure_ascii=False)


def read_attention(path: str | os.PathLike, max_points: int = DEFAULT_MAX_POINTS) -> AttentionFile:
    """Reads an attention file (ours or the published code's per-image format) once: the record and its answer.

    The ``result`` field is parsed again with :func:`parse_answer` whatever the verification flags
    say, so a published file that kept the raw text of an unverified answer is still recovered when
    our parser can read it. A file beyond the limits (see the module docstring) comes back with
    ``record=None`` and an invalid answer whose ``error`` names the file.

    Args:
        path: the JSON file.
        max_points: N_max, the number of point slots.

    Raises:
        FileNotFoundError: if the file does not exist (other OSErrors, e.g. permissions, also propagate).
    """
    path = Path(path)
    try:
        record = load_record(path)
    except AttentionFileError as e:
        return AttentionFile(path, None, invalid_attention(str(e), max_points))
    return AttentionFile(path, record, parse_record(record, max_points))


def read_attention_file(path: str | os.PathLike, max_points: int = DEFAULT_MAX_POINTS) -> ParsedAttention:
    """The answer of an attention file (see :func:`read_attention`); never raises on a bad file's content.

    Raises:
        FileNotFoundError: if the file does not exist.
    """
    return read_attention(path, max_points).parsed


def list_attention_files(annotation_dir: str | os.PathLike) -> list[str]:
    """Every attention file under ``annotation_dir`` (recursive), as sorted POSIX paths relative to it.

    Hidden files and folders (e.g. temporary files of an unfinished write) and the run summary are skipped.
    """
    root = Path(annotation_dir)
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        here = Path(dirpath)
        for name in filenames:
            if name.startswith(".") or not name.endswith(".json") or (here == root and name == SUMMARY_FILE):
                continue
            found.append((here / name).relative_to(root).as_posix())
    return sorted(found)


def status_of(parsed: ParsedAttention) -> str:
    """ "valid" (points or grid), "none" or "invalid"."""
    return _STATUS_OF_KIND[parsed.kind]


def file_status(path: str | os.PathLike) -> str:
    """The status of an attention file: "valid", "none" or "invalid" (also for a file beyond the limits).

    Raises:
        OSError: if the file cannot be read (FileNotFoundError when it does not exist).
    """
    read = read_attention(path, STORE_MAX_POINTS)
    return status_of(read.parsed)


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
    finish_reason: str | None = None,
    block_reason: str | None = None,
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
    if finish_reason:
        record["finish_reason"] = finish_reason
    if block_reason:
        record["block_reason"] = block_reason
    return record
