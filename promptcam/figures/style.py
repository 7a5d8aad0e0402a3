"""What every figure of the pipeline shares: journal sizes in mm, one sans-serif family at print
size, embedded TrueType fonts, colour maps safe for colour-blind readers, atomic PDF + PNG.

Journals take figures one column (85-89 mm) or two columns (174-183 mm) wide and at most about
240 mm high, with 5-8 pt text; many refuse Type 3 fonts, which ``pdf.fonttype: 42`` avoids.
No torch here: the figures wing reads the stages' output files only.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # never a GUI backend, also after ete3 has loaded Qt

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from promptcam.io import atomic_path

MM_PER_INCH = 25.4
COLUMN_WIDTHS_MM = {"single": 89.0, "double": 183.0}
MAX_HEIGHT_MM = 240.0
# Perceptually uniform maps only (DESIGN: never rainbow/jet).
ATTENTION_CMAPS = ("viridis", "magma", "cividis", "inferno", "plasma")


@dataclass(frozen=True)
class FigureStyle:
    """The ``figures`` config section's look: widths in mm, text size in pt, raster dpi."""

    single_column_mm: float = COLUMN_WIDTHS_MM["single"]
    double_column_mm: float = COLUMN_WIDTHS_MM["double"]
    max_height_mm: float = MAX_HEIGHT_MM
    font_family: str = "DejaVu Sans"
    font_size: float = 7.0
    dpi: int = 300
    attention_cmap: str = "viridis"
    palette: str = "colorblind"

    def __post_init__(self) -> None:
        if self.attention_cmap not in ATTENTION_CMAPS:
            raise ValueError(
                f"attention_cmap {self.attention_cmap!r} is not perceptually uniform; "
                f"use one of {ATTENTION_CMAPS}"
            )
        if not 5.0 <= self.font_size <= 8.0:
            raise ValueError(f"font_size {self.font_size} pt: journals want 5-8 pt at print size")
        if self.dpi < 300:
            raise ValueError(f"dpi {self.dpi}: raster content needs at least 300 dpi")

    def width_mm(self, columns: int) -> float:
        """The page width of a one- or two-column figure."""
        if columns not in (1, 2):
            raise ValueError(f"columns must be 1 or 2, got {columns}")
        return self.single_column_mm if columns == 1 else self.double_column_mm

    def rc(self) -> dict[str, object]:
        """matplotlib rcParams for this style."""
        small = max(5.0, self.font_size - 1.0)
        return {
            "pdf.fonttype": 42,
            "ps.fonttype": 42,
            "svg.fonttype": "none",
            "font.family": "sans-serif",
            "font.sans-serif": [self.font_family, "DejaVu Sans"],
            "mathtext.fontset": "dejavusans",
            "font.size": self.font_size,
            "axes.titlesize": self.font_size,
            "axes.labelsize": self.font_size,
            "xtick.labelsize": small,
            "ytick.labelsize": small,
            "legend.fontsize": small,
            "figure.titlesize": self.font_size + 1.0,
            "axes.linewidth": 0.5,
            "xtick.major.width": 0.5,
            "ytick.major.width": 0.5,
            "lines.linewidth": 1.0,
            "savefig.dpi": self.dpi,
            "figure.dpi": 100,
            "image.cmap": self.attention_cmap,
        }


@contextlib.contextmanager
def styled(style: FigureStyle) -> Iterator[None]:
    """matplotlib's rcParams set to ``style`` for the duration of the block."""
    with matplotlib.rc_context(style.rc()):
        yield


def new_figure(style: FigureStyle, columns: int, height_mm: float) -> Figure:
    """An empty figure one or two journal columns wide; height capped at the page's."""
    if height_mm > style.max_height_mm:
        raise ValueError(
            f"figure height {height_mm:.0f} mm exceeds the page's {style.max_height_mm:.0f} mm; "
            "paginate it"
        )
    width = style.width_mm(columns) / MM_PER_INCH
    return plt.figure(figsize=(width, height_mm / MM_PER_INCH), layout="constrained")


def save_figure(fig: Figure, stem: str | os.PathLike, style: FigureStyle) -> list[Path]:
    """Write ``stem``.pdf (vector, TrueType fonts) and ``stem``.png (``style.dpi``) atomically
    and close the figure. The page size is the figure size: no ``bbox_inches="tight"``, which
    would change the configured column width."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for suffix in (".pdf", ".png"):
        path = stem.with_suffix(suffix)
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=suffix[1:], dpi=style.dpi)
        written.append(path)
    plt.close(fig)
    return written


def upsample(grid_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A patch-grid map (h, w) resized bilinearly to ``size`` (height, width) for display; the
    stored map stays the data."""
    image = Image.fromarray(np.asarray(grid_map, dtype=np.float32), mode="F")
    return np.asarray(image.resize((size[1], size[0]), Image.Resampling.BILINEAR))
