"""Figure stage at scale: time and peak memory of each figure for 12, 200 and 1,000 classes.

    python benchmarks/bench_figures.py                           # C = 12, 200, 1000
    python benchmarks/bench_figures.py --classes 12 --out /tmp/figbench --keep
    python benchmarks/bench_figures.py --classes 1000 --test-images 30 --only maps

For each C, synthetic stage outputs are written with the project's own writers, so the files
are those the pipeline writes: a three-rank taxonomy (C species, C/10 genera, C/50 families;
at least 2 families and 4 genera), ``--test-images`` drawn 96 px test images per species with
bit-per-rank trait masks, prepared with ``read_source`` / ``table_problems`` /
``prepared_table`` / ``write_prepared`` (labels, ``taxonomy.nwk``) and sharded with
``write_shards``; per rank, a random greedy elimination (8 heads, 8x8 maps, 90% of the images
correctly classified) cut by ``stop_search`` and written with ``search_table``,
``write_trait_maps``, ``class_summary`` / ``write_trait_summary``; sibling cross-class pairs
with ``write_cross_class``; ``classification_report`` / ``write_confusion_tsv`` (eval.json,
confusion.tsv) and ``write_metrics`` (metrics.tsv). Nothing here is timed.

Then, one run each, in a fresh process each (time of the call, peak RSS of the process:
``VmHWM``, including its imports), with the figure settings' defaults: every
figure function at the finest rank (C classes) and across the three ranks. Reference for the
ratio: the figures read maps with ``TraitMaps.read_maps(rows)``, which decompresses the npz as
a stream and keeps only the rows asked for; a figure without it would ``np.load`` the whole
``maps`` array. Both are timed in fresh processes for the rows the panels draw (up to 24
classes x 3 images) and the rows the gallery draws (one per class).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image

from promptcam.data.metadata import (
    MetadataSpec,
    prepared_table,
    read_label_names,
    read_source,
    table_problems,
    write_prepared,
)
from promptcam.data.shards import ShardConfig, write_shards
from promptcam.data.splits import SplitConfig
from promptcam.evaluation.evaluate import classification_report
from promptcam.evaluation.tables import write_confusion_tsv
from promptcam.io import write_json
from promptcam.training.metrics import write_metrics
from promptcam.traits.cross_class import (
    CrossClassAccumulator,
    cross_class_pairs,
    siblings_from_taxonomy,
    write_cross_class,
)
from promptcam.traits.search import EliminationTrace, GreedyConfig, TraitSearch, stop_search
from promptcam.traits.tables import (
    class_summary,
    search_table,
    write_parquet,
    write_trait_maps,
    write_trait_summary,
)

REPO = Path(__file__).resolve().parents[1]
LEVELS = ("family", "genus", "species")
HEADS, GRID, IMAGE_SIZE = 8, (8, 8), 96

# Peak RSS of this process: VmHWM, which starts afresh at exec (ru_maxrss does not: Linux
# keeps the forking parent's across execve, here the generator's).
PEAK_RSS = """
def peak_rss_mib():
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024
"""

# One figure in a fresh process: argv[1] is the job (module, function, keyword arguments).
FIGURE_CHILD = (
    PEAK_RSS
    + """
import importlib, json, resource, sys, time
from pathlib import Path
from promptcam.figures import settings as figure_settings
from promptcam.figures.sources import shard_images
from promptcam.figures.style import FigureStyle
job = json.loads(sys.argv[1])
draw = getattr(importlib.import_module(job["module"]), job["function"])
def value(spec):
    kind, data = spec
    if kind == "path": return Path(data)
    if kind == "paths": return {rank: Path(path) for rank, path in data.items()}
    if kind == "settings": return getattr(figure_settings, data)()
    if kind == "images": return shard_images(data[0], data[1])
    return data
