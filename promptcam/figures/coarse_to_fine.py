"""The coarse-to-fine figure: one test image seen by every rank's model, one row per rank.

Reading down, the reader sees the taxon on the specimen's path at each rank (family at the top,
species at the bottom), how sure that rank's model is, and the attention maps of the heads its
greedy trait search kept, most important first, with how often the search keeps each head on
that taxon's images. The specimen itself is shown once, on the left; each rank's ground-truth
trait is a dashed outline where the data has masks. One colour scale for the whole figure.

:func:`draw_path_figure` draws any such path (``promptcam explain`` draws a new photo with its
predicted path); :func:`draw_coarse_to_fine` picks, for each chosen finest-rank taxon, the test
image that every rank's model classified correctly and most confidently.
"""

from __future__ import annotations

import difflib
import itertools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import ConnectionPatch

from promptcam.data.taxonomy import ROOT_RANK, classes_at_rank, find_node, lineage, load_taxonomy
from promptcam.figures.overlay import attention_scale, draw_attention
from promptcam.figures.settings import CoarseToFineSettings
from promptcam.figures.sources import ImageSource
from promptcam.figures.style import FigureStyle, new_figure, save_figure, styled
from promptcam.figures.text import filename_safe, is_italic, text_width_mm, wrap_mm
from promptcam.io import atomic_open
from promptcam.traits.tables import TraitMaps, read_search_table, read_trait_maps

LOGGER = logging.getLogger(__name__)

MIN_PANEL_MM = 14.0  # a "#k head h" title at print size fits above the panel
MAX_PANEL_MM = 30.0
INDENT_MM = 2.5
COLORBAR_MM = 13.0
MAP_TITLE_MM = 6.5  # two lines of map title above each row
SUMMARY_NAME = "summary.tsv"


@dataclass(frozen=True)
class RankRow:
    """One rank of a path: the taxon there, its probability, and that taxon's prompt's maps
    (H_heads, h, w) with the heads to show, most important first. ``mask``: the rank's trait
    mask (image-sized bool) or None; ``keep_rates``: per shown head, the share of the taxon's
    correctly classified test images on which the search kept it (None: unknown, new photos)."""

    rank: str
    taxon: str
    probability: float
    maps: np.ndarray
    heads: tuple[int, ...]
    mask: np.ndarray | None = None
    keep_rates: tuple[float, ...] | None = None


def abbreviate_path(rows: Sequence[RankRow]) -> list[RankRow]:
    """Each taxon that repeats the one above it (``Homo sapiens`` under ``Homo``) with that
    part abbreviated (``H. sapiens``), as nomenclature does, for narrow figures."""
    out = [rows[0]] if rows else []
    for above, row in itertools.pairwise(rows):
        if row.taxon.startswith(above.taxon + " "):
            initials = " ".join(f"{word[0]}." for word in above.taxon.split(" "))
            row = replace(row, taxon=f"{initials} {row.taxon[len(above.taxon) + 1 :]}")
        out.append(row)
    return out


# ----------------------------------------------------------------------------- drawing


@dataclass(frozen=True)
class _Layout:
    panel_mm: float
    image_columns: float
    label_mm: float
    heads_shown: int
    height_mm: float


def _row_lines(row: RankRow) -> list[str]:
    return [row.rank, row.taxon, f"p = {row.probability:.2f}"]


