"""What the demo backbone is pre-trained on: fresh organisms, their targets, the losses.

Prompt-CAM explains what a *pre-trained* backbone already sees; a frozen random ViT sees
nothing. Real analyses bring DINO, DINOv2 or BioCLIP weights; the bundled demo has none to
download, so this module makes one from the demo generator's geometry alone:

- dense target: for every patch, the share of each body part (background, body, tail,
  dorsal fin, head, marking, pelvic fin) in each cell of a ``sub_grid`` x ``sub_grid``
  subdivision of the patch, so patch tokens must encode part *shapes* at sub-patch detail;
- global target from the CLS token: heading (cos, sin), flip, centre and size.
- optional: the shape of each part from the generator's vocabulary (attributes), the
  pose-free part map (from the pooled tokens), and *locality*: an adversarial probe that must
  not be able to read a part's shape from the tokens entering the last block that do not show
  that part, so that Prompt-CAM's class prompts find each trait only where it is.

Images come from :func:`promptcam.demo.taxa.random_spec`, i.e. any combination of trait
variants, drawn from a seed stream disjoint from the demo dataset's. The taxonomy labels
are never used.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.func import functional_call
from torch.utils.data import IterableDataset, get_worker_info

from promptcam.demo.drawing import render_organism
from promptcam.demo.taxa import (
    DORSAL,
    DORSAL_SHAPES,
    MARK_PLACES,
    MARK_SHAPES,
    MARK_SIDES,
    MARKING,
    PART_NAMES,
    TAIL,
    TAIL_SHAPES,
    OrganismSpec,
    random_spec,
)

# Disjoint from the demo dataset's seeds, which are SeedSequence([seed, species, replicate]).
_PRETRAIN_STREAM = 0x5EED_F00D

# The generator's shape vocabulary, per trait; stage 2 predicts these per patch and per image.
_TRAIT_VARIANTS = {
    "tail": TAIL_SHAPES,
    "dorsal": DORSAL_SHAPES,
    "mark_place": MARK_PLACES,
    "mark_shape": MARK_SHAPES,
    "mark_side": MARK_SIDES,
}

BACKBONE_TIMM_NAME = "vit_tiny_patch16_224"  # architecture family; size set by `vit_kwargs`

PIXEL_MEAN = (0.5, 0.5, 0.5)

PIXEL_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class PretrainConfig:
    image_size: int = 96
    patch_size: int = 12
    embed_dim: int = 128
    depth: int = 6
    num_heads: int = 8
    sub_grid: int = 4
    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 150
    seed: int = 1234
    num_workers: int = 1
    threads: int = 1
    checkpoint_every: int = 250
    pose_weight: float = 1.0
    # Pose-free part map, predicted from the mean of the patch tokens (the linear probe's
    # pooling): the organism's part geometry in its own frame, on a rows x cols grid.
    canonical_weight: float = 0.0
    canonical_rows: int = 30
    canonical_cols: int = 40
    # Weight each canonical cell by the entropy of its mean part shares over a fixed sample of
    # the stream: the loss is then spent where organisms differ (fin, tail and marking
    # outlines), not on the margin that is background in every organism.
    canonical_focus: bool = False
    # Stage 2: also name each part's shape from the generator's vocabulary (forked tail,
    # dome fin, ring marking at the rear, ...), per patch and per image, on organisms with
    # random combinations of shapes: part attributes, never the demo's taxa.
    attribute_weight: float = 0.0
    # Keep each trait's shape out of the tokens that do not show it, at the last block's
    # input (what Prompt-CAM's class prompts attend to). A probe learns to read the shape
    # from those tokens; the backbone is trained to leave it guessing (uniform). Otherwise
    # the shape spreads over every token and a prompt can read it anywhere, so its
    # attention need not point at the trait.
    locality_weight: float = 0.0
    init_from: str | None = None  # backbone weights (e.g. stage 1's export) to start from

    def vit_kwargs(self) -> dict[str, Any]:
        return {
            "img_size": self.image_size,
            "patch_size": self.patch_size,
            "embed_dim": self.embed_dim,
            "depth": self.depth,
            "num_heads": self.num_heads,
        }


def build_vit(config: PretrainConfig) -> VisionTransformer:
    return VisionTransformer(num_classes=0, **config.vit_kwargs())


class FreshOrganisms(IterableDataset):
    """Endless, deterministic stream of freshly generated organisms with geometry targets.

    Sample ``i`` depends only on (seed, i), so a resumed run sees the same images as an
    uninterrupted one, whatever the number of workers.
    """

    def __init__(self, config: PretrainConfig, start_index: int = 0) -> None:
        self.config = config
        self.start_index = start_index

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        index = self.start_index + worker
        while True:
            yield self.sample(index)
            index += n_workers

    def sample(self, index: int) -> tuple[torch.Tensor, ...]:
        rng = np.random.default_rng(
            np.random.SeedSequence([self.config.seed, _PRETRAIN_STREAM, index])
        )
        return self.view(random_spec(rng), rng)

    def view(self, spec: OrganismSpec, rng: np.random.Generator) -> tuple[torch.Tensor, ...]:
        """image, part map, pose target, attribute indices, canonical part shares (empty when
        the config does not train on them, so the loader does not draw them for nothing)."""
        grid = (self.config.canonical_rows, self.config.canonical_cols)
        wanted = self.config.canonical_weight > 0
        rendering = render_organism(
            spec, self.config.image_size, rng, canonical_grid=grid if wanted else None
        )
        image = torch.from_numpy(rendering.image).permute(2, 0, 1).contiguous()
        parts = torch.from_numpy(rendering.parts.astype(np.int64))
        pose = rendering.pose
        size = self.config.image_size
        heading = pose.heading()
        pose_target = torch.tensor(
            [
                math.cos(heading),
                math.sin(heading),
                1.0 if pose.flipped else -1.0,
                2.0 * pose.centre_x / size - 1.0,
                2.0 * pose.centre_y / size - 1.0,
                4.0 * (pose.length / size - 0.6),
            ],
            dtype=torch.float32,
        )
        attributes = torch.tensor(
            [variants.index(getattr(spec, trait)) for trait, variants in _TRAIT_VARIANTS.items()]
        )
        canonical = torch.from_numpy(rendering.canonical_parts) if wanted else torch.empty(0)
        return image, parts, pose_target, attributes, canonical


def normalise(images_uint8: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(PIXEL_MEAN, device=images_uint8.device).view(1, 3, 1, 1)
    std = torch.tensor(PIXEL_STD, device=images_uint8.device).view(1, 3, 1, 1)
    return (images_uint8.float() / 255.0 - mean) / std


def part_shares(parts: torch.Tensor, patch_size: int, sub_grid: int) -> torch.Tensor:
    """(B, H, W) part indices -> (B, patches, sub_grid*sub_grid, parts) area shares."""
    n_parts = len(PART_NAMES)
    one_hot = F.one_hot(parts, n_parts).permute(0, 3, 1, 2).float()
    cell = patch_size // sub_grid
    shares = F.avg_pool2d(one_hot, kernel_size=cell)  # (B, P, H/cell, W/cell)
    batch, _, rows, cols = shares.shape
    grid_rows, grid_cols = rows // sub_grid, cols // sub_grid
    shares = shares.view(batch, n_parts, grid_rows, sub_grid, grid_cols, sub_grid)
    shares = shares.permute(0, 2, 4, 3, 5, 1)  # B, gr, gc, sr, sc, P
    return shares.reshape(batch, grid_rows * grid_cols, sub_grid * sub_grid, n_parts)


def canonical_cell_weights(config: PretrainConfig, samples: int = 512) -> torch.Tensor:
    """(rows * cols,) entropy of each canonical cell's mean part shares, scaled to mean 1.

    Estimated from the first ``samples`` organisms of a stream disjoint from training's, so
    it is fixed by the config alone.
    """
    stream = FreshOrganisms(replace(config, seed=config.seed + 1, canonical_weight=1.0))
    mean = torch.stack([stream.sample(index)[-1] for index in range(samples)]).mean(0)
    entropy = -(mean * mean.clamp_min(1e-12).log()).sum(-1).flatten()
    return entropy / entropy.mean()


def last_block_tokens(backbone: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """Normalised images -> the tokens entering the last block (B, prefix + patches, D): what
    Prompt-CAM's class prompts attend to. Norm and last block on top give forward_features."""
    x = backbone.patch_embed(images)
    x = backbone.norm_pre(backbone.patch_drop(backbone._pos_embed(x)))
    return backbone.blocks[:-1](x)


