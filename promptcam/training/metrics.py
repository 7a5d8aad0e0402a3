"""``metrics.tsv``: one row per training epoch (no torch, so that figures can read it)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import pandas as pd

from promptcam.io import atomic_open

METRICS_COLUMNS = ("epoch", "lr", "train_loss", "train_top1", "val_loss", "val_top1", "seconds")
# Written only by the sibling objective (after the others): val top-1 among the true class's
# siblings, which selects its model. Its train_loss, train_top1 and val_loss are over siblings.
SIBLING_COLUMNS = ("val_sibling_top1",)


def write_metrics(path: str | os.PathLike, rows: Sequence[Mapping[str, float]]) -> None:
    """One row per epoch; the optional columns when the rows have them (the flat objective's
    file is exactly METRICS_COLUMNS)."""
    columns = METRICS_COLUMNS + tuple(c for c in SIBLING_COLUMNS if rows and c in rows[0])
    # Rewritten whole from the history each epoch: atomic, and consistent after a resume.
    with atomic_open(path, "w") as handle:
        handle.write("\t".join(columns) + "\n")
        for row in rows:
            handle.write("\t".join(_format_metric(row[column]) for column in columns))
            handle.write("\n")


def _format_metric(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:.6g}"


def read_metrics(path: str | os.PathLike) -> pd.DataFrame:
    """``metrics.tsv`` with its columns checked (a stale or foreign file names itself)."""
    table = pd.read_csv(path, sep="\t")
    missing = [column for column in METRICS_COLUMNS if column not in table.columns]
    if missing:
        raise ValueError(f"{path}: not a metrics.tsv of the train rule (missing {missing})")
    return table
