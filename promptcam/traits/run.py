"""Trait identification of one rank's test split, and of new images."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from promptcam.config import EncodePrecision
from promptcam.data.batch_parts import shard_group_info
from promptcam.data.reader import (
    WHOLE_SPLIT,
    ShardGroup,
    TransformConfig,
    load_manifest,
    shard_batch_loader,
    split_shards,
)
from promptcam.io import sha256_file
from promptcam.model.checkpoint import CheckpointMeta
from promptcam.progress import ProgressLines
from promptcam.training.preemption import TrainingPreempted, stop_on_signals
from promptcam.training.runtime import resolve_device
from promptcam.traits.cross_class import CrossClassAccumulator, cross_class_pairs, write_cross_class
from promptcam.traits.information import read_head_information, uninformative_heads
from promptcam.traits.parts import (
    SearchResults,
    TraitsPart,
    check_parts,
    read_part,
    write_part,
)
from promptcam.traits.search import (
    LOGGER,
    Criterion,
    EliminationTrace,
    GreedyConfig,
    StopRule,
    greedy_heads,
    identify_traits,
    stop_search,
)
from promptcam.traits.tables import (
    class_summary,
    search_table,
    write_parquet,
    write_trait_maps,
    write_trait_summary,
)


def traits_for_images(
    checkpoint: str | os.PathLike,
    image_or_dir: str | os.PathLike,
    out_parquet: str | os.PathLike,
    config: GreedyConfig,
    batch_size: int = 16,
    device: str | torch.device | None = None,
    backbone_weights: str | os.PathLike | None = None,
    encode_precision: EncodePrecision = "auto",
) -> pd.DataFrame:
    """Greedy search for each image's *predicted* class; writes and returns one row per image
    and head: ``image``, ``predicted`` (label), ``head``, ``removal_step`` (0 for the first head
    removed, null for kept heads), ``score_after_removal`` (the predicted class's probability
    once that head, and every earlier one, is blurred), then ``predicted_index``, ``kept``,
    ``kept_rank``."""
    from promptcam.model.checkpoint import load_checkpoint
    from promptcam.model.predict import list_images, load_image

    root, names = list_images(image_or_dir)  # first: a wrong path fails before the model loads
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, meta = load_checkpoint(checkpoint, backbone_weights=backbone_weights)
    model.to(device)
    traces = []
    for start in range(0, len(names), batch_size):
        batch = names[start : start + batch_size]
        images = torch.stack([load_image(root / name, meta.preprocessing) for name in batch]).to(
            device
        )
        with torch.inference_mode():
            predicted = model(images).float().argmax(dim=-1)
        traces.append(
            greedy_heads(
                model,
                images,
                predicted,
                config.tie_tolerance,
                encode_precision,
                config.criterion,
                config.rivals,
            )
        )
    search = stop_search(EliminationTrace.concatenate(traces), config)
    table = search_table(search, names, meta.label_names)
    table = table.rename(columns={"predicted": "predicted_index", "predicted_label": "predicted"})
    columns = [
        "image",
        "predicted",
        "head",
        "removal_step",
        "score_after_removal",
        "predicted_index",
        "kept",
        "kept_rank",
    ]
    table = table[columns]
    write_parquet(out_parquet, table)
    return table


@dataclass(frozen=True)
class TraitRunConfig:
    """The config's ``traits`` section (less its subsections, which other rules own): the
    search's criterion and stop rule (``criterion``, ``rivals``, ``stop``, ``top_traits``,
    ``tie_tolerance``: see :class:`GreedyConfig`), whether heads without class information are
    dropped (``drop_uninformative_heads``: see :mod:`promptcam.traits.information`), the
    batching, the seconds between progress lines and the cross-class pairs. Defaults as in
    the schema, except ``threads`` (torch's threads: the adapter gives the job's).

    ``cross_class_pairs`` maps a rank to its ``[image class, prompt class]`` label pairs;
    ``siblings`` adds every ordered pair of sibling classes.
    """

    stop: StopRule = "top-k"
    top_traits: int = 4
    tie_tolerance: float = 1e-5
    criterion: Criterion = "reference"
    rivals: int = 16
    drop_uninformative_heads: bool = True
    encode_precision: EncodePrecision = "auto"
    batch_size: int = 32
    num_workers: int = 0
    threads: int = 1
    device: str = "auto"
    progress_seconds: float = 10.0
    cross_class_pairs: Mapping[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)
    siblings: bool = True

    def __post_init__(self) -> None:
        self.greedy  # noqa: B018 - validates the stop rule now, not after the forward passes

    @property
    def greedy(self) -> GreedyConfig:
        return GreedyConfig(
            stop=self.stop,
            top_traits=self.top_traits,
            tie_tolerance=self.tie_tolerance,
            criterion=self.criterion,
            rivals=self.rivals,
        )


def sibling_groups_of(
    meta: CheckpointMeta, labels_tsv: str | os.PathLike | None, checkpoint: str | os.PathLike
) -> torch.Tensor | None:
    """Each class's sibling group (C,) if the checkpoint was trained among siblings, else None."""
    from promptcam.training.hierarchy import read_sibling_groups

    train_config = meta.extra.get("train_config", {})
    if train_config.get("objective", "flat") != "siblings":
        return None
    if labels_tsv is None:
        raise ValueError(
            f"{checkpoint} was trained among siblings (train.objective: siblings): its traits "
            "are searched the parent given, which needs the rank's label map (labels_tsv)"
        )
    return torch.as_tensor(read_sibling_groups(labels_tsv))


