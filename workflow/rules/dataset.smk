# The data source: checked and fingerprinted at start (promptcam.data.fingerprint), and the
# inputs and settings the data rules take from it. Included by data.smk.
from promptcam.data.fingerprint import SourceError, check_source, describe_source
from snakemake_interface_common.exceptions import WorkflowError


def dataset_columns():
    dataset = config["dataset"]
    return {
        "image": dataset["image_column"],
        "split": dataset["split_column"],
        "mask": dataset["mask_column"],
    }


def dataset_source():
    """What the data comes from, with its fingerprint; a missing table or image root is an
    error here, at start, naming the config key (not a silent reuse of old results)."""
    dataset = config["dataset"]
    try:
        check_source(
            dataset["kind"], dataset.get("metadata"), dataset.get("image_root")
        )
    except SourceError as error:
        raise WorkflowError(str(error)) from None
    return describe_source(
        dataset["kind"],
        levels(),
        dataset_columns(),
        metadata=dataset.get("metadata"),
        image_root=dataset.get("image_root"),
        demo=rule_settings("demo"),
    )


# Computed once per start: hashing a big table takes a moment.
DATASET_SOURCE = dataset_source()


def source_record():
    """results/data/sources/<fingerprint>.json, written by the record_source job. It is an
    input of prepare_metadata and part of the data contract (so the default target needs it).
    Another dataset has another path. With Snakemake's records the input set of
    prepare_metadata changes; without them (a copied results folder) the default target finds
    the record missing. Either way the data stage and all after it rerun, even when the new
    table is older than the results."""
    return data_path("sources", f"{DATASET_SOURCE['fingerprint']}.json")


def source_inputs(wildcards):
    """The data source record, and the table unless the dataset is a folder tree."""
    inputs = {"source": source_record()}
    if config["dataset"]["kind"] != "folders":
        inputs["table"] = source_table()
    return inputs


def source_table_param(wildcards, input):
    """The table to read, or None to read the folder tree at the image root."""
    return input.get("table")


def ingest_settings():
    """IngestSettings fields: what to do with bad images, and how they become RGB."""
    dataset = config["dataset"]
    return canonical(
        {
            "on_bad_image": dataset["on_bad_image"],
            "images": {
                "background": dataset["alpha_background"],
                "sample_bits": dataset["sample_bits"],
                "max_pixels": dataset["max_image_pixels"],
            },
        }
    )
