"""Trait identification by greedy head masking (Prompt-CAM, Sec. 3.4 and its supplement).

For an image correctly classified as class ``c``, each head ``r`` of the last block gives one
attention map of ``c``'s prompt over the patches. *Blurring* head ``r`` sets the pre-softmax
logits of ``c``'s prompt row to 0 for that head (uniform attention over every key), as the
reference implementation does. The greedy search, one step at a time:

1. for every head still unblurred, blur it (on top of the heads already blurred) and score the
   image;
2. permanently blur the head whose blurring hurts least, i.e. leaves the highest score of ``c``.

Exact rules, shared by the batched and the naive implementation:

* **Criterion ``reference``** (the default). Blurring changes only class ``c``'s row, so the
  other classes' scores stay fixed and the softmax probability of ``c`` is a monotone function
  of ``c``'s own score ``s[c]``: candidates are compared on ``s[c]`` (no saturation near
  probability 1). Any criterion built on that one row (probability, margin) ranks heads
  exactly as ``s[c]`` does.
* **Criterion ``contrastive``.** The head is blurred in the rows of ``c`` *and* of its
  ``rivals`` best-scoring other classes (all classes when there are no more than that), and
  candidates are compared on ``c``'s log-odds over all classes, ``s[c]`` minus the
  log-sum-exp of the other scores (the log-probability saturates near 1). A head that moves every
  class's score alike, i.e. carries no class information, then costs nothing to blur and is
  eliminated early; the reference cannot tell it from a head that separates the classes.
  Measured on the demo (research/head_selection.md), the reference's top head points at the
  rank's trait more often, so it stays the default.
* **Uninformative heads** (``drop``: heads that the head-information rule found to carry no
  class information). They are blurred first, in ascending order, before the greedy steps, so
  that they are never kept and the greedy ranks the other heads with them blurred.
* **Ties.** Among the candidates whose ``s[c]`` is within ``tie_tolerance`` (absolute) of the
  best, the lowest head index wins. The tolerance absorbs the float rounding that separates two
  correct implementations (fused vs. explicit attention, batched vs. single), so both pick the
  same head.
* **Prediction.** ``argmax`` of the scores, the lowest class index on exact ties.
* **Full elimination.** The search always runs until every head is blurred; the stop rule only
  decides which of those steps count as *removals*. The steps after the stop order the kept
  heads: ``kept_rank`` 0 is the kept head the greedy would blur last (the most important).
* **Stop rule ``top-k``** (the reference): the first ``H - top_traits`` steps are removals; the
  ``top_traits`` heads left are kept, whether or not the image stays correctly classified.
  Dropped uninformative heads are always removals: at least that many steps are.
* **Stop rule ``misclassified``** (the paper: "progressively blurring the least important
  attention maps until the image is misclassified; the remaining ones highlight traits that are
  sufficient for classification"): the steps before the first step whose blur misclassifies the
  image are removals. That step's head (the "flip head") is *not* removed: the kept heads are
  those unblurred just before the flip, the smallest greedy set that still classifies correctly.
  If no blur ever misclassifies the image, every head is removed and none is kept.
* **Misclassified input.** An image whose unblurred prediction is not ``c`` is not searched: all
  heads are recorded as kept, with the prediction.

``flip_step`` is the first step whose blur misclassifies the image, within the removals for
``top-k`` (the search goes on past it) and at the stop for ``misclassified``.

:func:`greedy_heads` does one forward to the last block per batch and caches, for the target's
row of the last block, each head's output with and without blurring; each greedy step then
scores all images x candidate heads in one batched call that recomputes only that row's
projection, MLP and head. :func:`greedy_heads_naive` does a full forward with explicitly
materialised attention for every candidate, as the reference does; tests and the benchmark
check that both give the same order.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from promptcam.config import EncodePrecision
from promptcam.model.last_block import (
    class_rows,
    encode_for_search,
    rival_classes,
    score_candidates,
    score_candidates_in_rows,
    target_rows,
)
from promptcam.model.prompt_cam import PromptCAM

LOGGER = logging.getLogger(__name__)


StopRule = Literal["top-k", "misclassified"]


STOP_RULES: tuple[str, ...] = ("top-k", "misclassified")


Criterion = Literal["reference", "contrastive"]


CRITERIA: tuple[str, ...] = ("reference", "contrastive")


CandidateScorer = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class GreedyConfig:
    """How the greedy search stops and breaks ties; see the module docstring."""

    stop: StopRule = "top-k"
    top_traits: int = 4
    tie_tolerance: float = 1e-5
    criterion: Criterion = "reference"
    rivals: int = 16

    def __post_init__(self) -> None:
        if self.stop not in STOP_RULES:
            raise ValueError(f"stop must be one of {STOP_RULES}, got {self.stop!r}")
        if self.criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {CRITERIA}, got {self.criterion!r}")
        if self.rivals < 1:
            raise ValueError(f"rivals must be >= 1, got {self.rivals}")
        if self.top_traits < 0:
            raise ValueError(f"top_traits must be >= 0, got {self.top_traits}")
        if self.tie_tolerance < 0:
            raise ValueError(f"tie_tolerance must be >= 0, got {self.tie_tolerance}")


@dataclass(frozen=True)
class EliminationTrace:
    """The full greedy elimination of N images' H heads (numpy, on the CPU).

    Rows of images that were not searched (misclassified input) hold -1 and NaN.

    Attributes:
        targets: (N,) class searched for.
        predicted: (N,) prediction without blurring.
        base_scores: (N,) softmax probability of the target without blurring.
        order: (N, H) head blurred at each step.
        scores: (N, H) probability of the target once that step's head (and all before) blurred.
        step_predicted: (N, H) prediction once that step's head (and all before) blurred.
    """

    targets: np.ndarray
    predicted: np.ndarray
    base_scores: np.ndarray
    order: np.ndarray
    scores: np.ndarray
    step_predicted: np.ndarray

    @property
    def searched(self) -> np.ndarray:
        return self.predicted == self.targets

    @property
    def num_heads(self) -> int:
        return self.order.shape[1]

    @staticmethod
    def concatenate(traces: Sequence[EliminationTrace]) -> EliminationTrace:
        fields = EliminationTrace.__dataclass_fields__
        return EliminationTrace(
            **{name: np.concatenate([getattr(t, name) for t in traces]) for name in fields}
        )


@dataclass(frozen=True)
class TraitSearch:
    """An elimination trace cut by a stop rule: which heads are removed, which kept.

    Attributes:
        trace: The full elimination.
        num_removed: (N,) steps that count as removals (0 for unsearched images).
        flip_step: (N,) first step whose blur misclassifies the image (see module docs), -1 if
            none.
    """

    trace: EliminationTrace
    num_removed: np.ndarray
    flip_step: np.ndarray

    def removal_step(self) -> np.ndarray:
        """(N, H) step at which each head was removed, -1 for kept heads."""
        steps = np.full(self.trace.order.shape, -1, dtype=np.int64)
        for image, (order, removed) in enumerate(
            zip(self.trace.order, self.num_removed, strict=True)
        ):
            steps[image, order[:removed]] = np.arange(removed)
        return steps

    def kept(self) -> np.ndarray:
        """(N, H) bool: the trait heads (all heads of an unsearched image)."""
        return self.removal_step() < 0

    def kept_rank(self) -> np.ndarray:
        """(N, H) importance among the kept heads, 0 = blurred last; -1 removed or unsearched."""
        ranks = np.full(self.trace.order.shape, -1, dtype=np.int64)
        num_heads = self.trace.num_heads
        for image, (order, removed) in enumerate(
            zip(self.trace.order, self.num_removed, strict=True)
        ):
            if self.trace.searched[image]:
                kept_order = order[removed:]
                ranks[image, kept_order] = np.arange(num_heads - removed)[::-1]
        return ranks

    def final_predicted(self) -> np.ndarray:
        """(N,) prediction with the removed heads blurred."""
        last = np.clip(self.num_removed - 1, 0, None)
        after = np.take_along_axis(self.trace.step_predicted, last[:, None], axis=1)[:, 0]
        return np.where(self.num_removed > 0, after, self.trace.predicted)


def least_harmful(target_scores: Tensor, tie_tolerance: float) -> Tensor:
    """Index of the candidate to blur: the highest score, ties -> the first candidate.

    Args:
        target_scores: (..., K) the target's score after blurring each candidate; candidates
            ordered by ascending head index.
        tie_tolerance: Scores within this of the best count as ties.
    """
    best = target_scores.max(dim=-1, keepdim=True).values
    # argmax returns the first maximal index: the lowest head among the tied candidates.
    return (target_scores >= best - tie_tolerance).to(torch.uint8).argmax(dim=-1)


def stop_search(trace: EliminationTrace, config: GreedyConfig, num_dropped: int = 0) -> TraitSearch:
    """Apply ``config``'s stop rule to a full elimination whose first ``num_dropped`` steps blur
    the dropped uninformative heads (always removals); see the module docstring."""
    num_images, num_heads = trace.order.shape
    if not 0 <= num_dropped <= num_heads:
        raise ValueError(f"num_dropped must be in [0, {num_heads}], got {num_dropped}")
    misclassified = trace.step_predicted != trace.targets[:, None]
    misclassified &= trace.searched[:, None]
    first_flip = np.where(misclassified.any(axis=1), misclassified.argmax(axis=1), -1)
    if config.stop == "top-k":
        num_removed = np.full(num_images, max(num_heads - config.top_traits, 0), dtype=np.int64)
        flip_step = np.where(first_flip < num_removed, first_flip, -1)
    else:
        num_removed = np.where(first_flip >= 0, first_flip, num_heads).astype(np.int64)
        flip_step = first_flip
    num_removed = np.maximum(num_removed, num_dropped)
    num_removed = np.where(trace.searched, num_removed, 0)
    return TraitSearch(trace=trace, num_removed=num_removed, flip_step=flip_step.astype(np.int64))


def _widened(scores: Tensor) -> Tensor:
    """Scores in at least fp32: half precision is widened, fp64 (used by tests) is kept."""
    return scores.to(torch.promote_types(scores.dtype, torch.float32))


def _target_probability(scores: Tensor, targets: Tensor) -> Tensor:
    """Softmax probability of ``targets`` along the last axis; ``scores`` (..., C)."""
    index = targets.reshape(-1, *[1] * (scores.dim() - 1)).expand(*scores.shape[:-1], 1)
    return _widened(scores).log_softmax(dim=-1).gather(-1, index).squeeze(-1).exp()


def _candidate_masks(blurred: Tensor) -> tuple[Tensor, Tensor]:
    """Masks (B, K, H) adding each still-unblurred head to ``blurred`` (B, H), and those heads
    (B, K) in ascending order; every row must have the same number K of unblurred heads."""
    batch = blurred.shape[0]
    # nonzero() is row-major: each row's heads come out in ascending order.
    remaining = (~blurred).nonzero()[:, 1].view(batch, -1)
    masks = blurred[:, None, :].repeat(1, remaining.shape[1], 1)
    masks.scatter_(2, remaining[..., None], True)
    return masks, remaining


def _eliminate(
    scorer: CandidateScorer,
    targets: Tensor,
    num_heads: int,
    tie_tolerance: float,
    dropped: Sequence[int] = (),
) -> tuple[Tensor, Tensor, Tensor]:
    """Full greedy elimination, all images in lockstep (one scorer call per step).

    ``scorer`` maps masks (B, K, H) to scores (B, K, C); candidates are compared on the
    target's entry. The ``dropped`` heads are blurred first, in that order, without a choice.
    Returns the head blurred at each step, the target's probability and the prediction after
    it, each (B, H).
    """
    batch = targets.shape[0]
    rows = torch.arange(batch, device=targets.device)
    blurred = torch.zeros(batch, num_heads, dtype=torch.bool, device=targets.device)
    order, probabilities, predictions = [], [], []
    for step in range(num_heads):
        if step < len(dropped):
            remaining = torch.full((batch, 1), dropped[step], device=targets.device)
            masks = blurred[:, None, :].clone()
            masks[rows, 0, remaining[:, 0]] = True
        else:
            masks, remaining = _candidate_masks(blurred)
        scores = _widened(scorer(masks))  # (B, K, C)
        target_scores = scores.gather(2, targets[:, None, None].expand(-1, scores.shape[1], 1))
        pick = least_harmful(target_scores.squeeze(2), tie_tolerance)
        head = remaining[rows, pick]
        chosen = scores[rows, pick]  # (B, C)
        blurred[rows, head] = True
        order.append(head)
        probabilities.append(_target_probability(chosen, targets))
        predictions.append(chosen.argmax(dim=-1))
    return torch.stack(order, 1), torch.stack(probabilities, 1), torch.stack(predictions, 1)


def _empty_trace(targets: Tensor, predicted: Tensor, base_scores: Tensor, num_heads: int) -> dict:
    num_images = targets.shape[0]
    return {
        "targets": targets.cpu().numpy().astype(np.int64),
        "predicted": predicted.cpu().numpy().astype(np.int64),
        "base_scores": base_scores.cpu().numpy().astype(np.float64),
        "order": np.full((num_images, num_heads), -1, dtype=np.int64),
        "scores": np.full((num_images, num_heads), np.nan, dtype=np.float64),
        "step_predicted": np.full((num_images, num_heads), -1, dtype=np.int64),
    }


@dataclass(frozen=True)
class TraitBatch:
    """What :func:`identify_traits` returns for one batch.

    Attributes:
        trace: The full greedy elimination.
        scores: (B, C) unblurred class scores.
        attention: (B, H, C, P) every class prompt's last-block attention over the patches.
    """

    trace: EliminationTrace
    scores: Tensor
    attention: Tensor

    def target_maps(self) -> Tensor:
        """(B, H, P) attention maps of each image's target class."""
        targets = torch.as_tensor(self.trace.targets, device=self.attention.device)
        return self.attention[torch.arange(targets.shape[0], device=targets.device), :, targets]


