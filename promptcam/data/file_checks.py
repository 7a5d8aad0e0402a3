"""Check every image (and mask) file of a table in parallel: found, decodable, consistent.

Each file is opened, verified and decoded by :func:`promptcam.data.images.check_image` (JPEG
at 1/8 scale, so checking costs a fraction of a full decode) in a pool of worker processes.
The outcome separates problems a user may choose to skip (``dataset.on_bad_image: skip``:
a missing, unreadable or too large image or mask leaves its row out) from those that always
fail (a mask of the wrong mode or size, a missing image root).
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from promptcam.data.images import MASK_MODES, ImageCheck, ImageSettings, check_image, check_mask
from promptcam.data.problems import Locator, Problem

LOGGER = logging.getLogger(__name__)

# Kinds that on_bad_image: skip may leave out (the row's sample cannot be written).
SKIPPABLE_KINDS = frozenset(
    {
        "missing image",
        "unreadable image",
        "image too large",
        "missing mask",
        "unreadable mask",
        "mask too large",
    }
)
CHUNK = 64


@dataclass
class FileChecks:
    """Problems of the files, and how many 16-bit images use at most 12 bits."""

    problems: list[Problem] = field(default_factory=list)
    low_bit_depth: list[str] = field(default_factory=list)


def _check_one(item: tuple[str, str], settings: ImageSettings) -> ImageCheck:
    role, path = item
    return check_image(path, settings) if role == "image" else check_mask(path, settings)


def _checked(
    items: list[tuple[str, str]], settings: ImageSettings, workers: int
) -> Iterator[ImageCheck]:
    check = functools.partial(_check_one, settings=settings)
    if workers <= 1 or len(items) < 2 * CHUNK:
        yield from map(check, items)
        return
    # fork, not spawn: spawn re-runs __main__, which for a Snakemake script is the whole job.
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        yield from pool.imap(check, items, chunksize=CHUNK)


def check_files(
    table: pd.DataFrame,
    columns: dict[str, str],
    image_root: Path,
    settings: ImageSettings,
    locator: Locator,
    workers: int = 1,
) -> FileChecks:
    """Check the files named in ``columns`` (role ``image`` or ``mask`` -> column name).

    Empty paths are left to the table checks.
    """
    result = FileChecks()
    if not image_root.is_dir():
        result.problems.append(
            Problem(
                "missing image root",
                f"the image root {image_root.resolve()} is not a directory",
                "set `dataset.image_root`",
                file=str(image_root),
            )
        )
        return result
    items, places = [], []
    for role, column in columns.items():
        for index, path in table[column].items():
            if path:
                items.append((role, str(image_root / path)))
                places.append((role, column, index))
    # Kept only to compare masks with their images (a million checks cost memory).
    keep = "mask" in columns
    checks: dict[str, dict[int, ImageCheck]] = {role: {} for role in columns}
    for (role, column, index), check in zip(
        places, _checked(items, settings, workers), strict=True
    ):
        if keep:
            checks[role][index] = check
        if check.low_bit_depth:
            result.low_bit_depth.append(table.at[index, column])
        if problem := _file_problem(role, column, index, check, image_root, locator, table):
            result.problems.append(problem)
    if "mask" in columns:
        result.problems.extend(_mask_problems(table, columns, checks, locator))
    return result


def _file_problem(
    role: str,
    column: str,
    index: int,
    check: ImageCheck,
    image_root: Path,
    locator: Locator,
    table: pd.DataFrame,
) -> Problem | None:
    path = table.at[index, column]
    where = dict(rows=(index,), file=path)
    if not check.found:
        return Problem(
            f"missing {role}",
            locator.at(
                index,
                f"{column} file {path!r} not found under the image root {image_root.resolve()}",
            ),
            "correct the path or `dataset.image_root` (or set `dataset.on_bad_image: skip`)",
            **where,
        )
    if check.problem == "too large":
        return Problem(
            f"{role} too large",
            locator.at(index, f"{column} file {path!r} is too large ({check.error})"),
            "shrink the file, or raise `dataset.max_image_pixels` if you trust it",
            **where,
        )
    if check.problem == "unreadable":
        return Problem(
            f"unreadable {role}",
            locator.at(index, f"{column} file {path!r} cannot be read by PIL ({check.error})"),
            "re-export the file or remove the row (or set `dataset.on_bad_image: skip`)",
            **where,
        )
    return None


def _mask_problems(
    table: pd.DataFrame,
    columns: dict[str, str],
    checks: dict[str, dict[int, ImageCheck]],
    locator: Locator,
) -> list[Problem]:
    problems = []
    for index, mask in checks["mask"].items():
        image = checks["image"].get(index)
        path = table.at[index, columns["mask"]]
        where = dict(rows=(index,), file=path)
        if mask.mode and mask.mode not in MASK_MODES:
            problems.append(
                Problem(
                    "mask mode",
                    locator.at(index, f"mask {path!r} has mode {mask.mode}"),
                    "save masks single-channel (8-bit grey or palette)",
                    **where,
                )
            )
        if image and image.size and mask.size and image.size != mask.size:
            problems.append(
                Problem(
                    "mask size",
                    locator.at(
                        index,
                        f"mask {path!r} is {mask.size[0]}x{mask.size[1]} but its image is "
                        f"{image.size[0]}x{image.size[1]}",
                    ),
                    "masks must have their image's size",
                    **where,
                )
            )
    return problems
