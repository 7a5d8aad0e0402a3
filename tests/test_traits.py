"""Greedy trait identification: batched == naive, stop rules, tables, CLI, cross-class pairs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from promptcam.cli import main as cli_main
from promptcam.model.checkpoint import load_checkpoint, save_checkpoint
from promptcam.model.last_block import encode_for_search, score_candidates, target_rows
from promptcam.model.predict import load_image
from promptcam.model.prompt_cam import PromptCAM
from promptcam.model.spec import BackboneSpec, PromptCAMConfig
from promptcam.traits.cross_class import (
    CrossClassAccumulator,
    cross_class_pairs,
    cross_class_table,
    siblings_from_metadata,
    write_cross_class,
)
from promptcam.traits.naive import greedy_heads_naive
from promptcam.traits.search import (
    EliminationTrace,
    GreedyConfig,
    greedy_heads,
    identify_traits,
    least_harmful,
    stop_search,
)
from promptcam.traits.tables import class_summary, read_cross_class, search_table

torch.set_num_threads(1)

NUM_CLASSES = 4
LAYOUTS = [("reference", "deep"), ("reference", "shallow"), ("scalable", "deep")]


def tiny_vit(num_heads: int) -> dict:
    return dict(img_size=32, patch_size=8, embed_dim=8 * num_heads, depth=2, num_heads=num_heads)


def random_model(
    seed: int, layout: str = "reference", variant: str = "deep", num_heads: int = 4
) -> PromptCAM:
    """A random Prompt-CAM whose heads matter: large prompts and head, peaked last-block
    attention, so that blurring changes scores and sometimes the prediction."""
    config = PromptCAMConfig(
        num_classes=NUM_CLASSES, layout=layout, variant=variant, num_agnostic_prompts=2
    )
    model = PromptCAM(BackboneSpec("vit_custom", kwargs=tiny_vit(num_heads), seed=seed), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not name.startswith("backbone."):
                param.copy_(torch.randn(param.shape, generator=generator))
        model.backbone.blocks[-1].attn.qkv.weight.mul_(3.0)
    return model.eval()


def random_images(count: int, seed: int) -> torch.Tensor:
    return torch.randn(count, 3, 32, 32, generator=torch.Generator().manual_seed(1000 + seed))


def targets_with_misclassified(model: PromptCAM, images: torch.Tensor) -> torch.Tensor:
    """The predictions, except for the first two images (so both kinds are present)."""
    with torch.no_grad():
        targets = model(images).argmax(dim=-1)
    targets[:2] = (targets[:2] + 1) % NUM_CLASSES
    return targets


def assert_same_trace(batched: EliminationTrace, naive: EliminationTrace) -> None:
    np.testing.assert_array_equal(batched.predicted, naive.predicted)
    np.testing.assert_array_equal(batched.order, naive.order)
    np.testing.assert_array_equal(batched.step_predicted, naive.step_predicted)
    np.testing.assert_allclose(batched.scores, naive.scores, rtol=0, atol=1e-5)
    np.testing.assert_allclose(batched.base_scores, naive.base_scores, rtol=0, atol=1e-5)


def check_batched_matches_naive(model: PromptCAM, images: torch.Tensor) -> None:
    targets = targets_with_misclassified(model, images)
    batched = greedy_heads(model, images, targets)
    naive = greedy_heads_naive(model, images, targets)
    assert_same_trace(batched, naive)
    # A full elimination: every searched image blurs each head exactly once.
    for row in batched.order[batched.searched]:
        assert sorted(row) == list(range(model.num_heads))
    assert not batched.searched[:2].any()
    assert (batched.order[:2] == -1).all()


@pytest.mark.parametrize(("layout", "variant"), LAYOUTS)
@pytest.mark.parametrize("num_heads", [4, 6])
@pytest.mark.parametrize("seed", range(8))
def test_batched_search_matches_naive_full_forwards(
    layout: str, variant: str, num_heads: int, seed: int
) -> None:
    """In fp64, where rounding cannot move a score across the tie tolerance's edge."""
    model = random_model(seed, layout, variant, num_heads).double()
    check_batched_matches_naive(model, random_images(6, seed).double())


