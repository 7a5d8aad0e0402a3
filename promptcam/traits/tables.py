"""The traits stage's files: writers and readers (no torch)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from promptcam.io import atomic_open, atomic_path

if TYPE_CHECKING:  # annotations only: readers of these files (figures) must not import torch
    from promptcam.traits.search import TraitSearch


def _nullable_int(values: np.ndarray) -> pd.arrays.IntegerArray:
    """Non-negative integers, with -1 as null."""
    return pd.arrays.IntegerArray(values.astype(np.int64), mask=values < 0)


def search_table(
    search: TraitSearch, image_ids: Sequence[str], label_names: Sequence[str]
) -> pd.DataFrame:
    """One row per image and head (image-major, heads ascending).

    Columns: ``image``, ``target``/``target_label``, ``predicted``/``predicted_label`` (without
    blurring), ``correct``, ``base_score`` (target probability without blurring), ``flip_step``
    and ``flipped`` (see module docs), ``final_predicted`` (with the removed heads blurred),
    ``head``, ``removal_step`` (null for kept heads), ``score_after_removal`` (target
    probability once this head and every earlier one is blurred), ``score_drop`` (probability
    lost at this head's step), ``kept`` and ``kept_rank`` (0 = most important kept head).
    """
    trace = search.trace
    num_images, num_heads = trace.order.shape
    if len(image_ids) != num_images:
        raise ValueError(f"{len(image_ids)} image ids for {num_images} images")
    removal = search.removal_step()
    step_index = np.clip(removal, 0, None)
    after = np.where(removal >= 0, np.take_along_axis(trace.scores, step_index, axis=1), np.nan)
    previous = np.concatenate([trace.base_scores[:, None], trace.scores[:, :-1]], axis=1)
    before = np.take_along_axis(previous, step_index, axis=1)
    labels = np.asarray(label_names, dtype=object)
    final = search.final_predicted()

    def per_image(values: np.ndarray) -> np.ndarray:
        return np.repeat(values, num_heads)

    return pd.DataFrame(
        {
            "image": per_image(np.asarray(image_ids, dtype=object)),
            "target": per_image(trace.targets),
            "target_label": per_image(labels[trace.targets]),
            "predicted": per_image(trace.predicted),
            "predicted_label": per_image(labels[trace.predicted]),
            "correct": per_image(trace.searched),
            "base_score": per_image(trace.base_scores),
            "flip_step": _nullable_int(per_image(search.flip_step)),
            "flipped": per_image(search.flip_step >= 0),
            "final_predicted": per_image(final),
            "head": np.tile(np.arange(num_heads), num_images),
            "removal_step": _nullable_int(removal.ravel()),
            "score_after_removal": pd.array(after.ravel(), dtype="Float64"),
            "score_drop": pd.array(
                np.where(removal >= 0, before - after, np.nan).ravel(), dtype="Float64"
            ),
            "kept": search.kept().ravel(),
            "kept_rank": _nullable_int(search.kept_rank().ravel()),
        }
    )


def class_summary(
    table: pd.DataFrame, maps: np.ndarray, label_names: Sequence[str]
) -> tuple[pd.DataFrame, np.ndarray]:
    """Per class and head: how consistently the head is kept, and its mean map.

    Only correctly classified images count (the others were not searched).

    Args:
        table: :func:`search_table`'s rows.
        maps: (N, H, h, w) target-class maps, in the table's image order.

    Returns:
        A table (``class``, ``label``, ``head``, ``n_images``, ``keep_rate``,
        ``mean_kept_rank`` over the images keeping the head, ``mean_removal_step`` and
        ``mean_score_drop`` over those removing it) and the mean maps (C, H, h, w), NaN for a
        class without correctly classified images.
    """
    num_images, num_heads = maps.shape[:2]
    per_image = table.groupby("image", sort=False).first()
    if len(per_image) != num_images:
        raise ValueError(f"{len(per_image)} images in the table, {num_images} in the maps")
    correct = per_image["correct"].to_numpy(bool)
    targets = per_image["target"].to_numpy(np.int64)
    mean_maps = np.full((len(label_names), *maps.shape[1:]), np.nan, dtype=np.float32)
    for class_index in np.unique(targets[correct]):
        mean_maps[class_index] = maps[correct & (targets == class_index)].mean(axis=0)
    searched = table[table["correct"]]
    grouped = searched.groupby(["target", "head"])
    stats = pd.DataFrame(
        {
            "n_images": grouped["image"].nunique(),
            "keep_rate": grouped["kept"].mean(),
            "mean_kept_rank": grouped["kept_rank"].mean(),
            "mean_removal_step": grouped["removal_step"].mean(),
            "mean_score_drop": grouped["score_drop"].mean(),
        }
    )
    full_index = pd.MultiIndex.from_product(
        [range(len(label_names)), range(num_heads)], names=["target", "head"]
    )
    stats = stats.reindex(full_index)
    stats["n_images"] = stats["n_images"].fillna(0).astype(np.int64)
    stats = stats.reset_index().rename(columns={"target": "class"})
    stats.insert(1, "label", np.asarray(label_names, dtype=object)[stats["class"]])
    return stats, mean_maps


def write_trait_maps(
    path: str | os.PathLike,
    image_ids: Sequence[str],
    search: TraitSearch,
    maps: np.ndarray,
    label_names: Sequence[str],
) -> None:
    """``trait_maps.npz`` (compressed): ``image`` (N,), ``target`` (N,), ``maps`` (N, H, h, w)
    float32 target-class attention of every head, ``kept`` (N, H) bool (the kept heads' maps
    are ``maps[kept]``), ``kept_rank`` (N, H) (-1: removed or unsearched), ``order`` (N, H) the
    full greedy elimination order (-1 rows: unsearched; ``order[:, -1]`` is the most important
    head), ``label_names`` (C,)."""
    with atomic_open(path, "wb") as handle:
        np.savez_compressed(
            handle,
            image=np.asarray(image_ids, dtype=str),
            target=search.trace.targets,
            maps=maps.astype(np.float32),
            kept=search.kept(),
            kept_rank=search.kept_rank(),
            order=search.trace.order,
            label_names=np.asarray(label_names, dtype=str),
        )


def write_trait_summary(
    tsv_path: str | os.PathLike,
    npz_path: str | os.PathLike,
    summary: pd.DataFrame,
    mean_maps: np.ndarray,
    label_names: Sequence[str],
) -> None:
    """The per-class summary table and ``mean_maps`` (C, H, h, w), ``keep_rate`` (C, H),
    ``n_images`` (C,), ``label_names`` (C,) in a compressed npz."""
    num_classes, num_heads = mean_maps.shape[:2]
    with atomic_open(tsv_path, "w", newline="") as handle:
        summary.to_csv(handle, sep="\t", index=False, na_rep="NA")
    keep_rate = summary["keep_rate"].to_numpy(np.float64).reshape(num_classes, num_heads)
    n_images = summary["n_images"].to_numpy(np.int64).reshape(num_classes, num_heads)[:, 0]
    with atomic_open(npz_path, "wb") as handle:
        np.savez_compressed(
            handle,
            mean_maps=mean_maps.astype(np.float32),
            keep_rate=keep_rate,
            n_images=n_images,
            label_names=np.asarray(label_names, dtype=str),
        )


def write_parquet(path: str | os.PathLike, table: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        table.to_parquet(tmp, index=False)
