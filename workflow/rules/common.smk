# Helpers shared by every stage: the config's ranks and the paths of the stage contracts.
# Paths are relative to the working directory (the repo root, or --directory).
import re
from pathlib import Path, PurePosixPath

import promptcam
from promptcam.config import config_section, rank_train_settings, result_settings
from promptcam.resources import (
    JobSize,
    gathering_rule,
    job_resources,
    read_split_counts,
    table_rows_estimate,
)


def levels():
    """Taxonomic ranks, coarse to fine."""
    return list(config["levels"])


def finest_level():
    return levels()[-1]


def data_path(*parts):
    return str(PurePosixPath("results", "data", *parts))


def label_map(rank):
    """Class index, name, parent and counts of one rank (rank may be "{rank}")."""
    return data_path("labels", f"{rank}.tsv")


def taxonomy_tree():
    return data_path("taxonomy.nwk")


def shards_dir():
    """WebDataset shards of all splits; manifest.json inside lists them."""
    return "results/shards"


def log_path(stage, name):
    return f"logs/{stage}/{name}.log"


def benchmark_path(stage, name):
    return f"results/benchmarks/{stage}/{name}.tsv"


def is_demo():
    return config["dataset"]["kind"] == "demo"


def source_table():
    """The metadata table: the demo generator's output, or the configured table."""
    if is_demo():
        return "results/demo/metadata.csv"
    return config["dataset"]["metadata"]


def image_root(wildcards, input):
    # The demo's paths are relative to its table's folder; a function keeps the lint from
    # mistaking this for a hardcoded prefix of the input.
    if is_demo():
        return str(Path(input.table).parent)
    return config["dataset"]["image_root"]


def data_outputs():
    """The data stage's contract: what later stages may rely on."""
    return [
        data_path("metadata.parquet"),
        *[label_map(rank) for rank in levels()],
        taxonomy_tree(),
        data_path("split_summary.tsv"),
        shards_dir(),
        # Which dataset the results belong to (defined in dataset.smk).
        source_record(),
    ]


def canonical(value):
    """``value`` with the keys of every mapping in it sorted, recursively.

    Snakemake's params trigger compares repr()s, so without this the mere order of keys in a
    config file would rerun jobs. Use it for every mapping given as params.
    """
    if isinstance(value, dict):
        return {key: canonical(value[key]) for key in sorted(value)}
    if isinstance(value, list):
        return [canonical(item) for item in value]
    return value


def rule_settings(section, *elsewhere):
    """The config section at a dotted path ("traits.fidelity") as params, less its runtime
    keys and the subsections ``elsewhere`` that other rules own.

    Runtime keys (`runtime: true` in the schema: threads, device...) say where and how fast a
    job runs, not what it computes: the job reads them from the config (or its threads
    directive), so changing them reruns nothing.
    """
    return canonical(
        result_settings(config_section(config, section), section, *elsewhere)
    )


def rank_result(rank, name):
    """A per-rank result file, results/{rank}/{name} (rank may be "{rank}")."""
    return str(PurePosixPath("results", rank, name))


def trained_model(rank):
    """The trained Prompt-CAM of a rank: the train stage's contract for later stages."""
    return rank_result(rank, "model.pt")


def train_outputs():
    """The train stage's contract (rule all needs it)."""
    names = ("model.pt", "metrics.tsv", "eval.json", "confusion.tsv")
    return [rank_result(rank, name) for rank in levels() for name in names]


def trait_outputs():
    """The traits stage's contract (rule all needs it); localisation files say so where the
    data has no trait masks."""
    names = [
        "traits.parquet",
        "trait_maps.npz",
        "trait_summary.tsv",
        "trait_summary.npz",
        "cross_class.tsv",
        "cross_class.npz",
        "fidelity.tsv",
        "fidelity_curves.tsv",
        "cam_maps.npz",
        "counterfactual.json",
        "heads.tsv",
        "head_information.tsv",
        "localization.json",
        "localization.tsv",
    ]
    return [rank_result(rank, name) for rank in levels() for name in names]


def train_settings(rank):
    """Training, model and transform settings of one rank (defaults + its overrides)."""
    return canonical(rank_train_settings(config["train"], rank, levels()))


def backbone_weights():
    """The backbone's files as inputs (none for a randomly initialised backbone).

    "demo" is the ViT shipped in the installed package (promptcam.model.spec.DEMO_BACKBONE) and
    its card (timm name, architecture, sha256); the path is found without importing torch,
    which would slow every workflow start.
    """
    if config["backbone"]["name"] == "demo":
        weights = Path(promptcam.__file__).parent / "assets" / "demo_vit.pt"
        return [str(weights), str(weights.with_suffix(".json"))]
    weights = config["backbone"]["weights"]
    return [] if weights is None else [weights]


def gpu_request():
    return config["gpus_per_job"]


def test_shard_groups():
    """Jobs sharing each rank's test split (config test_shard_groups; 1: no part jobs)."""
    return config["test_shard_groups"]


def part_file(rank, stage, group):
    """A shard group's part file, results/{rank}/parts/{stage}_{group}.npz (group "{i}of{n}"),
    removed once gathered."""
    return rank_result(rank, f"parts/{stage}_{group}.npz")


def partial_state(rank, stage, group=None):
    """Where a preempted job of a stage (or of its shard group) keeps its resumable state."""
    suffix = "" if group is None else f"_{group}"
    return rank_result(rank, f"parts/{stage}{suffix}.partial.npz")


