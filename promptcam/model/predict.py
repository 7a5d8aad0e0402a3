"""Scores and attention maps of a trained Prompt-CAM for a folder of images.

:func:`predict` streams: each batch's arrays are appended to one ``.npy`` part per output
array beside the output, and the parts are copied into the ``.npz`` (a zip of ``.npy``
files) at the end, so memory stays bounded by the batch whatever the number of images; the
``.npz`` appears only when complete.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import zipfile
from pathlib import Path
from typing import IO

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import UnidentifiedImageError
from torch import Tensor
from torchvision.transforms import InterpolationMode

from promptcam.data.images import ImageSettings, decode
from promptcam.io import atomic_path
from promptcam.model.checkpoint import load_checkpoint, require_flat_reading
from promptcam.model.spec import Preprocessing

__all__ = ["DEFAULT_TOP_K", "IMAGE_SUFFIXES", "list_images", "load_image", "predict"]

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})

# Classes whose attention maps predict keeps per image unless asked for all of them.
DEFAULT_TOP_K = 5


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
    """Image file -> normalised (3, H, W) float tensor.

    The file is decoded as the data wing decodes a collection (8-bit RGB from any mode, alpha
    on white, EXIF orientation applied), so a new photo reaches the model as the training
    images did, and upright as ``promptcam explain``'s figures show it.
    """
    try:
        image = decode(path, ImageSettings()).image
    except UnidentifiedImageError as error:
        raise ValueError(f"{path} is not an image that PIL can read") from error
    image = TF.resize(
        image, list(preprocessing.img_size), InterpolationMode(preprocessing.interpolation)
    )
    return TF.normalize(TF.to_tensor(image), preprocessing.mean, preprocessing.std)


class _NpyAppender:
    """A ``.npy`` file of known shape written row block by row block (never held whole)."""

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: np.dtype | type) -> None:
        self.path, self.shape, self.dtype = path, shape, np.dtype(dtype)
        self.rows = 0
        self._handle: IO[bytes] = open(path, "wb")  # noqa: SIM115 - closed in close()
        header = {
            "descr": np.lib.format.dtype_to_descr(self.dtype),
            "fortran_order": False,
            "shape": shape,
        }
        np.lib.format.write_array_header_2_0(self._handle, header)

    def append(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if rows.shape[1:] != self.shape[1:] or self.rows + len(rows) > self.shape[0]:
            raise ValueError(f"{self.path.name}: rows {rows.shape} do not fit {self.shape}")
        self._handle.write(rows.tobytes())
        self.rows += len(rows)

    def close(self) -> None:
        self._handle.close()

    def check_complete(self) -> None:
        if self.rows != self.shape[0]:
            raise ValueError(f"{self.path.name}: {self.rows} rows written, {self.shape[0]} due")


def _write_npz(
    out: str | os.PathLike, parts: dict[str, Path], small: dict[str, np.ndarray]
) -> None:
    """Atomically write an ``.npz`` (as ``np.savez``: stored, zip64) from ``.npy`` files,
    copied in chunks, and small in-memory arrays."""
    with atomic_path(out) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, True) as archive:
        for key, part in parts.items():
            archive.write(part, f"{key}.npy")
        for key, array in small.items():
            with archive.open(f"{key}.npy", "w", force_zip64=True) as handle:
                np.lib.format.write_array(handle, np.asanyarray(array), allow_pickle=False)


def _top_classes(scores: Tensor, top_k: int) -> Tensor:
    """(B, K) the K highest-scoring classes of each image, in ascending class index (so that
    with K = C the maps are laid out as with every class)."""
    return scores.topk(top_k, dim=-1).indices.sort(dim=-1).values


@torch.inference_mode()
def predict(
    ckpt: str | os.PathLike,
    image_or_dir: str | os.PathLike,
    out_npz: str | os.PathLike,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    backbone_weights: str | os.PathLike | None = None,
    top_k: int | None = DEFAULT_TOP_K,
) -> int:
    """Write ``out_npz`` (atomically, streaming batch by batch); returns N. For N images, C
    classes, H heads, P patches and K = min(``top_k``, C) kept classes:

    * ``scores`` (N, C) float32;
    * ``predicted_index`` (N,) int64: the class with the highest score; ``predicted`` (N,):
      its label;
    * ``attention`` (N, H, K, P) float16: the last-block attention over the patches (softmax
      over all tokens, not renormalised), row-major over ``patch_grid``, of the class prompts
      of ``attention_classes`` (N, K) int64: each image's K highest-scoring classes in
      ascending class index. ``top_k=None``: every class's, (N, H, C, P), class ``c`` at
      index ``c`` (no ``attention_classes``);
    * ``patch_grid`` (2,): patch rows and columns;
    * ``image_names`` (N,): paths relative to ``image_or_dir`` (the file name for one image);
    * ``label_names`` (C,).
    """
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 (or None for every class), got {top_k}")
    root, names = list_images(image_or_dir)  # first: a wrong path fails before the model loads
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, meta = load_checkpoint(ckpt, backbone_weights=backbone_weights)
    require_flat_reading(meta, ckpt)
    model.to(device)
    labels = np.array(meta.label_names, dtype=str)
    num_images, num_classes = len(names), model.num_classes
    kept = num_classes if top_k is None else min(top_k, num_classes)
    grid = model.patch_grid
    shapes = {
        "scores": ((num_images, num_classes), np.float32),
        "predicted_index": ((num_images,), np.int64),
        "predicted": ((num_images,), labels.dtype),
        "attention": ((num_images, model.num_heads, kept, grid[0] * grid[1]), np.float16),
    }
    if top_k is not None:
        shapes["attention_classes"] = ((num_images, kept), np.int64)
    out = Path(out_npz)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as parts_dir:
        with contextlib.ExitStack() as open_parts:
            parts = {}
            for key, (shape, dtype) in shapes.items():
                parts[key] = _NpyAppender(Path(parts_dir) / f"{key}.npy", shape, dtype)
                open_parts.callback(parts[key].close)
            for start in range(0, num_images, batch_size):
                batch = names[start : start + batch_size]
                images = torch.stack(
                    [load_image(root / name, meta.preprocessing) for name in batch]
                )
                scores, attention = model.forward_with_attention(images.to(device))
                _append_batch(parts, scores, attention, top_k, labels)
        for part in parts.values():
            part.check_complete()
        small = {
            "patch_grid": np.array(grid, dtype=np.int64),
            "image_names": np.array(names, dtype=str),
            "label_names": labels,
        }
        _write_npz(out, {key: part.path for key, part in parts.items()}, small)
    return num_images


def _append_batch(
    parts: dict[str, _NpyAppender],
    scores: Tensor,
    attention: Tensor,
    top_k: int | None,
    labels: np.ndarray,
) -> None:
    """One batch's scores (B, C) and attention (B, H, C, P) onto the parts."""
    scores = scores.float()
    predicted = scores.argmax(dim=-1).cpu().numpy().astype(np.int64)
    if top_k is not None:
        classes = _top_classes(scores, min(top_k, scores.shape[-1]))
        index = classes[:, None, :, None].expand(-1, attention.shape[1], -1, attention.shape[-1])
        attention = attention.gather(2, index)
        parts["attention_classes"].append(classes.cpu().numpy())
    parts["scores"].append(scores.cpu().numpy())
    parts["predicted_index"].append(predicted)
    parts["predicted"].append(labels[predicted])
    parts["attention"].append(attention.half().cpu().numpy())
