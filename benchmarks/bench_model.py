"""Throughput of PromptCAM against an explicit-attention forward of the same model.

    python benchmarks/bench_model.py                 # CPU: a small ViT, C = 200 and 1000
    python benchmarks/bench_model.py --full          # GPU: ViT-B/16, C = 200 ... 10000

"ours" is :class:`promptcam.model.prompt_cam.PromptCAM` (fused attention; bf16 autocast on CUDA).
"explicit" computes the same scores in fp32 with materialised softmax attention in every block,
as the reference implementation does; in the reference layout its last block also computes the
rows of all image tokens, which the reference computes and discards. The backbone is randomly
initialised: weights do not change the speed. Training is forward + backward + SGD step.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import Tensor

from promptcam.model.prompt_cam import PromptCAM
from promptcam.model.spec import BackboneSpec, PromptCAMConfig
from promptcam.training.steps import sample_classes


@dataclass(frozen=True)
class Setting:
    backbone: BackboneSpec
    img_size: int
    class_counts: tuple[int, ...]
    batch: int
    baseline_batch: int
    warmup: int
    min_seconds: float  # timed steps run until this much time has passed (at least one)


CPU_SETTING = Setting(
    backbone=BackboneSpec(
        "vit_custom", kwargs=dict(img_size=32, patch_size=8, embed_dim=96, depth=4, num_heads=4)
    ),
    img_size=32,
    class_counts=(200, 1000),
    batch=16,
    baseline_batch=16,
    warmup=1,
    min_seconds=2.0,
)
GPU_SETTING = Setting(
    backbone=BackboneSpec("vit_base_patch16_224"),
    img_size=224,
    class_counts=(200, 1000, 5000, 10000),
    batch=128,
    baseline_batch=16,  # the reference's batch; larger ones run out of memory sooner
    warmup=2,
    min_seconds=2.0,
)


def explicit_block(block: Block, x: Tensor) -> Tensor:
    attn = block.attn
    q, k, v = attn.qkv(block.norm1(x)).unflatten(-1, (3, attn.num_heads, -1)).permute(2, 0, 3, 1, 4)
    weights = ((attn.q_norm(q) * attn.scale) @ attn.k_norm(k).transpose(-2, -1)).softmax(-1)
    mixed = (weights @ v).transpose(1, 2).flatten(2)
    x = x + block.ls1(attn.proj(attn.norm(mixed)))
    return x + block.ls2(block.mlp(block.norm2(x)))


def explicit_scores(model: PromptCAM, images: Tensor) -> Tensor:
    vit, batch = model.backbone, images.shape[0]
    tokens = model.embed(images)
    if model.config.layout == "scalable":
        for block, prompts in zip(vit.blocks[:-1], model.agnostic_prompts, strict=True):
            tokens = explicit_block(block, torch.cat([prompts.expand(batch, -1, -1), tokens], 1))
            tokens = tokens[:, prompts.shape[0] :]
        return model.last_block_attention(tokens)[0]
    for block, prompts in zip(vit.blocks, model.prompt_embeddings, strict=True):
        outputs = explicit_block(block, torch.cat([prompts.expand(batch, -1, -1), tokens], 1))
        tokens = outputs[:, model.num_classes :]
    return model.head(vit.norm(outputs[:, : model.num_classes])).squeeze(-1)


def images_per_second(step: Callable[[], None], batch: int, setting: Setting, device: str) -> float:
    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(setting.warmup):
        step()
    sync()
    start, steps, elapsed = time.perf_counter(), 0, 0.0
    while steps == 0 or elapsed < setting.min_seconds:
        step()
        sync()
        steps, elapsed = steps + 1, time.perf_counter() - start
    return batch * steps / elapsed


@dataclass(frozen=True)
class Variant:
    """One way of running ours."""

    compiled: bool = False
    bf16_class_rows: bool = False  # PromptCAM.class_rows_in_autocast_dtype
    sampled_classes: int | None = None  # TrainConfig.sampled_classes: training only

    @property
    def label(self) -> str:
        extras = ["bf16 class rows"] if self.bf16_class_rows else []
        extras += [f"{self.sampled_classes} sampled classes"] if self.sampled_classes else []
        return "ours" + (" compiled" if self.compiled else "") + "".join(f", {e}" for e in extras)

    def applies_to(self, layout: str, train: bool) -> bool:
        return self.sampled_classes is None or (layout == "scalable" and train)


@dataclass(frozen=True)
class Measurement:
    images_per_second: float
    batch: int
    peak_gib: float | None  # CUDA only


def measure(
    model: PromptCAM, forward: Callable[[Tensor], Tensor], *, batch: int, **settings: Any
) -> Measurement | None:
    """Images/s at ``batch``, or at the largest of batch / 4, batch / 16 that fits in memory;
    None when even that runs out of memory. ``settings``: the rest of :func:`_measure_at`'s."""
    while batch >= 8:
        try:
            return _measure_at(model, forward, batch=batch, **settings)
        except torch.OutOfMemoryError:
            batch //= 4
    return None


