"""Checks of the table itself (columns, labels, taxonomy, paths, splits), vectorised.

Each returns a list of :class:`~promptcam.data.problems.Problem`; none raises. They expect
the cleaned table of :func:`promptcam.data.metadata.read_source` (stripped text, labels
normalised, paths POSIX) whose index holds the 0-based data rows.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import pandas as pd

from promptcam.data.names import FORBIDDEN_LABEL_CHARACTERS, placeholder_mask, spelling_variants
from promptcam.data.problems import Locator, Problem
from promptcam.data.splits import SPLITS

if TYPE_CHECKING:
    from promptcam.data.metadata import MetadataSpec

WINDOWS_ABSOLUTE = r"^[A-Za-z]:/"


def check_columns(table: pd.DataFrame, spec: MetadataSpec) -> list[Problem]:
    present = ", ".join(table.columns) or "none"
    folded = {str(column).casefold(): column for column in table.columns}
    problems = []
    for column, role, setting in [
        (spec.image_column, "image paths", "dataset.image_column"),
        *[(level, "rank labels", "`levels`") for level in spec.levels],
    ]:
        if column in table.columns:
            continue
        near = folded.get(column.casefold())
        hint = f" (there is {near!r}: column names are case-sensitive)" if near else ""
        problems.append(
            Problem(
                "missing column",
                f"column {column!r} ({role}) is missing{hint}; columns present: {present}",
                f"add it, or point {setting} in the config at the right column",
            )
        )
    if table.empty:
        problems.append(Problem("empty table", "the table has no data rows", "add images"))
    return problems


def check_labels(table: pd.DataFrame, levels: Sequence[str], locator: Locator) -> list[Problem]:
    """Missing labels (empty or a placeholder), forbidden characters, spelling variants."""
    problems = []
    for level in levels:
        labels = table[level]
        for index, label in labels[placeholder_mask(labels)].items():
            what = (
                f"empty {level} label"
                if label == ""
                else f"{level} label {label!r} is a placeholder for a missing value"
            )
            problems.append(
                Problem(
                    "missing label",
                    locator.at(index, what),
                    "fill in the real label, or remove the row",
                    rows=(index,),
                    file=locator.file(index),
                )
            )
        forbidden = "|".join(FORBIDDEN_LABEL_CHARACTERS)
        for index, label in labels[labels.str.contains(forbidden, regex=True)].items():
            problems.append(
                Problem(
                    "bad label",
                    locator.at(index, f"{level} label {label!r} contains a double quote"),
                    "remove that character",
                    rows=(index,),
                    file=locator.file(index),
                )
            )
        for variant in spelling_variants(labels, level):
            spelled = " and ".join(
                f"{spelling!r} ({locator.many(rows)})"
                for spelling, rows in zip(variant.spellings, variant.rows, strict=True)
            )
            problems.append(
                Problem(
                    "inconsistent spelling",
                    f"{level} labels {spelled} differ only in case, spaces or underscores",
                    "spell the taxon the same way in every row (they would otherwise be two "
                    "taxa, or silently one)",
                    rows=tuple(sorted(itertools.chain.from_iterable(variant.rows))),
                )
            )
    return problems


def check_tree(table: pd.DataFrame, levels: Sequence[str], locator: Locator) -> list[Problem]:
    """Every label must have exactly one parent at the next coarser rank."""
    problems = []
    # Checking adjacent ranks suffices: unique parents compose into unique ancestors.
    for parent, child in itertools.pairwise(levels):
        pairs = table[[parent, child]]
        pairs = pairs[~placeholder_mask(pairs[parent]) & ~placeholder_mask(pairs[child])]
        distinct = pairs.drop_duplicates()
        torn = distinct[distinct[child].duplicated(keep=False)][child].unique()
        if len(torn) == 0:
            continue
        conflicting = pairs[pairs[child].isin(set(torn))]
        for label, group in conflicting.groupby(child, sort=True):
            first_rows = group.groupby(parent, sort=False).head(1)
            (row_a, parent_a), (row_b, parent_b) = list(first_rows[parent].items())[:2]
            others = f" (and {len(first_rows) - 2} more)" if len(first_rows) > 2 else ""
            problems.append(
                Problem(
                    "not a tree",
                    f"{child} {label!r} is under two {parent} labels: {locator.one(row_a)} has "
                    f"{parent} {parent_a!r}, {locator.one(row_b)} has {parent} "
                    f"{parent_b!r}{others}",
                    f"correct the wrong row, or make the {child} names unique (e.g. prefix them "
                    f"with the {parent})",
                    rows=(int(row_a), int(row_b)),
                )
            )
    return problems


def check_paths(table: pd.DataFrame, column: str, locator: Locator) -> list[Problem]:
    """Empty paths, Windows drive paths, and paths listed twice."""
    problems = []
    paths = table[column]
    for index in paths.index[paths == ""]:
        problems.append(
            Problem(
                "empty path",
                locator.at(index, f"empty {column} path"),
                "fill it in or remove the row",
                rows=(index,),
            )
        )
    for index, path in paths[paths.str.contains(WINDOWS_ABSOLUTE, regex=True)].items():
        problems.append(
            Problem(
                "absolute path",
                locator.at(index, f"{column} path {path!r} is an absolute Windows path"),
                "write paths relative to `dataset.image_root`",
                rows=(index,),
                file=path,
            )
        )
    listed = paths[paths != ""]
    duplicated = listed[listed.duplicated(keep=False)]
    for path, group in duplicated.groupby(duplicated, sort=True):
        problems.append(
            Problem(
                "duplicate path",
                f"{column} {path!r} is listed in {locator.many(group.index)}",
                "list each image once",
                rows=tuple(int(i) for i in group.index),
                file=str(path),
            )
        )
    return problems


def check_splits(table: pd.DataFrame, column: str, locator: Locator) -> list[Problem]:
    allowed = ", ".join(SPLITS)
    values = table[column]
    return [
        Problem(
            "bad split",
            locator.at(index, f"{column} {value!r} is not one of {allowed}"),
            "use one of those in every row, or drop the column to split automatically",
            rows=(index,),
        )
        for index, value in values[~values.isin(SPLITS)].items()
    ]
