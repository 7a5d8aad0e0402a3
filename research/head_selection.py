"""Which head-selection criterion puts the most important kept head on the rank's trait?

    python research/head_selection.py [--results results] [RANK ...]

Every criterion orders the last block's heads for each correctly classified test image of a
trained rank; the most important head is the one it ranks first. Columns: the pointing game
of that head's map on the rank's own trait, of the ``--top-traits`` kept heads pooled (every
kept map one trial) and of their mean map, next to the best single head fixed per rank
(chosen on the test images here: an upper bound). Criteria:

- ``reference``: the greedy elimination on the target's score, the head blurred in the
  target's row only (the pipeline's default, ``traits.criterion: reference``; the pipeline's
  own search, checked against this script's);
- ``contrastive``: the greedy elimination on the target's log-odds (its score minus the
  log-sum-exp of the others'), the head blurred in every class's row, so that a head moving
  every class alike counts for nothing (``traits.criterion: contrastive``; the pipeline's
  own search);
- ``contrastive-margin``: the same blur, the target's score minus its best rival's;
- ``ablation``: no greedy; heads ranked by how much blurring each alone (every row) lowers the
  target's log-probability;
- ``sufficiency``: no greedy; heads ranked by the target's log-probability with every *other*
  head blurred (every row): the head that alone classifies best first.

Accuracy does not depend on the criterion (the search never changes the model's prediction on
the unblurred image). One batched pass per rank.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from promptcam.data.reader import TransformConfig, split_loader
from promptcam.evaluation.localization import patch_coverage, pointing_hits, read_masks
from promptcam.model.checkpoint import load_checkpoint
from promptcam.model.last_block import TargetRows, score_candidates, target_rows
from promptcam.traits.information import read_head_information, uninformative_heads
from promptcam.traits.search import CRITERIA, _eliminate, candidate_scorer

RESEARCH_CRITERIA = (
    "contrastive-margin",
    "ablation",
    "sufficiency",
    "map-contrast",
)


def all_rows(model, tokens: torch.Tensor, scores: torch.Tensor) -> TargetRows:
    """Every class's row of every image, flattened image-major to (B * C)."""
    batch, classes = scores.shape
    rows = [target_rows(model, tokens, torch.full((batch,), c), scores) for c in range(classes)]
    stack = {
        name: torch.stack([getattr(r, name) for r in rows], 1).flatten(0, 1)
        for name in ("attended", "uniform", "residual", "targets")
    }
    return TargetRows(scores=scores.repeat_interleave(classes, 0), **stack)


def every_row_scores(model, rows: TargetRows, masks: torch.Tensor, classes: int) -> torch.Tensor:
    """Scores (B, K, C) with the heads of masks (B, K, H) blurred in every class's row."""
    flat = masks.repeat_interleave(classes, 0)
    own = score_candidates(model, rows, flat).gather(
        2, rows.targets[:, None, None].expand(-1, masks.shape[1], 1)
    )
    return own.squeeze(2).unflatten(0, (-1, classes)).transpose(1, 2).double()


def target_row_scores(model, rows: TargetRows, masks: torch.Tensor) -> torch.Tensor:
    return score_candidates(model, rows, masks).double()


def greedy_order(scorer, targets: torch.Tensor, num_heads: int, key: str) -> torch.Tensor:
    """(B, H) heads in blurring order; the last one is the most important."""
    batch = len(targets)
    blurred = torch.zeros(batch, num_heads, dtype=torch.bool)
    order = []
    for _ in range(num_heads):
        remaining = (~blurred).nonzero()[:, 1].view(batch, -1)
        masks = blurred[:, None].repeat(1, remaining.shape[1], 1)
        masks.scatter_(2, remaining[..., None], True)
        scores = scorer(masks)  # (B, K, C)
        own = scores.gather(2, targets[:, None, None].expand(-1, scores.shape[1], 1)).squeeze(2)
        if key == "log-probability":
            value = own - scores.logsumexp(2)
        elif key == "margin":
            rivals = scores.scatter(2, targets[:, None, None].expand_as(own[..., None]), -np.inf)
            value = own - rivals.max(2).values
        else:
            value = own
        best = value.max(1, keepdim=True).values
        pick = (value >= best - 1e-9).to(torch.uint8).argmax(1)
        head = remaining[torch.arange(batch), pick]
        blurred[torch.arange(batch), head] = True
        order.append(head)
    return torch.stack(order, 1)


def one_shot_order(model, rows, targets, num_heads: int, classes: int, sufficiency: bool):
    eye = torch.eye(num_heads, dtype=torch.bool)
    masks = (~eye if sufficiency else eye)[None].expand(len(targets), -1, -1)
    scores = every_row_scores(model, rows, masks, classes)
    own = scores.gather(2, targets[:, None, None].expand(-1, num_heads, 1)).squeeze(2)
    value = own - scores.logsumexp(2)  # (B, H) target log-probability per head's blur
    # Blurring order: the least important first, so that the last entry is the top head.
    return value.argsort(dim=1, descending=not sufficiency, stable=True)


def map_contrast(attention: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B, H) total-variation distance between the target prompt's map of each head and the
    other classes' maps of the same head on the same image, averaged over those classes."""
    maps = attention / attention.sum(-1, keepdim=True)  # (B, H, C, P)
    batch = torch.arange(len(targets))
    own = maps[batch, :, targets]  # (B, H, P)
    distance = 0.5 * (maps - own[:, :, None]).abs().sum(-1)  # (B, H, C), 0 for the target
    return distance.sum(-1) / max(maps.shape[2] - 1, 1)


