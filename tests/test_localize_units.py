"""The localization building blocks without a model: estimate, calibration, EXIF, geo, writers."""

import csv
import io
import json
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

import geojson
import numpy as np
import pytest
import utm
from PIL import Image
from PIL.TiffImagePlugin import IFDRational

from attllm_jax.data.coordinates import Location
from attllm_jax.data.dataset import ImageSet
from attllm_jax.localization.calibration import Calibration, calibration_quality, fit_calibration, load_calibration
from attllm_jax.localization.estimate import estimate_position, largest_cluster, ranking_features
from attllm_jax.localization.exif import read_exif_gps
from attllm_jax.localization.geo import ZoneUnknownError, database_zone, parse_zone, to_latlon
from attllm_jax.localization.results import Match, PhotoResult
from attllm_jax.localization.writers import csv_text, geojson_collection, kml_text


def test_top1_estimate_is_the_best_match_and_radius_is_weighted_rms():
    pos = np.array([[0.0, 0.0], [30.0, 0.0], [0.0, 40.0]])
    scores = np.array([0.9, 0.8, 0.7])
    est = estimate_position(pos, scores, "top1")
    assert (est.east, est.north) == (0.0, 0.0)
    w = scores - scores.min() + 1e-6  # [0.2, 0.1, 1e-6]
    expected = np.sqrt((w * np.array([0.0, 900.0, 1600.0])).sum() / w.sum())
    assert est.radius_m == pytest.approx(expected, rel=1e-9)


