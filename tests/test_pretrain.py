"""Label-free pre-training of the demo backbone and the weights shipped in the package."""

from __future__ import annotations

import json

import pytest
import torch

from promptcam import pretrain as pretrain_module
from promptcam.io import sha256_file
from promptcam.pretrain import (
    DEMO_BACKBONE,
    FreshOrganisms,
    PretextModel,
    PretrainConfig,
    canonical_cell_weights,
    demo_backbone_spec,
    part_shares,
    pretext_losses,
    pretrain,
)

TINY = dict(
    image_size=48,
    patch_size=12,
    embed_dim=32,
    depth=2,
    num_heads=4,
    batch_size=4,
    warmup_steps=1,
    checkpoint_every=2,
    num_workers=0,
    threads=1,
)


def test_part_shares_are_area_fractions_per_sub_cell():
    parts = torch.zeros(1, 24, 24, dtype=torch.long)
    parts[0, :6, :3] = 2  # first patch (12x12), top-left 6x3 pixels
    shares = part_shares(parts, patch_size=12, sub_grid=4)  # cells of 3x3 pixels
    assert shares.shape == (1, 4, 16, 7)
    assert torch.allclose(shares.sum(-1), torch.ones(1, 4, 16))
    assert shares[0, 0, 0, 2] == 1.0 and shares[0, 0, 4, 2] == 1.0  # rows 0-2 and 3-5 of column 0
    assert shares[0, 0, 1, 2] == 0.0 and shares[0, 1:, :, 2].sum() == 0.0


def test_stream_is_a_pure_function_of_the_sample_index():
    config = PretrainConfig(**TINY)
    a = FreshOrganisms(config).sample(7)
    b = FreshOrganisms(config, start_index=5).sample(7)
    c = FreshOrganisms(PretrainConfig(**{**TINY, "seed": 2})).sample(7)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])


def test_resumed_pretraining_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    config = PretrainConfig(**{**TINY, "steps": 4})
    pretrain(config, tmp_path / "full")
    state_full = torch.load(tmp_path / "full" / "state.pt", weights_only=True)

    class Killed(Exception):
        pass

    def kill_after_first_checkpoint(message, *args):
        if message.startswith("step") and args[0] == 2:
            raise Killed  # the checkpoint of step 2 is already renamed into place

    interrupted = tmp_path / "interrupted"
    with monkeypatch.context() as patch:
        patch.setattr(pretrain_module.log, "info", kill_after_first_checkpoint)
        with pytest.raises(Killed):
            pretrain(config, interrupted)
    assert torch.load(interrupted / "state.pt", weights_only=True)["step"] == 2
    pretrain(config, interrupted)
    state_resumed = torch.load(interrupted / "state.pt", weights_only=True)
    assert state_resumed["step"] == 4
    for key, tensor in state_full["model"].items():
        assert torch.equal(tensor, state_resumed["model"][key]), key
    lines = (interrupted / "metrics.tsv").read_text().splitlines()
    assert [line.split("\t")[0] for line in lines[1:]] == ["2", "4"]


def test_resuming_with_another_config_is_refused(tmp_path):
    pretrain(PretrainConfig(**{**TINY, "steps": 2}), tmp_path)
    with pytest.raises(ValueError, match="another config"):
        pretrain(PretrainConfig(**{**TINY, "steps": 2, "lr": 0.5}), tmp_path)


@pytest.mark.skipif(not DEMO_BACKBONE.exists(), reason="demo backbone not exported yet")
def test_shipped_demo_backbone_matches_its_card_and_loads_through_timm():
    import timm

    card = json.loads(DEMO_BACKBONE.with_suffix(".json").read_text())
    assert sha256_file(DEMO_BACKBONE) == card["sha256"]
    assert DEMO_BACKBONE.stat().st_size < 8 * 2**20
    spec = demo_backbone_spec()
    model = timm.create_model(
        spec["name"],
        pretrained=True,
        pretrained_cfg_overlay=dict(file=spec["weights"]),
        num_classes=0,
        **spec["kwargs"],
    )
    stored = torch.load(DEMO_BACKBONE, weights_only=True)
    loaded = model.state_dict()
    # timm loads non-strictly when the classifier is dropped: check every tensor arrived.
    assert set(stored) == set(loaded)
    for key, tensor in stored.items():
        assert torch.equal(tensor.float(), loaded[key]), key
    assert card["quality"]["linear_probe_top1"]["species"] >= 0.85


def test_label_free_candidate_matches_its_card_and_used_no_attribute_target(repo_root):
    weights = repo_root / "pretrain" / "demo_vit_labelfree.pt"
    spec = demo_backbone_spec(weights)  # raises on a sha256 mismatch
    card = json.loads(weights.with_suffix(".json").read_text())
    assert card["pretrain_config"]["attribute_weight"] == 0.0
    assert all(stage.get("attribute_weight", 0.0) == 0.0 for stage in card["stages"])
    stored = torch.load(weights, weights_only=True)
    model = pretrain_module.build_vit(PretrainConfig(**card["pretrain_config"]))
    model.load_state_dict({key: tensor.float() for key, tensor in stored.items()})
    assert spec["kwargs"] == PretrainConfig(**card["pretrain_config"]).vit_kwargs()


@pytest.mark.slow
def test_pretrain_rule_runs_a_few_steps_through_snakemake(tmp_path, snakemake_run):
    config = tmp_path / "config.yaml"
    config.write_text(
        "pretrain: {batch_size: 4, image_size: 48, patch_size: 12, embed_dim: 32,"
        " depth: 2, num_heads: 4, num_workers: 0, probe_per_species: 3,"
        " stages: [{steps: 2, attribute_weight: 0.0},"
        " {steps: 3, canonical_weight: 1.0, canonical_focus: true}]}\n"
    )
    result = snakemake_run(tmp_path, "pretrain_backbone", configfile=config)
    assert result.returncode == 0, result.stderr[-3000:]
    card = json.loads((tmp_path / "results/pretrain/demo_vit.json").read_text())
    assert card["steps"] == 3
    assert "stage 2 of 2" in card["command"]
    assert (tmp_path / "results/pretrain/work/stage1.pt").exists()
    assert card["sha256"] == sha256_file(tmp_path / "results/pretrain/demo_vit.pt")
    assert set(card["quality"]["linear_probe_top1"]) == {"family", "genus", "species"}
    spec = demo_backbone_spec(tmp_path / "results/pretrain/demo_vit.pt")
    assert spec["kwargs"]["embed_dim"] == 32


def test_canonical_focus_spends_the_loss_where_organisms_differ():
    config = PretrainConfig(**TINY, canonical_rows=15, canonical_cols=20)
    weights = canonical_cell_weights(config, samples=64).view(15, 20)
    assert weights.mean().item() == pytest.approx(1.0)
    assert weights[0, -1] == 0.0  # above the head: background in every organism
    # The tail fan (left edge, mid-height) differs between tail shapes: above-average weight.
    assert weights[6:9, 0:4].max() > 1.0


def test_canonical_target_reaches_the_loss_only_when_weighted(tmp_path):
    unweighted = PretextModel(PretrainConfig(**TINY))
    weighted = PretextModel(PretrainConfig(**TINY, canonical_weight=2.0))
    weighted.load_state_dict(unweighted.state_dict())
    batch = [t[None] for t in FreshOrganisms(weighted.config).sample(0)]
    loss_without, _ = pretext_losses(unweighted, *batch)
    loss_with, metrics = pretext_losses(weighted, *batch)
    assert loss_with.item() == pytest.approx(
        loss_without.item() + 2.0 * metrics["canonical_loss"], rel=1e-5
    )
