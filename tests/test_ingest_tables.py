"""Tables as people export them: delimiters, encodings, compression, nulls, Windows paths."""

from __future__ import annotations

import gzip

import pandas as pd
import pytest
from ingest_corpus import make_dataset, save_csv

from promptcam.data.metadata import MetadataSpec, load_metadata, prepare_metadata
from promptcam.data.problems import MetadataError
from promptcam.data.splits import SplitConfig
from promptcam.data.tables import read_table

EXPECTED = ["image", "family", "genus", "species"]


@pytest.fixture
def dataset(tmp_path) -> pd.DataFrame:
    return make_dataset(tmp_path)


def loaded(path, root) -> pd.DataFrame:
    return load_metadata(path, root, MetadataSpec())


@pytest.mark.parametrize(("delimiter", "suffix"), [(";", ".csv"), ("\t", ".csv"), (",", ".tsv")])
def test_delimiter_is_detected_whatever_the_extension(tmp_path, dataset, delimiter, suffix):
    path = save_csv(dataset, tmp_path / f"metadata{suffix}", sep=delimiter)
    table = loaded(path, tmp_path)
    assert table["species"].tolist() == dataset["species"].tolist()


def test_semicolon_table_with_decimal_commas(tmp_path, dataset):
    dataset["length_cm"] = [f"{i},5" for i in range(len(dataset))]  # European decimals
    dataset["split"] = ["train"] * 12 + ["val", "test", "val", "test"]
    path = save_csv(dataset, tmp_path / "metadata.csv", sep=";")
    raw = read_table(path, EXPECTED)
    assert raw["length_cm"].tolist()[:2] == ["0,5", "1,5"]  # text, never a number
    table = loaded(path, tmp_path)
    assert table["image"].tolist() == dataset["image"].tolist()
    assert table["split"].tolist() == dataset["split"].tolist()


def test_sniffer_decides_when_the_header_has_no_expected_column(tmp_path):
    (tmp_path / "t.csv").write_text("a;b;c\n1;2;3\n4;5;6\n")
    assert read_table(tmp_path / "t.csv").columns.tolist() == ["a", "b", "c"]


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-16-be", "utf-32"])
def test_byte_order_marks_are_read(tmp_path, dataset, encoding):
    dataset.loc[0, "species"] = dataset.loc[1, "species"] = "Panthera léo"  # non-ASCII survives
    text = dataset.to_csv(index=False, sep="\t")
    data = text.encode(encoding)
    if encoding == "utf-16-be":
        data = b"\xfe\xff" + data  # the big-endian codec writes no BOM by itself
    (tmp_path / "metadata.tsv").write_bytes(data)
    assert read_table(tmp_path / "metadata.tsv").columns[0] == "image"  # no BOM glued to it
    table = loaded(tmp_path / "metadata.tsv", tmp_path)
    assert table.loc[0, "species"] == "Panthera léo"


def test_latin1_is_refused_naming_the_byte_and_line(tmp_path, dataset):
    dataset.loc[5, "genus"] = "Panthéra"
    path = tmp_path / "metadata.csv"
    path.write_bytes(dataset.to_csv(index=False).encode("latin-1"))
    with pytest.raises(MetadataError) as caught:
        read_table(path, EXPECTED)
    message = str(caught.value)
    assert "byte 0xE9 at line 7, column" in message  # the header is line 1, data row 6 line 7
    assert str(path) in message
    assert "save the table as UTF-8" in message


def test_compressed_tables(tmp_path, dataset):
    path = tmp_path / "metadata.csv.gz"
    path.write_bytes(gzip.compress(dataset.to_csv(index=False, sep=";").encode()))
    assert loaded(path, tmp_path)["image"].tolist() == dataset["image"].tolist()


def test_windows_backslash_paths_are_accepted(tmp_path, dataset):
    dataset["image"] = dataset["image"].str.replace("/", "\\")
    dataset.loc[3, "image"] = ".\\images\\sub\\..\\" + dataset.loc[3, "image"].split("\\")[-1]
    table = loaded(save_csv(dataset, tmp_path / "metadata.csv"), tmp_path)
    assert table.loc[0, "image"] == "images/Panthera_leo_0.png"
    assert table.loc[3, "image"] == "images/Panthera_leo_3.png"


