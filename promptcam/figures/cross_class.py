"""Cross-class attention (paper Fig. 1c): on one image of class A (its most typical correctly
classified test image), A's own prompt's map next to a sibling class B's prompt's map, each
with that class's probability on the image. Maps are the mean over heads: which heads carry a
trait differs between the two prompts, the mean compares the prompts as a whole."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from promptcam.figures.panels import (
    GridCell,
    GridRow,
    grid_figure,
    shared_vmax,
)
from promptcam.figures.settings import CrossClassSettings
from promptcam.figures.sources import ImageSource, SourceImage
from promptcam.figures.style import FigureStyle, save_figure, styled
from promptcam.figures.text import taxon_lines
from promptcam.traits.tables import CrossClass, read_cross_class

LOGGER = logging.getLogger(__name__)
MAX_PROMPTS_PER_ROW = 4  # other classes' prompts drawn beside one image
TITLE_CHARS = 14  # class-name characters per line above a map
CROSS_NOTE = (
    "Each row: a class's most typical correctly classified test image, alone, with its own "
    "class prompt's attention and with other (sibling) classes' prompts' attention, mean over "
    "heads. p: the model's probability of that prompt's class on the image. Dashed outline: "
    "trait mask."
)


PAIRS_PER_ROUND = 2  # pairs of one image class per round: a row compares two siblings


def chosen_pairs(cross: CrossClass, max_pairs: int) -> tuple[list[int], int]:
    """Up to ``max_pairs`` pair rows with a representative image: configured pairs first,
    then spread over image classes (at most ``PAIRS_PER_ROUND`` of a class per round, so
    that one class with many siblings does not take the page), the pairs whose image class
    has the most test images first (file order on ties); and how many pairs had no
    representative image."""
    table = cross.table.assign(
        _row=np.arange(len(cross.table)),
        _configured=(cross.table["relation"] == "configured").to_numpy(),
        _has_image=np.asarray(cross.example_image != ""),
    )
    usable = table[table["_has_image"]].sort_values(
        ["_configured", "n_images", "_row"], ascending=[False, False, True], kind="stable"
    )
    usable = usable.assign(_round=usable.groupby("image_class").cumcount() // PAIRS_PER_ROUND)
    usable = usable.sort_values(
        ["_configured", "_round", "n_images", "_row"],
        ascending=[False, True, False, True],
        kind="stable",
    )
    return usable["_row"].head(max_pairs).tolist(), int((~table["_has_image"]).sum())


def rows_by_image_class(cross: CrossClass, pair_rows: list[int]) -> dict[int, list[int]]:
    """``{image class: its pair rows}`` in ``pair_rows``' order, at most
    :data:`MAX_PROMPTS_PER_ROW` prompts per image class (its representative image is the same
    for all of its pairs)."""
    grouped: dict[int, list[int]] = {}
    for row in pair_rows:
        prompts = grouped.setdefault(int(cross.pairs[row][0]), [])
        if len(prompts) < MAX_PROMPTS_PER_ROW:
            prompts.append(row)
    return grouped


def cross_class_row(cross: CrossClass, rows: list[int], picture: SourceImage, rank: str) -> GridRow:
    """Class A's image alone, with A's own prompt's map and with each other prompt's map."""
    first = rows[0]
    cells = [
        GridCell(None),
        GridCell(
            cross.example_own_maps[first].mean(axis=0),
            f"own prompt\np = {cross.example_probability_image_class[first]:.2f}",
        ),
    ]
    for row in rows:
        prompt_class = str(cross.label_names[cross.pairs[row][1]])
        title = taxon_lines(prompt_class, rank, TITLE_CHARS)
        probability = cross.example_probability_prompt_class[row]
        cells.append(
            GridCell(cross.example_cross_maps[row].mean(axis=0), f"{title}\np = {probability:.2f}")
        )
    image_class = str(cross.label_names[cross.pairs[first][0]])
    label = taxon_lines(image_class, rank, TITLE_CHARS)
    return GridRow(picture.image, tuple(cells), label, picture.mask(rank))


def draw_cross_class(
    *,
    cross_class_tsv: Path,
    cross_class_npz: Path,
    images: ImageSource,
    rank: str,
    out_stem: Path,
    style: FigureStyle,
    settings: CrossClassSettings,
) -> list[Path]:
    """``out_stem``.pdf/.png, one page: up to ``settings.max_pairs`` pairs (A, B), one row per
    image class A: A's representative test image alone, with A's own prompt's map and with each
    B's prompt's map (mean over heads), each titled with that class's probability there; one
    colour scale. Pairs whose class A has no correctly classified test image are left out and
    logged."""
    cross = read_cross_class(cross_class_tsv, cross_class_npz)
    if not cross.has_examples:
        raise ValueError(
            f"{cross_class_npz} has no per-image examples (written before they existed): "
            "rerun the traits rule"
        )
    rows, without_image = chosen_pairs(cross, settings.max_pairs)
    if not rows:
        raise ValueError(f"{cross_class_tsv}: no pair has a correctly classified image to draw")
    grouped = rows_by_image_class(cross, rows)
    LOGGER.info(
        "cross-class (%s): %d of %d pairs drawn (%d image classes) from %s; %d pairs without a "
        "correctly classified test image of the image class",
        rank,
        sum(len(pair_rows) for pair_rows in grouped.values()),
        len(cross.table),
        len(grouped),
        cross_class_tsv,
        without_image,
    )
    firsts = [pair_rows[0] for pair_rows in grouped.values()]
    pictures = images.images({str(cross.example_image[row]) for row in firsts})
    grid_rows = [
        cross_class_row(cross, pair_rows, pictures[str(cross.example_image[pair_rows[0]])], rank)
        for pair_rows in grouped.values()
    ]
    with styled(style):  # one page: cells shrink to fit max_pairs rows into its height
        fig = grid_figure(
            grid_rows,
            title=f"Cross-class attention ({rank})",
            style=style,
            columns=settings.columns,
            vmax=shared_vmax(grid_rows),
            note=CROSS_NOTE,
        )
        return save_figure(fig, Path(out_stem), style)