def test_cluster_estimate_is_weighted_centre_of_the_largest_cluster():
    # rank 1 is alone; ranks 2-4 lie within 20 m of each other: the cluster wins although rank 1 is better.
    pos = np.array([[500.0, 0.0], [0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    scores = np.array([0.95, 0.9, 0.8, 0.6])
    assert largest_cluster(pos, scores, 20.0).tolist() == [1, 2, 3]
    est = estimate_position(pos, scores, "cluster", 20.0)
    w = scores[1:] - 0.6 + 1e-6
    assert est.east == pytest.approx((w * pos[1:, 0]).sum() / w.sum())
    assert est.north == pytest.approx((w * pos[1:, 1]).sum() / w.sum())
    f = ranking_features(pos, scores, est, 25.0)
    assert f["margin"] == pytest.approx(0.05) and f["share_within"] == pytest.approx(0.75)


def _synthetic_calibration_set(n: int, rng: np.random.Generator):
    """Features whose correctness follows a known logistic law in margin and share (top-1 score is noise)."""
    margin = rng.exponential(0.02, n)
    share = rng.uniform(0, 1, n)
    top1 = rng.uniform(0.5, 1.0, n)
    p = 1 / (1 + np.exp(-(-2.0 + 80.0 * margin + 2.0 * share)))
    return np.stack([top1, margin, share], 1), rng.uniform(size=n) < p, p


def test_calibration_is_monotone_in_margin_and_calibrated_on_held_out_queries():
    rng = np.random.default_rng(0)
    x, y, _ = _synthetic_calibration_set(3000, rng)
    cal = fit_calibration(x, y, 25.0, "top1")
    grid = np.stack([np.full(50, 0.8), np.linspace(0, 0.2, 50), np.full(50, 0.5)], 1)
    assert np.all(np.diff(cal.predict(grid)) >= 0)
    assert cal.coef[1] > 0
    # the cross-validated ECE is below 0.05 (3000 queries, 10 bins), and fresh held-out queries agree
    assert cal.quality["ece"] < 0.05, cal.quality
    x2, y2, p2 = _synthetic_calibration_set(3000, rng)
    fresh = calibration_quality(cal.predict(x2), y2)
    assert fresh["ece"] < 0.05 and fresh["auroc"] > 0.7
    assert fresh["brier"] < np.mean((y2.mean() - y2) ** 2)  # better than the base rate
    assert abs(np.mean(cal.predict(x2)) - np.mean(p2)) < 0.03


def test_calibration_drops_a_negative_feature_and_round_trips(tmp_path):
    rng = np.random.default_rng(1)
    x, y, _ = _synthetic_calibration_set(500, rng)
    x[:, 1] = -x[:, 1]  # margin now anti-correlated: its coefficient must be clipped to 0, not negative
    cal = fit_calibration(x, y, 25.0, "top1")
    assert cal.coef[1] == 0.0 and min(cal.coef) >= 0.0
    cal.save(tmp_path / "c.json")
    again = load_calibration(tmp_path / "c.json")
    np.testing.assert_allclose(again.predict(x[:20]), cal.predict(x[:20]))
    (tmp_path / "bad.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="bad.json"):
        load_calibration(tmp_path / "bad.json")


def test_calibration_refuses_a_set_without_both_outcomes():
    with pytest.raises(ValueError, match="both correct and wrong"):
        fit_calibration(np.ones((5, 3)), np.ones(5, bool), 25.0, "top1")


def _rational(value: float):
    d = int(value)
    m = int((value - d) * 60)
    s = round(((value - d) * 60 - m) * 60 * 1000)
    return (IFDRational(d, 1), IFDRational(m, 1), IFDRational(s, 1000))


def _gps_jpeg(path: Path, lat: float, lon: float) -> None:
    image = Image.new("RGB", (40, 30), (100, 120, 140))
    exif = image.getexif()
    gps = exif.get_ifd(0x8825)
    gps.update({1: "S" if lat < 0 else "N", 2: _rational(abs(lat)), 3: "W" if lon < 0 else "E", 4: _rational(abs(lon))})
    image.save(path, format="JPEG", exif=exif)


def test_exif_gps_is_read_from_a_real_jpeg_in_both_hemispheres(tmp_path):
    _gps_jpeg(tmp_path / "rio.jpg", -22.906847, -43.172897)
    _gps_jpeg(tmp_path / "sf.jpg", 37.774929, 122.419416)
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.jpg")
    lat, lon = read_exif_gps(tmp_path / "rio.jpg")
    assert lat == pytest.approx(-22.906847, abs=1e-6) and lon == pytest.approx(-43.172897, abs=1e-6)
    assert read_exif_gps(tmp_path / "sf.jpg") == pytest.approx((37.774929, 122.419416), abs=1e-6)
    assert read_exif_gps(tmp_path / "plain.jpg") is None
    (tmp_path / "junk.jpg").write_bytes(b"not a jpeg")
    assert read_exif_gps(tmp_path / "junk.jpg") is None


def test_zone_from_flag_names_or_a_clear_error(tmp_path):
    assert parse_zone("10S") == (10, "S") and parse_zone(" 23 k ") == (23, "K")
    with pytest.raises(ValueError, match="--utm_zone '61Z'"):
        parse_zone("61Z")
    plain = ImageSet(tmp_path, ("a.jpg",), (Location(utm=(551000.0, 4180000.0)),))
    with pytest.raises(ZoneUnknownError, match="--utm_zone") as error:
        database_zone(plain)
    assert "\n" not in str(error.value)
    assert database_zone(plain, "10S") == (10, "S")
    named = ImageSet(tmp_path, ("a.jpg",), (Location(utm=(551000.0, 4180000.0), zone=(10, "S")),))
    assert database_zone(named) == (10, "S")


def _result(photo: str, lat: float, lon: float) -> PhotoResult:
    match = Match(1, "db/a.jpg", lat, lon, 0.9, 0.0)
    features = {"top1_score": 0.9, "margin": 0.1, "share_within": 1.0}
    return PhotoResult(photo, lat, lon, 5.0, None, "uncalibrated", 25.0, features, (match,), "points")


# Rio de Janeiro (south/west) and Tokyo (north/east): a [lat, lon] swap would be caught by either
CITIES = {"rio.jpg": (-22.906847, -43.172897), "tokyo.jpg": (35.681236, 139.767125)}


def test_geojson_is_rfc7946_with_lon_lat_order_in_both_hemispheres():
    # the positions go through the UTM round trip localize uses (Rio is zone 23K, southern hemisphere)
    photos = []
    for name, (lat, lon) in CITIES.items():
        east, north, number, letter = utm.from_latlon(lat, lon)
        back = to_latlon(np.array([[east, north]]), (number, letter))[0]
        assert back == pytest.approx((lat, lon), abs=1e-7)
        photos.append(_result(name, *back))
    collection = geojson_collection(photos, {"alpha": 0.5})
    parsed = geojson.loads(json.dumps(collection))
    assert parsed.is_valid, parsed.errors()
    for feature in parsed["features"]:
        lon, lat = feature["geometry"]["coordinates"]
        assert (lat, lon) == pytest.approx(CITIES[feature["properties"]["photo"]], abs=1e-7)
        assert feature["properties"]["confidence"] is None
        assert feature["properties"]["confidence_kind"] == "uncalibrated"


def test_kml_parses_with_the_same_coordinates_and_csv_has_a_row_each():
    photos = [_result(name, *latlon) for name, latlon in CITIES.items()]
    root = ET.fromstring(kml_text(photos))
    ns = {"k": "http://www.opengis.net/kml/2.2"}
    marks = root.findall(".//k:Placemark", ns)
    assert len(marks) == 2
    for mark in marks:
        lon, lat = (float(v) for v in mark.find(".//k:coordinates", ns).text.split(","))
        assert (lat, lon) == pytest.approx(CITIES[mark.find("k:name", ns).text], abs=1e-7)
    rows = csv_text(photos).strip().splitlines()
    assert len(rows) == 3 and rows[1].startswith("rio.jpg,-22.90684700,-43.17289700,,uncalibrated")


def test_every_map_file_names_the_rerank_stage_of_a_photos_matches_and_none_for_the_plain_search():
    plain, expanded = _result("rio.jpg", *CITIES["rio.jpg"]), _result("tokyo.jpg", *CITIES["tokyo.jpg"])
    expanded = replace(expanded, rerank={"spec": "aqe:k=5,w=0.8"})
    features = geojson_collection([plain, expanded], {"alpha": 0.5})["features"]
    assert [f["properties"]["rerank"] for f in features] == [None, "aqe:k=5,w=0.8"]
    rows = list(csv.DictReader(io.StringIO(csv_text([plain, expanded]))))
    assert [r["rerank"] for r in rows] == ["", "aqe:k=5,w=0.8"] and [r["photo"] for r in rows] == [
        "rio.jpg",
        "tokyo.jpg",
    ]
    ns = {"k": "http://www.opengis.net/kml/2.2"}
    marks = ET.fromstring(kml_text([plain, expanded])).findall(".//k:Placemark", ns)
    descriptions = [m.find("k:description", ns).text for m in marks]
    assert "re-ranked" not in descriptions[0] and descriptions[1].endswith("; re-ranked aqe:k=5,w=0.8")


def test_calibration_object_predicts_with_standardized_features():
    cal = Calibration((1.0, 0.0, 0.0), (2.0, 1.0, 1.0), (1.0, 0.0, 0.0), 0.0, 25.0, "top1", {})
    assert cal.predict(np.array([[3.0, 9.0, 9.0]]))[0] == pytest.approx(1 / (1 + np.exp(-1.0)))


@pytest.mark.skipif(not Path("/usr/bin/chromium").is_file(), reason="Debian chromium is not installed (.ci/run does)")
def test_report_of_southern_photos_loads_in_chromium_without_errors_or_requests(tmp_path):
    from attllm_jax.localization.report import report_html
    from tests.browser import open_page

    lat0, lon0 = CITIES["rio.jpg"]
    photos = [_result(f"p{i}.jpg", lat0 + 1e-4 * i, lon0 - 1e-4 * i) for i in range(3)]
    database = np.array([[lat0 + 5e-5 * k, lon0 - 5e-5 * k] for k in range(10)])
    Image.new("RGB", (60, 40), (90, 100, 110)).save(tmp_path / "p0.jpg")
    from attllm_jax.localization.report import photo_images

    pictures = photo_images(str(tmp_path), ["p0.jpg"], None, 0.2)
    page = tmp_path / "report.html"
    page.write_text(report_html(photos, database, pictures, "t", None), encoding="utf-8")
    assert "http://" not in page.read_text().replace("http://www.w3.org/2000/svg", "")
    report = open_page(
        page,
        {
            "markers": "document.querySelectorAll('#estimates .marker').length",
            "db": "document.querySelectorAll('#database circle').length",
        },
    )
    assert report.errors == [] and report.requests == [], report
    assert report.values == {"markers": 3, "db": 10}
