"""The one way the package opens an image file: refuse before decoding, then decode to upright 8-bit RGB.

Every loader (the evaluation's decode threads, annotation, flood, the attention figures, and the localize / serve
entry point :func:`attllm_jax.data.loading.read_image`) goes through :func:`open_image`. It reads only regular files
(a FIFO, socket, device or folder named ``*.jpg`` is refused: reading a FIFO would block the run forever) and, given
the folder the image was listed from, only files inside it once symlinks are resolved. Before a
single pixel is decoded it checks that the size written in the header has at most ``max_pixels`` pixels (default
:data:`MAX_SOURCE_PIXELS`) and passes the caller's ``check_size`` (the evaluation predicts the preprocessed size
there and refuses what one batch cannot hold). PIL's ``Image.open`` reads only the header, and the decoder never
produces more pixels than the header states, so a file whose header lies (a truncated file, a PNG decompression
bomb) allocates at most what was checked, and a truncated one fails to decode.

Then it decodes and converts to 8-bit RGB: 16-bit greyscale (PIL modes ``I;16``, ``I;16B``, ``I;16L``, which a
plain ``convert("RGB")`` clips to white) is scaled by 255 / 65535 and rounded (16-bit RGB(A) PNGs are already
reduced to their high byte by PIL); modes whose value range a file does not state (32-bit integer ``I``, float
``F``) are refused. Last, the EXIF orientation tag is applied, so the pixels are the photo as a viewer displays it
(phone photos are often stored sideways with a tag); the model, the LLM and the flood all see these upright pixels,
and flood writes them without a tag. No JPEG draft mode is used: the pixels are those of a full decode, as the
PyTorch references read them.
"""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

# About 67 Mpx (e.g. 9500 x 7000): above any phone camera's 50 Mpx mode; the decoded RGB image is then at most
# 192 MiB.
MAX_SOURCE_PIXELS = 1 << 26

EXIF_ORIENTATION = 0x0112
_SWAPS_AXES = (5, 6, 7, 8)  # orientations that rotate by 90 or 270 degrees
# EXIF orientation -> the transpose that makes the stored pixels upright (EXIF 2.32, tag 274)
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# Recorded in descriptor-store keys: stores made by a loader that decoded differently are not reused.
DECODING = "upright-rgb8-v1"
_SIXTEEN_BIT_GREY = ("I;16", "I;16L", "I;16B", "I;16N")
_UNSCALED = ("I", "F")


@dataclass(frozen=True)
class ImageBytes:
    """An image held in memory (an HTTP upload), opened by :func:`open_image` like a file.

    Attributes:
        name: What error messages call it (e.g. ``upload 'photo.jpg'``).
        data: The encoded file's bytes.
    """

    name: str
    data: bytes

    def __str__(self) -> str:
        return self.name


class ImageTooLargeError(ValueError):
    """An image (as stored, or as preprocessed) has more pixels than allowed."""


class NotRegularFileError(ValueError):
    """An image path that is not a regular file (a FIFO, socket, device or folder)."""


class OutsideFolderError(ValueError):
    """An image path that resolves (through a symlink) outside the folder it was listed from."""


class UnsupportedModeError(ValueError):
    """An image whose pixel format has no defined 8-bit conversion (32-bit integer or float)."""


