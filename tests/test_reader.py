"""Reading shards back: shapes, labels, deterministic evaluation order, shuffling, masks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from promptcam.data.metadata import MetadataSpec, prepare_metadata, read_label_map
from promptcam.data.reader import (
    ShardDataset,
    TransformConfig,
    load_manifest,
    make_loader,
    split_size,
)
from promptcam.data.shards import ShardConfig, write_shards
from promptcam.data.splits import SplitConfig
from promptcam.demo.organisms import DemoConfig, generate_demo_dataset

LEVELS = ("family", "genus", "species")
SMALL = TransformConfig(img_size=56, resize_size=64)


def build_shards(work: Path, table: Path, image_root: Path, max_per_shard: int) -> Path:
    prepare_metadata(
        table, image_root, work / "data", MetadataSpec(levels=LEVELS), SplitConfig(0.5, 0.25, 0.25)
    )
    return write_shards(
        work / "data" / "metadata.parquet",
        work / "data" / "labels",
        image_root,
        work / "shards",
        LEVELS,
        ShardConfig(max_samples_per_shard=max_per_shard),
    ).parent


@pytest.fixture(scope="module")
def demo_shards(tmp_path_factory) -> Path:
    """Shards of the real demo generator: 8 species x 8 images of 64 px."""
    work = tmp_path_factory.mktemp("reader")
    config = DemoConfig(
        genera_per_family=2, species_per_genus=2, images_per_species=8, image_size=64
    )
    table = generate_demo_dataset(work / "demo", config)
    return build_shards(work, table, work / "demo", max_per_shard=6)


@pytest.fixture(scope="module")
def pattern_shards(tmp_path_factory) -> Path:
    """Images that are their own mask: white exactly where the mask is set, else black."""
    work = tmp_path_factory.mktemp("pattern")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(8):
        mask = np.zeros((48, 64), dtype=np.uint8)
        top, left = rng.integers(0, 16, size=2)
        mask[top : top + 20, left : left + 14] = 3  # off-centre, so a missed flip shows
        mask[30:44, 50:60] = 1
        image = np.repeat(np.where(mask > 0, 255, 0).astype(np.uint8)[..., None], 3, axis=2)
        Image.fromarray(image).save(work / f"img{i}.png")
        Image.fromarray(mask).save(work / f"mask{i}.png")
        rows.append({"image": f"img{i}.png", "mask": f"mask{i}.png", "split": "train",
                     "family": "F", "genus": "G", "species": f"S{i % 2}"})  # fmt: skip
    pd.DataFrame(rows).to_csv(work / "metadata.csv", index=False)
    return build_shards(work, work / "metadata.csv", work, max_per_shard=3)


def read_all(dataset: ShardDataset) -> list[tuple[torch.Tensor, int, dict]]:
    return list(dataset)


@pytest.mark.parametrize(("train", "size"), [(True, 224), (False, 224)])
def test_reference_transforms_give_normalised_224px_images(demo_shards, train, size):
    dataset = ShardDataset(demo_shards, "test", "genus", train=train)
    image, label, meta = next(iter(dataset))
    assert image.shape == (3, size, size)
    assert image.dtype == torch.float32
    assert type(image) is torch.Tensor
    assert -1.0 <= image.min() < image.max() <= 1.0  # mean = std = 0.5
    assert label == meta["indices"]["genus"]


def test_labels_match_the_label_maps_at_every_rank(demo_shards):
    for rank in LEVELS:
        names = read_label_map(demo_shards.parent / "data" / "labels" / f"{rank}.tsv")["name"]
        for _, label, meta in ShardDataset(demo_shards, "val", rank, transform=SMALL):
            assert names[label] == meta["labels"][rank]
            assert set(meta["labels"]) == set(LEVELS)


def test_evaluation_reads_each_sample_once_in_a_fixed_order(demo_shards):
    manifest = load_manifest(demo_shards)
    table = pd.read_parquet(demo_shards.parent / "data" / "metadata.parquet")
    for split in ("train", "val", "test"):
        dataset = ShardDataset(demo_shards, split, "species", transform=SMALL)
        ids = [meta["sample_id"] for _, _, meta in read_all(dataset)]
        assert sorted(ids) == sorted(table.loc[table["split"] == split, "sample_id"])
        assert len(ids) == len(dataset) == split_size(manifest, split)
        assert ids == [meta["sample_id"] for _, _, meta in read_all(dataset)]


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_loader_with_more_workers_than_shards_reads_each_sample_once(demo_shards):
    dataset = ShardDataset(demo_shards, "test", "species", transform=SMALL)
    assert len(dataset.shards) == 3
    loader = make_loader(dataset, batch_size=5, num_workers=4)
    ids = []
    for images, batch_labels, meta in loader:
        assert images.shape[1:] == (3, 56, 56)
        assert set(meta["indices"]) == set(LEVELS)
        assert batch_labels.tolist() == meta["indices"]["species"].tolist()
        ids += meta["sample_id"]
    assert len(ids) == len(set(ids)) == len(dataset)


def test_training_shuffle_is_seeded_per_epoch(demo_shards):
    dataset = ShardDataset(
        demo_shards, "train", "family", train=True, transform=SMALL, shuffle_buffer=16, seed=3
    )
    plain = [
        m["sample_id"] for _, _, m in ShardDataset(demo_shards, "train", "family", transform=SMALL)
    ]
    epochs = []
    for epoch in (0, 0, 1):
        dataset.set_epoch(epoch)
        epochs.append([meta["sample_id"] for _, _, meta in read_all(dataset)])
    assert epochs[0] == epochs[1]
    assert epochs[0] != epochs[2]
    assert epochs[0] != plain
    assert sorted(epochs[0]) == sorted(epochs[2]) == sorted(plain)


def test_split_by_node_shares_shards_between_processes(demo_shards, monkeypatch):
    seen = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        dataset = ShardDataset(demo_shards, "train", "species", transform=SMALL)
        ids = [meta["sample_id"] for _, _, meta in read_all(dataset)]
        assert len(ids) == len(dataset)
        seen.append(set(ids))
    assert not seen[0] & seen[1]
    manifest = load_manifest(demo_shards)
    assert len(seen[0] | seen[1]) == split_size(manifest, "train")


@pytest.mark.parametrize("train", [True, False])
def test_masks_stay_aligned_with_the_image_through_crop_and_flip(pattern_shards, train):
    torch.manual_seed(0)
    dataset = ShardDataset(pattern_shards, "train", "species", train=train, with_mask=True)
    flips_seen = set()
    for _ in range(4):  # several epochs: both flip outcomes and many crops
        for image, _, meta in dataset:
            mask = meta["mask"]
            assert mask.shape == (224, 224) and mask.dtype == torch.uint8
            assert set(mask.unique().tolist()) <= {0, 1, 3}
            white = image.mean(dim=0) > 0  # normalised: white is +1, black -1
            agreement = (white == (mask > 0)).float().mean().item()
            assert agreement > 0.97
            # The off-centre block tells which way the image was flipped.
            flips_seen.add(bool(white[:, 112:].sum() > white[:, :112].sum()))
    assert len(flips_seen) == (2 if train else 1)


def test_masks_need_masked_shards(tmp_path, pattern_shards):
    manifest = json.loads((pattern_shards / "manifest.json").read_text())
    manifest["has_masks"] = False
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="no masks"):
        ShardDataset(tmp_path, "train", "species", with_mask=True)
    with pytest.raises(KeyError, match="unknown rank"):
        ShardDataset(pattern_shards, "train", "order")
    with pytest.raises(KeyError, match="unknown split"):
        ShardDataset(pattern_shards, "holdout", "species")
