"""Attention drawn on a specimen: the map as colour whose opacity follows its value, so that the
organism stays readable where attention is low, and the ground-truth trait as an outline.

The model saw the stored image resized to a square (no crop), so the patch grid spans the whole
image: the map is stretched bilinearly to the image's own height and width for display.
"""

from __future__ import annotations

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize

from promptcam.figures.style import upsample

MAX_ALPHA = 0.85
MASK_COLOUR = "white"


def attention_rgba(
    grid_map: np.ndarray,
    size: tuple[int, int],
    vmax: float,
    cmap: str,
    max_alpha: float = MAX_ALPHA,
) -> np.ndarray:
    """(H, W, 4) float RGBA: colour and opacity from ``grid_map`` (h, w) / ``vmax``, clipped to
    [0, 1], upsampled bilinearly to ``size`` (H, W)."""
    if vmax <= 0:
        raise ValueError(f"vmax must be positive, got {vmax}")
    values = np.clip(upsample(grid_map, size) / vmax, 0.0, 1.0)
    rgba = colormaps[cmap](values)
    rgba[..., 3] = max_alpha * values
    return rgba


def draw_attention(
    ax: Axes,
    image: np.ndarray,
    grid_map: np.ndarray | None,
    *,
    vmax: float,
    cmap: str,
    mask: np.ndarray | None = None,
) -> None:
    """``image`` (H, W, 3) uint8 with ``grid_map`` on top (None: the image alone) and the outline
    of the boolean ``mask`` (H, W) if given; axes off, pixel coordinates, origin top left."""
    height, width = image.shape[:2]
    extent = (0, width, height, 0)
    ax.imshow(image, extent=extent, interpolation="lanczos")
    if grid_map is not None:
        rgba = attention_rgba(grid_map, (height, width), vmax, cmap)
        ax.imshow(rgba, extent=extent, interpolation="bilinear")
    if mask is not None and mask.any():
        # Row i of the mask is pixel row i from the top, centred at i + 0.5.
        ax.contour(
            np.arange(width) + 0.5,
            np.arange(height) + 0.5,
            np.asarray(mask, dtype=float),
            levels=[0.5],
            colors=MASK_COLOUR,
            linewidths=0.6,
            linestyles="dashed",
        )
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_axis_off()


def attention_scale(vmax: float, cmap: str) -> ScalarMappable:
    """The one colour scale of a figure (for ``fig.colorbar``)."""
    return ScalarMappable(norm=Normalize(0.0, vmax), cmap=cmap)
