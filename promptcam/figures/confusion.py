"""The confusion matrix of one rank: row-normalised, classes ordered so that those confused with
each other sit together, readable from a handful of classes to hundreds.

Rows and columns share one order: hierarchical clustering (scipy, average linkage, Euclidean,
optimal leaf order) of the classes' confusion profiles (see :func:`cluster_order`). Empty
cells stay white. ``columns`` is the widest the figure may be: a matrix whose names and cells
fit one column at full size is drawn one column wide.
Class names are printed only while they fit at 5 pt or more; otherwise the axes say how many
classes there are and that the names are left out.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter
from scipy.cluster.hierarchy import leaves_list, linkage, optimal_leaf_ordering

from promptcam.evaluation.tables import read_confusion
from promptcam.figures.style import FigureStyle, new_figure, save_figure, styled
from promptcam.figures.text import MM_PER_POINT, is_italic, text_width_mm

__all__ = ["build_confusion", "cluster_order", "draw_confusion", "row_normalised"]

MM_PER_INCH = 25.4
MIN_LABEL_PT = 5.0
MAX_CELL_MM = 9.0  # a few classes do not fill two columns with huge cells
MIN_SIDE_MM = 40.0  # room for the colorbar's label
ANNOTATE_CELL_MM = 6.0  # percentages printed in cells at least this large
COLORBAR_MM = 16.0
AXIS_LABEL_MM = 5.0
MARGIN_MM = 3.0
MAX_LABEL_CHARS = 40
CONFUSION_CMAP = "rocket_r"  # perceptually uniform, white at zero: sparse matrices stay legible


def row_normalised(counts: pd.DataFrame) -> pd.DataFrame:
    """Each row divided by its total (a class without test images stays a row of zeros)."""
    totals = counts.sum(axis=1).to_numpy(np.float64)
    shares = counts.to_numpy(np.float64) / np.where(totals > 0, totals, 1.0)[:, None]
    return pd.DataFrame(shares, index=counts.index, columns=counts.columns)


def cluster_order(shares: pd.DataFrame) -> list[int]:
    """Class order that puts classes confused with each other next to each other.

    Each class's profile is its row of the symmetrised confusion (the share of its images
    going to each class plus the share of that class's images coming to it) with 1 for itself:
    two classes confused either way share two coordinates, so they join early."""
    if len(shares) < 3:
        return list(range(len(shares)))
    values = shares.to_numpy(np.float64)
    affinity = values + values.T
    np.fill_diagonal(affinity, 1.0)
    tree = optimal_leaf_ordering(linkage(affinity, method="average"), affinity)
    return [int(i) for i in leaves_list(tree)]


def _text_width_mm(texts: list[str], size_pt: float, style: FigureStyle, italic: bool) -> float:
    return max((text_width_mm(text, size_pt, style.font_family, italic) for text in texts),
               default=0.0)  # fmt: skip


def _short(name: str) -> str:
    return name if len(name) <= MAX_LABEL_CHARS else name[: MAX_LABEL_CHARS - 1] + "…"


def build_confusion(*, confusion: Path, rank: str, style: FigureStyle, columns: int = 2) -> Figure:
    """The row-normalised, clustered confusion matrix of ``rank`` as a heat map with a
    colorbar; class names on the axes while they fit at 5 pt or more."""
    counts = read_confusion(confusion)
    if counts.empty:
        raise ValueError(f"{confusion}: no classes; rerun the evaluate rule")
    order = cluster_order(row_normalised(counts))
    shares = row_normalised(counts).iloc[order, order]
    num_classes = len(shares)
    italic = is_italic(rank)
    labels = [_short(name) for name in shares.index]

    # The heat map's side if the names are printed; then whether they fit at >= 5 pt.
    label_pt = max(MIN_LABEL_PT, style.font_size - 1.0)
    label_mm = _text_width_mm(labels, label_pt, style, italic) + 1.5
    natural = (
        max(MIN_SIDE_MM, num_classes * MAX_CELL_MM)
        + label_mm
        + AXIS_LABEL_MM
        + COLORBAR_MM
        + 2 * MARGIN_MM
    )
    if natural <= style.width_mm(1):
        columns = 1
    width = style.width_mm(columns)
    side = width - label_mm - AXIS_LABEL_MM - COLORBAR_MM - 2 * MARGIN_MM
    cell_pt = side / num_classes / MM_PER_POINT
    show_names = cell_pt >= MIN_LABEL_PT * 1.15 and side > 0
    if show_names:
        label_pt = min(label_pt, cell_pt / 1.15)
        label_mm = _text_width_mm(labels, label_pt, style, italic) + 1.5
    else:
        label_mm = 0.0
        side = width - AXIS_LABEL_MM - COLORBAR_MM - 2 * MARGIN_MM
    note_mm = 0.0 if show_names else 2 * AXIS_LABEL_MM
    side = min(side, max(MIN_SIDE_MM, num_classes * MAX_CELL_MM))
    height = side + label_mm + AXIS_LABEL_MM + note_mm + 2 * MARGIN_MM
    fig = new_figure(style, columns, min(height, style.max_height_mm))
    ax = fig.add_subplot()
    cell_mm = side / num_classes
    annotate = show_names and cell_mm >= ANNOTATE_CELL_MM
    annotations = shares.map(lambda v: f"{100 * v:.0f}" if v >= 0.005 else "")
    sns.heatmap(
        shares,
        ax=ax,
        vmin=0,
        vmax=1,
        cmap=CONFUSION_CMAP,
        square=True,
        xticklabels=labels if show_names else False,
        yticklabels=labels if show_names else False,
        mask=shares.to_numpy() == 0,
        annot=annotations if annotate else False,
        fmt="",
        annot_kws={"fontsize": max(MIN_LABEL_PT, style.font_size - 1.5)},
        rasterized=num_classes > 60,
        cbar_kws={
            "label": "Share of the true class",
            "format": PercentFormatter(xmax=1, decimals=0),
            "shrink": 0.5 if side > 80 else 1.0,
        },
    )
    ax.tick_params(length=0, pad=1)
    if show_names:
        for tick in [*ax.get_xticklabels(), *ax.get_yticklabels()]:
            tick.set_fontsize(label_pt)
            tick.set_fontstyle("italic" if italic else "normal")
        ax.set_xticklabels(ax.get_xticklabels(), rotation=90)
        ax.set_yticklabels(ax.get_yticklabels(), rotation=0)
        ax.set_xlabel("Predicted class")
        ax.set_ylabel("True class")
    else:
        ax.set_xlabel(
            f"Predicted class ({num_classes} classes, clustered;\n"
            f"names left out: too many to print at {MIN_LABEL_PT:.0f} pt)"
        )
        ax.set_ylabel(f"True class ({num_classes} classes)")
    for spine in ax.spines.values():
        spine.set_visible(True)
        spine.set_linewidth(0.5)
    _trim_height(fig, ax)
    return fig


def _trim_height(fig: Figure, ax: Axes) -> None:
    """Drop the blank band that a square heat map limited by the width leaves above and below
    it (the estimate of the labels' size is rough)."""
    fig.canvas.draw()
    cell, drawn = ax.get_position(original=True), ax.get_position(original=False)
    slack = (cell.height - drawn.height) * fig.get_figheight()
    if slack > 1 / MM_PER_INCH:
        fig.set_figheight(fig.get_figheight() - slack)


def draw_confusion(
    *, confusion: Path, rank: str, out_stem: Path, style: FigureStyle, columns: int = 2
) -> list[Path]:
    """Rank ``rank``'s test confusion (confusion.tsv), each row as shares of the true class's
    images, rows and columns clustered so that confused classes sit together; names while
    they fit at 5 pt, percentages in the cells while those are large enough."""
    with styled(style):
        fig = build_confusion(confusion=confusion, rank=rank, style=style, columns=columns)
        return save_figure(fig, out_stem, style)
