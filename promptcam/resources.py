"""What each workflow rule asks a cluster for: memory and wall time from what it was measured
to need, scaled to the job's data and grown with each retry. Torch-free: the workflow's
resource callables (``workflow/rules/common.smk``) call :func:`job_resources` when a job is
scheduled, once its inputs (the label maps) exist.

Each rule's cost is a line fitted to its own ``benchmark:`` files (Snakemake's ``s`` and
``max_rss``) from two runs of the whole pipeline on the 2-core development machine, no GPU: the
default demo (720 images) and the tiny test pipeline (80 images); the fitted line is raised to
lie on or above every measured point. ``python benchmarks/bench_resources.py`` reruns the tiny
pipeline, reads both runs and prints :data:`MEASURED` (benchmarks/RESULTS.md, "Rule resources").
Where a larger-scale benchmark exists, its per-unit cost replaces the demo's (the ``source``).

The request is ``attempt x`` the cost with headroom (:data:`TIME_HEADROOM`,
:data:`MEMORY_HEADROOM`), rounded up, above a floor and, for time, below a cap: a job that ran
out of memory or time is resubmitted (the profile's ``retries``) with twice, then three times,
the first request. Runtimes measured on a CPU with the demo's small backbone over-estimate a GPU
node with ViT-B/16 for training at up to about 1,000 classes and under-estimate the reference
layout at many classes (docs/scaling.md); the profile's ``set-resources`` overrides any rule.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

# Multipliers on the measured cost: time was measured on a 2-core machine shared with other
# jobs (load average 3-6), memory as the peak RSS of the job's whole process tree.
TIME_HEADROOM = 3.0
MEMORY_HEADROOM = 2.0
# Floors: a cluster job shorter or smaller than this gains nothing and queues the same.
MIN_RUNTIME_MIN = 10
MIN_MEM_MB = 1024
# Cap: most sites' partitions allow a day; longer jobs pend for ever (PartitionTimeLimit).
# Training checkpoints and resumes (results/{rank}/last.pt), so a retry carries on from there.
MAX_RUNTIME_MIN = 24 * 60
MEM_STEP_MB = 256


@dataclass(frozen=True)
class JobSize:
    """What a job's work grows with: images of each split (of the whole dataset, or of one
    rank's label map), classes of the rank (the finest for rules across ranks), training
    epochs, the images fidelity scores and the groups the test split is shared among."""

    images: int = 0
    train: int = 0
    val: int = 0
    test: int = 0
    classes: int = 0
    epochs: int = 0
    fidelity_images: int = 0
    # Shard groups the test split is cut into (config test_shard_groups; 1: one job).
    test_groups: int = 1


@dataclass(frozen=True)
class RuleCost:
    """One rule's measured cost: ``fixed_s + s_per_unit * units`` seconds and
    ``rss_mb + mb_per_unit * units`` MB of peak RSS, with ``units`` from :data:`UNITS`."""

    fixed_s: float
    s_per_unit: float
    rss_mb: float
    mb_per_unit: float = 0.0
    source: str = "demo + tiny pipeline benchmarks"


def _group_images(size: JobSize) -> int:
    """Test images of one shard group's part job: an even share (groups cut whole shards, so
    one may hold more; the time headroom covers up to twice the share)."""
    return math.ceil(size.test / max(1, size.test_groups))


# The test-split stages that test_shard_groups > 1 cuts into part jobs ("<stage>_part", one
# GPU each) and one job that only gathers the parts, named by gathering_rule: it runs no model,
# so it asks for no GPU and the profile sends it to no GPU partition.
SHARDED_STAGES = ("traits", "evaluate", "cam_maps", "fidelity")


def gathering_rule(stage: str) -> str:
    """The name a sharded stage's rule takes when it only gathers parts."""
    return f"{stage}_gather"


def stage_of(rule: str) -> str:
    """The test-split stage of a rule, its part rule or its gathering rule."""
    return rule.removesuffix("_part").removesuffix("_gather")


