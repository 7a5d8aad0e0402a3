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

Precision: bf16 autocast on a GPU (the model's attention already uses fused SDPA), fp32 on the
CPU. The model is selected on the *validation* split: the epoch with the best val top-1, the
earlier one on ties. The test split is never read here.

Outputs in ``out_dir``:

- ``model.pt``: the selected epoch's trainable tensors, the model config, the label names and
  the backbone's identity (:func:`promptcam.model.checkpoint.save_checkpoint`), written at the end;
- ``metrics.tsv``: one row per finished epoch (``epoch`` counts from 1, ``lr`` at the epoch's
  last step, ``train_loss``, ``train_top1``, ``val_loss``, ``val_top1``, ``seconds``; with
  ``sampled_classes`` the train columns are over each step's scored classes, validation
  always over all);
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
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from promptcam.config import runtime_keys, settings_from_config
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
from promptcam.io import atomic_open, atomic_path, sha256_file
from promptcam.model.checkpoint import load_trainable, save_checkpoint, trainable_state
from promptcam.model.prompt_cam import PromptCAM
from promptcam.model.spec import (
    BackboneSpec,
    Preprocessing,
    PromptCAMConfig,
    backbone_spec,
)
from promptcam.progress import ProgressLines
from promptcam.training.runtime import (
    autocast,
    batches,
    collect_scores,
    mean_loss,
    resolve_device,
    seed_everything,
    topk_accuracy,
)

LOGGER = logging.getLogger(__name__)


METRICS_COLUMNS = ("epoch", "lr", "train_loss", "train_top1", "val_loss", "val_top1", "seconds")


STATE_FORMAT = "promptcam-train-state/1"


@dataclass(frozen=True)
class TrainConfig:
    """The config's ``train.defaults`` (less ``model`` and ``transform``) and ``train``'s
    runtime keys; defaults as in the schema (tests/test_config.py checks)."""

    epochs: int = 130
    warmup_epochs: int = 20
    batch_size: int = 16
    lr: float = 0.005
    warmup_lr: float = 1e-6
    min_lr: float = 1e-8
    momentum: float = 0.9
    weight_decay: float = 0.001
    seed: int = 0
    shuffle_buffer: int = 1000
    eval_batch_size: int = 64
    num_workers: int = 2
    # Classes scored per training step (sampled softmax; scalable layout only): the batch's own
    # plus others drawn uniformly. None scores all C.
    sampled_classes: int | None = None
    threads: int = 1
    device: str = "auto"
    progress_seconds: float = 5.0
    # torch.compile the training forward: on an H100, 1.4x the images/s (benchmarks/RESULTS.md).
    compile: bool = False
    # bf16 autocast on a GPU; off: fp32 there too.
    mixed_precision: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError(f"epochs and batch sizes must be >= 1: {self}")
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise ValueError(f"warmup_epochs must be in [0, epochs]: {self}")
        if self.num_workers < 0 or self.threads < 1 or self.shuffle_buffer < 0:
            raise ValueError(f"num_workers, shuffle_buffer >= 0 and threads >= 1: {self}")
        if self.sampled_classes is not None and self.sampled_classes < self.batch_size:
            raise ValueError(
                f"sampled_classes ({self.sampled_classes}) must be at least batch_size "
                f"({self.batch_size}), so that every image's own class is scored"
            )


def learning_rate(progress: float, config: TrainConfig) -> float:
    """Learning rate at ``progress`` epochs into training (fractional; timm's cosine rule)."""
    if progress < config.warmup_epochs:
        return config.warmup_lr + (config.lr - config.warmup_lr) * progress / config.warmup_epochs
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress / config.epochs))
    return config.min_lr + (config.lr - config.min_lr) * cosine


def build_optimizer(model: PromptCAM, config: TrainConfig) -> torch.optim.SGD:
    params = [param for param in model.parameters() if param.requires_grad]
    return torch.optim.SGD(
        params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )


@dataclass(frozen=True)
class ClassSample:
    """The classes one training step scores, and how its loss reads their scores."""

    classes: Tensor | None  # (M,) class indices, the batch's own first; None: all, in order
    targets: Tensor  # (B,) each image's class as a position in ``classes``
    logit_offset: Tensor | float  # added to the (B, M) scores before the softmax


def sample_classes(labels: Tensor, num_classes: int, num_scored: int | None) -> ClassSample:
    """The batch's own classes plus ``num_scored`` minus their number drawn uniformly, without
    replacement, from the other classes: a sampled softmax (Jean et al., ACL 2015).

    Each drawn class stands for ``others / drawn`` classes, so its score gets ``log(others /
    drawn)`` added before the softmax, which makes the denominator an unbiased estimate of the
    full one; when every other class is drawn that offset is 0 and the loss is the full one.
    Draws come from torch's global generator on ``labels``' device (reseeded every epoch).
    """
    if num_scored is None:
        return ClassSample(classes=None, targets=labels, logit_offset=0.0)
    own, targets = labels.unique(return_inverse=True)
    is_other = torch.ones(num_classes, dtype=torch.bool, device=labels.device)
    is_other[own] = False
    others = is_other.nonzero().squeeze(1)
    num_drawn = min(num_scored, num_classes) - len(own)
    if num_drawn < 0:
        raise ValueError(f"{len(own)} classes in the batch but only {num_scored} scored")
    drawn = others[torch.randperm(len(others), device=labels.device)[:num_drawn]]
    offset = torch.zeros(len(own) + num_drawn, device=labels.device)
    if num_drawn:
        offset[len(own) :] = math.log(len(others) / num_drawn)
    return ClassSample(classes=torch.cat([own, drawn]), targets=targets, logit_offset=offset)


