"""A converted reference checkpoint gives the reference's scores and attention maps.

The expected values come from an explicit forward written here from the raw state-dict tensors
(plain matmuls and softmax, token order [prompts, CLS, patches], prompts replaced per block),
following Imageomics/Prompt_CAM, in float64.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from timm.models.vision_transformer import VisionTransformer

from promptcam.cli import main
from promptcam.model.checkpoint import load_checkpoint
from promptcam.model.predict import load_image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

VIT = dict(img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=4)
NUM_CLASSES = 6
NUM_PATCHES = 16
LABELS = ["Larus", "Sterna", "Anas", "Aythya", "Corvus", "Pica"]


def random_reference_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A reference ``model_state_dict`` with random values of useful magnitude everywhere."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in VisionTransformer(num_classes=0, **VIT).state_dict().items():
        noise = torch.randn(tensor.shape, generator=generator)
        if name.endswith("weight") and tensor.dim() > 1:
            state[name] = noise / math.sqrt(tensor[0].numel())
        elif name.startswith(("norm", "blocks")) and "norm" in name and name.endswith("weight"):
            state[name] = 1 + 0.2 * noise
        else:
            state[name] = 0.2 * noise
    dim = VIT["embed_dim"]
    state["vpt.prompt_embeddings"] = torch.randn(
        VIT["depth"], NUM_CLASSES, dim, generator=generator
    )
    state["head.weight"] = torch.randn(1, dim, generator=generator) / math.sqrt(dim)
    state["head.bias"] = torch.randn(1, generator=generator)
    return state


def reference_forward(
    state: dict[str, torch.Tensor], images: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores (B, C) and attention[:, :, c, C+1:] (B, H, C, patches) of the reference."""
    sd = {name: tensor.double() for name, tensor in state.items()}
    images = images.double()
    heads, dim, depth = VIT["num_heads"], VIT["embed_dim"], VIT["depth"]
    batch, head_dim = images.shape[0], dim // heads

    def layer_norm(x: torch.Tensor, prefix: str) -> torch.Tensor:
        mean = x.mean(-1, keepdim=True)
        var = ((x - mean) ** 2).mean(-1, keepdim=True)
        return (x - mean) / torch.sqrt(var + 1e-6) * sd[f"{prefix}.weight"] + sd[f"{prefix}.bias"]

    def linear(x: torch.Tensor, prefix: str) -> torch.Tensor:
        return x @ sd[f"{prefix}.weight"].T + sd[f"{prefix}.bias"]

    patch = VIT["patch_size"]
    patches = images.unfold(2, patch, patch).unfold(3, patch, patch)  # B, 3, gh, gw, p, p
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(batch, NUM_PATCHES, -1)
    x = patches @ sd["patch_embed.proj.weight"].reshape(dim, -1).T + sd["patch_embed.proj.bias"]
    x = torch.cat([sd["cls_token"].expand(batch, -1, -1), x], dim=1) + sd["pos_embed"]

    for i in range(depth):
        x = torch.cat([sd["vpt.prompt_embeddings"][i].expand(batch, -1, -1), x], dim=1)
        tokens = x.shape[1]
        qkv = linear(layer_norm(x, f"blocks.{i}.norm1"), f"blocks.{i}.attn.qkv")
        q, k, v = qkv.reshape(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        attention = torch.softmax((q * head_dim**-0.5) @ k.transpose(-2, -1), dim=-1)
        mixed = (attention @ v).transpose(1, 2).reshape(batch, tokens, dim)
        x = x + linear(mixed, f"blocks.{i}.attn.proj")
        hidden = F.gelu(linear(layer_norm(x, f"blocks.{i}.norm2"), f"blocks.{i}.mlp.fc1"))
        x = x + linear(hidden, f"blocks.{i}.mlp.fc2")
        prompt_outputs, x = x[:, :NUM_CLASSES], x[:, NUM_CLASSES:]

    scores = linear(layer_norm(prompt_outputs, "norm"), "head").squeeze(-1)
    return scores, attention[:, :, :NUM_CLASSES, NUM_CLASSES + 1 :]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected).abs().max() / expected.abs().max()).item()


@pytest.fixture
def converted(tmp_path: Path, request: pytest.FixtureRequest) -> tuple[Path, dict]:
    state = random_reference_state()
    reference = tmp_path / "reference" / "model.pt"
    reference.parent.mkdir()
    torch.save({"model_state_dict": state}, reference)
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(LABELS) + "\n")
    out = tmp_path / "converted.pt"
    backbone, kwargs = request.param
    argv = ["convert-reference", str(reference), str(out), "--backbone", backbone]
    argv += ["--backbone-kwargs", json.dumps(kwargs), "--label-names", str(labels)]
    assert main(argv) == 0
    return out, state


BACKBONES = [("vit_custom", VIT), ("vit_small_patch16_224", VIT)]


@pytest.mark.parametrize("converted", BACKBONES, indirect=True, ids=["custom", "timm"])
def test_converted_checkpoint_matches_reference(converted: tuple[Path, dict]) -> None:
    out, state = converted
    assert out.with_suffix(".backbone.pt").is_file()
    payload = torch.load(out, weights_only=True)
    assert set(payload["state_dict"]) == {"prompt_embeddings", "head.weight", "head.bias"}
    assert payload["preprocessing"]["mean"] == (0.5, 0.5, 0.5)

    model, meta = load_checkpoint(out)
    assert meta.label_names == tuple(LABELS)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    expected_scores, expected_attention = reference_forward(state, images)
    scores, attention = model.forward_with_attention(images)
    assert relative_error(scores, expected_scores) < 1e-5
    assert relative_error(attention, expected_attention) < 1e-5
    assert relative_error(model(images), expected_scores) < 1e-5


@pytest.mark.parametrize("converted", BACKBONES[:1], indirect=True, ids=["custom"])
def test_predict_cli_end_to_end(tmp_path: Path, converted: tuple[Path, dict]) -> None:
    out, state = converted
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = ["a.png", "b.png", "sub/c.png"]
    for name, size in zip(names, [(32, 32), (40, 36), (20, 50)], strict=True):
        pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / name)
    (folder / "notes.txt").write_text("not an image")

    npz = tmp_path / "predictions.npz"
    assert (
        main(
            [
                "predict",
                str(out),
                str(folder),
                "--out",
                str(npz),
                "--batch-size",
                "2",
                "--all-classes",
            ]
        )
        == 0
    )

    with np.load(npz) as result:
        assert result["scores"].shape == (3, NUM_CLASSES)
        assert result["attention"].shape == (3, VIT["num_heads"], NUM_CLASSES, NUM_PATCHES)
        assert result["attention"].dtype == np.float16
        assert result["image_names"].tolist() == names
        assert result["label_names"].tolist() == LABELS
        assert result["patch_grid"].tolist() == [4, 4]
        scores, attention = result["scores"], result["attention"]

    _, meta = load_checkpoint(out)
    batch = torch.stack([load_image(folder / name, meta.preprocessing) for name in names])
    expected_scores, expected_attention = reference_forward(state, batch)
    assert relative_error(torch.from_numpy(scores), expected_scores) < 1e-5
    np.testing.assert_allclose(attention, expected_attention.numpy(), atol=1e-3)
