"""Shard writing speed: one worker vs all cores vs a plain PIL loop without tar files.

    python benchmarks/bench_shards.py                 # 360 demo images of 256 px
    python benchmarks/bench_shards.py --images-per-species 60 --workers 8

Generates a demo set once (not timed), prepares its metadata (not timed), then times, one run
each: (a) a plain single-process loop that decodes, converts to RGB, resizes the short side
and JPEG-encodes every image in memory; (b) ``write_shards`` with one worker; (c) with all
workers. (b) and (c) also write the tars, hash them and write the manifest. Prints one table.
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
from PIL import Image

from promptcam.data.metadata import MetadataSpec, prepare_metadata
from promptcam.data.shards import ShardConfig, resized_size, write_shards
from promptcam.data.splits import SplitConfig
from promptcam.demo.organisms import DemoConfig, generate_demo_dataset

LEVELS = ("family", "genus", "species")


def plain_loop(paths: list[Path], config: ShardConfig) -> None:
    """The naive reference: decode, resize, encode; no EXIF, no draft decoding, no tar."""
    for path in paths:
        with Image.open(path) as image:
            image = image.convert("RGB")
        image = image.resize(resized_size(image.size, config.short_side), Image.Resampling.BICUBIC)
        image.save(io.BytesIO(), format="JPEG", quality=config.jpeg_quality)


def timed(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images-per-species", type=int, default=30)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--short-side", type=int, default=160)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        demo = DemoConfig(images_per_species=args.images_per_species, image_size=args.image_size)
        table_path = generate_demo_dataset(work / "demo", demo, workers=args.workers)
        parquet = prepare_metadata(
            table_path, work / "demo", work / "data", MetadataSpec(levels=LEVELS), SplitConfig()
        )
        paths = [work / "demo" / image for image in pd.read_parquet(parquet)["image"]]
        config = ShardConfig(short_side=args.short_side, max_samples_per_shard=64)

        def shards(workers: int) -> Callable[[], object]:
            return lambda: write_shards(
                parquet, work / "data" / "labels", work / "demo", work / f"shards{workers}",
                LEVELS, config, workers=workers,
            )  # fmt: skip

        rows = [
            ("plain PIL loop (no tar)", 1, timed(lambda: plain_loop(paths, config))),
            ("write_shards", 1, timed(shards(1))),
            ("write_shards", args.workers, timed(shards(args.workers))),
        ]
        identical = all(
            (work / "shards1" / p.name).read_bytes() == p.read_bytes()
            for p in (work / f"shards{args.workers}").iterdir()
        )

    baseline = len(paths) / rows[0][2]
    print(
        f"{len(paths)} demo images, {args.image_size} px PNG -> JPEG q{config.jpeg_quality}, "
        f"short side {args.short_side}; {os.cpu_count()} cores\n"
    )
    print("| method | workers | seconds | images/s | vs plain loop |")
    print("|---|---:|---:|---:|---:|")
    for name, workers, seconds in rows:
        rate = len(paths) / seconds
        print(f"| {name} | {workers} | {seconds:.2f} | {rate:.0f} | {rate / baseline:.2f}x |")
    print(f"\nshards identical for 1 and {args.workers} workers: {identical}")


if __name__ == "__main__":
    main()
