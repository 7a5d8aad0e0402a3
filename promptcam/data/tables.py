"""Read metadata tables as people export them: any delimiter, BOMs, compression, nulls.

- Format by extension: ``.csv``/``.tsv``/``.tab`` (text) or ``.parquet``/``.pq``, optionally
  compressed (``.gz``, ``.bz2``, ``.xz``, ``.zip`` with one member; ``.zst`` needs the
  ``zstandard`` package).
- Text encoding: UTF-8, with or without a byte-order mark; UTF-16 and UTF-32 with a BOM (what
  Excel's "Unicode text" writes). Anything else (e.g. Latin-1 or Windows-1252 from older
  Excel) is refused with the file, the first undecodable byte, its line and column, and how
  to save the file as UTF-8: guessing an 8-bit code page would silently garble names.
- Delimiter: comma, semicolon, tab or pipe, whatever the extension says. The header decides
  (the delimiter under which it holds the most expected columns, e.g. ``image`` and the
  ranks); when it cannot, :class:`csv.Sniffer` on a sample; then the extension's default.
  A semicolon table with decimal commas (``1,5``) therefore reads correctly.
- Cells are text (never numbers: ``1,5`` or ``007`` stay as written), stripped; empty
  cells and parquet nulls become ``""``. Lines that are entirely empty are dropped, keeping
  the row numbers of the others. Rows with more cells than the header are an error naming
  every such line (``line`` counts the header as line 1).
"""

from __future__ import annotations

import bz2
import codecs
import csv
import gzip
import io
import lzma
import os
import posixpath
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from promptcam.data.problems import MetadataError, Problem

TEXT_DELIMITERS = {".csv": ",", ".tsv": "\t", ".tab": "\t"}
DELIMITER_CANDIDATES = (",", ";", "\t", "|")
PARQUET_SUFFIXES = {".parquet", ".pq"}
COMPRESSION_SUFFIXES = {".gz", ".bz2", ".xz", ".zst", ".zip"}
# Longest first: the UTF-32 LE mark starts with the UTF-16 LE one.
BYTE_ORDER_MARKS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
SNIFF_BYTES = 64 * 1024
SAVE_AS_UTF8 = (
    "save the table as UTF-8 (Excel: File > Save As > 'CSV UTF-8'; LibreOffice: Character set "
    "'Unicode (UTF-8)')"
)


def table_format(path: str | os.PathLike) -> tuple[str, str | None]:
    """(format suffix, compression suffix) of a table path, e.g. ('.csv', '.gz')."""
    suffixes = [suffix.lower() for suffix in Path(path).suffixes]
    compression = suffixes.pop() if suffixes and suffixes[-1] in COMPRESSION_SUFFIXES else None
    suffix = suffixes[-1] if suffixes else ""
    if suffix not in PARQUET_SUFFIXES and suffix not in TEXT_DELIMITERS:
        raise ValueError(
            f"{path}: cannot tell the table format from the extension {suffix!r}; "
            "use .csv, .tsv or .parquet"
        )
    return suffix, compression


def read_table(path: str | os.PathLike, expected_columns: Sequence[str] = ()) -> pd.DataFrame:
    """The table as stripped text, one row per data line (see the module docstring).

    ``expected_columns`` (e.g. the image column and the ranks) helps choose the delimiter.
    The index holds 0-based data-row numbers (gaps where empty lines were dropped).
    Raises :class:`MetadataError` for undecodable text or malformed lines.
    """
    suffix, compression = table_format(path)
    if suffix in PARQUET_SUFFIXES:
        table = _read_parquet(Path(path))
    else:
        text = utf8_bytes(Path(path), _raw_bytes(Path(path), compression))
        delimiter = detect_delimiter(text[:SNIFF_BYTES], expected_columns, suffix)
        table = _read_text(Path(path), text, delimiter)
    table.columns = [str(column).strip() for column in table.columns]
    for column in table.columns:  # column by column: apply() would turn text into objects
        table[column] = table[column].str.strip()
    return table[(table != "").any(axis=1)]


def _raw_bytes(path: Path, compression: str | None) -> bytes:
    if compression is None:
        return path.read_bytes()
    if compression == ".gz":
        return gzip.decompress(path.read_bytes())
    if compression == ".bz2":
        return bz2.decompress(path.read_bytes())
    if compression == ".xz":
        return lzma.decompress(path.read_bytes())
    if compression == ".zip":
        with zipfile.ZipFile(path) as archive:
            members = [name for name in archive.namelist() if not name.endswith("/")]
            if len(members) != 1:
                raise ValueError(f"{path}: a zipped table must hold exactly one file: {members}")
            return archive.read(members[0])
    try:
        import zstandard
    except ImportError as error:
        raise ValueError(f"{path}: reading .zst needs the zstandard package") from error
    with zstandard.ZstdDecompressor().stream_reader(path.open("rb")) as reader:
        return reader.read()


