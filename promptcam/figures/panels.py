"""Per-class trait panels: a class's most typical correctly classified test images, each alone
and then with every kept head's map in importance order (head number and rank above each map),
the rank's trait mask as a dashed outline, one colour scale for the whole figure.

The drawing engine (:class:`GridRow` rows of an image and its map cells, laid out to the
journal column's width and paginated under the page's height) is shared with the gallery and
the cross-class figure; :func:`draw_panel_rows` is what ``promptcam explain`` calls.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from promptcam.figures.overlay import attention_scale, draw_attention
from promptcam.figures.settings import PanelSettings
from promptcam.figures.sources import ImageSource
from promptcam.figures.style import MM_PER_INCH, FigureStyle, new_figure, save_figure, styled
from promptcam.figures.text import MM_PER_POINT, filename_safe, taxon_text, text_size_mm, wrap_lines
from promptcam.traits.tables import TraitMaps, read_search_table, read_trait_maps

LOGGER = logging.getLogger(__name__)
CLASSES_PER_READ = 16  # classes whose images and maps are held at once
LABEL_CHARS = 20  # a plain row label's characters per line
PANEL_NOTE = (
    "Most typical correctly classified test images (highest p, the model's probability of the "
    "class); then one map per kept head, most important first (#1). One colour scale; "
    "dashed outline: trait mask."
)


# ----------------------------------------------------------------------------- grid engine

PAD_MM = 1.0  # constrained layout's padding around each axes
CBAR_MM = 2.5  # the colour bar's width
CBAR_TEXT_MM = 9.0  # its tick labels and label
MAX_CBAR_MM = 45.0
MIN_CELL_MM = 8.0


@dataclass(frozen=True)
class GridCell:
    """One picture of a row: the row's image with ``grid_map`` (h, w) on it (None: the image
    alone) and ``title`` above it."""

    grid_map: np.ndarray | None
    title: str = ""


@dataclass(frozen=True)
class GridRow:
    """An image, its cells left to right, its label (left of the row) and trait mask (drawn on
    the map cells)."""

    image: np.ndarray
    cells: tuple[GridCell, ...]
    label: str = ""
    mask: np.ndarray | None = None


def small_pt(style: FigureStyle) -> float:
    return max(5.0, style.font_size - 1.0)


def row_aspect(row: GridRow) -> float:
    """The row's cell height per width: the image's, bounded so one odd image cannot take the
    page."""
    height, width = row.image.shape[:2]
    return float(np.clip(height / width, 0.4, 1.6))


def cell_title(title: str, cell_mm: float, style: FigureStyle) -> str:
    """``title`` on one line if it fits the cell's width, else broken at its " · " parts."""
    if text_size_mm(title, small_pt(style))[0] <= cell_mm:
        return title
    return title.replace(" · ", "\n")


def note_text(note: str | None, style: FigureStyle, columns: int) -> str:
    """``note`` wrapped to the page width."""
    if not note:
        return ""
    chars = int(style.width_mm(columns) / (0.55 * small_pt(style) * MM_PER_POINT))
    return "\n".join(wrap_lines(note, chars))


@dataclass(frozen=True)
class PageLayout:
    cell_mm: float  # a cell's width
    height_mm: float  # the page's
    spare_mm: float = 0.0  # width left over by cells shrunk to fit the page's height

    @property
    def shrunk(self) -> bool:
        return self.spare_mm > 0


def page_layout(
    rows: Sequence[GridRow], *, title: str, note: str, style: FigureStyle, columns: int
) -> PageLayout:
    """Cells as wide as the column allows, the page as high as its rows need; cells narrower
    where that would pass ``style.max_height_mm``."""
    num_cells = max(len(row.cells) for row in rows)
    label_mm = max(text_size_mm(row.label, style.font_size)[0] for row in rows)
    free = style.width_mm(columns) - label_mm - CBAR_MM - CBAR_TEXT_MM
    natural = free / num_cells - 2 * PAD_MM - 0.5
    fixed = (
        text_size_mm(title, style.font_size + 1.0)[1]
        + text_size_mm(note, small_pt(style))[1]
        + 4 * PAD_MM
    )
    for row in rows:
        titles = max(
            text_size_mm(cell_title(cell.title, natural, style), small_pt(style))[1]
            for cell in row.cells
        )
        fixed += titles + 2 * PAD_MM + (0.7 if titles else 0.0)
    aspects = sum(row_aspect(row) for row in rows)
    height = fixed + natural * aspects
    if height <= style.max_height_mm:
        return PageLayout(natural, height)
    cell = (style.max_height_mm - fixed) / aspects
    if cell < MIN_CELL_MM:
        raise ValueError(
            f"{len(rows)} rows do not fit a {style.max_height_mm:.0f} mm page "
            f"(cells {cell:.1f} mm): show fewer rows per page"
        )
    return PageLayout(cell, style.max_height_mm, (natural - cell) * num_cells)


