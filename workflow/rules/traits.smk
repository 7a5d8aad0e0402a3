# Traits stage, per rank: greedy head masking on the test split (traits.parquet and maps,
# per-class summary, cross-class attention), the demo's localisation against its ground-truth
# trait masks, and faithfulness (insertion/deletion AUC against baseline CAMs, counterfactual).


def trait_path(rank, name):
    return f"results/{rank}/{name}"


def probe_settings():
    """The evaluation's linear-probe settings, so that fidelity explains the same probe."""
    return config["evaluate"].get("linear_probe", {})


def trait_outputs():
    """The traits stage's contract, for rule all: localisation only on the demo (masks)."""
    names = [
        "traits.parquet",
        "trait_maps.npz",
        "trait_summary.tsv",
        "trait_summary.npz",
        "cross_class.tsv",
        "cross_class.npz",
        "fidelity.tsv",
        "counterfactual.json",
    ]
    if is_demo():
        names.append("localization.json")
    return [trait_path(rank, name) for rank in levels() for name in names]


rule traits:
    input:
        checkpoint=trained_model("{rank}"),
        weights=backbone_weights(),
        shards=shards_dir(),
        taxonomy=taxonomy_tree(),
    output:
        table=trait_path("{rank}", "traits.parquet"),
        maps=trait_path("{rank}", "trait_maps.npz"),
        summary=trait_path("{rank}", "trait_summary.tsv"),
        summary_maps=trait_path("{rank}", "trait_summary.npz"),
        cross_class=trait_path("{rank}", "cross_class.tsv"),
        cross_class_maps=trait_path("{rank}", "cross_class.npz"),
    log:
        log_path("traits", "traits_{rank}"),
    benchmark:
        benchmark_path("traits", "traits_{rank}")
    conda:
        "../../envs/traits.yaml"
    threads: config["traits"]["threads"]
    resources:
        gpu=gpu_request(),
    params:
        settings={
            k: v
            for k, v in config["traits"].items()
            if k not in ("localization", "fidelity")
        },
    script:
        "../../scripts/traits.py"


rule localization:
    input:
        checkpoint=trained_model("{rank}"),
        weights=backbone_weights(),
        shards=shards_dir(),
        maps=trait_path("{rank}", "trait_maps.npz"),
    output:
        trait_path("{rank}", "localization.json"),
    log:
        log_path("traits", "localization_{rank}"),
    benchmark:
        benchmark_path("traits", "localization_{rank}")
    conda:
        "../../envs/traits.yaml"
    # Masks against stored maps: no model forward, so no GPU.
    threads: 1
    params:
        levels=levels(),
        min_coverage=config["traits"]["localization"]["min_coverage"],
    script:
        "../../scripts/localization.py"


rule fidelity:
    input:
        checkpoint=trained_model("{rank}"),
        weights=backbone_weights(),
        shards=shards_dir(),
        maps=trait_path("{rank}", "trait_maps.npz"),
    output:
        table=trait_path("{rank}", "fidelity.tsv"),
        counterfactual=trait_path("{rank}", "counterfactual.json"),
    log:
        log_path("traits", "fidelity_{rank}"),
    benchmark:
        benchmark_path("traits", "fidelity_{rank}")
    conda:
        "../../envs/traits.yaml"
    threads: config["traits"]["fidelity"]["threads"]
    resources:
        gpu=gpu_request(),
    params:
        settings={
            k: v for k, v in config["traits"]["fidelity"].items() if k != "threads"
        },
        linear_probe=probe_settings(),
    script:
        "../../scripts/fidelity.py"
