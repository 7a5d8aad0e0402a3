"""Metadata validation (every error kind), preparation outputs, label maps and taxonomy."""

from __future__ import annotations

import json
import logging
import tarfile
from pathlib import Path

import pandas as pd
import pytest
from ete3 import Tree
from PIL import Image

from promptcam.data.metadata import (
    MetadataError,
    MetadataSpec,
    load_metadata,
    prepare_metadata,
    read_label_map,
    read_table,
)
from promptcam.data.shards import ShardConfig, write_shards
from promptcam.data.splits import SplitConfig
from promptcam.data.taxonomy import classes_at_rank, lineage, load_taxonomy, ranks, siblings

LEVELS = ("family", "genus", "species")
TAXA = [
    ("Felidae", "Panthera", "Panthera leo"),
    ("Felidae", "Panthera", "Panthera tigris"),
    ("Felidae", "Felis", "Felis catus"),
    ("Canidae", "Canis", "Canis lupus"),
]


def write_image(path: Path, size: tuple[int, int] = (24, 16), mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color=0 if mode in ("L", "1") else (200, 100, 50)).save(path)


def make_dataset(root: Path, per_species: int = 4, masks: bool = False) -> pd.DataFrame:
    """Images under ``root/images`` and the matching metadata rows."""
    rows = []
    for family, genus, species in TAXA:
        for i in range(per_species):
            image = f"images/{species.replace(' ', '_')}_{i}.png"
            write_image(root / image)
            row = {"image": image, "family": family, "genus": genus, "species": species}
            if masks:
                row["mask"] = f"masks/{species.replace(' ', '_')}_{i}.png"
                write_image(root / row["mask"], mode="L")
            rows.append(row)
    return pd.DataFrame(rows)


def save(table: pd.DataFrame, path: Path) -> Path:
    if path.suffix == ".parquet":
        table.to_parquet(path, index=False)
    else:
        table.to_csv(path, sep="\t" if path.suffix == ".tsv" else ",", index=False)
    return path


def problems_of(table: pd.DataFrame, root: Path, spec: MetadataSpec | None = None) -> str:
    path = save(table, root / "metadata.csv")
    with pytest.raises(MetadataError) as caught:
        load_metadata(path, root, spec or MetadataSpec())
    return str(caught.value)


@pytest.fixture
def dataset(tmp_path: Path) -> pd.DataFrame:
    return make_dataset(tmp_path)


def test_valid_table_loads_normalised(tmp_path, dataset):
    dataset.loc[0, "image"] = "./" + dataset.loc[0, "image"]
    dataset.loc[1, "family"] = "  Felidae "
    table = load_metadata(save(dataset, tmp_path / "metadata.csv"), tmp_path, MetadataSpec())
    assert list(table.columns) == ["sample_id", "image", *LEVELS, "split"]
    assert table.loc[0, "image"] == "images/Panthera_leo_0.png"
    assert table.loc[1, "family"] == "Felidae"
    assert table["sample_id"].is_unique
    assert (table["split"] == "").all()


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".parquet"])
def test_table_formats_read_alike(tmp_path, dataset, suffix):
    table = read_table(save(dataset, tmp_path / f"metadata{suffix}"))
    # Text columns (pandas "str", Arrow-backed: a million rows fit in little memory).
    pd.testing.assert_frame_equal(table, dataset.astype(str))


def test_unknown_table_format_is_rejected(tmp_path, dataset):
    with pytest.raises(ValueError, match="extension"):
        read_table(save(dataset, tmp_path / "metadata.xlsx"))


def test_tree_violation_names_both_rows_and_the_file(tmp_path, dataset):
    dataset.loc[9, "family"] = "Ursidae"  # a Felis row (data row 10), Felis is Felidae in row 9
    message = problems_of(dataset, tmp_path)
    assert "metadata.csv" in message
    assert "[not a tree] 1" in message
    assert "genus 'Felis' is under two family labels" in message
    assert "row 9 has family 'Felidae'" in message
    assert "row 10 has family 'Ursidae'" in message


def test_species_under_two_genera_is_a_tree_violation(tmp_path, dataset):
    dataset.loc[0, "genus"] = "Felis"
    dataset.loc[0, "family"] = "Felidae"
    message = problems_of(dataset, tmp_path)
    assert "species 'Panthera leo' is under two genus labels" in message
    assert "row 1 has genus 'Felis'" in message


def test_missing_and_unreadable_images(tmp_path, dataset):
    (tmp_path / dataset.loc[2, "image"]).unlink()
    (tmp_path / dataset.loc[5, "image"]).write_bytes(b"not an image at all")
    message = problems_of(dataset, tmp_path)
    assert "[missing image] 1" in message
    assert "row 3: image file 'images/Panthera_leo_2.png' not found" in message
    assert "[unreadable image] 1" in message
    assert "row 6: image file 'images/Panthera_tigris_1.png' cannot be read by PIL" in message


