"""The workflow's configuration contract; no torch import, so the Snakefile and ``--help`` use it.

``workflow/schemas/config.schema.yaml`` is the one source of every default, and marks once the
*runtime* keys (``runtime: true`` on a property, a keyword JSON Schema ignores): where and how
fast a job runs (device, threads, progress reports), never what it computes. Rules leave them
out of their params (:func:`result_settings`), adapters read them from the config
(:func:`runtime_settings`) and training leaves them out of its resume fingerprint, so changing
one reruns nothing. The package carries the schema as ``promptcam/config.schema.yaml`` (a link
to that file), so an installed package finds it too.

Library dataclasses keep defaults for direct use of the API; tests/test_config.py asserts that
every one that names a schema key equals the schema's default.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import types
import typing
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

# Precision of the blocks before the last in the greedy trait search (promptcam.traits).
EncodePrecision = Literal["auto", "fp32", "bf16"]
ENCODE_PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")

SCHEMA_PATH = Path(__file__).with_name("config.schema.yaml")

# The longest message text kept from a schema error (a long instance would flood the console).
_MAX_MESSAGE = 160

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value the workflow cannot use; the message is one line naming the key."""


# ----------------------------------------------------------------------------- the schema


@functools.cache
def _read_schema(path: str) -> dict[str, Any]:
    with open(path) as handle:
        return yaml.safe_load(handle)


def load_schema(path: str | Path = SCHEMA_PATH) -> dict[str, Any]:
    """The config schema (cached: treat it as read-only)."""
    return _read_schema(str(Path(path).resolve()))


def check_package_schema(workflow_schema: str | Path) -> None:
    """Fail unless the imported package carries the workflow's schema: the rules and the
    library must agree on defaults and runtime keys (a stale install would not)."""
    if load_schema(workflow_schema) != load_schema():
        raise ConfigError(
            f"the promptcam package imported from {Path(__file__).parent} carries another "
            f"config schema than {workflow_schema}: install this checkout "
            f"(pip install -e {Path(workflow_schema).resolve().parents[2]}) or put it first "
            "on PYTHONPATH"
        )


def _resolve(root: Mapping[str, Any], node: Mapping[str, Any]) -> dict[str, Any]:
    """``node`` with a local ``$ref`` ("#/$defs/...") merged in."""
    ref = node.get("$ref")
    if ref is None:
        return dict(node)
    if not ref.startswith("#/"):
        raise ValueError(f"only local $ref are supported, got {ref!r}")
    target: Any = root
    for part in ref[2:].split("/"):
        target = target[part]
    return {**target, **{key: value for key, value in node.items() if key != "$ref"}}


def _parts(section: str) -> list[str]:
    return [part for part in section.split(".") if part]


