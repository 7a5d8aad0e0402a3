"""Baseline saliency maps, the methods Prompt-CAM is compared with (Grad-CAM, Layer-CAM,
Eigen-CAM, attention roll-out), written for ViT tokens, for two models on the same frozen ViT:
a linear probe (:func:`compute_cams`) and the Prompt-CAM model itself
(:func:`compute_prompt_cam_cams`), so that each method can be compared with Prompt-CAM's own
maps within one model.

The CAMs read the *target layer* the way pytorch-grad-cam's ViT recipe does: the output of the
last block's ``norm1`` (its patch tokens, prefix tokens dropped, reshaped to the patch grid is
the "reshape transform"), with the gradient of the explained class's *logit*. For Prompt-CAM
that is the normed context the class prompts attend to in the last block (the image tokens
enter ``s[c]`` only through its keys and values) and the gradient of the score ``s[c]``.

* Grad-CAM (Selvaraju et al. 2017): ``relu(sum_k mean_p(dS/dA_pk) * A_pk)``.
* Layer-CAM (Jiang et al. 2021): ``relu(sum_k relu(dS/dA_pk) * A_pk)``.
* Eigen-CAM (Muhammad & Yeasin 2020): the projection of the centred activations on their first
  principal direction, class-agnostic. The sign of an SVD is arbitrary: it is fixed so that the
  largest absolute value is positive; negatives are then clipped as pytorch-grad-cam does.
* Attention roll-out (Abnar & Zuidema 2020): per block, the heads' mean attention plus the
  identity, rows renormalised, multiplied from the first block to the last; the map is the
  output token's row over the patches. Probe: the pooled token's row (the CLS row, or the mean
  of the patch rows for a mean-pooled probe), class-agnostic. Prompt-CAM: prompts are fresh
  tokens in every block, so the roll-out runs over the image tokens (prefix + patches) alone,
  each block's image-token rows and columns renormalised; the output token is the explained
  class's prompt, whose last-block row (heads' mean, over the image tokens, renormalised) ends
  the product, so this roll-out is class-specific.

Every map is (B, h, w) on the patch grid, non-negative. tests/test_fidelity.py checks Grad-CAM,
Layer-CAM and Eigen-CAM against pytorch-grad-cam on both models.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from timm.layers import Attention
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from promptcam.model.prompt_cam import PromptCAM

__all__ = [
    "CAM_METHODS",
    "LinearProbe",
    "PromptCAMRecording",
    "attention_rollout",
    "compute_cams",
    "compute_prompt_cam_cams",
    "eigen_cam",
    "grad_cam",
    "layer_cam",
    "prompt_cam_rollout",
    "record_prompt_cam",
]

CAM_METHODS: tuple[str, ...] = ("grad_cam", "layer_cam", "eigen_cam", "attention_rollout")


class LinearProbe(nn.Module):
    """A frozen backbone, pooled as the probe was trained, and a linear classifier (B, C).

    ``weight`` (C, D) and ``bias`` (C,) act on the *raw* pooled features: a standardisation
    fitted with the probe is folded in (see :meth:`from_sklearn`).
    """

    def __init__(
        self, backbone: VisionTransformer, weight: Tensor, bias: Tensor, pool: str
    ) -> None:
        super().__init__()
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
        self.backbone = backbone
        self.pool = pool
        self.classifier = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.classifier.weight.copy_(weight)
            self.classifier.bias.copy_(bias)
        self.requires_grad_(False)

    @classmethod
    def from_sklearn(cls, backbone: VisionTransformer, pipeline: object, pool: str) -> LinearProbe:
        """From ``make_pipeline(StandardScaler(), LogisticRegression())`` (promptcam.evaluation.linear_probe).

        Standardising then ``W x + b`` is ``(W / scale) x + (b - W (mean / scale))``. A binary
        LogisticRegression has one row ``z``; the logits ``(-z/2, z/2)`` give the same
        probabilities and predictions, with a gradient for either class.
        """
        scaler, logistic = pipeline[0], pipeline[-1]
        weight = np.asarray(logistic.coef_, dtype=np.float64)
        bias = np.asarray(logistic.intercept_, dtype=np.float64)
        if weight.shape[0] == 1:
            weight, bias = (
                np.concatenate([-weight / 2, weight / 2]),
                np.concatenate([-bias / 2, bias / 2]),
            )
        mean = np.asarray(scaler.mean_, dtype=np.float64)
        scale = np.asarray(scaler.scale_, dtype=np.float64)
        folded = weight / scale
        return cls(
            backbone,
            torch.as_tensor(folded, dtype=torch.float32),
            torch.as_tensor(bias - folded @ mean, dtype=torch.float32),
            pool,
        )

    def pooled(self, tokens: Tensor) -> Tensor:
        """Normed tokens (B, prefix + patches, D) -> features (B, D)."""
        if self.pool == "cls":
            return tokens[:, 0]
        return tokens[:, self.backbone.num_prefix_tokens :].mean(dim=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pooled(self.backbone.forward_features(x)))


@dataclass
class Recording:
    """What one traced forward of a :class:`LinearProbe` recorded."""

    logits: Tensor  # (B, C)
    activations: Tensor  # (B, prefix + patches, D): the last block's norm1 output
    attentions: list[Tensor]  # per block, (B, heads, T, T) softmax weights


@contextlib.contextmanager
def _recorder(backbone: VisionTransformer, into: dict[str, list[Tensor]]) -> Iterator[None]:
    """Record the last ``norm1`` output and every block's attention weights while active.

    timm's fused attention never materialises the weights; the explicit path passes them
    through ``attn_drop`` (identity in eval mode), where a hook sees them.
    """
    handles, fused = [], [block.attn.fused_attn for block in backbone.blocks]
    try:
        for block in backbone.blocks:
            block.attn.fused_attn = False
            handles.append(
                block.attn.attn_drop.register_forward_hook(
                    lambda _m, _i, output: into["attentions"].append(output)
                )
            )
        handles.append(
            backbone.blocks[-1].norm1.register_forward_hook(
                lambda _m, _i, output: into["activations"].append(output)
            )
        )
        yield
    finally:
        for handle in handles:
            handle.remove()
        for block, was_fused in zip(backbone.blocks, fused, strict=True):
            block.attn.fused_attn = was_fused


def record(probe: LinearProbe, images: Tensor, with_grad: bool = True) -> Recording:
    """A forward of ``probe`` that keeps what the CAMs need (the autograd graph if asked)."""
    into: dict[str, list[Tensor]] = {"attentions": [], "activations": []}
    with _recorder(probe.backbone, into), torch.set_grad_enabled(with_grad):
        if with_grad:
            # Gradients must reach the activations although every weight is frozen.
            images = images.detach().requires_grad_(True)
        logits = probe(images)
    return Recording(logits, into["activations"][-1], into["attentions"])


def _patch_grid(activations: Tensor, num_prefix: int, grid: tuple[int, int]) -> Tensor:
    """The reshape transform: (B, prefix + patches, D) -> (B, patches, D) patch tokens."""
    patches = activations[:, num_prefix:]
    if patches.shape[1] != grid[0] * grid[1]:
        raise ValueError(f"{patches.shape[1]} patch tokens for a {grid} grid")
    return patches


def grad_cam(activations: Tensor, gradients: Tensor) -> Tensor:
    """Patch tokens and their gradients (B, P, D) -> (B, P)."""
    weights = gradients.mean(dim=1, keepdim=True)
    return (weights * activations).sum(dim=-1).clamp_min(0)


def layer_cam(activations: Tensor, gradients: Tensor) -> Tensor:
    """Patch tokens and their gradients (B, P, D) -> (B, P)."""
    return (gradients.clamp_min(0) * activations).sum(dim=-1).clamp_min(0)


def eigen_cam(activations: Tensor) -> Tensor:
    """Patch tokens (B, P, D) -> (B, P), the first principal component's scores, clipped."""
    centred = activations.double() - activations.double().mean(dim=1, keepdim=True)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    projection = (centred @ vh[:, 0, :, None]).squeeze(-1)
    peak = projection.gather(1, projection.abs().argmax(dim=1, keepdim=True))
    return (projection * torch.where(peak < 0, -1.0, 1.0)).clamp_min(0).to(activations.dtype)


