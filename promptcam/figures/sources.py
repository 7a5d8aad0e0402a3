"""Where figures get their pictures: the stored shards (the pipeline's figures) or image files
(``promptcam explain``). Both give the image at the resolution it is stored at and, where the
data has them, one boolean trait mask per rank at the same size."""

from __future__ import annotations

import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from promptcam.data.images import load_image
from promptcam.data.masks import decode_trait_mask
from promptcam.data.samples import read_samples


@dataclass(frozen=True)
class SourceImage:
    """An image (H, W, 3) uint8 and its trait masks ``{rank: (H, W) bool}`` (None: no masks)."""

    image: np.ndarray
    masks: dict[str, np.ndarray] | None = None

    def mask(self, rank: str) -> np.ndarray | None:
        """The rank's trait mask, or None where there is none (or it is empty)."""
        if self.masks is None or rank not in self.masks or not self.masks[rank].any():
            return None
        return self.masks[rank]


class ImageSource(Protocol):
    def images(self, ids: Collection[str]) -> dict[str, SourceImage]:
        """``{id: SourceImage}`` for every id asked for (a missing id raises KeyError)."""
        ...


@dataclass(frozen=True)
class ShardImages:
    """Images and trait masks of the WebDataset shards (bit i of a mask = ``levels[i]``)."""

    shards_dir: Path
    levels: tuple[str, ...]

    def images(self, ids: Collection[str]) -> dict[str, SourceImage]:
        if not ids:
            return {}
        samples = read_samples(self.shards_dir, ids)
        return {
            key: SourceImage(
                image=sample.image,
                masks=None if sample.mask is None else decode_trait_mask(sample.mask, self.levels),
            )
            for key, sample in samples.items()
        }


@dataclass(frozen=True)
class FileImages:
    """Image files under ``root``, ids being their paths relative to it (no masks), decoded
    as the data wing decodes a collection (any mode to 8-bit RGB, EXIF orientation) with the
    short side reduced to ``short_side`` pixels: enough for print, bounded in memory."""

    root: Path
    short_side: int = 512

    def images(self, ids: Collection[str]) -> dict[str, SourceImage]:
        return {
            key: SourceImage(np.asarray(load_image(self.root / key, self.short_side)))
            for key in ids
        }


def shard_images(shards_dir: str | os.PathLike, levels: Sequence[str]) -> ShardImages:
    return ShardImages(Path(shards_dir), tuple(levels))
