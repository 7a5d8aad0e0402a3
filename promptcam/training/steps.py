"""One training epoch: the learning-rate schedule, the optimizer, the sampled softmax for large C,
the sibling softmax (objective siblings), and validation."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from promptcam.model.prompt_cam import PromptCAM
from promptcam.training.runtime import autocast, collect_scores, mean_loss, topk_accuracy
from promptcam.training.settings import TrainConfig


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


def sibling_mask(groups: Tensor, labels: Tensor) -> Tensor:
    """(B, C) bool: class j is a sibling of image i's class (same group, itself included).

    ``groups``: (C,) each class's group (:func:`promptcam.training.hierarchy.sibling_groups`).
    """
    return groups[None, :] == groups[labels][:, None]


def sibling_scores(scores: Tensor, labels: Tensor, groups: Tensor) -> Tensor:
    """``scores`` (B, C) with every class outside the image's sibling group at -inf: the
    softmax over them is the softmax over the siblings, and those classes get no gradient."""
    return scores.masked_fill(~sibling_mask(groups, labels), float("-inf"))


def sibling_cross_entropy(scores: Tensor, labels: Tensor, groups: Tensor) -> Tensor:
    """Mean cross-entropy of each image's class among its siblings (the parent given)."""
    return F.cross_entropy(sibling_scores(scores, labels, groups), labels)


@dataclass
class EpochStats:
    lr: float
    loss: float
    top1: float
    samples: int


@dataclass
class EpochTally:
    """An epoch so far on this process: sums over its own samples (on the device: reading them
    every step would stall a GPU's queue), global ``steps`` done, how many chunks each loader
    lane has delivered (:class:`promptcam.data.reader.TrainingStream`), the last step's lr."""

    loss_sum: Tensor
    correct: Tensor
    seen: int = 0
    steps: int = 0
    chunks_done: dict[int, int] = field(default_factory=dict)
    lr: float = 0.0

    @classmethod
    def empty(cls, device: torch.device, lr: float = 0.0) -> EpochTally:
        zero = torch.zeros((), device=device)
        return cls(loss_sum=zero, correct=torch.zeros((), dtype=torch.long, device=device), lr=lr)

    def stats(self) -> EpochStats:
        if self.seen == 0:
            raise ValueError("the training loader yielded no samples")
        loss, top1 = self.loss_sum.item() / self.seen, self.correct.item() / self.seen
        return EpochStats(lr=self.lr, loss=loss, top1=top1, samples=self.seen)


def _training_batches(
    loader: DataLoader, device: torch.device
) -> Iterator[tuple[Tensor, Tensor, dict[str, Any]]]:
    for images, labels, meta in loader:
        yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True), meta


def _is_placeholder(meta: dict[str, Any]) -> bool:
    skipped = meta.get("skipped")
    return skipped is not None and bool(skipped[0])


def _count_chunk(tally: EpochTally, meta: dict[str, Any]) -> None:
    if "lane" in meta:
        lane, chunk = int(meta["lane"][0]), int(meta["chunk"][0])
        tally.chunks_done[lane] = max(tally.chunks_done.get(lane, 0), chunk + 1)


def train_steps(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    tally: EpochTally,
    *,
    num_classes: int,
    epoch: int,
    samples_per_epoch: int,
    config: TrainConfig,
    device: torch.device,
    progress: tqdm,
    groups: Tensor | None = None,
    processes: int = 1,
    stop_requested: Callable[[], bool] = lambda: False,
) -> bool:
    """Train on ``loader``'s batches into ``tally``; True when the epoch is done, False when
    ``stop_requested()`` (asked after every step, on every process alike) stopped it early.

    ``groups`` (C,) on ``device``: the sibling objective (loss and train top-1 over each
    image's siblings); None: the flat softmax. ``processes``: how many processes train one
    global batch together (each on an equal share), for the schedule's position. Placeholder
    batches (steps done before an interruption) are passed over.
    """
    model.train()
    for images, labels, meta in _training_batches(loader, device):
        if _is_placeholder(meta):
            continue
        count = len(labels)
        tally.lr = learning_rate(epoch + tally.seen * processes / samples_per_epoch, config)
        for group in optimizer.param_groups:
            group["lr"] = tally.lr
        sample = sample_classes(labels, num_classes, config.sampled_classes)
        with autocast(device, config.mixed_precision):
            scores = model(images, sample.classes)
        if groups is None:
            loss = F.cross_entropy(scores.float() + sample.logit_offset, sample.targets)
        else:
            # Settings refuse sampled_classes here, so the scores are all C in order.
            scores = sibling_scores(scores.float(), labels, groups)
            loss = F.cross_entropy(scores, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        tally.seen += count
        tally.steps += 1
        tally.loss_sum += loss.detach() * count
        tally.correct += (scores.argmax(dim=1) == sample.targets).sum()
        _count_chunk(tally, meta)
        progress.update(count * processes)
        if stop_requested():
            return False
    return True


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
    groups: Tensor | None = None,
) -> EpochStats:
    """One whole pass over ``loader`` on one process (see :func:`train_steps`)."""
    tally = EpochTally.empty(device, learning_rate(epoch, config))
    train_steps(
        model,
        loader,
        optimizer,
        tally,
        num_classes=num_classes,
        epoch=epoch,
        samples_per_epoch=samples_per_epoch,
        config=config,
        device=device,
        progress=progress,
        groups=groups,
    )
    return tally.stats()


def validate(model: PromptCAM, loader: DataLoader, device: torch.device) -> tuple[float, float]:
    """(loss, top-1) on the validation split."""
    scores, labels = collect_scores(model, loader, device)
    return mean_loss(scores, labels), topk_accuracy(scores, labels, 1)


@dataclass(frozen=True)
class SiblingValidation:
    loss: float  # the sibling cross-entropy (the objective)
    top1: float  # flat: argmax over every class
    sibling_top1: float  # argmax among the true class's siblings (the parent given)


def validate_siblings(
    model: PromptCAM, loader: DataLoader, device: torch.device, groups: Tensor
) -> SiblingValidation:
    """Validation of the sibling objective, whose scores compare within a group only."""
    scores, labels = collect_scores(model, loader, device)
    within = sibling_scores(scores, labels, groups.cpu())
    return SiblingValidation(
        loss=float(F.cross_entropy(within, labels)),
        top1=topk_accuracy(scores, labels, 1),
        sibling_top1=topk_accuracy(within, labels, 1),
    )
