"""Linear-probe baseline: what a plain linear classifier reads from the same frozen backbone.

Prompt-CAM forces every class through one shared scoring vector so that attention explains the
decision; the probe has no such constraint. Their test top-1 difference, per rank, is the
accuracy cost of that interpretability.

Features: the frozen backbone's tokens after its final LayerNorm (``forward_features``), pooled
as the CLS token (``pool="cls"``, the default: the usual probe of DINO-style backbones) or as
the mean of the patch tokens (``pool="mean"``, for backbones whose CLS token was not trained).
Every split is read with the *test* transform (no augmentation), so each image gives one
fixed feature vector.

Classifier: features standardised on the training split, then multinomial logistic regression
(scikit-learn, L-BFGS) for each inverse regularisation strength ``C`` of ``c_grid``, fitted on
train; the ``C`` with the lowest validation **log-loss** wins (ties: the smaller ``C``), and only
that model is scored on test. Log-loss, not top-1: on easy data every ``C`` ties on top-1 and the
smallest, most regularised one is right but barely confident (true-class probability 0.15 on 12
demo species at C = 0.001), which makes every saliency map's insertion/deletion AUC look alike
(issue 21). Log-loss rewards being right *and* calibrated.

Calibration is reported next to accuracy, per split: ``log_loss`` (mean negative log of the
true class's probability, clipped at 1e-15), ``true_class_probability`` (its mean) and ``ece``
(expected calibration error: the confidence = top probability in ``ECE_BINS`` equal-width bins,
the mean absolute gap between each bin's accuracy and confidence, weighted by its share).
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from timm.models.vision_transformer import VisionTransformer
from torch.utils.data import DataLoader

from promptcam.io import atomic_open

__all__ = [
    "ECE_BINS",
    "FittedProbe",
    "LinearProbeConfig",
    "backbone_features",
    "calibration",
    "expected_calibration_error",
    "fit_linear_probe",
    "probe_report",
    "read_probe",
    "write_probe",
]

LOGGER = logging.getLogger(__name__)

ECE_BINS = 15  # the usual choice (Guo et al. 2017, "On calibration of modern neural networks")
PROBABILITY_FLOOR = 1e-15  # log-loss of a zero probability: large, not infinite

Pool = Literal["cls", "mean"]


@dataclass(frozen=True)
class LinearProbeConfig:
    pool: Pool = "cls"
    c_grid: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
    max_iter: int = 2000

    def __post_init__(self) -> None:
        if self.pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {self.pool!r}")
        if not self.c_grid or min(self.c_grid) <= 0:
            raise ValueError(f"c_grid must hold positive values, got {self.c_grid}")


def pool_tokens(backbone: VisionTransformer, tokens: torch.Tensor, pool: Pool) -> torch.Tensor:
    """Normed tokens (B, prefix + patches, D) -> features (B, D)."""
    if pool == "cls":
        if backbone.cls_token is None:
            raise ValueError("pool='cls' needs a backbone with a class token; use pool='mean'")
        return tokens[:, 0]
    return tokens[:, backbone.num_prefix_tokens :].mean(dim=1)


@torch.no_grad()
def backbone_features(
    backbone: VisionTransformer, loader: DataLoader, device: torch.device, pool: Pool
) -> tuple[np.ndarray, np.ndarray]:
    """Pooled features (N, D) as float32 and labels (N,) of every sample of ``loader``."""
    backbone.eval()
    features, labels = [], []
    for images, batch_labels, _ in loader:
        # fp32 on every device: the probe should see the backbone's features at full precision.
        tokens = backbone.forward_features(images.to(device, non_blocking=True))
        features.append(pool_tokens(backbone, tokens, pool).float().cpu().numpy())
        labels.append(batch_labels.numpy())
    if not features:
        raise ValueError("the loader yielded no samples")
    return np.concatenate(features), np.concatenate(labels)


def expected_calibration_error(
    probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS
) -> float:
    """ECE of class probabilities (N, C) against labels (N,) in ``bins`` equal-width bins of
    the top probability (a bin is (lo, hi], the first also holds 0)."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    which = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    gap = 0.0
    for index in np.unique(which):
        members = which == index
        gap += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return float(gap)


def _class_probabilities(model: Pipeline, features: np.ndarray, num_classes: int) -> np.ndarray:
    """(N, num_classes) probabilities; a class the probe never saw in training gets 0."""
    probabilities = np.zeros((len(features), num_classes))
    probabilities[:, model.classes_] = model.predict_proba(features)
    return probabilities


