"""What makes a training run resumable: its identity (fingerprint), the saved state, metrics.

A run resumes from ``last.pt`` only when the fingerprint of everything that determines its
tensors is the same (settings that only say where or how it runs are left out).

``last.pt`` (format 2) holds ``fingerprint``, ``epoch`` (epochs finished), the trainable
``tensors``, the ``optimizer`` state with its momentum buffers, the ``best`` epoch so far with
its tensors, the metrics rows (``history``) and ``position``: None after a finished epoch, or,
when a signal stopped the run inside epoch ``epoch + 1`` (:mod:`promptcam.training.preemption`),
where it stood after its last optimizer step (:class:`EpochPosition`): the steps done, the
chunks each loader lane had delivered, the epoch's data seed (a check), and per process its
partial sums of the epoch's metrics and its python, numpy and torch RNG states.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
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

STATE_FORMAT = "promptcam-train-state/2"


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


@dataclass
class ProcessPosition:
    """One process's part of a mid-epoch position: its sums of the epoch's train metrics so
    far (over its own samples) and its RNG states (:func:`promptcam.training.runtime.rng_states`)."""

    loss_sum: torch.Tensor
    correct: torch.Tensor
    seen: int
    rng: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class EpochPosition:
    """Where a run stopped inside an epoch: after ``steps`` global steps, when loader lane
    ``lane`` had delivered ``chunks_done[lane]`` chunks; ``lr`` of the last step."""

    steps: int
    chunks_done: dict[int, int]
    lr: float
    epoch_seed: int
    processes: list[ProcessPosition] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "chunks_done": dict(self.chunks_done),
            "lr": self.lr,
            "epoch_seed": self.epoch_seed,
            "processes": [process.as_dict() for process in self.processes],
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> EpochPosition:
        return cls(
            steps=values["steps"],
            chunks_done=dict(values["chunks_done"]),
            lr=values["lr"],
            epoch_seed=values["epoch_seed"],
            processes=[ProcessPosition(**process) for process in values["processes"]],
        )


@dataclass
class Resumed:
    """What a run starts from: epochs finished, metrics rows, the best epoch so far, and the
    position inside the next epoch (None: at its start)."""

    epochs_done: int
    history: list[dict[str, float]]
    best: dict[str, Any]
    position: EpochPosition | None = None


def start_or_resume(
    path: Path, fingerprint: str, model: PromptCAM, optimizer: torch.optim.Optimizer
) -> Resumed:
    """Restore model and optimizer from ``path`` when it belongs to this run; else a fresh start."""
    state = load_training_state(path, fingerprint)
    if state is None:
        best = {"epoch": 0, "val_top1": -1.0, "tensors": trainable_state(model)}
        return Resumed(0, [], best)
    load_trainable(model, state["tensors"])
    optimizer.load_state_dict(state["optimizer"])
    position = state.get("position")
    return Resumed(
        state["epoch"],
        state["history"],
        state["best"],
        None if position is None else EpochPosition.from_dict(position),
    )
