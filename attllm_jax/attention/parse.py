"""Turns raw LLM answers into fixed-size padded arrays, on the host, before anything is jitted.

Accepted answers (docs/DESIGN.md "Attention maps"):

* points: a list of ``{"center": [x, y], "weight": w, "reasoning": "..."}`` (``(0, 0)`` top-left,
  ``(1, 1)`` bottom-right); ``[x, y, w]`` triples are accepted too. Centers are clamped to ``[0, 1]``,
  weights to ``[0, 2]`` (each clamped value is counted in ``num_clamped``). Entries that cannot be
  read (no center, non-numeric or non-finite values, wrong arity) are dropped and counted in
  ``num_dropped``; so are valid points beyond ``max_points`` (the first ``max_points`` are kept).
* grid: a dict of cell labels ``{"A1": w, ..., "D4": w}`` (row letter from the top, column number
  from the left, case-insensitive). ``n`` is the largest row or column index among the labels, so a
  3x3 answer with missing cells is still 3x3; unspecified cells are 1.0 (neutral); values are
  clamped to ``[0, 2]``; unreadable values and non-label keys are dropped and counted.
* none: the single-landmark answer. Recognized spellings, after stripping whitespace, code fences,
  backticks, quotes and trailing punctuation, case-insensitive: ``None`` and ``null`` (JSON ``null``
  is what a model in JSON mode writes for "no value", so it means the same thing), also when it is
  the last line of an answer that contains no JSON, or its first word followed by punctuation
  ("None. The bridge fills the frame."). The published code's per-image files with
  ``"no_weighting": true`` are "none" as well.
* invalid: everything else, including empty lists and point lists in which no entry is usable
  (the prompt asks for 3-8 regions, so these are re-asked by ``--retry_invalid``). ``error`` says why.
  Parsing never raises on LLM output.

Parsing is linear in the answer's length, and bounded: an answer longer than :data:`MAX_ANSWER_CHARS` is invalid
without being read (the prompt asks for a few regions; a real answer is a few KB).

Text is cleaned the forgiving way: the content of a fenced (```json) block is preferred, prose around
the JSON is ignored (the first bracketed span that parses wins), trailing commas, single quotes and
Python literals (``True``/``None``/tuples) are accepted, and wrappers ``{"result": ...}``,
``{"regions": ...}``, ``{"points": ...}`` are unwrapped.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import re
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import numpy as np

Kind = Literal["points", "grid", "none", "invalid"]

DEFAULT_MAX_POINTS = 8
MAX_ANSWER_CHARS = 100_000  # longer answers are invalid, unread: parsing stays well under a second
MAX_GRID_SIZE = 26  # rows are letters A..Z
_WRAPPER_KEYS = ("result", "regions", "points", "attention")
_NONE_WORDS = ("none", "null")
_GRID_LABEL = re.compile(r"^\s*([A-Za-z])\s*(\d{1,3})\s*$")
_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_-]*)[ \t]*\r?\n?(.*?)```", re.DOTALL)
_LEADING_NONE = re.compile(r"^[\s`'\"*_]*(none|null)[`'\"*_]*\s*[.:;!,\u2013\u2014-]", re.IGNORECASE)
_WORD = re.compile(r"[A-Za-z_]+")
_MAX_CANDIDATES = 16
_MAX_DEPTH = 4


@dataclasses.dataclass(frozen=True, eq=False)
class ParsedAttention:
    """One LLM answer as fixed-size arrays.

    Attributes:
        kind: "points", "grid", "none" (single landmark: no attention) or "invalid".
        centers: float32 [N_max, 2], (x, y) in [0, 1]; zeros in padding slots.
        weights: float32 [N_max], in [0, 2]; zeros in padding slots.
        valid: bool [N_max], True for the slots holding a point.
        grid: float32 [n, n] for grid answers (unspecified cells 1.0), else None.
        num_dropped: entries that could not be used (malformed, or beyond N_max).
        num_clamped: values that were out of range and clamped.
        reasoning: [N_max] the reasoning string of each slot ("" for padding).
        error: why the answer is invalid, else None.
    """

    kind: Kind
    centers: np.ndarray
    weights: np.ndarray
    valid: np.ndarray
    grid: np.ndarray | None = None
    num_dropped: int = 0
    num_clamped: int = 0
    reasoning: tuple[str, ...] = ()
    error: str | None = None

    @property
    def max_points(self) -> int:
        return int(self.valid.shape[0])

    @property
    def num_points(self) -> int:
        return int(self.valid.sum())

    @property
    def has_attention(self) -> bool:
        """True for answers that define an attention map (points or grid)."""
        return self.kind in ("points", "grid")

    def to_result(self) -> list[dict[str, Any]] | dict[str, float] | None:
        """The cleaned answer as JSON-ready data: a point list, a grid dict, or None.

        Raises:
            ValueError: for an invalid answer, which has no cleaned form.
        """
        if self.kind == "points":
            return [
                {
                    "center": [_short(self.centers[i, 0]), _short(self.centers[i, 1])],
                    "weight": _short(self.weights[i]),
                    "reasoning": self.reasoning[i],
                }
                for i in range(self.max_points)
                if self.valid[i]
            ]
        if self.kind == "grid":
            n = self.grid.shape[0]
            return {grid_label(r, c): _short(self.grid[r, c]) for r in range(n) for c in range(n)}
        if self.kind == "none":
            return None
        raise ValueError(f"an invalid answer has no cleaned result ({self.error})")


def _short(value: np.float32) -> float:
    """The shortest decimal that reads back as the same float32 (0.3, not 0.30000001192092896)."""
    return float(str(np.float32(value)))


def grid_label(row: int, col: int) -> str:
    """The label of a grid cell: ``grid_label(0, 0) == "A1"`` (row letter, 1-based column)."""
    return f"{chr(ord('A') + row)}{col + 1}"


def grid_labels(n: int) -> list[str]:
    """All labels of an n x n grid in row-major order: A1, A2, ..., then B1, ..."""
    return [grid_label(r, c) for r in range(n) for c in range(n)]


def _frozen(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


def _empty(max_points: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (
        np.zeros((max_points, 2), np.float32),
        np.zeros((max_points,), np.float32),
        np.zeros((max_points,), bool),
    )


def _without_points(kind: str, max_points: int, **fields: Any) -> ParsedAttention:
    """A ``kind`` answer whose point slots are all empty (none, invalid and grid answers)."""
    centers, weights, valid = _empty(max_points)
    return ParsedAttention(
        kind, _frozen(centers), _frozen(weights), _frozen(valid), reasoning=("",) * max_points, **fields
    )


def none_attention(max_points: int = DEFAULT_MAX_POINTS) -> ParsedAttention:
    """The "no attention" answer (single-landmark image)."""
    return _without_points("none", max_points)


def invalid_attention(error: str, max_points: int = DEFAULT_MAX_POINTS, num_dropped: int = 0) -> ParsedAttention:
    """An unusable answer; ``error`` says why."""
    return _without_points("invalid", max_points, num_dropped=num_dropped, error=error)


# ----------------------------------------------------------------------------------------------
# Text -> Python structure


def _is_none_word(text: str) -> bool:
    stripped = text.strip().strip("`'\"*_ \t\r\n").rstrip(".!;:, \t").strip("`'\"*_ ")
    return stripped.lower() in _NONE_WORDS


def _python_literals(text: str) -> str:
    """Rewrites JSON literals (true/false/null) outside strings as Python ones, for ast.literal_eval."""
    out: list[str] = []
    quote: str | None = None
    i = 0
    replacements = {"true": "True", "false": "False", "null": "None"}
    while i < len(text):
        ch = text[i]
        if quote:
            out.append(ch)
            if ch == "\\" and i + 1 < len(text):
                out.append(text[i + 1])
                i += 2
                continue
            if ch == quote:
                quote = None
            i += 1
            continue
        if ch in "\"'":
            quote = ch
            out.append(ch)
            i += 1
            continue
        match = _WORD.match(text, i)
        if match:
            word = match.group(0)
            out.append(replacements.get(word, word))
            i += len(word)
            continue
        out.append(ch)
        i += 1
    return "".join(out)


def _loads(text: str) -> Any:
    """Parses one JSON-ish value; raises ValueError when no reading works."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    no_trailing = re.sub(r",(\s*[}\]])", r"\1", text)
    try:
        return json.loads(no_trailing)
    except ValueError:
        pass
    try:
        return ast.literal_eval(_python_literals(no_trailing))
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as e:
        raise ValueError(f"not JSON: {e}") from None


