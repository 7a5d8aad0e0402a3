"""WebDataset tar shards: every image stored once, with the labels of every rank.

Layout of ``out_dir``:

- ``{split}-{NNNNNN}.tar`` (NNNNNN counts from 000000 within each split): at most
  ``max_samples_per_shard`` samples, in ``sample_id`` order. The id is a hash of the path, so
  this order is a fixed pseudo-random mix of classes, which a small shuffle buffer needs.
  Each sample ``<sample_id>`` has members ``<sample_id>.jpg`` (EXIF orientation applied, RGB,
  short side resized to ``short_side`` if larger, never enlarged), ``<sample_id>.json``
  (``sample_id``, ``split``, ``path``, ``mask_path``, ``labels`` ``{rank: name}``, ``indices``
  ``{rank: index in labels/{rank}.tsv}``) and, when masks are given, ``<sample_id>.mask.png``
  (the mask's values unchanged, resized with NEAREST to the stored image's size).
- ``manifest.json``: the levels, the shard settings, one entry per shard (``file``,
  ``split``, ``n_samples``, ``class_counts`` at the finest rank, ``sha256``) and totals per
  split (``n_samples``, ``n_shards``).

Shards are byte-for-byte reproducible whatever the number of workers: samples are encoded in
parallel but written in a fixed order by one process, tar headers carry fixed metadata
(mtime 0, uid/gid 0, no user names, mode 0444), and the JPEG/PNG encoders are deterministic.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import multiprocessing
import os
import re
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, ImageOps

from promptcam.data.metadata import read_label_map
from promptcam.data.splits import SPLITS
from promptcam.io import atomic_path, sha256_file, write_json

LOGGER = logging.getLogger(__name__)

SHARD_PATTERN = re.compile(r"^(train|val|test)-\d{6}\.tar$")
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "promptcam-shards/1"


@dataclass(frozen=True)
class ShardConfig:
    """The config's ``shards`` section (less ``threads``); defaults as in the schema."""

    short_side: int = 256
    jpeg_quality: int = 95
    max_samples_per_shard: int = 1000

    def __post_init__(self) -> None:
        if self.short_side < 1 or self.max_samples_per_shard < 1:
            raise ValueError(f"short_side and max_samples_per_shard must be >= 1: {self}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")


@dataclass(frozen=True)
class SampleJob:
    """All a worker process needs to encode one sample (small and picklable)."""

    key: str
    image_path: str
    mask_path: str | None
    header: dict[str, Any]


@dataclass(frozen=True)
class ShardPlan:
    file: str
    split: str
    rows: pd.DataFrame


def resized_size(size: tuple[int, int], short_side: int) -> tuple[int, int]:
    """``size`` scaled so its short side is ``short_side``; unchanged if already smaller."""
    width, height = size
    scale = short_side / min(width, height)
    if scale >= 1:
        return size
    return max(1, round(width * scale)), max(1, round(height * scale))


def load_image(path: str | os.PathLike, short_side: int) -> Image.Image:
    """The image as displayed (EXIF orientation applied), RGB, short side at most ``short_side``."""
    with Image.open(path) as image:
        # JPEG only: decode at a reduced DCT scale that still covers the target (much faster
        # for large photos). The request is square, so it holds whatever the orientation.
        image.draft("RGB", (short_side, short_side))
        image = ImageOps.exif_transpose(image).convert("RGB")
    size = resized_size(image.size, short_side)
    if size == image.size:
        return image
    return image.resize(size, Image.Resampling.BICUBIC)


def load_mask(path: str | os.PathLike, size: tuple[int, int]) -> Image.Image:
    """The mask's raw values as an 8-bit image of ``size`` (NEAREST keeps bit values intact)."""
    with Image.open(path) as mask:
        mask = ImageOps.exif_transpose(mask)
        values = Image.fromarray(np.asarray(mask).astype(np.uint8))  # 2-D uint8: mode L
    if values.size == size:
        return values
    return values.resize(size, Image.Resampling.NEAREST)


def encode_sample(job: SampleJob, config: ShardConfig) -> list[tuple[str, bytes]]:
    """Tar members (name, bytes) of one sample, in a fixed order."""
    try:
        image = load_image(job.image_path, config.short_side)
        jpeg = io.BytesIO()
        image.save(jpeg, format="JPEG", quality=config.jpeg_quality, optimize=False)
        members = [
            (f"{job.key}.jpg", jpeg.getvalue()),
            (f"{job.key}.json", json.dumps(job.header, sort_keys=True).encode("utf-8")),
        ]
        if job.mask_path is not None:
            png = io.BytesIO()
            load_mask(job.mask_path, image.size).save(png, format="PNG", compress_level=6)
            members.append((f"{job.key}.mask.png", png.getvalue()))
    except Exception as error:
        # Worker tracebacks lose the sample; name it so the user can fix or drop the file.
        raise RuntimeError(f"cannot encode {job.image_path} (sample {job.key}): {error}") from error
    return members


