"""A small synthetic flooded-street benchmark, generated deterministically and cached.

The world is a few straight streets in UTM zone 10S, each lined by a procedurally drawn facade (buildings of
random widths, heights and colours with windows, doors, shop signs and awnings). A camera looks at the facade
from the street: the database holds dry views every ``db_spacing_m`` metres; each query is a view from a nearby
position (random shift, zoom and lighting) with floodwater drawn over a variable lower part of the view (a murky
surface with a rippled, darkened reflection of the facade above the waterline and specular streaks; the water of
:func:`attllm_jax.data.flood.draw_water`, which floods any photo the same way). The
ground-truth flood mask of every query is saved as a PNG.

Names follow the evaluation conventions: database ``@east@north@10@S@lat@lon@<street>_<pos>@.jpg`` (SF-XL style)
and queries ``lat_lon@<street>_q<k>@flood<level>.jpg`` (flood-query style), so the demo exercises both parsers
and the lat/lon -> UTM projection.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import utm
from PIL import Image, ImageDraw

from attllm_jax.data.flood import draw_water

GENERATOR_VERSION = 1
_ZONE = (10, "S")
_PX_PER_M = 12  # facade raster resolution
_STRIP_BOTTOM_M, _STRIP_TOP_M = -4.0, 22.0  # heights covered by the facade raster (0 = street level)
_VIEW_WIDTH_M, _VIEW_BOTTOM_M = 24.0, -2.0  # the dry camera's field of view on the facade


@dataclass(frozen=True)
class SyntheticConfig:
    """Parameters of the synthetic benchmark (all of them key the cache).

    Attributes:
        num_streets: Streets, 400 m apart (never positives of each other).
        street_length_m: Length of each street.
        db_spacing_m: Distance between consecutive database views.
        num_queries: Flooded query views.
        max_query_shift_m: Largest along-street offset of a query from a random database-like position.
        image_height: Height of every view in pixels.
        image_width: Width of every view in pixels.
        flood_min: Smallest fraction of the view height under water.
        flood_max: Largest fraction of the view height under water.
        seed: Random seed.
        database_clutter: Transient clutter objects (parked cars, people) drawn into each database view, with their
            oracle masks in ``database_masks/`` (0 = none, the default demo; the world and the queries do not
            change with it).
    """

    num_streets: int = 4
    street_length_m: float = 300.0
    db_spacing_m: float = 10.0
    num_queries: int = 40
    max_query_shift_m: float = 12.0
    image_height: int = 288
    image_width: int = 384
    flood_min: float = 0.3
    flood_max: float = 0.55
    seed: int = 0
    database_clutter: int = 0

    def digest(self) -> str:
        fields = asdict(self)
        if not self.database_clutter:  # the benchmarks made before the option keep their cache key
            del fields["database_clutter"]
        text = json.dumps({"version": GENERATOR_VERSION, **fields}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class SyntheticBenchmark:
    """Where a generated benchmark lives.

    Attributes:
        root: The benchmark folder.
        database: Folder of dry database views.
        queries: Folder of flooded query views.
        masks: Folder of flood masks, ``<query stem>.png`` (255 = water).
        config: The parameters it was generated with.
        database_masks: Folder of clutter masks, ``<database stem>.png`` (255 = clutter), or None without clutter.
    """

    root: Path
    database: Path
    queries: Path
    masks: Path
    config: SyntheticConfig
    database_masks: Path | None = None


def _street_origin(street: int) -> tuple[float, float, float]:
    """UTM origin (east, north) and heading (radians) of a street, all far apart."""
    east = 551_000.0 + 400.0 * street
    north = 4_180_000.0 + 250.0 * (street % 2)
    heading = 0.35 * street
    return east, north, heading


def _street_utm(street: int, position_m: float) -> tuple[float, float]:
    east, north, heading = _street_origin(street)
    return east + position_m * np.cos(heading), north + position_m * np.sin(heading)


def _latlon(east: float, north: float) -> tuple[float, float]:
    lat, lon = utm.to_latlon(east, north, *_ZONE)
    return float(lat), float(lon)


def _random_color(rng: np.random.Generator, low: int = 40, high: int = 230) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(low, high, size=3))


def _draw_building(draw: ImageDraw.ImageDraw, rng: np.random.Generator, x0: int, x1: int, ground: int) -> None:
    """Draws one building between columns x0 and x1, standing on row ``ground``."""
    px = _PX_PER_M
    height = int(rng.uniform(7.0, 19.0) * px)
    top = ground - height
    wall = _random_color(rng, 60, 235)
    draw.rectangle([x0, top, x1, ground], fill=wall)
    if rng.random() < 0.6:  # cornice
        draw.rectangle([x0, top, x1, top + int(0.5 * px)], fill=_random_color(rng, 20, 120))
    floors = max(2, height // int(3.2 * px))
    cols = max(1, (x1 - x0) // int(rng.uniform(2.2, 3.8) * px))
    window = _random_color(rng, 10, 120)
    frame = _random_color(rng, 150, 255)
    arched = rng.random() < 0.3
    floor_h = (height - int(3.5 * px)) / floors
    col_w = (x1 - x0) / cols
    for f in range(floors):
        for c in range(cols):
            wx0 = int(x0 + c * col_w + 0.25 * col_w)
            wx1 = int(x0 + (c + 1) * col_w - 0.25 * col_w)
            wy0 = int(top + 0.8 * px + f * floor_h + 0.2 * floor_h)
            wy1 = int(top + 0.8 * px + (f + 1) * floor_h - 0.25 * floor_h)
            if wx1 - wx0 < 3 or wy1 - wy0 < 3:
                continue
            draw.rectangle([wx0 - 2, wy0 - 2, wx1 + 2, wy1 + 2], fill=frame)
            if arched:
                draw.ellipse([wx0, wy0 - (wx1 - wx0) // 2, wx1, wy0 + (wx1 - wx0) // 2], fill=window)
            draw.rectangle([wx0, wy0, wx1, wy1], fill=window)
            if rng.random() < 0.3:  # a lit window or curtain
                draw.rectangle([wx0, wy0, wx1, (wy0 + wy1) // 2], fill=_random_color(rng, 150, 255))
    # street level: a shop sign band, a door, sometimes a striped awning
    if rng.random() < 0.7 and x1 - x0 >= 6:  # a sliver of a building at the strip's end has no room for a sign
        sy0, sy1 = ground - int(3.4 * px), ground - int(2.6 * px)
        draw.rectangle([x0 + 3, sy0, x1 - 3, sy1], fill=_random_color(rng))
        for _ in range(int(rng.integers(2, 6))):  # "letters"
            lx = int(rng.uniform(x0 + 6, max(x0 + 7, x1 - 12)))
            draw.rectangle([lx, sy0 + 2, lx + 5, sy1 - 2], fill=_random_color(rng, 0, 255))
    door_w = int(1.4 * px)
    dx = int(rng.uniform(x0 + 2, max(x0 + 3, x1 - door_w - 2)))
    draw.rectangle([dx, ground - int(2.4 * px), dx + door_w, ground], fill=_random_color(rng, 20, 140))
    if rng.random() < 0.4:
        ay0, ay1 = ground - int(2.6 * px), ground - int(2.0 * px)
        stripe = int(0.5 * px)
        a, b = _random_color(rng), (245, 245, 240)
        for i, sx in enumerate(range(x0, x1, stripe)):
            draw.rectangle([sx, ay0, min(sx + stripe, x1), ay1], fill=a if i % 2 == 0 else b)


def _facade_strip(rng: np.random.Generator, length_m: float) -> np.ndarray:
    """The raster of one street: sky, buildings, sidewalk and road, ``[rows, cols, 3]`` float32 in [0, 1]."""
    px = _PX_PER_M
    margin_m = 30.0  # views near the ends and zoomed-out queries stay inside the raster
    width = int((length_m + 2 * margin_m) * px)
    rows = int((_STRIP_TOP_M - _STRIP_BOTTOM_M) * px)
    ground = int(_STRIP_TOP_M * px)
    image = Image.new("RGB", (width, rows))
    sky = np.linspace([120, 165, 220], [200, 220, 240], ground).astype(np.uint8)
    canvas = np.zeros((rows, width, 3), np.uint8)
    canvas[:ground] = sky[:, None, :]
    canvas[ground:] = (95, 95, 100)
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    x = 0
    while x < width:
        w = int(rng.uniform(6.0, 20.0) * px)
        _draw_building(draw, rng, x, min(x + w, width - 1), ground)
        x += w + int(rng.integers(0, 2)) * int(rng.uniform(0.5, 3.0) * px)
    draw.rectangle([0, ground, width, ground + int(1.2 * px)], fill=(150, 148, 140))  # sidewalk
    for lx in range(0, width, int(6 * px)):  # lane marks
        draw.rectangle([lx, ground + int(2.6 * px), lx + int(2.5 * px), ground + int(2.8 * px)], fill=(230, 230, 200))
    strip = np.asarray(image, dtype=np.float32) / 255.0
    strip += rng.normal(0.0, 0.02, strip.shape).astype(np.float32)  # plaster / photo grain
    return np.clip(strip, 0.0, 1.0)


def _render_view(strip: np.ndarray, position_m: float, zoom: float, height: int, width: int) -> np.ndarray:
    """Crops the facade around ``position_m`` (zoom > 1 sees less) and resizes it to ``[height, width, 3]``."""
    px = _PX_PER_M
    view_w_m = _VIEW_WIDTH_M / zoom
    view_h_m = view_w_m * height / width
    center_x = (position_m + 30.0) * px
    center_m = _VIEW_BOTTOM_M + _VIEW_WIDTH_M * height / width / 2  # zooming keeps the view centre
    top_row = (_STRIP_TOP_M - center_m - view_h_m / 2) * px
    box = (center_x - view_w_m * px / 2, top_row, center_x + view_w_m * px / 2, top_row + view_h_m * px)
    image = Image.fromarray((strip * 255).astype(np.uint8))
    crop = image.transform((width, height), Image.Transform.EXTENT, box, resample=Image.Resampling.BILINEAR)
    return np.asarray(crop, dtype=np.float32) / 255.0


def _lighting(view: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    gain = rng.uniform(0.8, 1.1) * rng.uniform(0.93, 1.07, size=3)
    return np.clip(view * gain.astype(np.float32) + rng.uniform(-0.04, 0.04), 0.0, 1.0)


def _draw_clutter(view: np.ndarray, rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Draws ``count`` parked cars (boxes with a cabin and wheels) and people (narrow figures) standing on the
    street in a dry view ``[H, W, 3]`` in [0, 1]; returns the view and its ``[H, W]`` bool clutter mask."""
    height, width = view.shape[:2]
    px = width / _VIEW_WIDTH_M  # pixels per metre at zoom 1
    ground = int(height - (0.0 - _VIEW_BOTTOM_M) * px)
    image = Image.fromarray((view * 255 + 0.5).astype(np.uint8))
    mask = Image.new("L", (width, height), 0)
    draw, mark = ImageDraw.Draw(image), ImageDraw.Draw(mask)
    for _ in range(count):
        x = float(rng.uniform(0, width))
        color = _random_color(rng, 20, 240)
        if rng.random() < 0.6:  # a parked car, about 4.2 m x 1.5 m
            w, h = 4.2 * px, 1.5 * px
            body = [x - w / 2, ground - 0.9 * px, x + w / 2, ground - 0.25 * px]
            cabin = [x - w / 4, ground - h, x + w / 4, ground - 0.85 * px]
            wheels = [[x + dx - 0.35 * px, ground - 0.6 * px, x + dx + 0.35 * px, ground + 0.1 * px] for dx in
                      (-w / 3, w / 3)]  # fmt: skip
            for target, fill in ((draw, color), (mark, 255)):
                target.rectangle(body, fill=fill)
                target.rectangle(cabin, fill=fill if target is mark else (150, 190, 210))
                for wheel in wheels:
                    target.ellipse(wheel, fill=fill if target is mark else (20, 20, 20))
        else:  # a person, about 0.5 m x 1.75 m
            w, h = 0.5 * px, 1.75 * px
            for target, fill in ((draw, color), (mark, 255)):
                target.rectangle([x - w / 2, ground - 0.8 * h, x + w / 2, ground], fill=fill)
                target.ellipse([x - w / 3, ground - h, x + w / 3, ground - 0.78 * h], fill=fill)
    return np.asarray(image, np.float32) / 255.0, np.asarray(mask) > 127


