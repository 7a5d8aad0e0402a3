"""Deterministic, stratified train/val/test splits.

Rule, per class of the finest rank (n images of that class):

- n < ``min_class_size``: every image goes to train (too few to hold any out); such classes
  are listed in the split summary with the rule ``too_small``.
- otherwise each split with a non-zero fraction gets ``round(n * fraction)`` images but at
  least one, and train keeps at least one (val/test give way, the larger one first).

Which images go where depends only on the seed, the class name and the sample ids, never on
row order or on the other classes, so adding a class does not reshuffle the existing ones.
A ``split`` column given in the metadata wins over all of this (rule ``given``).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SplitConfig:
    """The config's ``splits`` section; defaults as in the schema."""

    train: float = 0.7
    val: float = 0.15
    test: float = 0.15
    seed: int = 0
    min_class_size: int = 3

    def __post_init__(self) -> None:
        fractions = self.fractions()
        if any(value < 0 for value in fractions.values()) or self.train <= 0:
            raise ValueError(f"split fractions must be >= 0 with train > 0, got {fractions}")
        if not math.isclose(sum(fractions.values()), 1.0, abs_tol=1e-6):
            raise ValueError(f"split fractions must sum to 1, got {fractions}")
        if self.min_class_size < 1:
            raise ValueError(f"min_class_size must be >= 1, got {self.min_class_size}")

    def fractions(self) -> dict[str, float]:
        return {"train": self.train, "val": self.val, "test": self.test}


def _round_half_up(value: float) -> int:
    # Python's round() rounds half to even; half-up is easier to explain in the docs.
    return math.floor(value + 0.5)


def split_counts(n: int, config: SplitConfig) -> dict[str, int]:
    """How many of a class's ``n`` images go to each split (see the module docstring)."""
    if n < config.min_class_size:
        return {"train": n, "val": 0, "test": 0}
    held_out = {
        split: max(1, _round_half_up(n * fraction)) if fraction > 0 else 0
        for split, fraction in config.fractions().items()
        if split != "train"
    }
    while n - sum(held_out.values()) < 1:
        largest = max(held_out, key=lambda split: (held_out[split], split))
        held_out[largest] -= 1
    return {"train": n - sum(held_out.values()), **held_out}


def _class_seed(seed: int, name: str) -> list[int]:
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return [seed, int.from_bytes(digest[:8], "little")]


def assign_splits(sample_ids: pd.Series, classes: pd.Series, config: SplitConfig) -> pd.Series:
    """Stratified split labels, aligned with ``sample_ids`` (one class label per sample)."""
    # One sort by (class, sample id) and slices per class: a million images in ten thousand
    # classes take a second (a groupby with per-class assignments took minutes).
    order = pd.DataFrame(
        {"cls": classes.to_numpy(dtype=object), "sample_id": sample_ids.to_numpy(dtype=object)}
    ).sort_values(["cls", "sample_id"], kind="stable")
    positions = order.index.to_numpy()
    names = order["cls"].to_numpy()
    starts = np.flatnonzero(np.r_[True, names[1:] != names[:-1]])
    ends = np.r_[starts[1:], len(names)]
    assignment = np.full(len(names), "", dtype=object)
    for begin, end in zip(starts, ends, strict=True):
        # Sorted by id first, so the result does not depend on the table's row order.
        members = np.random.default_rng(_class_seed(config.seed, str(names[begin]))).permutation(
            positions[begin:end]
        )
        counts = split_counts(len(members), config)
        start = 0
        for split in SPLITS:
            assignment[members[start : start + counts[split]]] = split
            start += counts[split]
    return pd.Series(assignment, index=sample_ids.index, dtype=object)


def summarize_splits(
    classes: pd.Series, splits: pd.Series, config: SplitConfig, given: bool
) -> pd.DataFrame:
    """One row per class: images per split, total, and which rule placed them."""
    counts = pd.crosstab(classes, splits).reindex(columns=list(SPLITS), fill_value=0)
    summary = counts.rename(columns={split: f"n_{split}" for split in SPLITS})
    summary["total"] = counts.sum(axis=1)
    if given:
        summary["rule"] = "given"
    else:
        summary["rule"] = np.where(
            summary["total"] < config.min_class_size, "too_small", "stratified"
        )
    summary.index.name = "class"
    return summary.reset_index().sort_values("class", kind="stable").reset_index(drop=True)
