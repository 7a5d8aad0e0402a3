"""Which last-block heads carry the rank's classes: ``results/{rank}/head_information.tsv``.

A head reaches the scores only through its output in the class prompts' rows, so those
outputs (the rows of every class, or of ``max_classes`` of them drawn once with seed 0 when
there are more) are the features of a logistic regression per head (standardised, ``probe_c``),
fitted on the train split and scored (top-1) on the **validation** split, so that the trait
search on the test split is chosen without looking at it. A head is *informative* when its
validation top-1 beats chance (1 / C) by a one-sided binomial test at ``alpha``; the trait
search drops the others (``traits.drop_uninformative_heads``): a head that the greedy keeps
while it carries chance-level information moves the target's score without telling the classes
apart, and shows the user noise as a trait.

The heads rule (``promptcam.evaluation.heads``) reports the same probe scored on the test
split, next to each head's localisation and keep rate.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from promptcam.io import atomic_open

LOGGER = logging.getLogger(__name__)

HEAD_INFORMATION_COLUMNS = (
    "head",
    "class_information",
    "class_information_chance",
    "p_value",
    "informative",
    "n_train_images",
    "n_val_images",
    "n_feature_classes",
)


@dataclass(frozen=True)
class HeadInformationConfig:
    """Settings of the head-information rule (probe from ``traits.heads``, test from
    ``traits``)."""

    batch_size: int = 64
    num_workers: int = 0
    device: str = "auto"
    threads: int = 1
    probe_c: float = 0.1
    max_iter: int = 3000
    alpha: float = 0.01
    max_classes: int = 64

    def __post_init__(self) -> None:
        if self.probe_c <= 0:
            raise ValueError(f"probe_c must be positive, got {self.probe_c}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        if self.max_classes < 2:
            raise ValueError(f"max_classes must be >= 2, got {self.max_classes}")


@dataclass(frozen=True)
class HeadForward:
    """One split through the model's last block.

    Attributes:
        features: (N, H, M * d) each head's output in the rows of the M feature classes.
        labels: (N,) true classes; predicted: (N,) the model's top-1.
        maps: (N, H, h, w) each head's attention of the true class's prompt over the patches.
        masks: (N,) bitmask images of the split, or None without masks.
        sample_ids: (N,).
    """

    features: np.ndarray
    labels: np.ndarray
    predicted: np.ndarray
    maps: np.ndarray
    masks: list[np.ndarray] | None
    sample_ids: list[str]


def feature_classes(num_classes: int, max_classes: int) -> np.ndarray:
    """The classes whose rows are the probe's features: all, or ``max_classes`` drawn once
    (seed 0, sorted) so that the features stay C-independent in size."""
    if num_classes <= max_classes:
        return np.arange(num_classes)
    return np.sort(np.random.default_rng(0).choice(num_classes, max_classes, replace=False))


@torch.inference_mode()
def head_forward(
    model,
    loader,
    device: torch.device,
    with_masks: bool,
    classes: np.ndarray | None = None,
) -> HeadForward:
    """Run ``loader``'s images (``split_loader`` order) through ``model`` (a PromptCAM); the
    features are the rows of ``classes`` (default: every class)."""
    from promptcam.model.last_block import target_rows

    grid = tuple(model.backbone.patch_embed.grid_size)
    rows_of = range(model.num_classes) if classes is None else [int(c) for c in classes]
    features, labels, predicted, maps, masks, ids = [], [], [], [], [], []
    for images, batch_labels, meta in loader:
        images, batch_labels = images.to(device), batch_labels.to(device)
        tokens = model.encode_to_last_block(images)
        scores, attention = model.last_block_attention(tokens)  # (B, H, C, P)
        rows = [
            target_rows(model, tokens, torch.full_like(batch_labels, c), scores).attended
            for c in rows_of
        ]  # M x (B, H, d)
        features.append(torch.stack(rows, dim=2).flatten(2).float().cpu().numpy())
        batch = torch.arange(len(batch_labels), device=device)
        own = attention[batch, :, batch_labels]  # (B, H, P)
        maps.append(own.unflatten(-1, grid).float().cpu().numpy())
        labels.append(batch_labels.cpu().numpy())
        predicted.append(scores.argmax(dim=1).cpu().numpy())
        ids.extend(meta["sample_id"])
        if with_masks:
            masks.extend(mask.numpy() for mask in meta["mask"])
    return HeadForward(
        features=np.concatenate(features),
        labels=np.concatenate(labels),
        predicted=np.concatenate(predicted),
        maps=np.concatenate(maps),
        masks=masks if with_masks else None,
        sample_ids=ids,
    )


def head_class_information(
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    probe_c: float = 0.1,
    max_iter: int = 3000,
) -> np.ndarray:
    """Held-out top-1 (H,) of a per-head logistic regression fitted on the train features.

    Args:
        train, test: (features (N, H, F), labels (N,)).

    Returns:
        One accuracy per head; NaN where the train split has fewer than two classes.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    (train_x, train_y), (test_x, test_y) = train, test
    heads = train_x.shape[1]
    if len(np.unique(train_y)) < 2 or not len(test_y):
        return np.full(heads, np.nan)
    accuracy = np.empty(heads)
    for head in range(heads):
        probe = make_pipeline(StandardScaler(), LogisticRegression(C=probe_c, max_iter=max_iter))
        probe.fit(train_x[:, head], train_y)
        accuracy[head] = float((probe.predict(test_x[:, head]) == test_y).mean())
    return accuracy


