"""Insertion/deletion AUC on a model with a known answer, the baseline CAMs, the counterfactual
check, and the traits -> localization -> fidelity chain on tiny demo shards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from promptcam.evaluation.cams import CAM_METHODS, LinearProbe, compute_cams, record
from promptcam.evaluation.evaluate import EvalConfig, fit_rank_probe
from promptcam.evaluation.fidelity import (
    FidelityConfig,
    auc,
    blurred_copy,
    counterfactual,
    mean_colour,
    patch_counts,
    patch_ranking,
    perturbation_curves,
    prompt_cam_saliency,
    run_rank_cam_maps,
    run_rank_fidelity,
)
from promptcam.model.backbone import build_backbone
from promptcam.model.checkpoint import save_checkpoint
from promptcam.model.prompt_cam import PromptCAM
from promptcam.model.spec import BackboneSpec, PromptCAMConfig

torch.set_num_threads(1)

GRID = (4, 4)
SIZE = 16  # 4x4 patches of 4x4 pixels


def region_mask() -> torch.Tensor:
    """Pixels of patches 0, 1, 4, 5 (the top-left 2x2 patches)."""
    mask = torch.zeros(1, 1, SIZE, SIZE, dtype=torch.bool)
    mask[..., :8, :8] = True
    return mask


def visible_fraction_model(original: torch.Tensor):
    """Scores whose class-0 probability is the fraction of the region still showing the
    original pixels."""
    region = region_mask().expand(-1, 3, -1, -1)

    def score(images: torch.Tensor) -> torch.Tensor:
        same = (images == original[: len(images)]) & region
        visible = same.flatten(1).sum(1).double() / region.sum()
        return torch.stack([visible.log(), (1 - visible).log()], dim=1)

    return score


def region_map(best_first: bool) -> torch.Tensor:
    saliency = torch.arange(16, dtype=torch.float32).flip(0).view(1, *GRID) / 16
    inside = region_mask()[0, 0, ::4, ::4]
    return (
        torch.where(inside, 2.0 + saliency, saliency)
        if best_first
        else torch.where(inside, -1.0, saliency)
    )


@pytest.mark.parametrize("steps", [16, 8, 4])
def test_insertion_deletion_auc_on_a_known_case(steps: int) -> None:
    image = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    score = visible_fraction_model(image)
    targets = torch.tensor([0])
    expected = {  # region = 4 of 16 patches; perfect map first, then the reversed map
        (True, "deletion"): 0.125,
        (True, "insertion"): 0.875,
        (False, "deletion"): 0.875,
        (False, "insertion"): 0.125,
    }
    baselines = {"insertion": blurred_copy(image), "deletion": mean_colour(image)}
    for (best_first, mode), value in expected.items():
        fractions, curves = perturbation_curves(
            score, image, targets, region_map(best_first), baselines[mode], mode, steps
        )
        assert fractions[0] == 0 and fractions[-1] == 1 and len(fractions) == steps + 1
        start, end = (0.0, 1.0) if mode == "insertion" else (1.0, 0.0)
        assert curves[0, 0] == pytest.approx(start) and curves[0, -1] == pytest.approx(end)
        assert auc(fractions, curves)[0] == pytest.approx(value)


def test_patch_counts_and_ranking() -> None:
    assert patch_counts(16, 4).tolist() == [0, 4, 8, 12, 16]
    assert patch_counts(10, 4).tolist() == [0, 2, 5, 8, 10]
    assert patch_counts(3, 10).tolist() == [0, 1, 2, 3]  # capped at one patch per step
    ties = torch.tensor([[[0.5, 0.9], [0.5, 0.9]]])
    assert patch_ranking(ties).tolist() == [[1, 3, 0, 2]]


def test_baselines() -> None:
    image = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    mean = mean_colour(image)
    torch.testing.assert_close(mean[:, :, 5, 7], image.mean(dim=(2, 3)))
    blurred = blurred_copy(image)
    assert blurred.shape == image.shape
    assert blurred.std() < image.std()  # smoothed
    torch.testing.assert_close(blurred.mean(), image.mean(), atol=0.02, rtol=0)


def test_counterfactual_top_region_flips_more_than_random_regions() -> None:
    image = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    visible = visible_fraction_model(image)

    def decides_by_region(images: torch.Tensor) -> torch.Tensor:
        # Class 0 while more than half of the region shows.
        probability = visible(images)[:, 0].exp()
        return torch.stack([probability, torch.full_like(probability, 0.5)], dim=1)

    result = counterfactual(
        decides_by_region,
        image,
        torch.tensor([0]),
        region_map(best_first=True),
        region_patches=3,
        random_rankings=torch.rand(50, 1, 16, generator=torch.Generator().manual_seed(0)).argsort(
            dim=-1
        ),
    )
    assert result["top_flipped"].tolist() == [True]
    # A random 3-patch region covers 3 region patches with probability C(4,3)/C(16,3) ~ 0.7%.
    assert result["random_flipped"].mean() < 0.2
    assert result["random_flipped"].shape == (1, 50)


def test_prompt_cam_saliency_means_kept_heads_or_uses_the_last_head() -> None:
    maps = np.stack([np.full((3, 2, 2), 1.0), np.full((3, 2, 2), 1.0)])
    maps[:, 1] = 3.0
    maps[:, 2] = 7.0
    kept = np.array([[True, True, False], [False, False, False]])
    order = np.array([[2, 0, 1], [0, 2, 1]])
    saliency = prompt_cam_saliency(maps, kept, order)
    np.testing.assert_allclose(saliency[0], 2.0)
    np.testing.assert_allclose(saliency[1], 3.0)  # no head kept: the last eliminated, head 1


# ----------------------------------------------------------------------------- CAMs


def tiny_backbone(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    vit = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, **kwargs)
    return build_backbone("vit_custom", **vit).eval()


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_cams_have_the_patch_grid_shape_and_are_non_negative(pool: str) -> None:
    backbone = tiny_backbone()
    generator = torch.Generator().manual_seed(0)
    probe = LinearProbe(backbone, torch.randn(3, 32, generator=generator), torch.zeros(3), pool)
    images = torch.randn(2, 3, 32, 32, generator=generator)
    cams = compute_cams(probe, images, torch.tensor([0, 2]))
    assert set(cams) == set(CAM_METHODS)
    for name, cam in cams.items():
        assert cam.shape == (2, 4, 4), name
        assert bool((cam >= 0).all()), name
        assert bool(torch.isfinite(cam).all()), name
    other = compute_cams(probe, images, torch.tensor([1, 1]), ("grad_cam", "eigen_cam"))
    assert not torch.equal(other["grad_cam"], cams["grad_cam"])  # class-specific
    torch.testing.assert_close(other["eigen_cam"], cams["eigen_cam"])  # class-agnostic
    assert all(block.attn.fused_attn for block in backbone.blocks)  # restored


def test_rollout_of_a_backbone_with_registers_sums_over_patches_only() -> None:
    backbone = tiny_backbone(reg_tokens=2)
    probe = LinearProbe(backbone, torch.randn(2, 32), torch.zeros(2), "cls")
    images = torch.randn(1, 3, 32, 32)
    recording = record(probe, images, with_grad=False)
    assert len(recording.attentions) == 2
    assert recording.attentions[0].shape == (1, 4, 19, 19)
    rollout = compute_cams(probe, images, torch.tensor([0]), ("attention_rollout",))
    total = rollout["attention_rollout"].sum()
    assert 0 < total < 1  # the CLS row also gives mass to the prefix tokens


def test_probe_from_sklearn_folds_the_standardisation() -> None:
    backbone = tiny_backbone()
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.normal(size=(12, 3, 32, 32)).astype(np.float32))
    with torch.no_grad():
        features = backbone.forward_features(images)[:, 0].numpy()
    for num_classes in (2, 3):
        labels = np.arange(12) % num_classes
        pipeline = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(
            features, labels
        )
        probe = LinearProbe.from_sklearn(backbone, pipeline, "cls")
        with torch.no_grad():
            probabilities = probe(images).softmax(dim=-1).numpy()
        np.testing.assert_allclose(probabilities, pipeline.predict_proba(features), atol=1e-4)


# ----------------------------------------------------------------------------- CAMs of Prompt-CAM

PROMPT_CAM_LAYOUTS = [
    ("reference", "deep", 0),
    ("reference", "shallow", 0),
    ("scalable", "deep", 2),
]


def tiny_prompt_cam(layout: str, variant: str, agnostic: int, num_classes: int = 3) -> PromptCAM:
    torch.manual_seed(0)
    vit = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=4)
    config = PromptCAMConfig(
        num_classes=num_classes, layout=layout, variant=variant, num_agnostic_prompts=agnostic
    )
    model = PromptCAM(BackboneSpec("vit_custom", kwargs=vit), config).eval()
    with torch.no_grad():
        model.head.weight.normal_(std=3.0)  # scores that differ between classes
    return model


@pytest.mark.parametrize(("layout", "variant", "agnostic"), PROMPT_CAM_LAYOUTS)
def test_prompt_cam_cams_shapes_class_specificity_and_rollout(
    layout: str, variant: str, agnostic: int
) -> None:
    from promptcam.evaluation.cams import (
        _attention_weights,
        compute_prompt_cam_cams,
        record_prompt_cam,
    )

    model = tiny_prompt_cam(layout, variant, agnostic)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    cams = compute_prompt_cam_cams(model, images, torch.tensor([0, 2]))
    assert set(cams) == set(CAM_METHODS)
    for name, cam in cams.items():
        assert cam.shape == (2, 4, 4), name
        assert bool((cam >= 0).all()) and bool(torch.isfinite(cam).all()), name
    other = compute_prompt_cam_cams(model, images, torch.tensor([1, 1]))
    for name in ("grad_cam", "attention_rollout"):  # class-specific
        assert not torch.allclose(other[name], cams[name]), name
    torch.testing.assert_close(other["eigen_cam"], cams["eigen_cam"])  # class-agnostic
    # The recorded last-block weights are the model's own attention maps.
    recording = record_prompt_cam(model, images, with_grad=False)
    with torch.no_grad():
        scores, attention = model.forward_with_attention(images)
    torch.testing.assert_close(recording.scores, scores)
    weights = _attention_weights(
        model.backbone.blocks[-1].attn, recording.queries, recording.context
    )
    torch.testing.assert_close(weights[..., -16:], attention)
    # A one-block roll-out is the class row over the image tokens, renormalised.
    rollout = cams["attention_rollout"].flatten(1)
    assert bool((rollout.sum(dim=1) <= 1 + 1e-5).all()) and bool((rollout.sum(dim=1) > 0).all())


def test_prompt_cam_gradients_need_no_gradient_on_the_model() -> None:
    from promptcam.evaluation.cams import compute_prompt_cam_cams

    model = tiny_prompt_cam("scalable", "deep", 0)
    model.requires_grad_(False)  # frozen everywhere: the CAM's leaf gives the gradient
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    cams = compute_prompt_cam_cams(model, images, torch.tensor([0, 1]), ("grad_cam",))
    assert float(cams["grad_cam"].abs().sum()) > 0
    assert all(p.grad is None for p in model.parameters())


# ----------------------------------------------------------------------------- peer oracle


class InputGradient(torch.nn.Module):
    """``model`` with its input requiring grad: pytorch-grad-cam records a target layer's
    gradient only where its output requires grad, and every weight here is frozen."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images.detach().requires_grad_(True))