class PretextModel(nn.Module):
    """The backbone plus the read-outs the pretext tasks train through (and the leak probe)."""

    def __init__(self, config: PretrainConfig) -> None:
        super().__init__()
        if config.patch_size % config.sub_grid:
            raise ValueError("patch_size must be a multiple of sub_grid")
        self.config = config
        self.backbone = build_vit(config)
        cells = config.sub_grid * config.sub_grid
        self.dense_head = nn.Linear(config.embed_dim, cells * len(PART_NAMES))
        self.pose_head = nn.Linear(config.embed_dim, 6)
        n_variants = sum(len(v) for v in _TRAIT_VARIANTS.values())
        self.patch_attribute_head = nn.Linear(config.embed_dim, n_variants)
        self.image_attribute_head = nn.Linear(config.embed_dim, n_variants)
        self.leak_probe = nn.Sequential(
            nn.Linear(config.embed_dim, config.embed_dim),
            nn.GELU(),
            nn.Linear(config.embed_dim, n_variants),
        )
        canonical_cells = config.canonical_rows * config.canonical_cols
        self.canonical_head = nn.Linear(config.embed_dim, canonical_cells * len(PART_NAMES))
        weights = canonical_cell_weights(config) if config.canonical_focus else None
        self.register_buffer(
            "canonical_cell_weights",
            torch.ones(canonical_cells) if weights is None else weights,
            persistent=False,
        )

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        last_block_input = last_block_tokens(self.backbone, images)
        tokens = self.backbone.norm(self.backbone.blocks[-1](last_block_input))
        prefix = self.backbone.num_prefix_tokens
        patches = tokens[:, prefix:]
        cells = self.config.sub_grid * self.config.sub_grid
        dense = self.dense_head(patches).view(
            patches.shape[0], patches.shape[1], cells, len(PART_NAMES)
        )
        pooled = patches.mean(1)
        return {
            "dense": dense,
            "pose": self.pose_head(tokens[:, 0]),
            "patch_attributes": self.patch_attribute_head(patches),
            # The same pooling as the linear probe's: the mean of the patch tokens.
            "image_attributes": self.image_attribute_head(pooled),
            "canonical": self.canonical_head(pooled).view(pooled.shape[0], -1, len(PART_NAMES)),
            "last_block_input": last_block_input,
        }