# What each rule's work grows with (the unit of RuleCost.s_per_unit), in words and as a number.
UNITS: dict[str, tuple[str, Callable[[JobSize], float]]] = {
    "generate_demo": ("images", lambda s: s.images),
    "prepare_metadata": ("images", lambda s: s.images),
    "write_shards": ("images", lambda s: s.images),
    "pretrain_backbone": ("-", lambda s: 0),
    "train": ("(train + val images) x epochs", lambda s: (s.train + s.val) * s.epochs),
    "linear_probe": ("train + val images", lambda s: s.train + s.val),
    "evaluate": ("test images", lambda s: s.test),
    "evaluate_part": ("test images of its group", _group_images),
    "evaluate_gather": ("test images", lambda s: s.test),
    "traits": ("test images", lambda s: s.test),
    "traits_part": ("test images of its group", _group_images),
    "traits_gather": ("test images", lambda s: s.test),
    "heads": ("test images", lambda s: s.test),
    "head_information": ("test images", lambda s: s.test),
    "localization": ("train + test images", lambda s: s.train + s.test),
    "cam_maps": ("test images", lambda s: s.test),
    "cam_maps_part": ("test images of its group", _group_images),
    "cam_maps_gather": ("test images", lambda s: s.test),
    "fidelity": ("images scored", lambda s: s.fidelity_images),
    # The images scored are the split's first, in shard order: a group may hold all of them.
    "fidelity_part": (
        "images scored in its group (at most)",
        lambda s: min(s.fidelity_images, _group_images(s)),
    ),
    "fidelity_gather": ("images scored", lambda s: s.fidelity_images),
    "trait_panels": ("classes", lambda s: s.classes),
    "trait_gallery": ("classes", lambda s: s.classes),
    "cross_class_figure": ("classes", lambda s: s.classes),
    "confusion_figure": ("classes", lambda s: s.classes),
    "coarse_to_fine": ("finest classes", lambda s: s.classes),
    "tree_overview": ("finest classes", lambda s: s.classes),
    "accuracy_figure": ("-", lambda s: 0),
    "training_curves_figure": ("-", lambda s: 0),
    "fidelity_curves_figure": ("-", lambda s: 0),
    "counterfactual_figure": ("-", lambda s: 0),
    "localization_figure": ("-", lambda s: 0),
}

# Rules whose code picks a device (a model forward): the only ones that ask for a GPU.
GPU_RULES = frozenset(
    {
        "pretrain_backbone",
        "train",
        "linear_probe",
        "evaluate",
        "evaluate_part",
        "traits",
        "traits_part",
        "head_information",
        "heads",
        "cam_maps",
        "cam_maps_part",
        "fidelity",
        "fidelity_part",
    }
)

