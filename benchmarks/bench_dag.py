"""The DAG of a million images: how long `snakemake -n` takes, against the demo's.

    python benchmarks/bench_dag.py                  # 1,000,000 rows, 10,000 species
    python benchmarks/bench_dag.py --rows 100000 --species 1000

One run each, in fresh temporary working directories (``--directory``), nothing written into
the repository: a synthetic metadata table (the generator of benchmarks/bench_ingest.py: 10
species per genus, 20 genera per family, image paths that need not exist), a config pointing at
it (``dataset.kind: table``), then ``snakemake -n`` (rule all: every rank's results). Reference:
the same dry run of the default demo config. Starting the workflow validates the config,
fingerprints the table (hashes it) and builds the DAG; its job count follows the ranks and the
shard-writing rule, not the images. Prints seconds, jobs and the ratio to the demo.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

# The table generator and dry run of bench_ingest.py, beside this file.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ingest import dry_run, million_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--species", type=int, default=10_000)
    args = parser.parse_args()
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        big = work / "big"
        (big / "images").mkdir(parents=True)
        million_table(big / "table.csv", args.rows, args.species)
        size_mb = (big / "table.csv").stat().st_size / 2**20
        made = time.perf_counter() - start
        config = {"dataset": {"kind": "table", "metadata": "table.csv", "image_root": "images"}}
        demo_seconds, demo_jobs = dry_run(work / "demo", None)
        big_seconds, big_jobs = dry_run(big, config)
        shutil.rmtree(big / ".snakemake", ignore_errors=True)
    print(f"table: {args.rows:,} rows, {args.species:,} species, {size_mb:.0f} MB CSV "
          f"(written in {made:.1f} s)\n")  # fmt: skip
    print("| config | images | jobs | `snakemake -n` seconds | vs demo |")
    print("|---|---:|---:|---:|---:|")
    print(f"| demo (reference) | 720 | {demo_jobs} | {demo_seconds:.1f} | 1.00x |")
    print(
        f"| table | {args.rows:,} | {big_jobs} | {big_seconds:.1f} | "
        f"{big_seconds / demo_seconds:.2f}x |"
    )


if __name__ == "__main__":
    main()
