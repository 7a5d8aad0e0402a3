"""Trait panels, gallery and cross-class figure: drawn from the tiny run's files, checked for
what a journal and a reader need (TrueType fonts, column width, the data where it belongs,
legible text, nothing silently left out)."""

from __future__ import annotations

import logging
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from figure_checks import assert_fonts_embedded_truetype, assert_png_shows_something, pdf_page_mm
from matplotlib.text import Text

from promptcam.figures.cross_class import chosen_pairs, draw_cross_class
from promptcam.figures.gallery import draw_gallery
from promptcam.figures.panels import (
    PanelRow,
    draw_panel_rows,
    draw_trait_panels,
    grid_figure,
    panel_grid_row,
    shared_vmax,
    typical_images,
)
from promptcam.figures.settings import CrossClassSettings, GallerySettings, PanelSettings
from promptcam.figures.sources import shard_images
from promptcam.figures.style import FigureStyle, styled
from promptcam.traits.tables import CrossClass, read_cross_class, read_search_table, read_trait_maps

STYLE = FigureStyle()
LEVELS = ("family", "genus", "species")


@pytest.fixture(scope="module")
def results(tiny_pipeline) -> Path:
    return tiny_pipeline.workdir / "results"


@pytest.fixture(scope="module")
def images(results):
    return shard_images(results / "shards", LEVELS)


@pytest.fixture(scope="module")
def cross_class_dir(results, tmp_path_factory) -> Path:
    """The tiny run's genus cross-class files; rewritten by the traits stage itself (same
    model and shards, into a temporary folder) where the run predates the per-image examples."""
    rank_dir = results / "genus"
    if read_cross_class(rank_dir / "cross_class.tsv", rank_dir / "cross_class.npz").has_examples:
        return rank_dir
    from promptcam.traits.cross_class import siblings_from_taxonomy
    from promptcam.traits.run import TraitRunConfig, run_rank_traits

    out = tmp_path_factory.mktemp("traits_genus")
    files = {
        "table": "traits.parquet",
        "maps": "trait_maps.npz",
        "summary": "trait_summary.tsv",
        "summary_maps": "trait_summary.npz",
        "cross_class": "cross_class.tsv",
        "cross_class_maps": "cross_class.npz",
    }
    run_rank_traits(
        checkpoint=rank_dir / "model.pt",
        shards_dir=results / "shards",
        rank="genus",
        outputs={key: out / name for key, name in files.items()},
        config=TraitRunConfig(batch_size=16, threads=1, device="cpu"),
        siblings=siblings_from_taxonomy(results / "data" / "taxonomy.nwk", "genus"),
        head_information=rank_dir / "head_information.tsv",
    )
    return out


def assert_journal_ready(pdf: Path, columns: int) -> None:
    """TrueType fonts, the configured column width, at most the page's height; its PNG shows
    something."""
    assert_fonts_embedded_truetype(pdf)
    width, height = pdf_page_mm(pdf)
    assert width == pytest.approx(STYLE.width_mm(columns), abs=0.5)
    assert height <= STYLE.max_height_mm + 0.5
    assert_png_shows_something(pdf.with_suffix(".png"))


def assert_no_text_overlaps(fig) -> None:
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    hidden = {  # an axes turned off draws none of its axis' texts
        id(t) for ax in fig.axes if not ax.axison for axis in (ax.xaxis, ax.yaxis)
        for t in axis.findobj(Text)
    }  # fmt: skip
    texts = [t for t in fig.findobj(Text) if t.get_visible() and id(t) not in hidden]
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in texts if t.get_text().strip()]
    assert len(boxes) > 3
    for (text_a, a), (text_b, b) in combinations(boxes, 2):
        assert not a.overlaps(b), f"{text_a!r} overlaps {text_b!r}"
    page = fig.bbox
    for text, box in boxes:  # nothing clipped at the page's edge
        assert box.x0 >= page.x0 - 1 and box.x1 <= page.x1 + 1, text
        assert box.y0 >= page.y0 - 1 and box.y1 <= page.y1 + 1, text


