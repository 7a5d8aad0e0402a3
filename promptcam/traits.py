"""Trait identification by greedy head masking (Prompt-CAM, Sec. 3.4 and its supplement).

For an image correctly classified as class ``c``, each head ``r`` of the last block gives one
attention map of ``c``'s prompt over the patches. *Blurring* head ``r`` sets the pre-softmax
logits of ``c``'s prompt row to 0 for that head (uniform attention over every key), as the
reference implementation does. The greedy search, one step at a time:

1. for every head still unblurred, blur it (on top of the heads already blurred) and score the
   image;
2. permanently blur the head whose blurring hurts least, i.e. leaves the highest score of ``c``.

Exact rules, shared by the batched and the naive implementation:

* **Criterion.** Blurring changes only class ``c``'s row, so the other classes' scores stay
  fixed and the softmax probability of ``c`` is a monotone function of ``c``'s own score
  ``s[c]``: candidates are compared on ``s[c]`` (no saturation near probability 1).
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
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from promptcam.io import atomic_open, atomic_path
from promptcam.model import Preprocessing, PromptCAM, resolve_device
from promptcam.settings import ENCODE_PRECISIONS, EncodePrecision

__all__ = [
    "ENCODE_PRECISIONS",
    "STOP_RULES",
    "CrossClassAccumulator",
    "EliminationTrace",
    "GreedyConfig",
    "TargetRows",
    "TraitBatch",
    "TraitSearch",
    "class_summary",
    "cross_class_pairs",
    "cross_class_table",
    "encode_for_search",
    "greedy_heads",
    "greedy_heads_naive",
    "identify_traits",
    "least_harmful",
    "score_candidates",
    "search_table",
    "siblings_from_metadata",
    "siblings_from_taxonomy",
    "stop_search",
    "target_rows",
    "traits_for_images",
    "write_cross_class",
    "write_trait_maps",
    "write_trait_summary",
]

LOGGER = logging.getLogger(__name__)

StopRule = Literal["top-k", "misclassified"]
STOP_RULES: tuple[str, ...] = ("top-k", "misclassified")
CandidateScorer = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class GreedyConfig:
    """How the greedy search stops and breaks ties; see the module docstring."""

    stop: StopRule = "top-k"
    top_traits: int = 4
    tie_tolerance: float = 1e-5

    def __post_init__(self) -> None:
        if self.stop not in STOP_RULES:
            raise ValueError(f"stop must be one of {STOP_RULES}, got {self.stop!r}")
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


def stop_search(trace: EliminationTrace, config: GreedyConfig) -> TraitSearch:
    """Apply ``config``'s stop rule to a full elimination; see the module docstring."""
    num_images, num_heads = trace.order.shape
    misclassified = trace.step_predicted != trace.targets[:, None]
    misclassified &= trace.searched[:, None]
    first_flip = np.where(misclassified.any(axis=1), misclassified.argmax(axis=1), -1)
    if config.stop == "top-k":
        num_removed = np.full(num_images, max(num_heads - config.top_traits, 0), dtype=np.int64)
        flip_step = np.where(first_flip < num_removed, first_flip, -1)
    else:
        num_removed = np.where(first_flip >= 0, first_flip, num_heads).astype(np.int64)
        flip_step = first_flip
    num_removed = np.where(trace.searched, num_removed, 0)
    return TraitSearch(trace=trace, num_removed=num_removed, flip_step=flip_step.astype(np.int64))


