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
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from promptcam.io import write_json
from promptcam.traits.tables import read_trait_maps

LOGGER = logging.getLogger(__name__)

__all__ = [
    "energy_in_mask",
    "localization_report",
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


def read_masks(
    shards_dir: str | os.PathLike, rank: str, preprocessing: Any, levels: Sequence[str]
) -> dict[str, dict[str, np.ndarray]]:
    """``{sample_id: {trait rank: bool mask (S, S)}}`` of the test split at the model's input
    size, from the shards' bitmask (bit i = ``levels[i]``'s trait)."""
    from promptcam.data.masks import decode_trait_mask
    from promptcam.data.reader import TransformConfig, split_loader

    transform = TransformConfig.unaugmented(preprocessing)
    loader = split_loader(shards_dir, "test", rank, transform, batch_size=64, with_mask=True)
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


def run_rank_localization(
    *,
    trait_maps: str | os.PathLike,
    checkpoint: str | os.PathLike,
    shards_dir: str | os.PathLike,
    rank: str,
    levels: Sequence[str],
    out_json: str | os.PathLike,
    min_coverage: float = 0.0,
    backbone_weights: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Score the traits rule's ``trait_maps.npz`` against the test split's trait masks."""
    from promptcam.model.checkpoint import load_checkpoint

    _, meta = load_checkpoint(checkpoint, backbone_weights=backbone_weights)
    stored = read_trait_maps(trait_maps)
    searched = np.nonzero(stored.searched)[0]
    masks = read_masks(shards_dir, rank, meta.preprocessing, levels)
    ids = stored.image[searched]
    missing = sorted(set(ids) - set(masks))
    if missing:
        raise KeyError(f"{len(missing)} images of {trait_maps} have no mask, e.g. {missing[:3]}")
    grid = tuple(stored.map_shape[-2:])
    coverage = {
        level: patch_coverage(np.stack([masks[i][level] for i in ids]), grid)
        if len(ids)
        else np.zeros((0, *grid))
        for level in levels
    }
    report = localization_report(
        stored.read_maps(searched), stored.kept[searched], coverage, rank, min_coverage
    )
    report["n_test_images"] = len(stored.image)
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
    return report
