"""Stored samples read back from the shards without torch (for figures): the image as the
shards hold it, its header (labels) and its trait mask."""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from promptcam.data.shards import MANIFEST_NAME


@dataclass(frozen=True)
class StoredSample:
    """One sample of the shards.

    Attributes:
        sample_id: The sample's key.
        header: Its JSON header (``sample_id``, ``split``, ``path``, ``labels``, ``indices``).
        image: (H, W, 3) uint8 RGB, as stored (short side resized, not yet squared).
        mask: (H, W) uint8 trait bitmask (bit i: the i-th rank's trait), or None.
    """

    sample_id: str
    header: dict[str, Any]
    image: np.ndarray
    mask: np.ndarray | None


def _decode(members: dict[str, bytes], sample_id: str) -> StoredSample:
    with Image.open(io.BytesIO(members["jpg"])) as image:
        pixels = np.asarray(image.convert("RGB"))
    mask = None
    if "mask.png" in members:
        with Image.open(io.BytesIO(members["mask.png"])) as stored:
            mask = np.asarray(stored, dtype=np.uint8)
    header = json.loads(members["json"])
    return StoredSample(sample_id=sample_id, header=header, image=pixels, mask=mask)


def iter_samples(
    shards_dir: str | os.PathLike,
    split: str | None = None,
    sample_ids: Collection[str] | None = None,
) -> Iterator[StoredSample]:
    """Samples of ``split`` (all splits if None) in shard order, only ``sample_ids`` if given.

    Reads the tar files sequentially and decodes only the samples asked for, so memory stays
    bounded by what the caller keeps.
    """
    root = Path(shards_dir)
    manifest = json.loads((root / MANIFEST_NAME).read_text())
    wanted = None if sample_ids is None else set(sample_ids)
    for entry in manifest["shards"]:
        if split is not None and entry["split"] != split:
            continue
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(root / entry["file"]) as tar:
            for info in tar:
                key, _, suffix = info.name.partition(".")
                if wanted is not None and key not in wanted:
                    continue
                handle = tar.extractfile(info)
                if handle is not None:
                    members.setdefault(key, {})[suffix] = handle.read()
        for key, sample in members.items():
            yield _decode(sample, key)


def read_samples(
    shards_dir: str | os.PathLike, sample_ids: Collection[str], split: str | None = None
) -> dict[str, StoredSample]:
    """``{sample_id: StoredSample}`` for ``sample_ids``; a missing id raises KeyError."""
    found = {s.sample_id: s for s in iter_samples(shards_dir, split, sample_ids)}
    missing = sorted(set(sample_ids) - set(found))
    if missing:
        raise KeyError(f"{len(missing)} samples not in {shards_dir}: {missing[:5]}")
    return found
