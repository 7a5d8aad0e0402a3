"""Entry points of one rank's training: in this process, or as ``gpus`` data-parallel ones.

``python -m promptcam.training.launch SPEC`` runs one training process; SPEC is the JSON of
:func:`training_spec` (the keyword arguments of :func:`promptcam.training.train.train_rank`).
Started by :func:`train_in_processes` (or ``torchrun --nproc-per-node N``), it joins the
process group that the environment describes. Exit codes: 0 done, ``PREEMPTED_EXIT_CODE``
(75) stopped on SIGTERM/SIGUSR1 with a resumable ``last.pt``, anything else a failure.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from promptcam.training.distributed import process_group, run_processes
from promptcam.training.preemption import PREEMPTED_EXIT_CODE, TrainingPreempted
from promptcam.training.runtime import resolve_device
from promptcam.training.settings import TrainConfig
from promptcam.training.train import train_rank

LOGGER = logging.getLogger(__name__)


def training_spec(
    *,
    shards_dir: str | os.PathLike,
    rank: str,
    labels_tsv: str | os.PathLike,
    backbone: Mapping[str, Any],
    model_config: Mapping[str, Any],
    train_config: TrainConfig,
    out_dir: str | os.PathLike,
    transform: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """:func:`train_rank`'s arguments as JSON-ready values (what every process is told)."""
    return {
        "shards_dir": str(shards_dir),
        "rank": rank,
        "labels_tsv": str(labels_tsv),
        "backbone": dict(backbone),
        "model_config": dict(model_config),
        "train_config": dataclasses.asdict(train_config),
        "out_dir": str(out_dir),
        "transform": None if transform is None else dict(transform),
    }


def train_from_spec(spec: Mapping[str, Any]) -> Path:
    """Train as one process of the group the environment describes (alone if none)."""
    config = TrainConfig(**spec["train_config"])
    use_cuda = resolve_device(config.device).type == "cuda"
    with process_group(use_cuda) as processes:
        return train_rank(**{**spec, "train_config": config}, processes=processes)


def train_in_processes(spec: Mapping[str, Any], log: str | os.PathLike | None = None) -> int:
    """Train with ``train_config.gpus`` processes (one when 1, in this process); the exit code.

    ``log``: where the started processes' output goes (appended), e.g. the job's log.
    """
    count = spec["train_config"]["gpus"]
    if count == 1:
        try:
            train_from_spec(spec)
        except TrainingPreempted as stopped:
            LOGGER.warning("%s", stopped)
            return PREEMPTED_EXIT_CODE
        return 0
    argv = ["-m", "promptcam.training.launch", json.dumps(spec)]
    LOGGER.info("training %s with %d data-parallel processes", spec["rank"], count)
    if log is None:
        return run_processes(count, argv)
    with open(log, "a") as output:
        return run_processes(count, argv, output=output)


def main(argv: Sequence[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if len(args) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        train_from_spec(json.loads(args[0]))
    except TrainingPreempted as stopped:
        LOGGER.warning("%s", stopped)
        return PREEMPTED_EXIT_CODE
    return 0


if __name__ == "__main__":
    sys.exit(main())
