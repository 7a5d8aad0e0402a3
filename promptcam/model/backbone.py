"""The frozen timm VisionTransformer under Prompt-CAM: built from a weight file as users
download it, checked, and the preprocessing its weights expect."""

from __future__ import annotations

import os
import warnings
from typing import Any

import timm
import torch
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer, checkpoint_filter_fn

from promptcam.model.families import CUSTOM_VIT, UnsupportedBackboneError, family_preprocessing
from promptcam.model.spec import BackboneSpec, Preprocessing
from promptcam.model.weight_files import (
    BackboneWeightsError,
    architecture_differences,
    key_differences,
    mismatch_error,
    read_state_dict,
    without_classifier,
)

__all__ = [
    "CUSTOM_PREPROCESSING",
    "backbone_from_spec",
    "build_backbone",
    "resolve_preprocessing",
]

# A vit_custom backbone has no family; the project's own ViTs (the demo's pre-training) use these.
CUSTOM_PREPROCESSING = {
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
    "interpolation": "bilinear",
}


def build_backbone(
    name: str,
    weights: str | os.PathLike | None = None,
    img_size: int | None = None,
    **timm_kwargs: Any,
) -> VisionTransformer:
    """Create a timm VisionTransformer without classifier, random init when ``weights`` is None.

    A registered timm name loads ``weights`` through timm's pretrained path
    (``pretrained_cfg_overlay=dict(file=...)``), whose checkpoint filter converts the originals of
    DINO, DINOv2 (with registers; the position embedding resampled to ``img_size``) and
    OpenAI/open_clip CLIP (BioCLIP). timm loads non-strictly whenever the name's pretrained
    classifier is dropped, so every tensor of the backbone is then checked to come from the file.
    ``name == "vit_custom"`` builds ``VisionTransformer(**timm_kwargs)`` directly (a small demo
    ViT) and loads ``weights`` as a plain state dict.

    Raises:
        BackboneWeightsError: the file cannot be read, or does not fit the name (the message
            names the file, the family expected and what did not match).
        UnsupportedBackboneError: the model is not a VisionTransformer Prompt-CAM can explain.
    """
    if img_size is not None:
        timm_kwargs["img_size"] = img_size
    if name == CUSTOM_VIT:
        model = _custom_vit(weights, timm_kwargs)
    elif not _known_to_timm(name):
        raise UnsupportedBackboneError(_unknown_name_message(name))
    elif weights is None:
        model = timm.create_model(name, pretrained=False, num_classes=0, **timm_kwargs)
    else:
        model = _named_vit(name, weights, timm_kwargs)
    _check_supported(model, name)
    return model