@pytest.mark.parametrize(("layout", "variant"), LAYOUTS)
@pytest.mark.parametrize("seed", range(3))
def test_batched_search_matches_naive_in_fp32(layout: str, variant: str, seed: int) -> None:
    """The production dtype. The two paths round differently (~1e-6 on these scores): a gap
    within that of the tie tolerance could split them, as in about 1 of 1000 greedy decisions
    on random models; these seeds have none."""
    check_batched_matches_naive(random_model(seed, layout, variant), random_images(6, seed))


def test_each_step_blurs_the_least_harmful_head() -> None:
    """Brute force over the candidates of every step, with the model's row recomputation."""
    model = random_model(3)
    images = random_images(4, 3)
    targets = targets_with_misclassified(model, images)
    trace = greedy_heads(model, images, targets, tie_tolerance=0.0)
    tokens = model.encode_to_last_block(images)
    for image in np.nonzero(trace.searched)[0]:
        blurred = torch.zeros(model.num_heads, dtype=torch.bool)
        for head in trace.order[image]:
            candidates = [h for h in range(model.num_heads) if not blurred[h]]
            masks = blurred.repeat(len(candidates), 1)
            masks[range(len(candidates)), candidates] = True
            scores = model.last_block_scores(
                tokens[image : image + 1], targets[image : image + 1], masks[None]
            )[0, :, targets[image]]
            # The model's own row recomputation may round differently from the search's.
            assert scores[candidates.index(head)] >= scores.max() - 1e-5
            blurred[head] = True


@pytest.mark.parametrize(("layout", "variant"), LAYOUTS)
def test_cached_target_rows_score_like_the_model(layout: str, variant: str) -> None:
    model = random_model(7, layout, variant, num_heads=6)
    images = random_images(3, 7)
    targets = torch.tensor([0, 3, 1])
    masks = torch.rand(3, 5, 6, generator=torch.Generator().manual_seed(0)) < 0.5
    with torch.inference_mode():
        tokens = model.encode_to_last_block(images)
        scores = model.last_block_scores(tokens)
        rows = target_rows(model, tokens, targets, scores)
        expected = model.last_block_scores(tokens, targets, masks)
        torch.testing.assert_close(
            score_candidates(model, rows, masks), expected, rtol=0, atol=1e-5
        )


def test_search_refuses_a_model_in_training_mode() -> None:
    model = random_model(0).train()
    with pytest.raises(ValueError, match="eval mode"):
        greedy_heads(model, random_images(1, 0), torch.tensor([0]))


def test_duplicate_heads_tie_and_both_paths_pick_the_lower_index() -> None:
    model = random_model(5)
    attn = model.backbone.blocks[-1].attn
    dim, head_dim = attn.qkv.in_features, attn.head_dim
    with torch.no_grad():
        qkv = attn.qkv.weight.view(3, attn.num_heads, head_dim, dim)
        qkv[:, 2] = qkv[:, 1]
        attn.qkv.bias.view(3, attn.num_heads, head_dim)[:, 2] = attn.qkv.bias.view(
            3, attn.num_heads, head_dim
        )[:, 1]
        proj = attn.proj.weight.view(dim, attn.num_heads, head_dim)
        proj[:, 2] = proj[:, 1]
    images = random_images(5, 5)
    with torch.no_grad():
        targets = model(images).argmax(dim=-1)
    batched, naive = (
        greedy_heads(model, images, targets),
        greedy_heads_naive(model, images, targets),
    )
    assert_same_trace(batched, naive)
    for order in batched.order:
        # Heads 1 and 2 are interchangeable: whenever the first goes, the lower index goes first.
        assert list(order).index(1) < list(order).index(2)


def test_least_harmful_breaks_ties_by_lowest_index_within_tolerance() -> None:
    scores = torch.tensor([[0.5, 0.9, 0.9 + 5e-6, 0.2], [3.0, 1.0, 3.0, 3.0], [0.0, 0.1, 0.2, 0.3]])
    assert least_harmful(scores, 1e-5).tolist() == [1, 0, 3]
    assert least_harmful(scores, 0.0).tolist() == [2, 0, 3]


