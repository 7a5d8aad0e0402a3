"""``promptcam explain``: what one or more trained ranks see in new photos.

For every photo and every checkpoint: the predicted class, its probability, the greedy trait
search for that class (:func:`promptcam.traits.search.identify_traits` and
:func:`~promptcam.traits.search.stop_search`, as ``promptcam traits`` runs them) and the
predicted class's per-head attention maps. Writes, under the output folder:

* ``<rank>/<image>.pdf|.png``: the photo and its kept heads' maps, most important first;
* ``coarse_to_fine/<image>.pdf|.png`` (two or more checkpoints, one per rank): the predicted
  path from the coarsest rank to the finest, each rank with its kept heads' maps;
* ``explain.tsv``: one row per photo and checkpoint (:data:`TSV_COLUMNS`).

Photos go through in batches: a batch is scored by every checkpoint, its figures are drawn
and its maps dropped, so memory does not grow with the number of photos. ``explain.tsv`` is
written as the batches go and appears, atomically, once every photo is done.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from promptcam.config import EncodePrecision
from promptcam.figures.coarse_to_fine import RankRow, draw_path_figure
from promptcam.figures.panels import LABEL_CHARS, PanelRow, draw_panel_rows
from promptcam.figures.style import FigureStyle
from promptcam.figures.text import plain_text, taxon_lines
from promptcam.io import atomic_open
from promptcam.model.checkpoint import CheckpointMeta, load_checkpoint, top_down_parents
from promptcam.model.predict import list_images, load_image
from promptcam.model.prompt_cam import PromptCAM
from promptcam.training.hierarchy import sibling_groups
from promptcam.traits.search import GreedyConfig, identify_traits, stop_search

__all__ = [
    "COARSE_TO_FINE_DIR",
    "TSV_COLUMNS",
    "ExplainReport",
    "ExplainSettings",
    "Explanation",
    "RankModel",
    "explain_batch",
    "explain_images",
    "figure_names",
    "load_rank_models",
    "path_break",
]

COARSE_TO_FINE_DIR = "coarse_to_fine"

TSV_COLUMNS = (
    "image",  # path relative to the folder given (the file name for one photo)
    "rank",  # the checkpoint's rank (its file's stem where it records none)
    "checkpoint",
    "predicted_index",
    "predicted",
    "probability",  # softmax probability of the predicted class (among siblings, top-down)
    "kept_heads",  # comma-separated, most important first (empty: none kept)
    "consistent_path",  # yes/no: the photo's predicted path agrees with --taxonomy; empty: unknown
)

# Ranks a taxonomy may name, coarse to fine: breaks ties of class counts (see load_rank_models).
KNOWN_RANKS = [
    "domain",
    "kingdom",
    "phylum",
    "class",
    "order",
    "suborder",
    "superfamily",
    "family",
    "subfamily",
    "tribe",
    "genus",
    "subgenus",
    "species",
    "subspecies",
    "variety",
]


@dataclass(frozen=True)
class ExplainSettings:
    """How photos are explained and drawn.

    Attributes:
        greedy: The trait search's stop rule (as ``promptcam traits``).
        batch_size: Photos scored, searched and drawn at a time (bounds memory).
        encode_precision: Blocks before the last in the search (always fp32 in the last).
        style: The figures' look (widths, fonts, dpi).
        columns: 1 or 2: the figures' width, one or two journal columns.
        short_side: Short side in pixels of the photos as drawn.
    """

    greedy: GreedyConfig = field(default_factory=GreedyConfig)
    batch_size: int = 16
    encode_precision: EncodePrecision = "auto"
    style: FigureStyle = field(default_factory=FigureStyle)
    columns: int = 2
    short_side: int = 512

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        self.style.width_mm(self.columns)  # a clear error for columns other than 1 or 2


@dataclass(frozen=True)
class RankModel:
    """A loaded checkpoint and the rank it predicts; ``parents``: each class's parent when the
    model is read top-down (trained among siblings), else None."""

    checkpoint: Path
    rank: str
    model: PromptCAM
    meta: CheckpointMeta
    parents: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Explanation:
    """One photo under one checkpoint.

    Attributes:
        maps: (H, h, w) float32: the predicted class prompt's last-block attention over the
            patch grid, one map per head.
        kept_heads: The search's kept heads, most important first.
    """

    image: str
    rank: str
    checkpoint: Path
    predicted_index: int
    predicted: str
    probability: float
    kept_heads: tuple[int, ...]
    maps: np.ndarray


def _rank_of(path: Path, meta: CheckpointMeta) -> str:
    return str(meta.extra.get("rank") or path.stem)


def load_rank_models(
    checkpoints: Sequence[str | os.PathLike],
    device: torch.device,
    backbone_weights: str | os.PathLike | None = None,
    taxonomy_ranks: Sequence[str] | None = None,
) -> list[RankModel]:
    """Load the checkpoints, one per rank, ordered coarse to fine.

    The order is ``taxonomy_ranks``'s where given; otherwise fewer classes first (a coarser
    rank never has more classes than a finer one), ties broken by :data:`KNOWN_RANKS`.

    Raises:
        ValueError: two checkpoints of the same rank, or a rank not in ``taxonomy_ranks``.
    """
    loaded: list[RankModel] = []
    for checkpoint in checkpoints:
        path = Path(checkpoint)
        model, meta = load_checkpoint(path, backbone_weights=backbone_weights)
        parents = top_down_parents(meta, path)
        rank = _rank_of(path, meta)
        for other in loaded:
            if other.rank == rank:
                raise ValueError(
                    f"{other.checkpoint} and {path} are both of rank {rank!r}: "
                    "give one checkpoint per rank"
                )
        loaded.append(
            RankModel(
                path, rank, model.to(device), meta, None if parents is None else tuple(parents)
            )
        )
    return _check_top_down(_coarse_to_fine(loaded, taxonomy_ranks))


def _check_top_down(models: list[RankModel]) -> list[RankModel]:
    """A model read top-down needs the rank right above it, whose classes are its parents."""
    for above, model in zip([None, *models[:-1]], models, strict=True):
        if model.parents is None:
            continue
        missing = sorted(set(model.parents) - set(() if above is None else above.meta.label_names))
        if missing:
            raise ValueError(
                f"{model.checkpoint} was trained among siblings (train.objective: siblings) and "
                f"is read top-down, among the children of the class predicted at the rank "
                f"above: give the checkpoint of that rank too (the one whose classes are "
                f"{missing[:3]}{' ...' if len(missing) > 3 else ''})"
            )
    return models


def _coarse_to_fine(
    loaded: list[RankModel], taxonomy_ranks: Sequence[str] | None
) -> list[RankModel]:
    if taxonomy_ranks is not None:
        unknown = [m.rank for m in loaded if m.rank not in taxonomy_ranks]
        if unknown:
            raise ValueError(
                f"rank(s) {unknown} not in the taxonomy (its ranks: {list(taxonomy_ranks)})"
            )
        return sorted(loaded, key=lambda m: list(taxonomy_ranks).index(m.rank))

    def coarse_first(item: tuple[int, RankModel]) -> tuple[int, int, int]:
        index, m = item
        known = KNOWN_RANKS.index(m.rank) if m.rank in KNOWN_RANKS else len(KNOWN_RANKS)
        return m.model.num_classes, known, index

    return [m for _, m in sorted(enumerate(loaded), key=coarse_first)]


def explain_batch(
    rank_model: RankModel,
    root: Path,
    names: Sequence[str],
    greedy: GreedyConfig,
    encode_precision: EncodePrecision = "auto",
    parent_predictions: Sequence[str] | None = None,
) -> list[Explanation]:
    """Predicted class, probability, trait search and maps of the photos ``root / names``.

    The prediction is the argmax of the model's scores (the lowest index on ties); the search
    looks for that class's trait heads, exactly as ``promptcam traits`` does. A model read
    top-down (``rank_model.parents``) predicts among the children of each photo's
    ``parent_predictions`` (the rank above's predicted names), and its probability and search
    are among those siblings, as the traits rule reads it.
    """
    model, meta = rank_model.model, rank_model.meta
    device = next(model.parameters()).device
    images = torch.stack([load_image(root / name, meta.preprocessing) for name in names])
    images = images.to(device)
    with torch.inference_mode():
        scores = model(images).float()
    groups = None
    if rank_model.parents is not None:
        if parent_predictions is None or len(parent_predictions) != len(names):
            raise ValueError(f"{rank_model.checkpoint} is read top-down: it needs the parents")
        children = np.array(rank_model.parents)[None, :] == np.array(parent_predictions)[:, None]
        scores = scores.masked_fill(~torch.as_tensor(children, device=device), float("-inf"))
        groups = torch.as_tensor(sibling_groups(rank_model.parents), device=device)
    predicted = scores.argmax(dim=-1)
    result = identify_traits(
        model,
        images,
        predicted,
        greedy.tie_tolerance,
        encode_precision,
        groups,
        criterion=greedy.criterion,
        rivals=greedy.rivals,
    )
    kept_rank = stop_search(result.trace, greedy).kept_rank()
    maps = result.target_maps().float().cpu().numpy().reshape(len(names), -1, *model.patch_grid)
    explanations = []
    for row, name in enumerate(names):
        index = int(result.trace.targets[row])
        kept = np.flatnonzero(kept_rank[row] >= 0)
        explanations.append(
            Explanation(
                image=name,
                rank=rank_model.rank,
                checkpoint=rank_model.checkpoint,
                predicted_index=index,
                predicted=meta.label_names[index],
                probability=float(result.trace.base_scores[row]),
                kept_heads=tuple(int(h) for h in kept[np.argsort(kept_rank[row, kept])]),
                maps=maps[row],
            )
        )
    return explanations


def path_break(tree: object, path: Sequence[Explanation]) -> str | None:
    """Where the predicted path (coarse to fine) leaves the taxonomy (an ete3 tree), e.g.
    ``"Didymus (genus) is not in Rotundidae (family)"``; None when every rank's predicted
    taxon lies under the coarser rank's."""
    from promptcam.data.taxonomy import lineage

    for coarse, fine in itertools.pairwise(path):
        try:
            ancestor = lineage(tree, fine.rank, fine.predicted).get(coarse.rank)
        except KeyError:
            return f"{fine.predicted} ({fine.rank}) is not in the taxonomy"
        if ancestor != coarse.predicted:
            return f"{fine.predicted} ({fine.rank}) is not in {coarse.predicted} ({coarse.rank})"
    return None


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name.replace("/", "__")).strip("_") or "image"


