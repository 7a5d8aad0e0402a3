"""One pass finds every problem (problems.tsv); on_bad_image: skip leaves out and counts."""

from __future__ import annotations

import json
import logging
import tarfile

import numpy as np
import pandas as pd
import pytest
from ingest_corpus import jpeg_bytes, make_dataset, save_csv, write_png16, write_truncated_jpeg
from PIL import Image

from promptcam.data.images import ImageSettings
from promptcam.data.metadata import IngestSettings, MetadataSpec, load_metadata, prepare_metadata
from promptcam.data.problems import MetadataError
from promptcam.data.shards import ShardConfig, write_shards_accounted
from promptcam.data.splits import SplitConfig

SKIP = IngestSettings(on_bad_image="skip")


@pytest.fixture
def dataset(tmp_path) -> pd.DataFrame:
    return make_dataset(tmp_path)


def break_images(root, dataset: pd.DataFrame) -> dict[int, str]:
    """Three bad files: a truncated JPEG, a missing file, a text file named .png."""
    dataset.loc[1, "image"] = "images/cut.jpg"
    write_truncated_jpeg(root / "images" / "cut.jpg")
    (root / dataset.loc[6, "image"]).unlink()
    (root / dataset.loc[10, "image"]).write_text("not an image")
    return {1: "unreadable image", 6: "missing image", 10: "unreadable image"}


def prepare(root, dataset, settings=None, workers=1):
    table = save_csv(dataset, root / "metadata.csv")
    return prepare_metadata(
        table, root, root / "out", MetadataSpec(), SplitConfig(), workers, settings
    )


def test_every_problem_is_listed_in_problems_tsv_even_when_failing(tmp_path, dataset):
    broken = break_images(tmp_path, dataset)
    dataset.loc[13, "species"] = "NA"
    with pytest.raises(MetadataError) as caught:
        prepare(tmp_path, dataset)
    error = caught.value
    assert error.counts == {"missing label": 1, "missing image": 1, "unreadable image": 2}
    assert str(tmp_path / "out" / "problems.tsv") in str(error)  # the console points there
    listed = pd.read_csv(tmp_path / "out" / "problems.tsv", sep="\t", dtype=str)
    assert listed.columns.tolist() == ["row", "file", "problem", "detail", "fix"]
    assert len(listed) == 4
    by_row = listed.set_index("row")
    for index, kind in broken.items():
        assert by_row.loc[str(index + 1), "problem"] == kind
        assert by_row.loc[str(index + 1), "file"] == dataset.loc[index, "image"]
        assert by_row.loc[str(index + 1), "fix"]
    assert by_row.loc["14", "problem"] == "missing label"
    assert "truncated" in by_row.loc["2", "detail"]  # the JPEG cut in half
    assert not (tmp_path / "out" / "metadata.parquet").exists()  # nothing else written


def test_truncated_jpeg_is_caught_by_validation(tmp_path, dataset):
    # verify() alone (the previous check) passes a truncated JPEG, which then crashed shards.
    write_truncated_jpeg(tmp_path / "images" / "cut.jpg")
    with Image.open(tmp_path / "images" / "cut.jpg") as image:
        image.verify()
    dataset.loc[0, "image"] = "images/cut.jpg"
    with pytest.raises(MetadataError, match=r"row 1: image file 'images/cut\.jpg' cannot be read"):
        load_metadata(save_csv(dataset, tmp_path / "m.csv"), tmp_path, MetadataSpec())


