"""Image locations from file names or a CSV, and their conversion to planar UTM metres.

Two naming conventions are understood, always on the base name only (a directory may contain '@'):

- SF-XL / VPR-methods-evaluation: ``@utm_east@utm_north@zone_number@zone_letter@lat@lon@...@.jpg``; only the
  first two fields are required. Fields 3-4 are a zone only when they look like one (an integer, then a letter);
  the short form ``@east@north@<free text>@.jpg`` many datasets use carries no zone.
- Flood queries (the published VPR-AttLLM code's "dash" names): ``[name%]lat_lon[_more]@....jpg``, WGS84 degrees;
  an optional ``name%`` prefix is dropped.

UTM conversion uses the ``utm`` package; every point of an evaluation is projected into ONE zone (the database's),
so distances across a zone border stay Euclidean-meaningful.
"""

from __future__ import annotations

import csv
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import utm

CONVENTIONS = ("auto", "sfxl", "flood")


class CoordinateError(ValueError):
    """A file name (or CSV row) does not carry a location in the expected convention."""


@dataclass(frozen=True)
class Location:
    """Where one image was taken, as read from its name.

    Attributes:
        utm: ``(east, north)`` in metres when the name carries UTM coordinates, else None.
        zone: ``(zone_number, zone_letter)`` when the name carries it, else None.
        latlon: ``(lat, lon)`` in degrees when the name carries them, else None.
    """

    utm: tuple[float, float] | None = None
    zone: tuple[int, str] | None = None
    latlon: tuple[float, float] | None = None


def _stem(name: str) -> str:
    base = os.path.basename(name)
    root, ext = os.path.splitext(base)
    return root if ext else base


def _float(text: str) -> float | None:
    try:
        value = float(text.strip())
    except ValueError:
        return None
    return value if np.isfinite(value) else None


def _valid_latlon(lat: float | None, lon: float | None) -> bool:
    return lat is not None and lon is not None and -90.0 <= lat <= 90.0 and -180.0 <= lon <= 180.0


def parse_sfxl_name(name: str) -> Location | None:
    """Reads ``@east@north@[zone@letter@lat@lon@...]`` from a base name; None if it is not such a name.

    Args:
        name: A file name or path; only the base name is read.

    Returns:
        The location, with ``zone`` and ``latlon`` filled when those optional fields are present.

    Raises:
        CoordinateError: naming the file when east/north lie outside the UTM ranges (easting 100,000-999,999 m,
            northing 0-10,000,000 m) or the zone fields claim a zone (:func:`is_zone_claim`) that is not a zone
            number 1-60 and a UTM latitude band letter.
    """
    fields = _stem(name).split("@")
    if len(fields) < 3 or fields[0].strip():
        return None
    east, north = _float(fields[1]), _float(fields[2])
    if east is None or north is None:
        return None
    problem = utm_range_problem(east, north)
    zone = None
    number, letter = (fields[3].strip(), fields[4].strip()) if len(fields) > 4 else ("", "")
    if is_zone_claim(number, letter):
        zone = _zone(number, letter)
        if zone is None:
            problem = problem or f"UTM zone {number!r} {letter!r} is not a zone number 1-60 and a band letter C-X"
    if problem:
        raise CoordinateError(f"file name {name!r}: {problem}")
    latlon = None
    if len(fields) > 6:
        lat, lon = _float(fields[5]) if fields[5].strip() else None, _float(fields[6]) if fields[6].strip() else None
        if _valid_latlon(lat, lon):
            latlon = (lat, lon)
    return Location(utm=(east, north), zone=zone, latlon=latlon)


UTM_EASTING_RANGE = (100_000.0, 1_000_000.0)  # metres, [low, high): what the utm package accepts
UTM_NORTHING_RANGE = (0.0, 10_000_000.0)  # metres, inclusive
UTM_BAND_LETTERS = "CDEFGHJKLMNPQRSTUVWX"


def utm_range_problem(east: float, north: float) -> str | None:
    """Why ``(east, north)`` cannot be UTM metres, or None when both lie in the UTM ranges."""
    low, high = UTM_EASTING_RANGE
    if not low <= east < high:
        return f"easting {east:g} m is outside the UTM range {low:,.0f}-{high - 1:,.0f} m"
    low, high = UTM_NORTHING_RANGE
    if not low <= north <= high:
        return f"northing {north:g} m is outside the UTM range {low:,.0f}-{high:,.0f} m"
    return None


