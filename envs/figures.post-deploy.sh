#!/bin/sh
# Run by Snakemake inside this conda environment right after creating it (with
# --software-deployment-method conda, once, on the submit host): installs this package from the
# repository the workflow runs from, editable (library edits need no new environment) and
# without its dependencies (the environment file beside this one holds what its rules need).
# The Snakefile sets PROMPTCAM_REPO: a relative path in the environment file would be resolved
# against its copy in the conda prefix (.snakemake/conda/), not against envs/.
set -eu
repo=${PROMPTCAM_REPO:?"unset: create the environments through the Snakefile"}
python -m pip install --no-deps --no-input --quiet --editable "$repo"
python -c "import promptcam"
