"""Probes of a demo backbone: linear probes per rank, the part probe, token locality."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from promptcam.data.masks import DEMO_LEVELS
from promptcam.demo.drawing import render_organism
from promptcam.demo.pretext import last_block_tokens, normalise, part_shares
from promptcam.demo.taxa import RANK_TRAIT_PARTS, DemoConfig, build_taxonomy


@dataclass(frozen=True)
class ProbeReport:
    linear_probe_top1: dict[str, float]
    part_probe_accuracy: float
    n_train: int
    n_test: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _fresh_demo_draw(
    demo: Any, image_size: int, per_species: int, seed: int
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:

    taxa = build_taxonomy(demo)
    images, parts, labels = [], [], {level: [] for level in DEMO_LEVELS}
    for species_index, taxon in enumerate(taxa):
        for replicate in range(per_species):
            rng = np.random.default_rng(
                np.random.SeedSequence([seed, 0xD1A6, species_index, replicate])
            )
            rendering = render_organism(taxon.spec, image_size, rng)
            images.append(rendering.image)
            parts.append(rendering.parts)
            for level in DEMO_LEVELS:
                labels[level].append(getattr(taxon, level))
    return np.stack(images), np.stack(parts), {k: np.array(v) for k, v in labels.items()}


def _patch_part_shares(parts: np.ndarray, patch_size: int) -> torch.Tensor:
    """(N, H, W) part indices -> (N, patches, parts) area share of each part in each patch."""
    return part_shares(torch.from_numpy(parts.astype(np.int64)), patch_size, 1)[:, :, 0]


@torch.no_grad()
def _features(
    backbone: VisionTransformer, images: np.ndarray, last_block_input: bool = False
) -> torch.Tensor:
    """Patch tokens (N, patches, D) of uint8 images (N, H, W, 3): the backbone's output, or
    what enters its last block."""
    backbone.eval()
    out = []
    for start in range(0, len(images), 128):
        chunk = normalise(torch.from_numpy(images[start : start + 128]).permute(0, 3, 1, 2))
        tokens = (
            last_block_tokens(backbone, chunk)
            if last_block_input
            else backbone.forward_features(chunk)
        )
        out.append(tokens[:, backbone.num_prefix_tokens :])
    return torch.cat(out)


def probe_backbone(
    backbone: VisionTransformer,
    image_size: int,
    patch_size: int,
    per_species: int = 60,
    seed: int = 99,
) -> ProbeReport:
    """Linear probes on frozen features of a fresh demo draw (never the shipped dataset).

    Taxonomy probe: multinomial logistic regression on the mean of the patch tokens, per
    rank, trained on the first two thirds of each species' images, scored on the rest.
    Part probe: logistic regression from each patch token to the patch's majority body part.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    images, parts, labels = _fresh_demo_draw(DemoConfig(), image_size, per_species, seed)
    tokens = _features(backbone, images)  # (N, P, D)
    n = len(images)
    is_train = (np.arange(n) % per_species) < (2 * per_species) // 3
    pooled = StandardScaler().fit_transform(tokens.mean(1).numpy())
    top1 = {}
    for level, y in labels.items():
        clf = LogisticRegression(max_iter=2000, C=1.0).fit(pooled[is_train], y[is_train])
        top1[level] = float((clf.predict(pooled[~is_train]) == y[~is_train]).mean())

    majority = _patch_part_shares(parts, patch_size).argmax(-1).numpy()
    patch_features = tokens.numpy()
    scaler = StandardScaler().fit(patch_features[is_train].reshape(-1, tokens.shape[-1]))
    x_train = scaler.transform(patch_features[is_train].reshape(-1, tokens.shape[-1]))
    x_test = scaler.transform(patch_features[~is_train].reshape(-1, tokens.shape[-1]))
    part_clf = LogisticRegression(max_iter=500).fit(x_train, majority[is_train].reshape(-1))
    part_accuracy = float((part_clf.predict(x_test) == majority[~is_train].reshape(-1)).mean())
    return ProbeReport(top1, part_accuracy, int(is_train.sum()), int((~is_train).sum()))


def token_locality(
    backbone: VisionTransformer,
    image_size: int,
    patch_size: int,
    per_species: int = 40,
    seed: int = 7,
    max_tokens: int = 6000,
) -> dict[str, dict[str, float]]:
    """Where does a rank's information sit in the tokens entering the last block?

    Per rank, a logistic regression from single tokens to the rank's label: once on the
    tokens that show the rank's trait, once on the tokens that neither show nor touch any
    trait (tail, dorsal fin, marking; 3 x 3 patch neighbourhood). A local backbone reads the
    rank on the trait and is near chance away from every trait. Fresh demo draw (two thirds
    of each species' images to fit, the rest to score), at most ``max_tokens`` tokens each.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    images, parts, labels = _fresh_demo_draw(DemoConfig(), image_size, per_species, seed)
    tokens = _features(backbone, images, last_block_input=True).numpy()
    n, grid = len(images), image_size // patch_size
    is_train = (np.arange(n) % per_species) < (2 * per_species) // 3
    shows = _patch_part_shares(parts, patch_size) > 0  # (N, patches, parts)
    any_trait = shows[..., list(RANK_TRAIT_PARTS.values())].any(-1).float()
    near_any = F.max_pool2d(any_trait.view(n, 1, grid, grid), 3, 1, 1) > 0
    far = ~near_any.reshape(n, grid * grid).numpy()
    rng = np.random.default_rng(seed)

    def accuracy(selected: np.ndarray, y: np.ndarray) -> float:
        def pick(split: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray]:
            x = tokens[split][selected[split]]
            labels_per_token = np.repeat(y[split], selected[split].sum(1))
            keep = rng.choice(len(x), min(limit, len(x)), replace=False)
            return x[keep], labels_per_token[keep]

        x_fit, y_fit = pick(is_train, max_tokens)
        x_test, y_test = pick(~is_train, max_tokens)
        scaler = StandardScaler().fit(x_fit)
        clf = LogisticRegression(max_iter=300, C=0.1).fit(scaler.transform(x_fit), y_fit)
        return float((clf.predict(scaler.transform(x_test)) == y_test).mean())

    report = {}
    for rank, part in RANK_TRAIT_PARTS.items():
        y = labels[rank]
        on_trait = shows[..., part].numpy()
        report[rank] = {
            "on_trait_top1": accuracy(on_trait, y),
            "far_from_traits_top1": accuracy(far, y),
            "chance": 1.0 / len(set(y)),
        }
    return report