def is_zone_claim(number: str, letter: str) -> bool:
    """Whether fields 3-4 of an SF-XL name claim a UTM zone: an integer, then one letter (e.g. ``10``, ``S``).

    Only a claim is validated (zone 99 or band ``I`` is an error); anything else there (empty fields, free text
    such as ``db7`` in the short form ``@east@north@db7@.jpg``, a lone number) is not a zone, as in the field's
    tools, which read only east and north.
    """
    return re.fullmatch(r"[0-9]+", number) is not None and re.fullmatch(r"[A-Za-z]", letter) is not None


def _zone(number: str, letter: str) -> tuple[int, str] | None:
    if not (number.isdigit() and 1 <= int(number) <= 60 and len(letter) == 1 and letter.upper() in UTM_BAND_LETTERS):
        return None
    return int(number), letter.upper()


def parse_flood_name(name: str) -> Location | None:
    """Reads ``[name%]lat_lon[_...]@...`` from a base name; None if it is not such a name.

    Args:
        name: A file name or path; only the base name is read.

    Returns:
        The location with ``latlon`` filled.
    """
    stem = _stem(name)
    if "%" in stem:
        stem = stem.split("%", 1)[1]
    parts = stem.split("@", 1)[0].split("_")
    if len(parts) < 2:
        return None
    lat, lon = _float(parts[0]), _float(parts[1])
    if not _valid_latlon(lat, lon):
        return None
    return Location(latlon=(lat, lon))


