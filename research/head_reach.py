"""Can each head of a demo backbone's last block point at each trait? One fixed query per head.

    python research/head_reach.py [WEIGHTS]     # default: the shipped demo backbone

Prompt-CAM's class prompt gives each head of the last block one query, the same for every
image. For each head and each trait part (tail, dorsal fin, marking) this learns such a query
(Adam, 150 steps) that puts the head's attention on the part, on half of a fresh demo draw
(40 images per species), and reports the pointing game of that query on the other half: the
share of images whose attention peak over the patches falls on a patch at least a quarter
covered by the part. High values in every head mean the frozen backbone lets any head find
the trait; the class prompts' training decides whether they do.
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
import torch

from promptcam.demo.pretext import last_block_tokens, normalise, part_shares
from promptcam.demo.probes import _fresh_demo_draw
from promptcam.demo.taxa import DORSAL, MARKING, TAIL, DemoConfig
from promptcam.model.backbone import backbone_from_spec
from promptcam.model.spec import backbone_spec

PARTS = {"tail": TAIL, "dorsal fin": DORSAL, "marking": MARKING}
MIN_COVERAGE = 0.25


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("weights", nargs="?", default=None, help="a demo-architecture ViT")
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args()
    torch.manual_seed(0)
    spec = backbone_spec({"name": "demo"})
    if args.weights:
        spec = dataclasses.replace(spec, weights=args.weights)
    vit = backbone_from_spec(spec).eval()
    size, patch = vit.patch_embed.img_size[0], vit.patch_embed.patch_size[0]
    images, parts, _ = _fresh_demo_draw(DemoConfig(image_size=size), size, 40, seed=77)
    block = vit.blocks[-1]
    with torch.no_grad():
        tokens = torch.cat(
            [
                last_block_tokens(vit, normalise(torch.from_numpy(chunk).permute(0, 3, 1, 2)))
                for chunk in np.array_split(images, max(1, len(images) // 120))
            ]
        )
        qkv = block.attn.qkv(block.norm1(tokens)).unflatten(-1, (3, block.attn.num_heads, -1))
        keys = block.attn.k_norm(qkv[:, :, 1].transpose(1, 2))  # (N, H, T, d)
    shares = part_shares(torch.from_numpy(parts.astype(np.int64)), patch, 1)[:, :, 0]
    prefix = vit.num_prefix_tokens
    train = torch.arange(len(images)) % 2 == 0
    print(f"{len(images)} images ({int(train.sum())} to fit, the rest scored), {args.steps} steps")
    print("| head | " + " | ".join(PARTS) + " |\n|---|" + "---:|" * len(PARTS))
    for head in range(block.attn.num_heads):
        cells = []
        for part in PARTS.values():
            inside = shares[:, :, part] >= MIN_COVERAGE
            query = torch.zeros(keys.shape[-1], requires_grad=True)
            optimizer = torch.optim.Adam([query], lr=0.1)
            for _ in range(args.steps):
                log_attention = (keys[train, head] @ query).log_softmax(-1)[:, prefix:]
                mass = torch.logsumexp(log_attention.masked_fill(~inside[train], -1e9), -1)
                optimizer.zero_grad()
                (-mass.mean()).backward()
                optimizer.step()
            with torch.no_grad():
                peak = (keys[~train, head] @ query)[:, prefix:].argmax(-1)
                cells.append(inside[~train].gather(1, peak[:, None]).float().mean().item())
        print(f"| {head} | " + " | ".join(f"{cell:.2f}" for cell in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
