"""Test-split evaluation of a trained Prompt-CAM, next to a linear probe on the same backbone.

:func:`fit_rank_probe` fits the rank's probe once (``linear_probe.npz``, rule linear_probe),
for evaluate to score and fidelity to explain. :func:`evaluate_rank` writes, per rank:

- ``eval.json``: ``top1``, ``top5`` (top-k with k = min(5, C), k stored as ``top5_k``),
  ``n_test``, ``per_class`` (``{name: {"n": ..., "top1": ...}}``, ``top1`` null for a class
  without test images), ``linear_probe_top1`` and the ``linear_probe`` block (its settings, the C
  chosen by validation log-loss, and its top-1 and calibration on train/val/test: ``log_loss``,
  ``true_class_probability``, ``ece``; see :mod:`promptcam.evaluation.linear_probe`),
  ``interpretability_cost``
  (linear probe top-1 minus Prompt-CAM top-1: what the shared-head constraint costs), chance
  level and what the checkpoint was selected on;
- ``confusion.tsv``: counts, one row per true class, one column per predicted class, named.

The test split is read only here (and by the trait and fidelity stages): training selects
its model on the validation split. Over shard groups (config ``test_shard_groups``),
:func:`run_evaluate_part` writes each group's per-image scores and probe features and
:func:`gather_evaluation` the same two files, byte for byte, as one job.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from promptcam.data.batch_parts import BatchResults, gather_parts, shard_group_info
from promptcam.data.reader import (
    WHOLE_SPLIT,
    ShardGroup,
    TransformConfig,
    load_manifest,
    shard_batch_loader,
    split_loader,
    split_size,
)
from promptcam.evaluation.linear_probe import (
    FittedProbe,
    LinearProbeConfig,
    backbone_features,
    fit_linear_probe,
    pool_tokens,
    probe_report,
    read_probe,
    write_probe,
)
from promptcam.evaluation.scatter import compute_batches, open_results, write_part
from promptcam.evaluation.tables import write_confusion_tsv
from promptcam.io import sha256_file, write_json
from promptcam.model.checkpoint import load_checkpoint
from promptcam.progress import ProgressLines
from promptcam.training.hierarchy import read_sibling_groups, within_sibling_predictions
from promptcam.training.runtime import autocast, mean_loss, resolve_device, topk_accuracy

LOGGER = logging.getLogger(__name__)

# What eval.json records of how the checkpoint was selected.
CHECKPOINT_KEYS = ("selected_on", "best_epoch", "best_val_top1")


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


def _loader(
    shards_dir: str | os.PathLike,
    split: str,
    rank: str,
    transform: TransformConfig,
    config: EvalConfig,
    device: torch.device,
) -> DataLoader:
    return split_loader(
        shards_dir, split, rank, transform, config.batch_size, config.num_workers, device
    )


def _load_model(
    checkpoint: str | os.PathLike, config: EvalConfig, backbone_weights: str | os.PathLike | None
) -> tuple[Any, Any, torch.device]:
    torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    model, meta = load_checkpoint(checkpoint, backbone_weights=backbone_weights)
    return model.to(device).eval(), meta, device


def fit_rank_probe(
    *,
    shards_dir: str | os.PathLike,
    rank: str,
    checkpoint: str | os.PathLike,
    out_probe: str | os.PathLike,
    config: EvalConfig,
    backbone_weights: str | os.PathLike | None = None,
) -> FittedProbe:
    """The linear probe of one rank, fitted once on the frozen backbone's train and val features
    (selected by validation log-loss, see :mod:`promptcam.evaluation.linear_probe`) and written
    to ``linear_probe.npz``, which evaluate scores on test and fidelity explains."""
    model, meta, device = _load_model(checkpoint, config, backbone_weights)
    # The checkpoint's preprocessing, interpolation included (the reader honours it).
    transform = TransformConfig.unaugmented(meta.preprocessing)
    lines = ProgressLines()
    lines.report("linear probe of %s: backbone features of train and val", rank, force=True)
    probe_config = config.linear_probe
    features = {
        split: backbone_features(
            model.backbone,
            _loader(shards_dir, split, rank, transform, config, device),
            device,
            probe_config.pool,
        )
        for split in ("train", "val")
    }
    pipeline, selected, grid = fit_linear_probe(features["train"], features["val"], probe_config)
    report = probe_report(
        pipeline,
        selected,
        grid,
        probe_config,
        feature_dim=int(features["train"][0].shape[1]),
        num_classes=len(meta.label_names),
        checkpoint_sha256=sha256_file(checkpoint),
    )
    probe = FittedProbe(pipeline, report)
    write_probe(out_probe, probe)
    lines.report(
        "wrote %s: C = %g, validation top-1 %.3f, log-loss %.3f (%.0f s)",
        out_probe,
        report["selected_C"],
        report["val_top1"],
        report["val_log_loss"],
        lines.elapsed(),
        force=True,
    )
    return probe


def evaluate_shard_group(
    *,
    shards_dir: str | os.PathLike,
    rank: str,
    checkpoint: str | os.PathLike,
    probe: str | os.PathLike,
    config: EvalConfig,
    group: ShardGroup = WHOLE_SPLIT,
    state_path: str | os.PathLike | None = None,
    backbone_weights: str | os.PathLike | None = None,
) -> BatchResults:
    """Per test image of ``group``: ``image`` (sample id), ``label``, Prompt-CAM's ``scores``
    (C,) and the backbone's pooled ``features`` (D,) that the probe reads, batch by batch
    (batches never cross a shard). ``state_path``: see
    :func:`promptcam.evaluation.scatter.compute_batches`."""
    model, meta, device = _load_model(checkpoint, config, backbone_weights)
    fitted = read_probe(probe)
    checkpoint_sha256 = sha256_file(checkpoint)
    if fitted.report["checkpoint_sha256"] != checkpoint_sha256:
        raise ValueError(
            f"{probe} was fitted on the backbone of another checkpoint than {checkpoint}; "
            "rerun rule linear_probe"
        )
    info = shard_group_info(
        shards_dir,
        "test",
        group,
        checkpoint_sha256=checkpoint_sha256,
        probe_sha256=sha256_file(probe),
        device=device.type,
        batch_size=config.batch_size,
        label_names=list(meta.label_names),
        checkpoint_meta={key: meta.extra.get(key) for key in CHECKPOINT_KEYS},
        objective=meta.extra.get("train_config", {}).get("objective", "flat"),
    )
    results = open_results(info, state_path)
    loader = shard_batch_loader(
        shards_dir,
        "test",
        rank,
        TransformConfig.unaugmented(meta.preprocessing),
        config.batch_size,
        config.num_workers,
        device,
        group=group,
        skip=results.done(),
    )

    @torch.no_grad()
    def score(images: Tensor, labels: Tensor, batch_meta: Mapping[str, Any]) -> dict:
        images = images.to(device, non_blocking=True)
        with autocast(device):
            scores = model(images)
        # fp32 on every device: the probe should see the backbone's features at full precision.
        tokens = model.backbone.forward_features(images)
        return {
            "image": np.asarray(batch_meta["sample_id"], dtype=str),
            "label": labels.numpy(),
            "scores": scores.float().cpu().numpy(),
            "features": pool_tokens(model.backbone, tokens, fitted.pool).float().cpu().numpy(),
        }

    return compute_batches(results, loader, score, state_path, "test images")


def write_evaluation(
    *,
    info: Mapping[str, Any],
    arrays: Mapping[str, np.ndarray],
    shards_dir: str | os.PathLike,
    rank: str,
    checkpoint: str | os.PathLike,
    probe: str | os.PathLike,
    out_json: str | os.PathLike,
    out_confusion: str | os.PathLike,
    config: EvalConfig,
    labels_tsv: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """eval.json and confusion.tsv from the per-image arrays of :func:`evaluate_shard_group`
    (one group, or the parts of all groups concatenated in shard order)."""
    if not arrays:
        raise ValueError(f"no test images for rank {rank!r} in {shards_dir}")
    label_names = list(info["label_names"])
    scores, labels = torch.from_numpy(arrays["scores"]), torch.from_numpy(arrays["label"])
    report, confusion = classification_report(scores, labels, label_names, config.top_k)
    report["objective"] = info["objective"]
    if labels_tsv is not None:
        groups = read_sibling_groups(labels_tsv)
        within = within_sibling_predictions(arrays["scores"], arrays["label"], groups)
        report["within_siblings_top1"] = float((within == arrays["label"]).mean())
    LOGGER.info("%s: Prompt-CAM test top-1 %.4f on %d images", rank, report["top1"], len(labels))
    linear_probe = read_probe(probe).test_report((arrays["features"], arrays["label"]))
    LOGGER.info("%s: linear probe test top-1 %.4f", rank, linear_probe["test_top1"])
    manifest = load_manifest(shards_dir)
    report.update(
        {
            "rank": rank,
            "linear_probe_top1": linear_probe["test_top1"],
            "linear_probe": linear_probe,
            "interpretability_cost": linear_probe["test_top1"] - report["top1"],
            "n_train": split_size(manifest, "train"),
            "n_val": split_size(manifest, "val"),
            "checkpoint": {
                "path": str(checkpoint),
                "sha256": info["checkpoint_sha256"],
                **info["checkpoint_meta"],
            },
            "config": asdict(config),
        }
    )
    write_confusion_tsv(out_confusion, confusion, label_names)
    write_json(out_json, report)
    ProgressLines().report(
        "wrote %s and %s: Prompt-CAM test top-1 %.3f, linear probe %.3f, on %d images",
        out_json,
        out_confusion,
        report["top1"],
        linear_probe["test_top1"],
        len(labels),
        force=True,
    )
    return report


def evaluate_rank(
    *,
    shards_dir: str | os.PathLike,
    rank: str,
    checkpoint: str | os.PathLike,
    probe: str | os.PathLike,
    out_json: str | os.PathLike,
    out_confusion: str | os.PathLike,
    config: EvalConfig,
    labels_tsv: str | os.PathLike | None = None,
    backbone_weights: str | os.PathLike | None = None,
    state_path: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Evaluate ``checkpoint`` and the rank's fitted linear ``probe`` on the test split; see
    the module. The files are those :func:`run_evaluate_part` and :func:`gather_evaluation`
    write over shard groups.

    With the rank's label map (``labels_tsv``), also ``within_siblings_top1``: the argmax
    among the true class's siblings (the parent given), what a model trained among siblings
    (``train.objective: siblings``) is selected on; its flat ``top1`` means little.
    """
    results = evaluate_shard_group(
        shards_dir=shards_dir,
        rank=rank,
        checkpoint=checkpoint,
        probe=probe,
        config=config,
        state_path=state_path,
        backbone_weights=backbone_weights,
    )
    return write_evaluation(
        info=results.info,
        arrays=results.arrays(),
        shards_dir=shards_dir,
        rank=rank,
        checkpoint=checkpoint,
        probe=probe,
        out_json=out_json,
        out_confusion=out_confusion,
        config=config,
        labels_tsv=labels_tsv,
    )


def run_evaluate_part(*, out_part: str | os.PathLike, group: ShardGroup, **evaluation: Any) -> int:
    """The evaluation of one shard ``group`` (``evaluation``: the arguments of
    :func:`evaluate_shard_group`) written as a part file; returns its number of images."""
    return write_part(out_part, evaluate_shard_group(group=group, **evaluation), "test images")


def gather_evaluation(*, parts: Sequence[str | os.PathLike], **outputs: Any) -> dict[str, Any]:
    """eval.json and confusion.tsv from the part files of shard groups 1..n (in that order),
    byte for byte those of :func:`evaluate_rank` (``outputs``: the arguments of
    :func:`write_evaluation` but ``info`` and ``arrays``)."""
    info, arrays = gather_parts(parts, outputs["shards_dir"], "test", "evaluate_part")
    return write_evaluation(info=info, arrays=arrays, **outputs)