def test_windows_drive_paths_are_a_problem_with_the_fix(tmp_path, dataset):
    dataset.loc[2, "image"] = "C:\\data\\images\\Panthera_leo_2.png"
    with pytest.raises(MetadataError) as caught:
        loaded(save_csv(dataset, tmp_path / "metadata.csv"), tmp_path)
    message = str(caught.value)
    assert "row 3: image path 'C:/data/images/Panthera_leo_2.png' is an absolute Windows path" in (
        message
    )
    assert "relative to `dataset.image_root`" in message


def test_parquet_nulls_are_empty_cells(tmp_path, dataset):
    dataset["species"] = dataset["species"].astype(object)
    dataset.loc[4, "species"] = None
    dataset["count"] = range(len(dataset))  # numbers become text, they never crash
    dataset.loc[6, "count"] = None
    dataset.to_parquet(tmp_path / "metadata.parquet", index=False)
    raw = read_table(tmp_path / "metadata.parquet")
    assert raw.loc[4, "species"] == "" and raw.loc[6, "count"] == ""
    with pytest.raises(MetadataError, match="row 5: empty species label"):
        loaded(tmp_path / "metadata.parquet", tmp_path)


def test_empty_lines_are_dropped_keeping_row_numbers(tmp_path, dataset):
    lines = dataset.to_csv(index=False).splitlines()
    lines.insert(3, "")  # after data row 2
    lines.insert(5, ",,,")  # Excel's empty row
    lines[7] = lines[7].replace("Felidae", "")  # data row 7 (the empty lines count as rows)
    (tmp_path / "metadata.csv").write_text("\n".join(lines) + "\n")
    raw = read_table(tmp_path / "metadata.csv", EXPECTED)
    assert len(raw) == len(dataset)
    with pytest.raises(MetadataError, match="row 7: empty family label"):
        loaded(tmp_path / "metadata.csv", tmp_path)


def test_lines_with_extra_cells_are_all_named(tmp_path, dataset):
    lines = dataset.to_csv(index=False).splitlines()
    lines[2] += ",extra"
    lines[9] = lines[9].replace("Felis catus", "Felis catus, L.")
    (tmp_path / "metadata.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(MetadataError) as caught:
        read_table(tmp_path / "metadata.csv", EXPECTED)
    error = caught.value
    assert error.counts == {"malformed line": 2}
    assert "metadata.csv: line 3: expected 4 fields, saw 5" in str(error)
    assert "line 10: expected 4 fields, saw 5" in str(error)
    assert 'quote cells that contain a comma ("a,b")' in str(error)


def test_missing_column_hints_at_a_case_mismatch(tmp_path, dataset):
    dataset = dataset.rename(columns={"species": "Species"})
    with pytest.raises(MetadataError, match="there is 'Species': column names are case-sensitive"):
        loaded(save_csv(dataset, tmp_path / "metadata.csv"), tmp_path)


def test_unreadable_tables_are_listed_in_problems_tsv_too(tmp_path, dataset):
    path = tmp_path / "metadata.csv"
    path.write_bytes(dataset.to_csv(index=False).replace("Canis", "Cañis").encode("cp1252"))
    out = tmp_path / "out"
    with pytest.raises(MetadataError, match=r"problems\.tsv"):
        prepare_metadata(path, tmp_path, out, MetadataSpec(), SplitConfig())
    listed = pd.read_csv(out / "problems.tsv", sep="\t", dtype=str)
    assert listed["problem"].tolist() == ["not UTF-8"]
    assert "byte 0xF1 at line 14" in listed.loc[0, "detail"]


def test_empty_file_is_a_clear_problem(tmp_path):
    (tmp_path / "metadata.csv").write_text("\n")
    with pytest.raises(MetadataError, match=r"metadata\.csv is empty"):
        read_table(tmp_path / "metadata.csv")
