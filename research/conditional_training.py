"""Flat vs conditional (sibling) training: accuracy per rank and along the path, localisation.

    python research/conditional_training.py --run flat=results --run siblings=RUN/results \
        [--out conditional.json] [RANK ...]

Each ``--run NAME=RESULTS`` is a workflow's ``results`` folder (``train.defaults.objective``
flat or siblings; ``traits`` and ``localization`` run). Per run and rank, on the test split:

- **flat top-1**: the argmax over all the rank's classes;
- **within siblings**: the argmax among the true class's siblings (the parent given), what
  the sibling objective trains and selects on;
- **top-down**: the rank's prediction read coarse to fine (the family's argmax, then the genus
  argmax among that family's genera, ...; :func:`promptcam.training.hierarchy.top_down_predictions`),
  and **path**: the share of images right at this rank and every coarser one, read top-down
  and read as independent flat argmaxes;
- **localisation** (the test split's trait masks): the traits rule's greedy search (reference
  criterion, top-k, ``--top-traits`` kept) run here for the true class of *every* test image,
  and the pointing game on the rank's own trait of the most important kept head and of the
  kept heads pooled, with the uniform chance; over all images, and over those the model gets
  right by the flat argmax, within siblings, and along the top-down path. (The traits rule
  itself searches only the flat-argmax-right images, which for a siblings model is a small,
  biased subset: 23 of 108 at species on the default demo.)

Only ``model.pt`` of each rank, the label maps and the shards are read: the run needs
``results/{rank}/model.pt`` only.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
import torch

from promptcam.data.reader import TransformConfig, split_loader
from promptcam.evaluation.localization import patch_coverage, pointing_hits, read_masks
from promptcam.model.checkpoint import load_checkpoint
from promptcam.model.last_block import encode_for_search, score_candidates, target_rows
from promptcam.model.prompt_cam import PromptCAM
from promptcam.training.hierarchy import (
    path_accuracy,
    read_parent_indices,
    read_sibling_groups,
    top_down_predictions,
    within_sibling_predictions,
)
from promptcam.traits.search import _eliminate


@torch.inference_mode()
def test_scores(results: Path, rank: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sample ids, scores (N, C), labels (N,)) of ``rank``'s model on the test split."""
    model, meta = load_checkpoint(results / rank / "model.pt")
    transform = TransformConfig.unaugmented(meta.preprocessing)
    loader = split_loader(results / "shards", "test", rank, transform, batch_size=64)
    ids, scores, labels = [], [], []
    for images, batch_labels, batch_meta in loader:
        scores.append(model(images).float().numpy())
        labels.append(batch_labels.numpy())
        ids.extend(batch_meta["sample_id"])
    return np.array(ids), np.concatenate(scores), np.concatenate(labels)


def accuracy_rows(
    results: Path, ranks: list[str]
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, dict[str, bool]]]]:
    """Per rank, the accuracies of the module docstring, and which images each reading gets
    right (``{rank: {flat_right | sibling_right | path_right: {sample id: bool}}}``)."""
    labels_dir = results / "data" / "labels"
    ids, scores, labels = zip(*(test_scores(results, rank) for rank in ranks), strict=True)
    # Every rank in the first rank's sample order (each loader reads the same test split).
    scores, labels = list(scores), list(labels)
    for depth, rank in enumerate(ranks):
        row_of = {sample: row for row, sample in enumerate(ids[depth])}
        if row_of.keys() != set(ids[0]):
            raise ValueError(f"{results}: {rank}'s test images differ from {ranks[0]}'s")
        position = np.array([row_of[sample] for sample in ids[0]])
        scores[depth], labels[depth] = scores[depth][position], labels[depth][position]
    parents = [None] + [
        read_parent_indices(labels_dir / f"{fine}.tsv", labels_dir / f"{coarse}.tsv")
        for coarse, fine in itertools.pairwise(ranks)
    ]
    top_down = top_down_predictions(scores, parents)
    flat = [s.argmax(axis=1) for s in scores]
    rows, right = {}, {}
    for depth, rank in enumerate(ranks):
        groups = read_sibling_groups(labels_dir / f"{rank}.tsv")
        within = within_sibling_predictions(scores[depth], labels[depth], groups)
        rows[rank] = {
            "n_test": len(labels[depth]),
            "flat_top1": float((flat[depth] == labels[depth]).mean()),
            "within_siblings_top1": float((within == labels[depth]).mean()),
            "top_down_top1": float((top_down[depth] == labels[depth]).mean()),
            "path_top_down": path_accuracy(top_down[: depth + 1], labels[: depth + 1]),
            "path_flat": path_accuracy(flat[: depth + 1], labels[: depth + 1]),
        }
        path_right = np.all(
            [p == y for p, y in zip(top_down[: depth + 1], labels[: depth + 1], strict=True)],
            axis=0,
        )
        right[rank] = {
            "flat_right": dict(zip(ids[0], flat[depth] == labels[depth], strict=True)),
            "sibling_right": dict(zip(ids[0], within == labels[depth], strict=True)),
            "path_right": dict(zip(ids[0], path_right, strict=True)),
        }
    return rows, right


