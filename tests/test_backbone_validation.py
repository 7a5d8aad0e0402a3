"""Wrong weight files give clear errors; unsupported backbones are refused when the config is
read (torch-free), with the reason; the name table agrees with every model timm registers."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import open_clip
import pytest
import timm
import torch
import yaml
from backbone_oracles import original_vit_state
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from timm.layers import Attention
from timm.models import _registry
from timm.models.vision_transformer import VisionTransformer

from promptcam.model import families
from promptcam.model.backbone import _check_supported, backbone_from_spec, build_backbone
from promptcam.model.spec import (
    UnsupportedBackboneError,
    backbone_spec,
    demo_backbone_spec,
    workflow_backbone_spec,
)
from promptcam.model.weight_files import BackboneWeightsError

torch.set_num_threads(1)

TINY = dict(embed_dim=32, depth=2, num_heads=2)


def load(name: str, path: Path, **kwargs) -> None:
    backbone_from_spec(
        backbone_spec({"name": name, "weights": str(path), "kwargs": {**TINY, **kwargs}})
    )


def clip_state(width: int = 32, patch: int = 16) -> dict:
    model = open_clip.model.CLIP(
        embed_dim=16,
        vision_cfg=dict(
            layers=2, width=width, head_width=16, patch_size=patch, image_size=patch * 4
        ),
        text_cfg=dict(context_length=8, vocab_size=64, width=16, heads=2, layers=1),
    )
    return model.state_dict()


def dino_state(**overrides) -> dict:
    return original_vit_state(
        **{"width": 32, "depth": 2, "patch": 16, "grid": 4, "family": "dino", **overrides}
    )


def dinov2_state(**overrides) -> dict:
    return original_vit_state(
        **{"width": 32, "depth": 2, "patch": 14, "grid": 4, "family": "dinov2", **overrides}
    )


WRONG_FILES = [
    # (what, timm name, kwargs, file, what the message must say)
    ("ViT-L-sized CLIP for a ViT-B name", "vit_base_patch16_clip_224", {"img_size": 64},
     lambda: clip_state(width=48), ["embedding width is 48, the model's 32", "shape mismatches"]),
    ("patch-14 CLIP for a patch-16 name", "vit_base_patch16_clip_224", {"img_size": 64},
     lambda: clip_state(patch=14), ["patch size is 14, the model's 16"]),
    ("DINOv2 without registers for a reg4 name", "vit_small_patch14_reg4_dinov2.lvd142m",
     {"img_size": 56}, dinov2_state, ["0 register tokens, the model 4", "missing keys", "reg_token"]),
    ("DINOv2 for a DINO name", "vit_base_patch16_224.dino", {"img_size": 56, "patch_size": 14},
     dinov2_state, ["DINOv2 (Meta's layout)", "unexpected keys", "ls1.gamma"]),
    ("a DINO file missing a block", "vit_base_patch16_224.dino", {"img_size": 64},
     lambda: dino_state(depth=1), ["1 blocks, the model 2", "missing keys", "blocks.1."]),
    ("DINO for a CLIP name", "vit_base_patch16_clip_224", {"img_size": 64}, dino_state,
     ["expects open_clip CLIP", "missing keys", "norm_pre", "unexpected keys"]),
    ("CLIP for a DINOv2 name", "vit_small_patch14_dinov2.lvd142m", {"img_size": 56},
     lambda: clip_state(patch=14), ["expects DINOv2 weights", "visual.*", "ls1.gamma"]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("what", "name", "kwargs", "make", "says"), WRONG_FILES, ids=[w[0] for w in WRONG_FILES]
)
def test_a_wrong_file_names_the_file_the_family_and_the_mismatch(
    tmp_path: Path, what: str, name: str, kwargs: dict, make, says: list[str]
) -> None:
    path = tmp_path / "downloaded.pth"
    torch.save(make(), path)
    with pytest.raises(BackboneWeightsError) as caught:
        load(name, path, **kwargs)
    message = str(caught.value)
    assert str(path) in message and name in message
    for text in says:
        assert text in message, f"{what}: {text!r} not in\n{message}"
    assert "Error(s) in loading state_dict" not in message.splitlines()[0]


def test_unreadable_files_say_what_they_are(tmp_path: Path) -> None:
    scripted = tmp_path / "ViT-B-16.pt"
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(scripted))
    with pytest.raises(BackboneWeightsError, match=r"TorchScript archive.*torch\.jit\.load"):
        load("vit_base_patch16_clip_quickgelu_224.openai", scripted, img_size=64)

    garbage = tmp_path / "weights.pth"
    garbage.write_text("<html>404 not found</html>")
    with pytest.raises(BackboneWeightsError, match=f"{garbage} is not a readable"):
        load("vit_base_patch16_224.dino", garbage, img_size=64)

    import argparse

    full = tmp_path / "dino_vitbase16_pretrain_full_checkpoint.pth"
    torch.save({"teacher": dino_state(), "args": argparse.Namespace(arch="vit_base")}, full)
    with pytest.raises(BackboneWeightsError, match="backbone-only weight file"):
        load("vit_base_patch16_224.dino", full, img_size=64)

    with pytest.raises(FileNotFoundError, match=r"nowhere\.pth"):
        load("vit_base_patch16_224.dino", tmp_path / "nowhere.pth", img_size=64)


def test_names_timm_does_not_know_are_refused_clearly() -> None:
    with pytest.raises(UnsupportedBackboneError, match=r"has no model 'vit_tiny_patch99_224'"):
        build_backbone("vit_tiny_patch99_224", None)
    with pytest.raises(UnsupportedBackboneError, match=r"no pretrained tag 'dinov3'.*dino, "):
        build_backbone("vit_base_patch16_224.dinov3", None, **TINY)


def test_custom_vit_file_mismatch_is_explained(tmp_path: Path) -> None:
    path = tmp_path / "custom.pt"
    torch.save(dino_state(depth=1), path)
    kwargs = dict(img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2)
    with pytest.raises(BackboneWeightsError, match=r"missing keys.*blocks\.1\."):
        build_backbone("vit_custom", path, **kwargs)


REFUSED_NAMES = [
    ("eva02_base_patch14_224.mim_in22k", "rotary position embeddings"),
    ("vit_base_patch16_rope_reg1_gap_256", "rotary position embeddings"),
    ("vit_base_patch16_dinov3.lvd1689m", "rotary position embeddings"),
    ("vit_pe_core_base_patch16_224", "rotary position embeddings"),
    ("vit_base_patch16_xp_224", "parallel"),
    ("vit_small_patch16_18x2_224", "parallel"),
    ("vit_dwee_patch16_reg1_gap_256", "differential attention"),
    ("vit_base_patch16_rpn_224", "post-norm"),
    ("vit_relpos_base_patch16_224", "relative position bias"),
    ("beitv2_base_patch16_224", "BEiT"),
    ("samvit_base_patch16", "SAM"),
    ("naflexvit_base_patch16_gap", "NaFlexVit"),
    ("resnet50", "not a timm VisionTransformer name"),
    ("dinov2_vitb14_reg", "use vit_base_patch14_reg4_dinov2.lvd142m"),
    ("dino_vitb16", "use vit_base_patch16_224.dino"),
    ("hf-hub:imageomics/bioclip", "vit_base_patch16_clip_224 for BioCLIP"),
    ("ViT-L-14", "vit_large_patch14_clip_224 for BioCLIP 2"),
]


@pytest.mark.parametrize(("name", "reason"), REFUSED_NAMES)
def test_unsupported_names_are_refused_with_the_reason(name: str, reason: str) -> None:
    with pytest.raises(UnsupportedBackboneError, match=reason):
        backbone_spec({"name": name})


@pytest.mark.parametrize(("kwargs", "reason"), [
    ({"attn_layer": "diff"}, "standard Attention"),
    ({"gated_attn": True}, "gated attention"),
    ({"num_classes": 10}, "its own head"),
    ({"block_fn": "ParallelScalingBlock"}, "pre-norm Block"),
    ({"img_size": [224, 224, 3]}, "positive integer or \\[height, width\\]"),
])  # fmt: skip
def test_unsupported_kwargs_are_refused(kwargs: dict, reason: str) -> None:
    with pytest.raises(UnsupportedBackboneError, match=reason):
        backbone_spec({"name": "vit_base_patch16_224.dino", "kwargs": kwargs})


def test_a_weight_file_needs_a_name_that_tells_its_statistics() -> None:
    with pytest.raises(UnsupportedBackboneError, match=r"vit_base_patch16_224\.dino for DINO"):
        backbone_spec({"name": "vit_base_patch16_224", "weights": "dino.pth"})
    # A tag, a family with its own statistics, or explicit statistics all say it.
    backbone_spec({"name": "vit_base_patch16_224.dino", "weights": "dino.pth"})
    backbone_spec({"name": "vit_base_patch14_reg4_dinov2", "weights": "dinov2.pth"})
    backbone_spec({"name": "vit_large_patch14_clip_224", "weights": "bioclip2.bin"})
    backbone_spec({
        "name": "vit_base_patch16_224",
        "weights": "w.pth",
        "preprocessing": {"mean": [0.5] * 3, "std": [0.5] * 3},
    })  # fmt: skip
    with pytest.raises(ValueError, match="interpolation must be one of"):
        backbone_spec(
            {"name": "vit_base_patch16_224.dino", "preprocessing": {"interpolation": "area"}}
        )
    with pytest.raises(ValueError, match=r"unknown backbone\.preprocessing"):
        backbone_spec({"name": "vit_base_patch16_224.dino", "preprocessing": {"size": 3}})


def test_the_workflow_refuses_a_non_square_input() -> None:
    spec = backbone_spec({"name": "vit_base_patch16_224.dino", "kwargs": {"img_size": [224, 320]}})
    assert spec.kwargs["img_size"] == [224, 320]  # the library takes it
    with pytest.raises(UnsupportedBackboneError, match="not square"):
        workflow_backbone_spec(
            {"name": "vit_base_patch16_224.dino", "kwargs": {"img_size": [224, 320]}}
        )


def test_family_statistics_are_timms() -> None:
    assert families.IMAGENET_PREPROCESSING["mean"] == IMAGENET_DEFAULT_MEAN
    assert families.IMAGENET_PREPROCESSING["std"] == IMAGENET_DEFAULT_STD
    assert families.CLIP_PREPROCESSING["mean"] == OPENAI_CLIP_MEAN
    assert families.CLIP_PREPROCESSING["std"] == OPENAI_CLIP_STD
    for family in families.FAMILIES:
        example = family.example.split(" ")[0]
        assert family.matches(example) and families.backbone_family(example) is family
        families.check_backbone_name(example)
        assert timm.is_model(example.split(".")[0]), example


def test_demo_preprocessing_comes_from_its_card() -> None:
    demo = demo_backbone_spec()
    spec = backbone_spec({"name": "demo"})
    assert dict(spec.preprocessing) == {
        "mean": tuple(demo["preprocessing"]["mean"]),
        "std": tuple(demo["preprocessing"]["std"]),
        "interpolation": "bilinear",
    }


def runtime_verdict(name: str) -> str | None:
    """The built model's verdict (None: supported), built on the meta device with one block."""
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                model = timm.create_model(name, pretrained=False, num_classes=0, depth=1)
            except (TypeError, AssertionError, ValueError):
                model = timm.create_model(name, pretrained=False, num_classes=0)
        _check_supported(model, name)
    except UnsupportedBackboneError as error:
        return str(error)
    return None


