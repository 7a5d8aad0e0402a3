"""Folder trees root/<family>/<genus>/<species>/<images> as the dataset, no table."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from ingest_corpus import write_image, write_truncated_jpeg

from promptcam.data.folders import read_folder_tree
from promptcam.data.metadata import IngestSettings, MetadataSpec, prepare_metadata, read_label_map
from promptcam.data.problems import MetadataError
from promptcam.data.shards import ShardConfig, write_shards
from promptcam.data.splits import SplitConfig

LEVELS = ("family", "genus", "species")
TREE = {
    "Felidae/Panthera/Panthera leo": 4,
    "Felidae/Panthera/tigris": 3,  # a bare epithet folder
    "Felidae/Felis/catus": 3,
    "Canidae/Canis/Canis lupus": 3,
}


def make_tree(root: Path) -> Path:
    for folder, count in TREE.items():
        for i in range(count):
            write_image(root / folder / f"img_{i}.{'png' if i % 2 else 'PNG'}")
    return root


def prepare(root: Path, out: Path, settings: IngestSettings | None = None) -> Path:
    spec = MetadataSpec(levels=LEVELS)
    return prepare_metadata(None, root, out, spec, SplitConfig(), settings=settings)


def test_tree_is_read_like_a_table(tmp_path):
    root = make_tree(tmp_path / "tree")
    (root / ".DS_Store").write_text("x")
    (root / "Felidae" / "Thumbs.db").write_text("x")
    (root / "Felidae" / "Felis" / "catus" / ".hidden.png").write_text("x")
    parquet = prepare(root, tmp_path / "out")
    table = pd.read_parquet(parquet)
    assert len(table) == 13
    assert table["image"].tolist() == sorted(table["image"])
    assert "Felidae/Panthera/Panthera leo/img_0.PNG" in set(table["image"])
    species = read_label_map(tmp_path / "out" / "labels" / "species.tsv").set_index("name")
    assert species["count"].to_dict() == {
        "Canis lupus": 3, "Felis catus": 3, "Panthera leo": 4, "Panthera tigris": 3
    }  # fmt: skip
    assert species.loc["Felis catus", "parent"] == "Felis"
    ingest = json.loads((tmp_path / "out" / "ingest.json").read_text())
    assert (ingest["kind"], ingest["rows_in"], ingest["ignored_files"]) == ("folders", 13, 3)
    manifest = write_shards(
        parquet, tmp_path / "out" / "labels", root, tmp_path / "shards", LEVELS, ShardConfig()
    )
    assert sum(s["n_samples"] for s in json.loads(manifest.read_text())["splits"].values()) == 13


def test_layout_problems_name_the_path_and_the_fix(tmp_path):
    root = make_tree(tmp_path / "tree")
    write_image(root / "Felidae" / "Panthera" / "stray.png")  # at the species level
    write_image(root / "Canidae" / "Canis" / "Canis lupus" / "more" / "deep.png")
    (root / "Felidae" / "Felis" / "catus" / "notes.txt").write_text("x")
    (root / "README.md").write_text("x")
    tree = read_folder_tree(root, LEVELS)
    problems = {p.kind: p for p in tree.problems}
    assert set(problems) == {"stray file", "folder too deep", "not an image"}
    assert len(tree.problems) == 4
    stray = [p for p in tree.problems if p.kind == "stray file"]
    assert {p.file for p in stray} == {"Felidae/Panthera/stray.png", "README.md"}
    assert "is in a genus folder, where only species folders belong" in stray[0].detail + (
        stray[1].detail
    )
    assert problems["folder too deep"].file == "Canidae/Canis/Canis lupus/more"
    assert "move its images up into the species folder" in problems["folder too deep"].fix
    assert problems["not an image"].file == "Felidae/Felis/catus/notes.txt"
    with pytest.raises(MetadataError) as caught:
        prepare(root, tmp_path / "out", IngestSettings(on_bad_image="skip"))  # layout: always
    assert caught.value.counts == {"stray file": 2, "folder too deep": 1, "not an image": 1}


def test_labels_from_folders_get_the_same_checks(tmp_path):
    root = make_tree(tmp_path / "tree")
    write_image(root / "Felidae" / "Felis" / "unknown" / "a.png")
    write_image(root / "felidae" / "Lynx" / "Lynx lynx" / "a.png")
    with pytest.raises(MetadataError) as caught:
        prepare(root, tmp_path / "out")
    message = str(caught.value)
    assert "file 'Felidae/Felis/unknown/a.png': species label 'unknown' is a placeholder" in message
    assert "family labels 'Felidae' (11 file(s) in 'Felidae/Felis/catus', " in message
    assert "'felidae' (1 file(s) in 'felidae/Lynx/Lynx lynx')" in message
    assert "Rows are" not in message  # a tree has no rows: files are named instead
    listed = pd.read_csv(tmp_path / "out" / "problems.tsv", sep="\t", dtype=str)
    assert listed["row"].isna().all()
    assert "Felidae/Felis/unknown/a.png" in set(listed["file"])


def test_bad_images_in_a_tree_are_skipped_by_path(tmp_path):
    root = make_tree(tmp_path / "tree")
    write_truncated_jpeg(root / "Felidae" / "Felis" / "catus" / "cut.jpg")
    prepare(root, tmp_path / "out", IngestSettings(on_bad_image="skip"))
    skipped = pd.read_csv(tmp_path / "out" / "skipped.tsv", sep="\t", dtype=str)
    assert skipped["file"].tolist() == ["Felidae/Felis/catus/cut.jpg"]
    assert len(pd.read_parquet(tmp_path / "out" / "metadata.parquet")) == 13
