"""The ``promptcam`` command line: one subcommand per entry of ``COMMANDS``.

To add a subcommand, write an ``add_arguments(parser)`` and a ``run(args) -> int`` function and
append a :class:`Command` to ``COMMANDS``. Heavy imports happen inside ``run`` so that
``promptcam --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from promptcam.config import ENCODE_PRECISIONS

__all__ = ["COMMANDS", "Command", "build_parser", "main"]


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _add_convert_reference_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "reference", type=Path, help="reference model.pt ({'model_state_dict': ...})"
    )
    parser.add_argument("out", type=Path, help="Prompt-CAM checkpoint to write")
    parser.add_argument(
        "--backbone", required=True, help="timm model name, e.g. vit_base_patch16_224.dino"
    )
    parser.add_argument(
        "--backbone-kwargs",
        type=json.loads,
        default=None,
        help="extra timm arguments as JSON, e.g. '{\"img_size\": 224}'",
    )
    parser.add_argument(
        "--label-names", type=Path, default=None, help="text file, one class name per line"
    )


def _run_convert_reference(args: argparse.Namespace) -> int:
    from promptcam.model.reference import convert_reference_checkpoint

    label_names = None
    if args.label_names is not None:
        label_names = [line for line in args.label_names.read_text().splitlines() if line]
    backbone_path = convert_reference_checkpoint(
        args.reference,
        args.out,
        args.backbone,
        backbone_kwargs=args.backbone_kwargs,
        label_names=label_names,
    )
    print(f"wrote {args.out} and its backbone {backbone_path}")
    return 0


def _add_checkpoint_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    """Where a saved checkpoint runs, and where its backbone's weights are now."""
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument(
        "--backbone-weights", type=Path, default=None, help="override the stored weight path"
    )


def _add_predict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("images", type=Path, help="an image or a folder of images")
    parser.add_argument("--out", type=Path, required=True, help="output .npz")
    parser.add_argument("--batch-size", type=int, default=32)
    _add_checkpoint_runtime_arguments(parser)


def _run_predict(args: argparse.Namespace) -> int:
    from promptcam.model.predict import predict

    predict(
        args.checkpoint,
        args.images,
        args.out,
        batch_size=args.batch_size,
        device=args.device,
        backbone_weights=args.backbone_weights,
    )
    return 0


def _add_pretrain_arguments(parser: argparse.ArgumentParser) -> None:
    from promptcam.demo.pretrain import PretrainConfig
    from promptcam.model.spec import DEMO_BACKBONE

    defaults = PretrainConfig()
    parser.add_argument("--out", type=Path, default=DEMO_BACKBONE, help="weights file to write")
    parser.add_argument(
        "--work-dir", type=Path, default=Path("results/pretrain/work"), help="resumable state"
    )
    for name in ("steps", "batch_size", "seed", "threads", "num_workers", "warmup_steps"):
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, type=int, default=getattr(defaults, name))
    for name in ("lr", "attribute_weight", "canonical_weight", "locality_weight"):
        parser.add_argument(
            "--" + name.replace("_", "-"), type=float, default=getattr(defaults, name)
        )
    parser.add_argument(
        "--canonical-focus",
        action="store_true",
        help="weight the pose-free part map's cells by how much organisms differ there",
    )
    parser.add_argument("--init-from", default=None, help="backbone weights to start from")
    parser.add_argument("--device", default="auto", help="auto: cuda if available, else cpu")
    parser.add_argument("--probe-per-species", type=int, default=60, help="0 skips the probes")


def _run_pretrain(args: argparse.Namespace) -> int:
    from promptcam.demo.pretrain import PretrainConfig
    from promptcam.demo.recipe import run_pretraining

    config = PretrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        seed=args.seed,
        threads=args.threads,
        num_workers=args.num_workers,
        warmup_steps=args.warmup_steps,
        lr=args.lr,
        attribute_weight=args.attribute_weight,
        canonical_weight=args.canonical_weight,
        locality_weight=args.locality_weight,
        canonical_focus=args.canonical_focus,
        init_from=args.init_from,
    )
    card = run_pretraining(
        config,
        args.work_dir,
        args.out,
        command="promptcam pretrain-backbone " + " ".join(_argv_for_card(args)),
        device=args.device,
        probe_per_species=args.probe_per_species,
    )
    print(json.dumps({k: card[k] for k in ("file", "sha256", "steps", "quality")}, indent=2))
    return 0