def scatter_parts(stage):
    """Input function: the part files that a stage's rule gathers; none with one group."""

    def parts(wildcards):
        count = test_shard_groups()
        if count == 1:
            return []
        groups = [f"{index}of{count}" for index in range(1, count + 1)]
        return [part_file(wildcards.rank, stage, group) for group in groups]

    return parts


def whole_split_rule(stage):
    """name: of a test-split stage's rule: the stage with one shard group, where the rule runs
    the model over the whole split; gathering_rule(stage) with more, where it only gathers
    the part jobs' files, so that the profile sends it to no GPU partition."""
    return stage if test_shard_groups() == 1 else gathering_rule(stage)


def whole_split_gpu_request(wildcards):
    """resources: gpu of a stage's rule that only gathers parts when the test split is
    shared (no model forward then), else the GPU rules' request."""
    return 0 if test_shard_groups() > 1 else gpu_request()


def job_size(wildcards):
    """What a job's work grows with (promptcam.resources.JobSize): its rank's label map once
    it exists (rules across ranks and the data rules: the finest rank's), else the demo's
    configured size or an estimate from the table's bytes."""
    rank = getattr(wildcards, "rank", None) or finest_level()
    counts = read_split_counts(label_map(rank))
    if counts is None:
        if is_demo():
            demo = config["demo"]
            images = (
                demo["n_families"]
                * demo["genera_per_family"]
                * demo["species_per_genus"]
                * demo["images_per_species"]
            )
        elif config["dataset"]["kind"] == "table":
            images = table_rows_estimate(source_table())
        else:
            images = 0  # a folder tree: unknown until prepare_metadata has read it
        return JobSize(images=images)
    classes, train, val, test = counts
    fidelity_max = config["traits"]["fidelity"]["max_images"]
    return JobSize(
        images=train + val + test,
        train=train,
        val=val,
        test=test,
        classes=classes,
        epochs=train_settings(rank)["epochs"],
        fidelity_images=min(test, fidelity_max or test),
        test_groups=test_shard_groups(),
    )


# The rules that run a model ask SLURM for a SIGTERM 120 s before their time limit: they save
# their state at the next step or batch and exit 75, and the profile's `retries` submit a new
# job that resumes it. The retries live in the profile, not in the rules: a rule's own
# `retries` would also apply inside the SLURM job (Snakemake passes the job `--retries 0`, but
# a rule's value wins), restarting the job in the 120 s its allocation has left.
SIGNAL_BEFORE_TIME_LIMIT = "--signal=TERM@120"


def measured_mem_mb(wildcards, attempt, rulename):
    """resources: mem_mb of any rule, from what it was measured to need (promptcam.resources),
    scaled to the job's data and times the attempt (the profile's retries)."""
    return job_resources(rulename, job_size(wildcards), attempt).mem_mb


def measured_runtime(wildcards, attempt, rulename):
    """resources: runtime (minutes) of any rule, as measured_mem_mb."""
    return job_resources(rulename, job_size(wildcards), attempt).runtime


def pretrain_settings():
    """PretrainConfig fields from the config (threads come from the rule)."""
    return rule_settings("pretrain", "probe_per_species", "stages")


def pretrain_stages():
    return [canonical(stage) for stage in config["pretrain"]["stages"]]


wildcard_constraints:
    rank="|".join(re.escape(rank) for rank in levels()),
    split="train|val|test",
    group=r"\d+of\d+",


def rank_figure(rank, name):
    """A per-rank figure (stem or folder), results/{rank}/figures/{name}."""
    return rank_result(rank, f"figures/{name}")


def cross_rank_figure(name):
    """A figure across ranks (stem or folder), results/figures/{name}."""
    return str(PurePosixPath("results", "figures", name))


def figure_files(stem):
    """Every figure is written twice: vector PDF and PNG."""
    return [f"{stem}.pdf", f"{stem}.png"]


def figure_params(family=None):
    """The figures config's look (style) and, given, one figure family's settings (params)."""
    params = {"style": canonical(config["figures"]["style"])}
    if family is not None:
        params["settings"] = canonical(config["figures"][family])
    return params


def per_rank(name):
    """``{rank: results/{rank}/{name}}`` for every rank, coarse to fine (a figure's inputs)."""
    return {rank: rank_result(rank, name) for rank in levels()}


def summary_figures():
    """Stems of the summary figures across ranks."""
    names = [
        "accuracy",
        "training_curves",
        "fidelity_curves",
        "counterfactual",
        "localization",
    ]
    return [cross_rank_figure(name) for name in names]


def figure_outputs():
    """The figures stage's contract (rule all needs it)."""
    per_rank_dirs = [
        rank_figure(rank, name)
        for rank in levels()
        for name in ("trait_panels", "gallery")
    ]
    per_rank_files = [
        path
        for rank in levels()
        for name in ("cross_class", "confusion")
        for path in figure_files(rank_figure(rank, name))
    ]
    trees = [
        path
        for layout in config["figures"]["tree"]["layouts"]
        for path in figure_files(cross_rank_figure(f"tree_{layout}"))
    ]
    summaries = [path for stem in summary_figures() for path in figure_files(stem)]
    return [
        *per_rank_dirs,
        *per_rank_files,
        cross_rank_figure("coarse_to_fine"),
        *trees,
        *summaries,
    ]