def test_truncated_png_is_unreadable(tmp_path, dataset):
    path = tmp_path / dataset.loc[0, "image"]
    path.write_bytes(path.read_bytes()[:-20])
    assert "[unreadable image] 1" in problems_of(dataset, tmp_path)


def test_duplicate_paths_name_all_rows(tmp_path, dataset):
    dataset.loc[7, "image"] = dataset.loc[3, "image"]
    message = problems_of(dataset, tmp_path)
    assert "[duplicate path] 1" in message
    assert "'images/Panthera_leo_3.png' is listed in rows 4, 8" in message


def test_duplicates_are_found_after_normalising_paths(tmp_path, dataset):
    dataset.loc[7, "image"] = "images/../images/" + dataset.loc[3, "image"].split("/")[-1]
    assert "[duplicate path] 1" in problems_of(dataset, tmp_path)


def test_missing_columns_are_listed(tmp_path, dataset):
    message = problems_of(dataset.drop(columns=["genus"]), tmp_path)
    assert "[missing column] 1" in message
    assert "column 'genus' (rank labels) is missing" in message


def test_missing_image_column_with_a_custom_name(tmp_path, dataset):
    message = problems_of(dataset, tmp_path, MetadataSpec(image_column="file"))
    assert "column 'file' (image paths) is missing" in message
    assert "dataset.image_column" in message


def test_bad_split_values(tmp_path, dataset):
    dataset["split"] = "train"
    dataset.loc[4, "split"] = "training"
    dataset.loc[6, "split"] = ""
    message = problems_of(dataset, tmp_path)
    assert "[bad split] 2" in message
    assert "row 5: split 'training' is not one of train, val, test" in message
    assert "row 7: split ''" in message


def test_empty_and_bad_labels(tmp_path, dataset):
    dataset.loc[0, "species"] = ""
    dataset.loc[1, "genus"] = 'Pan"thera'
    message = problems_of(dataset, tmp_path)
    assert "row 1: empty species label" in message
    assert "[bad label] 1" in message


def test_missing_image_root(tmp_path, dataset):
    path = save(dataset, tmp_path / "metadata.csv")
    with pytest.raises(MetadataError, match="missing image root"):
        load_metadata(path, tmp_path / "nowhere", MetadataSpec())


def test_all_problems_are_reported_at_once_and_capped(tmp_path, dataset):
    for index in range(12):
        (tmp_path / dataset.loc[index, "image"]).unlink()
    dataset.loc[13, "family"] = "Ursidae"
    dataset["split"] = "train"
    dataset.loc[14, "split"] = "dev"
    path = save(dataset, tmp_path / "metadata.csv")
    with pytest.raises(MetadataError) as caught:
        load_metadata(path, tmp_path, MetadataSpec())
    error = caught.value
    assert error.counts == {"not a tree": 1, "bad split": 1, "missing image": 12}
    assert "14 problem(s)" in str(error)
    # Five listed per kind (was ten): the full list is in problems.tsv.
    assert "... and 7 more missing image problem(s)" in str(error)


def test_masks_are_checked(tmp_path):
    dataset = make_dataset(tmp_path, masks=True)
    (tmp_path / dataset.loc[0, "mask"]).unlink()
    write_image(tmp_path / dataset.loc[1, "mask"], size=(10, 10), mode="L")
    write_image(tmp_path / dataset.loc[2, "mask"], mode="RGB")
    message = problems_of(dataset, tmp_path)
    assert "[missing mask] 1" in message
    assert "row 2: mask 'masks/Panthera_leo_1.png' is 10x10 but its image is 24x16" in message
    assert "[mask mode] 1" in message


def test_prepare_writes_outputs(tmp_path, dataset, caplog):
    table_path = save(dataset, tmp_path / "metadata.csv")
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO):
        parquet = prepare_metadata(table_path, tmp_path, out, MetadataSpec(), SplitConfig())
    table = pd.read_parquet(parquet)
    assert len(table) == len(dataset)
    assert set(table["split"]) == {"train", "val", "test"}
    assert "16 images, stratified split" in caplog.text

    species = read_label_map(out / "labels" / "species.tsv")
    assert list(species.columns) == [
        "index",
        "name",
        "parent",
        "count",
        "n_train",
        "n_val",
        "n_test",
    ]
    assert species["name"].tolist() == sorted(species["name"])
    assert species["index"].tolist() == list(range(4))
    assert species.set_index("name").loc["Felis catus", "parent"] == "Felis"
    assert species["count"].sum() == 16
    assert (species[["n_train", "n_val", "n_test"]].sum(axis=1) == species["count"]).all()
    family = read_label_map(out / "labels" / "family.tsv")
    assert family["name"].tolist() == ["Canidae", "Felidae"]
    assert family["parent"].tolist() == ["", ""]
    summary = pd.read_csv(out / "split_summary.tsv", sep="\t")
    assert set(summary["rule"]) == {"stratified"}


