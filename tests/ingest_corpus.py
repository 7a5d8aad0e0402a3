"""Test images and tables written by the tests themselves (no binaries in the repository).

Pillow cannot write 16-bit colour, so 48/64-bit PNGs and big-endian or 16-bit RGB TIFFs are
written here byte by byte, following the PNG and TIFF 6.0 specifications.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

TAXA = [
    ("Felidae", "Panthera", "Panthera leo"),
    ("Felidae", "Panthera", "Panthera tigris"),
    ("Felidae", "Felis", "Felis catus"),
    ("Canidae", "Canis", "Canis lupus"),
]
PNG_COLOUR_TYPES = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> grey, grey+alpha, RGB, RGBA


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def write_png16(path: Path, pixels: np.ndarray) -> Path:
    """A 16-bit PNG (grey, grey+alpha, RGB or RGBA by the channel count), filter type 0."""
    height, width = pixels.shape[:2]
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    rows = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, PNG_COLOUR_TYPES[channels], 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(rows))
        + _png_chunk(b"IEND", b"")
    )
    return path


def write_tiff(path: Path, pixels: np.ndarray, byteorder: str = "<") -> Path:
    """An uncompressed one-strip TIFF of uint16 grey/RGB/RGBA (unassociated alpha) samples."""
    height, width = pixels.shape[:2]
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    bits = pixels.dtype.itemsize * 8
    data = pixels.astype(pixels.dtype.newbyteorder(byteorder)).tobytes()
    short, long = 3, 4
    entries = [
        (256, short, 1, width),
        (257, short, 1, height),
        (258, short, channels, bits),
        (259, short, 1, 1),  # no compression
        (262, short, 1, 2 if channels >= 3 else 1),  # RGB or min-is-black grey
        (273, long, 1, 0),  # strip offset, filled in below
        (277, short, 1, channels),
        (278, short, 1, height),
        (279, long, 1, len(data)),
        (284, short, 1, 1),  # chunky
    ]
    if channels == 4:
        entries.append((338, short, 1, 2))  # extra sample: unassociated alpha
    ifd_size = 2 + 12 * len(entries) + 4
    bits_offset = 8 + ifd_size
    data_offset = bits_offset + (2 * channels if channels > 1 else 0)
    ifd = struct.pack(byteorder + "H", len(entries))
    for tag, kind, count, value in entries:
        if tag == 258 and channels > 1:
            ifd += struct.pack(byteorder + "HHII", tag, kind, count, bits_offset)
        elif tag == 273:
            ifd += struct.pack(byteorder + "HHII", tag, kind, count, data_offset)
        elif kind == short:
            ifd += struct.pack(byteorder + "HHIH2x", tag, kind, count, value)
        else:
            ifd += struct.pack(byteorder + "HHII", tag, kind, count, value)
    ifd += struct.pack(byteorder + "I", 0)
    head = (b"II" if byteorder == "<" else b"MM") + struct.pack(byteorder + "HI", 42, 8)
    sample_bits = struct.pack(byteorder + "H" * channels, *[bits] * channels)
    body = head + ifd + (sample_bits if channels > 1 else b"")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(body.ljust(data_offset, b"\0") + data)
    return path


def noise(shape: tuple[int, ...], high: int, seed: int = 0, dtype=np.uint16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, high + 1, shape).astype(dtype)


def write_image(path: Path, size: tuple[int, int] = (24, 16), colour=(200, 100, 50)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def jpeg_bytes(size: tuple[int, int] = (64, 48), seed: int = 0) -> bytes:
    pixels = noise((size[1], size[0], 3), 255, seed, np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def write_truncated_jpeg(path: Path, seed: int = 0) -> Path:
    """A JPEG cut in half: Pillow opens it (the header is intact) but cannot decode it."""
    data = jpeg_bytes(seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: len(data) // 2])
    return path


def make_dataset(root: Path, per_species: int = 4) -> pd.DataFrame:
    """PNG images under ``root/images`` and their metadata rows (4 species)."""
    rows = []
    for family, genus, species in TAXA:
        for i in range(per_species):
            image = f"images/{species.replace(' ', '_')}_{i}.png"
            write_image(root / image, colour=(40 * i, 100, 50))
            rows.append({"image": image, "family": family, "genus": genus, "species": species})
    return pd.DataFrame(rows)


def save_csv(table: pd.DataFrame, path: Path, **kwargs) -> Path:
    table.to_csv(path, index=False, **kwargs)
    return path