kwargs = {name: value(spec) for name, spec in job["kwargs"].items()}
imports = peak_rss_mib()
start = time.perf_counter()
written = draw(**kwargs, style=FigureStyle())
seconds = time.perf_counter() - start
peak = max(peak_rss_mib(), resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
print(json.dumps({"seconds": seconds, "peak_mib": peak, "imports_mib": imports,
                  "files": len(written)}))
"""
)

# Maps of some rows of trait_maps.npz: argv = path, "naive" or "streamed", rows (JSON).
MAPS_CHILD = (
    PEAK_RSS
    + """
import json, sys, time
import numpy as np
from promptcam.traits.tables import read_trait_maps
path, how, rows = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
imports = peak_rss_mib()
start = time.perf_counter()
if how == "naive":
    with np.load(path) as data:
        maps = data["maps"][rows]
else:
    maps = read_trait_maps(path).read_maps(rows)
seconds = time.perf_counter() - start
assert maps.shape[0] == len(rows)
print(json.dumps({"seconds": seconds, "imports_mib": imports, "checksum": float(maps.sum()),
                  "peak_mib": peak_rss_mib()}))
"""
)


# ----------------------------------------------------------------------------- synthetic data


def taxon_table(classes: int, per_class: int) -> pd.DataFrame:
    """Rows of the metadata table: C species in C/10 genera in C/50 families, all test."""
    genera, families = max(4, classes // 10), max(2, classes // 50)
    species = np.repeat(np.arange(classes), per_class)
    genus = species * genera // classes
    family = genus * families // genera
    image = [f"images/{s:05d}/{i:02d}.png" for s in range(classes) for i in range(per_class)]
    return pd.DataFrame(
        {
            "image": image,
            "mask": [path.replace(".png", ".mask.png") for path in image],
            "family": [f"Familia{f:03d}idae" for f in family],
            "genus": [f"Genus{g:04d}" for g in genus],
            "species": [
                f"Genus{g:04d} epithet{s:05d}" for g, s in zip(genus, species, strict=True)
            ],
            "split": "test",
        }
    )


def draw_image(rng: np.random.Generator, species: int) -> tuple[np.ndarray, np.ndarray]:
    """A noisy background, a body in the species' colour and one trait spot per rank (the
    mask's bit i marks rank i's spot, as the demo stores it)."""
    rows, cols = np.mgrid[:IMAGE_SIZE, :IMAGE_SIZE] / IMAGE_SIZE
    image = rng.integers(90, 160, (IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.uint8)
    body = ((rows - 0.5) / 0.3) ** 2 + ((cols - 0.5) / 0.4) ** 2 < 1
    image[body] = np.random.default_rng(species).integers(0, 255, 3)
    mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    for bit, (y, x) in enumerate(rng.uniform(0.3, 0.7, (len(LEVELS), 2))):
        spot = (rows - y) ** 2 + (cols - x) ** 2 < 0.08**2
        image[spot] = (255, 255, 255) if bit == 0 else (20 * bit, 0, 0)
        mask[spot] |= 1 << bit
    return image, mask


def write_dataset(work: Path, classes: int, per_class: int, seed: int) -> pd.DataFrame:
    """Images, masks, prepared metadata and shards; returns the test rows by sample_id."""
    rng = np.random.default_rng(seed)
    table = taxon_table(classes, per_class)
    for index, (path, mask_path) in enumerate(zip(table["image"], table["mask"], strict=True)):
        image, mask = draw_image(rng, index // per_class)
        (work / "raw" / path).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(work / "raw" / path, compress_level=1)
        Image.fromarray(mask).save(work / "raw" / mask_path, compress_level=1)
    table.to_csv(work / "table.csv", index=False)
    spec = MetadataSpec(levels=LEVELS)
    source = read_source(work / "table.csv", work / "raw", spec)
    if problems := table_problems(source, spec):
        raise RuntimeError(f"synthetic table: {problems[:3]}")
    parquet = write_prepared(prepared_table(source.table, spec), work / "data", spec, SplitConfig())
    write_shards(
        parquet, work / "data" / "labels", work / "raw", work / "shards", LEVELS,
        ShardConfig(short_side=IMAGE_SIZE), workers=os.cpu_count() or 1,
    )  # fmt: skip
    return pd.read_parquet(parquet).sort_values("sample_id", kind="stable")


def random_search(targets: np.ndarray, classes: int, rng: np.random.Generator) -> TraitSearch:
    """A full elimination with random head orders and falling scores, cut by top-k."""
    n = len(targets)
    correct = rng.random(n) < 0.9
    wrong = (targets + rng.integers(1, max(classes, 2), n)) % classes
    predicted = np.where(correct, targets, wrong)
    base = np.where(correct, rng.uniform(0.5, 1.0, n), rng.uniform(0.0, 0.5, n))
    scores = base[:, None] * np.cumprod(rng.uniform(0.75, 1.0, (n, HEADS)), axis=1)
    trace = EliminationTrace(
        targets=targets.astype(np.int64),
        predicted=predicted.astype(np.int64),
        base_scores=base,
        order=np.where(correct[:, None], np.argsort(rng.random((n, HEADS)), axis=1), -1),
        scores=np.where(correct[:, None], scores, np.nan),
        step_predicted=np.where(
            correct[:, None], np.where(scores > 0.3, targets[:, None], wrong[:, None]), -1
        ),
    )
    return stop_search(trace, GreedyConfig())


def random_maps(n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, H, h, w) attention-like maps: a Gaussian bump per head, each map summing to 1."""
    rows, cols = np.mgrid[: GRID[0], : GRID[1]]
    centres = rng.uniform(0, GRID[0] - 1, (n, HEADS, 2, 1, 1))
    bumps = np.exp(-((rows - centres[:, :, 0]) ** 2 + (cols - centres[:, :, 1]) ** 2) / 3.0)
    maps = bumps + 0.05 * rng.random(bumps.shape)
    return (maps / maps.sum(axis=(2, 3), keepdims=True)).astype(np.float32)


