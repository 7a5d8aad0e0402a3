"""The evaluation stage's files: writers and readers that need no torch (figures read them).

- ``eval.json``: :func:`promptcam.evaluation.evaluate.classification_report` and the probe.
- ``confusion.tsv``: counts, row = true class, column = predicted class.
- ``fidelity.tsv``: one row per method and model (mean insertion/deletion AUC, raw and
  normalised by the model's clean-image probability, next to a random map's).
- ``fidelity_curves.tsv``: the mean insertion/deletion curves, one row per method, model, mode,
  step.
- ``cam_maps.npz``: every method's saliency map of every test image (:func:`write_cam_maps`).
- ``localization.json``: pointing game and energy in mask of the kept heads.
- ``counterfactual.json``: flip rates of the top-trait region against random regions.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
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
FIDELITY_COLUMNS = (
    "method",
    "model",
    "insertion",
    "deletion",
    "insertion_norm",
    "deletion_norm",
    "clean_probability",
    "n_images",
)
CAM_MAP_ARRAYS = ("image", "method", "model", "maps")


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
    """``fidelity.tsv``: one row per ``method`` and ``model`` (the model whose maps and scores
    they are: ``prompt_cam`` or ``linear_probe``); ``insertion``, ``deletion`` (mean AUCs),
    ``insertion_norm``, ``deletion_norm`` (those divided by ``clean_probability``, the model's
    mean true-class probability on the clean images), ``n_images``. The ``random`` method is the
    mean over random patch rankings."""
    table = pd.read_csv(path, sep="\t")
    missing = [column for column in FIDELITY_COLUMNS if column not in table.columns]
    if missing:
        raise ValueError(f"{path}: no column {missing}; rerun the fidelity rule")
    return table


def paper_claim(table: pd.DataFrame) -> dict[str, Any]:
    """Whether the paper's fidelity claim holds within the Prompt-CAM model in ``fidelity.tsv``'s
    ``table``: Prompt-CAM's maps have the highest insertion AUC and the lowest deletion AUC of
    the methods on that model (random included). Returns ``highest_insertion``,
    ``lowest_deletion``, ``holds`` (both), and the best method of each mode."""
    rows = table[table["model"] == "prompt_cam"].set_index("method")
    if "prompt_cam" not in rows.index or len(rows) < 2:
        raise ValueError("fidelity.tsv has no Prompt-CAM row and baselines on the Prompt-CAM model")
    others = rows.drop(index="prompt_cam")
    highest = bool(rows.loc["prompt_cam", "insertion"] > others["insertion"].max())
    lowest = bool(rows.loc["prompt_cam", "deletion"] < others["deletion"].min())
    return {
        "highest_insertion": highest,
        "lowest_deletion": lowest,
        "holds": highest and lowest,
        "best_insertion": str(rows["insertion"].idxmax()),
        "best_deletion": str(rows["deletion"].idxmin()),
    }


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


# ----------------------------------------------------------------------------- localisation

# localization.tsv: one row per method and model, on the rank's own trait (see
# promptcam.evaluation.localization.localization_rows).
LOCALIZATION_TABLE_COLUMNS = (
    "method",
    "model",
    "n_images",
    "n_maps",
    "pointing_game",
    "energy_in_mask",
    "pointing_game_uniform_chance",
    "energy_in_mask_uniform_chance",
    "pointing_game_fixed_place",
    "energy_in_mask_fixed_place",
    "fixed_head",
    "fixed_head_chosen_on",
)
# heads.tsv: one row per last-block head (see promptcam.evaluation.heads.heads_table).
HEADS_COLUMNS = (
    "head",
    "class_information",
    "class_information_chance",
    "n_train_images",
    "n_test_images",
    "train_pointing_game",
    "pointing_game",
    "energy_in_mask",
    "n_images",
    "keep_rate",
    "mean_kept_rank",
)


def _write_tsv(
    path: str | os.PathLike, table: pd.DataFrame, columns: Sequence[str], what: str
) -> None:
    missing = [column for column in columns if column not in table.columns]
    if missing:
        raise ValueError(f"{path}: the {what} lacks columns {missing}")
    with atomic_open(path, "w", newline="") as handle:
        table.loc[:, list(columns)].to_csv(handle, sep="\t", index=False, na_rep="NA")


def _read_tsv(path: str | os.PathLike, columns: Sequence[str], rule: str) -> pd.DataFrame:
    table = pd.read_csv(path, sep="\t", na_values=["NA"], keep_default_na=False)
    missing = [column for column in columns if column not in table.columns]
    if missing:
        raise ValueError(f"{path}: no column {missing}; rerun the {rule} rule")
    return table


def write_localization_table(path: str | os.PathLike, table: pd.DataFrame) -> None:
    """``localization.tsv``, atomically; null scores (no masks, no images) as ``NA``."""
    _write_tsv(path, table, LOCALIZATION_TABLE_COLUMNS, "localisation table")


def read_localization_table(path: str | os.PathLike) -> pd.DataFrame:
    """``localization.tsv`` (see :func:`write_localization_table`), rows as written; NA -> NaN."""
    table = _read_tsv(path, LOCALIZATION_TABLE_COLUMNS, "localization")
    table["fixed_head"] = table["fixed_head"].astype("Int64")
    return table


def write_heads_table(path: str | os.PathLike, table: pd.DataFrame) -> None:
    """``heads.tsv``, atomically, one row per head; unmeasured values as ``NA``."""
    _write_tsv(path, table, HEADS_COLUMNS, "heads table")


def read_heads_table(path: str | os.PathLike) -> pd.DataFrame:
    """``heads.tsv`` (see :func:`write_heads_table`); NA -> NaN."""
    return _read_tsv(path, HEADS_COLUMNS, "heads")


# ----------------------------------------------------------------------------- cam_maps.npz


@dataclass(frozen=True)
class CamMaps:
    """``cam_maps.npz``: ``maps[i, m]`` is method ``method[m]``'s map, explaining model
    ``model[m]``, of test image ``image[i]`` (NaN where the method has no map)."""

    image: np.ndarray  # (N,) str sample ids, in test-shard order
    method: np.ndarray  # (M,) str
    model: np.ndarray  # (M,) str
    maps: np.ndarray  # (N, M, h, w) float32 on the patch grid

    def pairs(self) -> list[tuple[str, str]]:
        """``(method, model)`` of each map column."""
        return [(str(m), str(o)) for m, o in zip(self.method, self.model, strict=True)]

    def maps_of(self, method: str, model: str) -> np.ndarray:
        """(N, h, w): one method's maps of one model."""
        pairs = self.pairs()
        if (method, model) not in pairs:
            raise KeyError(f"no maps of {method!r} on {model!r}; there are {pairs}")
        return self.maps[:, pairs.index((method, model))]


