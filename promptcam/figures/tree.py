"""The taxonomy as a tree (ete3), every node showing what its own class prompt looks at.

Each taxon (every rank, not only the leaves) carries a thumbnail: its most typical correctly
classified test image (highest probability of the true class) with the attention map of that
rank's most important kept head on it, and its name. Reading from the root to the leaves, the
traits go from coarse (what separates families) to fine (what separates species). A grey square
marks a taxon without a correctly classified test image. Large taxonomies are capped at
``max_leaves`` leaves, taken in turn from each parent so that every parent keeps a child while
room lasts; the figure says how many were left out.

Sizes are planned at print size: thumbnails are drawn with matplotlib at the pixel size they
print at (``style.dpi``), text at ``style.font_size`` pt, and the branch lengths are solved so
that the scene is exactly the column wide, so ete3 scales nothing up or down.
"""

from __future__ import annotations

import difflib
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # ete3 + Qt abort without a display

import matplotlib.pyplot as plt
import numpy as np
from matplotlib import colormaps

from promptcam.data.taxonomy import ROOT_RANK, load_taxonomy
from promptcam.figures.coarse_to_fine import image_scores, load_rank_maps
from promptcam.figures.overlay import draw_attention
from promptcam.figures.settings import TreeSettings
from promptcam.figures.sources import ImageSource
from promptcam.figures.style import MM_PER_INCH, FigureStyle, styled
from promptcam.figures.text import is_italic

LOGGER = logging.getLogger(__name__)

GAP_MM = 1.5  # between a leaf's thumbnail and the next leaf's
MAX_THUMB_MM = 12.0
MIN_THUMB_MM = 4.0
MIN_BRANCH_MM = 3.0
PLACEHOLDER_GREY = 0.88


@dataclass(frozen=True)
class NodeThumb:
    """What a node shows: its class at its rank, the image drawn and its top head (or None)."""

    rank: str
    name: str
    image: str | None = None
    head: int | None = None
    probability: float | None = None


def select_clade(tree, subtree: str | None):
    """The whole taxonomy, or the clade under the taxon named ``subtree`` (any rank)."""
    if subtree is None:
        return tree
    matches = tree.search_nodes(name=subtree)
    if not matches:
        names = sorted({node.name for node in tree.traverse() if node.rank != ROOT_RANK})
        close = difflib.get_close_matches(subtree, names, n=1, cutoff=0.0)
        hint = f"; closest: {close[0]!r}" if close else ""
        raise ValueError(f"figures.tree.subtree: no taxon named {subtree!r}{hint}")
    clade = matches[0].copy()
    clade.up = None
    return clade


def cap_leaves(tree, max_leaves: int) -> tuple[int, str]:
    """Prune ``tree`` in place to at most ``max_leaves`` leaves, taking one leaf per parent in
    turn (parents and leaves in label order). Returns (leaves left out, how they were chosen)."""
    leaves = tree.get_leaves()
    if len(leaves) <= max_leaves:
        return 0, ""
    groups: dict[int, list] = {}
    for leaf in sorted(leaves, key=lambda n: (n.up.name if n.up else "", n.name)):
        groups.setdefault(id(leaf.up), []).append(leaf)
    queues = list(groups.values())
    kept: set[int] = set()
    depth = 0
    while len(kept) < max_leaves:
        for queue in queues:
            if depth < len(queue) and len(kept) < max_leaves:
                kept.add(id(queue[depth]))
        depth += 1
    for leaf in leaves:
        if id(leaf) not in kept:
            node = leaf
            while node.up is not None and len(node.up.children) == 1:
                node = node.up
            node.detach()
    return len(leaves) - max_leaves, "one per parent in turn, in label order"


def choose_thumbs(tree, maps, scores) -> dict[tuple[str, str], NodeThumb]:
    """Per node ``(rank, name)`` of a rank with trait maps: its most typical correct image and head."""
    thumbs: dict[tuple[str, str], NodeThumb] = {}
    for node in tree.traverse("preorder"):
        if node.rank not in maps:
            continue
        rank_maps = maps[node.rank]
        names = [str(n) for n in rank_maps.label_names]
        if node.name not in names:
            thumbs[(node.rank, node.name)] = NodeThumb(node.rank, node.name)
            continue
        rows = np.nonzero(rank_maps.searched & (rank_maps.target == names.index(node.name)))[0]
        rows = [r for r in rows if rank_maps.kept_heads(int(r))]
        if not rows:
            thumbs[(node.rank, node.name)] = NodeThumb(node.rank, node.name)
            continue
        values = scores[node.rank].reindex(rank_maps.image[rows].astype(str)).to_numpy(float)
        best = int(rows[int(np.nanargmax(values))])
        thumbs[(node.rank, node.name)] = NodeThumb(node.rank, node.name, str(rank_maps.image[best]),
                                     rank_maps.kept_heads(best)[0], float(np.nanmax(values)))  # fmt: skip
    return thumbs


