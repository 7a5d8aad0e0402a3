"""Read, validate and prepare the metadata of a labelled image collection, in one pass.

Input: a CSV, TSV or parquet table (see :mod:`promptcam.data.tables` for encodings and
delimiters) with an image path column (relative to an image root), one label column per
taxonomic rank (coarse to fine), and optionally a ``split`` column (train/val/test) and a
``mask`` column (paths of trait masks, relative to the same root); or a folder tree
``root/<rank 1>/.../<finest rank>/<images>`` (:mod:`promptcam.data.folders`).

Everything is checked before anything is written (table, names: :mod:`promptcam.data.names`,
and every image file, decoded in parallel: :mod:`promptcam.data.file_checks`) and every
problem is reported at once: a short summary in the :class:`MetadataError`, the full list in
``problems.tsv`` (row, file, problem, detail, fix), which is written even when validation
fails. Table problems always fail. Bad image files (missing, unreadable, too large) fail too
under ``on_bad_image="fail"``; under ``"skip"`` their rows are left out, listed in
``skipped.tsv`` and counted, never dropped silently.

Outputs of :func:`prepare_metadata` (in ``out_dir``):

- ``metadata.parquet``: one row per kept image, in input order, columns ``sample_id`` (the
  first 16 hex digits of the SHA-1 of the image path: stable across runs and row orders),
  ``image`` (path relative to the image root, normalised, POSIX), ``mask`` (same, if masks
  are given), one column per rank, and ``split``.
- ``labels/{rank}.tsv``: ``index``, ``name`` (sorted, so the index is stable), ``parent``
  (label at the next coarser rank; empty for the coarsest), ``count``, ``n_train``,
  ``n_val``, ``n_test``.
- ``taxonomy.nwk``: see :mod:`promptcam.data.taxonomy`.
- ``split_summary.tsv``: images per split for each class of the finest rank and the rule that
  placed them (see :mod:`promptcam.data.splits`).
- ``problems.tsv``, ``skipped.tsv`` (see above) and ``ingest.json``: where the data came from
  (``source``, and the workflow's ``dataset`` fingerprint), rows in, skipped and kept.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from promptcam.data.file_checks import SKIPPABLE_KINDS, check_files
from promptcam.data.folders import read_folder_tree
from promptcam.data.images import ImageSettings
from promptcam.data.names import normalise_labels, qualify_epithets
from promptcam.data.problems import (
    Locator,
    MetadataError,
    Problem,
    summarise,
    write_problems,
    write_skipped,
)
from promptcam.data.splits import SPLITS, SplitConfig, assign_splits, summarize_splits
from promptcam.data.table_checks import (
    check_columns,
    check_labels,
    check_paths,
    check_splits,
    check_tree,
)
from promptcam.data.tables import normalise_paths, read_table
from promptcam.data.taxonomy import build_taxonomy, to_newick
from promptcam.io import atomic_open, atomic_path, write_json

LOGGER = logging.getLogger(__name__)

# Columns of the prepared table besides the ranks.
RESERVED_COLUMNS = ("sample_id", "image", "mask", "split")
ON_BAD_IMAGE = ("fail", "skip")
PROBLEMS_NAME = "problems.tsv"
SKIPPED_NAME = "skipped.tsv"
INGEST_NAME = "ingest.json"


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
class IngestSettings:
    """What to do with bad image files, and how files become RGB (:mod:`.images`)."""

    on_bad_image: str = "fail"
    images: ImageSettings = field(default_factory=ImageSettings)

    @classmethod
    def from_mapping(cls, mapping: dict) -> IngestSettings:
        """From the config's values: ``{on_bad_image, images: {...}}``."""
        images = ImageSettings.from_mapping(mapping.get("images", {}))
        return cls(on_bad_image=mapping.get("on_bad_image", "fail"), images=images)

    def __post_init__(self) -> None:
        if self.on_bad_image not in ON_BAD_IMAGE:
            raise ValueError(f"on_bad_image must be one of {ON_BAD_IMAGE}: {self.on_bad_image!r}")


@dataclass
class Source:
    """A dataset read into a table: the rows, how to name their places, what was ignored."""

    name: str
    table: pd.DataFrame
    locator: Locator
    problems: list[Problem] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


def sample_id(relative_path: str) -> str:
    return hashlib.sha1(relative_path.encode("utf-8")).hexdigest()[:16]