def attention_rollout(attentions: list[Tensor], num_prefix: int, pool: str) -> Tensor:
    """Per-block attention weights (B, heads, T, T) -> (B, patches)."""
    rollout = None
    for weights in attentions:
        mixed = weights.double().mean(dim=1)
        mixed = mixed + torch.eye(mixed.shape[-1], dtype=mixed.dtype, device=mixed.device)
        mixed = mixed / mixed.sum(dim=-1, keepdim=True)
        rollout = mixed if rollout is None else mixed @ rollout
    rows = rollout[:, 0] if pool == "cls" else rollout[:, num_prefix:].mean(dim=1)
    return rows[:, num_prefix:].to(attentions[0].dtype)


def _check_methods(methods: tuple[str, ...]) -> None:
    unknown = set(methods) - set(CAM_METHODS)
    if unknown:
        raise ValueError(f"unknown CAM methods {sorted(unknown)}; known: {CAM_METHODS}")


def compute_cams(
    probe: LinearProbe, images: Tensor, targets: Tensor, methods: tuple[str, ...] = CAM_METHODS
) -> dict[str, Tensor]:
    """``{method: (B, h, w) map}`` explaining ``targets`` (B,) for each method in ``methods``."""
    _check_methods(methods)
    backbone = probe.backbone
    grid = tuple(backbone.patch_embed.grid_size)
    num_prefix = backbone.num_prefix_tokens
    needs_grad = bool({"grad_cam", "layer_cam"} & set(methods))
    recording = record(probe, images, with_grad=needs_grad)
    patches = _patch_grid(recording.activations, num_prefix, grid)
    builders: dict[str, Callable[[], Tensor]] = {
        "eigen_cam": lambda: eigen_cam(patches.detach()),
        "attention_rollout": lambda: attention_rollout(
            [a.detach() for a in recording.attentions], num_prefix, probe.pool
        ),
    }
    if needs_grad:
        # One backward for all images: each image's logit depends on that image alone.
        explained = recording.logits.gather(1, targets[:, None]).sum()
        (gradients,) = torch.autograd.grad(explained, recording.activations)
        gradients = _patch_grid(gradients, num_prefix, grid)
        builders["grad_cam"] = lambda: grad_cam(patches.detach(), gradients)
        builders["layer_cam"] = lambda: layer_cam(patches.detach(), gradients)
    return {name: builders[name]().reshape(-1, *grid).detach() for name in methods}


