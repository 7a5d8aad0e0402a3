"""Which last-block heads carry the rank's classes, where they look, and how often the greedy
search keeps them: ``results/{rank}/heads.tsv``, one row per head.

* **Class information**: a head can reach the scores only through its output in the class
  prompts' rows, so those outputs (C rows x d values per image) are the features of a
  logistic regression (standardised, ``probe_c``), fitted on the train split and scored
  (top-1) on the test split; ``class_information_chance`` is 1 / C. The same probe scored on
  the validation split decides which heads the trait search drops
  (:mod:`promptcam.traits.information`). A head that the search
  keeps while it carries chance-level information moves the target's score without telling
  the classes apart.
* **Localisation**: each head's target-class map (``trait_maps.npz``) on the searched test
  images, pointing game and energy in the rank's own trait mask (all searched images, kept or
  not), and ``train_pointing_game``, the same pointing game on the correctly classified
  *train* images, from which the localisation table picks the best single head without
  looking at the test set.
* **Keeping**: ``keep_rate``, the share of searched test images whose search kept the head;
  ``mean_kept_rank`` over those images (0 = most important).

Without trait masks the localisation columns are null and ``n_images`` is 0.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from promptcam.evaluation.localization import (
    energy_in_mask,
    has_masks,
    patch_coverage,
    pointing_hits,
)
from promptcam.evaluation.tables import HEADS_COLUMNS, write_heads_table
from promptcam.traits.information import HeadForward, head_class_information, head_forward
from promptcam.traits.tables import TraitMaps, read_trait_maps

LOGGER = logging.getLogger(__name__)

__all__ = [
    "HeadForward",
    "HeadsConfig",
    "head_class_information",
    "head_forward",
    "head_localization",
    "heads_table",
    "keep_statistics",
    "run_rank_heads",
]


@dataclass(frozen=True)
class HeadsConfig:
    """Settings of the heads rule (the workflow config's ``traits.heads`` section)."""

    batch_size: int = 64
    num_workers: int = 0
    device: str = "auto"
    threads: int = 1
    probe_c: float = 0.1
    max_iter: int = 3000
    min_coverage: float = 0.0

    def __post_init__(self) -> None:
        if self.probe_c <= 0:
            raise ValueError(f"probe_c must be positive, got {self.probe_c}")


def head_localization(
    maps: np.ndarray, coverage: np.ndarray, min_coverage: float = 0.0
) -> tuple[np.ndarray, np.ndarray, int]:
    """Per head (H,) pointing game and energy of maps (N, H, h, w) on coverage (N, h, w), over
    the images that have the trait; and their number. NaN without any."""
    present = coverage.max(axis=(-2, -1), initial=0) > 0
    maps, coverage = maps[present], coverage[present][:, None]
    if not len(maps):
        return np.full(maps.shape[1], np.nan), np.full(maps.shape[1], np.nan), 0
    pointing = pointing_hits(maps, coverage, min_coverage).mean(axis=0)
    with np.errstate(invalid="ignore"):
        energy = np.nanmean(energy_in_mask(maps, coverage), axis=0)
    return pointing, energy, len(maps)


def keep_statistics(stored: TraitMaps) -> tuple[np.ndarray, np.ndarray]:
    """Per head (H,): the share of searched images keeping it, and its mean kept rank there."""
    searched = stored.searched
    kept = stored.kept[searched]
    ranks = np.where(kept, stored.kept_rank[searched], 0).astype(np.float64)
    counts = kept.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        rate = kept.mean(axis=0) if len(kept) else np.full(kept.shape[1], np.nan)
        return rate, np.where(counts > 0, ranks.sum(axis=0) / counts, np.nan)


def heads_table(
    *,
    class_information: np.ndarray,
    num_classes: int,
    n_train_images: int,
    n_test_images: int,
    train_pointing_game: np.ndarray,
    pointing_game: np.ndarray,
    energy: np.ndarray,
    n_images: int,
    keep_rate: np.ndarray,
    mean_kept_rank: np.ndarray,
) -> pd.DataFrame:
    """``heads.tsv``'s rows (``HEADS_COLUMNS``), one per head, from per-head arrays (H,)."""
    heads = len(class_information)
    table = pd.DataFrame(
        {
            "head": np.arange(heads),
            "class_information": class_information,
            "class_information_chance": np.full(heads, 1.0 / num_classes),
            "n_train_images": n_train_images,
            "n_test_images": n_test_images,
            "train_pointing_game": train_pointing_game,
            "pointing_game": pointing_game,
            "energy_in_mask": energy,
            "n_images": n_images,
            "keep_rate": keep_rate,
            "mean_kept_rank": mean_kept_rank,
        }
    )
    return table.loc[:, list(HEADS_COLUMNS)]


def _own_coverage(
    masks: Sequence[np.ndarray], levels: Sequence[str], rank: str, grid: tuple[int, int]
) -> np.ndarray:
    """Bitmask images -> the rank's trait coverage (N, h, w)."""
    from promptcam.data.masks import decode_trait_mask

    if not len(masks):
        return np.zeros((0, *grid))
    own = np.stack([decode_trait_mask(mask, levels)[rank] for mask in masks])
    return patch_coverage(own, grid)


def run_rank_heads(
    *,
    checkpoint: str | os.PathLike,
    shards_dir: str | os.PathLike,
    trait_maps: str | os.PathLike,
    rank: str,
    levels: Sequence[str],
    out_tsv: str | os.PathLike,
    config: HeadsConfig,
    backbone_weights: str | os.PathLike | None = None,
) -> pd.DataFrame:
    """``heads.tsv`` of one rank: one forward of the train and test splits (class information,
    train maps) and the traits rule's test maps and kept heads."""
    from promptcam.data.reader import TransformConfig, split_loader
    from promptcam.model.checkpoint import load_checkpoint
    from promptcam.training.runtime import resolve_device

    torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    model, meta = load_checkpoint(checkpoint, backbone_weights=backbone_weights)
    model.to(device).eval()
    with_masks = has_masks(shards_dir)
    transform = TransformConfig.unaugmented(meta.preprocessing)
    forwards = {
        split: head_forward(
            model,
            split_loader(
                shards_dir,
                split,
                rank,
                transform,
                config.batch_size,
                config.num_workers,
                device,
                with_mask=with_masks,
            ),
            device,
            with_masks,
        )
        for split in ("train", "test")
    }
    train, test = forwards["train"], forwards["test"]
    information = head_class_information(
        (train.features, train.labels), (test.features, test.labels), config.probe_c,
        config.max_iter,
    )  # fmt: skip
    stored = read_trait_maps(trait_maps)
    keep_rate, mean_rank = keep_statistics(stored)
    heads = model.num_heads
    nothing = np.full(heads, np.nan)
    train_pointing, pointing, energy, n_images = nothing, nothing, nothing, 0
    if with_masks:
        grid = tuple(stored.map_shape[-2:])
        correct = np.nonzero(train.predicted == train.labels)[0]
        train_coverage = _own_coverage([train.masks[i] for i in correct], levels, rank, grid)
        train_pointing = head_localization(
            train.maps[correct], train_coverage, config.min_coverage
        )[0]
        searched = np.nonzero(stored.searched)[0]
        test_row = {sample_id: row for row, sample_id in enumerate(test.sample_ids)}
        test_masks = [test.masks[test_row[str(i)]] for i in stored.image[searched]]
        pointing, energy, n_images = head_localization(
            stored.read_maps(searched),
            _own_coverage(test_masks, levels, rank, grid),
            config.min_coverage,
        )
    else:
        LOGGER.warning(
            "%s: the shards in %s have no trait masks: heads.tsv has class information and "
            "keep rates only",
            rank,
            shards_dir,
        )
    table = heads_table(
        class_information=information,
        num_classes=model.num_classes,
        n_train_images=len(train.labels),
        n_test_images=len(test.labels),
        train_pointing_game=train_pointing,
        pointing_game=pointing,
        energy=energy,
        n_images=n_images,
        keep_rate=keep_rate,
        mean_kept_rank=mean_rank,
    )
    LOGGER.info("%s: heads\n%s", rank, table.to_string(index=False))
    write_heads_table(out_tsv, table)
    return table
