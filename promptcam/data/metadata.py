"""Read, validate and prepare the metadata table of a labelled image collection.

Input: a CSV, TSV or parquet table (chosen by file extension) with an image path column
(relative to an image root), one label column per taxonomic rank (coarse to fine), and
optionally a ``split`` column (train/val/test) and a ``mask`` column (paths of trait masks,
relative to the same root). Cells are read as text with surrounding whitespace stripped.

Everything is checked before anything is written: all problems are collected and raised
together as one :class:`MetadataError`. No row is ever dropped: a table with a problem is
rejected as a whole, with the file, the 1-based data row (header not counted) and the fix.

Outputs of :func:`prepare_metadata` (in ``out_dir``):

- ``metadata.parquet``: one row per image, in input order, columns ``sample_id`` (the first
  16 hex digits of the SHA-1 of the image path: stable across runs and row orders),
  ``image`` (path relative to the image root, normalised, POSIX), ``mask`` (same, if masks
  are given), one column per rank, and ``split``.
- ``labels/{rank}.tsv``: ``index``, ``name`` (sorted, so the index is stable), ``parent``
  (label at the next coarser rank; empty for the coarsest), ``count``, ``n_train``,
  ``n_val``, ``n_test``.
- ``taxonomy.nwk``: see :mod:`promptcam.data.taxonomy`.
- ``split_summary.tsv``: images per split for each class of the finest rank and the rule that
  placed them (see :mod:`promptcam.data.splits`).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import posixpath
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from PIL import Image

from promptcam.data.splits import SPLITS, SplitConfig, assign_splits, summarize_splits
from promptcam.data.taxonomy import build_taxonomy, to_newick
from promptcam.io import atomic_open, atomic_path

LOGGER = logging.getLogger(__name__)

TABLE_READERS = {".csv": ",", ".tsv": "\t", ".tab": "\t"}
COMPRESSION_SUFFIXES = {".gz", ".bz2", ".xz", ".zst", ".zip"}
PARQUET_SUFFIXES = {".parquet", ".pq"}
# Double quotes would break the quoted Newick names; tabs and newlines the label TSVs.
FORBIDDEN_LABEL_CHARACTERS = ('"', "\t", "\n", "\r")
EXIF_ORIENTATION = 0x0112
TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}
# Columns of the prepared table besides the ranks.
RESERVED_COLUMNS = ("sample_id", "image", "mask", "split")
# Single-channel modes whose pixel values are the mask values (a bitmask must survive as is).
MASK_MODES = {"L", "P", "1"}


@dataclass(frozen=True)
class MetadataSpec:
    """Which columns of the table mean what."""

    levels: tuple[str, ...] = ("family", "genus", "species")
    image_column: str = "image"
    split_column: str = "split"
    mask_column: str = "mask"

    def __post_init__(self) -> None:
        if not self.levels or len(set(self.levels)) != len(self.levels):
            raise ValueError(f"levels must be a non-empty list of distinct names: {self.levels}")
        reserved = {*RESERVED_COLUMNS, self.image_column, self.mask_column, self.split_column}
        if clashes := sorted(set(self.levels) & reserved):
            raise ValueError(f"rank names {clashes} clash with the image/mask/split columns")


@dataclass(frozen=True)
class Problem:
    kind: str
    message: str


class MetadataError(ValueError):
    """Every problem found in one metadata table, listed (capped per kind) with counts."""

    def __init__(self, source: str, problems: Sequence[Problem], max_listed: int = 10) -> None:
        self.source = source
        self.problems = list(problems)
        self.counts = Counter(problem.kind for problem in self.problems)
        super().__init__(self._render(max_listed))

    def _render(self, max_listed: int) -> str:
        overview = ", ".join(f"{n} {kind}" for kind, n in self.counts.items())
        lines = [
            f"{self.source}: {len(self.problems)} problem(s) in the metadata ({overview}); "
            "nothing was processed. Rows are 1-based data rows (the header is not counted)."
        ]
        for kind, count in self.counts.items():
            lines.append(f"[{kind}] {count}:")
            listed = [p.message for p in self.problems if p.kind == kind][:max_listed]
            lines.extend(f"  - {message}" for message in listed)
            if count > len(listed):
                lines.append(f"  ... and {count - len(listed)} more {kind} problem(s)")
        return "\n".join(lines)


def read_table(path: str | os.PathLike) -> pd.DataFrame:
    """Read a CSV/TSV/parquet table as stripped text (missing cells become empty strings)."""
    path = Path(path)
    suffixes = [s.lower() for s in path.suffixes if s.lower() not in COMPRESSION_SUFFIXES]
    suffix = suffixes[-1] if suffixes else ""
    if suffix in PARQUET_SUFFIXES:
        table = pd.read_parquet(path)
    elif suffix in TABLE_READERS:
        table = pd.read_csv(
            path, sep=TABLE_READERS[suffix], dtype=str, keep_default_na=False, na_filter=False
        )
    else:
        raise ValueError(
            f"{path}: cannot tell the table format from the extension {suffix!r}; "
            "use .csv, .tsv or .parquet"
        )
    table = table.astype("string").fillna("").astype(object)
    table.columns = [str(column).strip() for column in table.columns]
    return table.apply(lambda column: column.str.strip()).reset_index(drop=True)


def normalise_path(path: str) -> str:
    return posixpath.normpath(path.replace(os.sep, "/")) if path else ""


def sample_id(relative_path: str) -> str:
    return hashlib.sha1(relative_path.encode("utf-8")).hexdigest()[:16]


def _row(index: int) -> str:
    return f"row {index + 1}"


def _rows(indices: Iterable[int], limit: int = 5) -> str:
    indices = list(indices)
    shown = ", ".join(str(i + 1) for i in indices[:limit])
    more = f" (and {len(indices) - limit} more)" if len(indices) > limit else ""
    return f"rows {shown}{more}"


def check_columns(table: pd.DataFrame, spec: MetadataSpec) -> list[Problem]:
    present = ", ".join(table.columns) or "none"
    problems = [
        Problem(
            "missing column",
            f"column {column!r} ({role}) is missing; columns present: {present}. Fix: add it, or "
            f"point {setting} in the config at the right column.",
        )
        for column, role, setting in [
            (spec.image_column, "image paths", "dataset.image_column"),
            *[(level, "rank labels", "`levels`") for level in spec.levels],
        ]
        if column not in table.columns
    ]
    if table.empty:
        problems.append(Problem("empty table", "the table has no data rows. Fix: add images."))
    return problems


def check_labels(table: pd.DataFrame, levels: Sequence[str]) -> list[Problem]:
    problems = []
    for level in levels:
        for index, label in table[level].items():
            if not label:
                problems.append(
                    Problem(
                        "empty label",
                        f"{_row(index)}: empty {level} label. Fix: fill it in or remove the row.",
                    )
                )
            elif any(char in label for char in FORBIDDEN_LABEL_CHARACTERS):
                problems.append(
                    Problem(
                        "bad label",
                        f"{_row(index)}: {level} label {label!r} contains a double quote, tab or "
                        "line break. Fix: remove that character.",
                    )
                )
    return problems


def check_tree(table: pd.DataFrame, levels: Sequence[str]) -> list[Problem]:
    """Every label must have exactly one parent at the next coarser rank."""
    problems = []
    # Checking adjacent ranks suffices: unique parents compose into unique ancestors.
    for parent, child in itertools.pairwise(levels):
        pairs = table[[parent, child]]
        pairs = pairs[(pairs[parent] != "") & (pairs[child] != "")]
        for label, group in pairs.groupby(child, sort=True):
            first_rows = group.groupby(parent, sort=False).head(1)
            if len(first_rows) < 2:
                continue
            (row_a, parent_a), (row_b, parent_b) = list(first_rows[parent].items())[:2]
            others = f" (and {len(first_rows) - 2} more)" if len(first_rows) > 2 else ""
            problems.append(
                Problem(
                    "not a tree",
                    f"{child} {label!r} is under two {parent} labels: {_row(row_a)} has "
                    f"{parent} {parent_a!r}, {_row(row_b)} has {parent} {parent_b!r}{others}. "
                    f"Fix: correct the wrong row, or make the {child} names unique "
                    f"(e.g. prefix them with the {parent}).",
                )
            )
    return problems


def check_duplicates(table: pd.DataFrame, column: str) -> list[Problem]:
    paths = table[column][table[column] != ""]
    duplicated = paths[paths.duplicated(keep=False)]
    return [
        Problem(
            "duplicate path",
            f"{column} {path!r} is listed in {_rows(group.index)}. Fix: list each image once.",
        )
        for path, group in duplicated.groupby(duplicated, sort=True)
    ]


def check_splits(table: pd.DataFrame, column: str) -> list[Problem]:
    allowed = ", ".join(SPLITS)
    return [
        Problem(
            "bad split",
            f"{_row(index)}: {column} {value!r} is not one of {allowed}. Fix: use one of "
            f"those in every row, or drop the column to split automatically.",
        )
        for index, value in table[column].items()
        if value not in SPLITS
    ]


@dataclass(frozen=True)
class ImageCheck:
    found: bool
    error: str | None = None  # why PIL could not read it
    size: tuple[int, int] | None = None  # (width, height) as displayed, after EXIF orientation
    mode: str | None = None


def inspect_image(path: Path) -> ImageCheck:
    """Open and verify an image without decoding it; report its displayed size."""
    if not path.is_file():
        return ImageCheck(found=False)
    try:
        with Image.open(path) as image:
            width, height = image.size
            mode = image.mode
            image.verify()
        # verify() must come straight after open and leaves the image unusable: reopen.
        with Image.open(path) as image:
            orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    except Exception as error:  # PIL raises many types for corrupt files
        return ImageCheck(found=True, error=f"{type(error).__name__}: {error}")
    if orientation in TRANSPOSING_ORIENTATIONS:
        width, height = height, width
    return ImageCheck(found=True, size=(width, height), mode=mode)


def check_files(
    table: pd.DataFrame, spec: MetadataSpec, image_root: Path, workers: int
) -> list[Problem]:
    """Images (and masks) must exist, open with PIL, and masks must match their image's size."""
    if not image_root.is_dir():
        return [
            Problem(
                "missing image root",
                f"the image root {image_root.resolve()} is not a directory. Fix: set "
                "`dataset.image_root`.",
            )
        ]
    columns = [spec.image_column]
    if spec.mask_column in table.columns:
        columns.append(spec.mask_column)
    checks: dict[str, dict[int, ImageCheck]] = {}
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for column in columns:
            paths = {i: image_root / p for i, p in table[column].items() if p}
            checks[column] = dict(zip(paths, pool.map(inspect_image, paths.values()), strict=True))
    problems = []
    for column in columns:
        for index, value in table[column].items():
            if not value:
                problems.append(
                    Problem(
                        "empty path",
                        f"{_row(index)}: empty {column} path. Fix: fill it in or remove the row.",
                    )
                )
                continue
            check = checks[column][index]
            if not check.found:
                problems.append(
                    Problem(
                        f"missing {column}",
                        f"{_row(index)}: {column} file {value!r} not found under the image root "
                        f"{image_root.resolve()}. Fix: correct the path or `dataset.image_root`.",
                    )
                )
            elif check.error:
                problems.append(
                    Problem(
                        f"unreadable {column}",
                        f"{_row(index)}: {column} file {value!r} cannot be read by PIL "
                        f"({check.error}). Fix: re-export the file or remove the row.",
                    )
                )
    if len(columns) == 2:
        problems.extend(_check_masks(table, spec, checks))
    return problems


