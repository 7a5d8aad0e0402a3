# Prompt-CAM trait discovery per taxonomic rank.
#   snakemake --cores 8                    # the bundled demo (config/config.yaml)
#   snakemake --cores 8 --profile slurm    # on a SLURM cluster
from snakemake.utils import min_version, validate

min_version("9.27")


configfile: "config/config.yaml"


# Fills in every default, so rules may index config without .get().
validate(config, "workflow/schemas/config.schema.yaml")


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/pretrain.smk"


# Later stages are included here, in pipeline order:
# include: "workflow/rules/train.smk"
# include: "workflow/rules/traits.smk"
# include: "workflow/rules/figures.smk"


rule all:
    default_target: True
    # Later stages add their contract outputs below, e.g. train_outputs(), trait_outputs().
    input:
        data_outputs(),