def shared_vmax(rows: Sequence[GridRow]) -> float:
    """The colour scale's top: the largest value of any map drawn (1 if none is positive)."""
    values = [cell.grid_map for row in rows for cell in row.cells if cell.grid_map is not None]
    for grid_map in values:
        if not np.isfinite(grid_map).all():
            raise ValueError("a map to draw has NaN or infinite values: rerun the traits rule")
    top = max((float(np.max(grid_map)) for grid_map in values), default=0.0)
    return top if top > 0 else 1.0


def grid_figure(
    rows: Sequence[GridRow],
    *,
    title: str,
    style: FigureStyle,
    columns: int,
    vmax: float,
    note: str | None = None,
):
    """One page of ``rows`` as a matplotlib Figure (call inside :func:`styled`); each image
    axes is labelled ``cell <row> <column>``."""
    note = note_text(note, style, columns)
    layout = page_layout(rows, title=title, note=note, style=style, columns=columns)
    fig = new_figure(style, columns, layout.height_mm)
    pad = PAD_MM / MM_PER_INCH
    fig.get_layout_engine().set(w_pad=pad, h_pad=pad, wspace=0.0, hspace=0.0)
    num_cells = max(len(row.cells) for row in rows)
    heights = [layout.cell_mm * row_aspect(row) for row in rows]
    # Empty columns either side take the width that shrunk cells leave, keeping them together.
    spare = max(layout.spare_mm / 2, 1e-3)
    grid = fig.add_gridspec(
        len(rows),
        num_cells + 3,
        width_ratios=[spare, *[layout.cell_mm] * num_cells, CBAR_MM, spare],
        height_ratios=heights,
    )
    for index, row in enumerate(rows):
        if row.mask is not None and row.mask.shape != row.image.shape[:2]:
            raise ValueError(
                f"row {row.label!r}: mask {row.mask.shape} for image {row.image.shape}"
            )
        for position, cell in enumerate(row.cells):
            ax = fig.add_subplot(grid[index, position + 1], label=f"cell {index} {position}")
            mask = row.mask if cell.grid_map is not None else None
            draw_attention(
                ax, row.image, cell.grid_map, vmax=vmax, cmap=style.attention_cmap, mask=mask
            )
            if cell.title:
                shown = cell_title(cell.title, layout.cell_mm, style)
                ax.set_title(shown, fontsize=small_pt(style), pad=2.0, linespacing=1.1)
            if position == 0 and row.label:
                ax.text(-0.06, 0.5, row.label, transform=ax.transAxes, ha="right", va="center")
    span = max(1, int(np.searchsorted(np.cumsum(heights), MAX_CBAR_MM, side="right")))
    colour_bar = fig.colorbar(
        attention_scale(vmax, style.attention_cmap),
        cax=fig.add_subplot(grid[:span, -2], label="colour scale"),
    )
    colour_bar.set_label("attention", fontsize=small_pt(style))
    colour_bar.ax.tick_params(labelsize=small_pt(style), length=2.0, width=0.5)
    colour_bar.outline.set_linewidth(0.5)
    if title:
        fig.suptitle(title, fontsize=style.font_size + 1.0)
    if note:
        fig.supxlabel(note, fontsize=small_pt(style), x=0.01, ha="left", multialignment="left")
    return fig


