"""Summary figures (promptcam.figures.summaries, .confusion) from the tiny run's files, plus a
synthetic 150-class confusion: the files are journal-ready and the figures show the data."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.collections import LineCollection, QuadMesh
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.text import Text

from promptcam.evaluation.tables import (
    read_confusion,
    read_fidelity,
    read_fidelity_curves,
    read_localization_table,
    write_confusion_tsv,
    write_localization_table,
)
from promptcam.figures import summaries
from promptcam.figures.confusion import build_confusion, cluster_order, row_normalised
from promptcam.figures.style import FigureStyle, styled
from promptcam.training.metrics import read_metrics
from tests.figure_checks import (
    assert_fonts_embedded_truetype,
    assert_png_shows_something,
    pdf_page_mm,
)

RANKS = ("family", "genus", "species")
STYLE = FigureStyle()


@pytest.fixture(scope="module")
def results(tiny_pipeline) -> Path:
    return tiny_pipeline.workdir / "results"


def per_rank(results: Path, name: str) -> dict[str, Path]:
    return {rank: results / rank / name for rank in RANKS}


@pytest.fixture(scope="module")
def tiny_curves(results: Path) -> dict[str, Path]:
    """The tiny run's own fidelity_curves.tsv (the fidelity rule's) of every rank."""
    return per_rank(results, "fidelity_curves.tsv")


# ----------------------------------------------------------------------------- checks


def check_files(paths: list[Path], stem: Path, columns: int) -> None:
    """PDF + PNG written, TrueType fonts, the page as wide as the columns, not blank."""
    assert paths == [stem.with_suffix(".pdf"), stem.with_suffix(".png")]
    assert_fonts_embedded_truetype(paths[0])
    width, height = pdf_page_mm(paths[0])
    assert abs(width - STYLE.width_mm(columns)) < 0.5, (paths[0], width)
    assert height <= STYLE.max_height_mm + 0.5
    assert_png_shows_something(paths[1], STYLE.dpi)


def visible_texts(fig: Figure) -> list[Text]:
    """The texts a reader sees: tick labels only of the ticks drawn (matplotlib keeps labels
    of ticks outside the view, which are not drawn)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    all_tick_labels, drawn = set(), set()
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                all_tick_labels |= {id(tick.label1), id(tick.label2)}
            for tick in axis._update_ticks():
                drawn |= {id(tick.label1), id(tick.label2)}
    texts = [
        text
        for text in fig.findobj(Text)
        if text.get_visible()
        and text.get_text().strip()
        and (id(text) not in all_tick_labels or id(text) in drawn)
    ]
    return [t for t in texts if t.get_window_extent(renderer).width > 0]


def assert_no_overlapping_text(fig: Figure) -> None:
    """No two visible texts' boxes overlap, and every text lies inside the figure."""
    renderer = fig.canvas.get_renderer()
    texts = visible_texts(fig)
    boxes = [t.get_window_extent(renderer) for t in texts]
    page = fig.bbox
    for text, box in zip(texts, boxes, strict=True):
        assert box.x0 >= page.x0 - 1 and box.x1 <= page.x1 + 1, f"clipped: {text.get_text()!r}"
        assert box.y0 >= page.y0 - 1 and box.y1 <= page.y1 + 1, f"clipped: {text.get_text()!r}"
    for (a, box_a), (b, box_b) in itertools.combinations(zip(texts, boxes, strict=True), 2):
        overlap_w = min(box_a.x1, box_b.x1) - max(box_a.x0, box_b.x0)
        overlap_h = min(box_a.y1, box_b.y1) - max(box_a.y0, box_b.y0)
        assert overlap_w <= 0.5 or overlap_h <= 0.5, (a.get_text(), b.get_text())


def bar_heights(ax) -> list[float]:
    return [p.get_height() for p in ax.patches if isinstance(p, Rectangle)]


def built(build, **kwargs) -> Figure:
    with styled(STYLE):
        fig = build(style=STYLE, **kwargs)
        assert_no_overlapping_text(fig)
    return fig


# ----------------------------------------------------------------------------- accuracy


