"""Backbone weight files as users download them: read safely, and when one does not fit the timm
name it was given to, say which file, which family the name expects and what did not match.

The layouts recognised are the originals of each family (see :mod:`promptcam.model.families`):
DINO's and timm's ViT state dicts, Meta's DINOv2 (``mask_token``, LayerScale, optionally
``register_tokens``), OpenAI's and open_clip's CLIP (``visual.*``), open_clip models with a timm
trunk (``visual.trunk.*``).
"""

from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from timm.models import load_state_dict
from torch import Tensor, nn

from promptcam.model.families import BackboneFamily, backbone_family

__all__ = ["BackboneWeightsError", "describe_file", "mismatch_error", "read_state_dict"]


class BackboneWeightsError(ValueError):
    """A backbone weight file that cannot be read, or does not fit the backbone it was given to."""


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(re.search(r"(^|/)constants\.pkl$", name) for name in archive.namelist())


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """The tensors of a weight file, read as timm's pretrained path reads them (safetensors, or
    ``torch.load(weights_only=True)``; a ``state_dict``/``model`` entry unwrapped; ``module.``
    prefixes dropped), with errors that name the file and the fix."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights {path} not found")
    if _is_torchscript(path):
        raise BackboneWeightsError(
            f"{path} is a TorchScript archive (as OpenAI's CLIP release is). Prompt-CAM reads "
            "plain state dicts only (torch.load with weights_only=True); convert it once, for a "
            'file you trust, with: python -c "import torch; torch.save(torch.jit.load('
            f"'{path}', map_location='cpu').state_dict(), '{path.with_suffix('.state_dict.pt')}')\""
        )
    try:
        state = load_state_dict(str(path))
    except Exception as error:
        hint = ""
        if "Namespace" in str(error) or "Unsupported global" in str(error):
            hint = (
                " It holds pickled Python objects besides tensors, as training checkpoints do "
                "(e.g. DINO's *_full_checkpoint.pth): use the backbone-only weight file."
            )
        raise BackboneWeightsError(
            f"{path} is not a readable PyTorch or safetensors state dict "
            f"({type(error).__name__}: {str(error)[:300]}).{hint}"
        ) from error
    if not isinstance(state, Mapping):
        raise BackboneWeightsError(f"{path} holds a {type(state).__name__}, not a state dict")
    tensors = {key: value for key, value in state.items() if isinstance(value, Tensor)}
    if not tensors:
        nested = sorted(key for key, value in state.items() if isinstance(value, Mapping))
        hint = (
            f" Its entries {nested} hold further dicts, as training checkpoints do (e.g. DINO's "
            "*_full_checkpoint.pth with teacher/student): use the backbone-only weight file."
            if nested
            else ""
        )
        raise BackboneWeightsError(f"{path} holds no tensors (keys: {_first(state)}).{hint}")
    return tensors


def _first(keys: Any, count: int = 6) -> str:
    keys = sorted(keys)
    more = f", ... ({len(keys)} in all)" if len(keys) > count else ""
    return ", ".join(keys[:count]) + more


def file_layout(state: Mapping[str, Tensor]) -> str:
    """Which original layout ``state`` is in, in words."""
    if any(key.startswith("visual.trunk.") for key in state):
        return "an open_clip model with a timm trunk (visual.trunk.*)"
    if "visual.class_embedding" in state:
        return "CLIP in OpenAI's / open_clip's layout (visual.*)"
    if "mask_token" in state:
        return "DINOv2 with registers" if "register_tokens" in state else "DINOv2 (Meta's layout)"
    if {"teacher", "student"} & {key.split(".", 1)[0] for key in state}:
        return "a DINO training checkpoint (teacher/student), not a backbone-only file"
    if "reg_token" in state:
        return "a timm ViT with register tokens"
    if "pos_embed" in state or "cls_token" in state:
        return "a timm / DINO ViT"
    return f"no layout Prompt-CAM knows (keys {_first(state)})"


def _block_count(state: Mapping[str, Tensor], prefix: str) -> int:
    indices = {int(m.group(1)) for key in state if (m := re.match(prefix + r"(\d+)\.", key))}
    return max(indices) + 1 if indices else 0


def describe_file(state: Mapping[str, Tensor]) -> dict[str, int | None]:
    """Width, depth, patch size, position-embedding tokens and registers of a ViT weight file,
    in any layout :func:`file_layout` knows (None where the file does not say)."""
    if "visual.class_embedding" in state:
        return {
            "width": state["visual.class_embedding"].shape[-1],
            "depth": _block_count(state, r"visual\.transformer\.resblocks\."),
            "patch": state["visual.conv1.weight"].shape[-1]
            if "visual.conv1.weight" in state
            else None,
            "position_tokens": state["visual.positional_embedding"].shape[0]
            if "visual.positional_embedding" in state
            else None,
            "registers": 0,
        }
    width = next(
        (state[k].shape[-1] for k in ("cls_token", "pos_embed", "norm.weight") if k in state), None
    )
    registers = next((state[k].shape[1] for k in ("register_tokens", "reg_token") if k in state), 0)
    return {
        "width": width,
        "depth": _block_count(state, r"blocks\."),
        "patch": state["patch_embed.proj.weight"].shape[-1]
        if "patch_embed.proj.weight" in state
        else None,
        "position_tokens": state["pos_embed"].shape[1] if "pos_embed" in state else None,
        "registers": registers,
    }


def describe_model(model: nn.Module) -> dict[str, int | None]:
    """The same numbers for a built timm VisionTransformer."""
    return {
        "width": model.embed_dim,
        "depth": len(model.blocks),
        "patch": model.patch_embed.patch_size[-1],
        "position_tokens": None if model.pos_embed is None else model.pos_embed.shape[1],
        "registers": model.num_reg_tokens,
    }


def _architecture_text(numbers: Mapping[str, int | None]) -> str:
    return (
        f"width {numbers['width']}, blocks {numbers['depth']}, patch {numbers['patch']}, "
        f"registers {numbers['registers']}"
    )


def architecture_differences(state: Mapping[str, Tensor], model: nn.Module) -> list[str]:
    """How the ViT in ``state`` differs from ``model`` in width, depth, patch size or registers
    (timm would silently resample a kernel of another patch size)."""
    return _differences(describe_file(state), describe_model(model))


def _differences(file: Mapping[str, Any], model: Mapping[str, Any]) -> list[str]:
    out = []
    if file["width"] not in (None, model["width"]):
        out.append(
            f"the file's embedding width is {file['width']}, the model's {model['width']} "
            "(a file of another size, e.g. ViT-L for a ViT-B name?)"
        )
    if file["depth"] and file["depth"] != model["depth"]:
        out.append(f"the file has {file['depth']} blocks, the model {model['depth']}")
    if file["patch"] not in (None, model["patch"]):
        out.append(f"the file's patch size is {file['patch']}, the model's {model['patch']}")
    if file["registers"] != model["registers"]:
        out.append(
            f"the file has {file['registers']} register tokens, the model {model['registers']}"
        )
    return out


def key_differences(
    expected: Mapping[str, Tensor], offered: Mapping[str, Tensor]
) -> tuple[list[str], list[str], list[str]]:
    """Missing keys, unexpected keys and shape mismatches of ``offered`` against ``expected``."""
    missing = sorted(set(expected) - set(offered))
    unexpected = sorted(set(offered) - set(expected))
    shapes = [
        f"{key} {tuple(offered[key].shape)} in the file vs {tuple(expected[key].shape)}"
        for key in sorted(set(expected) & set(offered))
        if offered[key].shape != expected[key].shape
    ]
    return missing, unexpected, shapes


def mismatch_error(
    name: str,
    weights: str | os.PathLike,
    model: nn.Module,
    *,
    converted: Mapping[str, Tensor] | None = None,
    cause: BaseException | None = None,
) -> BackboneWeightsError:
    """The error for weight file ``weights`` that does not fit ``model`` (built as ``name``):
    the family the name expects, the layout and size the file has, and what did not match.

    ``converted`` is the file after timm's checkpoint filter, when the filter ran.
    """
    state = read_state_dict(weights)
    family: BackboneFamily = backbone_family(name)
    lines = [
        f"backbone weights {weights} do not fit {name!r}, which expects {family.title} weights "
        f"({family.weight_file}; keys {family.expected_keys}).",
        f"The file is {file_layout(state)}: {_architecture_text(describe_file(state))}; "
        f"the model is {_architecture_text(describe_model(model))}.",
    ]
    lines += [f"- {text}" for text in architecture_differences(state, model)]
    if converted is not None:
        expected = model.state_dict()
        missing, unexpected, shapes = key_differences(expected, converted)
        for label, keys in (("missing", missing), ("unexpected", unexpected)):
            if keys:
                lines.append(f"- {label} keys after timm's conversion: {_first(keys)}")
        if shapes:
            lines.append(f"- shape mismatches: {'; '.join(shapes[:4])}")
    if cause is not None:
        lines.append(f"(timm said: {type(cause).__name__}: {str(cause).splitlines()[0][:300]})")
    lines.append("See docs/backbones.md for the timm name of each family's files.")
    return BackboneWeightsError("\n".join(lines))


def without_classifier(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``state`` less any classifier (``head.*``; a CLIP file's projection becomes one): Prompt-CAM
    replaces it with its own head."""
    return {key: value for key, value in state.items() if not key.startswith("head.")}