def test_skip_leaves_bad_images_out_and_accounts_for_every_image(tmp_path, dataset, caplog):
    broken = break_images(tmp_path, dataset)
    with caplog.at_level(logging.INFO):
        parquet = prepare(tmp_path, dataset, SKIP)
    out = tmp_path / "out"
    table = pd.read_parquet(parquet)
    kept = dataset.drop(index=list(broken))
    assert table["image"].tolist() == kept["image"].tolist()
    skipped = pd.read_csv(out / "skipped.tsv", sep="\t", dtype=str)
    assert skipped.columns.tolist() == ["row", "file", "reason"]
    assert skipped["row"].tolist() == [str(i + 1) for i in broken]
    assert skipped["file"].tolist() == [dataset.loc[i, "image"] for i in broken]
    assert skipped["reason"].str.startswith(tuple(broken.values())).all()
    ingest = json.loads((out / "ingest.json").read_text())
    assert (ingest["rows_in"], ingest["skipped"], ingest["kept"]) == (16, 3, 13)
    assert "images in: 16 = kept 13 + skipped 3" in caplog.text
    assert "skipped 3 image(s)" in caplog.text

    counts_path = out / "ingest_counts.tsv"
    with caplog.at_level(logging.INFO):
        manifest = write_shards_accounted(
            parquet, out / "labels", tmp_path, out / "shards", ("family", "genus", "species"),
            ShardConfig(short_side=16), out / "ingest.json", counts_path,
        )  # fmt: skip
    samples = 0
    for entry in json.loads(manifest.read_text())["shards"]:
        with tarfile.open(out / "shards" / entry["file"]) as tar:
            samples += sum(name.endswith(".jpg") for name in tar.getnames())
    assert samples == 13
    counts = pd.read_csv(counts_path, sep="\t", dtype=str).set_index("what")["count"]
    assert counts["images in"] == "16"
    assert counts["sharded"] == "13"
    assert counts["skipped (on_bad_image: skip; see skipped.tsv)"] == "3"
    assert counts["in = sharded + skipped"] == "yes"
    assert "images in 16 = sharded 13 + skipped 3: every image accounted for" in caplog.text


def test_lost_images_are_an_error(tmp_path, dataset):
    parquet = prepare(tmp_path, dataset)
    out = tmp_path / "out"
    ingest = json.loads((out / "ingest.json").read_text())
    ingest["rows_in"] += 1  # as if an image vanished between validation and the shards
    (out / "ingest.json").write_text(json.dumps(ingest))
    with pytest.raises(RuntimeError, match="images were lost: images in 17 = sharded 16"):
        write_shards_accounted(
            parquet, out / "labels", tmp_path, out / "shards", ("family", "genus", "species"),
            ShardConfig(short_side=16), out / "ingest.json", out / "counts.tsv",
        )  # fmt: skip


def test_skip_never_skips_table_problems(tmp_path, dataset):
    break_images(tmp_path, dataset)
    dataset.loc[12, "family"] = "Felidae"  # Canis under two families
    with pytest.raises(MetadataError) as caught:
        prepare(tmp_path, dataset, SKIP)
    assert "not a tree" in caught.value.counts
    assert not (tmp_path / "out" / "metadata.parquet").exists()


def test_skip_with_nothing_left_fails(tmp_path, dataset):
    with pytest.raises(MetadataError, match="all 16 images were skipped"):
        prepare_metadata(
            save_csv(dataset, tmp_path / "m.csv"), tmp_path / "images",  # the wrong root
            tmp_path / "out", MetadataSpec(), SplitConfig(), settings=SKIP,
        )  # fmt: skip


def test_bad_masks_skip_their_rows(tmp_path, dataset):
    dataset["mask"] = [f"masks/{i}.png" for i in range(len(dataset))]
    for i in range(len(dataset)):
        (tmp_path / "masks").mkdir(exist_ok=True)
        Image.new("L", (24, 16)).save(tmp_path / "masks" / f"{i}.png")
    (tmp_path / "masks" / "4.png").write_bytes(b"\x89PNG broken")
    table = pd.read_parquet(prepare(tmp_path, dataset, SKIP))
    assert len(table) == 15 and "masks/4.png" not in set(table["mask"])


def test_workers_find_the_same_problems(tmp_path):
    dataset = make_dataset(tmp_path, per_species=40)  # 160 files: enough for the pool
    for index in (3, 77, 150):
        (tmp_path / dataset.loc[index, "image"]).write_bytes(jpeg_bytes()[:300])
    messages = []
    for workers in (1, 2):
        with pytest.raises(MetadataError) as caught:
            load_metadata(save_csv(dataset, tmp_path / "m.csv"), tmp_path, MetadataSpec(), workers)
        messages.append([p.message for p in caught.value.problems])
    assert messages[0] == messages[1]
    assert len(messages[0]) == 3


def test_low_bit_depth_16_bit_images_are_warned_about(tmp_path, dataset, caplog):
    dataset.loc[0, "image"] = "images/twelve.png"
    write_png16(tmp_path / "images" / "twelve.png", np.full((16, 24), 4000, np.uint16))
    with caplog.at_level(logging.WARNING):
        prepare(tmp_path, dataset)
    assert "1 16-bit image(s) never exceed 4095" in caplog.text
    assert "dataset.sample_bits: 12" in caplog.text
    caplog.clear()
    settings = IngestSettings(images=ImageSettings(sample_bits=12))
    with caplog.at_level(logging.WARNING):
        prepare(tmp_path, dataset, settings)
    assert "never exceed" not in caplog.text