def hand_trace(
    step_predicted: list[list[int]], predicted: list[int] | None = None
) -> EliminationTrace:
    """Two images of class 0 with 4 heads eliminated in the order 2, 0, 3, 1."""
    step_predicted = np.array(step_predicted)
    count = len(step_predicted)
    return EliminationTrace(
        targets=np.zeros(count, dtype=np.int64),
        predicted=np.array(predicted or [0] * count),
        base_scores=np.full(count, 0.9),
        order=np.tile([2, 0, 3, 1], (count, 1)),
        scores=np.tile([0.8, 0.6, 0.4, 0.2], (count, 1)),
        step_predicted=step_predicted,
    )


def test_top_k_keeps_the_last_heads_and_reports_flips_within_removals() -> None:
    trace = hand_trace([[0, 1, 0, 1], [0, 0, 0, 1]])
    search = stop_search(trace, GreedyConfig(stop="top-k", top_traits=2))
    assert search.num_removed.tolist() == [2, 2]
    assert search.flip_step.tolist() == [1, -1]  # the flip at step 3 is past the removals
    np.testing.assert_array_equal(search.removal_step()[0], [1, -1, 0, -1])
    np.testing.assert_array_equal(search.kept()[0], [False, True, False, True])
    np.testing.assert_array_equal(search.kept_rank()[0], [-1, 0, -1, 1])
    assert search.final_predicted().tolist() == [1, 0]


def test_misclassified_stops_before_the_flip_and_keeps_the_flip_head() -> None:
    trace = hand_trace([[0, 0, 1, 1], [0, 0, 0, 0], [1, 0, 0, 0]])
    search = stop_search(trace, GreedyConfig(stop="misclassified"))
    assert search.num_removed.tolist() == [2, 4, 0]
    assert search.flip_step.tolist() == [2, -1, 0]
    # Image 0: heads 2 and 0 removed; head 3 (whose blur flips) and head 1 kept.
    np.testing.assert_array_equal(search.kept()[0], [False, True, False, True])
    np.testing.assert_array_equal(search.kept_rank()[0], [-1, 0, -1, 1])
    assert not search.kept()[1].any()  # never flipped: every head removed
    assert search.kept()[2].all()  # the first blur already flips
    assert search.final_predicted().tolist() == [0, 0, 0]


def test_misclassified_input_keeps_every_head() -> None:
    trace = hand_trace([[-1] * 4, [0, 0, 0, 0]], predicted=[3, 0])
    trace = EliminationTrace(**{**trace.__dict__, "order": np.array([[-1] * 4, [2, 0, 3, 1]])})
    for config in (GreedyConfig(stop="misclassified"), GreedyConfig(stop="top-k", top_traits=1)):
        search = stop_search(trace, config)
        assert search.num_removed[0] == 0 and search.flip_step[0] == -1
        assert search.kept()[0].all()
        assert (search.kept_rank()[0] == -1).all()


def test_search_table_rows_and_nulls() -> None:
    trace = hand_trace([[0, 1, 0, 1], [0, 0, 0, 0]], predicted=[0, 2])
    search = stop_search(trace, GreedyConfig(stop="top-k", top_traits=2))
    table = search_table(search, ["a", "b"], ["x", "y", "z"])
    assert len(table) == 8
    first = table[table["image"] == "a"].set_index("head")
    assert first["removal_step"].tolist() == [1, pd.NA, 0, pd.NA]
    assert first.loc[2, "score_after_removal"] == pytest.approx(0.8)
    assert first.loc[2, "score_drop"] == pytest.approx(0.1)
    assert first.loc[0, "score_drop"] == pytest.approx(0.2)
    assert first["kept"].tolist() == [False, True, False, True]
    assert bool(first["flipped"].iloc[0]) and first["flip_step"].iloc[0] == 1
    second = table[table["image"] == "b"]
    assert not second["correct"].any() and second["kept"].all()
    assert second["removal_step"].isna().all() and second["score_after_removal"].isna().all()
    assert (second["predicted_label"] == "z").all()


