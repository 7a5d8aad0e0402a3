"""Snakemake adapter for rules fidelity, cam_maps, their parts and gathers: see
promptcam.evaluation.fidelity (run_rank_fidelity, run_rank_cam_maps, run_fidelity_part,
gather_fidelity, gather_cam_maps). Exit 75: stopped on SIGTERM/SIGUSR1, state saved."""

import sys

from promptcam.config import runtime_settings, settings_from_config
from promptcam.data.reader import ShardGroup
from promptcam.evaluation.fidelity import (
    FidelityConfig,
    gather_cam_maps,
    gather_fidelity,
    run_fidelity_part,
    run_rank_cam_maps,
    run_rank_fidelity,
)
from promptcam.joblog import job_log
from promptcam.resources import gathering_rule, stage_of
from promptcam.training.preemption import exit_status


def main() -> int:
    rule, rank = snakemake.rule, snakemake.wildcards.rank
    group = getattr(snakemake.wildcards, "group", None)
    stage = stage_of(rule)
    with job_log(snakemake.log[0], " ".join(filter(None, [rule, rank, group]))):
        # Runtime keys are read from the config, not params, so changing them reruns nothing.
        runtime = {
            **runtime_settings(snakemake.config, "traits.fidelity"),
            "threads": snakemake.threads,
        }
        config = settings_from_config(
            FidelityConfig, {**snakemake.params.settings, **runtime}, "traits.fidelity"
        )
        inputs = {
            "checkpoint": snakemake.input.checkpoint,
            "probe": snakemake.input.probe,
            "shards_dir": snakemake.input.shards,
            "rank": rank,
            "trait_maps": snakemake.input.maps,
            "config": config,
            "state_path": snakemake.params.state,
        }
        if group is not None:
            part = {"out_part": snakemake.output[0], "group": ShardGroup.parse(group)}
            return exit_status(run_fidelity_part, stage, **inputs, **part)
        gathering = rule == gathering_rule(stage)
        parts = list(snakemake.input.parts)
        if stage == "cam_maps":
            if gathering:
                return exit_status(
                    gather_cam_maps,
                    parts=parts,
                    shards_dir=inputs["shards_dir"],
                    rank=rank,
                    out_cam_maps=snakemake.output[0],
                )
            return exit_status(run_rank_cam_maps, **inputs, out_cam_maps=snakemake.output[0])
        outputs = {
            "out_tsv": snakemake.output.table,
            "out_counterfactual": snakemake.output.counterfactual,
            "out_curves": snakemake.output.curves,
        }
        if gathering:
            return exit_status(
                gather_fidelity,
                parts=parts,
                shards_dir=inputs["shards_dir"],
                rank=rank,
                config=config,
                **outputs,
            )
        return exit_status(run_rank_fidelity, **inputs, **outputs)


if __name__ == "__main__":
    sys.exit(main())
