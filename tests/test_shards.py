"""WebDataset shards: round trip, manifest, byte-identical output for any worker count."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from promptcam.data.metadata import MetadataSpec, prepare_metadata, read_label_map
from promptcam.data.shards import ShardConfig, load_image, resized_size, write_shards
from promptcam.data.splits import SplitConfig
from promptcam.demo.organisms import DemoConfig, generate_demo_dataset
from promptcam.io import sha256_file

LEVELS = ("family", "genus", "species")
DEMO = DemoConfig(
    n_families=2, genera_per_family=2, species_per_genus=2, images_per_species=8, image_size=64
)
SPLIT = SplitConfig(train=0.5, val=0.25, test=0.25)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """The real demo generator's output, validated and split; returns the work folder."""
    work = tmp_path_factory.mktemp("shards")
    table = generate_demo_dataset(work / "demo", DEMO)
    prepare_metadata(table, work / "demo", work / "data", MetadataSpec(levels=LEVELS), SPLIT)
    return work


def shard(prepared: Path, name: str, config: ShardConfig, workers: int = 1) -> Path:
    out = prepared / name
    write_shards(
        prepared / "data" / "metadata.parquet",
        prepared / "data" / "labels",
        prepared / "demo",
        out,
        LEVELS,
        config,
        workers=workers,
    )
    return out


def read_tar(path: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(path) as tar:
        return [(info, tar.extractfile(info).read()) for info in tar.getmembers()]


def samples_of(out: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for path in sorted(out.glob("*.tar")):
        for info, data in read_tar(path):
            key, suffix = info.name.split(".", 1)
            samples.setdefault(key, {"shard": path.name.encode()})[suffix] = data
    return samples


@pytest.fixture(scope="module")
def shards(prepared) -> Path:
    return shard(prepared, "shards", ShardConfig(max_samples_per_shard=10))


def test_round_trip_keeps_every_sample_label_and_mask(prepared, shards):
    table = pd.read_parquet(prepared / "data" / "metadata.parquet").set_index("sample_id")
    samples = samples_of(shards)
    assert sorted(samples) == sorted(table.index)
    label_maps = {
        rank: read_label_map(prepared / "data" / "labels" / f"{rank}.tsv").set_index("name")
        for rank in LEVELS
    }
    for key, members in samples.items():
        row = table.loc[key]
        assert set(members) == {"shard", "jpg", "json", "mask.png"}
        header = json.loads(members["json"])
        assert header["sample_id"] == key
        assert header["split"] == row["split"]
        assert members["shard"].decode().startswith(row["split"] + "-")
        assert header["path"] == row["image"]
        assert header["mask_path"] == row["mask"]
        for rank in LEVELS:
            assert header["labels"][rank] == row[rank]
            assert header["indices"][rank] == label_maps[rank].loc[row[rank], "index"]
        image = Image.open(io.BytesIO(members["jpg"]))
        assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (64, 64))
        # Smaller than short_side: never resized, so the mask comes back bit for bit.
        stored_mask = np.asarray(Image.open(io.BytesIO(members["mask.png"])))
        source_mask = np.asarray(Image.open(prepared / "demo" / row["mask"]))
        np.testing.assert_array_equal(stored_mask, source_mask)


def test_shards_are_sized_named_and_sorted(shards):
    names = sorted(path.name for path in shards.glob("*.tar"))
    assert names == [
        "test-000000.tar", "test-000001.tar",
        "train-000000.tar", "train-000001.tar", "train-000002.tar", "train-000003.tar",
        "val-000000.tar", "val-000001.tar",
    ]  # fmt: skip
    for name in names:
        members = read_tar(shards / name)
        keys = [info.name.split(".", 1)[0] for info, _ in members]
        assert keys == sorted(keys)
        assert len(set(keys)) <= 10
        for info, _ in members:
            assert (info.mtime, info.uid, info.gid, info.uname, info.gname) == (0, 0, 0, "", "")
            assert info.mode == 0o444


def test_manifest_matches_the_tars(shards):
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["levels"] == list(LEVELS)
    assert manifest["has_masks"] is True
    assert manifest["config"] == {
        "short_side": 256,
        "jpeg_quality": 95,
        "max_samples_per_shard": 10,
    }
    assert sorted(e["file"] for e in manifest["shards"]) == sorted(
        p.name for p in shards.glob("*.tar")
    )
    for entry in manifest["shards"]:
        path = shards / entry["file"]
        assert entry["sha256"] == sha256_file(path)
        assert entry["split"] == entry["file"].split("-")[0]
        headers = [json.loads(data) for info, data in read_tar(path) if info.name.endswith(".json")]
        assert entry["n_samples"] == len(headers)
        assert entry["class_counts"] == dict(Counter(h["labels"]["species"] for h in headers))
    for split, total in manifest["splits"].items():
        entries = [e for e in manifest["shards"] if e["split"] == split]
        assert total == {
            "n_samples": sum(e["n_samples"] for e in entries),
            "n_shards": len(entries),
        }
    assert sum(t["n_samples"] for t in manifest["splits"].values()) == 64


def test_bytes_identical_whatever_the_worker_count(prepared, shards):
    again = shard(prepared, "shards_two_workers", ShardConfig(max_samples_per_shard=10), workers=2)
    files = sorted(path.name for path in shards.iterdir())
    assert files == sorted(path.name for path in again.iterdir())
    for name in files:
        assert (shards / name).read_bytes() == (again / name).read_bytes(), name


def test_resizing_shrinks_images_and_masks_consistently(prepared):
    out = shard(prepared, "small", ShardConfig(short_side=24, jpeg_quality=80))
    samples = samples_of(out)
    for members in samples.values():
        image = Image.open(io.BytesIO(members["jpg"]))
        mask = Image.open(io.BytesIO(members["mask.png"]))
        assert image.size == mask.size == (24, 24)
        # NEAREST only picks existing values: bit masks stay valid (3 ranks -> bits 0..2).
        assert np.asarray(mask).max() < 8
    assert len(list(out.glob("*.tar"))) == 3


def test_rerun_with_larger_shards_removes_stale_ones(prepared):
    out = shard(prepared, "rerun", ShardConfig(max_samples_per_shard=5))
    assert (out / "train-000006.tar").exists()
    shard(prepared, "rerun", ShardConfig(max_samples_per_shard=100))
    assert sorted(p.name for p in out.glob("*.tar")) == [
        "test-000000.tar", "train-000000.tar", "val-000000.tar"
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("size", "short_side", "expected"),
    [((640, 480), 240, (320, 240)), ((480, 640), 240, (240, 320)), ((100, 50), 240, (100, 50))],
)
def test_resized_size(size, short_side, expected):
    assert resized_size(size, short_side) == expected


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((40, 60, 3), dtype=np.uint8)
    pixels[:, :30] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display needs a 90 degree clockwise turn
    path = tmp_path / "rotated.jpg"
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    image = load_image(path, short_side=256)
    assert image.size == (40, 60)
    upright = np.asarray(image)
    assert upright[:30].mean() > 200 and upright[30:].mean() < 50  # white now on top


def test_large_jpegs_are_reduced_to_the_short_side(tmp_path):
    path = tmp_path / "big.jpg"
    Image.new("RGB", (1200, 900), (10, 200, 30)).save(path, quality=90)
    assert load_image(path, short_side=200).size == (267, 200)