def cross_class_files(
    out: Path, search: TraitSearch, maps: np.ndarray, ids: Sequence[str], labels: list[str],
    taxonomy: Path, rank: str,
) -> None:  # fmt: skip
    """Sibling pairs' files from the accumulator's arrays filled directly (no model): the
    image class's own mean maps, a shuffled class's as the prompt class's."""
    pairs = cross_class_pairs(labels, siblings=siblings_from_taxonomy(taxonomy, rank))
    accumulator = CrossClassAccumulator(pairs, HEADS, GRID[0] * GRID[1])
    flat = maps.reshape(len(maps), HEADS, -1).astype(np.float64)
    targets, trace = search.trace.targets, search.trace
    for row, (image_class, prompt_class, _) in enumerate(pairs):
        members = np.flatnonzero(targets == image_class)
        others = np.flatnonzero(targets == prompt_class)
        accumulator.own[row] = flat[members].sum(axis=0)
        accumulator.cross[row] = flat[others].mean(axis=0) * len(members)
        accumulator.n_images[row] = len(members)
        accumulator.probability_image_class[row] = trace.base_scores[members].sum()
        accumulator.probability_prompt_class[row] = 0.1 * len(members)
        correct = members[trace.searched[members]]
        if len(correct):
            best = correct[np.argmax(trace.base_scores[correct])]
            accumulator.example_image[row] = str(ids[best])
            accumulator.example_own[row] = flat[best]
            accumulator.example_cross[row] = flat[others[0]] if len(others) else flat[best]
            accumulator.example_probability_image_class[row] = trace.base_scores[best]
            accumulator.example_probability_prompt_class[row] = 0.1
    write_cross_class(out / "cross_class.tsv", out / "cross_class.npz", accumulator, labels, GRID)


def write_rank(work: Path, test: pd.DataFrame, rank: str, rng: np.random.Generator) -> None:
    """Every file of the traits and evaluation stages of one rank, and its metrics.tsv."""
    out = work / "results" / rank
    out.mkdir(parents=True, exist_ok=True)
    labels = read_label_names(work / "data" / "labels" / f"{rank}.tsv")
    index = {name: i for i, name in enumerate(labels)}
    targets = np.array(test[rank].map(index), dtype=np.int64)
    ids = test["sample_id"].tolist()
    search, maps = random_search(targets, len(labels), rng), random_maps(len(ids), rng)
    table = search_table(search, ids, labels)
    write_parquet(out / "traits.parquet", table)
    write_trait_maps(out / "trait_maps.npz", ids, search, maps, labels)
    summary, mean_maps = class_summary(table, maps, labels)
    write_trait_summary(
        out / "trait_summary.tsv", out / "trait_summary.npz", summary, mean_maps, labels
    )
    cross_class_files(out, search, maps, ids, labels, work / "data" / "taxonomy.nwk", rank)
    scores = torch.from_numpy(rng.normal(0.0, 1.0, (len(ids), len(labels))))
    scores[torch.arange(len(ids)), torch.from_numpy(search.trace.predicted)] += 10.0
    report, confusion = classification_report(scores, torch.from_numpy(targets), labels, 5)
    write_json(out / "eval.json", {**report, "rank": rank, "linear_probe_top1": report["top1"]})
    write_confusion_tsv(out / "confusion.tsv", confusion, labels)
    epochs = [
        {"epoch": e, "lr": 0.01, "train_loss": 2.0 / e, "train_top1": 1 - 1 / (e + 1),
         "val_loss": 2.2 / e, "val_top1": 1 - 1.2 / (e + 1), "seconds": 1.5}
        for e in range(1, 41)
    ]  # fmt: skip
    write_metrics(out / "metrics.tsv", epochs)


