"""Snakemake adapter for rule record_source: see promptcam.data.fingerprint.record_source."""

from promptcam.data.fingerprint import record_source
from promptcam.joblog import job_log


def main() -> None:
    with job_log(snakemake.log[0], "recording the data source") as log:
        record_source(snakemake.output[0], snakemake.params.description)
        log.info("dataset %s: %s", snakemake.params.description["kind"], snakemake.output[0])


if __name__ == "__main__":
    main()
