"""Faithfulness of saliency maps: insertion and deletion AUC, and a counterfactual check.

Insertion and deletion (Petsiuk et al., RISE, BMVC 2018), at patch resolution:

* Patches are ranked by the map, highest first (ties: lower patch index first).
* The curve has ``steps + 1`` points: after ``n_k = round(k * P / steps)`` patches, k = 0..steps
  (steps is capped at P, the number of patches), i.e. fractions ``n_k / P`` from 0 to 1.
* **Deletion** starts from the image and replaces the ranked patches by the image's mean colour
  (per channel); **insertion** starts from a blurred copy and puts the ranked patches back. The
  blur is Gaussian, RISE's ``klen=11, nsig=5`` at 224 px: sigma = 5 px and an 11 px kernel,
  both scaled with the image side (the kernel rounded to the next odd size).
* The score is the softmax probability of the image's **true class**, from the model that the
  map explains. Two models: the Prompt-CAM model (its own maps, the mean of the kept heads'
  attention, and the post-hoc baselines computed on it, the gradient of its score ``s[c]``)
  and the linear probe on the same frozen backbone (the baselines computed on it). Methods are
  compared within one model: an AUC depends on the model's confidence as much as on the map.
* AUC: trapezoid rule over the fractions. Insertion: higher is better; deletion: lower is better.
  The mean curve over the images (``fidelity_curves.tsv``) has the mean AUC as its area: the
  trapezoid rule is linear in the curve.
* Two references per model: the ``random`` method (``random_maps`` random patch rankings per
  image, seeded, its curve and AUC the mean over them: what a map with no information scores),
  and the clean-image probability; ``insertion_norm``/``deletion_norm`` are the AUCs divided by
  the model's mean true-class probability on the clean images (a map that deletes nothing that
  matters keeps a deletion_norm near 1).

Counterfactual check, on correctly classified images: blank (mean colour) the region of the
image's top trait, the ``region_patches`` highest patches of the most important head's map
(the head the greedy search blurs last), and count how often the prediction changes; compare
with ``random_regions`` regions of as many patches drawn uniformly at random per image.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
import torchvision.transforms.functional as TF
from torch import Tensor

from promptcam.data.batch_parts import BatchResults, gather_parts, shard_group_info
from promptcam.data.reader import WHOLE_SPLIT, ShardGroup, TransformConfig, shard_batch_loader
from promptcam.evaluation.scatter import compute_batches, open_results, write_part
from promptcam.evaluation.tables import write_cam_maps, write_fidelity_curves
from promptcam.io import atomic_open, sha256_file, write_json
from promptcam.progress import ProgressLines
from promptcam.traits.tables import TraitMaps, read_trait_maps

LOGGER = logging.getLogger(__name__)

__all__ = [
    "FIDELITY_METHODS",
    "FidelityConfig",
    "auc",
    "blurred_copy",
    "counterfactual",
    "mean_colour",
    "patch_counts",
    "patch_ranking",
    "perturbation_curves",
    "prompt_cam_saliency",
    "run_rank_fidelity",
    "top_head_maps",
]

Mode = Literal["insertion", "deletion"]
COUNTERFACTUAL_KEYS = (
    "top_trait_flip_rate",
    "random_flip_rate",
    "top_trait_probability_drop",
    "random_probability_drop",
)
ScoreFn = Callable[[Tensor], Tensor]
Method = tuple[str, str]  # (method, model)
PROMPT_CAM, LINEAR_PROBE, RANDOM = "prompt_cam", "linear_probe", "random"
BASELINE_METHODS = ("grad_cam", "layer_cam", "eigen_cam", "attention_rollout")  # cams.CAM_METHODS
# The rows of fidelity.tsv and the columns of cam_maps.npz, in that order.
FIDELITY_METHODS: tuple[Method, ...] = (
    (PROMPT_CAM, PROMPT_CAM),
    *((method, PROMPT_CAM) for method in BASELINE_METHODS),
    (RANDOM, PROMPT_CAM),
    *((method, LINEAR_PROBE) for method in BASELINE_METHODS),
    (RANDOM, LINEAR_PROBE),
)


@dataclass(frozen=True)
class FidelityConfig:
    """The workflow config's ``fidelity`` section; see the module docstring."""

    steps: int = 32
    blur_sigma: float = 5.0
    blur_kernel: int = 11
    blur_reference_size: int = 224
    max_images: int | None = None
    batch_size: int = 64
    region_fraction: float = 0.1
    random_regions: int = 10
    random_maps: int = 3
    seed: int = 0
    threads: int = 1
    num_workers: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be positive, got {self.steps}")
        if not 0.0 < self.region_fraction < 1.0:
            raise ValueError(f"region_fraction must be in (0, 1), got {self.region_fraction}")
        if self.random_regions < 1:
            raise ValueError(f"random_regions must be positive, got {self.random_regions}")
        if self.random_maps < 1:
            raise ValueError(f"random_maps must be positive, got {self.random_maps}")