def test_class_summary_counts_correct_images_only() -> None:
    trace = hand_trace([[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]], predicted=[0, 0, 1])
    trace = EliminationTrace(
        **{**trace.__dict__, "order": np.array([[2, 0, 3, 1], [0, 2, 3, 1], [-1] * 4])}
    )
    search = stop_search(trace, GreedyConfig(top_traits=2))
    table = search_table(search, ["a", "b", "c"], ["x", "y"])
    maps = np.stack([np.full((4, 2, 2), value) for value in (1.0, 3.0, 100.0)])
    summary, mean_maps = class_summary(table, maps, ["x", "y"])
    rows = summary[summary["class"] == 0].set_index("head")
    assert rows["n_images"].tolist() == [2] * 4
    assert rows["keep_rate"].tolist() == [0.0, 1.0, 0.0, 1.0]
    assert rows.loc[3, "mean_kept_rank"] == 1.0
    np.testing.assert_allclose(mean_maps[0], 2.0)
    assert np.isnan(mean_maps[1]).all()  # class 1 has no correctly classified image
    assert (summary[summary["class"] == 1]["n_images"] == 0).all()


def test_identify_traits_returns_the_targets_maps() -> None:
    model = random_model(1)
    images = random_images(3, 1)
    targets = torch.tensor([0, 1, 3])
    result = identify_traits(model, images, targets)
    _, attention = model.forward_with_attention(images)
    torch.testing.assert_close(result.target_maps(), attention[torch.arange(3), :, targets])


def test_encode_precision_rounds_only_the_blocks_before_the_last() -> None:
    model = random_model(2, num_heads=4)
    images = random_images(6, 2)
    exact = model.encode_to_last_block(images)
    with torch.no_grad():
        bf16 = encode_for_search(model, images, "bf16")
        # auto is fp32 off a GPU.
        torch.testing.assert_close(encode_for_search(model, images, "auto"), exact, rtol=0, atol=0)
    # The last block's input is fp32 and near, not equal, to the fp32 one.
    assert bf16.dtype == torch.float32
    assert not torch.equal(bf16, exact)
    torch.testing.assert_close(bf16, exact, rtol=0.05, atol=0.05)
    targets = model(images).argmax(dim=-1)
    trace = greedy_heads(model, images, targets, encode_precision="bf16")
    assert sorted(trace.order[0].tolist()) == list(range(model.num_heads))
    with pytest.raises(ValueError, match="encode precision must be one of"):
        encode_for_search(model, images, "fp16")


def test_cross_class_pairs_from_config_and_siblings() -> None:
    table = pd.DataFrame({"family": ["F", "F", "F", "G"], "genus": ["a", "b", "c", "d"]})
    siblings = siblings_from_metadata(table, ["family", "genus"], "genus")
    assert siblings == {"a": ["b", "c"], "b": ["a", "c"], "c": ["a", "b"], "d": []}
    assert siblings_from_metadata(table, ["family", "genus"], "family") == {"F": ["G"], "G": ["F"]}
    labels = ["a", "b", "c", "d"]
    pairs = cross_class_pairs(labels, [("d", "a"), ("a", "b")], siblings)
    assert pairs[:2] == [(3, 0, "configured"), (0, 1, "configured")]
    assert {(a, b) for a, b, why in pairs if why == "sibling"} == {
        (0, 2),
        (1, 0),
        (1, 2),
        (2, 0),
        (2, 1),
    }
    with pytest.raises(KeyError):
        cross_class_pairs(labels, [("a", "nope")])


def test_cross_class_accumulator_means_prompt_b_on_images_of_a() -> None:
    accumulator = CrossClassAccumulator([(0, 1, "sibling")], num_heads=2, num_patches=3)
    attention = torch.rand(3, 2, 2, 3, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 0])
    accumulator.update(labels, torch.zeros(3, 2), attention)
    cross, own = accumulator.means()
    torch.testing.assert_close(torch.from_numpy(cross[0]).float(), attention[[0, 2], :, 1].mean(0))
    torch.testing.assert_close(torch.from_numpy(own[0]).float(), attention[[0, 2], :, 0].mean(0))
    table = cross_class_table(accumulator, ["x", "y"])
    assert table.loc[0, "n_images"] == 2
    assert table.loc[0, "probability_prompt_class"] == pytest.approx(0.5)


