"""What makes a training run resumable: its identity (fingerprint), the saved state, metrics.

A run resumes from ``last.pt`` only when the fingerprint of everything that determines its
tensors is the same (settings that only say where or how it runs are left out).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from promptcam.config import runtime_keys
from promptcam.data.reader import TransformConfig
from promptcam.io import atomic_path, sha256_file
from promptcam.model.checkpoint import load_trainable, trainable_state
from promptcam.model.prompt_cam import PromptCAM
from promptcam.model.spec import BackboneSpec, PromptCAMConfig
from promptcam.training.settings import TrainConfig

LOGGER = logging.getLogger(__name__)

STATE_FORMAT = "promptcam-train-state/1"


def save_training_state(path: Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_training_state(path: Path, fingerprint: str) -> dict[str, Any] | None:
    """The saved state if it belongs to a run with these settings, else None (and say why)."""
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != STATE_FORMAT or state.get("fingerprint") != fingerprint:
        LOGGER.warning("ignoring %s: it was written with other settings; starting afresh", path)
        return None
    return state


def run_fingerprint(identity: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode("utf-8")).hexdigest()


def run_identity(
    *,
    config: TrainConfig,
    prompt_config: PromptCAMConfig,
    spec: BackboneSpec,
    rank: str,
    label_names: list[str],
    transform: TransformConfig,
    manifest: Mapping[str, Any],
) -> dict[str, Any]:
    """Everything that determines the trained tensors; a saved state resumes only if equal.

    The schema's runtime keys of ``train`` (device, threads, ...) say where the run happens,
    not what it computes: a run resumes on another device.
    """
    runtime = runtime_keys("train")
    return {
        "train_config": {
            key: value for key, value in dataclasses.asdict(config).items() if key not in runtime
        },
        "model_config": dataclasses.asdict(prompt_config),
        "backbone": {
            **dataclasses.asdict(spec),
            "weights_sha256": None if spec.weights is None else sha256_file(spec.weights),
        },
        "rank": rank,
        "label_names": label_names,
        "transform": dataclasses.asdict(transform),
        "shards": [e["sha256"] for e in manifest["shards"] if e["split"] in ("train", "val")],
    }


def start_or_resume(
    path: Path, fingerprint: str, model: PromptCAM, optimizer: torch.optim.Optimizer
) -> tuple[int, list[dict[str, float]], dict[str, Any]]:
    """(epochs done, metrics rows, best so far), restoring model and optimizer from ``path``."""
    state = load_training_state(path, fingerprint)
    if state is None:
        return 0, [], {"epoch": 0, "val_top1": -1.0, "tensors": trainable_state(model)}
    load_trainable(model, state["tensors"])
    optimizer.load_state_dict(state["optimizer"])
    return state["epoch"], state["history"], state["best"]
