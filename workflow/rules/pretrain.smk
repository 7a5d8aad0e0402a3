# Label-free pre-training of the demo's backbone (see promptcam/pretrain.py).
# Not part of `rule all`: the default demo starts from the weights shipped in
# promptcam/assets/. Regenerate them with `snakemake --cores 2 pretrain_backbone`.


rule pretrain_backbone:
    output:
        weights="results/pretrain/demo_vit.pt",
        card="results/pretrain/demo_vit.json",
    log:
        "logs/pretrain_backbone.log",
    benchmark:
        "results/benchmarks/pretrain_backbone.tsv"
    conda:
        "../../envs/train.yaml"
    threads: min(2, config["max_threads"])
    resources:
        gpu=gpu_request(),
        mem_mb=measured_mem_mb,
        runtime=measured_runtime,
    params:
        settings=pretrain_settings(),
        stages=pretrain_stages(),
        work_dir="results/pretrain/work",
        probe_per_species=config["pretrain"]["probe_per_species"],
        command="snakemake --cores 2 pretrain_backbone",
    script:
        "../../scripts/pretrain_backbone.py"
