"""The database's UTM zone and the conversions between UTM metres and WGS84 degrees."""

from __future__ import annotations

import re

import numpy as np
import utm

from attllm_jax.data import coordinates as coords
from attllm_jax.data.dataset import ImageSet


class ZoneUnknownError(coords.CoordinateError):
    """The database positions are plain UTM metres and nothing says which zone they are in."""


def parse_zone(text: str) -> tuple[int, str]:
    """``"10S"`` / ``"10 S"`` -> ``(10, "S")``.

    Raises:
        ValueError: naming the text when it is not a zone number 1-60 and a band letter C-X.
    """
    match = re.fullmatch(r"\s*(\d{1,2})\s*([A-Za-z])\s*", text or "")
    if not match or not 1 <= int(match[1]) <= 60 or match[2].upper() not in coords.UTM_BAND_LETTERS:
        raise ValueError(f"--utm_zone {text!r} is not a UTM zone such as 10S (number 1-60, band letter C-X)")
    return int(match[1]), match[2].upper()


def database_zone(database: ImageSet, utm_zone: str | None = None) -> tuple[int, str]:
    """The zone the database's positions are expressed in: ``--utm_zone``, else the names' (or CSV's) zone fields,
    else the most common zone of their lat/lon.

    Raises:
        ZoneUnknownError: one line naming the folder when none of these is known.
    """
    if utm_zone:
        return parse_zone(utm_zone)
    try:
        return coords.majority_zone(list(database.locations))
    except coords.CoordinateError:
        raise ZoneUnknownError(
            f"database {database.root}: positions are UTM metres without a zone (no @zone@letter@ fields, no lat/lon, "
            "no CSV lat/lon): give --utm_zone, e.g. --utm_zone 10S"
        ) from None


def database_positions(database: ImageSet, zone: tuple[int, str]) -> tuple[np.ndarray, np.ndarray]:
    """``[N, 2]`` UTM metres in ``zone`` and ``[N, 2]`` WGS84 (lat, lon) degrees of every database image."""
    located = [
        loc if loc.utm is None or loc.zone is not None else coords.Location(utm=loc.utm, zone=zone, latlon=loc.latlon)
        for loc in database.locations
    ]
    planar = coords.to_utm(located, zone, database.names())
    return planar, to_latlon(planar, zone)


def to_latlon(planar: np.ndarray, zone: tuple[int, str]) -> np.ndarray:
    """``[N, 2]`` (east, north) metres in ``zone`` -> ``[N, 2]`` (lat, lon) degrees."""
    planar = np.asarray(planar, np.float64).reshape(-1, 2)
    if len(planar) == 0:
        return np.zeros((0, 2))
    lat, lon = utm.to_latlon(planar[:, 0], planar[:, 1], zone[0], zone[1], strict=False)
    return np.stack([np.asarray(lat, np.float64), np.asarray(lon, np.float64)], axis=1)
