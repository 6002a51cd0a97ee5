"""Run configuration: a YAML file with `recipe:` and `train:` sections, plus `section.key=value` overrides.

Each section fills a dataclass (the recipe's `RecipeConfig`, and `TrainConfig`); nested dataclasses are
nested mappings. A key that does not exist is an error naming it and the valid keys; values are checked
against the field types (an int where a float is expected is fine, a word where a number is expected is not).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

from .recipe import TrainConfig

SECTIONS = ("recipe", "train")


class ConfigError(ValueError):
    """A config file or override the user must fix; the entry point prints it without a traceback."""


def load_config(recipe_config_class: type, path: str | Path | None, overrides: list[str] = ()) -> tuple[Any, TrainConfig]:
    """(RecipeConfig, TrainConfig) from a YAML file (optional) and `section.key=value` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = read_yaml(path)
    for override in overrides:
        apply_override(raw, override)
    return (build_dataclass(recipe_config_class, raw.get("recipe") or {}, "recipe"),
            build_dataclass(TrainConfig, raw.get("train") or {}, "train"))


def read_yaml(path: str | Path) -> dict[str, Any]:
    import yaml
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with the sections {', '.join(SECTIONS)}")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {', '.join(map(repr, unknown))}; valid: {', '.join(SECTIONS)}")
    for section in SECTIONS:
        if raw.get(section) is not None and not isinstance(raw[section], dict):
            raise ConfigError(f"{path}: section {section!r} must be a mapping of keys to values")
    return raw


def apply_override(raw: dict[str, Any], override: str) -> None:
    """`train.steps=10` or `recipe.model.dim=8`: the value is read as YAML (numbers, booleans, lists)."""
    import yaml
    key, sep, text = override.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) < 2 or not all(parts):
        raise ConfigError(f"override {override!r}: expected section.key=value, e.g. train.steps=100")
    if parts[0] not in SECTIONS:
        raise ConfigError(f"override {override!r}: unknown section {parts[0]!r}; valid: {', '.join(SECTIONS)}")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {part!r} is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(text)
    except yaml.YAMLError:
        node[parts[-1]] = text


def build_dataclass(cls: type, values: dict[str, Any], where: str):
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping of keys to values, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config key {where}.{unknown[0]}"
                          + (f" (and {', '.join(unknown[1:])})" if unknown[1:] else "")
                          + f"; valid keys in {where}: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {name: convert(value, hints.get(name, Any), f"{where}.{name}") for name, value in values.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None


def convert(value: Any, hint: Any, where: str) -> Any:
    """`value` checked and converted to the field type `hint`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return convert(value, option, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        return build_dataclass(hint, value if value is not None else {}, where)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
            items = [convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        else:
            item_type = args[0] if args else Any
            items = [convert(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def to_plain(config: Any) -> Any:
    """A dataclass as plain dicts/lists, for printing and for the run's config.yaml."""
    if dataclasses.is_dataclass(config):
        return {f.name: to_plain(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (list, tuple)):
        return [to_plain(v) for v in config]
    if isinstance(config, Path):
        return str(config)
    return config


def dump_yaml(recipe_config: Any, train_config: TrainConfig) -> str:
    import yaml
    return yaml.safe_dump({"recipe": to_plain(recipe_config), "train": to_plain(train_config)}, sort_keys=False)
