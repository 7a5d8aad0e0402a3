"""Test-split evaluation of a trained Prompt-CAM, next to a linear probe on the same backbone.

:func:`evaluate_rank` writes, per rank:

- ``eval.json``: ``top1``, ``top5`` (top-k with k = min(5, C), k stored as ``top5_k``),
  ``n_test``, ``per_class`` (``{name: {"n": ..., "top1": ...}}``, ``top1`` null for a class
  without test images), ``linear_probe_top1`` and the ``linear_probe`` block (its settings, the C
  chosen by validation log-loss, and its top-1 and calibration on train/val/test: ``log_loss``,
  ``true_class_probability``, ``ece``; see :mod:`promptcam.evaluation.linear_probe`),
  ``interpretability_cost``
  (linear probe top-1 minus Prompt-CAM top-1: what the shared-head constraint costs), chance
  level and what the checkpoint was selected on;
- ``confusion.tsv``: counts, one row per true class, one column per predicted class, named.

The test split is read only here: training selects its model on the validation split.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from promptcam.data.reader import (
    TransformConfig,
    load_manifest,
    split_loader,
    split_size,
)
from promptcam.evaluation.linear_probe import LinearProbeConfig, run_linear_probe
from promptcam.evaluation.tables import write_confusion_tsv
from promptcam.io import sha256_file, write_json
from promptcam.model.checkpoint import load_checkpoint
from promptcam.progress import ProgressLines
from promptcam.training.hierarchy import read_sibling_groups, within_sibling_predictions
from promptcam.training.runtime import collect_scores, mean_loss, resolve_device, topk_accuracy

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalConfig:
    """The config's ``evaluate`` section (``device`` is ``train.device``); defaults as in the
    schema, except ``threads``: torch's threads, which the adapter derives from the job's."""

    batch_size: int = 64
    num_workers: int = 1
    threads: int = 1
    device: str = "auto"
    top_k: int = 5
    linear_probe: LinearProbeConfig = field(default_factory=LinearProbeConfig)


def confusion_matrix(predictions: Tensor, labels: Tensor, num_classes: int) -> np.ndarray:
    """Counts (C, C): row = true class, column = predicted class."""
    flat = labels.long() * num_classes + predictions.long()
    counts = torch.bincount(flat, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).numpy()


def per_class_accuracy(confusion: np.ndarray) -> np.ndarray:
    """Top-1 per true class (the confusion's diagonal over its rows); NaN without samples."""
    totals = confusion.sum(axis=1)
    correct = np.diag(confusion).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, correct / totals, np.nan)


def _json_float(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def classification_report(
    scores: Tensor, labels: Tensor, label_names: Sequence[str], top_k: int
) -> tuple[dict[str, Any], np.ndarray]:
    """Top-1, top-k, per-class accuracy and the confusion counts of ``scores``."""
    num_classes = len(label_names)
    if scores.shape[1] != num_classes:
        raise ValueError(f"{scores.shape[1]} scores per sample for {num_classes} classes")
    confusion = confusion_matrix(scores.argmax(dim=1), labels, num_classes)
    per_class = per_class_accuracy(confusion)
    report = {
        "n_test": len(labels),
        "top1": topk_accuracy(scores, labels, 1),
        "top5": topk_accuracy(scores, labels, top_k),
        "top5_k": min(top_k, num_classes),
        "loss": mean_loss(scores, labels),
        "chance_top1": 1.0 / num_classes,
        "per_class": {
            name: {"n": int(confusion[index].sum()), "top1": _json_float(per_class[index])}
            for index, name in enumerate(label_names)
        },
    }
    return report, confusion


def evaluate_rank(
    *,
    shards_dir: str | os.PathLike,
    rank: str,
    checkpoint: str | os.PathLike,
    out_json: str | os.PathLike,
    out_confusion: str | os.PathLike,
    config: EvalConfig,
    labels_tsv: str | os.PathLike | None = None,
    backbone_weights: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Evaluate ``checkpoint`` on the test split and fit the linear-probe baseline; see module.

    With the rank's label map (``labels_tsv``), also ``within_siblings_top1``: the argmax
    among the true class's siblings (the parent given), what a model trained among siblings
    (``train.objective: siblings``) is selected on; its flat ``top1`` means little.
    """
    torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    model, meta = load_checkpoint(checkpoint, backbone_weights=backbone_weights)
    model.to(device)
    label_names = list(meta.label_names)
    # The checkpoint's preprocessing, interpolation included (the reader honours it).
    transform = TransformConfig.unaugmented(meta.preprocessing)

    def loader(split: str) -> DataLoader:
        return split_loader(
            shards_dir, split, rank, transform, config.batch_size, config.num_workers, device
        )

    lines = ProgressLines()
    scores, labels = collect_scores(model, loader("test"), device)
    report, confusion = classification_report(scores, labels, label_names, config.top_k)
    report["objective"] = meta.extra.get("train_config", {}).get("objective", "flat")
    if labels_tsv is not None:
        groups = read_sibling_groups(labels_tsv)
        within = within_sibling_predictions(scores.numpy(), labels.numpy(), groups)
        report["within_siblings_top1"] = float((within == labels.numpy()).mean())
    LOGGER.info("%s: Prompt-CAM test top-1 %.4f on %d images", rank, report["top1"], len(labels))
    lines.report(
        "Prompt-CAM test top-1 %.3f on %d images (%.0f s); fitting the linear probe",
        report["top1"],
        len(labels),
        lines.elapsed(),
        force=True,
    )

    manifest = load_manifest(shards_dir)
    probe = run_linear_probe(
        model.backbone,
        {split: loader(split) for split in ("train", "val", "test")},
        num_classes=len(label_names),
        config=config.linear_probe,
        device=device,
    )
    LOGGER.info("%s: linear probe test top-1 %.4f", rank, probe["test_top1"])
    report.update(
        {
            "rank": rank,
            "linear_probe_top1": probe["test_top1"],
            "linear_probe": probe,
            "interpretability_cost": probe["test_top1"] - report["top1"],
            "n_train": split_size(manifest, "train"),
            "n_val": split_size(manifest, "val"),
            "checkpoint": {
                "path": str(checkpoint),
                "sha256": sha256_file(checkpoint),
                "selected_on": meta.extra.get("selected_on"),
                "best_epoch": meta.extra.get("best_epoch"),
                "best_val_top1": meta.extra.get("best_val_top1"),
            },
            "config": asdict(config),
        }
    )
    write_confusion_tsv(out_confusion, confusion, label_names)
    write_json(out_json, report)
    lines.report(
        "wrote %s and %s: linear probe test top-1 %.3f (%.0f s)",
        out_json,
        out_confusion,
        probe["test_top1"],
        lines.elapsed(),
        force=True,
    )
    return report
