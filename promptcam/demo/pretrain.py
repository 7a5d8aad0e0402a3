"""The demo backbone's pre-training loop: resumable steps, metrics, checkpoints, export.

What it learns (the fresh organisms, their targets and the losses) is in
:mod:`promptcam.demo.pretext`; the staged recipe that made the shipped backbone is in
:mod:`promptcam.demo.recipe`.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from promptcam.demo.pretext import (
    BACKBONE_TIMM_NAME,
    PIXEL_MEAN,
    PIXEL_STD,
    FreshOrganisms,
    PretextModel,
    PretrainConfig,
    pretext_losses,
)
from promptcam.io import atomic_path, sha256_file, write_json

log = logging.getLogger(__name__)


_METRIC_NAMES = (
    "loss",
    "dense_loss",
    "pose_loss",
    "attribute_loss",
    "canonical_loss",
    "locality_loss",
    "leak_accuracy",
    "cell_accuracy",
)


def _lr_at(step: int, config: PretrainConfig) -> float:
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.5 * config.lr * (1.0 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class PretrainResult:
    steps: int
    seconds: float
    final_metrics: dict[str, float] = field(default_factory=dict)


def pretrain(config: PretrainConfig, work_dir: str | Path, device: str = "cpu") -> PretrainResult:
    """Train (or resume) in ``work_dir``; leaves ``state.pt`` and ``metrics.tsv`` there."""
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    model = PretextModel(config).to(device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    state_path = work / "state.pt"
    metrics_path = work / "metrics.tsv"
    step, seconds = 0, 0.0
    if config.init_from is not None and not state_path.exists():
        initial = torch.load(config.init_from, map_location=device, weights_only=True)
        model.backbone.load_state_dict({k: v.float() for k, v in initial.items()})
        log.info(
            "starting from backbone %s (sha256 %s)", config.init_from, sha256_file(config.init_from)
        )
    if state_path.exists():
        state = torch.load(state_path, map_location=device, weights_only=True)
        if state["config"] != asdict(config):
            raise ValueError(
                f"{state_path} was written with another config; delete it to start over"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, seconds = int(state["step"]), float(state["seconds"])
        log.info("resuming from step %d", step)
    if step == 0:
        with atomic_path(metrics_path) as tmp:
            tmp.write_text("\t".join(["step", "lr", *_METRIC_NAMES, "seconds"]) + "\n")

    loader = DataLoader(
        FreshOrganisms(config, start_index=step * config.batch_size),
        batch_size=config.batch_size,
        num_workers=config.num_workers,
        persistent_workers=False,
        prefetch_factor=4 if config.num_workers else None,
    )
    use_bf16 = device.startswith("cuda")
    model.train()
    window: list[dict[str, float]] = []
    progress = tqdm(total=config.steps, initial=step, desc="pretrain", mininterval=5.0)
    started = time.perf_counter() - seconds
    batches = iter(loader)
    while step < config.steps:
        batch = [t.to(device, non_blocking=True) for t in next(batches)]
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, config)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_bf16):
            loss, metrics = pretext_losses(model, *batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        window.append(metrics)
        progress.update(1)
        if step % config.checkpoint_every == 0 or step == config.steps:
            mean = {k: float(np.mean([m[k] for m in window])) for k in window[0]}
            window.clear()
            elapsed = time.perf_counter() - started
            progress.set_postfix(loss=f"{mean['loss']:.3f}", acc=f"{mean['cell_accuracy']:.3f}")
            with open(metrics_path, "a") as handle:
                values = [f"{mean[name]:.5f}" for name in _METRIC_NAMES]
                lr = f"{_lr_at(step - 1, config):.6g}"
                handle.write("\t".join([str(step), lr, *values, f"{elapsed:.1f}"]) + "\n")
            with atomic_path(state_path) as tmp:
                torch.save(
                    {
                        "config": asdict(config),
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "step": step,
                        "seconds": elapsed,
                        "metrics": mean,
                    },
                    tmp,
                )
            log.info("step %d: %s", step, mean)
    progress.close()
    final = torch.load(state_path, map_location="cpu", weights_only=True)
    return PretrainResult(
        steps=step, seconds=float(final["seconds"]), final_metrics=final["metrics"]
    )


def export_backbone(
    work_dir: str | Path, out_path: str | Path, command: str, quality: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Write the backbone's weights (fp16, timm key names) and a JSON card beside them."""
    state = torch.load(Path(work_dir) / "state.pt", map_location="cpu", weights_only=True)
    prefix = "backbone."
    weights = {
        k[len(prefix) :]: v.half() for k, v in state["model"].items() if k.startswith(prefix)
    }
    out = Path(out_path)
    with atomic_path(out) as tmp:
        torch.save(weights, tmp)
    card = {
        "file": out.name,
        "sha256": sha256_file(out),
        "timm_name": BACKBONE_TIMM_NAME,
        "timm_kwargs": PretrainConfig(**state["config"]).vit_kwargs(),
        "pixel_mean": list(PIXEL_MEAN),
        "pixel_std": list(PIXEL_STD),
        "pretrain_config": state["config"],
        "steps": int(state["step"]),
        "cpu_seconds": float(state["seconds"]),
        "final_metrics": state["metrics"],
        "command": command,
        "quality": quality,
    }
    write_json(out.with_suffix(".json"), card)
    return card