class ContextTap(torch.nn.Module):
    """The last block's norm1 with its context output passed through ``tap``: Prompt-CAM norms
    the class rows' queries there too, and pytorch-grad-cam's target must see one call."""

    def __init__(self, norm: torch.nn.Module, context_tokens: int) -> None:
        super().__init__()
        self.norm, self.tap, self.context_tokens = norm, torch.nn.Identity(), context_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.norm(x)
        return self.tap(out) if x.shape[1] == self.context_tokens else out


def patch_reshape(num_patches: int, grid: tuple[int, int]):
    def reshape(tokens: torch.Tensor) -> torch.Tensor:
        patches = tokens[:, -num_patches:]
        return patches.reshape(len(tokens), *grid, -1).permute(0, 3, 1, 2)

    return reshape


def assert_equal_to_pytorch_grad_cam(model, target_layer, reshape, ours, images, targets) -> None:
    """Grad-CAM, Layer-CAM and Eigen-CAM of ``ours`` (name -> (B, h, w)) equal pytorch-grad-cam's
    on ``target_layer``, ours post-processed as its BaseCAM does (min-max scaled, resized to the
    image, min-max scaled again)."""
    from pytorch_grad_cam import EigenCAM, GradCAM, LayerCAM
    from pytorch_grad_cam.utils.image import scale_cam_image
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection

    size = (images.shape[-1], images.shape[-2])

    def post_processed(maps: np.ndarray) -> np.ndarray:
        return scale_cam_image(scale_cam_image(maps, size))

    target_list = [ClassifierOutputTarget(int(c)) for c in targets]
    for name, cam_class in (("grad_cam", GradCAM), ("layer_cam", LayerCAM)):
        with cam_class(model, [target_layer], reshape_transform=reshape) as cam:
            theirs = cam(input_tensor=images, targets=target_list)
        mine = post_processed(ours[name].numpy())
        assert mine.max() > 0, name  # not an all-zero map
        np.testing.assert_allclose(mine, theirs, rtol=0, atol=1e-4, err_msg=name)
    with EigenCAM(model, [target_layer], reshape_transform=reshape) as cam:
        public = cam(input_tensor=images, targets=target_list)
        activations = cam.activations_and_grads.activations[0].numpy()
    projection = get_2d_projection(activations.copy())
    peaks = np.take_along_axis(
        projection.reshape(len(projection), -1),
        np.abs(projection.reshape(len(projection), -1)).argmax(axis=1)[:, None],
        axis=1,
    )
    sign = np.where(peaks < 0, -1.0, 1.0)[:, :, None]
    corrected = post_processed(np.maximum(projection * sign, 0))
    mine = post_processed(ours["eigen_cam"].numpy())
    np.testing.assert_allclose(mine, corrected, rtol=0, atol=1e-4, err_msg="eigen_cam")
    same_sign = sign[:, 0, 0] > 0  # where pytorch-grad-cam's SVD sign agrees, its output is ours
    np.testing.assert_allclose(mine[same_sign], public[same_sign], rtol=0, atol=1e-4)


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_probe_cams_equal_pytorch_grad_cam(pool: str) -> None:
    backbone = tiny_backbone()
    generator = torch.Generator().manual_seed(3)
    probe = LinearProbe(backbone, torch.randn(3, 32, generator=generator), torch.zeros(3), pool)
    images = torch.randn(4, 3, 32, 32, generator=generator)
    targets = torch.tensor([0, 1, 2, 1])
    ours = compute_cams(probe, images, targets)
    assert_equal_to_pytorch_grad_cam(
        InputGradient(probe), backbone.blocks[-1].norm1, patch_reshape(16, GRID), ours, images,
        targets,
    )  # fmt: skip