def _save_jpeg(array: np.ndarray, path: Path) -> None:
    Image.fromarray((array * 255 + 0.5).astype(np.uint8)).save(path, quality=92)


def _generate(config: SyntheticConfig, root: Path) -> None:
    rng = np.random.default_rng(config.seed)
    database, queries, masks = root / "database", root / "queries", root / "masks"
    for folder in (database, queries, masks):
        folder.mkdir(parents=True)
    strips = [_facade_strip(rng, config.street_length_m) for _ in range(config.num_streets)]
    positions = np.arange(0.0, config.street_length_m + 1e-9, config.db_spacing_m)
    clutter_rng = np.random.default_rng([config.seed, 1])  # its own stream: the world and queries stay the same
    if config.database_clutter:
        (root / "database_masks").mkdir()
    for street, strip in enumerate(strips):
        for pos in positions:
            east, north = _street_utm(street, pos)
            lat, lon = _latlon(east, north)
            name = f"@{east:.2f}@{north:.2f}@{_ZONE[0]}@{_ZONE[1]}@{lat:.7f}@{lon:.7f}@st{street}_{pos:05.0f}m@.jpg"
            view = _render_view(strip, pos, 1.0, config.image_height, config.image_width)
            if config.database_clutter:
                view, clutter = _draw_clutter(view, clutter_rng, config.database_clutter)
                Image.fromarray(clutter.astype(np.uint8) * 255).save(root / "database_masks" / f"{name[:-4]}.png")
            _save_jpeg(view, database / name)
    margin = config.max_query_shift_m
    for k in range(config.num_queries):
        street = int(rng.integers(config.num_streets))
        pos = float(rng.uniform(margin, config.street_length_m - margin))
        zoom = float(rng.uniform(0.85, 1.15))
        level = float(rng.uniform(config.flood_min, config.flood_max))
        view = _render_view(strips[street], pos, zoom, config.image_height, config.image_width)
        view, mask = draw_water(_lighting(view, rng), level, rng)  # the water of attllm_jax.data.flood
        lat, lon = _latlon(*_street_utm(street, pos))
        stem = f"{lat:.9f}_{lon:.9f}@st{street}_q{k:03d}@flood{level:.2f}"
        _save_jpeg(view, queries / f"{stem}.jpg")
        Image.fromarray(mask.astype(np.uint8) * 255).save(masks / f"{stem}.png")
    meta = {"version": GENERATOR_VERSION, "config": asdict(config), "utm_zone": list(_ZONE)}
    (root / "meta.json").write_text(json.dumps(meta, indent=1))


