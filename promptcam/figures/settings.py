"""The ``figures`` config section as settings dataclasses (defaults equal the schema's)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from promptcam.config import settings_from_config
from promptcam.figures.style import FigureStyle

TREE_LAYOUTS = ("rectangular", "circular")


@dataclass(frozen=True)
class PanelSettings:
    """Per-class trait panels: the most typical correctly classified test images of a class,
    each alone and with its kept heads' maps in importance order."""

    images_per_class: int = 3
    max_classes: int | None = 24  # None: every class
    columns: int = 2


@dataclass(frozen=True)
class GallerySettings:
    """One row per class (its top trait map on its most typical image), paginated."""

    rows_per_page: int = 12
    columns: int = 1


@dataclass(frozen=True)
class CoarseToFineSettings:
    """One image of each chosen finest-rank taxon, through every rank's model."""

    species: tuple[str, ...] = ()  # empty: one per parent (e.g. one species per genus)
    max_species: int = 12
    columns: int = 2


@dataclass(frozen=True)
class TreeSettings:
    """The taxonomy drawn with ete3, each node with its own class prompt's typical map."""

    subtree: str | None = None  # a taxon name: draw only the clade under it
    max_leaves: int = 32
    layouts: tuple[str, ...] = TREE_LAYOUTS
    columns: int = 2

    def __post_init__(self) -> None:
        unknown = [layout for layout in self.layouts if layout not in TREE_LAYOUTS]
        if unknown:
            raise ValueError(f"tree layouts {unknown}: use {list(TREE_LAYOUTS)}")


@dataclass(frozen=True)
class CrossClassSettings:
    """Class B's prompt on class A's image next to A's own prompt, for sibling pairs."""

    max_pairs: int = 6
    columns: int = 2


@dataclass(frozen=True)
class FigureSettings:
    style: FigureStyle = field(default_factory=FigureStyle)
    panels: PanelSettings = field(default_factory=PanelSettings)
    gallery: GallerySettings = field(default_factory=GallerySettings)
    coarse_to_fine: CoarseToFineSettings = field(default_factory=CoarseToFineSettings)
    tree: TreeSettings = field(default_factory=TreeSettings)
    cross_class: CrossClassSettings = field(default_factory=CrossClassSettings)


def figure_settings(section: Mapping[str, Any]) -> FigureSettings:
    """:class:`FigureSettings` from the config's ``figures`` section."""
    return settings_from_config(FigureSettings, section, "figures")
