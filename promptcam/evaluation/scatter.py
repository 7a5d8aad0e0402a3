"""The batch loop that evaluate, cam_maps and fidelity share over a shard group of the test split:
per-image arrays kept by ``(shard, batch)`` (:mod:`promptcam.data.batch_parts`), stopped on
SIGTERM/SIGUSR1 at a batch boundary with the batches so far saved, resumed from them.

A stage computes one batch's arrays with a function of ``(images, labels, meta)``; the whole
split is the group :data:`promptcam.data.reader.WHOLE_SPLIT`, and its files are written from
the same arrays a gather of shard-group parts concatenates, so they are the same byte for byte.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor
from torch.utils.data import DataLoader

from promptcam.data.batch_parts import BatchResults
from promptcam.progress import ProgressLines
from promptcam.training.preemption import TrainingPreempted, stop_on_signals

LOGGER = logging.getLogger(__name__)

BatchFn = Callable[[Tensor, Tensor, Mapping[str, Any]], Mapping[str, np.ndarray]]


def open_results(info: dict[str, Any], state_path: str | os.PathLike | None) -> BatchResults:
    """Empty results for ``info``, or a preempted run's saved ones at ``state_path`` if they
    belong to the same inputs and settings."""
    return BatchResults(info) if state_path is None else BatchResults.resume(state_path, info)


def compute_batches(
    results: BatchResults,
    loader: DataLoader,
    compute: BatchFn,
    state_path: str | os.PathLike | None,
    what: str,
    progress_seconds: float | None = None,
) -> BatchResults:
    """``compute`` every batch of ``loader`` (built with ``skip=results.done()``) into
    ``results``. With ``state_path``, a SIGTERM or SIGUSR1 saves the results there after the
    batch in progress and raises :class:`TrainingPreempted`; the state file goes once every
    batch is done."""
    lines = ProgressLines() if progress_seconds is None else ProgressLines(progress_seconds)
    total = len(loader.dataset)  # the group's images, finished ones included
    if results.num_images:
        lines.report("resuming after %d %s", results.num_images, what, force=True)
    with stop_on_signals() as stop:
        for images, labels, meta in loader:
            results.add(meta["shard"], meta["batch"], compute(images, labels, meta))
            LOGGER.debug("%d/%d %s", results.num_images, total, what)
            lines.report("%d/%d %s (%.0f s)", results.num_images, total, what, lines.elapsed())
            if stop and state_path is not None:
                results.save(state_path)
                raise TrainingPreempted(Path(state_path), stop.signal_name)
    if state_path is not None:
        Path(state_path).unlink(missing_ok=True)
    return results


def write_part(path: str | os.PathLike, results: BatchResults, what: str) -> int:
    """A shard group's part file; returns its number of images."""
    results.save(path)
    ProgressLines().report(
        "wrote %s: %d %s of shard group %s",
        path,
        results.num_images,
        what,
        results.info["group"],
        force=True,
    )
    return results.num_images
