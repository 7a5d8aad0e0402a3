"""Which heads of a trained rank carry its classes, and which does the greedy search keep?

    python research/head_information.py [--results results] [--out OUT] [RANK ...]

Now a thin caller of the product's promptcam.evaluation.heads.run_rank_heads (the heads rule's
``heads.tsv``): per last-block head, the held-out probe top-1 on that head's output in every
class row (fitted on train, scored on test), the pointing game of its map on the rank's own
trait and how often the traits rule kept it. Note: the pointing game here is over all searched
test images; the tables of localisation.md from before 2026-11-27 used the images keeping the
head (``by_head`` of localization.json).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from promptcam.evaluation.heads import HeadsConfig, run_rank_heads


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ranks", nargs="*", default=["family", "genus", "species"])
    parser.add_argument("--results", default="results", type=Path)
    parser.add_argument("--out", default=Path("heads_out"), type=Path)
    args = parser.parse_args()
    for rank in args.ranks:
        (args.out / rank).mkdir(parents=True, exist_ok=True)
        table = run_rank_heads(
            checkpoint=args.results / rank / "model.pt",
            shards_dir=args.results / "shards",
            trait_maps=args.results / rank / "trait_maps.npz",
            rank=rank,
            levels=("family", "genus", "species"),
            out_tsv=args.out / rank / "heads.tsv",
            config=HeadsConfig(device="cpu"),
        )
        print(f"\n{rank}\n{table.round(2).to_markdown(index=False)}")


if __name__ == "__main__":
    main()