def read_source(
    table_path: str | os.PathLike | None, image_root: str | os.PathLike, spec: MetadataSpec
) -> Source:
    """The table (or, with ``table_path=None``, the folder tree at ``image_root``), cleaned:
    labels normalised (:func:`.names.normalise_labels`), bare epithets made binomials, paths
    POSIX. The index holds 0-based data rows."""
    if table_path is None:
        tree = read_folder_tree(image_root, spec.levels)
        table = tree.table.rename(columns={"image": spec.image_column})
        locator = Locator(table[spec.image_column], by_file=True)
        source = Source(str(image_root), table, locator, tree.problems, tree.ignored)
    else:
        table = read_table(table_path, [spec.image_column, *spec.levels])
        for column in (spec.image_column, spec.mask_column):
            if column in table.columns:
                table[column] = normalise_paths(table[column])
        files = table[spec.image_column] if spec.image_column in table.columns else None
        source = Source(Path(table_path).name, table, Locator(files))
    for level in spec.levels:
        if level in source.table.columns:
            source.table[level] = normalise_labels(source.table[level])
    present = [level for level in spec.levels if level in source.table.columns]
    if qualified := qualify_epithets(source.table, present):
        LOGGER.info("%d species label(s) were bare epithets: stored as 'Genus epithet'", qualified)
    return source


def table_problems(source: Source, spec: MetadataSpec) -> list[Problem]:
    """Every problem of the table itself (not of the files)."""
    table, locator = source.table, source.locator
    problems = [*source.problems, *check_columns(table, spec)]
    levels = [level for level in spec.levels if level in table.columns]
    problems += check_labels(table, levels, locator)
    problems += check_tree(table, levels, locator)
    if spec.split_column in table.columns:
        problems += check_splits(table, spec.split_column, locator)
    if spec.image_column in table.columns:
        problems += check_paths(table, spec.image_column, locator)
    return problems


def _file_columns(table: pd.DataFrame, spec: MetadataSpec) -> dict[str, str]:
    columns = {"image": spec.image_column}
    if spec.mask_column in table.columns:
        columns["mask"] = spec.mask_column
    return columns


@dataclass
class Validated:
    """The rows to keep, and the problems of the rows left out (``on_bad_image: skip``)."""

    table: pd.DataFrame
    skipped: list[Problem]
    rows_in: int
    by_file: bool = False


def validate_source(
    source: Source,
    spec: MetadataSpec,
    image_root: str | os.PathLike,
    settings: IngestSettings,
    workers: int = 1,
    problems_path: str | os.PathLike | None = None,
) -> Validated:
    """Check the table and every file; write ``problems_path``; raise or keep the good rows."""
    problems = table_problems(source, spec)
    if spec.image_column in source.table.columns:
        files = check_files(
            source.table,
            _file_columns(source.table, spec),
            Path(image_root),
            settings.images,
            source.locator,
            workers,
        )
        problems += files.problems
        _warn_low_bit_depth(files.low_bit_depth, settings.images)
    by_file = source.locator.by_file
    if problems_path is not None:
        write_problems(problems, problems_path, by_file)
    skippable = settings.on_bad_image == "skip"
    fatal = [p for p in problems if not (skippable and p.kind in SKIPPABLE_KINDS)]
    if fatal or (problems and not skippable):
        raise MetadataError(source.name, problems, full_list=problems_path, by_file=by_file)
    skipped_rows = {row for problem in problems for row in problem.rows}
    kept = source.table.drop(index=sorted(skipped_rows))
    if kept.empty:
        raise MetadataError(
            source.name,
            [
                *problems,
                Problem(
                    "nothing left",
                    f"all {len(source.table)} images were skipped",
                    "check `dataset.image_root` and the paths",
                ),
            ],
            full_list=problems_path,
            by_file=by_file,
        )
    if problems:
        LOGGER.warning(
            "skipped %d image(s) (on_bad_image: skip):\n%s", len(skipped_rows), summarise(problems)
        )
    return Validated(kept, problems, rows_in=len(source.table), by_file=by_file)


def _warn_low_bit_depth(paths: list[str], settings: ImageSettings) -> None:
    if paths and settings.sample_bits is None:
        LOGGER.warning(
            "%d 16-bit image(s) never exceed 4095 (12-bit data in a 16-bit file?); scaled by the "
            "full 16-bit range they look dark. If the camera stores 12-bit values, set "
            "dataset.sample_bits: 12. First: %s",
            len(paths),
            ", ".join(paths[:5]),
        )