def utf8_bytes(path: Path, data: bytes) -> bytes:
    """``data`` as UTF-8 without a BOM; UTF-16/32 with a BOM are re-encoded."""
    for mark, encoding in BYTE_ORDER_MARKS:
        if data.startswith(mark):
            if encoding == "utf-8-sig":
                data = data[len(mark) :]
                break
            return _decoded(path, data, encoding).encode("utf-8")
    _decoded(path, data, "utf-8")  # raises, naming the first bad byte
    return data


def _decoded(path: Path, data: bytes, encoding: str) -> str:
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        byte = data[error.start : error.start + 1].hex().upper()
        raise MetadataError(
            path.name,
            [
                Problem(
                    "not UTF-8",
                    f"{path} is not {encoding.upper()} text: byte 0x{byte} at line {line}, "
                    f"column {column} cannot be decoded (an older Excel or Windows code page, "
                    "e.g. Latin-1, writes such bytes)",
                    SAVE_AS_UTF8,
                    file=str(path),
                )
            ],
        ) from None


def detect_delimiter(sample: bytes, expected_columns: Sequence[str], suffix: str) -> str:
    """The delimiter whose header holds the most expected columns (see the module docstring)."""
    text = sample.decode("utf-8", errors="replace")
    header = text.splitlines()[0] if text else ""
    wanted = {column.casefold() for column in expected_columns}
    default = TEXT_DELIMITERS.get(suffix, ",")
    scores = {}
    for delimiter in DELIMITER_CANDIDATES:
        fields = next(csv.reader([header], delimiter=delimiter), [])
        scores[delimiter] = sum(field.strip().casefold() in wanted for field in fields)
    best = max(scores.values())
    if best > 0:
        tied = [d for d in DELIMITER_CANDIDATES if scores[d] == best]
        return default if default in tied else tied[0]
    try:
        return csv.Sniffer().sniff(text, delimiters="".join(DELIMITER_CANDIDATES)).delimiter
    except csv.Error:
        return default


def _read_text(path: Path, text: bytes, delimiter: str) -> pd.DataFrame:
    if not text.strip():
        raise MetadataError(
            path.name, [Problem("empty table", f"{path} is empty", "add a header and rows")]
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", pd.errors.ParserWarning)
        table = pd.read_csv(
            io.BytesIO(text),
            sep=delimiter,
            dtype=str,
            keep_default_na=False,
            na_filter=False,
            skip_blank_lines=False,
            on_bad_lines="warn",
            encoding="utf-8",
        )
    bad_lines = [
        line.strip()
        for warning in caught
        if issubclass(warning.category, pd.errors.ParserWarning)
        for line in str(warning.message).splitlines()
        if line.startswith("Skipping line")
    ]
    if bad_lines:
        name = {",": "comma", ";": "semicolon", "\t": "tab", "|": "pipe"}[delimiter]
        raise MetadataError(
            path.name,
            [
                Problem(
                    "malformed line",
                    line.replace("Skipping line", f"{path.name}: line", 1)
                    + f" (the {name}-separated header has {len(table.columns)})",
                    f'quote cells that contain a {name} ("a{delimiter}b"), or remove the '
                    "extra cells",
                    file=str(path),
                )
                for line in bad_lines
            ],
        )
    return table


def _read_parquet(path: Path) -> pd.DataFrame:
    table = pd.read_parquet(path)
    # Nulls (None/NaN/NaT) read like empty cells; numbers and categories become text.
    return pd.DataFrame(
        {
            column: values.astype(object).where(values.notna(), "").astype(str)
            for column, values in table.items()
        }
    )


def normalise_paths(paths: pd.Series) -> pd.Series:
    """POSIX paths: backslashes (Windows) become slashes; ``.``/``..``/``//`` are resolved.

    Only the paths that need it go through :func:`posixpath.normpath` (fast for big tables).
    """
    paths = paths.str.replace("\\", "/", regex=False)
    messy = paths.str.contains(r"(?:^|/)\.{1,2}(?:/|$)|//|/$", regex=True) & (paths != "")
    if messy.any():
        paths = paths.copy()
        paths[messy] = paths[messy].map(posixpath.normpath)
    return paths
