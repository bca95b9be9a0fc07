"""File-name coordinates (SF-XL and flood-query conventions), CSVs, image listing and UTM projection."""

import re
from pathlib import Path

import numpy as np
import pytest
import utm
from PIL import Image

from attllm_jax.data import coordinates as coords
from attllm_jax.data.dataset import PathListError, geo_pair, list_images, load_image_set

SFXL = "@0543331.40@4179325.38@10@S@037.76022@-122.50806@ZyN9pEGJ5bFf0QOXYZW9lQ@@300@@@@201311@@.jpg"
SFXL_DB = "@0551294.51@4177187.54@10@S@037.74054@-122.41781@6ndRH0-kf_BJq0ZASDu5ZQ@@300@@@@201311@@.jpg"


def test_sfxl_name_reads_utm_zone_and_latlon():
    loc = coords.parse_location(SFXL)
    assert loc.utm == (543331.40, 4179325.38)
    assert loc.zone == (10, "S")
    assert loc.latlon == (37.76022, -122.50806)


def test_sfxl_minimal_name_and_uppercase_extension():
    loc = coords.parse_location("/db/@554123.40@4178231.50@@@@@.JPG")
    assert loc.utm == (554123.40, 4178231.50)
    assert loc.zone is None and loc.latlon is None


def test_directories_with_at_signs_are_ignored():
    path = f"/data/sf@xl/@12@34@/{SFXL_DB}"
    assert coords.parse_location(path).utm == (551294.51, 4177187.54)
    flood = "/q/@flood@2023@/37.748316719_-122.410546068@2014-08_cleaned_2.JPEG"
    assert coords.parse_location(flood).latlon == (37.748316719, -122.410546068)


@pytest.mark.parametrize(
    ("name", "latlon"),
    [
        ("37.748316719_-122.410546068@2014-08_cleaned_2.jpg", (37.748316719, -122.410546068)),
        ("Nathan Rd 623&Shantung St%22.317515_114.169682_1.jpg", (22.317515, 114.169682)),
        (
            "ABERDEEN TUNNEL_33%22.25640850710279_114.1799050738104@2023-07@60@210.0@-12.0@2048x4096.PNG",
            (22.25640850710279, 114.1799050738104),
        ),
        ("__x9FdRdkfGBozPCf9C-ag%35.653654_139.692150@NA@NA@NA@381610.02@3946322.40@000.png", (35.653654, 139.69215)),
        ("-33.8688_151.2093@sydney.jpeg", (-33.8688, 151.2093)),
    ],
)
def test_flood_names(name, latlon):
    loc = coords.parse_location(name)
    assert loc.latlon == pytest.approx(latlon, abs=0)
    assert loc.utm is None


@pytest.mark.parametrize("name", ["IMG_0042.jpg", "flood_photo@2023.jpg", "95.0_10.0@x.jpg", "@abc@def@.jpg", "x.jpg"])
def test_name_without_coordinates_is_an_error_naming_the_file(name):
    with pytest.raises(coords.CoordinateError, match=name.replace(".", r"\.")):
        coords.parse_location(f"/some/dir/{name}")


def test_explicit_convention_and_unknown_convention():
    with pytest.raises(coords.CoordinateError):
        coords.parse_location(SFXL, "flood")
    with pytest.raises(ValueError, match="unknown coordinate convention"):
        coords.parse_location(SFXL, "gps")


def test_utm_projection_matches_the_sfxl_name():
    # SF-XL names were made with utm.from_latlon: projecting the name's lat/lon gives its east/north back.
    lat_only = coords.Location(latlon=(37.76022, -122.50806))
    xy = coords.to_utm([lat_only], (10, "S"))
    np.testing.assert_allclose(xy[0], [543331.40, 4179325.38], atol=0.01)


def test_to_utm_forces_one_zone_across_a_border():
    # lon -120.01 is in zone 10, lon -119.99 in zone 11: both projected into zone 10 stay ~1.8 km apart.
    locs = [coords.Location(latlon=(37.0, -120.01)), coords.Location(latlon=(37.0, -119.99))]
    xy = coords.to_utm(locs, (10, "S"))
    assert np.hypot(*(xy[1] - xy[0])) == pytest.approx(1779.0, rel=0.01)
    assert utm.from_latlon(37.0, -119.99)[2] == 11


