"""Checks that every figure test shares: a PDF's fonts and page size, a PNG's resolution and
that it shows something (poppler's pdffonts and pdfinfo read the PDFs)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
from PIL import Image

MM_PER_POINT = 25.4 / 72


def pdf_fonts(path: Path) -> list[dict[str, str]]:
    """pdffonts' rows: ``name``, ``type``, ``emb`` (yes/no) of every font in the PDF."""
    out = subprocess.run(["pdffonts", str(path)], capture_output=True, text=True, check=True)
    rows = []
    for line in out.stdout.splitlines()[2:]:
        match = re.match(r"(\S+)\s+(.+?)\s{2,}(\S+)\s+(yes|no)\s+(yes|no)\s+(yes|no)", line)
        if match:
            name, font_type, _, emb, _, _ = match.groups()
            rows.append({"name": name, "type": font_type, "emb": emb})
    return rows


def assert_fonts_embedded_truetype(path: Path) -> None:
    """Text present, every font embedded, none Type 3 (journals refuse those)."""
    fonts = pdf_fonts(path)
    assert fonts, f"{path}: no fonts (no text?)"
    for font in fonts:
        assert "Type 3" not in font["type"], (path, font)
        assert font["emb"] == "yes", (path, font)


def pdf_page_mm(path: Path) -> tuple[float, float]:
    """Width and height of the first page in mm (pdfinfo)."""
    out = subprocess.run(["pdfinfo", str(path)], capture_output=True, text=True, check=True)
    match = re.search(r"Page size:\s+([\d.]+) x ([\d.]+) pts", out.stdout)
    assert match, out.stdout
    return float(match.group(1)) * MM_PER_POINT, float(match.group(2)) * MM_PER_POINT


def assert_png_shows_something(path: Path, min_dpi: int = 300) -> np.ndarray:
    """The PNG opens, says it is at least ``min_dpi`` and is not blank; returns its pixels."""
    with Image.open(path) as image:
        dpi = image.info.get("dpi", (0, 0))
        pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    assert round(dpi[0]) >= min_dpi, (path, dpi)
    background = pixels[0, 0]
    differs = np.abs(pixels - background).sum(axis=-1) > 30
    assert differs.mean() > 0.02, f"{path}: {differs.mean():.3f} of the pixels show anything"
    assert pixels.std() > 10, f"{path}: nearly uniform (std {pixels.std():.1f})"
    return pixels
