"""Ground-truth trait masks as stored with the images."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Bit i of a demo mask marks rank i's trait (promptcam.demo.organisms writes them).
DEMO_LEVELS: tuple[str, ...] = ("family", "genus", "species")


def decode_trait_mask(
    mask: np.ndarray, levels: Sequence[str] = DEMO_LEVELS
) -> dict[str, np.ndarray]:
    """Split a bitmask image into one boolean mask per rank."""
    return {level: (mask >> bit) & 1 == 1 for bit, level in enumerate(levels)}
