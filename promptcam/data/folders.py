"""A folder tree as the dataset: ``root/<family>/<genus>/<species>/<image files>``.

One folder level per configured rank, coarse to fine; the folder names are the labels (they
go through the same name rules and checks as a table's, see :mod:`promptcam.data.names`), the
images sit in the finest rank's folders. Read into the same table a CSV would give (column
``image``: the path relative to the root, POSIX), in sorted path order, so everything after
reading is shared with tables.

Layout problems, each reported with the path and the fix (they always fail; nothing is
guessed): a file at a rank level (e.g. an image directly in a genus folder), a folder below the
finest rank (``species/extra/img.jpg``), a file in a species folder that is not an image by
its extension (Pillow's readable extensions, any case). Hidden entries (names starting with
``.``) and the operating systems' folder files (``Thumbs.db``, ``desktop.ini``) are ignored and
counted.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from PIL import Image

from promptcam.data.problems import Problem

SYSTEM_FILES = frozenset({"thumbs.db", "desktop.ini", "ehthumbs.db", "icon\r"})


def image_extensions() -> frozenset[str]:
    """Lower-case extensions (with the dot) of the formats Pillow can open."""
    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


@dataclass
class FolderTree:
    table: pd.DataFrame
    problems: list[Problem] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


def _ignored(name: str) -> bool:
    return name.startswith(".") or name.casefold() in SYSTEM_FILES


def read_folder_tree(root: str | os.PathLike, levels: Sequence[str]) -> FolderTree:
    """The images under ``root`` with one label column per rank (see the module docstring)."""
    root = Path(root)
    levels = list(levels)
    columns = ["image", *levels]
    if not root.is_dir():
        problem = Problem(
            "missing image root",
            f"the image root {root.resolve()} is not a directory",
            f"set `dataset.image_root` to the folder holding one folder per {levels[0]}",
            file=str(root),
        )
        return FolderTree(pd.DataFrame(columns=columns, dtype=str), [problem])
    extensions = image_extensions()
    rows: list[tuple[str, ...]] = []
    tree = FolderTree(pd.DataFrame())
    layout = "/".join(f"<{level}>" for level in levels)
    stack: list[tuple[Path, tuple[str, ...]]] = [(root, ())]
    while stack:
        folder, labels = stack.pop()
        depth = len(labels)
        with os.scandir(folder) as entries:
            entries = sorted(entries, key=lambda entry: entry.name)
        for entry in entries:
            relative = "/".join((*labels, entry.name))
            if _ignored(entry.name):
                tree.ignored.append(relative)
            elif entry.is_dir():
                if depth < len(levels):
                    stack.append((Path(entry.path), (*labels, entry.name)))
                else:
                    tree.problems.append(_too_deep(relative, levels, layout))
            elif depth < len(levels):
                tree.problems.append(_stray(relative, depth, levels, layout))
            elif Path(entry.name).suffix.lower() in extensions:
                rows.append((relative, *labels))
            else:
                tree.problems.append(_not_an_image(relative, layout))
    rows.sort()
    tree.table = pd.DataFrame(rows, columns=columns, dtype=str)
    return tree


def _too_deep(relative: str, levels: list[str], layout: str) -> Problem:
    return Problem(
        "folder too deep",
        f"folder {relative!r} is inside a {levels[-1]} folder; the tree has one folder level per "
        f"rank ({layout}/<images>)",
        f"move its images up into the {levels[-1]} folder, or delete it",
        file=relative,
    )


def _stray(relative: str, depth: int, levels: list[str], layout: str) -> Problem:
    where = "the image root" if depth == 0 else f"a {levels[depth - 1]} folder"
    return Problem(
        "stray file",
        f"file {relative!r} is in {where}, where only {levels[depth]} folders belong "
        f"({layout}/<images>)",
        f"move it into its {levels[-1]} folder, or delete it",
        file=relative,
    )


def _not_an_image(relative: str, layout: str) -> Problem:
    return Problem(
        "not an image",
        f"file {relative!r} is not an image by its extension ({layout}/<images>)",
        "delete or move it, or rename it if it is an image with a wrong extension",
        file=relative,
    )
