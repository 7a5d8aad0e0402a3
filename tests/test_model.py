"""Unit and property tests of promptcam.model on tiny ViTs."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from promptcam.model.backbone import build_backbone
from promptcam.model.checkpoint import BackboneMismatchError, load_checkpoint, save_checkpoint
from promptcam.model.prompt_cam import PromptCAM
from promptcam.model.spec import BackboneSpec, PromptCAMConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=4)
NUM_CLASSES = 5
NUM_PATCHES = 16
LAYOUTS = [("reference", "deep"), ("reference", "shallow"), ("scalable", "deep")]


def make_model(
    layout: str = "reference",
    variant: str = "deep",
    vit: Mapping[str, Any] = TINY_VIT,
    seed: int = 0,
    **config: Any,
) -> PromptCAM:
    torch.manual_seed(seed)
    spec = BackboneSpec("vit_custom", kwargs=dict(vit))
    cfg = PromptCAMConfig(
        num_classes=NUM_CLASSES, layout=layout, variant=variant, num_agnostic_prompts=3, **config
    )
    return PromptCAM(spec, cfg).eval()


def images(batch: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("layout", "variant"), LAYOUTS)
def test_backbone_frozen_and_only_prompts_train(layout: str, variant: str) -> None:
    model = make_model(layout, variant).train()
    before = {name: t.clone() for name, t in model.backbone.state_dict().items()}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    expected = {"head.weight", "head.bias"} | (
        {"prompt_embeddings"}
        if layout == "reference"
        else {"agnostic_prompts", "class_prompts", "readout_token"}
    )
    assert trainable == expected
    assert not model.backbone.training

    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-3)
    labels = torch.tensor([0, 1, 2])
    start = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    for _ in range(3):
        optimizer.zero_grad()
        F.cross_entropy(model(images()), labels).backward()
        optimizer.step()
    assert all(torch.equal(before[n], t) for n, t in model.backbone.state_dict().items())
    assert all(not torch.equal(start[n], p) for n, p in model.named_parameters() if n in start)


def test_training_mode_applies_prompt_dropout_and_drop_path() -> None:
    model = make_model(prompt_dropout=0.5, drop_path_rate=0.5).train()
    x = images()
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


@pytest.mark.parametrize(("layout", "variant"), LAYOUTS)
def test_scores_attention_and_cached_last_block_agree(layout: str, variant: str) -> None:
    model = make_model(layout, variant)
    x = images()
    scores = model(x)
    assert scores.shape == (3, NUM_CLASSES)
    with_attention, attention = model.forward_with_attention(x)
    torch.testing.assert_close(with_attention, scores, rtol=1e-5, atol=1e-6)
    assert attention.shape == (3, 4, NUM_CLASSES, NUM_PATCHES)
    assert bool((attention.sum(-1) < 1).all())  # not renormalised: prompts and CLS take a share

    tokens = model.encode_to_last_block(x)
    assert torch.equal(model.last_block_scores(tokens), scores)
    no_heads = torch.zeros(3, model.num_heads, dtype=torch.bool)
    class_index = torch.tensor([0, 4, 2])
    torch.testing.assert_close(
        model.last_block_scores(tokens, class_index, no_heads), scores, rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize(("layout", "variant"), LAYOUTS)
def test_blurred_heads_mean_uniform_attention_of_one_row(layout: str, variant: str) -> None:
    model = make_model(layout, variant)
    tokens = model.encode_to_last_block(images())
    class_index = torch.tensor([1, 3, 0])
    blurred = torch.tensor([[1, 0, 0, 1], [0, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)

    plain_scores, plain_attention = model.last_block_attention(tokens)
    scores, attention = model.last_block_attention(tokens, class_index, blurred)
    num_keys = tokens.shape[1] + (NUM_CLASSES if (layout, variant) == ("reference", "deep") else 0)
    for image, cls in enumerate(class_index.tolist()):
        for head in range(4):
            row = attention[image, head, cls]
            if blurred[image, head]:
                torch.testing.assert_close(row, torch.full_like(row, 1 / num_keys))
            else:
                assert torch.equal(row, plain_attention[image, head, cls])
        others = [c for c in range(NUM_CLASSES) if c != cls]
        assert torch.equal(scores[image, others], plain_scores[image, others])
        assert torch.equal(attention[image, :, others], plain_attention[image, :, others])

    fused = model.last_block_scores(tokens, class_index, blurred)
    torch.testing.assert_close(fused, scores, rtol=1e-5, atol=1e-6)

    # K candidate head sets per image in one call == one call per candidate.
    candidates = torch.stack([blurred, ~blurred, torch.zeros_like(blurred)], dim=1)
    batched = model.last_block_scores(tokens, class_index, candidates)
    assert batched.shape == (3, 3, NUM_CLASSES)
    for k in range(3):
        torch.testing.assert_close(
            batched[:, k],
            model.last_block_scores(tokens, class_index, candidates[:, k]),
            rtol=1e-5,
            atol=1e-6,
        )


def test_scalable_layout_scores_depend_only_on_attention() -> None:
    """Identical image tokens leave a class nothing to attend to: all scores are equal."""
    tokens = torch.randn(2, 1, 64, generator=torch.Generator().manual_seed(0))
    tokens = tokens.expand(2, 1 + NUM_PATCHES, 64)
    scalable = make_model("scalable")
    with torch.no_grad():
        scalable.class_prompts.normal_(std=3.0)
    scores = scalable.last_block_scores(tokens)
    torch.testing.assert_close(scores, scores[:, :1].expand_as(scores), rtol=0, atol=1e-5)
    assert scores.std() > 0  # different images still differ

    # The reference layout lacks the property: its prompts are also the residual stream.
    reference = make_model("reference").last_block_scores(tokens)
    assert (reference.max(1).values - reference.min(1).values).min() > 1e-3


def test_shallow_variant_differs_from_deep() -> None:
    deep, shallow = make_model("reference", "deep"), make_model("reference", "shallow")
    assert shallow.prompt_embeddings.shape == (1, NUM_CLASSES, 64)
    with torch.no_grad():
        shallow.prompt_embeddings.copy_(deep.prompt_embeddings[:1])
        shallow.head.load_state_dict(deep.head.state_dict())
    x = images()
    assert shallow(x).shape == deep(x).shape
    assert not torch.allclose(shallow(x), deep(x))


def timm_block_forward(model: PromptCAM, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference-layout deep forward through timm's own Block.forward, attention materialised."""
    vit, prompts = model.backbone, model.prompt_embeddings
    tokens = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
    for block, block_prompts in zip(vit.blocks[:-1], prompts[:-1], strict=True):
        tokens = block(torch.cat([block_prompts.expand(len(x), -1, -1), tokens], 1))
        tokens = tokens[:, NUM_CLASSES:]
    block = vit.blocks[-1]
    sequence = torch.cat([prompts[-1].expand(len(x), -1, -1), tokens], 1)
    q, k, _ = block.attn.qkv(block.norm1(sequence)).unflatten(-1, (3, 4, -1)).permute(2, 0, 3, 1, 4)
    q, k = block.attn.q_norm(q), block.attn.k_norm(k)
    attention = (q @ k.transpose(-2, -1) / 4).softmax(-1)
    out = vit.norm(block(sequence)[:, :NUM_CLASSES])
    return model.head(out).squeeze(-1), attention[:, :, :NUM_CLASSES, -NUM_PATCHES:]


