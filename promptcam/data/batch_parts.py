"""Per-image results of a split's shard batches, kept by ``(shard, batch)``: the part a shard
group's job writes, the state a preempted job resumes from, and the gather of the parts.

Jobs that share a split (one per :class:`promptcam.data.reader.ShardGroup`) compute per-image
arrays batch by batch over :class:`promptcam.data.reader.ShardBatches`, whose batches never
cross a shard. Concatenated in ``(shard, batch)`` order, group after group, the arrays are
those of one job over the whole split, whatever order loader workers delivered the batches in:
anything computed from them is the same byte for byte, however the split was cut.

One file format serves the part and the saved state (``np.savez``, no pickles): ``format``,
``info`` (JSON: what the results were computed on and with, and its ``fingerprint``), ``key``
(N, 2) each image's shard and batch, and every per-image array as ``array_{name}``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from promptcam.data.reader import ShardGroup, load_manifest, split_shards
from promptcam.io import atomic_open

LOGGER = logging.getLogger(__name__)

BATCH_RESULTS_FORMAT = "promptcam-batch-results/1"
# The info keys that differ between the parts of one computation.
GROUP_KEYS = ("group", "shards", "shard_sha256", "fingerprint")
_ARRAY_PREFIX = "array_"


def fingerprint(info: Mapping[str, Any]) -> str:
    """sha256 of ``info`` (its ``fingerprint`` key left out) as sorted JSON."""
    payload = {key: value for key, value in info.items() if key != "fingerprint"}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def shard_group_info(
    shards_dir: str | os.PathLike, split: str, group: ShardGroup, **fields: Any
) -> dict[str, Any]:
    """A part's ``info``: the ``group``, its ``shards`` (files) and their checksums (one
    fingerprint), then ``fields``, and the ``fingerprint`` of it all."""
    entries = split_shards(load_manifest(shards_dir), split)
    chosen = [entries[position] for position in group.bounds(len(entries))]
    info: dict[str, Any] = {
        "group": group.name,
        "shards": [entry["file"] for entry in chosen],
        "shard_sha256": fingerprint({"shards": [entry.get("sha256") for entry in chosen]}),
        **fields,
    }
    info["fingerprint"] = fingerprint(info)
    return info


def batches_done(keys: Iterable[tuple[int, int]]) -> dict[int, int]:
    """Finished batches per shard position from their ``(shard, batch)`` keys, which must be
    a prefix of each shard's batches (what a resumed loader skips)."""
    keys = list(keys)
    counts: dict[int, int] = {}
    for shard, _ in keys:
        counts[shard] = counts.get(shard, 0) + 1
    for shard, count in counts.items():
        if {batch for s, batch in keys if s == shard} != set(range(count)):
            raise ValueError(f"the batches of shard {shard} are not a prefix")
    return counts