def _bracket_spans(text: str) -> list[tuple[int, int]]:
    """Balanced [...] / {...} spans (string-aware), outermost first, in order of their start; at most
    ``_MAX_CANDIDATES``.

    One pass, linear in ``len(text)``: outside brackets the text is prose (quotes not tracked); from an opening
    bracket on, strings are tracked and brackets inside them ignored. A bracket that closes the wrong kind, or
    the end of the text with brackets still open, abandons the open ones: the balanced spans found inside them
    become the candidates instead (a truncated list still offers its complete entries), and the scan goes on
    after the wrong bracket. A bracket inside a string of an abandoned value is not a candidate.
    """
    pairs = {"[": "]", "{": "}"}
    spans: list[tuple[int, int]] = []
    open_: list[tuple[str, int, list[tuple[int, int]]]] = []  # (closer, start, balanced spans found inside)

    def abandon() -> None:
        for _, _, inside in open_:
            spans.extend(inside)
        open_.clear()

    quote: str | None = None
    i = 0
    while i < len(text) and len(spans) < _MAX_CANDIDATES:
        if not open_:
            i = min((j for j in (text.find("[", i), text.find("{", i)) if j >= 0), default=-1)
            if i < 0:
                break
            open_.append((pairs[text[i]], i, []))
            quote = None
        else:
            ch = text[i]
            if quote:
                if ch == "\\":
                    i += 1
                elif ch == quote:
                    quote = None
            elif ch in "\"'":
                # An apostrophe inside prose ("it's") must not start a string: only after , : [ { or space.
                if ch == '"' or text[i - 1] in ",:[{( \t\r\n":
                    quote = ch
            elif ch in pairs:
                open_.append((pairs[ch], i, []))
            elif ch in "]}":
                if ch != open_[-1][0]:
                    abandon()
                else:
                    _, start, _ = open_.pop()
                    (open_[-1][2] if open_ else spans).append((start, i + 1))
        i += 1
    abandon()
    return spans[:_MAX_CANDIDATES]


