"""The typed per-photo result of localization, and its JSON form (one file per photo under ``OUT/photos``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Match:
    """One database candidate of a photo.

    Attributes:
        rank: 1-based rank.
        path: Database image path relative to the database folder.
        lat: WGS84 latitude, degrees.
        lon: WGS84 longitude, degrees.
        score: Descriptor similarity (inner product of L2-normalized descriptors).
        distance_m: Metres from the photo's estimate.
    """

    rank: int
    path: str
    lat: float
    lon: float
    score: float
    distance_m: float


@dataclass(frozen=True)
class PhotoResult:
    """Where one photo was taken, as far as the database and the model can tell.

    Attributes:
        photo: Path relative to the images folder.
        lat: Estimated WGS84 latitude, degrees.
        lon: Estimated WGS84 longitude, degrees.
        radius_m: Uncertainty radius in metres (estimate.py).
        confidence: P(estimate within ``confidence_radius_m`` of the truth), or None without a calibration.
        confidence_kind: "calibrated" or "uncalibrated".
        confidence_radius_m: The radius the confidence refers to.
        features: ``top1_score``, ``margin``, ``share_within`` (calibration.FEATURES).
        matches: The top-K database candidates, best first.
        attention: The attention kind applied ("points", "grid") or why none ("none", "invalid", "missing").
        claimed: ``(lat, lon)`` from the photo's EXIF GPS, or None; never used in the estimate.
        claimed_distance_m: Metres from the claimed position to the estimate, or None.
        latency_s: Seconds per stage for this photo (a batch's stage time divided by its photos).
        settings_key: The settings key the result was computed under (reruns skip matching photos).
        rerank: ``{"spec": "aqe:k=5,w=0.8"}`` when the matches come from a query-expansion search, else None.
    """

    photo: str
    lat: float
    lon: float
    radius_m: float
    confidence: float | None
    confidence_kind: str
    confidence_radius_m: float
    features: dict
    matches: tuple[Match, ...]
    attention: str
    claimed: tuple[float, float] | None = None
    claimed_distance_m: float | None = None
    latency_s: dict = field(default_factory=dict)
    settings_key: str = ""
    rerank: dict | None = None

    def to_dict(self) -> dict:
        """The JSON form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PhotoResult:
        """Inverse of :meth:`to_dict`."""
        claimed = tuple(data["claimed"]) if data.get("claimed") is not None else None
        matches = tuple(Match(**m) for m in data["matches"])
        return cls(**{**data, "matches": matches, "claimed": claimed})
