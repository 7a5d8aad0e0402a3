"""Backbones as users download them: a weight file in each family's ORIGINAL layout, from a tiny
configuration of the same architecture, loaded through the config path a user takes
(``backbone_spec({name, weights, kwargs})``), gives the original implementation's forward.

Oracles: open_clip itself for OpenAI CLIP, BioCLIP (open_clip ViT-B/16) and BioCLIP 2 (ViT-L/14);
for DINO and DINOv2, whose code is not installable here, the originals' math written out in
tests/backbone_oracles.py (checked against the official repositories by the last test when
DINO_REPO / DINOV2_REPO point at checkouts of them).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import open_clip
import pytest
import torch
from backbone_oracles import original_vit_forward, original_vit_state
from timm.data import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
)

from promptcam.model.backbone import backbone_from_spec
from promptcam.model.checkpoint import load_checkpoint, save_checkpoint
from promptcam.model.prompt_cam import PromptCAM
from promptcam.model.spec import BackboneSpec, PromptCAMConfig, backbone_spec

torch.set_num_threads(1)

TINY = dict(embed_dim=32, depth=2, num_heads=2)
ATOL = 1e-5


def build_spec(name: str, weights: Path, **kwargs: Any) -> BackboneSpec:
    """The user's path: the config's backbone section -> BackboneSpec."""
    return backbone_spec({"name": name, "weights": str(weights), "kwargs": {**TINY, **kwargs}})


def images(height: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(seed))


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


DINO_FAMILIES = [
    pytest.param("vit_base_patch16_224.dino", "dino", 16, 0, id="dino"),
    pytest.param("vit_small_patch14_dinov2.lvd142m", "dinov2", 14, 0, id="dinov2"),
    pytest.param("vit_small_patch14_reg4_dinov2.lvd142m", "dinov2", 14, 4, id="dinov2-reg4"),
]


@pytest.mark.parametrize(("name", "family", "patch", "registers"), DINO_FAMILIES)
def test_original_dino_files_give_the_original_forward(
    tmp_path: Path, name: str, family: str, patch: int, registers: int
) -> None:
    """At the file's own grid: every token, [CLS, registers, patches] in order, to 1e-5."""
    grid = 4
    state = original_vit_state(
        width=32, depth=2, patch=patch, grid=grid, family=family, registers=registers
    )
    path = tmp_path / "original.pth"
    torch.save(state, path)
    spec = build_spec(name, path, img_size=patch * grid)
    x = images(patch * grid, patch * grid)
    expected = original_vit_forward(state, x, num_heads=2)

    with torch.no_grad():
        tokens = backbone_from_spec(spec).eval().forward_features(x)
        # Prompt-CAM's own token path (embedding, prefix tokens, blocks 1..N-1); the scalable
        # layout without agnostic prompts runs those blocks unchanged.
        model = PromptCAM(spec, PromptCAMConfig(3, "scalable", num_agnostic_prompts=0)).eval()
        last_block_input = model.encode_to_last_block(x)
    assert tokens.shape == expected["tokens"].shape == (2, 1 + registers + grid * grid, 32)
    assert max_abs(tokens, expected["tokens"]) < ATOL
    assert max_abs(last_block_input, expected["last_block_input"]) < ATOL


@pytest.mark.parametrize(("name", "registers"), [
    ("vit_small_patch14_dinov2.lvd142m", 0),
    ("vit_small_patch14_reg4_dinov2.lvd142m", 4),
])  # fmt: skip
def test_dinov2_position_embeddings_are_resampled_once_at_load(
    tmp_path: Path, name: str, registers: int
) -> None:
    """DINOv2's files hold 37 x 37 positions (518 px); at another input size timm resamples them
    once, when loading (bicubic, antialiased, as the reference implementation does), where Meta's
    code interpolates at every forward (bicubic, not antialiased). The rest of the forward is the
    original's exactly; the two resamplings differ a little on smooth position embeddings."""
    state = original_vit_state(
        width=32,
        depth=2,
        patch=14,
        grid=37,
        family="dinov2",
        registers=registers,
        smooth_positions=True,
    )
    path = tmp_path / "original.pth"
    torch.save(state, path)
    x = images(224, 224)
    with torch.no_grad():
        backbone = backbone_from_spec(build_spec(name, path, img_size=224)).eval()
        tokens = backbone.forward_features(x)
    assert tuple(backbone.patch_embed.grid_size) == (16, 16)
    at_load = original_vit_forward(state, x, num_heads=2, pos_at_load=True)["tokens"]
    per_forward = original_vit_forward(state, x, num_heads=2)["tokens"]
    assert max_abs(tokens, at_load) < ATOL
    # Measured 0.08 at most, 0.008 on average, on features of magnitude ~3 (docs/backbones.md).
    assert 1e-3 < max_abs(tokens, per_forward) < 0.2