# ----------------------------------------------------------------------------- the search


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
    scorer: CandidateScorer, targets: Tensor, num_heads: int, tie_tolerance: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Full greedy elimination, all images in lockstep (one scorer call per step).

    ``scorer`` maps masks (B, K, H) to scores (B, K, C). Returns the head blurred at
    each step, the target's probability and the prediction after it, each (B, H).
    """
    batch = targets.shape[0]
    rows = torch.arange(batch, device=targets.device)
    blurred = torch.zeros(batch, num_heads, dtype=torch.bool, device=targets.device)
    order, probabilities, predictions = [], [], []
    for _ in range(num_heads):
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


@dataclass(frozen=True)
class TargetRows:
    """Everything the greedy search needs of the target class's row of the last block.

    Blurring replaces a head's output for that row by the mean of the head's values; nothing
    else in the block changes. So each head's two possible outputs are computed once, and a
    candidate costs only the row's projection, MLP and head.

    Attributes:
        attended: (B, H, d) each head's output for the row, unblurred.
        uniform: (B, H, d) each head's output under uniform attention over all keys.
        residual: (B, D) the row's residual stream entering the block.
        scores: (B, C) unblurred scores; blurring leaves the other classes' unchanged.
        targets: (B,) the class of each row.
    """

    attended: Tensor
    uniform: Tensor
    residual: Tensor
    scores: Tensor
    targets: Tensor


def _class_rows_and_keys(model: PromptCAM, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The last block's class rows, as :class:`PromptCAM` lays them out: the tokens their
    queries come from (B or 1, C, D), their residual stream (B or 1, C, D), and the tokens
    they attend to (B, T, D). Eval mode: no prompt dropout."""
    if model.config.layout == "scalable":
        queries = model.class_prompts[None]
        # Class prompts contribute their query only; the residual is one shared readout token.
        return queries, model.readout_token.expand_as(queries), tokens
    if model.config.variant == "deep":
        prompts = model.prompt_embeddings[-1][None]
        context = torch.cat([prompts.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        return prompts, prompts, context
    carried = tokens[:, : model.num_classes]  # shallow: the class prompts' carried states
    return carried, carried, tokens


def target_rows(model: PromptCAM, tokens: Tensor, targets: Tensor, scores: Tensor) -> TargetRows:
    """Cache :class:`TargetRows` from :meth:`PromptCAM.encode_to_last_block`'s tokens and the
    unblurred ``scores`` (B, C)."""
    block = model.backbone.blocks[-1]
    attn = block.attn
    queries, residual, context = _class_rows_and_keys(model, tokens)
    batch = torch.arange(tokens.shape[0], device=tokens.device)
    expanded = (tokens.shape[0], -1, -1)
    row_queries = queries.expand(*expanded)[batch, targets]  # (B, D)
    q = attn.qkv(block.norm1(row_queries))[:, : attn.attn_dim].unflatten(-1, (attn.num_heads, -1))
    k, v = attn.qkv(block.norm1(context)).unflatten(-1, (3, attn.num_heads, -1)).unbind(2)[1:]
    q, k, v = attn.q_norm(q), attn.k_norm(k.transpose(1, 2)), v.transpose(1, 2)  # (B, H, T, d)
    weights = ((q[:, :, None] * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    return TargetRows(
        attended=(weights @ v).squeeze(2),
        uniform=v.mean(dim=2),
        residual=residual.expand(*expanded)[batch, targets],
        scores=scores,
        targets=targets,
    )


def score_candidates(model: PromptCAM, rows: TargetRows, masks: Tensor) -> Tensor:
    """Scores (B, K, C) with the heads of ``masks`` (B, K, H) blurred in each target's row."""
    block = model.backbone.blocks[-1]
    attn = block.attn
    heads = torch.where(masks[..., None], rows.uniform[:, None], rows.attended[:, None])
    x = rows.residual[:, None] + block.ls1(attn.proj(attn.norm(heads.flatten(-2))))
    x = x + block.ls2(block.mlp(block.norm2(x)))
    target_scores = model.head(model.backbone.norm(x)).to(rows.scores.dtype)  # (B, K, 1)
    scores = rows.scores[:, None].expand(-1, masks.shape[1], -1).clone()
    index = rows.targets[:, None, None].expand(-1, masks.shape[1], 1)
    return scores.scatter_(2, index, target_scores)


def encode_for_search(model: PromptCAM, images: Tensor, precision: EncodePrecision) -> Tensor:
    """Tokens entering the last block, in the model's dtype whatever ``precision`` the blocks before
    it ran in.

    ``"bf16"`` runs blocks 1..N-1 under bf16 autocast (the bulk of the cost on a GPU); the last
    block, whose per-head outputs the greedy compares, always runs in fp32 from these tokens.
    ``"auto"``: bf16 on a GPU, fp32 elsewhere (where bf16 saves nothing).
    """
    if precision not in ENCODE_PRECISIONS:
        raise ValueError(f"encode precision must be one of {ENCODE_PRECISIONS}, got {precision!r}")
    device = images.device.type
    bf16 = precision == "bf16" or (precision == "auto" and device == "cuda")
    with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
        tokens = model.encode_to_last_block(images)
    return tokens.float() if bf16 else tokens


@torch.inference_mode()
def identify_traits(
    model: PromptCAM,
    images: Tensor,
    targets: Tensor,
    tie_tolerance: float = 1e-5,
    encode_precision: EncodePrecision = "fp32",
) -> TraitBatch:
    """Batched greedy elimination for ``images`` (B, 3, H, W) and their target classes (B,).

    One forward to the last block (:func:`encode_for_search`); the target rows' per-head
    outputs are cached (:func:`target_rows`), then each greedy step scores all images and
    candidate heads in one call (:func:`score_candidates`).
    """
    _require_eval(model)
    tokens = encode_for_search(model, images, encode_precision)
    scores, attention = model.last_block_attention(tokens)
    scores = _widened(scores)
    predicted = scores.argmax(dim=-1)
    trace = _empty_trace(targets, predicted, _target_probability(scores, targets), model.num_heads)
    searched = (predicted == targets).nonzero().squeeze(1)
    if searched.numel():
        rows = target_rows(model, tokens[searched], targets[searched], scores[searched])
        order, probabilities, predictions = _eliminate(
            lambda masks: score_candidates(model, rows, masks),
            rows.targets,
            model.num_heads,
            tie_tolerance,
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
) -> EliminationTrace:
    """The batched search's trace alone; see :func:`identify_traits`."""
    return identify_traits(model, images, targets, tie_tolerance, encode_precision).trace


def _full_forward_blurred(model: PromptCAM, image: Tensor, target: int, blurred: Tensor) -> Tensor:
    """Scores (C,) of one image by a full forward, blurring by zeroing the attention logits."""
    tokens = model.encode_to_last_block(image[None])
    class_index = torch.tensor([target], device=image.device)
    scores, _ = model.last_block_attention(tokens, class_index, blurred[None])
    return _widened(scores[0])


@torch.inference_mode()
def greedy_heads_naive(
    model: PromptCAM, images: Tensor, targets: Tensor, tie_tolerance: float = 1e-5
) -> EliminationTrace:
    """The reference's way: one full forward per image, step and candidate head."""
    _require_eval(model)
    num_heads = model.num_heads
    no_blur = torch.zeros(num_heads, dtype=torch.bool, device=images.device)
    base = torch.stack(
        [
            _full_forward_blurred(model, image, int(t), no_blur)
            for image, t in zip(images, targets, strict=True)
        ]
    )
    predicted = base.argmax(dim=-1)
    trace = _empty_trace(targets, predicted, _target_probability(base, targets), num_heads)
    for index, (image, target) in enumerate(zip(images, targets.tolist(), strict=True)):
        if predicted[index] != target:
            continue
        blurred = no_blur.clone()
        for step in range(num_heads):
            candidates = [head for head in range(num_heads) if not blurred[head]]
            candidate_scores = []
            for head in candidates:
                mask = blurred.clone()
                mask[head] = True
                candidate_scores.append(_full_forward_blurred(model, image, target, mask))
            scores = torch.stack(candidate_scores)
            pick = int(least_harmful(scores[:, target], tie_tolerance))
            blurred[candidates[pick]] = True
            trace["order"][index, step] = candidates[pick]
            trace["scores"][index, step] = float(
                _target_probability(scores[pick], torch.tensor(target, device=scores.device))
            )
            trace["step_predicted"][index, step] = int(scores[pick].argmax())
    return EliminationTrace(**trace)


# ----------------------------------------------------------------------------- tables


def _nullable_int(values: np.ndarray) -> pd.arrays.IntegerArray:
    """Non-negative integers, with -1 as null."""
    return pd.arrays.IntegerArray(values.astype(np.int64), mask=values < 0)


def search_table(
    search: TraitSearch, image_ids: Sequence[str], label_names: Sequence[str]
) -> pd.DataFrame:
    """One row per image and head (image-major, heads ascending).

    Columns: ``image``, ``target``/``target_label``, ``predicted``/``predicted_label`` (without
    blurring), ``correct``, ``base_score`` (target probability without blurring), ``flip_step``
    and ``flipped`` (see module docs), ``final_predicted`` (with the removed heads blurred),
    ``head``, ``removal_step`` (null for kept heads), ``score_after_removal`` (target
    probability once this head and every earlier one is blurred), ``score_drop`` (probability
    lost at this head's step), ``kept`` and ``kept_rank`` (0 = most important kept head).
    """
    trace = search.trace
    num_images, num_heads = trace.order.shape
    if len(image_ids) != num_images:
        raise ValueError(f"{len(image_ids)} image ids for {num_images} images")
    removal = search.removal_step()
    step_index = np.clip(removal, 0, None)
    after = np.where(removal >= 0, np.take_along_axis(trace.scores, step_index, axis=1), np.nan)
    previous = np.concatenate([trace.base_scores[:, None], trace.scores[:, :-1]], axis=1)
    before = np.take_along_axis(previous, step_index, axis=1)
    labels = np.asarray(label_names, dtype=object)
    final = search.final_predicted()

    def per_image(values: np.ndarray) -> np.ndarray:
        return np.repeat(values, num_heads)

    return pd.DataFrame(
        {
            "image": per_image(np.asarray(image_ids, dtype=object)),
            "target": per_image(trace.targets),
            "target_label": per_image(labels[trace.targets]),
            "predicted": per_image(trace.predicted),
            "predicted_label": per_image(labels[trace.predicted]),
            "correct": per_image(trace.searched),
            "base_score": per_image(trace.base_scores),
            "flip_step": _nullable_int(per_image(search.flip_step)),
            "flipped": per_image(search.flip_step >= 0),
            "final_predicted": per_image(final),
            "head": np.tile(np.arange(num_heads), num_images),
            "removal_step": _nullable_int(removal.ravel()),
            "score_after_removal": pd.array(after.ravel(), dtype="Float64"),
            "score_drop": pd.array(
                np.where(removal >= 0, before - after, np.nan).ravel(), dtype="Float64"
            ),
            "kept": search.kept().ravel(),
            "kept_rank": _nullable_int(search.kept_rank().ravel()),
        }
    )


def class_summary(
    table: pd.DataFrame, maps: np.ndarray, label_names: Sequence[str]
) -> tuple[pd.DataFrame, np.ndarray]:
    """Per class and head: how consistently the head is kept, and its mean map.

    Only correctly classified images count (the others were not searched).

    Args:
        table: :func:`search_table`'s rows.
        maps: (N, H, h, w) target-class maps, in the table's image order.

    Returns:
        A table (``class``, ``label``, ``head``, ``n_images``, ``keep_rate``,
        ``mean_kept_rank`` over the images keeping the head, ``mean_removal_step`` and
        ``mean_score_drop`` over those removing it) and the mean maps (C, H, h, w), NaN for a
        class without correctly classified images.
    """
    num_images, num_heads = maps.shape[:2]
    per_image = table.groupby("image", sort=False).first()
    if len(per_image) != num_images:
        raise ValueError(f"{len(per_image)} images in the table, {num_images} in the maps")
    correct = per_image["correct"].to_numpy(bool)
    targets = per_image["target"].to_numpy(np.int64)
    mean_maps = np.full((len(label_names), *maps.shape[1:]), np.nan, dtype=np.float32)
    for class_index in np.unique(targets[correct]):
        mean_maps[class_index] = maps[correct & (targets == class_index)].mean(axis=0)
    searched = table[table["correct"]]
    grouped = searched.groupby(["target", "head"])
    stats = pd.DataFrame(
        {
            "n_images": grouped["image"].nunique(),
            "keep_rate": grouped["kept"].mean(),
            "mean_kept_rank": grouped["kept_rank"].mean(),
            "mean_removal_step": grouped["removal_step"].mean(),
            "mean_score_drop": grouped["score_drop"].mean(),
        }
    )
    full_index = pd.MultiIndex.from_product(
        [range(len(label_names)), range(num_heads)], names=["target", "head"]
    )
    stats = stats.reindex(full_index)
    stats["n_images"] = stats["n_images"].fillna(0).astype(np.int64)
    stats = stats.reset_index().rename(columns={"target": "class"})
    stats.insert(1, "label", np.asarray(label_names, dtype=object)[stats["class"]])
    return stats, mean_maps


def write_trait_maps(
    path: str | os.PathLike,
    image_ids: Sequence[str],
    search: TraitSearch,
    maps: np.ndarray,
    label_names: Sequence[str],
) -> None:
    """``trait_maps.npz`` (compressed): ``image`` (N,), ``target`` (N,), ``maps`` (N, H, h, w)
    float32 target-class attention of every head, ``kept`` (N, H) bool (the kept heads' maps
    are ``maps[kept]``), ``kept_rank`` (N, H) (-1: removed or unsearched), ``order`` (N, H) the
    full greedy elimination order (-1 rows: unsearched; ``order[:, -1]`` is the most important
    head), ``label_names`` (C,)."""
    with atomic_open(path, "wb") as handle:
        np.savez_compressed(
            handle,
            image=np.asarray(image_ids, dtype=str),
            target=search.trace.targets,
            maps=maps.astype(np.float32),
            kept=search.kept(),
            kept_rank=search.kept_rank(),
            order=search.trace.order,
            label_names=np.asarray(label_names, dtype=str),
        )


def write_trait_summary(
    tsv_path: str | os.PathLike,
    npz_path: str | os.PathLike,
    summary: pd.DataFrame,
    mean_maps: np.ndarray,
    label_names: Sequence[str],
) -> None:
    """The per-class summary table and ``mean_maps`` (C, H, h, w), ``keep_rate`` (C, H),
    ``n_images`` (C,), ``label_names`` (C,) in a compressed npz."""
    num_classes, num_heads = mean_maps.shape[:2]
    with atomic_open(tsv_path, "w", newline="") as handle:
        summary.to_csv(handle, sep="\t", index=False, na_rep="NA")
    keep_rate = summary["keep_rate"].to_numpy(np.float64).reshape(num_classes, num_heads)
    n_images = summary["n_images"].to_numpy(np.int64).reshape(num_classes, num_heads)[:, 0]
    with atomic_open(npz_path, "wb") as handle:
        np.savez_compressed(
            handle,
            mean_maps=mean_maps.astype(np.float32),
            keep_rate=keep_rate,
            n_images=n_images,
            label_names=np.asarray(label_names, dtype=str),
        )


# ----------------------------------------------------------------------------- cross-class


def siblings_from_taxonomy(path: str | os.PathLike, rank: str) -> dict[str, list[str]]:
    """``{class: its siblings}`` at ``rank`` from ``taxonomy.nwk`` (same parent; the coarsest
    rank's classes are all siblings of each other)."""
    from promptcam.taxonomy import classes_at_rank, load_taxonomy, siblings

    tree = load_taxonomy(path)
    return {name: siblings(tree, rank, name) for name in classes_at_rank(tree, rank)}


def siblings_from_metadata(
    table: pd.DataFrame, levels: Sequence[str], rank: str
) -> dict[str, list[str]]:
    """The same from the metadata's rank columns, for when no taxonomy file is at hand."""
    position = list(levels).index(rank)
    parent = levels[position - 1] if position > 0 else None
    lineages = table[[rank] if parent is None else [parent, rank]].drop_duplicates()
    groups = [lineages[rank]] if parent is None else [g[rank] for _, g in lineages.groupby(parent)]
    result: dict[str, list[str]] = {}
    for group in groups:
        names = sorted(set(group))
        for name in names:
            result[name] = [other for other in names if other != name]
    return dict(sorted(result.items()))


def cross_class_pairs(
    label_names: Sequence[str],
    configured: Iterable[Sequence[str]] = (),
    siblings: Mapping[str, Sequence[str]] | None = None,
) -> list[tuple[int, int, str]]:
    """Ordered (image class, prompt class, why) pairs: configured ones, then every sibling pair.

    Unknown labels in ``configured`` raise; a pair listed twice is kept once (first reason).
    """
    index = {name: i for i, name in enumerate(label_names)}
    pairs: dict[tuple[int, int], str] = {}
    for pair in configured:
        image_class, prompt_class = pair
        missing = [name for name in pair if name not in index]
        if missing:
            raise KeyError(f"cross-class pair {list(pair)}: unknown classes {missing}")
        pairs.setdefault((index[image_class], index[prompt_class]), "configured")
    for name, others in (siblings or {}).items():
        for other in others:
            if name in index and other in index:
                pairs.setdefault((index[name], index[other]), "sibling")
    return [(a, b, why) for (a, b), why in pairs.items()]


class CrossClassAccumulator:
    """Streams batches; keeps, per pair (A, B), sums over class A's images of class B's prompt
    attention (every head), of A's own, and of both classes' probabilities."""

    def __init__(
        self, pairs: Sequence[tuple[int, int, str]], num_heads: int, num_patches: int
    ) -> None:
        self.pairs = list(pairs)
        self.cross = np.zeros((len(self.pairs), num_heads, num_patches), dtype=np.float64)
        self.own = np.zeros_like(self.cross)
        self.probability_image_class = np.zeros(len(self.pairs))
        self.probability_prompt_class = np.zeros(len(self.pairs))
        self.n_images = np.zeros(len(self.pairs), dtype=np.int64)

    def update(self, labels: Tensor, scores: Tensor, attention: Tensor) -> None:
        """``labels`` (B,), ``scores`` (B, C), ``attention`` (B, H, C, P) of one batch."""
        labels = labels.cpu()
        probabilities = scores.float().softmax(dim=-1).cpu().double()
        for row, (image_class, prompt_class, _) in enumerate(self.pairs):
            members = (labels == image_class).nonzero().squeeze(1)
            if not members.numel():
                continue
            chosen = attention[members.to(attention.device)].double()
            self.cross[row] += chosen[:, :, prompt_class].sum(dim=0).cpu().numpy()
            self.own[row] += chosen[:, :, image_class].sum(dim=0).cpu().numpy()
            self.probability_image_class[row] += float(probabilities[members, image_class].sum())
            self.probability_prompt_class[row] += float(probabilities[members, prompt_class].sum())
            self.n_images[row] += members.numel()

    def means(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean maps (pairs, H, P) of the prompt class and of the image class; NaN if no image."""
        with np.errstate(invalid="ignore", divide="ignore"):
            count = self.n_images[:, None, None]
            return self.cross / count, self.own / count


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity along the last axis."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def cross_class_table(
    accumulator: CrossClassAccumulator, label_names: Sequence[str]
) -> pd.DataFrame:
    """One row per pair: ``image_class``, ``prompt_class``, ``relation``, ``n_images``, mean
    probabilities of both classes on the image class's images, and ``map_similarity``: the
    cosine similarity of the prompt class's and the image class's mean maps, mean over heads."""
    cross, own = accumulator.means()
    with np.errstate(invalid="ignore", divide="ignore"):
        count = accumulator.n_images
        return pd.DataFrame(
            {
                "image_class": [label_names[a] for a, _, _ in accumulator.pairs],
                "prompt_class": [label_names[b] for _, b, _ in accumulator.pairs],
                "relation": [why for _, _, why in accumulator.pairs],
                "n_images": count,
                "probability_image_class": accumulator.probability_image_class / count,
                "probability_prompt_class": accumulator.probability_prompt_class / count,
                "map_similarity": _cosine(cross, own).mean(axis=-1),
            }
        )


def write_cross_class(
    tsv_path: str | os.PathLike,
    npz_path: str | os.PathLike,
    accumulator: CrossClassAccumulator,
    label_names: Sequence[str],
    patch_grid: tuple[int, int],
) -> None:
    """The pair table and ``cross_maps``/``own_maps`` (pairs, H, h, w), ``pairs`` (pairs, 2)
    class indices (image class, prompt class), ``label_names`` in a compressed npz."""
    cross, own = accumulator.means()
    shape = (len(accumulator.pairs), cross.shape[1], *patch_grid)
    with atomic_open(tsv_path, "w", newline="") as handle:
        cross_class_table(accumulator, label_names).to_csv(
            handle, sep="\t", index=False, na_rep="NA"
        )
    with atomic_open(npz_path, "wb") as handle:
        np.savez_compressed(
            handle,
            cross_maps=cross.reshape(shape).astype(np.float32),
            own_maps=own.reshape(shape).astype(np.float32),
            pairs=np.array([(a, b) for a, b, _ in accumulator.pairs], dtype=np.int64).reshape(
                -1, 2
            ),
            label_names=np.asarray(label_names, dtype=str),
        )


# ----------------------------------------------------------------------------- command line


def traits_for_images(
    checkpoint: str | os.PathLike,
    image_or_dir: str | os.PathLike,
    out_parquet: str | os.PathLike,
    config: GreedyConfig,
    batch_size: int = 16,
    device: str | torch.device | None = None,
    backbone_weights: str | os.PathLike | None = None,
    encode_precision: EncodePrecision = "auto",
) -> pd.DataFrame:
    """Greedy search for each image's *predicted* class; writes and returns one row per image
    and head: ``image``, ``predicted`` (label), ``head``, ``removal_step`` (0 for the first head
    removed, null for kept heads), ``score_after_removal`` (the predicted class's probability
    once that head, and every earlier one, is blurred), then ``predicted_index``, ``kept``,
    ``kept_rank``."""
    from promptcam.model import load_checkpoint
    from promptcam.predict import list_images, load_image

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, meta = load_checkpoint(checkpoint, backbone_weights=backbone_weights)
    model.to(device)
    root, names = list_images(image_or_dir)
    traces = []
    for start in range(0, len(names), batch_size):
        batch = names[start : start + batch_size]
        images = torch.stack([load_image(root / name, meta.preprocessing) for name in batch]).to(
            device
        )
        with torch.inference_mode():
            predicted = model(images).float().argmax(dim=-1)
        traces.append(
            greedy_heads(model, images, predicted, config.tie_tolerance, encode_precision)
        )
    search = stop_search(EliminationTrace.concatenate(traces), config)
    table = search_table(search, names, meta.label_names)
    table = table.rename(columns={"predicted": "predicted_index", "predicted_label": "predicted"})
    columns = [
        "image",
        "predicted",
        "head",
        "removal_step",
        "score_after_removal",
        "predicted_index",
        "kept",
        "kept_rank",
    ]
    table = table[columns]
    write_parquet(out_parquet, table)
    return table


def write_parquet(path: str | os.PathLike, table: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        table.to_parquet(tmp, index=False)


# ----------------------------------------------------------------------------- one rank


@dataclass(frozen=True)
class TraitRunConfig:
    """The workflow's ``traits`` section: the search, the batching and the cross-class pairs.

    ``cross_class_pairs`` lists ``[image class, prompt class]`` label pairs of this rank;
    ``siblings`` adds every ordered pair of sibling classes.
    """

    greedy: GreedyConfig = GreedyConfig()
    encode_precision: EncodePrecision = "auto"
    batch_size: int = 32
    num_workers: int = 0
    threads: int = 1
    device: str = "auto"
    cross_class_pairs: tuple[tuple[str, str], ...] = ()
    siblings: bool = True

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], rank: str) -> TraitRunConfig:
        """From the config's ``traits`` section; ``cross_class_pairs`` is ``{rank: [[a, b]]}``."""
        pairs = values.get("cross_class_pairs", {}).get(rank, [])
        return cls(
            greedy=GreedyConfig(
                stop=values.get("stop", "top-k"),
                top_traits=int(values.get("top_traits", 4)),
                tie_tolerance=float(values.get("tie_tolerance", 1e-5)),
            ),
            encode_precision=values.get("encode_precision", "auto"),
            batch_size=int(values.get("batch_size", 32)),
            num_workers=int(values.get("num_workers", 0)),
            threads=int(values.get("threads", 1)),
            device=values.get("device", "auto"),
            cross_class_pairs=tuple((str(a), str(b)) for a, b in pairs),
            siblings=bool(values.get("siblings", True)),
        )


def evaluation_loader(
    shards_dir: str | os.PathLike,
    rank: str,
    preprocessing: Preprocessing,
    batch_size: int,
    num_workers: int = 0,
    with_mask: bool = False,
    split: str = "test",
) -> DataLoader:
    """One split, unshuffled and unaugmented, in the checkpoint's preprocessing."""
    from promptcam.reader import ShardDataset, TransformConfig, make_loader

    transform = TransformConfig(
        img_size=preprocessing.img_size[0], mean=preprocessing.mean, std=preprocessing.std
    )
    dataset = ShardDataset(
        shards_dir, split, rank, train=False, transform=transform, with_mask=with_mask
    )
    return make_loader(dataset, batch_size, num_workers=num_workers)


def run_rank_traits(
    *,
    checkpoint: str | os.PathLike,
    shards_dir: str | os.PathLike,
    rank: str,
    outputs: Mapping[str, str | os.PathLike],
    config: TraitRunConfig,
    siblings: Mapping[str, Sequence[str]] | None = None,
    backbone_weights: str | os.PathLike | None = None,
) -> pd.DataFrame:
    """Greedy search on the test split of one rank; writes every output of the traits rule.

    ``outputs`` keys: ``table`` (traits.parquet), ``maps`` (trait_maps.npz), ``summary``
    (trait_summary.tsv), ``summary_maps`` (trait_summary.npz), ``cross_class``
    (cross_class.tsv), ``cross_class_maps`` (cross_class.npz). The last block runs in fp32:
    reduced precision would blur the score differences the greedy ranks heads by; the blocks
    before it run in ``config.encode_precision``.
    """
    from promptcam.model import load_checkpoint

    torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    model, meta = load_checkpoint(checkpoint, backbone_weights=backbone_weights)
    model.to(device)
    label_names = list(meta.label_names)
    pairs = cross_class_pairs(
        label_names, config.cross_class_pairs, siblings if config.siblings else None
    )
    grid = model.patch_grid
    cross = CrossClassAccumulator(pairs, model.num_heads, grid[0] * grid[1])
    loader = evaluation_loader(
        shards_dir, rank, meta.preprocessing, config.batch_size, config.num_workers
    )
    image_ids, traces, maps = [], [], []
    start = time.perf_counter()
    for images, labels, batch_meta in loader:
        result = identify_traits(
            model,
            images.to(device),
            labels.to(device),
            config.greedy.tie_tolerance,
            config.encode_precision,
        )
        cross.update(labels, result.scores, result.attention)
        image_ids.extend(batch_meta["sample_id"])
        traces.append(result.trace)
        maps.append(result.target_maps().float().cpu().numpy())
    if not traces:
        raise ValueError(f"no test images for rank {rank!r} in {shards_dir}")
    search = stop_search(EliminationTrace.concatenate(traces), config.greedy)
    seconds = time.perf_counter() - start
    LOGGER.info(
        "%s: %d test images (%d correctly classified, searched) in %.1f s on %s; stop rule %s",
        rank,
        len(image_ids),
        int(search.trace.searched.sum()),
        seconds,
        device,
        config.greedy,
    )
    all_maps = np.concatenate(maps).reshape(len(image_ids), model.num_heads, *grid)
    table = search_table(search, image_ids, label_names)
    summary, mean_maps = class_summary(table, all_maps, label_names)
    write_parquet(outputs["table"], table)
    write_trait_maps(outputs["maps"], image_ids, search, all_maps, label_names)
    write_trait_summary(
        outputs["summary"], outputs["summary_maps"], summary, mean_maps, label_names
    )
    write_cross_class(outputs["cross_class"], outputs["cross_class_maps"], cross, label_names, grid)
    return table