def _candidates(text: str) -> Iterator[Any]:
    """Yields the values the answer may hold, most likely first; a None word yields None."""
    fenced = [body for _, body in _FENCE.findall(text)]
    for source in fenced + [text] if fenced else [text]:
        if _is_none_word(source):
            yield None
            return
        try:
            yield _loads(source.strip())
        except ValueError:
            pass
        for begin, end in _bracket_spans(source):
            try:
                value = _loads(source[begin:end])
            except ValueError:
                continue
            if isinstance(value, dict) and _is_point_dict(value):
                # JSON lines / comma-separated objects without the enclosing list.
                last = source.rfind("}")
                try:
                    many = _loads("[" + source[begin : last + 1] + "]")
                    if isinstance(many, list) and len(many) > 1:
                        yield many
                except ValueError:
                    pass
            yield value
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if lines and (len(lines[-1]) <= 12 and _is_none_word(lines[-1]) or _LEADING_NONE.match(lines[0])):
        yield None


# ----------------------------------------------------------------------------------------------
# Python structure -> ParsedAttention


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, str):
        value = value.strip().rstrip("%")
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _is_point_dict(value: dict) -> bool:
    return "center" in value or "centre" in value or ("x" in value and "y" in value)


def _clamp(value: float, low: float, high: float) -> tuple[float, bool]:
    clamped = min(max(value, low), high)
    return clamped, clamped != value


def _read_point(entry: Any) -> tuple[float, float, float, str] | None:
    if isinstance(entry, dict):
        center = entry.get("center", entry.get("centre"))
        if center is None and "x" in entry and "y" in entry:
            center = (entry["x"], entry["y"])
        if isinstance(center, dict):
            center = (center.get("x"), center.get("y"))
        if isinstance(center, str):
            center = [part for part in re.split(r"[,\s()\[\]]+", center) if part]
        if not isinstance(center, list | tuple) or len(center) != 2:
            return None
        x, y, w = _number(center[0]), _number(center[1]), _number(entry.get("weight"))
        reasoning = entry.get("reasoning", "")
        reasoning = reasoning.strip() if isinstance(reasoning, str) else str(reasoning)
    elif isinstance(entry, list | tuple) and len(entry) == 3:
        x, y, w = (_number(v) for v in entry)
        reasoning = ""
    else:
        return None
    if x is None or y is None or w is None:
        return None
    return x, y, w, reasoning


