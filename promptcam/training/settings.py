"""Settings of one rank's Prompt-CAM training (:class:`TrainConfig`); see
:mod:`promptcam.training.train` for what they drive."""

from __future__ import annotations

from dataclasses import dataclass

OBJECTIVES = ("flat", "siblings")


@dataclass(frozen=True)
class TrainConfig:
    """The config's ``train.defaults`` (less ``model`` and ``transform``) and ``train``'s
    runtime keys; defaults as in the schema (tests/test_config.py checks)."""

    epochs: int = 130
    warmup_epochs: int = 20
    batch_size: int = 16
    lr: float = 0.005
    warmup_lr: float = 1e-6
    min_lr: float = 1e-8
    momentum: float = 0.9
    weight_decay: float = 0.001
    seed: int = 0
    shuffle_buffer: int = 1000
    eval_batch_size: int = 64
    num_workers: int = 2
    # Classes scored per training step (sampled softmax; scalable layout only): the batch's own
    # plus others drawn uniformly. None scores all C.
    sampled_classes: int | None = None
    threads: int = 1
    device: str = "auto"
    progress_seconds: float = 5.0
    # torch.compile the training forward: on an H100, 1.4x the images/s (benchmarks/RESULTS.md).
    compile: bool = False
    # bf16 autocast on a GPU; off: fp32 there too.
    mixed_precision: bool = True
    # flat: softmax over all the rank's classes. siblings: over the classes sharing the
    # image's parent only (labels/{rank}.tsv's parent column; promptcam.training.hierarchy),
    # selected on val top-1 within siblings and read top-down.
    objective: str = "flat"
    # Data-parallel processes (one per GPU) that train the rank together, each on batch_size
    # images of every step: the global batch is batch_size * gpus, at lr as given
    # (promptcam.training.train, "Several GPUs").
    gpus: int = 1

    def __post_init__(self) -> None:
        if self.gpus < 1:
            raise ValueError(f"gpus must be >= 1 (data-parallel processes), not {self.gpus}")
        if self.epochs < 1 or self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError(f"epochs and batch sizes must be >= 1: {self}")
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise ValueError(f"warmup_epochs must be in [0, epochs]: {self}")
        if self.num_workers < 0 or self.threads < 1 or self.shuffle_buffer < 0:
            raise ValueError(f"num_workers, shuffle_buffer >= 0 and threads >= 1: {self}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, not {self.objective!r}")
        if self.objective == "siblings" and self.sampled_classes is not None:
            raise ValueError(
                "objective siblings scores each image against its siblings only, which the "
                "sampled softmax's uniform draw would estimate badly: unset sampled_classes"
            )
        if self.sampled_classes is not None and self.sampled_classes < self.batch_size:
            raise ValueError(
                f"sampled_classes ({self.sampled_classes}) must be at least batch_size "
                f"({self.batch_size}), so that every image's own class is scored"
            )
