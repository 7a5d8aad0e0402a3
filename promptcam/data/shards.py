"""WebDataset tar shards: every image stored once, with the labels of every rank.

Layout of ``out_dir``:

- ``{split}-{NNNNNN}.tar`` (NNNNNN counts from 000000 within each split): at most
  ``max_samples_per_shard`` samples, in ``sample_id`` order. The id is a hash of the path, so
  this order is a fixed pseudo-random mix of classes, which a small shuffle buffer needs.
  Each sample ``<sample_id>`` has members ``<sample_id>.jpg`` (the picture as displayed, 8-bit
  RGB: see :mod:`promptcam.data.images` for every mode's conversion; short side resized to
  ``short_side`` if larger, never enlarged), ``<sample_id>.json`` (``sample_id``, ``split``,
  ``path``, ``mask_path``, ``labels`` ``{rank: name}``, ``indices`` ``{rank: index in
  labels/{rank}.tsv}``) and, when masks are given, ``<sample_id>.mask.png`` (the mask's values
  unchanged, resized with NEAREST to the stored image's size).
- ``manifest.json``: the levels, the shard and image settings, the dataset it came from, one
  entry per shard (``file``, ``split``, ``n_samples``, ``class_counts`` at the finest rank,
  ``sha256``) and totals per split (``n_samples``, ``n_shards``).

Shards are byte-for-byte reproducible whatever the number of workers: samples are encoded in
parallel but written in a fixed order by one process, tar headers carry fixed metadata
(mtime 0, uid/gid 0, no user names, mode 0444), and the JPEG/PNG encoders are deterministic.

Resuming: each shard is written atomically into ``<out_dir>.partial/`` with a record of its
checksum and of everything it was made from (samples, labels, settings, the files' sizes and
modification times). A rerun after a crash (or a failed job, whose outputs Snakemake
deletes) reuses every finished shard whose record, checksum and inputs still match, and
writes only the rest; the result is byte-identical to an uninterrupted run. When all shards
are done they move into ``out_dir`` and the partial folder is removed.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import logging
import multiprocessing
import os
import re
import shutil
import tarfile
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from promptcam.data.images import ImageSettings, load_image, load_mask, resized_size
from promptcam.data.metadata import read_label_map
from promptcam.data.splits import SPLITS
from promptcam.io import atomic_path, sha256_file, write_json

LOGGER = logging.getLogger(__name__)

SHARD_PATTERN = re.compile(r"^(train|val|test)-\d{6}\.tar$")
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "promptcam-shards/1"
PARTIAL_SUFFIX = ".partial"
RECORD_SUFFIX = ".done.json"
# Shards encoded ahead of the one being written (keeps every worker busy at shard ends).
SHARDS_IN_FLIGHT = 2

__all__ = ["ShardConfig", "load_image", "load_mask", "resized_size", "write_shards"]


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


def encode_sample(
    job: SampleJob, config: ShardConfig, images: ImageSettings
) -> list[tuple[str, bytes]]:
    """Tar members (name, bytes) of one sample, in a fixed order."""
    try:
        image = load_image(job.image_path, config.short_side, images)
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
        # Worker tracebacks lose the sample; name it. Validation decoded this file with the
        # same decoder, so it changed since: validate again.
        raise RuntimeError(
            f"cannot encode {job.image_path} (sample {job.key}): {error}. It passed validation, "
            "so the file changed since; rerun the validation (snakemake --forcerun "
            "prepare_metadata)"
        ) from error
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


def _file_state(path: str | None) -> list[int] | None:
    if path is None:
        return None
    stat = os.stat(path)
    return [stat.st_size, stat.st_mtime_ns]


def shard_fingerprint(jobs: list[SampleJob], settings: dict[str, Any]) -> str:
    """What a shard's bytes depend on: its samples, their files' size and mtime, the settings."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode("utf-8"))
    for job in jobs:
        state = [job.header, _file_state(job.image_path), _file_state(job.mask_path)]
        digest.update(json.dumps(state, sort_keys=True).encode("utf-8"))
    return digest.hexdigest()


def _record_path(partial: Path, file: str) -> Path:
    return partial / f"{file}{RECORD_SUFFIX}"


def _finished(partial: Path, file: str, fingerprint: str) -> str | None:
    """The checksum of a finished shard in ``partial`` that may be reused, else None."""
    record_path, tar = _record_path(partial, file), partial / file
    if not (record_path.is_file() and tar.is_file()):
        return None
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        return None
    if record.get("fingerprint") != fingerprint or record.get("sha256") != sha256_file(tar):
        return None
    return record["sha256"]