def test_to_latlon_recovers_from_utm_with_zone():
    loc = coords.parse_location("@543331.40@4179325.38@10@S@@@.jpg")
    np.testing.assert_allclose(coords.to_latlon([loc])[0], [37.76022, -122.50806], atol=1e-6)
    with pytest.raises(coords.CoordinateError, match="without a zone"):
        coords.to_latlon([coords.Location(utm=(1.0, 2.0))])


def _touch_jpeg(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), (10, 20, 30)).save(path, format="JPEG")


def test_list_images_is_recursive_sorted_and_case_insensitive(tmp_path):
    root = tmp_path / "db@set"
    for name in ["b/@2@2@.JPG", "a/@1@1@.jpeg", "@0@0@.png", "notes.txt", "c/@3@3@.Jpg"]:
        _touch_jpeg(root / name) if not name.endswith(".txt") else (root / name).write_text("x")
    assert list_images(root) == ["@0@0@.png", "a/@1@1@.jpeg", "b/@2@2@.JPG", "c/@3@3@.Jpg"]


def test_list_images_reads_the_paths_file_beside_the_folder(tmp_path):
    root = tmp_path / "database"
    _touch_jpeg(root / "x" / "@5@5@.jpg")
    _touch_jpeg(root / "@6@6@.jpg")
    (tmp_path / "database_images_paths.txt").write_text("x/@5@5@.jpg\n\n./@6@6@.jpg\n")
    assert list_images(root) == ["x/@5@5@.jpg", "@6@6@.jpg"]
    (tmp_path / "database_images_paths.txt").write_text("missing/@7@7@.jpg\n")
    with pytest.raises(FileNotFoundError, match="missing/@7@7@.jpg"):
        list_images(root)


def test_list_images_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_images(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .jpg"):
        list_images(tmp_path / "empty")


def test_coordinates_csv_latlon_and_utm(tmp_path):
    root = tmp_path / "q"
    _touch_jpeg(root / "one.jpg")
    _touch_jpeg(root / "sub" / "two.jpg")
    csv_path = tmp_path / "coords.csv"
    csv_path.write_text("Path,Lat,Lon\none.jpg,37.7,-122.4\nsub/two.jpg,37.8,-122.5\n")
    images = load_image_set(root, coordinates_csv=csv_path)
    assert [loc.latlon for loc in images.locations] == [(37.7, -122.4), (37.8, -122.5)]
    csv_path.write_text("path,utm_east,utm_north\none.jpg,551294.5,4177187.5\n")
    with pytest.raises(coords.CoordinateError, match="sub/two.jpg"):
        load_image_set(root, coordinates_csv=csv_path)
    csv_path.write_text("path,x,y\none.jpg,1,2\n")
    with pytest.raises(coords.CoordinateError, match="lat,lon or utm_east,utm_north"):
        coords.read_coordinates_csv(csv_path)
    csv_path.write_text("path,lat,lon\none.jpg,99,2\n")
    with pytest.raises(coords.CoordinateError, match=":2: bad coordinates"):
        coords.read_coordinates_csv(csv_path)


def test_folder_with_an_unnamed_image_fails_naming_it(tmp_path):
    _touch_jpeg(tmp_path / "db" / SFXL_DB)
    _touch_jpeg(tmp_path / "db" / "holiday.jpg")
    with pytest.raises(coords.CoordinateError, match="holiday.jpg"):
        load_image_set(tmp_path / "db")


def test_geo_pair_projects_flood_queries_into_the_database_zone(tmp_path):
    _touch_jpeg(tmp_path / "db" / SFXL)
    _touch_jpeg(tmp_path / "q" / "37.76022_-122.50806@x.jpg")
    pair = geo_pair(load_image_set(tmp_path / "db"), load_image_set(tmp_path / "q"))
    assert pair.zone == (10, "S")
    np.testing.assert_allclose(pair.queries[0], pair.database[0], atol=0.01)
    hav = geo_pair(load_image_set(tmp_path / "db"), load_image_set(tmp_path / "q"), "haversine")
    np.testing.assert_allclose(hav.queries, hav.database)
    with pytest.raises(ValueError, match="unknown distance metric"):
        geo_pair(load_image_set(tmp_path / "db"), load_image_set(tmp_path / "q"), "manhattan")


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("../outside/@5@5@.jpg", "outside the image folder"),
        ("x/../../outside.jpg", "outside the image folder"),
        ("/etc/passwd", "outside the image folder"),
        ("C:/images/a.jpg", "outside the image folder"),
        ("./x/@5@5@.jpg", r"repeats line 1"),
        ("x/sub/../@5@5@.jpg", r"repeats line 1"),
    ],
)
def test_paths_file_refuses_entries_outside_the_folder_and_duplicates(tmp_path, entry, message):
    root = tmp_path / "database"
    _touch_jpeg(root / "x" / "@5@5@.jpg")
    _touch_jpeg(tmp_path / "outside" / "@5@5@.jpg")
    (tmp_path / "database_images_paths.txt").write_text(f"x/@5@5@.jpg\n\n{entry}\n")
    with pytest.raises(PathListError, match=rf"database_images_paths.txt:3: .*{message}"):
        list_images(root)


