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
"""

from __future__ import annotations

import io
import json
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
        return dataset.map(self.decode)

    def decode(self, sample: dict[str, Any]) -> tuple[torch.Tensor, int, dict[str, Any]]:
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
) -> DataLoader:
    """The one loader of a whole split in order: unshuffled and unaugmented (evaluation, trait
    search, features, validation). Memory is pinned for a CUDA ``device``."""
    dataset = ShardDataset(
        shards_dir, split, rank, train=False, transform=transform, with_mask=with_mask
    )
    workers = useful_workers(dataset, num_workers)
    pin = device is not None and device.type == "cuda"
    return make_loader(dataset, batch_size, workers, pin_memory=pin)
