"""Baseline saliency maps for a linear probe on a frozen timm ViT: the methods Prompt-CAM is
compared with (Grad-CAM, Layer-CAM, Eigen-CAM, attention roll-out), written for ViT tokens.

The CAMs read the *target layer* the way pytorch-grad-cam's ViT recipe does: the output of the
last block's ``norm1`` (its patch tokens, prefix tokens dropped, reshaped to the patch grid is
the "reshape transform"), with the gradient of the explained class's *logit*.

* Grad-CAM (Selvaraju et al. 2017): ``relu(sum_k mean_p(dS/dA_pk) * A_pk)``.
* Layer-CAM (Jiang et al. 2021): ``relu(sum_k relu(dS/dA_pk) * A_pk)``.
* Eigen-CAM (Muhammad & Yeasin 2020): the projection of the centred activations on their first
  principal direction, class-agnostic. The sign of an SVD is arbitrary: it is fixed so that the
  largest absolute value is positive; negatives are then clipped as pytorch-grad-cam does.
* Attention roll-out (Abnar & Zuidema 2020): per block, the heads' mean attention plus the
  identity, rows renormalised, multiplied from the first block to the last; the map is the
  pooled token's row over the patches (the CLS row, or the mean of the patch rows for a
  mean-pooled probe). Class-agnostic.

Every map is (B, h, w) on the patch grid, non-negative.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

__all__ = [
    "CAM_METHODS",
    "LinearProbe",
    "attention_rollout",
    "compute_cams",
    "eigen_cam",
    "grad_cam",
    "layer_cam",
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


def compute_cams(
    probe: LinearProbe, images: Tensor, targets: Tensor, methods: tuple[str, ...] = CAM_METHODS
) -> dict[str, Tensor]:
    """``{method: (B, h, w) map}`` explaining ``targets`` (B,) for each method in ``methods``."""
    unknown = set(methods) - set(CAM_METHODS)
    if unknown:
        raise ValueError(f"unknown CAM methods {sorted(unknown)}; known: {CAM_METHODS}")
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
