"""Attention drawn on a specimen: the map as colour whose opacity rises with its value (as its
square root, so that a weak but real peak is still seen at print size; the colour, read off the
colour bar, stays linear), over the image in light grey, so that coloured attention stands out
on colourful specimens while their shapes stay readable (figures show the colour photo once
beside its maps), and the ground-truth trait as an outline.

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
MUTED_LOW, MUTED_HIGH = 0.2, 0.6  # grey range of the image under a map
LUMINANCE = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def muted(image: np.ndarray) -> np.ndarray:
    """The image (H, W, 3) uint8 in light grey: luminance squeezed into 20-60 %."""
    luminance = (np.asarray(image, dtype=np.float32)[..., :3] / 255.0) @ LUMINANCE
    grey = MUTED_LOW + (MUTED_HIGH - MUTED_LOW) * luminance
    return (np.repeat(grey[..., None], 3, axis=-1) * 255).round().astype(np.uint8)


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
    rgba[..., 3] = max_alpha * np.sqrt(values)
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
    """``image`` (H, W, 3) uint8 with ``grid_map`` on top (None: the image alone, in colour;
    with a map, in grey) and the outline of the boolean ``mask`` (H, W) if given; axes off,
    pixel coordinates, origin top left."""
    height, width = image.shape[:2]
    extent = (0, width, height, 0)
    ax.imshow(image if grid_map is None else muted(image), extent=extent, interpolation="lanczos")
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
