"""Taxon names: whitespace, placeholders, spelling variants, epithets under two genera."""

from __future__ import annotations

import pandas as pd
import pytest
from ingest_corpus import make_dataset, save_csv

from promptcam.data.metadata import MetadataSpec, load_metadata, prepare_metadata, read_label_map
from promptcam.data.names import PLACEHOLDER_LABELS
from promptcam.data.problems import MetadataError
from promptcam.data.splits import SplitConfig


@pytest.fixture
def dataset(tmp_path) -> pd.DataFrame:
    return make_dataset(tmp_path)


def problems(dataset: pd.DataFrame, root) -> MetadataError:
    with pytest.raises(MetadataError) as caught:
        load_metadata(save_csv(dataset, root / "metadata.csv"), root, MetadataSpec())
    return caught.value


def test_whitespace_is_stripped_and_collapsed(tmp_path, dataset):
    dataset.loc[0, "species"] = "  Panthera   leo "
    dataset.loc[1, "species"] = "Panthera\tleo"
    dataset.loc[2, "genus"] = "Panthera\u00a0"  # a no-break space from a web page
    table = load_metadata(save_csv(dataset, tmp_path / "m.csv"), tmp_path, MetadataSpec())
    assert table["species"].nunique() == 4
    assert table.loc[:3, "species"].tolist() == ["Panthera leo"] * 4
    assert table.loc[2, "genus"] == "Panthera"


@pytest.mark.parametrize("placeholder", ["NA", "n/a", "null", "None", "unknown", "?", "-", "sp."])
def test_placeholders_are_missing_labels_naming_the_row(tmp_path, dataset, placeholder):
    assert placeholder.casefold() in PLACEHOLDER_LABELS
    dataset.loc[5, "species"] = placeholder
    error = problems(dataset, tmp_path)
    assert error.counts == {"missing label": 1}
    assert f"row 6: species label {placeholder!r} is a placeholder for a missing value" in str(
        error
    )
    assert "fill in the real label, or remove the row" in str(error)


def test_case_and_spacing_variants_are_one_problem_naming_both(tmp_path, dataset):
    dataset.loc[[1, 2], "species"] = "panthera leo"
    dataset.loc[3, "species"] = "Panthera_leo"
    error = problems(dataset, tmp_path)
    assert error.counts == {"inconsistent spelling": 1}
    message = str(error)
    assert "species labels 'Panthera leo' (rows 1)" in message
    assert "'Panthera_leo' (rows 4)" in message
    assert "'panthera leo' (rows 2, 3)" in message
    assert "differ only in case, spaces or underscores" in message


def test_same_epithet_under_two_genera_stays_two_species(tmp_path, dataset):
    # Species given as bare epithets: "catus" under Felis and under a second genus.
    dataset["species"] = dataset["species"].str.split(" ").str[1]
    dataset.loc[dataset["genus"] == "Canis", "species"] = "catus"
    out = tmp_path / "out"
    prepare_metadata(
        save_csv(dataset, tmp_path / "m.csv"), tmp_path, out, MetadataSpec(), SplitConfig()
    )
    species = read_label_map(out / "labels" / "species.tsv").set_index("name")
    assert sorted(species.index) == [
        "Canis catus",
        "Felis catus",
        "Panthera leo",
        "Panthera tigris",
    ]
    assert species.loc["Canis catus", "parent"] == "Canis"
    assert species.loc["Felis catus", "parent"] == "Felis"
    assert species["count"].tolist() == [4, 4, 4, 4]


def test_binomials_are_kept_as_given(tmp_path, dataset):
    table = load_metadata(save_csv(dataset, tmp_path / "m.csv"), tmp_path, MetadataSpec())
    assert table["species"].tolist() == dataset["species"].tolist()


def test_one_word_capitalised_species_under_two_genera_is_a_tree_problem(tmp_path, dataset):
    # Not an epithet (capitalised): never guessed, reported with the fix instead.
    dataset.loc[dataset["genus"] == "Felis", "species"] = "Leo"
    dataset.loc[dataset["genus"] == "Canis", "species"] = "Leo"
    error = problems(dataset, tmp_path)
    assert "species 'Leo' is under two genus labels" in str(error)
