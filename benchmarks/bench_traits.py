"""Trait identification speed: the batched greedy search against the naive one, one run each.

    python benchmarks/bench_traits.py            # CPU: a small ViT, C = 200
    python benchmarks/bench_traits.py --full     # GPU: ViT-B/16 at 224 px, C = 200

"batched" is :func:`promptcam.traits.greedy_heads`: one forward to the last block per batch,
then one call per greedy step recomputing only the true class's row for all images and
candidate heads. "naive" is :func:`promptcam.traits.greedy_heads_naive`: a full forward with
materialised attention per image, step and candidate, as the reference does (H (H + 1) / 2
forwards per image, plus one to classify it). Both run the full elimination in fp32; the run
also checks that both found the same head order. Every image is searched: each image's target
is its own prediction. The backbone, prompts and head are random: weights do not change the
speed.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from promptcam.model import BackboneSpec, PromptCAM, PromptCAMConfig
from promptcam.traits import EliminationTrace, greedy_heads, greedy_heads_naive


@dataclass(frozen=True)
class Setting:
    backbone: BackboneSpec
    img_size: int
    num_classes: int
    batched_images: int
    naive_images: int  # the naive search is slow: time fewer images


CPU_SETTING = Setting(
    backbone=BackboneSpec(
        "vit_custom", kwargs=dict(img_size=32, patch_size=8, embed_dim=96, depth=4, num_heads=6)
    ),
    img_size=32,
    num_classes=200,
    batched_images=64,
    naive_images=4,
)
GPU_SETTING = Setting(
    backbone=BackboneSpec("vit_base_patch16_224"),
    img_size=224,
    num_classes=200,
    batched_images=256,
    naive_images=8,
)


def timed(run: Callable[[], EliminationTrace], device: str) -> tuple[EliminationTrace, float]:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    trace = run()
    if device == "cuda":
        torch.cuda.synchronize()
    return trace, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="ViT-B/16 at 224 px (GPU)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads")
    parser.add_argument("--batch", type=int, default=64, help="images per batched call")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    setting = GPU_SETTING if args.full else CPU_SETTING
    config = PromptCAMConfig(num_classes=setting.num_classes)
    model = PromptCAM(setting.backbone, config).to(device).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        # Unit-scale prompts and head: heads then change scores, so the orders are not all ties.
        for name, param in model.named_parameters():
            if not name.startswith("backbone."):
                param.copy_(torch.randn(param.shape, generator=generator))
    images = torch.randn(
        setting.batched_images, 3, setting.img_size, setting.img_size, generator=generator
    ).to(device)
    with torch.inference_mode():
        targets = torch.cat([model(chunk).argmax(dim=-1) for chunk in images.split(args.batch)])
    # Warm-up (kernels, allocator) on two images, not timed.
    greedy_heads(model, images[:2], targets[:2])
    greedy_heads_naive(model, images[:1], targets[:1])

    def batched() -> EliminationTrace:
        return EliminationTrace.concatenate(
            [
                greedy_heads(model, chunk, chunk_targets)
                for chunk, chunk_targets in zip(
                    images.split(args.batch), targets.split(args.batch), strict=True
                )
            ]
        )

    count = setting.naive_images
    batched_trace, batched_seconds = timed(batched, device)
    naive_trace, naive_seconds = timed(
        lambda: greedy_heads_naive(model, images[:count], targets[:count]), device
    )
    same = bool(np.array_equal(batched_trace.order[:count], naive_trace.order))
    heads = model.num_heads
    print(
        f"device {device}, backbone {setting.backbone.name} {dict(setting.backbone.kwargs)}, "
        f"C {setting.num_classes}, {heads} heads, threads {torch.get_num_threads()}, fp32"
    )
    header = ("search", "images", "seconds", "images/s", "forwards per image")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    batched_rate = len(images) / batched_seconds
    naive_rate = count / naive_seconds
    rows = (
        ("batched", len(images), batched_seconds, batched_rate, "1 + last-block rows"),
        ("naive", count, naive_seconds, naive_rate, str(1 + heads * (heads + 1) // 2)),
    )
    for name, n, seconds, rate, forwards in rows:
        print(f"| {name} | {n} | {seconds:.3f} | {rate:.2f} | {forwards} |")
    print(f"speed-up (batched / naive images/s): {batched_rate / naive_rate:.1f}x")
    print(f"same head order on the {count} images timed by both: {same}")


if __name__ == "__main__":
    main()