@pytest.mark.parametrize(("layout", "variant", "agnostic"), PROMPT_CAM_LAYOUTS)
def test_prompt_cam_cams_equal_pytorch_grad_cam(layout: str, variant: str, agnostic: int) -> None:
    from promptcam.evaluation.cams import compute_prompt_cam_cams

    model = tiny_prompt_cam(layout, variant, agnostic)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    targets = torch.tensor([0, 1, 2, 1])
    ours = compute_prompt_cam_cams(model, images, targets)
    block = model.backbone.blocks[-1]
    prompts_in_context = 0 if layout == "scalable" else model.num_classes
    tapped = ContextTap(block.norm1, prompts_in_context + 1 + 16)
    block.norm1 = tapped
    try:
        assert_equal_to_pytorch_grad_cam(
            InputGradient(model), tapped.tap, patch_reshape(16, GRID), ours, images, targets
        )
    finally:
        block.norm1 = tapped.norm


# ----------------------------------------------------------------------------- one rank, end to end


@pytest.fixture(scope="module")
def rank_outputs(tmp_path_factory) -> dict[str, Path]:
    """Tiny demo shards, a random Prompt-CAM for genus, and the traits rule's outputs."""
    from promptcam.data.metadata import MetadataSpec, prepare_metadata, read_label_map
    from promptcam.data.shards import ShardConfig, write_shards
    from promptcam.data.splits import SplitConfig
    from promptcam.demo.organisms import DemoConfig, generate_demo_dataset
    from promptcam.traits.cross_class import siblings_from_metadata
    from promptcam.traits.run import TraitRunConfig, run_rank_traits

    levels = ("family", "genus", "species")
    work = tmp_path_factory.mktemp("rank")
    demo = DemoConfig(genera_per_family=2, species_per_genus=1, images_per_species=8, image_size=64)
    table = generate_demo_dataset(work / "demo", demo)
    data = work / "data"
    prepare_metadata(
        table, work / "demo", data, MetadataSpec(levels=levels), SplitConfig(0.5, 0.25, 0.25)
    )
    shards = write_shards(
        data / "metadata.parquet",
        data / "labels",
        work / "demo",
        work / "shards",
        levels,
        ShardConfig(short_side=64),
    ).parent
    labels = read_label_map(data / "labels" / "genus.tsv").sort_values("index")["name"].tolist()
    torch.manual_seed(0)
    vit = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4)
    model = PromptCAM(
        BackboneSpec("vit_custom", kwargs=vit), PromptCAMConfig(num_classes=len(labels))
    )
    with torch.no_grad():
        model.head.weight.normal_(std=3.0)
    checkpoint = work / "model.pt"
    save_checkpoint(checkpoint, model, label_names=labels)
    out = work / "results"
    outputs = {
        "table": out / "traits.parquet",
        "maps": out / "trait_maps.npz",
        "summary": out / "trait_summary.tsv",
        "summary_maps": out / "trait_summary.npz",
        "cross_class": out / "cross_class.tsv",
        "cross_class_maps": out / "cross_class.npz",
    }
    siblings = siblings_from_metadata(pd.read_parquet(data / "metadata.parquet"), levels, "genus")
    config = TraitRunConfig(
        top_traits=2,
        cross_class_pairs={"genus": ((labels[0], labels[-1]),)},
        batch_size=4,
        drop_uninformative_heads=False,  # no head-information table here: not under test
    )
    run_rank_traits(
        checkpoint=checkpoint,
        shards_dir=shards,
        rank="genus",
        outputs=outputs,
        config=config,
        siblings=siblings,
    )
    probe = out / "linear_probe.npz"
    fit_rank_probe(
        shards_dir=shards, rank="genus", checkpoint=checkpoint, out_probe=probe, config=EvalConfig()
    )
    return {"checkpoint": checkpoint, "shards": shards, "out": out, "probe": probe, **outputs}


