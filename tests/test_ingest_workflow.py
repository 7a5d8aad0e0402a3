"""The data rules run for real: skip and count bad images, keep problems.tsv of a failed
validation, read folder trees, and never reuse another dataset's results."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml
from ingest_corpus import make_dataset, save_csv, write_image, write_truncated_jpeg

DATA_TARGETS = ["results/shards", "results/data/ingest_counts.tsv"]
SMALL = {
    "levels": ["family", "genus", "species"],
    "splits": {"train": 0.5, "val": 0.25, "test": 0.25, "min_class_size": 3},
    "shards": {"short_side": 16, "max_samples_per_shard": 5, "threads": 2},
}


def configure(work: Path, dataset: dict) -> Path:
    config = {**SMALL, "dataset": {"threads": 2, **dataset}}
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def table_dataset(work: Path) -> pd.DataFrame:
    """16 PNGs and one truncated JPEG under work/data, listed in work/table.csv."""
    dataset = make_dataset(work / "data", per_species=4)
    write_truncated_jpeg(work / "data" / "images" / "cut.jpg")
    cut = {"image": "images/cut.jpg", "family": "Felidae", "genus": "Felis"}
    dataset.loc[len(dataset)] = {**cut, "species": "Felis catus"}
    save_csv(dataset, work / "table.csv")
    return dataset


def output(proc) -> str:
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_skip_run_counts_every_image_and_datasets_never_mix(tmp_path, snakemake_run):
    table_dataset(tmp_path)
    table = {"kind": "table", "metadata": "table.csv", "image_root": "data"}
    config = configure(tmp_path, {**table, "on_bad_image": "skip"})
    proc = snakemake_run(tmp_path, *DATA_TARGETS, configfile=config)
    assert proc.returncode == 0, output(proc)[-5000:]
    data = tmp_path / "results" / "data"
    skipped = pd.read_csv(data / "skipped.tsv", sep="\t", dtype=str)
    assert skipped[["row", "file"]].values.tolist() == [["17", "images/cut.jpg"]]
    assert "truncated" in skipped.loc[0, "reason"]
    counts = pd.read_csv(data / "ingest_counts.tsv", sep="\t", dtype=str).set_index("what")
    assert counts.loc["images in", "count"] == "17"
    assert counts.loc["sharded", "count"] == "16"
    assert counts.loc["in = sharded + skipped", "count"] == "yes"
    manifest = json.loads((tmp_path / "results" / "shards" / "manifest.json").read_text())
    assert sum(split["n_samples"] for split in manifest["splits"].values()) == 16
    assert manifest["dataset"]["kind"] == "table"
    log = (tmp_path / "logs" / "data" / "write_shards.log").read_text()
    assert "images in 17 = sharded 16 + skipped 1: every image accounted for" in log

    # A missing table is an error at start, naming the key (it used to reuse the results).
    missing = configure(tmp_path, {**table, "metadata": "gone.csv"})
    proc = snakemake_run(tmp_path, *DATA_TARGETS, "--dry-run", configfile=missing)
    assert proc.returncode != 0
    assert "dataset.metadata: the table 'gone.csv' does not exist" in output(proc)
    assert "Nothing to be done" not in output(proc)

    # Another table, older than every result, reruns the data stage: by Snakemake's records,
    # and without them (a copied results folder) by the dataset's record that rule all needs.
    other = pd.read_csv(tmp_path / "table.csv").iloc[:-1]
    save_csv(other, tmp_path / "other.csv")
    os.utime(tmp_path / "other.csv", (0, 0))
    switched = configure(tmp_path, {**table, "metadata": "other.csv"})
    proc = snakemake_run(tmp_path, *DATA_TARGETS, "--dry-run", configfile=switched)
    assert proc.returncode == 0, output(proc)[-3000:]
    assert "rule prepare_metadata:" in output(proc) and "rule write_shards:" in output(proc)
    copied = tmp_path / "copied"
    copied.mkdir()
    for name in ("results", "data", "other.csv", "config.yaml"):
        (shutil.copytree if (tmp_path / name).is_dir() else shutil.copy2)(
            tmp_path / name, copied / name
        )
    proc = snakemake_run(copied, "--dry-run", configfile=copied / "config.yaml")
    assert proc.returncode == 0, output(proc)[-3000:]
    assert "rule prepare_metadata:" in output(proc)
    assert "Missing output files: results/data/sources/" in output(proc)
    proc = snakemake_run(tmp_path, *DATA_TARGETS, configfile=switched)
    assert proc.returncode == 0, output(proc)[-5000:]
    ingest = json.loads((tmp_path / "results" / "data" / "ingest.json").read_text())
    assert ingest["dataset"]["table"] == str((tmp_path / "other.csv").resolve())
    assert (ingest["rows_in"], ingest["skipped"]) == (16, 0)
    proc = snakemake_run(tmp_path, *DATA_TARGETS, "--dry-run", configfile=switched)
    assert "Nothing to be done" in output(proc)


@pytest.mark.slow
def test_failed_validation_keeps_problems_tsv(tmp_path, snakemake_run):
    table_dataset(tmp_path)
    (tmp_path / "data" / "images" / "Canis_lupus_1.png").unlink()
    config = configure(tmp_path, {"kind": "table", "metadata": "table.csv", "image_root": "data"})
    proc = snakemake_run(tmp_path, "results/data/metadata.parquet", configfile=config)
    assert proc.returncode != 0
    problems = pd.read_csv(tmp_path / "results" / "data" / "problems.tsv", sep="\t", dtype=str)
    assert sorted(problems["problem"]) == ["missing image", "unreadable image"]
    log = (tmp_path / "logs" / "data" / "prepare_metadata.log").read_text()
    assert "2 problem(s) in the dataset" in log
    assert "results/data/problems.tsv" in log


@pytest.mark.slow
def test_folder_tree_dataset_runs(tmp_path, snakemake_run):
    for family, genus, species in [("Felidae", "Felis", "catus"), ("Canidae", "Canis", "lupus")]:
        for i in range(4):
            write_image(tmp_path / "tree" / family / genus / species / f"{i}.png")
    config = configure(tmp_path, {"kind": "folders", "image_root": "tree"})
    proc = snakemake_run(tmp_path, *DATA_TARGETS, configfile=config)
    assert proc.returncode == 0, output(proc)[-5000:]
    labels = pd.read_csv(tmp_path / "results" / "data" / "labels" / "species.tsv", sep="\t")
    assert labels["name"].tolist() == ["Canis lupus", "Felis catus"]
    # A new image changes the tree's fingerprint: the data stage reruns.
    write_image(tmp_path / "tree" / "Felidae" / "Felis" / "catus" / "new.png")
    proc = snakemake_run(tmp_path, *DATA_TARGETS, "--dry-run", configfile=config)
    assert "rule prepare_metadata:" in output(proc)
