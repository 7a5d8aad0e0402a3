"""Would another greedy criterion keep heads that point at the rank's trait? Four, compared.

    python research/greedy_criteria.py [--results results] [RANK ...]

Every criterion runs the full greedy elimination on the correctly classified test images of a
trained rank, keeps the last ``--top-traits`` heads and scores them with the traits rule's
localisation (pointing game of the kept heads against each rank's trait mask):

- ``reference``: the target's score with the head blurred in the target's row (the pipeline's
  criterion; reproduces ``results/{rank}/localization.json``);
- ``siblings``: the target's log-probability among itself and its siblings (same parent), the
  head blurred in every one of their rows, so that what siblings share cancels;
- ``centred``: the reference's score minus its mean over ``--reference-images`` test images
  under the same blur, so that a blur moving every image's score alike counts for nothing;
- ``mean-ablation``: the reference's score, a blurred head's output replaced by its mean over
  those images instead of by uniform attention.

One image at a time: a diagnostic, not the pipeline's batched search.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from promptcam.data.reader import TransformConfig, split_loader
from promptcam.evaluation.localization import localization_report, patch_coverage, read_masks
from promptcam.model.checkpoint import load_checkpoint
from promptcam.model.last_block import TargetRows, score_candidates, target_rows
from promptcam.traits.cross_class import siblings_from_metadata
from promptcam.traits.search import least_harmful

CRITERIA = ("reference", "siblings", "centred", "mean-ablation")


def _row(rows: TargetRows, index: int) -> TargetRows:
    return TargetRows(*(getattr(rows, f)[index : index + 1] for f in TargetRows.__annotations__))


def _class_rows(model, tokens: torch.Tensor, scores: torch.Tensor, classes: list[int]):
    return [target_rows(model, tokens, torch.full((len(tokens),), c), scores) for c in classes]


def kept_heads(
    model, rows: list[TargetRows], reference: TargetRows | None, criterion: str, top_traits: int
) -> np.ndarray:
    """Greedy elimination for one image; ``rows[0]`` is the target's row, the rest its
    siblings'; ``reference``: the target's rows on the reference images (``centred``)."""
    num_heads = model.num_heads
    target = int(rows[0].targets[0])
    blurred = torch.zeros(num_heads, dtype=torch.bool)
    order = []
    for _ in range(num_heads):
        candidates = (~blurred).nonzero().squeeze(1)
        masks = blurred.repeat(len(candidates), 1)
        masks[torch.arange(len(candidates)), candidates] = True  # (K, H)
        own = score_candidates(model, rows[0], masks[None])[0, :, target].double()
        if criterion == "siblings":
            sibling_scores = [
                score_candidates(model, row, masks[None])[0, :, int(row.targets[0])].double()
                for row in rows[1:]
            ]
            own = own - torch.stack([own, *sibling_scores], 1).logsumexp(1)
        elif criterion == "centred":
            batch = masks[None].expand(len(reference.targets), -1, -1)
            own = own - score_candidates(model, reference, batch)[:, :, target].double().mean(0)
        pick = int(least_harmful(own, 1e-5))
        blurred[candidates[pick]] = True
        order.append(int(candidates[pick]))
    kept = np.zeros(num_heads, dtype=bool)
    kept[order[num_heads - top_traits :]] = True
    return kept


@torch.inference_mode()
def compare(
    results: Path,
    rank: str,
    levels: list[str],
    criterion: str,
    top_traits: int,
    reference_images: int,
) -> dict:
    model, meta = load_checkpoint(results / rank / "model.pt")
    model.eval()
    names = list(meta.label_names)
    index = {name: i for i, name in enumerate(names)}
    table = pd.read_parquet(results / "data" / "metadata.parquet")
    siblings = siblings_from_metadata(table, levels, rank)
    shards = results / "shards"
    loader = split_loader(shards, "test", rank, TransformConfig.unaugmented(meta.preprocessing), 64)
    all_tokens, all_labels, all_ids = [], [], []
    for images, labels, batch_meta in loader:
        all_tokens.append(model.encode_to_last_block(images))
        all_labels.append(labels)
        all_ids += list(batch_meta["sample_id"])
    tokens, labels = torch.cat(all_tokens), torch.cat(all_labels)
    scores, attention = model.last_block_attention(tokens)
    ref_tokens, ref_scores = tokens[:reference_images], scores[:reference_images]
    reference_rows = _class_rows(model, ref_tokens, ref_scores, list(range(len(names))))
    correct = (scores.argmax(-1) == labels).nonzero().squeeze(1).tolist()
    kept, maps, ids = [], [], []
    for i in correct:
        target = int(labels[i])
        group = [target] + [index[name] for name in siblings[names[target]]]
        rows = _class_rows(model, tokens[i : i + 1], scores[i : i + 1], group)
        if criterion == "mean-ablation":
            rows = [
                TargetRows(
                    row.attended,
                    reference_rows[c].attended.mean(0, keepdim=True),
                    row.residual,
                    row.scores,
                    row.targets,
                )
                for row, c in zip(rows, group, strict=True)
            ]
        kept.append(kept_heads(model, rows, reference_rows[target], criterion, top_traits))
        maps.append(attention[i, :, target].reshape(model.num_heads, *model.patch_grid).numpy())
        ids.append(all_ids[i])
    maps = np.stack(maps)
    masks = read_masks(shards, rank, meta.preprocessing, levels)
    coverage = {
        level: patch_coverage(np.stack([masks[i][level] for i in ids]), maps.shape[-2:])
        for level in levels
    }
    return localization_report(maps, np.stack(kept), coverage, rank)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ranks", nargs="*", default=["family", "genus", "species"])
    parser.add_argument("--results", default="results", type=Path)
    parser.add_argument("--levels", default="family,genus,species")
    parser.add_argument("--criteria", default=",".join(CRITERIA))
    parser.add_argument("--top-traits", type=int, default=4)
    parser.add_argument("--reference-images", type=int, default=64)
    args = parser.parse_args()
    levels = args.levels.split(",")
    print("| rank | criterion | pointing game on own trait | on " + " / ".join(levels) + " |")
    print("|---|---|---:|---|")
    for rank in args.ranks:
        for criterion in args.criteria.split(","):
            if criterion not in CRITERIA:
                raise SystemExit(f"unknown criterion {criterion!r}; choose from {CRITERIA}")
            report = compare(
                args.results, rank, levels, criterion, args.top_traits, args.reference_images
            )
            by_trait = " / ".join(f"{report['by_trait'][t]['pointing_game']:.2f}" for t in levels)
            print(
                f"| {rank} | {criterion} | {report['pointing_game']:.2f} | {by_trait} |", flush=True
            )


if __name__ == "__main__":
    main()
