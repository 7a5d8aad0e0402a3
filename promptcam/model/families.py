"""Which backbones Prompt-CAM can explain, and which weight files each timm name reads.

Torch-free, so that the workflow refuses an unsupported backbone when it starts (Snakefile,
:func:`promptcam.model.spec.backbone_spec`), with the reason, instead of deep inside training.
:func:`promptcam.model.backbone._check_supported` repeats the check on the built model as the
backstop; ``tests/test_backbone_families.py`` checks this table against every model timm
registers.

Prompt-CAM needs a timm ``VisionTransformer`` built from timm's pre-norm ``Block`` with the
standard ``Attention``: it prepends prompts to the token sequence of every block and reads one
softmax distribution per head over the tokens in the last block.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

CUSTOM_VIT = "vit_custom"


class UnsupportedBackboneError(ValueError):
    """A backbone (name or kwargs) Prompt-CAM cannot explain; the message says why."""


@dataclass(frozen=True)
class BackboneFamily:
    """Weight files of one origin and the timm names that read them.

    Attributes:
        key: Short identifier used in messages and tests.
        title: Human name of the family.
        pattern: Regular expression on the full timm name (``architecture[.tag]``).
        example: The timm name to use for the family's usual file.
        weight_file: What users download, in its original layout.
        expected_keys: The original layout's keys, for error messages.
        preprocessing: Mean, std and interpolation of the family's files, used for an untagged
            name (with a tag, timm's pretrained config of the tag decides); None: a weight file
            needs a tagged name.
    """

    key: str
    title: str
    pattern: str
    example: str
    weight_file: str
    expected_keys: str
    preprocessing: Mapping[str, Any] | None

    def matches(self, name: str) -> bool:
        return re.search(self.pattern, name) is not None


# timm.data's IMAGENET_DEFAULT_* and OPENAI_CLIP_* (a test checks they agree).
IMAGENET_PREPROCESSING: Mapping[str, Any] = {
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "interpolation": "bicubic",
}
CLIP_PREPROCESSING: Mapping[str, Any] = {
    "mean": (0.48145466, 0.4578275, 0.40821073),
    "std": (0.26862954, 0.26130258, 0.27577711),
    "interpolation": "bicubic",
}

_DINOV2_KEYS = (
    "cls_token, pos_embed (1, 1 + 37*37, D), mask_token, patch_embed.proj.*, "
    "blocks.N.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2, mlp.fc1, mlp.fc2, ls2.gamma}, norm.*"
)
_CLIP_KEYS = (
    "visual.conv1.weight, visual.class_embedding, visual.positional_embedding, visual.ln_pre.*, "
    "visual.transformer.resblocks.N.{ln_1, attn.in_proj_*, attn.out_proj.*, ln_2, mlp.c_fc, "
    "mlp.c_proj}, visual.ln_post.*, visual.proj"
)

FAMILIES: tuple[BackboneFamily, ...] = (
    BackboneFamily(
        key="dinov2_reg",
        title="DINOv2 with registers",
        pattern=r"^vit_\w+_patch14_reg4_dinov2(\.|$)",
        example="vit_base_patch14_reg4_dinov2.lvd142m",
        weight_file="Meta's dinov2_vitb14_reg4_pretrain.pth",
        expected_keys=_DINOV2_KEYS + ", register_tokens (1, 4, D)",
        preprocessing=IMAGENET_PREPROCESSING,
    ),
    BackboneFamily(
        key="dinov2",
        title="DINOv2",
        pattern=r"^vit_\w+_patch14_dinov2(\.|$)",
        example="vit_base_patch14_dinov2.lvd142m",
        weight_file="Meta's dinov2_vitb14_pretrain.pth",
        expected_keys=_DINOV2_KEYS,
        preprocessing=IMAGENET_PREPROCESSING,
    ),
    BackboneFamily(
        key="clip_openai",
        title="OpenAI CLIP (QuickGELU)",
        pattern=r"^vit_\w+_clip_quickgelu_\d+(\.|$)",
        example="vit_base_patch16_clip_quickgelu_224.openai",
        weight_file="OpenAI's ViT-B-16.pt, as a state dict (the release is a TorchScript archive)",
        expected_keys=_CLIP_KEYS,
        preprocessing=CLIP_PREPROCESSING,
    ),
    BackboneFamily(
        key="clip",
        title="open_clip CLIP (GELU): BioCLIP (ViT-B/16), BioCLIP 2 (ViT-L/14), LAION, DFN",
        pattern=r"^vit_\w+_clip_\d+(\.|$)",
        example="vit_base_patch16_clip_224",
        weight_file="open_clip_pytorch_model.bin (e.g. imageomics/bioclip)",
        expected_keys=_CLIP_KEYS,
        preprocessing=CLIP_PREPROCESSING,
    ),
    BackboneFamily(
        key="dino",
        title="DINO",
        pattern=r"^vit_(small|base)_patch(8|16)_224\.dino$",
        example="vit_base_patch16_224.dino",
        weight_file="dino_vitbase16_pretrain.pth (facebookresearch/dino, backbone only)",
        expected_keys="cls_token, pos_embed, patch_embed.proj.*, blocks.N.*, norm.*",
        preprocessing=None,
    ),
)

OTHER_TIMM_VIT = BackboneFamily(
    key="timm",
    title="timm VisionTransformer",
    pattern=r".",
    example="vit_base_patch16_224.augreg_in21k",
    weight_file="a timm state dict (or any layout timm's checkpoint filter converts)",
    expected_keys="cls_token, pos_embed, patch_embed.proj.*, blocks.N.*, norm.*",
    preprocessing=None,
)


def backbone_family(name: str) -> BackboneFamily:
    """The family whose files ``name`` reads (:data:`OTHER_TIMM_VIT` when none matches)."""
    return next((family for family in FAMILIES if family.matches(name)), OTHER_TIMM_VIT)


_EVA = (
    "timm builds it with its Eva class (EVA-02, DINOv3, Perception Encoder, RoPE ViTs): rotary "
    "position embeddings rotate each patch token's query and key by the patch's position, and "
    "Prompt-CAM's prompts have no position (some of these also gate attention)"
)

# (pattern on the architecture name, reason); checked before SUPPORTED_PATTERN.
REFUSED: tuple[tuple[str, str], ...] = (
    (r"^eva02_|^eva_giant_|^vit_pe_|rope|dinov3|sapiens2|lingbot", _EVA),
    (
        r"_xp_|_18x2_|^vit_d?pwee_",
        "its blocks are parallel (attention and MLP side by side), not timm's sequential Block "
        "whose last-block class rows Prompt-CAM computes",
    ),
    (
        r"^vit_d(little|wee)_",
        "differential attention: a head's attention is the difference of two softmax maps, not "
        "one distribution over the patches, so its map and its blurring are undefined",
    ),
    (
        r"^vit_base_patch16_rpn_",
        "residual post-norm blocks (LayerNorm after attention and MLP), not timm's pre-norm Block",
    ),
    (
        r"relpos",
        "relative position bias between patches (timm's VisionTransformerRelPos): prompts have no "
        "position in it, and it is not a timm VisionTransformer",
    ),
    (r"^beit(v2)?_", "BEiT uses relative position bias and is not a timm VisionTransformer"),
    (r"^samvit_", "SAM's windowed ViT is not a timm VisionTransformer"),
    (r"^naflexvit_", "NaFlexVit (variable-length patch sequences) is not a timm VisionTransformer"),
)

SUPPORTED_PATTERN = r"^(vit_|deit|flexivit_|aimv2_|beit3_|eva_large_patch14_|test_vit)"

# Names users copy from where they downloaded the weights, and the timm name to use instead.
_HUB_SIZES = {"s": "small", "b": "base", "l": "large", "g": "giant"}


def _foreign_name_hint(name: str) -> str:
    dinov2 = re.fullmatch(r"dinov2_vit([sblg])14(_reg)?(_lc)?", name)
    if dinov2:
        size, reg = _HUB_SIZES[dinov2.group(1)], "_reg4" if dinov2.group(2) else ""
        return f"; {name} is a torch.hub name: use vit_{size}_patch14{reg}_dinov2.lvd142m"
    dino = re.fullmatch(r"dino_vit([sb])(8|16)", name)
    if dino:
        size = _HUB_SIZES[dino.group(1)]
        return f"; {name} is a torch.hub name: use vit_{size}_patch{dino.group(2)}_224.dino"
    if re.match(r"(?i)(vit-|hf[-_]hub:|openai/|imageomics/|laion/|timm/)", name):
        return (
            "; that is an open_clip / Hugging Face name: download the weight file, give its path "
            "as weights, and name the timm architecture, e.g. vit_base_patch16_clip_224 for "
            "BioCLIP, vit_large_patch14_clip_224 for BioCLIP 2, "
            "vit_base_patch16_clip_quickgelu_224.openai for OpenAI's ViT-B/16"
        )
    return ""


def check_backbone_name(name: str) -> None:
    """Raise :class:`UnsupportedBackboneError` with the reason if Prompt-CAM cannot explain
    timm model ``name`` (``architecture[.tag]``)."""
    if name == CUSTOM_VIT:
        return
    architecture = name.split(".", 1)[0]
    for pattern, reason in REFUSED:
        if re.search(pattern, architecture):
            raise UnsupportedBackboneError(
                f"backbone {name!r} is not supported: {reason}. Prompt-CAM needs a timm "
                "VisionTransformer with standard pre-norm blocks; see docs/backbones.md"
            )
    if not re.match(SUPPORTED_PATTERN, architecture):
        raise UnsupportedBackboneError(
            f"backbone {name!r} is not a timm VisionTransformer name Prompt-CAM supports "
            f"(timm ViT names start with vit_, deit, flexivit_, ...){_foreign_name_hint(name)}; "
            "see docs/backbones.md"
        )


# kwargs a config may not pass to timm, and why.
REFUSED_KWARGS: Mapping[str, str] = {
    "num_classes": "Prompt-CAM adds its own head: the backbone is built without a classifier",
    "pretrained": "give the weight file as backbone.weights",
    "pretrained_cfg_overlay": "give the weight file as backbone.weights",
    "checkpoint_path": "give the weight file as backbone.weights",
    "block_fn": "Prompt-CAM needs timm's pre-norm Block",
    "gated_attn": "gated attention scales each head's output by a gate of its own query token, "
    "so blurring a head no longer means uniform attention",
    "attn_gated": "gated attention scales each head's output by a gate of its own query token, "
    "so blurring a head no longer means uniform attention",
    "use_naflex": "NaFlexVit is not a timm VisionTransformer",
}


def check_backbone_kwargs(kwargs: Mapping[str, Any]) -> None:
    """Raise :class:`UnsupportedBackboneError` for timm kwargs that give an unsupported model or
    an input size that is not one number or a (height, width) pair."""
    for key, reason in REFUSED_KWARGS.items():
        if key in kwargs:
            raise UnsupportedBackboneError(f"backbone.kwargs.{key} is not allowed: {reason}")
    attn_layer = kwargs.get("attn_layer", "attn")
    if attn_layer not in ("", "attn"):
        raise UnsupportedBackboneError(
            f"backbone.kwargs.attn_layer {attn_layer!r} is not supported: Prompt-CAM needs "
            "timm's standard Attention (one softmax distribution per head)"
        )
    if "img_size" in kwargs:
        image_size(kwargs["img_size"])


def image_size(value: Any) -> tuple[int, int]:
    """``img_size`` as timm takes it (one number, or height and width) -> (height, width)."""
    sizes = [value, value] if isinstance(value, int) else value
    if (
        not isinstance(sizes, list | tuple)
        or len(sizes) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes)
    ):
        raise UnsupportedBackboneError(
            f"backbone.kwargs.img_size must be a positive integer or [height, width], got {value!r}"
        )
    return int(sizes[0]), int(sizes[1])


def check_weights_preprocessing(
    name: str, weights: str | None, preprocessing: Mapping[str, Any]
) -> None:
    """Refuse a weight file whose expected mean and std the timm name cannot tell.

    timm's pretrained config of a name's tag says how the weights were normalised; an untagged
    name of a family with its own statistics (DINOv2, CLIP) gets those; any other untagged name
    would fall back to timm's default tag, which for ``vit_base_patch16_224`` is an ImageNet-21k
    model (mean = std = 0.5), not DINO's ImageNet statistics.
    """
    if weights is None or name == CUSTOM_VIT or "." in name:
        return
    if backbone_family(name).preprocessing is not None:
        return
    if preprocessing.get("mean") is not None and preprocessing.get("std") is not None:
        return
    raise UnsupportedBackboneError(
        f"backbone {name!r} has no pretrained tag, so the mean and std that {weights} expects are "
        f"unknown: name the tag of your file's family (e.g. {name}.dino for DINO weights) or set "
        "backbone.preprocessing.mean and .std"
    )


def weights_warnings(name: str, weights: str | None) -> list[str]:
    """What loads but does not reproduce the original: OpenAI's CLIP weights in timm's GELU CLIP."""
    architecture, _, tag = name.partition(".")
    if weights is None or backbone_family(name).key != "clip" or not tag.startswith("openai"):
        return []
    quick = re.sub(r"_clip_(\d+)$", r"_clip_quickgelu_\1", architecture)
    return [
        f"OpenAI's CLIP was trained with QuickGELU, but {name} is timm's GELU model: OpenAI's "
        f"weights load, yet the features differ from the original's; name {quick}.{tag} instead "
        "(BioCLIP and other open_clip ViT-B-16 / ViT-L-14 files are GELU: keep the name)"
    ]


def family_preprocessing(name: str) -> dict[str, Any]:
    """The preprocessing an untagged ``name``'s family prescribes ({} for tagged names, whose timm
    config decides, and for families without one)."""
    family = backbone_family(name)
    if "." in name or family.preprocessing is None:
        return {}
    return dict(family.preprocessing)
