"""Prefix tokens and patch grids: with DINOv2's registers, the class prompts' attention maps
cover the patch tokens only, in row-major grid order; patch 14 gives a 16 x 16 grid at 224 px;
non-square and dynamic input sizes work, other sizes are refused with a clear message; the same
holds for the trait search.

The maps are checked on a backbone built so that the attention is known exactly: one block,
zero position embeddings, keys and queries the identity of the LayerNorm'd tokens, and an image
that is zero except for one pixel, so that exactly one patch token (and the CLS and register
tokens, which hold multiples of the same vector) is attended strongly. A map that kept a
register, or shifted the patches, would peak elsewhere or differ in value.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from backbone_oracles import original_vit_state

from promptcam.model.prompt_cam import PromptCAM
from promptcam.model.spec import Preprocessing, PromptCAMConfig, backbone_spec
from promptcam.training.train import resolve_transform
from promptcam.traits.naive import greedy_heads_naive
from promptcam.traits.search import greedy_heads, identify_traits

torch.set_num_threads(1)

WIDTH, HEADS, PATCH, REGISTERS, CLASSES = 8, 2, 14, 4, 3
DIRECTION = torch.tensor([3.0, -1.0, 2.0, -2.0, 1.0, -3.0, 0.5, -0.5])
QUERY_GAIN = 3.0
NAME = "vit_small_patch14_reg4_dinov2.lvd142m"
LAYOUTS = [("reference", "deep"), ("scalable", "deep")]


def peaked_dinov2_file(path: Path) -> Path:
    """Meta's DINOv2-with-registers layout (37 x 37 positions, as for 518 px), one block."""
    state = original_vit_state(
        width=WIDTH, depth=1, patch=PATCH, grid=37, family="dinov2", registers=REGISTERS
    )
    for key in state:
        if not key.startswith(("blocks.0.attn.proj", "blocks.0.mlp")):
            state[key] = torch.zeros_like(state[key])
    state["patch_embed.proj.weight"][:, 0, 0, 0] = DIRECTION  # a patch's top-left red pixel
    state["cls_token"][0, 0] = 2 * DIRECTION
    state["register_tokens"][0] = 3 * DIRECTION
    eye = torch.eye(WIDTH)
    state["blocks.0.attn.qkv.weight"] = torch.cat([QUERY_GAIN * eye, eye, eye])
    for key in ("blocks.0.norm1.weight", "blocks.0.norm2.weight", "norm.weight"):
        state[key] = torch.ones(WIDTH)
    for key in ("blocks.0.ls1.gamma", "blocks.0.ls2.gamma"):
        state[key] = torch.ones(WIDTH)
    torch.save(state, path)
    return path


def peaked_model(path: Path, layout: str, variant: str, **kwargs) -> PromptCAM:
    spec = backbone_spec({
        "name": NAME,
        "weights": str(peaked_dinov2_file(path)),
        "kwargs": {"embed_dim": WIDTH, "depth": 1, "num_heads": HEADS, **kwargs},
    })  # fmt: skip
    model = PromptCAM(spec, PromptCAMConfig(CLASSES, layout, variant)).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name in ("prompt_embeddings", "class_prompts"):
                parameter.copy_(DIRECTION.expand_as(parameter))
    return model


def one_pixel_image(height: int, width: int, row: int, col: int) -> torch.Tensor:
    image = torch.zeros(1, 3, height, width)
    image[0, 0, row * PATCH, col * PATCH] = 1.0
    return image


