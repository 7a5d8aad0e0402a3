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
train; the ``C`` with the best validation top-1 wins (ties: the smaller ``C``, i.e. the stronger
regularisation), and only that model is scored on test.
"""

from __future__ import annotations

import logging
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

__all__ = ["LinearProbeConfig", "backbone_features", "fit_linear_probe", "run_linear_probe"]

LOGGER = logging.getLogger(__name__)

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


def _top1(model: Pipeline, features: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(model.predict(features) == labels))


def fit_linear_probe(
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    config: LinearProbeConfig,
) -> tuple[Pipeline, dict[str, Any], list[dict[str, Any]]]:
    """Fit one probe per ``C`` on train; return the best on val, its row, and every C's row."""
    if len(np.unique(train[1])) < 2:
        raise ValueError("a linear probe needs at least two classes in the training split")
    best, selected, grid = None, {"val_top1": -1.0}, []
    for c in sorted(config.c_grid):
        model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=config.max_iter))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            model.fit(*train)
        converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
        row = {
            "C": c,
            "train_top1": _top1(model, *train),
            "val_top1": _top1(model, *val),
            "converged": converged,
        }
        grid.append(row)
        LOGGER.info("linear probe %s", row)
        # Strictly better only: on ties the smaller C (stronger regularisation) stays.
        if row["val_top1"] > selected["val_top1"]:
            best, selected = model, row
    return best, selected, grid


def run_linear_probe(
    backbone: VisionTransformer,
    loaders: Mapping[str, DataLoader],
    num_classes: int,
    config: LinearProbeConfig,
    device: torch.device,
) -> dict[str, Any]:
    """Features of the train, val and test loaders -> the probe's selection and test top-1."""
    data = {
        split: backbone_features(backbone, loaders[split], device, config.pool)
        for split in ("train", "val", "test")
    }
    model, selected, grid = fit_linear_probe(data["train"], data["val"], config)
    return {
        "pool": config.pool,
        "feature_dim": int(data["train"][0].shape[1]),
        "num_classes": num_classes,
        "selected_C": selected["C"],
        "val_top1": selected["val_top1"],
        "train_top1": selected["train_top1"],
        "test_top1": _top1(model, *data["test"]),
        "grid": grid,
    }
