# Prompt-CAM trait discovery per taxonomic rank.
#   snakemake --cores 8                    # the bundled demo (config/config.yaml)
#   snakemake --cores 8 --profile slurm    # on a SLURM cluster
import os
from pathlib import Path

from snakemake.utils import min_version

from promptcam.config import check_package_schema, check_rank_keys, validate_config
from promptcam.model.spec import workflow_backbone_spec

min_version("9.27")

# The conda environments' post-deploy scripts (envs/*.post-deploy.sh) install the package from
# this repository (the environment files cannot name it: Snakemake copies them into the conda
# prefix, and conda resolves a relative path against the copy).
os.environ.update(PROMPTCAM_REPO=workflow.basedir)


configfile: "config/config.yaml"


# Fills in every default, so rules may index config without .get(). A mistake stops the run
# with one line naming the key (Snakemake's validate() would print the whole schema).
CONFIG_SCHEMA = Path(workflow.basedir, "workflow", "schemas", "config.schema.yaml")
check_package_schema(CONFIG_SCHEMA)
validate_config(config, CONFIG_SCHEMA)
check_rank_keys(config)
# Refuses, with the reason, a backbone Prompt-CAM cannot explain, before any job runs.
workflow_backbone_spec(config["backbone"])


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/traits.smk"
include: "workflow/rules/figures.smk"


# Rerun triggers: Snakemake's default (mtime, params, input, software-env, code), on purpose.
# - params: each rank's merged train settings are its train job's params, so editing one
#   rank's settings (train.ranks.genus) reruns that rank and its downstream jobs only; the
#   keys the schema marks `runtime: true` (device, threads, progress_seconds...) are left out
#   of params (rule_settings()) and read from the config, and params mappings are key-sorted
#   (canonical()), so reordering a config file reruns nothing.
# - mtime/input: a new backbone file (e.g. promptcam/assets/demo_vit.pt) reruns every rank.
# - code: only the thin adapters in scripts/ are tracked (by mtime), not the promptcam
#   library. After changing the library, rerun what it affects with --forcerun RULE; to
#   ignore an adapter edit, pass --rerun-triggers mtime params input software-env.


rule all:
    default_target: True
    input:
        data_outputs(),
        train_outputs(),
        trait_outputs(),
        figure_outputs(),
