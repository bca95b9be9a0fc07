"""Database and query folders: the image list, and where each image was taken.

A folder's images are listed from ``<folder>_images_paths.txt`` beside it when that file exists (one path
relative to the folder per line, as VPR-methods-evaluation does for large folders), otherwise by walking the
folder for .jpg/.jpeg/.png files (extensions matched case-insensitively), sorted.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath

import numpy as np

from attllm_jax.data import coordinates as coords
from attllm_jax.files import IMAGE_EXTENSIONS, list_image_files


def paths_file_for(folder: str | os.PathLike) -> Path:
    """The optional path list of a folder: ``<folder>_images_paths.txt`` beside it."""
    folder = Path(folder)
    return folder.parent / f"{folder.name}_images_paths.txt"


def list_images(folder: str | os.PathLike) -> list[str]:
    """Relative paths (with '/') of the images of a folder.

    Args:
        folder: The image folder.

    Returns:
        Paths relative to ``folder``: the path list's order when ``<folder>_images_paths.txt`` exists, else sorted.

    Raises:
        FileNotFoundError: when the folder is missing, holds no image, or the path list names a missing first file.
        PathListError: when the path list has an entry outside the folder (absolute, or escaping it with '..') or
            a duplicate entry, naming the line.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {str(folder)!r} does not exist")
    listing = paths_file_for(folder)
    if listing.is_file():
        paths = read_paths_file(listing)
        if not paths:
            raise FileNotFoundError(f"{listing} lists no image")
        if not (folder / paths[0]).is_file():
            raise FileNotFoundError(f"{listing} names {paths[0]!r}, which is not a file in {folder}")
        return paths
    paths = list_image_files(folder)
    if not paths:
        raise FileNotFoundError(f"image folder {str(folder)!r} contains no {'/'.join(IMAGE_EXTENSIONS)} image")
    return paths


class PathListError(ValueError):
    """A ``<folder>_images_paths.txt`` entry is outside the folder or listed twice."""


