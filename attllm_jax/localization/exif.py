"""The GPS position a photo's EXIF claims (reported beside the estimate, never used in it)."""

from __future__ import annotations

import os

from PIL import Image

GPS_IFD = 0x8825
_LAT_REF, _LAT, _LON_REF, _LON = 1, 2, 3, 4


def _degrees(value) -> float:
    d, m, s = (float(v) for v in value)
    return d + m / 60.0 + s / 3600.0


def read_exif_gps(path: str | os.PathLike) -> tuple[float, float] | None:
    """``(lat, lon)`` WGS84 degrees from the EXIF GPS block of an image, or None when it has none (or a bad one).

    South and west references give negative values; a position outside [-90, 90] x [-180, 180] is ignored.
    """
    try:
        with Image.open(path) as image:
            gps = image.getexif().get_ifd(GPS_IFD)
        if not all(k in gps for k in (_LAT, _LON)):
            return None
        lat, lon = _degrees(gps[_LAT]), _degrees(gps[_LON])
    except (OSError, ValueError, TypeError, ZeroDivisionError, SyntaxError):
        return None
    lat = -lat if str(gps.get(_LAT_REF, "N")).upper().startswith("S") else lat
    lon = -lon if str(gps.get(_LON_REF, "E")).upper().startswith("W") else lon
    return (lat, lon) if -90 <= lat <= 90 and -180 <= lon <= 180 else None
