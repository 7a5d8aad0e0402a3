"""Localisation of every method, per rank: a stand-in for the fidelity rule's cam_maps.npz, then
the product's heads.tsv and localization.tsv.

    python research/localisation_baselines.py --results results --out OUT [RANK ...]

Writes OUT/{rank}/cam_maps.npz (the format the fidelity rule writes: ``image`` (N,), ``method``
(M,), ``model`` (M,), ``maps`` (N, M, h, w)) with the linear probe's CAMs
(promptcam.evaluation.cams, probe chosen as the fidelity rule chooses it) and Grad-CAM,
Layer-CAM and Eigen-CAM on the Prompt-CAM model itself (gradient of s[c] at the last block's
norm1 output, its patch tokens); then runs promptcam.evaluation.heads.run_rank_heads and
promptcam.evaluation.localization.run_rank_localization into OUT/{rank}/. Attention roll-out is
computed for the probe only (the Prompt-CAM model's last block is not timm's attention).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import torch

from promptcam.data.reader import TransformConfig, split_loader
from promptcam.evaluation.cams import compute_cams, eigen_cam, grad_cam, layer_cam
from promptcam.evaluation.fidelity import FidelityConfig, _fit_probe
from promptcam.evaluation.heads import HeadsConfig, run_rank_heads
from promptcam.evaluation.localization import run_rank_localization
from promptcam.model.checkpoint import load_checkpoint

LEVELS = ("family", "genus", "species")


def prompt_cam_cams(model, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Grad-CAM, Layer-CAM, Eigen-CAM of s[label] on the last block's norm1 patch tokens."""
    grid = tuple(model.backbone.patch_embed.grid_size)
    seen: list[torch.Tensor] = []
    hook = model.backbone.blocks[-1].norm1.register_forward_hook(
        lambda _m, _i, output: seen.append(output)
    )
    try:
        with torch.enable_grad():
            images = images.detach().requires_grad_(True)
            scores = model(images)
            context = seen[-1]  # the keys' tokens: [prompts, prefix, patches]
            (gradient,) = torch.autograd.grad(scores.gather(1, labels[:, None]).sum(), context)
    finally:
        hook.remove()
    patches = grid[0] * grid[1]
    tokens, gradient = context[:, -patches:].detach(), gradient[:, -patches:]
    return {
        "grad_cam": grad_cam(tokens, gradient).reshape(-1, *grid),
        "layer_cam": layer_cam(tokens, gradient).reshape(-1, *grid),
        "eigen_cam": eigen_cam(tokens).reshape(-1, *grid),
    }


def write_cam_maps(results: Path, rank: str, out: Path) -> None:
    model, meta = load_checkpoint(results / rank / "model.pt")
    model.eval()
    shards = results / "shards"
    config = FidelityConfig(linear_probe={}, device="cpu")
    probe = _fit_probe(model, shards, rank, meta, config, torch.device("cpu"))
    loader = split_loader(shards, "test", rank, TransformConfig.unaugmented(meta.preprocessing), 64)
    ids, columns = [], {}
    for images, labels, batch in loader:
        ids.extend(batch["sample_id"])
        for (method, model_name), maps in [
            *(((m, "linear_probe"), v) for m, v in compute_cams(probe, images, labels).items()),
            *(((m, "prompt_cam"), v) for m, v in prompt_cam_cams(model, images, labels).items()),
        ]:
            columns.setdefault((method, model_name), []).append(maps.float().numpy())
    keys = list(columns)
    np.savez_compressed(
        out / "cam_maps.npz",
        image=np.asarray(ids, dtype=str),
        method=np.asarray([k[0] for k in keys], dtype=str),
        model=np.asarray([k[1] for k in keys], dtype=str),
        maps=np.stack([np.concatenate(columns[k]) for k in keys], axis=1).astype(np.float32),
    )


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ranks", nargs="*", default=list(LEVELS))
    parser.add_argument("--results", default="results", type=Path)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    for rank in args.ranks:
        out = args.out / rank
        out.mkdir(parents=True, exist_ok=True)
        if not (out / "cam_maps.npz").exists():
            write_cam_maps(args.results, rank, out)
        common = {
            "checkpoint": args.results / rank / "model.pt",
            "shards_dir": args.results / "shards",
            "trait_maps": args.results / rank / "trait_maps.npz",
            "rank": rank,
            "levels": LEVELS,
        }
        run_rank_heads(**common, out_tsv=out / "heads.tsv", config=HeadsConfig(device="cpu"))
        run_rank_localization(
            **common,
            out_json=out / "localization.json",
            cam_maps=out / "cam_maps.npz",
            out_tsv=out / "localization.tsv",
            heads_tsv=out / "heads.tsv",
        )


if __name__ == "__main__":
    main()
