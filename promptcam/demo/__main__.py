"""Maintenance of the demo's backbone: ``python -m promptcam.demo COMMAND``.

    python -m promptcam.demo pretrain-backbone --out results/pretrain/demo_vit.pt
    python -m promptcam.demo probe-backbone promptcam/assets/demo_vit.pt

Not part of the ``promptcam`` command: users explain their own models; these commands remake
and measure the small ViT the demo ships (``snakemake --cores 2 pretrain_backbone`` runs the
whole recipe). Nothing is overwritten without ``--force``, the shipped weights included.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from promptcam.commandline import Command, build_parser, run_command_line

PROG = "python -m promptcam.demo"


# PretrainConfig fields settable here; unset ones keep its defaults (the recipe's first stage),
# read only when the command runs, so that --help does not import torch.
_INT_SETTINGS = ("steps", "batch_size", "seed", "threads", "num_workers", "warmup_steps")
_FLOAT_SETTINGS = ("lr", "attribute_weight", "canonical_weight", "locality_weight")


def _add_pretrain_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        help="weights file to write (its card goes beside it, .json); e.g. "
        "results/pretrain/demo_vit.pt",
    )
    parser.add_argument(
        "--force", action="store_true", help="overwrite --out and its card if they exist"
    )
    parser.add_argument(
        "--work-dir", type=Path, default=Path("results/pretrain/work"), help="resumable state"
    )
    for names, kind in ((_INT_SETTINGS, int), (_FLOAT_SETTINGS, float)):
        for name in names:
            parser.add_argument(
                "--" + name.replace("_", "-"),
                type=kind,
                default=None,
                help="default: PretrainConfig's",
            )
    parser.add_argument(
        "--canonical-focus",
        action="store_true",
        help="weight the pose-free part map's cells by how much organisms differ there",
    )
    parser.add_argument("--init-from", default=None, help="backbone weights to start from")
    parser.add_argument("--device", default="auto", help="auto: cuda if available, else cpu")
    parser.add_argument("--probe-per-species", type=int, default=60, help="0 skips the probes")


def refuse_to_overwrite(paths: Sequence[Path], force: bool) -> None:
    """Raise unless ``force`` when any of ``paths`` exists."""
    existing = [str(path) for path in paths if path.exists()]
    if existing and not force:
        raise FileExistsError(
            f"{' and '.join(existing)} exist(s); pass --force to overwrite, or another --out"
        )


def _run_pretrain(args: argparse.Namespace) -> int:
    from promptcam.demo.pretrain import PretrainConfig
    from promptcam.demo.recipe import run_pretraining

    refuse_to_overwrite([args.out, args.out.with_suffix(".json")], args.force)
    given = {
        name: getattr(args, name)
        for name in (*_INT_SETTINGS, *_FLOAT_SETTINGS)
        if getattr(args, name) is not None
    }
    config = PretrainConfig(**given, canonical_focus=args.canonical_focus, init_from=args.init_from)
    card = run_pretraining(
        config,
        args.work_dir,
        args.out,
        command=f"{PROG} pretrain-backbone " + " ".join(_argv_for_card(args, config)),
        device=args.device,
        probe_per_species=args.probe_per_species,
    )
    print(json.dumps({k: card[k] for k in ("file", "sha256", "steps", "quality")}, indent=2))
    print(f"wrote {args.out} and its card {args.out.with_suffix('.json')}", file=sys.stderr)
    return 0


def _argv_for_card(args: argparse.Namespace, config: Any) -> list[str]:
    """The whole command, every setting spelt out, so that the card can be rerun as is."""
    settings = [
        f"--{name.replace('_', '-')} {getattr(config, name)}"
        for name in (*_INT_SETTINGS, *_FLOAT_SETTINGS)
    ]
    return [
        f"--out {args.out}",
        f"--work-dir {args.work_dir}",
        *settings,
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


COMMANDS: tuple[Command, ...] = (
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
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser(PROG, "Maintenance of the demo's backbone.", COMMANDS)
    return run_command_line(parser, argv)


if __name__ == "__main__":
    sys.exit(main())
