"""The traits stage's files: writers and readers (no torch)."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

import numpy as np
import pandas as pd

from promptcam.io import atomic_open, atomic_path

if TYPE_CHECKING:  # annotations only: readers of these files (figures) must not import torch
    from promptcam.traits.search import TraitSearch


def _nullable_int(values: np.ndarray) -> pd.arrays.IntegerArray:
    """Non-negative integers, with -1 as null."""
    return pd.arrays.IntegerArray(values.astype(np.int64), mask=values < 0)


def search_table(
    search: TraitSearch, image_ids: Sequence[str], label_names: Sequence[str]
) -> pd.DataFrame:
    """One row per image and head (image-major, heads ascending).

    Columns: ``image``, ``target``/``target_label``, ``predicted``/``predicted_label`` (without
    blurring), ``correct``, ``base_score`` (target probability without blurring), ``flip_step``
    and ``flipped`` (see module docs), ``final_predicted`` (with the removed heads blurred),
    ``head``, ``removal_step`` (null for kept heads), ``score_after_removal`` (target
    probability once this head and every earlier one is blurred), ``score_drop`` (probability
    lost at this head's step), ``kept`` and ``kept_rank`` (0 = most important kept head).
    """
    trace = search.trace
    num_images, num_heads = trace.order.shape
    if len(image_ids) != num_images:
        raise ValueError(f"{len(image_ids)} image ids for {num_images} images")
    removal = search.removal_step()
    step_index = np.clip(removal, 0, None)
    after = np.where(removal >= 0, np.take_along_axis(trace.scores, step_index, axis=1), np.nan)
    previous = np.concatenate([trace.base_scores[:, None], trace.scores[:, :-1]], axis=1)
    before = np.take_along_axis(previous, step_index, axis=1)
    labels = np.asarray(label_names, dtype=object)
    final = search.final_predicted()

    def per_image(values: np.ndarray) -> np.ndarray:
        return np.repeat(values, num_heads)

    return pd.DataFrame(
        {
            "image": per_image(np.asarray(image_ids, dtype=object)),
            "target": per_image(trace.targets),
            "target_label": per_image(labels[trace.targets]),
            "predicted": per_image(trace.predicted),
            "predicted_label": per_image(labels[trace.predicted]),
            "correct": per_image(trace.searched),
            "base_score": per_image(trace.base_scores),
            "flip_step": _nullable_int(per_image(search.flip_step)),
            "flipped": per_image(search.flip_step >= 0),
            "final_predicted": per_image(final),
            "head": np.tile(np.arange(num_heads), num_images),
            "removal_step": _nullable_int(removal.ravel()),
            "score_after_removal": pd.array(after.ravel(), dtype="Float64"),
            "score_drop": pd.array(
                np.where(removal >= 0, before - after, np.nan).ravel(), dtype="Float64"
            ),
            "kept": search.kept().ravel(),
            "kept_rank": _nullable_int(search.kept_rank().ravel()),
        }
    )


def class_summary(
    table: pd.DataFrame, maps: np.ndarray, label_names: Sequence[str]
) -> tuple[pd.DataFrame, np.ndarray]:
    """Per class and head: how consistently the head is kept, and its mean map.

    Only correctly classified images count (the others were not searched).

    Args:
        table: :func:`search_table`'s rows.
        maps: (N, H, h, w) target-class maps, in the table's image order.

    Returns:
        A table (``class``, ``label``, ``head``, ``n_images``, ``keep_rate``,
        ``mean_kept_rank`` over the images keeping the head, ``mean_removal_step`` and
        ``mean_score_drop`` over those removing it) and the mean maps (C, H, h, w), NaN for a
        class without correctly classified images.
    """
    num_images, num_heads = maps.shape[:2]
    per_image = table.groupby("image", sort=False).first()
    if len(per_image) != num_images:
        raise ValueError(f"{len(per_image)} images in the table, {num_images} in the maps")
    correct = per_image["correct"].to_numpy(bool)
    targets = per_image["target"].to_numpy(np.int64)
    mean_maps = np.full((len(label_names), *maps.shape[1:]), np.nan, dtype=np.float32)
    for class_index in np.unique(targets[correct]):
        mean_maps[class_index] = maps[correct & (targets == class_index)].mean(axis=0)
    searched = table[table["correct"]]
    grouped = searched.groupby(["target", "head"])
    stats = pd.DataFrame(
        {
            "n_images": grouped["image"].nunique(),
            "keep_rate": grouped["kept"].mean(),
            "mean_kept_rank": grouped["kept_rank"].mean(),
            "mean_removal_step": grouped["removal_step"].mean(),
            "mean_score_drop": grouped["score_drop"].mean(),
        }
    )
    full_index = pd.MultiIndex.from_product(
        [range(len(label_names)), range(num_heads)], names=["target", "head"]
    )
    stats = stats.reindex(full_index)
    stats["n_images"] = stats["n_images"].fillna(0).astype(np.int64)
    stats = stats.reset_index().rename(columns={"target": "class"})
    stats.insert(1, "label", np.asarray(label_names, dtype=object)[stats["class"]])
    return stats, mean_maps


def write_trait_maps(
    path: str | os.PathLike,
    image_ids: Sequence[str],
    search: TraitSearch,
    maps: np.ndarray,
    label_names: Sequence[str],
) -> None:
    """``trait_maps.npz`` (compressed): ``image`` (N,), ``target`` (N,), ``maps`` (N, H, h, w)
    float32 target-class attention of every head, ``kept`` (N, H) bool (the kept heads' maps
    are ``maps[kept]``), ``kept_rank`` (N, H) (-1: removed or unsearched), ``order`` (N, H) the
    full greedy elimination order (-1 rows: unsearched; ``order[:, -1]`` is the most important
    head), ``label_names`` (C,)."""
    with atomic_open(path, "wb") as handle:
        np.savez_compressed(
            handle,
            image=np.asarray(image_ids, dtype=str),
            target=search.trace.targets,
            maps=maps.astype(np.float32),
            kept=search.kept(),
            kept_rank=search.kept_rank(),
            order=search.trace.order,
            label_names=np.asarray(label_names, dtype=str),
        )


def write_trait_summary(
    tsv_path: str | os.PathLike,
    npz_path: str | os.PathLike,
    summary: pd.DataFrame,
    mean_maps: np.ndarray,
    label_names: Sequence[str],
) -> None:
    """The per-class summary table and ``mean_maps`` (C, H, h, w), ``keep_rate`` (C, H),
    ``n_images`` (C,), ``label_names`` (C,) in a compressed npz."""
    num_classes, num_heads = mean_maps.shape[:2]
    with atomic_open(tsv_path, "w", newline="") as handle:
        summary.to_csv(handle, sep="\t", index=False, na_rep="NA")
    keep_rate = summary["keep_rate"].to_numpy(np.float64).reshape(num_classes, num_heads)
    n_images = summary["n_images"].to_numpy(np.int64).reshape(num_classes, num_heads)[:, 0]
    with atomic_open(npz_path, "wb") as handle:
        np.savez_compressed(
            handle,
            mean_maps=mean_maps.astype(np.float32),
            keep_rate=keep_rate,
            n_images=n_images,
            label_names=np.asarray(label_names, dtype=str),
        )


def write_parquet(path: str | os.PathLike, table: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        table.to_parquet(tmp, index=False)


# ----------------------------------------------------------------------------- readers


@dataclass(frozen=True)
class TraitMaps:
    """``trait_maps.npz`` without its maps: which image is which, and what the search kept.

    The maps themselves (N, H, h, w) can be large; :meth:`read_maps` streams the rows asked
    for, so that a figure of a few images never holds the whole array.
    """

    path: Path
    image: np.ndarray
    target: np.ndarray
    kept: np.ndarray
    kept_rank: np.ndarray
    order: np.ndarray
    label_names: np.ndarray
    map_shape: tuple[int, ...]

    @property
    def num_heads(self) -> int:
        return int(self.kept.shape[1])

    @property
    def searched(self) -> np.ndarray:
        """(N,) bool: the correctly classified images, which the greedy search explained."""
        return self.order[:, 0] >= 0

    def row_of(self) -> dict[str, int]:
        """``{image id: row}``."""
        return {str(image): row for row, image in enumerate(self.image)}

    def kept_heads(self, row: int) -> list[int]:
        """Row ``row``'s kept heads, most important first."""
        heads = np.nonzero(self.kept[row])[0]
        return [int(h) for h in heads[np.argsort(self.kept_rank[row, heads], kind="stable")]]

    def read_maps(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """The maps (len(rows), H, h, w) of ``rows``, in the order given."""
        return read_npz_rows(self.path, "maps", rows)


def _npy_header(stream: IO[bytes]) -> tuple[tuple[int, ...], bool, np.dtype]:
    """Shape, Fortran order and dtype of the .npy stream, which is left at its data."""
    major, _ = np.lib.format.read_magic(stream)
    if major == 1:
        return np.lib.format.read_array_header_1_0(stream)
    return np.lib.format.read_array_header_2_0(stream)


def read_npz_rows(
    path: str | os.PathLike, name: str, rows: Sequence[int] | np.ndarray
) -> np.ndarray:
    """Rows of array ``name`` of an npz file, decompressed as a stream: memory holds only the
    rows asked for (np.load would read the whole array)."""
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    with zipfile.ZipFile(path) as archive, archive.open(f"{name}.npy") as stream:
        shape, fortran, dtype = _npy_header(stream)
        if fortran:
            raise ValueError(f"{path}: {name} is stored in Fortran order")
        if len(rows) and (rows.min() < 0 or rows.max() >= shape[0]):
            raise IndexError(f"{path}: rows {rows.min()}..{rows.max()} of {shape[0]} in {name}")
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        wanted = np.unique(rows)
        found: dict[int, np.ndarray] = {}
        position = 0
        for row in wanted:
            skip = (int(row) - position) * row_bytes
            while skip > 0:
                skip -= len(stream.read(min(skip, 1 << 22)))
            data = stream.read(row_bytes)
            found[int(row)] = np.frombuffer(data, dtype=dtype).reshape(shape[1:])
            position = int(row) + 1
    out = np.empty((len(rows), *shape[1:]), dtype=dtype)
    for index, row in enumerate(rows):
        out[index] = found[int(row)]
    return out


def read_trait_maps(path: str | os.PathLike) -> TraitMaps:
    """``trait_maps.npz`` (see :func:`write_trait_maps`), maps left on disk."""
    with np.load(path) as data:
        with zipfile.ZipFile(path) as archive, archive.open("maps.npy") as stream:
            map_shape = tuple(_npy_header(stream)[0])
        return TraitMaps(
            path=Path(path),
            image=data["image"].astype(str),
            target=data["target"],
            kept=data["kept"],
            kept_rank=data["kept_rank"],
            order=data["order"],
            label_names=data["label_names"].astype(str),
            map_shape=map_shape,
        )


def read_search_table(path: str | os.PathLike) -> pd.DataFrame:
    """``traits.parquet`` (see :func:`search_table`)."""
    return pd.read_parquet(path)


@dataclass(frozen=True)
class TraitSummary:
    """``trait_summary.tsv`` and ``.npz``: per class and head, keep rate and mean map."""

    table: pd.DataFrame
    mean_maps: np.ndarray  # (C, H, h, w), NaN for a class without searched images
    keep_rate: np.ndarray  # (C, H)
    n_images: np.ndarray  # (C,)
    label_names: np.ndarray  # (C,)


def read_trait_summary(tsv_path: str | os.PathLike, npz_path: str | os.PathLike) -> TraitSummary:
    """The per-class summary written by :func:`write_trait_summary`."""
    table = pd.read_csv(tsv_path, sep="\t", na_values=["NA"], keep_default_na=False)
    with np.load(npz_path) as data:
        return TraitSummary(
            table=table,
            mean_maps=data["mean_maps"],
            keep_rate=data["keep_rate"],
            n_images=data["n_images"],
            label_names=data["label_names"].astype(str),
        )


@dataclass(frozen=True)
class CrossClass:
    """``cross_class.tsv`` and ``.npz``: class B's prompt on class A's images, per pair.

    The ``example_*`` arrays belong to one representative image per pair (A's correctly
    classified test image with the highest probability of A); they are None in files written
    before they existed (:attr:`has_examples`). Where A has no such image, ``example_image`` is
    "" and the maps and probabilities are NaN.
    """

    table: pd.DataFrame  # one row per pair, in the npz's order
    cross_maps: np.ndarray  # (pairs, H, h, w): the prompt class's mean maps on A's images
    own_maps: np.ndarray  # (pairs, H, h, w): A's own prompt on the same images
    pairs: np.ndarray  # (pairs, 2) class indices (image class, prompt class)
    label_names: np.ndarray
    example_image: np.ndarray | None = None  # (pairs,) sample id of the representative image
    example_own_maps: np.ndarray | None = None  # (pairs, H, h, w): A's prompt on it
    example_cross_maps: np.ndarray | None = None  # (pairs, H, h, w): B's prompt on it
    example_probability_image_class: np.ndarray | None = None  # (pairs,) p(A) on it
    example_probability_prompt_class: np.ndarray | None = None  # (pairs,) p(B) on it

    @property
    def has_examples(self) -> bool:
        return self.example_image is not None


EXAMPLE_ARRAYS = (
    "example_image",
    "example_own_maps",
    "example_cross_maps",
    "example_probability_image_class",
    "example_probability_prompt_class",
)


def read_cross_class(tsv_path: str | os.PathLike, npz_path: str | os.PathLike) -> CrossClass:
    """The cross-class files written by :func:`promptcam.traits.cross_class.write_cross_class`."""
    table = pd.read_csv(tsv_path, sep="\t", na_values=["NA"], keep_default_na=False)
    with np.load(npz_path) as data:
        examples = {name: data[name] for name in EXAMPLE_ARRAYS if name in data.files}
        if examples and len(examples) != len(EXAMPLE_ARRAYS):
            missing = sorted(set(EXAMPLE_ARRAYS) - set(examples))
            raise ValueError(f"{npz_path} lacks {missing}: rerun the traits rule")
        if "example_image" in examples:
            examples["example_image"] = examples["example_image"].astype(str)
        result = CrossClass(
            table=table,
            cross_maps=data["cross_maps"],
            own_maps=data["own_maps"],
            pairs=data["pairs"],
            label_names=data["label_names"].astype(str),
            **examples,
        )
    if len(result.table) != len(result.pairs):
        raise ValueError(
            f"{tsv_path} has {len(result.table)} pairs, {npz_path} {len(result.pairs)}: "
            "rerun the traits rule"
        )
    return result