def _measure_at(
    model: PromptCAM,
    forward: Callable[[Tensor], Tensor],
    *,
    train: bool,
    batch: int,
    bf16: bool,
    setting: Setting,
    device: str,
    profile: bool = False,
    sampled_classes: int | None = None,
) -> Measurement:
    """``profile`` also prints the kernels of two more steps; ``sampled_classes`` scores that
    many classes per training step, as training with that setting does."""
    images = torch.randn(batch, 3, setting.img_size, setting.img_size, device=device)
    labels = torch.randint(model.num_classes, (batch,), device=device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.005, momentum=0.9, weight_decay=1e-3)
    model.train(train)

    def step() -> None:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            if not train:
                with torch.inference_mode():
                    forward(images)
                return
            sample = sample_classes(labels, model.num_classes, sampled_classes)
            scores = forward(images) if sample.classes is None else forward(images, sample.classes)
            loss = F.cross_entropy(scores.float() + sample.logit_offset, sample.targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        rate = images_per_second(step, batch, setting, device)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
        if profile:
            print_profile(step, device)
        return Measurement(rate, batch, peak)
    finally:
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.empty_cache()


def print_profile(step: Callable[[], None], device: str, steps: int = 2, rows: int = 15) -> None:
    """The operators taking the most device time over ``steps`` steps."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        for _ in range(steps):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
    sort_by = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    print(profiler.key_averages().table(sort_by=sort_by, row_limit=rows), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="ViT-B/16, C up to 10000 (GPU)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads")
    parser.add_argument(
        "--only",
        default=None,
        help="comma-separated LAYOUT:C instead of the setting's, e.g. reference:200,scalable:10000",
    )
    parser.add_argument("--modes", default="train,infer", help="train, infer or both")
    parser.add_argument("--compile", action="store_true", help="also time ours under torch.compile")
    parser.add_argument(
        "--compile-mode",
        default=None,
        help="torch.compile mode with --compile, e.g. max-autotune-no-cudagraphs",
    )
    parser.add_argument(
        "--bf16-class-rows",
        action="store_true",
        help="also time ours with class_rows_in_autocast_dtype (GPU: class rows wholly in bf16)",
    )
    parser.add_argument(
        "--sampled-classes",
        type=int,
        default=None,
        help="also time scalable training scoring this many classes per step",
    )
    parser.add_argument("--no-explicit", action="store_true", help="skip the explicit baseline")
    parser.add_argument("--profile", action="store_true", help="print ours' top operators")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    setting = GPU_SETTING if args.full else CPU_SETTING
    bf16 = device == "cuda"
    configs = [
        (layout, num_classes)
        for layout in ("reference", "scalable")
        for num_classes in setting.class_counts
    ]
    if args.only:  # any C, not only the setting's
        configs = [(item.split(":")[0], int(item.split(":")[1])) for item in args.only.split(",")]
    modes = [mode == "train" for mode in args.modes.split(",")]
    card = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(
        f"device {device} ({card}), torch {torch.__version__}, backbone {setting.backbone.name} "
        f"{dict(setting.backbone.kwargs)}, threads {torch.get_num_threads()}, "
        f"ours: fused attention{', bf16 autocast' if bf16 else ''}; explicit: fp32"
    )
    variants = [Variant()] + ([Variant(compiled=True)] if args.compile else [])
    if args.bf16_class_rows:
        variants += [dataclasses.replace(v, bf16_class_rows=True) for v in variants]
    if args.sampled_classes:
        variants += [dataclasses.replace(v, sampled_classes=args.sampled_classes) for v in variants]
    header = ["layout", "C", "mode"] + [variant.label for variant in variants]
    header[3] += " img/s (batch, peak GiB)"
    header += [] if args.no_explicit else ["explicit img/s (batch, peak GiB)", "ratio"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header), flush=True)
    for layout, num_classes in configs:
        config = PromptCAMConfig(num_classes=num_classes, layout=layout)
        model = PromptCAM(setting.backbone, config).to(device)
        for train in modes:
            common = dict(train=train, setting=setting, device=device)
            cells = [layout, num_classes, "train" if train else "infer"]
            ours = None  # the plain variant's, for the ratio
            for variant in variants:
                if not variant.applies_to(layout, train):
                    cells.append("-")
                    continue
                model.class_rows_in_autocast_dtype = variant.bf16_class_rows
                compiled = variant.compiled
                forward = torch.compile(model, mode=args.compile_mode) if compiled else model
                result = measure(
                    model,
                    forward,
                    batch=setting.batch,
                    bf16=bf16,
                    profile=args.profile and variant == Variant(),
                    sampled_classes=variant.sampled_classes,
                    **common,
                )
                if variant == Variant():
                    ours = result
                cells.append(_fmt(result))
            model.class_rows_in_autocast_dtype = False
            if not args.no_explicit:
                explicit = measure(
                    model,
                    lambda x, model=model: explicit_scores(model, x),
                    batch=setting.baseline_batch,
                    bf16=False,
                    **common,
                )
                ratio = (
                    f"{ours.images_per_second / explicit.images_per_second:.2f}"
                    if ours and explicit
                    else "-"
                )
                cells += [_fmt(explicit), ratio]
            print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()


def _fmt(value: Measurement | None) -> str:
    if value is None:
        return "out of memory"
    peak = "" if value.peak_gib is None else f", {value.peak_gib:.1f}"
    return f"{value.images_per_second:.1f} ({value.batch}{peak})"


if __name__ == "__main__":
    main()