def write_tar(path: str | os.PathLike, members: Iterable[tuple[str, bytes]]) -> None:
    """Write a tar atomically with fixed header metadata, so equal inputs give equal bytes."""
    with atomic_path(path) as tmp, tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o444
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))


def plan_shards(table: pd.DataFrame, max_samples_per_shard: int) -> list[ShardPlan]:
    """Shards per split in sample_id order; a split with no images gets no shard."""
    plans = []
    for split in SPLITS:
        rows = table[table["split"] == split].sort_values("sample_id", kind="stable")
        for number, start in enumerate(range(0, len(rows), max_samples_per_shard)):
            chunk = rows.iloc[start : start + max_samples_per_shard]
            plans.append(ShardPlan(f"{split}-{number:06d}.tar", split, chunk))
    return plans


def sample_jobs(
    rows: pd.DataFrame,
    levels: Sequence[str],
    indices: dict[str, dict[str, int]],
    image_root: Path,
) -> list[SampleJob]:
    has_masks = "mask" in rows.columns
    jobs = []
    # Records, not itertuples: ranks such as "class" are not valid attribute names.
    for record in rows.to_dict("records"):
        header = {
            "sample_id": record["sample_id"],
            "split": record["split"],
            "path": record["image"],
            "mask_path": record["mask"] if has_masks else None,
            "labels": {rank: record[rank] for rank in levels},
            "indices": {rank: indices[rank][record[rank]] for rank in levels},
        }
        mask_path = str(image_root / record["mask"]) if has_masks else None
        jobs.append(
            SampleJob(record["sample_id"], str(image_root / record["image"]), mask_path, header)
        )
    return jobs


def _encoded(
    jobs: list[SampleJob], config: ShardConfig, workers: int
) -> Iterator[list[tuple[str, bytes]]]:
    encode = functools.partial(encode_sample, config=config)
    if workers <= 1:
        yield from map(encode, jobs)
        return
    # fork, not spawn: spawn re-runs __main__, which for a Snakemake script is the whole job.
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        yield from pool.imap(encode, jobs, chunksize=max(1, min(32, len(jobs) // (4 * workers))))


def _remove_stale_shards(out_dir: Path, plans: list[ShardPlan]) -> None:
    planned = {plan.file for plan in plans}
    for path in sorted(out_dir.iterdir()):
        if SHARD_PATTERN.match(path.name) and path.name not in planned:
            LOGGER.warning("removing stale shard %s from an earlier run", path)
            path.unlink()


def write_shards(
    metadata_path: str | os.PathLike,
    labels_dir: str | os.PathLike,
    image_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    levels: Sequence[str],
    config: ShardConfig,
    workers: int = 1,
) -> Path:
    """Write all shards and the manifest for a prepared metadata table; return the manifest path."""
    table = pd.read_parquet(metadata_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    indices = {
        rank: dict(zip(labels["name"], labels["index"].astype(int), strict=True))
        for rank in levels
        for labels in [read_label_map(Path(labels_dir) / f"{rank}.tsv")]
    }
    plans = plan_shards(table, config.max_samples_per_shard)
    _remove_stale_shards(out_dir, plans)
    jobs = sample_jobs(pd.concat([plan.rows for plan in plans]), levels, indices, Path(image_root))
    entries = []
    # closing() ends the worker pool as soon as the last shard is written.
    with contextlib.closing(_encoded(jobs, config, workers)) as encoded:
        for plan in plans:
            members = (member for _ in range(len(plan.rows)) for member in next(encoded))
            write_tar(out_dir / plan.file, members)
            entries.append(
                {
                    "file": plan.file,
                    "split": plan.split,
                    "n_samples": len(plan.rows),
                    "class_counts": plan.rows[levels[-1]].value_counts().sort_index().to_dict(),
                    "sha256": sha256_file(out_dir / plan.file),
                }
            )
            LOGGER.info("wrote %s (%d samples)", plan.file, len(plan.rows))
    manifest = {
        "format": MANIFEST_FORMAT,
        "levels": list(levels),
        "has_masks": "mask" in table.columns,
        "config": asdict(config),
        "shards": entries,
        "splits": {
            split: {
                "n_samples": sum(e["n_samples"] for e in entries if e["split"] == split),
                "n_shards": sum(1 for e in entries if e["split"] == split),
            }
            for split in SPLITS
        },
    }
    write_json(out_dir / MANIFEST_NAME, manifest)
    return out_dir / MANIFEST_NAME