def read_paths_file(listing: str | os.PathLike) -> list[str]:
    """Reads a path list: one image path relative to the folder per line; blank lines are ignored.

    Entries are normalized (``'\\'`` -> ``'/'``, ``./`` and ``a/../`` collapsed). An absolute entry, or one that
    leaves the folder through ``..``, is refused, so a list cannot make the evaluation read files elsewhere (an
    entry that leaves it through a symlink is refused when it is read: skipped and counted, see
    :func:`attllm_jax.data.images.check_inside`); the same image listed twice (after normalization) is refused
    too, since it would be counted twice.

    Args:
        listing: The path-list file.

    Returns:
        The normalized relative paths, in the file's order.

    Raises:
        PathListError: naming the file, the line number and the entry.
    """
    paths: list[str] = []
    first_line: dict[str, int] = {}
    for number, line in enumerate(Path(listing).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        text = line.strip().replace("\\", "/")
        normalized = posixpath.normpath(text)
        if text.startswith("/") or PureWindowsPath(text).drive or normalized == ".." or normalized.startswith("../"):
            raise PathListError(
                f"{listing}:{number}: {line.strip()!r} is outside the image folder; the list must hold paths "
                "relative to the folder, inside it"
            )
        if normalized in first_line:
            raise PathListError(
                f"{listing}:{number}: {line.strip()!r} repeats line {first_line[normalized]}; each image must be "
                "listed once"
            )
        first_line[normalized] = number
        paths.append(normalized)
    return paths


@dataclass(frozen=True)
class ImageSet:
    """The images of one folder and their locations.

    Attributes:
        root: The folder.
        paths: Image paths relative to ``root`` (with '/').
        locations: One parsed location per image.
    """

    root: Path
    paths: tuple[str, ...]
    locations: tuple[coords.Location, ...] = field(repr=False)

    def __len__(self) -> int:
        return len(self.paths)

    def absolute(self, index: int) -> Path:
        """The full path of image ``index``."""
        return self.root / self.paths[index]

    def names(self) -> list[str]:
        """The full path of every image, as strings (for messages)."""
        return [str(self.root / p) for p in self.paths]

    def fingerprint(self) -> str:
        """sha256 of the resolved folder, the ordered image list and each image's size and modification time.

        It keys descriptor stores: an image replaced in place under the same name (a new size or mtime) makes a new
        key, so the store is rebuilt rather than reused with the old image's descriptor. Content is not hashed
        (reading every image to reuse a store would cost as much as a good part of extracting it); a copy of the
        folder that does not preserve modification times therefore rebuilds the store.
        """
        digest = hashlib.sha256(str(self.root.resolve()).encode())
        for path, (size, mtime_ns) in zip(self.paths, _stat_all(self.root, self.paths), strict=True):
            digest.update(b"\0" + path.encode() + f"\0{size}\0{mtime_ns}".encode())
        return digest.hexdigest()


def _stat_all(root: Path, paths: tuple[str, ...]) -> list[tuple[int, int]]:
    """``(size, mtime_ns)`` of every image, ``(-1, -1)`` for one that cannot be stat'ed; in threads (network disks)."""

    def stat(path: str) -> tuple[int, int]:
        try:
            info = os.stat(root / path)
        except OSError:
            return -1, -1
        return info.st_size, info.st_mtime_ns

    with ThreadPoolExecutor(max_workers=16, thread_name_prefix="attllm-stat") as pool:
        return list(pool.map(stat, paths, chunksize=256))


def load_image_set(
    folder: str | os.PathLike, convention: str = "auto", coordinates_csv: str | os.PathLike | None = None
) -> ImageSet:
    """Lists a folder's images and reads their locations.

    Args:
        folder: The image folder.
        convention: File-name convention ("auto", "sfxl", "flood"); ignored when ``coordinates_csv`` is given.
        coordinates_csv: Optional CSV ``path,lat,lon`` or ``path,utm_east,utm_north`` (paths relative to folder).

    Returns:
        The image set.

    Raises:
        CoordinateError: naming the first file without coordinates (or missing from the CSV).
        FileNotFoundError: for a missing or empty folder.
    """
    folder = Path(folder)
    paths = list_images(folder)
    if coordinates_csv is not None:
        table = coords.read_coordinates_csv(coordinates_csv)
        missing = [p for p in paths if p not in table]
        if missing:
            raise coords.CoordinateError(
                f"{len(missing)} image(s) of {folder} are not in {coordinates_csv}, first: {missing[0]!r}"
            )
        locations = [table[p] for p in paths]
    else:
        locations = _parse_names(folder, paths, convention)
    return ImageSet(root=folder, paths=tuple(paths), locations=tuple(locations))


_CONVENTION_NAMES = {
    "sfxl": "the SF-XL convention (e.g. @0551294.51@4177187.54@10@S@037.74054@-122.41781@@.jpg)",
    "flood": "the lat/lon convention (e.g. 37.77930_-122.41930@flood.jpg)",
}


def _parse_names(folder: Path, paths: list[str], convention: str) -> list[coords.Location]:
    locations = []
    for index, path in enumerate(paths):
        try:
            locations.append(coords.parse_location(str(folder / path), convention))
        except coords.CoordinateError as error:
            raise coords.CoordinateError(f"{error}{_convention_hint(folder, paths, index, convention)}") from None
    return locations


def _convention_hint(folder: Path, paths: list[str], bad: int, convention: str) -> str:
    """What the other names of the folder suggest about a name that does not parse (the error's second half)."""
    for other in ("sfxl", "flood"):
        if other != convention and _parses(paths[bad], other):
            return f"; it follows {_CONVENTION_NAMES[other]}: use --convention {other} (or auto)"
    sample = [p for i, p in enumerate(paths[:200]) if i != bad]
    votes = {name: sum(_parses(p, name) for p in sample) for name in ("sfxl", "flood")}
    best = max(votes, key=votes.get)
    if not votes[best]:
        return "; give the images such names, or their coordinates in a CSV (--database_csv / --queries_csv)"
    example = next(p for p in sample if _parses(p, best))
    return (
        f"; the other files of {folder} use {_CONVENTION_NAMES[best]} (e.g. {example!r}): rename this file that "
        "way, move it out of the folder, or give coordinates in a CSV (--database_csv / --queries_csv)"
    )


def _parses(path: str, convention: str) -> bool:
    try:
        coords.parse_location(path, convention)
    except coords.CoordinateError:
        return False
    return True


@dataclass(frozen=True)
class GeoPair:
    """Database and query positions in one planar or spherical frame.

    Attributes:
        metric: "utm" (Euclidean metres) or "haversine" (great-circle metres on lat/lon).
        database: ``[N, 2]`` (east, north) or (lat, lon).
        queries: ``[Q, 2]`` same frame.
        zone: The UTM zone used, or None for haversine.
    """

    metric: str
    database: np.ndarray
    queries: np.ndarray
    zone: tuple[int, str] | None


def geo_pair(database: ImageSet, queries: ImageSet, metric: str = "utm") -> GeoPair:
    """Puts database and query locations in one frame for positive search.

    With "utm", lat/lon points are projected into the database's zone (the zone written in the database names, or
    the most common zone of its points), so flood queries named by lat/lon line up with SF-XL UTM names.

    Raises:
        ValueError: for an unknown metric.
        CoordinateError: when the locations cannot be put in that frame.
    """
    if metric == "utm":
        zone = _evaluation_zone(database, queries)
        return GeoPair(
            metric,
            coords.to_utm(database.locations, zone, database.names()),
            coords.to_utm(queries.locations, zone, queries.names()),
            zone,
        )
    if metric == "haversine":
        return GeoPair(
            metric,
            coords.to_latlon(database.locations, database.names()),
            coords.to_latlon(queries.locations, queries.names()),
            None,
        )
    raise ValueError(f"unknown distance metric {metric!r}; expected 'utm' or 'haversine'")


def _evaluation_zone(database: ImageSet, queries: ImageSet) -> tuple[int, str] | None:
    everything = database.locations + queries.locations
    if not any(loc.utm is None or loc.zone is not None for loc in everything):
        return None  # plain UTM everywhere: nothing to project
    try:
        return coords.majority_zone(list(database.locations))
    except coords.CoordinateError:
        return coords.majority_zone(list(queries.locations))
