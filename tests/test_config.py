"""The configuration contract: the schema holds every default and marks the runtime keys;
validation and settings dataclasses name a bad key in one line, with the closest valid one."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest
import yaml

from promptcam.config import (
    SCHEMA_PATH,
    ConfigError,
    all_runtime_keys,
    check_package_schema,
    check_rank_keys,
    load_schema,
    merged,
    rank_train_settings,
    result_settings,
    runtime_keys,
    runtime_settings,
    schema_defaults,
    settings_from_config,
    validate_config,
)
from promptcam.data.metadata import MetadataSpec
from promptcam.data.shards import ShardConfig
from promptcam.data.splits import SplitConfig
from promptcam.demo.taxa import DemoConfig
from promptcam.model.spec import BackboneSpec, PromptCAMConfig

# Where config/config.yaml (the CPU demo) departs from the schema's defaults, which are the
# settings for real data (the reference's training recipe, 256 px shards). The file holds
# nothing else: a default written there too could drift from the schema.
DEMO_DEPARTURES = {
    "shards": {"short_side": 96},
    "train": {
        "defaults": {
            "epochs": 20,
            "warmup_epochs": 2,
            "batch_size": 32,
            "lr": 0.05,
            "model": {"layout": "scalable", "num_agnostic_prompts": 0, "drop_path_rate": 0.0},
        },
        "ranks": {"species": {"epochs": 40}},
    },
    "evaluate": {"linear_probe": {"pool": "mean"}},
    "traits": {"fidelity": {"max_images": 48}},
}


def message_of(config: dict) -> str:
    with pytest.raises(ConfigError) as caught:
        validate_config(config)
    return str(caught.value)


def test_unknown_key_names_the_section_and_the_closest_key():
    assert (
        message_of({"traits": {"fidelity": {"step": 3}}})
        == "config traits.fidelity: unknown key 'step' (did you mean 'steps'?)"
    )
    assert message_of({"shard": {}}) == "config: unknown key 'shard' (did you mean 'shards'?)"
    # Through a $ref (train.defaults) and a per-rank override.
    assert message_of({"train": {"defaults": {"model": {"layuot": "scalable"}}}}) == (
        "config train.defaults.model: unknown key 'layuot' (did you mean 'layout'?)"
    )
    assert message_of({"train": {"ranks": {"genus": {"epoch": 3}}}}) == (
        "config train.ranks.genus: unknown key 'epoch' (did you mean 'epochs'?)"
    )
    # Nothing close: the valid keys instead.
    assert message_of({"splits": {"zzz": 1}}) == (
        "config splits: unknown key 'zzz' (valid keys: min_class_size, seed, test, train, val)"
    )


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"shards": {"threads": 9}}, "config shards.threads: 9 is greater than the maximum of 8"),
        ({"dataset": {"kind": "folder"}}, "config dataset.kind: 'folder' is not one of"),
        (
            {"dataset": {"kind": "table", "metadata": "m.csv"}},
            "config dataset: 'image_root' is a required property",
        ),
        (
            {"dataset": {"kind": "table", "metadata": "m.xlsx", "image_root": "x"}},
            "config dataset.metadata: 'm.xlsx' does not match",
        ),
        (
            {"dataset": {"metadata": "m.csv"}},
            "config dataset: metadata and image_root are read only with kind table",
        ),
        (
            {"levels": ["order", "family", "genus", "species"]},
            "config levels: ['family', 'genus', 'species'] was expected (the demo generator",
        ),
        ({"splits": {"train": 0}}, "config splits.train: 0 is less than or equal to the minimum"),
        ({"demo": {"image_size": "large"}}, "config demo.image_size: 'large' is not of type"),
        ({"train": {"device": "gpu"}}, "config train.device: 'gpu' does not match"),
    ],
)
def test_schema_rejects_bad_configs_in_one_line(config, expected):
    message = message_of(config)
    assert message.startswith(expected), message
    assert "\n" not in message and len(message) < 300


def test_misspelt_rank_is_named_with_the_closest_level():
    config = validate_config({"train": {"ranks": {"specis": {"epochs": 3}}}})
    with pytest.raises(ConfigError, match=r"config train.ranks: unknown rank 'specis' \(did you"):
        check_rank_keys(config)
    config = validate_config({"traits": {"cross_class_pairs": {"genera": [["a", "b"]]}}})
    with pytest.raises(ConfigError, match=r"traits\.cross_class_pairs: unknown rank 'genera'"):
        check_rank_keys(config)


def test_validation_fills_every_default_and_leaves_the_schema_alone():
    first = validate_config({})
    first["train"]["defaults"]["model"]["layout"] = "scalable"
    first["traits"]["cross_class_pairs"]["genus"] = [["a", "b"]]
    again = validate_config({})
    assert again["train"]["defaults"]["model"]["layout"] == "reference"
    assert again["traits"]["cross_class_pairs"] == {}
    assert again["train"]["defaults"]["epochs"] == 130
    assert again["traits"]["fidelity"]["steps"] == 32
    # What is given stays; only what is missing is filled.
    given = validate_config({"train": {"defaults": {"epochs": 3}}})
    assert given["train"]["defaults"]["epochs"] == 3
    assert given["train"]["defaults"]["batch_size"] == 16


def leaves(tree: Mapping, prefix: str = "") -> dict[str, object]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            out.update(leaves(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def test_shipped_config_names_only_the_demos_departures(repo_root):
    shipped = yaml.safe_load((repo_root / "config" / "config.yaml").read_text())
    assert shipped == DEMO_DEPARTURES
    defaults = leaves(schema_defaults())
    # train.ranks.* has no default (it is an override): every other value departs.
    restated = {
        key: value
        for key, value in leaves(shipped).items()
        if key in defaults and defaults[key] == value
    }
    assert not restated, f"config/config.yaml restates schema defaults: {restated}"
    assert merged(schema_defaults(), DEMO_DEPARTURES) == validate_config(dict(shipped))
    for name in ("demo_small.yaml", "pipeline_tiny.yaml"):
        validate_config(yaml.safe_load((repo_root / "tests" / "configs" / name).read_text()))


def test_package_carries_the_workflow_schema(repo_root, tmp_path):
    workflow_schema = repo_root / "workflow" / "schemas" / "config.schema.yaml"
    assert SCHEMA_PATH.resolve() == workflow_schema.resolve()
    check_package_schema(workflow_schema)
    other = tmp_path / "config.schema.yaml"
    other.write_text(workflow_schema.read_text().replace("default: 130", "default: 131"))
    with pytest.raises(ConfigError, match="carries another config schema"):
        check_package_schema(other)


def test_rank_settings_merge_nested_overrides_and_reject_unknown_ranks():
    train = {
        "defaults": {"epochs": 20, "lr": 0.05, "model": {"layout": "scalable", "variant": "deep"}},
        "ranks": {"species": {"epochs": 40, "model": {"layout": "reference"}}},
    }
    levels = ["genus", "species"]
    assert rank_train_settings(train, "species", levels) == {
        "epochs": 40,
        "lr": 0.05,
        "model": {"layout": "reference", "variant": "deep"},
    }
    assert rank_train_settings(train, "genus", levels) == train["defaults"]
    with pytest.raises(ValueError, match=r"unknown ranks \['species'\]"):
        rank_train_settings(train, "genus", ["genus"])


def test_every_section_rejects_unknown_keys():
    """Every mapping the schema describes key by key forbids other keys (a typo never passes
    silently); only backbone.kwargs (timm's arguments) and the per-rank mappings are open."""
    schema = load_schema()
    open_sections = []

    def walk(node, path):
        if not isinstance(node, Mapping):
            return
        is_mapping = "properties" in node or node.get("type") == "object"
        if is_mapping and node.get("additionalProperties") is not False:
            open_sections.append(path)
        for key, child in node.get("properties", {}).items():
            walk(child, f"{path}.{key}".lstrip("."))
        for key, child in node.get("$defs", {}).items():
            walk(child, f"$defs.{key}")
        if isinstance(node.get("additionalProperties"), Mapping):
            walk(node["additionalProperties"], f"{path}.*")
        if isinstance(node.get("items"), Mapping):
            walk(node["items"], f"{path}[]")

    walk(schema, "")
    # train.defaults is a $ref to $defs.train_settings, which is checked itself.
    assert sorted(open_sections) == [
        "backbone.kwargs",
        "train.defaults",
        "train.ranks",
        "traits.cross_class_pairs",
    ]


# ----------------------------------------------------------------------------- runtime keys


def test_runtime_keys_are_marked_once_in_the_schema():
    # Changing which keys are runtime changes what reruns and what resumes: pinned here.
    assert all_runtime_keys() == [
        "dataset.threads",
        "demo.threads",
        "evaluate.threads",
        "gpus_per_job",
        "max_threads",
        "pretrain.device",
        "shards.threads",
        "test_shard_groups",
        "train.compile",
        "train.device",
        "train.mixed_precision",
        "train.progress_seconds",
        "train.threads",
        "traits.device",
        "traits.fidelity.device",
        "traits.fidelity.threads",
        "traits.heads.device",
        "traits.heads.threads",
        "traits.progress_seconds",
        "traits.threads",
    ]
    # Loader workers change the data order, so they are a result key.
    assert "num_workers" not in runtime_keys("train.defaults")
    config = validate_config({"traits": {"device": "cpu"}})
    assert runtime_settings(config, "traits") == {
        "device": "cpu",
        "progress_seconds": 10,
        "threads": 2,
    }
    params = result_settings(config["traits"], "traits", "localization", "fidelity")
    assert not {"device", "threads", "localization", "fidelity"} & set(params)
    assert {"stop", "top_traits", "batch_size", "num_workers"} <= set(params)


def test_training_fingerprint_leaves_out_exactly_the_runtime_keys():
    from promptcam.data.reader import TransformConfig
    from promptcam.training.settings import TrainConfig
    from promptcam.training.state import run_identity

    def identity(config: TrainConfig) -> dict:
        return run_identity(
            config=config,
            prompt_config=PromptCAMConfig(num_classes=2),
            spec=BackboneSpec("vit_custom"),
            rank="family",
            label_names=["a", "b"],
            transform=TransformConfig(),
            manifest={"shards": []},
        )["train_config"]

    base = TrainConfig()
    assert set(dataclasses.asdict(base)) - set(identity(base)) == set(runtime_keys("train"))
    runtime = {"device": "cuda", "threads": 7, "progress_seconds": 1.0, "compile": True}
    assert identity(dataclasses.replace(base, mixed_precision=False, **runtime)) == identity(base)
    assert identity(dataclasses.replace(base, num_workers=0)) != identity(base)


def test_library_choices_are_the_schemas():
    from promptcam.config import ENCODE_PRECISIONS, section_schema
    from promptcam.traits.search import STOP_RULES

    traits = section_schema("traits")["properties"]
    assert tuple(traits["encode_precision"]["enum"]) == ENCODE_PRECISIONS
    assert tuple(traits["stop"]["enum"]) == STOP_RULES


# ----------------------------------------------------------------------------- settings


def test_settings_from_config_builds_nested_dataclasses_and_names_unknown_keys():
    from promptcam.evaluation.evaluate import EvalConfig
    from promptcam.evaluation.linear_probe import LinearProbeConfig

    config = settings_from_config(
        EvalConfig, {"top_k": 3, "linear_probe": {"c_grid": [1, 10], "pool": "mean"}}, "evaluate"
    )
    assert config.linear_probe == LinearProbeConfig(pool="mean", c_grid=(1.0, 10.0))
    assert config.top_k == 3 and config.batch_size == EvalConfig().batch_size
    with pytest.raises(ConfigError) as caught:
        settings_from_config(EvalConfig, {"linear_probe": {"pol": "mean"}}, "evaluate")
    assert str(caught.value) == (
        "config evaluate.linear_probe: unknown key 'pol' (did you mean 'pool'?)"
    )


def test_trait_settings_keep_every_ranks_pairs_as_tuples():
    from promptcam.traits.run import TraitRunConfig

    config = settings_from_config(
        TraitRunConfig,
        {"top_traits": 2, "cross_class_pairs": {"genus": [["a b", "a c"]]}},
        "traits",
    )
    assert config.cross_class_pairs == {"genus": (("a b", "a c"),)}
    assert config.greedy.top_traits == 2
    with pytest.raises(ConfigError, match="did you mean 'top_traits'"):
        settings_from_config(TraitRunConfig, {"top_trait": 2}, "traits")


def normalised(value):
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return {key: normalised(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [normalised(item) for item in value]
    return value


def field_default(field: dataclasses.Field):
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


# The field means something else in the library: the job's cores in the config, torch's
# threads (those cores less the loader workers) in the dataclass, set by the adapter.
DERIVED_BY_THE_ADAPTER = {"threads"}


def settings_classes():
    """(dataclass, config section) of every settings dataclass built from the config."""
    from promptcam.demo.pretext import PretrainConfig
    from promptcam.evaluation.evaluate import EvalConfig
    from promptcam.evaluation.fidelity import FidelityConfig
    from promptcam.evaluation.heads import HeadsConfig
    from promptcam.evaluation.linear_probe import LinearProbeConfig
    from promptcam.figures import settings as figures
    from promptcam.figures.style import FigureStyle
    from promptcam.training.settings import TrainConfig
    from promptcam.traits.information import HeadInformationConfig
    from promptcam.traits.run import TraitRunConfig
    from promptcam.traits.search import GreedyConfig

    return [
        (TrainConfig, "train.defaults"),
        (TrainConfig, "train"),
        (PromptCAMConfig, "train.defaults.model"),
        # train.defaults.transform holds resize_size only (derived from img_size when unset);
        # mean, std and interpolation come from backbone.preprocessing or the weights' family.
        (EvalConfig, "evaluate"),
        (LinearProbeConfig, "evaluate.linear_probe"),
        (TraitRunConfig, "traits"),
        (GreedyConfig, "traits"),
        (FidelityConfig, "traits.fidelity"),
        (HeadsConfig, "traits.heads"),
        (HeadInformationConfig, "traits.information"),
        (DemoConfig, "demo"),
        (SplitConfig, "splits"),
        (ShardConfig, "shards"),
        (MetadataSpec, ""),
        (MetadataSpec, "dataset"),
        (BackboneSpec, "backbone"),
        (PretrainConfig, "pretrain"),
        (FigureStyle, "figures.style"),
        (figures.PanelSettings, "figures.panels"),
        (figures.GallerySettings, "figures.gallery"),
        (figures.CoarseToFineSettings, "figures.coarse_to_fine"),
        (figures.TreeSettings, "figures.tree"),
        (figures.CrossClassSettings, "figures.cross_class"),
    ]


def test_dataclass_defaults_are_the_schema_defaults():
    for cls, section in settings_classes():
        defaults = schema_defaults(section)
        compared = 0
        for field in dataclasses.fields(cls):
            default = field_default(field)
            if field.name not in defaults or field.name in DERIVED_BY_THE_ADAPTER:
                continue
            if default is dataclasses.MISSING:
                continue  # a required field cannot drift
            assert normalised(default) == normalised(defaults[field.name]), (
                f"{cls.__name__}.{field.name} defaults to {default!r}, the schema's "
                f"{section or 'top level'}.{field.name} to {defaults[field.name]!r}"
            )
            compared += 1
        assert compared, (cls.__name__, section)


def test_every_key_of_a_section_has_its_field():
    """Adapters pass whole sections: a new schema key needs a field (or its rule's reason)."""
    from promptcam.config import section_schema

    # (section, keys the adapter takes out first: other rules' sections, separate params)
    taken_out = {
        "demo": {"threads"},
        "shards": {"threads"},
        "traits": {"localization", "fidelity", "heads", "information"},
        "train.defaults": {"model", "transform"},
        "pretrain": {"device", "probe_per_species", "stages"},
    }
    for cls, section in settings_classes():
        if section in ("", "dataset", "train") or cls.__name__ == "GreedyConfig":
            continue  # sections whose keys are shared out over several settings
        keys = set(section_schema(section).get("properties", {})) - taken_out.get(section, set())
        fields = {field.name for field in dataclasses.fields(cls)}
        assert keys <= fields, (cls.__name__, section, sorted(keys - fields))


# ----------------------------------------------------------------------------- Snakemake


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (
            {"traits": {"fidelity": {"step": 3}}},
            "config traits.fidelity: unknown key 'step' (did you mean 'steps'?)",
        ),
        ({"levls": ["family"]}, "config: unknown key 'levls' (did you mean 'levels'?)"),
    ],
)
def test_snakemake_stops_on_a_typo_with_a_short_message(
    repo_root: Path, tmp_path: Path, run_command, config, expected
):
    configfile = tmp_path / "typo.yaml"
    configfile.write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "snakemake", "-n", "--cores", "1",
           "--snakefile", str(repo_root / "Snakefile"), "--directory", str(tmp_path),
           "--configfile", str(configfile)]  # fmt: skip
    proc = run_command(cmd, timeout=300, cwd=tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert expected in output, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) <= 8, output
