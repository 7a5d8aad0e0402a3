"""Where and how a job computes: device, precision, batches, seeds."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader


def resolve_device(name: str) -> torch.device:
    """``"auto"``: the GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_states(device: torch.device) -> dict[str, Any]:
    """Where python's, numpy's and torch's generators (CPU, and ``device``'s GPU) stand, in
    types that ``torch.load(weights_only=True)`` reads back."""
    kind, keys, position, has_gauss, cached_gauss = np.random.get_state()
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gauss": float(cached_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def restore_rng_states(states: dict[str, Any], device: torch.device) -> None:
    """Put the generators back where :func:`rng_states` found them."""
    random.setstate(_as_tuples(states["python"]))
    numpy = states["numpy"]
    keys = numpy["keys"].numpy().astype(np.uint32)
    np.random.set_state(
        (numpy["kind"], keys, numpy["position"], numpy["has_gauss"], numpy["cached_gauss"])
    )
    torch.set_rng_state(states["torch"])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)


def _as_tuples(value: Any) -> Any:
    # random.setstate wants the nested tuples it gave; a saved copy may hold lists.
    return tuple(_as_tuples(item) for item in value) if isinstance(value, list | tuple) else value


def autocast(
    device: torch.device, mixed_precision: bool = True
) -> contextlib.AbstractContextManager:
    """bf16 autocast on a GPU (the model's attention is fused SDPA) unless ``mixed_precision``
    is off; plain fp32 on the CPU."""
    if device.type == "cuda" and mixed_precision:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def batches(loader: DataLoader, device: torch.device) -> Iterator[tuple[Tensor, Tensor]]:
    """(images, labels) of each batch on ``device``; the metadata stays behind."""
    for images, labels, _ in loader:
        yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True)


@torch.no_grad()
def collect_scores(
    model: nn.Module, loader: DataLoader, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Scores (N, C) in fp32 and labels (N,) of every sample, on the CPU, in loader order."""
    model.eval()
    all_scores, all_labels = [], []
    for images, labels in batches(loader, device):
        with autocast(device):
            scores = model(images)
        all_scores.append(scores.float().cpu())
        all_labels.append(labels.cpu())
    if not all_scores:
        raise ValueError("the loader yielded no samples")
    return torch.cat(all_scores), torch.cat(all_labels)


def mean_loss(scores: Tensor, labels: Tensor) -> float:
    return float(F.cross_entropy(scores, labels))


def topk_accuracy(scores: Tensor, labels: Tensor, k: int) -> float:
    """Share of samples whose label is among the ``k`` highest scores (k capped at C)."""
    k = min(k, scores.shape[1])
    top = scores.topk(k, dim=1).indices
    return float((top == labels[:, None]).any(dim=1).float().mean())