# Printed by benchmarks/bench_resources.py (2026-12-07), from the default demo's benchmark
# files (a from-scratch run of 2026-12-07, 51 jobs) and two tiny-pipeline runs, the second with
# test_shard_groups 3 (the part and gathering rules); see benchmarks/RESULTS.md.
MEASURED: dict[str, RuleCost] = {
    "generate_demo": RuleCost(0.262, 0.002344, 148.4, 0.0, "demo + tiny pipeline benchmarks"),
    "prepare_metadata": RuleCost(
        1.005,
        0.003473,
        458.7,
        0.000639,
        "fixed: demo + tiny; per image: image check 290 img/s/core, 1M-row table",
    ),
    "write_shards": RuleCost(
        0.873,
        0.005952,
        495.8,
        0.0,
        "fixed: demo + tiny; per image: bench_shards: 168 img/s, 1 worker, 256 px",
    ),
    "pretrain_backbone": RuleCost(
        5364.0,
        0.0,
        1506.6,
        0.0,
        "RESULTS.md: 5,364 s (1 CPU thread); RSS: train's demo peak (not measured)",
    ),
    "train": RuleCost(8.146, 0.002469, 1506.6, 0.0, "demo + tiny pipeline benchmarks"),
    "linear_probe": RuleCost(5.679, 0.003352, 1537.4, 0.0, "demo + tiny pipeline benchmarks"),
    "evaluate": RuleCost(4.633, 0.005435, 1493.3, 0.0, "demo + tiny pipeline benchmarks"),
    "evaluate_part": RuleCost(
        5.83, 0.005435, 915.2, 0.0, "tiny pipeline, 3 groups; per image: the evaluate rule's"
    ),
    "evaluate_gather": RuleCost(
        5.69, 0.005435, 891.8, 0.0, "tiny pipeline, 3 groups; per image: the evaluate rule's"
    ),
    "traits": RuleCost(
        5.417,
        0.009746,
        929.1,
        0.008972,
        "demo + tiny pipeline benchmarks; MB per image: ViT-B/16 trait maps (computed)",
    ),
    "traits_part": RuleCost(
        5.23, 0.009746, 904.2, 0.008972, "tiny pipeline, 3 groups; per image: the traits rule's"
    ),
    "traits_gather": RuleCost(
        5.17, 0.009746, 873.2, 0.008972, "tiny pipeline, 3 groups; per image: the traits rule's"
    ),
    "heads": RuleCost(11.87, 0.06185, 1001.1, 0.0, "demo + tiny pipeline benchmarks"),
    "head_information": RuleCost(9.316, 0.04736, 1053.7, 0.0, "demo + tiny pipeline benchmarks"),
    "localization": RuleCost(5.656, 0.003291, 910.2, 0.0, "demo + tiny pipeline benchmarks"),
    "cam_maps": RuleCost(4.745, 0.004058, 1177.0, 0.0, "demo + tiny pipeline benchmarks"),
    "cam_maps_part": RuleCost(
        5.65, 0.004058, 984.5, 0.0, "tiny pipeline, 3 groups; per image: the cam_maps rule's"
    ),
    "cam_maps_gather": RuleCost(
        4.5, 0.004058, 824.5, 0.0, "tiny pipeline, 3 groups; per image: the cam_maps rule's"
    ),
    "fidelity": RuleCost(6.701, 1.516, 1128.2, 0.0, "demo + tiny pipeline benchmarks"),
    "fidelity_part": RuleCost(
        6.88, 1.516, 934.1, 0.0, "tiny pipeline, 3 groups; per image: the fidelity rule's"
    ),
    "fidelity_gather": RuleCost(
        4.71, 1.516, 831.8, 0.0, "tiny pipeline, 3 groups; per image: the fidelity rule's"
    ),
    "trait_panels": RuleCost(
        43.703,
        0.04633,
        340.9,
        0.0453,
        "demo + tiny pipeline benchmarks + bench_figures (C = 12, 200, 1,000)",
    ),
    "trait_gallery": RuleCost(
        2.116,
        0.1572,
        338.6,
        0.1169,
        "demo + tiny pipeline benchmarks + bench_figures (C = 12, 200, 1,000)",
    ),
    "cross_class_figure": RuleCost(
        5.69,
        0.0,
        354.7,
        0.01215,
        "demo + tiny pipeline benchmarks + bench_figures (C = 12, 200, 1,000)",
    ),
    "confusion_figure": RuleCost(
        0.81, 0.01082, 340.4, 0.1331, "bench_figures (C = 12, 200, 1,000)"
    ),
    "coarse_to_fine": RuleCost(
        25.14,
        0.0191,
        336.4,
        0.06811,
        "demo + tiny pipeline benchmarks + bench_figures (C = 12, 200, 1,000)",
    ),
    "tree_overview": RuleCost(
        4.281,
        0.004065,
        316.3,
        0.06874,
        "demo + tiny pipeline benchmarks + bench_figures (C = 12, 200, 1,000)",
    ),
    "accuracy_figure": RuleCost(0.34, 0.0, 252.0, 0.0, "bench_figures (C = 12, 200, 1,000)"),
    "training_curves_figure": RuleCost(0.91, 0.0, 259.0, 0.0, "bench_figures (C = 12, 200, 1,000)"),
    "fidelity_curves_figure": RuleCost(53.0, 0.0, 440.0, 0.0, "figure stage bound (RESULTS.md)"),
    "counterfactual_figure": RuleCost(53.0, 0.0, 440.0, 0.0, "figure stage bound (RESULTS.md)"),
    "localization_figure": RuleCost(53.0, 0.0, 440.0, 0.0, "figure stage bound (RESULTS.md)"),
}