def _require_eval(model: PromptCAM) -> None:
    # Prompt dropout and drop-path would make every candidate's score random.
    if model.training:
        raise ValueError("trait identification needs the model in eval mode (model.eval())")


def within_siblings(scores: Tensor, targets: Tensor, groups: Tensor) -> Tensor:
    """``scores`` (B, C) with every class outside its row's target's sibling group at -inf:
    a model trained among siblings (``train.objective: siblings``) is read the parent given."""
    outside = groups[None, :] != groups[targets][:, None]
    return scores.masked_fill(outside, float("-inf"))


def candidate_scorer(
    model: PromptCAM,
    tokens: Tensor,
    targets: Tensor,
    scores: Tensor,
    criterion: Criterion = "reference",
    rivals: int = 16,
) -> CandidateScorer:
    """The scorer :func:`_eliminate` compares candidates with, for images whose last-block
    ``tokens`` (B, T, D) have unblurred ``scores`` (B, C): the target's score with the head
    blurred in its row (``reference``), or its log-odds (:func:`target_log_odds`) with the head
    blurred in the rows of the target and its ``rivals`` best-scoring classes
    (``contrastive``)."""
    if criterion == "reference":
        rows = target_rows(model, tokens, targets, scores)
        return lambda masks: score_candidates(model, rows, masks)
    classes = rival_classes(scores, targets, rivals)
    rows = class_rows(model, tokens, classes, scores)
    return lambda masks: target_log_odds(
        _widened(score_candidates_in_rows(model, rows, classes, scores, masks)), targets
    )


