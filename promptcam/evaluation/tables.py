"""The evaluation stage's files: writers and readers that need no torch (figures read them).

- ``eval.json``: :func:`promptcam.evaluation.evaluate.classification_report` and the probe.
- ``confusion.tsv``: counts, row = true class, column = predicted class.
- ``fidelity.tsv``: one row per method (mean insertion/deletion AUC).
- ``fidelity_curves.tsv``: the mean insertion/deletion curves, one row per method, mode, step.
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
FIDELITY_CURVE_COLUMNS = (
    "method",
    "model",
    "mode",
    "step",
    "fraction",
    "probability",
    "n_images",
)
FIDELITY_MODES = ("insertion", "deletion")


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


def _check_fidelity_curves(curves: pd.DataFrame, path: str | os.PathLike) -> pd.DataFrame:
    missing = [column for column in FIDELITY_CURVE_COLUMNS if column not in curves.columns]
    if missing:
        raise ValueError(f"{path}: no column {missing}; rerun the fidelity rule")
    modes = set(curves["mode"]) - set(FIDELITY_MODES)
    if modes:
        raise ValueError(f"{path}: modes {sorted(modes)}, expected {list(FIDELITY_MODES)}")
    return curves


def write_fidelity_curves(path: str | os.PathLike, curves: pd.DataFrame) -> None:
    """``fidelity_curves.tsv``, atomically: one row per ``method``, ``model``, ``mode``
    (insertion or deletion) and ``step``; ``fraction`` is the share of patches inserted or
    deleted, ``probability`` the true class's mean probability over ``n_images`` images."""
    _check_fidelity_curves(curves, path)
    with atomic_open(path, "w", newline="") as handle:
        curves.loc[:, list(FIDELITY_CURVE_COLUMNS)].to_csv(handle, sep="\t", index=False)


def read_fidelity_curves(path: str | os.PathLike) -> pd.DataFrame:
    """``fidelity_curves.tsv`` (see :func:`write_fidelity_curves`), rows ordered by method (as
    written), mode and step."""
    curves = _check_fidelity_curves(pd.read_csv(path, sep="\t"), path)
    return curves.reset_index(drop=True)


def fidelity_curve_aucs(curves: pd.DataFrame) -> pd.DataFrame:
    """Trapezoid area of each mean curve: ``method``, ``model``, ``mode``, ``auc`` (equal to the
    mean AUC of ``fidelity.tsv``), in the curves' order."""
    rows = [
        {
            "method": method,
            "model": model,
            "mode": mode,
            "auc": float(np.trapezoid(curve["probability"], curve["fraction"])),
        }
        for (method, model, mode), curve in curves.sort_values("step", kind="stable").groupby(
            ["method", "model", "mode"], sort=False
        )
    ]
    return pd.DataFrame(rows, columns=["method", "model", "mode", "auc"])