# Maps a trait search keeps per test image, ViT-B/16 at 224 px: 12 heads x 14 x 14 float32
# (computed, not measured: the demo's maps are too small to show in the peak RSS).
VIT_B_MAPS_MB_PER_IMAGE = 12 * 14 * 14 * 4 / 2**20


@dataclass(frozen=True)
class Request:
    """A job's cluster request: ``mem_mb`` and ``runtime`` (minutes), Snakemake's names."""

    mem_mb: int
    runtime: int
    units: float = field(default=0.0, compare=False)


# What a rule missing from MEASURED asks for (times the attempt): the profile's old defaults.
UNMEASURED = Request(mem_mb=4096, runtime=60)


def _round_up(value: float, step: int) -> int:
    return int(math.ceil(value / step) * step)


def job_resources(
    rule: str, size: JobSize, attempt: int = 1, costs: Mapping[str, RuleCost] | None = None
) -> Request:
    """The memory (MB) and time (minutes) to ask for one job of ``rule`` of this ``size`` on
    its ``attempt``-th try (1 first): the measured cost with headroom, times the attempt."""
    costs = MEASURED if costs is None else costs
    if attempt < 1:
        raise ValueError(f"attempt counts from 1, got {attempt}")
    if rule not in costs:
        # A rule nobody measured yet (tests/test_slurm_profile.py fails on it): the old flat
        # request, so that the workflow still runs.
        return Request(UNMEASURED.mem_mb * attempt, UNMEASURED.runtime * attempt)
    cost = costs[rule]
    units = float(UNITS[rule][1](size))
    seconds = cost.fixed_s + cost.s_per_unit * units
    runtime = max(MIN_RUNTIME_MIN, math.ceil(TIME_HEADROOM * seconds / 60)) * attempt
    memory = max(MIN_MEM_MB, MEMORY_HEADROOM * (cost.rss_mb + cost.mb_per_unit * units))
    return Request(
        mem_mb=_round_up(memory * attempt, MEM_STEP_MB),
        runtime=min(MAX_RUNTIME_MIN, runtime),
        units=units,
    )


def read_split_counts(label_map: str | Path) -> tuple[int, int, int, int] | None:
    """(classes, train, val, test) from a rank's label map (results/data/labels/{rank}.tsv,
    columns n_train, n_val, n_test), or None while it does not exist yet."""
    path = Path(label_map)
    if not path.is_file():
        return None
    classes = train = val = test = 0
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle, delimiter="\t"):
            classes += 1
            train += int(row["n_train"])
            val += int(row["n_val"])
            test += int(row["n_test"])
    return classes, train, val, test


# Bytes per row of a metadata table: 72 in a CSV (benchmarks/bench_ingest.py: 1,000,000 rows,
# 72 MB); compressed tables (parquet, .zst, .gz) assumed 4x smaller.
TABLE_BYTES_PER_ROW = {"text": 72, "compressed": 18}


def table_rows_estimate(path: str | Path) -> int:
    """About how many rows a metadata table holds, from its size (0 if it is missing)."""
    path = Path(path)
    if not path.is_file():
        return 0
    compressed = path.suffix.lower() in {".parquet", ".pq", ".zst", ".gz", ".bz2", ".xz"}
    per_row = TABLE_BYTES_PER_ROW["compressed" if compressed else "text"]
    return math.ceil(path.stat().st_size / per_row)
