"""Weight files in the ORIGINAL layouts of DINO and DINOv2, and the originals' forward passes
written out independently of timm, as oracles for tests/test_backbone_families.py.

Neither original is a package one can install here (facebookresearch/dino and
facebookresearch/dinov2 are loaded through torch.hub, which needs the internet; PyPI's
``dinov2`` is an unofficial 2023 copy pinned to torch 2.0, without registers). So the layouts
follow the published code and key lists, and :func:`original_vit_forward` follows the math of
``vision_transformer.py`` in both repositories (DINO commit 7c446df, DINOv2 commit b8931f7):

* tokens: ``cat(cls_token, patch_embed(x)) + interpolate_pos_encoding(...)``; DINOv2 with
  registers then inserts ``register_tokens`` after the CLS token;
* ``interpolate_pos_encoding``: the stored grid unchanged when the input has as many patches and
  is square, else bicubic ``F.interpolate`` with ``scale_factor = (grid + 0.1) / stored grid``
  and no antialiasing (both repositories' defaults);
* blocks: ``x + ls1(attn(norm1(x)))`` then ``x + ls2(mlp(norm2(x)))`` (LayerScale ``gamma``
  for DINOv2, none for DINO), explicit softmax attention with scale ``head_dim ** -0.5``, MLP
  ``fc2(GELU(fc1))``, LayerNorm eps 1e-6; a final LayerNorm ``norm`` on all tokens.

``test_oracles_match_the_official_code`` checks these functions against the official
repositories when ``DINO_REPO`` / ``DINOV2_REPO`` point at checkouts of them.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

EPS = 1e-6


def _random(generator: torch.Generator, *shape: int, scale: float = 0.2, offset: float = 0.0):
    return torch.randn(*shape, generator=generator) * scale + offset


def smooth_field(generator: torch.Generator, grid: int, width: int) -> Tensor:
    """(grid * grid, width) values that vary smoothly over the grid, as trained position
    embeddings do (random 4 x 4 control points, upsampled bicubically)."""
    coarse = torch.randn(1, width, 4, 4, generator=generator)
    field = F.interpolate(coarse, size=(grid, grid), mode="bicubic", align_corners=True)
    return field[0].flatten(1).T


def original_vit_state(
    *,
    width: int,
    depth: int,
    patch: int,
    grid: int,
    family: str,
    registers: int = 0,
    seed: int = 0,
    smooth_positions: bool = False,
) -> dict[str, Tensor]:
    """A random ViT in the original layout of ``family`` ("dino" or "dinov2"), with a square
    position-embedding grid of ``grid`` x ``grid`` patches (DINOv2's files: 37, for 518 px).

    Every tensor is random and far from its usual initialisation (LayerNorm weights around 1,
    LayerScale around 0.5, not 1e-5), so that a tensor loaded into the wrong place, or not at
    all, changes the output. ``smooth_positions``: patch position embeddings that vary smoothly
    over the grid, as trained ones do, rather than white noise.
    """
    g = torch.Generator().manual_seed(seed)
    state = {
        "cls_token": _random(g, 1, 1, width, scale=0.5),
        "pos_embed": _random(g, 1, 1 + grid * grid, width, scale=0.5),
        "patch_embed.proj.weight": _random(g, width, 3, patch, patch, scale=0.05),
        "patch_embed.proj.bias": _random(g, width, scale=0.1),
    }
    if smooth_positions:
        state["pos_embed"][0, 1:] = smooth_field(g, grid, width) * 0.5
    if family == "dinov2":
        state["mask_token"] = _random(g, 1, width)
        if registers:
            state["register_tokens"] = _random(g, 1, registers, width, scale=0.5)
    for i in range(depth):
        block = {
            "norm1.weight": _random(g, width, scale=0.1, offset=1.0),
            "norm1.bias": _random(g, width, scale=0.1),
            "attn.qkv.weight": _random(g, 3 * width, width, scale=0.3),
            "attn.qkv.bias": _random(g, 3 * width, scale=0.1),
            "attn.proj.weight": _random(g, width, width),
            "attn.proj.bias": _random(g, width, scale=0.1),
            "norm2.weight": _random(g, width, scale=0.1, offset=1.0),
            "norm2.bias": _random(g, width, scale=0.1),
            "mlp.fc1.weight": _random(g, 4 * width, width),
            "mlp.fc1.bias": _random(g, 4 * width, scale=0.1),
            "mlp.fc2.weight": _random(g, width, 4 * width),
            "mlp.fc2.bias": _random(g, width, scale=0.1),
        }
        if family == "dinov2":
            block["ls1.gamma"] = _random(g, width, scale=0.1, offset=0.5)
            block["ls2.gamma"] = _random(g, width, scale=0.1, offset=0.5)
        state.update({f"blocks.{i}.{key}": value for key, value in block.items()})
    state["norm.weight"] = _random(g, width, scale=0.1, offset=1.0)
    state["norm.bias"] = _random(g, width, scale=0.1)
    return state


def interpolate_pos_encoding(
    pos_embed: Tensor, rows: int, cols: int, *, at_load: bool = False
) -> Tensor:
    """DINO's / DINOv2's ``interpolate_pos_encoding`` for a grid of ``rows`` x ``cols`` patches.

    ``at_load``: resample instead as one does once when loading a file for a fixed input size
    (bicubic to that size, antialiased: what timm's and the reference's loaders do), which is
    not what the originals do at every forward.
    """
    stored = pos_embed.shape[1] - 1
    if rows * cols == stored and rows == cols:
        return pos_embed
    side = int(math.sqrt(stored))
    dim = pos_embed.shape[-1]
    patches = pos_embed[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    if at_load:
        patches = F.interpolate(patches, size=(rows, cols), mode="bicubic", antialias=True)
    else:
        patches = F.interpolate(
            patches,
            scale_factor=((rows + 0.1) / side, (cols + 0.1) / side),
            mode="bicubic",
            antialias=False,
        )
    assert patches.shape[-2:] == (rows, cols)
    patches = patches.permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat([pos_embed[:, :1], patches], dim=1)


def _layer_norm(x: Tensor, state: dict[str, Tensor], prefix: str) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], state[f"{prefix}.weight"], state[f"{prefix}.bias"], EPS)


def _attention(x: Tensor, state: dict[str, Tensor], prefix: str, num_heads: int) -> Tensor:
    batch, tokens, dim = x.shape
    qkv = F.linear(x, state[f"{prefix}.qkv.weight"], state[f"{prefix}.qkv.bias"])
    q, k, v = qkv.reshape(batch, tokens, 3, num_heads, dim // num_heads).permute(2, 0, 3, 1, 4)
    weights = ((q @ k.transpose(-2, -1)) * (dim // num_heads) ** -0.5).softmax(dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(batch, tokens, dim)
    return F.linear(out, state[f"{prefix}.proj.weight"], state[f"{prefix}.proj.bias"])


def _mlp(x: Tensor, state: dict[str, Tensor], prefix: str) -> Tensor:
    hidden = F.gelu(F.linear(x, state[f"{prefix}.fc1.weight"], state[f"{prefix}.fc1.bias"]))
    return F.linear(hidden, state[f"{prefix}.fc2.weight"], state[f"{prefix}.fc2.bias"])


def original_vit_forward(
    state: dict[str, Tensor], x: Tensor, *, num_heads: int, pos_at_load: bool = False
) -> dict[str, Any]:
    """The original DINO / DINOv2 forward of ``x`` (B, 3, H, W); ``pos_at_load``: see
    :func:`interpolate_pos_encoding`.

    Returns:
        ``tokens``: the final LayerNorm of all tokens [CLS, registers, patches] (B, T, D);
        ``last_block_input``: the tokens entering the last block.
    """
    weight = state["patch_embed.proj.weight"]
    patch = weight.shape[-1]
    tokens = F.conv2d(x, weight, state["patch_embed.proj.bias"], stride=patch)
    rows, cols = tokens.shape[-2:]
    tokens = tokens.flatten(2).transpose(1, 2)
    tokens = torch.cat([state["cls_token"].expand(x.shape[0], -1, -1), tokens], dim=1)
    tokens = tokens + interpolate_pos_encoding(state["pos_embed"], rows, cols, at_load=pos_at_load)
    if "register_tokens" in state:
        registers = state["register_tokens"].expand(x.shape[0], -1, -1)
        tokens = torch.cat([tokens[:, :1], registers, tokens[:, 1:]], dim=1)
    depth = 1 + max(int(key.split(".")[1]) for key in state if key.startswith("blocks."))
    last_block_input = tokens
    for i in range(depth):
        prefix = f"blocks.{i}"
        last_block_input = tokens
        attended = _attention(
            _layer_norm(tokens, state, f"{prefix}.norm1"), state, f"{prefix}.attn", num_heads
        )
        if f"{prefix}.ls1.gamma" in state:
            attended = attended * state[f"{prefix}.ls1.gamma"]
        tokens = tokens + attended
        mlp = _mlp(_layer_norm(tokens, state, f"{prefix}.norm2"), state, f"{prefix}.mlp")
        if f"{prefix}.ls2.gamma" in state:
            mlp = mlp * state[f"{prefix}.ls2.gamma"]
        tokens = tokens + mlp
    return {"tokens": _layer_norm(tokens, state, "norm"), "last_block_input": last_block_input}
