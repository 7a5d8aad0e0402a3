"""The ``promptcam`` command line: one subcommand per entry of ``COMMANDS``.

To add a subcommand, write an ``add_arguments(parser)`` and a ``run(args) -> int`` function and
append a :class:`~promptcam.commandline.Command` to ``COMMANDS``. Heavy imports (torch) happen
inside ``run`` so that ``--help`` stays fast; defaults that the workflow has too come from its
config schema. A failure prints one line naming its cause (``--debug``: the traceback).
Maintenance of the demo's backbone lives apart: ``python -m promptcam.demo --help``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from promptcam.commandline import Command, build_parser, run_command_line
from promptcam.config import schema_defaults, section_schema

__all__ = ["COMMANDS", "main"]

# promptcam.model.predict.DEFAULT_TOP_K, repeated: that module imports torch (a test checks).
PREDICT_TOP_K = 5


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
    print(f"wrote {args.out} and its backbone weights {backbone_path}")
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
    maps = parser.add_mutually_exclusive_group()
    maps.add_argument(
        "--top-k",
        type=int,
        default=PREDICT_TOP_K,
        help="keep the attention maps of each image's K highest-scoring classes, stored with "
        "their class indices (default: %(default)s)",
    )
    maps.add_argument(
        "--all-classes",
        action="store_true",
        help="keep every class's attention maps (H x C x patches per image: large for many "
        "classes)",
    )
    _add_checkpoint_runtime_arguments(parser)


def _run_predict(args: argparse.Namespace) -> int:
    from promptcam.model.predict import predict

    count = predict(
        args.checkpoint,
        args.images,
        args.out,
        batch_size=args.batch_size,
        device=args.device,
        backbone_weights=args.backbone_weights,
        top_k=None if args.all_classes else args.top_k,
    )
    print(
        f"wrote {args.out}: scores, predicted class and attention maps of {count} image(s) "
        f"under {args.images}"
    )
    return 0


def _add_search_arguments(parser: argparse.ArgumentParser) -> None:
    """The greedy trait search's options (traits, explain), with the workflow's defaults (the
    config schema's traits section)."""
    defaults, keys = schema_defaults("traits"), section_schema("traits")["properties"]
    parser.add_argument(
        "--stop",
        choices=keys["stop"]["enum"],
        default=defaults["stop"],
        help="keep --top-traits heads (the reference) or blur until misclassified (the paper); "
        "default: %(default)s",
    )
    parser.add_argument(
        "--top-traits",
        type=int,
        default=defaults["top_traits"],
        help="heads kept by --stop top-k (default: %(default)s)",
    )
    parser.add_argument(
        "--criterion",
        choices=keys["criterion"]["enum"],
        default=defaults["criterion"],
        help="how candidate heads are compared: the target's score, blurred in its row "
        "(reference), or its log-odds, blurred in its and its rivals' rows (contrastive); "
        "default: %(default)s",
    )
    parser.add_argument(
        "--rivals",
        type=int,
        default=defaults["rivals"],
        help="--criterion contrastive: best-scoring other classes blurred too "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--encode-precision",
        choices=keys["encode_precision"]["enum"],
        default=defaults["encode_precision"],
        help="blocks before the last (always fp32); auto: bf16 on a GPU, fp32 on a CPU",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=defaults["batch_size"],
        help="images at a time (default: %(default)s)",
    )


def _add_traits_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("images", type=Path, help="an image or a folder of images")
    parser.add_argument("--out", type=Path, required=True, help="output .parquet")
    _add_search_arguments(parser)
    _add_checkpoint_runtime_arguments(parser)


def _greedy_config(args: argparse.Namespace):
    from promptcam.traits.search import GreedyConfig

    return GreedyConfig(
        stop=args.stop, top_traits=args.top_traits, criterion=args.criterion, rivals=args.rivals
    )


def _run_traits(args: argparse.Namespace) -> int:
    from promptcam.traits.run import traits_for_images

    table = traits_for_images(
        args.checkpoint,
        args.images,
        args.out,
        _greedy_config(args),
        batch_size=args.batch_size,
        device=args.device,
        backbone_weights=args.backbone_weights,
        encode_precision=args.encode_precision,
    )
    images = table["image"].nunique()
    print(
        f"wrote {args.out}: {len(table)} rows ({images} image(s) x "
        f"{len(table) // max(images, 1)} heads), {int(table['kept'].sum())} heads kept"
    )
    return 0


def _add_explain_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoints",
        type=Path,
        nargs="+",
        metavar="CHECKPOINT",
        help="model.pt of one rank, or one per rank (any order: drawn coarse to fine; a model "
        "trained among siblings is read top-down, so it needs the rank above)",
    )
    parser.add_argument("images", type=Path, help="an image or a folder of images")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    _add_search_arguments(parser)
    parser.add_argument(
        "--taxonomy",
        type=Path,
        default=None,
        help="taxonomy.nwk (results/data/): orders the ranks and checks each predicted path",
    )
    parser.add_argument(
        "--columns",
        type=int,
        choices=(1, 2),
        default=2,
        help="figure width: one or two journal columns (default: %(default)s)",
    )
    parser.add_argument("--dpi", type=int, default=None, help="PNG resolution (default: 300)")
    _add_checkpoint_runtime_arguments(parser)


def _run_explain(args: argparse.Namespace) -> int:
    from promptcam.explain import ExplainSettings, explain_images
    from promptcam.figures.style import FigureStyle

    style = FigureStyle() if args.dpi is None else FigureStyle(dpi=args.dpi)
    settings = ExplainSettings(
        greedy=_greedy_config(args),
        batch_size=args.batch_size,
        encode_precision=args.encode_precision,
        style=style,
        columns=args.columns,
    )
    report = explain_images(
        args.checkpoints,
        args.images,
        args.out,
        settings,
        device=args.device,
        backbone_weights=args.backbone_weights,
        taxonomy=args.taxonomy,
    )
    print(
        f"wrote {report.table} and {len(report.figures)} figure files: {report.images} "
        f"image(s) under {args.images} x {len(report.ranks)} rank(s) ({', '.join(report.ranks)})"
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
        "traits",
        "greedy head masking: each image's trait heads for its predicted class",
        _add_traits_arguments,
        _run_traits,
    ),
    Command(
        "explain",
        "figures and a table for new photos: predicted class, trait heads and their maps, "
        "per rank and coarse to fine",
        _add_explain_arguments,
        _run_explain,
    ),
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser(
        "promptcam", "Prompt-CAM: class prompts that explain a frozen ViT.", COMMANDS
    )
    return run_command_line(parser, argv)
