"""Read the WebDataset shards back as (image, label, metadata) for one rank.

Reference transforms (Prompt-CAM): train = resize to 240x240, random crop 224, horizontal
flip, normalise with mean = std = 0.5; test = resize to 224x224, normalise. All sizes and
statistics are configurable through :class:`TransformConfig`.

Each item is ``(image, label, meta)``: ``image`` a float tensor (3, img_size, img_size),
``label`` the class index at the chosen rank (as in ``labels/{rank}.tsv``), ``meta`` a dict
with ``sample_id``, ``split``, ``path``, ``labels`` ``{rank: name}`` and ``indices``
``{rank: index}``; with ``with_mask=True`` also ``mask``: a uint8 tensor (img_size, img_size)
holding the stored mask values, cropped and flipped exactly like the image.

Order: with ``shuffle_buffer=0`` the split is read once, shard by shard in manifest order and
samples in tar order, which is deterministic (for evaluation). With a buffer, shards and
samples are shuffled from a seed derived from ``seed`` and the epoch (:meth:`set_epoch`).
Random crops and flips draw from torch's RNG, which DataLoader seeds per worker.

Training reads :class:`TrainingStream`, whose batches do not depend on how many processes
train (data parallelism; :class:`ReplicaSlice`). One epoch, for ``W`` loader workers, ``R``
processes and a *global* batch of ``G`` images:

1. The split's shards are shuffled from ``(seed, epoch)`` and dealt to ``W`` lanes, one per
   loader worker (lane ``w`` reads every ``W``-th shard; no workers: one lane). Every process
   reads the same lanes: processes split *samples*, not shards, so that they all take the
   same number of equal steps however unevenly the shards fill.
2. Each lane's samples pass a shuffle buffer seeded from ``(seed, epoch)``, then are cut into
   chunks of ``G`` consecutive samples (only a lane's last chunk can be shorter). Process ``r``
   trains on offsets ``[r*b, (r+1)*b)`` of each chunk, ``b = len(chunk) // R``: ``G / R`` for
   a full chunk. A short last chunk's ``len % R`` leftover samples sit out that epoch (other
   ones each epoch); with one process nothing is left out.
3. A global step is one chunk, the lanes taking turns (the DataLoader's round robin over its
   workers, skipping exhausted ones).
4. Each sample's crop and flip draw from torch's RNG seeded from ``(seed, epoch, lane,
   position in the lane)``, so they do not depend on which process decodes it.

So ``R`` processes with per-process batch ``b`` see, step by step, exactly the samples (and
augmentations) that one process with batch ``R * b`` sees: the union of theirs, in rank
order. The order depends on ``seed``, the epoch, the worker count and the shards, never on
``R``. Reading costs ``R`` times the tar bytes (every process reads every lane), decoding
does not (a process decodes only its own samples).
"""

from __future__ import annotations

import io
import itertools
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from promptcam.data.shards import MANIFEST_NAME


@dataclass(frozen=True)
class TransformConfig:
    """Square resizes (``interpolation``: bilinear, bicubic or nearest; masks always nearest),
    then scaling to [0, 1] and normalisation."""

    img_size: int = 224
    resize_size: int = 240
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    interpolation: str = "bilinear"

    @classmethod
    def unaugmented(cls, preprocessing: Any) -> TransformConfig:
        """Evaluation transform of a checkpoint's preprocessing (``img_size``, ``mean``, ``std``,
        ``interpolation``; :class:`promptcam.model.spec.Preprocessing`)."""
        height, width = preprocessing.img_size
        if height != width:
            raise ValueError(
                f"the shard reader makes square images; this model takes {height}x{width}"
            )
        return cls(
            img_size=height,
            mean=preprocessing.mean,
            std=preprocessing.std,
            interpolation=preprocessing.interpolation,
        )


