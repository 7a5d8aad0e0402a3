"""Prompt-CAM training for one taxonomic rank, resumable and reproducible.

Optimisation follows the reference (Imageomics/Prompt_CAM, DINO on CUB): SGD with momentum 0.9,
weight decay 0.001, lr 0.005, batch 16, 130 epochs, cosine schedule with 20 warm-up epochs
(timm's ``CosineLRScheduler`` formula: linear warm-up from ``warmup_lr``, then the cosine of the
*whole* run's position, not of the post-warm-up part). The reference evaluates that schedule
once per epoch; here it is evaluated before every step at the fractional epoch reached
(``epoch + samples seen / samples per epoch``), so it does not depend on how the loader cuts
batches. ``warmup_lr`` and ``min_lr`` are not among the reference facts we have; the defaults
(1e-6, 1e-8) are assumptions.

Large C (scalable layout): ``sampled_classes`` scores per step only the batch's own classes and
others drawn uniformly (:func:`sample_classes`, a sampled softmax), so that a step's last-block
cost follows that number instead of C. Validation and evaluation always score every class.

Objective (``TrainConfig.objective``): ``flat``, the reference's softmax over all the rank's
classes; ``siblings``, a softmax over the classes sharing the image's parent only (the parent
column of ``labels/{rank}.tsv``; :mod:`promptcam.training.hierarchy`), so that genus prompts
learn what separates the genera of a family and species prompts what separates the species
of a genus. At the coarsest rank (one parent) the two are the same computation.

Precision: bf16 autocast on a GPU (the model's attention already uses fused SDPA), fp32 on the
CPU. The model is selected on the *validation* split: the epoch with the best val top-1, the
earlier one on ties. Under ``siblings`` that is the val top-1 among the true class's siblings
(``val_sibling_top1``): the scores of different groups are never compared in training, so a
flat argmax over them is not what the model learnt; the sibling top-1 is the rank's accuracy
in top-down inference when the ranks above are right. The test split is never read here.

Outputs in ``out_dir``:

- ``model.pt``: the selected epoch's trainable tensors, the model config, the label names and
  the backbone's identity (:func:`promptcam.model.checkpoint.save_checkpoint`), written at the end;
- ``metrics.tsv``: one row per finished epoch (``epoch`` counts from 1, ``lr`` at the epoch's
  last step, ``train_loss``, ``train_top1``, ``val_loss``, ``val_top1``, ``seconds``; with
  ``sampled_classes`` the train columns are over each step's scored classes, validation
  always over all; under ``siblings`` the losses and ``train_top1`` are over each image's
  siblings, ``val_top1`` stays flat and a last column ``val_sibling_top1`` is added);
- ``last.pt``: the training state after the last finished epoch (trainable tensors, optimizer
  with its momentum buffers, epochs done, which fixes the schedule position, the best epoch so
  far with its tensors, the metrics rows), removed when training completes.

Resume: a run that finds a ``last.pt`` of the same settings continues after its epoch and ends
with the same tensors as an uninterrupted run (bit-identical on the CPU). This holds because
every random draw of an epoch - shard and sample shuffling, crops and flips (in the loader
workers, seeded from torch's RNG when the loader starts), prompt dropout, drop-path - derives
from ``(seed, epoch)``: the global RNGs are re-seeded from that pair at the start of each epoch,
so there is no RNG state to carry across epochs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from promptcam.config import settings_from_config
from promptcam.data.metadata import read_label_names
from promptcam.data.reader import (
    ShardDataset,
    TransformConfig,
    epoch_seed,
    load_manifest,
    make_loader,
    split_loader,
    split_size,
    useful_workers,
)
from promptcam.model.checkpoint import load_trainable, save_checkpoint, trainable_state
from promptcam.model.prompt_cam import PromptCAM
from promptcam.model.spec import Preprocessing, PromptCAMConfig, backbone_spec
from promptcam.progress import ProgressLines
from promptcam.training.hierarchy import read_sibling_groups
from promptcam.training.metrics import write_metrics
from promptcam.training.runtime import resolve_device, seed_everything
from promptcam.training.settings import TrainConfig
from promptcam.training.state import (
    STATE_FORMAT,
    run_fingerprint,
    run_identity,
    save_training_state,
    start_or_resume,
)
from promptcam.training.steps import (
    build_optimizer,
    train_one_epoch,
    validate,
    validate_siblings,
)

LOGGER = logging.getLogger(__name__)


def resolve_transform(
    preprocessing: Preprocessing, settings: Mapping[str, Any] | None
) -> TransformConfig:
    """The train transform for a backbone whose inputs are ``preprocessing`` (its size, mean,
    std and interpolation; one source for training and evaluation), with the train settings'
    ``resize_size`` (default: the reference's 240 for 224, scaled)."""
    values = dict(settings or {})
    moved = sorted({"mean", "std", "interpolation"} & set(values))
    if moved:
        raise ValueError(
            f"train transform settings {moved} moved to backbone.preprocessing, which training "
            "and evaluation share (unset: what the backbone's weights expect)"
        )
    height, width = preprocessing.img_size
    if height != width:
        raise ValueError(
            f"the backbone takes {height}x{width} images, but the shard reader makes square "
            "ones: set backbone.kwargs.img_size to one number"
        )
    if values.setdefault("img_size", height) != height:
        raise ValueError(f"transform img_size {values['img_size']} != backbone input {height}")
    values.setdefault("resize_size", round(height * 240 / 224))
    return TransformConfig(
        **values,
        mean=tuple(preprocessing.mean),
        std=tuple(preprocessing.std),
        interpolation=preprocessing.interpolation,
    )


SELECTION_NAMES = {"val_top1": "val top-1", "val_sibling_top1": "val top-1 within siblings"}


def selection_metric(config: TrainConfig) -> str:
    """The metrics column that selects the checkpoint (see the module docstring)."""
    return "val_top1" if config.objective == "flat" else "val_sibling_top1"


def _validation_row(
    model: PromptCAM, loader: Any, device: torch.device, groups: torch.Tensor | None
) -> dict[str, float]:
    if groups is None:
        val_loss, val_top1 = validate(model, loader, device)
        return {"val_loss": val_loss, "val_top1": val_top1}
    result = validate_siblings(model, loader, device, groups)
    return {
        "val_loss": result.loss,
        "val_top1": result.top1,
        "val_sibling_top1": result.sibling_top1,
    }


@contextlib.contextmanager
def _progress_bar(config: TrainConfig, total: int, initial: int) -> Iterator[tqdm]:
    with tqdm(
        total=total,
        initial=initial,
        unit="img",
        mininterval=config.progress_seconds,
        desc="train",
        ascii=True,
    ) as bar:
        yield bar


def train_rank(
    *,
    shards_dir: str | os.PathLike,
    rank: str,
    labels_tsv: str | os.PathLike,
    backbone: Mapping[str, Any],
    model_config: Mapping[str, Any],
    train_config: TrainConfig,
    out_dir: str | os.PathLike,
    transform: Mapping[str, Any] | None = None,
) -> Path:
    """Train Prompt-CAM for ``rank`` on the shards' train split; return ``out_dir/model.pt``.

    Args:
        shards_dir: Folder of the WebDataset shards and their ``manifest.json``.
        rank: Which labels to learn (a level of the shards).
        labels_tsv: ``labels/{rank}.tsv``: the classes, in index order.
        backbone: :func:`backbone_spec` settings of the frozen ViT.
        model_config: :class:`PromptCAMConfig` settings except ``num_classes`` (from the labels).
        train_config: Optimisation, data order and runtime settings.
        out_dir: Where ``model.pt``, ``metrics.tsv`` and the resumable ``last.pt`` go.
        transform: Image transform settings, see :func:`resolve_transform`.
    """
    config = train_config
    torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    out_dir = Path(out_dir)
    label_names = read_label_names(labels_tsv)
    spec = backbone_spec(backbone)
    prompt_config = settings_from_config(
        PromptCAMConfig, {**model_config, "num_classes": len(label_names)}, "train.model"
    )
    if config.sampled_classes is not None and prompt_config.layout != "scalable":
        raise ValueError(
            f"train.sampled_classes ({config.sampled_classes}) needs model.layout: scalable; "
            "the reference layout's class prompts attend to each other, so each step must "
            "score all of them: unset sampled_classes or switch the layout"
        )
    groups = None
    if config.objective == "siblings":
        groups = torch.as_tensor(read_sibling_groups(labels_tsv), device=device)
    selected_on = selection_metric(config)
    manifest = load_manifest(shards_dir)
    if split_size(manifest, "val") == 0:
        raise ValueError(f"{shards_dir} has no validation images: model selection needs some")

    seed_everything(config.seed)  # fixes the prompt initialisation
    model = PromptCAM(spec, prompt_config).to(device)
    transform = resolve_transform(model.preprocessing, transform)
    optimizer = build_optimizer(model, config)
    fingerprint = run_fingerprint(
        run_identity(
            config=config,
            prompt_config=prompt_config,
            spec=spec,
            rank=rank,
            label_names=label_names,
            transform=transform,
            manifest=manifest,
        )
    )

    train_set = ShardDataset(
        shards_dir,
        "train",
        rank,
        train=True,
        transform=transform,
        shuffle_buffer=config.shuffle_buffer,
        seed=config.seed,
    )
    samples_per_epoch = len(train_set)
    if samples_per_epoch == 0:
        raise ValueError(f"{shards_dir} has no training images")
    train_loader = make_loader(
        train_set,
        config.batch_size,
        useful_workers(train_set, config.num_workers),
        pin_memory=device.type == "cuda",
    )
    val_loader = split_loader(
        shards_dir, "val", rank, transform, config.eval_batch_size, config.num_workers, device
    )

    # Console lines: at most one epoch every progress_seconds (the log has every epoch).
    epoch_lines = ProgressLines(config.progress_seconds)
    state_path = out_dir / "last.pt"
    start_epoch, history, best = start_or_resume(state_path, fingerprint, model, optimizer)
    # Progress lines go to the log too (and, in a workflow job, to the console).
    epoch_lines.report(
        "%s: %d classes, %d train images per epoch, epochs %d..%d on %s",
        rank,
        len(label_names),
        samples_per_epoch,
        start_epoch + 1,
        config.epochs,
        device,
        force=True,
    )
    # Compiled for training only: its wrapper shares the parameters, which are what is saved.
    train_forward = torch.compile(model) if config.compile else model
    total = config.epochs * samples_per_epoch
    with _progress_bar(config, total, start_epoch * samples_per_epoch) as progress:
        for epoch in range(start_epoch, config.epochs):
            started = time.perf_counter()
            seed_everything(epoch_seed(config.seed, epoch))
            train_set.set_epoch(epoch)
            stats = train_one_epoch(
                train_forward,
                train_loader,
                optimizer,
                num_classes=prompt_config.num_classes,
                epoch=epoch,
                samples_per_epoch=samples_per_epoch,
                config=config,
                device=device,
                progress=progress,
                groups=groups,
            )
            validation = _validation_row(model, val_loader, device, groups)
            row = {
                "epoch": epoch + 1,
                "lr": stats.lr,
                "train_loss": stats.loss,
                "train_top1": stats.top1,
                **validation,
                "seconds": time.perf_counter() - started,
            }
            history.append(row)
            # Strictly better only: on ties the earlier epoch stays selected.
            val_top1 = row[selected_on]
            if val_top1 > best.get(selected_on, -1.0):
                scores = {k: row[k] for k in ("val_top1", selected_on)}
                best = {"epoch": epoch + 1, **scores, "tensors": trainable_state(model)}
            progress.set_postfix(epoch=epoch + 1, loss=f"{stats.loss:.3f}", val=f"{val_top1:.3f}")
            LOGGER.info("%s epoch %d: %s", rank, epoch + 1, row)
            epoch_lines.report(
                "epoch %d/%d loss %.3f %s %.3f (%.0f s)",
                epoch + 1,
                config.epochs,
                stats.loss,
                SELECTION_NAMES[selected_on],
                val_top1,
                row["seconds"],
                force=epoch + 1 == config.epochs,
            )
            write_metrics(out_dir / "metrics.tsv", history)
            save_training_state(
                state_path,
                {
                    "format": STATE_FORMAT,
                    "fingerprint": fingerprint,
                    "epoch": epoch + 1,
                    "tensors": trainable_state(model),
                    "optimizer": optimizer.state_dict(),
                    "best": best,
                    "history": history,
                },
            )

    load_trainable(model, best["tensors"])
    model_path = out_dir / "model.pt"
    save_checkpoint(
        model_path,
        model,
        label_names=label_names,
        preprocessing=model.preprocessing,
        extra={
            "rank": rank,
            "selected_on": selected_on,
            "best_epoch": best["epoch"],
            "best_val_top1": best["val_top1"],
            **({} if groups is None else {"best_val_sibling_top1": best["val_sibling_top1"]}),
            "epochs": config.epochs,
            "train_config": dataclasses.asdict(config),
            "transform": dataclasses.asdict(transform),
            "fingerprint": fingerprint,
        },
    )
    # Finished: the state has served its purpose (a forced rerun trains afresh).
    state_path.unlink(missing_ok=True)
    epoch_lines.report(
        "wrote %s: epoch %d selected (%s %.4f)",
        model_path,
        best["epoch"],
        SELECTION_NAMES[selected_on],
        best[selected_on],
        force=True,
    )
    return model_path
