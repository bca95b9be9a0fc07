"""The one image opener: refusals before decoding (size, file kind, folder), 8-bit conversion, EXIF orientation."""

import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from attllm_jax.data.images import ImageTooLargeError, NotRegularFileError, OutsideFolderError, open_image
from attllm_jax.data.loading import read_image
from attllm_jax.data.preprocess import PreprocessSpec, output_size, preprocess_image
from tests.bounded import PEAK_RSS, run_bounded

GIB = 1 << 30
SPEC = PreprocessSpec.shorter_side(512)


def _raw_png(width: int, height: int, rows: bytes, bit_depth: int = 8, colour_type: int = 2) -> bytes:
    """A PNG file built by hand, so that its header can state any size whatever the data holds."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


LOAD_TALL = (
    PEAK_RSS
    + """
import sys
from attllm_jax.data.loading import load_batches
from attllm_jax.data.preprocess import PreprocessSpec, output_size, preprocess_image
spec = PreprocessSpec.shorter_side(512)
failures = []
batches = list(load_batches(
    [(0, sys.argv[1]), (1, sys.argv[2]), (2, sys.argv[3])], lambda image: preprocess_image(image, spec), 8,
    failures.append, num_workers=2, output_size=lambda w, h: output_size(w, h, spec),
))
report({"failures": [[f.index, f.error] for f in failures], "batches": [b.indices.tolist() for b in batches]})
"""
)


def test_a_tall_png_is_refused_from_its_header_under_a_bounded_address_space(tmp_path):
    normal, tall, liar = tmp_path / "normal.png", tmp_path / "tall.png", tmp_path / "liar.png"
    Image.new("RGB", (640, 480), (100, 100, 100)).save(normal)
    # 20 x 100000: 2 Mpx as stored, 512 x 2,560,000 once resized (3.9 GB as uint8, 15.7 GB as float32)
    Image.new("RGB", (20, 100_000), (90, 90, 90)).save(tall)
    liar.write_bytes(_raw_png(12_000, 8_000, b"\x00" * 64))  # the header claims 96 Mpx; the data holds nothing
    result = run_bounded(LOAD_TALL, str(normal), str(tall), str(liar), address_space=GIB)
    errors = dict(result["failures"])
    assert sorted(errors) == [1, 2]
    assert errors[1].startswith("ImageTooLargeError: preprocessed to 512x2560000 pixels from 20x100000")
    assert errors[2].startswith("ImageTooLargeError:") and "12000x8000" in errors[2] and "before decoding" in errors[2]
    assert result["batches"] == [[0, -1, -1, -1, -1, -1, -1, -1]]
    assert result["peak_rss_mb"] < 300, result


def test_the_size_check_runs_before_decoding_and_a_truncated_file_stays_an_error(tmp_path):
    tall = tmp_path / "tall.png"
    Image.new("RGB", (20, 100_000), (90, 90, 90)).save(tall)
    seen = []

    def preprocess(image):
        seen.append(image.size)
        return preprocess_image(image, SPEC)

    with pytest.raises(ImageTooLargeError, match="512x2560000"):
        read_image(tall, preprocess, 8 * 2**20, lambda w, h: output_size(w, h, SPEC))
    assert seen == []  # refused before preprocess was called
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(_raw_png(640, 480, b"\x00" * 2000))  # 2000 bytes of rows for a 640 x 480 header
    with pytest.raises(OSError):
        open_image(truncated)
    with pytest.raises(ImageTooLargeError, match="640x480"):
        open_image(truncated, max_pixels=640 * 480 - 1)


def test_flood_annotate_and_figures_refuse_an_oversized_header_before_decoding(tmp_path):
    from attllm_jax.attention.overlay import load_photo
    from attllm_jax.data.flood import flood_folder, procedural_method
    from attllm_jax.evaluation.figures import _thumbnail

    dry = tmp_path / "dry"
    dry.mkdir()
    Image.new("RGB", (64, 48), (120, 130, 140)).save(dry / "37.1_-122.1@ok.png")
    liar = dry / "37.2_-122.2@liar.png"
    liar.write_bytes(_raw_png(12_000, 8_000, b"\x00" * 64))  # 96 Mpx claimed: above MAX_SOURCE_PIXELS
    summary = flood_folder(dry, tmp_path / "out", [0.3], procedural_method(0), method_name="procedural", seed=0)
    assert summary["num_unreadable_images"] == 1 and summary["counts"]["level_0.3"]["written"] == 1
    [failure] = summary["failures"]
    assert failure["image"] == liar.name and "12000x8000" in failure["error"] and "before decoding" in failure["error"]
    with pytest.raises(ValueError, match="12000x8000 pixels .* refused before decoding"):
        load_photo(liar)  # annotate's and show_attention's loader
    assert _thumbnail(liar, 40).getpixel((0, 0)) == (128, 128, 128)  # the prediction strip's grey tile


def _sixteen_bit_grey(path, byte_order: str = "<") -> np.ndarray:
    """Writes a 16-bit greyscale image (a ramp over the whole 0..65535 range); returns its uint16 values."""
    values = np.linspace(0, 65535, 48 * 64).round().astype(np.uint16).reshape(48, 64)
    Image.fromarray(values.astype(f"{byte_order}u2")).save(path)
    return values


@pytest.mark.parametrize(("name", "byte_order"), [("grey16.png", "<"), ("grey16.tif", ">")])
def test_sixteen_bit_grey_is_scaled_to_eight_bits_in_every_loader(tmp_path, name, byte_order):
    from attllm_jax.attention.overlay import load_photo
    from attllm_jax.data.flood import read_rgb

    path = tmp_path / name
    values = _sixteen_bit_grey(path, byte_order)
    with Image.open(path) as image:
        assert image.mode.startswith("I;16")  # what PIL makes of it, and what convert("RGB") clips to white
    expected = np.repeat(np.round(values / 257.0).astype(np.uint8)[..., None], 3, axis=-1)
    assert expected.min() == 0 and expected.max() == 255 and len(np.unique(expected)) == 256
    for loader in (open_image, read_rgb, load_photo):  # eval / localize, flood, annotate
        np.testing.assert_array_equal(np.asarray(loader(path)), expected)
    model_input = read_image(path, lambda image: np.asarray(image, np.float32))
    np.testing.assert_array_equal(model_input, expected.astype(np.float32))


def test_sixteen_bit_rgb_keeps_its_high_byte_and_float_images_are_refused(tmp_path):
    rows = b"".join(b"\x00" + struct.pack(">HHH", 30000, 1000, 65535) * 2 for _ in range(2))
    (tmp_path / "rgb16.png").write_bytes(_raw_png(2, 2, rows, bit_depth=16, colour_type=2))
    assert np.asarray(open_image(tmp_path / "rgb16.png"))[0, 0].tolist() == [117, 3, 255]  # 30000 >> 8 = 117
    Image.fromarray(np.full((4, 4), 0.5, np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(ValueError, match="pixel mode 'F'"):
        open_image(tmp_path / "float.tif")


def _upright_photo(width: int = 96, height: int = 64) -> Image.Image:
    """Red sky in the top half, blue water at the bottom, a green post at the left: any flip or turn shows."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[: height // 2] = (220, 40, 40)
    pixels[height // 2 :] = (40, 40, 220)
    pixels[:, : width // 6] = (40, 200, 40)
    return Image.fromarray(pixels)


# EXIF orientation o: how the stored pixels relate to the upright photo (each is undone by its own transpose but 6/8)
_STORED = {2: 2, 3: 3, 4: 4, 5: 5, 6: 8, 7: 7, 8: 6}


def _tagged_jpeg(path, orientation: int, upright: Image.Image) -> None:
    """Stores ``upright`` turned as a camera would, as a JPEG whose EXIF orientation tag says how to show it."""
    from attllm_jax.data.images import _TRANSPOSE

    exif = Image.Exif()
    exif[0x0112] = orientation
    upright.transpose(_TRANSPOSE[_STORED[orientation]]).save(path, format="JPEG", quality=95, exif=exif)


@pytest.mark.parametrize("orientation", range(2, 9))
def test_exif_orientation_is_applied_by_every_loader(tmp_path, orientation):
    from attllm_jax.attention.overlay import load_photo
    from attllm_jax.data.flood import read_rgb
    from attllm_jax.evaluation.figures import _thumbnail

    upright = _upright_photo()
    path = tmp_path / "phone.jpg"
    _tagged_jpeg(path, orientation, upright)
    with Image.open(path) as stored:
        assert stored.getexif()[0x0112] == orientation
    expected = np.asarray(upright, np.float32)
    sizes = []
    for loader in (lambda p: open_image(p, check_size=lambda w, h: sizes.append((w, h))), read_rgb, load_photo):
        pixels = np.asarray(loader(path), np.float32)
        assert pixels.shape == expected.shape and np.abs(pixels - expected).mean() < 4.0
    assert sizes == [upright.size]  # the size checks see the displayed size
    model_input = read_image(path, lambda image: np.asarray(image, np.float32), 10**6, lambda w, h: (w, h))
    assert model_input.shape == expected.shape and np.abs(model_input - expected).mean() < 4.0
    thumbnail = np.asarray(_thumbnail(path, 32), np.float32)  # the prediction strips
    assert thumbnail.shape == (32, 48, 3) and np.abs(thumbnail - np.asarray(upright.resize((48, 32)))).mean() < 8


def test_flood_writes_the_upright_pixels_without_a_tag_and_water_along_the_bottom(tmp_path):
    from attllm_jax.attention.masks import read_mask
    from attllm_jax.data.flood import flood_folder, procedural_method

    dry = tmp_path / "dry"
    dry.mkdir()
    upright = _upright_photo(160, 120)
    _tagged_jpeg(dry / "37.1_-122.1@phone.jpg", 6, upright)  # stored 120 wide, 160 tall
    out = tmp_path / "out"
    summary = flood_folder(dry, out, [0.3], procedural_method(0), method_name="procedural", seed=0)
    assert summary["counts"]["level_0.3"]["written"] == 1
    with Image.open(out / "level_0.3" / "37.1_-122.1@phone.jpg") as flooded:
        assert flooded.getexif().get(0x0112) is None and flooded.size == (160, 120)  # displays as stored: upright
        top = np.asarray(flooded.convert("RGB"), np.float32)[:20, 40:]
    assert np.abs(top - (220, 40, 40)).mean() < 8  # the sky stays on top
    mask = read_mask(out / "masks" / "level_0.3" / "37.1_-122.1@phone.png")
    assert mask.shape == (120, 160) and mask[-5:].mean() > 0.9 and mask[:60].mean() == 0.0


def test_fifos_and_folders_named_like_images_are_refused_by_every_loader(tmp_path):
    from attllm_jax.attention.overlay import load_photo
    from attllm_jax.data.flood import read_rgb

    fifo, folder = tmp_path / "pipe.jpg", tmp_path / "folder.jpg"
    os.mkfifo(fifo)
    folder.mkdir()
    for loader in (open_image, read_rgb, load_photo, lambda p: read_image(p, np.asarray)):
        with pytest.raises(NotRegularFileError, match="pipe.jpg is a FIFO, not a regular file"):
            loader(fifo)
        with pytest.raises(NotRegularFileError, match="folder.jpg is a folder"):
            loader(folder)


def test_symlinks_may_point_inside_the_folder_only(tmp_path):
    from attllm_jax.attention.overlay import load_photo
    from attllm_jax.data.flood import read_rgb

    folder, elsewhere = tmp_path / "images", tmp_path / "elsewhere"
    (folder / "sub").mkdir(parents=True)
    elsewhere.mkdir()
    Image.new("RGB", (8, 6), (10, 20, 30)).save(folder / "sub" / "real.png")
    Image.new("RGB", (8, 6), (200, 0, 0)).save(elsewhere / "secret.png")
    (folder / "alias.png").symlink_to(folder / "sub" / "real.png")  # inside: read
    (folder / "out.png").symlink_to(elsewhere / "secret.png")  # a file link leaving the folder
    (folder / "linked").symlink_to(elsewhere, target_is_directory=True)  # a folder link leaving it
    (tmp_path / "images_link").symlink_to(folder, target_is_directory=True)  # the folder itself may be a link
    loaders = (
        lambda p, root: open_image(p, root=root),
        lambda p, root: read_rgb(p, root=root),  # flood
        lambda p, root: load_photo(p, root=root),  # annotate, show_attention
        lambda p, root: read_image(p, np.asarray, root=root).astype(np.uint8),  # eval, localize
    )
    for load in loaders:
        assert np.asarray(load(folder / "alias.png", folder))[0, 0].tolist() == [10, 20, 30]
        assert np.asarray(load(tmp_path / "images_link" / "alias.png", tmp_path / "images_link")).shape == (6, 8, 3)
        for outside in (folder / "out.png", folder / "linked" / "secret.png"):
            with pytest.raises(OutsideFolderError, match=f"resolves to {elsewhere / 'secret.png'}, outside {folder}"):
                load(outside, folder)


def test_annotate_and_flood_count_a_symlink_out_of_the_images_folder(tmp_path):
    from attllm_jax.attention import prompts, providers, runner
    from attllm_jax.data.flood import flood_folder, procedural_method
    from tests.llm_server import LLMServer, id_photo, text_reply

    images, elsewhere = tmp_path / "images", tmp_path / "elsewhere"
    images.mkdir()
    elsewhere.mkdir()
    id_photo(1).save(images / "37.1_-122.1@q1.jpg")
    id_photo(2).save(elsewhere / "private.jpg")
    (images / "37.2_-122.2@q2.jpg").symlink_to(elsewhere / "private.jpg")
    answer = '[{"center": [0.3, 0.6], "weight": 1.8, "reasoning": "tower"}]'
    with LLMServer(lambda seen: text_reply(seen, answer)) as server:
        provider = providers.GeminiProvider(api_key="k" * 39, base_url=server.url, timeout_s=5.0)
        config = runner.RunConfig(city="San Francisco", prompt=prompts.get_prompt("axis_focus"), workers=1)
        summary = runner.annotate_folder(images, tmp_path / "att", provider, config)
        assert [seen.image_id() for seen in server.seen] == [1]  # the outside photo was never sent
    assert (summary.valid, summary.failed) == (1, 1)
    assert summary.failures[0]["image"] == "37.2_-122.2@q2.jpg" and "resolves to" in summary.failures[0]["error"]
    flooded = flood_folder(images, tmp_path / "wet", [0.3], procedural_method(0), method_name="procedural", seed=0)
    assert flooded["num_unreadable_images"] == 1 and flooded["counts"]["level_0.3"]["written"] == 1
    assert f"resolves to {elsewhere / 'private.jpg'}, outside {images}" in flooded["failures"][0]["error"]


def test_read_model_input_is_what_the_evaluation_feeds_the_model(tmp_path):
    from attllm_jax.data.loading import read_model_input
    from attllm_jax.evaluation import random_cosplace_model

    model = random_cosplace_model(seed=0)
    photo = tmp_path / "phone.jpg"
    _tagged_jpeg(photo, 6, _upright_photo(96, 64))
    with Image.open(photo) as stored:
        upright = stored.convert("RGB").transpose(Image.Transpose.ROTATE_270)
    np.testing.assert_array_equal(read_model_input(photo, model, 64), model.preprocess(upright, image_size=64))
    tall = tmp_path / "tall.png"
    Image.new("RGB", (20, 100_000), (90, 90, 90)).save(tall)
    with pytest.raises(ImageTooLargeError, match=r"preprocessed to 512x2560000 pixels from 20x100000"):
        read_model_input(tall, model)


def test_an_edited_image_claiming_a_huge_size_is_refused_before_decoding(monkeypatch):
    import base64

    from attllm_jax.attention.providers.gemini_image_edit import GeminiImageEditor
    from attllm_jax.attention.request_policy import ProviderError, RetryPolicy
    from tests.llm_server import LLMServer, Reply

    bomb = base64.b64encode(_raw_png(12_000, 8_000, b"\x00" * 64)).decode()  # 96 Mpx claimed in a 100-byte file
    part = {"inlineData": {"mimeType": "image/png", "data": bomb}}
    body = {"candidates": [{"content": {"parts": [part], "role": "model"}, "finishReason": "STOP"}]}
    monkeypatch.setenv("GEMINI_API_KEY", "k" * 39)
    with LLMServer(lambda seen: Reply(200, body)) as server:
        editor = GeminiImageEditor(base_url=server.url, retry=RetryPolicy(max_attempts=1))
        with pytest.raises(ProviderError, match="the edited image is 12000x8000 pixels .* refused before decoding"):
            editor.edit(Image.new("RGB", (64, 48)), 0.3)