def _parse_points(entries: Sequence[Any], max_points: int) -> ParsedAttention:
    centers, weights, valid = _empty(max_points)
    reasoning = [""] * max_points
    kept = dropped = clamped = 0
    for entry in entries:
        point = _read_point(entry)
        if point is None or kept >= max_points:
            dropped += 1
            continue
        x, y, w, why = point
        (x, cx), (y, cy), (w, cw) = _clamp(x, 0.0, 1.0), _clamp(y, 0.0, 1.0), _clamp(w, 0.0, 2.0)
        clamped += cx + cy + cw
        centers[kept] = (x, y)
        weights[kept] = w
        valid[kept] = True
        reasoning[kept] = why
        kept += 1
    if kept == 0:
        reason = "empty point list" if not entries else f"no usable point among {len(entries)} entries"
        return invalid_attention(reason, max_points, num_dropped=dropped)
    return ParsedAttention(
        "points",
        _frozen(centers),
        _frozen(weights),
        _frozen(valid),
        num_dropped=dropped,
        num_clamped=clamped,
        reasoning=tuple(reasoning),
    )


def _grid_cells(value: dict) -> dict[tuple[int, int], Any]:
    cells: dict[tuple[int, int], Any] = {}
    for key, cell_value in value.items():
        match = _GRID_LABEL.match(str(key))
        if match:
            row, col = ord(match.group(1).upper()) - ord("A"), int(match.group(2)) - 1
            if 0 <= col < MAX_GRID_SIZE:
                cells[(row, col)] = cell_value
    return cells


def _parse_grid(value: dict, cells: dict[tuple[int, int], Any], max_points: int) -> ParsedAttention:
    dropped = len(value) - len(cells)
    readable = {}
    for rc, cell_value in cells.items():
        number = _number(cell_value)
        if number is None:
            dropped += 1
        else:
            readable[rc] = number
    if not readable:
        return invalid_attention("grid answer without a readable cell value", max_points, num_dropped=dropped)
    n = max(max(r, c) for r, c in cells) + 1
    grid = np.ones((n, n), np.float32)
    clamped = 0
    for (r, c), number in readable.items():
        grid[r, c], was_clamped = _clamp(number, 0.0, 2.0)
        clamped += was_clamped
    return _without_points("grid", max_points, grid=_frozen(grid), num_dropped=dropped, num_clamped=clamped)


def _interpret(value: Any, max_points: int, depth: int = 0) -> ParsedAttention:
    if depth > _MAX_DEPTH:
        return invalid_attention("answer nested too deeply", max_points)
    if value is None:
        return none_attention(max_points)
    if isinstance(value, str):
        return _parse_text(value, max_points, depth + 1)
    if isinstance(value, dict):
        if value.get("no_weighting") is True:
            return none_attention(max_points)
        for key in _WRAPPER_KEYS:
            if key in value:
                return _interpret(value[key], max_points, depth + 1)
        if _is_point_dict(value):
            return _parse_points([value], max_points)
        cells = _grid_cells(value)
        if cells:
            return _parse_grid(value, cells, max_points)
        keys = ", ".join(sorted(map(str, value)))[:80] or "none"
        return invalid_attention(f"object is neither a point nor a grid (keys: {keys})", max_points)
    if isinstance(value, list | tuple):
        if len(value) == 1 and isinstance(value[0], dict) and not _is_point_dict(value[0]):
            return _interpret(value[0], max_points, depth + 1)
        if len(value) == 1 and isinstance(value[0], str):
            return _interpret(value[0], max_points, depth + 1)
        return _parse_points(list(value), max_points)
    return invalid_attention(f"unexpected answer of type {type(value).__name__}: {str(value)[:40]!r}", max_points)


def _parse_text(text: str, max_points: int, depth: int = 0) -> ParsedAttention:
    if len(text) > MAX_ANSWER_CHARS:
        return invalid_attention(
            f"answer of {len(text)} characters, over the {MAX_ANSWER_CHARS} read (parse.MAX_ANSWER_CHARS)", max_points
        )
    if not text.strip():
        return invalid_attention("empty answer", max_points)
    first_invalid = None
    for value in _candidates(text):
        parsed = _interpret(value, max_points, depth)
        if parsed.kind != "invalid":
            return parsed
        first_invalid = first_invalid or parsed
    if first_invalid is not None:
        return first_invalid
    snippet = " ".join(text.split())[:80]
    return invalid_attention(f"no JSON found in the answer: {snippet!r}", max_points)


