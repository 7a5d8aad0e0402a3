"""Training gradients on a GPU against fp32 on the CPU, for a trained checkpoint.

    python research/gpu_grad_check.py CKPT SHARDS RANK

Compares the gradients of every trainable tensor (one batch of training images, the
checkpoint's prompts) under bf16 autocast and in fp32 on the GPU, with each SDPA backend, to
fp32 on the CPU: cosine similarity and relative error of the flattened gradient, and the
top-1 of the scores. A numerical problem of one backend or of bf16 shows as a low cosine.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from promptcam.data.reader import TransformConfig, split_loader
from promptcam.model.checkpoint import load_checkpoint
from promptcam.model.prompt_cam import PromptCAM

BACKENDS = {
    "default": None,
    "cudnn": [SDPBackend.CUDNN_ATTENTION],
    "flash": [SDPBackend.FLASH_ATTENTION],
    "efficient": [SDPBackend.EFFICIENT_ATTENTION],
    "math": [SDPBackend.MATH],
}


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    if BACKENDS[name] is None:
        yield
    else:
        with sdpa_kernel(BACKENDS[name]):
            yield


def gradients(
    model: PromptCAM, images: Tensor, labels: Tensor, device: str, bf16: bool, sdpa: str
) -> tuple[Tensor, float, float]:
    model = model.to(device).train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the same prompt-dropout mask everywhere
    with backend(sdpa), torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
        scores = model(images.to(device))
    loss = F.cross_entropy(scores.float(), labels.to(device))
    loss.backward()
    flat = torch.cat(
        [p.grad.flatten().float().cpu() for p in model.parameters() if p.grad is not None]
    )
    top1 = (scores.float().argmax(1).cpu() == labels).float().mean().item()
    return flat, loss.item(), top1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("shards")
    parser.add_argument("rank")
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    model, meta = load_checkpoint(args.checkpoint)
    model.config = dataclasses.replace(model.config, prompt_dropout=0.0)
    images, labels, _ = next(
        iter(
            split_loader(
                args.shards,
                "train",
                args.rank,
                TransformConfig.unaugmented(meta.preprocessing),
                args.batch,
            )
        )
    )
    reference, ref_loss, ref_top1 = gradients(model, images, labels, "cpu", False, "default")
    print(f"cpu fp32: loss {ref_loss:.5f}, top-1 {ref_top1:.3f}, grad norm {reference.norm():.3e}")
    print(
        "| device | precision | SDPA backend | loss | top-1 | grad cosine vs cpu fp32 | relative error |"
    )
    print("|---|---|---|---:|---:|---:|---:|")
    runs = [("cpu", True, "default")]
    if torch.cuda.is_available():
        runs += [("cuda", bf16, sdpa) for bf16 in (False, True) for sdpa in BACKENDS]
    for device, bf16, sdpa in runs:
        try:
            grad, loss, top1 = gradients(model, images, labels, device, bf16, sdpa)
        except RuntimeError as error:  # a backend that does not support these inputs
            print(
                f"| {device} | {'bf16' if bf16 else 'fp32'} | {sdpa} | unsupported: {str(error)[:60]} |"
            )
            continue
        cosine = F.cosine_similarity(grad, reference, dim=0).item()
        error = ((grad - reference).norm() / reference.norm()).item()
        print(
            f"| {device} | {'bf16' if bf16 else 'fp32'} | {sdpa} | {loss:.5f} | {top1:.3f} | {cosine:.5f} | {error:.4f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
