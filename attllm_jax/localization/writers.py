"""The map files responders load: GeoJSON (RFC 7946), CSV, KML; and localize_summary.json. All written atomically.

Formats with examples: docs/DESIGN.md section 10.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict
from pathlib import Path
from xml.sax.saxutils import escape

from attllm_jax.files import atomic_write_json, atomic_write_text
from attllm_jax.localization.results import PhotoResult
from attllm_jax.localization.timing import STAGES, percentiles

LATENCY_STAGES = (*STAGES, "llm_call")  # llm_call: empty unless the photo's attention was asked in this run

GEOJSON_FILE, CSV_FILE, KML_FILE, SUMMARY_FILE = (
    "localizations.geojson",
    "localizations.csv",
    "localizations.kml",
    "localize_summary.json",
)
CSV_HEADER = [
    "photo",
    "lat",
    "lon",
    "confidence",
    "confidence_kind",
    "radius_m",
    "top1_path",
    "top1_score",
    "margin",
    "share_within",
    "claimed_lat",
    "claimed_lon",
    "claimed_distance_m",
    "attention",
    *(f"latency_{stage}_s" for stage in LATENCY_STAGES),
    "rerank",
]


def rerank_label(photo: PhotoResult) -> str | None:
    """The query-expansion stage the photo's matches come from (``aqe:k=5,w=0.8``), or None for the plain search."""
    return None if photo.rerank is None else str(photo.rerank["spec"])


def geojson_collection(photos: list[PhotoResult], extra: dict) -> dict:
    """An RFC 7946 FeatureCollection: one Point ``[lon, lat]`` per photo; ``extra`` (alpha, model) in each;
    ``rerank`` is the query-expansion stage of the photo's matches (None: the plain search)."""
    features = []
    for p in photos:
        properties = {
            "photo": p.photo,
            "confidence": p.confidence,
            "confidence_kind": p.confidence_kind,
            "confidence_radius_m": p.confidence_radius_m,
            "radius_m": p.radius_m,
            **p.features,
            "top_k": [{"path": m.path, "lat": m.lat, "lon": m.lon, "score": m.score} for m in p.matches],
            "attention": p.attention,
            "rerank": rerank_label(p),
            "claimed": None
            if p.claimed is None
            else {"lat": p.claimed[0], "lon": p.claimed[1], "distance_m": p.claimed_distance_m},
            **extra,
        }
        geometry = {"type": "Point", "coordinates": [round(p.lon, 8), round(p.lat, 8)]}
        features.append({"type": "Feature", "geometry": geometry, "properties": properties})
    return {"type": "FeatureCollection", "features": features}


def csv_text(photos: list[PhotoResult]) -> str:
    """One row per photo (:data:`CSV_HEADER`); empty cells for unknown values (``rerank``: the plain search)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    for p in photos:
        top = p.matches[0]
        claimed = p.claimed or ("", "")
        writer.writerow(
            [
                p.photo,
                f"{p.lat:.8f}",
                f"{p.lon:.8f}",
                "" if p.confidence is None else f"{p.confidence:.4f}",
                p.confidence_kind,
                f"{p.radius_m:.2f}",
                top.path,
                f"{top.score:.6f}",
                f"{p.features['margin']:.6f}",
                f"{p.features['share_within']:.4f}",
                *claimed,
                "" if p.claimed_distance_m is None else f"{p.claimed_distance_m:.1f}",
                p.attention,
                *(_seconds(p.latency_s.get(stage)) for stage in LATENCY_STAGES),
                rerank_label(p) or "",
            ]
        )
    return buffer.getvalue()


def _seconds(value) -> str:
    return "" if value is None else f"{value:.4f}"


def kml_text(photos: list[PhotoResult]) -> str:
    """A KML 2.2 document with one Placemark per photo (``lon,lat`` coordinates, as KML orders them)."""
    marks = []
    for p in photos:
        confidence = "uncalibrated" if p.confidence is None else f"{p.confidence:.3f}"
        description = (
            f"confidence {confidence} (within {p.confidence_radius_m:g} m); uncertainty radius "
            f"{p.radius_m:.1f} m; top-1 {p.matches[0].path} score {p.matches[0].score:.4f}"
        )
        if p.rerank is not None:
            description += f"; re-ranked {rerank_label(p)}"
        marks.append(
            f"<Placemark><name>{escape(p.photo)}</name><description>{escape(description)}</description>"
            f"<Point><coordinates>{p.lon:.8f},{p.lat:.8f}</coordinates></Point></Placemark>"
        )
    body = "\n".join(marks)
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n<kml xmlns="http://www.opengis.net/kml/2.2"><Document>'
        f"<name>attllm-localize</name>\n{body}\n</Document></kml>\n"
    )


def write_outputs(out: Path, photos: list[PhotoResult], summary: dict, extra: dict) -> None:
    """Writes the GeoJSON, CSV, KML and summary files into ``out``, each atomically."""
    atomic_write_text(out / GEOJSON_FILE, json.dumps(geojson_collection(photos, extra), indent=1))
    atomic_write_text(out / CSV_FILE, csv_text(photos))
    atomic_write_text(out / KML_FILE, kml_text(photos))
    atomic_write_json(out / SUMMARY_FILE, summary)


def summary_dict(run, settings) -> dict:
    """The content of localize_summary.json for a :class:`~attllm_jax.localization.api.LocalizeRun`."""
    latency = {}
    for stage in (*LATENCY_STAGES, "rerank"):  # rerank: --rerank's expansion and second search (inside search)
        summary = percentiles(p.latency_s.get(stage) for p in run.photos)
        if summary is not None:
            latency[stage] = summary
    calibration = None
    if run.calibration is not None:
        calibration = {
            "file": settings.calibration,
            "radius_m": run.calibration.radius_m,
            "estimator": run.calibration.estimator,
            "held_out": run.calibration.quality,
        }
    return {
        "counts": {
            "localized": len(run.photos),
            "computed": run.computed,
            "reused": run.reused,
            "skipped": len(run.skipped),
        },
        "settings_key": run.settings_key,
        "settings": asdict(settings),
        "utm_zone": list(run.zone),
        "confidence": "calibrated" if run.calibration is not None else "uncalibrated",
        "calibration": calibration,
        "latency_per_photo": latency,
        "stage_seconds": {k: round(v, 4) for k, v in run.stage_seconds.items()},
        "attention_run": run.attention,
        "skipped": run.skipped,
    }