def _check_masks(
    table: pd.DataFrame, spec: MetadataSpec, checks: dict[str, dict[int, ImageCheck]]
) -> list[Problem]:
    problems = []
    for index in table.index:
        image = checks[spec.image_column].get(index)
        mask = checks[spec.mask_column].get(index)
        if mask and mask.mode and mask.mode not in MASK_MODES:
            problems.append(
                Problem(
                    "mask mode",
                    f"{_row(index)}: mask {table.at[index, spec.mask_column]!r} has mode "
                    f"{mask.mode}. Fix: save masks single-channel (8-bit grey or palette).",
                )
            )
        if image and mask and image.size and mask.size and image.size != mask.size:
            problems.append(
                Problem(
                    "mask size",
                    f"{_row(index)}: mask {table.at[index, spec.mask_column]!r} is "
                    f"{mask.size[0]}x{mask.size[1]} but its image is {image.size[0]}x"
                    f"{image.size[1]}. Fix: masks must have their image's size.",
                )
            )
    return problems


def validate_table(
    table: pd.DataFrame, spec: MetadataSpec, image_root: str | os.PathLike, workers: int = 1
) -> list[Problem]:
    """All problems of ``table``; paths must already be normalised (see :func:`load_metadata`)."""
    problems = check_columns(table, spec)
    levels = [level for level in spec.levels if level in table.columns]
    problems += check_labels(table, levels)
    problems += check_tree(table, levels)
    if spec.split_column in table.columns:
        problems += check_splits(table, spec.split_column)
    if spec.image_column in table.columns:
        problems += check_duplicates(table, spec.image_column)
        problems += check_files(table, spec, Path(image_root), workers)
    return problems