def _layout(rows: Sequence[RankRow], style: FigureStyle, columns: int, levels: Sequence[str]):
    width = style.width_mm(columns)
    label = (
        max(
            (len(rows) - 1) * INDENT_MM
            + 3.0
            + max(
                text_width_mm(
                    line,
                    style.font_size,
                    style.font_family,
                    italic=(k == 1) and is_italic(r.rank, levels),
                )
                for k, line in enumerate(_row_lines(r))
            )
            for r in rows
        )
        + 2.0
    )
    image_columns = min(2.0, float(len(rows)))
    available = width - label - COLORBAR_MM - 4.0
    most_heads = max(1, max(len(r.heads) for r in rows))
    heads_shown = most_heads
    panel = available / (heads_shown + image_columns)
    if panel < MIN_PANEL_MM:
        heads_shown = max(1, int(available / MIN_PANEL_MM - image_columns))
        panel = available / (heads_shown + image_columns)
    fixed = 10.0 + 4.0  # suptitle and footnote
    panel = min(panel, MAX_PANEL_MM, (style.max_height_mm - fixed) / len(rows) - MAP_TITLE_MM)
    height = fixed + len(rows) * (panel + MAP_TITLE_MM)
    return _Layout(panel, image_columns, label, heads_shown, height)


def _draw_row_label(ax, row: RankRow, depth: int, style: FigureStyle, levels: Sequence[str]):
    """The rank as the row label: a node dot on the path, rank name, taxon, probability."""
    x_dot = depth * INDENT_MM + 1.0
    ax.plot([x_dot], [0.5], "o", color="black", markersize=3, clip_on=False)
    line_pt = style.font_size * 1.25
    small = max(5.0, style.font_size - 1.0)
    texts = [
        (row.rank, {"color": "0.35", "fontsize": small}),
        (row.taxon, {"style": "italic" if is_italic(row.rank, levels) else "normal"}),
        (f"p = {row.probability:.2f}", {"color": "0.35", "fontsize": small}),
    ]
    for k, (text, kwargs) in enumerate(texts):
        ax.annotate(text, (x_dot + 1.5, 0.5), xytext=(0, (1 - k) * line_pt),
                    textcoords="offset points", va="center", ha="left", **kwargs)  # fmt: skip
    return x_dot