def test_accuracy_bars_are_the_reported_accuracies(results: Path, tmp_path: Path) -> None:
    reports = per_rank(results, "eval.json")
    fig = built(summaries.build_accuracy, eval_reports=reports)
    ax = fig.axes[0]
    expected, chance = [], []
    for path in reports.values():
        report = json.loads(path.read_text())
        expected.append(100 * report["top1"])
        chance.append(100 * report["chance_top1"])
    probe = [100 * json.loads(p.read_text())["linear_probe_top1"] for p in reports.values()]
    np.testing.assert_allclose(bar_heights(ax), expected + probe)
    levels = np.concatenate(
        [c.get_segments() for c in ax.collections if isinstance(c, LineCollection)]
    )
    np.testing.assert_allclose(sorted(levels[:, 0, 1]), sorted(chance * 2))
    assert [t.get_text() for t in ax.get_xticklabels()] == ["Family", "Genus", "Species"]
    plt.close(fig)
    stem = tmp_path / "accuracy"
    check_files(summaries.draw_accuracy(eval_reports=reports, out_stem=stem, style=STYLE), stem, 1)


def test_accuracy_names_a_stale_file(tmp_path: Path) -> None:
    bad = tmp_path / "eval.json"
    bad.write_text(json.dumps({"top1": 0.5}))
    with pytest.raises(ValueError, match=r"eval\.json.*chance_top1.*evaluate"):
        summaries.draw_accuracy(eval_reports={"genus": bad}, out_stem=tmp_path / "a", style=STYLE)
    assert not (tmp_path / "a.pdf").exists()


# ----------------------------------------------------------------------------- training


def test_training_curves_show_every_epoch(results: Path, tmp_path: Path) -> None:
    metrics = per_rank(results, "metrics.tsv")
    fig = built(summaries.build_training_curves, metrics=metrics)
    axes = [ax for ax in fig.axes if ax.lines]
    assert len(axes) == 2 * len(RANKS)
    for k, path in enumerate(metrics.values()):
        table = read_metrics(path)
        loss_ax, top1_ax = axes[2 * k], axes[2 * k + 1]
        np.testing.assert_allclose(loss_ax.lines[0].get_ydata(), table["train_loss"])
        np.testing.assert_allclose(loss_ax.lines[1].get_ydata(), table["val_loss"])
        np.testing.assert_allclose(top1_ax.lines[0].get_ydata(), 100 * table["val_top1"])
        np.testing.assert_array_equal(top1_ax.lines[0].get_xdata(), table["epoch"])
    plt.close(fig)
    stem = tmp_path / "training"
    check_files(
        summaries.draw_training_curves(metrics=metrics, out_stem=stem, style=STYLE), stem, 2
    )


# ----------------------------------------------------------------------------- confusion


def heat_values(fig: Figure) -> np.ndarray:
    mesh = next(c for ax in fig.axes for c in ax.collections if isinstance(c, QuadMesh))
    return np.ma.filled(mesh.get_array(), 0.0)


def test_confusion_of_the_tiny_run(results: Path, tmp_path: Path) -> None:
    path = results / "species" / "confusion.tsv"
    counts = read_confusion(path)
    fig = built(build_confusion, confusion=path, rank="species")
    shares = row_normalised(counts)
    order = cluster_order(shares)
    values = heat_values(fig).reshape(len(counts), len(counts))
    np.testing.assert_allclose(values, shares.iloc[order, order].to_numpy())
    np.testing.assert_allclose(values.sum(axis=1)[counts.sum(axis=1).to_numpy()[order] > 0], 1)
    ax = fig.axes[0]
    names = [t.get_text() for t in ax.get_yticklabels()]
    assert names == [counts.index[i] for i in order]  # 8 species: the names fit
    assert all(t.get_fontsize() >= 5 for t in ax.get_yticklabels())
    assert all(t.get_fontstyle() == "italic" for t in ax.get_yticklabels())
    assert len(fig.axes) == 2  # the heat map and its colorbar
    plt.close(fig)
    stem = tmp_path / "confusion"
    written = summaries.draw_confusion(confusion=path, rank="species", out_stem=stem, style=STYLE)
    check_files(written, stem, 2)  # 8 species' names and cells at full size need two columns
    stem = tmp_path / "confusion_genus"
    written = summaries.draw_confusion(
        confusion=results / "genus" / "confusion.tsv", rank="genus", out_stem=stem, style=STYLE
    )
    check_files(written, stem, 1)  # 4 genera fit one column