@dataclass
class BatchResults:
    """Per-image arrays of finished batches, keyed by ``(shard, batch)``; every batch has the
    same array names, each array one row per image of the batch."""

    info: dict[str, Any]
    batches: dict[tuple[int, int], dict[str, np.ndarray]] = field(default_factory=dict)

    @property
    def num_images(self) -> int:
        return sum(len(next(iter(arrays.values()))) for arrays in self.batches.values())

    def add(self, shard: int, batch: int, arrays: Mapping[str, np.ndarray]) -> None:
        """One batch's arrays (all of one length)."""
        if (shard, batch) in self.batches:
            raise ValueError(f"batch {batch} of shard {shard} was computed twice")
        lengths = {name: len(values) for name, values in arrays.items()}
        if not arrays or len(set(lengths.values())) != 1:
            raise ValueError(f"a batch's arrays must share one length, got {lengths}")
        if self.batches:
            expected = sorted(next(iter(self.batches.values())))
            if sorted(arrays) != expected:
                raise ValueError(f"batch arrays {sorted(arrays)}, expected {expected}")
        self.batches[(shard, batch)] = {name: np.asarray(values) for name, values in arrays.items()}

    def done(self) -> dict[int, int]:
        """Batches finished per shard position; always a prefix of the shard's batches."""
        return batches_done(self.batches)

    def arrays(self) -> dict[str, np.ndarray]:
        """Every array concatenated in ``(shard, batch)`` order (no arrays without batches)."""
        keys = sorted(self.batches)
        if not keys:
            return {}
        return {
            name: np.concatenate([self.batches[key][name] for key in keys])
            for name in self.batches[keys[0]]
        }

    def save(self, path: str | os.PathLike) -> None:
        """The results so far (atomically, uncompressed): a part, or a preempted job's state."""
        keys = sorted(self.batches)
        sizes = [len(next(iter(self.batches[key].values()))) for key in keys]
        payload = {
            "format": np.asarray(BATCH_RESULTS_FORMAT),
            "info": np.asarray(json.dumps(self.info, sort_keys=True)),
            "key": np.repeat(np.asarray(keys, np.int64).reshape(-1, 2), sizes, axis=0),
            **{_ARRAY_PREFIX + name: values for name, values in self.arrays().items()},
        }
        with atomic_open(path, "wb") as handle:
            np.savez(handle, **payload)

    @classmethod
    def load(cls, path: str | os.PathLike) -> BatchResults:
        """Results written by :meth:`save`."""
        with np.load(path, allow_pickle=False) as data:
            found = str(data["format"]) if "format" in data.files else "none"
            if found != BATCH_RESULTS_FORMAT:
                raise ValueError(f"{path} is a {found!r} file, not {BATCH_RESULTS_FORMAT!r}")
            info = json.loads(str(data["info"]))
            keys = data["key"]
            arrays = {
                name[len(_ARRAY_PREFIX) :]: data[name]
                for name in data.files
                if name.startswith(_ARRAY_PREFIX)
            }
        results = cls(info)
        bounds = np.flatnonzero(np.any(np.diff(keys, axis=0) != 0, axis=1)) + 1
        for rows in np.split(np.arange(len(keys)), bounds) if len(keys) else []:
            shard, batch = int(keys[rows[0], 0]), int(keys[rows[0], 1])
            results.add(shard, batch, {name: values[rows] for name, values in arrays.items()})
        return results

    @classmethod
    def resume(cls, path: str | os.PathLike, info: dict[str, Any]) -> BatchResults:
        """The state saved at ``path`` if it belongs to this computation (same ``info``
        fingerprint), else an empty one (a stale state is reported and replaced later)."""
        if not Path(path).exists():
            return cls(info)
        try:
            saved = cls.load(path)
        except (ValueError, KeyError, OSError) as error:
            LOGGER.warning("%s is unreadable (%s): starting over", path, error)
            return cls(info)
        if saved.info.get("fingerprint") != info["fingerprint"]:
            LOGGER.warning("%s belongs to other inputs or settings: starting over", path)
            return cls(info)
        LOGGER.info("%s: resuming after %d images", path, saved.num_images)
        return saved


def check_parts(
    infos: Sequence[Mapping[str, Any]],
    paths: Sequence[str | os.PathLike],
    test_shards: Sequence[str],
    rule: str,
) -> None:
    """The parts' ``infos`` are one computation: groups 1..n of n in order, the same inputs and
    settings, and together the split's ``test_shards`` in order; else a ValueError that names
    the part and says to rerun ``rule``."""
    count = len(infos)
    first = {key: value for key, value in infos[0].items() if key not in GROUP_KEYS}
    for index, (info, path) in enumerate(zip(infos, paths, strict=True)):
        expected = f"{index + 1}of{count}"
        if info["group"] != expected:
            raise ValueError(
                f"{path} holds shard group {info['group']}, expected {expected}: give the "
                "parts in group order, all of them"
            )
        common = {key: value for key, value in info.items() if key not in GROUP_KEYS}
        if common != first:
            differ = sorted(
                key for key in first.keys() | common.keys() if first.get(key) != common.get(key)
            )
            raise ValueError(
                f"{path} and {paths[0]} differ in {differ}: they belong to different runs; "
                f"rerun rule {rule} for every group"
            )
    covered = [shard for info in infos for shard in info["shards"]]
    if covered != list(test_shards):
        raise ValueError(
            f"the parts {[str(p) for p in paths]} cover test shards {covered}, the manifest "
            f"lists {list(test_shards)}: the shards changed; rerun rule {rule}"
        )


def gather_parts(
    paths: Sequence[str | os.PathLike], shards_dir: str | os.PathLike, split: str, rule: str
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The parts at ``paths`` (groups 1..n) checked and joined: the first part's ``info`` and
    every array concatenated in shard order (empty parts add nothing)."""
    loaded = []
    for path in paths:
        try:
            loaded.append(BatchResults.load(path))
        except (ValueError, KeyError, OSError) as error:
            raise ValueError(f"{path}: not a readable part ({error}); rerun rule {rule}") from error
    test_shards = [entry["file"] for entry in split_shards(load_manifest(shards_dir), split)]
    check_parts([part.info for part in loaded], paths, test_shards, rule)
    pieces = [part.arrays() for part in loaded if part.batches]
    if not pieces:
        return loaded[0].info, {}
    arrays = {name: np.concatenate([piece[name] for piece in pieces]) for name in pieces[0]}
    return loaded[0].info, arrays
