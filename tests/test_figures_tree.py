"""The figures across ranks: the coarse-to-fine figure and the ete3 tree overview, drawn from
the tiny pipeline run (and from hand-made rows where a property needs exact data)."""

from __future__ import annotations

import itertools
import logging
import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import numpy as np
import pandas as pd
import pytest
from figure_checks import assert_fonts_embedded_truetype, assert_png_shows_something, pdf_page_mm
from matplotlib import colormaps

from promptcam.data.taxonomy import load_taxonomy
from promptcam.figures.coarse_to_fine import RankRow, draw_coarse_to_fine, path_figure
from promptcam.figures.settings import CoarseToFineSettings, TreeSettings
from promptcam.figures.sources import shard_images
from promptcam.figures.style import FigureStyle
from promptcam.figures.tree import cap_leaves, draw_tree_overview, select_clade
from promptcam.traits.tables import read_trait_maps

STYLE = FigureStyle()
LEVELS = ["family", "genus", "species"]


def inputs(tiny_pipeline, levels=LEVELS) -> dict:
    results = tiny_pipeline.workdir / "results"
    return {
        "levels": levels,
        "traits_tables": {r: results / r / "traits.parquet" for r in levels},
        "trait_maps": {r: results / r / "trait_maps.npz" for r in levels},
        "taxonomy": results / "data" / "taxonomy.nwk",
        "images": shard_images(results / "shards", LEVELS),
        "style": STYLE,
    }


def assert_paper_ready(pdf, png, columns: int = 2) -> None:
    assert pdf.exists() and png.exists()
    assert_fonts_embedded_truetype(pdf)
    width, height = pdf_page_mm(pdf)
    assert abs(width - STYLE.width_mm(columns)) < 0.5, width
    assert height <= STYLE.max_height_mm + 0.5, height
    assert_png_shows_something(png)


def drawn_texts(fig) -> list:
    """Every Text the figure draws (tick labels only of axes that show their axis)."""
    texts = [*fig.texts, fig._suptitle, fig._supxlabel]
    for ax in fig.axes:
        texts += [*ax.texts, ax.title, ax._left_title, ax._right_title]
        if ax.axison:
            texts += [*ax.get_xticklabels(), *ax.get_yticklabels(), ax.xaxis.label,
                      ax.yaxis.label]  # fmt: skip
    unique = {id(t): t for t in texts if t is not None}  # the suptitle is in fig.texts too
    return [t for t in unique.values() if t.get_visible() and t.get_text().strip()]


def assert_no_text_overlap(fig) -> None:
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    texts = drawn_texts(fig)
    assert len(texts) > 5
    boxes = [t.get_window_extent(renderer) for t in texts]
    for i, a in enumerate(boxes):
        for j, b in enumerate(boxes[i + 1 :], start=i + 1):
            assert not a.overlaps(b), (texts[i].get_text(), texts[j].get_text())


def hand_rows(ranks: int, heads: int = 8, grid: int = 8, seed: int = 0) -> list[RankRow]:
    rng = np.random.default_rng(seed)
    names = ["Familia", "Genus", "Genus species", "Genus species sub", "x"]
    return [
        RankRow(
            rank=["family", "genus", "species", "subspecies", "form"][k],
            taxon=names[k],
            probability=0.9,
            maps=rng.random((heads, grid, grid)).astype(np.float32) * 0.2,
            heads=tuple(int(h) for h in rng.permutation(heads)[:4]),
        )
        for k in range(ranks)
    ]


@pytest.mark.parametrize("ranks", [2, 4])
def test_path_figure_has_one_panel_row_per_rank(ranks):
    image = np.random.default_rng(1).integers(0, 255, (96, 128, 3), dtype=np.uint8)
    rows = hand_rows(ranks)
    fig = path_figure(image, rows, title="test", style=STYLE, columns=2)
    fig.canvas.draw()
    extents = {}
    for ax in fig.axes:
        gid = ax.get_gid() or ""
        if gid.startswith("map:"):
            extents.setdefault(gid.split(":")[1], []).append(ax.get_position())
    assert list(extents) == [r.rank for r in rows]  # coarse to fine, top to bottom
    tops = []
    for rank, positions in extents.items():
        centres = {round((p.y0 + p.y1) / 2, 3) for p in positions}
        assert len(centres) == 1, (rank, centres)
        assert len(positions) == 4
        tops.append((min(p.y0 for p in positions), max(p.y1 for p in positions)))
    for (low_above, _), (_, high_below) in itertools.pairwise(tops):
        assert high_below < low_above  # rows do not overlap and go downwards
    assert sum(1 for ax in fig.axes if ax.get_gid() == "image") == 1  # the image once
    assert_no_text_overlap(fig)