def test_paths_file_entries_are_normalized(tmp_path):
    root = tmp_path / "database"
    _touch_jpeg(root / "x" / "@5@5@.jpg")
    _touch_jpeg(root / "@6@6@.jpg")
    (tmp_path / "database_images_paths.txt").write_text("x/./@5@5@.jpg\nx\\..\\@6@6@.jpg\n")
    assert list_images(root) == ["x/@5@5@.jpg", "@6@6@.jpg"]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("@543331.40@4179325.38@99@S@@@.jpg", "zone '99' 'S'"),
        ("@543331.40@4179325.38@10@I@@@.jpg", "zone '10' 'I'"),
        ("@543331.40@4179325.38@0@S@@@.jpg", "zone '0' 'S'"),
        ("@543331.40@4179325.38@61@n@@@.jpg", "zone '61' 'n'"),
        ("@1e12@4179325.38@10@S@@@.jpg", "easting 1e\\+12 m is outside"),
        ("@50000@4179325.38@@@@@.jpg", "easting 50000 m is outside"),
        ("@543331.40@-5@10@S@@@.jpg", "northing -5 m is outside"),
        ("@543331.40@2e7@@@.jpg", "northing 2e\\+07 m is outside"),
    ],
)
def test_sfxl_names_outside_the_utm_ranges_are_errors_naming_the_file(name, message):
    with pytest.raises(coords.CoordinateError, match=re.escape(name) + f"'?: .*{message}"):
        coords.parse_location(f"/db/{name}")


def test_csv_utm_outside_the_ranges_is_an_error_naming_the_row(tmp_path):
    csv_path = tmp_path / "coords.csv"
    csv_path.write_text("path,utm_east,utm_north\none.jpg,551294.5,4177187.5\ntwo.jpg,1e12,4177187.5\n")
    with pytest.raises(coords.CoordinateError, match=r":3: bad coordinates for 'two.jpg': easting"):
        coords.read_coordinates_csv(csv_path)


def test_a_folder_of_zone_99_names_fails_naming_a_file_not_in_utm(tmp_path):
    _touch_jpeg(tmp_path / "db" / "@551294.51@4177187.54@99@S@@@.jpg")
    _touch_jpeg(tmp_path / "q" / "37.76022_-122.50806@x.jpg")
    with pytest.raises(coords.CoordinateError, match=r"@551294.51@4177187.54@99@S@@@.jpg.*zone '99'"):
        geo_pair(load_image_set(tmp_path / "db"), load_image_set(tmp_path / "q"))


