"""Per-head class information, localisation and keep rates (promptcam.evaluation.heads): known
answers on hand-made data, a probe that must tell an informative head from a noise head, and
heads.tsv of the tiny run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from promptcam.evaluation.heads import (
    HeadsConfig,
    head_class_information,
    head_localization,
    keep_statistics,
    run_rank_heads,
)
from promptcam.evaluation.tables import HEADS_COLUMNS, read_heads_table
from promptcam.traits.tables import TraitMaps, read_trait_maps


def test_class_information_tells_an_informative_head_from_noise() -> None:
    rng = np.random.default_rng(0)

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, 4, n)
        features = rng.normal(size=(n, 2, 12))
        features[:, 0, :4] += 3.0 * np.eye(4)[labels]  # head 0 carries the class
        return features, labels

    information = head_class_information(split(400), split(200))
    assert information[0] > 0.9
    assert information[1] < 0.4  # chance 0.25
    one_class = (np.zeros((5, 2, 3)), np.zeros(5, int))
    assert np.isnan(head_class_information(one_class, split(10))).all()


def test_head_localization_known_answers() -> None:
    coverage = np.zeros((3, 2, 2))
    coverage[:2, 0, 0] = 1.0  # image 2 has no trait: left out
    maps = np.zeros((3, 2, 2, 2))
    maps[:, 0, 0, 0] = 1.0  # head 0 on the trait
    maps[:, 1] = [[1.0, 0.0], [0.0, 3.0]]  # head 1 mostly off it
    pointing, energy, n_images = head_localization(maps, coverage)
    assert n_images == 2
    np.testing.assert_allclose(pointing, [1.0, 0.0])
    np.testing.assert_allclose(energy, [1.0, 0.25])
    nothing = head_localization(maps[:0], coverage[:0])
    assert nothing[2] == 0 and np.isnan(nothing[0]).all()


def test_keep_statistics_count_searched_images_only() -> None:
    kept = np.array([[True, False], [True, True], [False, False]])
    kept_rank = np.array([[0, -1], [1, 0], [-1, -1]])
    order = np.array([[1, 0], [0, 1], [-1, -1]])  # image 2 was not searched
    stored = TraitMaps(
        path=Path("unused"), image=np.array(["a", "b", "c"]), target=np.zeros(3, int),
        kept=kept, kept_rank=kept_rank, order=order, label_names=np.array(["x"]),
        map_shape=(3, 2, 2, 2),
    )  # fmt: skip
    rate, rank = keep_statistics(stored)
    np.testing.assert_allclose(rate, [1.0, 0.5])
    np.testing.assert_allclose(rank, [0.5, 0.0])


@pytest.fixture(scope="module")
def tiny_heads(tiny_pipeline, tmp_path_factory) -> tuple[Path, Path]:
    results = tiny_pipeline.workdir / "results"
    out = tmp_path_factory.mktemp("heads") / "heads.tsv"
    run_rank_heads(
        checkpoint=results / "genus" / "model.pt", shards_dir=results / "shards",
        trait_maps=results / "genus" / "trait_maps.npz", rank="genus",
        levels=("family", "genus", "species"), out_tsv=out,
        config=HeadsConfig(device="cpu", batch_size=32, max_iter=500),
    )  # fmt: skip
    return out, results / "genus" / "trait_maps.npz"


def test_tiny_heads_table(tiny_heads) -> None:
    path, trait_maps = tiny_heads
    table = read_heads_table(path)
    stored = read_trait_maps(trait_maps)
    assert list(table.columns) == list(HEADS_COLUMNS)
    assert list(table["head"]) == list(range(stored.num_heads))
    np.testing.assert_allclose(table["class_information_chance"], 1 / len(stored.label_names))
    searched = stored.searched
    np.testing.assert_allclose(table["keep_rate"], stored.kept[searched].mean(axis=0))
    assert (table["n_images"] <= searched.sum()).all() and (table["n_images"] > 0).all()
    for column in ("class_information", "train_pointing_game", "pointing_game", "energy_in_mask"):
        assert table[column].between(0, 1).all(), column
    # The tiny genus model learns its classes: its best head carries them above chance.
    assert table["class_information"].max() > table["class_information_chance"].iloc[0] + 0.1