def test_path_figure_overlay_peaks_in_the_stored_cell():
    height, width, grid = 96, 128, 8
    image = np.full((height, width, 3), 128, dtype=np.uint8)
    maps = np.zeros((2, grid, grid), dtype=np.float32)
    maps[1, 2, 6] = 0.5  # row 2, column 6 only: a transposed or flipped map lands elsewhere
    row = RankRow(rank="genus", taxon="Genus", probability=0.8, maps=maps, heads=(1,))
    fig = path_figure(image, [row], title="peak", style=STYLE, columns=1)
    fig.canvas.draw()
    ax = next(a for a in fig.axes if a.get_gid() == "map:genus:1")
    pixels = np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(float)
    box = ax.get_window_extent()
    top = pixels.shape[0] - int(np.ceil(box.y1))
    crop = pixels[top : pixels.shape[0] - int(box.y0), int(box.x0) : int(np.ceil(box.x1))]
    peak_colour = np.asarray(colormaps[STYLE.attention_cmap](1.0)[:3]) * 255
    distance = np.abs(crop - peak_colour).sum(axis=-1)
    y, x = np.unravel_index(np.argmin(distance), distance.shape)
    assert int(y / crop.shape[0] * grid) == 2 and int(x / crop.shape[1] * grid) == 6, (y, x)
    assert crop.std() > 5  # not blank


def drawable(tiny_pipeline, levels) -> pd.Series:
    """Finest-rank label per test image searched (correct) at every one of ``levels``."""
    results = tiny_pipeline.workdir / "results"
    maps = {r: read_trait_maps(results / r / "trait_maps.npz") for r in levels}
    finest = maps[levels[-1]]
    ok = np.all([maps[r].searched for r in levels], axis=0)
    return pd.Series(finest.label_names[finest.target[ok]], index=finest.image[ok])


@pytest.mark.parametrize("levels", [["family", "genus"], LEVELS])
def test_coarse_to_fine_draws_or_lists_every_taxon(tiny_pipeline, tmp_path, levels, caplog):
    caplog.set_level(logging.INFO)
    settings = CoarseToFineSettings()
    written = draw_coarse_to_fine(**inputs(tiny_pipeline, levels), out_dir=tmp_path,
                                  settings=settings)  # fmt: skip
    summary = pd.read_csv(tmp_path / "summary.tsv", sep="\t")
    tree = load_taxonomy(tiny_pipeline.workdir / "results" / "data" / "taxonomy.nwk")
    usable = set(drawable(tiny_pipeline, levels))
    parents = tree.search_nodes(rank=levels[-2])
    expected = [next((n for n in sorted(c.name for c in p.children) if n in usable), None)
                for p in sorted(parents, key=lambda p: p.name)]  # fmt: skip
    drawn = summary.loc[summary["status"] == "drawn", "taxon"].tolist()
    assert drawn == [name for name in expected if name is not None]
    assert (summary["status"] == "skipped").sum() == expected.count(None)  # nothing lost
    for name in drawn:
        stem = tmp_path / name.replace(" ", "_")
        assert_paper_ready(stem.with_suffix(".pdf"), stem.with_suffix(".png"))
    assert len(written) == 2 * len(drawn) + 1
    assert f"skipped {expected.count(None)}" in caplog.text


def test_coarse_to_fine_unknown_species_names_the_closest(tiny_pipeline, tmp_path):
    settings = CoarseToFineSettings(species=("Didymus anterofasciatu",))
    with pytest.raises(
        ValueError, match=r"Didymus anterofasciatu.*closest.*Didymus anterofasciatus"
    ):
        draw_coarse_to_fine(**inputs(tiny_pipeline), out_dir=tmp_path, settings=settings)


def test_tree_overview_is_paper_ready(tiny_pipeline, tmp_path):
    written = draw_tree_overview(**inputs(tiny_pipeline), out_dir=tmp_path,
                                 settings=TreeSettings())  # fmt: skip
    assert sorted(p.name for p in written) == sorted(
        f"tree_{layout}{ext}" for layout in TreeSettings().layouts for ext in (".pdf", ".png")
    )
    for layout in TreeSettings().layouts:
        assert_paper_ready(tmp_path / f"tree_{layout}.pdf", tmp_path / f"tree_{layout}.png")
    assert not list(tmp_path.glob(".*"))  # no temporary files left


def test_tree_cap_keeps_every_rank_and_parent(tiny_pipeline):
    tree = load_taxonomy(tiny_pipeline.workdir / "results" / "data" / "taxonomy.nwk")
    genera = {n.name for n in tree.search_nodes(rank="genus")}
    left_out, how = cap_leaves(tree, len(genera))
    leaves = tree.get_leaves()
    assert len(leaves) == len(genera) and left_out > 0 and how
    assert {leaf.up.name for leaf in leaves} == genera  # one species per genus
    assert all(leaf.rank == "species" for leaf in leaves)  # no rank lost on the way


def test_tree_subtree_and_max_leaves(tiny_pipeline, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    tree = load_taxonomy(tiny_pipeline.workdir / "results" / "data" / "taxonomy.nwk")
    family = tree.search_nodes(rank="family")[0]
    clade = select_clade(tree, family.name)
    assert {leaf.name for leaf in clade.get_leaves()} == {leaf.name for leaf in family}
    settings = TreeSettings(subtree=family.name, max_leaves=2, layouts=("rectangular",))
    draw_tree_overview(**inputs(tiny_pipeline), out_dir=tmp_path, settings=settings)
    assert_paper_ready(tmp_path / "tree_rectangular.pdf", tmp_path / "tree_rectangular.png")
    left = len(family.get_leaves()) - 2
    assert f"{left} leaves left out" in caplog.text
    with pytest.raises(ValueError, match="closest"):
        select_clade(tree, family.name + "x")