def prepared_table(table: pd.DataFrame, spec: MetadataSpec) -> pd.DataFrame:
    """The validated rows in the columns (and column types) of ``metadata.parquet``."""
    table = table.reset_index(drop=True)
    # Column types as the first version of this file wrote them (text ranks as object),
    # so that unchanged inputs still give byte-identical files.
    images = table[spec.image_column].astype(str)
    prepared = pd.DataFrame({"sample_id": images.map(sample_id).astype(str), "image": images})
    if spec.mask_column in table.columns:
        prepared["mask"] = table[spec.mask_column].astype(str)
    for level in spec.levels:
        prepared[level] = table[level].astype(object)
    if spec.split_column in table.columns:
        prepared["split"] = table[spec.split_column].astype(object)
    else:
        prepared["split"] = pd.Series("", index=table.index, dtype=object)
    if prepared["sample_id"].duplicated().any():
        raise RuntimeError("two image paths share a sample_id (SHA-1 prefix collision)")
    return prepared


def load_metadata(
    path: str | os.PathLike | None,
    image_root: str | os.PathLike,
    spec: MetadataSpec,
    workers: int = 1,
    settings: IngestSettings | None = None,
) -> pd.DataFrame:
    """Read and validate a table (or folder tree: ``path=None``); return the kept rows
    normalised (see the module docstring for columns). The ``split`` column holds the given
    split, or empty strings when the table has none. Raises :class:`MetadataError`."""
    source = read_source(path, image_root, spec)
    validated = validate_source(source, spec, image_root, settings or IngestSettings(), workers)
    return prepared_table(validated.table, spec)


def label_map(table: pd.DataFrame, levels: Sequence[str], rank: str) -> pd.DataFrame:
    """Classes of ``rank`` with a stable index (sorted names), parent and image counts."""
    position = list(levels).index(rank)
    counts = (
        table.groupby([rank, "split"], observed=True)
        .size()
        .unstack(fill_value=0)
        .reindex(columns=list(SPLITS), fill_value=0)
    )
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


def read_label_names(labels_tsv: str | os.PathLike) -> list[str]:
    """Class names in index order from ``labels/{rank}.tsv``."""
    labels = read_label_map(labels_tsv)
    if labels["index"].tolist() != list(range(len(labels))):
        raise ValueError(f"{labels_tsv}: the index column must be 0..C-1 in order")
    return labels["name"].tolist()


def _write_tsv(frame: pd.DataFrame, path: Path) -> None:
    with atomic_open(path, "w", newline="") as handle:
        frame.to_csv(handle, sep="\t", index=False)


def write_prepared(
    table: pd.DataFrame, out_dir: Path, spec: MetadataSpec, split_config: SplitConfig
) -> Path:
    """Split ``table`` (unless it has a complete split) and write the table, label maps,
    taxonomy and split summary; return the path of ``metadata.parquet``."""
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


def prepare_metadata(
    table_path: str | os.PathLike | None,
    image_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    spec: MetadataSpec,
    split_config: SplitConfig,
    workers: int = 1,
    settings: IngestSettings | None = None,
    provenance: dict[str, Any] | None = None,
) -> Path:
    """Validate, split, and write every output listed in the module docstring.

    ``table_path=None`` reads the folder tree at ``image_root``. ``provenance`` (the
    workflow's description of the dataset, with its fingerprint: see
    :mod:`promptcam.data.fingerprint`) is recorded in ``ingest.json``. Returns the path of
    ``metadata.parquet``.
    """
    out_dir = Path(out_dir)
    settings = settings or IngestSettings()
    try:
        source = read_source(table_path, image_root, spec)
    except MetadataError as error:  # unreadable text, malformed lines: listed in the TSV too
        full_list = write_problems(error.problems, out_dir / PROBLEMS_NAME)
        raise MetadataError(error.source, error.problems, full_list=full_list) from None
    if source.ignored:
        LOGGER.info(
            "ignored %d hidden or system file(s), e.g. %s", len(source.ignored), source.ignored[0]
        )
    validated = validate_source(
        source, spec, image_root, settings, workers, problems_path=out_dir / PROBLEMS_NAME
    )
    write_skipped(validated.skipped, out_dir / SKIPPED_NAME, validated.by_file)
    table = prepared_table(validated.table, spec)
    parquet = write_prepared(table, out_dir, spec, split_config)
    counts = {
        "rows_in": validated.rows_in,
        "skipped": validated.rows_in - len(table),
        "kept": len(table),
    }
    LOGGER.info(
        "images in: %d = kept %d + skipped %d (on_bad_image: %s)",
        counts["rows_in"],
        counts["kept"],
        counts["skipped"],
        settings.on_bad_image,
    )
    write_json(
        out_dir / INGEST_NAME,
        {
            "source": str(table_path if table_path is not None else image_root),
            "kind": "table" if table_path is not None else "folders",
            "dataset": provenance or {},
            "on_bad_image": settings.on_bad_image,
            "ignored_files": len(source.ignored),
            **counts,
        },
    )
    return parquet


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