def target_log_odds(scores: Tensor, targets: Tensor) -> Tensor:
    """``scores`` (B, K, C) shifted so that the target's entry is its log-odds, its score minus
    the log-sum-exp of the others' (0 without others); a shift per row, so softmax and argmax
    are unchanged. Unlike the log-probability it does not saturate near probability 1, where
    differences would fall below the tie tolerance."""
    index = targets[:, None, None].expand(-1, scores.shape[1], 1)
    others = scores.scatter(2, index, float("-inf")).logsumexp(dim=2, keepdim=True)
    return scores - torch.where(others.isneginf(), 0.0, others)


@torch.inference_mode()
def identify_traits(
    model: PromptCAM,
    images: Tensor,
    targets: Tensor,
    tie_tolerance: float = 1e-5,
    encode_precision: EncodePrecision = "fp32",
    groups: Tensor | None = None,
    criterion: Criterion = "reference",
    rivals: int = 16,
    dropped: Sequence[int] = (),
) -> TraitBatch:
    """Batched greedy elimination for ``images`` (B, 3, H, W) and their target classes (B,).

    One forward to the last block (:func:`encode_for_search`); the rows the ``criterion``
    blurs are cached (:func:`target_rows`, :func:`class_rows`), then each greedy step scores
    all images and candidate heads in one call (:func:`candidate_scorer`). With ``groups`` (C,)
    (each class's sibling group), predictions and probabilities are among the target's
    siblings only (:func:`within_siblings`), as a model trained among siblings is read. The
    ``dropped`` heads (uninformative) are blurred first, in that order.
    """
    _require_eval(model)
    tokens = encode_for_search(model, images, encode_precision)
    scores, attention = model.last_block_attention(tokens)
    scores = _widened(scores)
    if groups is not None:
        scores = within_siblings(scores, targets, groups.to(scores.device))
    predicted = scores.argmax(dim=-1)
    trace = _empty_trace(targets, predicted, _target_probability(scores, targets), model.num_heads)
    searched = (predicted == targets).nonzero().squeeze(1)
    if searched.numel():
        scorer = candidate_scorer(
            model, tokens[searched], targets[searched], scores[searched], criterion, rivals
        )
        order, probabilities, predictions = _eliminate(
            scorer, targets[searched], model.num_heads, tie_tolerance, dropped
        )
        index = searched.cpu().numpy()
        trace["order"][index] = order.cpu().numpy()
        trace["scores"][index] = probabilities.cpu().numpy()
        trace["step_predicted"][index] = predictions.cpu().numpy()
    return TraitBatch(trace=EliminationTrace(**trace), scores=scores, attention=attention)


def greedy_heads(
    model: PromptCAM,
    images: Tensor,
    targets: Tensor,
    tie_tolerance: float = 1e-5,
    encode_precision: EncodePrecision = "fp32",
    criterion: Criterion = "reference",
    rivals: int = 16,
) -> EliminationTrace:
    """The batched search's trace alone; see :func:`identify_traits`."""
    return identify_traits(
        model,
        images,
        targets,
        tie_tolerance,
        encode_precision,
        criterion=criterion,
        rivals=rivals,
    ).trace