@pytest.mark.parametrize(
    "prefix",
    [
        dict(reg_tokens=4, no_embed_class=True),
        dict(class_token=False, global_pool="avg", fc_norm=False),
        dict(class_token=False, reg_tokens=2, global_pool="avg", fc_norm=False),
        dict(qk_norm=True, init_values=0.1),
    ],
)
def test_prefix_tokens_and_block_options(prefix: dict[str, Any]) -> None:
    model = make_model(vit={**TINY_VIT, **prefix})
    x = images(2)
    scores, attention = model.forward_with_attention(x)
    expected_scores, expected_attention = timm_block_forward(model, x)
    torch.testing.assert_close(scores, expected_scores, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(attention, expected_attention, rtol=1e-5, atol=1e-6)


def test_scalable_without_agnostic_prompts_runs_the_backbone_unchanged() -> None:
    spec = BackboneSpec("vit_custom", kwargs={**TINY_VIT, "reg_tokens": 2})
    config = PromptCAMConfig(NUM_CLASSES, "scalable", num_agnostic_prompts=0)
    model = PromptCAM(spec, config).eval()
    x = images(2)
    vit = model.backbone
    expected = vit.blocks[:-1](vit.norm_pre(vit._pos_embed(vit.patch_embed(x))))
    torch.testing.assert_close(model.encode_to_last_block(x), expected, rtol=1e-5, atol=1e-6)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="shallow"):
        PromptCAMConfig(3, layout="scalable", variant="shallow")
    with pytest.raises(ValueError, match="layout"):
        PromptCAMConfig(3, layout="other")


@pytest.fixture
def backbone_weights(tmp_path: Path) -> Path:
    path = tmp_path / "backbone.pt"
    torch.manual_seed(7)
    torch.save(build_backbone("vit_custom", **TINY_VIT).state_dict(), path)
    return path