def render_thumbnail(path: Path, image, grid_map, *, size_px: int, vmax: float, style) -> None:
    """A square PNG of ``size_px`` pixels: the muted image with the map (or a grey square)."""
    with styled(style):
        fig = plt.figure(figsize=(size_px / style.dpi, size_px / style.dpi), dpi=style.dpi)
        ax = fig.add_axes((0, 0, 1, 1))
        if image is None:
            ax.imshow(np.full((2, 2, 3), PLACEHOLDER_GREY), vmin=0, vmax=1)
            ax.set_axis_off()
        else:
            draw_attention(ax, image, grid_map, vmax=vmax, cmap=style.attention_cmap)
        fig.savefig(path, dpi=style.dpi)
        plt.close(fig)


def render_colour_bar(path: Path, cmap: str, width_px: int, height_px: int) -> None:
    """A horizontal gradient (no text: the labels are vector text faces beside it)."""
    ramp = colormaps[cmap](np.linspace(0, 1, width_px))[None, :, :3]
    pixels = (np.repeat(ramp, height_px, axis=0) * 255).round().astype(np.uint8)
    plt.imsave(path, pixels)


# ----------------------------------------------------------------------------- ete3


def _ete():
    """ete3's drawing parts, imported only once Qt is set offscreen."""
    import ete3
    from ete3.treeview.drawer import init_scene
    from ete3.treeview.qt4_render import render

    return ete3, init_scene, render


def scene_size(tree, tree_style) -> tuple[float, float]:
    """The scene's (width, height) in ete3 units, as :meth:`Tree.render` lays it out."""
    _, init_scene, render = _ete()
    for nid, node in enumerate(tree.traverse("preorder")):
        node.add_feature("_nid", nid)
    scene, img = init_scene(tree, None, tree_style)
    tree_item, n2i, n2f = render(tree, img)
    scene.init_values(tree, img, n2i, n2f)
    tree_item.setParentItem(scene.master_item)
    scene.master_item.setPos(0, 0)
    scene.addItem(scene.master_item)
    rect = scene.sceneRect()
    return float(rect.width()), float(rect.height())


def qt_points_to_fsize(points: float, dpi: int) -> int:
    """The TextFace ``fsize`` that prints at ``points`` when one scene unit is one pixel at
    ``dpi`` (Qt sizes fonts at its logical dpi, 100 on the offscreen platform)."""
    ete3, _, _ = _ete()
    scene_size(ete3.Tree("a;"), ete3.TreeStyle())  # makes ete3's QApplication
    from PyQt5.QtWidgets import QApplication

    logical = QApplication.instance().primaryScreen().logicalDotsPerInch()
    return max(1, round(points * dpi / logical))


def _px(mm: float, dpi: int) -> int:
    return max(1, round(mm / MM_PER_INCH * dpi))