def path_figure(
    image: np.ndarray,
    rows: Sequence[RankRow],
    *,
    title: str,
    style: FigureStyle,
    columns: int,
    levels: Sequence[str] | None = None,
) -> Figure:
    """The figure :func:`draw_path_figure` saves, not yet saved (for checks). Map axes carry
    the gid ``map:<rank>:<head>``, label axes ``label:<rank>``, the image axes ``image``."""
    if not rows:
        raise ValueError("a path figure needs at least one rank row")
    levels = [r.rank for r in rows] if levels is None else list(levels)
    if columns == 1:
        rows = abbreviate_path(rows)
    with styled(style):
        layout = _layout(rows, style, columns, levels)
        fig = new_figure(style, columns, layout.height_mm)
        shown = [list(zip(r.heads, r.keep_rates or [None] * len(r.heads), strict=True))[: layout.heads_shown] for r in rows]  # fmt: skip
        values = [r.maps[h] for r, pairs in zip(rows, shown, strict=True) for h, _ in pairs]
        vmax = float(max((v.max() for v in values), default=0.0)) or 1.0
        ratios = [layout.image_columns * layout.panel_mm, layout.label_mm]
        ratios += [layout.panel_mm] * layout.heads_shown
        grid = fig.add_gridspec(len(rows), len(ratios), width_ratios=ratios)
        ax_image = fig.add_subplot(grid[:, 0], gid="image")
        draw_attention(ax_image, image, None, vmax=vmax, cmap=style.attention_cmap)
        ax_image.set_title("image", fontsize=style.font_size)
        map_axes, previous = [], None
        for i, (row, pairs) in enumerate(zip(rows, shown, strict=True)):
            ax_label = fig.add_subplot(grid[i, 1], gid=f"label:{row.rank}")
            ax_label.set_xlim(0, layout.label_mm)
            ax_label.set_ylim(0, 1)
            ax_label.set_axis_off()
            x_dot = _draw_row_label(ax_label, row, i, style, levels)
            if previous is not None:
                ax_prev, x_prev = previous
                fig.add_artist(ConnectionPatch((x_prev, 0.5), (x_prev, 0.5), "data", "data",
                                               axesA=ax_prev, axesB=ax_label, lw=0.6))  # fmt: skip
                ax_label.plot([x_prev, x_dot], [0.5, 0.5], color="black", lw=0.6)
            previous = (ax_label, x_dot)
            for k, (head, rate) in enumerate(pairs):
                ax = fig.add_subplot(grid[i, 2 + k], gid=f"map:{row.rank}:{head}")
                draw_attention(ax, image, row.maps[head], vmax=vmax, cmap=style.attention_cmap,
                               mask=row.mask)  # fmt: skip
                caption = f"#{k + 1} head {head}"
                caption += "" if rate is None else f"\nkept {rate:.0%}"
                ax.set_title(caption, fontsize=max(5.0, style.font_size - 1.0), linespacing=1.1)
                map_axes.append(ax)
            if len(row.heads) > len(pairs):
                LOGGER.info("%s %s: %d of %d kept heads shown", row.rank, row.taxon, len(pairs),
                            len(row.heads))  # fmt: skip
        if not map_axes:
            raise ValueError(f"{title}: no rank has a kept head to show")
        bar = fig.colorbar(attention_scale(vmax, style.attention_cmap), ax=map_axes,
                           shrink=min(1.0, 0.9 if len(rows) > 1 else 1.0), aspect=25)  # fmt: skip
        bar.set_label("attention of the class prompt")
        bar.outline.set_linewidth(0.5)
        width = style.width_mm(columns) - 4.0
        fig.suptitle(wrap_mm(title, width, style.font_size + 1.0, style.font_family),
                     fontsize=style.font_size + 1.0)  # fmt: skip
        note = "#k: importance rank of the kept head"
        if any(r.keep_rates is not None for r in rows):
            note += "; kept: share of the taxon's correctly classified test images that keep it"
        if any(r.mask is not None for r in rows):
            note += "; dashed: the rank's ground-truth trait"
        if any(len(r.heads) > layout.heads_shown for r in rows):
            shown_heads = "head" if layout.heads_shown == 1 else f"{layout.heads_shown} heads"
            note += f"; only each rank's most important kept {shown_heads} shown (page width)"
        # supxlabel: constrained layout keeps room for it below the panels and colorbar.
        note = wrap_mm(note, width, max(5.0, style.font_size - 1.5), style.font_family)
        fig.supxlabel(note, x=0.01, ha="left", fontsize=max(5.0, style.font_size - 1.5),
                      color="0.3")  # fmt: skip
    return fig


def draw_path_figure(
    image: np.ndarray,
    rows: Sequence[RankRow],
    *,
    title: str,
    out_stem: Path,
    style: FigureStyle,
    columns: int,
) -> list[Path]:
    """One image through a taxonomic path, coarse (top ``rows[0]``) to fine (bottom): each row
    the rank, the taxon and its probability, then that taxon's prompt's maps of the given
    heads in order, with the rank's trait outline; the image alone on the left; one colour
    scale. Writes ``out_stem``.pdf/.png and returns them."""
    with styled(style):
        fig = path_figure(image, rows, title=title, style=style, columns=columns)
        return save_figure(fig, out_stem, style)


# ----------------------------------------------------------------------------- data


def image_scores(traits_table: Path) -> pd.Series:
    """``base_score`` (probability of the true class) per image id, from ``traits.parquet``."""
    table = read_search_table(traits_table)
    missing = {"image", "base_score"} - set(table.columns)
    if missing:
        raise ValueError(f"{traits_table}: no column(s) {sorted(missing)}; rerun the trait search")
    return table.groupby("image", sort=False)["base_score"].first()


def load_rank_maps(levels: Sequence[str], trait_maps: Mapping[str, Path]) -> dict[str, TraitMaps]:
    """Each rank's ``trait_maps.npz`` without its maps; a missing rank is a clear error."""
    missing = [rank for rank in levels if rank not in trait_maps]
    if missing:
        raise KeyError(f"no trait_maps.npz given for rank(s) {missing} (levels {list(levels)})")
    return {rank: read_trait_maps(trait_maps[rank]) for rank in levels}


