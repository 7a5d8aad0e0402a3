"""Import models trained with the reference implementation (Imageomics/Prompt_CAM).

A reference ``model.pt`` is ``{"model_state_dict": sd}``: timm ViT keys for the whole backbone,
``vpt.prompt_embeddings`` (depth, C, D), ``head.weight`` (1, D) and ``head.bias`` (1,). The
conversion writes two files:

* ``OUT``: a regular Prompt-CAM checkpoint (:func:`promptcam.model.checkpoint.save_checkpoint`) of the
  reference layout, deep variant, with the reference's test preprocessing (bilinear resize to the
  backbone's input size, 224 for the paper's models; mean = std = 0.5);
* ``OUT`` with suffix ``.backbone.pt``: the reference's backbone tensors as a plain timm state
  dict, which ``OUT`` references by path and sha256 like any other backbone weight file. Kept
  apart so that every checkpoint has the same form and several conversions of models sharing a
  backbone can point at one file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from promptcam.io import atomic_path, sha256_file
from promptcam.model.checkpoint import read_torch_file, save_checkpoint
from promptcam.model.prompt_cam import PromptCAM
from promptcam.model.spec import BackboneSpec, Preprocessing, PromptCAMConfig

__all__ = ["REFERENCE_MEAN_STD", "backbone_weights_path", "convert_reference_checkpoint"]

REFERENCE_MEAN_STD = (0.5, 0.5, 0.5)
_PROMPTS = "vpt.prompt_embeddings"
_HEAD = ("head.weight", "head.bias")


def backbone_weights_path(out_path: str | os.PathLike) -> Path:
    """Where :func:`convert_reference_checkpoint` puts the backbone of ``out_path``."""
    return Path(out_path).with_suffix(".backbone.pt")


def convert_reference_checkpoint(
    in_path: str | os.PathLike,
    out_path: str | os.PathLike,
    backbone_name: str,
    backbone_kwargs: Mapping[str, Any] | None = None,
    label_names: Sequence[str] | None = None,
) -> Path:
    """Convert a reference ``model.pt``; returns the path of the backbone weight file.

    Args:
        in_path: The reference checkpoint.
        out_path: The Prompt-CAM checkpoint to write.
        backbone_name: timm name of the backbone architecture, e.g. ``vit_base_patch16_224.dino``
            (or ``vit_custom`` with ``backbone_kwargs``).
        backbone_kwargs: Extra timm arguments, e.g. ``{"img_size": 224}`` for DINOv2.
        label_names: One per class, in the reference's class order; ``class_<i>`` by default.
    """
    payload = read_torch_file(in_path, "a reference checkpoint")
    if not isinstance(payload, dict) or "model_state_dict" not in payload:
        raise ValueError(
            f"{in_path} is not a reference checkpoint ({{'model_state_dict': ...}}, the "
            "model.pt of Imageomics/Prompt_CAM)"
        )
    state = dict(payload["model_state_dict"])
    missing = [key for key in (_PROMPTS, *_HEAD) if key not in state]
    if missing:
        raise ValueError(f"{in_path} is not a Prompt-CAM reference checkpoint: no {missing}")
    prompts = state.pop(_PROMPTS)
    head_weight, head_bias = (state.pop(key) for key in _HEAD)
    depth, num_classes, dim = prompts.shape

    backbone_path = backbone_weights_path(out_path)
    with atomic_path(backbone_path) as tmp:
        torch.save(state, tmp)
    spec = BackboneSpec(
        backbone_name, weights=str(backbone_path), kwargs=dict(backbone_kwargs or {})
    )
    model = PromptCAM(spec, PromptCAMConfig(num_classes=num_classes))
    if model.prompt_embeddings.shape != prompts.shape:
        raise ValueError(
            f"{in_path} has prompts for {depth} blocks of width {dim}; "
            f"{backbone_name} expects {tuple(model.prompt_embeddings.shape)}"
        )
    with torch.no_grad():
        model.prompt_embeddings.copy_(prompts)
        model.head.weight.copy_(head_weight)
        model.head.bias.copy_(head_bias)

    names = [f"class_{i}" for i in range(num_classes)] if label_names is None else label_names
    preprocessing = Preprocessing(
        img_size=tuple(model.backbone.patch_embed.img_size),
        mean=REFERENCE_MEAN_STD,
        std=REFERENCE_MEAN_STD,
        interpolation="bilinear",
    )
    save_checkpoint(
        out_path,
        model,
        label_names=names,
        extra={"converted_from": str(in_path), "source_sha256": sha256_file(in_path)},
        preprocessing=preprocessing,
    )
    return backbone_path
