"""The target class's row of the last block, cached for the greedy trait search.

All the search needs to know of the prompt layout lives here, beside :class:`PromptCAM`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from promptcam.config import ENCODE_PRECISIONS, EncodePrecision
from promptcam.model.prompt_cam import PromptCAM


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


def _row_scores(model: PromptCAM, rows: TargetRows, masks: Tensor) -> Tensor:
    """Scores (B, K) of each row's own class with the heads of ``masks`` (B, K, H) blurred."""
    block = model.backbone.blocks[-1]
    attn = block.attn
    heads = torch.where(masks[..., None], rows.uniform[:, None], rows.attended[:, None])
    x = rows.residual[:, None] + block.ls1(attn.proj(attn.norm(heads.flatten(-2))))
    x = x + block.ls2(block.mlp(block.norm2(x)))
    return model.head(model.backbone.norm(x)).squeeze(-1).to(rows.scores.dtype)


def score_candidates(model: PromptCAM, rows: TargetRows, masks: Tensor) -> Tensor:
    """Scores (B, K, C) with the heads of ``masks`` (B, K, H) blurred in each target's row."""
    scores = rows.scores[:, None].expand(-1, masks.shape[1], -1).clone()
    index = rows.targets[:, None, None].expand(-1, masks.shape[1], 1)
    return scores.scatter_(2, index, _row_scores(model, rows, masks)[..., None])


def rival_classes(scores: Tensor, targets: Tensor, rivals: int) -> Tensor:
    """(B, 1 + R) classes: each image's target, then its ``rivals`` best-scoring other classes
    (R = min(rivals, C - 1)), best first; classes at -inf (outside a sibling group) come last."""
    batch, num_classes = scores.shape
    ranked = scores.argsort(dim=1, descending=True, stable=True)
    others = ranked[ranked != targets[:, None]].view(batch, num_classes - 1)
    return torch.cat([targets[:, None], others[:, : min(rivals, num_classes - 1)]], dim=1)


def class_rows(model: PromptCAM, tokens: Tensor, classes: Tensor, scores: Tensor) -> TargetRows:
    """:class:`TargetRows` of the rows of ``classes`` (B, M) of every image, image-major
    (B * M rows); each row's ``scores`` are its image's unblurred ``scores`` (B, C)."""
    width = classes.shape[1]
    return target_rows(
        model,
        tokens.repeat_interleave(width, 0),
        classes.flatten(),
        scores.repeat_interleave(width, 0),
    )


def score_candidates_in_rows(
    model: PromptCAM, rows: TargetRows, classes: Tensor, scores: Tensor, masks: Tensor
) -> Tensor:
    """Scores (B, K, C) with the heads of ``masks`` (B, K, H) blurred in the rows of every class
    of ``classes`` (B, M) (``rows``: :func:`class_rows` of them); the other classes keep their
    unblurred ``scores`` (B, C), and so do classes at -inf (outside the target's sibling group)."""
    width = classes.shape[1]
    blurred = _row_scores(model, rows, masks.repeat_interleave(width, 0))  # (B * M, K)
    blurred = blurred.unflatten(0, (-1, width)).transpose(1, 2)  # (B, K, M)
    out = scores[:, None].expand(-1, masks.shape[1], -1).clone()
    index = classes[:, None].expand(-1, masks.shape[1], -1)
    kept = out.gather(2, index).isneginf()
    return out.scatter_(2, index, torch.where(kept, float("-inf"), blurred.to(out.dtype)))


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