def pretext_losses(
    model: PretextModel,
    images: torch.Tensor,
    parts: torch.Tensor,
    pose: torch.Tensor,
    attributes: torch.Tensor,
    canonical: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, float]]:
    out = model(normalise(images))
    target = part_shares(parts, model.config.patch_size, model.config.sub_grid)
    dense_loss = -(target * F.log_softmax(out["dense"].float(), dim=-1)).sum(-1).mean()
    pose_loss = F.mse_loss(out["pose"].float(), pose)
    cell_accuracy = (out["dense"].argmax(-1) == target.argmax(-1)).float().mean()
    loss = dense_loss + model.config.pose_weight * pose_loss
    canonical_loss = torch.zeros(())
    if model.config.canonical_weight > 0:
        canonical_log_p = F.log_softmax(out["canonical"].float(), dim=-1)
        canonical_cross_entropy = -(canonical.flatten(1, 2) * canonical_log_p).sum(-1)
        canonical_loss = (canonical_cross_entropy * model.canonical_cell_weights).mean()
        loss = loss + model.config.canonical_weight * canonical_loss
    attribute_loss = torch.zeros(())
    if model.config.attribute_weight > 0:
        attribute_loss = _attribute_loss(out, attributes, target.mean(2))
        loss = loss + model.config.attribute_weight * attribute_loss
    locality_loss, leak_accuracy = torch.zeros(()), torch.zeros(())
    if model.config.locality_weight > 0:
        probe_loss, locality_loss, leak_accuracy = _locality_losses(
            model, out["last_block_input"], attributes, target.mean(2)
        )
        loss = loss + probe_loss + model.config.locality_weight * locality_loss
    return loss, {
        "loss": float(loss.detach()),
        "dense_loss": float(dense_loss.detach()),
        "pose_loss": float(pose_loss.detach()),
        "attribute_loss": float(attribute_loss.detach()),
        "canonical_loss": float(canonical_loss.detach()),
        "locality_loss": float(locality_loss.detach()),
        "leak_accuracy": float(leak_accuracy),
        "cell_accuracy": float(cell_accuracy),
    }