def build_transform(config: TransformConfig, train: bool) -> v2.Compose:
    """Joint transform of a PIL image and an optional ``tv_tensors.Mask``.

    Geometric steps draw one set of random parameters per call and apply it to both; masks are
    resized with NEAREST and are left out of dtype scaling and normalisation.
    """
    interpolation = v2.InterpolationMode(config.interpolation)
    if train:
        geometry = [
            v2.Resize((config.resize_size, config.resize_size), interpolation),
            v2.RandomCrop(config.img_size),
            v2.RandomHorizontalFlip(),
        ]
    else:
        geometry = [v2.Resize((config.img_size, config.img_size), interpolation)]
    return v2.Compose(
        [
            *geometry,
            v2.ToImage(),
            v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
            v2.Normalize(mean=list(config.mean), std=list(config.std)),
        ]
    )


def load_manifest(shards_dir: str | os.PathLike) -> dict[str, Any]:
    with open(Path(shards_dir) / MANIFEST_NAME) as handle:
        return json.load(handle)


def split_shards(manifest: dict[str, Any], split: str) -> list[dict[str, Any]]:
    """Manifest entries of ``split``'s shards, in manifest order."""
    if split not in manifest["splits"]:
        raise KeyError(f"unknown split {split!r}; the manifest has {sorted(manifest['splits'])}")
    return [entry for entry in manifest["shards"] if entry["split"] == split]


def split_size(manifest: dict[str, Any], split: str) -> int:
    """Number of samples in ``split`` (one epoch on one process)."""
    return int(manifest["splits"][split]["n_samples"])


def epoch_seed(seed: int, epoch: int, bits: Literal[32, 63] = 63) -> int:
    """A well-mixed seed for ``(seed, epoch)``: 63 bits for torch, numpy and random, 32 bits for
    webdataset's shard and sample shuffles (the low word of the same draw)."""
    state = int(np.random.SeedSequence([seed, epoch]).generate_state(2, np.uint64)[0])
    return state & 0xFFFF_FFFF if bits == 32 else state >> 1