@torch.inference_mode()
def search_every_image(
    model: PromptCAM, shards: Path, rank: str, preprocessing: object, top_traits: int
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The traits rule's greedy search (reference criterion, top-k) run for the true class of
    every test image, right or wrong: (ids, maps (N, H, h, w) of the true class, the heads in
    elimination order (N, H); the last ``top_traits`` are the kept ones, the last the most
    important). Blurring a head changes only s[c], so the order is the same whatever the
    softmax is taken over: one search serves both objectives."""
    transform = TransformConfig.unaugmented(preprocessing)
    loader = split_loader(shards, "test", rank, transform, batch_size=64)
    ids, maps, orders = [], [], []
    for images, labels, meta in loader:
        tokens = encode_for_search(model, images, "fp32")
        scores, attention = model.last_block_attention(tokens)
        rows = target_rows(model, tokens, labels, scores)
        order, _, _ = _eliminate(
            lambda masks, rows=rows: score_candidates(model, rows, masks),
            rows.targets,
            model.num_heads,
            1e-5,
        )
        own = attention[torch.arange(len(labels)), :, labels]  # (B, H, patches)
        side = round(own.shape[-1] ** 0.5)
        maps.append(own.reshape(*own.shape[:2], side, side).numpy())
        orders.append(order.numpy())
        ids.extend(meta["sample_id"])
    return ids, np.concatenate(maps), np.concatenate(orders)


def localisation_rows(
    results: Path,
    rank: str,
    levels: list[str],
    right: dict[str, dict[str, bool]],
    top_traits: int,
) -> dict[str, float]:
    """Pointing game on ``rank``'s own trait of the most important kept head and of the kept
    heads pooled, over all test images and over the images each set of ``right`` holds."""
    model, meta = load_checkpoint(results / rank / "model.pt")
    ids, maps, order = search_every_image(
        model, results / "shards", rank, meta.preprocessing, top_traits
    )
    masks = read_masks(results / "shards", rank, meta.preprocessing, levels)
    own = patch_coverage(np.stack([masks[i][rank] for i in ids]), maps.shape[-2:])
    present = own.max(axis=(-2, -1)) > 0
    images = np.arange(len(ids))
    top_hits = pointing_hits(maps[images, order[:, -1]], own)
    kept = order[:, -top_traits:]
    kept_hits = pointing_hits(maps[images[:, None], kept], own[:, None])
    row = {"pointing_chance": float((own[present] > 0).mean())}
    subsets = {"all": np.ones(len(ids), dtype=bool)}
    subsets.update({name: np.array([hit[i] for i in ids]) for name, hit in right.items()})
    for name, chosen in subsets.items():
        chosen = chosen & present
        row[f"n_{name}"] = int(chosen.sum())
        row[f"top_head_pointing_{name}"] = float(top_hits[chosen].mean())
        row[f"kept_heads_pointing_{name}"] = float(kept_hits[chosen].mean())
    return row


def markdown(report: dict[str, dict]) -> str:
    lines = [
        "| run | rank | flat top-1 | within siblings | top-down top-1 | path (top-down) "
        "| path (flat) | top head pointing: all / flat right / sibling right / path right "
        "| kept heads pointing: all / path right | chance |",
        "|---|---|---:|---:|---:|---:|---:|---|---|---:|",
    ]
    for run, ranks in report.items():
        for rank, row in ranks.items():
            top = " / ".join(
                f"{row[f'top_head_pointing_{name}']:.2f}"
                for name in ("all", "flat_right", "sibling_right", "path_right")
            )
            kept = " / ".join(
                f"{row[f'kept_heads_pointing_{name}']:.2f}" for name in ("all", "path_right")
            )
            lines.append(
                f"| {run} | {rank} | {row['flat_top1']:.3f} | {row['within_siblings_top1']:.3f} "
                f"| {row['top_down_top1']:.3f} | {row['path_top_down']:.3f} "
                f"| {row['path_flat']:.3f} | {top} | {kept} | {row['pointing_chance']:.2f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ranks", nargs="*", default=["family", "genus", "species"])
    parser.add_argument(
        "--run", action="append", required=True, help="NAME=RESULTS, e.g. flat=results"
    )
    parser.add_argument("--top-traits", type=int, default=4, help="heads kept (top-k)")
    parser.add_argument("--out", type=Path, help="also write the numbers as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    report = {}
    for spec in args.run:
        name, _, folder = spec.partition("=")
        results = Path(folder)
        rows, right = accuracy_rows(results, args.ranks)
        for rank in args.ranks:
            rows[rank].update(
                localisation_rows(results, rank, args.ranks, right[rank], args.top_traits)
            )
        report[name] = rows
    print(markdown(report))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