# ----------------------------------------------------------------------------- perturbation


def patch_ranking(saliency: Tensor) -> Tensor:
    """Maps (N, h, w) -> patch indices (N, P), most salient first, ties by lower index."""
    return saliency.flatten(1).sort(dim=1, descending=True, stable=True).indices


def patch_counts(num_patches: int, steps: int) -> np.ndarray:
    """Patches perturbed at each point of the curve: ``round(k * P / steps)``, k = 0..steps."""
    steps = min(steps, num_patches)
    return np.rint(np.arange(steps + 1) * num_patches / steps).astype(np.int64)


def _selection(ranking: Tensor, count: int, grid: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """Pixel mask (N, 1, H, W) of the ``count`` top-ranked patches."""
    selected = torch.zeros(ranking.shape, dtype=torch.bool, device=ranking.device)
    selected.scatter_(1, ranking[:, :count], True)
    patch_h, patch_w = size[0] // grid[0], size[1] // grid[1]
    cells = selected.view(-1, 1, *grid)
    return cells.repeat_interleave(patch_h, dim=2).repeat_interleave(patch_w, dim=3)


def mean_colour(images: Tensor) -> Tensor:
    """Each image's mean colour, broadcast to its shape: the deletion baseline."""
    return images.mean(dim=(2, 3), keepdim=True).expand_as(images)


def blurred_copy(
    images: Tensor, sigma: float = 5.0, kernel: int = 11, reference_size: int = 224
) -> Tensor:
    """Gaussian blur scaled with the image side from ``sigma``/``kernel`` at ``reference_size``."""
    scale = images.shape[-1] / reference_size
    size = max(3, math.ceil(kernel * scale) // 2 * 2 + 1)
    return TF.gaussian_blur(images, [size, size], [sigma * scale, sigma * scale])


def _target_probability(scores: Tensor, targets: Tensor) -> Tensor:
    return scores.float().softmax(dim=-1).gather(1, targets[:, None]).squeeze(1)


def perturbation_curves(
    score_fn: ScoreFn,
    images: Tensor,
    targets: Tensor,
    saliency: Tensor,
    baseline: Tensor,
    mode: Mode,
    steps: int,
    batch_size: int = 64,
) -> tuple[np.ndarray, np.ndarray]:
    """Insertion or deletion curves of ``images`` (N, 3, H, W) under maps (N, h, w).

    Returns:
        The fractions (S,) and the true class's probability at each (N, S).
    """
    if mode not in ("insertion", "deletion"):
        raise ValueError(f"mode must be 'insertion' or 'deletion', got {mode!r}")
    grid = tuple(saliency.shape[-2:])
    counts = patch_counts(grid[0] * grid[1], steps)
    ranking = patch_ranking(saliency)
    start, end = (baseline, images) if mode == "insertion" else (images, baseline)
    columns = []
    for count in counts:
        # One point of every curve at a time: memory stays that of one batch of images.
        perturbed = torch.where(
            _selection(ranking, int(count), grid, images.shape[-2:]), end, start
        )
        columns.append(
            torch.cat(
                [
                    _target_probability(score_fn(chunk), chunk_targets)
                    for chunk, chunk_targets in zip(
                        perturbed.split(batch_size), targets.split(batch_size), strict=True
                    )
                ]
            )
        )
    fractions = counts / counts[-1]
    return fractions, torch.stack(columns, dim=1).double().cpu().numpy()


def auc(fractions: np.ndarray, curves: np.ndarray) -> np.ndarray:
    """Trapezoid-rule area under each curve (N, S) over ``fractions`` (S,)."""
    return np.trapezoid(curves, fractions, axis=-1)


# ----------------------------------------------------------------------------- counterfactual


def counterfactual(
    score_fn: ScoreFn,
    images: Tensor,
    targets: Tensor,
    saliency: Tensor,
    region_patches: int,
    random_rankings: Tensor,
) -> dict[str, np.ndarray]:
    """Blank the top ``region_patches`` of each map, and random regions as large: the top
    patches of each of ``random_rankings`` (R, N, P), random patch orders.

    Returns:
        ``top_flipped`` (N,), ``top_probability`` (N,), ``random_flipped`` (N, R),
        ``random_probability`` (N, R), ``base_probability`` (N,): the true class's probability
        and whether the prediction left it.
    """
    grid = tuple(saliency.shape[-2:])
    baseline = mean_colour(images)

    def blanked(ranking: Tensor) -> tuple[np.ndarray, np.ndarray]:
        mask = _selection(ranking, region_patches, grid, images.shape[-2:])
        scores = score_fn(torch.where(mask, baseline, images)).float()
        flipped = scores.argmax(dim=-1) != targets
        return flipped.cpu().numpy(), _target_probability(scores, targets).double().cpu().numpy()

    top_flipped, top_probability = blanked(patch_ranking(saliency))
    random = [blanked(ranking.to(images.device)) for ranking in random_rankings]
    return {
        "base_probability": _target_probability(score_fn(images), targets).double().cpu().numpy(),
        "top_flipped": top_flipped,
        "top_probability": top_probability,
        "random_flipped": np.stack([flipped for flipped, _ in random], axis=1),
        "random_probability": np.stack([probability for _, probability in random], axis=1),
    }


def counterfactual_report(results: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Flip rates and mean probability drops of the top-trait and the random regions (null
    without images)."""
    if len(results["top_flipped"]) == 0:
        return {"n_images": 0, **dict.fromkeys(COUNTERFACTUAL_KEYS)}
    base = results["base_probability"]
    return {
        "n_images": len(base),
        "top_trait_flip_rate": float(results["top_flipped"].mean()),
        "random_flip_rate": float(results["random_flipped"].mean()),
        "top_trait_probability_drop": float((base - results["top_probability"]).mean()),
        "random_probability_drop": float((base[:, None] - results["random_probability"]).mean()),
    }


# ----------------------------------------------------------------------------- maps


def prompt_cam_saliency(maps: np.ndarray, kept: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Mean of each image's kept heads' maps (N, h, w); with no head kept, the map of the head
    the greedy search blurred last.

    Args:
        maps: (N, H, h, w) target-class maps. kept: (N, H) bool. order: (N, H) elimination order.
    """
    counts = kept.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = (maps * kept[..., None, None]).sum(axis=1) / counts[:, None, None]
    return np.where(counts[:, None, None] > 0, means, top_head_maps(maps, order))


def top_head_maps(maps: np.ndarray, order: np.ndarray) -> np.ndarray:
    """The map (N, h, w) of the most important head: the greedy elimination's last."""
    last = order[:, -1].clip(0)
    return maps[np.arange(len(maps)), last]


# ----------------------------------------------------------------------------- one rank


@dataclass
class _Accumulated:
    """Per-image curves of every (method, model) and clean probabilities of every model, batch by
    batch."""

    fractions: np.ndarray = field(default_factory=lambda: np.zeros(0))
    curves: dict[Method, dict[str, list[np.ndarray]]] = field(default_factory=dict)
    clean: dict[str, list[np.ndarray]] = field(default_factory=dict)

    def add_curves(
        self, method: Method, mode: str, fractions: np.ndarray, values: np.ndarray
    ) -> None:
        self.fractions = fractions
        self.curves.setdefault(method, {}).setdefault(mode, []).append(values)

    def mean_curve(self, method: Method, mode: str) -> np.ndarray:
        return np.concatenate(self.curves[method][mode]).mean(axis=0)

    def clean_probability(self, model: str) -> float:
        return float(np.concatenate(self.clean[model]).mean())


def _method_curves(
    score_fn: ScoreFn,
    images: Tensor,
    labels: Tensor,
    saliency: Tensor,
    baselines: Mapping[str, Tensor],
    config: FidelityConfig,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{mode: (fractions (S,), curves (N, S))}`` of one method's maps."""
    return {
        mode: perturbation_curves(
            score_fn, images, labels, saliency, baseline, mode, config.steps, config.batch_size
        )
        for mode, baseline in baselines.items()
    }


def _random_curves(
    score_fn: ScoreFn,
    images: Tensor,
    labels: Tensor,
    random_maps: Tensor,
    baselines: Mapping[str, Tensor],
    config: FidelityConfig,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Like :func:`_method_curves`, each image's curve the mean over maps (R, N, h, w)."""
    draws = [
        _method_curves(score_fn, images, labels, maps, baselines, config) for maps in random_maps
    ]
    return {
        mode: (draws[0][mode][0], np.mean([draw[mode][1] for draw in draws], axis=0))
        for mode in baselines
    }


def _fidelity_table(scores: _Accumulated, n_images: int) -> pd.DataFrame:
    rows = []
    for method, model in FIDELITY_METHODS:
        clean = scores.clean_probability(model)
        aucs = {
            mode: float(auc(scores.fractions, scores.mean_curve((method, model), mode)[None])[0])
            for mode in ("insertion", "deletion")
        }
        rows.append(
            {
                "method": method,
                "model": model,
                **aucs,
                "insertion_norm": aucs["insertion"] / clean,
                "deletion_norm": aucs["deletion"] / clean,
                "clean_probability": clean,
                "n_images": n_images,
            }
        )
    return pd.DataFrame(rows)


def _curves_table(scores: _Accumulated, n_images: int) -> pd.DataFrame:
    """Long table of the mean curves: one row per method, model, mode and step."""
    rows = []
    for method, model in FIDELITY_METHODS:
        for mode in ("insertion", "deletion"):
            mean = scores.mean_curve((method, model), mode)
            rows.extend(
                {
                    "method": method,
                    "model": model,
                    "mode": mode,
                    "step": step,
                    "fraction": float(fraction),
                    "probability": float(probability),
                    "n_images": n_images,
                }
                for step, (fraction, probability) in enumerate(
                    zip(scores.fractions, mean, strict=True)
                )
            )
    return pd.DataFrame(rows)


def _batch_maps(
    model: Any,
    probe: Any,
    images: Tensor,
    labels: Tensor,
    prompt_cam_maps: np.ndarray,
    random_map: Tensor,
) -> dict[Method, Tensor]:
    """Every method's maps (B, h, w) of one batch, on the CPU, keyed as FIDELITY_METHODS."""
    from promptcam.evaluation.cams import compute_cams, compute_prompt_cam_cams

    maps: dict[Method, Tensor] = {(PROMPT_CAM, PROMPT_CAM): torch.from_numpy(prompt_cam_maps)}
    for name, cam in compute_prompt_cam_cams(model, images, labels, BASELINE_METHODS).items():
        maps[(name, PROMPT_CAM)] = cam.float().cpu()
    maps[(RANDOM, PROMPT_CAM)] = random_map
    for name, cam in compute_cams(probe, images, labels, BASELINE_METHODS).items():
        maps[(name, LINEAR_PROBE)] = cam.float().cpu()
    maps[(RANDOM, LINEAR_PROBE)] = random_map
    return maps


def _score_batch(
    scores: _Accumulated,
    score_fns: Mapping[str, ScoreFn],
    images: Tensor,
    labels: Tensor,
    maps: Mapping[Method, Tensor],
    random_maps: Tensor,
    config: FidelityConfig,
) -> None:
    """Insertion/deletion curves of every method, and the clean probabilities, of one batch."""
    baselines = {
        "insertion": blurred_copy(
            images, config.blur_sigma, config.blur_kernel, config.blur_reference_size
        ),
        "deletion": mean_colour(images),
    }
    device = images.device
    for model_name, score_fn in score_fns.items():
        scores.clean.setdefault(model_name, []).append(
            _target_probability(score_fn(images), labels).double().cpu().numpy()
        )
    for method, model_name in FIDELITY_METHODS:
        score_fn = score_fns[model_name]
        if method == RANDOM:
            method_curves = _random_curves(
                score_fn, images, labels, random_maps.to(device), baselines, config
            )
        else:
            saliency = maps[(method, model_name)][: len(images)].to(device)
            method_curves = _method_curves(score_fn, images, labels, saliency, baselines, config)
        for mode, (fractions, values) in method_curves.items():
            scores.add_curves((method, model_name), mode, fractions, values)


def _prompt_cam_rows(row_of: Mapping[str, int], sample_ids: Any, trait_maps: object) -> np.ndarray:
    missing = [sample_id for sample_id in sample_ids if sample_id not in row_of]
    if missing:
        raise ValueError(
            f"{trait_maps}: no maps of test images {missing[:3]}...; rerun the traits rule on "
            "these shards"
        )
    return np.array([row_of[sample_id] for sample_id in sample_ids])


# What each image's random draws are for: the seed of a stream is (seed, purpose, shard, batch,
# image in batch), so an image draws the same whichever job, group or subset of a batch it is in.
RANDOM_MAPS, RANDOM_REGIONS = 1, 0


def image_generator(seed: int, purpose: int, shard: int, batch: int, index: int) -> torch.Generator:
    """The random stream of one image of a test batch (see :data:`RANDOM_MAPS`)."""
    state = np.random.SeedSequence([seed, purpose, shard, batch, index]).generate_state(
        1, np.uint64
    )
    return torch.Generator().manual_seed(int(state[0]) >> 1)


def random_draws(
    seed: int, purpose: int, shard: int, batch: int, count: int, shape: tuple[int, ...], draws: int
) -> Tensor:
    """``draws`` uniform arrays of ``shape`` per image of the batch: (draws, count, *shape)."""
    per_image = [
        torch.rand(draws, *shape, generator=image_generator(seed, purpose, shard, batch, index))
        for index in range(count)
    ]
    return torch.stack(per_image, dim=1)


@dataclass
class _RankModels:
    """What both fidelity and the CAM maps explain: the Prompt-CAM model, the rank's fitted
    linear probe, the traits rule's maps, and where they run."""

    model: Any
    meta: Any
    probe: Any
    device: torch.device
    stored: TraitMaps
    checkpoint_sha256: str
    probe_sha256: str

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.stored.map_shape[-2:])


def _rank_models(
    checkpoint: str | os.PathLike,
    probe: str | os.PathLike,
    trait_maps: str | os.PathLike,
    config: FidelityConfig,
    backbone_weights: str | os.PathLike | None,
) -> _RankModels:
    from promptcam.evaluation.cams import LinearProbe
    from promptcam.evaluation.linear_probe import read_probe
    from promptcam.model.checkpoint import load_checkpoint
    from promptcam.training.runtime import resolve_device

    torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    model, meta = load_checkpoint(checkpoint, backbone_weights=backbone_weights)
    model.to(device)
    fitted = read_probe(probe)
    checkpoint_sha256 = sha256_file(checkpoint)
    if fitted.report["checkpoint_sha256"] != checkpoint_sha256:
        raise ValueError(
            f"{probe} was fitted on the backbone of another checkpoint than {checkpoint}; "
            "rerun rule linear_probe"
        )
    explained = LinearProbe.from_sklearn(model.backbone, fitted.pipeline, fitted.pool)
    return _RankModels(
        model,
        meta,
        explained.to(device).eval(),
        device,
        read_trait_maps(trait_maps),
        checkpoint_sha256,
        sha256_file(probe),
    )


@dataclass
class _ExplainedBatch:
    """One test batch with every method's maps (``saliency``, keyed as FIDELITY_METHODS), the
    traits rule's target-class maps, kept heads and order of its images, and its random maps
    (R, B, h, w), of which the first is the ``random`` method's."""

    images: Tensor
    labels: Tensor
    sample_ids: list[str]
    maps: np.ndarray
    kept: np.ndarray
    order: np.ndarray
    random_maps: Tensor
    saliency: dict[Method, Tensor]


def _explain_batch(
    models: _RankModels,
    images: Tensor,
    labels: Tensor,
    batch_meta: Mapping[str, Any],
    trait_maps: str | os.PathLike,
    config: FidelityConfig,
) -> _ExplainedBatch:
    """Every method's maps of one test batch; each image's random maps from its own stream."""
    images, labels = images.to(models.device), labels.to(models.device)
    sample_ids = list(batch_meta["sample_id"])
    stored = models.stored
    rows = _prompt_cam_rows(stored.row_of(), sample_ids, trait_maps)
    maps, kept, order = stored.read_maps(rows), stored.kept[rows], stored.order[rows]
    random_maps = random_draws(
        config.seed,
        RANDOM_MAPS,
        int(batch_meta["shard"]),
        int(batch_meta["batch"]),
        len(labels),
        models.grid,
        config.random_maps,
    )
    saliency = _batch_maps(
        models.model,
        models.probe,
        images,
        labels,
        prompt_cam_saliency(maps, kept, order),
        random_maps[0],
    )
    return _ExplainedBatch(images, labels, sample_ids, maps, kept, order, random_maps, saliency)


def _group_info(
    stage: str,
    shards_dir: str | os.PathLike,
    group: ShardGroup,
    models: _RankModels,
    trait_maps: str | os.PathLike,
    config: FidelityConfig,
) -> dict[str, Any]:
    settings = asdict(config)
    for key in ("threads", "num_workers", "device"):  # where and how fast, not what
        settings.pop(key)
    return shard_group_info(
        shards_dir,
        "test",
        group,
        stage=stage,
        checkpoint_sha256=models.checkpoint_sha256,
        probe_sha256=models.probe_sha256,
        trait_maps_sha256=sha256_file(trait_maps),
        device=models.device.type,
        grid=list(models.grid),
        settings=settings,
    )


def _curve_key(method: Method, mode: str) -> str:
    return f"curve__{method[0]}__{method[1]}__{mode}"


COUNTERFACTUAL_ARRAYS = (
    "base_probability",
    "top_flipped",
    "top_probability",
    "random_flipped",
    "random_probability",
)


def _fidelity_arrays(
    models: _RankModels,
    batch: _ExplainedBatch,
    random_regions: Tensor,
    config: FidelityConfig,
) -> dict[str, np.ndarray]:
    """One batch's per-image curves of every (method, model) and mode, clean probabilities,
    and counterfactual results (``cf_*``; rows of images not searched, i.e. misclassified,
    are zero and ``cf_searched`` false)."""
    scores = _Accumulated()
    score_fns: dict[str, ScoreFn] = {PROMPT_CAM: models.model, LINEAR_PROBE: models.probe}
    count = len(batch.labels)
    num_patches = models.grid[0] * models.grid[1]
    region_patches = max(1, round(config.region_fraction * num_patches))
    with torch.inference_mode():
        _score_batch(
            scores,
            score_fns,
            batch.images,
            batch.labels,
            batch.saliency,
            batch.random_maps,
            config,
        )
        searched = np.nonzero(batch.order[:, 0] >= 0)[0]
        flips = {
            "base_probability": np.zeros(count),
            "top_flipped": np.zeros(count, bool),
            "top_probability": np.zeros(count),
            "random_flipped": np.zeros((count, config.random_regions), bool),
            "random_probability": np.zeros((count, config.random_regions)),
        }
        if len(searched):
            chosen = torch.from_numpy(searched).to(models.device)
            top_maps = top_head_maps(batch.maps[searched], batch.order[searched])
            result = counterfactual(
                models.model,
                batch.images[chosen],
                batch.labels[chosen],
                torch.from_numpy(top_maps).to(models.device),
                region_patches,
                random_regions[:, searched],
            )
            for key in COUNTERFACTUAL_ARRAYS:
                flips[key][searched] = result[key]
    arrays = {
        "image": np.asarray(batch.sample_ids, dtype=str),
        "cf_searched": np.isin(np.arange(count), searched),
        **{f"cf_{key}": values for key, values in flips.items()},
        **{f"clean__{model}": values[0] for model, values in scores.clean.items()},
    }
    for method in FIDELITY_METHODS:
        for mode in ("insertion", "deletion"):
            arrays[_curve_key(method, mode)] = scores.curves[method][mode][0]
    return arrays


def _fidelity_shard_group(
    models: _RankModels,
    shards_dir: str | os.PathLike,
    rank: str,
    trait_maps: str | os.PathLike,
    config: FidelityConfig,
    group: ShardGroup,
    state_path: str | os.PathLike | None,
) -> BatchResults:
    """Per-image fidelity arrays (:func:`_fidelity_arrays`) of the group's share of the split's
    first ``config.max_images`` test images (all by default)."""
    results = open_results(
        _group_info("fidelity", shards_dir, group, models, trait_maps, config), state_path
    )
    loader = _test_batches(models, shards_dir, rank, config, group, results, config.max_images)
    num_patches = models.grid[0] * models.grid[1]

    def score(images: Tensor, labels: Tensor, batch_meta: Mapping[str, Any]) -> dict:
        batch = _explain_batch(models, images, labels, batch_meta, trait_maps, config)
        regions = random_draws(
            config.seed,
            RANDOM_REGIONS,
            int(batch_meta["shard"]),
            int(batch_meta["batch"]),
            len(labels),
            (num_patches,),
            config.random_regions,
        ).argsort(dim=-1)
        return _fidelity_arrays(models, batch, regions, config)

    LOGGER.info(
        "%s: insertion/deletion and counterfactual on %d test images", rank, len(loader.dataset)
    )
    return compute_batches(results, loader, score, state_path, "test images scored")


def _test_batches(
    models: _RankModels,
    shards_dir: str | os.PathLike,
    rank: str,
    config: FidelityConfig,
    group: ShardGroup,
    results: BatchResults,
    max_samples: int | None = None,
) -> Any:
    return shard_batch_loader(
        shards_dir,
        "test",
        rank,
        TransformConfig.unaugmented(models.meta.preprocessing),
        config.batch_size,
        config.num_workers,
        models.device,
        group=group,
        skip=results.done(),
        max_samples=max_samples,
    )


def write_fidelity(
    *,
    info: Mapping[str, Any],
    arrays: Mapping[str, np.ndarray],
    rank: str,
    out_tsv: str | os.PathLike,
    out_counterfactual: str | os.PathLike,
    out_curves: str | os.PathLike,
    config: FidelityConfig,
) -> pd.DataFrame:
    """fidelity.tsv, fidelity_curves.tsv and counterfactual.json from per-image arrays (one
    group's, or every group's parts concatenated in shard order)."""
    if not arrays:
        raise ValueError(f"no test images for rank {rank!r}")
    seen = len(arrays["image"])
    grid = tuple(info["grid"])
    num_patches = grid[0] * grid[1]
    counts = patch_counts(num_patches, config.steps)
    scores = _Accumulated(fractions=counts / counts[-1])
    for method in FIDELITY_METHODS:
        for mode in ("insertion", "deletion"):
            scores.add_curves(method, mode, scores.fractions, arrays[_curve_key(method, mode)])
    for model_name in (PROMPT_CAM, LINEAR_PROBE):
        scores.clean[model_name] = [arrays[f"clean__{model_name}"]]
    table = _fidelity_table(scores, seen)
    LOGGER.info("%s: fidelity on %d test images\n%s", rank, seen, table.to_string(index=False))
    with atomic_open(out_tsv, "w", newline="") as handle:
        table.to_csv(handle, sep="\t", index=False)
    write_fidelity_curves(out_curves, _curves_table(scores, seen))
    searched = arrays["cf_searched"]
    report = counterfactual_report(
        {key: arrays[f"cf_{key}"][searched] for key in COUNTERFACTUAL_ARRAYS}
    )
    region_patches = max(1, round(config.region_fraction * num_patches))
    report.update(
        {
            "rank": rank,
            "region_patches": region_patches,
            "region_fraction": region_patches / num_patches,
            "random_regions": config.random_regions,
            "seed": config.seed,
            "region": "top patches of the most important head's map (the greedy's last head)",
            "baseline": "mean colour",
        }
    )
    LOGGER.info("%s: counterfactual %s", rank, report)
    write_json(out_counterfactual, report)
    ProgressLines().report(
        "wrote %s, %s and %s: %d test images scored, %d rows",
        out_tsv,
        out_curves,
        out_counterfactual,
        seen,
        len(table),
        force=True,
    )
    return table


def _cam_maps_shard_group(
    models: _RankModels,
    shards_dir: str | os.PathLike,
    rank: str,
    trait_maps: str | os.PathLike,
    config: FidelityConfig,
    group: ShardGroup,
    state_path: str | os.PathLike | None,
) -> BatchResults:
    """Per test image of the group: ``image`` and ``maps`` (M, h, w), every method of
    :data:`FIDELITY_METHODS` in that order."""
    info = _group_info("cam_maps", shards_dir, group, models, trait_maps, config)
    results = open_results(info, state_path)
    loader = _test_batches(models, shards_dir, rank, config, group, results)

    def explain(images: Tensor, labels: Tensor, batch_meta: Mapping[str, Any]) -> dict:
        batch = _explain_batch(models, images, labels, batch_meta, trait_maps, config)
        maps = torch.stack([batch.saliency[method] for method in FIDELITY_METHODS], dim=1)
        return {"image": np.asarray(batch.sample_ids, dtype=str), "maps": maps.numpy()}

    return compute_batches(results, loader, explain, state_path, "test images' maps")


def write_cam_maps_of(
    *, arrays: Mapping[str, np.ndarray], rank: str, out_cam_maps: str | os.PathLike
) -> int:
    """cam_maps.npz from per-image arrays (:func:`_cam_maps_shard_group`); returns the number
    of images."""
    if not arrays:
        raise ValueError(f"no test images for rank {rank!r}")
    write_cam_maps(
        out_cam_maps,
        arrays["image"].tolist(),
        [method for method, _ in FIDELITY_METHODS],
        [model_name for _, model_name in FIDELITY_METHODS],
        arrays["maps"],
    )
    ProgressLines().report(
        "wrote %s: %d test images", out_cam_maps, len(arrays["image"]), force=True
    )
    return len(arrays["image"])


GROUP_STAGES = {"fidelity": _fidelity_shard_group, "cam_maps": _cam_maps_shard_group}


def fidelity_shard_group(
    stage: Literal["fidelity", "cam_maps"],
    *,
    checkpoint: str | os.PathLike,
    probe: str | os.PathLike,
    shards_dir: str | os.PathLike,
    rank: str,
    trait_maps: str | os.PathLike,
    config: FidelityConfig,
    group: ShardGroup = WHOLE_SPLIT,
    state_path: str | os.PathLike | None = None,
    backbone_weights: str | os.PathLike | None = None,
) -> BatchResults:
    """The per-image arrays of ``stage`` (``fidelity``: curves, clean probabilities and
    counterfactual; ``cam_maps``: every method's maps) over the test shards of ``group``.
    With ``state_path``, SIGTERM or SIGUSR1 stops it at the next batch boundary with the
    batches so far saved there (:func:`promptcam.evaluation.scatter.compute_batches`)."""
    models = _rank_models(checkpoint, probe, trait_maps, config, backbone_weights)
    return GROUP_STAGES[stage](models, shards_dir, rank, trait_maps, config, group, state_path)


def run_rank_fidelity(
    *,
    checkpoint: str | os.PathLike,
    probe: str | os.PathLike,
    shards_dir: str | os.PathLike,
    rank: str,
    trait_maps: str | os.PathLike,
    out_tsv: str | os.PathLike,
    out_counterfactual: str | os.PathLike,
    out_curves: str | os.PathLike,
    config: FidelityConfig,
    backbone_weights: str | os.PathLike | None = None,
    state_path: str | os.PathLike | None = None,
) -> pd.DataFrame:
    """Insertion/deletion AUC of every (method, model) of :data:`FIDELITY_METHODS`, and the
    counterfactual check, on the first ``max_images`` test images in shard order (all by
    default). Prompt-CAM's maps come from the traits rule's ``trait_maps.npz``, the probe from
    rule linear_probe's ``linear_probe.npz``; the baselines' maps are those
    :func:`run_rank_cam_maps` writes for every test image (same functions, same per-image
    random streams).

    ``fidelity.tsv``: one row per ``method`` (prompt_cam, grad_cam, layer_cam, eigen_cam,
    attention_rollout, random) and ``model`` (prompt_cam or linear_probe: the model explained
    and scored), see :func:`promptcam.evaluation.tables.read_fidelity`. ``fidelity_curves.tsv``
    (``out_curves``): the mean curves, one row per method, model, mode and step (see
    :func:`promptcam.evaluation.tables.write_fidelity_curves`); their trapezoid areas are the
    mean AUCs of ``fidelity.tsv``. ``counterfactual.json``: :func:`counterfactual_report` and
    the settings. The files are those that :func:`run_fidelity_part` and
    :func:`gather_fidelity` write over shard groups.
    """
    results = fidelity_shard_group(
        "fidelity",
        checkpoint=checkpoint,
        probe=probe,
        shards_dir=shards_dir,
        rank=rank,
        trait_maps=trait_maps,
        config=config,
        state_path=state_path,
        backbone_weights=backbone_weights,
    )
    return write_fidelity(
        info=results.info,
        arrays=results.arrays(),
        rank=rank,
        out_tsv=out_tsv,
        out_counterfactual=out_counterfactual,
        out_curves=out_curves,
        config=config,
    )


def run_rank_cam_maps(
    *,
    checkpoint: str | os.PathLike,
    probe: str | os.PathLike,
    shards_dir: str | os.PathLike,
    rank: str,
    trait_maps: str | os.PathLike,
    out_cam_maps: str | os.PathLike,
    config: FidelityConfig,
    backbone_weights: str | os.PathLike | None = None,
    state_path: str | os.PathLike | None = None,
) -> int:
    """Every (method, model) map of :data:`FIDELITY_METHODS` for *every* test image (CAMs are
    cheap; the curves of :func:`run_rank_fidelity` are not), for localisation:
    ``cam_maps.npz`` in test-shard order (:func:`promptcam.evaluation.tables.write_cam_maps`;
    ``random`` is each image's first random map, the one fidelity draws). Returns the number
    of images."""
    results = fidelity_shard_group(
        "cam_maps",
        checkpoint=checkpoint,
        probe=probe,
        shards_dir=shards_dir,
        rank=rank,
        trait_maps=trait_maps,
        config=config,
        state_path=state_path,
        backbone_weights=backbone_weights,
    )
    return write_cam_maps_of(arrays=results.arrays(), rank=rank, out_cam_maps=out_cam_maps)


def run_fidelity_part(
    stage: Literal["fidelity", "cam_maps"],
    *,
    out_part: str | os.PathLike,
    group: ShardGroup,
    **inputs: Any,
) -> int:
    """One shard ``group``'s arrays of ``stage`` (``inputs``: the arguments of
    :func:`fidelity_shard_group`) as a part file; returns its number of images."""
    results = fidelity_shard_group(stage, group=group, **inputs)
    return write_part(out_part, results, "test images")


def gather_fidelity(
    *, parts: Sequence[str | os.PathLike], shards_dir: str | os.PathLike, **outputs: Any
) -> pd.DataFrame:
    """fidelity's three files from the parts of shard groups 1..n (in that order), byte for
    byte those of :func:`run_rank_fidelity` (``outputs``: :func:`write_fidelity`'s arguments
    but ``info`` and ``arrays``)."""
    info, arrays = gather_parts(parts, shards_dir, "test", "fidelity_part")
    return write_fidelity(info=info, arrays=arrays, **outputs)


def gather_cam_maps(
    *, parts: Sequence[str | os.PathLike], shards_dir: str | os.PathLike, **outputs: Any
) -> int:
    """cam_maps.npz from the parts of shard groups 1..n, byte for byte that of
    :func:`run_rank_cam_maps`."""
    _, arrays = gather_parts(parts, shards_dir, "test", "cam_maps_part")
    return write_cam_maps_of(arrays=arrays, **outputs)