def load_metadata(
    path: str | os.PathLike, image_root: str | os.PathLike, spec: MetadataSpec, workers: int = 1
) -> pd.DataFrame:
    """Read and validate a table; return it normalised (see the module docstring for columns).

    The ``split`` column holds the given split, or empty strings when the table has none.
    Raises :class:`MetadataError` listing every problem.
    """
    table = read_table(path)
    for column in (spec.image_column, spec.mask_column):
        if column in table.columns:
            table[column] = table[column].map(normalise_path)
    problems = validate_table(table, spec, image_root, workers)
    if problems:
        raise MetadataError(Path(path).name, problems)
    prepared = pd.DataFrame({"sample_id": table[spec.image_column].map(sample_id)})
    prepared["image"] = table[spec.image_column]
    if spec.mask_column in table.columns:
        prepared["mask"] = table[spec.mask_column]
    for level in spec.levels:
        prepared[level] = table[level]
    prepared["split"] = table[spec.split_column] if spec.split_column in table.columns else ""
    if prepared["sample_id"].duplicated().any():
        raise RuntimeError("two image paths share a sample_id (SHA-1 prefix collision)")
    return prepared


def label_map(table: pd.DataFrame, levels: Sequence[str], rank: str) -> pd.DataFrame:
    """Classes of ``rank`` with a stable index (sorted names), parent and image counts."""
    position = list(levels).index(rank)
    counts = pd.crosstab(table[rank], table["split"]).reindex(columns=list(SPLITS), fill_value=0)
    labels = pd.DataFrame({"name": sorted(table[rank].unique())})
    labels.insert(0, "index", range(len(labels)))
    if position > 0:
        parents = table.drop_duplicates(rank).set_index(rank)[levels[position - 1]]
        labels["parent"] = labels["name"].map(parents)
    else:
        labels["parent"] = ""
    labels["count"] = labels["name"].map(counts.sum(axis=1)).astype(int)
    for split in SPLITS:
        labels[f"n_{split}"] = labels["name"].map(counts[split]).astype(int)
    return labels


