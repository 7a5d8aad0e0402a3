"""Trait identification of one rank's test split, and of new images."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from promptcam.config import EncodePrecision
from promptcam.data.reader import TransformConfig, split_loader
from promptcam.training.runtime import resolve_device
from promptcam.traits.cross_class import CrossClassAccumulator, cross_class_pairs, write_cross_class
from promptcam.traits.search import (
    LOGGER,
    EliminationTrace,
    GreedyConfig,
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

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, meta = load_checkpoint(checkpoint, backbone_weights=backbone_weights)
    model.to(device)
    root, names = list_images(image_or_dir)
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
    """The workflow's ``traits`` section: the search, the batching and the cross-class pairs.

    ``cross_class_pairs`` lists ``[image class, prompt class]`` label pairs of this rank;
    ``siblings`` adds every ordered pair of sibling classes.
    """

    greedy: GreedyConfig = field(default_factory=GreedyConfig)
    encode_precision: EncodePrecision = "auto"
    batch_size: int = 32
    num_workers: int = 0
    threads: int = 1
    device: str = "auto"
    cross_class_pairs: tuple[tuple[str, str], ...] = ()
    siblings: bool = True

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], rank: str) -> TraitRunConfig:
        """From the config's ``traits`` section; ``cross_class_pairs`` is ``{rank: [[a, b]]}``."""
        pairs = values.get("cross_class_pairs", {}).get(rank, [])
        return cls(
            greedy=GreedyConfig(
                stop=values.get("stop", "top-k"),
                top_traits=int(values.get("top_traits", 4)),
                tie_tolerance=float(values.get("tie_tolerance", 1e-5)),
            ),
            encode_precision=values.get("encode_precision", "auto"),
            batch_size=int(values.get("batch_size", 32)),
            num_workers=int(values.get("num_workers", 0)),
            threads=int(values.get("threads", 1)),
            device=values.get("device", "auto"),
            cross_class_pairs=tuple((str(a), str(b)) for a, b in pairs),
            siblings=bool(values.get("siblings", True)),
        )


def run_rank_traits(
    *,
    checkpoint: str | os.PathLike,
    shards_dir: str | os.PathLike,
    rank: str,
    outputs: Mapping[str, str | os.PathLike],
    config: TraitRunConfig,
    siblings: Mapping[str, Sequence[str]] | None = None,
    backbone_weights: str | os.PathLike | None = None,
) -> pd.DataFrame:
    """Greedy search on the test split of one rank; writes every output of the traits rule.

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
    pairs = cross_class_pairs(
        label_names, config.cross_class_pairs, siblings if config.siblings else None
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
    for images, labels, batch_meta in loader:
        result = identify_traits(
            model,
            images.to(device),
            labels.to(device),
            config.greedy.tie_tolerance,
            config.encode_precision,
        )
        cross.update(labels, result.scores, result.attention)
        image_ids.extend(batch_meta["sample_id"])
        traces.append(result.trace)
        maps.append(result.target_maps().float().cpu().numpy())
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
    return table
