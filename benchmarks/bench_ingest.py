"""Ingestion at scale: the table path of a million rows, image checking, the DAG's size.

    python benchmarks/bench_ingest.py                       # 1,000,000 rows, 2,400 images
    python benchmarks/bench_ingest.py --rows 100000 --images 600 --skip-dag

Three measurements, one run each, each against a reference, ratios printed:

1. Table path (no image files): read + clean + check the table, split it, write the
   parquet, label maps, taxonomy and split summary (``read_source``, ``table_problems``,
   ``prepared_table``, ``write_prepared``: everything ``prepare_metadata`` does but decoding
   images). Each runs in a fresh process, which reports its time and peak RSS
   (``resource.getrusage``). Reference: a bare ``pandas.read_csv`` of the same file.
2. Image checking: ``check_files`` (open, verify, decode at 1/8 scale for JPEG, convert) on
   real demo images (PNG and JPEG copies), with 1 and N worker processes. Reference: the
   previous check, ``Image.open`` + ``verify()`` (which a truncated JPEG passes), in threads.
3. DAG: ``snakemake -n`` (default target: every rank's results) for a config whose table has
   ``--rows`` rows, against the default demo config, each in a fresh working directory; the
   job count follows the ranks and shards' rules, not the images.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from PIL import Image

from promptcam.data.file_checks import check_files
from promptcam.data.images import ImageSettings
from promptcam.data.problems import Locator
from promptcam.demo.organisms import DemoConfig, generate_demo_dataset

REPO = Path(__file__).resolve().parents[1]

TABLE_PATH = """
import json, resource, sys, time
from pathlib import Path
start = time.perf_counter()
from promptcam.data.metadata import (MetadataSpec, prepared_table, read_source,
    table_problems, write_prepared)
