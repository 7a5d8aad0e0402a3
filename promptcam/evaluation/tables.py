"""The evaluation stage's files: writers and readers that need no torch (figures read them).

- ``eval.json``: :func:`promptcam.evaluation.evaluate.classification_report` and the probe.
- ``confusion.tsv``: counts, row = true class, column = predicted class.
- ``fidelity.tsv``: one row per method (mean insertion/deletion AUC).
- ``localization.json``: pointing game and energy in mask of the kept heads.
- ``counterfactual.json``: flip rates of the top-trait region against random regions.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from promptcam.io import atomic_open

CONFUSION_INDEX_NAME = "true\\predicted"


def write_confusion_tsv(
    path: str | os.PathLike, confusion: np.ndarray, label_names: Sequence[str]
) -> None:
    frame = pd.DataFrame(confusion, index=list(label_names), columns=list(label_names))
    frame.index.name = CONFUSION_INDEX_NAME
    with atomic_open(path, "w", newline="") as handle:
        frame.to_csv(handle, sep="\t")


def read_confusion(path: str | os.PathLike) -> pd.DataFrame:
    """``confusion.tsv`` as counts (C, C), index = true class, columns = predicted class."""
    frame = pd.read_csv(path, sep="\t", index_col=0, keep_default_na=False, dtype={0: str})
    frame.index = frame.index.astype(str)
    frame.columns = frame.columns.astype(str)
    if list(frame.index) != list(frame.columns):
        raise ValueError(f"{path}: rows and columns name different classes; rerun evaluate")
    return frame.astype(np.int64)


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    with open(path) as handle:
        return json.load(handle)


def read_eval_report(path: str | os.PathLike) -> dict[str, Any]:
    """``eval.json``: ``top1``, ``top5``, ``per_class``, ``linear_probe`` ..."""
    return read_json(path)


def read_fidelity(path: str | os.PathLike) -> pd.DataFrame:
    """``fidelity.tsv``: ``method``, ``model``, ``insertion``, ``deletion``, ``n_images`` ..."""
    return pd.read_csv(path, sep="\t")


def read_localization(path: str | os.PathLike) -> dict[str, Any]:
    """``localization.json`` (see :func:`promptcam.evaluation.localization.localization_report`)."""
    return read_json(path)


def read_counterfactual(path: str | os.PathLike) -> dict[str, Any]:
    """``counterfactual.json`` (see :func:`promptcam.evaluation.fidelity.counterfactual_report`)."""
    return read_json(path)