def test_the_name_table_agrees_with_every_model_timm_registers() -> None:
    """Every timm ViT-like model is built (meta device, no weights): the torch-free table must
    refuse exactly those the runtime check refuses. Other timm models must be refused too."""
    vit_modules = {
        "vision_transformer", "vision_transformer_hybrid", "deit", "eva", "beit",
        "vision_transformer_relpos", "vision_transformer_sam", "naflexvit",
    }  # fmt: skip
    disagreements = []
    for name in timm.list_models():
        try:
            families.check_backbone_name(name)
            table = None
        except UnsupportedBackboneError as error:
            table = str(error)
        if _registry._model_to_module[name] in vit_modules:
            runtime = runtime_verdict(name)
            if (table is None) != (runtime is None):
                disagreements.append(f"{name}: table {table!r}, runtime {runtime!r}")
        elif table is None:
            disagreements.append(
                f"{name}: table accepts a {_registry._model_to_module[name]} model"
            )
    assert not disagreements, "\n".join(disagreements)


def test_runtime_backstop_refuses_gated_and_differential_attention() -> None:
    gated = VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=0
    )  # fmt: skip
    _check_supported(gated)
    # timm's Attention(gated=True): the same class, with a gate.
    gated.blocks[0].attn = Attention(32, num_heads=2, qkv_bias=True, gated=True)
    with pytest.raises(UnsupportedBackboneError, match="gated attention"):
        _check_supported(gated)
    differential = VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=0,
        attn_layer="diff",
    )  # fmt: skip
    with pytest.raises(UnsupportedBackboneError, match="DiffAttention"):
        _check_supported(differential)
    with pytest.warns(UserWarning, match="not a multiple of the patch size.*32 or 40"):
        build_backbone(
            "vit_custom", None, img_size=36, patch_size=8, embed_dim=32, depth=1, num_heads=2
        )