def paginate(
    rows: Sequence[GridRow], *, title: str, note: str | None, style: FigureStyle, columns: int
) -> list[list[GridRow]]:
    """``rows`` split into pages that each fit the page's height with full-width cells."""
    note = note_text(note, style, columns)
    pages: list[list[GridRow]] = [[]]
    for row in rows:
        trial = [*pages[-1], row]
        layout = page_layout(trial, title=title, note=note, style=style, columns=columns)
        if pages[-1] and layout.shrunk:
            pages.append([row])
        else:
            pages[-1] = trial
    return pages


def draw_grid_pages(
    rows: Sequence[GridRow],
    *,
    title: str,
    out_stem: Path,
    style: FigureStyle,
    columns: int,
    note: str | None = None,
) -> list[Path]:
    """``rows`` on as many pages as their height needs (``out_stem``, then ``out_stem``_p02
    ...), one colour scale for all of them."""
    written: list[Path] = []
    with styled(style):
        vmax = shared_vmax(rows)
        pages = paginate(rows, title=title, note=note, style=style, columns=columns)
        for number, page in enumerate(pages, start=1):
            stem = out_stem if number == 1 else out_stem.with_name(f"{out_stem.name}_p{number:02d}")
            fig = grid_figure(page, title=title, style=style, columns=columns, vmax=vmax, note=note)
            written += save_figure(fig, stem, style)
    return written


@dataclass(frozen=True)
class PanelRow:
    """One image and the maps of the class shown: ``maps`` (all heads, h, w), ``heads`` the
    ones to draw, most important first; ``score`` that class's probability on the image."""

    image: np.ndarray
    maps: np.ndarray
    heads: tuple[int, ...]
    label: str
    score: float
    mask: np.ndarray | None = None


def head_title(head: int, importance: int) -> str:
    """'head 5 · #1': the head's number and its importance rank (1 = most important)."""
    return f"head {head} · #{importance}"


def panel_grid_row(row: PanelRow) -> GridRow:
    """The image (titled with its score) followed by one cell per head in ``row.heads``."""
    if row.maps.ndim != 3:
        raise ValueError(
            f"PanelRow {row.label!r}: maps must be (heads, h, w), got {row.maps.shape}"
        )
    unknown = [head for head in row.heads if not 0 <= head < len(row.maps)]
    if unknown:
        raise ValueError(f"PanelRow {row.label!r}: heads {unknown} not among {len(row.maps)}")
    cells = [GridCell(None, f"p = {row.score:.2f}")]
    cells += [
        GridCell(row.maps[head], head_title(head, rank + 1)) for rank, head in enumerate(row.heads)
    ]
    label = row.label if "$" in row.label else "\n".join(wrap_lines(row.label, LABEL_CHARS))
    return GridRow(row.image, tuple(cells), label, row.mask)


def draw_panel_rows(
    rows: Sequence[PanelRow],
    *,
    title: str,
    out_stem: Path,
    style: FigureStyle,
    columns: int,
    note: str | None = None,
) -> list[Path]:
    """Rows of an image (its score above) and its heads' maps on it (head number and
    importance rank above each), row labels on the left, ``title`` on top, one colour scale.

    Written to ``out_stem``.pdf/.png; rows beyond one page's height continue on
    ``out_stem``_p02 ... (the first page keeps ``out_stem``). ``title``, labels and ``note``
    may hold matplotlib mathtext (see :func:`taxon_text`).
    """
    if not rows:
        raise ValueError(f"{out_stem}: no rows to draw")
    grid_rows = [panel_grid_row(row) for row in rows]
    return draw_grid_pages(
        grid_rows, title=title, out_stem=Path(out_stem), style=style, columns=columns, note=note
    )


@dataclass(frozen=True)
class ClassImages:
    """The classes a figure shows, each with its most typical correctly classified test images
    (``{class index: [(image id, probability of the class)]}``, most typical first), and
    those it leaves out: ``skipped`` (no correctly classified test image) and ``over_limit``
    (beyond the figure's class limit)."""

    images: dict[int, list[tuple[str, float]]]
    skipped: list[str]
    over_limit: list[str]

    def report(self, what: str, source: Path) -> str:
        """A log line saying what was drawn and what was left out."""
        line = f"{what}: {len(self.images)} classes drawn from {source}"
        if self.skipped:
            shown = ", ".join(self.skipped[:10]) + (" ..." if len(self.skipped) > 10 else "")
            line += f"; {len(self.skipped)} without correctly classified test images: {shown}"
        if self.over_limit:
            line += f"; {len(self.over_limit)} more over the class limit"
        return line