@pytest.mark.parametrize(("layout", "variant"), LAYOUTS)
def test_checkpoint_round_trip(
    tmp_path: Path, backbone_weights: Path, layout: str, variant: str
) -> None:
    config = PromptCAMConfig(NUM_CLASSES, layout, variant, num_agnostic_prompts=2)
    model = PromptCAM(BackboneSpec("vit_custom", str(backbone_weights), TINY_VIT), config).eval()
    with torch.no_grad():
        model.head.bias.fill_(0.25)
    names = [f"taxon {i}" for i in range(NUM_CLASSES)]
    path = tmp_path / "model.pt"
    save_checkpoint(path, model, label_names=names, extra={"epoch": 3})

    payload = torch.load(path, weights_only=True)
    assert not any(name.startswith("backbone") for name in payload["state_dict"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(payload["state_dict"]) == trainable

    loaded, meta = load_checkpoint(path)
    x = images()
    assert torch.equal(loaded(x), model(x))
    assert meta.label_names == tuple(names)
    assert meta.extra == {"epoch": 3}
    assert meta.preprocessing.img_size == (32, 32)

    moved = tmp_path / "elsewhere.pt"
    backbone_weights.rename(moved)
    assert torch.equal(load_checkpoint(path, backbone_weights=moved)[0](x), model(x))


def test_checkpoint_rejects_other_backbone_weights(tmp_path: Path, backbone_weights: Path) -> None:
    spec = BackboneSpec("vit_custom", str(backbone_weights), TINY_VIT)
    path = tmp_path / "model.pt"
    save_checkpoint(path, PromptCAM(spec, PromptCAMConfig(NUM_CLASSES)), label_names="abcde")
    other = tmp_path / "other.pt"
    torch.save(build_backbone("vit_custom", **TINY_VIT).state_dict(), other)
    with pytest.raises(BackboneMismatchError, match="sha256"):
        load_checkpoint(path, backbone_weights=other)


def test_checkpoint_of_random_backbone_is_reproducible(tmp_path: Path) -> None:
    model = make_model("scalable")
    path = tmp_path / "model.pt"
    save_checkpoint(path, model, label_names=[str(i) for i in range(NUM_CLASSES)])
    x = images()
    assert torch.equal(load_checkpoint(path)[0](x), model(x))


def test_timm_named_backbone_loads_local_weights(tmp_path: Path) -> None:
    kwargs = dict(TINY_VIT, depth=2)
    random = build_backbone("vit_small_patch16_224", None, **kwargs)
    path = tmp_path / "weights.pt"
    torch.save(random.state_dict(), path)
    loaded = build_backbone("vit_small_patch16_224", path, **kwargs)
    assert all(torch.equal(random.state_dict()[n], t) for n, t in loaded.state_dict().items())


@pytest.mark.parametrize(("layout", "variant"), LAYOUTS)
def test_class_rows_in_autocast_dtype_run_wholly_in_bf16(layout: str, variant: str) -> None:
    """The speed option moves the class rows' LayerNorm inputs (the residual stream) from fp32,
    where autocast keeps them, to bf16, and keeps scores and gradients to bf16 precision."""
    model = make_model(layout, variant)
    with torch.no_grad():
        # Peaked attention and a spread head, so that scores differ between classes by far
        # more than bf16 rounding (a random tiny ViT's attention is near uniform).
        model.backbone.blocks[-1].attn.qkv.weight.mul_(10.0)
        model.head.weight.normal_()
    x, labels = images(6), torch.arange(6) % NUM_CLASSES
    norm_input_dtypes: list[torch.dtype] = []
    model.backbone.blocks[-1].norm2.register_forward_pre_hook(
        lambda module, args: norm_input_dtypes.append(args[0].dtype)
    )

    def run(
        autocast: bool, class_rows_in_autocast_dtype: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        model.class_rows_in_autocast_dtype = class_rows_in_autocast_dtype
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            scores = model(x)
        F.cross_entropy(scores.float(), labels).backward()
        grads = [p.grad.flatten() for p in model.parameters() if p.requires_grad]
        return scores.detach().float(), torch.cat(grads)

    fp32_scores, fp32_grads = run(autocast=False, class_rows_in_autocast_dtype=True)
    mixed_scores, mixed_grads = run(autocast=True, class_rows_in_autocast_dtype=False)
    bf16_scores, bf16_grads = run(autocast=True, class_rows_in_autocast_dtype=True)
    assert norm_input_dtypes == [torch.float32, torch.float32, torch.bfloat16]
    for scores, grads in ((mixed_scores, mixed_grads), (bf16_scores, bf16_grads)):
        # bf16 keeps 8 bits: a relative step of 2^-8 = 0.004 per rounding.
        assert (scores - fp32_scores).abs().max() <= 0.03 * fp32_scores.abs().max()
        assert F.cosine_similarity(grads, fp32_grads, dim=0) >= 0.99


def test_scalable_scores_any_subset_of_classes_alone() -> None:
    model = make_model("scalable")
    x = images(2)
    classes = torch.tensor([3, 0, 4])
    with torch.no_grad():
        torch.testing.assert_close(model(x, classes), model(x)[:, classes], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="scalable layout"):
        make_model("reference")(x, classes)