def calibration(model: Pipeline, features: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """``top1``, ``log_loss``, ``true_class_probability`` and ``ece`` of ``model`` on a split."""
    num_classes = int(max(labels.max(), model.classes_.max())) + 1
    probabilities = _class_probabilities(model, features, num_classes)
    true_class = probabilities[np.arange(len(labels)), labels]
    return {
        "top1": float(np.mean(probabilities.argmax(axis=1) == labels)),
        "log_loss": float(-np.log(np.clip(true_class, PROBABILITY_FLOOR, None)).mean()),
        "true_class_probability": float(true_class.mean()),
        "ece": expected_calibration_error(probabilities, labels),
    }


def _prefixed(prefix: str, values: Mapping[str, float]) -> dict[str, float]:
    return {f"{prefix}_{key}": value for key, value in values.items()}


def fit_linear_probe(
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    config: LinearProbeConfig,
) -> tuple[Pipeline, dict[str, Any], list[dict[str, Any]]]:
    """Fit one probe per ``C`` on train; return the one with the lowest validation log-loss,
    its row, and every C's row (``C``, ``converged``, then ``train_``/``val_`` + ``top1``,
    ``log_loss``, ``true_class_probability``, ``ece``)."""
    if len(np.unique(train[1])) < 2:
        raise ValueError("a linear probe needs at least two classes in the training split")
    best, selected, grid = None, {"val_log_loss": math.inf}, []
    for c in sorted(config.c_grid):
        model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=config.max_iter))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            model.fit(*train)
        converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
        row = {
            "C": c,
            "converged": converged,
            **_prefixed("train", calibration(model, *train)),
            **_prefixed("val", calibration(model, *val)),
        }
        grid.append(row)
        LOGGER.info("linear probe %s", row)
        # Strictly better only: on ties the smaller C (stronger regularisation) stays.
        if row["val_log_loss"] < selected["val_log_loss"]:
            best, selected = model, row
    return best, selected, grid


PROBE_FORMAT = "promptcam-linear-probe/1"


@dataclass
class FittedProbe:
    """The probe that the linear_probe rule selected (``linear_probe.npz``): the scikit-learn
    pipeline, and ``report``: its settings, the C grid and its train/val calibration."""

    pipeline: Pipeline
    report: dict[str, Any]

    @property
    def pool(self) -> Pool:
        return self.report["pool"]

    def test_report(self, test: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
        """``report`` with the test split's top-1 and calibration (``test_`` keys) inserted
        after train and val's, as eval.json's ``linear_probe`` block."""
        head = {key: value for key, value in self.report.items() if key not in TAIL_KEYS}
        tail = {key: self.report[key] for key in TAIL_KEYS}
        return {**head, **_prefixed("test", calibration(self.pipeline, *test)), **tail}


TAIL_KEYS = ("ece_bins", "grid", "checkpoint_sha256")


def probe_report(
    pipeline: Pipeline,
    selected: Mapping[str, Any],
    grid: list[dict[str, Any]],
    config: LinearProbeConfig,
    feature_dim: int,
    num_classes: int,
    checkpoint_sha256: str,
) -> dict[str, Any]:
    """What :class:`FittedProbe` records of a fit (see :func:`fit_linear_probe`)."""
    return {
        "pool": config.pool,
        "feature_dim": feature_dim,
        "num_classes": num_classes,
        "selected_by": "val_log_loss",
        "selected_C": selected["C"],
        **{key: value for key, value in selected.items() if key.startswith(("train_", "val_"))},
        "ece_bins": ECE_BINS,
        "grid": grid,
        "checkpoint_sha256": checkpoint_sha256,
    }


def write_probe(path: str | os.PathLike, probe: FittedProbe) -> None:
    """``linear_probe.npz`` (atomically, no pickles): the standardisation's ``mean`` and
    ``scale``, the logistic regression's ``coef``, ``intercept`` and ``classes`` (float64 as
    fitted, so that a reader predicts exactly what the fitted pipeline does), ``report``
    as JSON."""
    scaler, logistic = probe.pipeline[0], probe.pipeline[-1]
    arrays = {
        "format": np.asarray(PROBE_FORMAT),
        "report": np.asarray(json.dumps(probe.report)),
        "mean": np.asarray(scaler.mean_, np.float64),
        "scale": np.asarray(scaler.scale_, np.float64),
        "coef": np.asarray(logistic.coef_, np.float64),
        "intercept": np.asarray(logistic.intercept_, np.float64),
        "classes": np.asarray(logistic.classes_),
        "C": np.asarray(logistic.C, np.float64),
        "max_iter": np.asarray(logistic.max_iter),
    }
    with atomic_open(path, "wb") as handle:
        np.savez(handle, **arrays)


def read_probe(path: str | os.PathLike) -> FittedProbe:
    """The probe :func:`write_probe` wrote, as a fitted scikit-learn pipeline."""
    try:
        with np.load(path, allow_pickle=False) as data:
            found = str(data["format"]) if "format" in data.files else "none"
            if found != PROBE_FORMAT:
                raise ValueError(f"a {found!r} file, not {PROBE_FORMAT!r}")
            arrays = {name: data[name] for name in data.files}
    except (ValueError, KeyError, OSError) as error:
        raise ValueError(
            f"{path}: not a linear probe ({error}); rerun rule linear_probe"
        ) from error
    scaler = StandardScaler()
    scaler.mean_, scaler.scale_ = arrays["mean"], arrays["scale"]
    scaler.var_ = arrays["scale"] ** 2
    scaler.n_features_in_ = len(arrays["mean"])
    logistic = LogisticRegression(C=float(arrays["C"]), max_iter=int(arrays["max_iter"]))
    logistic.coef_, logistic.intercept_ = arrays["coef"], arrays["intercept"]
    logistic.classes_ = arrays["classes"]
    logistic.n_features_in_ = arrays["coef"].shape[1]
    return FittedProbe(make_pipeline(scaler, logistic), json.loads(str(arrays["report"])))