# ----------------------------------------------------------------------------- Prompt-CAM


@dataclass
class PromptCAMRecording:
    """What one traced forward of a :class:`PromptCAM` recorded: every block's ``norm1``
    output. The last block norms two token sets: the class prompts' (its queries) and the
    context they attend to (keys and values), the target layer of the CAMs."""

    scores: Tensor  # (B, C)
    grid: tuple[int, int]  # the images' patch grid
    block_inputs: list[Tensor]  # blocks 1..N-1: (B, tokens, D) normed inputs
    queries: Tensor  # (B or 1, C, D): the class rows' normed tokens in the last block
    context: Tensor  # (B, tokens, D): the last block's normed keys/values; a leaf with grad


@contextlib.contextmanager
def _prompt_cam_recorder(
    model: PromptCAM, into: list[list[Tensor]], with_grad: bool
) -> Iterator[None]:
    """Record every block's ``norm1`` outputs (one list per block) while active. With
    ``with_grad``, the last block's are replaced by leaves that require grad: the gradient of a
    score at them needs no backward through blocks 1..N-1."""

    def hook(index: int) -> Callable[[nn.Module, tuple, Tensor], Tensor]:
        last = index == len(model.backbone.blocks) - 1

        def keep(_module: nn.Module, _inputs: tuple, output: Tensor) -> Tensor:
            if last and with_grad:
                output = output.detach().requires_grad_(True)
            into[index].append(output)
            return output

        return keep

    handles = [
        block.norm1.register_forward_hook(hook(index))
        for index, block in enumerate(model.backbone.blocks)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def record_prompt_cam(
    model: PromptCAM, images: Tensor, with_grad: bool = True
) -> PromptCAMRecording:
    """A forward of ``model`` that keeps what the CAMs need (the last block's graph if asked)."""
    depth = len(model.backbone.blocks)
    into: list[list[Tensor]] = [[] for _ in range(depth)]
    with _prompt_cam_recorder(model, into, with_grad), torch.set_grad_enabled(with_grad):
        scores = model(images)
    if any(len(calls) != 1 for calls in into[:-1]) or len(into[-1]) != 2:
        raise RuntimeError(
            f"norm1 calls per block {[len(calls) for calls in into]}: expected one per block "
            "and two in the last (queries, then context); PromptCAM's forward has changed"
        )
    # PromptCAM._last_block_inputs norms the class rows' tokens first, the context second.
    queries, context = into[-1]
    grid = model.patch_grid_for(*images.shape[-2:])
    return PromptCAMRecording(scores, grid, [calls[0] for calls in into[:-1]], queries, context)


def _attention_weights(attn: Attention, queries: Tensor, keys: Tensor) -> Tensor:
    """Softmax weights (B, heads, Tq, Tk) of normed tokens ``queries`` over normed ``keys``,
    as ``attn`` computes them (its qkv projection, q/k norms and scale)."""
    dim = attn.qkv.weight.shape[0] // 3
    weight, bias = attn.qkv.weight, attn.qkv.bias

    def project(x: Tensor, part: int) -> Tensor:
        rows = slice(part * dim, (part + 1) * dim)
        out = torch.nn.functional.linear(x, weight[rows], None if bias is None else bias[rows])
        return out.unflatten(-1, (attn.num_heads, -1)).transpose(-3, -2)

    q, k = attn.q_norm(project(queries, 0)), attn.k_norm(project(keys, 1))
    batch = max(q.shape[0], k.shape[0])
    logits = (q * attn.scale).expand(batch, -1, -1, -1) @ k.transpose(-2, -1)
    return logits.softmax(dim=-1)


def _renormalised(weights: Tensor) -> Tensor:
    return weights / weights.sum(dim=-1, keepdim=True)


def prompt_cam_rollout(model: PromptCAM, recording: PromptCAMRecording, targets: Tensor) -> Tensor:
    """Class-specific roll-out (B, patches) of ``targets`` (B,); see the module docs."""
    backbone = model.backbone
    num_patches = recording.grid[0] * recording.grid[1]
    image_tokens = backbone.num_prefix_tokens + num_patches
    rollout = None
    for block, tokens in zip(backbone.blocks[:-1], recording.block_inputs, strict=True):
        weights = _attention_weights(block.attn, tokens, tokens).double()
        mixed = weights[..., -image_tokens:, -image_tokens:].mean(dim=1)
        mixed = _renormalised(
            mixed + torch.eye(image_tokens, dtype=mixed.dtype, device=mixed.device)
        )
        rollout = mixed if rollout is None else mixed @ rollout
    last = _attention_weights(
        backbone.blocks[-1].attn, recording.queries.detach(), recording.context.detach()
    ).double()
    batch = torch.arange(len(targets), device=targets.device)
    row = _renormalised(last[batch, :, targets, -image_tokens:].mean(dim=1))  # (B, image tokens)
    if rollout is not None:
        row = (row[:, None] @ rollout)[:, 0]
    return row[:, -num_patches:].to(recording.context.dtype)


def compute_prompt_cam_cams(
    model: PromptCAM, images: Tensor, targets: Tensor, methods: tuple[str, ...] = CAM_METHODS
) -> dict[str, Tensor]:
    """``{method: (B, h, w) map}`` of the Prompt-CAM model itself, explaining the scores
    ``s[targets]`` (B,), for each method in ``methods``."""
    _check_methods(methods)
    needs_grad = bool({"grad_cam", "layer_cam"} & set(methods))
    recording = record_prompt_cam(model, images, with_grad=needs_grad)
    grid = recording.grid
    num_patches = grid[0] * grid[1]
    # Every token layout ends with the patches: [prompts or carried prompts, prefix, patches].
    patches = recording.context[:, -num_patches:]
    builders: dict[str, Callable[[], Tensor]] = {
        "eigen_cam": lambda: eigen_cam(patches.detach()),
        "attention_rollout": lambda: prompt_cam_rollout(model, recording, targets),
    }
    if needs_grad:
        # One backward for all images: each image's score depends on that image alone.
        explained = recording.scores.gather(1, targets[:, None]).sum()
        (gradients,) = torch.autograd.grad(explained, recording.context)
        gradients = gradients[:, -num_patches:]
        builders["grad_cam"] = lambda: grad_cam(patches.detach(), gradients)
        builders["layer_cam"] = lambda: layer_cam(patches.detach(), gradients)
    return {name: builders[name]().reshape(-1, *grid).detach() for name in methods}
