# Train stage, per rank: Prompt-CAM on the frozen backbone (model selected on val), then the
# test-split evaluation next to a linear probe on the same backbone.
#
# Each rank's settings are config["train"]["defaults"] deep-merged with
# config["train"]["ranks"][rank] and passed as params, so editing one rank's settings reruns
# that rank only. An interrupted training resumes from results/{rank}/last.pt.
import promptcam


def rank_result(rank, name):
    """A per-rank result file (rank may be "{rank}")."""
    return f"results/{rank}/{name}"


def trained_model(rank):
    """The trained Prompt-CAM of a rank: the train stage's contract for later stages."""
    return rank_result(rank, "model.pt")


def merged(defaults, overrides):
    """``defaults`` updated by ``overrides``, recursively for nested mappings."""
    out = dict(defaults)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def train_settings(rank):
    """Training, model and transform settings of one rank (defaults + its overrides)."""
    unknown = set(config["train"]["ranks"]) - set(levels())
    if unknown:
        raise ValueError(f"config train.ranks names unknown ranks {sorted(unknown)}")
    return merged(config["train"]["defaults"], config["train"]["ranks"].get(rank, {}))


def backbone_weights():
    """The backbone's weight file as an input (none for a randomly initialised backbone).

    "demo" is the ViT shipped in the installed package (promptcam.pretrain.DEMO_BACKBONE);
    its path is found without importing torch, which would slow every workflow start.
    """
    if config["backbone"]["name"] == "demo":
        return [str(Path(promptcam.__file__).parent / "assets" / "demo_vit.pt")]
    weights = config["backbone"]["weights"]
    return [] if weights is None else [weights]


def train_outputs():
    return [
        rank_result(rank, name)
        for rank in levels()
        for name in ("model.pt", "metrics.tsv", "eval.json", "confusion.tsv")
    ]


rule train:
    input:
        shards=shards_dir(),
        labels=label_map("{rank}"),
        weights=backbone_weights(),
    output:
        model=trained_model("{rank}"),
        metrics=report(
            rank_result("{rank}", "metrics.tsv"),
            caption="../report/train_metrics.rst",
            category="Training",
            subcategory="{rank}",
        ),
    log:
        log_path("train", "{rank}"),
    benchmark:
        benchmark_path("train", "{rank}")
    conda:
        "../../envs/train.yaml"
    threads: min(config["train"]["threads"], config["max_threads"])
    resources:
        gpu=gpu_request(),
    params:
        settings=lambda wildcards: train_settings(wildcards.rank),
        backbone=config["backbone"],
    script:
        "../../scripts/train.py"


rule evaluate:
    input:
        shards=shards_dir(),
        model=trained_model("{rank}"),
        weights=backbone_weights(),
    output:
        eval=report(
            rank_result("{rank}", "eval.json"),
            caption="../report/train_evaluation.rst",
            category="Evaluation",
            subcategory="{rank}",
        ),
        confusion=report(
            rank_result("{rank}", "confusion.tsv"),
            caption="../report/train_confusion.rst",
            category="Evaluation",
            subcategory="{rank}",
        ),
    log:
        log_path("evaluate", "{rank}"),
    benchmark:
        benchmark_path("evaluate", "{rank}")
    conda:
        "../../envs/train.yaml"
    threads: min(config["evaluate"]["threads"], config["max_threads"])
    resources:
        gpu=gpu_request(),
    params:
        settings={k: v for k, v in config["evaluate"].items() if k != "threads"},
    script:
        "../../scripts/evaluate.py"
