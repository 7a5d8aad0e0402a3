"""Prompt-CAM checkpoints: the trainable tensors and how to rebuild everything else."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from promptcam.io import atomic_path, sha256_file
from promptcam.model.prompt_cam import PromptCAM
from promptcam.model.spec import BackboneSpec, Preprocessing, PromptCAMConfig


def trainable_state(model: PromptCAM) -> dict[str, Tensor]:
    """Copies of the tensors that training changes (everything outside the backbone)."""
    return {
        name: tensor.detach().cpu().clone()
        for name, tensor in model.state_dict().items()
        if not name.startswith("backbone.")
    }


def load_trainable(model: PromptCAM, tensors: Mapping[str, Tensor]) -> None:
    """Load tensors saved by :func:`trainable_state`; every trainable tensor must be there."""
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [name for name in missing if not name.startswith("backbone.")]
    if missing or unexpected:
        raise ValueError(f"training state: missing {missing}, unexpected {unexpected}")


CHECKPOINT_FORMAT = "promptcam-checkpoint"


CHECKPOINT_VERSION = 1


@dataclass(frozen=True)
class CheckpointMeta:
    label_names: tuple[str, ...]
    preprocessing: Preprocessing
    extra: dict[str, Any]


class BackboneMismatchError(ValueError):
    """The backbone weights offered are not the ones the checkpoint was trained on."""


def _not_a_checkpoint(path: str | os.PathLike, payload: Any) -> str:
    message = f"{path} is not a Prompt-CAM checkpoint (model.pt of a trained rank)"
    if isinstance(payload, dict) and "model_state_dict" in payload:
        return f"{message}: it looks like the reference's; convert it: promptcam convert-reference"
    if (
        isinstance(payload, dict)
        and payload
        and all(isinstance(v, Tensor) for v in payload.values())
    ):
        return f"{message}: it holds {len(payload)} bare tensors (a weight file, e.g. a backbone's)"
    return message


def save_checkpoint(
    path: str | os.PathLike,
    model: PromptCAM,
    *,
    label_names: Sequence[str],
    extra: Mapping[str, Any] | None = None,
    preprocessing: Preprocessing | None = None,
) -> None:
    """Atomically save the trainable tensors and how to rebuild everything else.

    The backbone is referenced, not stored: its timm name, kwargs, weight file (path and
    sha256) or random-init seed. Only tensors and plain Python values are written, so the
    file loads with ``torch.load(weights_only=True)``; ``extra`` must hold such values too.
    ``preprocessing`` defaults to the model's (:attr:`PromptCAM.preprocessing`: what the
    backbone's weights expect, or the config's overrides), so that every checkpoint says how its
    inputs were made.
    """
    if len(label_names) != model.num_classes:
        raise ValueError(f"{len(label_names)} label names for {model.num_classes} classes")
    spec = model.backbone_spec
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": dataclasses.asdict(model.config),
        "backbone": {
            "name": spec.name,
            "weights": spec.weights,
            "weights_sha256": None if spec.weights is None else sha256_file(spec.weights),
            "kwargs": dict(spec.kwargs),
            "seed": spec.seed,
        },
        "state_dict": trainable_state(model),
        "label_names": list(label_names),
        "preprocessing": dataclasses.asdict(preprocessing or model.preprocessing),
        "extra": dict(extra or {}),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
        # Fail now, not at load time, if something unsafe to unpickle slipped in.
        torch.load(tmp, map_location="cpu", weights_only=True)


def read_torch_file(path: str | os.PathLike, what: str) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, failing clearly on a wrong file.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a torch file (e.g. a metrics table given as a checkpoint),
            naming ``what`` was expected.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no file {path} (expected {what})")
    if not path.is_file():
        raise ValueError(f"{path} is a folder, not {what}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as error:  # torch.load's unpickler raises anything on a foreign file
        raise ValueError(
            f"{path} is not {what}: torch.load cannot read it ({type(error).__name__})"
        ) from error


def top_down_parents(meta: CheckpointMeta, path: str | os.PathLike) -> list[str] | None:
    """Each class's parent if the model must be read top-down, else None.

    A model trained among siblings (``train.objective: siblings``) never compared classes of
    different parents, so its flat argmax means nothing (on the demo its flat species top-1 is
    0.21, within siblings 0.95): it is read among the children of the class predicted at the
    rank above. At the coarsest rank (one parent) that is the flat reading.
    """
    objective = meta.extra.get("train_config", {}).get("objective", "flat")
    if objective != "siblings":
        return None
    parents = meta.extra.get("label_parents")
    if parents is None:
        raise ValueError(
            f"{path} was trained among siblings (train.objective: siblings) before checkpoints "
            "recorded each class's parent, which reading it needs: retrain that rank"
        )
    return None if len(set(parents)) <= 1 else list(parents)


def require_flat_reading(meta: CheckpointMeta, path: str | os.PathLike) -> None:
    """Refuse a model that must be read top-down (:func:`top_down_parents`) where only its
    own scores are at hand."""
    if top_down_parents(meta, path) is not None:
        raise ValueError(
            f"{path} was trained among siblings (train.objective: siblings): its scores are "
            "only comparable within a parent, so reading it needs the rank above's "
            "prediction: run `promptcam explain` with the checkpoints of the ranks above it "
            "too (it reads them top-down), or use a model trained with train.objective: flat"
        )


def load_checkpoint(
    path: str | os.PathLike,
    backbone_weights: str | os.PathLike | None = None,
) -> tuple[PromptCAM, CheckpointMeta]:
    """Rebuild a :class:`PromptCAM` saved by :func:`save_checkpoint` (on the CPU, eval mode).

    ``backbone_weights`` overrides the weight file path stored in the checkpoint (e.g. on
    another machine); its sha256 must match the one recorded at save time.

    Raises:
        FileNotFoundError: no file at ``path`` or at its backbone weights' path.
        ValueError: ``path`` is not a Prompt-CAM checkpoint (the message says what it is).
        BackboneMismatchError: the backbone weights are not the ones trained on.
    """
    payload = read_torch_file(path, "a Prompt-CAM checkpoint")
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(_not_a_checkpoint(path, payload))
    if payload.get("version", 0) > CHECKPOINT_VERSION:
        raise ValueError(
            f"{path} is a checkpoint of version {payload['version']}; this promptcam reads "
            f"up to version {CHECKPOINT_VERSION}: update promptcam"
        )
    stored = payload["backbone"]
    weights = stored["weights"] if backbone_weights is None else str(backbone_weights)
    expected = stored["weights_sha256"]
    if expected is None and backbone_weights is not None:
        raise BackboneMismatchError(
            f"{path} was trained on a randomly initialised backbone (seed {stored['seed']}), "
            f"not on {backbone_weights}"
        )
    if expected is not None:
        if not Path(weights).is_file():
            raise FileNotFoundError(
                f"backbone weights {weights} of {path} not found; give their new path "
                "(--backbone-weights, or backbone_weights= in Python)"
            )
        actual = sha256_file(weights)
        if actual != expected:
            raise BackboneMismatchError(
                f"backbone weights {weights} have sha256 {actual}, but {path} was trained on "
                f"weights with sha256 {expected}"
            )
    preprocessing = Preprocessing.from_dict(payload["preprocessing"])
    spec = BackboneSpec(
        name=stored["name"],
        weights=weights,
        kwargs=stored["kwargs"],
        seed=stored["seed"],
        # The recorded preprocessing wins over the family's, so model and meta agree.
        preprocessing={
            "mean": preprocessing.mean,
            "std": preprocessing.std,
            "interpolation": preprocessing.interpolation,
        },
    )
    model = PromptCAM(spec, PromptCAMConfig(**payload["config"]))
    missing, unexpected = model.load_state_dict(payload["state_dict"], strict=False)
    missing = [name for name in missing if not name.startswith("backbone.")]
    if missing or unexpected:
        raise ValueError(f"{path}: missing tensors {missing}, unexpected tensors {unexpected}")
    meta = CheckpointMeta(
        label_names=tuple(payload["label_names"]),
        preprocessing=preprocessing,
        extra=payload["extra"],
    )
    return model.eval(), meta