class ShardDataset(IterableDataset):
    """One split of the shards as an IterableDataset for one rank; see the module docstring.

    ``split_by_node`` gives each distributed process every world_size-th shard (webdataset's
    ``split_by_node``); ``split_by_worker`` does the same across DataLoader workers. With more
    workers or processes than shards some get nothing, which is allowed (``empty_check=False``).
    """

    def __init__(
        self,
        shards_dir: str | os.PathLike,
        split: str,
        rank: str,
        *,
        train: bool = False,
        transform: TransformConfig | None = None,
        with_mask: bool = False,
        shuffle_buffer: int = 0,
        seed: int = 0,
        split_by_node: bool = True,
        split_by_worker: bool = True,
    ) -> None:
        super().__init__()
        self.shards_dir = Path(shards_dir)
        manifest = load_manifest(self.shards_dir)
        if rank not in manifest["levels"]:
            raise KeyError(f"unknown rank {rank!r}; the shards have {manifest['levels']}")
        if with_mask and not manifest["has_masks"]:
            raise ValueError(f"{self.shards_dir} holds no masks (the metadata had no mask column)")
        self.shards = split_shards(manifest, split)
        self.split = split
        self.rank = rank
        self.transform = build_transform(transform or TransformConfig(), train)
        self.with_mask = with_mask
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.split_by_node = split_by_node
        self.split_by_worker = split_by_worker
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle differently next time; call before iterating (not with persistent workers)."""
        self.epoch = epoch

    def __len__(self) -> int:
        """Samples this process reads per epoch (its share of shards when split by node)."""
        shards = self.shards
        if self.split_by_node:
            rank, world_size, _, _ = wds.utils.pytorch_worker_info()
            shards = shards[rank::world_size]
        return sum(entry["n_samples"] for entry in shards)

    def pipeline(self) -> wds.WebDataset:
        return self.shuffled_samples().map(self.decode)

    def shuffled_samples(self) -> wds.WebDataset:
        """This process's (and loader worker's) raw samples of the epoch, in reading order."""
        urls = [str(self.shards_dir / entry["file"]) for entry in self.shards]
        seed = epoch_seed(self.seed, self.epoch, bits=32)
        dataset = wds.WebDataset(
            urls,
            shardshuffle=len(urls) if self.shuffle_buffer > 0 else False,
            nodesplitter=wds.split_by_node if self.split_by_node else None,
            workersplitter=wds.split_by_worker if self.split_by_worker else None,
            empty_check=False,
            seed=seed,
        )
        if self.shuffle_buffer > 0:
            dataset = dataset.shuffle(self.shuffle_buffer, seed=seed)
        return dataset

    def decode(
        self, sample: dict[str, Any], augment_seed: int | None = None
    ) -> tuple[torch.Tensor, int, dict[str, Any]]:
        """The sample as ``(image, label, meta)``; ``augment_seed``: draw its crop and flip from
        torch's RNG seeded with it (and leave the caller's RNG state as it was)."""
        if augment_seed is None:
            return self._decode(sample)
        # The CPU generator only: torch.manual_seed would reseed the GPUs' too (dropout).
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(augment_seed)
            return self._decode(sample)

    def _decode(self, sample: dict[str, Any]) -> tuple[torch.Tensor, int, dict[str, Any]]:
        header = json.loads(sample["json"])
        with Image.open(io.BytesIO(sample["jpg"])) as image:
            image = image.convert("RGB")
        meta = {key: header[key] for key in ("sample_id", "split", "path", "labels", "indices")}
        if self.with_mask:
            with Image.open(io.BytesIO(sample["mask.png"])) as mask:
                values = torch.from_numpy(np.array(mask, dtype=np.uint8))
            image, mask = self.transform(image, tv_tensors.Mask(values))
            meta["mask"] = mask.as_subclass(torch.Tensor)
        else:
            image = self.transform(image)
        return image.as_subclass(torch.Tensor), int(header["indices"][self.rank]), meta

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int, dict[str, Any]]]:
        return iter(self.pipeline())


@dataclass(frozen=True)
class ReplicaSlice:
    """This process's share of every global batch: ``replica`` of ``replicas`` processes, each
    training on ``global_batch // replicas`` images of each step (module docstring)."""

    global_batch: int
    replicas: int = 1
    replica: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.replica < self.replicas:
            raise ValueError(f"replica {self.replica} is not one of {self.replicas} processes")
        if self.global_batch % self.replicas:
            raise ValueError(
                f"a global batch of {self.global_batch} does not split into {self.replicas} "
                "equal per-process batches"
            )

    @property
    def local_batch(self) -> int:
        return self.global_batch // self.replicas

    def share(self, chunk_size: int) -> range:
        """Offsets within a chunk of ``chunk_size`` samples that this process trains on."""
        size = chunk_size // self.replicas
        return range(self.replica * size, (self.replica + 1) * size)


SKIPPED_LABEL = -1


def sample_seed(seed: int, epoch: int, lane: int, position: int) -> int:
    """The augmentation seed of the sample at ``position`` of ``lane`` in ``epoch``."""
    words = np.random.SeedSequence([seed, epoch, lane, position]).generate_state(2, np.uint64)
    return int(words[0]) >> 1


