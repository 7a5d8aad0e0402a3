"""What a Prompt-CAM model is made of, as plain values: its layout, its backbone, its
preprocessing. Importable without torch (the workflow and the command line read it).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from timm.models.vision_transformer import VisionTransformer

from promptcam.io import sha256_file

Layout = Literal["reference", "scalable"]


Variant = Literal["deep", "shallow"]


CUSTOM_VIT = "vit_custom"


@dataclass(frozen=True)
class PromptCAMConfig:
    """Hyper-parameters of the prompts and the head (the backbone is described by BackboneSpec).

    Args:
        num_classes: Number of classes C (one prompt and one score each).
        layout: ``"reference"`` (C prompts in every block) or ``"scalable"``
            (``num_agnostic_prompts`` in blocks 1..N-1, class prompts only in block N).
        variant: ``"deep"`` (fresh prompts per block) or ``"shallow"`` (class prompts
            prepended once and carried through all blocks; reference layout only).
        num_agnostic_prompts: Class-agnostic prompts per block 1..N-1 (scalable layout).
        prompt_dropout: Dropout on the prompt embeddings during training.
        drop_path_rate: Stochastic depth of the last block during training, decayed linearly
            to 0 at the first block (timm's rule); the reference uses 0.1 for DINO.
    """

    num_classes: int
    layout: Layout = "reference"
    variant: Variant = "deep"
    num_agnostic_prompts: int = 16
    prompt_dropout: float = 0.1
    drop_path_rate: float = 0.1

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {self.num_classes}")
        if self.layout not in ("reference", "scalable"):
            raise ValueError(f"layout must be 'reference' or 'scalable', got {self.layout!r}")
        if self.variant not in ("deep", "shallow"):
            raise ValueError(f"variant must be 'deep' or 'shallow', got {self.variant!r}")
        if self.layout == "scalable" and self.variant == "shallow":
            raise ValueError("the shallow variant exists only in the reference layout")
        if self.num_agnostic_prompts < 0:
            raise ValueError("num_agnostic_prompts must be >= 0")
        for name in ("prompt_dropout", "drop_path_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1)")


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the model's input: resize to ``img_size``, scale to [0, 1], normalise."""

    img_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"

    @classmethod
    def from_backbone(cls, backbone: VisionTransformer) -> Preprocessing:
        from timm.data import resolve_model_data_config

        data_config = resolve_model_data_config(backbone)
        return cls(
            img_size=tuple(backbone.patch_embed.img_size),
            mean=tuple(data_config["mean"]),
            std=tuple(data_config["std"]),
            interpolation=data_config["interpolation"],
        )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Preprocessing:
        return cls(
            img_size=tuple(values["img_size"]),
            mean=tuple(values["mean"]),
            std=tuple(values["std"]),
            interpolation=values["interpolation"],
        )


@dataclass(frozen=True)
class BackboneSpec:
    """Everything needed to rebuild a backbone bit-identically (see
    :func:`promptcam.model.backbone.backbone_from_spec`).

    ``kwargs`` are passed to timm (``img_size`` included; for ``vit_custom`` the whole
    architecture) and must be plain Python values, as they are stored in checkpoints.

    ``seed`` fixes the random initialisation when ``weights`` is None, so that checkpoints of a
    randomly initialised backbone can be reloaded too.
    """

    name: str
    weights: str | None = None
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    seed: int = 0


DEMO_BACKBONE = Path(__file__).parents[1] / "assets" / "demo_vit.pt"


def demo_backbone_spec(weights: str | Path = DEMO_BACKBONE) -> dict[str, Any]:
    """The backbone entry (timm name, weight file, timm kwargs) of an exported demo backbone.

    Checks the weight file against the sha256 its card records, so a corrupted or
    regenerated-but-not-recorded file is caught before any training starts.
    """
    weights = Path(weights)
    card = json.loads(weights.with_suffix(".json").read_text())
    actual = sha256_file(weights)
    if actual != card["sha256"]:
        raise ValueError(
            f"{weights}: sha256 {actual} does not match its card ({card['sha256']}); "
            "regenerate it with the command in the card, or restore the file from git"
        )
    return {"name": card["timm_name"], "weights": str(weights), "kwargs": card["timm_kwargs"]}


DEMO_BACKBONE_NAME = "demo"


def backbone_spec(values: Mapping[str, Any]) -> BackboneSpec:
    """``{name, weights, img_size, kwargs, seed}`` (all but name optional) -> BackboneSpec.

    ``name: demo`` stands for the small ViT shipped in ``promptcam/assets`` (its card gives the
    timm name and architecture, checked against the file's sha256); ``kwargs`` then add to the
    card's.
    """
    known = {f.name for f in dataclasses.fields(BackboneSpec)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"unknown backbone settings {sorted(unknown)}; allowed: {sorted(known)}")
    values = dict(values)
    if values["name"] == DEMO_BACKBONE_NAME:
        if values.get("weights") is not None:
            raise ValueError("backbone 'demo' ships its own weights: leave weights unset")
        demo = demo_backbone_spec()
        values.update(demo, kwargs={**demo["kwargs"], **values.get("kwargs", {})})
    if values.get("weights") is not None:
        values["weights"] = str(values["weights"])
    return BackboneSpec(**values)
