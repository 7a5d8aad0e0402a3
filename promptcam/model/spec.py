"""What a Prompt-CAM model is made of, as plain values: its layout, its backbone, its
preprocessing. Importable without torch (the workflow and the command line read it).
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from timm.models.vision_transformer import VisionTransformer

from promptcam.io import sha256_file
from promptcam.model.families import (
    CUSTOM_VIT,
    UnsupportedBackboneError,
    check_backbone_kwargs,
    check_backbone_name,
    check_weights_preprocessing,
    image_size,
    weights_warnings,
)

__all__ = [
    "CUSTOM_VIT",
    "DEMO_BACKBONE",
    "BackboneSpec",
    "Preprocessing",
    "PromptCAMConfig",
    "UnsupportedBackboneError",
    "backbone_spec",
    "demo_backbone_spec",
    "workflow_backbone_spec",
]

Layout = Literal["reference", "scalable"]


Variant = Literal["deep", "shallow"]


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


INTERPOLATIONS: tuple[str, ...] = ("bilinear", "bicubic", "nearest")


PREPROCESSING_KEYS: tuple[str, ...] = ("mean", "std", "interpolation")


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the model's input: resize to ``img_size`` (height, width) with
    ``interpolation``, scale to [0, 1], normalise with ``mean`` and ``std``."""

    img_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"

    @classmethod
    def from_backbone(cls, backbone: VisionTransformer) -> Preprocessing:
        """What timm's pretrained config of the backbone's name (its tag) says the weights
        expect; a ``vit_custom`` backbone has no such config and gets timm's defaults."""
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

    def overridden(self, overrides: Mapping[str, Any]) -> Preprocessing:
        """A copy with ``overrides`` (any of mean, std, interpolation) applied."""
        values = check_preprocessing_overrides(overrides)
        return dataclasses.replace(self, **values)


def check_preprocessing_overrides(values: Mapping[str, Any]) -> dict[str, Any]:
    """Validated ``{mean, std, interpolation}`` (each optional), as tuples of floats and a str."""
    unknown = set(values) - set(PREPROCESSING_KEYS)
    if unknown:
        raise ValueError(
            f"unknown backbone.preprocessing settings {sorted(unknown)}; "
            f"allowed: {list(PREPROCESSING_KEYS)}"
        )
    out: dict[str, Any] = {}
    for key in ("mean", "std"):
        if values.get(key) is None:
            continue
        numbers = tuple(float(v) for v in values[key])
        if len(numbers) != 3 or (key == "std" and min(numbers) <= 0):
            raise ValueError(
                f"backbone.preprocessing.{key} must be 3 numbers (std > 0): {values[key]}"
            )
        out[key] = numbers
    if values.get("interpolation") is not None:
        if values["interpolation"] not in INTERPOLATIONS:
            raise ValueError(
                f"backbone.preprocessing.interpolation must be one of {INTERPOLATIONS}, "
                f"got {values['interpolation']!r}"
            )
        out["interpolation"] = values["interpolation"]
    return out


@dataclass(frozen=True)
class BackboneSpec:
    """Everything needed to rebuild a backbone bit-identically (see
    :func:`promptcam.model.backbone.backbone_from_spec`).

    ``kwargs`` are passed to timm (``img_size`` included; for ``vit_custom`` the whole
    architecture) and must be plain Python values, as they are stored in checkpoints.

    ``seed`` fixes the random initialisation when ``weights`` is None, so that checkpoints of a
    randomly initialised backbone can be reloaded too.

    ``preprocessing`` overrides (mean, std, interpolation) what the weights' family expects
    (:func:`promptcam.model.backbone.resolve_preprocessing`); empty: the family decides.
    """

    name: str
    weights: str | None = None
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    seed: int = 0
    preprocessing: Mapping[str, Any] = field(default_factory=dict)


DEMO_BACKBONE = Path(__file__).parents[1] / "assets" / "demo_vit.pt"


# The demo's images are drawn at the backbone's input size; the shard reader has always
# resized them bilinearly (a no-op at that size), and the demo's results depend on it.
DEMO_INTERPOLATION = "bilinear"


def demo_backbone_spec(weights: str | Path = DEMO_BACKBONE) -> dict[str, Any]:
    """The backbone entry (timm name, weight file, timm kwargs, preprocessing) of an exported
    demo backbone; the preprocessing is the pixel mean and std its card records.

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
    preprocessing = {"interpolation": DEMO_INTERPOLATION}
    if "pixel_mean" in card and "pixel_std" in card:
        preprocessing.update(mean=card["pixel_mean"], std=card["pixel_std"])
    return {
        "name": card["timm_name"],
        "weights": str(weights),
        "kwargs": card["timm_kwargs"],
        "preprocessing": preprocessing,
    }


DEMO_BACKBONE_NAME = "demo"


def backbone_spec(values: Mapping[str, Any]) -> BackboneSpec:
    """The config's ``backbone`` section ``{name, weights, kwargs, seed, preprocessing}`` (all but
    name optional) -> BackboneSpec, refusing what Prompt-CAM cannot explain.

    ``name: demo`` stands for the small ViT shipped in ``promptcam/assets`` (its card gives the
    timm name, architecture and pixel statistics, checked against the file's sha256);
    ``kwargs`` and ``preprocessing`` then add to the card's.

    Raises:
        UnsupportedBackboneError: the name or kwargs name a model Prompt-CAM cannot explain
            (:mod:`promptcam.model.families` says why), or a weight file whose mean and std
            the name cannot tell.
        ValueError: unknown settings.
    """
    known = {f.name for f in dataclasses.fields(BackboneSpec)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"unknown backbone settings {sorted(unknown)}; allowed: {sorted(known)}")
    values = dict(values)
    values["preprocessing"] = dict(values.get("preprocessing") or {})
    is_demo = values["name"] == DEMO_BACKBONE_NAME
    if is_demo:
        if values.get("weights") is not None:
            raise ValueError("backbone 'demo' ships its own weights: leave weights unset")
        demo = demo_backbone_spec()
        values.update(
            demo,
            kwargs={**demo["kwargs"], **values.get("kwargs", {})},
            preprocessing={**demo.get("preprocessing", {}), **values["preprocessing"]},
        )
    if values.get("weights") is not None:
        values["weights"] = str(values["weights"])
    values["preprocessing"] = check_preprocessing_overrides(values["preprocessing"])
    check_backbone_name(values["name"])
    check_backbone_kwargs(values.get("kwargs", {}))
    if not is_demo:  # the demo's card says how its weights were trained
        check_weights_preprocessing(values["name"], values.get("weights"), values["preprocessing"])
    for message in weights_warnings(values["name"], values.get("weights")):
        warnings.warn(message, UserWarning, stacklevel=2)
    return BackboneSpec(**values)


def workflow_backbone_spec(values: Mapping[str, Any]) -> BackboneSpec:
    """:func:`backbone_spec` plus what the workflow's shard reader needs: a square input.

    Called by the Snakefile when the workflow starts, so that a backbone the pipeline cannot run
    is refused before any job, with the reason.
    """
    spec = backbone_spec(values)
    if "img_size" in spec.kwargs:
        height, width = image_size(spec.kwargs["img_size"])
        if height != width:
            raise UnsupportedBackboneError(
                f"backbone.kwargs.img_size {height}x{width} is not square: the workflow's shard "
                "reader makes square images (the library's PromptCAM takes any size)"
            )
    return spec
