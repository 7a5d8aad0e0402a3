"""The taxonomy as the classifiers see it: which classes of a rank share a parent (siblings),
which class of the coarser rank is each class's parent, and top-down inference along the path.

Torch-free (numpy and the label maps), so that evaluation, research scripts and figures can
use it on stored scores. The label maps are ``labels/{rank}.tsv`` of the data stage
(:func:`promptcam.data.metadata.read_label_map`: ``index``, ``name``, ``parent``, ...); the
coarsest rank's ``parent`` is empty, so all its classes are one group of siblings.

The sibling objective (``TrainConfig.objective: siblings``) trains a rank's prompts to tell
apart only the classes sharing a parent: genus prompts need what separates the genera of a
family, species prompts what separates the species of a genus. Its scores are comparable
within a group only, so they are read top-down: the family's argmax, then the genus argmax
among that family's genera, then the species among that genus's species.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import pandas as pd

from promptcam.data.metadata import read_label_map

__all__ = [
    "parent_indices",
    "path_accuracy",
    "read_label_parents",
    "read_parent_indices",
    "read_sibling_groups",
    "sibling_groups",
    "top_down_predictions",
    "within_sibling_predictions",
]


def sibling_groups(parents: Sequence[str]) -> np.ndarray:
    """(C,) int64: each class's group, numbering the distinct parents in first-seen order.

    Classes with the same parent share a group; at the coarsest rank (every parent ``""``)
    there is one group, so the sibling softmax there is the flat one.
    """
    numbering: dict[str, int] = {}
    return np.array([numbering.setdefault(p, len(numbering)) for p in parents], dtype=np.int64)


def _checked_label_map(labels_tsv: str | os.PathLike) -> pd.DataFrame:
    labels = read_label_map(labels_tsv)
    missing = {"index", "name", "parent"} - set(labels.columns)
    if missing:
        raise ValueError(
            f"{labels_tsv}: no column(s) {sorted(missing)}; a label map of the data stage "
            "(labels/{rank}.tsv) has index, name and parent: rerun the data stage"
        )
    if labels["index"].tolist() != list(range(len(labels))):
        raise ValueError(f"{labels_tsv}: the index column must be 0..C-1 in order")
    return labels


def read_label_parents(labels_tsv: str | os.PathLike) -> list[str]:
    """Each class's parent name in index order (``""`` at the coarsest rank)."""
    return _checked_label_map(labels_tsv)["parent"].fillna("").astype(str).tolist()


def read_sibling_groups(labels_tsv: str | os.PathLike) -> np.ndarray:
    """:func:`sibling_groups` of a rank's label map, in its index order."""
    return sibling_groups(_checked_label_map(labels_tsv)["parent"].tolist())


def parent_indices(
    parents: Sequence[str], parent_names: Sequence[str], where: str = "label map"
) -> np.ndarray:
    """(C,) int64: the index, among the coarser rank's ``parent_names``, of each class's parent."""
    index = {name: i for i, name in enumerate(parent_names)}
    unknown = sorted({p for p in parents if p not in index})
    if unknown:
        raise ValueError(
            f"{where}: parents {unknown[:3]} are not classes of the coarser rank "
            f"({len(parent_names)} classes); the label maps come from different data stages"
        )
    return np.array([index[p] for p in parents], dtype=np.int64)


def read_parent_indices(
    labels_tsv: str | os.PathLike, parent_labels_tsv: str | os.PathLike
) -> np.ndarray:
    """:func:`parent_indices` of ``labels_tsv``'s classes in ``parent_labels_tsv``'s."""
    child = _checked_label_map(labels_tsv)
    parent = _checked_label_map(parent_labels_tsv)
    return parent_indices(child["parent"].tolist(), parent["name"].tolist(), str(labels_tsv))


def within_sibling_predictions(
    scores: np.ndarray, labels: np.ndarray, groups: np.ndarray
) -> np.ndarray:
    """(N,) the argmax of each sample's scores (N, C) among its true class's siblings only
    (the parent given): what the sibling objective is trained and selected on."""
    same = groups[None, :] == groups[np.asarray(labels)][:, None]
    return np.where(same, scores, -np.inf).argmax(axis=1)


def top_down_predictions(
    scores: Sequence[np.ndarray], parents: Sequence[np.ndarray | None]
) -> list[np.ndarray]:
    """Each rank's prediction read coarse to fine: the coarsest rank's argmax, then at every
    finer rank the argmax among the children of the class predicted just above.

    Args:
        scores: Per rank, coarsest first, the (N, C_r) scores of the same N samples.
        parents: Per rank, (C_r,) index of each class's parent in the rank above
            (:func:`read_parent_indices`); the coarsest rank's entry is ignored (None).

    Returns:
        Per rank, (N,) predicted class indices; every prediction's parent is the prediction
        above it, so the path is consistent (flat argmaxes need not be).
    """
    if len(scores) != len(parents) or not scores:
        raise ValueError(f"{len(scores)} ranks of scores for {len(parents)} of parents")
    predictions = [np.asarray(scores[0]).argmax(axis=1)]
    for rank_scores, rank_parents in zip(scores[1:], parents[1:], strict=True):
        rank_scores = np.asarray(rank_scores)
        if rank_parents is None or len(rank_parents) != rank_scores.shape[1]:
            raise ValueError(f"a finer rank's {rank_scores.shape[1]} classes need their parents")
        children = np.asarray(rank_parents)[None, :] == predictions[-1][:, None]
        predictions.append(np.where(children, rank_scores, -np.inf).argmax(axis=1))
    return predictions


def path_accuracy(predictions: Sequence[np.ndarray], labels: Sequence[np.ndarray]) -> float:
    """Share of samples whose prediction is right at every rank (the whole path)."""
    if len(predictions) != len(labels) or not predictions:
        raise ValueError(f"{len(predictions)} ranks of predictions for {len(labels)} of labels")
    right = np.ones(len(predictions[0]), dtype=bool)
    for predicted, truth in zip(predictions, labels, strict=True):
        right &= np.asarray(predicted) == np.asarray(truth)
    return float(right.mean())
