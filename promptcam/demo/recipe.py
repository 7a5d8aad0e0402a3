"""The demo backbone's recipe: pre-train in stages, probe, export with its card."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from promptcam.demo.pretext import PretextModel, PretrainConfig
from promptcam.demo.pretrain import export_backbone, log, pretrain
from promptcam.demo.probes import probe_backbone
from promptcam.training.runtime import resolve_device


def run_pretraining(
    config: PretrainConfig,
    work_dir: str | Path,
    out_path: str | Path,
    *,
    command: str,
    device: str = "auto",
    probe_per_species: int = 60,
) -> dict[str, Any]:
    """Pre-train (resuming if ``work_dir`` holds a state), probe the result, export weights+card."""
    device = str(resolve_device(device))
    result = pretrain(config, work_dir, device=device)
    log.info("pre-training finished: %d steps in %.0f s", result.steps, result.seconds)
    quality = None
    if probe_per_species > 0:
        model = PretextModel(config)
        state = torch.load(Path(work_dir) / "state.pt", map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        report = probe_backbone(
            model.backbone, config.image_size, config.patch_size, per_species=probe_per_species
        )
        quality = report.as_dict()
        log.info("probe: %s", quality)
    return export_backbone(work_dir, out_path, command, quality)


def run_pretraining_stages(
    config: PretrainConfig,
    stages: list[dict[str, Any]],
    work_dir: str | Path,
    out_path: str | Path,
    *,
    command: str,
    device: str = "auto",
    probe_per_species: int = 60,
) -> dict[str, Any]:
    """Run ``stages`` in order, each starting from the previous stage's exported backbone.

    Every stage's settings override ``config``; only the last stage is probed. Each stage
    resumes on its own, so a killed chain restarts where it stopped.
    """
    work = Path(work_dir)
    previous: str | None = None
    card: dict[str, Any] = {}
    for index, overrides in enumerate(stages, start=1):
        stage = replace(config, **overrides, init_from=previous)
        last = index == len(stages)
        stage_out = Path(out_path) if last else work / f"stage{index}.pt"
        card = run_pretraining(
            stage,
            work / f"stage{index}",
            stage_out,
            command=f"{command} (stage {index} of {len(stages)})",
            device=device,
            probe_per_species=probe_per_species if last else 0,
        )
        previous = str(stage_out)
    return card