from promptcam.data.splits import SplitConfig
spec = MetadataSpec()
source = read_source(sys.argv[1], sys.argv[2], spec)
problems = table_problems(source, spec)
assert not problems, problems[:3]
write_prepared(prepared_table(source.table, spec), Path(sys.argv[3]), spec, SplitConfig())
print(json.dumps({"seconds": time.perf_counter() - start,
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

BARE_READ = """
import json, resource, sys, time
start = time.perf_counter()
import pandas as pd
table = pd.read_csv(sys.argv[1], dtype=str, keep_default_na=False)
print(json.dumps({"seconds": time.perf_counter() - start,
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def million_table(path: Path, rows: int, species: int, seed: int = 0) -> Path:
    """A table like a big real one: 10 species per genus, 20 genera per family."""
    rng = np.random.default_rng(seed)
    taxon = rng.integers(0, species, rows)
    genus, family = taxon // 10, taxon // 200
    frame = pd.DataFrame(
        {
            "image": [
                f"images/{f:03d}/{s:05d}/{i:07d}.jpg"
                for i, (f, s) in enumerate(zip(family, taxon, strict=True))
            ],
            "family": [f"Family{f:03d}idae" for f in family],
            "genus": [f"Genus{g:04d}" for g in genus],
            "species": [f"Genus{g:04d} epithet{s:05d}" for g, s in zip(genus, taxon, strict=True)],
        }
    )
    frame.to_csv(path, index=False)
    return path


def in_fresh_process(code: str, *args: str) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, check=True
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table_path(work: Path, rows: int, species: int) -> None:
    table = million_table(work / "table.csv", rows, species)
    size_mb = table.stat().st_size / 2**20
    bare = in_fresh_process(BARE_READ, str(table))
    ours = in_fresh_process(TABLE_PATH, str(table), str(work / "no_images"), str(work / "out"))
    print(f"\n## 1. Table path: {rows:,} rows, {species:,} species, {size_mb:.0f} MB CSV\n")
    print("| what | seconds | rows/s | peak RSS (MB) |")
    print("|---|---:|---:|---:|")
    for name, result in (("bare pandas.read_csv (reference)", bare), ("table path", ours)):
        rate = rows / result["seconds"]
        print(f"| {name} | {result['seconds']:.1f} | {rate:,.0f} | {result['peak_mb']:.0f} |")
    print(f"\ntable path / bare read: {ours['seconds'] / bare['seconds']:.1f}x the time")


def verify_only(path: str) -> bool:
    """The previous validation's image check (header and checksums, no decoding)."""
    try:
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            image.getexif()
    except Exception:
        return False
    return True


def image_checking(work: Path, images: int, workers: int) -> None:
    per_species = max(1, images // 24)
    demo = DemoConfig(images_per_species=per_species, image_size=256)
    table = pd.read_csv(generate_demo_dataset(work / "demo", demo, workers=workers))
    for png in table["image"]:  # a JPEG copy of each: real collections are mostly JPEG
        with Image.open(work / "demo" / png) as image:
            image.convert("RGB").save(work / "demo" / png.replace(".png", ".jpg"), quality=90)
    paths = pd.concat([table["image"], table["image"].str.replace(".png", ".jpg")])
    frame = pd.DataFrame({"image": paths.to_numpy()})
    files = [str(work / "demo" / p) for p in frame["image"]]
    root = work / "demo"
    print(f"\n## 2. Image checking: {len(frame):,} demo images of 256 px (PNG + JPEG q90)\n")
    print("| check | workers | seconds | images/s | vs reference |")
    print("|---|---:|---:|---:|---:|")
    results = []
    for count in sorted({1, workers}):
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=count) as pool:
            assert all(pool.map(verify_only, files))
        results.append(("open + verify (previous, reference)", count, time.perf_counter() - start))
        start = time.perf_counter()
        found = check_files(frame, {"image": "image"}, root, ImageSettings(), Locator(), count)
        assert not found.problems
        results.append(("open + verify + decode + convert", count, time.perf_counter() - start))
    for index, (name, count, seconds) in enumerate(results):
        reference = results[index - index % 2][2]
        print(
            f"| {name} | {count} | {seconds:.2f} | {len(frame) / seconds:,.0f} | "
            f"{seconds / reference:.2f}x |"
        )


def dry_run(work: Path, config: dict | None) -> tuple[float, int]:
    work.mkdir(parents=True, exist_ok=True)
    shutil.copytree(REPO / "config", work / "config", dirs_exist_ok=True)
    command = [sys.executable, "-m", "snakemake", "-n", "--cores", "2", "--snakefile",
               str(REPO / "Snakefile"), "--directory", str(work)]  # fmt: skip
    if config is not None:
        (work / "bench.yaml").write_text(yaml.safe_dump(config))
        command += ["--configfile", str(work / "bench.yaml")]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    seconds = time.perf_counter() - start
    return seconds, int(re.search(r"^total\s+(\d+)", proc.stdout, re.MULTILINE).group(1))


def dag(work: Path, rows: int, species: int) -> None:
    table = work / "table.csv"
    if not table.exists():
        million_table(table, rows, species)
    (work / "big" / "images").mkdir(parents=True)
    shutil.copy(table, work / "big" / "table.csv")
    big = {"dataset": {"kind": "table", "metadata": "table.csv", "image_root": "images"}}
    demo_seconds, demo_jobs = dry_run(work / "demo_dag", None)
    big_seconds, big_jobs = dry_run(work / "big", big)
    print("\n## 3. DAG: `snakemake -n` (rule all), fresh working directories\n")
    print("| config | images | jobs | seconds | vs demo |")
    print("|---|---:|---:|---:|---:|")
    print(f"| demo (reference) | 720 | {demo_jobs} | {demo_seconds:.1f} | 1.00x |")
    print(
        f"| table | {rows:,} | {big_jobs} | {big_seconds:.1f} | {big_seconds / demo_seconds:.2f}x |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--species", type=int, default=10_000)
    parser.add_argument("--images", type=int, default=2400, help="image files checked (about)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--skip-dag", action="store_true")
    args = parser.parse_args()
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        table_path(work, args.rows, args.species)
        image_checking(work, args.images, args.workers)
        if not args.skip_dag:
            dag(work, args.rows, args.species)


if __name__ == "__main__":
    main()