@dataclass
class EpochStats:
    lr: float
    loss: float
    top1: float
    samples: int


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    *,
    num_classes: int,
    epoch: int,
    samples_per_epoch: int,
    config: TrainConfig,
    device: torch.device,
    progress: tqdm,
) -> EpochStats:
    model.train()
    # Sums stay on the device: reading them every step would stall a GPU's queue.
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    seen, lr = 0, learning_rate(epoch, config)
    for images, labels in batches(loader, device):
        lr = learning_rate(epoch + seen / samples_per_epoch, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        sample = sample_classes(labels, num_classes, config.sampled_classes)
        with autocast(device, config.mixed_precision):
            scores = model(images, sample.classes)
        loss = F.cross_entropy(scores.float() + sample.logit_offset, sample.targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        count = len(labels)
        seen += count
        loss_sum += loss.detach() * count
        correct += (scores.argmax(dim=1) == sample.targets).sum()
        progress.update(count)
    if seen == 0:
        raise ValueError("the training loader yielded no samples")
    return EpochStats(lr=lr, loss=loss_sum.item() / seen, top1=correct.item() / seen, samples=seen)


def validate(model: PromptCAM, loader: DataLoader, device: torch.device) -> tuple[float, float]:
    """(loss, top-1) on the validation split."""
    scores, labels = collect_scores(model, loader, device)
    return mean_loss(scores, labels), topk_accuracy(scores, labels, 1)


def write_metrics(path: Path, rows: list[dict[str, float]]) -> None:
    # Rewritten whole from the history each epoch: atomic, and consistent after a resume.
    with atomic_open(path, "w") as handle:
        handle.write("\t".join(METRICS_COLUMNS) + "\n")
        for row in rows:
            handle.write("\t".join(_format_metric(row[column]) for column in METRICS_COLUMNS))
            handle.write("\n")


def _format_metric(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:.6g}"


def save_training_state(path: Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_training_state(path: Path, fingerprint: str) -> dict[str, Any] | None:
    """The saved state if it belongs to a run with these settings, else None (and say why)."""
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != STATE_FORMAT or state.get("fingerprint") != fingerprint:
        LOGGER.warning("ignoring %s: it was written with other settings; starting afresh", path)
        return None
    return state


def run_fingerprint(identity: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode("utf-8")).hexdigest()


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


def run_identity(
    *,
    config: TrainConfig,
    prompt_config: PromptCAMConfig,
    spec: BackboneSpec,
    rank: str,
    label_names: list[str],
    transform: TransformConfig,
    manifest: Mapping[str, Any],
) -> dict[str, Any]:
    """Everything that determines the trained tensors; a saved state resumes only if equal.

    The schema's runtime keys of ``train`` (device, threads, ...) say where the run happens,
    not what it computes: a run resumes on another device.
    """
    runtime = runtime_keys("train")
    return {
        "train_config": {
            key: value for key, value in dataclasses.asdict(config).items() if key not in runtime
        },
        "model_config": dataclasses.asdict(prompt_config),
        "backbone": {
            **dataclasses.asdict(spec),
            "weights_sha256": None if spec.weights is None else sha256_file(spec.weights),
        },
        "rank": rank,
        "label_names": label_names,
        "transform": dataclasses.asdict(transform),
        "shards": [e["sha256"] for e in manifest["shards"] if e["split"] in ("train", "val")],
    }


def start_or_resume(
    path: Path, fingerprint: str, model: PromptCAM, optimizer: torch.optim.Optimizer
) -> tuple[int, list[dict[str, float]], dict[str, Any]]:
    """(epochs done, metrics rows, best so far), restoring model and optimizer from ``path``."""
    state = load_training_state(path, fingerprint)
    if state is None:
        return 0, [], {"epoch": 0, "val_top1": -1.0, "tensors": trainable_state(model)}
    load_trainable(model, state["tensors"])
    optimizer.load_state_dict(state["optimizer"])
    return state["epoch"], state["history"], state["best"]


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
            )
            val_loss, val_top1 = validate(model, val_loader, device)
            row = {
                "epoch": epoch + 1,
                "lr": stats.lr,
                "train_loss": stats.loss,
                "train_top1": stats.top1,
                "val_loss": val_loss,
                "val_top1": val_top1,
                "seconds": time.perf_counter() - started,
            }
            history.append(row)
            # Strictly better only: on ties the earlier epoch stays selected.
            if val_top1 > best["val_top1"]:
                best = {"epoch": epoch + 1, "val_top1": val_top1, "tensors": trainable_state(model)}
            progress.set_postfix(epoch=epoch + 1, loss=f"{stats.loss:.3f}", val=f"{val_top1:.3f}")
            LOGGER.info("%s epoch %d: %s", rank, epoch + 1, row)
            epoch_lines.report(
                "epoch %d/%d loss %.3f val top-1 %.3f (%.0f s)",
                epoch + 1,
                config.epochs,
                stats.loss,
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
            "selected_on": "val_top1",
            "best_epoch": best["epoch"],
            "best_val_top1": best["val_top1"],
            "epochs": config.epochs,
            "train_config": dataclasses.asdict(config),
            "transform": dataclasses.asdict(transform),
            "fingerprint": fingerprint,
        },
    )
    # Finished: the state has served its purpose (a forced rerun trains afresh).
    state_path.unlink(missing_ok=True)
    epoch_lines.report(
        "wrote %s: epoch %d selected (val top-1 %.4f)",
        model_path,
        best["epoch"],
        best["val_top1"],
        force=True,
    )
    return model_path