def oriented_size(image: Image.Image) -> tuple[int, int]:
    """``(width, height)`` of an opened (not yet decoded) image as displayed, i.e. after its EXIF orientation."""
    width, height = image.size
    return (height, width) if exif_orientation(image) in _SWAPS_AXES else (width, height)


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation tag (1..8) of an opened image; 1 when absent or unreadable."""
    try:
        value = int(image.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 -- a broken EXIF block must not make a readable photo unreadable
        return 1
    return value if 1 <= value <= 8 else 1


def check_inside(path: str | os.PathLike, root: str | os.PathLike) -> None:
    """Raises :class:`OutsideFolderError` when ``path``, symlinks resolved, is not inside ``root`` (resolved).

    A symlink inside the folder to another file inside it is fine; the folder itself may be a symlink.
    """
    target, folder = Path(path).resolve(), Path(root).resolve()
    if not target.is_relative_to(folder):
        raise OutsideFolderError(
            f"{path} resolves to {target}, outside {folder}; a symlink may only point inside the image folder"
        )


def open_regular_file(path: str | os.PathLike) -> BinaryIO:
    """Opens ``path`` for reading without blocking, and only if it is a regular file (symlinks followed).

    The file is opened with ``O_NONBLOCK`` and then checked with ``fstat``, so a FIFO (which a plain open would wait
    on for a writer, forever) is refused at once, and the file checked is the file read.

    Raises:
        NotRegularFileError: for a FIFO, socket, device or folder. OSError: a missing path or a dangling link.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "FIFO" if stat.S_ISFIFO(mode) else "folder" if stat.S_ISDIR(mode) else "special file"
        raise NotRegularFileError(f"{path} is a {kind}, not a regular file")
    return os.fdopen(fd, "rb")


def check_source_pixels(path: str | os.PathLike, size: tuple[int, int], max_pixels: int) -> None:
    """Raises :class:`ImageTooLargeError` when a ``(width, height)`` header size exceeds ``max_pixels``."""
    width, height = size
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"{path} is {width}x{height} pixels ({width * height:,}), more than the {max_pixels:,} an image may "
            "have; it is refused before decoding (crop or downscale it)"
        )


def to_rgb8(image: Image.Image) -> Image.Image:
    """A decoded image as 8-bit RGB: 16-bit grey scaled by 255 / 65535, the other modes by PIL's ``convert``.

    Raises:
        UnsupportedModeError: for 32-bit integer (``I``) and float (``F``) images, whose range is unknown.
    """
    if image.mode in _SIXTEEN_BIT_GREY:
        values = np.asarray(image, dtype=np.uint32)  # [H, W], 0..65535 whatever the byte order
        grey = ((values * 255 + 32767) // 65535).astype(np.uint8)  # rounded to nearest
        return Image.fromarray(grey).convert("RGB")
    if image.mode in _UNSCALED:
        raise UnsupportedModeError(
            f"pixel mode {image.mode!r} (32-bit integer or float) has no defined 8-bit range; convert the file "
            "to 8 or 16 bits per channel"
        )
    return image.convert("RGB")  # a copy: the opened image is closed by the caller


def open_image(
    path: str | os.PathLike | ImageBytes,
    *,
    max_pixels: int = MAX_SOURCE_PIXELS,
    check_size: Callable[[int, int], None] | None = None,
    root: str | os.PathLike | None = None,
) -> Image.Image:
    """Opens an image file as 8-bit RGB, refusing what must not be decoded (see the module notes).

    Args:
        path: The image file, or an in-memory one (:class:`ImageBytes`; ``root`` does not apply).
        max_pixels: Most pixels the stored image may have (its decoded size).
        check_size: Called with the displayed ``(width, height)`` (the header's, turned by the EXIF orientation)
            before decoding; raises to refuse the image.
        root: When given, the file (symlinks resolved) must lie inside this folder.

    Returns:
        A decoded 8-bit RGB image, upright: EXIF orientation applied (the result carries no tag).

    Raises:
        NotRegularFileError, OutsideFolderError, ImageTooLargeError: refusals, before any decoding
            (``ValueError`` s).
        UnsupportedModeError: a 32-bit integer or float image (a ``ValueError``).
        OSError: a missing, unidentified or truncated file (PIL's errors, unchanged).
    """
    if isinstance(path, ImageBytes):
        source = io.BytesIO(path.data)
    else:
        if root is not None:
            check_inside(path, root)
        source = open_regular_file(path)
    with source as file, Image.open(file) as image:
        check_source_pixels(path, image.size, max_pixels)
        if check_size is not None:
            check_size(*oriented_size(image))
        image.load()
        rgb = to_rgb8(image)
        orientation = exif_orientation(image)
    return rgb if orientation == 1 else rgb.transpose(_TRANSPOSE[orientation])