def test_given_split_column_wins(tmp_path, dataset):
    dataset["split"] = ["test" if i % 2 else "val" for i in range(len(dataset))]
    dataset.loc[0, "split"] = "train"
    out = tmp_path / "out"
    prepare_metadata(
        save(dataset, tmp_path / "m.csv"), tmp_path, out, MetadataSpec(), SplitConfig()
    )
    table = pd.read_parquet(out / "metadata.parquet")
    assert table["split"].tolist() == dataset["split"].tolist()
    summary = pd.read_csv(out / "split_summary.tsv", sep="\t")
    assert set(summary["rule"]) == {"given"}


def test_small_classes_go_to_train_and_are_reported(tmp_path, dataset, caplog):
    dataset = dataset.drop(index=[12, 13]).reset_index(drop=True)  # Canis lupus keeps 2 images
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        prepare_metadata(
            save(dataset, tmp_path / "m.csv"), tmp_path, out, MetadataSpec(), SplitConfig()
        )
    table = pd.read_parquet(out / "metadata.parquet")
    assert (table.loc[table["species"] == "Canis lupus", "split"] == "train").all()
    summary = pd.read_csv(out / "split_summary.tsv", sep="\t").set_index("class")
    assert summary.loc["Canis lupus", "rule"] == "too_small"
    assert "1 class(es) with fewer than 3 images" in caplog.text
    assert "Canis lupus" in caplog.text


def test_taxonomy_round_trips_through_ete3(tmp_path, dataset):
    dataset.loc[dataset["species"] == "Felis catus", "species"] = "Felis catus (domestic), L."
    out = tmp_path / "out"
    prepare_metadata(
        save(dataset, tmp_path / "m.csv"), tmp_path, out, MetadataSpec(), SplitConfig()
    )
    # Plain ete3 reads it (quoted names, NHX features)...
    raw = Tree(str(out / "taxonomy.nwk"), format=1, quoted_node_names=True)
    assert {leaf.name for leaf in raw.get_leaves()} == {
        "Panthera leo", "Panthera tigris", "Felis catus (domestic), L.", "Canis lupus"
    }  # fmt: skip
    assert {leaf.rank for leaf in raw.get_leaves()} == {"species"}
    # ...and the helpers answer taxonomy questions.
    tree = load_taxonomy(out / "taxonomy.nwk")
    assert ranks(tree) == list(LEVELS)
    assert classes_at_rank(tree, "genus") == ["Canis", "Felis", "Panthera"]
    assert siblings(tree, "species", "Panthera leo") == ["Panthera tigris"]
    assert siblings(tree, "genus", "Felis") == ["Panthera"]
    assert siblings(tree, "family", "Canidae") == ["Felidae"]
    assert siblings(tree, "genus", "Canis") == []
    assert lineage(tree, "species", "Canis lupus") == {
        "family": "Canidae", "genus": "Canis", "species": "Canis lupus"
    }  # fmt: skip
    assert tree.n_images == 16
    assert tree.search_nodes(rank="family", name="Felidae")[0].n_images == 12
    with pytest.raises(KeyError):
        siblings(tree, "genus", "Homo")


def test_any_ordered_levels_work(tmp_path, dataset):
    # "class" is a real rank and a Python keyword: it must work as a column name everywhere.
    dataset.insert(1, "class", "Mammalia")
    dataset.insert(2, "order", "Carnivora")
    levels = ("class", "order", "family", "genus", "species")
    out = tmp_path / "out"
    spec = MetadataSpec(levels=levels)
    prepare_metadata(save(dataset, tmp_path / "m.csv"), tmp_path, out, spec, SplitConfig())
    assert read_label_map(out / "labels" / "order.tsv")["name"].tolist() == ["Carnivora"]
    assert read_label_map(out / "labels" / "family.tsv")["parent"].tolist() == ["Carnivora"] * 2
    tree = load_taxonomy(out / "taxonomy.nwk")
    assert ranks(tree) == list(levels)
    assert siblings(tree, "family", "Canidae") == ["Felidae"]
    write_shards(
        out / "metadata.parquet", out / "labels", tmp_path, out / "shards", levels, ShardConfig()
    )
    with tarfile.open(out / "shards" / "train-000000.tar") as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".json"))
        header = json.loads(tar.extractfile(member).read())
    assert header["labels"]["class"] == "Mammalia"
    assert header["indices"]["class"] == 0


@pytest.mark.parametrize("level", ["split", "image", "sample_id", "mask", "file"])
def test_rank_names_must_not_clash_with_other_columns(level):
    with pytest.raises(ValueError, match="clash"):
        MetadataSpec(levels=("family", level), image_column="file")
