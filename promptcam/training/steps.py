"""One training epoch: the learning-rate schedule, the optimizer, the sampled softmax for large C,
the sibling softmax (objective siblings), and validation."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from promptcam.model.prompt_cam import PromptCAM
from promptcam.training.runtime import autocast, batches, collect_scores, mean_loss, topk_accuracy
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
    """One pass over ``loader``. ``groups`` (C,) on ``device``: the sibling objective (loss
    and train top-1 over each image's siblings); None: the flat softmax."""
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
        if groups is None:
            loss = F.cross_entropy(scores.float() + sample.logit_offset, sample.targets)
        else:
            # Settings refuse sampled_classes here, so the scores are all C in order.
            scores = sibling_scores(scores.float(), labels, groups)
            loss = F.cross_entropy(scores, labels)
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
