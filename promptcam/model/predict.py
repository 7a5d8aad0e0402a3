"""Scores and attention maps of a trained Prompt-CAM for a folder of images."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torchvision.transforms import InterpolationMode

from promptcam.io import atomic_open
from promptcam.model.checkpoint import load_checkpoint
from promptcam.model.spec import Preprocessing

__all__ = ["IMAGE_SUFFIXES", "list_images", "load_image", "predict"]

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})


def list_images(image_or_dir: str | os.PathLike) -> tuple[Path, list[str]]:
    """A root and the image paths under it (recursive, sorted), relative to that root."""
    path = Path(image_or_dir)
    if path.is_file():
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise ValueError(
                f"{path} is not an image file (expected one of {', '.join(sorted(IMAGE_SUFFIXES))})"
            )
        return path.parent, [path.name]
    if not path.is_dir():
        raise FileNotFoundError(f"no image or folder {path}")
    names = sorted(
        p.relative_to(path).as_posix()
        for p in path.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not names:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {path}")
    return path, names


def load_image(path: str | os.PathLike, preprocessing: Preprocessing) -> Tensor:
    """Image file -> normalised (3, H, W) float tensor."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
    except UnidentifiedImageError as error:
        raise ValueError(f"{path} is not an image that PIL can read") from error
    image = TF.resize(
        image, list(preprocessing.img_size), InterpolationMode(preprocessing.interpolation)
    )
    return TF.normalize(TF.to_tensor(image), preprocessing.mean, preprocessing.std)


@torch.inference_mode()
def predict(
    ckpt: str | os.PathLike,
    image_or_dir: str | os.PathLike,
    out_npz: str | os.PathLike,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    backbone_weights: str | os.PathLike | None = None,
) -> int:
    """Write ``out_npz`` (atomically); returns N. For N images, C classes, H heads, P patches:

    * ``scores`` (N, C) float32;
    * ``predicted_index`` (N,) int64: the class with the highest score; ``predicted`` (N,):
      its label;
    * ``attention`` (N, H, C, P) float16: each class prompt's last-block attention over the
      patches (softmax over all tokens, not renormalised), row-major over ``patch_grid``;
    * ``patch_grid`` (2,): patch rows and columns;
    * ``image_names`` (N,): paths relative to ``image_or_dir`` (the file name for one image);
    * ``label_names`` (C,).
    """
    root, names = list_images(image_or_dir)  # first: a wrong path fails before the model loads
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, meta = load_checkpoint(ckpt, backbone_weights=backbone_weights)
    model.to(device)

    scores = np.empty((len(names), model.num_classes), dtype=np.float32)
    attention: np.ndarray | None = None
    for start in range(0, len(names), batch_size):
        batch = names[start : start + batch_size]
        images = torch.stack([load_image(root / name, meta.preprocessing) for name in batch])
        batch_scores, batch_attention = model.forward_with_attention(images.to(device))
        if attention is None:
            attention = np.empty((len(names), *batch_attention.shape[1:]), dtype=np.float16)
        scores[start : start + len(batch)] = batch_scores.float().cpu().numpy()
        attention[start : start + len(batch)] = batch_attention.half().cpu().numpy()

    predicted = scores.argmax(axis=1).astype(np.int64)
    with atomic_open(out_npz, "wb") as handle:
        np.savez(
            handle,
            scores=scores,
            predicted_index=predicted,
            predicted=np.array(meta.label_names, dtype=str)[predicted],
            attention=attention,
            patch_grid=np.array(model.patch_grid, dtype=np.int64),
            image_names=np.array(names, dtype=str),
            label_names=np.array(meta.label_names, dtype=str),
        )
    return len(names)
