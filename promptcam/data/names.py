"""Taxon names as people type them: whitespace, placeholders, spelling variants, bare epithets.

Rules (applied to every rank's labels, for tables and folder trees alike):

- Whitespace: leading and trailing whitespace is removed and every inner run of whitespace
  (spaces, tabs, line breaks, no-break spaces) becomes one space, so ``"Panthera  leo "`` and
  ``"Panthera leo"`` are the same taxon.
- Placeholders: a label that is one of :data:`PLACEHOLDER_LABELS` (compared case-insensitively,
  e.g. ``NA``, ``unknown``, ``sp.``) means "not identified" and counts as missing, like an
  empty cell; the table is rejected with the rows named. This list is the only one.
- Spelling variants: two labels of one rank that differ only in letter case, whitespace or
  underscores (``Panthera leo`` / ``panthera leo`` / ``Panthera_leo``) are reported as one
  problem naming both spellings and their rows; they are never silently merged, nor kept as
  two taxa.
- Bare epithets: with a ``genus`` rank directly above ``species``, a species label that is
  one lowercase word (``leo``) is an epithet and is stored as the binomial ``Genus epithet``
  (``Panthera leo``), so the same epithet under two genera stays two species. Species labels
  that are already binomials (the demo's, and most tables') are left as they are.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

# Cell values that mean "no label" (compared in lower case). Extend here, nowhere else.
PLACEHOLDER_LABELS = frozenset(
    {
        "",
        "na",
        "n/a",
        "n.a.",
        "nan",
        "null",
        "none",
        "nil",
        "missing",
        "unknown",
        "unidentified",
        "undetermined",
        "indet",
        "indet.",
        "?",
        "??",
        "-",
        "--",
        ".",
        "sp",
        "sp.",
        "spp",
        "spp.",
        "#n/a",
    }
)
# Double quotes would break the quoted Newick names (whitespace is normalised away).
FORBIDDEN_LABEL_CHARACTERS = ('"',)
WHITESPACE_RUN = r"\s+"
SPELLING_NOISE = r"[\s_]+"


def on_distinct(
    values: pd.Series, function: Callable[[pd.Series], pd.Series], dtype: Any = None
) -> pd.Series:
    """``function`` applied to the distinct values only, mapped back to every row (as
    ``dtype``, by default the values' own).

    A rank has far fewer distinct labels than rows (a million images, ten thousand species),
    and regular expressions on text run in Python, not Arrow.
    """
    codes, distinct = pd.factorize(values, use_na_sentinel=False)
    done = function(pd.Series(distinct, dtype=values.dtype)).to_numpy(dtype=object)
    return pd.Series(done[codes], index=values.index, dtype=dtype or values.dtype)


def _collapse_whitespace(labels: pd.Series) -> pd.Series:
    return labels.str.replace(WHITESPACE_RUN, " ", regex=True).str.strip()


def normalise_labels(labels: pd.Series) -> pd.Series:
    """Strip and collapse every inner whitespace run to one space."""
    return on_distinct(labels, _collapse_whitespace)


def placeholder_mask(labels: pd.Series) -> pd.Series:
    """True where a (normalised) label is empty or a placeholder for a missing value."""
    # lower() runs in Arrow; the placeholders are ASCII, so it matches casefold() on them.
    return labels.str.lower().isin(PLACEHOLDER_LABELS)


@dataclass(frozen=True)
class SpellingVariant:
    """Labels of one rank that differ only in case, whitespace or underscores."""

    level: str
    spellings: tuple[str, ...]  # sorted
    rows: tuple[tuple[int, ...], ...]  # the rows (table index) of each spelling


def spelling_variants(labels: pd.Series, level: str) -> list[SpellingVariant]:
    """Groups of distinct labels of one rank that would be the same name but for spelling."""
    present = labels[~placeholder_mask(labels)]
    unique = pd.Series(present.unique())
    if unique.empty:
        return []
    keys = unique.str.casefold().str.replace(SPELLING_NOISE, "", regex=True)
    clashing = unique[keys.duplicated(keep=False)]
    if clashing.empty:
        return []
    rows = present[present.isin(set(clashing))].groupby(present, sort=True).groups
    variants = []
    for _, group in clashing.groupby(keys[clashing.index], sort=True):
        spellings = tuple(sorted(group))
        variants.append(
            SpellingVariant(
                level,
                spellings,
                tuple(tuple(int(i) for i in rows[spelling]) for spelling in spellings),
            )
        )
    return variants


def epithet_rank_pair(levels: Sequence[str]) -> tuple[str, str] | None:
    """(genus, species) level names when species sits directly under genus."""
    for parent, child in itertools.pairwise(levels):
        if parent.casefold() == "genus" and child.casefold() == "species":
            return parent, child
    return None


def qualify_epithets(table: pd.DataFrame, levels: Sequence[str]) -> int:
    """Turn bare species epithets into binomials in place; return how many rows changed.

    A species label is a bare epithet when it is a single lowercase word and its row has a
    genus label (placeholders and empty cells are left for validation to report).
    """
    pair = epithet_rank_pair(levels)
    if pair is None:
        return 0
    genus, species = pair
    one_word = on_distinct(table[species], lambda labels: labels.str.fullmatch(r"[a-z]\S*"), bool)
    epithet = one_word & ~placeholder_mask(table[species])
    has_genus = ~placeholder_mask(table[genus])
    change = (epithet & has_genus).fillna(False).astype(bool)
    if change.any():
        table.loc[change, species] = table.loc[change, genus] + " " + table.loc[change, species]
    return int(change.sum())
