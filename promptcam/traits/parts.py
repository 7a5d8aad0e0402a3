"""The trait search of one shard group (a part), its resumable state, and the gather.

A large test split is searched by several jobs, one per shard group
(:class:`promptcam.data.reader.ShardGroup`), each writing a *part*
(``results/{rank}/parts/traits_{i}of{n}.npz``); the gather concatenates the parts in shard order
and writes the traits rule's files, byte for byte those of one job over the whole split. That
holds because nothing depends on how the split was cut:

* batches never cross a shard (:class:`promptcam.data.reader.ShardBatches`), so every image is
  searched in the same batch whichever job reads it;
* per-image results are kept by ``(shard, batch)`` and put in shard order at the end, whatever
  order loader workers deliver them in;
* the cross-class sums are kept per shard and folded in shard order
  (:meth:`CrossClassAccumulator.add`), the representative image being the first most probable.

The same :class:`SearchResults` is the state a preempted search saves at a batch boundary
(``*.partial.npz``) and resumes from: the finished batches, and the per-shard sums so far.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from promptcam.data.batch_parts import batches_done
from promptcam.data.batch_parts import check_parts as check_part_infos
from promptcam.io import atomic_open
from promptcam.traits.cross_class import CrossClassAccumulator
from promptcam.traits.search import EliminationTrace

LOGGER = logging.getLogger(__name__)

PART_FORMAT = "promptcam-traits-part/1"
STATE_FORMAT = "promptcam-traits-state/1"
TRACE_FIELDS = tuple(EliminationTrace.__dataclass_fields__)


def _pairs(info: Mapping[str, Any]) -> list[tuple[int, int, str]]:
    return [(int(a), int(b), str(why)) for a, b, why in info["pairs"]]


def _empty_trace(num_heads: int) -> EliminationTrace:
    ints, floats = np.zeros(0, np.int64), np.zeros(0, np.float64)
    heads = {"order": np.int64, "scores": np.float64, "step_predicted": np.int64}
    return EliminationTrace(
        targets=ints,
        predicted=ints,
        base_scores=floats,
        **{name: np.zeros((0, num_heads), dtype) for name, dtype in heads.items()},
    )


@dataclass
class TraitsPart:
    """One shard group's search, in shard order.

    Attributes:
        info: what the search ran on and with (``group``, ``shards``, ``label_names``,
            ``pairs``, ``dropped``, ``grid``, ``num_heads``, ``checkpoint_sha256``,
            ``settings``, ``fingerprint``).
        image_ids: (N,) sample ids.
        trace: the full greedy elimination of the N images.
        maps: (N, H, P) float32 target-class maps.
        cross: the cross-class sums of each of the group's shards, by shard position.
    """

    info: dict[str, Any]
    image_ids: list[str]
    trace: EliminationTrace
    maps: np.ndarray
    cross: dict[int, CrossClassAccumulator]

    def cross_class(self) -> CrossClassAccumulator:
        """The group's shards' sums folded in shard order."""
        num_heads, num_patches = self.maps.shape[1], self.maps.shape[2]
        total = CrossClassAccumulator(_pairs(self.info), num_heads, num_patches)
        for shard in sorted(self.cross):
            total.add(self.cross[shard])
        return total


@dataclass
class SearchResults:
    """Batch results as they arrive, keyed by ``(shard, batch)``, and each shard's
    cross-class sums: a part in the making, and a preempted search's state."""

    info: dict[str, Any]
    batches: dict[tuple[int, int], tuple[list[str], EliminationTrace, np.ndarray]] = field(
        default_factory=dict
    )
    cross: dict[int, CrossClassAccumulator] = field(default_factory=dict)

    @property
    def num_images(self) -> int:
        return sum(len(ids) for ids, _, _ in self.batches.values())

    def shard_sums(self, shard: int) -> CrossClassAccumulator:
        """Shard ``shard``'s cross-class accumulator (new if it has none yet)."""
        if shard not in self.cross:
            grid = self.info["grid"]
            self.cross[shard] = CrossClassAccumulator(
                _pairs(self.info), self.info["num_heads"], grid[0] * grid[1]
            )
        return self.cross[shard]

    def add(
        self,
        shard: int,
        batch: int,
        image_ids: Sequence[str],
        trace: EliminationTrace,
        maps: np.ndarray,
    ) -> None:
        """One batch's per-image results (its cross-class sums go to :meth:`shard_sums`)."""
        if (shard, batch) in self.batches:
            raise ValueError(f"batch {batch} of shard {shard} was searched twice")
        self.batches[(shard, batch)] = (list(image_ids), trace, maps)

    def done(self) -> dict[int, int]:
        """Batches finished per shard position; always a prefix of the shard's batches."""
        return batches_done(self.batches)

    def part(self) -> TraitsPart:
        """The results in shard order."""
        keys = sorted(self.batches)
        num_heads, grid = self.info["num_heads"], self.info["grid"]
        if not keys:
            maps = np.zeros((0, num_heads, grid[0] * grid[1]), np.float32)
            return TraitsPart(self.info, [], _empty_trace(num_heads), maps, dict(self.cross))
        return TraitsPart(
            info=self.info,
            image_ids=[image for key in keys for image in self.batches[key][0]],
            trace=EliminationTrace.concatenate([self.batches[key][1] for key in keys]),
            maps=np.concatenate([self.batches[key][2] for key in keys]),
            cross=dict(self.cross),
        )

    # ------------------------------------------------------------------ resumable state

    def save(self, path: str | os.PathLike) -> None:
        """The state so far, atomically (per-image arrays with their shard and batch)."""
        part = self.part()
        keys = sorted(self.batches)
        sizes = [len(self.batches[key][0]) for key in keys]
        arrays = _part_arrays(part, STATE_FORMAT)
        arrays["image_key"] = np.repeat(np.asarray(keys, np.int64).reshape(-1, 2), sizes, axis=0)
        with atomic_open(path, "wb") as handle:
            np.savez(handle, **arrays)

    @classmethod
    def resume(cls, path: str | os.PathLike, info: dict[str, Any]) -> SearchResults:
        """The state saved at ``path`` if it belongs to this search (same ``info``
        fingerprint), else an empty one (a stale state is reported and replaced later)."""
        path = Path(path)
        if not path.exists():
            return cls(info)
        try:
            part, keys = _read_arrays(path, STATE_FORMAT)
        except (ValueError, KeyError, OSError) as error:
            LOGGER.warning("%s is unreadable (%s): starting over", path, error)
            return cls(info)
        if part.info.get("fingerprint") != info["fingerprint"]:
            LOGGER.warning("%s belongs to other inputs or settings: starting over", path)
            return cls(info)
        results = cls(info, cross=part.cross)
        bounds = np.flatnonzero(np.any(np.diff(keys, axis=0) != 0, axis=1)) + 1
        for rows in np.split(np.arange(len(keys)), bounds) if len(keys) else []:
            trace = EliminationTrace(
                **{name: getattr(part.trace, name)[rows] for name in TRACE_FIELDS}
            )
            ids = [part.image_ids[row] for row in rows]
            results.add(int(keys[rows[0], 0]), int(keys[rows[0], 1]), ids, trace, part.maps[rows])
        return results