def _chunks(samples: Iterator[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    chunk: list[dict[str, Any]] = []
    for sample in samples:
        chunk.append(sample)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def loader_lane() -> int:
    """The lane this code reads: its DataLoader worker's id (0 in the main process)."""
    info = torch.utils.data.get_worker_info()
    return 0 if info is None else info.id


class TrainingStream(ShardDataset):
    """The train split as global batches shared out to processes (module docstring).

    Items are ``(image, label, meta)`` as for :class:`ShardDataset`, with ``meta`` also holding
    ``lane``, ``chunk`` (the lane's chunk index: which global batch) and ``skipped``. Batch it
    with ``replica_slice.local_batch``: every chunk then gives this process exactly one batch.
    ``skip_chunks[lane]`` chunks of each lane were trained before an interruption: they come
    back as placeholder batches (``skipped`` true, label :data:`SKIPPED_LABEL`, nothing decoded)
    so that the loader's turn order over its workers, and so every later batch, is unchanged.
    """

    def __init__(
        self,
        shards_dir: str | os.PathLike,
        split: str,
        rank: str,
        *,
        replica_slice: ReplicaSlice,
        transform: TransformConfig | None = None,
        shuffle_buffer: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(
            shards_dir,
            split,
            rank,
            train=True,
            transform=transform,
            shuffle_buffer=shuffle_buffer,
            seed=seed,
            split_by_node=False,
        )
        self.replica_slice = replica_slice
        self.skip_chunks: dict[int, int] = {}

    def resume_after(self, chunks_done: dict[int, int]) -> None:
        """Skip, this epoch, the first ``chunks_done[lane]`` chunks of each lane."""
        self.skip_chunks = dict(chunks_done)

    def __len__(self) -> int:
        """Samples in the split: one epoch of all processes together."""
        return sum(entry["n_samples"] for entry in self.shards)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int, dict[str, Any]]]:
        lane = loader_lane()
        size = self.replica_slice.global_batch
        done = self.skip_chunks.get(lane, 0)
        for index, chunk in enumerate(_chunks(iter(self.shuffled_samples()), size)):
            meta = {"lane": lane, "chunk": index}
            for offset in self.replica_slice.share(len(chunk)):
                if index < done:
                    yield torch.zeros(()), SKIPPED_LABEL, {**meta, "skipped": True}
                    continue
                seed = sample_seed(self.seed, self.epoch, lane, index * size + offset)
                image, label, sample_meta = self.decode(chunk[offset], augment_seed=seed)
                yield image, label, {**sample_meta, **meta, "skipped": False}


def make_loader(
    dataset: ShardDataset,
    batch_size: int,
    num_workers: int = 0,
    drop_last: bool = False,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader over ``dataset``; batches stack images, labels, masks and collate metadata."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        drop_last=drop_last,
        pin_memory=pin_memory,
        # Workers must be re-created each epoch so that set_epoch() reaches them.
        persistent_workers=False,
    )


def useful_workers(dataset: ShardDataset, requested: int) -> int:
    """``requested`` capped at the split's shard count: a worker without a shard (they are dealt
    out whole) yields nothing, yet still costs a process start every epoch. Batches arrive in
    the same order either way, since the DataLoader skips exhausted workers."""
    return min(requested, len(dataset.shards))


def split_loader(
    shards_dir: str | os.PathLike,
    split: str,
    rank: str,
    transform: TransformConfig,
    batch_size: int,
    num_workers: int = 0,
    device: torch.device | None = None,
    *,
    with_mask: bool = False,
    split_by_node: bool = True,
) -> DataLoader:
    """The one loader of a whole split in order: unshuffled and unaugmented (evaluation, trait
    search, features, validation). Memory is pinned for a CUDA ``device``. ``split_by_node``
    false: the whole split even in one of several distributed processes."""
    dataset = ShardDataset(
        shards_dir,
        split,
        rank,
        train=False,
        transform=transform,
        with_mask=with_mask,
        split_by_node=split_by_node,
    )
    workers = useful_workers(dataset, num_workers)
    pin = device is not None and device.type == "cuda"
    return make_loader(dataset, batch_size, workers, pin_memory=pin)


# ----------------------------------------------------------------------------- shard groups


@dataclass(frozen=True)
class ShardGroup:
    """Group ``index`` (0-based) of ``count``: a contiguous run of a split's shards, in manifest
    order; group ``i`` holds shards ``[i * S // count, (i + 1) * S // count)`` of the S shards.
    The groups of one ``count`` partition the split, and concatenated in group order they are
    the split in shard order (a group may be empty when ``count`` exceeds S)."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"shard group {self.index} of {self.count} does not exist")

    @property
    def name(self) -> str:
        """``{index + 1}of{count}``, as the part files are named."""
        return f"{self.index + 1}of{self.count}"

    @classmethod
    def parse(cls, name: str) -> ShardGroup:
        """The group named ``{i}of{n}`` (1-based ``i``)."""
        first, sep, count = name.partition("of")
        if not (sep and first.isdigit() and count.isdigit()):
            raise ValueError(f"shard group {name!r} is not of the form '{{i}}of{{n}}', e.g. 1of4")
        return cls(int(first) - 1, int(count))

    def bounds(self, num_shards: int) -> range:
        """Positions of this group's shards among the split's ``num_shards``."""
        return range(
            self.index * num_shards // self.count, (self.index + 1) * num_shards // self.count
        )


WHOLE_SPLIT = ShardGroup()


class ShardBatches(IterableDataset):
    """Batches that never cross a shard: every shard of a ``group`` of the split is cut into
    batches of ``batch_size`` consecutive samples (its last one shorter), unshuffled and
    unaugmented. The batches, and so any per-batch arithmetic, are the same however the split
    is grouped. Each item is ``(images, labels, meta)`` as the split loader collates them, with
    ``meta`` also holding ``shard`` (the shard's position in the split), ``batch`` (the batch's
    position in its shard) and ``last`` (the shard's last batch). Loader workers take whole
    shards in turn; batches of one shard arrive in order, those of different shards
    interleaved: key results by ``(shard, batch)``. ``skip[shard]`` batches of a shard are
    left out (a resumed run's finished ones; their samples are read, not decoded). With
    ``max_samples``, only the split's first ``max_samples`` samples in shard order are given
    (the batch that reaches the limit cut short), whichever group a shard is in."""

    def __init__(
        self,
        shards_dir: str | os.PathLike,
        split: str,
        rank: str,
        transform: TransformConfig,
        batch_size: int,
        *,
        group: ShardGroup = WHOLE_SPLIT,
        skip: dict[int, int] | None = None,
        max_samples: int | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if max_samples is not None and max_samples < 0:
            raise ValueError(f"max_samples must be non-negative, got {max_samples}")
        self.samples = ShardDataset(
            shards_dir, split, rank, transform=transform, split_by_node=False, split_by_worker=False
        )
        self.positions = list(group.bounds(len(self.samples.shards)))
        self.shards = [self.samples.shards[position] for position in self.positions]
        self.batch_size = batch_size
        self.skip = dict(skip or {})
        sizes = [int(entry["n_samples"]) for entry in self.samples.shards]
        # Each shard's first sample's position in the split, and how many of its samples count.
        self.starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int).tolist()
        limit = math.inf if max_samples is None else max_samples
        self.counts = [
            int(max(0, min(size, limit - start)))
            for size, start in zip(sizes, self.starts, strict=True)
        ]

    def __len__(self) -> int:
        return sum(self.counts[position] for position in self.positions)

    def _shard_samples(self, position: int) -> Iterator[dict[str, Any]]:
        url = str(self.samples.shards_dir / self.samples.shards[position]["file"])
        return iter(
            wds.WebDataset(
                [url], shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False
            )
        )

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        for position in self.positions[worker::workers]:
            done, count = self.skip.get(position, 0), self.counts[position]
            if count == 0:
                continue
            chunks = _chunks(
                itertools.islice(self._shard_samples(position), count), self.batch_size
            )
            chunk, batch = next(chunks, None), 0
            while chunk is not None:
                following = next(chunks, None)  # one chunk ahead: is this the shard's last?
                if batch >= done:
                    images, labels, meta = torch.utils.data.default_collate(
                        [self.samples.decode(sample) for sample in chunk]
                    )
                    meta.update(shard=position, batch=batch, last=following is None)
                    yield images, labels, meta
                chunk, batch = following, batch + 1


def shard_batch_loader(
    shards_dir: str | os.PathLike,
    split: str,
    rank: str,
    transform: TransformConfig,
    batch_size: int,
    num_workers: int = 0,
    device: torch.device | None = None,
    *,
    group: ShardGroup = WHOLE_SPLIT,
    skip: dict[int, int] | None = None,
    max_samples: int | None = None,
) -> DataLoader:
    """A loader of :class:`ShardBatches` (a shard group's batches, keyed by shard and batch);
    memory pinned for a CUDA ``device``."""
    dataset = ShardBatches(
        shards_dir,
        split,
        rank,
        transform,
        batch_size,
        group=group,
        skip=skip,
        max_samples=max_samples,
    )
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=min(num_workers, len(dataset.shards)),
        pin_memory=device is not None and device.type == "cuda",
        persistent_workers=False,
    )
