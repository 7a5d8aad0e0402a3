"""The reference's greedy search, one full forward per image, step and candidate head: the
oracle that tests and the benchmark compare :func:`promptcam.traits.search.greedy_heads` with.
"""

from __future__ import annotations

import torch
from torch import Tensor

from promptcam.model.last_block import rival_classes
from promptcam.model.prompt_cam import PromptCAM
from promptcam.traits.search import (
    Criterion,
    EliminationTrace,
    _empty_trace,
    _require_eval,
    _target_probability,
    _widened,
    least_harmful,
)


def _full_forward_blurred(model: PromptCAM, image: Tensor, rows: Tensor, blurred: Tensor) -> Tensor:
    """Scores (C,) of one image by a full forward, blurring the heads ``blurred`` (H,) in the
    class rows ``rows`` (M,) by zeroing their attention logits."""
    tokens = model.encode_to_last_block(image[None])
    scores, _ = model.last_block_attention(tokens, rows[None], blurred[None])
    return _widened(scores[0])


@torch.inference_mode()
def greedy_heads_naive(
    model: PromptCAM,
    images: Tensor,
    targets: Tensor,
    tie_tolerance: float = 1e-5,
    criterion: Criterion = "reference",
    rivals: int = 16,
) -> EliminationTrace:
    """The reference's way: one full forward per image, step and candidate head; with the
    ``contrastive`` criterion, blurring in the target's and its rivals' rows and comparing
    the target's log-odds (written out here, not shared with the batched search)."""
    _require_eval(model)
    num_heads = model.num_heads
    no_blur = torch.zeros(num_heads, dtype=torch.bool, device=images.device)
    base = torch.stack(
        [
            _full_forward_blurred(model, image, t[None], no_blur)
            for image, t in zip(images, targets, strict=True)
        ]
    )
    predicted = base.argmax(dim=-1)
    trace = _empty_trace(targets, predicted, _target_probability(base, targets), num_heads)
    for index, (image, target) in enumerate(zip(images, targets.tolist(), strict=True)):
        if predicted[index] != target:
            continue
        target_tensor = targets[index : index + 1]
        rows = target_tensor
        if criterion == "contrastive":
            rows = rival_classes(base[index : index + 1], target_tensor, rivals)[0]
        blurred = no_blur.clone()
        for step in range(num_heads):
            candidates = [head for head in range(num_heads) if not blurred[head]]
            candidate_scores = []
            for head in candidates:
                mask = blurred.clone()
                mask[head] = True
                candidate_scores.append(_full_forward_blurred(model, image, rows, mask))
            scores = torch.stack(candidate_scores)
            compared = scores
            if criterion == "contrastive":
                others = torch.cat([scores[:, :target], scores[:, target + 1 :]], dim=1)
                compared = scores - others.logsumexp(dim=1, keepdim=True)
            pick = int(least_harmful(compared[:, target], tie_tolerance))
            blurred[candidates[pick]] = True
            trace["order"][index, step] = candidates[pick]
            trace["scores"][index, step] = float(
                _target_probability(scores[pick], torch.tensor(target, device=scores.device))
            )
            trace["step_predicted"][index, step] = int(scores[pick].argmax())
    return EliminationTrace(**trace)