def test_cross_class_keeps_each_pairs_most_typical_correct_image(tmp_path) -> None:
    pairs = [(0, 1, "sibling"), (1, 0, "sibling"), (2, 0, "configured")]
    accumulator = CrossClassAccumulator(pairs, num_heads=2, num_patches=3)
    generator = torch.Generator().manual_seed(1)
    first = torch.rand(3, 2, 3, 3, generator=generator)
    second = torch.rand(2, 2, 3, 3, generator=generator)
    # Log-probabilities, so that softmax gives these back. "c" (class 0, predicted 1) has the
    # highest p(0) of the first batch but is misclassified; "d" beats "a" in the second batch;
    # class 2's only image "e" is misclassified, so pair 2 has no example.
    first_p = torch.tensor([[0.4, 0.35, 0.25], [0.1, 0.8, 0.1], [0.45, 0.5, 0.05]])
    second_p = torch.tensor([[0.9, 0.05, 0.05], [0.6, 0.1, 0.3]])
    accumulator.update(torch.tensor([0, 1, 0]), first_p.log(), first, ["a", "b", "c"])
    accumulator.update(torch.tensor([0, 2]), second_p.log(), second, ["d", "e"])
    table_path, npz_path = tmp_path / "cross_class.tsv", tmp_path / "cross_class.npz"
    write_cross_class(table_path, npz_path, accumulator, ["x", "y", "z"], (1, 3))
    result = read_cross_class(table_path, npz_path)
    assert result.has_examples
    assert result.example_image.tolist() == ["d", "b", ""]
    assert result.example_own_maps.shape == (3, 2, 1, 3)
    expected_own = [second[0, :, 0], first[1, :, 1]]
    expected_cross = [second[0, :, 1], first[1, :, 0]]
    for row in range(2):
        np.testing.assert_allclose(result.example_own_maps[row, :, 0], expected_own[row], 1e-6)
        np.testing.assert_allclose(result.example_cross_maps[row, :, 0], expected_cross[row], 1e-6)
    np.testing.assert_allclose(result.example_probability_image_class[:2], [0.9, 0.8], 1e-6)
    np.testing.assert_allclose(result.example_probability_prompt_class[:2], [0.05, 0.1], 1e-6)
    assert np.isnan(result.example_own_maps[2]).all()
    assert np.isnan(result.example_probability_image_class[2])
    # The table keeps its columns; its means still count every image of A (c too).
    assert list(result.table.columns) == [
        "image_class",
        "prompt_class",
        "relation",
        "n_images",
        "probability_image_class",
        "probability_prompt_class",
        "map_similarity",
    ]
    assert result.table["n_images"].tolist() == [3, 1, 1]
    assert result.table.loc[0, "probability_image_class"] == pytest.approx((0.4 + 0.45 + 0.9) / 3)


def test_cross_class_reader_accepts_files_without_examples(tmp_path) -> None:
    accumulator = CrossClassAccumulator([(0, 1, "sibling")], num_heads=1, num_patches=1)
    accumulator.update(torch.tensor([0]), torch.zeros(1, 2), torch.ones(1, 1, 2, 1))
    table_path, npz_path = tmp_path / "cross_class.tsv", tmp_path / "cross_class.npz"
    write_cross_class(table_path, npz_path, accumulator, ["x", "y"], (1, 1))
    with np.load(npz_path) as data:
        old = {k: data[k] for k in ("cross_maps", "own_maps", "pairs", "label_names")}
    np.savez(npz_path, **old)
    assert not read_cross_class(table_path, npz_path).has_examples
    np.savez(npz_path, **old, example_image=np.array(["a"]))
    with pytest.raises(ValueError, match="rerun the traits rule"):
        read_cross_class(table_path, npz_path)


