"""The default demo, every rank, on a GPU: the pipeline's library calls without Snakemake.

    python research/gpu_demo.py [--out DIR] [--ranks family,genus,species]
    python research/gpu_demo.py --ranks species --seeds 0,1,2,3 --train '{"epochs": 20}'
    python research/gpu_demo.py --ranks species --demo '{"species_per_genus": 6}'

Generates the demo of ``config/config.yaml``, writes its metadata and shards, then per rank
trains Prompt-CAM (bf16 autocast, fused attention), evaluates it on the test split and runs
the greedy trait search twice: blocks 1..N-1 in fp32 and in bf16 (the last block is fp32 in
both), reporting how often the two keep the same heads. ``--seeds`` repeats each rank's training
with other seeds, ``--train`` overrides its settings (JSON, merged into the rank's ``train``
settings of the config), ``--demo`` the demo's. One run; prints a table of seconds per stage
and the accuracies; runs on a CPU too. Snakemake itself is not needed, so the script runs on a GPU
machine that has only the library's dependencies.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import yaml
from torch.nn.attention import SDPBackend, sdpa_kernel

from promptcam.config import merged, rank_train_settings, settings_from_config, validate_config
from promptcam.data.metadata import MetadataSpec, prepare_metadata
from promptcam.data.shards import ShardConfig, write_shards
from promptcam.data.splits import SplitConfig
from promptcam.demo.organisms import DemoConfig, generate_demo_dataset
from promptcam.evaluation.evaluate import EvalConfig, evaluate_rank
from promptcam.training.train import TrainConfig, train_rank
from promptcam.traits.run import TraitRunConfig, run_rank_traits

T = TypeVar("T")
CONFIG = Path(__file__).resolve().parents[1] / "config" / "config.yaml"
# Training variants: how SDPA may run while training.
VARIANTS: dict[str, Callable[[], contextlib.AbstractContextManager]] = {
    "bf16": contextlib.nullcontext,
    "fp32": contextlib.nullcontext,
    "bf16-no-cudnn": lambda: sdpa_kernel(
        [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    ),
}
OUTPUT_SUFFIXES = {
    "table": ".parquet",
    "maps": ".npz",
    "summary": ".tsv",
    "summary_maps": ".npz",
    "cross_class": ".tsv",
    "cross_class_maps": ".npz",
}


def without(section: dict, *keys: str) -> dict:
    """A config section less ``keys`` (job threads, other rules' subsections)."""
    return {key: value for key, value in section.items() if key not in keys}


def timed(seconds: dict[str, float], name: str, run: Callable[[], T]) -> T:
    start = time.perf_counter()
    result = run()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds[name] = time.perf_counter() - start
    return result


def run_variant(
    work: Path,
    shards: Path,
    config: dict[str, Any],
    rank: str,
    variant: str,
    device: str,
    seconds: dict[str, float],
    overrides: dict[str, Any],
) -> tuple[str, float, float, float]:
    """Train, evaluate and search traits for one rank in one training variant; returns
    (name, top-1, linear-probe top-1, share of images with the same kept heads in bf16 and
    fp32 trait search)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; known: {sorted(VARIANTS)}")
    settings = merged(rank_train_settings(config["train"], rank, config["levels"]), overrides)
    model_config, transform = settings.pop("model"), settings.pop("transform")
    runtime = {"threads": 4, "device": device, "mixed_precision": variant != "fp32"}
    train_config = settings_from_config(TrainConfig, {**settings, **runtime}, "train")
    tag = f"{variant}, seed {train_config.seed}"
    name, out = f"{rank}, {tag}", work / "results" / rank / tag.replace(", ", "_")
    with VARIANTS[variant]():
        checkpoint = timed(
            seconds,
            f"{name}: train",
            lambda: train_rank(
                shards_dir=shards,
                rank=rank,
                labels_tsv=work / "data" / "labels" / f"{rank}.tsv",
                backbone=config["backbone"],
                model_config=model_config,
                train_config=train_config,
                out_dir=out,
                transform=transform,
            ),
        )
    evaluation = timed(
        seconds,
        f"{name}: evaluate",
        lambda: evaluate_rank(
            shards_dir=shards,
            rank=rank,
            checkpoint=checkpoint,
            out_json=out / "eval.json",
            out_confusion=out / "confusion.tsv",
            config=settings_from_config(
                EvalConfig, {**config["evaluate"], "device": device}, "evaluate"
            ),
        ),
    )
    kept = {}
    for precision in ("fp32", "bf16"):
        outputs = {
            output: out / f"{precision}_{output}{suffix}"
            for output, suffix in OUTPUT_SUFFIXES.items()
        }
        traits = settings_from_config(
            TraitRunConfig,
            {
                **without(config["traits"], "localization", "fidelity"),
                "device": device,
                "encode_precision": precision,
            },
            "traits",
        )
        table = timed(
            seconds,
            f"{name}: traits, {precision} encode",
            lambda traits=traits, outputs=outputs: run_rank_traits(
                checkpoint=checkpoint, shards_dir=shards, rank=rank, outputs=outputs, config=traits
            ),
        )
        kept[precision] = table[table["kept"]].groupby("image")["head"].apply(frozenset)
    same = float(np.mean([kept["fp32"][i] == kept["bf16"][i] for i in kept["fp32"].index]))
    return name, evaluation["top1"], evaluation["linear_probe_top1"], same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="default: a temporary folder")
    parser.add_argument("--ranks", default=None, help="default: every level of the config")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument(
        "--variants",
        default="bf16",
        help="comma-separated training variants: bf16 (the default path), fp32 (autocast off), "
        "bf16-no-cudnn (SDPA without its cuDNN backend)",
    )
    parser.add_argument("--seeds", default=None, help="comma-separated; default: the config's")
    parser.add_argument(
        "--train", default="{}", help="JSON training overrides, e.g. '{\"epochs\": 20}'"
    )
    parser.add_argument(
        "--demo", default="{}", help="JSON demo overrides, e.g. '{\"species_per_genus\": 6}'"
    )
    args = parser.parse_args()
    config = yaml.safe_load(CONFIG.read_text())
    config["demo"] = {**config.get("demo", {}), **json.loads(args.demo)}
    validate_config(config)  # fills in the schema's defaults
    levels = tuple(config["levels"])
    ranks = args.ranks.split(",") if args.ranks else list(levels)
    seeds = [int(seed) for seed in args.seeds.split(",")] if args.seeds else [None]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        work = args.out or Path(tmp)
        seconds: dict[str, float] = {}
        table = timed(
            seconds,
            "generate demo",
            lambda: generate_demo_dataset(
                work / "demo",
                settings_from_config(DemoConfig, without(config["demo"], "threads"), "demo"),
                workers=args.workers,
            ),
        )
        parquet = timed(
            seconds,
            "metadata",
            lambda: prepare_metadata(
                table,
                work / "demo",
                work / "data",
                MetadataSpec(levels=levels),
                settings_from_config(SplitConfig, config["splits"], "splits"),
            ),
        )
        shards = work / "shards"
        timed(
            seconds,
            "shards",
            lambda: write_shards(
                parquet,
                work / "data" / "labels",
                work / "demo",
                shards,
                levels,
                settings_from_config(ShardConfig, without(config["shards"], "threads"), "shards"),
                workers=args.workers,
            ),
        )
        rows = []
        for rank in ranks:
            for variant in args.variants.split(","):
                for seed in seeds:
                    overrides = {
                        **json.loads(args.train),
                        **({} if seed is None else {"seed": seed}),
                    }
                    rows.append(
                        run_variant(work, shards, config, rank, variant, device, seconds, overrides)
                    )
    print(f"device {device} ({torch.cuda.get_device_name() if device == 'cuda' else 'cpu'})")
    print("| stage | seconds |\n|---|---:|")
    for name, value in seconds.items():
        print(f"| {name} | {value:.1f} |")
    print(
        "\n| rank, training, seed | Prompt-CAM top-1 | linear probe top-1 | same kept heads, bf16 vs fp32 |"
    )
    print("|---|---:|---:|---:|")
    for rank, top1, probe, same in rows:
        print(f"| {rank} | {top1:.3f} | {probe:.3f} | {same:.3f} |")


if __name__ == "__main__":
    main()