def parse_answer(raw: str | dict | list | None, max_points: int = DEFAULT_MAX_POINTS) -> ParsedAttention:
    """Parses one LLM answer (raw text or already-decoded JSON) into fixed-size arrays.

    Args:
        raw: the model's text, or a decoded JSON value (list of points, grid dict, a ``{"result": ...}``
            wrapper such as a published per-image file, or None for "no attention").
        max_points: N_max, the number of point slots; extra valid points are dropped and counted.

    Returns:
        A ParsedAttention with ``centers [N_max, 2]``, ``weights [N_max]``, ``valid [N_max]``. Never
        raises on malformed answers: those come back with ``kind == "invalid"`` and an ``error``.

    Raises:
        ValueError: if ``max_points`` is not a positive integer.
    """
    if not isinstance(max_points, int) or isinstance(max_points, bool) or max_points < 1:
        raise ValueError(f"max_points must be a positive integer, got {max_points!r}")
    try:
        if isinstance(raw, str):
            return _parse_text(raw, max_points)
        return _interpret(raw, max_points)
    except RecursionError:
        return invalid_attention("answer nested too deeply", max_points)


# ----------------------------------------------------------------------------------------------
# Batching


@dataclasses.dataclass(frozen=True, eq=False)
class AttentionBatch:
    """A batch of answers as arrays with static shapes.

    Attributes:
        centers: float32 [B, N_max, 2]; padding and non-point rows are zeros.
        weights: float32 [B, N_max].
        valid: bool [B, N_max]; all False for rows that are not point answers.
        has_attention: bool [B]; True for point and grid answers. Rows without attention (None,
            "none", "invalid") should be evaluated with alpha = 0: a neutral all-ones map is NOT the
            same as no attention under the native blend of modulated GeM.
        grids: {n: (rows [B] bool, grid [B, n, n] float32)} for the grid answers of each size n
            (rows that are not n x n grid answers hold ones).
        kinds: [B] the kind of each row ("none" for a None entry).
    """

    centers: np.ndarray
    weights: np.ndarray
    valid: np.ndarray
    has_attention: np.ndarray
    grids: dict[int, tuple[np.ndarray, np.ndarray]]
    kinds: tuple[str, ...]


def stack_attention(parsed: Sequence[ParsedAttention | None], max_points: int | None = None) -> AttentionBatch:
    """Stacks answers into batch arrays; None entries mean "no attention".

    Args:
        parsed: [B] answers from :func:`parse_answer` (or None).
        max_points: N_max of the batch; default the largest N_max among the answers (8 if none).
            Answers with more slots than this must not hold points beyond it.

    Returns:
        An :class:`AttentionBatch`.

    Raises:
        ValueError: if an answer holds more points than ``max_points``.
    """
    slots = [p.max_points for p in parsed if p is not None]
    n_max = max_points if max_points is not None else max(slots, default=DEFAULT_MAX_POINTS)
    batch = len(parsed)
    centers = np.zeros((batch, n_max, 2), np.float32)
    weights = np.zeros((batch, n_max), np.float32)
    valid = np.zeros((batch, n_max), bool)
    has_attention = np.zeros((batch,), bool)
    grids: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    kinds = []
    for b, p in enumerate(parsed):
        kinds.append("none" if p is None else p.kind)
        if p is None or not p.has_attention:
            continue
        has_attention[b] = True
        if p.kind == "grid":
            n = p.grid.shape[0]
            if n not in grids:
                grids[n] = (np.zeros((batch,), bool), np.ones((batch, n, n), np.float32))
            grids[n][0][b] = True
            grids[n][1][b] = p.grid
            continue
        if p.num_points > n_max:
            raise ValueError(f"answer {b} holds {p.num_points} points, more than max_points={n_max}")
        k = min(p.max_points, n_max)
        centers[b, :k] = p.centers[:k]
        weights[b, :k] = p.weights[:k]
        valid[b, :k] = p.valid[:k]
    return AttentionBatch(centers, weights, valid, has_attention, grids, tuple(kinds))
