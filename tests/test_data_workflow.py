"""The demo generator's determinism and the data stage run through Snakemake."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pandas as pd
import pytest

from promptcam.data.taxonomy import classes_at_rank, load_taxonomy
from promptcam.demo.organisms import DemoConfig, generate_demo_dataset
from promptcam.io import sha256_file

TINY = DemoConfig(
    n_families=2, genera_per_family=1, species_per_genus=2, images_per_species=3, image_size=48
)


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_generator_is_deterministic_in_its_seed(tmp_path):
    first = tree_digest(generate_demo_dataset(tmp_path / "a", TINY).parent)
    again = tree_digest(generate_demo_dataset(tmp_path / "b", TINY).parent)
    assert first == again
    assert len(first) == 1 + 2 * 12  # metadata.csv, 12 images and 12 masks
    other_seed = dataclasses.replace(TINY, seed=1)
    other = tree_digest(generate_demo_dataset(tmp_path / "c", other_seed).parent)
    assert other.keys() == first.keys()
    changed = [name for name in first if name.startswith("images/") and first[name] != other[name]]
    assert len(changed) == 12


@pytest.mark.slow
def test_snakemake_runs_the_data_stage(repo_root, tmp_path, run_command):
    config = repo_root / "tests" / "configs" / "demo_small.yaml"
    # The data stage only (rule all runs the whole pipeline); targets first, as --configfile
    # takes several values.
    targets = ["prepare_metadata", "write_shards"]
    cmd = [sys.executable, "-m", "snakemake", *targets, "--cores", "2",
           "--snakefile", str(repo_root / "Snakefile"), "--directory", str(tmp_path),
           "--configfile", str(config)]  # fmt: skip
    proc = run_command(cmd, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-6000:]

    data = tmp_path / "results" / "data"
    table = pd.read_parquet(data / "metadata.parquet")
    assert len(table) == 2 * 2 * 2 * 8
    assert {"sample_id", "image", "mask", "family", "genus", "species", "split"} <= set(table)
    for rank, n_classes in (("family", 2), ("genus", 4), ("species", 8)):
        labels = pd.read_csv(data / "labels" / f"{rank}.tsv", sep="\t")
        assert len(labels) == n_classes
        assert labels["count"].sum() == len(table)
    tree = load_taxonomy(data / "taxonomy.nwk")
    assert len(classes_at_rank(tree, "species")) == 8

    shards = tmp_path / "results" / "shards"
    manifest = json.loads((shards / "manifest.json").read_text())
    tars = sorted(path.name for path in shards.glob("*.tar"))
    assert tars == sorted(entry["file"] for entry in manifest["shards"])
    for split in ("train", "val", "test"):
        assert f"{split}-000000.tar" in tars
        assert 1 <= manifest["splits"][split]["n_shards"] <= 2
        assert manifest["splits"][split]["n_samples"] == (table["split"] == split).sum()
    for entry in manifest["shards"]:
        assert entry["sha256"] == sha256_file(shards / entry["file"])
    for rule in ("generate_demo", "prepare_metadata", "write_shards"):
        assert (tmp_path / "logs" / "data" / f"{rule}.log").stat().st_size > 0
        assert (tmp_path / "results" / "benchmarks" / "data" / f"{rule}.tsv").exists()

    rerun = run_command([*cmd, "--dry-run"], timeout=120, cwd=tmp_path)
    assert "Nothing to be done" in rerun.stdout + rerun.stderr