def keep_rates(maps: TraitMaps, label: str) -> np.ndarray:
    """(H,) share of class ``label``'s searched images on which each head was kept."""
    names = [str(n) for n in maps.label_names]
    rows = maps.searched & (maps.target == names.index(label))
    return maps.kept[rows].mean(axis=0) if rows.any() else np.zeros(maps.num_heads)


def _correct_everywhere(
    levels: Sequence[str], maps: Mapping[str, TraitMaps], scores: Mapping[str, pd.Series]
) -> pd.DataFrame:
    """Test images searched (correct) at every rank: ``image``, finest ``label``, ``product``
    and ``minimum`` of the ranks' base scores."""
    finest = maps[levels[-1]]
    frame = pd.DataFrame({"image": finest.image.astype(str),
                          "label": finest.label_names[finest.target].astype(str)})  # fmt: skip
    ok = np.ones(len(frame), dtype=bool)
    per_rank = []
    for rank in levels:
        row_of = maps[rank].row_of()
        rows = frame["image"].map(row_of)
        present = rows.notna().to_numpy()
        searched = np.zeros(len(frame), dtype=bool)
        searched[present] = maps[rank].searched[rows[present].astype(int).to_numpy()]
        ok &= searched
        per_rank.append(frame["image"].map(scores[rank]).to_numpy(dtype=float))
    stacked = np.vstack(per_rank)
    frame["product"] = np.prod(stacked, axis=0)
    frame["minimum"] = np.min(stacked, axis=0)
    return frame[ok & np.isfinite(frame["product"].to_numpy())]


def _check_taxa(wanted: Sequence[str], valid: Sequence[str], rank: str, taxonomy: Path) -> None:
    for name in wanted:
        if name not in valid:
            close = difflib.get_close_matches(name, valid, n=1, cutoff=0.0)
            hint = f"; closest valid name: {close[0]!r}" if close else ""
            raise ValueError(
                f"figures.coarse_to_fine.species: {name!r} is no {rank} in {taxonomy}{hint}"
            )


def choose_taxa(
    tree, levels: Sequence[str], candidates: pd.DataFrame, settings: CoarseToFineSettings,
    taxonomy: Path,
) -> tuple[list[str], list[tuple[str, str]]]:  # fmt: skip
    """The finest-rank taxa to draw (at most ``max_species``) and ``(name, reason)`` for each
    one left out. Configured names must exist; none configured: per parent (label order) its
    first child in label order that has an image correct at every rank."""
    finest = levels[-1]
    valid = classes_at_rank(tree, finest)
    usable = set(candidates["label"])
    skipped: list[tuple[str, str]] = []
    if settings.species:
        _check_taxa(settings.species, valid, finest, taxonomy)
        chosen = []
        for name in dict.fromkeys(settings.species):
            if name in usable:
                chosen.append(name)
            else:
                skipped.append((name, f"no test image correct at every rank ({', '.join(levels)})"))
    else:
        parents = [tree] if len(levels) == 1 else [
            find_node(tree, levels[-2], name) for name in classes_at_rank(tree, levels[-2])
        ]  # fmt: skip
        chosen = []
        for parent in parents:
            children = sorted(child.name for child in parent.children)
            first = next((name for name in children if name in usable), None)
            if first is None:
                where = (
                    "the taxonomy" if parent.rank == ROOT_RANK else f"{parent.rank} {parent.name}"
                )
                skipped.append((where, f"none of its {len(children)} {finest} taxa has a test "
                                       f"image correct at every rank"))  # fmt: skip
            else:
                chosen.append(first)
    for name in chosen[settings.max_species :]:
        skipped.append((name, f"over figures.coarse_to_fine.max_species={settings.max_species}"))
    return chosen[: settings.max_species], skipped


