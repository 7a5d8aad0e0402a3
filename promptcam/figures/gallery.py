"""The gallery: one row per class, its name, its most typical correctly classified test image
and that image's most important kept head's map on it; pages of ``rows_per_page`` rows, each
page with its own colour scale, so that 1,000 classes stay legible."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from promptcam.figures.panels import (
    ClassImages,
    GridCell,
    GridRow,
    class_chunks,
    grid_figure,
    load_trait_inputs,
    shared_vmax,
    typical_images,
)
from promptcam.figures.settings import GallerySettings
from promptcam.figures.sources import ImageSource
from promptcam.figures.style import FigureStyle, save_figure, styled
from promptcam.figures.text import taxon_lines
from promptcam.traits.tables import TraitMaps

LOGGER = logging.getLogger(__name__)
LABEL_CHARS = {1: 18, 2: 28}  # class-name characters per line, by figure columns
GALLERY_NOTE = (
    "Each class's most typical correctly classified test image (highest p, the model's "
    "probability of the class), alone and with its most important kept head's map. "
    "Dashed outline: trait mask."
)


def gallery_rows(
    classes: Sequence[int],
    selection: ClassImages,
    maps: TraitMaps,
    images: ImageSource,
    rank: str,
    label_chars: int,
) -> list[GridRow]:
    """One row per class: its name (with p and the head), its image, the top head's map."""
    row_of = maps.row_of()
    ids = [selection.images[index][0][0] for index in classes]
    stored = maps.read_maps([row_of[image] for image in ids])
    pictures = images.images(ids)
    rows = []
    for index, image, class_maps in zip(classes, ids, stored, strict=True):
        score = selection.images[index][0][1]
        head = maps.kept_heads(row_of[image])[0]
        name = taxon_lines(str(maps.label_names[index]), rank, label_chars)
        rows.append(
            GridRow(
                image=pictures[image].image,
                cells=(GridCell(None), GridCell(class_maps[head])),
                label=f"{name}\np = {score:.2f} · head {head}",
                mask=pictures[image].mask(rank),
            )
        )
    return rows


def page_note(selection: ClassImages, last: bool) -> str:
    """The note under a page; the last also names the classes left out."""
    if not last or not selection.skipped:
        return GALLERY_NOTE
    names = ", ".join(selection.skipped[:8]) + (" ..." if len(selection.skipped) > 8 else "")
    return (
        f"{GALLERY_NOTE} Not shown: {len(selection.skipped)} classes without correctly "
        f"classified test images ({names})."
    )


def draw_gallery(
    *,
    traits_table: Path,
    trait_maps: Path,
    images: ImageSource,
    rank: str,
    out_dir: Path,
    style: FigureStyle,
    settings: GallerySettings,
) -> list[Path]:
    """``out_dir``/page_01.pdf/.png ...: every class with a correctly classified test image in
    label order, ``settings.rows_per_page`` per page (cells shrink to keep a page within
    ``style.max_height_mm``). Classes without one are named under the last page and logged."""
    if settings.rows_per_page < 1:
        raise ValueError(f"gallery rows_per_page must be at least 1, got {settings.rows_per_page}")
    table, maps = load_trait_inputs(Path(traits_table), Path(trait_maps))
    selection = typical_images(table, maps.label_names, per_class=1)
    LOGGER.info(selection.report(f"gallery ({rank})", Path(traits_table)))
    if not selection.images:
        raise ValueError(
            f"{traits_table}: no correctly classified test image in any class: nothing to draw"
        )
    pages = class_chunks(list(selection.images), settings.rows_per_page)
    label_chars = LABEL_CHARS[settings.columns]
    written: list[Path] = []
    with styled(style):
        for number, classes in enumerate(pages, start=1):
            rows = gallery_rows(classes, selection, maps, images, rank, label_chars)
            fig = grid_figure(
                rows,
                title=f"{rank.capitalize()}: most important trait per class "
                f"({number}/{len(pages)})",
                style=style,
                columns=settings.columns,
                vmax=shared_vmax(rows),
                note=page_note(selection, last=number == len(pages)),
            )
            written += save_figure(fig, Path(out_dir) / f"page_{number:02d}", style)
    return written