def binomial_upper_tail(successes: int, trials: int, chance: float) -> float:
    """P(X >= successes) for X ~ Binomial(trials, chance): the one-sided p-value of a top-1
    at least this high by guessing."""
    if successes <= 0:
        return 1.0
    if chance >= 1.0:
        return 1.0
    log_terms = [
        math.lgamma(trials + 1)
        - math.lgamma(k + 1)
        - math.lgamma(trials - k + 1)
        + k * math.log(chance)
        + (trials - k) * math.log1p(-chance)
        for k in range(successes, trials + 1)
    ]
    top = max(log_terms)
    return min(1.0, math.exp(top) * sum(math.exp(term - top) for term in log_terms))


def head_information_table(
    accuracy: np.ndarray,
    num_classes: int,
    n_train_images: int,
    n_val_images: int,
    n_feature_classes: int,
    alpha: float,
) -> pd.DataFrame:
    """``head_information.tsv``'s rows, one per head, from the validation top-1 (H,)."""
    chance = 1.0 / num_classes
    p_values = [
        math.nan
        if math.isnan(value)
        else binomial_upper_tail(round(value * n_val_images), n_val_images, chance)
        for value in accuracy
    ]
    return pd.DataFrame(
        {
            "head": np.arange(len(accuracy)),
            "class_information": accuracy,
            "class_information_chance": chance,
            "p_value": p_values,
            # Without a measurement (one class, no validation images) nothing is dropped.
            "informative": [not (p > alpha) for p in p_values],
            "n_train_images": n_train_images,
            "n_val_images": n_val_images,
            "n_feature_classes": n_feature_classes,
        }
    ).loc[:, list(HEAD_INFORMATION_COLUMNS)]


def write_head_information(path: str | os.PathLike, table: pd.DataFrame) -> None:
    """``head_information.tsv``, atomically; unmeasured values as ``NA``."""
    with atomic_open(path, "w", newline="") as handle:
        table.loc[:, list(HEAD_INFORMATION_COLUMNS)].to_csv(
            handle, sep="\t", index=False, na_rep="NA"
        )


def read_head_information(path: str | os.PathLike) -> pd.DataFrame:
    table = pd.read_csv(path, sep="\t", na_values=["NA"], keep_default_na=False)
    missing = [column for column in HEAD_INFORMATION_COLUMNS if column not in table.columns]
    if missing:
        raise ValueError(f"{path}: no column {missing}; rerun the head_information rule")
    table["informative"] = table["informative"].astype(str).str.lower() == "true"
    return table


def uninformative_heads(table: pd.DataFrame) -> list[int]:
    """The heads a head-information table found to carry no class information, ascending."""
    return sorted(int(head) for head in table.loc[~table["informative"], "head"])


def run_rank_head_information(
    *,
    checkpoint: str | os.PathLike,
    shards_dir: str | os.PathLike,
    rank: str,
    out_tsv: str | os.PathLike,
    config: HeadInformationConfig,
    backbone_weights: str | os.PathLike | None = None,
) -> pd.DataFrame:
    """``head_information.tsv`` of one rank: the train and validation splits through the
    last block, one probe per head."""
    from promptcam.data.reader import TransformConfig, split_loader
    from promptcam.model.checkpoint import load_checkpoint
    from promptcam.training.runtime import resolve_device

    torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    model, meta = load_checkpoint(checkpoint, backbone_weights=backbone_weights)
    model.to(device).eval()
    transform = TransformConfig.unaugmented(meta.preprocessing)
    classes = feature_classes(model.num_classes, config.max_classes)
    splits = {
        split: head_forward(
            model,
            split_loader(
                shards_dir,
                split,
                rank,
                transform,
                config.batch_size,
                config.num_workers,
                device,
            ),
            device,
            with_masks=False,
            classes=classes,
        )
        for split in ("train", "val")
    }
    train, val = splits["train"], splits["val"]
    accuracy = head_class_information(
        (train.features, train.labels), (val.features, val.labels), config.probe_c,
        config.max_iter,
    )  # fmt: skip
    table = head_information_table(
        accuracy, model.num_classes, len(train.labels), len(val.labels), len(classes), config.alpha
    )
    dropped = table.loc[~table["informative"], "head"].tolist()
    LOGGER.info(
        "%s: head information (validation top-1, chance %.3f)\n%s\n%d heads carry no class "
        "information at alpha %g%s",
        rank,
        1.0 / model.num_classes,
        table.to_string(index=False),
        len(dropped),
        config.alpha,
        f": {dropped}" if dropped else "",
    )
    write_head_information(out_tsv, table)
    return table