def parse_location(name: str, convention: str = "auto") -> Location:
    """Reads the location of an image from its base name.

    Args:
        name: The file name or path (directories are ignored, they may contain '@').
        convention: "sfxl", "flood", or "auto" (a base name starting with '@' is SF-XL, anything else flood).

    Returns:
        The parsed location.

    Raises:
        CoordinateError: naming the file when it carries no location in that convention.
        ValueError: for an unknown convention.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown coordinate convention {convention!r}; expected one of {CONVENTIONS}")
    base = os.path.basename(name)
    if convention == "auto":
        convention = "sfxl" if base.startswith("@") else "flood"
    location = parse_sfxl_name(base) if convention == "sfxl" else parse_flood_name(base)
    if location is None:
        raise CoordinateError(f"cannot read coordinates from file name {name!r}: expected {NAME_EXAMPLES[convention]}")
    return location


# Real example names of each convention, for error messages (what a user can compare a failing name with).
NAME_EXAMPLES = {
    "sfxl": "a name like @0551294.51@4177187.54@10@S@037.74054@-122.41781@6ndRH0-kf_BJq0ZASDu5ZQ@@300@@@@201311@@.jpg "
    "(@utm_east@utm_north@zone@band@lat@lon@...; only east and north are required: @551294.51@4177187.54@@.jpg)",
    "flood": "a name like 37.77930_-122.41930@flood.jpg (latitude_longitude@anything; an optional prefix ending in %: "
    "street%37.77930_-122.41930@flood.jpg)",
}

_LATLON_HEADERS = (("lat", "lon"), ("latitude", "longitude"))
_UTM_HEADERS = (("utm_east", "utm_north"), ("easting", "northing"), ("east", "north"))


def read_coordinates_csv(path: str | os.PathLike) -> dict[str, Location]:
    """Reads a CSV ``path,lat,lon`` or ``path,utm_east,utm_north`` (header row required).

    Args:
        path: The CSV file. Paths in it are relative to the image folder, with '/' separators.

    Returns:
        Locations keyed by the (normalized) relative path.

    Raises:
        CoordinateError: for a missing column, an unparsable value, or a duplicated path, naming the row.
    """
    path = Path(path)
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = [h.strip().lower() for h in (reader.fieldnames or [])]
        reader.fieldnames = header
        if "path" not in header:
            raise CoordinateError(f"{path}: the CSV needs a 'path' column, found {header}")
        columns = next(((a, b, "latlon") for a, b in _LATLON_HEADERS if a in header and b in header), None)
        columns = columns or next(((a, b, "utm") for a, b in _UTM_HEADERS if a in header and b in header), None)
        if columns is None:
            raise CoordinateError(f"{path}: the CSV needs lat,lon or utm_east,utm_north columns, found {header}")
        first, second, kind = columns
        locations: dict[str, Location] = {}
        for line, row in enumerate(reader, start=2):
            key = normalize_relative_path(row["path"])
            a, b = _float(row[first] or ""), _float(row[second] or "")
            if a is None or b is None or (kind == "latlon" and not _valid_latlon(a, b)):
                raise CoordinateError(
                    f"{path}:{line}: bad coordinates for {row['path']!r}: {row[first]!r}, {row[second]!r}"
                )
            problem = utm_range_problem(a, b) if kind == "utm" else None
            if problem:
                raise CoordinateError(f"{path}:{line}: bad coordinates for {row['path']!r}: {problem}")
            if key in locations:
                raise CoordinateError(f"{path}:{line}: {row['path']!r} appears twice")
            locations[key] = Location(latlon=(a, b)) if kind == "latlon" else Location(utm=(a, b))
    return locations


def normalize_relative_path(path: str) -> str:
    """Returns a relative path with '/' separators and no leading './'."""
    text = path.strip().replace("\\", "/")
    while text.startswith("./"):
        text = text[2:]
    return text


def majority_zone(locations: list[Location]) -> tuple[int, str]:
    """Chooses the UTM zone a set of locations is projected into.

    The zone written in the names wins (the most common one); otherwise the zone of the most common computed zone
    of the lat/lon points.

    Raises:
        CoordinateError: when the locations carry neither a zone nor lat/lon (plain UTM without a zone).
    """
    named = Counter(loc.zone for loc in locations if loc.zone is not None)
    if named:
        return named.most_common(1)[0][0]
    computed = Counter(
        (utm.latlon_to_zone_number(*loc.latlon), utm.latitude_to_zone_letter(loc.latlon[0]))
        for loc in locations
        if loc.latlon is not None
    )
    if not computed:
        raise CoordinateError("cannot choose a UTM zone: the names carry neither a zone nor latitude/longitude")
    return computed.most_common(1)[0][0]


def _label(names: Sequence[str] | None, i: int) -> str:
    return repr(names[i]) if names is not None else f"point {i}"


def to_utm(
    locations: Sequence[Location], zone: tuple[int, str] | None, names: Sequence[str] | None = None
) -> np.ndarray:
    """Planar UTM coordinates of every location, in metres, in ONE zone.

    Points that carry UTM in their name keep it unless their name says another zone; the others are projected from
    lat/lon into ``zone`` with the ``utm`` package (the zone letter fixes the hemisphere's false northing).

    Args:
        locations: The parsed locations.
        zone: ``(number, letter)`` to project lat/lon points into; required when any point has only lat/lon.
        names: Optional file name of each location, used in error messages.

    Returns:
        ``[N, 2]`` float64 (east, north).

    Raises:
        CoordinateError: naming the file when a point in another zone has no lat/lon, or when a zone is needed and
            missing or invalid.
    """
    out = np.empty((len(locations), 2), dtype=np.float64)
    to_project = []
    for i, loc in enumerate(locations):
        in_other_zone = zone is not None and loc.zone is not None and loc.zone[0] != zone[0]
        if loc.utm is not None and not in_other_zone:
            out[i] = loc.utm
        elif loc.latlon is not None:
            to_project.append(i)
        else:
            raise CoordinateError(
                f"{_label(names, i)} is in UTM zone {loc.zone[0]}{loc.zone[1]} and carries no latitude/longitude, "
                f"but the evaluation uses zone {zone[0]}{zone[1]}: give it lat/lon in its name (or a coordinates "
                "CSV), or use --distance haversine"
            )
    if to_project:
        if zone is None:
            raise CoordinateError(
                f"a UTM zone is needed to project latitude/longitude points such as {_label(names, to_project[0])}: "
                "give the database names a zone (@east@north@zone@letter@...) or use --distance haversine"
            )
        if _zone(str(zone[0]), str(zone[1])) is None:
            raise CoordinateError(f"UTM zone {zone} is not a zone number 1-60 and a band letter C-X")
        lat = np.array([locations[i].latlon[0] for i in to_project], dtype=np.float64)
        lon = np.array([locations[i].latlon[1] for i in to_project], dtype=np.float64)
        east, north, _, _ = utm.from_latlon(lat, lon, force_zone_number=zone[0], force_zone_letter=zone[1])
        out[to_project, 0], out[to_project, 1] = east, north
    return out


def to_latlon(locations: Sequence[Location], names: Sequence[str] | None = None) -> np.ndarray:
    """Latitude/longitude of every location in degrees (for haversine distances).

    Points with only UTM are converted back with the zone written in their name.

    Args:
        locations: The parsed locations.
        names: Optional file name of each location, used in error messages.

    Returns:
        ``[N, 2]`` float64 (lat, lon).

    Raises:
        CoordinateError: naming the file when a point has UTM without a zone (no way to recover lat/lon).
    """
    out = np.empty((len(locations), 2), dtype=np.float64)
    for i, loc in enumerate(locations):
        if loc.latlon is not None:
            out[i] = loc.latlon
        elif loc.zone is not None:
            out[i] = utm.to_latlon(loc.utm[0], loc.utm[1], loc.zone[0], loc.zone[1])
        else:
            raise CoordinateError(
                f"{_label(names, i)} has UTM coordinates without a zone: cannot compute a haversine distance "
                "(use --distance utm, or names with @zone@letter@ or lat/lon)"
            )
    return out