def read_label_map(path: str | os.PathLike) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", dtype={"name": str, "parent": str}, keep_default_na=False)


def _write_tsv(frame: pd.DataFrame, path: Path) -> None:
    with atomic_open(path, "w", newline="") as handle:
        frame.to_csv(handle, sep="\t", index=False)


def prepare_metadata(
    table_path: str | os.PathLike,
    image_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    spec: MetadataSpec,
    split_config: SplitConfig,
    workers: int = 1,
) -> Path:
    """Validate, split, and write the metadata, label maps, taxonomy and split summary.

    Returns the path of ``metadata.parquet``.
    """
    out_dir = Path(out_dir)
    table = load_metadata(table_path, image_root, spec, workers)
    finest = spec.levels[-1]
    given = bool((table["split"] != "").all())
    if not given:
        table["split"] = assign_splits(table["sample_id"], table[finest], split_config)
    summary = summarize_splits(table[finest], table["split"], split_config, given)
    _log_split(table, summary, given, split_config)

    with atomic_path(out_dir / "metadata.parquet") as tmp:
        table.to_parquet(tmp, index=False)
    for rank in spec.levels:
        _write_tsv(label_map(table, spec.levels, rank), out_dir / "labels" / f"{rank}.tsv")
    with atomic_open(out_dir / "taxonomy.nwk", "w") as handle:
        handle.write(to_newick(build_taxonomy(table, spec.levels)) + "\n")
    _write_tsv(summary, out_dir / "split_summary.tsv")
    return out_dir / "metadata.parquet"


def _log_split(
    table: pd.DataFrame, summary: pd.DataFrame, given: bool, config: SplitConfig
) -> None:
    totals = table["split"].value_counts().reindex(list(SPLITS), fill_value=0).to_dict()
    source = "given split column" if given else f"stratified split, seed {config.seed}"
    LOGGER.info("%d images, %s: %s", len(table), source, totals)
    too_small = summary[summary["rule"] == "too_small"]
    if len(too_small):
        LOGGER.warning(
            "%d class(es) with fewer than %d images put entirely in train (no val/test): %s",
            len(too_small),
            config.min_class_size,
            ", ".join(too_small["class"]),
        )
    # Stratified splits leave classes out of val/test only by their documented rules.
    for split in SPLITS if given else ():
        absent = summary[summary[f"n_{split}"] == 0]
        if len(absent):
            LOGGER.warning(
                "%d class(es) have no %s images: %s", len(absent), split, ", ".join(absent["class"])
            )


def read_label_names(labels_tsv: str | os.PathLike) -> list[str]:
    """Class names in index order from ``labels/{rank}.tsv``."""
    labels = read_label_map(labels_tsv)
    if labels["index"].tolist() != list(range(len(labels))):
        raise ValueError(f"{labels_tsv}: the index column must be 0..C-1 in order")
    return labels["name"].tolist()