def synthetic_confusion(path: Path, num_classes: int = 150, block: int = 5) -> list[set[int]]:
    """Counts with confusion only inside hidden blocks of ``block`` classes."""
    rng = np.random.default_rng(0)
    counts = np.diag(rng.integers(5, 20, num_classes))
    blocks = [set(b) for b in np.split(rng.permutation(num_classes), num_classes // block)]
    for members in blocks:
        for i, j in itertools.permutations(sorted(members), 2):
            counts[i, j] += rng.integers(1, 4)
    write_confusion_tsv(path, counts, [f"Taxon{i:03d} name{i:03d}" for i in range(num_classes)])
    return blocks


def test_confusion_of_150_classes_clusters_and_drops_names(tmp_path: Path) -> None:
    path = tmp_path / "confusion.tsv"
    blocks = synthetic_confusion(path)
    order = cluster_order(row_normalised(read_confusion(path)))
    position = {cls: k for k, cls in enumerate(order)}
    for members in blocks:  # each hidden block of confused classes is contiguous
        places = sorted(position[c] for c in members)
        assert places[-1] - places[0] == len(members) - 1, places
    fig = built(build_confusion, confusion=path, rank="species", columns=2)
    ax = fig.axes[0]
    assert not [t for t in ax.get_xticklabels() + ax.get_yticklabels() if t.get_text()]
    assert "150 classes" in ax.get_xlabel() and "left out" in ax.get_xlabel()
    assert heat_values(fig).size == 150 * 150
    plt.close(fig)
    stem = tmp_path / "confusion150"
    written = summaries.draw_confusion(confusion=path, rank="species", out_stem=stem, style=STYLE)
    check_files(written, stem, 2)


# ----------------------------------------------------------------------------- fidelity


def test_fidelity_curves_and_their_aucs(tiny_curves: dict[str, Path], tmp_path: Path) -> None:
    fig = built(summaries.build_fidelity_curves, curves=tiny_curves)
    panels = [(model, mode) for model in ("prompt_cam", "linear_probe")
              for mode in ("insertion", "deletion")]  # fmt: skip
    axes = np.array([ax for ax in fig.axes if ax.lines]).reshape(len(panels), len(tiny_curves))
    for column, path in enumerate(tiny_curves.values()):
        curves = read_fidelity_curves(path)
        table = read_fidelity(path.with_name("fidelity.tsv"))
        for row, (model, mode) in enumerate(panels):
            ax = axes[row, column]
            rows = table[table["model"] == model]
            assert "random" in set(rows["method"])
            labels = [t.get_text() for t in ax.get_legend().get_texts()]
            assert labels == [f"{v:.2f}" for v in rows[mode]]  # the AUCs of fidelity.tsv
            assert len(ax.lines) == len(rows)
            for line, method in zip(ax.lines, rows["method"], strict=True):
                curve = curves[
                    (curves["method"] == method)
                    & (curves["model"] == model)
                    & (curves["mode"] == mode)
                ]
                np.testing.assert_allclose(line.get_xdata(), 100 * curve["fraction"])
                np.testing.assert_allclose(line.get_ydata(), curve["probability"])
            clean = [t.get_text() for t in ax.texts if t.get_text().startswith("clean")]
            assert clean == [f"clean {rows['clean_probability'].iloc[0]:.2f}"]
    plt.close(fig)
    stem = tmp_path / "fidelity"
    written = summaries.draw_fidelity_curves(curves=tiny_curves, out_stem=stem, style=STYLE)
    check_files(written, stem, 2)


# ----------------------------------------------------------------------------- localization


@pytest.fixture(scope="module")
def localization_tables(tmp_path_factory) -> dict[str, Path]:
    """localization.tsv per rank from hand-made maps (the tiny run predates the table): every
    kind of row, one baseline per model, one rank without masks (nothing scored)."""
    from promptcam.evaluation.localization import fit_fixed_place_prior, localization_rows

    out = tmp_path_factory.mktemp("localization")
    rng = np.random.default_rng(0)
    files = {}
    for rank, images in zip(RANKS, (12, 12, 0), strict=True):
        coverage = (rng.random((images, 4, 4)) < 0.2).astype(float)
        maps = rng.random((images, 3, 4, 4))
        table = localization_rows(
            maps=maps, kept=rng.random((images, 3)) < 0.6,
            order=np.tile(np.arange(3), (images, 1)), coverage=coverage,
            baselines={("grad_cam", "linear_probe"): rng.random((images, 4, 4)),
                       ("layer_cam", "prompt_cam"): rng.random((images, 4, 4))},
            prior=fit_fixed_place_prior(coverage),
        )  # fmt: skip
        files[rank] = out / f"{rank}.tsv"
        write_localization_table(files[rank], table)
    return files


def test_localization_bars_chance_and_specificity(
    results: Path, localization_tables: dict[str, Path], tmp_path: Path
) -> None:
    files = per_rank(results, "localization.json")
    reports = {rank: json.loads(path.read_text()) for rank, path in files.items()}
    fig = built(summaries.build_localization, localization=files, tables=localization_tables)
    bar_axes, heat_ax = fig.axes[:6], fig.axes[6]
    # Bars in drawing order: Prompt-CAM's own rows, the baselines on its model, on the probe,
    # then the random map; both chance levels over each bar.
    order = ["prompt_cam_top_head", "prompt_cam_kept_heads", "prompt_cam_kept_heads_pooled",
             "prompt_cam_best_fixed_head", "layer_cam", "grad_cam", "random"]  # fmt: skip
    for row, metric in enumerate(("pointing_game", "energy_in_mask")):
        for column, rank in enumerate(RANKS):
            ax = bar_axes[row * 3 + column]
            table = read_localization_table(localization_tables[rank]).set_index("method")
            expected = 100 * table.loc[order, metric].to_numpy(np.float64)
            widths = [p.get_width() for p in ax.patches if isinstance(p, Rectangle)]
            np.testing.assert_allclose(widths, expected[~np.isnan(expected)])
            chance = sorted(
                segment[0][0]
                for lines in ax.collections
                if isinstance(lines, LineCollection)
                for segment in lines.get_segments()
            )
            levels = table[[f"{metric}_uniform_chance", f"{metric}_fixed_place"]].to_numpy()
            np.testing.assert_allclose(chance, sorted(100 * levels[~np.isnan(levels)]))
            if rank == "species":  # no masks: nothing drawn, each row says n/a
                assert not widths and "n/a" in [t.get_text() for t in ax.texts]
    labels = [t.get_text() for t in bar_axes[0].get_yticklabels()]
    assert labels[3].startswith("Best fixed head (") and labels[-1] == "Random map"
    heat = np.ma.filled(heat_ax.collections[0].get_array(), np.nan).reshape(3, 3)
    expected = [
        [100 * r["by_trait"][t]["pointing_game"] if r["by_trait"][t]["pointing_game"] is not None
         else np.nan for t in RANKS] for r in reports.values()
    ]  # fmt: skip
    np.testing.assert_allclose(heat, expected)
    plt.close(fig)
    stem = tmp_path / "localization"
    written = summaries.draw_localization(
        localization=files, tables=localization_tables, out_stem=stem, style=STYLE
    )
    check_files(written, stem, 2)


# ----------------------------------------------------------------------------- counterfactual


def test_counterfactual_bars(results: Path, tmp_path: Path) -> None:
    files = per_rank(results, "counterfactual.json")
    reports = [json.loads(path.read_text()) for path in files.values()]
    fig = built(summaries.build_counterfactual, counterfactual=files)
    flip_ax, drop_ax = fig.axes[:2]
    for ax, kind in ((flip_ax, "flip_rate"), (drop_ax, "probability_drop")):
        expected = [100 * r[f"{w}_{kind}"] for w in ("top_trait", "random") for r in reports
                    if r[f"{w}_{kind}"] is not None]  # fmt: skip
        np.testing.assert_allclose(bar_heights(ax), expected)
    ticks = [t.get_text() for t in flip_ax.get_xticklabels()]
    assert ticks == [
        f"{r.title()}\n(n = {rep['n_images']})" for r, rep in zip(RANKS, reports, strict=True)
    ]
    plt.close(fig)
    stem = tmp_path / "counterfactual"
    written = summaries.draw_counterfactual(counterfactual=files, out_stem=stem, style=STYLE)
    check_files(written, stem, 1)


def test_counterfactual_without_images_draws_no_bars(results: Path, tmp_path: Path) -> None:
    empty = tmp_path / "counterfactual.json"
    report = json.loads((results / "genus" / "counterfactual.json").read_text())
    keys = ("top_trait_flip_rate", "random_flip_rate", "top_trait_probability_drop",
            "random_probability_drop")  # fmt: skip
    empty.write_text(json.dumps({**report, **dict.fromkeys(keys), "n_images": 0}))
    files = {"family": results / "family" / "counterfactual.json", "genus": empty}
    fig = built(summaries.build_counterfactual, counterfactual=files)
    assert len(bar_heights(fig.axes[0])) == 2  # family's two bars only
    plt.close(fig)
