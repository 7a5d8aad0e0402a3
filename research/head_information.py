"""Which heads of a trained rank carry its classes, and which does the greedy search keep?

    python research/head_information.py [--results results] [RANK ...]

For each head of the last block, the outputs of that head in every class prompt's row
(C x d values per image, the only way a head can reach any score) are the features of a
logistic regression fitted on the train split and scored on the test split: its top-1 says how
much of the rank's labels the head carries. Next to it: how often the traits rule kept the
head on the test images (``trait_maps.npz``) and that head's pointing game on the rank's own
trait (``localization.json``). A head kept often but carrying chance-level information is one
whose blurring moves the target's score without telling the classes apart.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from promptcam.data.reader import TransformConfig, split_loader
from promptcam.model.checkpoint import load_checkpoint
from promptcam.model.last_block import target_rows


@torch.inference_mode()
def head_outputs(model, loader) -> tuple[np.ndarray, np.ndarray]:
    """(N, H, C * d) every class row's per-head attention output, and the labels (N,)."""
    features, labels = [], []
    for images, batch_labels, *_ in loader:
        tokens = model.encode_to_last_block(images)
        scores = model.last_block_scores(tokens)
        rows = [
            target_rows(model, tokens, torch.full_like(batch_labels, c), scores).attended
            for c in range(model.num_classes)
        ]  # C x (B, H, d)
        features.append(torch.stack(rows, dim=2).flatten(2).numpy())
        labels.append(batch_labels.numpy())
    return np.concatenate(features), np.concatenate(labels)


def head_probe_top1(train: tuple, test: tuple, head: int) -> float:
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, C=0.1))
    probe.fit(train[0][:, head], train[1])
    return float((probe.predict(test[0][:, head]) == test[1]).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ranks", nargs="*", default=["family", "genus", "species"])
    parser.add_argument("--results", default="results", type=Path)
    args = parser.parse_args()
    for rank in args.ranks:
        folder = args.results / rank
        model, meta = load_checkpoint(folder / "model.pt")
        model.eval()
        splits = {
            split: head_outputs(
                model,
                split_loader(
                    args.results / "shards",
                    split,
                    rank,
                    TransformConfig.unaugmented(meta.preprocessing),
                    64,
                ),
            )
            for split in ("train", "test")
        }
        with np.load(folder / "trait_maps.npz") as data:
            kept, searched = data["kept"], data["order"][:, 0] >= 0
        kept = kept[searched]
        by_head = json.loads((folder / "localization.json").read_text())["by_head"]
        chance = np.bincount(splits["test"][1]).max() / len(splits["test"][1])
        print(f"\n{rank}: {len(meta.label_names)} classes, majority-class top-1 {chance:.2f}")
        print("| head | probe top-1 | kept on | pointing game |\n|---|---:|---:|---:|")
        for head in range(model.num_heads):
            pointing = by_head[str(head)]["pointing_game"]
            print(
                f"| {head} | {head_probe_top1(splits['train'], splits['test'], head):.2f} "
                f"| {kept[:, head].mean():.2f} "
                f"| {'-' if pointing is None else f'{pointing:.2f}'} |"
            )


if __name__ == "__main__":
    main()
