"""Which heads carry the rank's classes (promptcam.traits.information): the binomial test
against scipy's, the informative flag, the feature classes, the table of the tiny run, and
the trait search dropping what the table marks uninformative."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import binomtest

from promptcam.traits.information import (
    HEAD_INFORMATION_COLUMNS,
    HeadInformationConfig,
    binomial_upper_tail,
    feature_classes,
    head_information_table,
    read_head_information,
    uninformative_heads,
    write_head_information,
)
from promptcam.traits.run import TraitRunConfig, dropped_heads
from promptcam.traits.tables import read_trait_maps


@pytest.mark.parametrize(
    ("successes", "trials", "chance"),
    [(0, 10, 0.5), (6, 10, 0.5), (10, 10, 0.5), (30, 108, 0.25), (60, 108, 0.5), (9, 108, 0.08)],
)
def test_binomial_upper_tail_equals_scipys(successes: int, trials: int, chance: float) -> None:
    expected = binomtest(successes, trials, chance, alternative="greater").pvalue
    assert binomial_upper_tail(successes, trials, chance) == pytest.approx(expected, rel=1e-9)


def test_a_head_at_chance_is_uninformative_and_a_head_above_it_is_not(tmp_path) -> None:
    # 108 validation images, 4 classes (chance 0.25): 0.27 is chance, 0.60 is not.
    table = head_information_table(np.array([0.27, 0.60, np.nan]), 4, 504, 108, 4, alpha=0.01)
    assert list(table.columns) == list(HEAD_INFORMATION_COLUMNS)
    assert table["informative"].tolist() == [False, True, True]  # unmeasured: kept
    assert table["p_value"].iloc[0] > 0.01 > table["p_value"].iloc[1]
    path = tmp_path / "head_information.tsv"
    write_head_information(path, table)
    assert uninformative_heads(read_head_information(path)) == [0]
    assert dropped_heads(TraitRunConfig(), path, num_heads=3) == [0]
    assert dropped_heads(TraitRunConfig(drop_uninformative_heads=False), None, 3) == []
    with pytest.raises(ValueError, match="rule head_information"):
        dropped_heads(TraitRunConfig(), None, num_heads=3)
    with pytest.raises(ValueError, match="another model"):
        dropped_heads(TraitRunConfig(), path, num_heads=8)
    pd.DataFrame({"head": [0]}).to_csv(path, sep="\t", index=False)
    with pytest.raises(ValueError, match="rerun the head_information rule"):
        read_head_information(path)


def test_feature_classes_are_all_or_a_fixed_sample() -> None:
    assert feature_classes(12, 64).tolist() == list(range(12))
    sample = feature_classes(10_000, 64)
    assert len(sample) == 64 == len(set(sample.tolist()))
    assert (np.diff(sample) > 0).all() and sample.max() < 10_000
    np.testing.assert_array_equal(sample, feature_classes(10_000, 64))
    with pytest.raises(ValueError, match="alpha"):
        HeadInformationConfig(alpha=1.0)


def test_tiny_run_head_information_and_the_traits_it_drops(tiny_pipeline) -> None:
    results = tiny_pipeline.workdir / "results"
    for rank in ("family", "genus", "species"):
        table = read_head_information(results / rank / "head_information.tsv")
        stored = read_trait_maps(results / rank / "trait_maps.npz")
        assert list(table["head"]) == list(range(stored.num_heads))
        assert table["class_information"].between(0, 1).all()
        assert (table["n_val_images"] > 0).all() and (table["n_train_images"] > 0).all()
        np.testing.assert_allclose(table["class_information_chance"], 1 / len(stored.label_names))
        # The test is one-sided at alpha = 0.01: informative means clearly above chance.
        informative = table["informative"].to_numpy()
        above = table["class_information"] > table["class_information_chance"]
        assert above[informative].all(), rank
        dropped = np.flatnonzero(~informative)
        searched = stored.searched
        assert not stored.kept[searched][:, dropped].any(), rank
        if len(dropped):
            assert (stored.order[searched][:, : len(dropped)] == dropped).all(), rank
