"""Trait identification speed: the batched greedy search against the naive one, one run each.

    python benchmarks/bench_traits.py            # CPU: a small ViT, C = 200
    python benchmarks/bench_traits.py --full     # GPU: ViT-B/16 at 224 px, C = 200

"batched" is :func:`promptcam.traits.search.greedy_heads`: one forward to the last block per batch,
then one call per greedy step recomputing only the true class's row for all images and
candidate heads. "naive" is :func:`promptcam.traits.naive.greedy_heads_naive`: a full forward with
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

from promptcam.config import EncodePrecision
from promptcam.model.prompt_cam import PromptCAM
from promptcam.model.spec import BackboneSpec, PromptCAMConfig
from promptcam.traits.naive import greedy_heads_naive
from promptcam.traits.search import EliminationTrace, greedy_heads


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
    batched_images=1024,
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


def same_kept_heads(a: EliminationTrace, b: EliminationTrace, kept: int) -> float:
    """Share of images whose last ``kept`` heads in the elimination order are the same set."""
    tail_a, tail_b = np.sort(a.order[:, -kept:], axis=1), np.sort(b.order[:, -kept:], axis=1)
    return float((tail_a == tail_b).all(axis=1).mean())


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

    def batched(precision: EncodePrecision) -> Callable[[], EliminationTrace]:
        def run() -> EliminationTrace:
            return EliminationTrace.concatenate(
                [
                    greedy_heads(model, chunk, chunk_targets, encode_precision=precision)
                    for chunk, chunk_targets in zip(
                        images.split(args.batch), targets.split(args.batch), strict=True
                    )
                ]
            )

        return run

    # (name, run, precision note); TF32 is a GPU setting for fp32 matrix products.
    variants: list[tuple[str, EncodePrecision, bool]] = [("batched, fp32", "fp32", False)]
    if device == "cuda":
        variants += [
            ("batched, fp32 with TF32", "fp32", True),
            ("batched, bf16 encode", "bf16", False),
        ]
    # Warm-up (kernels, allocator) on two images, not timed.
    for _, precision, _ in variants:
        greedy_heads(model, images[:2], targets[:2], encode_precision=precision)
    greedy_heads_naive(model, images[:1], targets[:1])

    rows, traces = [], {}
    for name, precision, tf32 in variants:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        traces[name], seconds = timed(batched(precision), device)
        rows.append((name, len(images), seconds, "1 + last-block rows"))
    torch.backends.cuda.matmul.allow_tf32 = False
    count = setting.naive_images
    naive_trace, naive_seconds = timed(
        lambda: greedy_heads_naive(model, images[:count], targets[:count]), device
    )
    heads = model.num_heads
    rows.append(
        ("naive, fp32 (as the reference)", count, naive_seconds, str(1 + heads * (heads + 1) // 2))
    )
    print(
        f"device {device} ({torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}), "
        f"backbone {setting.backbone.name} {dict(setting.backbone.kwargs)}, "
        f"C {setting.num_classes}, {heads} heads, threads {torch.get_num_threads()}, "
        f"batch {args.batch}"
    )
    header = ("search", "images", "seconds", "images/s", "forwards per image")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for name, n, seconds, forwards in rows:
        print(f"| {name} | {n} | {seconds:.3f} | {n / seconds:.2f} | {forwards} |")
    reference = traces["batched, fp32"]
    naive_rate = count / naive_seconds
    print(f"speed-up, batched fp32 / naive: {len(images) / rows[0][2] / naive_rate:.1f}x")
    same = bool(np.array_equal(reference.order[:count], naive_trace.order))
    print(f"same head order, batched fp32 vs naive, on the {count} images timed by both: {same}")
    for name, trace in traces.items():
        if name == "batched, fp32":
            continue
        order = float((trace.order == reference.order).all(axis=1).mean())
        kept = same_kept_heads(trace, reference, kept=4)
        print(
            f"{name} vs batched fp32 on {len(images)} images: same full order {order:.3f}, "
            f"same 4 kept heads {kept:.3f}"
        )


if __name__ == "__main__":
    main()