def test_one_file_in_another_zone_without_latlon_is_named(tmp_path):
    for name in (SFXL_DB, SFXL, "@551294.51@4177187.54@10@S@@@.jpg"):
        _touch_jpeg(tmp_path / "db" / name)
    other = "@0551300.00@4177200.00@11@S@@@.jpg"
    _touch_jpeg(tmp_path / "db" / other)
    _touch_jpeg(tmp_path / "q" / "37.76022_-122.50806@x.jpg")
    with pytest.raises(coords.CoordinateError, match=rf"db/{other}' is in UTM zone 11S .* uses zone 10S"):
        geo_pair(load_image_set(tmp_path / "db"), load_image_set(tmp_path / "q"))
    with pytest.raises(coords.CoordinateError, match=r"'/a/b.jpg' has UTM coordinates without a zone"):
        coords.to_latlon([coords.Location(utm=(551294.0, 4177187.0))], ["/a/b.jpg"])


def test_a_bad_name_in_an_sfxl_folder_suggests_the_sfxl_convention(tmp_path):
    _touch_jpeg(tmp_path / "db" / SFXL_DB)
    _touch_jpeg(tmp_path / "db" / SFXL)
    _touch_jpeg(tmp_path / "db" / "IMG_1234.jpg")
    with pytest.raises(coords.CoordinateError, match=r"IMG_1234.jpg.*other files of .* use the SF-XL convention"):
        load_image_set(tmp_path / "db")
    _touch_jpeg(tmp_path / "q" / "37.76022_-122.50806@x.jpg")
    with pytest.raises(coords.CoordinateError, match=r"follows the lat/lon convention .* --convention flood"):
        load_image_set(tmp_path / "q", convention="sfxl")
    (tmp_path / "db" / "IMG_1234.jpg").unlink()
    with pytest.raises(coords.CoordinateError, match=r"follows the SF-XL convention .* --convention sfxl"):
        load_image_set(tmp_path / "db", convention="flood")


@pytest.mark.parametrize(
    ("name", "zone", "latlon"),
    [
        # the full 15-field SF-XL form, zone claim valid
        (SFXL, (10, "S"), (37.76022, -122.50806)),
        (
            "@0543331.40@4179325.38@10@s@037.76022@-122.50806@pano@@300@@@@201311@@.jpg",
            (10, "S"),
            (37.76022, -122.50806),
        ),
        # the full form with the zone fields empty
        ("@0543331.40@4179325.38@@@037.76022@-122.50806@pano@@300@@@@201311@@.jpg", None, (37.76022, -122.50806)),
        # the short form with free text after the northing: never a zone
        ("@550408.00@4180244.00@db7@.jpg", None, None),
        ("@550408.00@4180244.00@0001@.jpg", None, None),
        ("@550408.00@4180244.00@street view 3@.jpg", None, None),
        ("@550408.00@4180244.00@IMG_0042@copy@.jpg", None, None),
        ("@550408.00@4180244.00@2023-07-01@10:32@.jpg", None, None),
        ("@550408.00@4180244.00@10@@@@.jpg", None, None),
        ("@550408.00@4180244.00@10@SS@.jpg", None, None),
        ("@550408.00@4180244.00@S@10@.jpg", None, None),
        ("@550408.00@4180244.00@.jpg", None, None),
    ],
)
def test_zone_fields_are_a_zone_only_when_they_look_like_one(name, zone, latlon):
    loc = coords.parse_location(f"/db/{name}")
    assert loc.utm == (float(name.split("@")[1]), float(name.split("@")[2]))
    assert loc.zone == zone
    assert loc.latlon == latlon


def test_short_form_database_evaluates_against_flood_queries_in_its_zone(tmp_path):
    # free-text names carry no zone; the zone is computed from the queries' lat/lon (10S for San Francisco)
    _touch_jpeg(tmp_path / "db" / "@543331.40@4179325.38@db7@.jpg")
    _touch_jpeg(tmp_path / "q" / "37.76022_-122.50806@x.jpg")
    pair = geo_pair(load_image_set(tmp_path / "db"), load_image_set(tmp_path / "q"))
    np.testing.assert_allclose(pair.queries[0], pair.database[0], atol=0.01)
