"""Problems found in a dataset: where (rows or files), what, and the fix; their error and TSV.

Every check returns :class:`Problem` objects instead of raising, so that one pass finds all
of them. :class:`MetadataError` shows a short summary (counts per kind, the first few of
each); ``problems.tsv`` (:func:`write_problems`) lists every one, so that a user can fix them
all at once. Rows are 1-based data rows of the table (the header is not counted).
"""

from __future__ import annotations

import os
import posixpath
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from promptcam.io import atomic_open

PROBLEM_COLUMNS = ("row", "file", "problem", "detail", "fix")
SKIPPED_COLUMNS = ("row", "file", "reason")
LISTED_PER_KIND = 5


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the dataset. ``rows`` are 0-based positions in the table."""

    kind: str
    detail: str
    fix: str
    rows: tuple[int, ...] = ()
    file: str = ""

    @property
    def message(self) -> str:
        return f"{self.detail}. Fix: {self.fix}"


class Locator:
    """Names a problem's place: table rows, or files for a folder tree (which has no rows).

    ``files`` (index: row) gives each row's image path, for the ``file`` column of the TSV.
    """

    def __init__(self, files: pd.Series | None = None, by_file: bool = False) -> None:
        self.files = files if files is not None else pd.Series(dtype=str)
        self.by_file = by_file

    def file(self, index: int) -> str:
        return str(self.files.get(index, ""))

    def one(self, index: int) -> str:
        if self.by_file:
            return f"file {self.file(index)!r}"
        return f"row {index + 1}"

    def many(self, indices: Iterable[int], limit: int = 5) -> str:
        indices = list(indices)
        more = f" (and {len(indices) - limit} more)" if len(indices) > limit else ""
        if self.by_file:
            # A folder tree's labels are folder names: name the folders, not every file.
            folders = list(dict.fromkeys(posixpath.dirname(self.file(i)) for i in indices))
            more = f" (and {len(folders) - limit} more)" if len(folders) > limit else ""
            shown = ", ".join(repr(folder) for folder in folders[:limit])
            return f"{len(indices)} file(s) in {shown}{more}"
        shown = ", ".join(str(i + 1) for i in indices[:limit])
        return f"rows {shown}{more}"

    def at(self, index: int, text: str) -> str:
        """``text`` prefixed with the place of one row."""
        return f"{self.one(index)}: {text}"


class MetadataError(ValueError):
    """Every problem found in one dataset: a short summary here, all of them in the TSV."""

    def __init__(
        self,
        source: str,
        problems: Sequence[Problem],
        max_listed: int = LISTED_PER_KIND,
        full_list: str | os.PathLike | None = None,
        by_file: bool = False,
    ) -> None:
        self.source = source
        self.by_file = by_file
        self.problems = list(problems)
        self.counts = Counter(problem.kind for problem in self.problems)
        self.full_list = full_list
        super().__init__(self._render(max_listed))

    def _render(self, max_listed: int) -> str:
        overview = ", ".join(f"{n} {kind}" for kind, n in self.counts.items())
        rows = "" if self.by_file else " Rows are 1-based data rows (the header is not counted)."
        lines = [
            f"{self.source}: {len(self.problems)} problem(s) in the dataset ({overview}); "
            f"nothing was processed.{rows}"
        ]
        for kind, count in self.counts.items():
            lines.append(f"[{kind}] {count}:")
            listed = [p.message for p in self.problems if p.kind == kind][:max_listed]
            lines.extend(f"  - {message}" for message in listed)
            if count > len(listed):
                lines.append(f"  ... and {count - len(listed)} more {kind} problem(s)")
        if self.full_list is not None:
            lines.append(f"Every problem, with its row, file and fix: {self.full_list}")
        return "\n".join(lines)


def summarise(problems: Sequence[Problem], max_listed: int = 3) -> str:
    """One line per kind with its count and first few (for logging skipped images)."""
    counts = Counter(problem.kind for problem in problems)
    lines = []
    for kind, count in counts.items():
        first = [p.message for p in problems if p.kind == kind][:max_listed]
        more = " | ..." if count > max_listed else ""
        lines.append(f"{count} {kind}: " + " | ".join(first) + more)
    return "\n".join(lines)


def _rows_cell(rows: tuple[int, ...], by_file: bool) -> str:
    return "" if by_file else ",".join(str(row + 1) for row in rows)


def write_problems(
    problems: Sequence[Problem], path: str | os.PathLike, by_file: bool = False
) -> Path:
    """problems.tsv: row (1-based, comma-separated when several; empty for a folder tree,
    which has no rows), file, problem, detail, fix."""
    frame = pd.DataFrame(
        [(_rows_cell(p.rows, by_file), p.file, p.kind, p.detail, p.fix) for p in problems],
        columns=list(PROBLEM_COLUMNS),
    )
    return _write_tsv(frame, Path(path))


def write_skipped(
    problems: Sequence[Problem], path: str | os.PathLike, by_file: bool = False
) -> Path:
    """skipped.tsv: row (empty for a folder tree), file, reason (one line per image left out)."""
    frame = pd.DataFrame(
        [(_rows_cell(p.rows, by_file), p.file, f"{p.kind}: {p.detail}") for p in problems],
        columns=list(SKIPPED_COLUMNS),
    )
    return _write_tsv(frame, Path(path))


def _write_tsv(frame: pd.DataFrame, path: Path) -> Path:
    with atomic_open(path, "w", newline="") as handle:
        frame.to_csv(handle, sep="\t", index=False)
    return path