def open_clip_model(patch: int, image_size: int, quick_gelu: bool, seed: int = 0) -> Any:
    """A tiny CLIP built by open_clip itself (vision tower: width 32, 2 blocks, 2 heads), every
    weight moved off its initialisation so that a misplaced tensor shows."""
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(
        embed_dim=16,
        vision_cfg=dict(layers=2, width=32, head_width=16, patch_size=patch, image_size=image_size),
        text_cfg=dict(context_length=8, vocab_size=64, width=16, heads=2, layers=1),
        quick_gelu=quick_gelu,
    )
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    return model.eval()


def open_clip_tokens(model: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """open_clip's image embedding and its final-LayerNorm patch tokens."""
    model.visual.output_tokens = True
    with torch.no_grad():
        return model.visual(x)


CLIP_FAMILIES = [
    # OpenAI's CLIP uses QuickGELU; its state dict (from the TorchScript release) also holds
    # input_resolution, context_length and vocab_size.
    pytest.param("vit_base_patch16_clip_quickgelu_224.openai", 16, True, "openai", id="openai"),
    # BioCLIP: open_clip ViT-B-16 (GELU), open_clip_pytorch_model.bin.
    pytest.param("vit_base_patch16_clip_224", 16, False, "plain", id="bioclip"),
    # BioCLIP 2: open_clip ViT-L-14.
    pytest.param("vit_large_patch14_clip_224", 14, False, "plain", id="bioclip2"),
    # An open_clip training checkpoint: {"epoch", "state_dict": {"module.visual....": ...}}.
    pytest.param("vit_base_patch16_clip_224", 16, False, "training", id="open_clip-training"),
]


def write_clip_file(model: Any, path: Path, form: str) -> None:
    state = model.state_dict()
    if form == "openai":
        state = {**state, **{k: torch.tensor(v) for k, v in
                             {"input_resolution": 224, "context_length": 77, "vocab_size": 49408}.items()}}  # fmt: skip
    if form == "training":
        state = {
            "epoch": 3,
            "name": "run",
            "state_dict": {f"module.{k}": v for k, v in state.items()},
        }
    torch.save(state, path)


@pytest.mark.parametrize(("name", "patch", "quick_gelu", "form"), CLIP_FAMILIES)
def test_clip_files_give_open_clips_forward(
    tmp_path: Path, name: str, patch: int, quick_gelu: bool, form: str
) -> None:
    size = patch * 4
    model = open_clip_model(patch, size, quick_gelu)
    path = tmp_path / "clip.pt"
    write_clip_file(model, path, form)
    spec = build_spec(name, path, img_size=size)
    x = images(size, size)
    pooled, patch_tokens = open_clip_tokens(model, x)
    with torch.no_grad():
        tokens = backbone_from_spec(spec).eval().forward_features(x)
    # timm's final norm is CLIP's ln_post; the projection is dropped (Prompt-CAM has its own head).
    assert max_abs(tokens[:, 1:], patch_tokens) < ATOL
    assert max_abs(tokens[:, 0] @ model.visual.proj, pooled) < ATOL


def test_openai_weights_in_a_gelu_clip_differ_and_warn(tmp_path: Path) -> None:
    """vit_base_patch16_clip_224.openai is timm's GELU model; OpenAI's weights were trained with
    QuickGELU: they load, but the forward is not the original's."""
    model = open_clip_model(16, 64, quick_gelu=True)
    path = tmp_path / "openai.pt"
    write_clip_file(model, path, "openai")
    x = images(64, 64)
    with pytest.warns(UserWarning, match="QuickGELU"):
        spec = build_spec("vit_base_patch16_clip_224.openai", path, img_size=64)
    with torch.no_grad():
        tokens = backbone_from_spec(spec).eval().forward_features(x)
    assert max_abs(tokens[:, 1:], open_clip_tokens(model, x)[1]) > 1e-3


@pytest.mark.parametrize(("name", "mean", "std"), [
    ("vit_base_patch16_224.dino", IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    ("vit_small_patch14_reg4_dinov2.lvd142m", IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    ("vit_base_patch16_clip_quickgelu_224.openai", OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
    ("vit_base_patch16_clip_224", OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
    ("vit_large_patch14_clip_224", OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
])  # fmt: skip
def test_preprocessing_follows_the_weights_and_is_recorded(
    tmp_path: Path, name: str, mean: tuple, std: tuple
) -> None:
    spec = BackboneSpec(name, kwargs={**TINY, "img_size": 56 if "14" in name else 64})
    model = PromptCAM(spec, PromptCAMConfig(2))
    assert model.preprocessing.mean == pytest.approx(mean)
    assert model.preprocessing.std == pytest.approx(std)
    assert model.preprocessing.interpolation == "bicubic"
    assert model.preprocessing.img_size == tuple(model.backbone.patch_embed.img_size)

    path = tmp_path / "model.pt"
    save_checkpoint(path, model, label_names=["a", "b"])
    payload = torch.load(path, weights_only=True)
    assert payload["preprocessing"]["mean"] == pytest.approx(mean)
    assert payload["preprocessing"]["interpolation"] == "bicubic"


def test_preprocessing_override_wins_and_survives_a_checkpoint(tmp_path: Path) -> None:
    state = original_vit_state(width=32, depth=2, patch=16, grid=4, family="dino")
    weights = tmp_path / "dino.pth"
    torch.save(state, weights)
    override = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bilinear"}
    spec = backbone_spec({
        "name": "vit_base_patch16_224.dino",
        "weights": str(weights),
        "kwargs": {**TINY, "img_size": 64},
        "preprocessing": override,
    })  # fmt: skip
    model = PromptCAM(spec, PromptCAMConfig(2))
    assert (model.preprocessing.mean, model.preprocessing.interpolation) == ((0.5,) * 3, "bilinear")
    path = tmp_path / "model.pt"
    save_checkpoint(path, model, label_names=["a", "b"])
    loaded, meta = load_checkpoint(path)
    assert meta.preprocessing == model.preprocessing == loaded.preprocessing
    # Only the preprocessing was overridden: the weights are DINO's, the forward the original's.
    x = images(64, 64)
    with torch.no_grad():
        tokens = loaded.backbone.forward_features(x)
    assert max_abs(tokens, original_vit_forward(state, x, num_heads=2)["tokens"]) < ATOL


@pytest.mark.skipif(
    not (os.environ.get("DINO_REPO") and os.environ.get("DINOV2_REPO")),
    reason="set DINO_REPO and DINOV2_REPO to checkouts of facebookresearch/dino and /dinov2",
)
def test_oracles_match_the_official_code(monkeypatch: pytest.MonkeyPatch) -> None:
    """The oracles of tests/backbone_oracles.py against the official code, where available."""
    import functools

    monkeypatch.setenv("XFORMERS_DISABLED", "1")
    monkeypatch.syspath_prepend(os.environ["DINO_REPO"])
    monkeypatch.syspath_prepend(os.environ["DINOV2_REPO"])
    import vision_transformer as dino
    from dinov2.models.vision_transformer import DinoVisionTransformer

    norm = functools.partial(torch.nn.LayerNorm, eps=1e-6)
    official = dino.VisionTransformer(
        img_size=[64], patch_size=16, embed_dim=32, depth=2, num_heads=2, qkv_bias=True,
        norm_layer=norm,
    )  # fmt: skip
    state = original_vit_state(width=32, depth=2, patch=16, grid=4, family="dino")
    official.load_state_dict(state, strict=True)
    x = images(64, 96)
    with torch.no_grad():
        expected = official.get_intermediate_layers(x, 1)[0]
    assert max_abs(original_vit_forward(state, x, num_heads=2)["tokens"], expected) < ATOL
    for registers in (0, 4):
        official = DinoVisionTransformer(
            img_size=112, patch_size=14, embed_dim=32, depth=2, num_heads=2, init_values=1.0,
            block_chunks=0, num_register_tokens=registers,
        ).eval()  # fmt: skip
        state = original_vit_state(
            width=32, depth=2, patch=14, grid=8, family="dinov2", registers=registers
        )
        official.load_state_dict(state, strict=True)
        for height, width in ((112, 112), (56, 84)):
            x = images(height, width)
            with torch.no_grad():
                expected = official.norm(official.forward_features(x)["x_prenorm"])
            assert max_abs(original_vit_forward(state, x, num_heads=2)["tokens"], expected) < ATOL
    sys.modules.pop("vision_transformer", None)


def test_the_reader_resizes_with_the_preprocessings_interpolation() -> None:
    """Bilinear (the demo's) is exactly the reader's former transform; bicubic (DINO's, CLIP's)
    is torchvision's bicubic resize."""
    import numpy as np
    import torchvision.transforms.functional as TF
    from PIL import Image
    from torchvision.transforms import InterpolationMode, v2

    from promptcam.data.reader import TransformConfig, build_transform
    from promptcam.model.spec import Preprocessing

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8))
    mean = std = (0.5, 0.5, 0.5)
    former = v2.Compose([
        v2.Resize((32, 32)), v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(mean), std=list(std)),
    ])  # fmt: skip
    bilinear = TransformConfig.unaugmented(Preprocessing((32, 32), mean, std, "bilinear"))
    assert torch.equal(build_transform(bilinear, train=False)(image), former(image))

    bicubic = TransformConfig.unaugmented(Preprocessing((32, 32), mean, std, "bicubic"))
    expected = TF.normalize(
        TF.to_tensor(TF.resize(image, [32, 32], InterpolationMode.BICUBIC)), mean, std
    )
    out = build_transform(bicubic, train=False)(image)
    assert max_abs(out, expected) < 1e-6
    assert max_abs(out, former(image)) > 1e-2