def backbone_from_spec(spec: BackboneSpec) -> VisionTransformer:
    """The backbone ``spec`` describes; a random initialisation is seeded by ``spec.seed``."""
    if spec.weights is not None:
        return build_backbone(spec.name, spec.weights, **spec.kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        return build_backbone(spec.name, None, **spec.kwargs)


def _known_to_timm(name: str) -> bool:
    architecture, _, tag = name.partition(".")
    return timm.is_model(architecture) and (not tag or name in timm.list_pretrained(name))


def _unknown_name_message(name: str) -> str:
    architecture, _, tag = name.partition(".")
    if not timm.is_model(architecture):
        return f"timm {timm.__version__} has no model {architecture!r} (see docs/backbones.md)"
    tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{architecture}.*")]
    return f"timm has no pretrained tag {tag!r} for {architecture}; its tags: {', '.join(tags)}"


def _custom_vit(weights: str | os.PathLike | None, kwargs: dict[str, Any]) -> VisionTransformer:
    model = VisionTransformer(num_classes=0, **kwargs)
    if weights is not None:
        # A pretext-task classifier is replaced by Prompt-CAM's own head.
        state = without_classifier(read_state_dict(weights))
        missing, unexpected, shapes = key_differences(model.state_dict(), state)
        if missing or unexpected or shapes:
            raise mismatch_error(CUSTOM_VIT, weights, model, converted=state)
        model.load_state_dict(state)
    return model


def _named_vit(name: str, weights: str | os.PathLike, kwargs: dict[str, Any]) -> VisionTransformer:
    state = read_state_dict(weights)  # clear errors for unreadable files, before timm reads it
    try:
        model = timm.create_model(
            name,
            pretrained=True,
            pretrained_cfg_overlay=dict(file=str(weights)),
            num_classes=0,
            **kwargs,
        )
    except (RuntimeError, ValueError, KeyError, IndexError, AssertionError) as error:
        # Shape mismatches (load_state_dict) or a conversion that failed on the file's tensors.
        random = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
        raise mismatch_error(
            name, weights, random, converted=_converted(state, random), cause=error
        ) from error
    if not isinstance(model, VisionTransformer):
        raise _not_a_vision_transformer(name, model)
    # The keys timm's filter makes of the file must be exactly the backbone's (timm itself loads
    # non-strictly when it drops a pretrained classifier, as for CLIP and most timm names), and
    # timm must not have adapted a file of another patch size or register count.
    converted = _converted(state, model)
    missing, unexpected, _ = key_differences(model.state_dict(), converted or {})
    if converted is None or missing or unexpected or architecture_differences(state, model):
        raise mismatch_error(name, weights, model, converted=converted)
    return model


def _converted(state: dict[str, torch.Tensor], model: VisionTransformer) -> dict | None:
    """The file's tensors as timm's checkpoint filter converts them for ``model``, less any
    classifier; None if the conversion fails on them."""
    try:
        return without_classifier(checkpoint_filter_fn(dict(state), model))
    except (RuntimeError, ValueError, KeyError, IndexError, AssertionError):
        return None


def _not_a_vision_transformer(name: str, model: torch.nn.Module) -> UnsupportedBackboneError:
    return UnsupportedBackboneError(
        f"{name!r} is a {type(model).__name__}, not a timm VisionTransformer; Prompt-CAM needs one "
        "(see docs/backbones.md)"
    )


def _check_supported(backbone: torch.nn.Module, name: str = "backbone") -> None:
    """Refuse a built backbone Prompt-CAM cannot explain (the backstop of the name table in
    :mod:`promptcam.model.families`), and an input size that drops pixels."""
    if not isinstance(backbone, VisionTransformer):
        raise _not_a_vision_transformer(name, backbone)
    for index, block in enumerate(backbone.blocks):
        if type(block) is not Block or type(block.attn) is not Attention:
            raise UnsupportedBackboneError(
                f"{name}: block {index} is {type(block).__name__} with "
                f"{type(getattr(block, 'attn', None)).__name__}; Prompt-CAM supports timm's "
                "pre-norm Block with the standard Attention"
            )
        if getattr(block.attn, "gate", None) is not None:
            raise UnsupportedBackboneError(
                f"{name}: gated attention (block {index}) is not supported: the gate scales each "
                "head's output, so blurring a head no longer means uniform attention"
            )
    patch_embed = backbone.patch_embed
    if not backbone.dynamic_img_size:
        for size, patch in zip(patch_embed.img_size, patch_embed.patch_size, strict=True):
            if size % patch:
                # As the originals do (e.g. SigLIP at 384 px, patch 14), but maps then cover
                # slightly less than the image.
                warnings.warn(
                    f"{name}: img_size {tuple(patch_embed.img_size)} is not a multiple of the "
                    f"patch size {tuple(patch_embed.patch_size)}: the last {size % patch} pixel "
                    f"rows or columns are dropped; {size - size % patch} or "
                    f"{size - size % patch + patch} would keep them all",
                    UserWarning,
                    stacklevel=2,
                )


def resolve_preprocessing(spec: BackboneSpec, backbone: VisionTransformer) -> Preprocessing:
    """The preprocessing of ``backbone``'s inputs: what its weights' family expects, at the
    backbone's input size, with ``spec.preprocessing``'s overrides.

    The family: timm's pretrained config of the name's tag (``.dino``: ImageNet statistics,
    bicubic; ``.laion2b``: its own), or for an untagged DINOv2 / CLIP name the family's own
    (:mod:`promptcam.model.families`: ImageNet, resp. OpenAI CLIP statistics, bicubic, as
    BioCLIP and BioCLIP 2 use). A ``vit_custom`` backbone gets :data:`CUSTOM_PREPROCESSING`.
    """
    if spec.name == CUSTOM_VIT:
        base = Preprocessing(img_size=tuple(backbone.patch_embed.img_size), **CUSTOM_PREPROCESSING)
    else:
        base = Preprocessing.from_backbone(backbone).overridden(family_preprocessing(spec.name))
    return base.overridden(spec.preprocessing)


__all__ += ["BackboneWeightsError", "UnsupportedBackboneError"]
