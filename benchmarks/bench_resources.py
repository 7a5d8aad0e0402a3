"""Per-rule memory and time, measured: fit promptcam.resources.MEASURED from benchmark files.

    python benchmarks/bench_resources.py        # runs the tiny pipeline twice (~5 min)
    python benchmarks/bench_resources.py --tiny DIR --tiny-sharded DIR2   # reuse finished runs

Reads every rule's ``benchmark:`` file (Snakemake's ``s`` and ``max_rss``) of two runs of the
whole pipeline: the default demo (``--demo``, default ``results/`` of this repository, read only)
and the tiny test pipeline (tests/configs/pipeline_tiny.yaml, run here with ``--directory`` in a
temporary folder unless ``--tiny`` names one), and for the part and gathering rules of the
test-split stages the tiny pipeline once more with ``test_shard_groups: 3`` (``--tiny-sharded``;
only its part and gathering jobs are read). Each job's size (images per split, classes,
epochs, fidelity images) comes from that run's label maps and config. Per rule, a least-squares
line through (units, seconds) and (units, MB), slope clamped at >= 0, raised to lie on or above
every point (the peak RSS: the largest measured, flat, since 80 against 720 images shows no
growth beyond noise); figure rules add the points of benchmarks/bench_figures.py (12 / 200 / 1,000
classes) and the data rules take the per-image cost of the ingestion and shard benchmarks at
256 px where that is higher (both in benchmarks/RESULTS.md). Prints the MEASURED table to paste
into promptcam/resources.py and a Markdown table for RESULTS.md.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

from promptcam.config import rank_train_settings, validate_config
from promptcam.resources import (
    UNITS,
    VIT_B_MAPS_MB_PER_IMAGE,
    JobSize,
    RuleCost,
    gathering_rule,
    job_resources,
    read_split_counts,
)

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"
TINY_CONFIG = REPO / "tests" / "configs" / "pipeline_tiny.yaml"

# benchmark file stem prefix -> rule, for per-rank files "<prefix><rank>.tsv"
PER_RANK = {
    "train/": "train",
    "evaluate/": "evaluate",
    "evaluate/linear_probe_": "linear_probe",
    "traits/traits_": "traits",
    "traits/heads_": "heads",
    "traits/head_information_": "head_information",
    "traits/localization_": "localization",
    "traits/cam_maps_": "cam_maps",
    "traits/fidelity_": "fidelity",
    "figures/trait_panels_": "trait_panels",
    "figures/trait_gallery_": "trait_gallery",
    "figures/cross_class_": "cross_class_figure",
}
ACROSS = {
    "data/generate_demo": "generate_demo",
    "data/prepare_metadata": "prepare_metadata",
    "data/write_shards": "write_shards",
    "figures/coarse_to_fine": "coarse_to_fine",
    "figures/tree_overview": "tree_overview",
}
# benchmarks/RESULTS.md, "Figures: time and peak memory": (classes, seconds, peak MiB).
FIGURE_POINTS = {
    "trait_panels": [(12, 27.45, 340), (200, 52.97, 350), (1000, 56.75, 371)],
    "trait_gallery": [(12, 1.73, 312), (200, 29.14, 362), (1000, 159.05, 407)],
    "cross_class_figure": [(12, 3.11, 322), (200, 1.25, 290), (1000, 1.66, 348)],
    "coarse_to_fine": [(12, 9.70, 331), (200, 28.96, 350), (1000, 28.59, 394)],
    "tree_overview": [(12, 1.96, 310), (200, 4.51, 330), (1000, 6.98, 375)],
    "confusion_figure": [(12, 0.94, 285), (200, 2.44, 367), (1000, 11.45, 436)],
    "accuracy_figure": [(12, 0.30, 252), (200, 0.34, 252), (1000, 0.28, 252)],
    "training_curves_figure": [(12, 0.73, 259), (200, 0.91, 259), (1000, 0.67, 259)],
}
# Summary figures without a benchmark of their own: the figure stage's bound (RESULTS.md, "Demo
# pipeline": 19 figure jobs in 53 s, every job's process under 440 MiB).
FIGURE_STAGE_BOUND = (53.0, 440.0)
UNBENCHMARKED_FIGURES = ("fidelity_curves_figure", "counterfactual_figure", "localization_figure")
# Per-image costs at 256 px from RESULTS.md, above the demo's 96-px ones:
# prepare_metadata: image check 290 img/s per core + the 1M-row table path (24.8 s, 866 MB peak
# against 227 MB at 720 rows); write_shards: 168 img/s with one worker (bench_shards, run 1).
AT_SCALE = {
    "prepare_metadata": (
        1 / 290 + 24.8 / 1e6,
        (866 - 227) / 1e6,
        "image check 290 img/s/core, 1M-row table",
    ),
    "write_shards": (1 / 168, 0.0, "bench_shards: 168 img/s, 1 worker, 256 px"),
}
# The test-split stages' benchmark prefixes; in the sharded run "<prefix><rank>" is the
# gathering job and "<prefix><rank>_<i>of<n>" a part.
SHARDED_PREFIX = {
    "evaluate": "evaluate/",
    "traits": "traits/traits_",
    "cam_maps": "traits/cam_maps_",
    "fidelity": "traits/fidelity_",
}
SHARD_GROUPS = 3
# Demo backbone pre-training (not part of rule all): RESULTS.md "Demo pipeline", 5,364 s of one
# CPU thread; its memory is not measured: training's demo peak stands in.
PRETRAIN = (5364.0, "RESULTS.md: 5,364 s (1 CPU thread); RSS: train's demo peak (not measured)")


def merged_config(*files: Path) -> dict:
    config: dict = {}
    for path in files:
        overlay = yaml.safe_load(path.read_text()) or {}
        config = deep_merge(config, overlay)
    validate_config(config, SCHEMA)
    return config


def deep_merge(base: dict, overlay: dict) -> dict:
    out = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def read_benchmark(path: Path) -> tuple[float, float]:
    with path.open(newline="") as handle:
        row = next(csv.DictReader(handle, delimiter="\t"))
    return float(row["s"]), float(row["max_rss"])


def run_sizes(workdir: Path, config: dict) -> dict[str, JobSize]:
    """JobSize per rank of a finished run (and "" for the whole dataset / finest rank)."""
    levels = list(config["levels"])
    sizes = {}
    fidelity_max = config["traits"]["fidelity"]["max_images"]
    for rank in levels:
        counts = read_split_counts(workdir / "results" / "data" / "labels" / f"{rank}.tsv")
        assert counts is not None, f"{workdir}: no label map for {rank}"
        classes, train, val, test = counts
        epochs = rank_train_settings(config["train"], rank, levels)["epochs"]
        sizes[rank] = JobSize(
            images=train + val + test, train=train, val=val, test=test, classes=classes,
            epochs=epochs, fidelity_images=min(test, fidelity_max or test),
            test_groups=config["test_shard_groups"],
        )  # fmt: skip
    sizes[""] = sizes[levels[-1]]
    return sizes


def benchmark_rule(stem: str, ranks, sharded: bool) -> tuple[str | None, str]:
    """(rule, rank) of a benchmark file stem; in a sharded run only the part and gathering
    jobs of the test-split stages (the rest were measured in the unsharded runs)."""
    if sharded:
        for stage, prefix in SHARDED_PREFIX.items():
            rest = stem[len(prefix) :] if stem.startswith(prefix) else ""
            for rank in ranks:
                if rest == rank:
                    return gathering_rule(stage), rank
                if re.fullmatch(rf"{re.escape(rank)}_\d+of\d+", rest):
                    return f"{stage}_part", rank
        return None, ""
    rule, rank = ACROSS.get(stem), ""
    for prefix, name in PER_RANK.items():
        if stem.startswith(prefix) and stem[len(prefix) :] in ranks:
            rule, rank = name, stem[len(prefix) :]
    return rule, rank


def run_points(
    workdir: Path, config: dict, label: str, sharded: bool = False
) -> dict[str, list[tuple]]:
    sizes = run_sizes(workdir, config)
    ranks = [rank for rank in sizes if rank]
    root = workdir / "results" / "benchmarks"
    points: dict[str, list[tuple]] = {}
    for path in sorted(root.rglob("*.tsv")):
        stem = str(path.relative_to(root).with_suffix(""))
        rule, rank = benchmark_rule(stem, ranks, sharded)
        if rule is None:
            continue
        seconds, rss = read_benchmark(path)
        units = UNITS[rule][1](sizes[rank])
        points.setdefault(rule, []).append((units, seconds, rss, f"{label} {rank}".strip()))
    return points


def envelope(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """(intercept, slope): least-squares slope (>= 0), intercept raised so every point lies on
    or below the line."""
    x, y = np.asarray(xs, float), np.asarray(ys, float)
    slope = 0.0
    if np.ptp(x) > 0:
        slope = max(0.0, float(np.polyfit(x, y, 1)[0]))
    return max(0.0, float(np.max(y - slope * x))), slope


def tiny_run(path: str | None, *config: str) -> Path:
    """A finished tiny-pipeline run: ``path``, or a new one with ``--config`` ``config``."""
    if path:
        return Path(path)
    work = Path(tempfile.mkdtemp(prefix="bench_resources_"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "QT_QPA_PLATFORM": "offscreen", "MPLBACKEND": "Agg"}
    cmd = [sys.executable, "-m", "snakemake", "--cores", "2", "--snakefile",
           str(REPO / "Snakefile"), "--directory", str(work), "--configfile", str(TINY_CONFIG)]  # fmt: skip
    if config:
        cmd += ["--config", *config]
    print(f"running the tiny pipeline {' '.join(config)} in {work} ...", file=sys.stderr)
    subprocess.run(cmd, cwd=work, env=env, check=True, capture_output=True)
    return work


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", default=str(REPO), help="a finished default-demo run")
    parser.add_argument("--tiny", default=None, help="a finished tiny-pipeline run")
    parser.add_argument(
        "--tiny-sharded",
        default=None,
        help=f"a finished tiny-pipeline run with test_shard_groups={SHARD_GROUPS}",
    )
    args = parser.parse_args()

    demo_dir, tiny_dir = Path(args.demo), tiny_run(args.tiny)
    sharded_dir = tiny_run(args.tiny_sharded, f"test_shard_groups={SHARD_GROUPS}")
    demo_config = merged_config(REPO / "config" / "config.yaml")
    tiny_config = merged_config(REPO / "config" / "config.yaml", TINY_CONFIG)
    sharded_config = {**tiny_config, "test_shard_groups": SHARD_GROUPS}
    points = run_points(demo_dir, demo_config, "demo")
    for rule, more in [
        *run_points(tiny_dir, tiny_config, "tiny").items(),
        *run_points(sharded_dir, sharded_config, f"tiny, {SHARD_GROUPS} groups", True).items(),
    ]:
        points.setdefault(rule, []).extend(more)
    for rule, more in FIGURE_POINTS.items():
        points.setdefault(rule, []).extend((c, s, m, f"C={c}") for c, s, m in more)

    costs: dict[str, RuleCost] = {}
    for rule in UNITS:
        if rule == "pretrain_backbone":
            rss = max(p[2] for p in points["train"])
            costs[rule] = RuleCost(PRETRAIN[0], 0.0, round(rss, 1), 0.0, PRETRAIN[1])
            continue
        if rule in UNBENCHMARKED_FIGURES:
            seconds, rss = FIGURE_STAGE_BOUND
            costs[rule] = RuleCost(seconds, 0.0, rss, 0.0, "figure stage bound (RESULTS.md)")
            continue
        found = points[rule]
        xs = [p[0] for p in found]
        fixed, slope = envelope(xs, [p[1] for p in found])
        in_runs = any(not where.startswith("C=") for *_, where in found)
        sources = ["demo + tiny pipeline benchmarks"] if in_runs else []
        sharded_label = f"tiny, {SHARD_GROUPS} groups"
        if all(where.startswith(sharded_label) for *_, where in found):
            sources = [f"tiny pipeline, {SHARD_GROUPS} groups"]
        if rule in FIGURE_POINTS:
            rss, mb_slope = envelope(xs, [p[2] for p in found])
            sources.append("bench_figures (C = 12, 200, 1,000)")
        else:
            # 80 against 720 images shows no growth of the peak beyond the noise of thread
            # counts: the largest peak, flat (the streaming rules), except where measured at
            # scale (AT_SCALE) or computed (the trait maps).
            rss, mb_slope = max(p[2] for p in found), 0.0
        source = " + ".join(sources)
        if rule in ("traits", "traits_part", gathering_rule("traits")):
            mb_slope = VIT_B_MAPS_MB_PER_IMAGE
            source += "; MB per image: ViT-B/16 trait maps (computed)"
        if rule in AT_SCALE and AT_SCALE[rule][0] > slope:
            slope, mb_slope = AT_SCALE[rule][0], max(mb_slope, AT_SCALE[rule][1])
            source = f"fixed: demo + tiny; per image: {AT_SCALE[rule][2]}"
        costs[rule] = RuleCost(
            round(fixed, 3), float(f"{slope:.4g}"), round(rss, 1), float(f"{mb_slope:.4g}"), source
        )

    # Parts and gathers were measured at one size (the tiny run's groups), which fits no slope:
    # a part does its stage's work per image, and a gather is given the same (it over-asks).
    for stage in SHARDED_PREFIX:
        whole = costs[stage]
        for rule in (f"{stage}_part", gathering_rule(stage)):
            own = costs[rule]
            if whole.s_per_unit > own.s_per_unit:
                costs[rule] = RuleCost(
                    own.fixed_s, whole.s_per_unit, own.rss_mb, own.mb_per_unit,
                    f"tiny pipeline, {SHARD_GROUPS} groups; per image: the {stage} rule's",
                )  # fmt: skip

    print("MEASURED: dict[str, RuleCost] = {")
    for rule, cost in costs.items():
        print(f"    {rule!r}: RuleCost({cost.fixed_s}, {cost.s_per_unit}, {cost.rss_mb}, "
              f"{cost.mb_per_unit}, {cost.source!r}),")  # fmt: skip
    print("}\n")

    demo_sizes = run_sizes(demo_dir, demo_config)
    print("| rule | grows with | measured: s, peak RSS MB (where) | fitted: s | fitted: MB "
          "| demo request: MB, min |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for rule, cost in costs.items():
        measured = "; ".join(f"{s:.1f}, {m:.0f} ({w})" for _, s, m, w in points.get(rule, []))
        measured = measured or cost.source
        size = demo_sizes["species" if "species" in demo_sizes else ""]
        request = job_resources(rule, size, costs=costs)
        fitted_s = f"{cost.fixed_s:.1f} + {cost.s_per_unit:.3g} x u"
        fitted_mb = f"{cost.rss_mb:.0f} + {cost.mb_per_unit:.3g} x u"
        print(f"| {rule} | {UNITS[rule][0]} | {measured} | {fitted_s} | {fitted_mb} | "
              f"{request.mem_mb}, {request.runtime} |")  # fmt: skip


if __name__ == "__main__":
    main()