def test_trait_panels_one_file_per_class_with_images(results, images, tmp_path, caplog) -> None:
    rank_dir = results / "species"
    table = read_search_table(rank_dir / "traits.parquet")
    with_images = sorted(set(table.loc[table["correct"], "target"]))
    names = read_trait_maps(rank_dir / "trait_maps.npz").label_names
    assert 0 < len(with_images) < len(names)  # the tiny run leaves some species out
    with caplog.at_level(logging.INFO, logger="promptcam.figures.panels"):
        written = draw_trait_panels(
            traits_table=rank_dir / "traits.parquet",
            trait_maps=rank_dir / "trait_maps.npz",
            images=images,
            rank="species",
            out_dir=tmp_path,
            style=STYLE,
            settings=PanelSettings(images_per_class=2, max_classes=None, columns=2),
        )
    pdfs = sorted(p for p in written if p.suffix == ".pdf")
    assert [int(p.name[:3]) for p in pdfs] == with_images
    assert all(" " not in p.name for p in pdfs)
    for pdf in pdfs:
        assert_journal_ready(pdf, columns=2)
    skipped = len(names) - len(with_images)
    assert f"{skipped} without correctly classified test images" in caplog.text


def test_typical_images_are_the_highest_scoring_correct_ones(results) -> None:
    table = read_search_table(results / "genus" / "traits.parquet")
    names = read_trait_maps(results / "genus" / "trait_maps.npz").label_names
    selection = typical_images(table, names, per_class=2, max_classes=1)
    assert len(selection.images) == 1
    ((index, chosen),) = selection.images.items()
    per_image = table.drop_duplicates("image")
    ours = per_image[(per_image["target"] == index) & per_image["correct"]]
    assert [s for _, s in chosen] == sorted(ours["base_score"], reverse=True)[:2]
    assert len(selection.over_limit) + len(selection.skipped) == len(names) - 1


def test_panel_text_does_not_overlap(results, images) -> None:
    maps = read_trait_maps(results / "genus" / "trait_maps.npz")
    rows = np.nonzero(maps.searched)[0][:3]
    pictures = images.images([str(maps.image[r]) for r in rows])
    panel_rows = [
        PanelRow(
            image=pictures[str(maps.image[r])].image,
            maps=stored,
            heads=tuple(maps.kept_heads(int(r))),
            label=str(maps.image[r]),
            score=0.5,
            mask=pictures[str(maps.image[r])].mask("genus"),
        )
        for r, stored in zip(rows, maps.read_maps(rows), strict=True)
    ]
    grid_rows = [panel_grid_row(row) for row in panel_rows]
    with styled(STYLE):
        fig = grid_figure(
            grid_rows,
            title="Tholus (genus)",
            style=STYLE,
            columns=2,
            vmax=shared_vmax(grid_rows),
            note="A note long enough to need wrapping at the page's width, " * 3,
        )
        assert_no_text_overlaps(fig)


@pytest.mark.parametrize("peak", [(1, 5), (6, 2)])
def test_overlay_hottest_pixel_lies_in_the_peak_cell(peak) -> None:
    """A black, non-square image and one head with a single peak: the brightest pixel of that
    head's axes is in the peak's grid cell (not transposed, not flipped)."""
    grid = np.full((2, 8, 8), 1e-3, dtype=np.float32)
    grid[1][peak] = 1.0
    row = PanelRow(np.zeros((60, 120, 3), np.uint8), grid, (1,), "synthetic", 0.9)
    with styled(STYLE):
        fig = grid_figure([panel_grid_row(row)], title="peak", style=STYLE, columns=1, vmax=1.0)
        fig.canvas.draw()
        pixels = np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(float)
        ax = next(a for a in fig.axes if a.get_label() == "cell 0 1")
        box = ax.get_window_extent()
    top = pixels.shape[0]
    crop = pixels[int(top - box.y1) + 1 : int(top - box.y0) - 1, int(box.x0) + 1 : int(box.x1) - 1]
    y, x = np.unravel_index(crop.sum(axis=-1).argmax(), crop.shape[:2])
    assert (int(y * 8 / crop.shape[0]), int(x * 8 / crop.shape[1])) == peak


def test_draw_panel_rows_paginates_and_keeps_the_stem(tmp_path) -> None:
    rng = np.random.default_rng(0)
    rows = [
        PanelRow(
            rng.integers(0, 255, (32, 32, 3), dtype=np.uint8),
            rng.random((2, 4, 4), dtype=np.float32),
            (1, 0),
            f"image_{i}.jpg",
            0.8,
        )
        for i in range(4)
    ]
    short = FigureStyle(max_height_mm=70.0)
    written = draw_panel_rows(
        rows, title="explain", out_stem=tmp_path / "x", style=short, columns=1
    )
    pdfs = [p for p in written if p.suffix == ".pdf"]
    assert pdfs[:2] == [tmp_path / "x.pdf", tmp_path / "x_p02.pdf"]
    for pdf in pdfs:
        assert_fonts_embedded_truetype(pdf)
        width, height = pdf_page_mm(pdf)
        assert height <= 70.5 and width == pytest.approx(short.width_mm(1), abs=0.5)