def dropped_heads(
    config: TraitRunConfig, head_information: str | os.PathLike | None, num_heads: int
) -> list[int]:
    """The heads the search drops: those ``head_information`` marks uninformative, if
    ``config.drop_uninformative_heads``."""
    if not config.drop_uninformative_heads:
        return []
    if head_information is None:
        raise ValueError(
            "traits.drop_uninformative_heads needs the head-information table "
            "(results/{rank}/head_information.tsv, rule head_information); "
            "or set traits.drop_uninformative_heads: false"
        )
    table = read_head_information(head_information)
    if len(table) != num_heads:
        raise ValueError(
            f"{head_information} has {len(table)} heads, the model {num_heads}: it belongs to "
            "another model; rerun the head_information rule"
        )
    return uninformative_heads(table)


def _search_info(
    *,
    checkpoint: str | os.PathLike,
    shards_dir: str | os.PathLike,
    group: ShardGroup,
    config: TraitRunConfig,
    device: torch.device,
    label_names: Sequence[str],
    pairs: Sequence[tuple[int, int, str]],
    dropped: Sequence[int],
    sibling_groups: torch.Tensor | None,
    num_heads: int,
    grid: tuple[int, int],
) -> dict[str, Any]:
    """What a search ran on and with (a part's ``info``), and its fingerprint. Settings that
    change no result (threads, loader workers, progress lines) are left out."""
    settings = asdict(config)
    for key in ("threads", "num_workers", "progress_seconds", "device", "cross_class_pairs"):
        settings.pop(key)
    return shard_group_info(
        shards_dir,
        "test",
        group,
        checkpoint_sha256=sha256_file(checkpoint),
        device=device.type,
        label_names=list(label_names),
        pairs=[[a, b, why] for a, b, why in pairs],
        dropped=list(dropped),
        sibling_groups=None if sibling_groups is None else sibling_groups.tolist(),
        num_heads=num_heads,
        grid=list(grid),
        settings=settings,
    )


def search_shard_group(
    *,
    checkpoint: str | os.PathLike,
    shards_dir: str | os.PathLike,
    rank: str,
    config: TraitRunConfig,
    group: ShardGroup = WHOLE_SPLIT,
    siblings: Mapping[str, Sequence[str]] | None = None,
    labels_tsv: str | os.PathLike | None = None,
    head_information: str | os.PathLike | None = None,
    backbone_weights: str | os.PathLike | None = None,
    state_path: str | os.PathLike | None = None,
) -> TraitsPart:
    """The greedy search of the test shards of ``group`` (see :func:`run_rank_traits`).

    With ``state_path``, SIGTERM or SIGUSR1 stops the search at the next batch boundary: the
    batches so far are saved there (atomically) and :class:`TrainingPreempted` is raised; the
    next call with the same inputs and settings resumes after them (another fingerprint starts
    over), and the state file goes once the search is done.
    """
    from promptcam.model.checkpoint import load_checkpoint

    torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    model, meta = load_checkpoint(checkpoint, backbone_weights=backbone_weights)
    model.to(device)
    label_names = list(meta.label_names)
    groups = sibling_groups_of(meta, labels_tsv, checkpoint)
    dropped = dropped_heads(config, head_information, model.num_heads)
    pairs = cross_class_pairs(
        label_names,
        config.cross_class_pairs.get(rank, ()),
        siblings if config.siblings else None,
    )
    info = _search_info(
        checkpoint=checkpoint,
        shards_dir=shards_dir,
        group=group,
        config=config,
        device=device,
        label_names=label_names,
        pairs=pairs,
        dropped=dropped,
        sibling_groups=groups,
        num_heads=model.num_heads,
        grid=model.patch_grid,
    )
    results = SearchResults(info) if state_path is None else SearchResults.resume(state_path, info)
    loader = shard_batch_loader(
        shards_dir,
        "test",
        rank,
        TransformConfig.unaugmented(meta.preprocessing),
        config.batch_size,
        config.num_workers,
        device,
        group=group,
        skip=results.done(),
    )
    lines = ProgressLines(config.progress_seconds)
    total = len(loader.dataset)  # the group's images, the finished ones included
    where = "" if group == WHOLE_SPLIT else f" (shard group {group.name})"
    if results.num_images:
        lines.report("resuming after %d searched test images", results.num_images, force=True)
    lines.report(
        "searching the trait heads of %d test images%s on %s", total, where, device, force=True
    )
    with stop_on_signals() as stop:
        for images, labels, batch_meta in loader:
            result = identify_traits(
                model,
                images.to(device),
                labels.to(device),
                config.greedy.tie_tolerance,
                config.encode_precision,
                None if groups is None else groups.to(device),
                config.criterion,
                config.rivals,
                dropped,
            )
            sample_ids = list(batch_meta["sample_id"])
            results.shard_sums(batch_meta["shard"]).update(
                labels, result.scores, result.attention, sample_ids
            )
            maps = result.target_maps().float().cpu().numpy()
            results.add(batch_meta["shard"], batch_meta["batch"], sample_ids, result.trace, maps)
            lines.report("%d/%d test images (%.0f s)", results.num_images, total, lines.elapsed())
            if stop and state_path is not None:
                results.save(state_path)
                raise TrainingPreempted(Path(state_path), stop.signal_name)
    if state_path is not None:
        Path(state_path).unlink(missing_ok=True)
    return results.part()


def write_trait_outputs(
    parts: Sequence[TraitsPart],
    outputs: Mapping[str, str | os.PathLike],
    config: TraitRunConfig,
    rank: str,
    seconds: float = 0.0,
) -> pd.DataFrame:
    """The traits rule's six files from the parts of one search, concatenated in shard order
    (one part: the whole split)."""
    info = parts[0].info
    greedy = {name: info["settings"][name] for name in GreedyConfig.__dataclass_fields__}
    if greedy != asdict(config.greedy):
        raise ValueError(
            f"the parts were searched with {greedy}, the config says {asdict(config.greedy)}: "
            "rerun rule traits_part"
        )
    label_names, dropped = info["label_names"], info["dropped"]
    grid, num_heads = tuple(info["grid"]), info["num_heads"]
    image_ids = [image for part in parts for image in part.image_ids]
    if not image_ids:
        raise ValueError(f"no test images for rank {rank!r} in the shards' test split")
    trace = EliminationTrace.concatenate([part.trace for part in parts])
    search = stop_search(trace, config.greedy, len(dropped))
    pairs = [(int(a), int(b), str(why)) for a, b, why in info["pairs"]]
    cross = CrossClassAccumulator(pairs, num_heads, grid[0] * grid[1])
    for part in parts:
        for shard in sorted(part.cross):
            cross.add(part.cross[shard])
    LOGGER.info(
        "%s: %d test images (%d correctly classified, searched) in %.1f s on %s; %s; "
        "dropped as uninformative: %s",
        rank,
        len(image_ids),
        int(search.trace.searched.sum()),
        seconds,
        info["device"],
        config.greedy,
        dropped or "none",
    )
    all_maps = np.concatenate([part.maps for part in parts]).reshape(
        len(image_ids), num_heads, *grid
    )
    table = search_table(search, image_ids, label_names)
    summary, mean_maps = class_summary(table, all_maps, label_names)
    write_parquet(outputs["table"], table)
    write_trait_maps(outputs["maps"], image_ids, search, all_maps, label_names)
    write_trait_summary(
        outputs["summary"], outputs["summary_maps"], summary, mean_maps, label_names
    )
    write_cross_class(outputs["cross_class"], outputs["cross_class_maps"], cross, label_names, grid)
    ProgressLines().report(
        "wrote %s and 5 more: %d test images, %d correctly classified and searched (%.0f s)",
        outputs["table"],
        len(image_ids),
        int(search.trace.searched.sum()),
        seconds,
        force=True,
    )
    return table