def generate_benchmark(cache_dir: str | os.PathLike, config: SyntheticConfig | None = None) -> SyntheticBenchmark:
    """Generates the benchmark into ``cache_dir`` (or reuses the cached copy with the same parameters).

    Generation writes into a temporary folder renamed into place at the end, so an interrupted run never
    leaves a half-written benchmark behind.

    Args:
        cache_dir: Parent folder of the cached benchmarks.
        config: Parameters (default :class:`SyntheticConfig`).

    Returns:
        Where the benchmark is.
    """
    config = config or SyntheticConfig()
    if config.num_streets < 1 or config.num_queries < 1 or config.db_spacing_m <= 0:
        raise ValueError(f"bad synthetic benchmark parameters: {config}")
    if config.street_length_m <= 2 * config.max_query_shift_m:
        raise ValueError("street_length_m must exceed twice max_query_shift_m")
    root = Path(cache_dir) / f"synthetic_flood_v{GENERATOR_VERSION}_{config.digest()}"
    if not (root / "meta.json").is_file():
        tmp = root.with_name(root.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        _generate(config, tmp)
        shutil.rmtree(root, ignore_errors=True)
        os.replace(tmp, root)
    clutter = root / "database_masks" if config.database_clutter else None
    return SyntheticBenchmark(root, root / "database", root / "queries", root / "masks", config, clutter)