def test_cli_traits_writes_one_row_per_image_and_head(tmp_path) -> None:
    model = random_model(2)
    checkpoint = tmp_path / "model.pt"
    save_checkpoint(checkpoint, model, label_names=["w", "x", "y", "z"])
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    for index in range(3):
        pixels = rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{index}.png")
    out = tmp_path / "traits.parquet"
    argv = ["traits", str(checkpoint), str(folder), "--out", str(out), "--device", "cpu"]
    assert cli_main([*argv, "--stop", "top-k", "--top-traits", "1"]) == 0
    table = pd.read_parquet(out)
    required = ["image", "predicted", "head", "removal_step", "score_after_removal"]
    assert list(table.columns[: len(required)]) == required
    assert len(table) == 3 * model.num_heads
    assert sorted(table["image"].unique()) == ["img0.png", "img1.png", "img2.png"]
    assert set(table["predicted"]) <= {"w", "x", "y", "z"}
    per_image = table.groupby("image")
    # Searched for its own prediction, every image is searched: top-k leaves exactly one head.
    assert (per_image["kept"].sum() == 1).all()
    assert (per_image["removal_step"].max() == model.num_heads - 2).all()
    assert (table["removal_step"].isna() == table["kept"]).all()
    assert table.loc[~table["kept"], "score_after_removal"].between(0, 1).all()

    assert cli_main([*argv, "--stop", "misclassified"]) == 0
    flipped = pd.read_parquet(out)
    assert (flipped["removal_step"].isna() == flipped["kept"]).all()

    # The contrastive criterion from the command line: the batched search's own order.
    model, meta = load_checkpoint(checkpoint)
    assert cli_main([*argv, "--criterion", "contrastive", "--rivals", "2"]) == 0
    contrastive = pd.read_parquet(out)
    images = torch.stack(
        [load_image(folder / f"img{index}.png", meta.preprocessing) for index in range(3)]
    )
    with torch.no_grad():
        predicted = model(images).argmax(dim=-1)
    trace = greedy_heads(model, images, predicted, criterion="contrastive", rivals=2)
    for index in range(3):
        rows = contrastive[contrastive["image"] == f"img{index}.png"].dropna(
            subset=["removal_step"]
        )
        removed = rows.sort_values("removal_step")["head"].tolist()
        assert removed == trace.order[index, : len(removed)].tolist()


def test_a_siblings_model_is_searched_among_the_targets_siblings() -> None:
    """train.objective siblings: the prediction and the probabilities the search ranks heads by
    are among the target's siblings only; flat reading would compare scores never trained
    against each other."""
    assert NUM_CLASSES == 4
    model = random_model(4)
    images = random_images(8, 4)
    targets = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    groups = torch.tensor([0, 0, 0, 1])  # class 3 alone: always right within siblings
    flat = identify_traits(model, images, targets)
    among = identify_traits(model, images, targets, groups=groups)
    with torch.no_grad():
        scores = model(images).double()
    masked = scores.masked_fill(groups[None, :] != groups[targets][:, None], float("-inf"))
    np.testing.assert_array_equal(among.trace.predicted, masked.argmax(dim=-1).numpy())
    assert (groups[torch.as_tensor(among.trace.predicted)] == groups[targets]).all()
    expected = masked.softmax(dim=-1)[torch.arange(8), targets].numpy()
    np.testing.assert_allclose(among.trace.base_scores, expected, rtol=1e-5)
    assert among.trace.searched[[3, 7]].all()  # a class without siblings is always searched
    # Within siblings an image is right at least as often as among all classes.
    assert among.trace.searched.sum() >= flat.trace.searched.sum()
    # Every greedy step's prediction stays among the siblings.
    steps = among.trace.step_predicted[among.trace.searched]
    rows = targets.numpy()[among.trace.searched]
    assert (groups.numpy()[steps] == groups.numpy()[rows][:, None]).all()