def _write_summary(path: Path, drawn: Sequence[dict], skipped: Sequence[tuple[str, str]]) -> None:
    records = [{**d, "status": "drawn", "reason": ""} for d in drawn]
    records += [{"taxon": n, "image": "", "product": np.nan, "minimum": np.nan,
                 "status": "skipped", "reason": r} for n, r in skipped]  # fmt: skip
    columns = ["taxon", "status", "image", "product", "minimum", "reason"]
    with atomic_open(path, "w", newline="") as handle:
        pd.DataFrame(records, columns=columns).to_csv(handle, sep="\t", index=False, na_rep="NA")


def draw_coarse_to_fine(
    *,
    levels: Sequence[str],
    traits_tables: Mapping[str, Path],
    trait_maps: Mapping[str, Path],
    taxonomy: Path,
    images: ImageSource,
    out_dir: Path,
    style: FigureStyle,
    settings: CoarseToFineSettings,
) -> list[Path]:
    """For each chosen finest-rank taxon, its test image that every rank's model classified
    correctly (highest product of the ranks' true-class probabilities), drawn by
    :func:`draw_path_figure` into ``out_dir/<taxon>.pdf/.png``. Taxa without such an image are
    skipped and listed, with the reason, in ``out_dir/summary.tsv`` (also returned) and the log."""
    levels = list(levels)
    if not levels:
        raise ValueError("levels is empty")
    tree = load_taxonomy(taxonomy)
    maps = load_rank_maps(levels, trait_maps)
    scores = {rank: image_scores(traits_tables[rank]) for rank in levels}
    candidates = _correct_everywhere(levels, maps, scores)
    chosen, skipped = choose_taxa(tree, levels, candidates, settings, taxonomy)
    best = (candidates.sort_values(["product", "minimum", "image"], ascending=[False, False, True])
            .drop_duplicates("label").set_index("label"))  # fmt: skip
    picks = {name: str(best.loc[name, "image"]) for name in chosen}
    sources = images.images(list(picks.values()))
    rank_rows = {rank: maps[rank].row_of() for rank in levels}
    stored = {
        rank: dict(zip(picks.values(), maps[rank].read_maps(
            [rank_rows[rank][i] for i in picks.values()]), strict=True))
        for rank in levels
    }  # fmt: skip
    written: list[Path] = []
    drawn: list[dict] = []
    stems: set[str] = set()
    for name, image_id in picks.items():
        path = lineage(tree, levels[-1], name)
        source = sources[image_id]
        rows = []
        for rank in levels:
            row = rank_rows[rank][image_id]
            heads = tuple(maps[rank].kept_heads(row))
            rates = keep_rates(maps[rank], path[rank])
            rows.append(RankRow(rank=rank, taxon=path[rank],
                                probability=float(scores[rank][image_id]),
                                maps=stored[rank][image_id], heads=heads,
                                mask=source.mask(rank),
                                keep_rates=tuple(float(rates[h]) for h in heads)))  # fmt: skip
        stem = filename_safe(name)
        while stem in stems:
            stem += "_"
        stems.add(stem)
        title = f"{name}: test image {image_id} through every rank's model"
        written += draw_path_figure(source.image, rows, title=title, out_stem=out_dir / stem,
                                    style=style, columns=settings.columns)  # fmt: skip
        drawn.append({"taxon": name, "image": image_id,
                      "product": float(best.loc[name, "product"]),
                      "minimum": float(best.loc[name, "minimum"])})  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = out_dir / SUMMARY_NAME
    _write_summary(summary, drawn, skipped)
    LOGGER.info("coarse to fine: drew %d taxa, skipped %d", len(drawn), len(skipped))
    for name, reason in skipped:
        LOGGER.warning("coarse to fine: skipped %s: %s", name, reason)
    return [*written, summary]