def figure_names(names: Sequence[str]) -> dict[str, str]:
    """A file-name-safe stem per image path (``sub/a b.png`` -> ``sub__a_b_png``); paths that
    would share a stem get a short hash of the path appended."""
    stems = {name: _safe_name(name) for name in names}
    counts: dict[str, int] = {}
    for stem in stems.values():
        counts[stem] = counts.get(stem, 0) + 1
    return {
        name: stem if counts[stem] == 1 else f"{stem}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
        for name, stem in stems.items()
    }


def _batches(names: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(names), size):
        yield names[start : start + size]


def _tsv_row(explanation: Explanation, consistent: bool | None) -> list[str]:
    return [
        explanation.image,
        explanation.rank,
        str(explanation.checkpoint),
        str(explanation.predicted_index),
        explanation.predicted,
        f"{explanation.probability:.6g}",
        ",".join(str(h) for h in explanation.kept_heads),
        "" if consistent is None else ("yes" if consistent else "no"),
    ]


@dataclass(frozen=True)
class ExplainReport:
    """What :func:`explain_images` wrote."""

    images: int
    ranks: tuple[str, ...]
    table: Path
    figures: tuple[Path, ...]


def explain_images(
    checkpoints: Sequence[str | os.PathLike],
    image_or_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    settings: ExplainSettings | None = None,
    device: str | torch.device | None = None,
    backbone_weights: str | os.PathLike | None = None,
    taxonomy: str | os.PathLike | None = None,
) -> ExplainReport:
    """Explain every photo under ``image_or_dir`` with every checkpoint (see the module
    docstring); ``taxonomy`` (a ``taxonomy.nwk``) orders the ranks and checks each predicted
    path against it."""
    from promptcam.figures.sources import FileImages

    settings = settings or ExplainSettings()
    root, names = list_images(image_or_dir)  # first: a wrong path fails before the models load
    tree = None
    if taxonomy is not None:
        from promptcam.data.taxonomy import load_taxonomy, ranks

        if not Path(taxonomy).is_file():
            raise FileNotFoundError(f"no taxonomy {taxonomy} (a run's results/data/taxonomy.nwk)")
        tree = load_taxonomy(taxonomy)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    models = load_rank_models(
        checkpoints, device, backbone_weights, None if tree is None else ranks(tree)
    )
    out = Path(out_dir)
    rank_dirs = {m.rank: _safe_name(m.rank) for m in models}
    stems = figure_names(names)
    photos = FileImages(root, settings.short_side)
    figures: list[Path] = []
    with atomic_open(out / "explain.tsv", "w", newline="") as handle:
        table = csv.writer(handle, delimiter="\t", lineterminator="\n")
        table.writerow(TSV_COLUMNS)
        for batch in _batches(names, settings.batch_size):
            per_rank: list[list[Explanation]] = []
            for m in models:
                above = [e.predicted for e in per_rank[-1]] if m.parents and per_rank else None
                per_rank.append(
                    explain_batch(m, root, batch, settings.greedy, settings.encode_precision, above)
                )
            pictures = photos.images(batch)
            for row, name in enumerate(batch):
                path = [explanations[row] for explanations in per_rank]
                checked = tree is not None and len(path) >= 2
                broken = path_break(tree, path) if checked else None
                consistent = broken is None if checked else None
                image = pictures[name].image
                for explanation in path:
                    stem = out / rank_dirs[explanation.rank] / stems[name]
                    figures += _draw_rank_panel(image, explanation, stem, settings)
                    table.writerow(_tsv_row(explanation, consistent))
                if len(path) >= 2:
                    stem = out / COARSE_TO_FINE_DIR / stems[name]
                    figures += _draw_path(image, path, consistent, broken, stem, settings)
            del per_rank, pictures  # this batch's maps and photos: drawn, not kept
    return ExplainReport(
        len(names), tuple(m.rank for m in models), out / "explain.tsv", tuple(figures)
    )