# ----------------------------------------------------------------------------- measurements


def in_fresh_process(code: str, *args: str) -> dict[str, Any]:
    """Run ``code`` in a new interpreter; its last stdout line (JSON), or the error."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "MPLBACKEND": "Agg"}
    env.setdefault("QT_QPA_PLATFORM", "offscreen")
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env
    )
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"]
        return {"error": lines[-1][:120]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def figure_jobs(work: Path) -> dict[str, dict[str, Any]]:
    """Each figure function with its keyword arguments (all but ``style``), as JSON specs."""
    finest, results, figures = LEVELS[-1], work / "results", work / "figures"
    per_rank = {
        "images": ["images", [str(work / "shards"), list(LEVELS)]],
        "rank": ["value", finest],
    }

    def rank_files(name: str) -> list[Any]:
        return ["paths", {rank: str(results / rank / name) for rank in LEVELS}]

    across = {
        "levels": ["value", list(LEVELS)],
        "traits_tables": rank_files("traits.parquet"),
        "trait_maps": rank_files("trait_maps.npz"),
        "taxonomy": ["path", str(work / "data" / "taxonomy.nwk")],
        "images": per_rank["images"],
    }
    traits = {
        "traits_table": ["path", str(results / finest / "traits.parquet")],
        "trait_maps": ["path", str(results / finest / "trait_maps.npz")],
        **per_rank,
    }

    def job(module: str, function: str, **kwargs: list[Any]) -> dict[str, Any]:
        return {"module": f"promptcam.figures.{module}", "function": function, "kwargs": kwargs}

    def out(name: str, kind: str = "out_dir") -> dict[str, list[Any]]:
        return {kind: ["path", str(figures / name)]}

    return {
        "trait panels": job(
            "panels", "draw_trait_panels", **traits, **out("panels"),
            settings=["settings", "PanelSettings"],
        ),
        "gallery": job(
            "gallery", "draw_gallery", **traits, **out("gallery"),
            settings=["settings", "GallerySettings"],
        ),
        "cross-class": job(
            "cross_class", "draw_cross_class", **per_rank, **out("cross_class", "out_stem"),
            cross_class_tsv=["path", str(results / finest / "cross_class.tsv")],
            cross_class_npz=["path", str(results / finest / "cross_class.npz")],
            settings=["settings", "CrossClassSettings"],
        ),
        "coarse to fine": job(
            "coarse_to_fine", "draw_coarse_to_fine", **across, **out("coarse_to_fine"),
            settings=["settings", "CoarseToFineSettings"],
        ),
        "tree overview": job(
            "tree", "draw_tree_overview", **across, **out("tree"),
            settings=["settings", "TreeSettings"],
        ),
        "confusion": job(
            "summaries", "draw_confusion", **out("confusion", "out_stem"),
            confusion=["path", str(results / finest / "confusion.tsv")], rank=per_rank["rank"],
        ),
        "accuracy": job(
            "summaries", "draw_accuracy", **out("accuracy", "out_stem"),
            eval_reports=rank_files("eval.json"),
        ),
        "training curves": job(
            "summaries", "draw_training_curves", **out("training_curves", "out_stem"),
            metrics=rank_files("metrics.tsv"),
        ),
    }  # fmt: skip


def drawn_rows(work: Path, per_class_images: int, max_classes: int) -> dict[str, list[int]]:
    """Rows of the finest rank's trait_maps.npz that the panels and the gallery read: each
    class's most confident correctly classified images (panels: 3 for each of up to 24
    classes; gallery: 1 for every class)."""
    table = pd.read_parquet(work / "results" / LEVELS[-1] / "traits.parquet")
    images = table[table["head"] == 0].reset_index(drop=True)
    images = images[images["correct"]].sort_values(
        ["target", "base_score"], ascending=[True, False]
    )
    ranked = images.groupby("target", sort=True)
    panels = ranked.head(per_class_images)
    panels = panels[panels["target"].isin(sorted(panels["target"].unique())[:max_classes])]
    return {"panels": sorted(panels.index.tolist()), "gallery": sorted(ranked.head(1).index)}


def measure(work: Path, classes: int, only: str) -> tuple[list[tuple], list[str]]:
    rows: list[tuple] = []
    if only in ("all", "figures"):
        for name, job in figure_jobs(work).items():
            result = in_fresh_process(FIGURE_CHILD, json.dumps(job))
            rows.append((classes, name, result))
    ratios = []
    if only in ("all", "maps"):
        maps = str(work / "results" / LEVELS[-1] / "trait_maps.npz")
        size = (work / "results" / LEVELS[-1] / "trait_maps.npz").stat().st_size / 2**20
        total = len(pd.read_parquet(work / "data" / "metadata.parquet"))
        for figure, wanted in drawn_rows(work, 3, 24).items():
            naive = in_fresh_process(MAPS_CHILD, maps, "naive", json.dumps(wanted))
            streamed = in_fresh_process(MAPS_CHILD, maps, "streamed", json.dumps(wanted))
            assert abs(naive["checksum"] - streamed["checksum"]) < 1e-3 * len(wanted)
            what = f"{figure} maps, {len(wanted)} of {total} rows"
            rows.append((classes, f"{what}: np.load (reference)", naive))
            rows.append((classes, f"{what}: read_maps", streamed))
            grown = [r["peak_mib"] - r["imports_mib"] for r in (naive, streamed)]
            ratios.append(
                f"C {classes}, {what} ({size:.1f} MiB npz): peak memory above imports, "
                f"np.load / read_maps: {grown[0]:.1f} / {grown[1]:.1f} MiB = "
                f"{grown[0] / max(grown[1], 0.1):.1f}x; time {naive['seconds']:.3f} / "
                f"{streamed['seconds']:.3f} s = {naive['seconds'] / streamed['seconds']:.2f}x"
            )
    return rows, ratios


def describe(work: Path, classes: int) -> str:
    """What the figures of one C read: images, classes per rank, pairs, file sizes."""
    results, parts = work / "results", []
    for rank in LEVELS:
        pairs = len(pd.read_csv(results / rank / "cross_class.tsv", sep="\t"))
        parts.append(f"{rank} {len(read_label_names(work / 'data' / 'labels' / f'{rank}.tsv'))}")
    maps_mib = (results / LEVELS[-1] / "trait_maps.npz").stat().st_size / 2**20
    shards_mib = sum(p.stat().st_size for p in (work / "shards").glob("*.tar")) / 2**20
    return (
        f"C {classes}: {len(pd.read_parquet(work / 'data' / 'metadata.parquet'))} test images; "
        f"classes {', '.join(parts)}; {pairs} {LEVELS[-1]} cross-class pairs; "
        f"{LEVELS[-1]} trait_maps.npz {maps_mib:.1f} MiB; shards {shards_mib:.1f} MiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", default="12,200,1000", help="comma-separated values of C")
    parser.add_argument("--test-images", type=int, default=3, help="test images per species")
    parser.add_argument("--out", type=Path, default=None, help="folder for the synthetic data")
    parser.add_argument("--keep", action="store_true", help="keep --out's data afterwards")
    parser.add_argument("--only", choices=("all", "figures", "maps"), default="all")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.getLogger("promptcam").setLevel(logging.ERROR)  # "no train images": by design
    root = args.out or Path(tempfile.mkdtemp(prefix="bench_figures_"))
    rows, ratios = [], []
    try:
        for classes in [int(c) for c in args.classes.split(",")]:
            work = root / f"C{classes}"
            shutil.rmtree(work, ignore_errors=True)
            test = write_dataset(work, classes, args.test_images, args.seed)
            rng = np.random.default_rng(args.seed + classes)
            for rank in LEVELS:
                write_rank(work, test, rank, rng)
            found, lines = measure(work, classes, args.only)
            rows += found
            ratios += [describe(work, classes), *lines]
    finally:
        if not (args.out and args.keep):
            shutil.rmtree(root, ignore_errors=True)
    print(
        f"{os.cpu_count()} CPU cores, {args.test_images} test images per species, {HEADS} heads, "
        f"{GRID[0]}x{GRID[1]} maps, {IMAGE_SIZE} px images; per-rank figures at the species rank"
    )
    print("\n| C | figure | seconds | peak RSS (MiB) | after imports (MiB) | files |")
    print("|---:|---|---:|---:|---:|---:|")
    for classes, name, result in rows:
        if "error" in result:
            print(f"| {classes} | {name} | failed: {result['error']} | | | |")
            continue
        files = result.get("files", "")
        print(
            f"| {classes} | {name} | {result['seconds']:.2f} | {result['peak_mib']:.0f} | "
            f"{result['imports_mib']:.0f} | {files} |"
        )
    print()
    for line in ratios:
        print(line)


if __name__ == "__main__":
    main()
