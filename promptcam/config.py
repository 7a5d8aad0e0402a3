"""Config sections as the library takes them; no torch import, so the workflow can use it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

# Precision of the blocks before the last in the greedy trait search (promptcam.traits).
EncodePrecision = Literal["auto", "fp32", "bf16"]
ENCODE_PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")


def merged(defaults: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``defaults`` updated by ``overrides``, recursively for nested mappings."""
    out = dict(defaults)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def rank_train_settings(
    train_section: Mapping[str, Any], rank: str, levels: Sequence[str]
) -> dict[str, Any]:
    """One rank's training, model and transform settings: the config's ``train.defaults``
    merged with ``train.ranks[rank]``."""
    unknown = set(train_section["ranks"]) - set(levels)
    if unknown:
        raise ValueError(f"config train.ranks names unknown ranks {sorted(unknown)}")
    return merged(train_section["defaults"], train_section["ranks"].get(rank, {}))
