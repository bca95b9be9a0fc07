"""Service test helpers: the server subprocess (benchmarks/serve_process.py) and crafted uploads."""

from __future__ import annotations

import struct
import zlib

from benchmarks.serve_process import REPO, Server, free_port, running_server, stop, wait_ready

__all__ = ["REPO", "Server", "free_port", "png_header_only", "running_server", "stop", "wait_ready"]


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` RGB pixels and whose data is a few bytes: a decompression bomb's
    shape, refused from the header before any pixel is decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )
