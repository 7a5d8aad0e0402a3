"""Trait identification of one rank's test split, and of new images."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from promptcam.config import EncodePrecision
from promptcam.data.reader import TransformConfig, load_manifest, split_loader, split_size
from promptcam.model.checkpoint import CheckpointMeta
from promptcam.progress import ProgressLines
from promptcam.training.runtime import resolve_device
from promptcam.traits.cross_class import CrossClassAccumulator, cross_class_pairs, write_cross_class
from promptcam.traits.search import (
    LOGGER,
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
            greedy_heads(model, images, predicted, config.tie_tolerance, encode_precision)
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
    """The config's ``traits`` section (less ``localization`` and ``fidelity``): the search's
    stop rule (``stop``, ``top_traits``, ``tie_tolerance``: see :class:`GreedyConfig`), the
    batching and the cross-class pairs. Defaults as in the schema, except ``threads`` (torch's
    threads: the adapter gives the job's).

    ``cross_class_pairs`` maps a rank to its ``[image class, prompt class]`` label pairs;
    ``siblings`` adds every ordered pair of sibling classes.
    """

    stop: StopRule = "top-k"
    top_traits: int = 4
    tie_tolerance: float = 1e-5
    encode_precision: EncodePrecision = "auto"
    batch_size: int = 32
    num_workers: int = 0
    threads: int = 1
    device: str = "auto"
    cross_class_pairs: Mapping[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)
    siblings: bool = True

    def __post_init__(self) -> None:
        self.greedy  # noqa: B018 - validates the stop rule now, not after the forward passes

    @property
    def greedy(self) -> GreedyConfig:
        return GreedyConfig(
            stop=self.stop, top_traits=self.top_traits, tie_tolerance=self.tie_tolerance
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


def run_rank_traits(
    *,
    checkpoint: str | os.PathLike,
    shards_dir: str | os.PathLike,
    rank: str,
    outputs: Mapping[str, str | os.PathLike],
    config: TraitRunConfig,
    siblings: Mapping[str, Sequence[str]] | None = None,
    labels_tsv: str | os.PathLike | None = None,
    backbone_weights: str | os.PathLike | None = None,
) -> pd.DataFrame:
    """Greedy search on the test split of one rank; writes every output of the traits rule.

    A model trained among siblings (its checkpoint's ``train_config.objective``) is searched
    among each image's siblings (the parent given), read from ``labels_tsv``
    (``labels/{rank}.tsv``), which it then needs.

    ``outputs`` keys: ``table`` (traits.parquet), ``maps`` (trait_maps.npz), ``summary``
    (trait_summary.tsv), ``summary_maps`` (trait_summary.npz), ``cross_class``
    (cross_class.tsv), ``cross_class_maps`` (cross_class.npz). The last block runs in fp32:
    reduced precision would blur the score differences the greedy ranks heads by; the blocks
    before it run in ``config.encode_precision``.
    """
    from promptcam.model.checkpoint import load_checkpoint

    torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    model, meta = load_checkpoint(checkpoint, backbone_weights=backbone_weights)
    model.to(device)
    label_names = list(meta.label_names)
    groups = sibling_groups_of(meta, labels_tsv, checkpoint)
    pairs = cross_class_pairs(
        label_names,
        config.cross_class_pairs.get(rank, ()),
        siblings if config.siblings else None,
    )
    grid = model.patch_grid
    cross = CrossClassAccumulator(pairs, model.num_heads, grid[0] * grid[1])
    loader = split_loader(
        shards_dir,
        "test",
        rank,
        TransformConfig.unaugmented(meta.preprocessing),
        config.batch_size,
        config.num_workers,
        device,
    )
    image_ids, traces, maps = [], [], []
    start = time.perf_counter()
    lines, total = ProgressLines(), split_size(load_manifest(shards_dir), "test")
    lines.report("searching the trait heads of %d test images on %s", total, device, force=True)
    for images, labels, batch_meta in loader:
        result = identify_traits(
            model,
            images.to(device),
            labels.to(device),
            config.greedy.tie_tolerance,
            config.encode_precision,
            None if groups is None else groups.to(device),
        )
        cross.update(labels, result.scores, result.attention, batch_meta["sample_id"])
        image_ids.extend(batch_meta["sample_id"])
        traces.append(result.trace)
        maps.append(result.target_maps().float().cpu().numpy())
        lines.report("%d/%d test images (%.0f s)", len(image_ids), total, lines.elapsed())
    if not traces:
        raise ValueError(f"no test images for rank {rank!r} in {shards_dir}")
    search = stop_search(EliminationTrace.concatenate(traces), config.greedy)
    seconds = time.perf_counter() - start
    LOGGER.info(
        "%s: %d test images (%d correctly classified, searched) in %.1f s on %s; stop rule %s",
        rank,
        len(image_ids),
        int(search.trace.searched.sum()),
        seconds,
        device,
        config.greedy,
    )
    all_maps = np.concatenate(maps).reshape(len(image_ids), model.num_heads, *grid)
    table = search_table(search, image_ids, label_names)
    summary, mean_maps = class_summary(table, all_maps, label_names)
    write_parquet(outputs["table"], table)
    write_trait_maps(outputs["maps"], image_ids, search, all_maps, label_names)
    write_trait_summary(
        outputs["summary"], outputs["summary_maps"], summary, mean_maps, label_names
    )
    write_cross_class(outputs["cross_class"], outputs["cross_class_maps"], cross, label_names, grid)
    lines.report(
        "wrote %s and 5 more: %d test images, %d correctly classified and searched (%.0f s)",
        outputs["table"],
        len(image_ids),
        int(search.trace.searched.sum()),
        seconds,
        force=True,
    )
    return table