# The body part that shows each trait, and the least share of a patch it must cover there.
_TRAIT_PARTS = {
    "tail": TAIL,
    "dorsal": DORSAL,
    "mark_place": MARKING,
    "mark_shape": MARKING,
    "mark_side": MARKING,
}

_MIN_PART_SHARE = 0.1


def _attribute_loss(
    out: dict[str, torch.Tensor], attributes: torch.Tensor, patch_shares: torch.Tensor
) -> torch.Tensor:
    """Cross-entropy of each trait's shape, per image and on the patches showing that part."""
    losses = []
    offset = 0
    for column, (trait, variants) in enumerate(_TRAIT_VARIANTS.items()):
        width = len(variants)
        label = attributes[:, column]
        image_logits = out["image_attributes"][:, offset : offset + width].float()
        losses.append(F.cross_entropy(image_logits, label))
        patch_logits = out["patch_attributes"][..., offset : offset + width].float()
        shows_part = patch_shares[..., _TRAIT_PARTS[trait]] >= _MIN_PART_SHARE
        patch_labels = torch.where(
            shows_part, label[:, None], torch.full_like(shows_part, -100, dtype=torch.long)
        )
        if shows_part.any():
            losses.append(
                F.cross_entropy(
                    patch_logits.flatten(0, 1), patch_labels.flatten(), ignore_index=-100
                )
            )
        offset += width
    return torch.stack(losses).mean()


def _locality_losses(
    model: PretextModel,
    tokens: torch.Tensor,
    attributes: torch.Tensor,
    patch_shares: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(probe loss, locality loss, probe accuracy) on the tokens that do not show a trait.

    ``tokens`` (B, prefix + P, D) enter the last block; prefix tokens (CLS) show no part. The
    probe learns from detached tokens; the locality loss (cross-entropy to the uniform
    guess) reaches the backbone through a detached copy of the probe, so each side only
    moves its own parameters.
    """
    prefix = model.backbone.num_prefix_tokens
    logits = model.leak_probe(tokens.detach()).float()
    frozen = {name: value.detach() for name, value in model.leak_probe.named_parameters()}
    blind_logits = functional_call(model.leak_probe, frozen, (tokens,)).float()
    probe_losses, locality_losses, hits = [], [], []
    offset = 0
    for column, (trait, variants) in enumerate(_TRAIT_VARIANTS.items()):
        width = len(variants)
        shows_part = patch_shares[..., _TRAIT_PARTS[trait]] > 0
        hides = F.pad(~shows_part, (prefix, 0), value=True)
        if hides.any():
            label = attributes[:, column, None].expand_as(hides)[hides]
            probe_logits = logits[..., offset : offset + width][hides]
            probe_losses.append(F.cross_entropy(probe_logits, label))
            hits.append((probe_logits.argmax(-1) == label).float().mean())
            blind = F.log_softmax(blind_logits[..., offset : offset + width][hides], dim=-1)
            locality_losses.append(-blind.mean(-1).mean() - math.log(width))
        offset += width
    if not probe_losses:
        zero = tokens.sum() * 0
        return zero, zero, zero.detach()
    return (
        torch.stack(probe_losses).mean(),
        torch.stack(locality_losses).mean(),
        torch.stack(hits).mean().detach(),
    )
