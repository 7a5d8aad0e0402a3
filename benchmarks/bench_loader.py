"""Training input speed: the shard loader (1 worker vs N) against the training step it feeds.

    python benchmarks/bench_loader.py                      # demo shards made in a temp folder
    python benchmarks/bench_loader.py --shards results/shards --rank species --workers 8

Without ``--shards``, generates a demo set and its shards first (not timed). Then, one run each:

- the train loader alone (decode JPEG, resize, random crop, flip, normalise, batch), one epoch,
  with 0 workers (in the main process), 1 worker and ``--workers``; worker start-up is
  included, as in training, where workers are re-created every epoch;
- the training step alone (forward, backward, SGD step of Prompt-CAM on a small ViT) on one
  batch of random images reused, so no input cost at all;
- a whole training epoch (:func:`promptcam.training.steps.train_one_epoch`) fed by ``--workers`` workers.

Prints one table. Training cannot run faster than the slower of its loader and its step.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from promptcam.data.metadata import MetadataSpec, prepare_metadata
from promptcam.data.reader import ShardDataset, TransformConfig, make_loader
from promptcam.data.shards import ShardConfig, write_shards
from promptcam.data.splits import SplitConfig
from promptcam.demo.organisms import DemoConfig, generate_demo_dataset
from promptcam.model.prompt_cam import PromptCAM
from promptcam.model.spec import BackboneSpec, PromptCAMConfig
from promptcam.training.runtime import autocast, resolve_device
from promptcam.training.settings import TrainConfig
from promptcam.training.steps import build_optimizer, train_one_epoch

LEVELS = ("family", "genus", "species")


def demo_shards(work: Path, images_per_species: int, image_size: int, workers: int) -> Path:
    demo = DemoConfig(images_per_species=images_per_species, image_size=image_size)
    table = generate_demo_dataset(work / "demo", demo, workers=workers)
    parquet = prepare_metadata(
        table, work / "demo", work / "data", MetadataSpec(levels=LEVELS), SplitConfig()
    )
    config = ShardConfig(short_side=image_size, max_samples_per_shard=64)
    write_shards(parquet, work / "data" / "labels", work / "demo", work / "shards", LEVELS, config)
    return work / "shards"


def train_dataset(shards: Path, rank: str, transform: TransformConfig) -> ShardDataset:
    return ShardDataset(shards, "train", rank, train=True, transform=transform, shuffle_buffer=500)


def time_loader(
    dataset: ShardDataset, batch_size: int, workers: int
) -> tuple[int, float, float, int]:
    """Images read in one epoch, seconds in all, seconds to the first batch (worker start-up),
    and the largest class index seen."""
    images, largest, first = 0, 0, None
    start = time.perf_counter()
    for _, labels, _ in make_loader(dataset, batch_size, workers):
        if first is None:
            first = time.perf_counter() - start
        images += len(labels)
        largest = max(largest, int(labels.max()))
    return images, time.perf_counter() - start, first or 0.0, largest


def time_steps(
    model: PromptCAM, batch_size: int, img_size: int, steps: int, device: torch.device
) -> tuple[int, float]:
    optimizer = build_optimizer(model, TrainConfig())
    images = torch.randn(batch_size, 3, img_size, img_size, device=device)
    labels = torch.randint(model.num_classes, (batch_size,), device=device)
    model.train()

    def step() -> None:
        with autocast(device):
            scores = model(images)
        loss = torch.nn.functional.cross_entropy(scores.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # warm-up: allocations, kernel selection
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch_size, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=Path, default=None, help="default: make demo shards")
    parser.add_argument("--rank", default="species")
    parser.add_argument("--images-per-species", type=int, default=30)
    parser.add_argument("--image-size", type=int, default=128, help="demo image size")
    parser.add_argument("--img-size", type=int, default=96, help="model input size")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the step")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--backbone",
        default=None,
        help="timm name of the step's backbone (e.g. vit_base_patch16_224); default: the demo ViT",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    # The demo backbone's architecture (promptcam.demo.pretrain defaults), randomly initialised:
    # speed does not depend on the weights.
    vit = dict(img_size=args.img_size, patch_size=12, embed_dim=128, depth=6, num_heads=8)
    transform = TransformConfig(
        img_size=args.img_size, resize_size=round(args.img_size * 240 / 224)
    )

    with tempfile.TemporaryDirectory() as tmp:
        shards = args.shards or demo_shards(
            Path(tmp), args.images_per_species, args.image_size, args.workers
        )
        dataset = train_dataset(shards, args.rank, transform)
        rows, num_classes = [], 1
        for workers in (0, 1, args.workers):
            images, seconds, first, largest = time_loader(dataset, args.batch_size, workers)
            rows.append((f"loader, {workers} worker(s)", workers, images, seconds, first))
            num_classes = max(num_classes, largest + 1)

        spec = (
            BackboneSpec("vit_custom", kwargs=vit)
            if args.backbone is None
            else BackboneSpec(args.backbone, kwargs=dict(img_size=args.img_size))
        )
        model = PromptCAM(spec, PromptCAMConfig(num_classes=num_classes)).to(device)
        images, seconds = time_steps(model, args.batch_size, args.img_size, args.steps, device)
        rows.append(("train step only (random input)", 0, images, seconds, None))

        config = TrainConfig(batch_size=args.batch_size, num_workers=args.workers)
        loader = make_loader(
            dataset, args.batch_size, args.workers, pin_memory=device.type == "cuda"
        )
        start = time.perf_counter()
        with tqdm(disable=True) as progress:
            stats = train_one_epoch(
                model,
                loader,
                build_optimizer(model, config),
                num_classes=num_classes,
                epoch=0,
                samples_per_epoch=len(dataset),
                config=config,
                device=device,
                progress=progress,
            )
        seconds = time.perf_counter() - start
        rows.append(("train epoch (loader + step)", args.workers, stats.samples, seconds, None))

    print(
        f"{len(dataset)} train images, rank {args.rank} ({num_classes} classes), batch "
        f"{args.batch_size}, model input {args.img_size} px, backbone "
        f"{args.backbone or vit}, Prompt-CAM reference layout; device {device}, "
        f"{args.threads} torch thread(s), {os.cpu_count()} cores\n"
    )
    print("| what | workers | images | seconds | images/s | images/s after the first batch |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, workers, images, seconds, first in rows:
        steady = "" if first is None else f"{(images - args.batch_size) / (seconds - first):.1f}"
        print(
            f"| {name} | {workers} | {images} | {seconds:.2f} | {images / seconds:.1f} | {steady} |"
        )


if __name__ == "__main__":
    main()
