"""Stratified, deterministic splits and the small-class rule."""

from __future__ import annotations

import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

from promptcam.data.splits import SPLITS, SplitConfig, assign_splits, split_counts, summarize_splits


def make_samples(class_sizes: dict[str, int]) -> tuple[pd.Series, pd.Series]:
    ids, classes = [], []
    for name, size in class_sizes.items():
        ids += [f"{name}-{i:04d}" for i in range(size)]
        classes += [name] * size
    return pd.Series(ids), pd.Series(classes)


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (1, {"train": 1, "val": 0, "test": 0}),
        (2, {"train": 2, "val": 0, "test": 0}),
        (3, {"train": 1, "val": 1, "test": 1}),
        (10, {"train": 8, "val": 1, "test": 1}),
        (25, {"train": 19, "val": 3, "test": 3}),  # 2.5 rounds half up
    ],
)
def test_split_counts_follow_the_documented_rule(n, expected):
    assert split_counts(n, SplitConfig(train=0.8, val=0.1, test=0.1)) == expected


def test_a_zero_fraction_split_gets_nothing():
    config = SplitConfig(train=0.9, val=0.0, test=0.1)
    assert split_counts(20, config) == {"train": 18, "val": 0, "test": 2}


def test_train_keeps_one_image_even_when_min_class_size_is_one():
    assert split_counts(1, SplitConfig(min_class_size=1)) == {"train": 1, "val": 0, "test": 0}
    assert split_counts(2, SplitConfig(min_class_size=1))["train"] == 1


@given(
    n=st.integers(min_value=0, max_value=500),
    val=st.floats(min_value=0, max_value=0.45),
    test=st.floats(min_value=0, max_value=0.45),
    min_class_size=st.integers(min_value=1, max_value=10),
)
def test_split_counts_invariants(n, val, test, min_class_size):
    config = SplitConfig(train=1 - val - test, val=val, test=test, min_class_size=min_class_size)
    counts = split_counts(n, config)
    assert sum(counts.values()) == n
    assert all(count >= 0 for count in counts.values())
    if n >= min_class_size:
        assert counts["train"] >= 1
        for split, fraction in (("val", val), ("test", test)):
            if fraction == 0:
                assert counts[split] == 0
            elif n >= 3:
                assert counts[split] >= 1
    else:
        assert counts["train"] == n


@pytest.mark.parametrize(
    "kwargs", [{"train": 0.5}, {"train": 0.0, "val": 0.5, "test": 0.5}, {"min_class_size": 0}]
)
def test_bad_split_configs_are_rejected(kwargs):
    with pytest.raises(ValueError):
        SplitConfig(**kwargs)


def test_every_sample_in_exactly_one_split_with_stratified_counts():
    ids, classes = make_samples({"a": 40, "b": 10, "c": 7, "d": 2})
    config = SplitConfig()
    splits = assign_splits(ids, classes, config)
    assert set(splits) <= set(SPLITS)
    assert splits.index.equals(ids.index)
    for name, group in splits.groupby(classes):
        counts = group.value_counts().reindex(list(SPLITS), fill_value=0).to_dict()
        assert counts == split_counts(len(group), config), name


def test_splits_are_deterministic_and_depend_on_the_seed():
    ids, classes = make_samples({"a": 50, "b": 30})
    first = assign_splits(ids, classes, SplitConfig(seed=1))
    assert first.equals(assign_splits(ids, classes, SplitConfig(seed=1)))
    assert not first.equals(assign_splits(ids, classes, SplitConfig(seed=2)))


def test_splits_ignore_row_order_and_other_classes():
    ids, classes = make_samples({"a": 30, "b": 30})
    reference = dict(zip(ids, assign_splits(ids, classes, SplitConfig()), strict=True))
    order = pd.Series(range(len(ids))).sample(frac=1, random_state=3).to_numpy()
    shuffled_ids = ids.iloc[order].reset_index(drop=True)
    shuffled_classes = classes.iloc[order].reset_index(drop=True)
    shuffled = assign_splits(shuffled_ids, shuffled_classes, SplitConfig())
    assert dict(zip(shuffled_ids, shuffled, strict=True)) == reference

    more_ids, more_classes = make_samples({"a": 30, "b": 30, "z": 12})
    with_new_class = assign_splits(more_ids, more_classes, SplitConfig())
    kept = dict(zip(more_ids, with_new_class, strict=True))
    assert {key: kept[key] for key in reference} == reference


def test_summary_marks_small_classes_and_given_splits():
    ids, classes = make_samples({"big": 10, "tiny": 2})
    config = SplitConfig()
    summary = summarize_splits(classes, assign_splits(ids, classes, config), config, given=False)
    rows = summary.set_index("class")
    assert rows.loc["tiny", "rule"] == "too_small"
    assert rows.loc["tiny", ["n_train", "n_val", "n_test"]].tolist() == [2, 0, 0]
    assert rows.loc["big", "rule"] == "stratified"
    assert rows.loc["big", "total"] == 10

    given_splits = pd.Series(["test"] * len(ids))
    summary = summarize_splits(classes, given_splits, config, given=True)
    assert set(summary["rule"]) == {"given"}
    assert summary["n_test"].sum() == len(ids)
