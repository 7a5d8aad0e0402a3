"""Which dataset the results belong to: a fingerprint of the data source, checked at start.

The workflow describes its data source when it starts (:func:`describe_source`): the kind,
the levels and columns, and for a table its resolved path and the SHA-256 of its bytes, for a
folder tree its resolved root and the modification times of its folders (a folder's time
changes whenever an entry is added, removed or renamed in it), for the demo its generator
settings. Rule ``record_source`` writes it to ``results/data/sources/<fingerprint>.json``
(:func:`record_source`), an input of the first data rule that ``rule all`` also requests;
the description is that rule's parameter too. Another dataset has another fingerprint, so
another path: with Snakemake's records (``.snakemake/``) the rule's input set and
parameters change; without them (a copied results folder) ``rule all`` finds the record
missing. Either way the data stage and everything after it rerun, even when the new table
is older than the results. (A missing file is regenerated only when some job or target
requests it, hence rule all.) Nothing is written at start, so a dry run with another
dataset changes nothing. ``ingest.json`` and the shards' manifest carry the description,
so every result can be traced to its data.

Images edited in place under an unchanged table are not noticed (hashing every image at each
start would cost minutes): rerun with ``--forcerun prepare_metadata``.

:func:`check_source` runs first: a configured table or image root that does not exist is an
error naming the config key, instead of Snakemake quietly keeping the previous dataset's
results (it treats existing outputs whose job cannot run as source files).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from promptcam.io import sha256_file, write_json


class SourceError(ValueError):
    """The configured data source does not exist; the message names the config key."""


def check_source(kind: str, metadata: str | None, image_root: str | None) -> None:
    """Raise :class:`SourceError` when the configured table or image root is missing."""
    here = Path.cwd()
    if kind == "table" and not Path(metadata).is_file():
        raise SourceError(
            f"dataset.metadata: the table {metadata!r} does not exist (relative paths are "
            f"relative to the working directory {here}). Fix: point dataset.metadata at your "
            "CSV/TSV/parquet table, or set dataset.kind: demo. Results of another dataset are "
            "never reused."
        )
    if kind in ("table", "folders") and not Path(image_root).is_dir():
        raise SourceError(
            f"dataset.image_root: {image_root!r} is not a directory (relative paths are relative "
            f"to the working directory {here}). Fix: point dataset.image_root at the folder "
            + ("the table's paths are relative to." if kind == "table" else "of the rank folders.")
        )


def folder_tree_state(root: str | os.PathLike, depth: int) -> str:
    """SHA-256 over (path, mtime) of every folder down to ``depth`` levels below ``root``.

    Folders at the last level are stat()ed, not listed: their files are never enumerated.
    """
    digest = hashlib.sha256()
    stack = [(Path(root), 0)]
    while stack:
        folder, level = stack.pop()
        with os.scandir(folder) as entries:
            children = sorted(
                (entry for entry in entries if entry.is_dir() and not entry.name.startswith(".")),
                key=lambda entry: entry.name,
                reverse=True,
            )
        for child in children:
            relative = Path(child.path).relative_to(root).as_posix()
            digest.update(f"{relative}\0{child.stat().st_mtime_ns}\n".encode())
            if level + 1 < depth:
                stack.append((Path(child.path), level + 1))
    digest.update(f".\0{os.stat(root).st_mtime_ns}\n".encode())
    return digest.hexdigest()


def describe_source(
    kind: str,
    levels: Sequence[str],
    columns: dict[str, str],
    metadata: str | None = None,
    image_root: str | None = None,
    demo: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What identifies the dataset, with its ``fingerprint`` (SHA-256 of the rest)."""
    description: dict[str, Any] = {"kind": kind, "levels": list(levels), "columns": columns}
    if kind == "demo":
        description["demo"] = demo or {}
    if kind == "table":
        description["table"] = str(Path(metadata).resolve())
        description["table_sha256"] = sha256_file(metadata)
    if kind in ("table", "folders"):
        description["image_root"] = str(Path(image_root).resolve())
    if kind == "folders":
        description["folders_state"] = folder_tree_state(image_root, len(levels))
    canonical = json.dumps(description, sort_keys=True).encode("utf-8")
    return {**description, "fingerprint": hashlib.sha256(canonical).hexdigest()}


def record_source(path: str | os.PathLike, description: dict[str, Any]) -> Path:
    """Write ``description`` to ``path`` and remove the records of other datasets beside it."""
    path = Path(path)
    write_json(path, description)
    for other in path.parent.glob("*.json"):
        if other.name != path.name:
            other.unlink()
    return path