def dry_run(repo_root: Path, tmp_path: Path, backbone: dict) -> subprocess.CompletedProcess:
    config = yaml.safe_load((repo_root / "tests/configs/pipeline_tiny.yaml").read_text())
    config["backbone"] = backbone
    configfile = tmp_path / "config.yaml"
    configfile.write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "snakemake", "-n", "--cores", "1",
           "--snakefile", str(repo_root / "Snakefile"), "--directory", str(tmp_path),
           "--configfile", str(configfile)]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)


def test_snakemake_refuses_an_unsupported_backbone_at_start(
    repo_root: Path, tmp_path: Path
) -> None:
    refused = dry_run(repo_root, tmp_path, {"name": "eva02_base_patch14_224.mim_in22k"})
    assert refused.returncode != 0
    assert "rotary position embeddings" in refused.stdout + refused.stderr
    assert "Job stats" not in refused.stdout + refused.stderr  # refused before planning any job

    weights = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    weights.write_bytes(b"")  # only the dry run's input: nothing reads it
    accepted = dry_run(repo_root, tmp_path, {
        "name": "vit_small_patch14_reg4_dinov2.lvd142m",
        "weights": str(weights),
        "kwargs": {"img_size": 224},
    })  # fmt: skip
    assert accepted.returncode == 0, accepted.stderr[-3000:]
    assert "train" in accepted.stdout