def test_gallery_one_page_per_class_at_one_row_per_page(results, images, tmp_path) -> None:
    rank_dir = results / "genus"
    table = read_search_table(rank_dir / "traits.parquet")
    classes = table.loc[table["correct"], "target"].nunique()
    written = draw_gallery(
        traits_table=rank_dir / "traits.parquet",
        trait_maps=rank_dir / "trait_maps.npz",
        images=images,
        rank="genus",
        out_dir=tmp_path,
        style=STYLE,
        settings=GallerySettings(rows_per_page=1, columns=1),
    )
    pdfs = sorted(p for p in written if p.suffix == ".pdf")
    assert [p.name for p in pdfs] == [f"page_{i:02d}.pdf" for i in range(1, classes + 1)]
    assert_journal_ready(pdfs[0], columns=1)


def test_gallery_page_stays_within_the_page_height(results, images, tmp_path) -> None:
    rank_dir = results / "genus"
    written = draw_gallery(
        traits_table=rank_dir / "traits.parquet",
        trait_maps=rank_dir / "trait_maps.npz",
        images=images,
        rank="genus",
        out_dir=tmp_path,
        style=FigureStyle(max_height_mm=60.0),
        settings=GallerySettings(rows_per_page=4, columns=1),
    )
    width, height = pdf_page_mm(written[0])
    assert height <= 60.5 and width == pytest.approx(STYLE.width_mm(1), abs=0.5)


def test_cross_class_figure(cross_class_dir, images, tmp_path) -> None:
    cross = read_cross_class(
        cross_class_dir / "cross_class.tsv", cross_class_dir / "cross_class.npz"
    )
    assert (cross.example_image != "").any()
    written = draw_cross_class(
        cross_class_tsv=cross_class_dir / "cross_class.tsv",
        cross_class_npz=cross_class_dir / "cross_class.npz",
        images=images,
        rank="genus",
        out_stem=tmp_path / "cross_class",
        style=STYLE,
        settings=CrossClassSettings(max_pairs=2, columns=1),
    )
    assert written == [tmp_path / "cross_class.pdf", tmp_path / "cross_class.png"]
    assert_journal_ready(written[0], columns=1)


def test_cross_class_refuses_files_without_examples(tmp_path, images) -> None:
    tsv, npz = tmp_path / "cross_class.tsv", tmp_path / "cross_class.npz"
    tsv.write_text("image_class\tprompt_class\trelation\tn_images\n")
    np.savez(npz, cross_maps=np.zeros((0, 1, 1, 1)), own_maps=np.zeros((0, 1, 1, 1)),
             pairs=np.zeros((0, 2), int), label_names=np.array(["a"]))  # fmt: skip
    with pytest.raises(ValueError, match="rerun the traits rule"):
        draw_cross_class(
            cross_class_tsv=tsv,
            cross_class_npz=npz,
            images=images,
            rank="genus",
            out_stem=tmp_path / "x",
            style=STYLE,
            settings=CrossClassSettings(),
        )


def test_cross_class_pairs_spread_over_image_classes() -> None:
    """A class with many siblings does not take the page: two pairs per image class a round,
    configured pairs first."""
    image_classes = ["A"] * 5 + ["B"] * 2 + ["C"] * 2
    prompts = ["B", "C", "D", "E", "F", "A", "C", "A", "B"]
    relation = ["sibling"] * 8 + ["configured"]
    table = pd.DataFrame(
        {
            "image_class": image_classes,
            "prompt_class": prompts,
            "relation": relation,
            "n_images": [9] * 5 + [3] * 2 + [2] * 2,
        }
    )
    count = len(table)
    cross = CrossClass(
        table=table,
        cross_maps=np.zeros((count, 1, 2, 2)),
        own_maps=np.zeros((count, 1, 2, 2)),
        pairs=np.zeros((count, 2), dtype=np.int64),
        label_names=np.array(list("ABCDEF")),
        example_image=np.array(["x"] * count),
    )
    rows, without_image = chosen_pairs(cross, max_pairs=5)
    assert without_image == 0
    assert rows[0] == 8  # the configured pair
    chosen = table.iloc[rows]
    assert sorted(chosen["image_class"].value_counts().to_dict().items()) == [
        ("A", 2),
        ("B", 2),
        ("C", 1),
    ]