def _check_cam_maps(
    image: np.ndarray, method: np.ndarray, model: np.ndarray, maps: np.ndarray, path: object
) -> None:
    if maps.ndim != 4 or maps.shape[:2] != (len(image), len(method)) or len(model) != len(method):
        raise ValueError(
            f"{path}: maps {maps.shape} for {len(image)} images and {len(method)} methods "
            f"({len(model)} models): expected (images, methods, h, w)"
        )


def write_cam_maps(
    path: str | os.PathLike,
    image: Sequence[str],
    method: Sequence[str],
    model: Sequence[str],
    maps: np.ndarray,
) -> None:
    """``cam_maps.npz`` (compressed, atomically): ``image`` (N,) sample ids, ``method`` (M,),
    ``model`` (M,), ``maps`` (N, M, h, w) float32 (see :class:`CamMaps`)."""
    arrays = {
        "image": np.asarray(image, dtype=str),
        "method": np.asarray(method, dtype=str),
        "model": np.asarray(model, dtype=str),
        "maps": np.asarray(maps, dtype=np.float32),
    }
    _check_cam_maps(*arrays.values(), path)
    with atomic_open(path, "wb") as handle:
        np.savez_compressed(handle, **arrays)


def read_cam_maps(path: str | os.PathLike) -> CamMaps:
    """``cam_maps.npz`` (see :func:`write_cam_maps`)."""
    try:
        with np.load(path) as data:
            missing = [name for name in CAM_MAP_ARRAYS if name not in data.files]
            if missing:
                raise ValueError(f"{path}: no array {missing}; rerun the fidelity rule")
            arrays = {name: data[name] for name in CAM_MAP_ARRAYS}
    except (zipfile.BadZipFile, EOFError) as error:
        raise ValueError(
            f"{path}: not a readable npz ({error}); rerun the fidelity rule"
        ) from error
    arrays["image"], arrays["method"], arrays["model"] = (
        arrays[name].astype(str) for name in ("image", "method", "model")
    )
    _check_cam_maps(*arrays.values(), path)
    return CamMaps(**arrays)