def _encoded_shards(
    pending: list[list[SampleJob]], encode: functools.partial, workers: int
) -> Iterator[list[list[tuple[str, bytes]]]]:
    """Each pending shard's samples encoded, in order, a few shards ahead of the caller."""
    if workers <= 1:
        for jobs in pending:
            yield [encode(job) for job in jobs]
        return
    # fork, not spawn: spawn re-runs __main__, which for a Snakemake script is the whole job.
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        in_flight: deque[Iterator[list[tuple[str, bytes]]]] = deque()
        queued = iter(pending)
        for jobs in queued:
            chunk = max(1, min(32, len(jobs) // (4 * workers)))
            in_flight.append(pool.imap(encode, jobs, chunksize=chunk))
            if len(in_flight) >= SHARDS_IN_FLIGHT:
                yield list(in_flight.popleft())
        while in_flight:
            yield list(in_flight.popleft())


def _remove_stale_shards(out_dir: Path, plans: list[ShardPlan]) -> None:
    planned = {plan.file for plan in plans}
    for path in sorted(out_dir.iterdir()):
        if SHARD_PATTERN.match(path.name) and path.name not in planned:
            LOGGER.warning("removing stale shard %s from an earlier run", path)
            path.unlink()


def _entry(plan: ShardPlan, finest: str, sha256: str) -> dict[str, Any]:
    return {
        "file": plan.file,
        "split": plan.split,
        "n_samples": len(plan.rows),
        "class_counts": plan.rows[finest].value_counts().sort_index().to_dict(),
        "sha256": sha256,
    }


def write_shards(
    metadata_path: str | os.PathLike,
    labels_dir: str | os.PathLike,
    image_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    levels: Sequence[str],
    config: ShardConfig,
    workers: int = 1,
    images: ImageSettings | None = None,
    provenance: dict[str, Any] | None = None,
) -> Path:
    """Write all shards and the manifest for a prepared metadata table; return the manifest path.

    Resumes an interrupted run (see the module docstring). ``provenance`` (the workflow's
    dataset fingerprint) is recorded in the manifest.
    """
    images = images or ImageSettings()
    table = pd.read_parquet(metadata_path)
    out_dir = Path(out_dir)
    partial = out_dir.with_name(out_dir.name + PARTIAL_SUFFIX)
    out_dir.mkdir(parents=True, exist_ok=True)
    partial.mkdir(parents=True, exist_ok=True)
    indices = {
        rank: dict(zip(labels["name"], labels["index"].astype(int), strict=True))
        for rank in levels
        for labels in [read_label_map(Path(labels_dir) / f"{rank}.tsv")]
    }
    plans = plan_shards(table, config.max_samples_per_shard)
    _remove_stale_shards(out_dir, plans)
    settings = {"format": MANIFEST_FORMAT, "config": asdict(config), "images": asdict(images)}
    checksums: dict[str, str] = {}
    pending: list[tuple[ShardPlan, list[SampleJob], str]] = []
    for plan in plans:
        jobs = sample_jobs(plan.rows, levels, indices, Path(image_root))
        fingerprint = shard_fingerprint(jobs, settings)
        if (sha256 := _finished(partial, plan.file, fingerprint)) is not None:
            checksums[plan.file] = sha256
        else:
            pending.append((plan, jobs, fingerprint))
    if checksums:
        LOGGER.info(
            "resuming: %d of %d shard(s) finished earlier and unchanged, %d to write",
            len(checksums),
            len(plans),
            len(pending),
        )
    encode = functools.partial(encode_sample, config=config, images=images)
    # closing() ends the worker pool as soon as the last shard is written.
    with contextlib.closing(
        _encoded_shards([jobs for _, jobs, _ in pending], encode, workers)
    ) as encoded:
        for (plan, _, fingerprint), samples in zip(pending, encoded, strict=True):
            write_tar(partial / plan.file, (member for sample in samples for member in sample))
            checksums[plan.file] = sha256_file(partial / plan.file)
            write_json(
                _record_path(partial, plan.file),
                {"fingerprint": fingerprint, "sha256": checksums[plan.file]},
            )
            LOGGER.info("wrote %s (%d samples)", plan.file, len(plan.rows))
    for plan in plans:
        os.replace(partial / plan.file, out_dir / plan.file)
    shutil.rmtree(partial)
    entries = [_entry(plan, levels[-1], checksums[plan.file]) for plan in plans]
    manifest = {
        "format": MANIFEST_FORMAT,
        "levels": list(levels),
        "has_masks": "mask" in table.columns,
        "config": asdict(config),
        "images": asdict(images),
        "dataset": provenance or {},
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


def account_images(
    ingest_path: str | os.PathLike, manifest_path: str | os.PathLike, out_tsv: str | os.PathLike
) -> pd.DataFrame:
    """Check that every image read is sharded or skipped; write the counts as a TSV.

    Raises RuntimeError when images in != images sharded + images skipped (nothing may be
    lost between validation and the shards).
    """
    ingest = json.loads(Path(ingest_path).read_text())
    manifest = json.loads(Path(manifest_path).read_text())
    sharded = {split: manifest["splits"][split]["n_samples"] for split in SPLITS}
    total = sum(sharded.values())
    balanced = ingest["rows_in"] == total + ingest["skipped"]
    counts = pd.DataFrame(
        [
            ("images in", ingest["rows_in"]),
            ("skipped (on_bad_image: skip; see skipped.tsv)", ingest["skipped"]),
            ("sharded", total),
            *[(f"sharded {split}", n) for split, n in sharded.items()],
            ("hidden or system files ignored (folder trees)", ingest["ignored_files"]),
            ("in = sharded + skipped", "yes" if balanced else "NO"),
        ],
        columns=["what", "count"],
    )
    with atomic_path(out_tsv) as tmp:
        counts.to_csv(tmp, sep="\t", index=False)
    message = f"images in {ingest['rows_in']} = sharded {total} + skipped {ingest['skipped']}"
    if not balanced:
        raise RuntimeError(f"images were lost: {message} does not hold")
    LOGGER.info("%s: every image accounted for", message)
    return counts


def write_shards_accounted(
    metadata_path: str | os.PathLike,
    labels_dir: str | os.PathLike,
    image_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    levels: Sequence[str],
    config: ShardConfig,
    ingest_path: str | os.PathLike,
    counts_path: str | os.PathLike,
    workers: int = 1,
    images: ImageSettings | None = None,
) -> Path:
    """:func:`write_shards` for the table ``prepare_metadata`` wrote (its ``ingest.json``
    gives the dataset fingerprint for the manifest), then :func:`account_images`."""
    ingest = json.loads(Path(ingest_path).read_text())
    manifest = write_shards(
        metadata_path,
        labels_dir,
        image_root,
        out_dir,
        levels,
        config,
        workers=workers,
        images=images,
        provenance=ingest.get("dataset"),
    )
    account_images(ingest_path, manifest, counts_path)
    return manifest