def typical_images(
    table: pd.DataFrame,
    label_names: Sequence[str],
    per_class: int,
    max_classes: int | None = None,
) -> ClassImages:
    """Per class in label order, its ``per_class`` correctly classified test images with the
    highest ``base_score`` (ties: image id); at most ``max_classes`` classes (None: all)."""
    needed = {"image", "target", "correct", "base_score"}
    if not needed <= set(table.columns):
        raise ValueError(f"traits table lacks columns {sorted(needed - set(table.columns))}")
    per_image = table.drop_duplicates("image")
    correct = per_image[per_image["correct"].astype(bool)].sort_values(
        ["base_score", "image"], ascending=[False, True], kind="stable"
    )
    by_class = {
        int(target): list(
            zip(group["image"].astype(str), group["base_score"].astype(float), strict=True)
        )[:per_class]
        for target, group in correct.groupby("target", sort=False)
    }
    images: dict[int, list[tuple[str, float]]] = {}
    skipped, over_limit = [], []
    for index, name in enumerate(label_names):
        if index not in by_class:
            skipped.append(str(name))
        elif max_classes is not None and len(images) >= max_classes:
            over_limit.append(str(name))
        else:
            images[index] = by_class[index]
    return ClassImages(images, skipped, over_limit)


def load_trait_inputs(traits_table: Path, trait_maps: Path) -> tuple[pd.DataFrame, TraitMaps]:
    """The search table and the maps' index, checked to describe the same images."""
    table = read_search_table(traits_table)
    maps = read_trait_maps(trait_maps)
    missing = set(table["image"].astype(str)) - set(maps.image)
    if missing:
        raise ValueError(
            f"{traits_table} has {len(missing)} images that {trait_maps} lacks "
            f"(e.g. {sorted(missing)[0]}): rerun the traits rule"
        )
    return table, maps


def class_chunks(classes: Sequence[int], size: int = CLASSES_PER_READ) -> list[list[int]]:
    return [list(classes[start : start + size]) for start in range(0, len(classes), size)]


def draw_trait_panels(
    *,
    traits_table: Path,
    trait_maps: Path,
    images: ImageSource,
    rank: str,
    out_dir: Path,
    style: FigureStyle,
    settings: PanelSettings,
) -> list[Path]:
    """One figure per class (``out_dir``/<NNN>_<label>.pdf/.png, NNN its label index): its
    ``settings.images_per_class`` most typical correctly classified test images, one per row,
    each alone and with its kept heads' maps, most important first. Classes without correctly
    classified test images get no file; the log says which."""
    table, maps = load_trait_inputs(Path(traits_table), Path(trait_maps))
    selection = typical_images(
        table, maps.label_names, settings.images_per_class, settings.max_classes
    )
    LOGGER.info(selection.report(f"trait panels ({rank})", Path(traits_table)))
    row_of = maps.row_of()
    written: list[Path] = []
    for chunk in class_chunks(list(selection.images)):
        ids = [image for index in chunk for image, _ in selection.images[index]]
        rows = [row_of[image] for image in ids]
        stored = dict(zip(ids, maps.read_maps(rows), strict=True))
        pictures = images.images(ids)
        for index in chunk:
            name = str(maps.label_names[index])
            panel_rows = [
                PanelRow(
                    image=pictures[image].image,
                    maps=stored[image],
                    heads=tuple(maps.kept_heads(row_of[image])),
                    label="\n".join(wrap_lines(image, 16)),
                    score=score,
                    mask=pictures[image].mask(rank),
                )
                for image, score in selection.images[index]
            ]
            written += draw_panel_rows(
                panel_rows,
                title=f"{taxon_text(name, rank)} ({rank})",
                out_stem=Path(out_dir) / f"{index:03d}_{filename_safe(name)}",
                style=style,
                columns=settings.columns,
                note=PANEL_NOTE,
            )
    return written
