"""The command line as a new user meets it: fast --help without torch, one clear line on bad
input (exit 2; --debug: the traceback), and what each command wrote."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from promptcam.cli import COMMANDS
from promptcam.demo.__main__ import COMMANDS as DEMO_COMMANDS

# Runs a module as `python -m` would, with torch (and what imports it) unimportable.
WITHOUT_TORCH = """
import runpy, sys

class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision", "timm"):
            raise ImportError(f"--help imported {name}")

sys.meta_path.insert(0, NoTorch())
module, *sys.argv[1:] = sys.argv[1:]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def run(*args: str, module: str = "promptcam", timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def help_cases() -> list[tuple[str, tuple[str, ...]]]:
    cases = [("promptcam", ()), ("promptcam.demo", ())]
    cases += [("promptcam", (command.name,)) for command in COMMANDS]
    cases += [("promptcam.demo", (command.name,)) for command in DEMO_COMMANDS]
    return cases


@pytest.mark.parametrize(("module", "args"), help_cases(), ids=lambda case: str(case))
def test_help_never_imports_torch(module, args):
    proc = subprocess.run(
        [sys.executable, "-c", WITHOUT_TORCH, module, *args, "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: "), proc.stdout
    if args:
        assert args[0] in proc.stdout.splitlines()[0]


def test_the_torch_blocker_blocks(tmp_path):
    # The help test is only worth something if an import of torch would fail it.
    proc = subprocess.run(
        [sys.executable, "-c", WITHOUT_TORCH, "promptcam.model.checkpoint"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "--help imported torch" in proc.stderr


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A small random Prompt-CAM over three classes (32 px input)."""
    import torch

    from promptcam.model.checkpoint import save_checkpoint
    from promptcam.model.prompt_cam import PromptCAM
    from promptcam.model.spec import BackboneSpec, PromptCAMConfig

    vit = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4)
    torch.manual_seed(0)
    model = PromptCAM(BackboneSpec("vit_custom", kwargs=vit), PromptCAMConfig(num_classes=3))
    with torch.no_grad():
        model.head.weight.normal_(std=3.0)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    save_checkpoint(path, model, label_names=["Aa", "Bb", "Cc"])
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.jpg", "c.png"):
        Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(folder / name)
    return folder


def bad_inputs(tmp: Path, checkpoint: Path, images: Path) -> dict[str, tuple[list[str], str]]:
    """name: (predict's checkpoint and images, the error line's expected text)."""
    metrics = tmp / "metrics.tsv"
    metrics.write_text("epoch\tlr\n1\t0.1\n")
    notes = tmp / "notes.txt"
    notes.write_text("not an image")
    broken = tmp / "broken"
    broken.mkdir()
    (broken / "x.png").write_bytes(b"not a png")
    empty = tmp / "empty"
    empty.mkdir()
    return {
        "missing checkpoint": (
            [str(tmp / "nope.pt"), str(images)],
            f"no file {tmp / 'nope.pt'} (expected a Prompt-CAM checkpoint)",
        ),
        "metrics table as checkpoint": (
            [str(metrics), str(images)],
            f"{metrics} is not a Prompt-CAM checkpoint: torch.load cannot read it",
        ),
        "not an image": (
            [str(checkpoint), str(notes)],
            f"{notes} is not an image file (expected one of",
        ),
        "unreadable image": (
            [str(checkpoint), str(broken)],
            f"{broken / 'x.png'} is not an image that PIL can read",
        ),
        "empty folder": ([str(checkpoint), str(empty)], "no images (.bmp, "),
        "missing folder": ([str(checkpoint), str(tmp / "gone")], f"no image or folder {tmp}"),
    }


CASES = [
    "missing checkpoint",
    "metrics table as checkpoint",
    "not an image",
    "unreadable image",
    "empty folder",
    "missing folder",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_clear_line(case, tmp_path, checkpoint, images):
    args, expected = bad_inputs(tmp_path, checkpoint, images)[case]
    out = tmp_path / "out.npz"
    proc = run("predict", *args, "--out", str(out), "--device", "cpu")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("promptcam predict: error: "), lines
    assert expected in lines[0], lines
    assert not out.exists()


def test_debug_shows_the_traceback(tmp_path, checkpoint):
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    proc = run("--debug", "predict", str(checkpoint), str(notes), "--out", str(tmp_path / "o.npz"))
    assert proc.returncode != 0
    assert "Traceback (most recent call last)" in proc.stderr
    assert f"ValueError: {notes} is not an image file" in proc.stderr
    # --debug after the command's name works too.
    again = run("traits", str(checkpoint), str(notes), "--out", "t.parquet", "--debug")
    assert "Traceback (most recent call last)" in again.stderr


def test_predict_stores_the_predicted_class_and_says_what_it_wrote(tmp_path, checkpoint, images):
    out = tmp_path / "predictions.npz"
    proc = run("predict", str(checkpoint), str(images), "--out", str(out), "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == (
        f"wrote {out}: scores, predicted class and attention maps of 3 image(s) under {images}"
    )
    with np.load(out) as result:
        assert result["image_names"].tolist() == ["a.png", "b.jpg", "c.png"]
        np.testing.assert_array_equal(result["predicted_index"], result["scores"].argmax(1))
        labels = result["label_names"]
        assert result["predicted"].tolist() == labels[result["predicted_index"]].tolist()
        # 3 classes, --top-k 5 by default: every class's maps, in class order.
        assert result["attention"].shape == (3, 4, 3, 16)
        assert result["attention_classes"].tolist() == [[0, 1, 2]] * 3


def test_predict_top_k_default_is_the_library_default():
    # cli.py repeats the number so that --help does not import torch.
    from promptcam.cli import PREDICT_TOP_K
    from promptcam.model.predict import DEFAULT_TOP_K

    assert PREDICT_TOP_K == DEFAULT_TOP_K


def test_traits_says_what_it_wrote(tmp_path, checkpoint, images):
    out = tmp_path / "traits.parquet"
    args = ["traits", str(checkpoint), str(images), "--out", str(out), "--top-traits", "1"]
    proc = run(*args, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"wrote {out}: 12 rows (3 image(s) x 4 heads), 3 heads kept"
    assert out.is_file()


def test_convert_reference_names_a_wrong_file(tmp_path, checkpoint):
    # A Prompt-CAM checkpoint is not the reference's {"model_state_dict": ...}.
    proc = run("convert-reference", str(checkpoint), str(tmp_path / "out.pt"), "--backbone", "x")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (
        f"promptcam convert-reference: error: {checkpoint} is not a reference checkpoint "
        "({'model_state_dict': ...}, the model.pt of Imageomics/Prompt_CAM)"
    )


def test_pretrain_backbone_never_overwrites_without_force(tmp_path):
    missing_out = run("pretrain-backbone", module="promptcam.demo")
    assert missing_out.returncode == 2 and "--out" in missing_out.stderr
    existing = tmp_path / "demo_vit.pt"
    existing.write_bytes(b"shipped weights")
    proc = run("pretrain-backbone", "--out", str(existing), "--steps", "1", module="promptcam.demo")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (
        f"python -m promptcam.demo pretrain-backbone: error: {existing} exist(s); "
        "pass --force to overwrite, or another --out"
    )
    assert existing.read_bytes() == b"shipped weights"
    assert not (tmp_path / "demo_vit.json").exists()


def test_a_model_trained_among_siblings_is_read_top_down_or_refused(tmp_path, images):
    """Its flat argmax compares scores never trained against each other: predict refuses it,
    explain reads it among the children of the rank above's prediction (and refuses it alone)."""
    import torch

    from promptcam.model.checkpoint import save_checkpoint
    from promptcam.model.prompt_cam import PromptCAM
    from promptcam.model.spec import BackboneSpec, PromptCAMConfig

    vit = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4)

    def save(rank: str, labels: list[str], extra: dict, seed: int) -> Path:
        torch.manual_seed(seed)
        model = PromptCAM(
            BackboneSpec("vit_custom", kwargs=vit), PromptCAMConfig(num_classes=len(labels))
        )
        with torch.no_grad():
            model.head.weight.normal_(std=3.0)
        path = tmp_path / rank / "model.pt"
        path.parent.mkdir()
        save_checkpoint(path, model, label_names=labels, extra={"rank": rank, **extra})
        return path

    family = save("family", ["Fa", "Fb"], {}, seed=1)
    siblings = {"train_config": {"objective": "siblings"}, "label_parents": ["Fa", "Fa", "Fb"]}
    species = save("species", ["Sa", "Sb", "Sc"], siblings, seed=2)
    out = tmp_path / "predict.npz"
    proc = run("predict", str(species), str(images), "--out", str(out), "--device", "cpu")
    assert proc.returncode != 0
    assert "trained among siblings (train.objective: siblings)" in proc.stderr, proc.stderr
    assert "promptcam explain" in proc.stderr and not out.exists()
    alone = run("explain", str(species), str(images), "--out", str(tmp_path / "x"))
    assert alone.returncode != 0
    assert "give the checkpoint of that rank too" in alone.stderr, alone.stderr
    both = tmp_path / "both"
    proc = run(
        "explain", str(species), str(family), str(images), "--out", str(both), "--device", "cpu"
    )
    assert proc.returncode == 0, proc.stderr
    table = pd.read_csv(both / "explain.tsv", sep="\t")
    predicted = table.pivot(index="image", columns="rank", values="predicted")
    parent = {"Sa": "Fa", "Sb": "Fa", "Sc": "Fb"}
    assert [parent[s] for s in predicted["species"]] == predicted["family"].tolist()