def map_contrast_order(attention: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return map_contrast(attention, targets).argsort(dim=1, stable=True)


def _product_order(
    model, tokens, labels, scores, criterion: str, heads: int, dropped: list[int] = ()
) -> np.ndarray:
    """The pipeline's own search (promptcam.traits.search) from the last block's tokens, the
    ``dropped`` heads (uninformative) blurred first."""
    scorer = candidate_scorer(model, tokens, labels, scores.double(), criterion, rivals=16)
    order, _, _ = _eliminate(scorer, labels, heads, tie_tolerance=1e-5, dropped=dropped)
    return order.numpy()


@torch.inference_mode()
def evaluate(results: Path, rank: str, levels: list[str], top_traits: int) -> list[dict]:
    model, meta = load_checkpoint(results / rank / "model.pt")
    model.eval()
    shards = results / "shards"
    loader = split_loader(shards, "test", rank, TransformConfig.unaugmented(meta.preprocessing), 64)
    tokens, labels, ids = [], [], []
    for images, batch_labels, batch_meta in loader:
        tokens.append(model.encode_to_last_block(images))
        labels.append(batch_labels)
        ids += list(batch_meta["sample_id"])
    tokens, labels = torch.cat(tokens), torch.cat(labels)
    scores, attention = model.last_block_attention(tokens)
    correct = (scores.argmax(-1) == labels).nonzero().squeeze(1)
    tokens, labels, scores = tokens[correct], labels[correct], scores[correct]
    maps = attention[correct, :, labels].reshape(len(correct), model.num_heads, *model.patch_grid)
    maps = maps.numpy()
    masks = read_masks(shards, rank, meta.preprocessing, levels)
    own = np.stack([masks[ids[i]][rank] for i in correct.tolist()])
    coverage = patch_coverage(own, maps.shape[-2:])
    present = coverage.max(axis=(-2, -1)) > 0
    classes, heads = scores.shape[1], model.num_heads
    every = all_rows(model, tokens, scores)
    information = results / rank / "head_information.tsv"
    dropped = (
        uninformative_heads(read_head_information(information)) if information.exists() else []
    )
    product = {
        criterion: torch.as_tensor(_product_order(model, tokens, labels, scores, criterion, heads))
        for criterion in CRITERIA
    }
    if dropped:
        for criterion in CRITERIA:
            product[f"{criterion}, dropped {dropped}"] = torch.as_tensor(
                _product_order(model, tokens, labels, scores, criterion, heads, dropped)
            )
    own_rows = target_rows(model, tokens, labels, scores)
    assert torch.equal(
        product["reference"],
        greedy_order(lambda m: target_row_scores(model, own_rows, m), labels, heads, "score"),
    ), "the product's reference search and this script's disagree"
    orders = {
        **product,
        "contrastive-margin": greedy_order(
            lambda m: every_row_scores(model, every, m, classes), labels, heads, "margin"
        ),
        "ablation": one_shot_order(model, every, labels, heads, classes, sufficiency=False),
        "sufficiency": one_shot_order(model, every, labels, heads, classes, sufficiency=True),
        "map-contrast": map_contrast_order(attention[correct], labels),
    }
    hits = pointing_hits(maps, coverage[:, None])[present]  # (N, H)
    best_fixed = float(hits.mean(0).max())
    # The best head per class (chosen on these images): do trait-pointing heads exist?
    present_labels = labels.numpy()[present]
    per_class = np.mean(
        [hits[i, hits[present_labels == c].mean(0).argmax()] for i, c in enumerate(present_labels)]
    )
    rows = []
    for name, order in orders.items():
        order = order.numpy()[present]
        top = order[:, -1]
        kept = order[:, -top_traits:]
        kept_maps = np.take_along_axis(maps[present], kept[:, :, None, None], 1)
        mean_hit = pointing_hits(kept_maps.mean(1), coverage[present])
        top_hit = hits[np.arange(len(top)), top]
        rows.append(
            {
                "rank": rank,
                "criterion": name,
                "top_head": float(top_hit.mean()),
                "ratio": float(top_hit.mean()) / best_fixed,
                "kept_pooled": float(np.take_along_axis(hits, kept, 1).mean()),
                "kept_mean_map": float(mean_hit.mean()),
                "best_fixed": best_fixed,
                "per_class": float(per_class),
                "top_head_counts": np.bincount(top, minlength=heads).tolist(),
                "n": int(present.sum()),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ranks", nargs="*", default=["family", "genus", "species"])
    parser.add_argument("--results", default="results", type=Path)
    parser.add_argument("--levels", default="family,genus,species")
    parser.add_argument("--top-traits", type=int, default=4)
    args = parser.parse_args()
    print(
        "| rank | criterion | top head | / best fixed | kept pooled | kept mean map "
        "| best fixed | best head per class | top head per head | n |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---|---:|")
    for rank in args.ranks:
        for row in evaluate(args.results, rank, args.levels.split(","), args.top_traits):
            print(
                "| {rank} | {criterion} | {top_head:.2f} | {ratio:.2f} | {kept_pooled:.2f} "
                "| {kept_mean_map:.2f} | {best_fixed:.2f} | {per_class:.2f} | {top_head_counts} | {n} |".format(
                    **row
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
