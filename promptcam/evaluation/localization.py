"""Does a rank's trait attention land on that rank's ground-truth trait? (the demo's masks)

Maps live on the patch grid (h, w), masks on the pixels (S, S) of the model's input, with S a
multiple of the grid. Each patch is summarised by its *coverage*: the fraction of its pixels
inside the mask.

* **Pointing game** (Zhang et al. 2016, at patch resolution): the peak patch of a map (the
  first maximum in row-major order) is a hit when its coverage is at least ``min_coverage``
  and above 0; the default ``min_coverage=0`` counts a patch touching any mask pixel. The chance
  level is the share of patches that would be hits, i.e. the hit rate of a uniformly random peak.
* **Energy in mask**: the share of the map's mass inside the mask once the map is upsampled to
  the pixels by nearest neighbour, i.e. ``sum(map * coverage) / sum(map)``. The chance level is
  the mean coverage (the share of a uniform map).

Per rank, over the correctly classified test images (the only ones searched), every kept head's
map is scored against the rank's own trait and against every other rank's trait, so the
specificity of coarse and fine ranks can be compared. An image whose mask lacks a trait is left
out for that trait. The mean of an image's kept maps is scored too.

``localization.tsv`` (:func:`localization_rows`) compares every method on the rank's own trait,
over the same searched test images: Prompt-CAM's most important kept head, the mean of the kept
heads' maps, the kept heads' maps pooled (each scored on its own), the single head fixed per
rank with the best pointing game (chosen on the *train* images' masks by the heads rule when
``heads.tsv`` is given, else on these test images, which is optimistic), every post-hoc baseline
of ``cam_maps.npz`` (per model) and a seeded random map. Two chance levels stand beside each
row: the uniform one above, and the **fixed-place prior**, the best constant map learnt from the
train split's masks of the rank's trait (:func:`fit_fixed_place_prior`): for the pointing game
the patch that is most often a hit, for energy in mask the patch of highest mean coverage (a
point mass there maximises the mean energy of any constant map).

Data without masks (the shards' manifest says ``has_masks: false``) still gets both files, with
``n_images`` 0 and null scores, so that the rule can always run.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from promptcam.evaluation.tables import (
    LOCALIZATION_TABLE_COLUMNS,
    read_heads_table,
    write_localization_table,
)
from promptcam.io import write_json
from promptcam.traits.tables import TraitMaps, read_trait_maps

LOGGER = logging.getLogger(__name__)

__all__ = [
    "FixedPlacePrior",
    "energy_in_mask",
    "fit_fixed_place_prior",
    "fixed_place_scores",
    "has_masks",
    "localization_report",
    "localization_rows",
    "patch_coverage",
    "peak_patch",
    "pointing_hits",
    "read_masks",
    "run_rank_localization",
]


def patch_coverage(mask: np.ndarray, patch_grid: tuple[int, int]) -> np.ndarray:
    """Boolean masks (..., S_h, S_w) -> fraction of each patch's pixels inside, (..., h, w)."""
    rows, cols = patch_grid
    height, width = mask.shape[-2:]
    if height % rows or width % cols:
        raise ValueError(f"mask {height}x{width} does not tile into a {rows}x{cols} patch grid")
    tiles = mask.reshape(*mask.shape[:-2], rows, height // rows, cols, width // cols)
    return tiles.mean(axis=(-3, -1), dtype=np.float64)


def _flatten_grid(values: np.ndarray) -> np.ndarray:
    """(..., h, w) -> (..., h * w), also for no maps at all."""
    return values.reshape(*values.shape[:-2], values.shape[-2] * values.shape[-1])


def peak_patch(maps: np.ndarray) -> np.ndarray:
    """Maps (..., h, w) -> flat index of the peak, the first maximum in row-major order."""
    return _flatten_grid(maps).argmax(axis=-1)


def pointing_hits(maps: np.ndarray, coverage: np.ndarray, min_coverage: float = 0.0) -> np.ndarray:
    """(..., h, w) maps and their masks' coverage -> bool (...): the peak patch is a hit."""
    flat = _flatten_grid(coverage)
    at_peak = np.take_along_axis(flat, peak_patch(maps)[..., None], axis=-1)[..., 0]
    return (at_peak > 0) & (at_peak >= min_coverage)


def energy_in_mask(maps: np.ndarray, coverage: np.ndarray) -> np.ndarray:
    """(..., h, w) non-negative maps -> share of each map's mass inside its mask, (...)."""
    total = maps.sum(axis=(-2, -1), dtype=np.float64)
    inside = (maps * coverage).sum(axis=(-2, -1), dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return inside / total


def _mean_or_none(values: np.ndarray) -> float | None:
    return float(values.mean()) if values.size else None


def _scores(maps: np.ndarray, coverage: np.ndarray, min_coverage: float) -> dict[str, Any]:
    """Pointing game and energy of maps (M, h, w) against coverage (M, h, w), with chance."""
    chance_hits = ((coverage > 0) & (coverage >= min_coverage)).mean(axis=(-2, -1))
    return {
        "n_maps": len(maps),
        "pointing_game": _mean_or_none(pointing_hits(maps, coverage, min_coverage)),
        "pointing_game_chance": _mean_or_none(chance_hits),
        "energy_in_mask": _mean_or_none(energy_in_mask(maps, coverage)),
        "energy_in_mask_chance": _mean_or_none(coverage.mean(axis=(-2, -1))),
    }


def localization_report(
    maps: np.ndarray,
    kept: np.ndarray,
    coverage: Mapping[str, np.ndarray],
    rank: str,
    min_coverage: float = 0.0,
) -> dict[str, Any]:
    """Scores of one rank's kept heads against every rank's trait.

    Args:
        maps: (N, H, h, w) target-class maps of the N searched (correctly classified) images.
        kept: (N, H) bool, the kept heads.
        coverage: ``{trait rank: (N, h, w) coverage}``, ``rank`` among them.
        rank: The rank whose trait counts as its own.
        min_coverage: See the module docstring.

    Returns:
        ``pointing_game``, ``energy_in_mask`` (and their ``_chance``), ``n_images``, ``n_maps``
        for the own trait; ``by_trait``: the same for every trait; ``mean_map``: the same for
        the mean of each image's kept maps; ``by_head``: own-trait scores per head.
    """
    if rank not in coverage:
        raise KeyError(f"no trait mask for rank {rank!r}; masks for {sorted(coverage)}")
    by_trait, mean_map, by_head = {}, {}, {}
    has_kept = kept.any(axis=1)
    with np.errstate(invalid="ignore"):
        kept_means = (maps * kept[..., None, None]).sum(axis=1) / kept.sum(axis=1)[:, None, None]
    for trait, trait_coverage in coverage.items():
        present = trait_coverage.max(axis=(-2, -1), initial=0) > 0
        chosen = kept & present[:, None]
        by_trait[trait] = _scores(maps[chosen], trait_coverage[np.nonzero(chosen)[0]], min_coverage)
        by_trait[trait]["n_images"] = int(chosen.any(axis=1).sum())
        images = present & has_kept
        mean_map[trait] = _scores(kept_means[images], trait_coverage[images], min_coverage)
        mean_map[trait]["n_images"] = int(images.sum())
    own = coverage[rank]
    own_present = own.max(axis=(-2, -1), initial=0) > 0
    for head in range(maps.shape[1]):
        chosen = kept[:, head] & own_present
        by_head[str(head)] = _scores(maps[chosen, head], own[chosen], min_coverage)
    return {
        "rank": rank,
        "min_coverage": min_coverage,
        **by_trait[rank],
        "by_trait": by_trait,
        "mean_map": mean_map,
        "by_head": by_head,
    }


def has_masks(shards_dir: str | os.PathLike) -> bool:
    """Whether the shards carry trait masks (their manifest's ``has_masks``)."""
    from promptcam.data.reader import load_manifest

    manifest = load_manifest(shards_dir)
    if "has_masks" not in manifest:
        raise ValueError(f"{shards_dir}/manifest.json has no has_masks: rerun the shards rule")
    return bool(manifest["has_masks"])


def read_masks(
    shards_dir: str | os.PathLike,
    rank: str,
    preprocessing: Any,
    levels: Sequence[str],
    split: str = "test",
) -> dict[str, dict[str, np.ndarray]]:
    """``{sample_id: {trait rank: bool mask (S, S)}}`` of ``split`` at the model's input size,
    from the shards' bitmask (bit i = ``levels[i]``'s trait)."""
    from promptcam.data.masks import decode_trait_mask
    from promptcam.data.reader import TransformConfig, split_loader

    transform = TransformConfig.unaugmented(preprocessing)
    loader = split_loader(shards_dir, split, rank, transform, batch_size=64, with_mask=True)
    masks = {}
    for _, _, meta in loader:
        for sample_id, mask in zip(meta["sample_id"], meta["mask"], strict=True):
            masks[sample_id] = decode_trait_mask(mask.numpy(), levels)
    return masks


def _json_safe(value: Any) -> Any:
    """NaN -> None, recursively, so that the JSON stays standard."""
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


# ----------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class FixedPlacePrior:
    """The best constant maps learnt from training masks (flat patch indices): a guess that
    knows where the trait usually lies and nothing about the image."""

    pointing_patch: int  # the patch most often a pointing-game hit
    energy_patch: int  # the patch of highest mean coverage
    n_train_images: int


def _hit_patches(coverage: np.ndarray, min_coverage: float) -> np.ndarray:
    return (coverage > 0) & (coverage >= min_coverage)


def fit_fixed_place_prior(
    train_coverage: np.ndarray, min_coverage: float = 0.0
) -> FixedPlacePrior | None:
    """The prior from training coverage (N, h, w) of one trait; images without the trait are
    left out, and None is returned when no image has it. Ties go to the first patch."""
    present = train_coverage.max(axis=(-2, -1), initial=0) > 0
    chosen = _flatten_grid(train_coverage[present])
    if not len(chosen):
        return None
    return FixedPlacePrior(
        pointing_patch=int(_hit_patches(chosen, min_coverage).mean(axis=0).argmax()),
        energy_patch=int(chosen.mean(axis=0).argmax()),
        n_train_images=len(chosen),
    )


def fixed_place_scores(
    prior: FixedPlacePrior | None, coverage: np.ndarray, min_coverage: float = 0.0
) -> tuple[float | None, float | None]:
    """Mean pointing game and energy in mask of the prior's point masses on coverage (N, h, w)."""
    flat = _flatten_grid(coverage)
    if prior is None or not len(flat):
        return None, None
    pointing = _hit_patches(flat[:, prior.pointing_patch], min_coverage)
    return float(pointing.mean()), float(flat[:, prior.energy_patch].mean())


def _row(
    method: str,
    model: str,
    maps: np.ndarray,
    coverage: np.ndarray,
    n_images: int,
    prior: FixedPlacePrior | None,
    min_coverage: float,
) -> dict[str, Any]:
    """One ``localization.tsv`` row: maps (M, h, w) scored against coverage (M, h, w)."""
    scores = _scores(maps, coverage, min_coverage)
    fixed_pointing, fixed_energy = fixed_place_scores(prior, coverage, min_coverage)
    return {
        "method": method,
        "model": model,
        "n_images": n_images,
        "n_maps": scores["n_maps"],
        "pointing_game": scores["pointing_game"],
        "energy_in_mask": scores["energy_in_mask"],
        "pointing_game_uniform_chance": scores["pointing_game_chance"],
        "energy_in_mask_uniform_chance": scores["energy_in_mask_chance"],
        "pointing_game_fixed_place": fixed_pointing,
        "energy_in_mask_fixed_place": fixed_energy,
    }


def best_fixed_head(maps: np.ndarray, coverage: np.ndarray, min_coverage: float = 0.0) -> int:
    """The head whose maps (N, H, h, w) point at the trait (N, h, w) most often (ties: first)."""
    hits = pointing_hits(maps, coverage[:, None], min_coverage)  # (N, H)
    return int(hits.mean(axis=0).argmax())


def localization_rows(
    *,
    maps: np.ndarray,
    kept: np.ndarray,
    order: np.ndarray,
    coverage: np.ndarray,
    baselines: Mapping[tuple[str, str], np.ndarray],
    prior: FixedPlacePrior | None,
    fixed_head: int | None = None,
    random_seed: int = 0,
    min_coverage: float = 0.0,
) -> pd.DataFrame:
    """``localization.tsv``'s rows for one rank, on the rank's own trait.

    Args:
        maps: (N, H, h, w) target-class maps of the N searched test images.
        kept: (N, H) bool kept heads; order: (N, H) the greedy elimination order (last: the
            most important head).
        coverage: (N, h, w) the own trait's coverage; images without the trait are left out.
        baselines: ``{(method, model): (N, h, w) maps}`` of the same images; NaN maps are left
            out (a method without any map gets no row).
        prior: the fixed-place prior (None: no training image has the trait).
        fixed_head: the head of ``prompt_cam_best_fixed_head``, chosen on the train images (the
            heads rule); None chooses it on these images (optimistic).
        random_seed: seeds the ``random`` row's uniform noise maps.

    Returns:
        One row per method and model (``LOCALIZATION_TABLE_COLUMNS``); ``fixed_head`` and
        ``fixed_head_chosen_on`` (train or test) are set on the fixed head's row only.
    """
    from promptcam.evaluation.fidelity import prompt_cam_saliency, top_head_maps

    present = coverage.max(axis=(-2, -1), initial=0) > 0
    maps, kept, order, own = maps[present], kept[present], order[present], coverage[present]
    count = len(own)
    chosen_on = "train" if fixed_head is not None else "test"
    if fixed_head is None and count:
        fixed_head = best_fixed_head(maps, own, min_coverage)
    pooled = np.nonzero(kept)
    prompt_maps = {
        "prompt_cam_top_head": top_head_maps(maps, order),
        "prompt_cam_kept_heads": prompt_cam_saliency(maps, kept, order),
    }
    rows = [
        _row(method, "prompt_cam", values, own, count, prior, min_coverage)
        for method, values in prompt_maps.items()
    ]
    rows.append(
        _row(
            "prompt_cam_kept_heads_pooled", "prompt_cam", maps[pooled], own[pooled[0]],
            int(kept.any(axis=1).sum()), prior, min_coverage,
        )
    )  # fmt: skip
    fixed = maps[:, fixed_head] if fixed_head is not None else np.zeros((0, *own.shape[1:]))
    rows.append(
        _row("prompt_cam_best_fixed_head", "prompt_cam", fixed, own, count, prior, min_coverage)
        | {"fixed_head": fixed_head, "fixed_head_chosen_on": chosen_on if count else None}
    )
    for (method, model), values in baselines.items():
        # cam_maps.npz holds NaN where a method has no map (e.g. for one model): left out.
        values = values[present]
        drawn = ~np.isnan(values).any(axis=(-2, -1))
        if len(values) and not drawn.any():
            continue
        rows.append(
            _row(method, model, values[drawn], own[drawn], int(drawn.sum()), prior, min_coverage)
        )
    noise = np.random.default_rng(random_seed).random(own.shape)
    rows.append(_row("random", "none", noise, own, count, prior, min_coverage))
    table = pd.DataFrame(rows).reindex(columns=list(LOCALIZATION_TABLE_COLUMNS))
    scores = [c for c in LOCALIZATION_TABLE_COLUMNS if c.startswith(("pointing", "energy"))]
    table[scores] = table[scores].astype(np.float64)  # None (nothing scored) -> NaN
    table["fixed_head"] = table["fixed_head"].astype("Int64")
    return table


def _baseline_maps(
    cam_maps: str | os.PathLike, image_ids: np.ndarray
) -> tuple[np.ndarray, dict[tuple[str, str], np.ndarray]]:
    """Which of ``image_ids`` have maps in ``cam_maps.npz`` ((N,) bool), and ``{(method,
    model): (n, h, w)}`` of those, in ``image_ids``' order. Prompt-CAM's own maps and any random
    map in the file are left out: the table makes its own."""
    from promptcam.evaluation.tables import read_cam_maps

    stored = read_cam_maps(cam_maps)
    row_of = {str(image): row for row, image in enumerate(stored.image)}
    found = np.array([str(image) in row_of for image in image_ids], dtype=bool)
    rows = np.array([row_of[str(image)] for image in image_ids[found]], dtype=np.int64)
    baselines = {
        (str(method), str(model)): np.asarray(stored.maps[rows, column], dtype=np.float64)
        for column, (method, model) in enumerate(zip(stored.method, stored.model, strict=True))
        if method != "random" and not str(method).startswith("prompt_cam")
    }
    return found, baselines


def _fixed_head_from(heads_tsv: str | os.PathLike | None) -> int | None:
    """The head with the best *train* pointing game in ``heads.tsv``; None without one."""
    if heads_tsv is None:
        return None
    heads = read_heads_table(heads_tsv)
    train = heads["train_pointing_game"].astype("Float64")
    if train.isna().all():
        return None
    return int(heads.loc[train.fillna(-1.0).astype(float).idxmax(), "head"])


def _coverage_of(
    masks: Mapping[str, Mapping[str, np.ndarray]],
    ids: Sequence[str],
    level: str,
    grid: tuple[int, int],
) -> np.ndarray:
    if not len(ids):
        return np.zeros((0, *grid))
    return patch_coverage(np.stack([masks[i][level] for i in ids]), grid)


def _maskless_outputs(
    stored: TraitMaps,
    searched: np.ndarray,
    rank: str,
    levels: Sequence[str],
    baselines: Mapping[tuple[str, str], np.ndarray],
    min_coverage: float,
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Both files' contents for data without masks: every row present, nothing scored."""
    grid = tuple(stored.map_shape[-2:])
    empty = np.zeros((0, *grid))
    report = localization_report(
        np.zeros((0, stored.num_heads, *grid)),
        np.zeros((0, stored.num_heads), bool),
        {level: empty for level in levels},
        rank,
        min_coverage,
    )
    table = localization_rows(
        maps=np.zeros((0, stored.num_heads, *grid)),
        kept=np.zeros((0, stored.num_heads), bool),
        order=np.zeros((0, stored.num_heads), np.int64),
        coverage=empty,
        baselines={key: empty for key in baselines},
        prior=None,
        min_coverage=min_coverage,
    )
    return report, table


def run_rank_localization(
    *,
    trait_maps: str | os.PathLike,
    checkpoint: str | os.PathLike,
    shards_dir: str | os.PathLike,
    rank: str,
    levels: Sequence[str],
    out_json: str | os.PathLike,
    cam_maps: str | os.PathLike,
    out_tsv: str | os.PathLike,
    heads_tsv: str | os.PathLike | None = None,
    min_coverage: float = 0.0,
    random_seed: int = 0,
    backbone_weights: str | os.PathLike | None = None,
) -> pd.DataFrame:
    """Score the traits rule's ``trait_maps.npz`` (``localization.json``) and every method of
    :func:`localization_rows` (``localization.tsv``, with ``cam_maps.npz``'s baselines) against
    the test split's trait masks; the fixed-place prior from the train split's masks.

    ``heads_tsv`` (the heads rule's table) fixes ``prompt_cam_best_fixed_head`` to the head
    with the best train pointing game; without it the head is chosen on the test images.
    Without masks in the shards both files are written with nothing scored."""
    from promptcam.model.checkpoint import load_checkpoint

    stored = read_trait_maps(trait_maps)
    searched = np.nonzero(stored.searched)[0]
    ids = stored.image[searched]
    with_cams, baselines = _baseline_maps(cam_maps, ids)
    if not with_cams.all():
        # Every row must score the same images: the table keeps those with baseline maps.
        LOGGER.warning(
            "%s: %d of %d searched test images have no maps in %s (traits.fidelity.max_images):"
            " localization.tsv scores the %d that have",
            rank,
            int((~with_cams).sum()),
            len(ids),
            cam_maps,
            int(with_cams.sum()),
        )
    if not has_masks(shards_dir):
        LOGGER.warning(
            "%s: the shards in %s have no trait masks (no mask column in the metadata): "
            "localisation not measured, files written with n_images 0",
            rank,
            shards_dir,
        )
        report, table = _maskless_outputs(stored, searched, rank, levels, baselines, min_coverage)
        report.update({"has_masks": False, "n_test_images": len(stored.image)})
        write_json(out_json, _json_safe(report))
        write_localization_table(out_tsv, table)
        return table
    _, meta = load_checkpoint(checkpoint, backbone_weights=backbone_weights)
    masks = read_masks(shards_dir, rank, meta.preprocessing, levels)
    missing = sorted(set(ids) - set(masks))
    if missing:
        raise KeyError(f"{len(missing)} images of {trait_maps} have no mask, e.g. {missing[:3]}")
    grid = tuple(stored.map_shape[-2:])
    coverage = {level: _coverage_of(masks, ids, level, grid) for level in levels}
    maps = stored.read_maps(searched)
    report = localization_report(maps, stored.kept[searched], coverage, rank, min_coverage)
    report.update({"has_masks": True, "n_test_images": len(stored.image)})
    report = _json_safe(report)
    LOGGER.info(
        "%s: pointing game %s (chance %s), energy in mask %s (chance %s), %d maps",
        rank,
        report["pointing_game"],
        report["pointing_game_chance"],
        report["energy_in_mask"],
        report["energy_in_mask_chance"],
        report["n_maps"],
    )
    write_json(out_json, report)
    train_masks = read_masks(shards_dir, rank, meta.preprocessing, levels, split="train")
    train_ids = sorted(train_masks)
    prior = fit_fixed_place_prior(_coverage_of(train_masks, train_ids, rank, grid), min_coverage)
    fixed_head = _fixed_head_from(heads_tsv)
    if fixed_head is None:
        LOGGER.warning(
            "%s: prompt_cam_best_fixed_head chosen on the test images (optimistic): no train "
            "pointing game in %s",
            rank,
            heads_tsv or "(no heads.tsv given)",
        )
    table = localization_rows(
        maps=maps[with_cams],
        kept=stored.kept[searched][with_cams],
        order=stored.order[searched][with_cams],
        coverage=coverage[rank][with_cams],
        baselines=baselines,
        prior=prior,
        fixed_head=fixed_head,
        random_seed=random_seed,
        min_coverage=min_coverage,
    )
    LOGGER.info("%s: localisation on the own trait\n%s", rank, table.to_string(index=False))
    write_localization_table(out_tsv, table)
    return table