def test_traits_rule_outputs(rank_outputs) -> None:
    table = pd.read_parquet(rank_outputs["table"])
    assert len(table) % 4 == 0 and len(table) > 0
    searched = table[table["correct"]]
    assert (searched.groupby("image")["kept"].sum() == 2).all()  # top-k, 2 of 4 heads
    assert table.loc[~table["correct"], "kept"].all()
    with np.load(rank_outputs["maps"]) as maps:
        assert maps["maps"].shape == (len(table) // 4, 4, 4, 4)
        assert maps["kept"].shape == (len(table) // 4, 4)
    summary = pd.read_csv(rank_outputs["summary"], sep="\t")
    assert {"class", "label", "head", "n_images", "keep_rate"} <= set(summary.columns)
    cross = pd.read_csv(rank_outputs["cross_class"], sep="\t")
    assert cross.loc[0, "relation"] == "configured"
    assert (cross["relation"] == "sibling").sum() == 4  # two families of two genera
    with np.load(rank_outputs["cross_class_maps"]) as cross_maps:
        assert cross_maps["cross_maps"].shape == (len(cross), 4, 4, 4)


def test_localization_on_the_demo_masks(rank_outputs) -> None:
    from promptcam.evaluation.localization import run_rank_localization

    out = rank_outputs["out"] / "localization"
    run_cam_maps(rank_outputs, out, batch_size=8)  # cam_maps.npz: the baselines' maps
    run_rank_localization(
        trait_maps=rank_outputs["maps"],
        checkpoint=rank_outputs["checkpoint"],
        shards_dir=rank_outputs["shards"],
        rank="genus",
        levels=("family", "genus", "species"),
        out_json=out / "localization.json",
        cam_maps=out / "cam_maps.npz",
        out_tsv=out / "localization.tsv",
    )
    report = json.loads((out / "localization.json").read_text())
    assert set(report["by_trait"]) == {"family", "genus", "species"}
    for key in ("pointing_game", "energy_in_mask"):
        assert key in report
        assert report[key] is None or 0 <= report[key] <= 1


def run_fidelity(rank_outputs, out: Path, **settings) -> pd.DataFrame:
    return run_rank_fidelity(
        checkpoint=rank_outputs["checkpoint"],
        probe=rank_outputs["probe"],
        shards_dir=rank_outputs["shards"],
        rank="genus",
        trait_maps=rank_outputs["maps"],
        out_tsv=out / "fidelity.tsv",
        out_counterfactual=out / "counterfactual.json",
        out_curves=out / "fidelity_curves.tsv",
        config=FidelityConfig(steps=4, max_images=3, random_regions=2, random_maps=2, **settings),
    )


def run_cam_maps(rank_outputs, out: Path, **settings) -> int:
    return run_rank_cam_maps(
        checkpoint=rank_outputs["checkpoint"],
        probe=rank_outputs["probe"],
        shards_dir=rank_outputs["shards"],
        rank="genus",
        trait_maps=rank_outputs["maps"],
        out_cam_maps=out / "cam_maps.npz",
        config=FidelityConfig(random_maps=2, **settings),
    )


def test_fidelity_rows_normalisation_and_counterfactual(rank_outputs) -> None:
    from promptcam.evaluation.fidelity import BASELINE_METHODS, FIDELITY_METHODS
    from promptcam.evaluation.tables import FIDELITY_COLUMNS, read_fidelity

    assert BASELINE_METHODS == CAM_METHODS
    out = rank_outputs["out"]
    table = run_fidelity(rank_outputs, out, batch_size=8)
    written = read_fidelity(out / "fidelity.tsv")
    assert tuple(written.columns) == FIDELITY_COLUMNS
    assert list(zip(written["method"], written["model"], strict=True)) == list(FIDELITY_METHODS)
    for model in ("prompt_cam", "linear_probe"):
        methods = written.loc[written["model"] == model, "method"].tolist()
        assert methods[-1] == "random" and set(CAM_METHODS) <= set(methods), model
    assert written[["insertion", "deletion"]].apply(lambda c: c.between(0, 1)).all().all()
    assert written["clean_probability"].between(0, 1).all()
    for mode in ("insertion", "deletion"):
        np.testing.assert_allclose(
            written[f"{mode}_norm"], written[mode] / written["clean_probability"]
        )
    # One clean probability per model: the same images, the same model.
    assert (written.groupby("model")["clean_probability"].nunique() == 1).all()
    assert (written["n_images"] == 3).all()
    pd.testing.assert_frame_equal(written, table, check_dtype=False)
    report = json.loads((out / "counterfactual.json").read_text())
    assert report["region_patches"] == 2  # 10% of 16 patches, rounded
    assert report["n_images"] == 0 or 0 <= report["top_trait_flip_rate"] <= 1


def test_cam_maps_of_every_test_image(rank_outputs) -> None:
    from promptcam.evaluation.fidelity import FIDELITY_METHODS, prompt_cam_saliency
    from promptcam.evaluation.tables import read_cam_maps
    from promptcam.traits.tables import read_trait_maps

    out = rank_outputs["out"] / "maps"
    assert run_cam_maps(rank_outputs, out, batch_size=2) > 3  # several batches
    cams = read_cam_maps(out / "cam_maps.npz")
    stored = read_trait_maps(rank_outputs["maps"])
    assert sorted(cams.image) == sorted(stored.image) and len(cams.image) > 3
    assert cams.pairs() == list(FIDELITY_METHODS)
    assert cams.maps.shape == (len(cams.image), len(FIDELITY_METHODS), 4, 4)
    assert cams.maps.dtype == np.float32 and np.isfinite(cams.maps).all()
    rows = [stored.row_of()[image] for image in cams.image]
    expected = prompt_cam_saliency(stored.read_maps(rows), stored.kept[rows], stored.order[rows])
    np.testing.assert_allclose(cams.maps_of("prompt_cam", "prompt_cam"), expected)
    # Each model's baselines are its own: the probe's Grad-CAM is not Prompt-CAM's.
    assert not np.allclose(
        cams.maps_of("grad_cam", "prompt_cam"), cams.maps_of("grad_cam", "linear_probe")
    )
    with pytest.raises(KeyError, match="no maps"):
        cams.maps_of("prompt_cam", "linear_probe")


def test_paper_claim_within_the_prompt_cam_model() -> None:
    from promptcam.evaluation.tables import paper_claim

    def table(insertion: list[float], deletion: list[float]) -> pd.DataFrame:
        methods = ["prompt_cam", "grad_cam", "random", "grad_cam"]
        models = ["prompt_cam", "prompt_cam", "prompt_cam", "linear_probe"]
        return pd.DataFrame(
            {"method": methods, "model": models, "insertion": insertion, "deletion": deletion}
        )

    # The probe's baseline scores better, but it is another model: the claim holds.
    holds = paper_claim(table([0.8, 0.6, 0.5, 0.99], [0.1, 0.2, 0.5, 0.01]))
    assert holds["holds"] and holds["best_insertion"] == "prompt_cam"
    fails = paper_claim(table([0.8, 0.9, 0.5, 0.0], [0.1, 0.2, 0.05, 1.0]))
    assert not fails["highest_insertion"] and not fails["lowest_deletion"]
    assert (fails["best_insertion"], fails["best_deletion"]) == ("grad_cam", "random")
    with pytest.raises(ValueError, match="no Prompt-CAM row"):
        paper_claim(table([0.8, 0.9, 0.5, 0.0], [0.1, 0.2, 0.05, 1.0]).iloc[3:])


def test_cam_maps_file_is_checked(tmp_path) -> None:
    from promptcam.evaluation.tables import read_cam_maps, write_cam_maps

    maps = np.zeros((2, 3, 4, 4))
    with pytest.raises(ValueError, match="expected \\(images, methods, h, w\\)"):
        write_cam_maps(tmp_path / "m.npz", ["a", "b"], ["x", "y"], ["p", "p"], maps)
    assert not (tmp_path / "m.npz").exists()
    write_cam_maps(tmp_path / "m.npz", ["a", "b"], ["x", "y", "z"], ["p", "p", "q"], maps)
    read = read_cam_maps(tmp_path / "m.npz")
    assert read.image.tolist() == ["a", "b"] and read.maps.dtype == np.float32
    np.savez(tmp_path / "bad.npz", image=np.array(["a"]))
    with pytest.raises(ValueError, match="rerun the fidelity rule"):
        read_cam_maps(tmp_path / "bad.npz")


def test_fidelity_curves_are_the_mean_curves_of_the_aucs(rank_outputs) -> None:
    from promptcam.evaluation.tables import (
        FIDELITY_CURVE_COLUMNS,
        fidelity_curve_aucs,
        read_fidelity_curves,
    )

    out = rank_outputs["out"] / "curves"
    table = run_fidelity(rank_outputs, out, batch_size=2)
    curves = read_fidelity_curves(out / "fidelity_curves.tsv")
    assert tuple(curves.columns) == FIDELITY_CURVE_COLUMNS
    # Two batches (batch_size 2, 3 images); 16 patches, 4 steps: 5 points per curve.
    assert len(curves) == len(table) * 2 * 5
    assert (curves["n_images"] == 3).all()
    for _, curve in curves.groupby(["method", "model", "mode"]):
        assert curve["step"].tolist() == list(range(5))
        np.testing.assert_allclose(curve["fraction"], [0, 0.25, 0.5, 0.75, 1])
        assert curve["probability"].between(0, 1).all()
    keys = ["method", "model"]
    aucs = fidelity_curve_aucs(curves).pivot(index=keys, columns="mode", values="auc")
    aucs = aucs.loc[list(zip(table["method"], table["model"], strict=True))]
    for mode in ("insertion", "deletion"):
        np.testing.assert_allclose(aucs[mode], table[mode], rtol=0, atol=1e-9)
        # auc() of the mean curve: the trapezoid rule is linear in the curve.
        for (method, model), expected in zip(aucs.index, table[mode], strict=True):
            curve = curves[
                (curves["method"] == method) & (curves["model"] == model) & (curves["mode"] == mode)
            ]
            area = auc(curve["fraction"].to_numpy(), curve["probability"].to_numpy()[None])[0]
            assert abs(area - expected) < 1e-9
        # Clean images at the ends: deletion starts, insertion ends, at the clean probability.
        ends = curves[
            (curves["mode"] == mode) & (curves["step"] == (4 if mode == "insertion" else 0))
        ]
        clean = ends.groupby("model")["probability"].agg(["min", "max"])
        np.testing.assert_allclose(clean["min"], clean["max"], atol=1e-6)
        expected_clean = table.groupby("model")["clean_probability"].first()
        np.testing.assert_allclose(clean["min"], expected_clean.loc[clean.index], atol=1e-6)


def test_fidelity_curves_file_is_checked(tmp_path) -> None:
    from promptcam.evaluation.tables import read_fidelity_curves, write_fidelity_curves

    bad = pd.DataFrame({"method": ["x"], "mode": ["insertion"]})
    with pytest.raises(ValueError, match="no column"):
        write_fidelity_curves(tmp_path / "c.tsv", bad)
    assert not (tmp_path / "c.tsv").exists()
    (tmp_path / "c.tsv").write_text("method\tmodel\tmode\tstep\tfraction\tprobability\n")
    with pytest.raises(ValueError, match="rerun the fidelity rule"):
        read_fidelity_curves(tmp_path / "c.tsv")