PANEL_NOTE = (
    "The photo, then the predicted class's kept heads, most important first (#1); "
    "p: its probability."
)


def _draw_rank_panel(
    image: np.ndarray, explanation: Explanation, stem: Path, settings: ExplainSettings
) -> list[Path]:
    """The photo and its kept heads' maps under one rank's checkpoint."""
    row = PanelRow(
        image=image,
        maps=explanation.maps,
        heads=explanation.kept_heads,
        label=taxon_lines(explanation.predicted, explanation.rank, LABEL_CHARS),
        score=explanation.probability,
    )
    return draw_panel_rows(
        [row],
        title=f"{plain_text(explanation.image)} - {explanation.rank}",
        out_stem=stem,
        style=settings.style,
        columns=settings.columns,
        note=PANEL_NOTE,
    )


def _draw_path(
    image: np.ndarray,
    path: Sequence[Explanation],
    consistent: bool | None,
    broken: str | None,
    stem: Path,
    settings: ExplainSettings,
) -> list[Path]:
    """The predicted path, coarse to fine, each rank with its kept heads' maps."""
    rows = [
        RankRow(
            rank=e.rank,
            taxon=e.predicted,
            probability=e.probability,
            maps=e.maps,
            heads=e.kept_heads,
        )
        for e in path
    ]
    title = plain_text(path[0].image)
    if consistent is not None:
        title += (
            " - path consistent with the taxonomy"
            if consistent
            else f" - inconsistent path: {plain_text(broken or '')}"
        )
    return draw_path_figure(
        image, rows, title=title, out_stem=stem, style=settings.style, columns=settings.columns
    )
