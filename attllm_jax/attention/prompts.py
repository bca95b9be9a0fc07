"""The prompts, as data: an id, a version, the answer they ask for and a template.

Every attention file records the prompt id and version it was made with; change the version whenever
the wording changes. Templates take ``{city}`` and, for grid prompts, the grid size.

* ``axis_focus`` (points): the two-step axis prompt. Step 1: a single landmark -> answer exactly
  ``None``; step 2, a complex scene -> 3-8 regions ``{"center": [x, y], "weight": w, "reasoning"}``
  with coordinates read off the rulers and weights in four bands (1.6-2.0 unique in the city,
  1.0-1.5 moderately distinctive, 0.3-0.9 common, 0.0-0.2 not localizable), skipping regions near 1.0.
* ``axis_minimal`` (points): the same contract in a few lines, for small local models.
* ``grid`` (grid): an n x n grid of cells A1.. (row letter from the top, column number from the left)
  with one weight per cell, or ``None``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from attllm_jax.attention.parse import MAX_GRID_SIZE, grid_labels

_RULERS = (
    "The photo is framed by rulers on all four sides, outside the photo. They run from 0.0 to 1.0 across the "
    "photo itself: (0.0, 0.0) is the top-left corner of the photo and (1.0, 1.0) its bottom-right corner; "
    "x grows to the right and y downwards. Read every coordinate off these rulers."
)

_BANDS = (
    "- 1.6 to 2.0: spatially unique in {city}: a named landmark, a one-of-a-kind building or facade, a "
    "recognizable skyline element.\n"
    "- 1.0 to 1.5: moderately distinctive: characteristic architecture, shop signs, a particular street layout "
    "or slope.\n"
    "- 0.3 to 0.9: common in {city}: generic buildings, ordinary street furniture, standard road markings.\n"
    "- 0.0 to 0.2: not localizable: sky, vegetation, pavement, people, vehicles, floodwater, reflections."
)

_AXIS_FOCUS = (
    "You help to find where in {city} a street-level photo was taken. " + _RULERS + "\n\n"
    "Step 1. Decide what kind of image this is.\n"
    "- Single landmark: one famous, unmistakable structure fills most of the photo and identifies the place "
    "on its own. Then answer with exactly the word None and nothing else.\n"
    "- Complex scene: anything else. Go on to step 2.\n\n"
    "Step 2. Choose 3 to 8 regions of the photo that matter for recognizing where in {city} it was taken, "
    "and give each a weight:\n" + _BANDS + "\n"
    "Skip regions whose weight would be close to 1.0: they carry no information.\n\n"
    "Answer with a JSON list only, without any other text:\n"
    '[{{"center": [x, y], "weight": w, "reasoning": "a few words"}}, ...]\n'
    "where [x, y] is the center of the region read off the rulers."
)

_AXIS_MINIMAL = (
    "Street photo from {city}, framed by rulers from 0.0 to 1.0 along each side of the photo "
    "((0, 0) top-left, (1, 1) bottom-right). If one famous landmark fills the photo, answer exactly None. "
    'Otherwise answer only a JSON list of 3 to 8 regions [{{"center": [x, y], "weight": w, "reasoning": "..."}}]: '
    "weight 1.6-2.0 unique in {city}, 1.0-1.5 moderately distinctive, 0.3-0.9 common, 0.0-0.2 not localizable "
    "(sky, vegetation, pavement, people, vehicles, floodwater, reflections). Skip regions near 1.0."
)

_GRID = (
    "You help to find where in {city} a street-level photo was taken. The photo is divided into a {n} x {n} "
    "grid: rows {first_row} to {last_row} from top to bottom, columns 1 to {n} from left to right, so {first_label} "
    "is the top-left cell and {last_label} the bottom-right one. The rulers around the photo mark the cell "
    "borders.\n\n"
    "If one famous, unmistakable structure fills most of the photo and identifies the place on its own, answer "
    "with exactly the word None and nothing else.\n\n"
    "Otherwise give every cell a weight for how much it helps to recognize where in {city} the photo was "
    "taken:\n" + _BANDS + "\n"
    "Use 1.0 for cells that are neither.\n\n"
    "Answer with a JSON object only, without any other text, with all {cells} cells: {example}"
)


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One prompt.

    Attributes:
        id: the name used on the command line and recorded in every output file.
        version: bumped whenever the wording changes.
        answer: "points" (a list of regions) or "grid" (one weight per cell).
        template: the text, with ``{city}`` (and grid fields) to fill in.
        description: one line for ``--help``.
    """

    id: str
    version: str
    answer: Literal["points", "grid"]
    template: str
    description: str

    def render(self, city: str, grid_size: int = 4) -> str:
        """The prompt text for one city (and grid size, for grid prompts).

        Raises:
            ValueError: if ``city`` is empty or ``grid_size`` is outside [2, 26].
        """
        if not city or not city.strip():
            raise ValueError("the prompt needs a city name (got an empty string)")
        if self.answer == "grid":
            labels = grid_labels(_check_grid_size(grid_size))
            example = "{" + ", ".join(f'"{label}": w' for label in labels[:3]) + f', ..., "{labels[-1]}": w}}'
            return self.template.format(
                city=city.strip(),
                n=grid_size,
                first_row="A",
                last_row=labels[-1][0],
                first_label=labels[0],
                last_label=labels[-1],
                cells=len(labels),
                example=example,
            )
        return self.template.format(city=city.strip())

    def response_schema(self, grid_size: int = 4) -> dict[str, Any]:
        """The answer's JSON schema in the OpenAPI subset that Gemini's ``response_schema`` takes.

        It is nullable: in JSON mode the model answers ``null`` where the prompt says ``None``.
        """
        if self.answer == "grid":
            labels = grid_labels(_check_grid_size(grid_size))
            return {
                "type": "OBJECT",
                "nullable": True,
                "properties": {label: {"type": "NUMBER"} for label in labels},
                "required": labels,
                "property_ordering": labels,
            }
        return {
            "type": "ARRAY",
            "nullable": True,
            "items": {
                "type": "OBJECT",
                "properties": {
                    "center": {"type": "ARRAY", "items": {"type": "NUMBER"}, "min_items": 2, "max_items": 2},
                    "weight": {"type": "NUMBER"},
                    "reasoning": {"type": "STRING"},
                },
                "required": ["center", "weight", "reasoning"],
                "property_ordering": ["center", "weight", "reasoning"],
            },
        }


def _check_grid_size(grid_size: int) -> int:
    if not isinstance(grid_size, int) or not 2 <= grid_size <= MAX_GRID_SIZE:
        raise ValueError(f"grid_size must be an integer in [2, {MAX_GRID_SIZE}], got {grid_size!r}")
    return grid_size


PROMPTS: dict[str, Prompt] = {
    p.id: p
    for p in (
        Prompt("axis_focus", "1", "points", _AXIS_FOCUS, "two-step axis prompt: None, or 3-8 weighted regions"),
        Prompt("axis_minimal", "1", "points", _AXIS_MINIMAL, "the axis prompt in a few lines, for small models"),
        Prompt("grid", "1", "grid", _GRID, "one weight per cell of an n x n grid (A1..), or None"),
    )
}


def get_prompt(prompt_id: str) -> Prompt:
    """The prompt with this id.

    Raises:
        KeyError: naming the known ids when ``prompt_id`` is unknown.
    """
    try:
        return PROMPTS[prompt_id]
    except KeyError:
        raise KeyError(f"unknown prompt {prompt_id!r}; known prompts: {', '.join(sorted(PROMPTS))}") from None