def expected_map(layout: str, grid: tuple[int, int], row: int, col: int) -> torch.Tensor:
    """(H, rows * cols) attention of a class prompt over the patches, computed by hand: every
    token holding a multiple of DIRECTION (the prompts in the reference layout, CLS, registers,
    the lit patch) gets logit ``gain * |LN(DIRECTION)_h|^2 / sqrt(d)``, zero tokens 0."""
    normed = F.layer_norm(DIRECTION, (WIDTH,), eps=1e-6).view(HEADS, -1)
    logits = QUERY_GAIN * (normed**2).sum(-1) / math.sqrt(WIDTH // HEADS)
    strong = (CLASSES if layout == "reference" else 0) + 1 + REGISTERS + 1
    patches = grid[0] * grid[1]
    total = strong * logits.exp() + (patches - 1)
    out = (1 / total)[:, None].repeat(1, patches)
    out[:, row * grid[1] + col] = logits.exp() / total
    return out


@pytest.mark.parametrize(("layout", "variant"), LAYOUTS)
@pytest.mark.parametrize(("size", "grid", "lit"), [
    ((224, 224), (16, 16), (11, 5)),  # patch 14 at 224 px: 16 x 16
    ((56, 84), (4, 6), (2, 5)),  # non-square: 4 rows, 6 columns
])  # fmt: skip
def test_register_maps_cover_the_patches_in_grid_order(
    tmp_path: Path, layout: str, variant: str, size: tuple, grid: tuple, lit: tuple
) -> None:
    model = peaked_model(tmp_path / "dinov2_reg.pth", layout, variant, img_size=list(size))
    assert model.backbone.num_prefix_tokens == 1 + REGISTERS
    assert model.patch_grid == grid
    image = one_pixel_image(*size, *lit)
    with torch.no_grad():
        _, attention = model.forward_with_attention(image)
    expected = expected_map(layout, grid, *lit)
    assert attention.shape == (1, HEADS, CLASSES, grid[0] * grid[1])
    for c in range(CLASSES):
        torch.testing.assert_close(attention[0, :, c], expected, rtol=1e-5, atol=1e-7)
    maps = attention[0].reshape(HEADS, CLASSES, *grid)
    peaks = [np.unravel_index(int(m.argmax()), grid) for m in maps.flatten(0, 1)]
    assert all(tuple(int(i) for i in peak) == lit for peak in peaks)

    batch = identify_traits(model, image, torch.tensor([0]))
    torch.testing.assert_close(batch.attention, attention)
    target = batch.target_maps()[0].reshape(HEADS, *grid)
    assert all(np.unravel_index(int(m.argmax()), grid) == lit for m in target)
    assert batch.trace.searched[0] and sorted(batch.trace.order[0]) == list(range(HEADS))


def test_dynamic_input_sizes_give_their_own_grid(tmp_path: Path) -> None:
    model = peaked_model(
        tmp_path / "dinov2_reg.pth", "reference", "deep", img_size=56, dynamic_img_size=True
    )
    assert model.patch_grid_for(84, 112) == (6, 8)
    with torch.no_grad():
        _, attention = model.forward_with_attention(one_pixel_image(84, 112, 4, 6))
    torch.testing.assert_close(attention[0, :, 1], expected_map("reference", (6, 8), 4, 6))
    with pytest.raises(ValueError, match="84x90 px, not a multiple of the patch size 14x14"):
        model(torch.zeros(1, 3, 84, 90))


def test_other_input_sizes_are_refused_clearly(tmp_path: Path) -> None:
    model = peaked_model(tmp_path / "dinov2_reg.pth", "scalable", "deep", img_size=56)
    with pytest.raises(ValueError, match="images are 70x70 px but the backbone takes 56x56"):
        model(torch.zeros(1, 3, 70, 70))
    with pytest.raises(ValueError, match="images are 70x70 px"):
        identify_traits(model, torch.zeros(1, 3, 70, 70), torch.tensor([0]))
    # The workflow's reader makes square images: training refuses a non-square backbone.
    non_square = Preprocessing((56, 84), (0.5,) * 3, (0.5,) * 3, "bicubic")
    with pytest.raises(ValueError, match="shard reader makes square"):
        resolve_transform(non_square, None)
    with pytest.raises(ValueError, match=r"moved to backbone\.preprocessing"):
        resolve_transform(model.preprocessing, {"mean": [0.5] * 3})


@pytest.mark.parametrize(("layout", "variant"), [*LAYOUTS, ("reference", "shallow")])
def test_trait_search_on_a_registers_backbone_matches_the_naive_search(
    tmp_path: Path, layout: str, variant: str
) -> None:
    """Random DINOv2-with-registers weights, non-square input: the batched greedy search equals
    the reference's full forwards (fp64)."""
    path = tmp_path / "dinov2_reg.pth"
    torch.save(
        original_vit_state(width=32, depth=2, patch=PATCH, grid=37, family="dinov2", registers=4),
        path,
    )
    spec = backbone_spec({
        "name": NAME,
        "weights": str(path),
        "kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 4, "img_size": [56, 84]},
    })  # fmt: skip
    model = PromptCAM(spec, PromptCAMConfig(4, layout, variant, num_agnostic_prompts=2))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if not name.startswith("backbone."):
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
    model = model.double().eval()
    images = torch.randn(6, 3, 56, 84, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        targets = model(images).argmax(-1)
    targets[:2] = (targets[:2] + 1) % 4
    batched = greedy_heads(model, images, targets)
    naive = greedy_heads_naive(model, images, targets)
    np.testing.assert_array_equal(batched.order, naive.order)
    np.testing.assert_array_equal(batched.step_predicted, naive.step_predicted)
    np.testing.assert_allclose(batched.scores, naive.scores, atol=1e-8)
    assert batched.searched.sum() == 4