@pytest.mark.parametrize(("layout", "variant"), LAYOUTS)
@pytest.mark.parametrize("rivals", [1, 16])
@pytest.mark.parametrize("seed", range(4))
def test_contrastive_search_matches_naive_full_forwards(
    layout: str, variant: str, rivals: int, seed: int
) -> None:
    """The contrastive criterion: blurred in the target's and its rivals' rows (one rival, or
    all three other classes), candidates compared on the target's log-probability; the
    oracle zeroes those rows' attention logits in a full forward per candidate."""
    model = random_model(seed, layout, variant, num_heads=5).double()
    images = random_images(6, seed).double()
    targets = targets_with_misclassified(model, images)
    batched = greedy_heads(model, images, targets, criterion="contrastive", rivals=rivals)
    naive = greedy_heads_naive(model, images, targets, criterion="contrastive", rivals=rivals)
    assert_same_trace(batched, naive)
    assert batched.searched.sum() >= 2


def test_contrastive_and_reference_criteria_rank_heads_differently() -> None:
    """Not a renamed reference: on random models the two criteria disagree on some step."""
    disagreements = 0
    for seed in range(4):
        model = random_model(seed).double()
        images = random_images(6, seed).double()
        targets = targets_with_misclassified(model, images)
        reference = greedy_heads(model, images, targets)
        contrastive = greedy_heads(model, images, targets, criterion="contrastive")
        disagreements += int((reference.order != contrastive.order).any(axis=1).sum())
    assert disagreements > 0


def test_blurring_in_rival_rows_leaves_the_other_classes_and_excluded_ones_alone() -> None:
    from promptcam.model.last_block import class_rows, rival_classes, score_candidates_in_rows

    model = random_model(5, "scalable", "deep", num_heads=4).double()
    tokens = model.encode_to_last_block(random_images(3, 5).double())
    scores = model.last_block_scores(tokens)
    targets = torch.tensor([0, 2, 3])
    scores[2, 1] = float("-inf")  # class 1 outside image 2's sibling group
    classes = rival_classes(scores, targets, rivals=3)
    assert classes[:, 0].tolist() == targets.tolist()
    assert classes[2, -1] == 1  # the excluded class comes last
    assert rival_classes(scores, targets, rivals=1).shape == (3, 2)
    masks = torch.ones(3, 1, 4, dtype=torch.bool)  # every head blurred
    out = score_candidates_in_rows(
        model, class_rows(model, tokens, classes, scores), classes, scores, masks
    )
    for image in range(3):
        chosen = set(classes[image].tolist())
        for c in range(NUM_CLASSES):
            if c not in chosen or torch.isinf(scores[image, c]):
                assert out[image, 0, c] == scores[image, c]
            else:
                expected = model.last_block_scores(
                    tokens[image : image + 1], torch.tensor([c]), masks[image : image + 1]
                )[0, 0, c]
                torch.testing.assert_close(out[image, 0, c], expected)


def test_dropped_heads_are_blurred_first_and_never_kept() -> None:
    model = random_model(6)
    images = random_images(6, 6)
    with torch.no_grad():
        targets = model(images).argmax(dim=-1)
    trace = identify_traits(model, images, targets, dropped=[3, 1]).trace
    assert (trace.order[:, :2] == [3, 1]).all()
    for config in (GreedyConfig(stop="top-k", top_traits=3), GreedyConfig(stop="misclassified")):
        search = stop_search(trace, config, num_dropped=2)
        kept = search.kept()
        assert not kept[:, [1, 3]].any()
        assert (search.num_removed >= 2).all()
    # top-k 3 of 4 heads with 2 dropped keeps the 2 informative ones.
    search = stop_search(trace, GreedyConfig(stop="top-k", top_traits=3), num_dropped=2)
    assert search.kept()[:, [0, 2]].all()
    with pytest.raises(ValueError, match="num_dropped"):
        stop_search(trace, GreedyConfig(), num_dropped=5)


def test_greedy_config_refuses_an_unknown_criterion() -> None:
    with pytest.raises(ValueError, match="criterion must be one of"):
        GreedyConfig(criterion="margin")
    with pytest.raises(ValueError, match="rivals"):
        GreedyConfig(criterion="contrastive", rivals=0)