def _argv_for_card(args: argparse.Namespace) -> list[str]:
    return [
        f"--out {args.out}",
        f"--work-dir {args.work_dir}",
        f"--steps {args.steps}",
        f"--batch-size {args.batch_size}",
        f"--seed {args.seed}",
        f"--threads {args.threads}",
        f"--num-workers {args.num_workers}",
        f"--warmup-steps {args.warmup_steps}",
        f"--lr {args.lr}",
        f"--attribute-weight {args.attribute_weight}",
        f"--canonical-weight {args.canonical_weight}",
        f"--locality-weight {args.locality_weight}",
        *(["--canonical-focus"] if args.canonical_focus else []),
        *([f"--init-from {args.init_from}"] if args.init_from else []),
    ]


def _add_probe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("weights", type=Path, help="a demo backbone (.pt beside its .json card)")
    parser.add_argument("--per-species", type=int, default=60, help="images per species")
    parser.add_argument("--threads", type=int, default=1)


def _run_probe(args: argparse.Namespace) -> int:
    import torch

    from promptcam.demo.probes import probe_backbone, token_locality
    from promptcam.model.backbone import build_backbone
    from promptcam.model.spec import demo_backbone_spec

    torch.set_num_threads(args.threads)
    spec = demo_backbone_spec(args.weights)
    backbone = build_backbone(spec["name"], spec["weights"], **spec["kwargs"])
    size, patch = spec["kwargs"]["img_size"], spec["kwargs"]["patch_size"]
    report = {
        "weights": str(args.weights),
        "probe": probe_backbone(backbone, size, patch, per_species=args.per_species).as_dict(),
        "token_locality": token_locality(backbone, size, patch),
    }
    print(json.dumps(report, indent=2))
    return 0


def _add_traits_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("images", type=Path, help="an image or a folder of images")
    parser.add_argument("--out", type=Path, required=True, help="output .parquet")
    parser.add_argument(
        "--stop",
        choices=("top-k", "misclassified"),
        default="top-k",
        help="keep --top-traits heads (the reference) or blur until misclassified (the paper)",
    )
    parser.add_argument("--top-traits", type=int, default=4, help="heads kept by --stop top-k")
    parser.add_argument(
        "--encode-precision",
        choices=ENCODE_PRECISIONS,
        default="auto",
        help="blocks before the last (always fp32); auto: bf16 on a GPU, fp32 on a CPU",
    )
    parser.add_argument("--batch-size", type=int, default=16)
    _add_checkpoint_runtime_arguments(parser)


def _run_traits(args: argparse.Namespace) -> int:
    from promptcam.traits.run import traits_for_images
    from promptcam.traits.search import GreedyConfig

    traits_for_images(
        args.checkpoint,
        args.images,
        args.out,
        GreedyConfig(stop=args.stop, top_traits=args.top_traits),
        batch_size=args.batch_size,
        device=args.device,
        backbone_weights=args.backbone_weights,
        encode_precision=args.encode_precision,
    )
    return 0


COMMANDS: tuple[Command, ...] = (
    Command(
        "convert-reference",
        "convert a checkpoint of the reference implementation (Imageomics/Prompt_CAM)",
        _add_convert_reference_arguments,
        _run_convert_reference,
    ),
    Command(
        "predict",
        "class scores and attention maps for images",
        _add_predict_arguments,
        _run_predict,
    ),
    Command(
        "pretrain-backbone",
        "pre-train the demo's small ViT on label-free generator geometry",
        _add_pretrain_arguments,
        _run_pretrain,
    ),
    Command(
        "probe-backbone",
        "linear probes and token locality of a demo backbone, on a fresh demo draw",
        _add_probe_arguments,
        _run_probe,
    ),
    Command(
        "traits",
        "greedy head masking: each image's trait heads for its predicted class",
        _add_traits_arguments,
        _run_traits,
    ),
)


def build_parser(commands: Sequence[Command] = COMMANDS) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="promptcam", description="Prompt-CAM: class prompts that explain a frozen ViT."
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for command in commands:
        sub = subparsers.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(sub)
        sub.set_defaults(run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)
