# Helpers shared by every stage: the config's ranks and the paths of the stage contracts.
# Paths are relative to the working directory (the repo root, or --directory).
import re
from pathlib import Path, PurePosixPath


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
    ]


def gpu_request():
    return config["gpus_per_job"]


def pretrain_settings():
    """PretrainConfig fields from the config (threads come from the rule)."""
    settings = dict(config["pretrain"])
    for key in ("device", "probe_per_species"):
        settings.pop(key)
    return settings


wildcard_constraints:
    rank="|".join(re.escape(rank) for rank in levels()),
    split="train|val|test",