def _part_arrays(part: TraitsPart, file_format: str) -> dict[str, np.ndarray]:
    shards = sorted(part.cross)
    arrays: dict[str, np.ndarray] = {
        "format": np.asarray(file_format),
        "info": np.asarray(json.dumps(part.info, sort_keys=True)),
        "image": np.asarray(part.image_ids, dtype=str).reshape(-1),
        "maps": part.maps.astype(np.float32),
        "cross_shard": np.asarray(shards, np.int64),
        **{f"trace_{name}": getattr(part.trace, name) for name in TRACE_FIELDS},
    }
    if shards:
        states = [part.cross[shard].arrays() for shard in shards]
        for name in states[0]:
            arrays[f"cross_{name}"] = np.stack([state[name] for state in states])
    return arrays


def _read_arrays(path: Path, file_format: str) -> tuple[TraitsPart, np.ndarray]:
    with np.load(path) as data:
        found = str(data["format"]) if "format" in data.files else "none"
        if found != file_format:
            raise ValueError(f"{path} is a {found!r} file, not {file_format!r}")
        info = json.loads(str(data["info"]))
        trace = EliminationTrace(**{name: data[f"trace_{name}"] for name in TRACE_FIELDS})
        shards = [int(shard) for shard in data["cross_shard"]]
        names = [name[len("cross_") :] for name in data.files if name.startswith("cross_")]
        names.remove("shard")
        cross = {
            shard: CrossClassAccumulator.from_arrays(
                _pairs(info), {name: data[f"cross_{name}"][row] for name in names}
            )
            for row, shard in enumerate(shards)
        }
        part = TraitsPart(info, data["image"].astype(str).tolist(), trace, data["maps"], cross)
        keys = data["image_key"] if "image_key" in data.files else np.zeros((0, 2), np.int64)
    return part, keys


def write_part(path: str | os.PathLike, part: TraitsPart) -> None:
    """``traits_{i}of{n}.npz`` (uncompressed, atomically): the part's arrays and info."""
    with atomic_open(path, "wb") as handle:
        np.savez(handle, **_part_arrays(part, PART_FORMAT))


def read_part(path: str | os.PathLike) -> TraitsPart:
    """A part written by :func:`write_part`."""
    try:
        return _read_arrays(Path(path), PART_FORMAT)[0]
    except (ValueError, KeyError, OSError) as error:
        raise ValueError(f"{path}: not a traits part ({error}); rerun rule traits_part") from error


def check_parts(
    parts: Sequence[TraitsPart], paths: Sequence[str | os.PathLike], test_shards: Sequence[str]
) -> None:
    """The parts are one search: groups 1..n of n in order, the same model, classes and
    settings, and together the split's ``test_shards`` in order."""
    check_part_infos([part.info for part in parts], paths, test_shards, "traits_part")
