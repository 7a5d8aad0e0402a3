"""Prompt-CAM training for one taxonomic rank, resumable and reproducible.

Optimisation follows the reference (Imageomics/Prompt_CAM, DINO on CUB): SGD with momentum 0.9,
weight decay 0.001, lr 0.005, batch 16, 130 epochs, cosine schedule with 20 warm-up epochs
(timm's ``CosineLRScheduler`` formula: linear warm-up from ``warmup_lr``, then the cosine of the
*whole* run's position, not of the post-warm-up part). The reference evaluates that schedule
once per epoch; here it is evaluated before every step at the fractional epoch reached
(``epoch + samples seen / samples per epoch``), so it does not depend on how the loader cuts
batches. ``warmup_lr`` and ``min_lr`` are not among the reference facts we have; the defaults
(1e-6, 1e-8) are assumptions.

Large C (scalable layout): ``sampled_classes`` scores per step only the batch's own classes and
others drawn uniformly (:func:`sample_classes`, a sampled softmax), so that a step's last-block
cost follows that number instead of C. Validation and evaluation always score every class.

Objective (``TrainConfig.objective``): ``flat``, the reference's softmax over all the rank's
classes; ``siblings``, a softmax over the classes sharing the image's parent only (the parent
column of ``labels/{rank}.tsv``; :mod:`promptcam.training.hierarchy`), so that genus prompts
learn what separates the genera of a family and species prompts what separates the species
of a genus. At the coarsest rank (one parent) the two are the same computation.

Precision: bf16 autocast on a GPU (the model's attention already uses fused SDPA), fp32 on the
CPU. The model is selected on the *validation* split: the epoch with the best val top-1, the
earlier one on ties. Under ``siblings`` that is the val top-1 among the true class's siblings
(``val_sibling_top1``): the scores of different groups are never compared in training, so a
flat argmax over them is not what the model learnt; the sibling top-1 is the rank's accuracy
in top-down inference when the ranks above are right. The test split is never read here.

Outputs in ``out_dir``:

- ``model.pt``: the selected epoch's trainable tensors, the model config, the label names and
  the backbone's identity (:func:`promptcam.model.checkpoint.save_checkpoint`), written at the end;
- ``metrics.tsv``: one row per finished epoch (``epoch`` counts from 1, ``lr`` at the epoch's
  last step, ``train_loss``, ``train_top1``, ``val_loss``, ``val_top1``, ``seconds``; with
  ``sampled_classes`` the train columns are over each step's scored classes, validation
  always over all; under ``siblings`` the losses and ``train_top1`` are over each image's
  siblings, ``val_top1`` stays flat and a last column ``val_sibling_top1`` is added);
- ``last.pt``: the training state after the last finished epoch (trainable tensors, optimizer
  with its momentum buffers, epochs done, which fixes the schedule position, the best epoch so
  far with its tensors, the metrics rows), or after the last step before a stop signal (then
  also the position inside the epoch; :mod:`promptcam.training.state`), removed when training
  completes.

Resume: a run that finds a ``last.pt`` of the same settings continues where it stopped and
ends with the same tensors and metrics (less ``seconds``) as an uninterrupted run
(bit-identical on the CPU). Every random draw of an epoch derives from ``(seed, epoch)``:
shard and sample shuffling and each sample's crop and flip
(:class:`promptcam.data.reader.TrainingStream`), and the global RNGs (prompt dropout,
drop-path, the sampled classes), re-seeded from that pair (plus the process's rank) at the
start of each epoch. A stop inside an epoch also saves where those RNGs stood and how far each
loader lane had got; the resumed epoch re-reads its lanes without decoding the samples already
trained on and puts the RNGs back.

Preemption and time limits (:mod:`promptcam.training.preemption`): SIGTERM or SIGUSR1 makes
the run save ``last.pt`` after its current optimizer step (or keep the one of an epoch it just
finished) and stop with :class:`TrainingPreempted`; the entry points (``scripts/train.py``,
``python -m promptcam.training.launch``) exit with ``PREEMPTED_EXIT_CODE`` (75), and the rule's
retry resumes it.

Several GPUs (``gpus: N``, :mod:`promptcam.training.distributed`): N processes train with
``DistributedDataParallel``, each on ``batch_size`` images of every step, so the global batch
is ``batch_size * N``. The learning rate is used as given for that global batch (no automatic
scaling): ``gpus: N`` trains what one process with ``batch_size * N`` trains, with the same
``lr``. To keep the reference's rate per image instead, scale it yourself (linear rule: lr =
0.005 * batch_size * N / 16). Every process sees exactly its share of each global batch
(the shard reader's rule; a short last chunk's leftovers, fewer than N images, sit out the
epoch), DDP averages their gradients, and a per-image mean loss over equal shares makes that
the global batch's mean gradient. With prompt dropout, drop-path or sampled classes, which
draw per process, the result equals the one-process run in distribution, not tensor for tensor.
Process 0 validates and writes every file; all processes stop together on a signal.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from promptcam.config import settings_from_config
from promptcam.data.metadata import read_label_names
from promptcam.data.reader import (
    ReplicaSlice,
    TrainingStream,
    TransformConfig,
    epoch_seed,
    load_manifest,
    make_loader,
    split_loader,
    split_size,
    useful_workers,
)
from promptcam.model.checkpoint import load_trainable, save_checkpoint, trainable_state
from promptcam.model.prompt_cam import PromptCAM
from promptcam.model.spec import Preprocessing, PromptCAMConfig, backbone_spec
from promptcam.progress import ProgressLines
from promptcam.training.distributed import (
    Processes,
    any_process,
    barrier,
    gather,
    sum_over_processes,
)
from promptcam.training.hierarchy import read_label_parents, read_sibling_groups
from promptcam.training.metrics import write_metrics
from promptcam.training.preemption import TrainingPreempted, stop_on_signals
from promptcam.training.runtime import (
    resolve_device,
    restore_rng_states,
    rng_states,
    seed_everything,
)
from promptcam.training.settings import TrainConfig
from promptcam.training.state import (
    STATE_FORMAT,
    EpochPosition,
    ProcessPosition,
    run_fingerprint,
    run_identity,
    save_training_state,
    start_or_resume,
)
from promptcam.training.steps import (
    EpochStats,
    EpochTally,
    build_optimizer,
    learning_rate,
    train_steps,
    validate,
    validate_siblings,
)

LOGGER = logging.getLogger(__name__)


def resolve_transform(
    preprocessing: Preprocessing, settings: Mapping[str, Any] | None
) -> TransformConfig:
    """The train transform for a backbone whose inputs are ``preprocessing`` (its size, mean,
    std and interpolation; one source for training and evaluation), with the train settings'
    ``resize_size`` (default: the reference's 240 for 224, scaled)."""
    values = dict(settings or {})
    moved = sorted({"mean", "std", "interpolation"} & set(values))
    if moved:
        raise ValueError(
            f"train transform settings {moved} moved to backbone.preprocessing, which training "
            "and evaluation share (unset: what the backbone's weights expect)"
        )
    height, width = preprocessing.img_size
    if height != width:
        raise ValueError(
            f"the backbone takes {height}x{width} images, but the shard reader makes square "
            "ones: set backbone.kwargs.img_size to one number"
        )
    if values.setdefault("img_size", height) != height:
        raise ValueError(f"transform img_size {values['img_size']} != backbone input {height}")
    values.setdefault("resize_size", round(height * 240 / 224))
    return TransformConfig(
        **values,
        mean=tuple(preprocessing.mean),
        std=tuple(preprocessing.std),
        interpolation=preprocessing.interpolation,
    )


SELECTION_NAMES = {"val_top1": "val top-1", "val_sibling_top1": "val top-1 within siblings"}


def selection_metric(config: TrainConfig) -> str:
    """The metrics column that selects the checkpoint (see the module docstring)."""
    return "val_top1" if config.objective == "flat" else "val_sibling_top1"


def _validation_row(
    model: PromptCAM, loader: Any, device: torch.device, groups: torch.Tensor | None
) -> dict[str, float]:
    if groups is None:
        val_loss, val_top1 = validate(model, loader, device)
        return {"val_loss": val_loss, "val_top1": val_top1}
    result = validate_siblings(model, loader, device, groups)
    return {
        "val_loss": result.loss,
        "val_top1": result.top1,
        "val_sibling_top1": result.sibling_top1,
    }


@contextlib.contextmanager
def _progress_bar(config: TrainConfig, total: int, initial: int, show: bool) -> Iterator[tqdm]:
    with tqdm(
        total=total,
        initial=initial,
        unit="img",
        mininterval=config.progress_seconds,
        desc="train",
        ascii=True,
        disable=not show,
    ) as bar:
        yield bar


def process_seed(seed: int, epoch: int, rank: int) -> int:
    """Seed of the global RNGs of process ``rank`` in ``epoch``: its own dropout masks."""
    return (epoch_seed(seed, epoch) + rank) % 2**63


def _check_processes(config: TrainConfig, processes: Processes) -> None:
    if config.gpus != processes.world_size:
        raise ValueError(
            f"train gpus is {config.gpus} but {processes.world_size} process(es) are training: "
            "start one process per GPU (promptcam.training.launch.train_in_processes, or "
            f"torchrun --nproc-per-node {config.gpus} -m promptcam.training.launch SPEC), "
            "or set train.ranks.<rank>.gpus to the number of processes"
        )


def _process_device(config: TrainConfig, processes: Processes) -> torch.device:
    device = resolve_device(config.device)
    if processes.world_size > 1 and device.type == "cuda" and device.index is None:
        return torch.device("cuda", processes.local_rank)
    return device


def _data_parallel(model: PromptCAM, processes: Processes, device: torch.device) -> nn.Module:
    if processes.world_size == 1:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def _resumed_tally(
    position: EpochPosition | None, rank: int, device: torch.device, lr: float
) -> EpochTally:
    if position is None:
        return EpochTally.empty(device, lr)
    own = position.processes[rank]
    return EpochTally(
        loss_sum=own.loss_sum.to(device),
        correct=own.correct.to(device),
        seen=own.seen,
        steps=position.steps,
        chunks_done=dict(position.chunks_done),
        lr=position.lr,
    )


def _epoch_stats(tally: EpochTally, processes: Processes, device: torch.device) -> EpochStats:
    """The epoch's train metrics over every process's samples."""
    if processes.world_size == 1:
        return tally.stats()
    sums = torch.stack(
        [tally.loss_sum.double(), tally.correct.double(), torch.tensor(float(tally.seen))]
    )
    loss_sum, correct, seen = sum_over_processes(processes, sums.to(device)).tolist()
    return EpochStats(lr=tally.lr, loss=loss_sum / seen, top1=correct / seen, samples=int(seen))


def _epoch_position(
    tally: EpochTally, config: TrainConfig, epoch: int, processes: Processes, device: torch.device
) -> EpochPosition:
    own = ProcessPosition(
        loss_sum=tally.loss_sum.detach().cpu(),
        correct=tally.correct.detach().cpu(),
        seen=tally.seen,
        rng=rng_states(device),
    )
    return EpochPosition(
        steps=tally.steps,
        chunks_done=dict(tally.chunks_done),
        lr=tally.lr,
        epoch_seed=epoch_seed(config.seed, epoch),
        processes=gather(processes, own),
    )


def train_rank(
    *,
    shards_dir: str | os.PathLike,
    rank: str,
    labels_tsv: str | os.PathLike,
    backbone: Mapping[str, Any],
    model_config: Mapping[str, Any],
    train_config: TrainConfig,
    out_dir: str | os.PathLike,
    transform: Mapping[str, Any] | None = None,
    processes: Processes | None = None,
) -> Path:
    """Train Prompt-CAM for ``rank`` on the shards' train split; return ``out_dir/model.pt``.

    Args:
        shards_dir: Folder of the WebDataset shards and their ``manifest.json``.
        rank: Which labels to learn (a level of the shards).
        labels_tsv: ``labels/{rank}.tsv``: the classes, in index order.
        backbone: :func:`backbone_spec` settings of the frozen ViT.
        model_config: :class:`PromptCAMConfig` settings except ``num_classes`` (from the labels).
        train_config: Optimisation, data order and runtime settings.
        out_dir: Where ``model.pt``, ``metrics.tsv`` and the resumable ``last.pt`` go.
        transform: Image transform settings, see :func:`resolve_transform`.
        processes: This process's place among ``train_config.gpus`` data-parallel processes
            (:func:`promptcam.training.distributed.process_group`); None: the only one.

    Raises:
        TrainingPreempted: a SIGTERM or SIGUSR1 stopped it after saving ``last.pt``.
    """
    config = train_config
    processes = processes or Processes()
    _check_processes(config, processes)
    torch.set_num_threads(config.threads)
    device = _process_device(config, processes)
    out_dir = Path(out_dir)
    label_names = read_label_names(labels_tsv)
    spec = backbone_spec(backbone)
    prompt_config = settings_from_config(
        PromptCAMConfig, {**model_config, "num_classes": len(label_names)}, "train.model"
    )
    if config.sampled_classes is not None and prompt_config.layout != "scalable":
        raise ValueError(
            f"train.sampled_classes ({config.sampled_classes}) needs model.layout: scalable; "
            "the reference layout's class prompts attend to each other, so each step must "
            "score all of them: unset sampled_classes or switch the layout"
        )
    groups = None
    if config.objective == "siblings":
        groups = torch.as_tensor(read_sibling_groups(labels_tsv), device=device)
    selected_on = selection_metric(config)
    manifest = load_manifest(shards_dir)
    if split_size(manifest, "val") == 0:
        raise ValueError(f"{shards_dir} has no validation images: model selection needs some")

    seed_everything(config.seed)  # fixes the prompt initialisation (the same on every process)
    model = PromptCAM(spec, prompt_config).to(device)
    transform = resolve_transform(model.preprocessing, transform)
    optimizer = build_optimizer(model, config)
    fingerprint = run_fingerprint(
        run_identity(
            config=config,
            prompt_config=prompt_config,
            spec=spec,
            rank=rank,
            label_names=label_names,
            transform=transform,
            manifest=manifest,
        )
    )

    replica_slice = ReplicaSlice(
        global_batch=config.batch_size * processes.world_size,
        replicas=processes.world_size,
        replica=processes.rank,
    )
    train_set = TrainingStream(
        shards_dir,
        "train",
        rank,
        replica_slice=replica_slice,
        transform=transform,
        shuffle_buffer=config.shuffle_buffer,
        seed=config.seed,
    )
    samples_per_epoch = len(train_set)
    if samples_per_epoch == 0:
        raise ValueError(f"{shards_dir} has no training images")
    train_loader = make_loader(
        train_set,
        replica_slice.local_batch,
        useful_workers(train_set, config.num_workers),
        pin_memory=device.type == "cuda",
    )
    val_loader = split_loader(
        shards_dir,
        "val",
        rank,
        transform,
        config.eval_batch_size,
        config.num_workers,
        device,
        split_by_node=False,
    )

    # Console lines: at most one epoch every progress_seconds (the log has every epoch).
    epoch_lines = ProgressLines(config.progress_seconds)
    state_path = out_dir / "last.pt"
    resumed = start_or_resume(state_path, fingerprint, model, optimizer)
    history, best = resumed.history, resumed.best
    start_epoch, position = resumed.epochs_done, resumed.position
    main = processes.is_main
    if main:
        # Progress lines go to the log too (and, in a workflow job, to the console).
        epoch_lines.report(
            "%s: %d classes, %d train images per epoch, epochs %d..%d on %s x %d%s",
            rank,
            len(label_names),
            samples_per_epoch,
            start_epoch + 1,
            config.epochs,
            device,
            processes.world_size,
            "" if position is None else f" (resuming after step {position.steps})",
            force=True,
        )
    if position is not None and position.epoch_seed != epoch_seed(config.seed, start_epoch):
        raise ValueError(f"{state_path}: its position is not in epoch {start_epoch + 1}")
    # Compiled for training only: its wrapper shares the parameters, which are what is saved.
    train_forward = _data_parallel(model, processes, device)
    train_forward = torch.compile(train_forward) if config.compile else train_forward
    total = config.epochs * samples_per_epoch
    initial = start_epoch * samples_per_epoch
    if position is not None:
        initial += sum(process.seen for process in position.processes)

    def save_state(epochs_done: int, at: EpochPosition | None) -> None:
        save_training_state(
            state_path,
            {
                "format": STATE_FORMAT,
                "fingerprint": fingerprint,
                "epoch": epochs_done,
                "tensors": trainable_state(model),
                "optimizer": optimizer.state_dict(),
                "best": best,
                "history": history,
                "position": None if at is None else at.as_dict(),
            },
        )

    with stop_on_signals() as stop, _progress_bar(config, total, initial, main) as progress:
        for epoch in range(start_epoch, config.epochs):
            started = time.perf_counter()
            seed_everything(process_seed(config.seed, epoch, processes.rank))
            train_set.set_epoch(epoch)
            train_set.resume_after({} if position is None else position.chunks_done)
            # Started before the RNGs are put back: starting draws the loader's base seed, as
            # it did at the start of the interrupted epoch.
            batches = iter(train_loader)
            tally = _resumed_tally(position, processes.rank, device, learning_rate(epoch, config))
            if position is not None:
                restore_rng_states(position.processes[processes.rank].rng, device)
            position = None
            finished = train_steps(
                train_forward,
                batches,
                optimizer,
                tally,
                num_classes=prompt_config.num_classes,
                epoch=epoch,
                samples_per_epoch=samples_per_epoch,
                config=config,
                device=device,
                progress=progress,
                groups=groups,
                processes=processes.world_size,
                stop_requested=lambda: any_process(processes, bool(stop)),
            )
            if not finished:
                at = _epoch_position(tally, config, epoch, processes, device)
                if main:
                    save_state(epoch, at)
                barrier(processes)
                raise TrainingPreempted(state_path, stop.signal_name)
            stats = _epoch_stats(tally, processes, device)
            if main:
                validation = _validation_row(model, val_loader, device, groups)
                row = {
                    "epoch": epoch + 1,
                    "lr": stats.lr,
                    "train_loss": stats.loss,
                    "train_top1": stats.top1,
                    **validation,
                    "seconds": time.perf_counter() - started,
                }
                history.append(row)
                # Strictly better only: on ties the earlier epoch stays selected.
                val_top1 = row[selected_on]
                if val_top1 > best.get(selected_on, -1.0):
                    scores = {k: row[k] for k in ("val_top1", selected_on)}
                    best = {"epoch": epoch + 1, **scores, "tensors": trainable_state(model)}
                progress.set_postfix(
                    epoch=epoch + 1, loss=f"{stats.loss:.3f}", val=f"{val_top1:.3f}"
                )
                LOGGER.info("%s epoch %d: %s", rank, epoch + 1, row)
                epoch_lines.report(
                    "epoch %d/%d loss %.3f %s %.3f (%.0f s)",
                    epoch + 1,
                    config.epochs,
                    stats.loss,
                    SELECTION_NAMES[selected_on],
                    val_top1,
                    row["seconds"],
                    force=epoch + 1 == config.epochs,
                )
                write_metrics(out_dir / "metrics.tsv", history)
                save_state(epoch + 1, None)
            barrier(processes)
            if epoch + 1 < config.epochs and any_process(processes, bool(stop)):
                raise TrainingPreempted(state_path, stop.signal_name)

    if not main:
        return out_dir / "model.pt"
    load_trainable(model, best["tensors"])
    model_path = out_dir / "model.pt"
    save_checkpoint(
        model_path,
        model,
        label_names=label_names,
        preprocessing=model.preprocessing,
        extra={
            "rank": rank,
            "selected_on": selected_on,
            "best_epoch": best["epoch"],
            "best_val_top1": best["val_top1"],
            **({} if groups is None else {"best_val_sibling_top1": best["val_sibling_top1"]}),
            "epochs": config.epochs,
            "train_config": dataclasses.asdict(config),
            # Each class's parent: a siblings model is read top-down from it.
            "label_parents": read_label_parents(labels_tsv),
            "transform": dataclasses.asdict(transform),
            "fingerprint": fingerprint,
        },
    )
    # Finished: the state has served its purpose (a forced rerun trains afresh).
    state_path.unlink(missing_ok=True)
    epoch_lines.report(
        "wrote %s: epoch %d selected (%s %.4f)",
        model_path,
        best["epoch"],
        SELECTION_NAMES[selected_on],
        best[selected_on],
        force=True,
    )
    return model_path