def section_schema(section: str, schema: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The schema of the config section at a dotted path ("traits.fidelity"; "" the root)."""
    root = load_schema() if schema is None else schema
    node = _resolve(root, root)
    for depth, key in enumerate(_parts(section)):
        properties = node.get("properties", {})
        if key not in properties:
            where = ".".join(_parts(section)[:depth]) or "(top level)"
            raise KeyError(f"the config schema has no section {section!r} ({key!r} under {where})")
        node = _resolve(root, properties[key])
    return node


def runtime_keys(section: str, schema: Mapping[str, Any] | None = None) -> frozenset[str]:
    """Keys of ``section`` marked ``runtime: true`` in the schema."""
    properties = section_schema(section, schema).get("properties", {})
    return frozenset(key for key, prop in properties.items() if prop.get("runtime") is True)


def all_runtime_keys(schema: Mapping[str, Any] | None = None) -> list[str]:
    """Every runtime key of the schema as a dotted path, e.g. ``traits.fidelity.device``."""
    root = load_schema() if schema is None else schema

    def walk(node: Mapping[str, Any], prefix: str) -> Iterator[str]:
        for key, prop in _resolve(root, node).get("properties", {}).items():
            if prop.get("runtime") is True:
                yield prefix + key
            yield from walk(prop, f"{prefix}{key}.")

    return sorted(walk(root, ""))


def config_section(config: Mapping[str, Any], section: str) -> Any:
    """The value at a dotted path of ``config``."""
    value: Any = config
    for key in _parts(section):
        value = value[key]
    return value


def result_settings(values: Mapping[str, Any], section: str, *elsewhere: str) -> dict[str, Any]:
    """A config section less its runtime keys and the subsections ``elsewhere`` (settings that
    other rules own): what determines the results of the rule that reads it."""
    drop = runtime_keys(section) | set(elsewhere)
    return {key: value for key, value in values.items() if key not in drop}


def runtime_settings(config: Mapping[str, Any], section: str) -> dict[str, Any]:
    """The runtime keys of a config section and their values (absent keys left out)."""
    values = config_section(config, section)
    return {key: values[key] for key in sorted(runtime_keys(section)) if key in values}


def schema_defaults(section: str = "") -> Any:
    """A section of the config that the schema's defaults alone make."""
    return config_section(validate_config({}), section)


# ----------------------------------------------------------------------------- validation


def _validator_with_defaults(validator_class: Any) -> Any:
    """A validator class that fills in every missing property that has a default, as
    snakemake.utils.validate does (jsonschema FAQ), but with copies of the schema's defaults:
    the schema is cached and must not collect the config's values."""
    from jsonschema import validators

    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for key, subschema in properties.items():
                if "default" in subschema and key not in instance:
                    instance[key] = copy.deepcopy(subschema["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return validators.extend(validator_class, {"properties": set_defaults})


def validate_config(
    config: dict[str, Any], schema_path: str | Path = SCHEMA_PATH
) -> dict[str, Any]:
    """Check ``config`` against the schema and fill in its defaults (in place; returned too).

    Raises:
        ConfigError: one line naming the key path, the problem and, for an unknown key, the
            closest valid key.
    """
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import best_match

    schema = load_schema(schema_path)
    validator = _validator_with_defaults(Draft202012Validator)(schema)
    error = best_match(validator.iter_errors(config))
    if error is not None:
        raise ConfigError(_describe(error)) from None
    return config


def _where(path: Iterable[Any]) -> str:
    keys = ".".join(str(key) for key in path)
    return f"config {keys}" if keys else "config"


def unknown_key_message(where: str, key: str, valid: Iterable[str]) -> str:
    """``{where}: unknown key 'x' (did you mean 'y'?)``, or the valid keys when none is close."""
    valid = sorted(str(name) for name in valid)
    close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.6)
    if close:
        hint = f"did you mean {close[0]!r}?"
    elif valid:
        hint = "valid keys: " + ", ".join(valid)
    else:
        hint = "this section takes no keys"
    return f"{where}: unknown key {key!r} ({hint})"


def _first_sentence(text: str) -> str:
    sentence = " ".join(text.split()).split(". ")[0].rstrip(".")
    return sentence if len(sentence) <= 100 else sentence[:97] + "..."


def _describe(error: Any) -> str:
    where = _where(error.absolute_path)
    schema = error.schema if isinstance(error.schema, Mapping) else {}
    if error.validator == "additionalProperties" and isinstance(error.instance, Mapping):
        known = schema.get("properties", {})
        unknown = [key for key in error.instance if key not in known]
        if unknown:
            return "; ".join(unknown_key_message(where, key, known) for key in unknown)
    description = schema.get("description")
    if error.validator == "not":
        # jsonschema would print the whole forbidden sub-schema: say what it means instead.
        forbidden = error.validator_value if isinstance(error.validator_value, Mapping) else {}
        description = forbidden.get("description") or description
        message = _first_sentence(description) if description else "not allowed here"
    else:
        message = error.message
        if len(message) > _MAX_MESSAGE:
            message = message[: _MAX_MESSAGE - 3] + "..."
        if description:
            message += f" ({_first_sentence(description)})"
    return f"{where}: {message}"


def check_rank_keys(config: Mapping[str, Any]) -> None:
    """Per-rank mappings (``train.ranks``, ``traits.cross_class_pairs``) name only ``levels``,
    so that a misspelt rank is not silently ignored."""
    levels = list(config["levels"])
    for section in ("train.ranks", "traits.cross_class_pairs"):
        for rank in config_section(config, section):
            if rank not in levels:
                message = unknown_key_message(f"config {section}", rank, levels)
                raise ConfigError(message.replace("unknown key", "unknown rank", 1))


# ----------------------------------------------------------------------------- settings


def settings_from_config(cls: type[T], values: Mapping[str, Any], section: str) -> T:
    """The settings dataclass ``cls`` from a config section (a dotted path, for messages).

    Unknown keys raise :class:`ConfigError` naming the closest field; nested dataclass fields
    are built from nested mappings, lists become tuples where the field is a tuple, and ints
    floats where it is a float. Keys left out take the dataclass's defaults (the workflow
    passes whole sections).
    """
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"{cls!r} is not a dataclass")
    if not isinstance(values, Mapping):
        raise ConfigError(f"{_where(_parts(section))}: expected a mapping, got {values!r}")
    names = [field.name for field in dataclasses.fields(cls) if field.init]
    for key in values:
        if key not in names:
            raise ConfigError(unknown_key_message(_where(_parts(section)), key, names))
    hints = typing.get_type_hints(cls)
    return cls(
        **{key: _as_type(hints[key], value, f"{section}.{key}") for key, value in values.items()}
    )


def _as_type(hint: Any, value: Any, section: str) -> Any:
    """``value`` shaped as the type ``hint`` asks: dataclasses, tuples and mappings recursively."""
    if isinstance(hint, type) and dataclasses.is_dataclass(hint) and isinstance(value, Mapping):
        return settings_from_config(hint, value, section)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)  # YAML reads "5" as an int
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        options = [arg for arg in args if arg is not type(None)]
        if value is None or len(options) != 1:
            return value
        return _as_type(options[0], value, section)
    if origin is tuple and isinstance(value, Sequence) and not isinstance(value, str):
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_as_type(args[0], item, section) for item in value)
        if len(args) == len(value):
            return tuple(
                _as_type(arg, item, section) for arg, item in zip(args, value, strict=True)
            )
        return tuple(value)
    if origin in (Mapping, dict) and isinstance(value, Mapping) and len(args) == 2:
        return {key: _as_type(args[1], item, section) for key, item in value.items()}
    return value


# ----------------------------------------------------------------------------- per-rank training


def merged(defaults: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``defaults`` updated by ``overrides``, recursively for nested mappings."""
    out = dict(defaults)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def rank_train_settings(
    train_section: Mapping[str, Any], rank: str, levels: Sequence[str]
) -> dict[str, Any]:
    """One rank's training, model and transform settings: the config's ``train.defaults``
    merged with ``train.ranks[rank]``."""
    unknown = set(train_section["ranks"]) - set(levels)
    if unknown:
        raise ValueError(f"config train.ranks names unknown ranks {sorted(unknown)}")
    return merged(train_section["defaults"], train_section["ranks"].get(rank, {}))
