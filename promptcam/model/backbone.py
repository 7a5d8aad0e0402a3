"""The frozen timm VisionTransformer under Prompt-CAM."""

from __future__ import annotations

import os
from typing import Any

import timm
import torch
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer

from promptcam.model.spec import CUSTOM_VIT, BackboneSpec


def build_backbone(
    name: str,
    weights: str | os.PathLike | None = None,
    img_size: int | None = None,
    **timm_kwargs: Any,
) -> VisionTransformer:
    """Create a timm VisionTransformer without classifier, random init when ``weights`` is None.

    A registered timm name loads ``weights`` through timm's pretrained path, whose checkpoint
    filter converts DINOv2, CLIP and BioCLIP originals (``checkpoint_path=`` would not).
    ``name == "vit_custom"`` builds ``VisionTransformer(**timm_kwargs)`` directly (a small demo
    ViT) and loads ``weights`` as a plain state dict.
    """
    if img_size is not None:
        timm_kwargs["img_size"] = img_size
    if name == CUSTOM_VIT:
        model = VisionTransformer(num_classes=0, **timm_kwargs)
        if weights is not None:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            # A pretext-task classifier is replaced by Prompt-CAM's own head.
            state = {k: v for k, v in state.items() if not k.startswith("head.")}
            model.load_state_dict(state)
    else:
        model = timm.create_model(
            name,
            pretrained=weights is not None,
            pretrained_cfg_overlay=None if weights is None else dict(file=str(weights)),
            num_classes=0,
            **timm_kwargs,
        )
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"{name!r} is a {type(model).__name__}, not a timm VisionTransformer")
    return model


def backbone_from_spec(spec: BackboneSpec) -> VisionTransformer:
    """The backbone ``spec`` describes; a random initialisation is seeded by ``spec.seed``."""
    if spec.weights is not None:
        return build_backbone(spec.name, spec.weights, **spec.kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        return build_backbone(spec.name, None, **spec.kwargs)


def _check_supported(backbone: VisionTransformer) -> None:
    for index, block in enumerate(backbone.blocks):
        if type(block) is not Block or type(block.attn) is not Attention:
            raise NotImplementedError(
                f"block {index} is {type(block).__name__} with {type(block.attn).__name__}; "
                "Prompt-CAM supports timm's pre-norm Block with the standard Attention"
            )
        if getattr(block.attn, "gate", None) is not None:
            raise NotImplementedError("gated attention is not supported")