def decorate(tree, thumbs, paths: Mapping[tuple[str, str], Path], *, thumb_px: int, fsize: int,
             small_fsize: int, levels: Sequence[str], style: FigureStyle, circular: bool) -> None:  # fmt: skip
    """Faces and node styles: thumbnail and name on every taxon, nothing on the root."""
    ete3, _, _ = _ete()
    for node in tree.traverse():
        node_style = ete3.NodeStyle(size=0, hz_line_width=1, vt_line_width=1)
        node.set_style(node_style)
        key = (node.rank, node.name)
        if key not in thumbs:
            continue
        thumb = thumbs[key]
        fstyle = "italic" if is_italic(thumb.rank, levels) else "normal"
        name = ete3.TextFace(thumb.name, ftype=style.font_family, fsize=fsize, fstyle=fstyle)
        image = ete3.ImgFace(str(paths[key]), width=thumb_px, height=thumb_px)
        image.margin_right = image.margin_left = max(1, thumb_px // 12)
        image.margin_top = image.margin_bottom = max(1, thumb_px // 24)
        name.margin_left = max(1, thumb_px // 12)
        node.add_face(image, column=0, position="branch-right")
        if node.is_leaf():
            node.add_face(name, column=1, position="branch-right")
        else:
            name.margin_bottom = 2
            node.add_face(name, column=0, position="branch-top")


def tree_style_for(layout: str, branch_px: float, legend: Sequence) -> object:
    """A paper-ready TreeStyle: no scale bar, no branch numbers, no automatic leaf names."""
    ete3, _, _ = _ete()
    ts = ete3.TreeStyle()
    ts.show_scale = False
    ts.show_leaf_name = False
    ts.show_branch_length = False
    ts.show_branch_support = False
    ts.mode = "c" if layout == "circular" else "r"
    ts.scale = branch_px
    ts.margin_left = ts.margin_right = ts.margin_top = ts.margin_bottom = 4
    if layout == "circular":
        ts.arc_start, ts.arc_span = -90, 359  # ete3 flips faces at 90-270 degrees
    *scale_faces, note = legend
    for column, face in enumerate(scale_faces):
        ts.legend.add_face(face, column=column)
    ts.title.add_face(note, column=0)
    ts.legend_position = 4
    return ts


def fit_branch_length(tree, layout: str, legend_faces, target_px: float, min_px: float) -> float:
    """The branch length (px per unit, at least ``min_px``) that makes the scene ``target_px``
    wide: bisection, as the width grows with it (piecewise: names above branches set a floor)."""

    def width(branch: float) -> float:
        return scene_size(tree, tree_style_for(layout, branch, legend_faces()))[0]

    low, high = min_px, min_px * 2
    if width(low) >= target_px:
        return low
    while width(high) < target_px:
        low, high = high, high * 2
    for _ in range(14):
        middle = (low + high) / 2
        low, high = (middle, high) if width(middle) < target_px else (low, middle)
    return low


def render_atomic(tree, path: Path, tree_style, width_mm: float, dpi: int) -> Path:
    """``tree.render`` to a temporary file of the same type beside ``path``, then renamed."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        tree.render(tmp, tree_style=tree_style, w=width_mm, units="mm", dpi=dpi)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _note(num_taxa: int, num_drawn: int, left_out: int, how: str) -> str:
    note = "each taxon: its rank's top kept head on its most typical correct test image"
    if num_drawn < num_taxa:
        note += f"; grey: no correct test image ({num_taxa - num_drawn} taxa)"
    if left_out:
        note += f"; {left_out} leaves left out ({how})"
    return note


def _legend_factory(vmax: float, style: FigureStyle, bar_path: Path, fsize: int, note: str):
    ete3, _, _ = _ete()
    bar_w, bar_h = _px(20, style.dpi), _px(2.0, style.dpi)

    def faces() -> list:
        label = ete3.TextFace("attention of the class prompt   0 ", ftype=style.font_family,
                              fsize=fsize)  # fmt: skip
        bar = ete3.ImgFace(str(bar_path), width=bar_w, height=bar_h)
        bar.margin_top = max(1, fsize // 4)
        top = ete3.TextFace(f" {vmax:.2f}", ftype=style.font_family, fsize=fsize)
        text = ete3.TextFace(note, ftype=style.font_family, fsize=fsize, fgcolor="#4d4d4d")
        return [label, bar, top, text]

    return faces


def _thumb_size_mm(num_leaves: int, layout: str, style: FigureStyle, columns: int) -> float:
    """Thumbnails as large as the page allows: the leaves stack down a rectangular tree (page
    height) or around a circular one (its circumference)."""
    if layout == "circular":
        circumference = np.pi * style.width_mm(columns) * 0.55
        size = circumference / num_leaves - GAP_MM
    else:
        size = (style.max_height_mm - 30.0) / num_leaves - GAP_MM
    return float(np.clip(size, MIN_THUMB_MM, MAX_THUMB_MM))


def draw_tree_overview(
    *,
    levels: Sequence[str],
    traits_tables: Mapping[str, Path],
    trait_maps: Mapping[str, Path],
    taxonomy: Path,
    images: ImageSource,
    out_dir: Path,
    style: FigureStyle,
    settings: TreeSettings,
) -> list[Path]:
    """The taxonomy (or the clade ``settings.subtree``), at most ``settings.max_leaves`` leaves,
    each taxon with the typical map of its own class prompt (its rank's top kept head on its
    most typical correct test image) and its name; one colour scale (legend). Writes
    ``out_dir/tree_<layout>.pdf`` and ``.png`` for each layout and returns them."""
    levels = list(levels)
    tree = select_clade(load_taxonomy(taxonomy), settings.subtree)
    left_out, how = cap_leaves(tree, settings.max_leaves)
    tree.sort_descendants("name")
    maps = load_rank_maps(levels, trait_maps)
    scores = {rank: image_scores(traits_tables[rank]) for rank in levels}
    thumbs = choose_thumbs(tree, maps, scores)
    drawn = {key: t for key, t in thumbs.items() if t.image is not None}
    LOGGER.info("tree: %d taxa, %d with a correctly classified test image, %d leaves left out%s",
                len(thumbs), len(drawn), left_out, f" ({how})" if left_out else "")  # fmt: skip
    grid = {}
    for rank in levels:
        wanted = [(key, t) for key, t in drawn.items() if t.rank == rank]
        if wanted:
            row_of = maps[rank].row_of()
            stored = maps[rank].read_maps([row_of[t.image] for _, t in wanted])
            grid.update({key: stored[k, t.head] for k, (key, t) in enumerate(wanted)})
    vmax = float(max((m.max() for m in grid.values()), default=0.0)) or 1.0
    sources = images.images(sorted({t.image for t in drawn.values()}))
    fsize = qt_points_to_fsize(style.font_size, style.dpi)
    small = qt_points_to_fsize(max(5.0, style.font_size - 1.0), style.dpi)
    width_mm = style.width_mm(settings.columns)
    target_px = width_mm / MM_PER_INCH * style.dpi
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    with tempfile.TemporaryDirectory(prefix=".tree_thumbs.", dir=out_dir) as tmp:
        tmp = Path(tmp)
        bar_path = tmp / "colour_bar.png"
        render_colour_bar(bar_path, style.attention_cmap, _px(20, style.dpi), _px(2, style.dpi))
        note = _note(len(thumbs), len(drawn), left_out, how)
        legend = _legend_factory(vmax, style, bar_path, small, note)
        for layout in settings.layouts:
            thumb_mm = _thumb_size_mm(len(tree.get_leaves()), layout, style, settings.columns)
            while True:
                thumb_px = _px(thumb_mm, style.dpi)
                paths = {}
                for k, (key, thumb) in enumerate(sorted(thumbs.items())):
                    paths[key] = tmp / f"{layout}_{thumb_px}_{k}.png"
                    source = sources[thumb.image].image if thumb.image else None
                    render_thumbnail(paths[key], source, grid.get(key), size_px=thumb_px,
                                     vmax=vmax, style=style)  # fmt: skip
                drawing = tree.copy()
                drawing.dist = 0.0  # no stub before the root
                decorate(drawing, thumbs, paths, thumb_px=thumb_px, fsize=fsize,
                         small_fsize=small, levels=levels, style=style,
                         circular=layout == "circular")  # fmt: skip
                branch = fit_branch_length(drawing, layout, legend, target_px,
                                           _px(MIN_BRANCH_MM, style.dpi))  # fmt: skip
                ts = tree_style_for(layout, branch, legend())
                width = scene_size(drawing, ts)[0]
                if width <= target_px * 1.02 or thumb_mm <= MIN_THUMB_MM:
                    break
                # Too wide at the shortest branches: smaller thumbnails (text stays).
                thumb_mm = max(MIN_THUMB_MM, thumb_mm * 0.85)
            width, height = scene_size(drawing, ts)
            scale = target_px / width
            if abs(scale - 1) > 0.02:
                LOGGER.warning("tree %s: scaled by %.2f to fit %.0f mm (text %.1f pt)", layout,
                               scale, width_mm, style.font_size * scale)  # fmt: skip
            height_mm = height * scale / style.dpi * MM_PER_INCH
            if height_mm > style.max_height_mm + 0.5:
                LOGGER.warning("tree %s: %.0f mm high, over the page's %.0f mm; lower "
                               "figures.tree.max_leaves", layout, height_mm, style.max_height_mm)  # fmt: skip
            for suffix in (".pdf", ".png"):
                path = out_dir / f"tree_{layout}{suffix}"
                written.append(render_atomic(drawing, path, ts, width_mm, style.dpi))
    return written
