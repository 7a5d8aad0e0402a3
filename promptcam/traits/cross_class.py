"""Cross-class attention: class B's prompt on class A's images (paper Fig. 1c)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
from torch import Tensor

from promptcam.io import atomic_open


def siblings_from_taxonomy(path: str | os.PathLike, rank: str) -> dict[str, list[str]]:
    """``{class: its siblings}`` at ``rank`` from ``taxonomy.nwk`` (same parent; the coarsest
    rank's classes are all siblings of each other)."""
    from promptcam.data.taxonomy import classes_at_rank, load_taxonomy, siblings

    tree = load_taxonomy(path)
    return {name: siblings(tree, rank, name) for name in classes_at_rank(tree, rank)}


def siblings_from_metadata(
    table: pd.DataFrame, levels: Sequence[str], rank: str
) -> dict[str, list[str]]:
    """The same from the metadata's rank columns, for when no taxonomy file is at hand."""
    position = list(levels).index(rank)
    parent = levels[position - 1] if position > 0 else None
    lineages = table[[rank] if parent is None else [parent, rank]].drop_duplicates()
    groups = [lineages[rank]] if parent is None else [g[rank] for _, g in lineages.groupby(parent)]
    result: dict[str, list[str]] = {}
    for group in groups:
        names = sorted(set(group))
        for name in names:
            result[name] = [other for other in names if other != name]
    return dict(sorted(result.items()))


def cross_class_pairs(
    label_names: Sequence[str],
    configured: Iterable[Sequence[str]] = (),
    siblings: Mapping[str, Sequence[str]] | None = None,
) -> list[tuple[int, int, str]]:
    """Ordered (image class, prompt class, why) pairs: configured ones, then every sibling pair.

    Unknown labels in ``configured`` raise; a pair listed twice is kept once (first reason).
    """
    index = {name: i for i, name in enumerate(label_names)}
    pairs: dict[tuple[int, int], str] = {}
    for pair in configured:
        image_class, prompt_class = pair
        missing = [name for name in pair if name not in index]
        if missing:
            raise KeyError(f"cross-class pair {list(pair)}: unknown classes {missing}")
        pairs.setdefault((index[image_class], index[prompt_class]), "configured")
    for name, others in (siblings or {}).items():
        for other in others:
            if name in index and other in index:
                pairs.setdefault((index[name], index[other]), "sibling")
    return [(a, b, why) for (a, b), why in pairs.items()]


# The representative image's values, and every array of an accumulator's state.
EXAMPLE_FIELDS = (
    "example_own",
    "example_cross",
    "example_probability_image_class",
    "example_probability_prompt_class",
)
STATE_FIELDS = (
    "cross",
    "own",
    "probability_image_class",
    "probability_prompt_class",
    "n_images",
    *EXAMPLE_FIELDS,
)


class CrossClassAccumulator:
    """Streams batches; keeps, per pair (A, B), sums over class A's images of class B's prompt
    attention (every head), of A's own, and of both classes' probabilities.

    It also keeps one representative image per pair: the correctly classified image of class A
    with the highest probability of A (the first such image on a tie), with every head's map
    of A's prompt and of B's prompt on it and both classes' probabilities there (the mean maps
    belong to no image, so a figure shows these).
    """

    def __init__(
        self, pairs: Sequence[tuple[int, int, str]], num_heads: int, num_patches: int
    ) -> None:
        self.pairs = list(pairs)
        self.cross = np.zeros((len(self.pairs), num_heads, num_patches), dtype=np.float64)
        self.own = np.zeros_like(self.cross)
        self.probability_image_class = np.zeros(len(self.pairs))
        self.probability_prompt_class = np.zeros(len(self.pairs))
        self.n_images = np.zeros(len(self.pairs), dtype=np.int64)
        self.example_image = [""] * len(self.pairs)  # "": no correctly classified image of A
        self.example_own = np.full_like(self.cross, np.nan)
        self.example_cross = np.full_like(self.cross, np.nan)
        self.example_probability_image_class = np.full(len(self.pairs), np.nan)
        self.example_probability_prompt_class = np.full(len(self.pairs), np.nan)

    def update(
        self,
        labels: Tensor,
        scores: Tensor,
        attention: Tensor,
        sample_ids: Sequence[str] | None = None,
    ) -> None:
        """``labels`` (B,), ``scores`` (B, C), ``attention`` (B, H, C, P) of one batch and the
        images' ``sample_ids`` (B,) (None: no representative images are kept)."""
        labels = labels.cpu()
        probabilities = scores.float().softmax(dim=-1).cpu().double()
        predicted = probabilities.argmax(dim=-1)
        if sample_ids is not None and len(sample_ids) != len(labels):
            raise ValueError(f"{len(sample_ids)} sample ids for {len(labels)} images")
        for row, (image_class, prompt_class, _) in enumerate(self.pairs):
            members = (labels == image_class).nonzero().squeeze(1)
            if not members.numel():
                continue
            chosen = attention[members.to(attention.device)].double()
            self.cross[row] += chosen[:, :, prompt_class].sum(dim=0).cpu().numpy()
            self.own[row] += chosen[:, :, image_class].sum(dim=0).cpu().numpy()
            self.probability_image_class[row] += float(probabilities[members, image_class].sum())
            self.probability_prompt_class[row] += float(probabilities[members, prompt_class].sum())
            self.n_images[row] += members.numel()
            if sample_ids is not None:
                self._keep_example(row, members, predicted, probabilities, attention, sample_ids)

    def _keep_example(
        self,
        row: int,
        members: Tensor,
        predicted: Tensor,
        probabilities: Tensor,
        attention: Tensor,
        sample_ids: Sequence[str],
    ) -> None:
        """Replace pair ``row``'s representative image if this batch has a better one."""
        image_class, prompt_class, _ = self.pairs[row]
        correct = members[predicted[members] == image_class]
        if not correct.numel():
            return
        best = int(correct[probabilities[correct, image_class].argmax()])
        probability = float(probabilities[best, image_class])
        previous = self.example_probability_image_class[row]
        if not np.isnan(previous) and probability <= previous:
            return
        maps = attention[best].double().cpu().numpy()
        self.example_image[row] = str(sample_ids[best])
        self.example_own[row] = maps[:, image_class]
        self.example_cross[row] = maps[:, prompt_class]
        self.example_probability_image_class[row] = probability
        self.example_probability_prompt_class[row] = float(probabilities[best, prompt_class])

    def add(self, later: CrossClassAccumulator) -> None:
        """Fold in ``later``, which holds the images after this one's (the next shards): its
        sums are added and its representative images replace this one's where strictly more
        probable, so that folding per-shard accumulators in shard order gives the same numbers
        however the shards were grouped into jobs."""
        if later.pairs != self.pairs or later.cross.shape != self.cross.shape:
            raise ValueError("cross-class accumulators of different pairs or models")
        for name in ("cross", "own", "probability_image_class", "probability_prompt_class"):
            getattr(self, name).__iadd__(getattr(later, name))
        self.n_images += later.n_images
        previous = self.example_probability_image_class
        better = ~np.isnan(later.example_probability_image_class) & (
            np.isnan(previous) | (later.example_probability_image_class > previous)
        )
        for row in np.nonzero(better)[0]:
            self.example_image[row] = later.example_image[row]
            for name in EXAMPLE_FIELDS:
                getattr(self, name)[row] = getattr(later, name)[row]

    def arrays(self) -> dict[str, np.ndarray]:
        """The accumulator's state as arrays (:meth:`from_arrays` restores it)."""
        return {
            **{name: getattr(self, name) for name in STATE_FIELDS},
            "example_image": np.asarray(self.example_image, dtype=str),
        }

    @classmethod
    def from_arrays(
        cls, pairs: Sequence[tuple[int, int, str]], arrays: Mapping[str, np.ndarray]
    ) -> CrossClassAccumulator:
        """An accumulator of ``pairs`` in the state :meth:`arrays` gave."""
        cross = np.asarray(arrays["cross"])
        accumulator = cls(pairs, cross.shape[1], cross.shape[2])
        for name in STATE_FIELDS:
            getattr(accumulator, name)[...] = arrays[name]
        accumulator.example_image = [str(image) for image in arrays["example_image"]]
        return accumulator

    def means(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean maps (pairs, H, P) of the prompt class and of the image class; NaN if no image."""
        with np.errstate(invalid="ignore", divide="ignore"):
            count = self.n_images[:, None, None]
            return self.cross / count, self.own / count


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity along the last axis."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def cross_class_table(
    accumulator: CrossClassAccumulator, label_names: Sequence[str]
) -> pd.DataFrame:
    """One row per pair: ``image_class``, ``prompt_class``, ``relation``, ``n_images``, mean
    probabilities of both classes on the image class's images, and ``map_similarity``: the
    cosine similarity of the prompt class's and the image class's mean maps, mean over heads."""
    cross, own = accumulator.means()
    with np.errstate(invalid="ignore", divide="ignore"):
        count = accumulator.n_images
        return pd.DataFrame(
            {
                "image_class": [label_names[a] for a, _, _ in accumulator.pairs],
                "prompt_class": [label_names[b] for _, b, _ in accumulator.pairs],
                "relation": [why for _, _, why in accumulator.pairs],
                "n_images": count,
                "probability_image_class": accumulator.probability_image_class / count,
                "probability_prompt_class": accumulator.probability_prompt_class / count,
                "map_similarity": _cosine(cross, own).mean(axis=-1),
            }
        )


def write_cross_class(
    tsv_path: str | os.PathLike,
    npz_path: str | os.PathLike,
    accumulator: CrossClassAccumulator,
    label_names: Sequence[str],
    patch_grid: tuple[int, int],
) -> None:
    """The pair table and, in a compressed npz: ``cross_maps``/``own_maps`` (pairs, H, h, w)
    the mean maps over the image class's images, ``pairs`` (pairs, 2) class indices (image
    class, prompt class), ``label_names``; per pair's representative image (see
    :class:`CrossClassAccumulator`; "" and NaN where class A has no correctly classified
    image): ``example_image`` (pairs,) its sample id, ``example_own_maps`` and
    ``example_cross_maps`` (pairs, H, h, w) A's and B's prompt on it,
    ``example_probability_image_class`` and ``example_probability_prompt_class`` (pairs,)."""
    cross, own = accumulator.means()
    shape = (len(accumulator.pairs), cross.shape[1], *patch_grid)
    with atomic_open(tsv_path, "w", newline="") as handle:
        cross_class_table(accumulator, label_names).to_csv(
            handle, sep="\t", index=False, na_rep="NA"
        )
    with atomic_open(npz_path, "wb") as handle:
        np.savez_compressed(
            handle,
            cross_maps=cross.reshape(shape).astype(np.float32),
            own_maps=own.reshape(shape).astype(np.float32),
            pairs=np.array([(a, b) for a, b, _ in accumulator.pairs], dtype=np.int64).reshape(
                -1, 2
            ),
            label_names=np.asarray(label_names, dtype=str),
            example_image=np.asarray(accumulator.example_image, dtype=str),
            example_own_maps=accumulator.example_own.reshape(shape).astype(np.float32),
            example_cross_maps=accumulator.example_cross.reshape(shape).astype(np.float32),
            example_probability_image_class=accumulator.example_probability_image_class,
            example_probability_prompt_class=accumulator.example_probability_prompt_class,
        )
