"""Text as the figures print it: taxon names (italic by nomenclature), sizes at print size in
mm, wrapping to a width, and labels made file names."""

from __future__ import annotations

import re
import textwrap
from collections.abc import Sequence

from matplotlib.font_manager import FontProperties
from matplotlib.textpath import TextPath

MM_PER_POINT = 25.4 / 72
LINE_SPACING = 1.2
# Ranks whose names are italic by nomenclature (and every rank below family when present).
ITALIC_RANKS = frozenset({"genus", "subgenus", "section", "series", "species", "subspecies",
                          "variety", "form", "forma"})  # fmt: skip
LETTERS = re.compile(r"[^\W\d_]+")


def is_italic(rank: str, levels: Sequence[str] = ()) -> bool:
    """Genus and species names (and any rank below family in ``levels``) are set in italics."""
    if rank.lower() in ITALIC_RANKS:
        return True
    lowered = [level.lower() for level in levels]
    return "family" in lowered and rank.lower() in lowered[lowered.index("family") + 1 :]


def filename_safe(name: str, fallback: str = "taxon") -> str:
    """``Homo sapiens`` -> ``Homo_sapiens``: letters, digits, ``.``, ``_`` and ``-`` only."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or fallback


def plain_text(text: str) -> str:
    """``text`` safe to show as is (a dollar sign would start mathtext)."""
    return text.replace("$", r"\$")


def italic_text(text: str) -> str:
    """``text`` as mathtext with its letters in italic (TrueType like the rest: no Type 3)."""
    parts, position = [], 0
    for match in LETTERS.finditer(text):
        parts.append(plain_text(text[position : match.start()]))
        parts.append(f"$\\mathit{{{match.group()}}}$")
        position = match.end()
    parts.append(plain_text(text[position:]))
    return "".join(parts)


def taxon_text(name: str, rank: str, levels: Sequence[str] = ()) -> str:
    """A class name as printed: italic at genus rank and below (Linnaean names), else plain."""
    return italic_text(name) if is_italic(rank, levels) else plain_text(name)


def wrap_lines(text: str, width: int) -> list[str]:
    """``text`` broken at spaces into lines of at most ``width`` characters (a longer word
    keeps a line of its own)."""
    lines = textwrap.wrap(text, max(width, 1), break_long_words=False, break_on_hyphens=False)
    return lines or [""]


def taxon_lines(name: str, rank: str, width: int) -> str:
    """:func:`taxon_text` of ``name`` wrapped to ``width`` characters per line."""
    return "\n".join(taxon_text(line, rank) for line in wrap_lines(name, width))


def text_width_mm(text: str, size_pt: float, family: str, italic: bool = False) -> float:
    """The printed width of plain ``text`` at ``size_pt`` (for sizing a label column)."""
    if not text:
        return 0.0
    prop = FontProperties(family=[family, "DejaVu Sans"], style="italic" if italic else "normal")
    return TextPath((0, 0), text, size=size_pt, prop=prop).get_extents().width * MM_PER_POINT


def text_size_mm(text: str, size_pt: float) -> tuple[float, float]:
    """Width and height in mm of ``text`` (lines, mathtext) at ``size_pt`` in the current
    rcParams' font (call inside :func:`promptcam.figures.style.styled`)."""
    if not text:
        return 0.0, 0.0
    from matplotlib.backends.backend_agg import RendererAgg
    from matplotlib.cbook import is_math_text

    renderer, prop = RendererAgg(1, 1, 72), FontProperties(size=size_pt)
    widths = []
    for line in text.split("\n"):
        math = is_math_text(line)
        shown = line if math else line.replace(r"\$", "$")
        widths.append(renderer.get_text_width_height_descent(shown, prop, ismath=math)[0])
    lines = text.count("\n") + 1
    return max(widths) * MM_PER_POINT, lines * LINE_SPACING * size_pt * MM_PER_POINT


def wrap_mm(text: str, width_mm: float, size_pt: float, family: str) -> str:
    """``text`` broken at spaces into lines that print at most ``width_mm`` wide."""
    lines: list[str] = []
    for word in text.split(" "):
        if lines and text_width_mm(f"{lines[-1]} {word}", size_pt, family) <= width_mm:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return "\n".join(lines)