def run_rank_traits(
    *,
    checkpoint: str | os.PathLike,
    shards_dir: str | os.PathLike,
    rank: str,
    outputs: Mapping[str, str | os.PathLike],
    config: TraitRunConfig,
    siblings: Mapping[str, Sequence[str]] | None = None,
    labels_tsv: str | os.PathLike | None = None,
    head_information: str | os.PathLike | None = None,
    backbone_weights: str | os.PathLike | None = None,
    state_path: str | os.PathLike | None = None,
) -> pd.DataFrame:
    """Greedy search on the test split of one rank; writes every output of the traits rule.

    With ``config.drop_uninformative_heads``, the heads that ``head_information``
    (``head_information.tsv``) found to carry no class information are blurred first and
    never kept.

    A model trained among siblings (its checkpoint's ``train_config.objective``) is searched
    among each image's siblings (the parent given), read from ``labels_tsv``
    (``labels/{rank}.tsv``), which it then needs.

    ``outputs`` keys: ``table`` (traits.parquet), ``maps`` (trait_maps.npz), ``summary``
    (trait_summary.tsv), ``summary_maps`` (trait_summary.npz), ``cross_class``
    (cross_class.tsv), ``cross_class_maps`` (cross_class.npz). The last block runs in fp32:
    reduced precision would blur the score differences the greedy ranks heads by; the blocks
    before it run in ``config.encode_precision``. Batches never cross a shard, so the files
    are those that :func:`run_traits_part` and :func:`gather_rank_traits` write over shard
    groups (:mod:`promptcam.traits.parts`). ``state_path``: see :func:`search_shard_group`.
    """
    start = time.perf_counter()
    part = search_shard_group(
        checkpoint=checkpoint,
        shards_dir=shards_dir,
        rank=rank,
        config=config,
        siblings=siblings,
        labels_tsv=labels_tsv,
        head_information=head_information,
        backbone_weights=backbone_weights,
        state_path=state_path,
    )
    return write_trait_outputs([part], outputs, config, rank, time.perf_counter() - start)


def run_traits_part(
    *,
    out_part: str | os.PathLike,
    group: ShardGroup,
    state_path: str | os.PathLike | None = None,
    **search: Any,
) -> int:
    """The search of one shard ``group`` (``search``: the arguments of
    :func:`search_shard_group`) written as a part file; returns its number of images."""
    part = search_shard_group(group=group, state_path=state_path, **search)
    write_part(out_part, part)
    ProgressLines().report(
        "wrote %s: %d test images of shard group %s",
        out_part,
        len(part.image_ids),
        group.name,
        force=True,
    )
    return len(part.image_ids)


def gather_rank_traits(
    *,
    parts: Sequence[str | os.PathLike],
    shards_dir: str | os.PathLike,
    rank: str,
    outputs: Mapping[str, str | os.PathLike],
    config: TraitRunConfig,
) -> pd.DataFrame:
    """The traits rule's files from the part files of shard groups 1..n (in that order), byte
    for byte those of :func:`run_rank_traits` over the whole split."""
    loaded = [read_part(path) for path in parts]
    test_shards = [entry["file"] for entry in split_shards(load_manifest(shards_dir), "test")]
    check_parts(loaded, parts, test_shards)
    return write_trait_outputs(loaded, outputs, config, rank)
