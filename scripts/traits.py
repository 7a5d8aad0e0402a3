"""Snakemake adapter for rules traits, traits_part and traits_gather: see promptcam.traits.run (run_rank_traits,
run_traits_part, gather_rank_traits). Exit 75: stopped on SIGTERM/SIGUSR1, state saved."""

import sys

from promptcam.config import runtime_settings, settings_from_config
from promptcam.data.reader import ShardGroup
from promptcam.joblog import job_log
from promptcam.resources import gathering_rule
from promptcam.training.preemption import exit_status
from promptcam.traits.cross_class import siblings_from_taxonomy
from promptcam.traits.run import (
    TraitRunConfig,
    gather_rank_traits,
    run_rank_traits,
    run_traits_part,
)


def main() -> int:
    rule, rank = snakemake.rule, snakemake.wildcards.rank
    with job_log(snakemake.log[0], f"{rule} {rank}"):
        # Runtime keys are read from the config, not params, so changing them reruns nothing.
        runtime = {**runtime_settings(snakemake.config, "traits"), "threads": snakemake.threads}
        config = settings_from_config(
            TraitRunConfig, {**snakemake.params.settings, **runtime}, "traits"
        )
        if rule == gathering_rule("traits"):
            return exit_status(
                gather_rank_traits,
                parts=list(snakemake.input.parts),
                shards_dir=snakemake.input.shards,
                rank=rank,
                outputs=dict(snakemake.output.items()),
                config=config,
            )
        search = {
            "checkpoint": snakemake.input.checkpoint,
            "shards_dir": snakemake.input.shards,
            "rank": rank,
            "config": config,
            "siblings": (
                siblings_from_taxonomy(snakemake.input.taxonomy, rank) if config.siblings else None
            ),
            "labels_tsv": snakemake.input.labels,
            "head_information": snakemake.input.information,
            "state_path": snakemake.params.state,
        }
        if rule == "traits_part":
            group = ShardGroup.parse(snakemake.wildcards.group)
            return exit_status(run_traits_part, out_part=snakemake.output[0], group=group, **search)
        return exit_status(run_rank_traits, outputs=dict(snakemake.output.items()), **search)


if __name__ == "__main__":
    sys.exit(main())
